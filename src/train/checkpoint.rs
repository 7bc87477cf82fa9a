//! Checkpoints: trainable tensors, optimizer state, and the trainer's position (step, data
//! loader, dropout generator), each a separate record, written atomically so a crash never
//! leaves a half-written checkpoint that `--resume` would pick up.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::batch::LoaderState;
use crate::error::{Error, IoContext, Result};
use crate::io::atomic::{self, StagedDir};
use crate::io::Weights;
use crate::rng::Rng;

pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    pub loader: LoaderState,
    pub rng: Rng,
    /// The method's own state (e.g. LoRA-Dash's switch), opaque here.
    #[serde(default)]
    pub method_state: serde_json::Value,
    /// Identifies the run this checkpoint belongs to (resolved config, serialised).
    pub config_fingerprint: String,
    /// SHA-256 of the training and evaluation files' contents: resuming on changed data
    /// at the same paths is refused.
    #[serde(default)]
    pub data_hash: String,
    /// SHA-256 over the base model's tensors.
    #[serde(default)]
    pub base_hash: String,
}

/// Directory name of the checkpoint after `step` optimizer steps.
pub fn dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Writes a checkpoint under `root/step-NNNNNN`.
pub fn save(
    root: &Path,
    trainable: &Weights,
    optimizer: &Weights,
    state: &TrainerState,
) -> Result<PathBuf> {
    let staged = StagedDir::new(&root.join(dir_name(state.step)), true)?;
    trainable.save_safetensors(&staged.join(TRAINABLE_FILE), None)?;
    optimizer.save_safetensors(&staged.join(OPTIMIZER_FILE), None)?;
    atomic::write_file(
        &staged.join(STATE_FILE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    staged.commit()
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub trainable: Weights,
    pub optimizer: Weights,
    pub state: TrainerState,
}

/// Loads a checkpoint directory, or the latest checkpoint of a run directory.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let dir = if path.join(STATE_FILE).exists() {
        path.to_path_buf()
    } else {
        latest(path)?
    };
    let sp = dir.join(STATE_FILE);
    let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(&sp).at(&sp)?)
        .map_err(|e| Error::format(&sp, format!("invalid trainer state: {e}")))?;
    Ok(Checkpoint {
        trainable: Weights::load_safetensors(&dir.join(TRAINABLE_FILE))?,
        optimizer: Weights::load_safetensors(&dir.join(OPTIMIZER_FILE))?,
        state,
        dir,
    })
}

/// The checkpoint with the highest step under `run/checkpoints` (or `run` itself).
pub fn latest(run: &Path) -> Result<PathBuf> {
    let root = if run.join("checkpoints").is_dir() {
        run.join("checkpoints")
    } else {
        run.to_path_buf()
    };
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(&root).at(&root)? {
        let e = e.at(&root)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().join(STATE_FILE).exists() && best.as_ref().map(|b| n > b.0).unwrap_or(true)
            {
                best = Some((n, e.path()));
            }
        }
    }
    best.map(|b| b.1).ok_or_else(|| {
        Error::format(
            run,
            "no checkpoint found (expected checkpoints/step-NNNNNN with trainer_state.json)",
        )
    })
}
