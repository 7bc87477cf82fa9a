//! `lora-dash eval`: accuracy of a model (base, base + adapter, or merged) on commonsense test
//! files, in the authors' generate protocol or by candidate likelihood (see `crate::eval`),
//! or GLUE metrics of a sequence classifier on a task's dev files (`--task`).

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::commands::load_with_adapter_on;
use crate::data::load_records;
use crate::error::{Error, Result};
use crate::eval::{self, report, EvalOptions, Mode, Task};
use crate::io::atomic::StagedDir;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Base or merged model: Hugging Face directory, `.gguf` file or hub id.
    #[arg(long)]
    pub model: String,
    /// PEFT LoRA adapter, native LoRA-Dash adapter or lora-dash run directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Test files in LLM-Adapters format (the task is recognised from the answers), or with
    /// --task the GLUE task's TSV files (e.g. MNLI's dev_matched.tsv and dev_mismatched.tsv).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte): report its metrics.
    #[arg(long)]
    pub task: Option<String>,
    /// GLUE: maximum tokens per example (default: the run's `cutoff_len` when --adapter is a
    /// lora-dash run directory, else 256).
    #[arg(long)]
    pub cutoff_len: Option<usize>,
    /// Evaluate only the first N records of each file.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = Mode::Generate)]
    pub mode: Mode,
    /// 1 = greedy decoding; more = beam search (the reference evaluation uses 4).
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Directory for predictions.jsonl and results.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub overwrite: bool,
    /// Where the model runs: cpu (default), cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage of the frozen linear weights: f32 (default), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    // Flag values first, before any file is read.
    crate::device::parse(&args.device)?;
    crate::device::parse_dtype(&args.dtype)?;
    if let Some(task) = args.task.as_deref() {
        return eval_glue(&args, task);
    }
    let opts = EvalOptions {
        mode: args.mode,
        num_beams: args.num_beams,
        batch_size: args.batch_size,
        max_new_tokens: args.max_new_tokens,
        ..EvalOptions::default()
    };
    opts.validate()?;
    if args.limit == Some(0) {
        return Err(Error::config("limit", "must be at least 1"));
    }
    // Data and output checks come first: they are cheap, loading the model is not.
    let mut tasks: Vec<(Task, Vec<crate::data::Record>)> = Vec::new();
    for path in &args.data {
        let mut recs = load_records(std::slice::from_ref(path))?;
        // Detect on the whole file so `--limit` cannot hide options (e.g. answer4).
        let task = eval::detect_task(&eval::task_name(path), path, &recs)?;
        if let Some(n) = args.limit {
            recs.truncate(n);
        }
        tasks.push((task, recs));
    }
    report::check_names(
        tasks
            .iter()
            .map(|(t, _)| t.name.as_str())
            .zip(args.data.iter().map(PathBuf::as_path)),
    )?;
    let staged = args
        .out
        .as_deref()
        .map(|o| stage_eval_out(o, &args))
        .transpose()?;

    let (loaded, model) = load_with_adapter_on(
        &args.model,
        args.adapter.as_deref(),
        Some(crate::models::HeadSpec::CausalLm),
        &crate::device::select(&args.device)?,
        crate::device::parse_dtype(&args.dtype)?,
    )?;
    let model = model.as_causal_lm().ok_or_else(|| {
        Error::config(
            "task",
            format!(
                "`{}` is not a causal LM: commonsense evaluation needs a decoder (pass --task for GLUE)",
                model.arch()
            ),
        )
    })?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| Error::format(&loaded.path, "no tokenizer found"))?;

    let mut reports = Vec::new();
    for (task, recs) in &tasks {
        let bar = ProgressBar::new(recs.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .map_err(|e| Error::msg(format!("progress bar template: {e}")))?
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{} ({})", task.name, opts.mode.name()));
        let r = eval::evaluate(model, tok, task, recs, &opts, &mut |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        reports.push(r);
    }
    print!("{}", report::table(&reports));
    println!(
        "{}",
        serde_json::to_string_pretty(&report::results_json(&reports))?
    );
    if let Some(s) = staged {
        report::write_outputs(s.path(), &reports)?;
        let dir = s.commit()?;
        println!("wrote {}", dir.display());
    }
    // `LORA_DASH_PROFILE_GEMM=1`: where the products of the whole run went.
    eprint!("{}", crate::ops::gemm_profile::report(1.0, "run"));
    Ok(())
}

/// The `run_config.json` of a lora-dash run directory, when `adapter` is one.
fn run_config(adapter: Option<&std::path::Path>) -> Option<serde_json::Value> {
    let p = adapter?.join(crate::train::trainer::CONFIG_FILE);
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// `eval --task`: GLUE metrics per data file, `results.json` and `predictions.jsonl`.
fn eval_glue(args: &EvalArgs, task_name: &str) -> Result<()> {
    use crate::data::{EncodeOptions, Task as DataTask};
    use crate::eval::glue::{evaluate_with_progress, GluePrediction};
    let task = DataTask::parse(Some(task_name))?;
    let DataTask::Glue(glue) = task else {
        return Err(Error::config(
            "task",
            "give a GLUE task name; commonsense files need no --task",
        ));
    };
    if args.limit == Some(0) {
        return Err(Error::config("limit", "must be at least 1"));
    }
    if args.batch_size == 0 {
        return Err(Error::config("batch_size", "must be at least 1"));
    }
    let run = run_config(args.adapter.as_deref());
    // A run's `task` is null for instruction tuning.
    let run_task = run
        .as_ref()
        .and_then(|v| v.get("task"))
        .map(|t| t.as_str().unwrap_or("instruction").to_string());
    if let Some(t) = run_task {
        if DataTask::parse(Some(&t)).ok() != Some(task) {
            return Err(Error::format(
                args.adapter.clone().unwrap_or_default(),
                format!("was trained for task `{t}`, not `{}`", glue.name()),
            ));
        }
    }
    let cutoff_len = args
        .cutoff_len
        .or_else(|| {
            run.as_ref()
                .and_then(|v| v.get("cutoff_len")?.as_u64())
                .map(|x| x as usize)
        })
        .unwrap_or(256);
    if cutoff_len < 2 {
        return Err(Error::config("cutoff_len", "must be at least 2"));
    }
    let mut names: Vec<String> = Vec::new();
    for p in &args.data {
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "data".into());
        if names.contains(&name) {
            return Err(Error::config(
                "data",
                format!("two files are named `{name}`; results are keyed by file name"),
            ));
        }
        names.push(name);
    }
    let staged = args
        .out
        .as_deref()
        .map(|o| stage_eval_out(o, &args))
        .transpose()?;
    let head = task.head(None, 0);
    let dev = crate::device::select(&args.device)?;
    let (loaded, model) = load_with_adapter_on(
        &args.model,
        args.adapter.as_deref(),
        Some(head),
        &dev,
        crate::device::parse_dtype(&args.dtype)?,
    )?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| Error::format(&loaded.path, "no tokenizer found"))?;
    let opts = EncodeOptions {
        cutoff_len,
        train_on_inputs: true,
    };
    let pad_id = tok.pad_or_eos();
    let mut results = serde_json::Map::new();
    let mut lines = String::new();
    for (path, name) in args.data.iter().zip(&names) {
        let mut indexed = task.load_indexed(tok, std::slice::from_ref(path), opts)?;
        if let Some(n) = args.limit {
            indexed.truncate(n);
        }
        let (rows, exs): (Vec<usize>, Vec<_>) = indexed.into_iter().unzip();
        let bar = ProgressBar::new(exs.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .map_err(|e| Error::msg(format!("progress bar template: {e}")))?
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{} {name}", glue.name()));
        let start = std::time::Instant::now();
        let r = evaluate_with_progress(
            model.as_ref(),
            glue,
            &exs,
            args.batch_size,
            pad_id,
            &mut |n| bar.inc(n as u64),
        )?;
        bar.finish_and_clear();
        let secs = start.elapsed().as_secs_f64();
        let metrics: Vec<String> = r
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        println!(
            "{} {name}: {} ({} examples, {:.1} ex/s)",
            glue.name(),
            metrics.join(", "),
            exs.len(),
            exs.len() as f64 / secs.max(1e-9)
        );
        let mut m = serde_json::Map::new();
        for (k, v) in &r.metrics {
            m.insert(k.clone(), serde_json::json!(v));
        }
        m.insert("examples".into(), serde_json::json!(exs.len()));
        m.insert("file".into(), serde_json::json!(path.display().to_string()));
        results.insert(name.clone(), serde_json::Value::Object(m));
        for (&i, p) in rows.iter().zip(&r.predictions) {
            let GluePrediction {
                label,
                prediction,
                scores,
            } = p;
            let v = serde_json::json!({
                "file": name,
                "index": i,
                "label": glue_label_json(label),
                "prediction": glue_label_json(prediction),
                "scores": scores,
            });
            lines.push_str(&v.to_string());
            lines.push('\n');
        }
    }
    let results = serde_json::json!({
        "task": glue.name(),
        "main_metric": glue.main_metric(),
        "files": results,
    });
    println!("{}", serde_json::to_string_pretty(&results)?);
    if let Some(s) = staged {
        crate::io::atomic::write_file(
            &s.join(eval::report::RESULTS_FILE),
            serde_json::to_string_pretty(&results)?.as_bytes(),
        )?;
        crate::io::atomic::write_file(&s.join(eval::report::PREDICTIONS_FILE), lines.as_bytes())?;
        let dir = s.commit()?;
        println!("wrote {}", dir.display());
    }
    // `LORA_DASH_PROFILE_GEMM=1`: where the products of the whole run went.
    eprint!("{}", crate::ops::gemm_profile::report(1.0, "run"));
    Ok(())
}

fn glue_label_json(l: &crate::data::glue::GlueLabel) -> serde_json::Value {
    match l {
        crate::data::glue::GlueLabel::Class(c) => serde_json::json!(c),
        crate::data::glue::GlueLabel::Score(x) => serde_json::json!(x),
    }
}

/// Marker files of an `eval --out` directory: `--overwrite` replaces only such a directory.
pub const EVAL_MARKERS: &[&str] = &[eval::report::RESULTS_FILE, eval::report::PREDICTIONS_FILE];

/// Stages `--out`, refusing one that is, holds or lies inside the model, adapter or data.
fn stage_eval_out(out: &std::path::Path, args: &EvalArgs) -> Result<StagedDir> {
    let model = PathBuf::from(&args.model);
    let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--model", model.as_path())];
    if let Some(a) = &args.adapter {
        inputs.push(("--adapter", a.as_path()));
    }
    inputs.extend(args.data.iter().map(|d| ("--data", d.as_path())));
    crate::io::outpath::stage_output(out, args.overwrite, &inputs, EVAL_MARKERS)
}
