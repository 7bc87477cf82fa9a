//! The fine-tuning loop: micro-batches with gradient accumulation, AdamW with a warmup
//! schedule and norm clipping, periodic validation and checkpoints, exact resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::adapters::{inject_dora, inject_full, inject_lora, inject_svd_init};
use crate::data::batch::{collate, split_train_val, Batch, Loader};
use crate::data::tokenize::Example;
use crate::data::{EncodeOptions, Task};
use crate::error::{Error, IoContext, Result};
use crate::io::atomic::StagedDir;
use crate::io::{self, atomic, TextTokenizer, Weights};
use crate::models::{Ctx, Model};
use crate::rng::Rng;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::{Method, TrainConfig};
use crate::train::dash::{DashRuntime, DashState};
use crate::train::metrics::{read_records, MetricRecord, MetricsLog};
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::plot::plot_loss_curve;
use crate::train::schedule::Schedule;
use crate::tsd::svd::{default_cache_dir, SvdCache};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CONFIG_FILE: &str = "run_config.json";
/// LoRA-Dash: the PEFT adapter at the switch (the A, B the selection used).
pub const SWITCH_DIR: &str = "switch";
/// LoRA-Dash: the rank-(r+s) PEFT export; PiSSA / MiLoRA: the rank-2r one.
pub const EXPORT_DIR: &str = "peft";
/// Full fine-tuning: the fine-tuned model as a Hugging Face directory.
pub const FULL_MODEL_DIR: &str = "model";

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub out: PathBuf,
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    pub first_val_loss: Option<f32>,
    pub last_val_loss: Option<f32>,
    pub tokens_per_s: f64,
    pub adapted_layers: usize,
    pub trainable_params: usize,
    /// Peak resident memory of the process so far, bytes (Linux; 0 elsewhere).
    pub peak_rss_bytes: u64,
    /// The task metrics of the last evaluation on `eval_data` (GLUE tasks).
    pub eval_metrics: Option<std::collections::BTreeMap<String, f64>>,
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Everything a run needs, loaded and checked before the first step.
pub struct Prepared {
    pub model: Box<dyn Model>,
    pub task: Task,
    pub tokenizer: TextTokenizer,
    pub train: Vec<Example>,
    /// Held out from the training files (`val_set_size`).
    pub val: Vec<Example>,
    /// From `eval_data`.
    pub eval: Vec<Example>,
    pub adapted: Vec<String>,
    /// The base's config and tokenizer (no weights), to write a full fine-tune out.
    pub source: io::LoadedModel,
    /// Content hashes recorded in checkpoints (see `TrainerState`).
    pub data_hash: String,
    pub base_hash: String,
}

/// SHA-256 over the contents of `files`, in order.
fn files_hash(files: &[PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in files {
        let bytes = std::fs::read(f).at(f)?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// SHA-256 over every tensor of the base (name and per-tensor content hash).
fn weights_hash(w: &Weights) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, t) in w.iter() {
        h.update(name.as_bytes());
        h.update(crate::tsd::svd::base_hash(t)?.as_bytes());
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Loads the model, attaches the adapters, reads and tokenises the data.
pub fn prepare(cfg: &TrainConfig) -> Result<Prepared> {
    cfg.validate()?;
    let task = Task::parse(cfg.task.as_deref())?;
    let loaded = io::weights::with_linear_dtype(crate::device::parse_dtype(&cfg.dtype)?, || {
        io::load_model(&cfg.model)
    })?;
    let tokenizer = loaded.tokenizer.clone().ok_or_else(|| {
        Error::format(
            &loaded.path,
            "no tokenizer found (tokenizer.json or GGUF tokenizer metadata is required to train)",
        )
    })?;
    loaded.weights.check_finite()?;
    let base_hash = weights_hash(&loaded.weights)?;
    let mut loaded = loaded;
    loaded.weights = crate::device::place(&loaded.weights, &crate::device::select(&cfg.device)?)?;
    let mut model = crate::models::load(&loaded, &task.head(cfg.classifier_dropout, cfg.seed))?;
    let source = io::LoadedModel {
        weights: Weights::new(None),
        ..loaded
    };
    let adapted = match (&cfg.method, cfg.method.svd_init()) {
        (Method::Full, _) => inject_full(model.as_mut(), &cfg.lora.target_modules)?,
        (Method::Dora, _) => inject_dora(model.as_mut(), &cfg.lora, cfg.seed)?,
        (_, Some(init)) => inject_svd_init(
            model.as_mut(),
            &cfg.lora,
            init,
            &SvdCache::new(default_cache_dir()),
        )?,
        _ => inject_lora(model.as_mut(), &cfg.lora, cfg.seed)?,
    };
    let opts = EncodeOptions {
        cutoff_len: cfg.cutoff_len,
        train_on_inputs: cfg.train_on_inputs,
    };
    let examples = task.load_examples(&tokenizer, &cfg.data, opts)?;
    check_loss_targets(&examples, &cfg.data)?;
    let (mut train, val) = split_train_val(examples, cfg.val_set_size, cfg.seed)?;
    if let Some(n) = cfg.max_records {
        train.truncate(n);
    }
    if train.is_empty() {
        return Err(Error::config("val_set_size", "leaves no training examples"));
    }
    let eval = if cfg.eval_data.is_empty() {
        Vec::new()
    } else {
        task.load_examples(&tokenizer, &cfg.eval_data, opts)?
    };
    if let Some(d) = cfg.method.dash() {
        crate::train::dash::check_s(model.as_ref(), d.s)?;
        let total = cfg.total_steps(train.len());
        if d.t >= total {
            return Err(Error::config(
                "dash_t",
                format!("{} is not before the end of the run ({total} steps)", d.t),
            ));
        }
    }
    let mut hashed = cfg.data.clone();
    hashed.extend(cfg.eval_data.iter().cloned());
    Ok(Prepared {
        model,
        task,
        tokenizer,
        train,
        val,
        eval,
        adapted,
        source,
        data_hash: files_hash(&hashed)?,
        base_hash,
    })
}

/// Causal-LM examples in which no token carries loss (a prompt past the cutoff with
/// `train_on_inputs = false`) train on nothing: warned about with their count, an error when
/// every example is one.
fn check_loss_targets(examples: &[Example], files: &[PathBuf]) -> Result<()> {
    let empty = examples
        .iter()
        .filter(|e| {
            e.target.is_none()
                && e.labels
                    .iter()
                    .skip(1)
                    .all(|&l| l == crate::ops::IGNORE_INDEX)
        })
        .count();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    if empty > 0 && empty == examples.len() {
        return Err(Error::config(
            "train_on_inputs",
            format!(
                "no example of {} has a token to learn from (prompts longer than cutoff_len with train_on_inputs = false?)",
                names.join(", ")
            ),
        ));
    }
    if empty > 0 {
        eprintln!(
            "warning: {empty} of {} examples have no token to learn from (prompt reaches cutoff_len with train_on_inputs = false); they add nothing to the loss",
            examples.len()
        );
    }
    Ok(())
}

/// Marker files of a run directory: `--overwrite` replaces only a directory holding one.
pub const RUN_MARKERS: &[&str] = &[CONFIG_FILE, METRICS_FILE];

fn fingerprint(cfg: &TrainConfig) -> String {
    let mut c = cfg.clone();
    c.out = PathBuf::new();
    c.resume = None;
    c.overwrite = false;
    c.eval_every = 0;
    c.save_every = 0;
    serde_json::to_string(&c).unwrap_or_default()
}

/// Runs `cfg` to completion and writes the adapter into `cfg.out`.
pub fn train(cfg: &TrainConfig) -> Result<RunSummary> {
    cfg.validate()?;
    let resume = match &cfg.resume {
        Some(p) => Some(checkpoint::load(p)?),
        None => None,
    };
    // Inputs `--out` must stay clear of, checked before anything is touched.
    let mut inputs: Vec<(&str, PathBuf)> = vec![("--model", PathBuf::from(&cfg.model))];
    inputs.extend(cfg.data.iter().map(|d| ("--data", d.clone())));
    inputs.extend(cfg.eval_data.iter().map(|d| ("--eval-data", d.clone())));
    let refs: Vec<(&str, &Path)> = inputs.iter().map(|(f, p)| (*f, p.as_path())).collect();
    match (&resume, &cfg.resume) {
        (Some(ck), Some(src)) => {
            crate::io::outpath::check_output_disjoint(&cfg.out, &refs)?;
            // Resuming continues a run in place; a checkpoint of another run must not be
            // inside the new output.
            let inside = crate::io::outpath::resolve_path(&ck.dir)
                .starts_with(crate::io::outpath::resolve_path(&cfg.out));
            if !inside {
                crate::io::outpath::check_output_disjoint(&cfg.out, &[("--resume", src)])?;
            }
        }
        _ => crate::io::outpath::check_output(&cfg.out, cfg.overwrite, &refs, RUN_MARKERS)?,
    }
    let prep = prepare(cfg)?;
    if let Some(ck) = &resume {
        for (what, want, got) in [
            ("training data", &prep.data_hash, &ck.state.data_hash),
            ("base model", &prep.base_hash, &ck.state.base_hash),
        ] {
            if !got.is_empty() && got != want {
                return Err(Error::format(
                    &ck.dir,
                    format!("checkpoint was written for different {what} content (hash mismatch); resume with the files the run started with"),
                ));
            }
        }
        crate::io::atomic::remove_stale_siblings(&cfg.out);
        return run_loop(cfg, prep, resume);
    }
    // A fresh run into an existing output is built beside it and swapped in on success.
    let stage = if cfg.out.symlink_metadata().is_ok() {
        Some(StagedDir::new(&cfg.out, true)?)
    } else {
        crate::io::atomic::remove_stale_siblings(&cfg.out);
        std::fs::create_dir_all(&cfg.out).at(&cfg.out)?;
        None
    };
    let mut work = cfg.clone();
    if let Some(st) = &stage {
        work.out = st.path().to_path_buf();
    }
    atomic::write_file(
        &work.out.join(CONFIG_FILE),
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )?;
    let mut summary = run_loop(&work, prep, None)?;
    if let Some(st) = stage {
        st.commit()?;
    }
    summary.out = cfg.out.clone();
    Ok(summary)
}

fn run_loop(
    cfg: &TrainConfig,
    prep: Prepared,
    resume: Option<checkpoint::Checkpoint>,
) -> Result<RunSummary> {
    let Prepared {
        mut model,
        task,
        tokenizer,
        train,
        val,
        eval,
        adapted,
        source,
        data_hash,
        base_hash,
    } = prep;
    let dev = model.device().clone();
    let pad_id = tokenizer.pad_or_eos();
    let total_steps = cfg.total_steps(train.len());
    let schedule = Schedule {
        kind: cfg.schedule,
        warmup_steps: cfg.warmup_steps,
        total_steps,
        base_lr: cfg.lr,
    };
    let mut dash = match cfg.method.dash() {
        Some(d) => {
            if d.t >= total_steps {
                return Err(Error::config(
                    "dash_t",
                    format!(
                        "{} is not before the end of the run ({total_steps} steps)",
                        d.t
                    ),
                ));
            }
            Some(DashRuntime::start(
                model.as_ref(),
                d.clone(),
                SvdCache::new(default_cache_dir()),
            )?)
        }
        None => None,
    };
    let fp = fingerprint(cfg);
    let lengths = || train.iter().map(|e| e.len()).collect::<Vec<_>>();
    let group = |l: Loader| {
        if cfg.group_by_length {
            l.group_by_length(lengths())
        } else {
            Ok(l)
        }
    };
    let mut loader = group(Loader::new(train.len(), cfg.batch_size, cfg.seed)?)?;
    let mut rng = Rng::derive(cfg.seed, "dropout");
    let mut step = 0usize;
    let metrics_path = cfg.out.join(METRICS_FILE);
    let mut resumed_opt_state = None;
    let mut metrics = match &resume {
        Some(ck) => {
            if ck.state.config_fingerprint != fp {
                return Err(Error::format(
                    &ck.dir,
                    "checkpoint was written by a run with a different configuration",
                ));
            }
            if let (Some(rt), false) = (dash.as_mut(), ck.state.method_state.is_null()) {
                let st: DashState = serde_json::from_value(ck.state.method_state.clone())?;
                if st.switched {
                    rt.restore(model.as_mut(), &st)?;
                }
            }
            restore_vars(&model.trainable_vars(), &ck.trainable)?;
            resumed_opt_state = Some(&ck.optimizer);
            loader = group(Loader::resume(
                train.len(),
                cfg.batch_size,
                cfg.seed,
                ck.state.loader,
            )?)?;
            rng = ck.state.rng.clone();
            step = ck.state.step;
            eprintln!("resuming from {} at step {step}", ck.dir.display());
            MetricsLog::resume(&metrics_path, step)?
        }
        None => MetricsLog::create(&metrics_path)?,
    };
    let mut vars = model.trainable_vars();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )?;
    if let Some(st) = resumed_opt_state {
        opt.load_state(st)?;
    }
    if let Some(rt) = &dash {
        opt.set_lr_scale(crate::train::dash::is_dash_coefficient, rt.cfg.lr_scale)?;
    }
    let trainable_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    for n in model.notes() {
        eprintln!("note: {n}");
    }
    eprintln!(
        "{}: {} adapted layers, {} trainable parameters, {} train / {} val examples, {} steps",
        cfg.method.name(),
        adapted.len(),
        trainable_params,
        train.len(),
        val.len(),
        total_steps
    );
    let bar = progress_bar(total_steps as u64, step as u64);
    let (mut first_loss, mut last_loss) = (f32::NAN, f32::NAN);
    let (mut first_val, mut last_val) = (None, None);
    let mut checked_grads = false;
    let mut last_metrics: Option<std::collections::BTreeMap<String, f64>> = None;
    let run_start = Instant::now();
    let mut run_tokens = 0usize;
    while step < total_steps {
        let t0 = Instant::now();
        let lr = schedule.lr_at(step);
        let mut acc: Option<GradStore> = None;
        let mut loss_sum = 0f32;
        let mut tokens = 0usize;
        let mut batch_tokens = 0usize;
        for _ in 0..cfg.grad_accum {
            let idx = loader.next_indices();
            let exs: Vec<&Example> = idx.iter().map(|&i| &train[i]).collect();
            let batch = collate(&exs, pad_id)?.to_device(&dev)?;
            tokens += batch.n_tokens;
            batch_tokens += batch.input_ids.elem_count();
            let ctx = Ctx::train(rng.clone());
            let loss = model.loss(&batch, &ctx)?;
            rng = ctx.into_rng();
            loss_sum += loss.to_scalar::<f32>()?;
            let grads = (loss / cfg.grad_accum as f64)?.backward()?;
            acc = Some(match acc {
                None => grads,
                Some(a) => add_grads(a, &grads, &vars)?,
            });
        }
        let grads = acc.expect("grad_accum >= 1");
        if !checked_grads {
            for (name, v) in &vars {
                if grads.get(v.as_tensor()).is_none() {
                    return Err(Error::NoGradient(name.clone()));
                }
            }
            checked_grads = true;
        }
        let loss = loss_sum / cfg.grad_accum as f32;
        // Steps count from 1, as in metrics.jsonl; the last checkpoint stays the last good one.
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                step: step + 1,
                loss,
            });
        }
        let grad_norm = match cfg.max_grad_norm {
            Some(m) => opt.clip_grad_norm(&grads, m)?,
            None => opt.grad_norm(&grads)?,
        };
        if !grad_norm.is_finite() {
            return Err(Error::msg(format!(
                "training diverged: the gradient norm is {grad_norm} at step {} (loss {loss}); the last checkpoint is the last good state",
                step + 1
            )));
        }
        opt.step(&grads, lr)?;
        drop(grads);
        step += 1;
        let dt = t0.elapsed().as_secs_f64();
        run_tokens += tokens;
        let tps = tokens as f64 / dt;
        if first_loss.is_nan() {
            first_loss = loss;
        }
        last_loss = loss;
        let mut rec = MetricRecord {
            step,
            loss: loss as f64,
            lr,
            tokens_per_s: tps,
            grad_norm: Some(grad_norm),
            elapsed_s: Some(run_start.elapsed().as_secs_f64()),
            ..Default::default()
        };
        rec.extra.insert("tokens".into(), serde_json::json!(tokens));
        // Positions computed, padding included.
        rec.extra
            .insert("batch_tokens".into(), serde_json::json!(batch_tokens));
        rec.extra.insert("step_s".into(), serde_json::json!(dt));
        if let Some(rt) = dash.as_mut() {
            if !rt.state.switched && step == rt.cfg.t {
                let staged = StagedDir::new(&cfg.out.join(SWITCH_DIR), true)?;
                io::peft::save_lora(
                    model.as_ref(),
                    &cfg.lora,
                    Some(cfg.model.clone()),
                    staged.path(),
                )?;
                staged.commit()?;
                let (new_vars, report, full) = rt.switch(model.as_mut())?;
                crate::train::dash::write_report(&cfg.out, &report, &full)?;
                if rt.cfg.freeze_ab {
                    let keep: Vec<String> =
                        model.trainable_vars().into_iter().map(|(n, _)| n).collect();
                    opt.retain(|n| keep.iter().any(|k| k == n));
                }
                let new_vars: Vec<_> = new_vars
                    .into_iter()
                    .filter(|(_, v)| v.elem_count() > 0)
                    .collect();
                opt.add_params(new_vars)?;
                opt.set_lr_scale(crate::train::dash::is_dash_coefficient, rt.cfg.lr_scale)?;
                vars = model.trainable_vars();
                checked_grads = false;
                rec.extra.insert(
                    "dash_switch".into(),
                    serde_json::json!({"stall_s": report.stall_s, "switch_s": report.switch_s}),
                );
                say(&bar, format!(
                    "step {step}: switched to LoRA-Dash (selection {:.2} s, of which {:.2} s waiting for SVDs)",
                    report.switch_s, report.stall_s
                ));
            }
        }
        let eval_now = (!val.is_empty() || !eval.is_empty())
            && ((cfg.eval_every > 0 && step % cfg.eval_every == 0) || step == total_steps);
        if eval_now && !val.is_empty() {
            let vl = validation_loss(model.as_ref(), &val, cfg.batch_size, pad_id)?;
            first_val.get_or_insert(vl);
            last_val = Some(vl);
            rec.val_loss = Some(vl as f64);
            say(&bar, format!("step {step}: val_loss {vl:.4}"));
        }
        if eval_now && !eval.is_empty() {
            let mut line = format!("step {step}:");
            let el = validation_loss(model.as_ref(), &eval, cfg.batch_size, pad_id)?;
            rec.extra.insert("eval_loss".into(), serde_json::json!(el));
            line.push_str(&format!(" eval_loss {el:.4}"));
            if let Task::Glue(g) = task {
                let report = crate::eval::glue::evaluate(
                    model.as_ref(),
                    g,
                    &eval,
                    cfg.batch_size.max(32),
                    pad_id,
                )?;
                for (k, v) in &report.metrics {
                    rec.extra.insert(format!("eval_{k}"), serde_json::json!(v));
                    line.push_str(&format!(" {k} {v:.4}"));
                }
                last_metrics = Some(report.metrics.clone());
            }
            say(&bar, line);
        }
        metrics.append(&rec)?;
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        if cfg.save_every > 0 && step % cfg.save_every == 0 && step < total_steps {
            let state = TrainerState {
                step,
                total_steps,
                loader: loader.state(),
                rng: rng.clone(),
                method_state: match &dash {
                    Some(rt) => serde_json::to_value(&rt.state)?,
                    None => serde_json::Value::Null,
                },
                config_fingerprint: fp.clone(),
                data_hash: data_hash.clone(),
                base_hash: base_hash.clone(),
            };
            let opt_state: Vec<(String, Tensor)> = opt.state_tensors()?;
            let mut ow = Weights::new(None);
            for (n, t) in opt_state {
                ow.insert(n, t);
            }
            checkpoint::save(
                &cfg.out.join("checkpoints"),
                &vars_to_weights(&vars),
                &ow,
                &state,
            )?;
        }
    }
    bar.finish_and_clear();
    let base = Some(cfg.model.clone());
    match &dash {
        Some(rt) => {
            crate::io::dash::save_native(
                model.as_ref(),
                &cfg.lora,
                rt.cfg.t,
                rt.cfg.s,
                rt.cfg.freeze_ab,
                base.clone(),
                &cfg.out,
            )?;
            let staged = StagedDir::new(&cfg.out.join(EXPORT_DIR), true)?;
            crate::io::dash::save_peft_export(
                model.as_ref(),
                &cfg.lora,
                rt.cfg.s,
                base,
                staged.path(),
            )?;
            staged.commit()?;
        }
        None if cfg.method == Method::Full => {
            io::hf::write_hf_dir_with_config(
                &source,
                &model.hf_config(&source.config_json)?,
                &model.base_weights(true)?,
                &cfg.out.join(FULL_MODEL_DIR),
                true,
            )?;
        }
        None if cfg.method.svd_init().is_some() => {
            io::pissa::save_run(model.as_ref(), &cfg.lora, base, &cfg.out, EXPORT_DIR)?
        }
        None => io::peft::save_lora(model.as_ref(), &cfg.lora, base, &cfg.out)?,
    }
    if let Err(e) =
        read_records(&metrics_path).and_then(|r| plot_loss_curve(&r, &cfg.out.join("loss.png")))
    {
        eprintln!("warning: could not draw the loss curve: {e}");
    }
    let secs = run_start.elapsed().as_secs_f64();
    Ok(RunSummary {
        out: cfg.out.clone(),
        steps: step,
        first_loss,
        last_loss,
        first_val_loss: first_val,
        last_val_loss: last_val,
        tokens_per_s: if secs > 0.0 {
            run_tokens as f64 / secs
        } else {
            0.0
        },
        adapted_layers: adapted.len(),
        trainable_params,
        peak_rss_bytes: peak_rss_bytes(),
        eval_metrics: last_metrics,
    })
}

/// Adds the gradients of `vars` in `new` into `acc`.
fn add_grads(mut acc: GradStore, new: &GradStore, vars: &[(String, Var)]) -> Result<GradStore> {
    for (_, v) in vars {
        if let Some(g) = new.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(acc)
}

/// Mean loss over `val`, weighted by each batch's target count, without dropout.
pub fn validation_loss(
    model: &dyn Model,
    val: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<f32> {
    let dev = model.device().clone();
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in val.chunks(batch_size) {
        let exs: Vec<&Example> = chunk.iter().collect();
        let batch: Batch = collate(&exs, pad_id)?.to_device(&dev)?;
        if batch.n_target_tokens == 0 {
            continue;
        }
        let loss = model.validation_loss(&batch)?.to_scalar::<f32>()?;
        sum += loss as f64 * batch.n_target_tokens as f64;
        n += batch.n_target_tokens;
    }
    Ok(if n == 0 {
        f32::NAN
    } else {
        (sum / n as f64) as f32
    })
}

fn vars_to_weights(vars: &[(String, Var)]) -> Weights {
    let mut w = Weights::new(None);
    for (n, v) in vars {
        w.insert(n.clone(), v.as_tensor().clone());
    }
    w
}

fn restore_vars(vars: &[(String, Var)], w: &Weights) -> Result<()> {
    w.check_finite()?;
    for (n, v) in vars {
        let t: Tensor = w.get_shaped(n, v.dims())?;
        v.set(&t.to_device(v.device())?)?;
    }
    Ok(())
}

/// A line above the progress bar, or on stderr when the bar is hidden (not a terminal).
fn say(bar: &indicatif::ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}

fn progress_bar(len: u64, pos: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(pos);
    bar
}
