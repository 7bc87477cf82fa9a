//! Test utilities: gradient checks against central finite differences, tensor diffs and
//! seeded random tensors. Used by the tests of `ops` and of any module that defines a
//! differentiable function.
//!
//! The checked scalar is `L = Σ f(inputs) ⊙ P` for a fixed pseudo-random projection `P`,
//! so every output element contributes with a different weight. The autograd gradient of
//! `L` is compared with `(L(x + h e_i) - L(x - h e_i)) / (x⁺ - x⁻)` where `x±` are the
//! perturbed values as actually stored (f32 rounding of `x ± h` is accounted for) and `L`
//! is accumulated in f64 on the host.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Most coordinates perturbed per input; larger inputs are sampled with a fixed stride.
const MAX_POINTS: usize = 96;

/// Outcome of [`finite_difference_check`].
#[derive(Debug, Clone)]
pub struct GradCheckReport {
    pub name: String,
    /// Largest `|analytic - numeric|`.
    pub max_abs_diff: f64,
    /// Largest `|analytic - numeric| / max(1, |numeric|)`.
    pub max_scaled_diff: f64,
    /// Coordinates compared, over all inputs.
    pub checked: usize,
}

impl GradCheckReport {
    /// Panics (a test failure) unless the scaled error is below `tol`.
    pub fn assert_within(&self, tol: f64) {
        assert!(
            self.max_scaled_diff <= tol,
            "{}: finite-difference mismatch {:e} > {tol:e} ({} coordinates)",
            self.name,
            self.max_scaled_diff,
            self.checked
        );
    }
}

/// A seeded tensor with entries uniform in [-1, 1), f32 on the CPU.
pub fn randn(dims: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v = Rng::new(seed).uniform_vec(n, -1.0, 1.0);
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// Largest absolute element difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(Error::ShapeMismatch {
            name: "max_abs_diff rhs".into(),
            expected: a.dims().to_vec(),
            got: b.dims().to_vec(),
        });
    }
    let a = host_f64(a)?;
    let b = host_f64(b)?;
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max))
}

/// Largest `|a - b| / max(1e-6, max |b|)`: a relative error against `b`'s scale.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let scale = host_f64(b)?.iter().map(|x| x.abs()).fold(1e-6, f64::max);
    Ok(max_abs_diff(a, b)? / scale)
}

/// Row-major f64 copy of any float tensor.
pub fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Compares candle's backward through `f` with central differences of step `h`, for each
/// input index in `wrt` (those inputs must be float tensors). Prints a summary line and
/// returns the report; fails with [`Error::NoGradient`] when an input got no gradient.
pub fn finite_difference_check<F>(
    name: &str,
    f: F,
    inputs: &[Tensor],
    wrt: &[usize],
    h: f64,
) -> Result<GradCheckReport>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    // Analytic gradients through Vars.
    let mut vars: Vec<Option<Var>> = vec![None; inputs.len()];
    let mut tracked: Vec<Tensor> = inputs.to_vec();
    for &i in wrt {
        let v = Var::from_tensor(&inputs[i])?;
        tracked[i] = v.as_tensor().clone();
        vars[i] = Some(v);
    }
    let out = f(&tracked)?;
    let proj_host = Rng::new(0x5eed).uniform_vec(out.elem_count(), -1.0, 1.0);
    let proj =
        Tensor::from_vec(proj_host.clone(), out.shape(), out.device())?.to_dtype(out.dtype())?;
    let grads = (out * &proj)?.sum_all()?.backward()?;
    let proj_host: Vec<f64> = proj_host.iter().map(|&p| p as f64).collect();
    let loss = |ts: &[Tensor]| -> Result<f64> {
        let y = host_f64(&f(ts)?)?;
        Ok(y.iter().zip(&proj_host).map(|(a, b)| a * b).sum())
    };

    let mut rep = GradCheckReport {
        name: name.to_string(),
        max_abs_diff: 0.0,
        max_scaled_diff: 0.0,
        checked: 0,
    };
    for &i in wrt {
        let var = vars[i]
            .as_ref()
            .ok_or_else(|| Error::msg("gradcheck: input index repeated"))?;
        let g = grads
            .get(var)
            .ok_or_else(|| Error::NoGradient(format!("{name} input {i}")))?;
        let analytic = host_f64(g)?;
        let base = inputs[i].flatten_all()?;
        let base_host = host_f64(&base)?;
        let n = base_host.len();
        let step = n.div_ceil(MAX_POINTS).max(1);
        for j in (0..n).step_by(step) {
            let probe = |delta: f64| -> Result<(f64, f64)> {
                let mut v = base_host.clone();
                v[j] += delta;
                let t = Tensor::from_vec(v, n, &Device::Cpu)?
                    .to_dtype(inputs[i].dtype())?
                    .to_device(inputs[i].device())?
                    .reshape(inputs[i].shape())?;
                // The value the op really sees after rounding to the input dtype.
                let stored = host_f64(&t.flatten_all()?.narrow(0, j, 1)?)?[0];
                let mut ts = inputs.to_vec();
                ts[i] = t;
                Ok((stored, loss(&ts)?))
            };
            let (xp, lp) = probe(h)?;
            let (xm, lm) = probe(-h)?;
            let numeric = (lp - lm) / (xp - xm);
            let d = (analytic[j] - numeric).abs();
            rep.max_abs_diff = rep.max_abs_diff.max(d);
            rep.max_scaled_diff = rep.max_scaled_diff.max(d / numeric.abs().max(1.0));
            rep.checked += 1;
        }
    }
    println!(
        "gradcheck {}: {} coords, max |analytic - numeric| = {:e}, scaled = {:e}",
        rep.name, rep.checked, rep.max_abs_diff, rep.max_scaled_diff
    );
    Ok(rep)
}

#[cfg(test)]
mod tests {
    //! Which candle 0.11 primitives the model may differentiate through directly: each is
    //! checked against finite differences (an op without backward fails with an error).
    use super::*;
    use candle_core::D;

    fn check(
        name: &str,
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
        wrt: &[usize],
    ) -> Result<()> {
        let rep = finite_difference_check(name, f, inputs, wrt, 1e-2)?;
        rep.assert_within(5e-4);
        Ok(())
    }

    #[test]
    fn candle_primitives_carry_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let a = randn(&[4, 6], 1)?;
        let b = randn(&[4, 6], 2)?;
        let row = randn(&[6], 3)?;
        let ids = Tensor::new(&[2u32, 0, 2, 3], &dev)?;
        check("silu", |t| Ok(t[0].silu()?), std::slice::from_ref(&a), &[0])?;
        check("exp", |t| Ok(t[0].exp()?), std::slice::from_ref(&a), &[0])?;
        // embedding lookup = index_select on rows; repeated ids must accumulate.
        check(
            "index_select",
            |t| Ok(t[0].index_select(&ids, 0)?),
            std::slice::from_ref(&a),
            &[0],
        )?;
        let gidx = Tensor::new(&[[1u32, 0], [5, 5], [2, 3], [0, 0]], &dev)?;
        check(
            "gather",
            |t| Ok(t[0].gather(&gidx, D::Minus1)?),
            std::slice::from_ref(&a),
            &[0],
        )?;
        check(
            "narrow",
            |t| Ok(t[0].narrow(1, 2, 3)?),
            std::slice::from_ref(&a),
            &[0],
        )?;
        check(
            "cat",
            |t| Ok(Tensor::cat(&[&t[0], &t[1]], 1)?),
            &[a.clone(), b.clone()],
            &[0, 1],
        )?;
        check(
            "transpose+contiguous",
            |t| Ok(t[0].t()?.contiguous()?),
            std::slice::from_ref(&a),
            &[0],
        )?;
        check(
            "broadcast_mul",
            |t| Ok(t[0].broadcast_mul(&t[1])?),
            &[a.clone(), row.clone()],
            &[0, 1],
        )?;
        check(
            "broadcast_add",
            |t| Ok(t[0].broadcast_add(&t[1])?),
            &[a.clone(), row.clone()],
            &[0, 1],
        )?;
        check(
            "broadcast_as",
            |t| Ok(t[0].broadcast_as((3, 6))?),
            std::slice::from_ref(&row),
            &[0],
        )?;
        check(
            "matmul",
            |t| Ok(t[0].matmul(&t[1].t()?)?),
            &[a.clone(), b.clone()],
            &[0, 1],
        )?;
        Ok(())
    }
}
