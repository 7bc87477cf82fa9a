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
    /// PiSSA: LoRA initialised from the r largest singular triplets of W, on the residual.
    Pissa,
    /// MiLoRA: the same with the r smallest triplets.
    Milora,
    /// DoRA: LoRA with a trainable per-row magnitude (see `adapters::dora`).
    Dora,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashConfig {
    /// Pre-launch length in optimizer steps.
    pub t: usize,
    /// Directions per layer. `--dash-s` must be at least 1; a config built in code may use
    /// 0, which trains exactly like LoRA (the switch adds no coefficient), to test the switch.
    pub s: usize,
    /// Stop training A and B after the switch.
    pub freeze_ab: bool,
    /// Learning rate of the coefficients c as a multiple of the run's (schedule applied
    /// alike). Left out of the serialised config at its default 1, so runs and checkpoints
    /// from before the setting keep their fingerprint.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub lr_scale: f64,
}

fn one() -> f64 {
    1.0
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

impl Default for DashConfig {
    fn default() -> Self {
        DashConfig {
            t: 100,
            s: 8,
            freeze_ab: false,
            lr_scale: 1.0,
        }
    }
}

impl Method {
    /// Every `--method` value.
    pub const NAMES: &'static [&'static str] = &["lora", "dash", "full", "pissa", "milora", "dora"];

    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Dash(_) => "dash",
            Method::Full => "full",
            Method::Pissa => "pissa",
            Method::Milora => "milora",
            Method::Dora => "dora",
        }
    }

    /// The SVD initialisation of PiSSA / MiLoRA.
    pub fn svd_init(&self) -> Option<crate::adapters::SvdInit> {
        match self {
            Method::Pissa => Some(crate::adapters::SvdInit::Pissa),
            Method::Milora => Some(crate::adapters::SvdInit::Milora),
            _ => None,
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
    /// Batches of similar-length examples (`data::batch::Loader::group_by_length`). Absent
    /// from run files written before it existed, which batched at random.
    #[serde(default)]
    pub group_by_length: bool,
    /// `cpu`, `cuda` or `cuda:N` (see `device::parse`); runs written before it existed ran on
    /// the CPU.
    #[serde(default = "default_device")]
    pub device: String,
    /// Storage dtype of the frozen linear weights (`device::parse_dtype`); f32 in runs
    /// written before it existed.
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

pub fn default_device() -> String {
    "cpu".into()
}

pub fn default_dtype() -> String {
    "f32".into()
}

/// Most epochs a run may ask for; with any realistic data set the step count stays far
/// from overflowing.
pub const MAX_EPOCHS: f64 = 1e6;

/// An invalid run setting, named by its TOML key and its flag.
fn bad(field: &str, reason: impl std::fmt::Display) -> Error {
    Error::config(field, format!("--{} {reason}", field.replace('_', "-")))
}

fn positive_finite(field: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(bad(field, format!("must be a positive number, got {v}")))
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        crate::device::parse(&self.device)?;
        if crate::device::parse_dtype(&self.dtype)? != candle_core::DType::F32
            && matches!(self.method, Method::Full | Method::Pissa | Method::Milora)
        {
            return Err(bad(
                "dtype",
                format!(
                    "{}: --method {} changes the base weights, which train and are saved in f32",
                    self.dtype,
                    self.method.name()
                ),
            ));
        }
        crate::data::Task::parse(self.task.as_deref())?;
        if let Some(p) = self.classifier_dropout {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config("classifier_dropout", "must be in [0, 1)"));
            }
        }
        if self.data.is_empty() {
            return Err(Error::config("data", "no data file given"));
        }
        positive_finite("lr", self.lr)?;
        positive_finite("adam_eps", self.eps)?;
        if self.batch_size == 0 {
            return Err(bad("batch_size", "must be at least 1"));
        }
        if self.grad_accum == 0 {
            return Err(bad("grad_accum", "must be at least 1"));
        }
        if self.batch_size.checked_mul(self.grad_accum).is_none() {
            return Err(bad(
                "grad_accum",
                format!("× --batch-size {} overflows", self.batch_size),
            ));
        }
        if self.max_steps == Some(0) {
            return Err(bad("max_steps", "must be at least 1"));
        }
        if self.max_steps.is_none() {
            positive_finite("epochs", self.epochs)?;
            if self.epochs > MAX_EPOCHS {
                return Err(bad(
                    "epochs",
                    format!("{} is more than {MAX_EPOCHS}", self.epochs),
                ));
            }
        } else if self.epochs.is_nan() {
            return Err(bad("epochs", "must be a number"));
        }
        if self.cutoff_len < 2 {
            return Err(bad("cutoff_len", "must be at least 2"));
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad(field, format!("must be in [0, 1), got {b}")));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad(
                "weight_decay",
                format!("must be a non-negative number, got {}", self.weight_decay),
            ));
        }
        if let Some(g) = self.max_grad_norm {
            if !(g.is_finite() && g > 0.0) {
                return Err(bad(
                    "max_grad_norm",
                    format!("must be a positive number (0 disables clipping), got {g}"),
                ));
            }
        }
        if let Method::Dash(d) = &self.method {
            positive_finite("dash_lr_scale", d.lr_scale)?;
            if d.t == 0 {
                return Err(bad(
                    "dash_t",
                    "must be at least 1 (LoRA-Dash selects directions from a trained LoRA)",
                ));
            }
            if let Some(m) = self.max_steps {
                if d.t >= m {
                    return Err(bad(
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
                let per_step = self.batch_size.saturating_mul(self.grad_accum).max(1);
                let per_epoch = n_train.div_ceil(per_step).max(1);
                // Saturates (float-to-int casts do) rather than wrapping; `validate` keeps
                // `epochs` finite and bounded.
                ((per_epoch as f64) * self.epochs).ceil().max(1.0) as usize
            }
        }
    }
}
