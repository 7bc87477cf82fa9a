//! Sentence (pair) encoding for encoder classifiers, as transformers' fast tokenizers do it
//! for `tokenizer(a, b, truncation=True, max_length=max_len)`: the `tokenizers` library with
//! longest-first truncation and no padding, the tokenizer's own post-processor adding
//! `[CLS] a [SEP] b [SEP]` (or the model's equivalent) and the token type ids (0 for the
//! first segment, 1 for the second).

use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};
use crate::io::TextTokenizer;

/// A tokenizer prepared once for encoding with a fixed maximum length.
#[derive(Clone)]
pub struct PairEncoder {
    inner: tokenizers::Tokenizer,
    max_len: usize,
}

impl PairEncoder {
    /// Errors when the tokenizer is not an encoder's (its post-processor adds no special
    /// tokens, or none at the end of a sequence, as decoder tokenizers do) or when `max_len`
    /// leaves no room for text after the special tokens.
    pub fn new(tok: &TextTokenizer, max_len: usize) -> Result<Self> {
        let Some(post) = tok.inner.get_post_processor() else {
            return Err(not_an_encoder("has no post-processor"));
        };
        use tokenizers::PostProcessor;
        let (single, pair) = (post.added_tokens(false), post.added_tokens(true));
        if single == 0 || pair == 0 {
            return Err(not_an_encoder("adds no special tokens"));
        }
        // Encoders mark the end of the input ([SEP], </s>); decoders' templates (a BOS
        // token in front) leave the last position to the text.
        let probe = tok
            .inner
            .encode("a", true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        if probe.get_special_tokens_mask().last() != Some(&1) {
            return Err(not_an_encoder(
                "does not end a sequence with a special token",
            ));
        }
        let needed = single.max(pair);
        if max_len <= needed {
            return Err(Error::config(
                "max_len",
                format!(
                    "{max_len} leaves no room for text: the tokenizer adds {needed} special \
                     tokens to a sentence pair"
                ),
            ));
        }
        let mut inner = tok.inner.clone();
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        Ok(PairEncoder { inner, max_len })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `(input_ids, token_type_ids)` of `a`, or of the pair `a`, `b`.
    pub fn encode(&self, a: &str, b: Option<&str>) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = match b {
            Some(b) => self.inner.encode((a, b), true),
            None => self.inner.encode(a, true),
        }
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }
}

/// One-off [`PairEncoder::encode`]; it prepares (clones) the tokenizer on every call, so keep
/// a [`PairEncoder`] to encode a file.
pub fn encode_pair(
    tok: &TextTokenizer,
    a: &str,
    b: Option<&str>,
    max_len: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    PairEncoder::new(tok, max_len)?.encode(a, b)
}

fn not_an_encoder(why: &str) -> Error {
    Error::Tokenizer(format!(
        "sentence-pair classification needs an encoder tokenizer whose post-processor adds \
         [CLS]/[SEP]-style special tokens (as BERT's tokenizer.json does); this tokenizer's \
         post-processor {why} (a decoder model's tokenizer?)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::bert::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::template::TemplateProcessing;

    const VOCAB: [&str; 19] = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog",
        "ran", "play", "##ing", "##s", ",", ".", "\"",
    ];

    /// A BERT-style tokenizer: lower-casing normaliser, BERT pre-tokenizer, WordPiece over
    /// [`VOCAB`] (ids by position), the `[CLS] $A [SEP]` / `[CLS] $A [SEP] $B:1 [SEP]:1`
    /// template of `bert-base-uncased`'s tokenizer.json.
    fn bert_tokenizer() -> TextTokenizer {
        // An array of pairs: the builder's map type converts from one.
        let vocab: [(String, u32); VOCAB.len()] =
            std::array::from_fn(|i| (VOCAB[i].to_string(), i as u32));
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_normalizer(Some(BertNormalizer::default()));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        let post = TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
            .unwrap()
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .unwrap();
        inner.with_post_processor(Some(post));
        TextTokenizer {
            inner,
            bos_id: None,
            eos_id: None,
            pad_id: Some(0),
            add_bos: false,
        }
    }

    #[test]
    fn single_and_pair_layout() {
        let tok = bert_tokenizer();
        // "The cats sat." -> the cat ##s sat . = 5 6 15 7 17, BERT lower-cases.
        let (ids, types) = encode_pair(&tok, "The cats sat.", None, 512).unwrap();
        assert_eq!(ids, [2, 5, 6, 15, 7, 17, 3]);
        assert_eq!(types, [0; 7]);
        // "a dog" = 10 11; "playing" = play ##ing = 13 14; an unknown word is [UNK] = 1.
        let (ids, types) = encode_pair(&tok, "a dog", Some("playing zebra"), 512).unwrap();
        assert_eq!(ids, [2, 10, 11, 3, 13, 14, 1, 3]);
        assert_eq!(types, [0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn longest_first_truncation() {
        let enc = PairEncoder::new(&bert_tokenizer(), 10).unwrap();
        let ten = "the cat sat on the mat the dog ran on"; // 10 word tokens
        let three = "a dog ran"; // 3 word tokens
        let a_ids = [5, 6, 7, 8, 5, 9, 5, 11, 12, 8];
        // Budget 10 - 3 special = 7. The shorter input (3) fits beside max(3, 7 - 3) = 4
        // tokens of the longer one, so only `a` is cut, to 4.
        let (ids, types) = enc.encode(ten, Some(three)).unwrap();
        assert_eq!(ids, [&[2][..], &a_ids[..4], &[3, 10, 11, 12, 3]].concat());
        assert_eq!(types, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
        // Swapped roles: `b` is cut to 4 instead.
        let (ids, _) = enc.encode(three, Some(ten)).unwrap();
        assert_eq!(ids, [&[2, 10, 11, 12, 3][..], &a_ids[..4], &[3]].concat());
        // Both longer than half the budget: the first gets 7 / 2 = 3, the second 3 + 7 % 2
        // = 4.
        let (ids, types) = enc.encode(ten, Some(ten)).unwrap();
        assert_eq!(
            ids,
            [&[2][..], &a_ids[..3], &[3], &a_ids[..4], &[3]].concat()
        );
        assert_eq!(types.iter().filter(|&&t| t == 1).count(), 5);
        // A single sentence keeps 10 - 2 = 8 tokens.
        let (ids, _) = enc.encode(ten, None).unwrap();
        assert_eq!(ids, [&[2][..], &a_ids[..8], &[3]].concat());
        // Short inputs are not padded.
        assert_eq!(enc.encode("a", Some("dog")).unwrap().0, [2, 10, 3, 11, 3]);
    }

    #[test]
    fn refuses_decoder_tokenizers_and_tiny_max_len() {
        let mut tok = bert_tokenizer();
        let e = PairEncoder::new(&tok, 0).err().unwrap().to_string();
        assert!(e.contains("`max_len`: 0 leaves no room for text"), "{e}");
        assert!(PairEncoder::new(&tok, 3).is_err());
        assert!(PairEncoder::new(&tok, 4).is_ok());
        // A LLaMA-style template: BOS in front, nothing at the end.
        let post = TemplateProcessing::builder()
            .try_single("[CLS] $A")
            .unwrap()
            .try_pair("[CLS] $A [CLS] $B:1")
            .unwrap()
            .special_tokens(vec![("[CLS]", 2)])
            .build()
            .unwrap();
        tok.inner.with_post_processor(Some(post));
        let e = PairEncoder::new(&tok, 64).err().unwrap().to_string();
        assert!(
            e.contains("does not end a sequence with a special token"),
            "{e}"
        );
        tok.inner
            .with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let e = PairEncoder::new(&tok, 64).err().unwrap().to_string();
        assert!(e.contains("has no post-processor"), "{e}");
    }
}
