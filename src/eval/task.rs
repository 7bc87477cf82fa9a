//! Which commonsense task a test file holds, and how an answer is read off a response.
//!
//! The task is recognised from the vocabulary of the records' `answer` fields, never from the
//! file name, so renamed or merged files still evaluate correctly. The answer extraction is
//! `extract_answer` of Chongjie-Si/Subspace-Tuning `CR_MR/commonsense_evaluate.py` (the
//! LoRA-Dash authors' evaluation, itself LLM-Adapters'): strip the response, `re.findall` the
//! alternation of the task's answer words, take the first match, and count "no match" as
//! wrong. Like the reference, the alternation matches inside longer words (`untrue` yields
//! `true`) and the multiple-choice alternation is always `answer1|…|answer5`, whatever the
//! number of options.

use std::path::Path;

use regex::Regex;

use crate::data::Record;
use crate::error::{Error, Result};

/// An answer vocabulary of the LLM-Adapters commonsense suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// `true` / `false` (BoolQ).
    TrueFalse,
    /// `solution1` / `solution2` (PIQA).
    Solution,
    /// `answer1` … `answer5` (ARC-Easy, ARC-Challenge, OpenBookQA, Social IQa).
    Answer,
    /// `ending1` … `ending4` (HellaSwag).
    Ending,
    /// `option1` / `option2` (WinoGrande).
    Option,
}

impl Family {
    pub const ALL: [Family; 5] = [
        Family::TrueFalse,
        Family::Solution,
        Family::Answer,
        Family::Ending,
        Family::Option,
    ];

    /// Every answer word of the family, in the order of the reference regex.
    pub fn words(self) -> Vec<String> {
        match self {
            Family::TrueFalse => vec!["true".into(), "false".into()],
            Family::Solution => numbered("solution", 2),
            Family::Answer => numbered("answer", 5),
            Family::Ending => numbered("ending", 4),
            Family::Option => numbered("option", 2),
        }
    }

    /// The reference's name for this kind of task (`boolq`, `piqa`, …).
    pub fn describe(self) -> &'static str {
        match self {
            Family::TrueFalse => "true/false (boolq-like)",
            Family::Solution => "solution1/solution2 (piqa-like)",
            Family::Answer => "answer1..answer5 multiple choice (ARC/OpenBookQA/Social IQa-like)",
            Family::Ending => "ending1..ending4 (hellaswag-like)",
            Family::Option => "option1/option2 (winogrande-like)",
        }
    }

    /// Position of `word` in [`Family::words`], when it belongs to the family.
    fn index_of(self, word: &str) -> Option<usize> {
        self.words().iter().position(|w| w == word)
    }
}

fn numbered(stem: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{stem}{i}")).collect()
}

/// A test file's task: display name, answer vocabulary and number of options.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub family: Family,
    /// Options per question: fixed by the family, except for `answerN` where it is the largest
    /// N seen in the file (3 for Social IQa, 4 for ARC / OpenBookQA, 5 if any record uses it).
    pub num_choices: usize,
    extractor: Regex,
}

impl Task {
    pub fn new(name: impl Into<String>, family: Family, num_choices: usize) -> Result<Self> {
        let words = family.words();
        if num_choices < 2 || num_choices > words.len() {
            return Err(Error::config(
                "num_choices",
                format!(
                    "{num_choices} is outside 2..={} for {}",
                    words.len(),
                    family.describe()
                ),
            ));
        }
        // The reference's alternation, e.g. `answer1|answer2|answer3|answer4|answer5`.
        let extractor =
            Regex::new(&words.join("|")).map_err(|e| Error::msg(format!("answer pattern: {e}")))?;
        Ok(Task {
            name: name.into(),
            family,
            num_choices,
            extractor,
        })
    }

    /// The answers a model can choose between: what likelihood mode scores.
    pub fn candidates(&self) -> Vec<String> {
        self.family
            .words()
            .into_iter()
            .take(self.num_choices)
            .collect()
    }

    /// The candidates of one record: the options its instruction lists after the last
    /// `Answer format:` (e.g. `answer1/answer2/answer3` for a 3-option ARC question) when they
    /// all belong to the vocabulary, else [`Task::candidates`].
    pub fn candidates_for(&self, rec: &Record) -> Vec<String> {
        let words = self.family.words();
        let listed: Option<Vec<String>> =
            rec.instruction
                .rsplit_once("Answer format:")
                .map(|(_, tail)| {
                    tail.lines()
                        .next()
                        .unwrap_or("")
                        .split('/')
                        .map(|w| w.trim().to_string())
                        .collect()
                });
        match listed {
            Some(l) if l.len() >= 2 && l.iter().all(|w| words.contains(w)) => l,
            _ => self.candidates(),
        }
    }

    /// The reference's `extract_answer`: first match of the vocabulary in the stripped response.
    pub fn extract_answer(&self, response: &str) -> Option<String> {
        self.extractor
            .find(response.trim())
            .map(|m| m.as_str().to_string())
    }
}

/// What the reference keeps of a decoded generation: the text after the last
/// `### Response:` marker, stripped (`o.split("### Response:")[-1].strip()`).
pub fn response_text(decoded: &str) -> &str {
    decoded
        .rsplit("### Response:")
        .next()
        .unwrap_or(decoded)
        .trim()
}

/// Recognises the task of `records` (read from `path`) from their `answer` fields.
///
/// Every record needs an answer, and all answers must come from one vocabulary; otherwise the
/// error names the file and the first offending record.
pub fn detect_task(name: &str, path: &Path, records: &[Record]) -> Result<Task> {
    let Some(first) = records.first() else {
        return Err(Error::format(path, "holds no records to evaluate"));
    };
    fn answer<'r>(path: &Path, i: usize, r: &'r Record) -> Result<&'r str> {
        r.answer.as_deref().ok_or_else(|| Error::Record {
            path: path.to_path_buf(),
            index: i,
            msg: "has no `answer` field; evaluation needs the gold answer of every record".into(),
        })
    }
    let a0 = answer(path, 0, first)?;
    let Some(family) = Family::ALL.into_iter().find(|f| f.index_of(a0).is_some()) else {
        return Err(unknown_answer(path, 0, a0));
    };
    let mut max_index = 0;
    for (i, r) in records.iter().enumerate() {
        let a = answer(path, i, r)?;
        match family.index_of(a) {
            Some(k) => max_index = max_index.max(k),
            None => {
                let other = Family::ALL.into_iter().find(|f| f.index_of(a).is_some());
                return Err(match other {
                    Some(f) => Error::Record {
                        path: path.to_path_buf(),
                        index: i,
                        msg: format!(
                            "answer `{a}` is from the {} vocabulary but record 0 (`{a0}`) is from the {} vocabulary; one file must hold one task",
                            f.describe(),
                            family.describe()
                        ),
                    },
                    None => unknown_answer(path, i, a),
                });
            }
        }
    }
    let num_choices = match family {
        // A file that happens to use only answer1 still offers at least two options.
        Family::Answer => (max_index + 1).max(2),
        f => f.words().len(),
    };
    Task::new(name, family, num_choices)
}

fn unknown_answer(path: &Path, index: usize, answer: &str) -> Error {
    let known: Vec<String> = Family::ALL.iter().map(|f| f.words().join("/")).collect();
    Error::Record {
        path: path.to_path_buf(),
        index,
        msg: format!(
            "answer `{answer}` fits no known answer vocabulary ({})",
            known.join(", ")
        ),
    }
}

/// Display name of a test file: its stem, or `<parent>` when the stem is a generic split
/// name (`test`, `train`, `dev`, …), as in the LLM-Adapters layout `ARC-Easy/test.json`.
pub fn task_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let generic = matches!(
        stem.to_ascii_lowercase().as_str(),
        "test" | "train" | "dev" | "val" | "valid" | "validation" | "eval"
    );
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned());
    match parent {
        Some(p) if generic && !p.is_empty() => p,
        _ => stem,
    }
}

/// The text the training data would hold as `output` for answer `candidate`: the record's
/// own output with its answer (last occurrence) replaced, or the bare candidate when the
/// output does not contain the answer.
pub fn continuation(rec: &Record, candidate: &str) -> String {
    match rec
        .answer
        .as_deref()
        .filter(|a| !a.is_empty())
        .and_then(|a| rec.output.rfind(a).map(|p| (p, a.len())))
    {
        Some((pos, len)) => format!(
            "{}{}{}",
            &rec.output[..pos],
            candidate,
            &rec.output[pos + len..]
        ),
        None => candidate.to_string(),
    }
}
