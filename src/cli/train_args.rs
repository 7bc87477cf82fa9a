//! `train` options. Every flag is also a key of the TOML run config (`--batch-size` ↔
//! `batch_size` or `batch-size`); flags override the file; unknown keys are an error.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use crate::adapters::{LoraConfig, TargetModules};
use crate::error::{clip, Error, IoContext, Result};
use crate::train::config::{default_device, default_dtype, DashConfig, Method, TrainConfig};
use crate::train::schedule::ScheduleKind;

#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// Model: Hugging Face directory, .gguf file, or hub id `org/name`.
    #[arg(long)]
    pub model: Option<String>,
    /// Task: a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte) trained as sequence
    /// classification / regression on its TSV files; default: instruction tuning.
    #[arg(long)]
    pub task: Option<String>,
    /// Training data: JSON / JSONL files of {instruction, input, output} records, or the GLUE
    /// task's TSV files.
    #[arg(long, num_args = 1..)]
    pub data: Option<Vec<PathBuf>>,
    /// Validation files (same format as --data), scored every --eval-every steps.
    #[arg(long, num_args = 1..)]
    pub eval_data: Option<Vec<PathBuf>>,
    /// Dropout before a sequence classifier (default: the model config's).
    #[arg(long)]
    pub classifier_dropout: Option<f32>,
    /// Run directory (adapter, checkpoints, metrics).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// TOML run config; flags given on the command line override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Fine-tuning method: lora, dash, full, pissa, milora or dora (target modules choose
    /// the trained weights).
    #[arg(long)]
    pub method: Option<String>,
    /// LoRA-Dash pre-launch length t, in optimizer steps.
    #[arg(long)]
    pub dash_t: Option<usize>,
    /// LoRA-Dash directions per layer s.
    #[arg(long)]
    pub dash_s: Option<usize>,
    /// LoRA-Dash: freeze A and B after the switch.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub dash_freeze_ab: Option<bool>,
    /// LoRA-Dash: learning rate of the direction coefficients c as a multiple of --lr.
    #[arg(long)]
    pub dash_lr_scale: Option<f64>,
    /// LoRA rank r.
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (scale alpha/r, or alpha/sqrt(r) with --use-rslora).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Scale by alpha/sqrt(r) (rsLoRA).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,
    /// Comma list of module names, a regex over module paths, or all-linear.
    #[arg(long)]
    pub target_modules: Option<String>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Maximum tokens per example (prompt + response + EOS).
    #[arg(long)]
    pub cutoff_len: Option<usize>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Learning-rate schedule after warmup: linear, cosine or constant.
    #[arg(long)]
    pub schedule: Option<String>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub beta1: Option<f64>,
    #[arg(long)]
    pub beta2: Option<f64>,
    #[arg(long)]
    pub adam_eps: Option<f64>,
    /// Clip the global gradient norm to this value (0 disables).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Examples held out for validation.
    #[arg(long)]
    pub val_set_size: Option<usize>,
    /// Validate every N optimizer steps (0: only at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Checkpoint every N optimizer steps (0: never).
    #[arg(long)]
    pub save_every: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Train on prompt tokens too (false masks the prompt out of the loss).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub train_on_inputs: Option<bool>,
    /// Use at most N training records.
    #[arg(long)]
    pub max_records: Option<usize>,
    /// Batch examples of similar length together (shuffled megabatches, as transformers'
    /// `group_by_length`), which cuts padding; default true, `--group-by-length false` turns
    /// it off.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub group_by_length: Option<bool>,
    /// Where the model, adapters, optimizer state and batches live: cpu (default), cuda or
    /// cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Storage of the frozen linear weights: f32 (default), bf16 or f16 (half the memory;
    /// products, adapters and optimizer state stay f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace an existing run directory.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite: Option<bool>,
    /// Continue from a checkpoint directory or the latest checkpoint of a run directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

/// Default `--target-modules` of instruction tuning (LLaMA-family module names).
pub const DECODER_TARGETS: &str = "q_proj,k_proj,v_proj,up_proj,down_proj";
/// Default `--target-modules` of GLUE tasks: the attention projections of BERT
/// (`query`, `key`, `value`) and of DeBERTa (`query_proj`, `key_proj`, `value_proj`); each
/// model has only one of the two sets.
pub const ENCODER_TARGETS: &str = "query,key,value,query_proj,key_proj,value_proj";

macro_rules! merge_fields {
    ($a:ident, $b:ident, $($f:ident),*) => { $( if $a.$f.is_none() { $a.$f = $b.$f.clone(); } )* };
}

impl TrainArgs {
    /// Reads a TOML run config; keys may use `-` or `_`.
    pub fn from_toml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        let value: toml::Table = toml::from_str(&text)
            .map_err(|e| Error::format(path, format!("invalid TOML: {}", clip(&e.to_string()))))?;
        let normalised: toml::Table = value
            .into_iter()
            .map(|(k, v)| (k.replace('-', "_"), v))
            .collect();
        let args: TrainArgs = normalised
            .try_into()
            .map_err(|e| Error::format(path, clip(&e.to_string())))?;
        // Relative data paths in the config are relative to the config file.
        Ok(args)
    }

    /// Command-line values win; the rest come from `--config` when given.
    pub fn merged(mut self) -> Result<Self> {
        if let Some(path) = self.config.clone() {
            let file = TrainArgs::from_toml(&path)?;
            merge_fields!(
                self,
                file,
                model,
                task,
                data,
                eval_data,
                classifier_dropout,
                out,
                method,
                dash_t,
                dash_s,
                dash_freeze_ab,
                dash_lr_scale,
                rank,
                alpha,
                dropout,
                use_rslora,
                target_modules,
                lr,
                batch_size,
                grad_accum,
                max_steps,
                epochs,
                cutoff_len,
                warmup_steps,
                schedule,
                weight_decay,
                beta1,
                beta2,
                adam_eps,
                max_grad_norm,
                val_set_size,
                eval_every,
                save_every,
                seed,
                train_on_inputs,
                max_records,
                group_by_length,
                device,
                dtype,
                overwrite,
                resume
            );
        }
        Ok(self)
    }

    /// Applies defaults and validates: the one place a run's settings are checked.
    pub fn resolve(self) -> Result<TrainConfig> {
        let a = self.merged()?;
        let method = resolve_method(&a)?;
        let schedule = match a.schedule.as_deref().unwrap_or("linear") {
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            "constant" => ScheduleKind::Constant,
            s => {
                return Err(Error::config(
                    "schedule",
                    format!("unknown schedule `{s}` (linear, cosine, constant)"),
                ))
            }
        };
        let lora = LoraConfig {
            r: a.rank.unwrap_or(8),
            alpha: a.alpha.unwrap_or(16.0),
            dropout: a.dropout.unwrap_or(0.05),
            use_rslora: a.use_rslora.unwrap_or(false),
            target_modules: TargetModules::parse(a.target_modules.as_deref().unwrap_or(
                match crate::data::Task::parse(a.task.as_deref())? {
                    crate::data::Task::Instruction => DECODER_TARGETS,
                    crate::data::Task::Glue(_) => ENCODER_TARGETS,
                },
            ))?,
        };
        let cfg = TrainConfig {
            model: a
                .model
                .ok_or_else(|| Error::config("model", "is required (--model)"))?,
            task: a.task,
            data: a
                .data
                .ok_or_else(|| Error::config("data", "is required (--data)"))?,
            eval_data: a.eval_data.unwrap_or_default(),
            classifier_dropout: a.classifier_dropout,
            out: a
                .out
                .ok_or_else(|| Error::config("out", "is required (--out)"))?,
            method,
            lora,
            lr: a.lr.unwrap_or(3e-4),
            beta1: a.beta1.unwrap_or(0.9),
            beta2: a.beta2.unwrap_or(0.999),
            eps: a.adam_eps.unwrap_or(1e-8),
            weight_decay: a.weight_decay.unwrap_or(0.0),
            batch_size: a.batch_size.unwrap_or(4),
            grad_accum: a.grad_accum.unwrap_or(1),
            max_steps: a.max_steps,
            epochs: a.epochs.unwrap_or(1.0),
            cutoff_len: a.cutoff_len.unwrap_or(256),
            warmup_steps: a.warmup_steps.unwrap_or(0),
            schedule,
            // 0 disables clipping; a negative or NaN value is kept so `validate` refuses it.
            max_grad_norm: match a.max_grad_norm {
                None => Some(1.0),
                Some(g) if g == 0.0 => None,
                Some(g) => Some(g),
            },
            val_set_size: a.val_set_size.unwrap_or(0),
            eval_every: a.eval_every.unwrap_or(0),
            save_every: a.save_every.unwrap_or(0),
            seed: a.seed.unwrap_or(42),
            train_on_inputs: a.train_on_inputs.unwrap_or(true),
            overwrite: a.overwrite.unwrap_or(false),
            resume: a.resume,
            max_records: a.max_records,
            group_by_length: a.group_by_length.unwrap_or(true),
            device: a.device.clone().unwrap_or_else(default_device),
            dtype: a.dtype.clone().unwrap_or_else(default_dtype),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The method and its settings; a method-specific flag given to another method is an error.
fn resolve_method(a: &TrainArgs) -> Result<Method> {
    let name = a.method.as_deref().unwrap_or("lora");
    if name != "dash"
        && (a.dash_t.is_some()
            || a.dash_s.is_some()
            || a.dash_freeze_ab.is_some()
            || a.dash_lr_scale.is_some())
    {
        return Err(Error::config(
            "method",
            format!("dash_t / dash_s / dash_freeze_ab / dash_lr_scale need --method dash (got `{name}`)"),
        ));
    }
    Ok(match name {
        "lora" => Method::Lora,
        "dash" => {
            if a.dash_s == Some(0) {
                return Err(Error::config(
                    "dash_s",
                    "--dash-s must be at least 1 (0 directions would train plain LoRA; use --method lora)",
                ));
            }
            let d = DashConfig::default();
            Method::Dash(DashConfig {
                t: a.dash_t.unwrap_or(d.t),
                s: a.dash_s.unwrap_or(d.s),
                freeze_ab: a.dash_freeze_ab.unwrap_or(d.freeze_ab),
                lr_scale: a.dash_lr_scale.unwrap_or(d.lr_scale),
            })
        }
        "full" => Method::Full,
        "pissa" => Method::Pissa,
        "milora" => Method::Milora,
        "dora" => Method::Dora,
        m => {
            return Err(Error::config(
                "method",
                format!(
                    "unknown method `{m}` (expected {})",
                    Method::NAMES.join(", ")
                ),
            ))
        }
    })
}
