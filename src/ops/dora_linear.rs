//! A frozen linear layer with a DoRA term (Liu et al., 2024, "DoRA: Weight-Decomposed
//! Low-Rank Adaptation"), exactly as PEFT 0.13's `DoraLinearLayer.forward` and
//! `LoraLayer.forward` compute it:
//!
//!   k = m / ‖W + s·B·A‖_row          (out), the norm detached (DoRA §4.3)
//!   y = x·Wᵀ + (k − 1) ⊙ (drop(x)·Wᵀ) + k ⊙ s·(drop(x)·Aᵀ)·Bᵀ
//!
//! With dropout active PEFT feeds the dropped `x` to the base product inside DoRA, so the
//! output is `(x − drop(x))·Wᵀ + k ⊙ [drop(x)·Wᵀ + s·drop(x)·Aᵀ·Bᵀ]`; without dropout it is
//! `k ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ)`. The bracket is the fused LoRA op (`ops::lora_linear`) on
//! `drop(x)`, so the (n, out) work runs in its single accumulating GEMM and its backward;
//! DoRA adds the row norm (an (out, in) pass per call, as PEFT), one broadcast multiply,
//! and, with dropout, one frozen product of `x − drop(x)`.
//!
//! Gradients (g = dy): dm = Σ_rows g ⊙ [drop(x)·Wᵀ + s·drop(x)·Aᵀ·Bᵀ] / ‖·‖_row;
//! A, B and x get the fused op's gradients of `k ⊙ g`, x also `g·W` minus its dropped part.
//! The norm gets none.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// ‖W + s·B·A‖ per output row (out), detached: `w (out, in)`, `a (r, in)`, `b (out, r)`.
pub fn dora_weight_norm(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let ba = b.detach().matmul(&a.detach())?; // (out, in)
    let v = (w.detach().to_dtype(ba.dtype())? + (ba * scale)?)?;
    Ok(v.sqr()?.sum(D::Minus1)?.sqrt()?.detach())
}

/// `y (n, out)` of the module header for `x (n, in)`, `w (out, in)` frozen, `a (r, in)`,
/// `b (out, r)`, `m (out)`. `drop` is the seeded inverted dropout of
/// [`crate::ops::lora_dropout_mask`]. Gradients flow to `x`, `a`, `b` and `m` (each when
/// tracked), never to `w`.
#[allow(clippy::too_many_arguments)]
pub fn dora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    m: &Tensor,
    scale: f64,
    dropout_p: f32,
    seed: u64,
) -> Result<Tensor> {
    let out_dim = w.dims2()?.0;
    if m.dims() != [out_dim] {
        return Err(Error::ShapeMismatch {
            name: "dora_linear m".into(),
            expected: vec![out_dim],
            got: m.dims().to_vec(),
        });
    }
    let norm = dora_weight_norm(w, a, b, scale)?;
    dora_linear_with_norm(x, w, a, b, m, &norm, scale, dropout_p, seed)
}

/// [`dora_linear`] with the row norm given (a constant: it gets no gradient).
#[allow(clippy::too_many_arguments)]
pub fn dora_linear_with_norm(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    m: &Tensor,
    norm: &Tensor,
    scale: f64,
    dropout_p: f32,
    seed: u64,
) -> Result<Tensor> {
    let k = m.broadcast_div(&norm.detach())?; // (out)
    if dropout_p == 0.0 {
        let z = crate::ops::lora_linear(x, w, a, b, scale, 0.0, 0)?; // (n, out)
        return Ok(z.broadcast_mul(&k)?);
    }
    let xd = crate::ops::reference::seeded_dropout(x, dropout_p, seed)?; // (n, in)
    let z = crate::ops::lora_linear(&xd, w, a, b, scale, 0.0, 0)?; // (n, out)
    let rest = crate::ops::frozen_linear(&(x - &xd)?, w)?; // (n, out)
    Ok((rest + z.broadcast_mul(&k)?)?)
}

/// PEFT's computation written out with plain candle ops, term by term.
pub mod reference {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    pub fn dora_linear(
        x: &Tensor,
        w: &Tensor,
        a: &Tensor,
        b: &Tensor,
        m: &Tensor,
        scale: f64,
        dropout_p: f32,
        seed: u64,
    ) -> Result<Tensor> {
        let w = w.detach().to_dtype(x.dtype())?;
        let xd = crate::ops::reference::seeded_dropout(x, dropout_p, seed)?; // (n, in)
        let lora = (xd.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?; // (n, out)
        let norm = dora_weight_norm(&w, a, b, scale)?; // (out)
        let k = m.broadcast_div(&norm)?.unsqueeze(0)?; // (1, out)
        let base = x.matmul(&w.t()?)?; // (n, out)
        let base_d = xd.matmul(&w.t()?)?; // (n, out)
        let dora = ((k.affine(1.0, -1.0)?).broadcast_mul(&base_d)? + k.broadcast_mul(&lora)?)?;
        Ok((base + dora)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{finite_difference_check, max_rel_diff, randn};
    use candle_core::Var;

    const N: usize = 5;
    const IN: usize = 7;
    const OUT: usize = 6;
    const R: usize = 3;
    const S: f64 = 1.5;

    struct Inputs {
        x: Var,
        w: Tensor,
        a: Var,
        b: Var,
        m: Var,
    }

    fn inputs() -> Inputs {
        let w = randn(&[OUT, IN], 2).unwrap();
        let a = randn(&[R, IN], 3).unwrap();
        let b = (randn(&[OUT, R], 4).unwrap() * 0.5).unwrap();
        // Magnitudes near the row norms, as after DoRA's init and a few steps.
        let m = (dora_weight_norm(&w, &a, &b, S).unwrap()
            * (randn(&[OUT], 5).unwrap() * 0.1)
                .unwrap()
                .affine(1.0, 1.0)
                .unwrap())
        .unwrap();
        Inputs {
            x: Var::from_tensor(&randn(&[N, IN], 1).unwrap()).unwrap(),
            w,
            a: Var::from_tensor(&a).unwrap(),
            b: Var::from_tensor(&b).unwrap(),
            m: Var::from_tensor(&m).unwrap(),
        }
    }

    type Op = fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, f64, f32, u64) -> Result<Tensor>;

    fn run(op: Op, i: &Inputs, p: f32) -> (Tensor, Vec<Tensor>) {
        let y = op(
            i.x.as_tensor(),
            &i.w,
            i.a.as_tensor(),
            i.b.as_tensor(),
            i.m.as_tensor(),
            S,
            p,
            17,
        )
        .unwrap();
        // A fixed non-uniform upstream gradient.
        let c = randn(&[N, OUT], 9).unwrap();
        let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = [&i.x, &i.a, &i.b, &i.m]
            .iter()
            .map(|v| g.get(v.as_tensor()).expect("gradient").clone())
            .collect();
        (y, grads)
    }

    /// The op against the composed reference, forward and the four gradients, with and
    /// without dropout.
    #[test]
    fn matches_composed_reference() {
        let i = inputs();
        for p in [0.0, 0.3] {
            let (y, g) = run(dora_linear, &i, p);
            let (yr, gr) = run(reference::dora_linear, &i, p);
            let d = max_rel_diff(&y, &yr).unwrap();
            println!("p = {p}: forward max rel diff {d:e}");
            assert!(d < 1e-5, "{d}");
            for (name, (a, b)) in ["x", "a", "b", "m"].iter().zip(g.iter().zip(&gr)) {
                let d = max_rel_diff(a, b).unwrap();
                println!("p = {p}: d{name} max rel diff {d:e}");
                assert!(d < 1e-4, "d{name}: {d}");
            }
        }
    }

    /// Without dropout the output is k ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ), and at DoRA's init (m the row
    /// norms of W + s·B·A) it is the LoRA output.
    #[test]
    fn magnitude_at_init_reproduces_lora() {
        let i = inputs();
        let m = dora_weight_norm(&i.w, i.a.as_tensor(), i.b.as_tensor(), S).unwrap();
        let y = dora_linear(
            i.x.as_tensor(),
            &i.w,
            i.a.as_tensor(),
            i.b.as_tensor(),
            &m,
            S,
            0.0,
            0,
        )
        .unwrap();
        let l = crate::ops::reference::lora_linear(
            i.x.as_tensor(),
            &i.w,
            i.a.as_tensor(),
            i.b.as_tensor(),
            S,
            0.0,
            0,
        )
        .unwrap();
        let d = max_rel_diff(&y, &l).unwrap();
        println!("DoRA at init vs LoRA: {d:e}");
        assert!(d < 1e-6, "{d}");
    }

    /// Gradients of x, A, B and m against central differences, with the row norm held at
    /// its value (DoRA's backward treats it as a constant).
    #[test]
    fn gradients_match_finite_differences() {
        let w = randn(&[7, 9], 21).unwrap();
        let (a0, b0) = (randn(&[3, 9], 23).unwrap(), randn(&[7, 3], 24).unwrap());
        let norm = dora_weight_norm(&w, &a0, &b0, 1.5).unwrap();
        for p in [0.0, 0.4] {
            let rep = finite_difference_check(
                &format!("dora_linear p={p}"),
                |t: &[Tensor]| {
                    dora_linear_with_norm(&t[0], &w, &t[1], &t[2], &t[3], &norm, 1.5, p, 5)
                },
                &[
                    randn(&[40, 9], 22).unwrap(),
                    a0.clone(),
                    b0.clone(),
                    (&norm * 1.1).unwrap(),
                ],
                &[0, 1, 2, 3],
                1e-2,
            )
            .unwrap();
            rep.assert_within(5e-4);
        }
    }
}
