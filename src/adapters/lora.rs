//! LoRA (Hu et al., 2021) with PEFT's semantics: ΔW = s·B·A with s = α/r, or α/√r for
//! rsLoRA; A kaiming-uniform (a = √5, as `nn.Linear`), B zero; dropout on the input of A.

use candle_core::{Device, Tensor, Var};

use crate::error::Result;
use crate::rng::Rng;

/// One adapted layer's LoRA factors.
pub struct LoraLayer {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

impl LoraLayer {
    /// PEFT's default init: A ~ U(-1/√in, 1/√in) (kaiming_uniform with a=√5), B = 0.
    pub fn init(
        in_dim: usize,
        out_dim: usize,
        r: usize,
        scale: f64,
        dropout: f32,
        rng: &mut Rng,
        dev: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a = Tensor::from_vec(rng.uniform_vec(r * in_dim, -bound, bound), (r, in_dim), dev)?;
        let b = Tensor::zeros((out_dim, r), candle_core::DType::F32, dev)?;
        Ok(LoraLayer {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale,
            dropout,
        })
    }

    pub fn from_tensors(a: &Tensor, b: &Tensor, scale: f64, dropout: f32) -> Result<Self> {
        Ok(LoraLayer {
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            scale,
            dropout,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// s·(x·Aᵀ)·Bᵀ for x (n, in) → (n, out). `x` is already dropped out.
    pub fn delta_forward(&self, x: &Tensor) -> Result<Tensor> {
        let xa = x.matmul(&self.a.as_tensor().t()?)?; // (n, r)
        let xab = xa.matmul(&self.b.as_tensor().t()?)?; // (n, out)
        Ok((xab * self.scale)?)
    }

    /// ΔW = s·B·A, (out, in).
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}

/// PEFT's scaling factor.
pub fn lora_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}
