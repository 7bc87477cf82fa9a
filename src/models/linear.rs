//! A frozen linear layer with an optional adapter: y = x·Wᵀ (+ b) + adapter(x).
//! The base weight never gets a gradient (see `ops::frozen_linear`).

use candle_core::{Tensor, Var};

use crate::adapters::Adapter;
use crate::error::Result;
use crate::models::Ctx;

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
        let mut y = crate::ops::frozen_linear(&x2, &self.weight)?; // (n, out)
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(a) = &self.adapter {
            y = (y + a.forward(&x2, ctx)?)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim();
        Ok(y.reshape(out_dims)?)
    }

    /// Trainable tensors with their full PEFT-style names (`<path>.lora_A.weight`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.adapter
            .as_ref()
            .map(|a| a.vars().into_iter().map(|(n, v)| (format!("{}.{n}", self.path), v)).collect())
            .unwrap_or_default()
    }

    /// W + ΔW of the adapter (W alone without one).
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.adapter {
            Some(a) => Ok((&self.weight + a.delta_weight()?)?),
            None => Ok(self.weight.clone()),
        }
    }
}
