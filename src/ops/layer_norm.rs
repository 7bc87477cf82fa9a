//! LayerNorm (Ba et al. 2016, as `torch.nn.LayerNorm` with an affine weight and bias):
//! `y = (x - mean) / sqrt(var + eps) * w + b` over the last dim, with the biased variance
//! `var = mean((x - mean)²)`, and gradients for `x`, `w` and `b`.
//!
//! With `r = 1 / sqrt(var + eps)`, `x̂ = (x - mean) r` and `g = dy ⊙ w`, the backward is
//! `dx = r (g - mean(g) - x̂ · mean(g ⊙ x̂))`, `dw = Σ_rows dy ⊙ x̂` and `db = Σ_rows dy`.
//! The row statistics are recomputed in backward rather than stored; rows run in
//! parallel and `dw`, `db` are reduced from per-task partial sums.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dot_f32, f32_data, is_cpu_f32, map_rows, rows_per_task, simd, sum_f32, CResult};
use crate::error::{Error, Result};

/// `x (.., e)` normalised over `e`, scaled by `w (e)` and shifted by `b (e)`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let e = x.dims().last().copied().unwrap_or(0);
    for (name, p) in [("layer_norm weight", w), ("layer_norm bias", b)] {
        if x.rank() == 0 || p.dims() != [e] {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                expected: vec![e],
                got: p.dims().to_vec(),
            });
        }
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::msg(format!("layer_norm: eps {eps} must be >= 0")));
    }
    if !(is_cpu_f32(x) && is_cpu_f32(w) && is_cpu_f32(b)) {
        return super::reference::layer_norm(x, w, b, eps);
    }
    Ok(x.apply_op3(w, b, LayerNorm { eps })?)
}

/// Sum with f64 accumulators in independent lanes (vectorisable, unlike one running sum).
#[inline(always)]
fn sum_f64(x: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Writes `x - mean(x)` into `centered`; returns `1 / sqrt(var + eps)`.
#[inline(always)]
fn center(x: &[f32], centered: &mut [f32], eps: f64) -> f32 {
    let n = x.len() as f64;
    // Summed and subtracted in f64: an f32 mean is off by up to an ulp of the row's sum,
    // which is large against the spread of a row far from zero.
    let mean = sum_f64(x) / n;
    for (c, &x) in centered.iter_mut().zip(x) {
        *c = (x as f64 - mean) as f32;
    }
    let var = dot_f32(centered, centered) / n;
    (1.0 / (var + eps).sqrt()) as f32
}

struct LayerNorm {
    eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let x = f32_data(s1, l1, "layer-norm")?;
        let w = f32_data(s2, l2, "layer-norm")?;
        let b = f32_data(s3, l3, "layer-norm")?;
        let e = w.len();
        let mut out = crate::ops::cpu::zeros(x.len());
        map_rows(&mut out, &x, e, |o, x| {
            let r = center(x, o, self.eps);
            for ((o, &w), &b) in o.iter_mut().zip(w.iter()).zip(b.iter()) {
                *o = *o * r * w + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_w, need_b) = (x.track_op(), w.track_op(), b.track_op());
        let bwd = LayerNormBwd {
            eps: self.eps,
            need_x,
            need_wb: need_w || need_b,
        };
        // Packed output: dx (x.elem_count()), then dw (e), then db (e).
        let packed = x.apply_op3_no_bwd(w, grad, &bwd)?;
        let (n, e) = (x.elem_count(), w.elem_count());
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, e)?;
        let db = packed.narrow(0, n + e, e)?;
        Ok((
            need_x.then_some(dx),
            need_w.then_some(dw),
            need_b.then_some(db),
        ))
    }
}

/// `(x, w, dy) -> [dx, dw, db]` packed flat; the parts not asked for stay zero.
struct LayerNormBwd {
    eps: f64,
    need_x: bool,
    need_wb: bool,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bwd"
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
        let x = f32_data(s1, l1, "layer-norm-bwd")?;
        let w = f32_data(s2, l2, "layer-norm-bwd")?;
        let dy = f32_data(s3, l3, "layer-norm-bwd")?;
        let e = w.len();
        let n = x.len();
        let mut out = crate::ops::cpu::zeros(n + 2 * e);
        if e == 0 {
            return Ok((CpuStorage::F32(out), Shape::from(n + 2 * e)));
        }
        let (dx, dwb_out) = out.split_at_mut(n);
        let chunk = e * rows_per_task(e);
        let (need_x, need_wb) = (self.need_x, self.need_wb);
        let acc_len = if need_wb { 2 * e } else { 0 };
        // Per-task partial sums: dw in [..e], db in [e..].
        let dwb: Vec<f64> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
            .fold(
                || vec![0f64; acc_len],
                |mut acc, (dx, (x, dy))| {
                    let mut xhat = crate::ops::cpu::zeros(e);
                    let mut g = crate::ops::cpu::zeros(e);
                    simd(
                        #[inline(always)]
                        || {
                            for ((dx, x), dy) in dx.chunks_mut(e).zip(x.chunks(e)).zip(dy.chunks(e))
                            {
                                let r = center(x, &mut xhat, self.eps);
                                xhat.iter_mut().for_each(|v| *v *= r);
                                if need_wb {
                                    let (dw, db) = acc.split_at_mut(e);
                                    for i in 0..e {
                                        dw[i] += (dy[i] * xhat[i]) as f64;
                                        db[i] += dy[i] as f64;
                                    }
                                }
                                if need_x {
                                    for i in 0..e {
                                        g[i] = dy[i] * w[i];
                                    }
                                    let mean_g = (sum_f32(&g) / e as f64) as f32;
                                    let mean_gx = (dot_f32(&g, &xhat) / e as f64) as f32;
                                    for i in 0..e {
                                        dx[i] = r * (g[i] - mean_g - xhat[i] * mean_gx);
                                    }
                                }
                            }
                        },
                    );
                    acc
                },
            )
            .reduce(
                || vec![0f64; acc_len],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        for (o, v) in dwb_out.iter_mut().zip(&dwb) {
            *o = *v as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_rel_diff, randn};
    use crate::ops::reference;
    use candle_core::{DType, Var};

    /// Value and every gradient against the composed reference, for `x` built from the
    /// leaf by `x_of` (to reach strided layouts) and a shifted, scaled input (LayerNorm
    /// must be invariant to the shift; a naive one-pass variance is not).
    fn compare(
        leaf: &[usize],
        x_of: impl Fn(&Tensor) -> Result<Tensor>,
        label: &str,
    ) -> Result<()> {
        let e = *leaf.last().unwrap_or(&0);
        let x = Var::from_tensor(&((randn(leaf, 21)? * 3.0)? + 5.0)?)?;
        let w = Var::from_tensor(&(randn(&[e], 22)? + 1.0)?)?;
        let b = Var::from_tensor(&randn(&[e], 23)?)?;
        let xi = x_of(x.as_tensor())?;
        let eps = 1e-12;
        let y = layer_norm(&xi, w.as_tensor(), b.as_tensor(), eps)?;
        let y_ref = reference::layer_norm(&xi, w.as_tensor(), b.as_tensor(), eps)?;
        let d = max_rel_diff(&y, &y_ref)?;
        println!("layer_norm {label} forward max rel diff = {d:e}");
        assert!(d < 1e-5, "forward {d}");
        let proj = randn(y.dims(), 24)?;
        let g = (y * &proj)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
        for (name, v) in [("dx", &x), ("dw", &w), ("db", &b)] {
            let d = max_rel_diff(g.get(v).expect("grad"), g_ref.get(v).expect("ref grad"))?;
            println!("layer_norm {label} {name} max rel diff = {d:e}");
            assert!(d < 1e-5, "{name}: {d}");
        }
        Ok(())
    }

    #[test]
    fn matches_reference_values_and_all_gradients() -> Result<()> {
        compare(&[2, 7, 48], |x| Ok(x.clone()), "(2, 7, 48)")?;
        // 1000 rows of 33: several row chunks per task and an odd width.
        compare(&[1000, 33], |x| Ok(x.clone()), "(1000, 33)")?;
        // (6, 4, 32) -> (4, 6, 32) with a non-unit row stride.
        compare(&[6, 4, 32], |x| Ok(x.transpose(0, 1)?), "strided")?;
        compare(&[1, 3], |x| Ok(x.clone()), "(1, 3)")?;
        Ok(())
    }

    #[test]
    fn matches_f64_layer_norm_of_a_shifted_row() -> Result<()> {
        // Rows far from zero: the centered two-pass variance keeps full precision.
        let x = ((randn(&[3, 768], 25)? * 0.01)? + 100.0)?;
        let w = randn(&[768], 26)?;
        let b = randn(&[768], 27)?;
        let y = layer_norm(&x, &w, &b, 1e-5)?;
        let x64 = x.to_dtype(DType::F64)?;
        // f64 inputs take the composed path.
        let y64 = layer_norm(
            &x64,
            &w.to_dtype(DType::F64)?,
            &b.to_dtype(DType::F64)?,
            1e-5,
        )?;
        let d = max_rel_diff(&y.to_dtype(DType::F64)?, &y64)?;
        println!("layer_norm vs f64 reference (mean 100, std 0.006) max rel diff = {d:e}");
        assert!(d < 1e-6, "{d}");
        Ok(())
    }

    #[test]
    fn frozen_weight_and_bias_or_frozen_input() -> Result<()> {
        let x = Var::from_tensor(&randn(&[5, 16], 28)?)?;
        let w = randn(&[16], 29)?;
        let b = randn(&[16], 30)?;
        let y = layer_norm(x.as_tensor(), &w, &b, 1e-5)?;
        let y_ref = reference::layer_norm(x.as_tensor(), &w, &b, 1e-5)?;
        let g = y.sqr()?.sum_all()?.backward()?;
        let g_ref = y_ref.sqr()?.sum_all()?.backward()?;
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
        let d = max_rel_diff(g.get(&x).expect("dx"), g_ref.get(&x).expect("dx ref"))?;
        println!("layer_norm frozen w, b: dx max rel diff = {d:e}");
        assert!(d < 1e-5);

        // Only the bias trains (x and w frozen): one gradient, equal to Σ_rows dy.
        let x = randn(&[5, 16], 31)?;
        let b = Var::from_tensor(&randn(&[16], 32)?)?;
        let proj = randn(&[5, 16], 33)?;
        let g = (layer_norm(&x, &w, b.as_tensor(), 1e-5)? * &proj)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&x).is_none() && g.get(&w).is_none());
        let d = max_rel_diff(g.get(&b).expect("db"), &proj.sum(0)?)?;
        println!("layer_norm bias-only db vs Σ dy max rel diff = {d:e}");
        assert!(d < 1e-6);
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let x = randn(&[2, 8], 1)?;
        let w = randn(&[8], 2)?;
        assert!(matches!(
            layer_norm(&x, &randn(&[7], 3)?, &w, 1e-5),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            layer_norm(&x, &w, &randn(&[2, 8], 4)?, 1e-5),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(layer_norm(&x, &w, &w, -1.0).is_err());
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let x = randn(&[3, 16], 34)?;
        let w = (randn(&[16], 35)? + 1.0)?;
        let b = randn(&[16], 36)?;
        let rep = finite_difference_check(
            "layer_norm",
            |t: &[Tensor]| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            &[x, w, b],
            &[0, 1, 2],
            1e-2,
        )?;
        rep.assert_within(5e-4);
        Ok(())
    }
}
