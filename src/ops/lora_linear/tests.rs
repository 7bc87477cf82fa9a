//! Tests of the fused LoRA linear op against the composed reference and finite differences.

use super::*;
use crate::ops::gradcheck::{finite_difference_check, max_rel_diff, randn};
use crate::ops::reference;
use candle_core::{DType, Var};

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
