//! Token-level cross-entropy, mean over positions whose label is not `IGNORE_INDEX`
//! (PyTorch `F.cross_entropy(ignore_index=-100)` semantics; 0 when every label is ignored).
//!
//! Memory: with n·v logits (1024 × 49152 floats is 200 MB) the forward keeps no softmax
//! or log-softmax copy, only the n per-row log-sum-exps, and the backward rebuilds
//! `softmax = exp(logit - lse)` straight into the gradient buffer:
//! `dlogits = g / count · (softmax - onehot(label))`, zero rows for ignored positions.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{exp_map, f32_data, i64_data, is_cpu_f32, row_max, simd, sum_exp, CResult};
use super::IGNORE_INDEX;
use crate::error::{Error, Result};

/// Mean cross-entropy of `logits (n, v)` f32 against `labels (n,)` (any integer dtype).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, _v) = logits.dims2()?;
    if labels.dims() != [n] {
        return Err(Error::ShapeMismatch {
            name: "cross_entropy labels".into(),
            expected: vec![n],
            got: labels.dims().to_vec(),
        });
    }
    if !labels.dtype().is_int() {
        return Err(Error::msg(format!(
            "cross_entropy labels must be integers, got {:?}",
            labels.dtype()
        )));
    }
    let labels = labels.to_dtype(DType::I64)?;
    if !is_cpu_f32(logits) {
        return super::reference::cross_entropy(logits, &labels);
    }
    Ok(logits.apply_op2(&labels.to_device(logits.device())?, CrossEntropy::default())?)
}

/// Per-row statistics the forward leaves for the backward.
#[derive(Default)]
struct Saved {
    /// log Σ exp(logits) per row (0 for ignored rows).
    lse: Arc<Vec<f32>>,
    /// Number of non-ignored rows.
    count: usize,
}

#[derive(Default)]
struct CrossEntropy {
    saved: Mutex<Option<Saved>>,
}

/// Checks one label against the vocabulary; `None` for an ignored position.
/// Shared with `linear_cross_entropy`, which scores the same rows without stored logits.
pub(super) fn label_index(label: i64, pos: usize, v: usize) -> CResult<Option<usize>> {
    if label == IGNORE_INDEX {
        return Ok(None);
    }
    if label < 0 || label as u64 >= v as u64 {
        return Err(candle_core::Error::Msg(format!(
            "cross_entropy: label {label} at position {pos} is outside the vocabulary (size {v}) and is not {IGNORE_INDEX}"
        ))
        .bt());
    }
    Ok(Some(label as usize))
}

/// log Σ exp(row), max-shifted.
#[inline(always)]
pub(super) fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row_max(row);
    if !max.is_finite() {
        return max;
    }
    max + sum_exp(row, max).ln() as f32
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, "cross-entropy")?;
        let labels = i64_data(s2, l2, "cross-entropy")?;
        let v = l1.dims()[1];
        let idx: Vec<Option<usize>> = labels
            .iter()
            .enumerate()
            .map(|(i, &l)| label_index(l, i, v))
            .collect::<CResult<_>>()?;
        let count = idx.iter().filter(|i| i.is_some()).count();
        let (lse, losses): (Vec<f32>, Vec<f64>) = if v == 0 {
            (vec![0.0; idx.len()], vec![0.0; idx.len()])
        } else {
            x.par_chunks(v)
                .zip(idx.par_iter())
                .map(|(row, l)| match l {
                    None => (0.0, 0.0),
                    Some(l) => {
                        let lse = simd(
                            #[inline(always)]
                            || log_sum_exp(row),
                        );
                        (lse, (lse - row[*l]) as f64)
                    }
                })
                .unzip()
        };
        let total: f64 = losses.iter().sum();
        let mean = if count == 0 {
            0.0
        } else {
            total / count as f64
        };
        if let Ok(mut saved) = self.saved.lock() {
            *saved = Some(Saved {
                lse: Arc::new(lse),
                count,
            });
        }
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (lse, count) = match self
            .saved
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| (s.lse.clone(), s.count)))
        {
            Some(s) => s,
            None => {
                return Err(candle_core::Error::Msg(
                    "cross_entropy: backward before forward".into(),
                )
                .bt())
            }
        };
        let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let g = g.first().copied().unwrap_or(0.0);
        let scale = if count == 0 { 0.0 } else { g / count as f32 };
        let d = logits.apply_op2_no_bwd(labels, &CrossEntropyBwd { lse, scale })?;
        Ok((Some(d), None))
    }
}

/// `(logits, labels) -> scale · (softmax - onehot)`, zero rows where ignored.
struct CrossEntropyBwd {
    lse: Arc<Vec<f32>>,
    scale: f32,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, "cross-entropy-bwd")?;
        let labels = i64_data(s2, l2, "cross-entropy-bwd")?;
        let v = l1.dims()[1];
        let mut out = crate::ops::cpu::zeros(x.len());
        if v == 0 || self.scale == 0.0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let scale = self.scale;
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(labels.par_iter().zip(self.lse.par_iter()))
            .try_for_each(|((o, row), (&l, &lse))| -> CResult<()> {
                if let Some(l) = label_index(l, 0, v)? {
                    simd(
                        #[inline(always)]
                        || exp_map(row, lse, scale, o),
                    );
                    o[l] -= scale;
                }
                Ok(())
            })?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_abs_diff, randn};
    use crate::ops::reference;
    use candle_core::{Device, Var};

    fn labels(v: &[i64]) -> Result<Tensor> {
        Ok(Tensor::new(v, &Device::Cpu)?)
    }

    #[test]
    fn matches_reference_value_and_gradient() -> Result<()> {
        let x = Var::from_tensor(&(randn(&[6, 37], 41)? * 3.0)?)?;
        let y = labels(&[3, -100, 0, 36, 12, -100])?;
        let l = cross_entropy(x.as_tensor(), &y)?;
        let l_ref = reference::cross_entropy(x.as_tensor(), &y)?;
        let d = max_abs_diff(&l, &l_ref)?;
        println!(
            "cross_entropy loss {} vs reference {} (|diff| {d:e})",
            l.to_scalar::<f32>()?,
            l_ref.to_scalar::<f32>()?
        );
        assert!(d < 1e-5);
        assert_eq!(l.dims(), &[] as &[usize]);
        // Scale the loss so the upstream gradient is not 1.
        let g = (l * 2.5)?.backward()?;
        let g_ref = (l_ref * 2.5)?.backward()?;
        let gx = g.get(&x).expect("dx");
        let d = max_abs_diff(gx, g_ref.get(&x).expect("dx ref"))?;
        println!("cross_entropy dlogits max |diff| = {d:e}");
        assert!(d < 1e-6);
        // Ignored rows get exactly zero gradient.
        assert_eq!(gx.get(1)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn all_ignored_gives_zero_loss_and_zero_grad() -> Result<()> {
        let x = Var::from_tensor(&randn(&[4, 9], 42)?)?;
        let l = cross_entropy(x.as_tensor(), &labels(&[-100; 4])?)?;
        assert_eq!(l.to_scalar::<f32>()?, 0.0);
        let g = l.backward()?;
        let total = g
            .get(&x)
            .expect("dx")
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        println!("cross_entropy all-ignored: loss 0, sum |grad| = {total}");
        assert_eq!(total, 0.0);
        Ok(())
    }

    #[test]
    fn out_of_range_label_is_an_error() -> Result<()> {
        let x = randn(&[2, 5], 43)?;
        assert!(cross_entropy(&x, &labels(&[1, 5])?).is_err());
        assert!(cross_entropy(&x, &labels(&[-1, 0])?).is_err());
        assert!(matches!(
            cross_entropy(&x, &labels(&[1])?),
            Err(Error::ShapeMismatch { .. })
        ));
        // u32 labels are accepted and mean the same thing.
        let a = cross_entropy(&x, &Tensor::new(&[1u32, 4], &Device::Cpu)?)?.to_scalar::<f32>()?;
        let b = cross_entropy(&x, &labels(&[1, 4])?)?.to_scalar::<f32>()?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let x = (randn(&[5, 13], 44)? * 2.0)?;
        let y = labels(&[0, 12, -100, 7, 3])?;
        let rep = finite_difference_check(
            "cross_entropy",
            |t: &[Tensor]| cross_entropy(&t[0], &y),
            &[x],
            &[0],
            1e-2,
        )?;
        rep.assert_within(5e-4);
        Ok(())
    }
}
