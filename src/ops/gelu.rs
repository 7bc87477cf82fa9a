//! Exact GELU (Hendrycks & Gimpel 2016): `gelu(x) = x Φ(x) = 0.5 x (1 + erf(x / √2))`, the
//! `"gelu"` activation of Hugging Face transformers (`torch.nn.functional.gelu` with its
//! default `approximate="none"`), with backward `dx = dy (Φ(x) + x φ(x))`,
//! `φ(x) = exp(-x² / 2) / √(2π)`.
//!
//! `erf` is evaluated in f32 without a libm call so the loops vectorise: N. Juffa's
//! single-precision `erff` (two minimax approximations split at |x| = 0.9277, about 1 ulp
//! in each), with plain multiply-adds in place of fused ones.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{exp_f32, f32_data, is_cpu_f32, simd, CResult};
use crate::error::Result;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// `1 / √(2π)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact (erf-based) GELU, element-wise.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        return super::reference::gelu_erf(x);
    }
    Ok(x.apply_op1(GeluErf)?)
}

/// The error function in f32, absolute error below 1e-7 (tested against an f64 series).
/// ±inf map to ±1 and NaN stays NaN.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let t = x.abs();
    // |x| <= 0.9277: erf(x) = x + x · P(x²).
    let s = x * x;
    let mut p = -5.967_617_03e-4f32;
    p = p * s + 4.991_194_23e-3;
    p = p * s - 2.676_813_49e-2;
    p = p * s + 1.128_199_25e-1;
    p = p * s - 3.761_253_36e-1;
    p = p * s + 1.283_791_66e-1;
    let small = p * x + x;
    // |x| > 0.9277: erf(|x|) = 1 - exp(Q(|x|)); clamped at 4, where erf rounds to 1.
    let tc = t.min(4.0);
    let sc = tc * tc;
    let mut r = -1.728_534_70e-5f32 * tc + 3.831_971_26e-4;
    let u = -3.883_964_38e-3f32 * tc + 2.425_462_19e-2;
    r = r * sc + u;
    r = r * tc - 1.067_778_77e-1;
    r = r * tc - 6.348_466_87e-1;
    r = r * tc - 1.287_175_12e-1;
    r = r * tc - tc;
    let large = (1.0 - exp_f32(r)).copysign(x);
    if t > 0.927_734_375 {
        large
    } else {
        small
    }
}

/// `Φ(x) = 0.5 (1 + erf(x / √2))`, the standard normal CDF.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "gelu-erf")?;
        let mut out = crate::ops::cpu::zeros(x.len());
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| {
                simd(
                    #[inline(always)]
                    || {
                        for (o, &x) in o.iter_mut().zip(x) {
                            *o = x * normal_cdf(x);
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(grad, &GeluErfBwd)?))
    }
}

/// `(x, dy) -> dy (Φ(x) + x φ(x))`.
struct GeluErfBwd;

impl CustomOp2 for GeluErfBwd {
    fn name(&self) -> &'static str {
        "gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, "gelu-erf-bwd")?;
        let dy = f32_data(s2, l2, "gelu-erf-bwd")?;
        let mut out = crate::ops::cpu::zeros(x.len());
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(o, (x, dy))| {
                simd(
                    #[inline(always)]
                    || {
                        for ((o, &x), &dy) in o.iter_mut().zip(x).zip(dy) {
                            let pdf = INV_SQRT_2PI * exp_f32(-0.5 * x * x);
                            *o = dy * (normal_cdf(x) + x * pdf);
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, host_f64, max_rel_diff, randn};
    use crate::ops::reference;
    use candle_core::{DType, Device, Var};

    /// erf in f64 from `erf(x) = 2/√π e^{-x²} Σ_n 2ⁿ x^{2n+1} / (1·3·…·(2n+1))`
    /// (Abramowitz & Stegun 7.1.6): every term is positive, so there is no cancellation
    /// and the sum is good to about 1e-15 for the |x| <= 6 used here.
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= 2.0 * x * x / (2.0 * n + 1.0);
            sum += term;
        }
        2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
    }

    /// Grid over [-6, 6] plus points near 0 and the branch split.
    fn grid() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..=24_000).map(|i| -6.0 + i as f32 * 5e-4).collect();
        xs.extend([
            1e-30,
            -1e-20,
            1e-10,
            3e-6,
            0.927_734_4,
            0.927_734_3,
            -0.927_734_4,
        ]);
        xs
    }

    #[test]
    fn erf_matches_f64_series() -> Result<()> {
        // The series itself against tabulated values (A&S table 7.1) and symmetry.
        for (x, want) in [(0.5, 0.520_499_877_813_047), (1.0, 0.842_700_792_949_715)] {
            assert!((erf_series(x) - want).abs() < 1e-14);
            assert!((erf_series(-x) + want).abs() < 1e-14);
        }
        let (mut worst_abs, mut worst_rel_small) = (0f64, 0f64);
        for x in grid() {
            let want = erf_series(x as f64);
            let got = erf_f32(x) as f64;
            worst_abs = worst_abs.max((got - want).abs());
            if x.abs() < 0.9 && x != 0.0 {
                worst_rel_small = worst_rel_small.max(((got - want) / want).abs());
            }
        }
        println!("erf_f32 on [-6, 6]: max abs err {worst_abs:e}, max rel err (|x| < 0.9) {worst_rel_small:e}");
        assert!(worst_abs < 1e-7, "{worst_abs}");
        assert!(worst_rel_small < 3e-7, "{worst_rel_small}");
        assert_eq!(erf_f32(0.0), 0.0);
        assert_eq!(erf_f32(10.0), 1.0);
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());

        // And against candle's f64 erf (libm) on the same grid.
        let xs = grid();
        let libm = host_f64(
            &Tensor::new(xs.as_slice(), &Device::Cpu)?
                .to_dtype(DType::F64)?
                .erf()?,
        )?;
        let worst = xs
            .iter()
            .zip(&libm)
            .map(|(&x, &l)| (erf_f32(x) as f64 - l).abs())
            .fold(0.0, f64::max);
        println!("erf_f32 vs libm erf (f64) max abs err {worst:e}");
        assert!(worst < 1e-7, "{worst}");
        Ok(())
    }

    #[test]
    fn gelu_and_its_derivative_match_f64() -> Result<()> {
        let xs = grid();
        let x = Tensor::new(xs.as_slice(), &Device::Cpu)?;
        let xv = Var::from_tensor(&x)?;
        let y = gelu_erf(xv.as_tensor())?;
        let dx = y.sum_all()?.backward()?.get(&xv).expect("dx").clone();
        let (y, dx) = (host_f64(&y)?, host_f64(&dx)?);
        let (mut worst_y, mut worst_dx) = (0f64, 0f64);
        for ((&x, &y), &dx) in xs.iter().zip(&y).zip(&dx) {
            let x = x as f64;
            let cdf = 0.5 * (1.0 + erf_series(x / 2f64.sqrt()));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            worst_y = worst_y.max((y - x * cdf).abs() / x.abs().max(1.0));
            worst_dx = worst_dx.max((dx - (cdf + x * pdf)).abs() / x.abs().max(1.0));
        }
        println!(
            "gelu_erf vs f64: max err / max(1, |x|) value {worst_y:e}, derivative {worst_dx:e}"
        );
        assert!(worst_y < 3e-7, "{worst_y}");
        assert!(worst_dx < 5e-7, "{worst_dx}");

        // f64 input takes the composed path (candle's f64 erf).
        let y64 = host_f64(&gelu_erf(&x.to_dtype(DType::F64)?)?)?;
        let worst = xs
            .iter()
            .zip(&y64)
            .map(|(&x, &y)| {
                let x = x as f64;
                (y - 0.5 * x * (1.0 + erf_series(x / 2f64.sqrt()))).abs()
            })
            .fold(0.0, f64::max);
        println!("gelu_erf (f64 input) vs f64 series max |diff| = {worst:e}");
        assert!(worst < 1e-12, "{worst}");

        // candle's own f32 gelu_erf forward (libm erff).
        let d = max_rel_diff(&gelu_erf(&x)?, &x.gelu_erf()?)?;
        println!("gelu_erf vs candle gelu_erf forward max rel diff = {d:e}");
        assert!(d < 1e-6, "{d}");
        Ok(())
    }

    #[test]
    fn matches_reference_values_and_gradient() -> Result<()> {
        // Spread to ±12 and seen through a transpose (strided input).
        let x = Var::from_tensor(&(randn(&[37, 3, 64], 41)? * 12.0)?)?;
        let xi = x.as_tensor().transpose(0, 1)?;
        let y = gelu_erf(&xi)?;
        let y_ref = reference::gelu_erf(&xi)?;
        let d = max_rel_diff(&y, &y_ref)?;
        println!("gelu_erf forward max rel diff = {d:e}");
        assert!(d < 1e-6, "{d}");
        let proj = randn(y.dims(), 42)?;
        let g = (y * &proj)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
        let d = max_rel_diff(g.get(&x).expect("dx"), g_ref.get(&x).expect("dx ref"))?;
        println!("gelu_erf dx max rel diff = {d:e}");
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn finite_differences() -> Result<()> {
        let x = (randn(&[4, 24], 43)? * 4.0)?;
        let rep =
            finite_difference_check("gelu_erf", |t: &[Tensor]| gelu_erf(&t[0]), &[x], &[0], 1e-2)?;
        rep.assert_within(5e-4);
        Ok(())
    }
}
