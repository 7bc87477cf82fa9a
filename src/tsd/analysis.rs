//! The task-specific-direction study of LoRA-Dash (Si et al., ICLR 2025, §3): for each
//! linear layer a source changes, the change rate δ_i = |u_iᵀ ΔW v_i| / σ_i of every core
//! direction of the base weight W = U·diag(σ)·Vᵀ, the top-s directions (TSD), where they sit
//! in W's spectrum, how much of the total change rate they hold, and, between two sources,
//! how far their TSD agree.
//!
//! A source is an adapter (ΔW = s·B·A; LoRA-Dash exports as a rank-(r+s) LoRA; δ is computed
//! from the factors without forming ΔW) or a fine-tuned model (ΔW = W* − W, dense).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::adapters::Adapter;
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::models::config::LlamaConfig;
use crate::models::Llama;
use crate::rng::Rng;
use crate::tsd::select::{change_rates, change_rates_dense, percentile, top_s};
use crate::tsd::svd::{Svd, SvdCache};

/// Where a ΔW comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DeltaSource {
    /// PEFT LoRA directory, native LoRA-Dash directory, or a run directory holding either.
    Adapter(PathBuf),
    /// A fine-tuned model (directory, .gguf or hub id) of the same architecture.
    Finetuned(String),
}

impl DeltaSource {
    pub fn label(&self) -> String {
        match self {
            DeltaSource::Adapter(p) => p.display().to_string(),
            DeltaSource::Finetuned(s) => s.clone(),
        }
    }
}

/// One layer's ΔW (out, in).
pub enum LayerDelta {
    /// ΔW = scale·B·A with A (r, in), B (out, r).
    LowRank { a: Tensor, b: Tensor, scale: f64 },
    Dense(Tensor),
}

impl LayerDelta {
    /// δ for every core direction of `svd`.
    pub fn change_rates(&self, svd: &Svd) -> Result<Vec<f32>> {
        match self {
            LayerDelta::LowRank { a, b, scale } => change_rates(&svd.u, &svd.sigma, &svd.v, a, b, *scale),
            LayerDelta::Dense(d) => change_rates_dense(&svd.u, &svd.sigma, &svd.v, d),
        }
    }
}

/// The changed layers of one source, in the model's layer order.
pub struct SourceDeltas {
    pub label: String,
    /// `lora`, `lora-dash`, `full` (an adapter of full fine-tuning) or `finetuned`.
    pub kind: String,
    pub layers: Vec<(String, LayerDelta)>,
}

/// Reads the per-layer ΔW of `src` against the base (`cfg`, `weights`).
pub fn load_deltas(cfg: &LlamaConfig, weights: &Weights, src: &DeltaSource) -> Result<SourceDeltas> {
    match src {
        DeltaSource::Adapter(dir) => {
            let mut m = Llama::load(cfg, weights)?;
            let kind = crate::io::dash::load_any(&mut m, dir)?;
            let mut layers = Vec::new();
            for l in m.linears() {
                let d = match &l.adapter {
                    None => continue,
                    Some(Adapter::Lora(lora)) => LayerDelta::LowRank {
                        a: lora.a.as_tensor().clone(),
                        b: lora.b.as_tensor().clone(),
                        scale: lora.scale,
                    },
                    Some(Adapter::Dash(d)) => {
                        let (a, b) = d.export_lora()?;
                        LayerDelta::LowRank { a, b, scale: 1.0 }
                    }
                    Some(Adapter::Full(f)) => LayerDelta::Dense(f.delta_weight()?),
                };
                layers.push((l.path.clone(), d));
            }
            Ok(SourceDeltas { label: src.label(), kind, layers })
        }
        DeltaSource::Finetuned(spec) => {
            let base = Llama::load(cfg, weights)?;
            let ft = crate::io::load_model(spec)?;
            // Loading with the base's config checks every tensor's shape and names the first
            // one that does not fit.
            let tuned = Llama::load(cfg, &ft.weights)?;
            drop(ft);
            let mut layers = Vec::new();
            for (b, t) in base.linears().zip(tuned.linears()) {
                let diff = (&t.weight - &b.weight)?;
                let changed = diff.abs()?.max_all()?.to_scalar::<f32>()? > 0.0;
                if changed {
                    layers.push((b.path.clone(), LayerDelta::Dense(diff)));
                }
            }
            Ok(SourceDeltas { label: src.label(), kind: "finetuned".into(), layers })
        }
    }
}

/// What one source changed in one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TsdStats {
    /// TSD indices in W's spectrum (descending σ), by decreasing δ.
    pub indices: Vec<usize>,
    pub sigma: Vec<f32>,
    pub delta: Vec<f32>,
    /// 0 = largest σ, 100 = smallest.
    pub percentile: Vec<f64>,
    /// Σ_{j<i} σ_j / Σ σ for each TSD index i: the share of W's σ mass ranked above it.
    pub sigma_share_above: Vec<f64>,
    pub mean_percentile: f64,
    pub mean_sigma_share_above: f64,
    /// Σ_TSD δ / Σ δ.
    pub concentration: f64,
    /// How many TSD are among the s largest singular directions.
    pub top_sigma_hits: usize,
    /// Expected |TSD ∩ TSD of an isotropic Gaussian ΔW| / s. For such a ΔW the projections
    /// u_iᵀ ΔW v_i are i.i.d. normal, so δ_i ∝ |z_i| / σ_i: this is the agreement that the
    /// 1/σ_i in δ alone produces, a sharper chance level than s/k.
    pub null_overlap: f64,
}

/// Agreement of two sources' TSD in one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agreement {
    /// |∩| / s
    pub overlap: f64,
    pub jaccard: f64,
    /// Spearman rank correlation of the two full δ vectors.
    pub spearman: f64,
    /// Spearman rank correlation of the projections |u_iᵀ ΔW v_i| = δ_i·σ_i, i.e. without
    /// the 1/σ_i factor both δ vectors share.
    pub spearman_projection: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    pub layer: String,
    pub out_dim: usize,
    pub in_dim: usize,
    pub k: usize,
    /// Concentration s/k that evenly spread change rates would give.
    pub uniform_concentration: f64,
    pub source: TsdStats,
    pub compare: Option<TsdStats>,
    pub agreement: Option<Agreement>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceInfo {
    pub label: String,
    pub kind: String,
    pub changed_layers: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SourceSummary {
    pub mean_percentile: f64,
    pub median_percentile: f64,
    pub mean_sigma_share_above: f64,
    pub mean_concentration: f64,
    /// Fraction of all TSD that are among their layer's s largest singular directions.
    pub top_sigma_hit_rate: f64,
    pub mean_null_overlap: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub layers: usize,
    pub mean_uniform_concentration: f64,
    pub source: SourceSummary,
    pub compare: Option<SourceSummary>,
    pub mean_overlap: Option<f64>,
    pub mean_jaccard: Option<f64>,
    pub mean_spearman: Option<f64>,
    pub mean_spearman_projection: Option<f64>,
    /// Expected |∩|/s of two random s-subsets of k directions (= s/k), averaged over layers.
    pub chance_overlap: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Analysis {
    pub model: String,
    pub s: usize,
    pub source: SourceInfo,
    pub compare: Option<SourceInfo>,
    /// Layers one source changed and the other did not (left out of the comparison).
    pub unmatched_layers: Vec<String>,
    pub layers: Vec<LayerRecord>,
    pub summary: Summary,
}

/// Full per-layer vectors behind an [`Analysis`], for plots and `spectra.safetensors`.
#[derive(Debug, Clone, Default)]
pub struct Spectra {
    pub sigma: BTreeMap<String, Vec<f32>>,
    pub delta: BTreeMap<String, Vec<f32>>,
    pub compare_delta: BTreeMap<String, Vec<f32>>,
}

/// Runs the study of `source` (and `compare`) against `base`. SVDs come from `cache`; layers
/// are processed in parallel on the rayon pool. `progress` is ticked once per layer.
pub fn analyze(
    model_label: &str,
    base: &Llama,
    source: &SourceDeltas,
    compare: Option<&SourceDeltas>,
    s: usize,
    cache: &SvdCache,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(Analysis, Spectra)> {
    if s == 0 {
        return Err(Error::config("s", "must be at least 1"));
    }
    if source.layers.is_empty() {
        return Err(Error::msg(format!("{}: changes no linear layer of the base model", source.label)));
    }
    let other: HashMap<&str, &LayerDelta> = compare
        .map(|c| c.layers.iter().map(|(n, d)| (n.as_str(), d)).collect())
        .unwrap_or_default();
    let mut unmatched = Vec::new();
    let mut jobs: Vec<(&str, &LayerDelta, Option<&LayerDelta>)> = Vec::new();
    for (name, d) in &source.layers {
        match compare {
            Some(_) => match other.get(name.as_str()) {
                Some(o) => jobs.push((name, d, Some(*o))),
                None => unmatched.push(name.clone()),
            },
            None => jobs.push((name, d, None)),
        }
    }
    if let Some(c) = compare {
        let ours: std::collections::HashSet<&str> = source.layers.iter().map(|(n, _)| n.as_str()).collect();
        unmatched.extend(c.layers.iter().filter(|(n, _)| !ours.contains(n.as_str())).map(|(n, _)| n.clone()));
        if jobs.is_empty() {
            return Err(Error::msg(format!(
                "{} and {} change no layer in common (first: `{}` vs `{}`)",
                source.label,
                c.label,
                source.layers[0].0,
                c.layers.first().map(|l| l.0.as_str()).unwrap_or("none")
            )));
        }
    }
    let weights: HashMap<&str, &Tensor> = base.linears().map(|l| (l.path.as_str(), &l.weight)).collect();
    for (name, _, _) in &jobs {
        let w = weights.get(name).ok_or_else(|| Error::msg(format!("`{name}` is not a linear layer of the base model")))?;
        let (o, i) = w.dims2()?;
        if s > o.min(i) {
            return Err(Error::config("s", format!("{s} exceeds min(out, in) = {} of `{name}`", o.min(i))));
        }
    }
    let results: Vec<Result<(LayerRecord, Vec<f32>, Vec<f32>, Option<Vec<f32>>)>> = jobs
        .par_iter()
        .map(|&(name, d, o)| {
            let w = weights[name];
            // Many small SVDs in parallel use the cores better than one threaded SVD each.
            let (svd, _) = cache.get_or_compute(w, 1)?;
            let delta = d.change_rates(&svd)?;
            let cdelta = o.map(|o| o.change_rates(&svd)).transpose()?;
            let (out_dim, in_dim) = w.dims2()?;
            let k = svd.k();
            let src = stats(&svd.sigma, &delta, s, name);
            let cmp = cdelta.as_ref().map(|c| stats(&svd.sigma, c, s, name));
            let agreement = cdelta.as_ref().zip(cmp.as_ref()).map(|(c, cs)| Agreement {
                overlap: overlap(&src.indices, &cs.indices, s),
                jaccard: jaccard(&src.indices, &cs.indices),
                spearman: spearman(&delta, c),
                spearman_projection: spearman(&projections(&delta, &svd.sigma), &projections(c, &svd.sigma)),
            });
            if let Some(p) = progress {
                p.inc(1);
            }
            let rec = LayerRecord {
                layer: name.to_string(),
                out_dim,
                in_dim,
                k,
                uniform_concentration: s as f64 / k as f64,
                source: src,
                compare: cmp,
                agreement,
            };
            Ok((rec, svd.sigma.clone(), delta, cdelta))
        })
        .collect();
    let mut spectra = Spectra::default();
    let mut layers = Vec::with_capacity(results.len());
    for r in results {
        let (rec, sigma, delta, cdelta) = r?;
        spectra.sigma.insert(rec.layer.clone(), sigma);
        spectra.delta.insert(rec.layer.clone(), delta);
        if let Some(c) = cdelta {
            spectra.compare_delta.insert(rec.layer.clone(), c);
        }
        layers.push(rec);
    }
    let summary = summarize(&layers, compare.is_some());
    let info = |d: &SourceDeltas| SourceInfo { label: d.label.clone(), kind: d.kind.clone(), changed_layers: d.layers.len() };
    Ok((
        Analysis {
            model: model_label.to_string(),
            s,
            source: info(source),
            compare: compare.map(info),
            unmatched_layers: unmatched,
            layers,
            summary,
        },
        spectra,
    ))
}

/// TSD of one δ vector over the spectrum `sigma`; `seed_label` seeds the null baseline.
pub fn stats(sigma: &[f32], delta: &[f32], s: usize, seed_label: &str) -> TsdStats {
    let k = sigma.len();
    let idx = top_s(delta, sigma, s);
    let total_sigma: f64 = sigma.iter().map(|&x| x as f64).sum();
    // prefix[i] = Σ_{j<i} σ_j
    let mut prefix = Vec::with_capacity(k + 1);
    prefix.push(0f64);
    for &x in sigma {
        prefix.push(prefix.last().copied().unwrap_or(0.0) + x as f64);
    }
    let share: Vec<f64> = idx.iter().map(|&i| if total_sigma > 0.0 { prefix[i] / total_sigma } else { 0.0 }).collect();
    let pct: Vec<f64> = idx.iter().map(|&i| percentile(i, k)).collect();
    let total_delta: f64 = delta.iter().filter(|d| d.is_finite()).map(|&d| d as f64).sum();
    let top_delta: f64 = idx.iter().map(|&i| delta[i] as f64).sum();
    TsdStats {
        sigma: idx.iter().map(|&i| sigma[i]).collect(),
        delta: idx.iter().map(|&i| delta[i]).collect(),
        mean_percentile: mean(&pct),
        mean_sigma_share_above: mean(&share),
        concentration: if total_delta > 0.0 { top_delta / total_delta } else { f64::NAN },
        top_sigma_hits: idx.iter().filter(|&&i| i < s).count(),
        null_overlap: null_overlap(&idx, sigma, s, NULL_DRAWS, &mut Rng::derive(0x7D5, seed_label)),
        percentile: pct,
        sigma_share_above: share,
        indices: idx,
    }
}

/// Draws of the isotropic-ΔW baseline per layer.
pub const NULL_DRAWS: usize = 200;

/// Mean |tsd ∩ top-s of |z_i| / σ_i| / s over `draws` standard normal vectors z.
pub fn null_overlap(tsd: &[usize], sigma: &[f32], s: usize, draws: usize, rng: &mut Rng) -> f64 {
    let k = sigma.len();
    let mut total = 0f64;
    for _ in 0..draws {
        // Box–Muller; only |z| matters.
        let z: Vec<f32> = (0..k)
            .map(|_| {
                let u1 = rng.next_f32().max(f32::MIN_POSITIVE);
                let u2 = rng.next_f32();
                ((-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()).abs()
            })
            .collect();
        let d: Vec<f32> = z.iter().zip(sigma).map(|(z, &sg)| if sg > 0.0 { z / sg } else { 0.0 }).collect();
        total += overlap(tsd, &top_s(&d, sigma, s), s);
    }
    total / draws.max(1) as f64
}

/// |u_iᵀ ΔW v_i| = δ_i·σ_i.
fn projections(delta: &[f32], sigma: &[f32]) -> Vec<f32> {
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

fn median(mut v: Vec<f64>) -> f64 {
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

fn summarize_source<'a>(stats: impl Iterator<Item = &'a TsdStats> + Clone) -> SourceSummary {
    let all_pct: Vec<f64> = stats.clone().flat_map(|s| s.percentile.iter().copied()).collect();
    let n_tsd: usize = stats.clone().map(|s| s.indices.len()).sum();
    let hits: usize = stats.clone().map(|s| s.top_sigma_hits).sum();
    SourceSummary {
        mean_percentile: mean(&all_pct),
        median_percentile: median(all_pct),
        mean_sigma_share_above: mean(&stats.clone().map(|s| s.mean_sigma_share_above).collect::<Vec<_>>()),
        mean_concentration: mean(&stats.clone().map(|s| s.concentration).collect::<Vec<_>>()),
        top_sigma_hit_rate: if n_tsd > 0 { hits as f64 / n_tsd as f64 } else { f64::NAN },
        mean_null_overlap: mean(&stats.map(|s| s.null_overlap).collect::<Vec<_>>()),
    }
}

fn summarize(layers: &[LayerRecord], with_compare: bool) -> Summary {
    let agg = |f: fn(&Agreement) -> f64| -> Option<f64> {
        with_compare.then(|| mean(&layers.iter().filter_map(|l| l.agreement.as_ref().map(f)).collect::<Vec<_>>()))
    };
    Summary {
        layers: layers.len(),
        mean_uniform_concentration: mean(&layers.iter().map(|l| l.uniform_concentration).collect::<Vec<_>>()),
        source: summarize_source(layers.iter().map(|l| &l.source)),
        compare: with_compare.then(|| summarize_source(layers.iter().filter_map(|l| l.compare.as_ref()))),
        mean_overlap: agg(|a| a.overlap),
        mean_jaccard: agg(|a| a.jaccard),
        mean_spearman: agg(|a| a.spearman),
        mean_spearman_projection: agg(|a| a.spearman_projection),
        chance_overlap: with_compare.then(|| mean(&layers.iter().map(|l| l.uniform_concentration).collect::<Vec<_>>())),
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
        assert_eq!(average_ranks(&[10.0, 20.0, 20.0, 5.0]), vec![2.0, 3.5, 3.5, 1.0]);
        assert_eq!(average_ranks(&[1.0, 1.0, 1.0]), vec![2.0, 2.0, 2.0]);
        // Monotone transforms do not change ρ.
        let x = [0.3f32, 1.5, 0.1, 7.0, 2.2];
        let y: Vec<f32> = x.iter().map(|v| v.exp()).collect();
        assert!((spearman(&x, &y) - 1.0).abs() < 1e-12);
        let neg: Vec<f32> = x.iter().map(|v| -v).collect();
        assert!((spearman(&x, &neg) + 1.0).abs() < 1e-12);
        // No ties: 1 − 6Σd²/(n(n²−1)); ranks x = [1,2,3,4,5], y = [2,1,4,3,5] → Σd² = 4, ρ = 0.8.
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]) - 0.8).abs() < 1e-12);
        // Ties: x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3, 4]; Pearson of ranks by hand:
        // mean 2.5, Σ(dx·dy) = 2.25 + 0 + 0 + 2.25 = 4.5, Σdx² = 4.5, Σdy² = 5 → 4.5/√22.5.
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]);
        let want = 4.5 / 22.5f64.sqrt();
        println!("spearman with ties: {r} (want {want})");
        assert!((r - want).abs() < 1e-12);
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
    }

    #[test]
    fn stats_of_a_hand_made_spectrum() {
        let sigma = [4.0f32, 3.0, 2.0, 1.0];
        let delta = [0.1f32, 0.2, 0.6, 0.1];
        let st = stats(&sigma, &delta, 2, "t");
        assert_eq!(st.indices, vec![2, 1]);
        // Σσ = 10: above index 2 lie 4 + 3, above index 1 lies 4.
        assert_eq!(st.sigma_share_above, vec![0.7, 0.4]);
        assert!((st.mean_sigma_share_above - 0.55).abs() < 1e-12);
        assert!((st.concentration - 0.8).abs() < 1e-6, "{}", st.concentration);
        assert_eq!(st.top_sigma_hits, 1);
        assert_eq!(st.percentile, vec![200.0 / 3.0, 100.0 / 3.0]);
    }

    #[test]
    fn null_overlap_is_chance_for_a_flat_spectrum_and_one_for_a_cliff() {
        let mut rng = Rng::new(1);
        // Equal σ: the random TSD are a uniform s-subset, so E|∩|/s = s/k.
        let flat = vec![1.0f32; 40];
        let got = null_overlap(&[0, 1, 2, 3], &flat, 4, 2000, &mut rng);
        println!("flat spectrum: null overlap {got:.4} (s/k = 0.1)");
        assert!((got - 0.1).abs() < 0.01, "{got}");
        // The last s σ are 10⁶ times smaller: 1/σ alone picks them in every draw.
        let mut cliff = vec![1.0f32; 40];
        for x in &mut cliff[36..] {
            *x = 1e-6;
        }
        assert_eq!(null_overlap(&[36, 37, 38, 39], &cliff, 4, 50, &mut rng), 1.0);
        assert_eq!(null_overlap(&[0, 1, 2, 3], &cliff, 4, 50, &mut rng), 0.0);
    }
}
