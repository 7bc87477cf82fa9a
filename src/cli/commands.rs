//! What each subcommand does, on top of the library.

use std::path::Path;

use crate::cli::TrainArgs;
use crate::error::{Error, Result};
use crate::io;
use crate::models::generate::generate_greedy;
use crate::models::{HeadSpec, Model};

pub fn train(args: TrainArgs) -> Result<()> {
    let cfg = args.resolve()?;
    let s = crate::train::trainer::train(&cfg)?;
    let (what, dir) = if matches!(cfg.method, crate::train::config::Method::Full) {
        ("model", s.out.join("model"))
    } else {
        ("adapter", s.out.clone())
    };
    println!(
        "trained {} steps: loss {:.4} -> {:.4}{} ({:.0} tokens/s); {what} in {}",
        s.steps,
        s.first_loss,
        s.last_loss,
        match (s.first_val_loss, s.last_val_loss) {
            (Some(a), Some(b)) => format!(", val loss {a:.4} -> {b:.4}"),
            _ => String::new(),
        },
        s.tokens_per_s,
        dir.display()
    );
    if let Some(m) = &s.eval_metrics {
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        println!("eval: {}", parts.join(", "));
    }
    Ok(())
}

pub fn convert(model: &str, out: &Path, overwrite: bool) -> Result<()> {
    let loaded = io::load_model(model)?;
    let weights = loaded.weights.clone();
    io::hf::write_hf_dir(&loaded, &weights, out, overwrite)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Loads a model and, when given, attaches an adapter (PEFT directory or run directory).
/// `head` is the task head the caller needs; None takes the adapter's (a trained classifier
/// of a SEQ_CLS adapter) or the base's own.
pub fn load_with_adapter(
    model: &str,
    adapter: Option<&Path>,
    head: Option<HeadSpec>,
) -> Result<(io::LoadedModel, Box<dyn Model>)> {
    load_with_adapter_on(
        model,
        adapter,
        head,
        &crate::device::host(),
        candle_core::DType::F32,
    )
}

/// [`load_with_adapter`] with the model, its heads and the adapter on `dev`, and the frozen
/// linear weights stored in `dtype` (`io::weights::with_linear_dtype`).
pub fn load_with_adapter_on(
    model: &str,
    adapter: Option<&Path>,
    head: Option<HeadSpec>,
    dev: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<(io::LoadedModel, Box<dyn Model>)> {
    let mut loaded = io::weights::with_linear_dtype(dtype, || io::load_model(model))?;
    loaded.weights.check_finite()?;
    loaded.weights = crate::device::place(&loaded.weights, dev)?;
    let head = match (head, adapter) {
        (Some(h), _) => h,
        (None, Some(dir)) => io::dash::head_spec_of(dir)?,
        (None, None) => HeadSpec::Base,
    };
    let mut m = crate::models::load(&loaded, &head)?;
    if let Some(dir) = adapter {
        io::dash::load_any(m.as_mut(), dir)?;
    }
    Ok((loaded, m))
}

pub fn merge(model: &str, adapter: &Path, out: &Path, overwrite: bool) -> Result<()> {
    merge_on(model, adapter, out, overwrite, "cpu")
}

/// [`merge`] with the model and adapter on `device` (`cpu`, `cuda`, `cuda:N`).
pub fn merge_on(
    model: &str,
    adapter: &Path,
    out: &Path,
    overwrite: bool,
    device: &str,
) -> Result<()> {
    let dev = crate::device::select(device)?;
    let stage = io::outpath::stage_output(
        out,
        overwrite,
        &[("--model", Path::new(model)), ("--adapter", adapter)],
        io::hf::HF_OUTPUT_MARKERS,
    )?;
    let (loaded, m) =
        load_with_adapter_on(model, Some(adapter), None, &dev, candle_core::DType::F32)?;
    io::outpath::check_output_disjoint(out, &[("--model", &loaded.path)])?;
    let merged = m.base_weights(true)?;
    io::hf::write_hf_into_with_config(&loaded, &m.hf_config(&loaded.config_json)?, &merged, stage)?;
    println!("wrote merged model to {}", out.display());
    Ok(())
}

pub fn generate(
    model: &str,
    adapter: Option<&Path>,
    prompts: &[String],
    alpaca: bool,
    max_new_tokens: usize,
    device: &str,
    dtype: &str,
) -> Result<()> {
    let dev = crate::device::select(device)?;
    let dtype = crate::device::parse_dtype(dtype)?;
    if prompts.is_empty() {
        return Err(Error::config("prompt", "give at least one --prompt"));
    }
    let (loaded, m) = load_with_adapter_on(model, adapter, Some(HeadSpec::CausalLm), &dev, dtype)?;
    let m = m.as_causal_lm().ok_or_else(|| {
        Error::config(
            "model",
            format!(
                "`{}` is not a causal LM; generate needs a decoder",
                m.arch()
            ),
        )
    })?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| Error::format(&loaded.path, "no tokenizer found"))?;
    let texts: Vec<String> = prompts
        .iter()
        .map(|p| {
            if alpaca {
                crate::data::alpaca::eval_prompt(p, None)
            } else {
                p.clone()
            }
        })
        .collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t)).collect::<Result<_>>()?;
    let mut eos = m.eos_token_ids().to_vec();
    eos.extend(tok.eos_id);
    let outs = generate_greedy(m, &ids, tok.pad_or_eos(), max_new_tokens, &eos)?;
    for (t, o) in texts.iter().zip(outs) {
        println!("{}{}", t, tok.decode(&o)?);
        println!("---");
    }
    Ok(())
}

/// Runs a short training job and prints one JSON line: tokens/s and step time over the
/// steps after `skip`, peak RSS, and the last loss.
pub fn bench(mut args: TrainArgs, skip: usize) -> Result<()> {
    let scratch = tempfile_dir()?;
    if args.out.is_none() {
        args.out = Some(scratch.join("run"));
    }
    args.overwrite = Some(true);
    if args.max_steps.is_none() {
        args.max_steps = Some(skip + 10);
    }
    let cfg = args.resolve()?;
    if cfg.max_steps.unwrap_or(0) <= skip {
        return Err(Error::config(
            "max_steps",
            format!("must exceed --skip ({skip})"),
        ));
    }
    let s = crate::train::trainer::train(&cfg)?;
    let recs =
        crate::train::metrics::read_records(&cfg.out.join(crate::train::trainer::METRICS_FILE))?;
    let timed: Vec<_> = recs.iter().filter(|r| r.step > skip).collect();
    let tokens: f64 = timed
        .iter()
        .filter_map(|r| r.extra.get("tokens").and_then(|v| v.as_f64()))
        .sum();
    let positions: f64 = timed
        .iter()
        .filter_map(|r| r.extra.get("batch_tokens").and_then(|v| v.as_f64()))
        .sum();
    let secs: f64 = timed
        .iter()
        .filter_map(|r| r.extra.get("step_s").and_then(|v| v.as_f64()))
        .sum();
    let switch = recs
        .iter()
        .find_map(|r| r.extra.get("dash_switch").cloned());
    let out = serde_json::json!({
        "dash_switch": switch,
        "method": cfg.method.name(),
        "steps_timed": timed.len(),
        "tokens_per_s": tokens / secs,
        "padding_fraction": 1.0 - tokens / positions.max(1.0),
        "group_by_length": cfg.group_by_length,
        "step_time_s": secs / timed.len().max(1) as f64,
        "peak_rss_gib": s.peak_rss_bytes as f64 / (1u64 << 30) as f64,
        "final_loss": s.last_loss,
        "threads": rayon::current_num_threads(),
    });
    println!("{out}");
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("lora-dash-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    Ok(d)
}
