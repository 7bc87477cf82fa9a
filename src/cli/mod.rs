//! Command-line front end: argument parsing and the plan each subcommand runs. `main` only
//! prints the error chain and picks the exit code.

pub mod analyze_cmd;
pub mod commands;
pub mod eval_cmd;
pub mod selftest;
pub mod train_args;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use train_args::TrainArgs;

#[derive(Debug, Parser)]
#[command(
    name = "lora-dash",
    version,
    about = "LoRA and LoRA-Dash fine-tuning of Hugging Face models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a model with an adapter.
    Train(TrainArgs),
    /// Write a GGUF model out as a Hugging Face directory.
    Convert {
        #[arg(long)]
        model: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        overwrite: bool,
    },
    /// Fold an adapter into the base and write a Hugging Face model directory.
    Merge {
        #[arg(long)]
        model: String,
        /// PEFT adapter directory or a lora-dash run directory.
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        overwrite: bool,
        /// Where the merge runs: cpu (default), cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Measure training throughput and peak memory: runs `train` for a few steps in a
    /// scratch directory and reports tokens/s over the steps after `--skip`.
    Bench {
        #[command(flatten)]
        args: TrainArgs,
        /// Untimed steps at the start (warm-up).
        #[arg(long, default_value_t = 2)]
        skip: usize,
    },
    /// Accuracy on commonsense test files (generate or likelihood protocol).
    Eval(eval_cmd::EvalArgs),
    /// Task-specific-direction study of an adapter or a fine-tuned model against its base.
    Analyze(analyze_cmd::AnalyzeArgs),
    /// Logits of the tiny reference models on a device against the golden files of
    /// transformers (the repository's tests/golden), e.g. to check a CUDA build on a GPU.
    Selftest(selftest::SelftestArgs),
    /// Greedy generation with a KV cache, for quick checks.
    Generate {
        #[arg(long)]
        model: String,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: Vec<String>,
        /// Wrap each prompt in the Alpaca instruction template.
        #[arg(long)]
        alpaca: bool,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// cpu (default), cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Storage of the frozen linear weights: f32 (default), bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

pub fn run(cli: Cli) -> crate::Result<()> {
    crate::ops::kernels()?;
    match cli.command {
        Command::Train(args) => commands::train(args),
        Command::Analyze(args) => analyze_cmd::run(&args).map(|_| ()),
        Command::Eval(args) => eval_cmd::eval(args),
        Command::Selftest(args) => selftest::run(&args),
        Command::Bench { args, skip } => commands::bench(args, skip),
        Command::Convert {
            model,
            out,
            overwrite,
        } => commands::convert(&model, &out, overwrite),
        Command::Merge {
            model,
            adapter,
            out,
            overwrite,
            device,
        } => commands::merge_on(&model, &adapter, &out, overwrite, &device),
        Command::Generate {
            model,
            adapter,
            prompt,
            alpaca,
            max_new_tokens,
            device,
            dtype,
        } => commands::generate(
            &model,
            adapter.as_deref(),
            &prompt,
            alpaca,
            max_new_tokens,
            &device,
            &dtype,
        ),
    }
}
