//! Commonsense-reasoning evaluation of a model (with or without adapter) on LLM-Adapters test
//! files.
//!
//! Two protocols, reported separately and never averaged together:
//! * `generate` — the LoRA-Dash authors' protocol (Chongjie-Si/Subspace-Tuning
//!   `CR_MR/commonsense_evaluate.py`): the evaluation prompt, up to `max_new_tokens` (32)
//!   decoded tokens with left-padded batches and a KV cache, greedy or beam search, the text
//!   after `### Response:` stripped, and the first match of the task's answer vocabulary as
//!   the prediction (no match is wrong). The reference uses `num_beams=4`; greedy is the
//!   default here because it is four times cheaper.
//! * `likelihood` — every allowed answer is scored as the continuation the training data would
//!   hold for it (`the correct answer is answer3` with the candidate substituted), summing
//!   token log-probabilities; the best candidate is the prediction. The allowed answers are
//!   those the record's instruction lists after `Answer format:`, else the task's vocabulary
//!   (`answer1..answerN` with N the largest seen in the file).

pub mod glue_metrics;
pub mod likelihood;
pub mod report;
pub mod task;

use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use crate::data::{eval_prompt, Record};
use crate::error::{Error, Result};
use crate::io::TextTokenizer;
use crate::models::beam::generate_beam;
use crate::models::generate::generate_greedy;
use crate::models::Llama;

pub use report::{results_json, TaskReport};
pub use task::{continuation, detect_task, response_text, task_name, Family, Task};

/// How a prediction is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Generate,
    Likelihood,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Generate => "generate",
            Mode::Likelihood => "likelihood",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub mode: Mode,
    /// 1 = greedy; more = beam search (generate mode only).
    pub num_beams: usize,
    /// Beam-search length penalty (transformers' default 1.0).
    pub length_penalty: f64,
    pub batch_size: usize,
    pub max_new_tokens: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            mode: Mode::Generate,
            num_beams: 1,
            length_penalty: 1.0,
            batch_size: 8,
            max_new_tokens: 32,
        }
    }
}

impl EvalOptions {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if self.num_beams == 0 {
            return Err(Error::config("num_beams", "must be at least 1"));
        }
        if self.mode == Mode::Likelihood && self.num_beams != 1 {
            return Err(Error::config(
                "num_beams",
                "beam search applies to generate mode only",
            ));
        }
        if self.mode == Mode::Generate && self.max_new_tokens == 0 {
            return Err(Error::config("max_new_tokens", "must be at least 1"));
        }
        Ok(())
    }
}

/// One evaluated record.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub task: String,
    /// Position of the record in its file.
    pub index: usize,
    /// Generate mode: the response text; likelihood mode: `{candidate: log-prob}`.
    pub raw: Value,
    /// `None` when the response holds no answer word.
    pub prediction: Option<String>,
    pub label: String,
    pub correct: bool,
}

/// Evaluates `records` (all labelled, as [`detect_task`] checks) and calls `progress` with
/// the number of records finished after each batch.
pub fn evaluate(
    model: &Llama,
    tok: &TextTokenizer,
    task: &Task,
    records: &[Record],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<TaskReport> {
    opts.validate()?;
    let start = Instant::now();
    let prompts: Vec<String> = records
        .iter()
        .map(|r| eval_prompt(&r.instruction, Some(&r.input)))
        .collect();
    let mut preds: Vec<Option<(Value, Option<String>)>> = vec![None; records.len()];
    match opts.mode {
        Mode::Generate => {
            let ids: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| tok.encode(p))
                .collect::<Result<_>>()?;
            let mut eos = model.cfg.eos_token_ids.clone();
            eos.extend(tok.eos_id);
            // Longest first: similar lengths share a batch, so little padding is computed.
            let order = by_length_desc(&ids);
            for chunk in order.chunks(opts.batch_size) {
                let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
                let outs = if opts.num_beams == 1 {
                    generate_greedy(model, &batch, tok.pad_or_eos(), opts.max_new_tokens, &eos)?
                } else {
                    generate_beam(
                        model,
                        &batch,
                        tok.pad_or_eos(),
                        opts.max_new_tokens,
                        &eos,
                        opts.num_beams,
                        opts.length_penalty,
                    )?
                };
                for (&i, out) in chunk.iter().zip(outs) {
                    let text = tok.decode(&out)?;
                    let response = response_text(&text).to_string();
                    let pred = task.extract_answer(&response);
                    preds[i] = Some((Value::String(response), pred));
                }
                progress(chunk.len());
            }
        }
        Mode::Likelihood => {
            let cands: Vec<Vec<String>> = records.iter().map(|r| task.candidates_for(r)).collect();
            let items: Vec<likelihood::Candidates> = records
                .iter()
                .zip(&prompts)
                .zip(&cands)
                .map(|((r, p), cs)| {
                    let conts: Vec<String> = cs.iter().map(|c| continuation(r, c)).collect();
                    likelihood::tokenize_candidates(tok, p, &conts)
                })
                .collect::<Result<_>>()?;
            let lens: Vec<Vec<u32>> = items.iter().map(|it| it.context.clone()).collect();
            let order = by_length_desc(&lens);
            for chunk in order.chunks(opts.batch_size) {
                let batch: Vec<likelihood::Candidates> =
                    chunk.iter().map(|&i| items[i].clone()).collect();
                let scores = likelihood::score_batch(model, &batch, tok.pad_or_eos())?;
                for (&i, s) in chunk.iter().zip(scores) {
                    // First best on ties, like an argmax.
                    let best = s
                        .iter()
                        .enumerate()
                        .fold(0, |b, (j, &x)| if x > s[b] { j } else { b });
                    let raw: serde_json::Map<String, Value> = cands[i]
                        .iter()
                        .zip(&s)
                        .map(|(c, &x)| (c.clone(), serde_json::json!(x)))
                        .collect();
                    preds[i] = Some((Value::Object(raw), Some(cands[i][best].clone())));
                }
                progress(chunk.len());
            }
        }
    }
    let predictions: Vec<Prediction> = records
        .iter()
        .zip(preds)
        .enumerate()
        .map(|(index, (r, p))| {
            let (raw, prediction) = p.unwrap_or((Value::Null, None));
            let label = r.answer.clone().unwrap_or_default();
            Prediction {
                task: task.name.clone(),
                index,
                correct: prediction.as_deref() == Some(label.as_str()),
                raw,
                prediction,
                label,
            }
        })
        .collect();
    Ok(TaskReport::new(
        task,
        opts.mode,
        predictions,
        start.elapsed().as_secs_f64(),
    ))
}

/// Indices sorted by decreasing length (stable, so equal lengths keep file order).
fn by_length_desc(seqs: &[Vec<u32>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    order
}
