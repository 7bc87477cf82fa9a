//! Fused element-wise ops: `silu(gate) * up` (the LLaMA MLP gate) and inverted dropout.
//!
//! candle's composed `gate.silu()? * up` stores the silu output and, in backward, rebuilds
//! `sigmoid(gate)` from four more element-wise passes plus the product rule's two; the
//! fused op does forward in one pass and backward in one pass. Dropout is a custom op so
//! that backward is one multiply by the kept mask (candle's `mul` would also form a
//! gradient for the mask).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{exp_f32, f32_data, is_cpu_f32, simd, CResult};
use super::lora_linear::MaskSpec;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Elements per rayon task for element-wise kernels.
const CHUNK: usize = 1 << 14;

/// `silu(gate) * up`, differentiable in both arguments.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(Error::ShapeMismatch {
            name: "silu_mul up".into(),
            expected: gate.dims().to_vec(),
            got: up.dims().to_vec(),
        });
    }
    if !(is_cpu_f32(gate) && is_cpu_f32(up)) {
        return super::reference::silu_mul(gate, up);
    }
    Ok(gate.apply_op2(up, SiluMul)?)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let g = f32_data(s1, l1, "silu-mul")?;
        let u = f32_data(s2, l2, "silu-mul")?;
        let mut out = crate::ops::cpu::zeros(g.len());
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                simd(
                    #[inline(always)]
                    || {
                        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                            *o = g * sigmoid(g) * u;
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let need_g = gate.track_op();
        let need_u = up.track_op();
        if !need_g && !need_u {
            return Ok((None, None));
        }
        // Packed (2, ..) output: [d gate, d up]; each half is narrowed back out as a view.
        let both = gate.apply_op3_no_bwd(up, grad, &SiluMulBwd)?;
        let n = gate.elem_count();
        let dg = both.narrow(0, 0, n)?.reshape(gate.shape())?;
        let du = both.narrow(0, n, n)?.reshape(gate.shape())?;
        Ok((need_g.then_some(dg), need_u.then_some(du)))
    }
}

struct SiluMulBwd;

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "silu-mul-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let g = f32_data(s1, l1, "silu-mul-bwd")?;
        let u = f32_data(s2, l2, "silu-mul-bwd")?;
        let dy = f32_data(s3, l3, "silu-mul-bwd")?;
        let n = g.len();
        let mut out = crate::ops::cpu::zeros(2 * n);
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(
                g.par_chunks(CHUNK)
                    .zip(u.par_chunks(CHUNK))
                    .zip(dy.par_chunks(CHUNK)),
            )
            .for_each(|((dg, du), ((g, u), dy))| {
                simd(
                    #[inline(always)]
                    || {
                        for i in 0..g.len() {
                            let s = sigmoid(g[i]);
                            let silu = g[i] * s;
                            // d silu / d g = s (1 + g (1 - s))
                            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                            du[i] = dy[i] * silu;
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

/// Inverted dropout: each element is kept with probability `1 - p` and scaled by
/// `1 / (1 - p)`. The mask is the counter-based one of the LoRA dropout
/// ([`super::lora_dropout_mask`]) over the tensor's rows (its last dimension), keyed by one
/// `rng.next_u64()`: a restored `Rng` replays it, the rows are drawn in parallel and the
/// backward regenerates the mask instead of storing it. Identity when `p == 0`.
pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::msg(format!(
            "dropout probability {p} is outside [0, 1)"
        )));
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let seed = rng.next_u64();
    let cols = x.dims().last().copied().unwrap_or(1).max(1);
    let rows = x.elem_count() / cols;
    if !is_cpu_f32(x) {
        let mask = super::lora_dropout_mask(rows, cols, p, seed);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        return Ok(x.mul(&mask)?);
    }
    Ok(x.apply_op1(Dropout {
        spec: MaskSpec::new(p, seed),
        cols,
    })?)
}

/// Multiplies each row (length `cols`) by its mask row; backward applies the same mask to
/// the gradient.
struct Dropout {
    spec: MaskSpec,
    cols: usize,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "dropout")?;
        let d = self.cols;
        if x.len() % d != 0 {
            return Err(candle_core::Error::Msg(
                "dropout: input size does not match the mask".into(),
            )
            .bt());
        }
        let mut out = super::cpu::zeros(x.len());
        let rows = super::cpu::rows_per_task(d);
        out.par_chunks_mut(d * rows)
            .zip(x.par_chunks(d * rows))
            .enumerate()
            .for_each(|(c, (o, x))| {
                for (i, (o, x)) in o.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                    self.spec.drop_row(c * rows + i, x, 1, o);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let same = Dropout {
            spec: self.spec,
            cols: self.cols,
        };
        Ok(Some(grad.apply_op1_no_bwd(&same)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_abs_diff, max_rel_diff, randn};
    use crate::ops::reference;
    use candle_core::{DType, Var};

    #[test]
    fn silu_mul_matches_reference_values_and_gradients() -> Result<()> {
        let g = Var::from_tensor(&(randn(&[4, 3, 40], 51)? * 4.0)?)?;
        let u = Var::from_tensor(&randn(&[3, 4, 40], 52)?)?;
        // `up` through a transpose so one argument is strided.
        let uv = u.as_tensor().transpose(0, 1)?;
        let y = silu_mul(g.as_tensor(), &uv)?;
        let y_ref = reference::silu_mul(g.as_tensor(), &uv)?;
        let d = max_rel_diff(&y, &y_ref)?;
        println!("silu_mul forward max rel diff = {d:e}");
        assert!(d < 1e-5);
        let proj = randn(&[4, 3, 40], 53)?;
        let gr = (y * &proj)?.sum_all()?.backward()?;
        let gr_ref = (y_ref * &proj)?.sum_all()?.backward()?;
        for (name, v) in [("d gate", &g), ("d up", &u)] {
            let d = max_rel_diff(gr.get(v).expect("grad"), gr_ref.get(v).expect("ref grad"))?;
            println!("silu_mul {name} max rel diff = {d:e}");
            assert!(d < 1e-5, "{name}: {d}");
        }
        Ok(())
    }

    #[test]
    fn silu_mul_skips_untracked_argument() -> Result<()> {
        let g = Var::from_tensor(&randn(&[5, 8], 54)?)?;
        let u = randn(&[5, 8], 55)?;
        let gr = silu_mul(g.as_tensor(), &u)?.sum_all()?.backward()?;
        assert!(gr.get(&u).is_none());
        assert!(gr.get(&g).is_some());
        Ok(())
    }

    #[test]
    fn silu_mul_finite_differences() -> Result<()> {
        let g = (randn(&[4, 6], 56)? * 3.0)?;
        let u = randn(&[4, 6], 57)?;
        let rep = finite_difference_check(
            "silu_mul",
            |t: &[Tensor]| silu_mul(&t[0], &t[1]),
            &[g, u],
            &[0, 1],
            1e-2,
        )?;
        rep.assert_within(5e-4);
        Ok(())
    }

    #[test]
    fn dropout_mask_is_seeded_scaled_and_used_in_backward() -> Result<()> {
        let x = Var::from_tensor(&(randn(&[64, 50], 58)? + 2.0)?)?; // all entries in [1, 3)
        let p = 0.3f32;
        let y = dropout(x.as_tensor(), p, &mut Rng::new(9))?;
        let y2 = dropout(x.as_tensor(), p, &mut Rng::new(9))?;
        assert_eq!(
            max_abs_diff(&y, &y2)?,
            0.0,
            "same seed must give the same mask"
        );

        // Mask equals the documented one: the LoRA dropout mask of one `next_u64()` seed.
        let expect = super::super::lora_dropout_mask(64, 50, p, Rng::new(9).next_u64());
        let expect = Tensor::from_vec(expect, (64, 50), x.device())?;
        let d = max_abs_diff(&y, &(x.as_tensor() * &expect)?)?;
        println!("dropout vs explicit mask max |diff| = {d:e}");
        assert!(d < 1e-6);
        let kept = expect
            .gt(0.0)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        println!("dropout kept fraction {kept} (expected {})", 1.0 - p);
        assert!((kept - (1.0 - p)).abs() < 0.03);

        let g = (y * 3.0)?.sum_all()?.backward()?;
        let d = max_abs_diff(g.get(&x).expect("dx"), &(expect * 3.0)?)?;
        println!("dropout dx vs 3·mask max |diff| = {d:e}");
        assert!(d < 1e-6);
        Ok(())
    }

    #[test]
    fn dropout_identity_at_zero_and_rejects_bad_p() -> Result<()> {
        let x = randn(&[3, 4], 59)?;
        let mut rng = Rng::new(1);
        let before = rng.clone();
        let y = dropout(&x, 0.0, &mut rng)?;
        assert_eq!(max_abs_diff(&x, &y)?, 0.0);
        assert_eq!(rng, before, "p = 0 must not consume randomness");
        assert!(dropout(&x, 1.0, &mut rng).is_err());
        assert!(dropout(&x, -0.1, &mut rng).is_err());
        Ok(())
    }
}
