//! The library's one error type. Every variant names what the user has to fix:
//! the file, the record, the tensor or the config field.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    #[error("{path}: record {index}: {msg}")]
    Record {
        path: PathBuf,
        index: usize,
        msg: String,
    },

    #[error("tensor `{name}` is missing{}", from.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default())]
    MissingTensor { name: String, from: Option<PathBuf> },

    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("unsupported architecture `{0}` (supported: llama)")]
    UnknownArchitecture(String),

    #[error("invalid config `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },

    #[error(
        "target modules `{spec}` match no linear layer of the model (layers look like `{example}`)"
    )]
    NoTargetMatch { spec: String, example: String },

    #[error("output {0} already exists; pass --overwrite to replace it")]
    OutputExists(PathBuf),

    #[error("trainable tensor `{0}` received no gradient")]
    NoGradient(String),

    #[error("training diverged: loss is {loss} at step {step}")]
    NonFinite { step: usize, loss: f32 },

    #[error("{0}")]
    Msg(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
}

/// Adds the path to an I/O result.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<std::path::Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<std::path::Path>) -> Result<T> {
        self.map_err(|e| Error::io(path.as_ref(), e))
    }
}
