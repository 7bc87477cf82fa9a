//! The tiny random LlamaForCausalLM from `tests/golden/make_golden.py` against the logits
//! transformers and PEFT computed for it (tolerance 1e-4 relative to the largest logit).

mod common;

use candle_core::{DType, Tensor};
use common::{golden, load_golden, max_rel_diff};
use lora_dash::io::{self, Weights};
use lora_dash::models::Model;
use lora_dash::models::{Ctx, Llama};

const TOL: f32 = 1e-4;

fn tiny() -> Llama {
    let loaded = io::load_model(golden("tiny-llama").to_str().unwrap()).unwrap();
    Llama::load(&loaded.config.resolve().unwrap(), &loaded.weights).unwrap()
}

fn ids(w: &Weights, name: &str) -> Tensor {
    w.get(name).unwrap().to_dtype(DType::U32).unwrap()
}

/// Logits of the right-padded and left-padded golden batches.
fn logits_both(m: &Llama, inp: &Weights) -> (Tensor, Tensor) {
    let ctx = Ctx::eval();
    let right = m
        .forward(
            &ids(inp, "input_ids"),
            Some(inp.get("attention_mask").unwrap()),
            &ctx,
        )
        .unwrap();
    let h = m
        .forward_hidden(
            &ids(inp, "input_ids_left"),
            Some(inp.get("attention_mask_left").unwrap()),
            Some(&ids(inp, "position_ids_left")),
            None,
            &ctx,
        )
        .unwrap();
    (right, m.logits(&h, &ctx).unwrap())
}

#[test]
fn base_logits_match_transformers() {
    let g = load_golden("tiny_logits.safetensors");
    let (r, l) = logits_both(&tiny(), &g);
    assert!(
        max_rel_diff(
            "right-padded",
            &r,
            g.get("logits").unwrap(),
            Some(g.get("attention_mask").unwrap())
        ) < TOL
    );
    assert!(
        max_rel_diff(
            "left-padded",
            &l,
            g.get("logits_left").unwrap(),
            Some(g.get("attention_mask_left").unwrap())
        ) < TOL
    );
}

#[test]
fn peft_adapter_logits_match_peft() {
    let g = load_golden("tiny_logits.safetensors");
    let want = load_golden("tiny_lora_logits.safetensors");
    let mut m = tiny();
    io::peft::load_lora(&mut m, &golden("tiny-lora")).unwrap();
    let (r, l) = logits_both(&m, &g);
    assert!(
        max_rel_diff(
            "lora right",
            &r,
            want.get("logits").unwrap(),
            Some(g.get("attention_mask").unwrap())
        ) < TOL
    );
    assert!(
        max_rel_diff(
            "lora left",
            &l,
            want.get("logits_left").unwrap(),
            Some(g.get("attention_mask_left").unwrap())
        ) < TOL
    );

    // Merged forward equals PEFT's merge_and_unload and our own unmerged forward.
    m.merge_adapters().unwrap();
    let (mr, _) = logits_both(&m, &g);
    assert!(
        max_rel_diff(
            "merged",
            &mr,
            want.get("merged_logits").unwrap(),
            Some(g.get("attention_mask").unwrap())
        ) < TOL
    );
    assert!(
        max_rel_diff(
            "merged vs unmerged",
            &mr,
            &r,
            Some(g.get("attention_mask").unwrap())
        ) < TOL
    );
}

#[test]
fn rslora_adapter_logits_match_peft() {
    let g = load_golden("tiny_logits.safetensors");
    let want = load_golden("tiny_lora_rslora_logits.safetensors");
    let mut m = tiny();
    let cfg = io::peft::load_lora(&mut m, &golden("tiny-lora-rslora")).unwrap();
    assert!(cfg.use_rslora);
    assert_eq!(
        m.trainable_vars().len(),
        2 * 2 * 2,
        "q and v of 2 layers, A and B each"
    );
    let (r, _) = logits_both(&m, &g);
    assert!(
        max_rel_diff(
            "rslora",
            &r,
            want.get("logits").unwrap(),
            Some(g.get("attention_mask").unwrap())
        ) < TOL
    );
}

#[test]
fn saved_adapter_round_trips_in_peft_format() {
    let mut m = tiny();
    let cfg = io::peft::load_lora(&mut m, &golden("tiny-lora")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    io::peft::save_lora(
        &m,
        &cfg.lora_config(),
        Some("tiny-llama".into()),
        dir.path(),
    )
    .unwrap();
    // Same keys, shapes and values as the file PEFT wrote.
    let ours = Weights::load_safetensors(&dir.path().join("adapter_model.safetensors")).unwrap();
    let theirs = Weights::load_safetensors(&golden("tiny-lora/adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.names().collect::<Vec<_>>(),
        theirs.names().collect::<Vec<_>>()
    );
    for (k, t) in theirs.iter() {
        let d = (ours.get(k).unwrap() - t)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"].as_f64(), Some(8.0));
    assert_eq!(json["task_type"], "CAUSAL_LM");
}

#[test]
fn adapter_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    // Wrong shapes: take the tiny adapter and declare it for a model with another width.
    let mut w = Weights::load_safetensors(&golden("tiny-lora/adapter_model.safetensors")).unwrap();
    let k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    w.insert(
        k,
        Tensor::zeros((4, 65), DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    w.save_safetensors(&dir.path().join("adapter_model.safetensors"), None)
        .unwrap();
    std::fs::copy(
        golden("tiny-lora/adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let err = io::peft::load_lora(&mut tiny(), dir.path())
        .err()
        .expect("shape error")
        .to_string();
    assert!(err.contains(k) && err.contains("65"), "{err}");
    // A tensor for a module the model does not have.
    let mut w = Weights::load_safetensors(&golden("tiny-lora/adapter_model.safetensors")).unwrap();
    w.insert(
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
        Tensor::zeros((4, 64), DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    w.insert(
        "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight",
        Tensor::zeros((64, 4), DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    w.save_safetensors(&dir.path().join("adapter_model.safetensors"), None)
        .unwrap();
    let err = io::peft::load_lora(&mut tiny(), dir.path())
        .err()
        .expect("extra tensor error")
        .to_string();
    assert!(err.contains("layers.7"), "{err}");
}

/// One and two AdamW steps of LoRA training on the tiny model against PEFT + torch.optim.AdamW:
/// loss, the gradient of every A and B, and the updated factors.
#[test]
fn training_steps_match_pytorch() {
    use lora_dash::train::optimizer::{AdamW, AdamWConfig};
    let g = load_golden("tiny_train_step.safetensors");
    let mut m = tiny();
    io::peft::load_lora(&mut m, &golden("tiny-lora")).unwrap();
    let vars = m.trainable_vars();
    assert_eq!(vars.len(), 28);
    let key = |n: &str| format!("base_model.model.{n}");
    for (n, v) in &vars {
        v.set(g.get(&format!("init.{}", key(n))).unwrap()).unwrap();
    }
    // transformers shifts labels inside the model; ours are shifted by the collator.
    let labels = g.get("labels").unwrap().to_dtype(DType::I64).unwrap();
    let (b, t) = labels.dims2().unwrap();
    let pad = Tensor::full(-100i64, (b, 1), &candle_core::Device::Cpu).unwrap();
    let shifted = Tensor::cat(&[&labels.narrow(1, 1, t - 1).unwrap(), &pad], 1).unwrap();
    let ids = ids(&g, "input_ids");
    let mask = g
        .get("attention_mask")
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
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
    for step in 1..=2 {
        let loss = m.loss(&ids, &mask, &shifted, &Ctx::eval()).unwrap();
        let want = g
            .get(&format!("loss{step}"))
            .unwrap()
            .flatten_all()
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
        let mut worst = 0f32;
        for (n, v) in &vars {
            let gw = g.get(&format!("grad{step}.{}", key(n))).unwrap();
            let gg = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            let scale = gw
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = (gg - gw)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // All-zero reference gradients (A at step 1) must come out zero too.
            let rel = if scale == 0.0 { d } else { d / scale };
            worst = worst.max(rel);
        }
        println!("step {step}: worst gradient diff (relative to each tensor's max) {worst:.3e}");
        assert!(worst < 1e-4, "gradient mismatch {worst}");
        opt.step(&grads, 1e-3).unwrap();
        let mut worst = 0f32;
        for (n, v) in &vars {
            let w = g.get(&format!("step{step}.{}", key(n))).unwrap();
            let d = (v.as_tensor() - w)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            worst = worst.max(d);
        }
        println!("step {step}: worst parameter diff after AdamW {worst:.3e}");
        // Adam divides by √v, so a 1e-6 relative gradient difference can move an lr=1e-3
        // update by ~1e-6 absolute.
        assert!(worst < 1e-5, "AdamW update mismatch {worst}");
    }
}

/// A LoRA-Dash adapter (native form) and its rank-(r+s) PEFT export against the logits PEFT
/// computed for the export, and Rust's selection against an f64 dense reference.
#[test]
fn dash_adapter_and_export_match_peft() {
    let g = load_golden("tiny_logits.safetensors");
    let want = load_golden("tiny_dash_logits.safetensors");
    let keep = Some(g.get("attention_mask").unwrap());
    let mut m = tiny();
    io::dash::load_native(&mut m, &golden("tiny-dash")).unwrap();
    let (r, l) = logits_both(&m, &g);
    assert!(
        max_rel_diff(
            "dash native vs PEFT export",
            &r,
            want.get("logits").unwrap(),
            keep
        ) < TOL
    );
    assert!(
        max_rel_diff(
            "dash native vs direct dash forward",
            &r,
            want.get("dash_logits").unwrap(),
            keep
        ) < TOL
    );
    assert!(
        max_rel_diff(
            "dash left",
            &l,
            want.get("logits_left").unwrap(),
            Some(g.get("attention_mask_left").unwrap())
        ) < TOL
    );

    // Our export of the same adapter loads in our PEFT loader and gives PEFT's logits.
    let cfg: lora_dash::io::dash::DashAdapterConfig = serde_json::from_str(
        &std::fs::read_to_string(golden("tiny-dash/dash_config.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    io::dash::save_peft_export(&m, &cfg.lora_config(), cfg.s, None, dir.path()).unwrap();
    let mut e = tiny();
    io::peft::load_lora(&mut e, dir.path()).unwrap();
    let (er, _) = logits_both(&e, &g);
    assert!(max_rel_diff("our export vs PEFT", &er, want.get("logits").unwrap(), keep) < TOL);

    m.merge_adapters().unwrap();
    let (mr, _) = logits_both(&m, &g);
    assert!(max_rel_diff("dash merged", &mr, want.get("merged_logits").unwrap(), keep) < TOL);
}

#[test]
fn dash_selection_matches_f64_dense_reference() {
    use lora_dash::tsd::{select, svd};
    let reference = load_golden("tiny_dash_delta.safetensors");
    let mut m = tiny();
    io::peft::load_lora(&mut m, &golden("tiny-lora")).unwrap();
    let mut checked = 0;
    for l in m.linears() {
        let Some(lora) = l.adapter.as_ref().and_then(|a| a.as_lora()) else {
            continue;
        };
        let s = svd::thin_svd(&l.weight, 1).unwrap();
        let delta = select::change_rates(
            &s.u,
            &s.sigma,
            &s.v,
            lora.a.as_tensor(),
            lora.b.as_tensor(),
            lora.scale,
        )
        .unwrap();
        let want: Vec<f32> = reference.get(&l.path).unwrap().to_vec1().unwrap();
        let top = want.iter().cloned().fold(0f32, f32::max);
        let worst = delta
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / top)
            .fold(0f32, f32::max);
        let idx: Vec<usize> = reference
            .get(&format!("{}.indices", l.path))
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&i| i as usize)
            .collect();
        println!("{}: δ max diff / max δ = {worst:.2e}", l.path);
        assert!(worst < 1e-3, "{}", l.path);
        assert_eq!(
            select::top_s(&delta, &s.sigma, idx.len()),
            idx,
            "{}",
            l.path
        );
        checked += 1;
    }
    assert_eq!(checked, 14);
}

/// Left-padded batched greedy decoding with a KV cache gives each prompt the tokens it gets
/// alone, and the cache gives the same tokens as recomputing the whole sequence.
#[test]
fn batched_generation_equals_single_and_uncached() {
    use lora_dash::models::generate::generate_greedy;
    let m = tiny();
    let prompts = vec![vec![1u32, 50, 60, 70, 80, 90, 100], vec![1u32, 7, 8]];
    let batched = generate_greedy(&m, &prompts, 0, 8, &[]).unwrap();
    for (p, want) in prompts.iter().zip(&batched) {
        let alone = generate_greedy(&m, std::slice::from_ref(p), 0, 8, &[]).unwrap();
        assert_eq!(&alone[0], want);
        // Without a cache: append the argmax of the last position each time.
        let mut seq = p.clone();
        for _ in 0..8 {
            let ids =
                Tensor::from_vec(seq.clone(), (1, seq.len()), &candle_core::Device::Cpu).unwrap();
            let logits = m.forward(&ids, None, &Ctx::eval()).unwrap();
            let last = logits.get(0).unwrap().get(seq.len() - 1).unwrap();
            seq.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        }
        assert_eq!(&seq[p.len()..], &want[..]);
    }
}
