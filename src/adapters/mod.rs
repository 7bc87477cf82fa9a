//! Parameter-efficient adapters attached to frozen linear layers. Each method is a value of
//! [`Adapter`]; the linear layer only asks it for its additive term.

pub mod dash;
pub mod full;
pub mod inject;
pub mod lora;
pub mod target;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::Ctx;
pub use dash::DashLayer;
pub use full::FullDelta;
pub use inject::{inject_full, inject_lora};
pub use lora::{lora_scale, LoraLayer};
pub use target::TargetModules;

/// LoRA hyper-parameters, PEFT's names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            use_rslora: false,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("rank", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("dropout", "must be in [0, 1)"));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::config("alpha", "must be positive"));
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.r, self.use_rslora)
    }
}

/// The trainable part attached to one linear layer.
pub enum Adapter {
    Lora(LoraLayer),
    Dash(DashLayer),
    /// Full fine-tuning: a dense trainable ΔW.
    Full(FullDelta),
}

impl Adapter {
    /// The additive term for `x` (n, in) → (n, out).
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match self {
            Adapter::Lora(l) => {
                let x = ctx.dropout(x, l.dropout)?;
                l.delta_forward(&x)
            }
            Adapter::Dash(d) => {
                let xd = ctx.dropout(x, d.lora.dropout)?;
                let lora = d.lora.delta_forward(&xd)?;
                if d.s() == 0 {
                    return Ok(lora);
                }
                Ok((lora + d.dash_forward(x)?)?)
            }
            Adapter::Full(f) => f.delta_forward(x),
        }
    }

    /// Trainable tensors named as in PEFT's state dict, relative to the layer path.
    pub fn vars(&self) -> Vec<(&'static str, Var)> {
        match self {
            Adapter::Lora(l) => vec![
                ("lora_A.weight", l.a.clone()),
                ("lora_B.weight", l.b.clone()),
            ],
            Adapter::Dash(d) => {
                let mut v = Vec::with_capacity(3);
                if !d.freeze_ab {
                    v.push(("lora_A.weight", d.lora.a.clone()));
                    v.push(("lora_B.weight", d.lora.b.clone()));
                }
                // s = 0 leaves nothing to train in the dash term (and no gradient to check).
                if d.s() > 0 {
                    v.push(("dash_c", d.c.clone()));
                }
                v
            }
            Adapter::Full(f) => vec![("delta.weight", f.delta.clone())],
        }
    }

    /// The dense update this adapter adds to W (out, in), for merging.
    pub fn delta_weight(&self) -> Result<Tensor> {
        match self {
            Adapter::Lora(l) => l.delta_weight(),
            Adapter::Dash(d) => d.delta_weight(),
            Adapter::Full(f) => f.delta_weight(),
        }
    }

    /// The LoRA factors (of the LoRA part, for Dash); None for full fine-tuning.
    pub fn as_lora(&self) -> Option<&LoraLayer> {
        match self {
            Adapter::Lora(l) => Some(l),
            Adapter::Dash(d) => Some(&d.lora),
            Adapter::Full(_) => None,
        }
    }

    pub fn as_dash(&self) -> Option<&DashLayer> {
        match self {
            Adapter::Dash(d) => Some(d),
            _ => None,
        }
    }
}
