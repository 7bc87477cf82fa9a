//! Parameter-efficient adapters attached to frozen linear layers. Each method is a value of
//! [`Adapter`]; the linear layer asks it for its additive term, except DoRA, which rescales
//! the layer's whole output and is run by the `Linear` with its weight (PEFT's
//! variant-as-strategy: the choice is made once, when the adapter is attached).

pub mod dash;
pub mod dora;
pub mod full;
pub mod inject;
pub mod lora;
pub mod pissa;
pub mod target;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::Ctx;
pub use dash::DashLayer;
pub use dora::DoraLayer;
pub use full::FullDelta;
pub use inject::{inject_dora, inject_full, inject_lora, inject_svd_init};
pub use lora::{lora_scale, LoraLayer};
pub use pissa::{PissaLayer, SvdInit};
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
    /// DoRA: rescales the whole output per row, so the `Linear` runs it with its weight
    /// (`DoraLayer::forward`, `DoraLayer::merged_weight`) instead of adding a term.
    Dora(DoraLayer),
    /// PiSSA / MiLoRA: LoRA on the residual base the `Linear` holds (see `adapters::pissa`).
    Pissa(PissaLayer),
    /// Full fine-tuning: a dense trainable ΔW.
    Full(FullDelta),
}

impl Adapter {
    /// The additive term for `x` (n, in) → (n, out).
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match self {
            Adapter::Lora(l) | Adapter::Pissa(PissaLayer { lora: l, .. }) => {
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
            Adapter::Dora(_) => Err(Error::msg(
                "DoRA has no additive term; its layer output comes from DoraLayer::forward",
            )),
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
            Adapter::Pissa(p) => p.vars().to_vec(),
            Adapter::Dora(d) => d.vars().to_vec(),
            Adapter::Full(f) => vec![("delta.weight", f.delta.clone())],
        }
    }

    /// The dense update this adapter adds to the weight its `Linear` holds (out, in), for
    /// merging (for PiSSA / MiLoRA that weight is the residual).
    pub fn delta_weight(&self) -> Result<Tensor> {
        match self {
            Adapter::Lora(l) => l.delta_weight(),
            Adapter::Dash(d) => d.delta_weight(),
            Adapter::Pissa(p) => p.lora.delta_weight(),
            Adapter::Dora(_) => Err(Error::msg(
                "DoRA's merged weight depends on W; use DoraLayer::merged_weight",
            )),
            Adapter::Full(f) => f.delta_weight(),
        }
    }

    /// The LoRA factors (of the LoRA part, for Dash); None for full fine-tuning.
    pub fn as_lora(&self) -> Option<&LoraLayer> {
        match self {
            Adapter::Lora(l) => Some(l),
            Adapter::Dash(d) => Some(&d.lora),
            Adapter::Pissa(p) => Some(&p.lora),
            Adapter::Dora(d) => Some(&d.lora),
            Adapter::Full(_) => None,
        }
    }

    pub fn as_dora(&self) -> Option<&DoraLayer> {
        match self {
            Adapter::Dora(d) => Some(d),
            _ => None,
        }
    }

    pub fn as_pissa(&self) -> Option<&PissaLayer> {
        match self {
            Adapter::Pissa(p) => Some(p),
            _ => None,
        }
    }

    pub fn as_dash(&self) -> Option<&DashLayer> {
        match self {
            Adapter::Dash(d) => Some(d),
            _ => None,
        }
    }
}
