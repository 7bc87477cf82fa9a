//! Cross-entropy of a frozen output projection, `mean CE(h·wᵀ, labels)`, without the
//! (n, v) logits: composed as `frozen_linear` + `cross_entropy`, a 1024-token batch of a
//! 49152-word vocabulary keeps 200 MB of logits for the backward and allocates as much
//! again for their gradient (plus candle's zero buffer for accumulating it).
//!
//! Here only rows whose label is not `IGNORE_INDEX` are projected, `CHUNK_ROWS` at a time
//! into one reused buffer. The output is a scalar, so its gradient only scales
//! `dh = (softmax - onehot) / count · w`: when `h` is tracked, the forward turns each
//! chunk's logits into that in place and accumulates `dh` right away (n·e floats kept for
//! the backward, which multiplies by the upstream gradient). Each chunk's logits are thus
//! formed once, where a backward that recomputed them would run a third vocabulary-sized
//! GEMM. `w` gets no gradient (it is frozen).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{
    exp_f32, i64_data, is_cpu_f32, is_cpu_weight, matmul_into, simd, weight_view, widened_weight,
    CResult, MatView,
};
use super::lora_linear::view;
use super::loss::{label_index, log_sum_exp};
use crate::error::{Error, Result};

/// Rows projected at once: the logits buffer is `CHUNK_ROWS · v` floats (25 MB for v =
/// 49152), large enough for the GEMM to run at full speed.
const CHUNK_ROWS: usize = 128;

/// Mean cross-entropy of `h (n, e) · wᵀ` with `w (v, e)` against `labels (n,)` (any
/// integer dtype, `IGNORE_INDEX` skipped; 0 when every label is ignored). Differentiable
/// in `h` only.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (_v, e) = w.dims2()?;
    let n = h.dims().first().copied().unwrap_or(0);
    if h.dims() != [n, e] {
        return Err(Error::ShapeMismatch {
            name: "linear_cross_entropy hidden".into(),
            expected: vec![n, e],
            got: h.dims().to_vec(),
        });
    }
    if labels.dims() != [n] {
        return Err(Error::ShapeMismatch {
            name: "linear_cross_entropy labels".into(),
            expected: vec![n],
            got: labels.dims().to_vec(),
        });
    }
    if !labels.dtype().is_int() {
        return Err(Error::msg(format!(
            "linear_cross_entropy labels must be integers, got {:?}",
            labels.dtype()
        )));
    }
    let labels = labels.to_dtype(DType::I64)?;
    if !(is_cpu_f32(h) && is_cpu_weight(w)) {
        return super::reference::linear_cross_entropy(h, w, &labels);
    }
    let op = LinearCrossEntropy {
        w: w.detach(),
        with_grad: h.track_op(),
        saved: Mutex::new(None),
    };
    Ok(h.apply_op2(&labels.to_device(h.device())?, op)?)
}

struct LinearCrossEntropy {
    w: Tensor,
    /// Form `dh` in the forward (the input is tracked, so a backward will want it).
    with_grad: bool,
    /// `dh` (n, e) for an upstream gradient of 1, left by the forward for the backward.
    saved: Mutex<Option<Vec<f32>>>,
}

/// The scored rows: (row, label) where the label is not ignored; an error names the first
/// label outside the vocabulary.
fn scored_rows(labels: &[i64], v: usize) -> CResult<Vec<(usize, usize)>> {
    let mut rows = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if let Some(l) = label_index(l, i, v)? {
            rows.push((i, l));
        }
    }
    Ok(rows)
}

/// `logits (len, v) = h[rows] · wᵀ` for one chunk of scored rows; `hbuf` holds the
/// gathered rows of `h` (len, e).
fn chunk_logits(
    h: MatView,
    w: MatView,
    rows: &[(usize, usize)],
    hbuf: &mut Vec<f32>,
    logits: &mut Vec<f32>,
) {
    let (e, v, len) = (h.cols, w.rows, rows.len());
    hbuf.resize(len * e, 0.0);
    for (dst, &(r, _)) in hbuf.chunks_mut(e.max(1)).zip(rows) {
        for (j, d) in dst.iter_mut().enumerate() {
            *d = h.data[r * h.rs + j * h.cs];
        }
    }
    logits.resize(len * v, 0.0);
    matmul_into(logits, MatView::rows(hbuf, len, e), w.t(), 1.0, false, true);
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let h = view(s1, l1, "linear-cross-entropy h")?;
        let labels = i64_data(s2, l2, "linear-cross-entropy")?;
        let widened = widened_weight(&self.w)?;
        let (ws, wl) = self.w.storage_and_layout();
        let w = weight_view(&widened, &ws, wl, "linear-cross-entropy w")?;
        let (n, e, v) = (h.rows, h.cols, w.rows);
        let rows = scored_rows(&labels, v)?;
        // d mean / d logit = (softmax - onehot) / count on scored rows.
        let inv_count = if rows.is_empty() {
            0.0
        } else {
            1.0 / rows.len() as f32
        };
        let mut dh = self.with_grad.then(|| crate::ops::cpu::zeros(n * e));
        let mut total = 0f64;
        let (mut hbuf, mut logits, mut dchunk) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in rows.chunks(CHUNK_ROWS) {
            chunk_logits(h, w, chunk, &mut hbuf, &mut logits);
            let with_grad = dh.is_some();
            let losses: Vec<f64> = logits
                .par_chunks_mut(v.max(1))
                .zip(chunk.par_iter())
                .map(|(row, &(_, l))| {
                    let z = simd(
                        #[inline(always)]
                        || log_sum_exp(row),
                    );
                    let loss = (z - row[l]) as f64;
                    if with_grad {
                        // In place: logits -> dlogits.
                        simd(
                            #[inline(always)]
                            || {
                                for x in row.iter_mut() {
                                    *x = inv_count * exp_f32(*x - z);
                                }
                            },
                        );
                        row[l] -= inv_count;
                    }
                    loss
                })
                .collect();
            total += losses.iter().sum::<f64>();
            if let Some(dh) = dh.as_mut() {
                dchunk.resize(chunk.len() * e, 0.0);
                matmul_into(
                    &mut dchunk,
                    MatView::rows(&logits, chunk.len(), v),
                    w,
                    1.0,
                    false,
                    true,
                );
                for (src, &(r, _)) in dchunk.chunks(e.max(1)).zip(chunk) {
                    dh[r * e..(r + 1) * e].copy_from_slice(src);
                }
            }
        }
        let mean = if rows.is_empty() {
            0.0
        } else {
            total / rows.len() as f64
        };
        if let Ok(mut saved) = self.saved.lock() {
            *saved = dh;
        }
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        _labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        if !h.track_op() {
            return Ok((None, None));
        }
        let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let g = g.first().copied().unwrap_or(0.0);
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("linear_cross_entropy: poisoned state".into()))?;
        let Some(dh) = saved.as_ref() else {
            return Err(candle_core::Error::Msg(
                "linear_cross_entropy: backward without a forward gradient".into(),
            )
            .bt());
        };
        let dh: Vec<f32> = dh.iter().map(|&d| d * g).collect();
        Ok((Some(Tensor::from_vec(dh, h.dims2()?, &Device::Cpu)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_abs_diff, max_rel_diff, randn};
    use crate::ops::reference;
    use crate::ops::IGNORE_INDEX;
    use candle_core::Var;

    fn labels(v: &[i64]) -> Result<Tensor> {
        Ok(Tensor::new(v, &Device::Cpu)?)
    }

    #[test]
    fn matches_reference_value_and_gradient() -> Result<()> {
        // n = 300 spans three chunks, the last one partial.
        let n = 300;
        let h = Var::from_tensor(&randn(&[n, 24], 61)?)?;
        let w = (randn(&[53, 24], 62)? * 2.0)?;
        let lab: Vec<i64> = (0..n)
            .map(|i| {
                if i % 7 == 3 {
                    IGNORE_INDEX
                } else {
                    (i * 13 % 53) as i64
                }
            })
            .collect();
        let y = labels(&lab)?;
        let l = linear_cross_entropy(h.as_tensor(), &w, &y)?;
        let l_ref = reference::linear_cross_entropy(h.as_tensor(), &w, &y)?;
        let d = max_rel_diff(&l, &l_ref)?;
        println!(
            "linear_cross_entropy loss {} vs reference {} (rel diff {d:e})",
            l.to_scalar::<f32>()?,
            l_ref.to_scalar::<f32>()?
        );
        assert!(d < 1e-5);
        assert_eq!(l.dims(), &[] as &[usize]);
        // Untracked input: no gradient is formed, the value is the same.
        let l_plain = linear_cross_entropy(&h.as_tensor().detach(), &w, &y)?;
        assert_eq!(l_plain.to_scalar::<f32>()?, l.to_scalar::<f32>()?);
        let g = (l * 2.5)?.backward()?;
        let g_ref = (l_ref * 2.5)?.backward()?;
        let dh = g.get(&h).expect("dh");
        let d = max_rel_diff(dh, g_ref.get(&h).expect("dh ref"))?;
        println!("linear_cross_entropy dh max rel diff = {d:e}");
        assert!(d < 1e-5);
        assert_eq!(
            dh.get(3)?.abs()?.sum_all()?.to_scalar::<f32>()?,
            0.0,
            "ignored row"
        );
        Ok(())
    }

    #[test]
    fn strided_hidden_and_weight() -> Result<()> {
        let h0 = Var::from_tensor(&randn(&[16, 10], 63)?)?; // h = h0ᵀ (10, 16), strided
        let wt = randn(&[16, 29], 64)?; // w = wtᵀ (29, 16), strided
        let w = wt.t()?;
        let y = labels(&[0, 28, 5, -100, 7, 7, 1, 2, 3, 4])?;
        let l = linear_cross_entropy(&h0.as_tensor().t()?, &w, &y)?;
        let l_ref = reference::linear_cross_entropy(&h0.as_tensor().t()?, &w.contiguous()?, &y)?;
        let d = max_rel_diff(&l, &l_ref)?;
        println!("linear_cross_entropy strided loss rel diff = {d:e}");
        assert!(d < 1e-5);
        let d = max_rel_diff(
            l.backward()?.get(&h0).expect("dh"),
            l_ref.backward()?.get(&h0).expect("dh ref"),
        )?;
        println!("linear_cross_entropy strided dh rel diff = {d:e}");
        assert!(d < 1e-5);
        Ok(())
    }

    #[test]
    fn all_ignored_gives_zero_loss_and_zero_grad() -> Result<()> {
        let h = Var::from_tensor(&randn(&[4, 9], 65)?)?;
        let w = randn(&[11, 9], 66)?;
        let l = linear_cross_entropy(h.as_tensor(), &w, &labels(&[IGNORE_INDEX; 4])?)?;
        assert_eq!(l.to_scalar::<f32>()?, 0.0);
        let g = l.backward()?;
        let total = g
            .get(&h)
            .expect("dh")
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        println!("linear_cross_entropy all-ignored: loss 0, sum |dh| = {total}");
        assert_eq!(total, 0.0);
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let h = randn(&[6, 8], 67)?;
        let w = (randn(&[13, 8], 68)? * 2.0)?;
        let y = labels(&[0, 12, -100, 7, 3, 3])?;
        let rep = finite_difference_check(
            "linear_cross_entropy",
            |t: &[Tensor]| linear_cross_entropy(&t[0], &w, &y),
            &[h],
            &[0],
            1e-2,
        )?;
        rep.assert_within(5e-4);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let h = randn(&[2, 5], 69)?;
        let w = randn(&[7, 5], 70)?;
        assert!(linear_cross_entropy(&h, &w, &labels(&[1, 7])?).is_err());
        assert!(linear_cross_entropy(&h, &w, &labels(&[-1, 0])?).is_err());
        assert!(matches!(
            linear_cross_entropy(&h, &w, &labels(&[1])?),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            linear_cross_entropy(&h, &randn(&[7, 4], 71)?, &labels(&[1, 2])?),
            Err(Error::ShapeMismatch { .. })
        ));
        // Weight never gets a gradient, even as a Var.
        let wv = Var::from_tensor(&w)?;
        let hv = Var::from_tensor(&h)?;
        let g =
            linear_cross_entropy(hv.as_tensor(), wv.as_tensor(), &labels(&[1, 2])?)?.backward()?;
        assert!(g.get(&wv).is_none());
        let d = max_abs_diff(
            g.get(&hv).expect("dh"),
            reference::linear_cross_entropy(hv.as_tensor(), &w, &labels(&[1, 2])?)?
                .backward()?
                .get(&hv)
                .expect("dh ref"),
        )?;
        println!("linear_cross_entropy dh with Var weight max |diff| = {d:e}");
        assert!(d < 1e-6);
        Ok(())
    }
}
