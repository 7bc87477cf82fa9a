//! Tests of the fused LoRA linear op against the composed reference and finite differences.

use super::*;
use crate::ops::gradcheck::{finite_difference_check, max_abs_diff, max_rel_diff, randn};
use crate::ops::reference;
use candle_core::{DType, Device, Var};

/// Compares value and the gradients of x, a, b with the composed reference; `x_of`
/// builds the op's input from the leaf (to test strided inputs).
fn compare(p: f32, x_leaf: &[usize], x_of: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let (in_dim, out_dim, r, scale) = (24, 17, 4, 2.0);
    let x = Var::from_tensor(&randn(x_leaf, 11)?)?;
    let w = randn(&[out_dim, in_dim], 12)?;
    let a = Var::from_tensor(&randn(&[r, in_dim], 13)?)?;
    let b = Var::from_tensor(&randn(&[out_dim, r], 14)?)?;
    let xi = x_of(x.as_tensor())?;
    let y = lora_linear(&xi, &w, a.as_tensor(), b.as_tensor(), scale, p, 77)?;
    let y_ref = reference::lora_linear(&xi, &w, a.as_tensor(), b.as_tensor(), scale, p, 77)?;
    let d = max_rel_diff(&y, &y_ref)?;
    println!(
        "lora_linear p={p} x {:?} forward max rel diff = {d:e}",
        xi.stride()
    );
    assert!(d < 1e-5, "forward {d}");
    let proj = randn(y.dims(), 15)?;
    let g = (y * &proj)?.sum_all()?.backward()?;
    let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
    for (name, v) in [("dx", &x), ("dA", &a), ("dB", &b)] {
        let d = max_rel_diff(g.get(v).expect("grad"), g_ref.get(v).expect("ref grad"))?;
        println!("lora_linear p={p} {name} max rel diff = {d:e}");
        assert!(d < 1e-5, "{name}: {d}");
    }
    Ok(())
}

#[test]
fn matches_reference_without_and_with_dropout() -> Result<()> {
    // 70 rows: two full row chunks and a partial one.
    for p in [0.0, 0.3] {
        compare(p, &[70, 24], |x| Ok(x.clone()))?;
    }
    Ok(())
}

#[test]
fn matches_reference_for_strided_input() -> Result<()> {
    // x = leafᵀ: (70, 24) with strides (1, 70).
    for p in [0.0, 0.25] {
        compare(p, &[24, 70], |x| Ok(x.t()?))?;
    }
    Ok(())
}

#[test]
fn finite_differences() -> Result<()> {
    let w = randn(&[7, 9], 21)?;
    for p in [0.0, 0.4] {
        let rep = finite_difference_check(
            &format!("lora_linear p={p}"),
            |t: &[Tensor]| lora_linear(&t[0], &w, &t[1], &t[2], 1.5, p, 5),
            &[
                randn(&[40, 9], 22)?,
                randn(&[3, 9], 23)?,
                randn(&[7, 3], 24)?,
            ],
            &[0, 1, 2],
            1e-2,
        )?;
        rep.assert_within(5e-4);
    }
    Ok(())
}

#[test]
fn mask_is_seeded_row_independent_and_keeps_one_minus_p() -> Result<()> {
    let (n, k, p) = (200, 300, 0.3f32);
    let m = dropout_mask(n, k, p, 9);
    assert_eq!(m, dropout_mask(n, k, p, 9), "same seed, same mask");
    assert_ne!(m, dropout_mask(n, k, p, 10), "another seed, another mask");
    assert_ne!(m[..k], m[k..2 * k], "rows differ");
    let scale = 1.0 / (1.0 - p);
    assert!(m.iter().all(|&v| v == 0.0 || v == scale));
    let kept = m.iter().filter(|&&v| v > 0.0).count() as f64 / m.len() as f64;
    println!("seeded mask kept fraction {kept:.4} (expected {})", 1.0 - p);
    assert!((kept - (1.0 - p) as f64).abs() < 0.005);
    // Columns are not correlated with their neighbours: P(both kept) ≈ (1-p)².
    let pairs = (0..n)
        .flat_map(|i| (0..k - 1).map(move |j| (i, j)))
        .filter(|&(i, j)| m[i * k + j] > 0.0 && m[i * k + j + 1] > 0.0)
        .count() as f64
        / (n * (k - 1)) as f64;
    println!(
        "adjacent kept pairs {pairs:.4} (expected {:.4})",
        (1.0 - p).powi(2)
    );
    assert!((pairs - ((1.0 - p) as f64).powi(2)).abs() < 0.01);
    assert!(dropout_mask(3, 4, 0.0, 1).iter().all(|&v| v == 1.0));
    Ok(())
}

#[test]
fn gradients_only_for_tracked_inputs() -> Result<()> {
    let x = randn(&[5, 8], 31)?;
    let w = Var::from_tensor(&randn(&[6, 8], 32)?)?;
    let a = Var::from_tensor(&randn(&[2, 8], 33)?)?;
    let b = randn(&[6, 2], 34)?;
    let g = lora_linear(&x, w.as_tensor(), a.as_tensor(), &b, 1.0, 0.1, 3)?
        .sum_all()?
        .backward()?;
    assert!(g.get(&x).is_none() && g.get(&b).is_none());
    assert!(
        g.get(&w).is_none(),
        "the base weight is frozen even as a Var"
    );
    let da = g.get(&a).expect("dA");
    let da_ref = reference::lora_linear(&x, w.as_tensor(), a.as_tensor(), &b, 1.0, 0.1, 3)?
        .sum_all()?
        .backward()?;
    let d = max_rel_diff(da, da_ref.get(&a).expect("dA ref"))?;
    println!("lora_linear dA alone max rel diff = {d:e}");
    assert!(d < 1e-5);
    Ok(())
}

#[test]
fn bad_shapes_and_probabilities_are_errors() -> Result<()> {
    let x = randn(&[5, 8], 41)?;
    let w = randn(&[6, 8], 42)?;
    let a = randn(&[2, 8], 43)?;
    let b = randn(&[6, 2], 44)?;
    assert!(lora_linear(&x, &w, &a, &b, 1.0, 0.0, 0).is_ok());
    let bad = [
        lora_linear(&randn(&[5, 7], 45)?, &w, &a, &b, 1.0, 0.0, 0),
        lora_linear(&x.unsqueeze(0)?, &w, &a, &b, 1.0, 0.0, 0),
        lora_linear(&x, &w, &randn(&[2, 7], 46)?, &b, 1.0, 0.0, 0),
        lora_linear(&x, &w, &a, &randn(&[6, 3], 47)?, 1.0, 0.0, 0),
    ];
    for r in bad {
        assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{r:?}");
    }
    assert!(lora_linear(&x, &w, &a, &b, 1.0, 1.0, 0).is_err());
    assert!(lora_linear(&x, &w, &a, &b, 1.0, -0.1, 0).is_err());
    // Other dtypes take the composed path with the same mask.
    let f64s = |t: &Tensor| t.to_dtype(DType::F64);
    let y64 = lora_linear(&f64s(&x)?, &f64s(&w)?, &f64s(&a)?, &f64s(&b)?, 1.0, 0.2, 7)?;
    let y32 = lora_linear(&x, &w, &a, &b, 1.0, 0.2, 7)?;
    let d = max_rel_diff(&y32, &y64.to_dtype(DType::F32)?)?;
    println!("lora_linear f32 kernel vs f64 composed max rel diff = {d:e}");
    assert!(d < 1e-5);
    Ok(())
}

/// A LoRA-Dash layer's tensors: `x` (n, in), `w`, `a`, `b`, `u_s` (out, s), `v_s` (in, s),
/// `c` (s); `x`, `a`, `b`, `c` are Vars.
struct DashCase {
    x: Var,
    w: Tensor,
    a: Var,
    b: Var,
    u: Tensor,
    v: Tensor,
    c: Var,
}

impl DashCase {
    /// Odd sizes; 70 rows make two full row chunks and a partial one. `v_s` is a transposed
    /// view (strided) to exercise the kernels' strided operands.
    fn new(s: usize, seed: u64) -> Result<Self> {
        let (n, in_dim, out_dim, r) = (70, 23, 19, 3);
        Ok(DashCase {
            x: Var::from_tensor(&randn(&[n, in_dim], seed)?)?,
            w: randn(&[out_dim, in_dim], seed + 1)?,
            a: Var::from_tensor(&randn(&[r, in_dim], seed + 2)?)?,
            b: Var::from_tensor(&randn(&[out_dim, r], seed + 3)?)?,
            u: randn(&[out_dim, s], seed + 4)?,
            v: randn(&[s, in_dim], seed + 5)?.t()?,
            c: Var::from_tensor(&randn(&[s], seed + 6)?)?,
        })
    }

    fn term(&self) -> DashTerm<'_> {
        DashTerm {
            u_s: &self.u,
            v_s: &self.v,
            c: self.c.as_tensor(),
        }
    }
}

/// Value and gradients of x, a, b, c against the composed reference. With `freeze_ab` the
/// factors enter detached, as in LoRA-Dash's frozen-factor variant, and must get nothing.
fn compare_dash(s: usize, p: f32, freeze_ab: bool) -> Result<()> {
    let t = DashCase::new(s, 100 + s as u64)?;
    let (a, b) = if freeze_ab {
        (t.a.as_tensor().detach(), t.b.as_tensor().detach())
    } else {
        (t.a.as_tensor().clone(), t.b.as_tensor().clone())
    };
    let x = t.x.as_tensor();
    let run = |f: fn(_, _, _, _, _, _, _, _) -> Result<Tensor>| {
        f(x, &t.w, &a, &b, 1.75, p, 91, Some(t.term()))
    };
    let y = run(lora_dash_linear)?;
    let y_ref = run(reference::lora_dash_linear)?;
    let tag = format!("lora_dash_linear s={s} p={p} freeze_ab={freeze_ab}");
    let d = max_rel_diff(&y, &y_ref)?;
    println!("{tag} forward max rel diff = {d:e}");
    assert!(d < 1e-5, "forward {d}");
    let proj = randn(y.dims(), 105)?;
    let g = (y * &proj)?.sum_all()?.backward()?;
    let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
    let mut vars = vec![("dx", &t.x), ("dc", &t.c)];
    if freeze_ab {
        assert!(g.get(&t.a).is_none() && g.get(&t.b).is_none(), "{tag}");
    } else {
        vars.extend([("dA", &t.a), ("dB", &t.b)]);
    }
    for (name, v) in vars {
        let d = max_rel_diff(g.get(v).expect("grad"), g_ref.get(v).expect("ref grad"))?;
        println!("{tag} {name} max rel diff = {d:e}");
        assert!(d < 1e-5, "{tag} {name}: {d}");
    }
    Ok(())
}

#[test]
fn dash_matches_reference() -> Result<()> {
    for s in [1, 8] {
        for p in [0.0, 0.3] {
            for freeze_ab in [false, true] {
                compare_dash(s, p, freeze_ab)?;
            }
        }
    }
    Ok(())
}

#[test]
fn dash_at_zero_scales_still_gets_its_gradient() -> Result<()> {
    // LoRA-Dash starts c at 0: the output is plain LoRA's, but dc is not zero.
    let t = DashCase::new(4, 130)?;
    let c0 = Var::from_tensor(&Tensor::zeros(4, DType::F32, &Device::Cpu)?)?;
    let term = DashTerm {
        c: c0.as_tensor(),
        ..t.term()
    };
    let (x, a, b) = (t.x.as_tensor(), t.a.as_tensor(), t.b.as_tensor());
    let y = lora_dash_linear(x, &t.w, a, b, 2.0, 0.2, 4, Some(term))?;
    let y_lora = lora_linear(x, &t.w, a, b, 2.0, 0.2, 4)?;
    assert_eq!(max_abs_diff(&y, &y_lora)?, 0.0);
    let proj = randn(y.dims(), 131)?;
    let g = (&y * &proj)?.sum_all()?.backward()?;
    let y_ref = reference::lora_dash_linear(x, &t.w, a, b, 2.0, 0.2, 4, Some(term))?;
    let g_ref = (y_ref * &proj)?.sum_all()?.backward()?;
    let (dc, dc_ref) = (g.get(&c0).expect("dc"), g_ref.get(&c0).expect("dc ref"));
    let d = max_rel_diff(dc, dc_ref)?;
    println!("lora_dash_linear dc at c = 0: {dc} max rel diff = {d:e}");
    assert!(d < 1e-5 && dc.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn dash_finite_differences() -> Result<()> {
    let (w, u, v) = (
        randn(&[7, 9], 141)?,
        randn(&[7, 2], 142)?,
        randn(&[9, 2], 143)?,
    );
    for p in [0.0, 0.4] {
        let rep = finite_difference_check(
            &format!("lora_dash_linear p={p}"),
            |t: &[Tensor]| {
                let dash = DashTerm {
                    u_s: &u,
                    v_s: &v,
                    c: &t[3],
                };
                lora_dash_linear(&t[0], &w, &t[1], &t[2], 1.5, p, 5, Some(dash))
            },
            &[
                randn(&[40, 9], 144)?,
                randn(&[3, 9], 145)?,
                randn(&[7, 3], 146)?,
                randn(&[2], 147)?,
            ],
            &[0, 1, 2, 3],
            1e-2,
        )?;
        rep.assert_within(5e-4);
    }
    Ok(())
}

#[test]
fn dash_gradients_only_for_tracked_inputs() -> Result<()> {
    // Only c trains; the frozen directions get nothing even as Vars.
    let t = DashCase::new(3, 150)?;
    let (x, a, b) = (
        t.x.as_tensor().detach(),
        t.a.as_tensor().detach(),
        t.b.as_tensor(),
    );
    let (u, v) = (Var::from_tensor(&t.u)?, Var::from_tensor(&t.v)?);
    let term = DashTerm {
        u_s: u.as_tensor(),
        v_s: v.as_tensor(),
        c: t.c.as_tensor(),
    };
    let b = b.detach();
    let g = lora_dash_linear(&x, &t.w, &a, &b, 1.0, 0.1, 3, Some(term))?
        .sum_all()?
        .backward()?;
    assert!(g.get(&u).is_none() && g.get(&v).is_none());
    assert!(g.get(&t.x).is_none() && g.get(&t.a).is_none() && g.get(&t.b).is_none());
    let g_ref = reference::lora_dash_linear(&x, &t.w, &a, &b, 1.0, 0.1, 3, Some(term))?
        .sum_all()?
        .backward()?;
    let d = max_rel_diff(g.get(&t.c).expect("dc"), g_ref.get(&t.c).expect("dc ref"))?;
    println!("lora_dash_linear dc alone max rel diff = {d:e}");
    assert!(d < 1e-5);
    // Only A tracked among the packed factors: B's half of the packed gradient is dropped.
    let g = lora_dash_linear(&x, &t.w, t.a.as_tensor(), &b, 1.0, 0.1, 3, Some(t.term()))?
        .sum_all()?
        .backward()?;
    assert!(g.get(&t.b).is_none());
    let g_ref =
        reference::lora_dash_linear(&x, &t.w, t.a.as_tensor(), &b, 1.0, 0.1, 3, Some(t.term()))?
            .sum_all()?
            .backward()?;
    let d = max_rel_diff(g.get(&t.a).expect("dA"), g_ref.get(&t.a).expect("dA ref"))?;
    println!("lora_dash_linear dA with B frozen max rel diff = {d:e}");
    assert!(d < 1e-5);
    Ok(())
}

#[test]
fn dash_bad_shapes_s0_and_other_dtypes() -> Result<()> {
    let t = DashCase::new(2, 160)?;
    let (x, a, b) = (t.x.as_tensor(), t.a.as_tensor(), t.b.as_tensor());
    let run = |d: DashTerm| lora_dash_linear(x, &t.w, a, b, 1.0, 0.0, 0, Some(d));
    let wrong = [
        randn(&[19, 3], 161)?,
        randn(&[22, 2], 162)?,
        randn(&[2, 1], 163)?,
    ];
    let bad = [
        run(DashTerm {
            u_s: &wrong[0],
            ..t.term()
        }),
        run(DashTerm {
            v_s: &wrong[1],
            ..t.term()
        }),
        run(DashTerm {
            c: &wrong[2],
            ..t.term()
        }),
    ];
    for r in bad {
        assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{r:?}");
    }
    // s = 0 is plain LoRA.
    let empty = [
        Tensor::zeros((19, 0), DType::F32, &Device::Cpu)?,
        Tensor::zeros((23, 0), DType::F32, &Device::Cpu)?,
        Tensor::zeros(0, DType::F32, &Device::Cpu)?,
    ];
    let y0 = run(DashTerm {
        u_s: &empty[0],
        v_s: &empty[1],
        c: &empty[2],
    })?;
    let y_lora = lora_linear(x, &t.w, a, b, 1.0, 0.0, 0)?;
    assert_eq!(max_abs_diff(&y0, &y_lora)?, 0.0);
    // Other dtypes take the composed path with the same mask.
    let f64s = |t: &Tensor| t.to_dtype(DType::F64);
    let (u64_, v64, c64) = (f64s(&t.u)?, f64s(&t.v)?, f64s(t.c.as_tensor())?);
    let term64 = DashTerm {
        u_s: &u64_,
        v_s: &v64,
        c: &c64,
    };
    let y64 = lora_dash_linear(
        &f64s(x)?,
        &f64s(&t.w)?,
        &f64s(a)?,
        &f64s(b)?,
        1.0,
        0.2,
        7,
        Some(term64),
    )?;
    let y32 = lora_dash_linear(x, &t.w, a, b, 1.0, 0.2, 7, Some(t.term()))?;
    let d = max_rel_diff(&y32, &y64.to_dtype(DType::F32)?)?;
    println!("lora_dash_linear f32 kernel vs f64 composed max rel diff = {d:e}");
    assert!(d < 1e-5);
    Ok(())
}
