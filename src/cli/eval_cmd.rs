//! `lora-dash eval`: accuracy of a model (base, base + adapter, or merged) on commonsense test
//! files, in the authors' generate protocol or by candidate likelihood (see `crate::eval`).

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::commands::load_with_adapter;
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
    /// Test files in LLM-Adapters format; the task is recognised from the answers.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
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
}

pub fn eval(args: EvalArgs) -> Result<()> {
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
        .map(|o| StagedDir::new(o, args.overwrite))
        .transpose()?;

    let (loaded, model) = load_with_adapter(&args.model, args.adapter.as_deref())?;
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
        let r = eval::evaluate(&model, tok, task, recs, &opts, &mut |n| bar.inc(n as u64))?;
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
    Ok(())
}
