//! Instruction records in the LLM-Adapters / Alpaca layout (`instruction`, `input`, `output`,
//! optional `answer`) and the prompt templates of the LoRA-Dash reference code
//! (Chongjie-Si/Subspace-Tuning `CR_MR/finetune.py` and `CR_MR/commonsense_evaluate.py`,
//! which fix the stray `# noqa: E501` that LLM-Adapters' own `finetune.py` leaves inside its
//! template). The templates are copied byte for byte, odd indentation included, because the
//! model learns exactly these tokens and evaluation must see them again.

use std::path::{Path, PathBuf};

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, IoContext, Result};

/// One training or test example. Extra fields in the file are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

/// Reads every file (a JSON array of records, or JSON Lines) and concatenates the records in
/// file order. The format is chosen by the first non-space character: `[` or `{`.
pub fn load_records(paths: &[PathBuf]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).at(path)?;
        // A UTF-8 byte-order mark is not JSON but some editors write one.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        match text.trim_start().chars().next() {
            Some('[') => out.extend(parse_array(path, text)?),
            Some('{') => out.extend(parse_jsonl(path, text)?),
            Some(c) => {
                return Err(Error::format(
                    path,
                    format!(
                        "expected a JSON array or JSON Lines of records, found `{c}` at the start"
                    ),
                ))
            }
            None => return Err(Error::format(path, "file is empty")),
        }
    }
    Ok(out)
}

fn parse_array(path: &Path, text: &str) -> Result<Vec<Record>> {
    // Parse element by element so a syntax error can name the record it occurred in.
    let failed_at = std::cell::Cell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let values = serde::Deserializer::deserialize_seq(
        &mut de,
        Collect {
            failed_at: &failed_at,
        },
    )
    .and_then(|v| de.end().map(|_| v));
    let values = match values {
        Ok(v) => v,
        Err(e) => {
            return Err(match failed_at.get() {
                Some(index) => Error::Record {
                    path: path.to_path_buf(),
                    index,
                    msg: format!("invalid JSON: {e}"),
                },
                None => Error::format(path, format!("invalid JSON: {e}")),
            })
        }
    };
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| record_from_value(v).map_err(|msg| record_err(path, i, msg)))
        .collect()
}

fn parse_jsonl(path: &Path, text: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let index = out.len();
        let lineno = lineno + 1;
        let v: Value = serde_json::from_str(line)
            .map_err(|e| record_err(path, index, format!("line {lineno}: invalid JSON: {e}")))?;
        let rec = record_from_value(v)
            .map_err(|msg| record_err(path, index, format!("line {lineno}: {msg}")))?;
        out.push(rec);
    }
    Ok(out)
}

fn record_err(path: &Path, index: usize, msg: String) -> Error {
    Error::Record {
        path: path.to_path_buf(),
        index,
        msg,
    }
}

/// Field-by-field conversion, so the error names the field that is missing or mistyped.
fn record_from_value(v: Value) -> std::result::Result<Record, String> {
    let Value::Object(mut map) = v else {
        return Err(format!("expected a JSON object, found {}", kind(&v)));
    };
    let mut required = |field: &str| -> std::result::Result<String, String> {
        match map.remove(field) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!(
                "field `{field}` must be a string, found {}",
                kind(&other)
            )),
            None => Err(format!("missing field `{field}`")),
        }
    };
    let instruction = required("instruction")?;
    let output = required("output")?;
    let input = match map.remove("input") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(format!(
                "field `input` must be a string, found {}",
                kind(&other)
            ))
        }
    };
    let answer = match map.remove("answer") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        // Numeric or boolean answers (some datasets) compare as their JSON text.
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
        Some(other) => {
            return Err(format!(
                "field `answer` must be a string, found {}",
                kind(&other)
            ))
        }
    };
    Ok(Record {
        instruction,
        input,
        output,
        answer,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct Collect<'a> {
    failed_at: &'a std::cell::Cell<Option<usize>>,
}

impl<'de> Visitor<'de> for Collect<'_> {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Vec<Value>, A::Error> {
        let mut out = Vec::new();
        loop {
            match seq.next_element::<Value>() {
                Ok(Some(v)) => out.push(v),
                Ok(None) => return Ok(out),
                Err(e) => {
                    self.failed_at.set(Some(out.len()));
                    return Err(e);
                }
            }
        }
    }
}

// The training template of CR_MR/finetune.py. Note the single space after "request." in the
// with-input variant, the two spaces in the other, and the 16-space "blank" lines.
const TRAIN_WITH_INPUT_HEAD: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. \n\n                ### Instruction:\n                ";
const TRAIN_NO_INPUT_HEAD: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n                ### Instruction:\n                ";
const TRAIN_INPUT_SEP: &str = "\n                \n                ### Input:\n                ";
const TRAIN_RESPONSE_SEP: &str =
    "\n                \n                ### Response:\n                ";

// The evaluation template of CR_MR/commonsense_evaluate.py: no trailing space after
// "request." with input, one without, and truly empty blank lines.
const EVAL_WITH_INPUT_HEAD: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n                ### Instruction:\n                ";
const EVAL_NO_INPUT_HEAD: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n                ### Instruction:\n                ";
const EVAL_INPUT_SEP: &str = "\n\n                ### Input:\n                ";
const EVAL_RESPONSE_SEP: &str = "\n\n                ### Response:\n                ";

/// The training prompt of `generate_prompt(data_point)`; with `with_output == false` the
/// output is left empty, which is the "user prompt" whose tokens are masked from the loss.
pub fn generate_prompt(rec: &Record, with_output: bool) -> String {
    let output = if with_output { rec.output.as_str() } else { "" };
    // Python's `if data_point["input"]:` is false only for the empty string.
    if rec.input.is_empty() {
        [
            TRAIN_NO_INPUT_HEAD,
            &rec.instruction,
            TRAIN_RESPONSE_SEP,
            output,
        ]
        .concat()
    } else {
        [
            TRAIN_WITH_INPUT_HEAD,
            &rec.instruction,
            TRAIN_INPUT_SEP,
            &rec.input,
            TRAIN_RESPONSE_SEP,
            output,
        ]
        .concat()
    }
}

/// The evaluation prompt of `commonsense_evaluate.py`'s `generate_prompt(instruction, input)`,
/// ending where the model's answer begins. `None` and `Some("")` both select the no-input form.
pub fn eval_prompt(instruction: &str, input: Option<&str>) -> String {
    match input {
        Some(inp) if !inp.is_empty() => [
            EVAL_WITH_INPUT_HEAD,
            instruction,
            EVAL_INPUT_SEP,
            inp,
            EVAL_RESPONSE_SEP,
        ]
        .concat(),
        _ => [EVAL_NO_INPUT_HEAD, instruction, EVAL_RESPONSE_SEP].concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commonsense_dir() -> Option<PathBuf> {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/commonsense");
        if d.is_dir() {
            Some(d)
        } else {
            eprintln!("skipping: {} not found", d.display());
            None
        }
    }

    #[test]
    fn loads_arc_easy_train() {
        let Some(d) = commonsense_dir() else { return };
        let recs = load_records(&[d.join("ARC-Easy/train.json")]).unwrap();
        assert_eq!(recs.len(), 2251);
        let r = &recs[0];
        assert!(r.instruction.starts_with(
            "Please choose the correct answer to the question: Which factor will most likely cause a person to develop a fever?"
        ));
        assert!(r
            .instruction
            .ends_with("Answer format: answer1/answer2/answer3/answer4"));
        assert_eq!(r.input, "");
        assert_eq!(r.output, "the correct answer is answer2");
        assert_eq!(r.answer.as_deref(), Some("answer2"));
        assert!(recs
            .iter()
            .all(|r| r.answer.as_deref().is_some_and(|a| r.output.ends_with(a))));
    }

    #[test]
    fn prompts_match_reference_bytes() {
        let rec = Record {
            instruction: "INS".into(),
            input: String::new(),
            output: "OUT".into(),
            answer: None,
        };
        let expected = "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n                ### Instruction:\n                INS\n                \n                ### Response:\n                OUT";
        assert_eq!(generate_prompt(&rec, true), expected);
        assert_eq!(
            generate_prompt(&rec, false),
            expected.strip_suffix("OUT").unwrap()
        );
        let rec = Record {
            input: "INP".into(),
            ..rec
        };
        assert_eq!(
            generate_prompt(&rec, true),
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. \n\n                ### Instruction:\n                INS\n                \n                ### Input:\n                INP\n                \n                ### Response:\n                OUT"
        );
        assert_eq!(
            eval_prompt("INS", None),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n                ### Instruction:\n                INS\n\n                ### Response:\n                "
        );
        assert_eq!(eval_prompt("INS", Some("")), eval_prompt("INS", None));
        assert_eq!(
            eval_prompt("INS", Some("INP")),
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n                ### Instruction:\n                INS\n\n                ### Input:\n                INP\n\n                ### Response:\n                "
        );
    }

    #[test]
    fn jsonl_and_lenient_fields() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        std::fs::write(
            &p,
            "{\"instruction\":\"i1\",\"output\":\"o1\",\"extra\":[1,2]}\n\n{\"instruction\":\"i2\",\"input\":null,\"output\":\"o2\",\"answer\":true}\n",
        )
        .unwrap();
        let recs = load_records(&[p]).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].input, "");
        assert_eq!(recs[0].answer, None);
        assert_eq!(recs[1].answer.as_deref(), Some("true"));
    }

    fn load_err(name: &str, body: &str) -> Error {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        std::fs::write(&p, body).unwrap();
        let e = load_records(&[p]).unwrap_err();
        let msg = e.to_string();
        println!("{name}: {msg}");
        assert!(msg.contains(name), "error does not name the file: {msg}");
        e
    }

    #[test]
    fn errors_name_file_record_and_field() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope.json");
        assert!(matches!(load_records(&[missing]), Err(Error::Io { .. })));

        let e = load_err(
            "bad.json",
            "[{\"instruction\":\"a\",\"output\":\"b\"},\n {\"instruction\": \"c\" \"output\": 1}]",
        );
        assert!(matches!(e, Error::Record { index: 1, .. }), "{e:?}");

        let e = load_err(
            "bad.jsonl",
            "{\"instruction\":\"a\",\"output\":\"b\"}\n\n{\"instruction\":\"a\",\n",
        );
        match e {
            Error::Record { index, msg, .. } => {
                assert_eq!(index, 1);
                assert!(msg.contains("line 3"), "{msg}");
            }
            other => panic!("{other:?}"),
        }

        let e = load_err(
            "noout.json",
            "[{\"instruction\":\"a\",\"output\":\"b\"},{\"instruction\":\"a\"}]",
        );
        match e {
            Error::Record { index, msg, .. } => {
                assert_eq!(index, 1);
                assert!(msg.contains("`output`"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let e = load_err("noins.jsonl", "{\"output\":\"b\"}\n");
        assert!(
            matches!(&e, Error::Record { index: 0, msg, .. } if msg.contains("`instruction`")),
            "{e:?}"
        );
        let e = load_err("typed.json", "[{\"instruction\":\"a\",\"output\":3}]");
        assert!(
            matches!(&e, Error::Record { msg, .. } if msg.contains("must be a string")),
            "{e:?}"
        );
        let e = load_err("notobj.json", "[1]");
        assert!(matches!(&e, Error::Record { index: 0, .. }), "{e:?}");
        assert!(matches!(
            load_err("empty.json", "  \n"),
            Error::Format { .. }
        ));
        assert!(matches!(
            load_err("text.json", "hello"),
            Error::Format { .. }
        ));
        let e = load_err(
            "trailing.json",
            "[{\"instruction\":\"a\",\"output\":\"b\"}] x",
        );
        assert!(matches!(e, Error::Format { .. }), "{e:?}");
    }
}
