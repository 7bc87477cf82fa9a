//! DoRA on the tiny LLaMA against `tests/golden/make_golden_dora.py` (PEFT 0.13.2,
//! `use_dora=True`): the adapter's logits and its merge (forward tolerance 1e-5 relative to
//! the largest logit), the gradients of A, B and the magnitude (1e-4 relative to each
//! tensor's largest), and two AdamW steps.

mod common;

use candle_core::{DType, Tensor};
use common::{golden, load_golden, max_rel_diff};
use lora_dash::adapters::{inject_dora, Adapter, LoraConfig, TargetModules};
use lora_dash::io::{self, Weights};
use lora_dash::models::{Ctx, Llama, Model};
use lora_dash::ops::dora_linear::dora_weight_norm;

const FWD_TOL: f32 = 1e-5;

fn tiny() -> Llama {
    let loaded = io::load_model(golden("tiny-llama").to_str().unwrap()).unwrap();
    Llama::load(&loaded.config.resolve().unwrap(), &loaded.weights).unwrap()
}

fn batch() -> (Tensor, Tensor) {
    let g = load_golden("tiny_logits.safetensors");
    (
        g.get("input_ids").unwrap().to_dtype(DType::U32).unwrap(),
        g.get("attention_mask").unwrap().clone(),
    )
}

fn logits(m: &Llama) -> Tensor {
    let (ids, mask) = batch();
    m.forward(&ids, Some(&mask), &Ctx::eval()).unwrap()
}

#[test]
fn dora_adapter_and_merge_match_peft() {
    let want = load_golden("tiny_dora.safetensors");
    let (_, mask) = batch();
    let mut m = tiny();
    let cfg = io::peft::load_lora(&mut m, &golden("tiny-dora")).unwrap();
    assert!(cfg.use_dora);
    assert!(m
        .linears()
        .iter()
        .filter(|l| l.adapter.is_some())
        .all(|l| matches!(l.adapter, Some(Adapter::Dora(_)))));
    let got = logits(&m);
    let d = max_rel_diff(
        "dora logits",
        &got,
        want.get("logits").unwrap(),
        Some(&mask),
    );
    assert!(d < FWD_TOL, "{d}");

    // Saved again by us: PEFT's keys and config, same logits.
    let dir = tempfile::tempdir().unwrap();
    io::peft::save_lora(&m, &cfg.lora_config(), None, dir.path()).unwrap();
    let ours = Weights::load_safetensors(&dir.path().join("adapter_model.safetensors")).unwrap();
    let theirs = Weights::load_safetensors(&golden("tiny-dora/adapter_model.safetensors")).unwrap();
    let mut a: Vec<_> = ours.names().cloned().collect();
    let mut b: Vec<_> = theirs.names().cloned().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let mut again = tiny();
    assert!(
        io::peft::load_lora(&mut again, dir.path())
            .unwrap()
            .use_dora
    );
    let d2 = max_rel_diff("dora round trip", &logits(&again), &got, Some(&mask));
    assert_eq!(d2, 0.0);

    m.merge_adapters().unwrap();
    let d = max_rel_diff(
        "dora merged",
        &logits(&m),
        want.get("merged_logits").unwrap(),
        Some(&mask),
    );
    assert!(d < FWD_TOL, "{d}");
}

#[test]
fn dora_init_is_the_base_model() {
    let mut m = tiny();
    let base = logits(&m);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: TargetModules::parse("all-linear").unwrap(),
    };
    inject_dora(&mut m, &cfg, 3).unwrap();
    for l in m.linears() {
        let Some(d) = l.adapter.as_ref().and_then(Adapter::as_dora) else {
            assert_eq!(l.path, "lm_head", "all-linear leaves out only the LM head");
            continue;
        };
        let norm =
            dora_weight_norm(&l.weight, d.lora.a.as_tensor(), d.lora.b.as_tensor(), 2.0).unwrap();
        let rows = l.weight.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        assert!(max_rel_diff(&l.path, d.m.as_tensor(), &rows, None) < 1e-6);
        assert!(max_rel_diff(&l.path, &norm, &rows, None) < 1e-6);
    }
    let d = max_rel_diff("dora init vs base", &logits(&m), &base, None);
    assert!(d < FWD_TOL, "{d}");
}

#[test]
fn dora_training_steps_match_peft() {
    use lora_dash::train::optimizer::{AdamW, AdamWConfig};
    let g = load_golden("tiny_dora.safetensors");
    let mut m = tiny();
    io::peft::load_lora(&mut m, &golden("tiny-dora")).unwrap();
    let vars = m.trainable_vars();
    assert_eq!(vars.len(), 18);
    let key = |n: &str| format!("base_model.model.{n}");
    for (n, v) in &vars {
        v.set(g.get(&format!("init.{}", key(n))).unwrap()).unwrap();
    }
    // transformers shifts labels inside the model; ours are shifted by the collator.
    let labels = g.get("labels").unwrap().to_dtype(DType::I64).unwrap();
    let (b, t) = labels.dims2().unwrap();
    let pad = Tensor::full(-100i64, (b, 1), &candle_core::Device::Cpu).unwrap();
    let shifted = Tensor::cat(&[&labels.narrow(1, 1, t - 1).unwrap(), &pad], 1).unwrap();
    let (ids, mask) = batch();
    let mask = mask.to_dtype(DType::F32).unwrap();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )
    .unwrap();
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for step in 1..=2 {
        let loss = m.loss(&ids, &mask, &shifted, &Ctx::eval()).unwrap();
        let want = g
            .get(&format!("loss{step}"))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let got = loss.to_scalar::<f32>().unwrap();
        println!("step {step}: loss {got} vs {want}");
        assert!(
            (got - want).abs() < 1e-5 * want.abs(),
            "loss {got} vs {want}"
        );
        let grads = loss.backward().unwrap();
        let mut worst = (0f32, String::new());
        for (n, v) in &vars {
            let gw = g.get(&format!("grad{step}.{}", key(n))).unwrap();
            let gg = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            let rel = max_abs(&(gg - gw).unwrap()) / max_abs(gw).max(1e-12);
            if rel > worst.0 {
                worst = (rel, n.clone());
            }
        }
        println!(
            "step {step}: worst gradient diff (relative to each tensor's max) {:.3e} ({})",
            worst.0, worst.1
        );
        assert!(worst.0 < 1e-4, "gradient mismatch {worst:?}");
        opt.step(&grads, 1e-3).unwrap();
        let mut worst = 0f32;
        for (n, v) in &vars {
            let w = g.get(&format!("step{step}.{}", key(n))).unwrap();
            worst = worst.max(max_abs(&(v.as_tensor() - w).unwrap()));
        }
        println!("step {step}: worst parameter diff after AdamW {worst:.3e}");
        assert!(worst < 1e-5, "AdamW update mismatch {worst}");
    }
}

/// DoRA (and PiSSA) change the weight itself, which an output head tied to the embeddings
/// cannot hold in the merged model: refused, naming the layer.
#[test]
fn tied_output_head_is_refused() {
    let loaded = io::load_model(golden("tiny-llama").to_str().unwrap()).unwrap();
    let mut c = loaded.config.resolve().unwrap();
    c.tie_word_embeddings = true;
    let mut m = Llama::load(&c, &loaded.weights).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: TargetModules::parse("q_proj,lm_head").unwrap(),
    };
    let e = inject_dora(&mut m, &cfg, 3).unwrap_err().to_string();
    println!("{e}");
    assert!(
        e.contains("--method dora does not support `lm_head`"),
        "{e}"
    );
    let e = lora_dash::adapters::inject_svd_init(
        &mut m,
        &cfg,
        lora_dash::adapters::SvdInit::Pissa,
        &lora_dash::tsd::svd::SvdCache::disabled(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--method pissa does not support `lm_head`"),
        "{e}"
    );
    assert!(m.linears().iter().all(|l| l.adapter.is_none()));
}
