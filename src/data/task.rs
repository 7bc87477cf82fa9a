//! What a run learns, independent of the model: an instruction task (causal LM on
//! Alpaca / LLM-Adapters records) or a GLUE sequence task (classification or regression on
//! the task's original TSV files). The task reads and encodes the data and says which head
//! the model needs.

use std::path::PathBuf;

use crate::data::alpaca::load_records;
use crate::data::glue::{read_glue_tsv, GlueLabel, GlueTask, PairEncoder};
use crate::data::tokenize::{tokenize_record, Example, Target};
use crate::error::{Error, Result};
use crate::io::TextTokenizer;
use crate::models::HeadSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Causal LM on instruction records (the default).
    Instruction,
    /// A GLUE task.
    Glue(GlueTask),
}

/// Encoding settings shared by training and evaluation.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    pub cutoff_len: usize,
    pub train_on_inputs: bool,
}

impl Task {
    /// `None` or `instruction` is the instruction task; anything else must name a GLUE task.
    pub fn parse(name: Option<&str>) -> Result<Task> {
        match name {
            None => Ok(Task::Instruction),
            Some(n) if n.eq_ignore_ascii_case("instruction") => Ok(Task::Instruction),
            Some(n) => Ok(Task::Glue(GlueTask::parse(n)?)),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Task::Instruction => "instruction",
            Task::Glue(g) => g.name(),
        }
    }

    /// The head a model needs for this task.
    pub fn head(&self, classifier_dropout: Option<f32>, seed: u64) -> HeadSpec {
        match self {
            Task::Instruction => HeadSpec::CausalLm,
            Task::Glue(g) => HeadSpec::Sequence {
                num_labels: g.num_labels(),
                classifier_dropout,
                seed,
            },
        }
    }

    /// Reads and encodes every file; every example carries its label.
    pub fn load_examples(
        &self,
        tok: &TextTokenizer,
        files: &[PathBuf],
        opts: EncodeOptions,
    ) -> Result<Vec<Example>> {
        Ok(self
            .load_indexed(tok, files, opts)?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    /// [`Task::load_examples`] with each example's 0-based row in its file.
    pub fn load_indexed(
        &self,
        tok: &TextTokenizer,
        files: &[PathBuf],
        opts: EncodeOptions,
    ) -> Result<Vec<(usize, Example)>> {
        match self {
            Task::Instruction => {
                let records = load_records(files)?;
                records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        Ok((
                            i,
                            tokenize_record(tok, r, opts.cutoff_len, opts.train_on_inputs, true)?,
                        ))
                    })
                    .collect()
            }
            Task::Glue(g) => {
                let enc = PairEncoder::new(tok, opts.cutoff_len)?;
                let mut out = Vec::new();
                for f in files {
                    let file = read_glue_tsv(*g, f)?;
                    if file.skipped > 0 {
                        eprintln!(
                            "warning: {}: skipped {} malformed rows",
                            f.display(),
                            file.skipped
                        );
                    }
                    for row in &file.rows {
                        let label = row.label.as_ref().ok_or_else(|| {
                            Error::format(
                                f,
                                format!("line {}: has no label (a test file?)", row.line),
                            )
                        })?;
                        let (ids, types) = enc.encode(&row.text_a, row.text_b.as_deref())?;
                        out.push((
                            row.index,
                            Example {
                                input_ids: ids,
                                labels: Vec::new(),
                                token_type_ids: types,
                                target: Some(target_of(label)),
                            },
                        ));
                    }
                }
                Ok(out)
            }
        }
    }
}

pub fn target_of(label: &GlueLabel) -> Target {
    match *label {
        GlueLabel::Class(c) => Target::Class(c),
        GlueLabel::Score(x) => Target::Score(x),
    }
}
