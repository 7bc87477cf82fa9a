//! The text tokenizer with the special ids the training and generation code needs.
//! Built from a Hugging Face `tokenizer.json` or from GGUF metadata (see `io::gguf_tokenizer`).

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct TextTokenizer {
    /// Applies the model's own post-processing (e.g. a BOS token when the model wants one).
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Whether encoding prepends BOS (already reflected in `inner`'s post-processor).
    pub add_bos: bool,
}

impl TextTokenizer {
    /// Token ids of `text`, with the model's special tokens (BOS when `add_bos`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` without any special tokens.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id used to pad batches: pad, else eos, else 0.
    pub fn pad_or_eos(&self) -> u32 {
        self.pad_id.or(self.eos_id).unwrap_or(0)
    }
}
