//! Agreement and chance levels for the TSD study: overlap and Jaccard of index sets,
//! Spearman's rank correlation with average ranks for ties, and the isotropic-ΔW baseline
//! (what δ_i = |u_iᵀ ΔW v_i| / σ_i gives for a ΔW with no preferred direction).

use crate::rng::Rng;
use crate::tsd::select::top_s;

/// Draws of the isotropic-ΔW baseline per layer.
pub const NULL_DRAWS: usize = 200;

/// What an isotropic Gaussian ΔW would give on a spectrum σ. For such a ΔW the projections
/// u_iᵀ ΔW v_i are i.i.d. normal, so δ_i ∝ |z_i| / σ_i: the 1/σ_i in δ alone already favours
/// the smallest singular values. Sharper chance levels than s/k for overlap and
/// concentration.
pub struct NullBaseline {
    /// Top-s index set of each draw.
    pub tops: Vec<Vec<usize>>,
    /// Mean Σ_top-s δ / Σ δ over the draws.
    pub concentration: f64,
}

impl NullBaseline {
    pub fn sample(sigma: &[f32], s: usize, draws: usize, rng: &mut Rng) -> Self {
        let mut tops = Vec::with_capacity(draws);
        let mut conc = 0f64;
        for _ in 0..draws {
            let d: Vec<f32> = sigma
                .iter()
                .map(|&sg| {
                    // Box–Muller; only |z| matters.
                    let u1 = rng.next_f32().max(f32::MIN_POSITIVE);
                    let u2 = rng.next_f32();
                    let z = ((-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()).abs();
                    if sg > 0.0 {
                        z / sg
                    } else {
                        0.0
                    }
                })
                .collect();
            let top = top_s(&d, sigma, s);
            let total: f64 = d.iter().map(|&x| x as f64).sum();
            if total > 0.0 {
                conc += top.iter().map(|&i| d[i] as f64).sum::<f64>() / total;
            }
            tops.push(top);
        }
        NullBaseline {
            concentration: conc / draws.max(1) as f64,
            tops,
        }
    }

    /// Mean |tsd ∩ top-s of a draw| / s.
    pub fn overlap(&self, tsd: &[usize], s: usize) -> f64 {
        mean(
            &self
                .tops
                .iter()
                .map(|t| overlap(tsd, t, s))
                .collect::<Vec<_>>(),
        )
    }
}

/// |u_iᵀ ΔW v_i| = δ_i·σ_i.
pub fn projections(delta: &[f32], sigma: &[f32]) -> Vec<f32> {
    delta.iter().zip(sigma).map(|(d, s)| d * s).collect()
}

/// |a ∩ b| / s.
pub fn overlap(a: &[usize], b: &[usize], s: usize) -> f64 {
    let n = a.iter().filter(|i| b.contains(i)).count();
    n as f64 / s.max(1) as f64
}

/// |a ∩ b| / |a ∪ b| (1 for two empty sets).
pub fn jaccard(a: &[usize], b: &[usize]) -> f64 {
    let inter = a.iter().filter(|i| b.contains(i)).count();
    let union = a.len() + b.len() - inter;
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Ranks 1..n with ties given their average rank.
pub fn average_ranks(x: &[f32]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].partial_cmp(&x[j]).unwrap_or(std::cmp::Ordering::Equal));
    let mut ranks = vec![0f64; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // positions start..end (0-based) share ranks start+1..=end
        let r = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = r;
        }
        start = end;
    }
    ranks
}

/// Spearman's ρ: Pearson correlation of average ranks (NaN when either side is constant or
/// the lengths differ).
pub fn spearman(x: &[f32], y: &[f32]) -> f64 {
    if x.len() != y.len() || x.len() < 2 {
        return f64::NAN;
    }
    let (rx, ry) = (average_ranks(x), average_ranks(y));
    let (mx, my) = (mean(&rx), mean(&ry));
    let (mut sxy, mut sxx, mut syy) = (0f64, 0f64, 0f64);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// Mean of the finite values (NaN when there are none).
pub fn mean(v: &[f64]) -> f64 {
    let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if f.is_empty() {
        f64::NAN
    } else {
        f.iter().sum::<f64>() / f.len() as f64
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_and_jaccard_on_hand_made_sets() {
        let a = [3, 1, 7, 9];
        let b = [9, 2, 3, 5];
        // ∩ = {3, 9}, ∪ = {1, 2, 3, 5, 7, 9}
        assert_eq!(overlap(&a, &b, 4), 0.5);
        assert!((jaccard(&a, &b) - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(overlap(&a, &a, 4), 1.0);
        assert_eq!(jaccard(&a, &a), 1.0);
        assert_eq!(overlap(&[0, 1], &[2, 3], 2), 0.0);
        assert_eq!(jaccard(&[0, 1], &[2, 3]), 0.0);
        assert_eq!(jaccard(&[], &[]), 1.0);
    }

    #[test]
    fn spearman_matches_hand_computed_values_with_ties() {
        assert_eq!(
            average_ranks(&[10.0, 20.0, 20.0, 5.0]),
            vec![2.0, 3.5, 3.5, 1.0]
        );
        assert_eq!(average_ranks(&[1.0, 1.0, 1.0]), vec![2.0, 2.0, 2.0]);
        // Monotone transforms do not change ρ.
        let x = [0.3f32, 1.5, 0.1, 7.0, 2.2];
        let y: Vec<f32> = x.iter().map(|v| v.exp()).collect();
        assert!((spearman(&x, &y) - 1.0).abs() < 1e-12);
        let neg: Vec<f32> = x.iter().map(|v| -v).collect();
        assert!((spearman(&x, &neg) + 1.0).abs() < 1e-12);
        // No ties: 1 − 6Σd²/(n(n²−1)); ranks x = [1,2,3,4,5], y = [2,1,4,3,5] → Σd² = 4, ρ = 0.8.
        assert!(
            (spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]) - 0.8).abs() < 1e-12
        );
        // Ties: x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3, 4]; Pearson of ranks by hand:
        // mean 2.5, Σ(dx·dy) = 2.25 + 0 + 0 + 2.25 = 4.5, Σdx² = 4.5, Σdy² = 5 → 4.5/√22.5.
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]);
        let want = 4.5 / 22.5f64.sqrt();
        println!("spearman with ties: {r} (want {want})");
        assert!((r - want).abs() < 1e-12);
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
    }

    #[test]
    fn null_overlap_is_chance_for_a_flat_spectrum_and_one_for_a_cliff() {
        let mut rng = Rng::new(1);
        // Equal σ: the random TSD are a uniform s-subset, so E|∩|/s = s/k.
        let flat = vec![1.0f32; 40];
        let null = NullBaseline::sample(&flat, 4, 2000, &mut rng);
        let got = null.overlap(&[0, 1, 2, 3], 4);
        println!(
            "flat spectrum: null overlap {got:.4} (s/k = 0.1), concentration {:.4}",
            null.concentration
        );
        assert!((got - 0.1).abs() < 0.01, "{got}");
        // The 4 largest of 40 half-normal values hold about a quarter of their sum.
        assert!(
            null.concentration > 0.2 && null.concentration < 0.4,
            "{}",
            null.concentration
        );
        // The last s σ are 10⁶ times smaller: 1/σ alone picks them in every draw.
        let mut cliff = vec![1.0f32; 40];
        for x in &mut cliff[36..] {
            *x = 1e-6;
        }
        let null = NullBaseline::sample(&cliff, 4, 50, &mut rng);
        assert_eq!(null.overlap(&[36, 37, 38, 39], 4), 1.0);
        assert_eq!(null.overlap(&[0, 1, 2, 3], 4), 0.0);
        assert!(null.concentration > 0.999, "{}", null.concentration);
    }
}
