//! LoRA-Dash's dash phase (Si et al., ICLR 2025, §4): on top of LoRA, s trainable scalars c
//! along the frozen task-specific directions (u_i, v_i) of W, i.e.
//! ΔW = s_lora·B·A + U_s·diag(c)·V_sᵀ. The dash term is not scaled and, as written in the
//! method's definition, takes the input without dropout.

use candle_core::{DType, Tensor, Var};

use crate::adapters::LoraLayer;
use crate::error::Result;

pub struct DashLayer {
    pub lora: LoraLayer,
    /// (out, s), frozen
    pub u_s: Tensor,
    /// (in, s), frozen
    pub v_s: Tensor,
    /// (s), trainable, starts at 0
    pub c: Var,
    /// Indices of the selected directions in W's spectrum (descending σ).
    pub indices: Vec<usize>,
    /// When true, A and B no longer train.
    pub freeze_ab: bool,
}

impl DashLayer {
    pub fn new(
        lora: LoraLayer,
        u_s: Tensor,
        v_s: Tensor,
        indices: Vec<usize>,
        freeze_ab: bool,
    ) -> Result<Self> {
        let s = indices.len();
        let c = Var::from_tensor(&Tensor::zeros(s, DType::F32, u_s.device())?)?;
        Ok(DashLayer {
            lora,
            u_s,
            v_s,
            c,
            indices,
            freeze_ab,
        })
    }

    pub fn s(&self) -> usize {
        self.indices.len()
    }

    /// x·V_s·diag(c)·U_sᵀ for x (n, in) → (n, out), as two thin products.
    pub fn dash_forward(&self, x: &Tensor) -> Result<Tensor> {
        let xv = x.matmul(&self.v_s)?; // (n, s)
        let xvc = xv.broadcast_mul(self.c.as_tensor())?; // (n, s)
        Ok(xvc.matmul(&self.u_s.t()?)?) // (n, out)
    }

    /// U_s·diag(c)·V_sᵀ, (out, in).
    pub fn dash_delta(&self) -> Result<Tensor> {
        Ok(self
            .u_s
            .broadcast_mul(self.c.as_tensor())?
            .matmul(&self.v_s.t()?)?)
    }

    /// The whole update: s·B·A + U_s·diag(c)·V_sᵀ.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.lora.delta_weight()? + self.dash_delta()?)?)
    }

    /// The same update as a plain LoRA of rank r+s with scale 1:
    /// B' = [s·B | U_s·diag(c)] (out, r+s), A' = [A; V_sᵀ] (r+s, in).
    pub fn export_lora(&self) -> Result<(Tensor, Tensor)> {
        let b_scaled = (self.lora.b.as_tensor() * self.lora.scale)?;
        let uc = self.u_s.broadcast_mul(self.c.as_tensor())?;
        let b2 = Tensor::cat(&[&b_scaled, &uc], 1)?;
        let a2 = Tensor::cat(&[self.lora.a.as_tensor(), &self.v_s.t()?.contiguous()?], 0)?;
        Ok((a2, b2))
    }
}
