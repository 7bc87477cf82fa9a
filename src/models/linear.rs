//! A frozen linear layer with an optional adapter: y = x·Wᵀ (+ b) + adapter(x).
//! The frozen bias, when there is one, starts the output that the fused products accumulate
//! onto (DoRA adds it after its rescaling).
//! The base weight never gets a gradient (see `ops::frozen_linear`). A LoRA adapter (or
//! LoRA-Dash, dash term included) runs fused with the base product in
//! `ops::lora_dash_linear`, which keeps one output buffer instead of five (seven) per layer.
//! DoRA rescales the whole output, so it gets the input and the weight (`ops::dora_linear`).

use candle_core::{DType, Tensor, Var};

use crate::adapters::Adapter;
use crate::error::Result;
use crate::models::Ctx;
use crate::ops::DashTerm;

pub struct Linear {
    /// Module path as in the Hugging Face checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// (out, in)
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<Adapter>,
}

impl Linear {
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            path: path.into(),
            weight,
            bias,
            adapter: None,
        }
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x (.., in) → (.., out)
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has rank >= 1");
        let x2 = x.reshape(((), in_dim))?; // (n, in)
        let y = match (&self.adapter, &self.bias) {
            (Some(Adapter::Dora(d)), bias) => {
                let y = d.forward(&x2, &self.weight, ctx)?;
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            // The op itself takes its fused kernel or the composed reference.
            (Some(a @ (Adapter::Lora(_) | Adapter::Dash(_) | Adapter::Pissa(_))), _) => {
                self.fused_lora_forward(&x2, a, ctx)?
            }
            _ => {
                // (n, out), the bias written before the product accumulates.
                let mut y = crate::ops::frozen_linear_bias(&x2, &self.weight, self.bias.as_ref())?;
                if let Some(a) = &self.adapter {
                    y = (y + a.forward(&x2, ctx)?)?;
                }
                y
            }
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim();
        Ok(y.reshape(out_dims)?)
    }

    /// x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ, plus the dash term x·V_s·diag(c)·U_sᵀ (on the
    /// undropped input) for LoRA-Dash, in one op. `x` is (n, in).
    fn fused_lora_forward(&self, x: &Tensor, adapter: &Adapter, ctx: &Ctx) -> Result<Tensor> {
        let Some(lora) = adapter.as_lora() else {
            return Err(crate::error::Error::msg(format!(
                "{}: adapter has no LoRA factors",
                self.path
            )));
        };
        let dash = adapter.as_dash();
        let (p, seed) = ctx.dropout_seed(lora.dropout);
        let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
        // Frozen factors (LoRA-Dash with freeze_ab) are detached so the op skips dA and dB.
        let (a, b) = match dash {
            Some(d) if d.freeze_ab => (a.detach(), b.detach()),
            _ => (a.clone(), b.clone()),
        };
        let dash = dash.map(|d| DashTerm {
            u_s: &d.u_s,
            v_s: &d.v_s,
            c: d.c.as_tensor(),
        });
        crate::ops::lora_dash_linear_bias(
            x,
            &self.weight,
            self.bias.as_ref(),
            &a,
            &b,
            lora.scale,
            p,
            seed,
            dash,
        )
        // (n, out)
    }

    /// Trainable tensors with their full PEFT-style names (`<path>.lora_A.weight`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.adapter
            .as_ref()
            .map(|a| {
                a.vars()
                    .into_iter()
                    .map(|(n, v)| (format!("{}.{n}", self.path), v))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// W + ΔW of the adapter (W alone without one).
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.weight.to_dtype(DType::F32)?;
        match &self.adapter {
            Some(Adapter::Dora(d)) => d.merged_weight(&w),
            Some(a) => Ok((&w + a.delta_weight()?)?),
            None => Ok(w),
        }
    }

    /// The hash that identifies this layer's base weight in saved adapters: that of the f32
    /// weight as read, also when `--dtype` stores it in half precision
    /// (`tsd::svd::base_hash`).
    pub fn base_hash(&self) -> Result<String> {
        crate::tsd::svd::base_hash(&self.weight)
    }
}
