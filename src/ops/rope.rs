//! Rotary position embedding, rotate-half form as in Hugging Face `apply_rotary_pos_emb`:
//! with `x = [x1, x2]` split at `d/2`, `y1 = x1 cos - x2 sin`, `y2 = x2 cos + x1 sin`.
//!
//! The rotation is orthogonal, so the backward is the same kernel with `sin` negated.
//! `x` is read through its own strides whenever its last dim is unit-stride, which covers
//! the `(b, t, h, d) -> (b, h, t, d)` transpose the attention block produces: no copy.

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dense, f32_data, f32_storage, is_cpu_f32, simd, CResult};
use crate::error::{Error, Result};

/// `x (b, h, t, d)` rotated by `cos`/`sin` of shape `(t, d/2)` or `(b, t, d/2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _h, t, d) = x.dims4()?;
    let half = d / 2;
    let ok_table = |c: &Tensor| c.dims() == [t, half] || c.dims() == [b, t, half];
    if d % 2 != 0 || !ok_table(cos) || sin.dims() != cos.dims() {
        return Err(Error::ShapeMismatch {
            name: "rope cos/sin".into(),
            expected: vec![b, t, half],
            got: if ok_table(cos) {
                sin.dims().to_vec()
            } else {
                cos.dims().to_vec()
            },
        });
    }
    if !(is_cpu_f32(x) && is_cpu_f32(cos) && is_cpu_f32(sin)) {
        return super::reference::rope(x, cos, sin);
    }
    Ok(x.apply_op3(cos, sin, Rope { sign: 1.0 })?)
}

/// `sign = 1` rotates forward; `sign = -1` applies the inverse (transpose) rotation.
struct Rope {
    sign: f32,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
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
        let dims = l1.dims();
        let (b, h, t, d) = (dims[0], dims[1], dims[2], dims[3]);
        let half = d / 2;
        let cos = f32_data(s2, l2, "rope")?;
        let sin = f32_data(s3, l3, "rope")?;
        let batched = l2.dims().len() == 3;
        // Rows of x are addressed as start + bi*s0 + hi*s1 + ti*s2 (unit stride inside a row).
        let st = l1.stride();
        let (x, start, s0, s1, s2): (Cow<[f32]>, usize, usize, usize, usize) = if st[3] == 1 {
            (
                Cow::Borrowed(f32_storage(s1, "rope")?),
                l1.start_offset(),
                st[0],
                st[1],
                st[2],
            )
        } else {
            (dense(f32_storage(s1, "rope")?, l1), 0, h * t * d, t * d, d)
        };
        let mut out = crate::ops::cpu::zeros(b * h * t * d);
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let sign = self.sign;
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
            simd(
                #[inline(always)]
                || {
                    let (bi, hi) = (bh / h, bh % h);
                    for ti in 0..t {
                        let src = &x[start + bi * s0 + hi * s1 + ti * s2..][..d];
                        let row = if batched {
                            (bi * t + ti) * half
                        } else {
                            ti * half
                        };
                        let (c, s) = (&cos[row..row + half], &sin[row..row + half]);
                        let (o1, o2) = o[ti * d..(ti + 1) * d].split_at_mut(half);
                        let (x1, x2) = src.split_at(half);
                        for i in 0..half {
                            let si = sign * s[i];
                            o1[i] = x1[i] * c[i] - x2[i] * si;
                            o2[i] = x2[i] * c[i] + x1[i] * si;
                        }
                    }
                },
            )
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.apply_op3_no_bwd(cos, sin, &Rope { sign: -self.sign })?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_abs_diff, randn};
    use crate::ops::reference;
    use candle_core::Var;

    /// HF-style tables: angle(t, i) = (pos_offset + t) * base^(-2i/d).
    fn tables(b: Option<usize>, t: usize, d: usize) -> Result<(Tensor, Tensor)> {
        let half = d / 2;
        let rows = b.unwrap_or(1);
        let mut c = Vec::new();
        let mut s = Vec::new();
        for bi in 0..rows {
            for ti in 0..t {
                for i in 0..half {
                    let ang = ((bi * 3 + ti) as f32) * 10000f32.powf(-2.0 * i as f32 / d as f32);
                    c.push(ang.cos());
                    s.push(ang.sin());
                }
            }
        }
        let dims: Vec<usize> = match b {
            Some(b) => vec![b, t, half],
            None => vec![t, half],
        };
        Ok((
            Tensor::from_vec(c, dims.clone(), &candle_core::Device::Cpu)?,
            Tensor::from_vec(s, dims, &candle_core::Device::Cpu)?,
        ))
    }

    fn compare(x: &Var, xv: &Tensor, cos: &Tensor, sin: &Tensor, label: &str) -> Result<()> {
        let y = rope(xv, cos, sin)?;
        let y_ref = reference::rope(xv, cos, sin)?;
        let d = max_abs_diff(&y, &y_ref)?;
        println!("rope {label} forward max |diff| = {d:e}");
        assert!(d < 1e-5);
        let proj = randn(y.dims(), 21)?;
        let g = (y * &proj)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
        let d = max_abs_diff(g.get(x).expect("dx"), g_ref.get(x).expect("dx ref"))?;
        println!("rope {label} dx max |diff| = {d:e}");
        assert!(d < 1e-5);
        Ok(())
    }

    #[test]
    fn matches_reference_shared_and_batched_tables() -> Result<()> {
        let x = Var::from_tensor(&randn(&[2, 3, 5, 8], 22)?)?;
        let (c, s) = tables(None, 5, 8)?;
        compare(&x, x.as_tensor(), &c, &s, "(t, d/2)")?;
        let (c, s) = tables(Some(2), 5, 8)?;
        compare(&x, x.as_tensor(), &c, &s, "(b, t, d/2)")?;
        Ok(())
    }

    #[test]
    fn strided_inputs() -> Result<()> {
        // (b, t, h, d) transposed to (b, h, t, d): unit last stride, read in place.
        let x = Var::from_tensor(&randn(&[2, 5, 3, 8], 23)?)?;
        let (c, s) = tables(Some(2), 5, 8)?;
        compare(&x, &x.as_tensor().transpose(1, 2)?, &c, &s, "transposed")?;
        // Last dim not unit-stride: gathered into a dense copy first.
        let x = Var::from_tensor(&randn(&[2, 3, 8, 5], 24)?)?;
        let (c, s) = tables(None, 5, 8)?;
        compare(
            &x,
            &x.as_tensor().transpose(2, 3)?,
            &c,
            &s,
            "last-dim strided",
        )?;
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let x = randn(&[1, 2, 4, 6], 25)?;
        let (c, s) = tables(Some(1), 4, 6)?;
        let rep =
            finite_difference_check("rope", |t: &[Tensor]| rope(&t[0], &c, &s), &[x], &[0], 1e-2)?;
        rep.assert_within(5e-4);
        Ok(())
    }

    #[test]
    fn bad_table_shape_is_an_error() -> Result<()> {
        let x = randn(&[1, 2, 4, 6], 25)?;
        let (c, s) = tables(None, 3, 6)?;
        assert!(matches!(rope(&x, &c, &s), Err(Error::ShapeMismatch { .. })));
        Ok(())
    }
}
