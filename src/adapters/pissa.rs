//! PiSSA (Meng et al., 2024) and MiLoRA (Wang et al., 2024): LoRA whose factors start from
//! r singular triplets of the frozen weight, with the base replaced by the residual.
//!
//! As PEFT 0.13's `LoraLayer.pissa_init` (`init_lora_weights="pissa"`): with the thin SVD
//! W = U·diag(σ)·Vᵀ and the LoRA scale s folded into σ,
//!   A₀ = diag(√(σ_r/s))·V_rᵀ (r, in),  B₀ = U_r·diag(√(σ_r/s)) (out, r),
//!   W_res = W − (s·B₀)·A₀,
//! so the initial model is the base model up to rounding. PiSSA takes the r largest
//! triplets; MiLoRA the r smallest (PEFT 0.13 has no MiLoRA init; this is PiSSA's recipe
//! with the minor components, as the MiLoRA paper defines it). Training then is plain LoRA
//! on W_res, fused in `ops::lora_linear` like LoRA.
//!
//! The frozen initial factors are kept: the update relative to the original W is
//! ΔW = s·(B·A − B₀·A₀), which `io::pissa` exports as a rank-2r PEFT LoRA
//! (PEFT's `subtract_mutated_init`).

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adapters::LoraLayer;
use crate::error::{Error, Result};
use crate::tsd::svd::{weight_hash, Svd};

/// Which singular triplets seed the factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SvdInit {
    /// PiSSA: the r largest.
    Pissa,
    /// MiLoRA: the r smallest.
    Milora,
}

impl SvdInit {
    pub fn name(self) -> &'static str {
        match self {
            SvdInit::Pissa => "pissa",
            SvdInit::Milora => "milora",
        }
    }

    /// Indices of the r triplets this init takes from a spectrum of k (descending σ).
    pub fn indices(self, r: usize, k: usize) -> Vec<usize> {
        match self {
            SvdInit::Pissa => (0..r).collect(),
            SvdInit::Milora => (k - r..k).collect(),
        }
    }
}

/// One adapted layer: trainable A, B on the residual base, and the frozen A₀, B₀.
pub struct PissaLayer {
    pub lora: LoraLayer,
    /// (r, in), frozen
    pub a0: Tensor,
    /// (out, r), frozen
    pub b0: Tensor,
    pub init: SvdInit,
    /// Which triplets of W's spectrum (descending σ) seeded A₀, B₀.
    pub indices: Vec<usize>,
    /// Content hash of the original W (`tsd::svd::weight_hash`), the residual's provenance.
    pub base_hash: String,
}

/// Refuses a rank above min(out, in) of the layer at `path`.
pub fn check_rank(path: &str, r: usize, out_dim: usize, in_dim: usize) -> Result<()> {
    let k = out_dim.min(in_dim);
    if r > k {
        return Err(Error::config(
            "rank",
            format!(
                "--rank {r} exceeds min(out, in) = {k} of `{path}` ({out_dim}×{in_dim}); PiSSA/MiLoRA take r singular triplets of each target"
            ),
        ));
    }
    Ok(())
}

impl PissaLayer {
    /// Builds the layer from W's thin SVD; returns it with the residual W − (s·B₀)·A₀.
    pub fn init(
        w: &Tensor,
        svd: &Svd,
        init: SvdInit,
        r: usize,
        scale: f64,
        dropout: f32,
    ) -> Result<(Self, Tensor)> {
        let k = svd.k();
        if r > k {
            return Err(Error::config(
                "rank",
                format!("--rank {r} exceeds the {k} singular values of the weight"),
            ));
        }
        let indices = init.indices(r, k);
        let (u_r, v_r) = svd.columns(&indices)?; // (out, r), (in, r)
        let sq: Vec<f32> = indices
            .iter()
            .map(|&i| (svd.sigma[i] / scale as f32).sqrt())
            .collect();
        let sq = Tensor::from_vec(sq, r, w.device())?;
        let (u_r, v_r) = (u_r.to_device(w.device())?, v_r.to_device(w.device())?);
        let a0 = v_r.broadcast_mul(&sq)?.t()?.contiguous()?; // (r, in)
        let b0 = u_r.broadcast_mul(&sq)?.contiguous()?; // (out, r)
        let residual = residual_of(w, &a0, &b0, scale)?;
        let lora = LoraLayer::from_tensors(&a0, &b0, scale, dropout)?;
        Ok((
            PissaLayer {
                lora,
                a0,
                b0,
                init,
                indices,
                base_hash: weight_hash(w)?,
            },
            residual,
        ))
    }

    /// The layer from saved factors (A, B trained; A₀, B₀ the initial ones).
    pub fn from_parts(
        lora: LoraLayer,
        a0: Tensor,
        b0: Tensor,
        init: SvdInit,
        indices: Vec<usize>,
        base_hash: String,
    ) -> Self {
        PissaLayer {
            lora,
            a0,
            b0,
            init,
            indices,
            base_hash,
        }
    }

    /// The update relative to the original W as a plain LoRA of rank 2r with the same
    /// scale: A' = [A; A₀] (2r, in), B' = [B | −B₀] (out, 2r), so s·B'·A' = s·(B·A − B₀·A₀).
    pub fn export_lora(&self) -> Result<(Tensor, Tensor)> {
        let a2 = Tensor::cat(&[self.lora.a.as_tensor(), &self.a0], 0)?;
        let b2 = Tensor::cat(&[self.lora.b.as_tensor(), &self.b0.neg()?], 1)?;
        Ok((a2, b2))
    }

    pub fn vars(&self) -> [(&'static str, Var); 2] {
        [
            ("lora_A.weight", self.lora.a.clone()),
            ("lora_B.weight", self.lora.b.clone()),
        ]
    }
}

/// W − (s·B₀)·A₀ in PEFT's order of operations, (out, in).
pub fn residual_of(w: &Tensor, a0: &Tensor, b0: &Tensor, scale: f64) -> Result<Tensor> {
    let sb = (b0 * scale)?;
    Ok((w - sb.matmul(a0)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tsd::svd::thin_svd;
    use candle_core::Device;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn weight() -> Tensor {
        let mut rng = crate::rng::Rng::derive(3, "pissa");
        Tensor::from_vec(rng.uniform_vec(6 * 5, -1.0, 1.0), (6, 5), &Device::Cpu).unwrap()
    }

    /// The residual plus s·B₀·A₀ gives W back; the residual's spectrum is W's without the
    /// taken triplets (PiSSA: the top r gone; MiLoRA: the bottom r).
    #[test]
    fn residual_and_factors_split_the_spectrum() {
        let w = weight();
        let svd = thin_svd(&w, 1).unwrap();
        for (init, kept) in [(SvdInit::Pissa, 2..5), (SvdInit::Milora, 0..3)] {
            let (l, res) = PissaLayer::init(&w, &svd, init, 2, 0.5, 0.0).unwrap();
            let back = (&res + l.lora.delta_weight().unwrap()).unwrap();
            let d = max_abs(&(back - &w).unwrap());
            println!("{}: max |W_res + s·B₀A₀ − W| = {d:e}", init.name());
            assert!(d < 1e-5, "{d}");
            let rs = thin_svd(&res, 1).unwrap();
            let want: Vec<f32> = svd.sigma[kept].to_vec();
            let got: Vec<f32> = rs.sigma[..3].to_vec();
            let e = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            println!("{}: residual σ {got:?} vs {want:?}", init.name());
            assert!(e < 1e-5, "{e}");
            assert!(rs.sigma[3..].iter().all(|&s| s < 1e-5));
            let (a2, b2) = l.export_lora().unwrap();
            assert_eq!(a2.dims(), &[4, 5]);
            assert_eq!(b2.dims(), &[6, 4]);
            // Untrained: the export's update is zero.
            let z = max_abs(&b2.matmul(&a2).unwrap());
            assert!(z < 1e-5, "{z}");
        }
    }

    #[test]
    fn rank_above_the_spectrum_is_refused() {
        let w = weight();
        let svd = thin_svd(&w, 1).unwrap();
        let e = PissaLayer::init(&w, &svd, SvdInit::Pissa, 6, 1.0, 0.0)
            .err()
            .unwrap();
        assert!(e.to_string().contains("exceeds"), "{e}");
        let e = check_rank("q_proj", 6, 6, 5).unwrap_err();
        assert!(e.to_string().contains("min(out, in) = 5"), "{e}");
    }
}
