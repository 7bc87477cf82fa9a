//! The eight GLUE tasks (Wang et al., 2019): their names, label sets and main metric, the
//! reader for each task's original tab-separated files (`tsv`), and sentence-pair encoding
//! for encoder models (`encode`).
//!
//! Label ids are GLUE's own, as the Hugging Face `glue` dataset and transformers'
//! `glue_processors` number them: CoLA, SST-2, MRPC and QQP keep the file's `0`/`1`;
//! RTE and QNLI map `entailment` = 0, `not_entailment` = 1; MNLI maps `entailment` = 0,
//! `neutral` = 1, `contradiction` = 2; STS-B is a regression on a 0–5 similarity score.

mod encode;
mod layout;
mod tsv;

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};

pub use encode::{encode_pair, PairEncoder};
pub use tsv::read_glue_tsv;

/// A GLUE task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GlueTask {
    Cola,
    Sst2,
    Mrpc,
    Qqp,
    Stsb,
    Mnli,
    Qnli,
    Rte,
}

impl GlueTask {
    pub const ALL: [GlueTask; 8] = [
        GlueTask::Cola,
        GlueTask::Sst2,
        GlueTask::Mrpc,
        GlueTask::Qqp,
        GlueTask::Stsb,
        GlueTask::Mnli,
        GlueTask::Qnli,
        GlueTask::Rte,
    ];

    /// Reads a task name, ignoring case, `-` and `_`: `sst-2`, `STS-B`, `mnli-m`, `mnli-mm`,
    /// `mnli_matched` and `mnli_mismatched` are accepted (the MNLI dev sets differ only in
    /// the file, not the task).
    pub fn parse(name: &str) -> Result<GlueTask> {
        let key: String = name
            .trim()
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .flat_map(char::to_lowercase)
            .collect();
        Ok(match key.as_str() {
            "cola" => GlueTask::Cola,
            "sst2" => GlueTask::Sst2,
            "mrpc" => GlueTask::Mrpc,
            "qqp" => GlueTask::Qqp,
            "stsb" => GlueTask::Stsb,
            "mnli" | "mnlim" | "mnlimm" | "mnlimatched" | "mnlimismatched" => GlueTask::Mnli,
            "qnli" => GlueTask::Qnli,
            "rte" => GlueTask::Rte,
            _ => {
                let names: Vec<&str> = GlueTask::ALL.iter().map(|t| t.name()).collect();
                return Err(Error::config(
                    "task",
                    format!("unknown task `{name}` (expected {})", names.join(", ")),
                ));
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            GlueTask::Cola => "cola",
            GlueTask::Sst2 => "sst2",
            GlueTask::Mrpc => "mrpc",
            GlueTask::Qqp => "qqp",
            GlueTask::Stsb => "stsb",
            GlueTask::Mnli => "mnli",
            GlueTask::Qnli => "qnli",
            GlueTask::Rte => "rte",
        }
    }

    /// Outputs of the classification head: 1 for the STS-B regression.
    pub fn num_labels(&self) -> usize {
        self.label_names().len()
    }

    pub fn is_regression(&self) -> bool {
        *self == GlueTask::Stsb
    }

    /// Class names by label id (the Hugging Face `glue` dataset's names); STS-B's single
    /// output is `score`.
    pub fn label_names(&self) -> &'static [&'static str] {
        match self {
            GlueTask::Cola => &["unacceptable", "acceptable"],
            GlueTask::Sst2 => &["negative", "positive"],
            GlueTask::Mrpc => &["not_equivalent", "equivalent"],
            GlueTask::Qqp => &["not_duplicate", "duplicate"],
            GlueTask::Stsb => &["score"],
            GlueTask::Mnli => &["entailment", "neutral", "contradiction"],
            GlueTask::Qnli | GlueTask::Rte => &["entailment", "not_entailment"],
        }
    }

    /// Whether examples are sentence pairs.
    pub fn is_pair(&self) -> bool {
        !matches!(self, GlueTask::Cola | GlueTask::Sst2)
    }

    /// The key of [`crate::eval::glue_metrics::glue_metrics`]'s map that the LoRA-Dash and
    /// AdaLoRA GLUE tables report: Matthews correlation for CoLA, Pearson correlation for
    /// STS-B, accuracy for the others (MRPC and QQP also get `f1`).
    pub fn main_metric(&self) -> &'static str {
        match self {
            GlueTask::Cola => "matthews_correlation",
            GlueTask::Stsb => "pearson",
            _ => "accuracy",
        }
    }
}

impl fmt::Display for GlueTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A gold label or a prediction: a class id, or the STS-B score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GlueLabel {
    Class(usize),
    Score(f32),
}

impl GlueLabel {
    pub fn class(&self) -> Option<usize> {
        match self {
            GlueLabel::Class(c) => Some(*c),
            GlueLabel::Score(_) => None,
        }
    }

    pub fn score(&self) -> Option<f32> {
        match self {
            GlueLabel::Score(s) => Some(*s),
            GlueLabel::Class(_) => None,
        }
    }
}

/// One example of a GLUE file.
#[derive(Debug, Clone, PartialEq)]
pub struct GlueRow {
    /// 0-based data row in the file (header excluded, skipped malformed rows counted).
    pub index: usize,
    /// 1-based line number in the file.
    pub line: usize,
    pub text_a: String,
    /// The second sentence of pair tasks.
    pub text_b: Option<String>,
    /// `None` in files without a label column (GLUE's test files).
    pub label: Option<GlueLabel>,
}

/// The rows of one file and how many malformed rows were skipped (QQP only).
#[derive(Debug, Clone, PartialEq)]
pub struct GlueFile {
    pub rows: Vec<GlueRow>,
    pub skipped: usize,
}

impl GlueFile {
    /// Whether the file has a label column (rows all agree: the layout decides).
    pub fn has_labels(&self) -> bool {
        self.rows.iter().all(|r| r.label.is_some())
    }

    /// The gold labels in row order, or an error naming `path` (the file the rows were read
    /// from) when it has no label column: training and evaluation need labelled rows.
    pub fn labels(&self, path: &Path) -> Result<Vec<GlueLabel>> {
        self.rows
            .iter()
            .map(|r| {
                r.label.ok_or_else(|| {
                    Error::format(
                        path,
                        format!(
                            "line {}: no label (the file has no label column, like GLUE's \
                             test files); training and evaluation need a labelled file",
                            r.line
                        ),
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_aliases_and_rejects_unknown() {
        for t in GlueTask::ALL {
            assert_eq!(GlueTask::parse(t.name()).unwrap(), t);
            assert_eq!(GlueTask::parse(&t.name().to_uppercase()).unwrap(), t);
        }
        assert_eq!(GlueTask::parse("SST-2").unwrap(), GlueTask::Sst2);
        assert_eq!(GlueTask::parse("sts-b").unwrap(), GlueTask::Stsb);
        assert_eq!(GlueTask::parse("mnli-mm").unwrap(), GlueTask::Mnli);
        assert_eq!(GlueTask::parse("MNLI_matched").unwrap(), GlueTask::Mnli);
        let e = GlueTask::parse("wnli").unwrap_err().to_string();
        assert!(e.contains("unknown task `wnli`"), "{e}");
        assert!(
            e.contains("cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte"),
            "{e}"
        );
    }

    #[test]
    fn label_counts_and_metrics() {
        let n: Vec<usize> = GlueTask::ALL.iter().map(|t| t.num_labels()).collect();
        assert_eq!(n, [2, 2, 2, 2, 1, 3, 2, 2]);
        assert!(GlueTask::Stsb.is_regression());
        assert!(!GlueTask::Mnli.is_regression());
        assert_eq!(
            GlueTask::Rte.label_names(),
            ["entailment", "not_entailment"]
        );
        assert_eq!(GlueTask::Cola.main_metric(), "matthews_correlation");
        assert_eq!(GlueTask::Stsb.main_metric(), "pearson");
        assert_eq!(GlueTask::Mrpc.main_metric(), "accuracy");
    }

    #[test]
    fn labels_of_an_unlabelled_file_is_an_error() {
        let file = GlueFile {
            rows: vec![GlueRow {
                index: 0,
                line: 2,
                text_a: "x".into(),
                text_b: None,
                label: None,
            }],
            skipped: 0,
        };
        assert!(!file.has_labels());
        let e = file.labels(Path::new("t.tsv")).unwrap_err().to_string();
        assert!(e.starts_with("t.tsv: line 2: no label"), "{e}");
    }
}
