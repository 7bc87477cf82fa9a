//! DoRA (Liu et al., 2024) with PEFT 0.13's semantics (`use_dora=True`, `DoraLinearLayer`):
//! LoRA factors as PEFT initialises them, plus a trainable magnitude m (out) initialised to
//! the row norms ‖W + s·B·A‖ (= ‖W‖ with B = 0). The layer output is rescaled per row,
//! so DoRA is not an additive term: the `Linear` hands it its input and frozen weight
//! (`ops::dora_linear`), and merges with W' = (m / ‖W + s·B·A‖)_row ⊙ (W + s·B·A).
//! DoRA is defined here for plain linear layers only (no Conv, no fan-in-fan-out weights).

use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device, Tensor, Var};

use crate::adapters::LoraLayer;
use crate::error::Result;
use crate::models::Ctx;
use crate::ops::dora_linear::{dora_linear_with_norm, dora_weight_norm};
use crate::rng::Rng;

pub struct DoraLayer {
    pub lora: LoraLayer,
    /// (out), trainable
    pub m: Var,
    /// Outside training, the row norm with the A and B it was computed from: reused while
    /// both are bit-identical (checked on every call, O((in + out)·r)), so decoding does not
    /// redo the (out, in) pass for every token.
    norm_cache: Mutex<Option<NormCache>>,
}

struct NormCache {
    a: Vec<f32>,
    b: Vec<f32>,
    /// (out)
    norm: Tensor,
}

impl DoraLayer {
    /// PEFT's init: A, B as LoRA's, m = ‖W + s·B·A‖_row for `w (out, in)`.
    pub fn init(
        w: &Tensor,
        r: usize,
        scale: f64,
        dropout: f32,
        rng: &mut Rng,
        dev: &Device,
    ) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        let lora = LoraLayer::init(in_dim, out_dim, r, scale, dropout, rng, dev)?;
        let m = dora_weight_norm(w, lora.a.as_tensor(), lora.b.as_tensor(), scale)?;
        Ok(DoraLayer {
            lora,
            m: Var::from_tensor(&m)?,
            norm_cache: Mutex::new(None),
        })
    }

    pub fn from_tensors(lora: LoraLayer, m: &Tensor) -> Result<Self> {
        Ok(DoraLayer {
            lora,
            m: Var::from_tensor(m)?,
            norm_cache: Mutex::new(None),
        })
    }

    /// ‖W + s·B·A‖ per row (out), detached; cached outside training (see `norm_cache`).
    fn weight_norm(&self, w: &Tensor, train: bool) -> Result<Tensor> {
        let (a, b) = (self.lora.a.as_tensor(), self.lora.b.as_tensor());
        if train {
            return dora_weight_norm(w, a, b, self.lora.scale);
        }
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (ha, hb) = (host(a)?, host(b)?);
        let mut cache = self
            .norm_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = cache.as_ref().filter(|c| c.a == ha && c.b == hb) {
            return Ok(c.norm.clone());
        }
        let norm = dora_weight_norm(w, a, b, self.lora.scale)?;
        *cache = Some(NormCache {
            a: ha,
            b: hb,
            norm: norm.clone(),
        });
        Ok(norm)
    }

    /// The whole layer output (bias excluded) for `x (n, in)` and the frozen `w (out, in)`.
    pub fn forward(&self, x: &Tensor, w: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (p, seed) = ctx.dropout_seed(self.lora.dropout);
        let norm = self.weight_norm(w, ctx.train)?;
        dora_linear_with_norm(
            x,
            w,
            self.lora.a.as_tensor(),
            self.lora.b.as_tensor(),
            self.m.as_tensor(),
            &norm,
            self.lora.scale,
            p,
            seed,
        )
    }

    /// PEFT's merge: (m / ‖W + ΔW‖)_row ⊙ (W + ΔW) with ΔW = s·B·A, (out, in).
    pub fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        let v = (w + self.lora.delta_weight()?)?;
        let norm = dora_weight_norm(
            w,
            self.lora.a.as_tensor(),
            self.lora.b.as_tensor(),
            self.lora.scale,
        )?;
        let k = self.m.as_tensor().broadcast_div(&norm)?.unsqueeze(1)?; // (out, 1)
        Ok(v.broadcast_mul(&k)?)
    }

    pub fn vars(&self) -> [(&'static str, Var); 3] {
        [
            ("lora_A.weight", self.lora.a.clone()),
            ("lora_B.weight", self.lora.b.clone()),
            ("lora_magnitude_vector", self.m.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{max_rel_diff, randn};

    /// At init DoRA is the base layer; after changing A, B and m the merged weight gives the
    /// unmerged output.
    #[test]
    fn init_is_identity_and_merge_matches_forward() {
        let w = randn(&[6, 5], 1).unwrap();
        let x = randn(&[4, 5], 2).unwrap();
        let d = DoraLayer::init(&w, 2, 2.0, 0.0, &mut Rng::new(3), &Device::Cpu).unwrap();
        let ctx = Ctx::eval();
        let y0 = d.forward(&x, &w, &ctx).unwrap();
        let base = x.matmul(&w.t().unwrap()).unwrap();
        let e = max_rel_diff(&y0, &base).unwrap();
        println!("DoRA init vs base: {e:e}");
        assert!(e < 1e-6, "{e}");
        d.lora.b.set(&randn(&[6, 2], 4).unwrap()).unwrap();
        d.m.set(&(d.m.as_tensor() * 1.3).unwrap()).unwrap();
        // The eval-mode norm cache sees the new B: the result is the uncached computation's.
        let y = d.forward(&x, &w, &ctx).unwrap();
        let fresh = crate::ops::dora_linear(
            &x,
            &w,
            d.lora.a.as_tensor(),
            d.lora.b.as_tensor(),
            d.m.as_tensor(),
            2.0,
            0.0,
            0,
        )
        .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            fresh.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let merged = x
            .matmul(&d.merged_weight(&w).unwrap().t().unwrap())
            .unwrap();
        let e = max_rel_diff(&merged, &y).unwrap();
        println!("DoRA merged vs forward: {e:e}");
        assert!(e < 1e-5, "{e}");
    }
}
