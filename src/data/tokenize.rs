//! One record to token ids and loss labels, with the semantics of LLM-Adapters'
//! `generate_and_tokenize_prompt` (finetune.py): tokenise the full prompt with the tokenizer's
//! own special tokens, truncate to `cutoff_len`, append EOS when there is room and it is not
//! already last, and, unless training on inputs, mask the first `len(tokenize(user_prompt))`
//! labels with -100, where the user prompt is the template with an empty output.

use crate::data::alpaca::{generate_prompt, Record};
use crate::error::{Error, Result};
use crate::io::TextTokenizer;

/// Label value ignored by the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// A tokenised example. Causal LM: `labels` is aligned with `input_ids` (not yet shifted)
/// and `target` is None. Sequence classification / regression: `labels` is empty,
/// `token_type_ids` holds the segment ids and `target` the label.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Segment ids (empty when the model takes none).
    pub token_type_ids: Vec<u32>,
    pub target: Option<Target>,
}

/// The label of a whole sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    Class(usize),
    Score(f32),
}

impl Example {
    /// A causal-LM example.
    pub fn lm(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        Example {
            input_ids,
            labels,
            token_type_ids: Vec::new(),
            target: None,
        }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Tokenises `rec` for causal-LM training.
///
/// The user-prompt length is measured by tokenising the prompt on its own, exactly as the
/// reference does; BPE may merge the prompt's trailing spaces with the answer differently, so
/// the mask boundary can be off by a token from the true prompt/answer boundary, as in the
/// reference. Unlike the reference, a user prompt longer than the (truncated) full prompt masks
/// the whole example instead of producing more labels than ids.
pub fn tokenize_record(
    tok: &TextTokenizer,
    rec: &Record,
    cutoff_len: usize,
    train_on_inputs: bool,
    add_eos: bool,
) -> Result<Example> {
    if cutoff_len == 0 {
        return Err(Error::config("cutoff_len", "must be at least 1"));
    }
    let mut ids = tok.encode(&generate_prompt(rec, true))?;
    ids.truncate(cutoff_len);
    if add_eos {
        let eos = tok
            .eos_id
            .ok_or_else(|| Error::Tokenizer("the tokenizer has no end-of-sequence token".into()))?;
        if ids.last() != Some(&eos) && ids.len() < cutoff_len {
            ids.push(eos);
        }
    }
    let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    if !train_on_inputs {
        let user_len = tok
            .encode(&generate_prompt(rec, false))?
            .len()
            .min(cutoff_len);
        let masked = user_len.min(labels.len());
        labels[..masked].fill(IGNORE_INDEX);
    }
    Ok(Example {
        token_type_ids: Vec::new(),
        target: None,
        input_ids: ids,
        labels,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;

    /// A word-level tokenizer whose vocabulary covers the training template, with BOS = 1
    /// prepended by its post-processor (as LLaMA tokenizers do) and EOS = 2.
    pub(crate) fn word_tokenizer(extra_words: &[&str]) -> TextTokenizer {
        let rec = Record {
            instruction: String::new(),
            input: "x".into(),
            output: String::new(),
            answer: None,
        };
        let mut words: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let template = generate_prompt(&rec, true)
            + " "
            + &generate_prompt(
                &Record {
                    input: String::new(),
                    ..rec
                },
                true,
            );
        for w in template
            .split(|c: char| !c.is_alphanumeric() && c != '_')
            .chain(template.split(|c: char| c.is_alphanumeric() || c.is_whitespace()))
            .chain(extra_words.iter().copied())
        {
            if !w.is_empty() && !words.iter().any(|x| x == w) {
                words.push(w.to_string());
            }
        }
        let vocab: HashMap<String, u32> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(Whitespace {}));
        let post = TemplateProcessing::builder()
            .try_single("<s> $A")
            .unwrap()
            .special_tokens(vec![("<s>", 1)])
            .build()
            .unwrap();
        inner.with_post_processor(Some(post));
        TextTokenizer {
            inner,
            bos_id: Some(1),
            eos_id: Some(2),
            pad_id: None,
            add_bos: true,
        }
    }

    fn rec() -> Record {
        Record {
            instruction: "pick one".into(),
            input: String::new(),
            output: "the correct answer is answer2".into(),
            answer: Some("answer2".into()),
        }
    }

    #[test]
    fn masks_user_prompt_and_appends_eos() {
        let tok = word_tokenizer(&["pick", "one", "the", "correct", "answer", "is", "answer2"]);
        let r = rec();
        let user = tok.encode_plain(&generate_prompt(&r, false)).unwrap();
        let full = tok.encode_plain(&generate_prompt(&r, true)).unwrap();
        assert!(
            !full.contains(&0) && !user.contains(&0),
            "test vocabulary must cover the prompt"
        );
        // Word-level tokens: the output adds exactly its 5 words after the user prompt.
        assert_eq!(full.len(), user.len() + 5);
        assert_eq!(&full[..user.len()], &user[..]);

        let ex = tokenize_record(&tok, &r, 256, false, true).unwrap();
        let mut expected: Vec<u32> = vec![1];
        expected.extend(&full);
        expected.push(2);
        assert_eq!(ex.input_ids, expected);
        let n_user = 1 + user.len();
        assert!(ex.labels[..n_user].iter().all(|&l| l == IGNORE_INDEX));
        let tail: Vec<i64> = expected[n_user..].iter().map(|&i| i as i64).collect();
        assert_eq!(&ex.labels[n_user..], &tail[..]);
        assert_eq!(
            tok.decode(&ex.input_ids[n_user..ex.len() - 1]).unwrap(),
            "the correct answer is answer2"
        );

        // Training on inputs: labels equal ids.
        let ex = tokenize_record(&tok, &r, 256, true, true).unwrap();
        assert_eq!(
            ex.labels,
            expected.iter().map(|&i| i as i64).collect::<Vec<_>>()
        );
        // No EOS requested.
        let ex = tokenize_record(&tok, &r, 256, true, false).unwrap();
        assert_eq!(ex.input_ids, &expected[..expected.len() - 1]);
    }

    /// `LORA_DASH_SMOLLM2_GGUF`, else `$LORA_DASH_CACHE` or `~/.cache/lora-dash`.
    fn smollm2_gguf() -> Option<std::path::PathBuf> {
        use std::path::PathBuf;
        let p = std::env::var_os("LORA_DASH_SMOLLM2_GGUF")
            .map(PathBuf::from)
            .or_else(|| {
                let cache = std::env::var_os("LORA_DASH_CACHE")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lora-dash"))
                    })?;
                Some(cache.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
            })?;
        if p.is_file() {
            Some(p)
        } else {
            println!(
                "skipped: {} not found (set LORA_DASH_SMOLLM2_GGUF)",
                p.display()
            );
            None
        }
    }

    /// LLM-Adapters' `generate_and_tokenize_prompt` run by transformers 4.46.3 with the SmolLM2
    /// GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, then
    /// `add_bos_token = False` and `eos_token = "<|im_end|>"` as the GGUF metadata declares;
    /// transformers' GGUF conversion ignores both) on ARC-Easy train records 0 and 1 and a
    /// made-up record with an input: (record, cutoff_len, train_on_inputs, len(input_ids),
    /// number of -100 labels, sum(input_ids), last 4 ids).
    type RefRow = (usize, usize, bool, usize, usize, u64, [u32; 4]);
    const SMOLLM2_REF: [RefRow; 9] = [
        (0, 256, false, 112, 105, 573072, [314, 2988, 34, 2]),
        (0, 256, true, 112, 0, 573072, [314, 2988, 34, 2]),
        (0, 100, false, 100, 100, 486872, [35, 31, 11247, 36]),
        (1, 256, false, 106, 99, 585297, [314, 2988, 34, 2]),
        (1, 256, true, 106, 0, 585297, [314, 2988, 34, 2]),
        (1, 100, false, 100, 99, 576084, [14212, 42, 1047, 260]),
        (2, 256, false, 55, 51, 437330, [1069, 23214, 30, 2]),
        (2, 256, true, 55, 0, 437330, [1069, 23214, 30, 2]),
        (2, 100, false, 55, 51, 437330, [1069, 23214, 30, 2]),
    ];

    #[test]
    fn matches_llm_adapters_with_smollm2_tokenizer() {
        let Some(gguf) = smollm2_gguf() else { return };
        let data = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/commonsense/ARC-Easy/train.json");
        if !data.is_file() {
            println!("skipped: {} not found", data.display());
            return;
        }
        let meta = crate::io::gguf::GgufFile::open(&gguf).unwrap().metadata;
        let tok = crate::io::gguf_tokenizer::load_tokenizer(&meta).unwrap();
        let mut recs: Vec<Record> = crate::data::alpaca::load_records(&[data])
            .unwrap()
            .into_iter()
            .take(2)
            .collect();
        recs.push(Record {
            instruction: "Summarize.".into(),
            input: "Cats sleep a lot.".into(),
            output: "They nap.".into(),
            answer: None,
        });
        for (i, cutoff, toi, len, masked, sum, last4) in SMOLLM2_REF {
            let ex = tokenize_record(&tok, &recs[i], cutoff, toi, true).unwrap();
            let got_masked = ex.labels.iter().filter(|&&l| l == IGNORE_INDEX).count();
            let got_sum: u64 = ex.input_ids.iter().map(|&x| x as u64).sum();
            println!("record {i} cutoff {cutoff} train_on_inputs {toi}: len {} masked {got_masked} sum {got_sum}", ex.len());
            assert_eq!((ex.len(), got_masked, got_sum), (len, masked, sum));
            assert_eq!(&ex.input_ids[ex.len() - 4..], &last4[..]);
            assert_eq!(ex.labels.len(), ex.len());
        }
    }

    #[test]
    fn truncation_rules() {
        let tok = word_tokenizer(&["pick", "one", "the", "correct", "answer", "is", "answer2"]);
        let r = rec();
        let full_len = 1 + tok.encode_plain(&generate_prompt(&r, true)).unwrap().len();
        let user_len = 1 + tok.encode_plain(&generate_prompt(&r, false)).unwrap().len();
        // Exactly full: no room for EOS.
        let ex = tokenize_record(&tok, &r, full_len, false, true).unwrap();
        assert_eq!(ex.len(), full_len);
        assert_ne!(*ex.input_ids.last().unwrap(), 2);
        // One more: EOS fits.
        let ex = tokenize_record(&tok, &r, full_len + 1, false, true).unwrap();
        assert_eq!(ex.len(), full_len + 1);
        assert_eq!(*ex.input_ids.last().unwrap(), 2);
        // Cut inside the prompt: everything masked, length = cutoff.
        let ex = tokenize_record(&tok, &r, user_len - 3, false, true).unwrap();
        assert_eq!(ex.len(), user_len - 3);
        assert!(ex.labels.iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(ex.input_ids[0], 1, "BOS survives truncation");
        assert!(matches!(
            tokenize_record(&tok, &r, 0, false, true),
            Err(Error::InvalidConfig { .. })
        ));
        let mut no_eos = tok.clone();
        no_eos.eos_id = None;
        assert!(matches!(
            tokenize_record(&no_eos, &r, 64, false, true),
            Err(Error::Tokenizer(_))
        ));
    }
}
