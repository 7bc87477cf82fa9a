//! The resolved plan of a training run: every field validated once, here, so the loop
//! never meets an invalid combination.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::adapters::LoraConfig;
use crate::error::{Error, Result};
use crate::train::schedule::ScheduleKind;

/// The fine-tuning method. Method-specific settings live in the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Method {
    /// Plain LoRA.
    Lora,
    /// LoRA-Dash: LoRA for `t` optimizer steps (pre-launch), then per adapted layer the
    /// `s` task-specific directions get a trainable coefficient each (dash).
    Dash(DashConfig),
    /// Full fine-tuning of the target modules' weights (trained as a dense ΔW on the frozen
    /// W; see `adapters::full`).
    Full,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashConfig {
    /// Pre-launch length in optimizer steps.
    pub t: usize,
    /// Directions per layer.
    pub s: usize,
    /// Stop training A and B after the switch.
    pub freeze_ab: bool,
}

impl Default for DashConfig {
    fn default() -> Self {
        DashConfig {
            t: 100,
            s: 8,
            freeze_ab: false,
        }
    }
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Dash(_) => "dash",
            Method::Full => "full",
        }
    }

    pub fn dash(&self) -> Option<&DashConfig> {
        match self {
            Method::Dash(d) => Some(d),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: String,
    /// `None`: instruction tuning (causal LM); else a GLUE task name (see `data::Task`).
    #[serde(default)]
    pub task: Option<String>,
    pub data: Vec<PathBuf>,
    /// Files validated on every `eval_every` steps (besides any `val_set_size` split).
    #[serde(default)]
    pub eval_data: Vec<PathBuf>,
    /// Dropout before a sequence classifier (None: the model config's).
    #[serde(default)]
    pub classifier_dropout: Option<f32>,
    pub out: PathBuf,
    pub method: Method,
    pub lora: LoraConfig,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Optimizer steps; when None, `epochs` passes over the training split.
    pub max_steps: Option<usize>,
    pub epochs: f64,
    pub cutoff_len: usize,
    pub warmup_steps: usize,
    pub schedule: ScheduleKind,
    pub max_grad_norm: Option<f64>,
    pub val_set_size: usize,
    pub eval_every: usize,
    pub save_every: usize,
    pub seed: u64,
    pub train_on_inputs: bool,
    pub overwrite: bool,
    pub resume: Option<PathBuf>,
    /// Cap on the number of training records (after shuffling), for quick runs.
    pub max_records: Option<usize>,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        crate::data::Task::parse(self.task.as_deref())?;
        if let Some(p) = self.classifier_dropout {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config("classifier_dropout", "must be in [0, 1)"));
            }
        }
        if self.data.is_empty() {
            return Err(Error::config("data", "no data file given"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config("lr", "must be a positive number"));
        }
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if self.grad_accum == 0 {
            return Err(Error::config("grad_accum", "must be at least 1"));
        }
        if self.max_steps == Some(0) {
            return Err(Error::config("max_steps", "must be at least 1"));
        }
        if self.max_steps.is_none() && !(self.epochs > 0.0) {
            return Err(Error::config(
                "epochs",
                "must be positive when max_steps is not set",
            ));
        }
        if self.cutoff_len < 2 {
            return Err(Error::config("cutoff_len", "must be at least 2"));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(Error::config("betas", "must be in [0, 1)"));
        }
        if self.weight_decay < 0.0 {
            return Err(Error::config("weight_decay", "must be non-negative"));
        }
        if let Some(g) = self.max_grad_norm {
            if !(g > 0.0) {
                return Err(Error::config(
                    "max_grad_norm",
                    "must be positive (omit it to disable clipping)",
                ));
            }
        }
        if let Method::Dash(d) = &self.method {
            if d.t == 0 {
                return Err(Error::config(
                    "dash_t",
                    "must be at least 1 (LoRA-Dash selects directions from a trained LoRA)",
                ));
            }
            if let Some(m) = self.max_steps {
                if d.t >= m {
                    return Err(Error::config(
                        "dash_t",
                        format!("{} is not before the end of the run ({m} steps)", d.t),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Optimizer steps of the run for `n_train` training examples.
    pub fn total_steps(&self, n_train: usize) -> usize {
        match self.max_steps {
            Some(s) => s,
            None => {
                let per_epoch = n_train.div_ceil(self.batch_size * self.grad_accum).max(1);
                ((per_epoch as f64) * self.epochs).ceil().max(1.0) as usize
            }
        }
    }
}
