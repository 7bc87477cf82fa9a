//! Tests of the fused disentangled attention against the composed reference and finite
//! differences: every combination of the c2p / p2c terms, with and without padding
//! (including an all-padding sequence), strided q / k / v as a model cuts heads.

use super::*;
use crate::ops::gradcheck::{finite_difference_check, host_f64, max_rel_diff, randn};
use candle_core::{Device, Var};

const B: usize = 3;
const H: usize = 2;
const T: usize = 7;
const D: usize = 4;

/// Tables of a bucketed-like geometry: rel[i][j] = i - j clamped by span. With span 3
/// every relative row is used; with span 8 only rows 2..=14 of 16 are.
fn index(span: usize) -> RelIndex {
    let s = span as i64;
    let clamp = |x: i64| x.clamp(0, 2 * s - 1) as u32;
    let mut c2p = Vec::new();
    let mut p2c = Vec::new();
    for i in 0..T as i64 {
        for j in 0..T as i64 {
            // A non-symmetric stand-in for buckets: the tables need not mirror each other.
            c2p.push(clamp(i - j + s));
            p2c.push(clamp(s - (j - i) / 2));
        }
    }
    RelIndex::new(T, span, c2p, p2c).unwrap()
}

fn mask(all_padding_row: bool) -> Tensor {
    let mut m = vec![1f32; B * T];
    // Row 1: 4 real tokens; row 2: none (or all real).
    m[T + 4..2 * T].iter_mut().for_each(|x| *x = 0.0);
    if all_padding_row {
        m[2 * T..].iter_mut().for_each(|x| *x = 0.0);
    }
    Tensor::from_vec(m, (B, T), &Device::Cpu).unwrap()
}

struct Inputs {
    /// (b, t, h, d + 1) leaves; q, k, v are strided (b, h, t, d) views of them.
    q: Var,
    k: Var,
    v: Var,
    pk: Var,
    pq: Var,
}

fn inputs(span: usize) -> Result<Inputs> {
    let leaf =
        |dims: &[usize], seed: u64| -> Result<Var> { Ok(Var::from_tensor(&randn(dims, seed)?)?) };
    Ok(Inputs {
        q: leaf(&[B, T, H, D + 1], 1)?,
        k: leaf(&[B, T, H, D + 1], 2)?,
        v: leaf(&[B, T, H, D + 1], 3)?,
        pk: leaf(&[H, 2 * span, D], 4)?,
        pq: leaf(&[H, 2 * span, D], 5)?,
    })
}

fn view(x: &Tensor) -> Result<Tensor> {
    Ok(x.narrow(3, 1, D)?.transpose(1, 2)?) // (b, t, h, d + 1) -> (b, h, t, d)
}

#[test]
fn fused_matches_reference_values_and_gradients() -> Result<()> {
    let scale = 1.0 / ((D * 3) as f64).sqrt();
    for (span, c2p, p2c, m) in [3, 8].into_iter().flat_map(|span| {
        [(true, true), (true, false), (false, true), (false, false)]
            .into_iter()
            .flat_map(move |(a, b)| {
                [None, Some(mask(false)), Some(mask(true))]
                    .into_iter()
                    .map(move |m| (span, a, b, m))
            })
    }) {
        let rel = index(span);
        let x = inputs(span)?;
        {
            let label = format!("span {span} c2p {c2p} p2c {p2c} mask {}", m.is_some());
            let run = |fused: bool| -> Result<(Tensor, candle_core::backprop::GradStore)> {
                let (q, k, v) = (
                    view(x.q.as_tensor())?,
                    view(x.k.as_tensor())?,
                    view(x.v.as_tensor())?,
                );
                let pk = c2p.then(|| x.pk.as_tensor());
                let pq = p2c.then(|| x.pq.as_tensor());
                let y = if fused {
                    disentangled_attention(&q, &k, &v, pk, pq, Some(&rel), m.as_ref(), scale)?
                } else {
                    reference::disentangled_attention(
                        &q,
                        &k,
                        &v,
                        pk,
                        pq,
                        Some(&rel),
                        m.as_ref(),
                        scale,
                    )?
                };
                let w = randn(&[B, H, T, D], 9)?;
                let g = (&y * w)?.sum_all()?.backward()?;
                Ok((y, g))
            };
            let (y, g) = run(true)?;
            let (y_ref, g_ref) = run(false)?;
            let d = max_rel_diff(&y, &y_ref)?;
            println!("{label}: forward max rel diff {d:e}");
            assert!(d < 1e-5, "{label} forward: {d}");
            assert!(host_f64(&y)?.iter().all(|v| v.is_finite()));
            let mut vars = vec![("q", &x.q), ("k", &x.k), ("v", &x.v)];
            if c2p {
                vars.push(("pk", &x.pk));
            }
            if p2c {
                vars.push(("pq", &x.pq));
            }
            for (name, var) in vars {
                let got = g.get(var).expect("fused gradient");
                let want = g_ref.get(var).expect("reference gradient");
                let d = max_rel_diff(got, want)?;
                println!("{label}: d{name} max rel diff {d:e}");
                assert!(d < 1e-5, "{label} d{name}: {d}");
            }
        }
    }
    Ok(())
}

/// Padding query rows output zeros, as `XSoftmax` gives.
#[test]
fn padding_rows_are_zero() -> Result<()> {
    let rel = index(3);
    let x = inputs(3)?;
    let (q, k, v) = (
        view(x.q.as_tensor())?,
        view(x.k.as_tensor())?,
        view(x.v.as_tensor())?,
    );
    let m = mask(true);
    let y = disentangled_attention(
        &q,
        &k,
        &v,
        Some(x.pk.as_tensor()),
        Some(x.pq.as_tensor()),
        Some(&rel),
        Some(&m),
        0.3,
    )?;
    let y = host_f64(&y)?; // (b, h, t, d)
    for bi in 0..B {
        for hi in 0..H {
            for ti in 0..T {
                let padded = (bi == 1 && ti >= 4) || bi == 2;
                let row = &y[((bi * H + hi) * T + ti) * D..][..D];
                assert_eq!(
                    row.iter().all(|&v| v == 0.0),
                    padded,
                    "b {bi} h {hi} t {ti}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn fused_gradients_match_finite_differences() -> Result<()> {
    for span in [3, 8] {
        finite_differences(span)?;
    }
    Ok(())
}

fn finite_differences(span: usize) -> Result<()> {
    let rel = index(span);
    let m = mask(false);
    let f = |xs: &[Tensor]| -> Result<Tensor> {
        disentangled_attention(
            &view(&xs[0])?,
            &view(&xs[1])?,
            &view(&xs[2])?,
            Some(&xs[3]),
            Some(&xs[4]),
            Some(&rel),
            Some(&m),
            0.4,
        )
    };
    let xs = [
        randn(&[B, T, H, D + 1], 11)?,
        randn(&[B, T, H, D + 1], 12)?,
        randn(&[B, T, H, D + 1], 13)?,
        randn(&[H, 2 * span, D], 14)?,
        randn(&[H, 2 * span, D], 15)?,
    ];
    finite_difference_check("disentangled attention", f, &xs, &[0, 1, 2, 3, 4], 1e-2)?
        .assert_within(2e-3);
    Ok(())
}

#[test]
fn bad_shapes_are_refused() -> Result<()> {
    let span = 3;
    let rel = index(span);
    let q = randn(&[B, H, T, D], 1)?;
    let pk = randn(&[H, 2 * span + 1, D], 2)?;
    let e = disentangled_attention(&q, &q, &q, Some(&pk), None, Some(&rel), None, 1.0);
    assert!(e.is_err());
    let e = disentangled_attention(&q, &q, &q, Some(&pk), None, None, None, 1.0);
    assert!(e.err().unwrap().to_string().contains("index tables"));
    assert!(RelIndex::new(T, span, vec![6; T * T], vec![0; T * T]).is_err());
    Ok(())
}
