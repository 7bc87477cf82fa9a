//! Times the parts of one training step to find where time goes.
//!
//! Decoder (causal LM, synthetic ids, `T` positions, batch 4):
//! `cargo run --release --example profile_step -- MODEL`.
//! Encoder (sequence classification on a GLUE task's real rows, batch `B` = 32, cutoff
//! `T` = 128): `cargo run --release --example profile_step -- MODEL TASK DATA.tsv`.
//! Each step also reports the process's user and system CPU seconds, which separate
//! compute from page faults (fresh allocations being zeroed by the kernel).
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lora_dash::adapters::{inject_lora, LoraConfig, TargetModules};
use lora_dash::data::{collate, EncodeOptions, Task};
use lora_dash::models::{Ctx, Llama};

/// (user, system) CPU seconds of this process so far, from `/proc/self/stat`.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick = 100.0; // USER_HZ on Linux
    (
        f.get(11).copied().unwrap_or(0.0) / tick,
        f.get(12).copied().unwrap_or(0.0) / tick,
    )
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> lora_dash::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [model] => decoder(model),
        [model, task, data] => encoder(model, task, data),
        _ => Err(lora_dash::Error::msg(
            "usage: profile_step MODEL  |  profile_step MODEL TASK DATA",
        )),
    }
}

fn encoder(path: &str, task: &str, data: &str) -> lora_dash::Result<()> {
    let task = Task::parse(Some(task))?;
    let loaded = lora_dash::io::load_model(path)?;
    let tok = loaded
        .tokenizer
        .clone()
        .ok_or_else(|| lora_dash::Error::msg("the model has no tokenizer"))?;
    let mut m = lora_dash::models::load(&loaded, &task.head(None, 42))?;
    let lc = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        use_rslora: false,
        target_modules: TargetModules::parse("query,key,value")?,
    };
    inject_lora(m.as_mut(), &lc, 0)?;
    let (b, t) = (env_usize("B", 32), env_usize("T", 128));
    let opts = EncodeOptions {
        cutoff_len: t,
        train_on_inputs: false,
    };
    let examples = task.load_examples(&tok, &[data.into()], opts)?;
    let iters = env_usize("ITERS", 4) as u64;
    for it in 0..iters {
        if it == 1 {
            lora_dash::ops::gemm_profile::take();
        }
        let start = (it as usize * b) % examples.len().max(1);
        let rows: Vec<_> = examples.iter().cycle().skip(start).take(b).collect();
        let batch = collate(&rows, tok.pad_or_eos())?;
        let ntok = batch.input_ids.elem_count();
        let ctx = Ctx::train(lora_dash::rng::Rng::new(it));
        let (c0, t0) = (cpu_seconds(), Instant::now());
        let loss = m.loss(&batch, &ctx)?;
        let (c1, t1) = (cpu_seconds(), Instant::now());
        let g = loss.backward()?;
        let (c2, t2) = (cpu_seconds(), Instant::now());
        drop(g);
        println!(
            "forward {:.2}s (user {:.2} sys {:.2})  backward {:.2}s (user {:.2} sys {:.2})  {} tokens, {:.0} tok/s",
            (t1 - t0).as_secs_f64(),
            c1.0 - c0.0,
            c1.1 - c0.1,
            (t2 - t1).as_secs_f64(),
            c2.0 - c1.0,
            c2.1 - c1.1,
            ntok,
            ntok as f64 / (t2 - t0).as_secs_f64()
        );
    }
    print_gemm_profile(iters.saturating_sub(1).max(1) as f64);
    println!(
        "peak RSS {:.2} GiB",
        lora_dash::train::trainer::peak_rss_bytes() as f64 / (1u64 << 30) as f64
    );
    Ok(())
}

/// With `LORA_DASH_PROFILE_GEMM=1`: per GEMM call site, per step, the FLOPs, wall and
/// core seconds and GFLOP/s per busy core (iterations after the first).
fn print_gemm_profile(steps: f64) {
    print!("{}", lora_dash::ops::gemm_profile::report(steps, "step"));
}

fn decoder(path: &str) -> lora_dash::Result<()> {
    let loaded = lora_dash::io::load_model(path)?;
    let cfg = loaded.config.resolve()?;
    let mut m = Llama::load(&cfg, &loaded.weights)?;
    let lc = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        use_rslora: false,
        target_modules: TargetModules::parse("q_proj,k_proj,v_proj,up_proj,down_proj")?,
    };
    m.inject_lora(&lc, 0)?;
    let (b, t) = (env_usize("B", 4), env_usize("T", 128));
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7919 % 40000) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let mask = Tensor::ones((b, t), DType::F32, &Device::Cpu)?;
    let labels = ids.to_dtype(DType::I64)?;
    let iters = env_usize("ITERS", 3) as u64;
    let mut timed = (0usize, 0f64);
    for it in 0..iters {
        let ctx = Ctx::train(lora_dash::rng::Rng::new(it));
        let (c0, t0) = (cpu_seconds(), Instant::now());
        let h = m.forward_hidden(&ids, Some(&mask), None, None, &ctx)?;
        let t1 = Instant::now();
        // LM head + loss through the training path (chunked, no (n, v) logits kept).
        let loss = m.loss_from_hidden(&h, &labels, &ctx)?;
        let t3 = Instant::now();
        let g = loss.backward()?;
        let (c4, t4) = (cpu_seconds(), Instant::now());
        drop(g);
        println!(
            "body {:.2}s  lm_head+ce {:.2}s  backward {:.2}s  total {:.2}s (user {:.2} sys {:.2})  ({:.0} tok/s)",
            (t1 - t0).as_secs_f64(),
            (t3 - t1).as_secs_f64(),
            (t4 - t3).as_secs_f64(),
            (t4 - t0).as_secs_f64(),
            c4.0 - c0.0,
            c4.1 - c0.1,
            (b * t) as f64 / (t4 - t0).as_secs_f64()
        );
        if it > 0 {
            timed = (timed.0 + b * t, timed.1 + (t4 - t0).as_secs_f64());
        } else {
            lora_dash::ops::gemm_profile::take();
        }
    }
    print_gemm_profile(iters.saturating_sub(1).max(1) as f64);
    let peak = lora_dash::train::trainer::peak_rss_bytes() as f64 / (1u64 << 30) as f64;
    println!("peak RSS {peak:.2} GiB");
    // One JSON line for bench scripts: the iterations after the first.
    println!(
        "{{\"tokens_per_s\": {:.2}, \"step_time_s\": {:.3}, \"peak_rss_gib\": {peak:.3}, \"batch\": {b}, \"t\": {t}}}",
        timed.0 as f64 / timed.1.max(1e-9),
        timed.1 / (iters.max(2) - 1) as f64
    );
    Ok(())
}
