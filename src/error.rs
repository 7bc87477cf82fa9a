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

    /// An output path that is, contains, or lies inside one of the command's inputs:
    /// replacing it would destroy the input.
    #[error(
        "--out `{}` {relation} the {flag} input `{}`; choose an output outside every input",
        out.display(),
        input.display()
    )]
    OutputOverlapsInput {
        out: PathBuf,
        relation: &'static str,
        flag: String,
        input: PathBuf,
    },

    /// An existing output that `--overwrite` must not replace (it is not an earlier output
    /// of the same command).
    #[error("--out `{}`: {reason}; refusing to replace it (remove it yourself or choose another --out)", path.display())]
    OutputNotReplaceable { path: PathBuf, reason: String },

    #[error(
        "tensor `{name}`{} holds {count} non-finite value(s) (first: {value} at flat index {index})",
        from.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
    )]
    NonFiniteTensor {
        name: String,
        from: Option<PathBuf>,
        count: usize,
        index: usize,
        value: f32,
    },

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

/// Longest excerpt of file content an error message quotes.
pub const QUOTE_LIMIT: usize = 200;

/// `text` cut to about [`QUOTE_LIMIT`] characters, so that an error quoting a corrupt file
/// stays readable: the start and the end are kept (parsers put the position last), the
/// middle is replaced by the number of characters left out. Cuts fall on character
/// boundaries.
pub fn clip(text: &str) -> String {
    clip_to(text, QUOTE_LIMIT)
}

/// [`clip`] with an explicit limit in characters.
pub fn clip_to(text: &str, limit: usize) -> String {
    let n = text.chars().count();
    if n <= limit {
        return text.to_string();
    }
    let tail = limit / 4;
    let head = limit - tail;
    let byte = |k: usize| text.char_indices().nth(k).map_or(text.len(), |(i, _)| i);
    format!(
        "{} … ({} characters left out) … {}",
        &text[..byte(head)],
        n - head - tail,
        &text[byte(n - tail)..]
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_content_is_cut_to_a_readable_length() {
        assert_eq!(clip("short"), "short");
        let long = format!("{} at line 1 column 9", "é".repeat(1000));
        let c = clip(&long);
        assert!(c.starts_with(&"é".repeat(150)), "{c}");
        assert!(c.contains("(819 characters left out)"), "{c}");
        assert!(c.ends_with("ééé at line 1 column 9"), "{c}");
        assert_eq!(clip_to("abcdefgh", 4), "abc … (4 characters left out) … h");
    }
}
