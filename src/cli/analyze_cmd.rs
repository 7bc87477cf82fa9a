//! `analyze`: the task-specific-direction study of an adapter or a fine-tuned model against
//! its base (see `tsd::analysis`), optionally compared with a second source. Writes
//! `analysis.json`, `layers.csv`, `spectra.safetensors` (σ and δ of every layer) and PNG
//! figures into a fresh output directory.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use clap::{ArgGroup, Args};

use crate::error::{Error, Result};
use crate::io::atomic::write_file;
use crate::io::outpath::{check_output, stage_output};
use crate::io::weights::save_tensors;
use crate::tsd::analysis::{analyze, load_deltas, Analysis, DeltaSource, Spectra};
use crate::tsd::plots::{
    plot_delta_spectrum, plot_overlap, plot_tsd_heatmap, HeatRow, SpectrumSeries,
};
use crate::tsd::svd::{default_cache_dir, SvdCache};

pub const ANALYSIS_FILE: &str = "analysis.json";
pub const LAYERS_FILE: &str = "layers.csv";
pub const SPECTRA_FILE: &str = "spectra.safetensors";
/// What an earlier `analyze` output holds: `--overwrite` replaces only such a directory.
const OUTPUT_MARKERS: &[&str] = &[ANALYSIS_FILE];
/// Layers drawn one by one when `--plot-layers` is not given.
const DEFAULT_PLOTS: usize = 4;

#[derive(Debug, Clone, Default, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["adapter", "finetuned"])))]
#[command(group(ArgGroup::new("against").args(["compare_adapter", "compare_finetuned"])))]
pub struct AnalyzeArgs {
    /// Base model: Hugging Face directory, .gguf file, or hub id `org/name`.
    #[arg(long)]
    pub model: String,
    /// Adapter to study: PEFT LoRA, LoRA-Dash, or a lora-dash run directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Fine-tuned model to study (ΔW = W* − W of every linear layer that changed).
    #[arg(long)]
    pub finetuned: Option<String>,
    /// Second adapter to compare the TSD with.
    #[arg(long)]
    pub compare_adapter: Option<PathBuf>,
    /// Second fine-tuned model to compare the TSD with.
    #[arg(long)]
    pub compare_finetuned: Option<String>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Task-specific directions per layer.
    #[arg(long, default_value_t = 8)]
    pub s: usize,
    /// Regex over layer paths: draw δ over the spectrum for each matching layer
    /// (default: a few layers spread over the model).
    #[arg(long)]
    pub plot_layers: Option<String>,
    /// Columns of the spectrum-position heatmap.
    #[arg(long, default_value_t = 32)]
    pub bins: usize,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
    /// Where the models are built and the updates formed: cpu (default), cuda or cuda:N (the
    /// SVDs run on the host).
    #[arg(long)]
    pub device: Option<String>,
}

fn one_source(
    adapter: &Option<PathBuf>,
    finetuned: &Option<String>,
    what: &str,
) -> Result<Option<DeltaSource>> {
    match (adapter, finetuned) {
        (Some(a), None) => Ok(Some(DeltaSource::Adapter(a.clone()))),
        (None, Some(f)) => Ok(Some(DeltaSource::Finetuned(f.clone()))),
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(Error::config(
            what,
            "give either an adapter or a fine-tuned model, not both",
        )),
    }
}

/// Runs the study and writes its outputs into `args.out`.
pub fn run(args: &AnalyzeArgs) -> Result<Analysis> {
    let source = one_source(&args.adapter, &args.finetuned, "adapter")?
        .ok_or_else(|| Error::config("adapter", "give --adapter DIR or --finetuned MODEL"))?;
    let compare = one_source(&args.compare_adapter, &args.compare_finetuned, "compare")?;
    if args.s == 0 {
        return Err(Error::config("s", "must be at least 1"));
    }
    let plot_re = match &args.plot_layers {
        Some(p) => Some(
            regex::Regex::new(p)
                .map_err(|e| Error::config("plot_layers", format!("invalid regex: {e}")))?,
        ),
        None => None,
    };
    if args.bins == 0 {
        return Err(Error::config("bins", "--bins must be at least 1"));
    }
    let mut inputs: Vec<(&str, PathBuf)> = vec![("--model", PathBuf::from(&args.model))];
    let paths = [
        ("--adapter", args.adapter.clone()),
        ("--finetuned", args.finetuned.as_ref().map(PathBuf::from)),
        ("--compare-adapter", args.compare_adapter.clone()),
        (
            "--compare-finetuned",
            args.compare_finetuned.as_ref().map(PathBuf::from),
        ),
    ];
    inputs.extend(paths.into_iter().filter_map(|(f, p)| p.map(|p| (f, p))));
    let refs: Vec<(&str, &Path)> = inputs.iter().map(|(f, p)| (*f, p.as_path())).collect();
    check_output(&args.out, args.overwrite, &refs, OUTPUT_MARKERS)?;
    let mut loaded = crate::io::load_model(&args.model)?;
    inputs.push(("--model", loaded.path.clone()));
    loaded.weights.check_finite()?;
    loaded.weights = crate::device::place(
        &loaded.weights,
        &crate::device::select(args.device.as_deref().unwrap_or("cpu"))?,
    )?;
    // The base is built with the head the adapter was trained with, so module paths agree
    // (`bert.encoder…` under a sequence head).
    let head = match &source {
        DeltaSource::Adapter(dir) => crate::io::dash::head_spec_of(dir)?,
        DeltaSource::Finetuned(_) => crate::models::HeadSpec::Base,
    };
    let base = crate::models::load(&loaded, &head)?;
    let primary = load_deltas(&loaded, &source)?;
    let second = compare
        .as_ref()
        .map(|c| load_deltas(&loaded, c))
        .transpose()?;
    drop(loaded);

    let n_jobs = match &second {
        Some(c) => primary
            .layers
            .iter()
            .filter(|(n, _)| c.layers.iter().any(|(m, _)| m == n))
            .count(),
        None => primary.layers.len(),
    };
    if let Some(re) = &plot_re {
        if !primary.layers.iter().any(|(n, _)| re.is_match(n)) {
            return Err(Error::config(
                "plot_layers",
                format!(
                    "`{re}` matches none of the {} analysed layers (e.g. `{}`)",
                    n_jobs,
                    primary.layers.first().map(|l| l.0.as_str()).unwrap_or("")
                ),
            ));
        }
    }
    let bar = indicatif::ProgressBar::new(n_jobs as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] layer {pos}/{len} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let cache = SvdCache::new(default_cache_dir());
    let (analysis, spectra) = analyze(
        &args.model,
        base.as_ref(),
        &primary,
        second.as_ref(),
        args.s,
        &cache,
        Some(&bar),
    )?;
    bar.finish_and_clear();

    let refs: Vec<(&str, &Path)> = inputs.iter().map(|(f, p)| (*f, p.as_path())).collect();
    let stage = stage_output(&args.out, args.overwrite, &refs, OUTPUT_MARKERS)?;
    write_file(
        &stage.join(ANALYSIS_FILE),
        serde_json::to_string_pretty(&analysis)?.as_bytes(),
    )?;
    write_file(&stage.join(LAYERS_FILE), layers_csv(&analysis).as_bytes())?;
    write_spectra(&spectra, &stage.join(SPECTRA_FILE))?;
    write_plots(
        &analysis,
        &spectra,
        plot_re.as_ref(),
        args.bins,
        stage.path(),
    )?;
    stage.commit()?;
    print_summary(&analysis, &args.out);
    Ok(analysis)
}

fn fmt(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        String::new()
    }
}

fn join(idx: &[usize]) -> String {
    idx.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(";")
}

/// One row per layer; index lists are `;`-separated.
pub fn layers_csv(a: &Analysis) -> String {
    let mut out = String::from(
        "layer,out,in,k,tsd_indices,mean_percentile,mean_sigma_share_above,concentration,uniform_concentration,null_concentration,top_sigma_hits,null_overlap",
    );
    if a.compare.is_some() {
        out.push_str(",compare_tsd_indices,compare_mean_percentile,compare_concentration,overlap,jaccard,spearman,spearman_projection");
    }
    out.push('\n');
    for l in &a.layers {
        let s = &l.source;
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            l.layer,
            l.out_dim,
            l.in_dim,
            l.k,
            join(&s.indices),
            fmt(s.mean_percentile),
            fmt(s.mean_sigma_share_above),
            fmt(s.concentration),
            fmt(l.uniform_concentration),
            fmt(l.null_concentration),
            s.top_sigma_hits,
            fmt(s.null_overlap)
        ));
        if let (Some(c), Some(g)) = (&l.compare, &l.agreement) {
            out.push_str(&format!(
                ",{},{},{},{},{},{},{}",
                join(&c.indices),
                fmt(c.mean_percentile),
                fmt(c.concentration),
                fmt(g.overlap),
                fmt(g.jaccard),
                fmt(g.spearman),
                fmt(g.spearman_projection)
            ));
        }
        out.push('\n');
    }
    out
}

fn write_spectra(sp: &Spectra, path: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for (suffix, map) in [
        ("sigma", &sp.sigma),
        ("delta", &sp.delta),
        ("compare_delta", &sp.compare_delta),
    ] {
        for (layer, v) in map {
            tensors.push((
                format!("{layer}.{suffix}"),
                Tensor::from_vec(v.clone(), v.len(), &crate::device::host())?,
            ));
        }
    }
    save_tensors(tensors.iter().map(|(n, t)| (n.as_str(), t)), path, None)
}

fn write_plots(
    a: &Analysis,
    sp: &Spectra,
    re: Option<&regex::Regex>,
    bins: usize,
    dir: &Path,
) -> Result<()> {
    let chosen: Vec<usize> = match re {
        Some(re) => (0..a.layers.len())
            .filter(|&i| re.is_match(&a.layers[i].layer))
            .collect(),
        None => {
            let n = a.layers.len();
            let m = DEFAULT_PLOTS.min(n);
            let mut v: Vec<usize> = (0..m)
                .map(|j| if m > 1 { j * (n - 1) / (m - 1) } else { 0 })
                .collect();
            v.dedup();
            v
        }
    };
    let src_label = format!("{} (source)", a.source.kind);
    let cmp_label = a
        .compare
        .as_ref()
        .map(|c| format!("{} (compare)", c.kind))
        .unwrap_or_default();
    let empty: Vec<f32> = Vec::new();
    for i in chosen {
        let l = &a.layers[i];
        let mut series = vec![SpectrumSeries {
            label: &src_label,
            delta: sp.delta.get(&l.layer).unwrap_or(&empty),
            tsd: &l.source.indices,
        }];
        if let Some(c) = &l.compare {
            series.push(SpectrumSeries {
                label: &cmp_label,
                delta: sp.compare_delta.get(&l.layer).unwrap_or(&empty),
                tsd: &c.indices,
            });
        }
        plot_delta_spectrum(
            &dir.join(format!("delta_{}.png", l.layer)),
            &l.layer,
            &series,
        )?;
    }
    let rows: Vec<HeatRow<'_>> = a
        .layers
        .iter()
        .map(|l| HeatRow {
            layer: &l.layer,
            tsd: &l.source.indices,
            delta: sp.delta.get(&l.layer).unwrap_or(&empty),
        })
        .collect();
    plot_tsd_heatmap(
        &dir.join("tsd_heatmap.png"),
        &format!("where the TSD of {} sit (s = {})", a.source.label, a.s),
        &rows,
        bins,
    )?;
    if let Some(c) = &a.compare {
        let rows: Vec<HeatRow<'_>> = a
            .layers
            .iter()
            .filter_map(|l| {
                l.compare.as_ref().map(|cs| HeatRow {
                    layer: &l.layer,
                    tsd: &cs.indices,
                    delta: sp.compare_delta.get(&l.layer).unwrap_or(&empty),
                })
            })
            .collect();
        plot_tsd_heatmap(
            &dir.join("compare_tsd_heatmap.png"),
            &format!("where the TSD of {} sit (s = {})", c.label, a.s),
            &rows,
            bins,
        )?;
        let names: Vec<String> = a.layers.iter().map(|l| l.layer.clone()).collect();
        let ov: Vec<f64> = a
            .layers
            .iter()
            .map(|l| l.agreement.as_ref().map_or(f64::NAN, |g| g.overlap))
            .collect();
        let rho: Vec<f64> = a
            .layers
            .iter()
            .map(|l| l.agreement.as_ref().map_or(f64::NAN, |g| g.spearman))
            .collect();
        let null: Vec<f64> = a.layers.iter().map(|l| l.source.null_overlap).collect();
        plot_overlap(
            &dir.join("overlap.png"),
            &names,
            &ov,
            &rho,
            &null,
            a.summary.chance_overlap.unwrap_or(f64::NAN),
        )?;
    }
    Ok(())
}

fn print_summary(a: &Analysis, out: &Path) {
    let s = &a.summary;
    println!(
        "{} layers, s = {}: TSD at mean spectrum percentile {:.1} (median {:.1}), {:.1}% of σ mass above them, \
         {:.1}% of TSD among the top-{} σ; concentration Σ_TSD δ / Σ δ = {:.3} (uniform δ: {:.3}, isotropic random ΔW: {:.3}); \
         |TSD ∩ TSD of an isotropic random ΔW| / s = {:.3}",
        s.layers,
        a.s,
        s.source.mean_percentile,
        s.source.median_percentile,
        100.0 * s.source.mean_sigma_share_above,
        100.0 * s.source.top_sigma_hit_rate,
        a.s,
        s.source.mean_concentration,
        s.mean_uniform_concentration,
        s.mean_null_concentration,
        s.source.mean_null_overlap
    );
    if let (Some(c), Some(o), Some(j), Some(r)) =
        (&s.compare, s.mean_overlap, s.mean_jaccard, s.mean_spearman)
    {
        println!(
            "compare: TSD at mean percentile {:.1}, concentration {:.3}; |∩|/s = {:.3} (chance s/k {:.3}, \
             isotropic-ΔW baseline {:.3} / {:.3}), Jaccard {:.3}, Spearman ρ of δ {:.3}, of |uᵀΔWv| {:.3}",
            c.mean_percentile,
            c.mean_concentration,
            o,
            s.chance_overlap.unwrap_or(f64::NAN),
            s.source.mean_null_overlap,
            c.mean_null_overlap,
            j,
            r,
            s.mean_spearman_projection.unwrap_or(f64::NAN)
        );
    }
    if !a.unmatched_layers.is_empty() {
        println!(
            "{} layers changed by only one source were left out",
            a.unmatched_layers.len()
        );
    }
    println!("wrote {}", out.display());
}
