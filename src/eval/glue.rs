//! GLUE evaluation of a sequence classifier / regressor: logits for every example, the
//! prediction (arg-max class, or the regression output) and the task's metrics
//! (`eval::glue_metrics`).

use std::collections::BTreeMap;

use candle_core::DType;

use crate::data::collate;
use crate::data::glue::{GlueLabel, GlueTask};
use crate::data::tokenize::{Example, Target};
use crate::error::{Error, Result};
use crate::eval::glue_metrics::glue_metrics;
use crate::models::{Ctx, Model};

/// One evaluated example.
#[derive(Debug, Clone)]
pub struct GluePrediction {
    pub label: GlueLabel,
    pub prediction: GlueLabel,
    /// The logits, or the one regression output.
    pub scores: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct GlueReport {
    pub metrics: BTreeMap<String, f64>,
    /// In the order of the examples.
    pub predictions: Vec<GluePrediction>,
}

fn label_of(t: &Option<Target>) -> Result<GlueLabel> {
    match t {
        Some(Target::Class(c)) => Ok(GlueLabel::Class(*c)),
        Some(Target::Score(x)) => Ok(GlueLabel::Score(*x)),
        None => Err(Error::msg("an evaluation example has no label")),
    }
}

/// Scores every example in batches of `batch_size` (longest first, so similar lengths
/// share a batch) and computes the task's metrics.
pub fn evaluate(
    model: &dyn Model,
    task: GlueTask,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<GlueReport> {
    evaluate_with_progress(model, task, examples, batch_size, pad_id, &mut |_| {})
}

/// [`evaluate`], calling `progress` with the number of examples finished after each batch.
pub fn evaluate_with_progress(
    model: &dyn Model,
    task: GlueTask,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    progress: &mut dyn FnMut(usize),
) -> Result<GlueReport> {
    let clf = model.as_classifier().ok_or_else(|| {
        Error::config(
            "task",
            format!(
                "`{}` is not a sequence classifier; GLUE tasks need an encoder such as BERT",
                model.arch()
            ),
        )
    })?;
    if batch_size == 0 {
        return Err(Error::config("batch_size", "must be at least 1"));
    }
    let dev = model.device().clone();
    let ctx = Ctx::eval();
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    let mut scores: Vec<Vec<f32>> = vec![Vec::new(); examples.len()];
    for chunk in order.chunks(batch_size) {
        let exs: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let batch = collate(&exs, pad_id)?.to_device(&dev)?;
        let logits = clf.classify(&batch, &ctx)?.to_dtype(DType::F32)?; // (b, n)
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        for (&i, row) in chunk.iter().zip(rows) {
            if row.iter().any(|x| !x.is_finite()) {
                return Err(Error::msg(format!(
                    "example {i}: the model produced non-finite scores {row:?}"
                )));
            }
            scores[i] = row;
        }
        progress(chunk.len());
    }
    let mut predictions = Vec::with_capacity(examples.len());
    for (ex, sc) in examples.iter().zip(scores) {
        let prediction = if task.is_regression() {
            GlueLabel::Score(sc[0])
        } else {
            let mut best = 0;
            for (j, &x) in sc.iter().enumerate() {
                if x > sc[best] {
                    best = j;
                }
            }
            GlueLabel::Class(best)
        };
        predictions.push(GluePrediction {
            label: label_of(&ex.target)?,
            prediction,
            scores: sc,
        });
    }
    let labels: Vec<GlueLabel> = predictions.iter().map(|p| p.label.clone()).collect();
    let preds: Vec<GlueLabel> = predictions.iter().map(|p| p.prediction.clone()).collect();
    let metrics = glue_metrics(task, &labels, &preds)?;
    Ok(GlueReport {
        metrics,
        predictions,
    })
}
