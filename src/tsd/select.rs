//! Task-specific directions (LoRA-Dash, Si et al. 2025, §3–4): the change rate of each core
//! direction of W under ΔW, δ_i = |u_iᵀ ΔW v_i| / σ_i, and the top-s directions.
//!
//! With ΔW = s·B·A, u_iᵀ ΔW v_i = s·Σ_j (UᵀB)_{ij} (AV)_{ji}: two thin products, never ΔW.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// δ for every core direction. `u` (out, k), `v` (in, k), `a` (r, in), `b` (out, r).
/// Directions with σ_i = 0 get δ_i = 0 and are never selected (see [`top_s`]).
pub fn change_rates(
    u: &Tensor,
    sigma: &[f32],
    v: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Vec<f32>> {
    let k = sigma.len();
    let utb = u.t()?.matmul(b)?.to_dtype(DType::F64)?; // (k, r)
    let av = a.matmul(v)?.to_dtype(DType::F64)?.t()?; // (k, r)
    if utb.dims() != av.dims() || utb.dims()[0] != k {
        return Err(Error::msg(format!(
            "change rates: U·B is {:?} but (A·V)ᵀ is {:?} for {k} singular values",
            utb.dims(),
            av.dims()
        )));
    }
    let proj: Vec<f64> = (utb * av)?.sum(1)?.to_vec1()?; // (k)
    Ok(proj
        .iter()
        .zip(sigma)
        .map(|(&p, &s)| {
            if s > 0.0 {
                ((p * scale).abs() / s as f64) as f32
            } else {
                0.0
            }
        })
        .collect())
}

/// δ for a dense change `delta_w` (out, in): |u_iᵀ ΔW v_i| / σ_i. Used when W* − W is
/// not low-rank (full fine-tuning).
pub fn change_rates_dense(
    u: &Tensor,
    sigma: &[f32],
    v: &Tensor,
    delta_w: &Tensor,
) -> Result<Vec<f32>> {
    let dv = delta_w.matmul(v)?; // (out, k)
    let proj: Vec<f32> = (u * dv)?.sum(0)?.to_vec1()?; // (k)
    Ok(proj
        .iter()
        .zip(sigma)
        .map(|(&p, &s)| if s > 0.0 { p.abs() / s } else { 0.0 })
        .collect())
}

/// Indices of the `s` largest δ (descending; ties by lower index), skipping σ = 0.
pub fn top_s(delta: &[f32], sigma: &[f32], s: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..delta.len())
        .filter(|&i| sigma[i] > 0.0 && delta[i].is_finite())
        .collect();
    idx.sort_by(|&i, &j| {
        delta[j]
            .partial_cmp(&delta[i])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(i.cmp(&j))
    });
    idx.truncate(s);
    idx
}

/// Rank percentile of index `i` among `k` directions: 0 for the largest σ, 100 for the smallest.
pub fn percentile(i: usize, k: usize) -> f64 {
    if k <= 1 {
        0.0
    } else {
        100.0 * i as f64 / (k - 1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::Device;

    fn rand(rng: &mut Rng, shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(
            rng.uniform_vec(shape.0 * shape.1, -1.0, 1.0),
            shape,
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn matches_dense_reference_and_ties_break_by_index() {
        let mut rng = Rng::new(11);
        let w = rand(&mut rng, (30, 20));
        let a = rand(&mut rng, (4, 20));
        let b = rand(&mut rng, (30, 4));
        let svd = crate::tsd::svd::thin_svd(&w, 1).unwrap();
        let fast = change_rates(&svd.u, &svd.sigma, &svd.v, &a, &b, 2.0).unwrap();
        let dw = (b.matmul(&a).unwrap() * 2.0).unwrap();
        let dense = change_rates_dense(&svd.u, &svd.sigma, &svd.v, &dw).unwrap();
        let max = fast
            .iter()
            .zip(&dense)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "max rel diff {max}");
        assert_eq!(
            top_s(&[1.0, 3.0, 3.0, 0.5], &[4.0, 3.0, 2.0, 1.0], 2),
            vec![1, 2]
        );
        assert_eq!(
            top_s(&[1.0, 3.0, 9.0, 0.5], &[4.0, 3.0, 0.0, 1.0], 2),
            vec![1, 0]
        );
        assert_eq!(percentile(0, 11), 0.0);
        assert_eq!(percentile(10, 11), 100.0);
    }
}
