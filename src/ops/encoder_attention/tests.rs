//! Tests of the fused encoder attention against the composed reference and finite
//! differences.

use super::*;
use crate::ops::gradcheck::{finite_difference_check, host_f64, max_abs_diff, max_rel_diff, randn};
use crate::ops::reference;
use candle_core::{DType, Device, Var};

/// One comparison: sizes, an optional key mask and bias shape, and whether q, k, v are
/// strided views (a slice of the last dim of (b, n, h, d + 2) leaves, transposed to
/// (b, h, n, d), like heads cut from a fused projection) whose output is consumed
/// transposed back, as a model merges heads.
struct Case<'a> {
    label: &'a str,
    dims: [usize; 5], // b, h, t, s, d
    mask: Option<&'a Tensor>,
    bias: Option<[usize; 4]>,
    strided: bool,
}

fn assert_finite(name: &str, x: &Tensor) -> Result<()> {
    assert!(
        host_f64(x)?.iter().all(|v| v.is_finite()),
        "{name} has a non-finite entry"
    );
    Ok(())
}

/// Values and the gradients of q, k, v and the bias against the composed reference.
fn compare(c: Case) -> Result<()> {
    let [b, h, t, s, d] = c.dims;
    let leaf = |rows: usize, seed: u64, mul: f64| -> Result<Var> {
        let dims = if c.strided {
            [b, rows, h, d + 2]
        } else {
            [b, h, rows, d]
        };
        Ok(Var::from_tensor(&(randn(&dims, seed)? * mul)?)?)
    };
    let (q, k, v) = (leaf(t, 61, 2.0)?, leaf(s, 62, 1.0)?, leaf(s, 63, 1.0)?);
    let view = |x: &Var| -> Result<Tensor> {
        Ok(if c.strided {
            x.as_tensor().narrow(3, 1, d)?.transpose(1, 2)? // (b, n, h, d + 2) -> (b, h, n, d)
        } else {
            x.as_tensor().clone()
        })
    };
    let (qv, kv, vv) = (view(&q)?, view(&k)?, view(&v)?);
    let bias = match c.bias {
        Some(dims) => Some(Var::from_tensor(&(randn(&dims, 64)? * 2.0)?)?),
        None => None,
    };
    let bias_t = bias.as_ref().map(|x| x.as_tensor());
    let scale = 1.0 / (d as f64).sqrt();
    let y = attention(&qv, &kv, &vv, c.mask, bias_t, scale)?;
    let y_ref = reference::attention(&qv, &kv, &vv, c.mask, bias_t, scale)?;
    let diff = max_abs_diff(&y, &y_ref)?;
    println!("attention {} forward max |diff| = {diff:e}", c.label);
    assert!(diff < 1e-5, "forward: {diff}");
    assert_finite("output", &y)?;
    let loss = |y: Tensor| -> Result<Tensor> {
        Ok(if c.strided {
            let y = y.transpose(1, 2)?; // (b, h, t, d) -> (b, t, h, d)
            (y * randn(&[b, t, h, d], 65)?)?.sum_all()?
        } else {
            (y * randn(&[b, h, t, d], 65)?)?.sum_all()?
        })
    };
    let g = loss(y)?.backward()?;
    let g_ref = loss(y_ref)?.backward()?;
    let mut vars = vec![("dq", &q), ("dk", &k), ("dv", &v)];
    if let Some(bias) = &bias {
        vars.push(("dbias", bias));
    }
    for (name, var) in vars {
        let (got, want) = (g.get(var).expect("grad"), g_ref.get(var).expect("ref grad"));
        assert_finite(name, got)?;
        let diff = max_rel_diff(got, want)?;
        println!("attention {} {name} max rel diff = {diff:e}", c.label);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    Ok(())
}

/// (b, s) mask whose row `i` pads keys `j` with `(i + 2 j) % 5 == 0`, row 0 left whole.
fn ragged_mask(b: usize, s: usize) -> Result<Tensor> {
    let m: Vec<f32> = (0..b)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if i > 0 && (i + 2 * j) % 5 == 0 {
                    0.0
                } else {
                    1.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(m, (b, s), &Device::Cpu)?)
}

#[test]
fn matches_reference_without_mask_or_bias() -> Result<()> {
    let cases = [
        ("square", [2, 3, 8, 8, 16], false),
        ("batch 1, one head, t != s, odd d", [1, 1, 5, 9, 3], false),
        ("strided q, k, v", [2, 3, 6, 6, 8], true),
        ("encoder size", [2, 4, 128, 128, 32], false),
    ];
    for (label, dims, strided) in cases {
        compare(Case {
            label,
            dims,
            mask: None,
            bias: None,
            strided,
        })?;
    }
    Ok(())
}

#[test]
fn padding_mask_with_every_bias_shape() -> Result<()> {
    // Rows: all real; right padding; holes.
    let mask = Tensor::new(
        &[
            [1f32, 1., 1., 1., 1., 1., 1.],
            [1., 1., 1., 1., 0., 0., 0.],
            [0., 1., 1., 0., 1., 1., 1.],
        ],
        &Device::Cpu,
    )?;
    compare(Case {
        label: "mask, no bias",
        dims: [3, 2, 5, 7, 5],
        mask: Some(&mask),
        bias: None,
        strided: false,
    })?;
    for (label, bias, strided) in [
        ("bias (b, h, t, s)", [3, 2, 5, 7], false),
        ("bias (1, h, t, s)", [1, 2, 5, 7], true),
        ("bias (b, 1, t, s)", [3, 1, 5, 7], false),
        ("bias (1, 1, t, s)", [1, 1, 5, 7], true),
    ] {
        compare(Case {
            label,
            dims: [3, 2, 5, 7, 5],
            mask: Some(&mask),
            bias: Some(bias),
            strided,
        })?;
    }
    Ok(())
}

#[test]
fn broadcast_bias_gradient_over_many_heads() -> Result<()> {
    // 80 heads: a broadcast bias is reduced through per-group partial sums.
    let mask = ragged_mask(20, 10)?;
    for (label, bias) in [
        ("80 heads, bias (1, h, t, s)", [1, 4, 6, 10]),
        ("80 heads, bias (b, 1, t, s)", [20, 1, 6, 10]),
        ("80 heads, bias (1, 1, t, s)", [1, 1, 6, 10]),
        ("80 heads, bias (b, h, t, s)", [20, 4, 6, 10]),
    ] {
        compare(Case {
            label,
            dims: [20, 4, 6, 10, 8],
            mask: Some(&mask),
            bias: Some(bias),
            strided: false,
        })?;
    }
    Ok(())
}

#[test]
fn rows_without_real_keys_output_zero() -> Result<()> {
    // Batch row 1 is all padding.
    let mask = Tensor::new(&[[1f32, 0., 1., 1.], [0., 0., 0., 0.]], &Device::Cpu)?;
    compare(Case {
        label: "all-padding row",
        dims: [2, 2, 3, 4, 4],
        mask: Some(&mask),
        bias: Some([1, 2, 3, 4]),
        strided: false,
    })?;
    let q = Var::from_tensor(&randn(&[2, 2, 3, 4], 1)?)?;
    let k = Var::from_tensor(&randn(&[2, 2, 4, 4], 2)?)?;
    let bias = Var::from_tensor(&randn(&[2, 1, 3, 4], 3)?)?;
    let y = attention(
        q.as_tensor(),
        k.as_tensor(),
        k.as_tensor(),
        Some(&mask),
        Some(bias.as_tensor()),
        0.5,
    )?;
    assert_finite("output", &y)?;
    let padded = y.narrow(0, 1, 1)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    assert_eq!(padded, 0.0, "the all-padding row must output zeros");
    let g = y.sqr()?.sum_all()?.backward()?;
    for (name, var) in [("dq", &q), ("dk", &k), ("dbias", &bias)] {
        let grad = g.get(var).expect("grad");
        assert_finite(name, grad)?;
        let row1 = grad.narrow(0, 1, 1)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(row1, 0.0, "{name} of the all-padding row must be zero");
    }
    Ok(())
}

#[test]
fn constant_bias_and_frozen_key_value() -> Result<()> {
    let mask = ragged_mask(2, 6)?;
    let q = Var::from_tensor(&randn(&[2, 3, 4, 5], 71)?)?;
    let k = randn(&[2, 3, 6, 5], 72)?;
    let v = randn(&[2, 3, 6, 5], 73)?;
    let bias = randn(&[1, 3, 4, 6], 74)?;
    let y = attention(q.as_tensor(), &k, &v, Some(&mask), Some(&bias), 0.4)?;
    let y_ref = reference::attention(q.as_tensor(), &k, &v, Some(&mask), Some(&bias), 0.4)?;
    let diff = max_abs_diff(&y, &y_ref)?;
    println!("attention constant bias forward max |diff| = {diff:e}");
    assert!(diff < 1e-5);
    let g = y.sqr()?.sum_all()?.backward()?;
    let g_ref = y_ref.sqr()?.sum_all()?.backward()?;
    assert!(g.get(&k).is_none() && g.get(&v).is_none() && g.get(&bias).is_none());
    let diff = max_rel_diff(g.get(&q).expect("dq"), g_ref.get(&q).expect("dq ref"))?;
    println!("attention constant bias dq max rel diff = {diff:e}");
    assert!(diff < 1e-5);
    Ok(())
}

#[test]
fn finite_differences() -> Result<()> {
    let mask = Tensor::new(&[[1f32, 1., 0., 1.], [0., 1., 1., 1.]], &Device::Cpu)?;
    let q = randn(&[2, 2, 3, 3], 81)?;
    let k = randn(&[2, 2, 4, 3], 82)?;
    let v = randn(&[2, 2, 4, 3], 83)?;
    for bias_dims in [[2, 1, 3, 4], [1, 2, 3, 4]] {
        let bias = randn(&bias_dims, 84)?;
        let rep = finite_difference_check(
            &format!("attention bias {bias_dims:?}"),
            |t: &[Tensor]| attention(&t[0], &t[1], &t[2], Some(&mask), Some(&t[3]), 0.7),
            &[q.clone(), k.clone(), v.clone(), bias],
            &[0, 1, 2, 3],
            1e-2,
        )?;
        rep.assert_within(1e-3);
    }
    let rep = finite_difference_check(
        "attention no bias",
        |t: &[Tensor]| attention(&t[0], &t[1], &t[2], Some(&mask), None, 0.7),
        &[q, k, v],
        &[0, 1, 2],
        1e-2,
    )?;
    rep.assert_within(1e-3);
    Ok(())
}

#[test]
fn bad_shapes_are_errors() -> Result<()> {
    let q = randn(&[2, 3, 4, 5], 1)?;
    let k = randn(&[2, 3, 6, 5], 2)?;
    let shape_err = |r: Result<Tensor>| matches!(r, Err(Error::ShapeMismatch { .. }));
    assert!(shape_err(attention(
        &q,
        &randn(&[2, 3, 6, 4], 3)?,
        &k,
        None,
        None,
        1.0
    )));
    assert!(shape_err(attention(
        &q,
        &k,
        &randn(&[2, 3, 5, 5], 3)?,
        None,
        None,
        1.0
    )));
    assert!(shape_err(attention(
        &q,
        &k,
        &k,
        Some(&randn(&[2, 5], 4)?),
        None,
        1.0
    )));
    for bad in [&[2, 3, 4][..], &[3, 3, 4, 6], &[2, 2, 4, 6], &[2, 3, 6, 4]] {
        let bias = randn(bad, 5)?;
        assert!(
            shape_err(attention(&q, &k, &k, None, Some(&bias), 1.0)),
            "{bad:?}"
        );
    }
    assert!(attention(&q, &k, &k, None, None, f64::NAN).is_err());
    Ok(())
}

#[test]
fn no_keys_at_all_outputs_zeros() -> Result<()> {
    let q = Var::from_tensor(&randn(&[2, 3, 4, 5], 1)?)?;
    let k = Var::from_tensor(&randn(&[2, 3, 0, 5], 2)?)?;
    let bias = Var::from_tensor(&randn(&[1, 3, 4, 0], 3)?)?;
    let y = attention(
        q.as_tensor(),
        k.as_tensor(),
        k.as_tensor(),
        None,
        Some(bias.as_tensor()),
        1.0,
    )?;
    assert_eq!(y.dims(), [2, 3, 4, 5]);
    assert_eq!(y.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    let g = y.sum_all()?.backward()?;
    let dq = g.get(&q).expect("dq");
    assert_eq!(dq.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    assert_eq!(g.get(&bias).expect("dbias").dims(), [1, 3, 4, 0]);
    Ok(())
}

#[test]
fn f64_inputs_take_the_composed_path() -> Result<()> {
    let mask = ragged_mask(2, 5)?;
    let q = randn(&[2, 2, 3, 4], 91)?;
    let k = randn(&[2, 2, 5, 4], 92)?;
    let v = randn(&[2, 2, 5, 4], 93)?;
    let bias = randn(&[2, 1, 3, 5], 94)?;
    let y = attention(&q, &k, &v, Some(&mask), Some(&bias), 0.5)?;
    let f64s = |x: &Tensor| x.to_dtype(DType::F64);
    let y64 = attention(
        &f64s(&q)?,
        &f64s(&k)?,
        &f64s(&v)?,
        Some(&mask),
        Some(&f64s(&bias)?),
        0.5,
    )?;
    assert_eq!(y64.dtype(), DType::F64);
    let diff = max_abs_diff(&y.to_dtype(DType::F64)?, &y64)?;
    println!("attention f32 fused vs f64 composed max |diff| = {diff:e}");
    assert!(diff < 1e-6, "{diff}");
    Ok(())
}
