//! `x · wᵀ` against a frozen weight, as a candle custom op whose backward returns only
//! `dx = dy · w`. candle's own matmul backward always also forms `xᵀ · dy`, the weight
//! gradient, even when the weight is not trainable: one extra GEMM and one weight-sized
//! buffer per layer per step. Both directions run one matmul (faer) directly on the
//! weight's own strides, so a transposed or sliced weight is never copied.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::cpu::{
    f32_data, is_cpu_f32, is_cpu_weight, matmul_into, weight_view, widened_weight, CResult, MatView,
};
use crate::error::{Error, Result};

/// `x (.., in) · wᵀ` with `w (out, in)`; gradient for `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen_linear_bias(x, w, None)
}

/// [`frozen_linear`] plus a frozen bias `(out)`, written into the output before the product
/// accumulates onto it.
pub fn frozen_linear_bias(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (_out_dim, in_dim) = w.dims2()?;
    let x_in = x.dims().last().copied().unwrap_or(0);
    if x.rank() == 0 || x_in != in_dim {
        return Err(Error::ShapeMismatch {
            name: "frozen_linear input".into(),
            expected: vec![in_dim],
            got: x.dims().to_vec(),
        });
    }
    if let Some(bias) = bias {
        let out_dim = w.dims2()?.0;
        if bias.dims() != [out_dim] {
            return Err(Error::ShapeMismatch {
                name: "frozen_linear bias".into(),
                expected: vec![out_dim],
                got: bias.dims().to_vec(),
            });
        }
    }
    if !(is_cpu_f32(x) && is_cpu_weight(w) && bias.is_none_or(is_cpu_f32)) {
        // Other devices / dtypes: candle's matmul is correct, only less frugal in backward.
        let y = super::reference::frozen_linear(x, &w.detach())?;
        return Ok(match bias {
            Some(b) => y.broadcast_add(&b.detach())?,
            None => y,
        });
    }
    Ok(x.apply_op1(FrozenLinear {
        w: w.detach(),
        bias: bias_values(bias)?,
    })?)
}

/// `n` copies of `bias` (out), row-major: the starting value of a biased product.
pub(super) fn bias_rows(bias: &[f32], n: usize) -> Vec<f32> {
    super::cpu::repeat_rows(bias, n)
}

/// The values of a frozen bias, kept by the ops that start their output from it.
pub(super) fn bias_values(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    Ok(match bias {
        Some(b) => Some(b.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    })
}

/// Forward op: holds the weight (and bias), differentiates with respect to `x` only.
struct FrozenLinear {
    w: Tensor,
    /// (out)
    bias: Option<Vec<f32>>,
}

/// Backward op: `dy (.., out) · w (out, in) -> (.., in)`, itself not differentiable.
struct FrozenLinearBwd {
    w: Tensor,
}

/// Runs `x (m, k)` against the weight's storage. `transpose_w` selects `x · wᵀ` (forward,
/// k = in) or `x · w` (backward, k = out).
#[track_caller]
fn apply_weight(
    w: &Tensor,
    bias: Option<&[f32]>,
    x: &[f32],
    lead: &[usize],
    transpose_w: bool,
) -> CResult<(CpuStorage, Shape)> {
    let widened = widened_weight(w)?;
    let (w_store, w_l) = w.storage_and_layout();
    let w = weight_view(&widened, &w_store, w_l, "frozen_linear weight")?;
    // Forward reads wᵀ (in, out); backward reads w (out, in).
    let rhs = if transpose_w { w.t() } else { w };
    let (k, n) = (rhs.rows, rhs.cols);
    let m = x
        .len()
        .checked_div(k)
        .unwrap_or_else(|| lead.iter().product());
    let mut out = match bias {
        Some(b) => bias_rows(b, m),
        None => crate::ops::cpu::zeros(m * n),
    };
    matmul_into(
        &mut out,
        MatView::rows(x, m, k),
        rhs,
        1.0,
        bias.is_some(),
        true,
    );
    let mut dims = lead.to_vec();
    dims.push(n);
    Ok((CpuStorage::F32(out), Shape::from(dims)))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "frozen-linear")?;
        let dims = l.dims();
        apply_weight(
            &self.w,
            self.bias.as_deref(),
            &x,
            &dims[..dims.len() - 1],
            true,
        )
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let dx = grad.apply_op1_no_bwd(&FrozenLinearBwd { w: self.w.clone() })?;
        Ok(Some(dx))
    }
}

impl CustomOp1 for FrozenLinearBwd {
    fn name(&self) -> &'static str {
        "frozen-linear-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let dy = f32_data(s, l, "frozen-linear-bwd")?;
        let dims = l.dims();
        apply_weight(&self.w, None, &dy, &dims[..dims.len() - 1], false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_abs_diff, randn};
    use crate::ops::reference;
    use candle_core::Var;

    #[test]
    fn matches_reference_values_and_input_gradient() -> Result<()> {
        let x = Var::from_tensor(&randn(&[2, 5, 24], 1)?)?;
        let w = randn(&[17, 24], 2)?;
        let y = frozen_linear(x.as_tensor(), &w)?;
        let y_ref = reference::frozen_linear(x.as_tensor(), &w)?;
        let d = max_abs_diff(&y, &y_ref)?;
        println!("frozen_linear forward max |diff| = {d:e}");
        assert!(d < 1e-5, "forward diff {d}");
        assert_eq!(y.dims(), &[2, 5, 17]);

        let proj = randn(&[2, 5, 17], 3)?;
        let g = (y * &proj)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
        let d = max_abs_diff(g.get(&x).expect("dx"), g_ref.get(&x).expect("dx ref"))?;
        println!("frozen_linear dx max |diff| = {d:e}");
        assert!(d < 1e-5, "dx diff {d}");
        Ok(())
    }

    #[test]
    fn bias_starts_the_output_and_gets_no_gradient() -> Result<()> {
        let x = Var::from_tensor(&randn(&[7, 12], 11)?)?;
        let w = randn(&[9, 12], 12)?;
        let bias = Var::from_tensor(&randn(&[9], 13)?)?;
        let (a, b) = (
            Var::from_tensor(&randn(&[3, 12], 14)?)?,
            Var::from_tensor(&randn(&[9, 3], 15)?)?,
        );
        let proj = randn(&[7, 9], 16)?;
        for lora in [false, true] {
            let (y, y_ref) = if lora {
                let f = |bias| {
                    crate::ops::lora_dash_linear_bias(
                        x.as_tensor(),
                        &w,
                        bias,
                        a.as_tensor(),
                        b.as_tensor(),
                        2.0,
                        0.25,
                        7,
                        None,
                    )
                };
                (
                    f(Some(bias.as_tensor()))?,
                    f(None)?.broadcast_add(&bias.as_tensor().detach())?,
                )
            } else {
                (
                    frozen_linear_bias(x.as_tensor(), &w, Some(bias.as_tensor()))?,
                    frozen_linear(x.as_tensor(), &w)?.broadcast_add(&bias.as_tensor().detach())?,
                )
            };
            let d = max_abs_diff(&y, &y_ref)?;
            println!("biased (lora {lora}) forward max |diff| = {d:e}");
            assert!(d < 1e-5, "forward diff {d}");
            let g = (y * &proj)?.sum_all()?.backward()?;
            let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
            assert!(g.get(&bias).is_none(), "the bias is frozen");
            let mut tracked = vec![&x];
            if lora {
                tracked.extend([&a, &b]);
            }
            for v in tracked {
                let d = max_abs_diff(g.get(v).expect("grad"), g_ref.get(v).expect("grad ref"))?;
                assert!(d < 1e-5, "gradient diff {d}");
            }
        }
        let bad = randn(&[8], 17)?;
        assert!(frozen_linear_bias(x.as_tensor(), &w, Some(&bad)).is_err());
        Ok(())
    }

    #[test]
    fn weight_gets_no_gradient_even_as_var() -> Result<()> {
        // A plain tensor weight: no gradient entry at all.
        let x = Var::from_tensor(&randn(&[3, 8], 4)?)?;
        let w = randn(&[6, 8], 5)?;
        let g = frozen_linear(x.as_tensor(), &w)?.sum_all()?.backward()?;
        assert!(g.get(&w).is_none());
        assert!(g.get(&x).is_some());
        // Even a Var weight is treated as frozen: the op detaches it.
        let wv = Var::from_tensor(&w)?;
        let g = frozen_linear(x.as_tensor(), wv.as_tensor())?
            .sum_all()?
            .backward()?;
        assert!(g.get(&wv).is_none());
        let dx = g.get(&x).expect("dx");
        // d/dx sum(x wᵀ) = 1ᵀ w: every row equals the column sums of w.
        let col = w.sum_keepdim(0)?.broadcast_as((3, 8))?;
        let d = max_abs_diff(dx, &col)?;
        println!("frozen_linear dx vs column sums max |diff| = {d:e}");
        assert!(d < 1e-5);
        Ok(())
    }

    #[test]
    fn non_contiguous_input_and_weight() -> Result<()> {
        // x as a transposed view (4, 3, 10) -> (3, 4, 10) and w given as a transpose.
        let x0 = Var::from_tensor(&randn(&[4, 3, 10], 6)?)?;
        let wt = randn(&[10, 7], 7)?; // w = wtᵀ, (7, 10) with strides (1, 7)
        let w = wt.t()?;
        let f = |x: &Tensor| frozen_linear(&x.transpose(0, 1)?, &w);
        let y = f(x0.as_tensor())?;
        let y_ref = reference::frozen_linear(&x0.as_tensor().transpose(0, 1)?, &w.contiguous()?)?;
        let d = max_abs_diff(&y, &y_ref)?;
        println!("frozen_linear strided forward max |diff| = {d:e}");
        assert!(d < 1e-5);
        let g = y.sum_all()?.backward()?;
        let g_ref = y_ref.sum_all()?.backward()?;
        let d = max_abs_diff(g.get(&x0).expect("dx"), g_ref.get(&x0).expect("dx ref"))?;
        println!("frozen_linear strided dx max |diff| = {d:e}");
        assert!(d < 1e-5);
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let x = randn(&[3, 2, 9], 8)?;
        let w = randn(&[5, 9], 9)?;
        let rep = finite_difference_check(
            "frozen_linear",
            |t: &[Tensor]| frozen_linear(&t[0], &w),
            &[x],
            &[0],
            1e-2,
        )?;
        rep.assert_within(5e-4);
        Ok(())
    }

    #[test]
    fn shape_errors_are_reported() {
        let x = randn(&[3, 8], 1).expect("x");
        let w = randn(&[6, 7], 2).expect("w");
        assert!(matches!(
            frozen_linear(&x, &w),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
