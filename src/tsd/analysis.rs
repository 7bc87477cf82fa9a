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
use crate::io::LoadedModel;
use crate::models::{HeadSpec, Model};
use crate::rng::Rng;
use crate::tsd::metrics::{
    jaccard, mean, median, overlap, projections, spearman, NullBaseline, NULL_DRAWS,
};
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
    LowRank {
        a: Tensor,
        b: Tensor,
        scale: f64,
    },
    Dense(Tensor),
}

impl LayerDelta {
    /// δ for every core direction of `svd`.
    pub fn change_rates(&self, svd: &Svd) -> Result<Vec<f32>> {
        match self {
            LayerDelta::LowRank { a, b, scale } => {
                change_rates(&svd.u, &svd.sigma, &svd.v, a, b, *scale)
            }
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

/// Reads the per-layer ΔW of `src` against the base model `base`.
pub fn load_deltas(base: &LoadedModel, src: &DeltaSource) -> Result<SourceDeltas> {
    match src {
        DeltaSource::Adapter(dir) => {
            let mut m = crate::models::load(base, &crate::io::dash::head_spec_of(dir)?)?;
            let kind = crate::io::dash::load_any(m.as_mut(), dir)?;
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
                    // Relative to the original W: s·(B·A − B₀·A₀).
                    Some(Adapter::Pissa(p)) => {
                        let (a, b) = p.export_lora()?;
                        LayerDelta::LowRank {
                            a,
                            b,
                            scale: p.lora.scale,
                        }
                    }
                    Some(Adapter::Full(f)) => LayerDelta::Dense(f.delta_weight()?),
                    Some(Adapter::Dora(_)) => LayerDelta::Dense((l.merged_weight()? - &l.weight)?),
                };
                layers.push((l.path.clone(), d));
            }
            Ok(SourceDeltas {
                label: src.label(),
                kind,
                layers,
            })
        }
        DeltaSource::Finetuned(spec) => {
            let base_model = crate::models::load(base, &HeadSpec::Base)?;
            let ft = crate::io::load_model(spec)?;
            // Loading with the base's config checks every tensor's shape and names the first
            // one that does not fit.
            let tuned = crate::models::load(
                &LoadedModel {
                    config: base.config.clone(),
                    config_json: base.config_json.clone(),
                    weights: ft.weights,
                    tokenizer: None,
                    path: ft.path,
                    kind: ft.kind,
                },
                &HeadSpec::Base,
            )?;
            let mut layers = Vec::new();
            for (b, t) in base_model.linears().into_iter().zip(tuned.linears()) {
                let diff = (&t.weight - &b.weight)?;
                let changed = diff.abs()?.max_all()?.to_scalar::<f32>()? > 0.0;
                if changed {
                    layers.push((b.path.clone(), LayerDelta::Dense(diff)));
                }
            }
            Ok(SourceDeltas {
                label: src.label(),
                kind: "finetuned".into(),
                layers,
            })
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
    /// Expected |TSD ∩ TSD of an isotropic Gaussian ΔW| / s (see `metrics::NullBaseline`):
    /// the agreement that the 1/σ_i in δ alone produces.
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
    /// Concentration an isotropic Gaussian ΔW would give on this spectrum.
    pub null_concentration: f64,
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
    pub mean_null_concentration: f64,
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

/// One layer's record with its σ, δ and the compared source's δ.
type LayerResult = (LayerRecord, Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// Runs the study of `source` (and `compare`) against `base`. SVDs come from `cache`; layers
/// are processed in parallel on the rayon pool. `progress` is ticked once per layer.
pub fn analyze(
    model_label: &str,
    base: &dyn Model,
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
        return Err(Error::msg(format!(
            "{}: changes no linear layer of the base model",
            source.label
        )));
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
        let ours: std::collections::HashSet<&str> =
            source.layers.iter().map(|(n, _)| n.as_str()).collect();
        unmatched.extend(
            c.layers
                .iter()
                .filter(|(n, _)| !ours.contains(n.as_str()))
                .map(|(n, _)| n.clone()),
        );
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
    let weights: HashMap<&str, &Tensor> = base
        .linears()
        .into_iter()
        .map(|l| (l.path.as_str(), &l.weight))
        .collect();
    for (name, _, _) in &jobs {
        let w = weights.get(name).ok_or_else(|| {
            Error::msg(format!("`{name}` is not a linear layer of the base model"))
        })?;
        let (o, i) = w.dims2()?;
        if s > o.min(i) {
            return Err(Error::config(
                "s",
                format!("{s} exceeds min(out, in) = {} of `{name}`", o.min(i)),
            ));
        }
    }
    let results: Vec<Result<LayerResult>> = jobs
        .par_iter()
        .map(|&(name, d, o)| {
            let w = weights[name];
            // Many small SVDs in parallel use the cores better than one threaded SVD each.
            let (svd, _) = cache.get_or_compute(w, 1)?;
            let delta = d.change_rates(&svd)?;
            let cdelta = o.map(|o| o.change_rates(&svd)).transpose()?;
            let (out_dim, in_dim) = w.dims2()?;
            let k = svd.k();
            let null =
                NullBaseline::sample(&svd.sigma, s, NULL_DRAWS, &mut Rng::derive(NULL_SEED, name));
            let src = stats(&svd.sigma, &delta, s, &null);
            let cmp = cdelta.as_ref().map(|c| stats(&svd.sigma, c, s, &null));
            let agreement = cdelta.as_ref().zip(cmp.as_ref()).map(|(c, cs)| Agreement {
                overlap: overlap(&src.indices, &cs.indices, s),
                jaccard: jaccard(&src.indices, &cs.indices),
                spearman: spearman(&delta, c),
                spearman_projection: spearman(
                    &projections(&delta, &svd.sigma),
                    &projections(c, &svd.sigma),
                ),
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
                null_concentration: null.concentration,
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
    let info = |d: &SourceDeltas| SourceInfo {
        label: d.label.clone(),
        kind: d.kind.clone(),
        changed_layers: d.layers.len(),
    };
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

/// Seed of the isotropic-ΔW draws (mixed with the layer path), fixed so reruns agree.
const NULL_SEED: u64 = 0x75D;

/// TSD of one δ vector over the spectrum `sigma`, with their agreement with `null`.
pub fn stats(sigma: &[f32], delta: &[f32], s: usize, null: &NullBaseline) -> TsdStats {
    let k = sigma.len();
    let idx = top_s(delta, sigma, s);
    let total_sigma: f64 = sigma.iter().map(|&x| x as f64).sum();
    // prefix[i] = Σ_{j<i} σ_j
    let mut prefix = Vec::with_capacity(k + 1);
    prefix.push(0f64);
    for &x in sigma {
        prefix.push(prefix.last().copied().unwrap_or(0.0) + x as f64);
    }
    let share: Vec<f64> = idx
        .iter()
        .map(|&i| {
            if total_sigma > 0.0 {
                prefix[i] / total_sigma
            } else {
                0.0
            }
        })
        .collect();
    let pct: Vec<f64> = idx.iter().map(|&i| percentile(i, k)).collect();
    let total_delta: f64 = delta
        .iter()
        .filter(|d| d.is_finite())
        .map(|&d| d as f64)
        .sum();
    let top_delta: f64 = idx.iter().map(|&i| delta[i] as f64).sum();
    TsdStats {
        sigma: idx.iter().map(|&i| sigma[i]).collect(),
        delta: idx.iter().map(|&i| delta[i]).collect(),
        mean_percentile: mean(&pct),
        mean_sigma_share_above: mean(&share),
        concentration: if total_delta > 0.0 {
            top_delta / total_delta
        } else {
            f64::NAN
        },
        top_sigma_hits: idx.iter().filter(|&&i| i < s).count(),
        null_overlap: null.overlap(&idx, s),
        percentile: pct,
        sigma_share_above: share,
        indices: idx,
    }
}

fn summarize_source<'a>(stats: impl Iterator<Item = &'a TsdStats> + Clone) -> SourceSummary {
    let all_pct: Vec<f64> = stats
        .clone()
        .flat_map(|s| s.percentile.iter().copied())
        .collect();
    let n_tsd: usize = stats.clone().map(|s| s.indices.len()).sum();
    let hits: usize = stats.clone().map(|s| s.top_sigma_hits).sum();
    SourceSummary {
        mean_percentile: mean(&all_pct),
        median_percentile: median(all_pct),
        mean_sigma_share_above: mean(
            &stats
                .clone()
                .map(|s| s.mean_sigma_share_above)
                .collect::<Vec<_>>(),
        ),
        mean_concentration: mean(&stats.clone().map(|s| s.concentration).collect::<Vec<_>>()),
        top_sigma_hit_rate: if n_tsd > 0 {
            hits as f64 / n_tsd as f64
        } else {
            f64::NAN
        },
        mean_null_overlap: mean(&stats.map(|s| s.null_overlap).collect::<Vec<_>>()),
    }
}

fn summarize(layers: &[LayerRecord], with_compare: bool) -> Summary {
    let agg = |f: fn(&Agreement) -> f64| -> Option<f64> {
        with_compare.then(|| {
            mean(
                &layers
                    .iter()
                    .filter_map(|l| l.agreement.as_ref().map(f))
                    .collect::<Vec<_>>(),
            )
        })
    };
    Summary {
        layers: layers.len(),
        mean_uniform_concentration: mean(
            &layers
                .iter()
                .map(|l| l.uniform_concentration)
                .collect::<Vec<_>>(),
        ),
        mean_null_concentration: mean(
            &layers
                .iter()
                .map(|l| l.null_concentration)
                .collect::<Vec<_>>(),
        ),
        source: summarize_source(layers.iter().map(|l| &l.source)),
        compare: with_compare
            .then(|| summarize_source(layers.iter().filter_map(|l| l.compare.as_ref()))),
        mean_overlap: agg(|a| a.overlap),
        mean_jaccard: agg(|a| a.jaccard),
        mean_spearman: agg(|a| a.spearman),
        mean_spearman_projection: agg(|a| a.spearman_projection),
        chance_overlap: with_compare.then(|| {
            mean(
                &layers
                    .iter()
                    .map(|l| l.uniform_concentration)
                    .collect::<Vec<_>>(),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_a_hand_made_spectrum() {
        let sigma = [4.0f32, 3.0, 2.0, 1.0];
        let delta = [0.1f32, 0.2, 0.6, 0.1];
        let null = NullBaseline::sample(&sigma, 2, 10, &mut Rng::new(0));
        let st = stats(&sigma, &delta, 2, &null);
        assert_eq!(st.indices, vec![2, 1]);
        // Σσ = 10: above index 2 lie 4 + 3, above index 1 lies 4.
        assert_eq!(st.sigma_share_above, vec![0.7, 0.4]);
        assert!((st.mean_sigma_share_above - 0.55).abs() < 1e-12);
        assert!(
            (st.concentration - 0.8).abs() < 1e-6,
            "{}",
            st.concentration
        );
        assert_eq!(st.top_sigma_hits, 1);
        assert_eq!(st.percentile, vec![200.0 / 3.0, 100.0 / 3.0]);
    }
}
