//! Softmax over the last dim with a backward: `dx = y ⊙ (dy - Σ dy ⊙ y)` per row, using the
//! output `y` the graph already holds (no extra buffer survives the forward).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::cpu::{
    dot_f32, exp_store_sum, f32_data, is_cpu_f32, map_rows, map_rows2, row_max, CResult,
};
use crate::error::Result;

/// Softmax over the last dim of `x`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 || !is_cpu_f32(x) {
        return super::reference::softmax_last_dim(x);
    }
    Ok(x.apply_op1(Softmax)?)
}

/// Softmax of one row, written into `out` (max-subtracted for stability).
#[inline(always)]
pub(crate) fn softmax_row(x: &[f32], out: &mut [f32]) {
    let max = row_max(x);
    if max == f32::NEG_INFINITY {
        // A fully masked row (every entry -inf): the composed reference yields NaN here;
        // zeros keep such rows out of every downstream sum instead.
        out.iter_mut().for_each(|o| *o = 0.0);
        return;
    }
    let inv = (1.0 / exp_store_sum(x, max, out)) as f32;
    out.iter_mut().for_each(|o| *o *= inv);
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "softmax-last-dim")?;
        let d = l.dims().last().copied().unwrap_or(1);
        let mut out = crate::ops::cpu::zeros(x.len());
        map_rows(&mut out, &x, d, |o, x| softmax_row(x, o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(grad, &SoftmaxBwd)?))
    }
}

/// `(y, dy) -> y ⊙ (dy - Σ dy ⊙ y)` row by row.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let y = f32_data(s1, l1, "softmax-last-dim-bwd")?;
        let dy = f32_data(s2, l2, "softmax-last-dim-bwd")?;
        let d = l1.dims().last().copied().unwrap_or(1);
        let mut out = crate::ops::cpu::zeros(y.len());
        map_rows2(&mut out, &y, &dy, d, |o, y, dy| {
            let dot = dot_f32(y, dy) as f32;
            for i in 0..d {
                o[i] = y[i] * (dy[i] - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_abs_diff, randn};
    use crate::ops::reference;
    use candle_core::Var;

    #[test]
    fn matches_reference_values_and_gradient() -> Result<()> {
        // Scaled up so rows are peaked, plus a strided view of the same data.
        let x = Var::from_tensor(&(randn(&[3, 4, 33], 31)? * 4.0)?)?;
        for (label, xv) in [
            ("contiguous", x.as_tensor().clone()),
            ("transposed", x.as_tensor().transpose(0, 1)?),
        ] {
            let y = softmax_last_dim(&xv)?;
            let y_ref = reference::softmax_last_dim(&xv)?;
            let d = max_abs_diff(&y, &y_ref)?;
            println!("softmax {label} forward max |diff| = {d:e}");
            assert!(d < 1e-6);
            let proj = randn(y.dims(), 32)?;
            let g = (y * &proj)?.sum_all()?.backward()?;
            let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
            let d = max_abs_diff(g.get(&x).expect("dx"), g_ref.get(&x).expect("dx ref"))?;
            println!("softmax {label} dx max |diff| = {d:e}");
            assert!(d < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn masked_entries_get_zero_probability() -> Result<()> {
        let x = Tensor::new(
            &[[0.5f32, f32::NEG_INFINITY, 1.0], [f32::NEG_INFINITY; 3]],
            &candle_core::Device::Cpu,
        )?;
        let y = softmax_last_dim(&x)?.to_vec2::<f32>()?;
        println!("softmax masked rows: {y:?}");
        assert_eq!(y[0][1], 0.0);
        assert!((y[0][0] + y[0][2] - 1.0).abs() < 1e-6);
        assert_eq!(y[1], vec![0.0; 3]);
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let x = (randn(&[3, 11], 33)? * 2.0)?;
        let rep = finite_difference_check(
            "softmax",
            |t: &[Tensor]| softmax_last_dim(&t[0]),
            &[x],
            &[0],
            1e-2,
        )?;
        rep.assert_within(5e-4);
        Ok(())
    }
}
