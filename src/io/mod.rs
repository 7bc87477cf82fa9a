//! Reading and writing models and adapters: safetensors, Hugging Face directories, GGUF,
//! the hub cache, and PEFT's adapter format.

pub mod atomic;
pub mod dash;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hf;
pub mod outpath;
pub mod peft;
pub mod pissa;
pub mod tokenizer;
pub mod weights;

use std::path::PathBuf;

pub use tokenizer::TextTokenizer;
pub use weights::Weights;

use crate::models::config::HfConfig;

/// Where a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    HfDir,
    Gguf,
}

/// A model as read from disk: Hugging Face config, f32 weights in Hugging Face naming and
/// layout, and the tokenizer when one was found.
pub struct LoadedModel {
    pub config: HfConfig,
    /// `config.json` as read, for architectures with keys `HfConfig` does not model.
    pub config_json: serde_json::Value,
    pub weights: Weights,
    pub tokenizer: Option<TextTokenizer>,
    /// The resolved directory or file.
    pub path: PathBuf,
    pub kind: SourceKind,
}

/// Loads `spec`: a Hugging Face model directory, a `.gguf` file, or a hub id `org/name`
/// (looked up in the Hugging Face cache, downloaded when the network allows).
pub fn load_model(spec: &str) -> crate::Result<LoadedModel> {
    crate::runtime::init();
    hf::load_model(spec)
}
