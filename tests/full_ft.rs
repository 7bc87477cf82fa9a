//! Full fine-tuning (a dense trainable ΔW on the frozen W) on the tiny model: the gradient of
//! ΔW against finite differences of the model's loss, the saved model equal to W + ΔW, and a
//! short run that lowers the loss and writes a model directory that loads.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::{golden, max_rel_diff};
use lora_dash::adapters::TargetModules;
use lora_dash::cli::TrainArgs;
use lora_dash::data::alpaca::load_records;
use lora_dash::data::batch::collate;
use lora_dash::data::tokenize::{tokenize_record, Example};
use lora_dash::io;
use lora_dash::models::Model;
use lora_dash::models::{Ctx, Llama};
use lora_dash::rng::Rng;
use lora_dash::train::trainer::{train, validation_loss, FULL_MODEL_DIR};

const TARGETS: &str = "q_proj,k_proj,v_proj,up_proj,down_proj";

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/arithmetic.jsonl")
}

fn tiny() -> (io::LoadedModel, Llama) {
    let loaded = io::load_model(golden("tiny-llama").to_str().unwrap()).unwrap();
    let m = Llama::load(&loaded.config.resolve().unwrap(), &loaded.weights).unwrap();
    (loaded, m)
}

fn examples(loaded: &io::LoadedModel, n: usize) -> Vec<Example> {
    let tok = loaded.tokenizer.as_ref().unwrap();
    load_records(&[data()])
        .unwrap()
        .iter()
        .take(n)
        .map(|r| tokenize_record(tok, r, 48, true, true).unwrap())
        .collect()
}

fn randomize(m: &Llama, seed: u64, amp: f32) {
    let mut rng = Rng::new(seed);
    for (_, v) in m.trainable_vars() {
        v.set(
            &Tensor::from_vec(
                rng.uniform_vec(v.elem_count(), -amp, amp),
                v.dims(),
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn gradient_of_delta_matches_finite_differences_of_the_loss() {
    let (loaded, mut m) = tiny();
    let adapted = m
        .inject_full(&TargetModules::parse(TARGETS).unwrap())
        .unwrap();
    assert_eq!(adapted.len(), 10);
    randomize(&m, 9, 0.02);
    let exs = examples(&loaded, 4);
    let batch = collate(
        &exs.iter().collect::<Vec<_>>(),
        loaded.tokenizer.as_ref().unwrap().pad_or_eos(),
    )
    .unwrap();
    let loss = |m: &Llama| -> f64 {
        m.loss(
            &batch.input_ids,
            &batch.attention_mask,
            &batch.labels,
            &Ctx::eval(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
    };
    let l0 = m
        .loss(
            &batch.input_ids,
            &batch.attention_mask,
            &batch.labels,
            &Ctx::eval(),
        )
        .unwrap();
    let grads = l0.backward().unwrap();
    let vars = m.trainable_vars();
    for name in [
        "model.layers.0.self_attn.q_proj.delta.weight",
        "model.layers.1.mlp.down_proj.delta.weight",
    ] {
        let (_, v) = vars.iter().find(|(n, _)| n == name).unwrap();
        let g: Vec<f32> = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The element with the largest gradient keeps f32 rounding of the loss small next to it.
        let (k, &gk) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().partial_cmp(&b.1.abs()).unwrap())
            .unwrap();
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        let at = |x: f32| {
            let mut p = base.clone();
            p[k] = x;
            v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&m)
        };
        let fd = (at(base[k] + eps) - at(base[k] - eps)) / (2.0 * eps as f64);
        at(base[k]);
        let rel = (fd - gk as f64).abs() / fd.abs();
        println!("{name}[{k}]: autograd {gk:.6e}, finite difference {fd:.6e}, rel diff {rel:.2e}");
        assert!(rel < 1e-2, "{name}: {rel}");
    }
}

#[test]
fn saved_model_is_w_plus_delta() {
    let d = tempfile::tempdir().unwrap();
    let (loaded, mut m) = tiny();
    m.inject_full(&TargetModules::parse(TARGETS).unwrap())
        .unwrap();
    randomize(&m, 4, 0.05);
    let out = d.path().join("model");
    io::hf::write_hf_dir(&loaded, &m.base_weights(true).unwrap(), &out, false).unwrap();
    let saved = io::load_model(out.to_str().unwrap()).unwrap();
    let vars = m.trainable_vars();
    let mut n_changed = 0;
    for (name, t) in loaded.weights.iter() {
        let got = saved.weights.get(name).unwrap();
        let want = match vars.iter().find(|(n, _)| {
            n.strip_suffix(".delta.weight")
                .map(|p| format!("{p}.weight"))
                .as_deref()
                == Some(name)
        }) {
            Some((_, v)) => {
                n_changed += 1;
                (t + v.as_tensor()).unwrap()
            }
            None => t.clone(),
        };
        let diff = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            diff, 0.0,
            "{name}: saved tensor differs from W + ΔW by {diff}"
        );
    }
    assert_eq!(n_changed, 10);
    // The saved model computes what the adapted model computes.
    let exs = examples(&loaded, 2);
    let batch = collate(&exs.iter().collect::<Vec<_>>(), 0).unwrap();
    let reloaded = Llama::load(&saved.config.resolve().unwrap(), &saved.weights).unwrap();
    let a = m
        .forward(&batch.input_ids, Some(&batch.attention_mask), &Ctx::eval())
        .unwrap();
    let b = reloaded
        .forward(&batch.input_ids, Some(&batch.attention_mask), &Ctx::eval())
        .unwrap();
    assert!(max_rel_diff("logits of W + ΔW vs W with ΔW adapter", &b, &a, None) < 1e-5);
}

#[test]
fn full_run_lowers_the_loss_and_writes_a_loadable_model() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let args = TrainArgs {
        model: Some(golden("tiny-llama").to_string_lossy().into_owned()),
        data: Some(vec![data()]),
        out: Some(out.clone()),
        method: Some("full".into()),
        target_modules: Some(TARGETS.into()),
        batch_size: Some(4),
        cutoff_len: Some(48),
        max_steps: Some(8),
        max_records: Some(32),
        lr: Some(2e-3),
        ..Default::default()
    };
    let cfg = args.clone().resolve().unwrap();
    let s = train(&cfg).unwrap();
    assert_eq!(
        s.trainable_params,
        2 * (64 * 64 + 2 * 32 * 64 + 2 * 160 * 64)
    );
    let dir = out.join(FULL_MODEL_DIR);
    assert!(!out.join("adapter_config.json").exists());
    let (loaded, base) = tiny();
    let tuned_src = io::load_model(dir.to_str().unwrap()).unwrap();
    let tuned = Llama::load(&tuned_src.config.resolve().unwrap(), &tuned_src.weights).unwrap();
    // Only the targeted weights moved.
    for (name, t) in loaded.weights.iter() {
        let diff = (tuned_src.weights.get(name).unwrap() - t)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let targeted = TARGETS
            .split(',')
            .any(|m| name.ends_with(&format!("{m}.weight")));
        assert_eq!(diff > 0.0, targeted, "{name}: max change {diff}");
    }
    let exs = examples(&loaded, 32);
    let before = validation_loss(&base, &exs, 8, 0).unwrap();
    let after = validation_loss(&tuned, &exs, 8, 0).unwrap();
    println!(
        "loss on the 32 training records: {before:.4} -> {after:.4} (run: {:.4} -> {:.4})",
        s.first_loss, s.last_loss
    );
    assert!(after < before - 0.1, "{before} -> {after}");
    // Method flags are checked.
    let mut bad = args.clone();
    bad.dash_t = Some(3);
    assert!(bad
        .clone()
        .resolve()
        .unwrap_err()
        .to_string()
        .contains("need --method dash"));
    bad.dash_t = None;
    bad.method = Some("fullft".into());
    assert!(bad
        .resolve()
        .unwrap_err()
        .to_string()
        .contains("lora, dash, full, pissa, milora, dora"));
}
