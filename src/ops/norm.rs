//! RMSNorm (Zhang & Sennrich 2019, as in LLaMA / Hugging Face `LlamaRMSNorm`):
//! `y = x / sqrt(mean(x²) + eps) * w` over the last dim, with gradients for `x` and `w`.
//!
//! With `r = 1 / sqrt(mean(x²) + eps)`, `x̂ = x r` and `g = dy ⊙ w`, the backward is
//! `dx = r (g - x̂ · mean(g ⊙ x̂))` and `dw = Σ_rows dy ⊙ x̂`. Rows are independent, so both
//! directions run row-parallel; `dw` is reduced from per-task partial sums.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dot_f32, f32_data, is_cpu_f32, map_rows, rows_per_task, simd, CResult};
use crate::error::{Error, Result};

/// `x (.., d)` normalised over `d` and scaled by `w (d)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if x.rank() == 0 || w.dims() != [d] {
        return Err(Error::ShapeMismatch {
            name: "rms_norm weight".into(),
            expected: vec![d],
            got: w.dims().to_vec(),
        });
    }
    if !(is_cpu_f32(x) && is_cpu_f32(w)) {
        return super::reference::rms_norm(x, w, eps);
    }
    Ok(x.apply_op2(w, RmsNorm { eps: eps as f32 })?)
}

/// `1 / sqrt(mean(row²) + eps)`.
#[inline(always)]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss = dot_f32(row, row);
    (1.0 / (ss / row.len() as f64 + eps as f64).sqrt()) as f32
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, "rms-norm")?;
        let w = f32_data(s2, l2, "rms-norm")?;
        let d = w.len();
        let mut out = crate::ops::cpu::zeros(x.len());
        map_rows(&mut out, &x, d, |o, x| {
            let r = inv_rms(x, self.eps);
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w.iter()) {
                *o = x * r * w;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let need_w = w.track_op();
        let bwd = RmsNormBwd {
            eps: self.eps,
            need_w,
        };
        // Packed output: dx (x.elem_count()) followed by dw (d) when needed.
        let packed = x.apply_op3_no_bwd(w, grad, &bwd)?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = if need_w {
            Some(packed.narrow(0, n, w.elem_count())?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

struct RmsNormBwd {
    eps: f32,
    need_w: bool,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
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
        let x = f32_data(s1, l1, "rms-norm-bwd")?;
        let w = f32_data(s2, l2, "rms-norm-bwd")?;
        let dy = f32_data(s3, l3, "rms-norm-bwd")?;
        let d = w.len();
        let n = x.len();
        let mut out = crate::ops::cpu::zeros(n + if self.need_w { d } else { 0 });
        if d == 0 {
            let len = out.len();
            return Ok((CpuStorage::F32(out), Shape::from(len)));
        }
        let (dx, dw_out) = out.split_at_mut(n);
        let chunk = d * rows_per_task(d);
        let need_w = self.need_w;
        let dw: Vec<f64> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
            .fold(
                || vec![0f64; if need_w { d } else { 0 }],
                |mut dw, (dx, (x, dy))| {
                    simd(
                        #[inline(always)]
                        || {
                            for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d))
                            {
                                let r = inv_rms(x, self.eps);
                                // g = dy ⊙ w is staged in dx; mean(g ⊙ x̂) = r · (g · x) / d
                                for i in 0..d {
                                    dx[i] = dy[i] * w[i];
                                }
                                let mean = (dot_f32(dx, x) * r as f64 / d as f64) as f32;
                                for i in 0..d {
                                    dx[i] = r * (dx[i] - x[i] * r * mean);
                                }
                                if need_w {
                                    for i in 0..d {
                                        dw[i] += (dy[i] * x[i] * r) as f64;
                                    }
                                }
                            }
                        },
                    );
                    dw
                },
            )
            .reduce(
                || vec![0f64; if need_w { d } else { 0 }],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        for (o, v) in dw_out.iter_mut().zip(&dw) {
            *o = *v as f32;
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_rel_diff, randn};
    use crate::ops::reference;
    use candle_core::Var;

    #[test]
    fn matches_reference_values_and_both_gradients() -> Result<()> {
        let x = Var::from_tensor(&randn(&[2, 7, 48], 11)?)?;
        let w = Var::from_tensor(&(randn(&[48], 12)? + 1.0)?)?;
        let eps = 1e-5;
        let y = rms_norm(x.as_tensor(), w.as_tensor(), eps)?;
        let y_ref = reference::rms_norm(x.as_tensor(), w.as_tensor(), eps)?;
        let d = max_rel_diff(&y, &y_ref)?;
        println!("rms_norm forward max rel diff = {d:e}");
        assert!(d < 1e-5);
        let proj = randn(&[2, 7, 48], 13)?;
        let g = (y * &proj)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
        for (name, v) in [("dx", &x), ("dw", &w)] {
            let d = max_rel_diff(g.get(v).expect("grad"), g_ref.get(v).expect("ref grad"))?;
            println!("rms_norm {name} max rel diff = {d:e}");
            assert!(d < 1e-5, "{name}: {d}");
        }
        Ok(())
    }

    #[test]
    fn frozen_weight_and_strided_input() -> Result<()> {
        // x seen through a transpose: (6, 4, 32) -> (4, 6, 32) with a non-unit row stride.
        let x0 = Var::from_tensor(&randn(&[6, 4, 32], 14)?)?;
        let w = randn(&[32], 15)?;
        let y = rms_norm(&x0.as_tensor().transpose(0, 1)?, &w, 1e-6)?;
        let y_ref = reference::rms_norm(&x0.as_tensor().transpose(0, 1)?, &w, 1e-6)?;
        let d = max_rel_diff(&y, &y_ref)?;
        println!("rms_norm strided forward max rel diff = {d:e}");
        assert!(d < 1e-5);
        let g = y.sqr()?.sum_all()?.backward()?;
        let g_ref = y_ref.sqr()?.sum_all()?.backward()?;
        assert!(g.get(&w).is_none());
        let d = max_rel_diff(g.get(&x0).expect("dx"), g_ref.get(&x0).expect("dx ref"))?;
        println!("rms_norm strided dx max rel diff = {d:e}");
        assert!(d < 1e-5);
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let x = randn(&[3, 16], 16)?;
        let w = (randn(&[16], 17)? + 1.0)?;
        let rep = finite_difference_check(
            "rms_norm",
            |t: &[Tensor]| rms_norm(&t[0], &t[1], 1e-5),
            &[x, w],
            &[0, 1],
            1e-2,
        )?;
        rep.assert_within(5e-4);
        Ok(())
    }
}
