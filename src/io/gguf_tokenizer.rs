//! A Hugging Face `tokenizer.json` built from GGUF tokenizer metadata (`tokenizer.ggml.*`).
//!
//! Supports `tokenizer.ggml.model == "gpt2"`: byte-level BPE from `tokens` + `merges`, with
//! control / user-defined tokens (`token_type` 3 / 4) as added tokens so that e.g.
//! `<|im_start|>` is matched whole. The pre-tokenizer follows `tokenizer.ggml.pre` as
//! llama.cpp's `llm_tokenizer_bpe` does (e.g. "smollm": each digit alone, then the GPT-2
//! regex), expressed with the pre-tokenizers the models' own `tokenizer.json` files use.
//! SentencePiece (`"llama"`) vocabularies are not supported.

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::io::gguf::{GgufValue, Metadata};
use crate::io::TextTokenizer;

/// llama.cpp token types.
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// The llama-3 split regex as in Meta's `tokenizer.json`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: like llama-3 but single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes for a `tokenizer.ggml.pre` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreKind {
    /// GPT-2's regex (`ByteLevel` with `use_regex`).
    Gpt2,
    /// Each digit alone, then GPT-2's regex (starcoder, SmolLM, ...).
    DigitsGpt2,
    Llama3,
    Qwen2,
}

fn pre_kind(pre: &str) -> PreKind {
    match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            PreKind::DigitsGpt2
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            PreKind::Llama3
        }
        "qwen2" | "stablelm2" | "megrez" | "deepseek-r1-qwen" | "hunyuan" => PreKind::Qwen2,
        "gpt-2" | "gpt2" | "default" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es"
        | "jina-de" | "jina-v1-en" | "jina-v2-es" | "jina-v2-de" => PreKind::Gpt2,
        other => {
            eprintln!("note: GGUF pre-tokenizer `{other}` is not known here; using GPT-2's");
            PreKind::Gpt2
        }
    }
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn pre_tokenizer(kind: PreKind) -> Value {
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    match kind {
        PreKind::Gpt2 => byte_level(true),
        PreKind::DigitsGpt2 => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        PreKind::Llama3 => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]})
        }
        PreKind::Qwen2 => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]})
        }
    }
}

/// A `TemplateProcessing` post-processor that wraps each sequence in the given BOS / EOS.
pub(crate) fn template_post_processor(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Value {
    let special = |(t, _): (&str, u32)| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let wrap = |part: &str, type_id: u32| -> Vec<Value> {
        bos.map(special)
            .into_iter()
            .chain([seq(part, type_id)])
            .chain(eos.map(special))
            .collect()
    };
    let single = wrap("A", 0);
    let pair: Vec<Value> = wrap("A", 0).into_iter().chain(wrap("B", 1)).collect();
    let mut specials = Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        specials.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// The special ids and flags read alongside the tokenizer.
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
}

fn string_array<'a>(meta: &'a Metadata, key: &str) -> Result<Vec<&'a str>> {
    let arr = meta
        .get(key)
        .and_then(GgufValue::as_array)
        .ok_or_else(|| Error::Tokenizer(format!("GGUF metadata `{key}` is missing")))?;
    arr.iter()
        .map(|v| {
            v.as_str().ok_or_else(|| {
                Error::Tokenizer(format!("GGUF metadata `{key}` holds a non-string"))
            })
        })
        .collect()
}

fn build(meta: &Metadata) -> Result<(Value, SpecialIds)> {
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .unwrap_or("<none>");
    match model {
        "gpt2" => {}
        "llama" => {
            return Err(Error::Tokenizer(
                "GGUF SentencePiece (`llama`) tokenizers are not supported; use the model's Hugging Face directory"
                    .into(),
            ))
        }
        m => {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model `{m}` is not supported (only `gpt2` byte-level BPE)"
            )))
        }
    }
    let tokens = string_array(meta, "tokenizer.ggml.tokens")?;
    let merges = string_array(meta, "tokenizer.ggml.merges")?;
    let types: Option<Vec<i64>> = meta
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
        .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect());
    let id = |key: &str| -> Result<Option<u32>> {
        match meta.get(key).and_then(GgufValue::as_u64) {
            Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
            Some(i) => Err(Error::Tokenizer(format!(
                "GGUF `{key}` {i} is outside the vocabulary of {}",
                tokens.len()
            ))),
            None => Ok(None),
        }
    };
    let (bos, eos, pad, unk) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
        id("tokenizer.ggml.unknown_token_id")?,
    );
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let kind = pre_kind(pre);
    let flag = |key: &str| meta.get(key).and_then(GgufValue::as_bool);
    // llama.cpp turns BOS on for llama-3 style vocabularies unless the file says otherwise.
    let add_bos =
        flag("tokenizer.ggml.add_bos_token").unwrap_or(kind == PreKind::Llama3) && bos.is_some();
    let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false) && eos.is_some();

    // Duplicated strings keep the last id, as llama.cpp's token_to_id map and transformers do.
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| {
            // llama.cpp splits at the first space after the first character.
            let cut = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i);
            match cut {
                Some(i) => Ok(json!([&m[..i], &m[i + 1..]])),
                None => Err(Error::Tokenizer(format!("GGUF merge `{m}` has no space"))),
            }
        })
        .collect::<Result<_>>()?;

    let mut added = Vec::new();
    let mut add = |i: usize, special: bool| {
        added.push(
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": special}),
        );
    };
    match &types {
        Some(types) => {
            for (i, &t) in types.iter().enumerate().take(tokens.len()) {
                match t {
                    TOKEN_UNKNOWN | TOKEN_CONTROL => add(i, true),
                    TOKEN_USER_DEFINED => add(i, false),
                    _ => {}
                }
            }
        }
        None => {
            let mut ids: Vec<u32> = [unk, bos, eos].into_iter().flatten().collect();
            ids.dedup();
            for i in ids {
                add(i as usize, true);
            }
        }
    }

    let tok = |i: Option<u32>| i.map(|i| (tokens[i as usize], i));
    let post = if add_bos || add_eos {
        template_post_processor(tok(bos).filter(|_| add_bos), tok(eos).filter(|_| add_eos))
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    };
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(kind),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": tok(unk).map(|(t, _)| t),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            // llama.cpp looks whole words up before merging for llama-3 vocabularies.
            "ignore_merges": kind == PreKind::Llama3,
            "vocab": vocab,
            "merges": merges,
        }
    });
    Ok((
        json,
        SpecialIds {
            bos,
            eos,
            pad,
            add_bos,
        },
    ))
}

/// The `tokenizer.json` equivalent of the GGUF tokenizer metadata.
pub fn tokenizer_json(meta: &Metadata) -> Result<Value> {
    build(meta).map(|(j, _)| j)
}

/// The tokenizer described by GGUF metadata, with its special ids.
pub fn load_tokenizer(meta: &Metadata) -> Result<TextTokenizer> {
    let (json, ids) = build(meta)?;
    let inner: tokenizers::Tokenizer = json
        .to_string()
        .parse()
        .map_err(|e| Error::Tokenizer(format!("GGUF tokenizer: {e}")))?;
    Ok(TextTokenizer {
        inner,
        bos_id: ids.bos,
        eos_id: ids.eos,
        pad_id: ids.pad,
        add_bos: ids.add_bos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::testutil::{tiny_id, tiny_tokenizer_meta};

    fn meta(pre: &str, add_bos: Option<bool>) -> Metadata {
        tiny_tokenizer_meta(pre, add_bos)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    fn ids(tokens: &[&str]) -> Vec<u32> {
        tokens.iter().map(|t| tiny_id(t)).collect()
    }

    #[test]
    fn byte_level_bpe_with_added_tokens() {
        let tok = load_tokenizer(&meta("smollm", None)).unwrap();
        assert_eq!(
            (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos),
            (Some(1), Some(2), Some(0), false)
        );
        assert_eq!(
            tok.encode("hello world").unwrap(),
            ids(&["hello", "Ġworld"])
        );
        // Control tokens are matched whole, not byte-encoded.
        let mut want = vec![1];
        want.extend(ids(&["hello"]));
        want.push(2);
        assert_eq!(tok.encode("<|im_start|>hello<|im_end|>").unwrap(), want);
        // Bytes outside ASCII go through the byte alphabet: "é" is 0xC3 0xA9 -> "Ã" "©".
        assert_eq!(tok.encode("é").unwrap(), ids(&["Ã", "©"]));
        assert_eq!(
            tok.decode(&tok.encode("hello world é!").unwrap()).unwrap(),
            "hello world é!"
        );
    }

    #[test]
    fn pre_tokenizer_follows_the_gguf_name() {
        // "smollm" splits digits before BPE, so the "1 2" merge never applies; GPT-2's regex
        // keeps "12" together and the merge does.
        let smol = load_tokenizer(&meta("smollm", None)).unwrap();
        assert_eq!(smol.encode("12").unwrap(), ids(&["1", "2"]));
        let gpt2 = load_tokenizer(&meta("gpt-2", None)).unwrap();
        assert_eq!(gpt2.encode("12").unwrap(), ids(&["12"]));
        let unknown = load_tokenizer(&meta("something-new", None)).unwrap();
        assert_eq!(
            unknown.encode("12 hello").unwrap(),
            ids(&["12", "Ġ", "hello"])
        );
        let j = tokenizer_json(&meta("smollm", None)).unwrap();
        assert_eq!(j["pre_tokenizer"]["pretokenizers"][0]["type"], "Digits");
        // llama-3 vocabularies: llama-3's split regex, and BOS on by default.
        let l3 = load_tokenizer(&meta("llama-bpe", None)).unwrap();
        assert!(l3.add_bos);
        let mut want = vec![1];
        want.extend(ids(&["hello", "Ġworld"]));
        assert_eq!(l3.encode("hello world").unwrap(), want);
        assert_eq!(l3.encode_plain("hello world").unwrap(), want[1..]);
    }

    #[test]
    fn add_bos_token_is_honoured() {
        let on = load_tokenizer(&meta("smollm", Some(true))).unwrap();
        assert!(on.add_bos);
        assert_eq!(on.encode("hello").unwrap(), [1, tiny_id("hello")]);
        assert_eq!(on.encode_plain("hello").unwrap(), [tiny_id("hello")]);
        let off = load_tokenizer(&meta("llama-bpe", Some(false))).unwrap();
        assert!(!off.add_bos);
        assert_eq!(off.encode("hello").unwrap(), [tiny_id("hello")]);
    }

    #[test]
    fn unsupported_or_broken_metadata_is_an_error() {
        let mut m = meta("smollm", None);
        m.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("llama".into()),
        );
        let e = load_tokenizer(&m).err().unwrap().to_string();
        assert!(e.contains("SentencePiece"), "{e}");
        let mut m = meta("smollm", None);
        m.remove("tokenizer.ggml.merges");
        assert!(load_tokenizer(&m)
            .err()
            .unwrap()
            .to_string()
            .contains("tokenizer.ggml.merges"));
        let mut m = meta("smollm", None);
        m.insert(
            "tokenizer.ggml.bos_token_id".into(),
            GgufValue::U32(100_000),
        );
        assert!(load_tokenizer(&m)
            .err()
            .unwrap()
            .to_string()
            .contains("outside the vocabulary"));
    }
}
