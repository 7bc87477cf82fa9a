//! DeBERTa-v2/v3 against transformers / PEFT (golden files of
//! `tests/golden/make_golden_deberta.py`): three small random configs that between them use
//! every option implemented (log buckets, shared or separate position projections, c2p /
//! p2c, the relative LayerNorm, position-biased input, token types, embed_proj, gelu and
//! tanh poolers) on padded inputs; relative-position tables; PEFT SEQ_CLS adapters
//! (unmerged and merged); two AdamW steps; and the options refused.

mod common;

use std::path::Path;

use candle_core::{DType, Tensor};
use common::{golden, load_golden, max_rel_diff};
use lora_dash::data::Batch;
use lora_dash::io::{self, Weights};
use lora_dash::models::deberta::rel_pos::relative_positions;
use lora_dash::models::deberta::Deberta;
use lora_dash::models::{Ctx, HeadSpec, Model};

const CONFIGS: [&str; 3] = ["tiny-deberta-v3", "tiny-deberta-v2", "tiny-deberta-p2c"];

fn seq(num_labels: usize) -> HeadSpec {
    HeadSpec::Sequence {
        num_labels,
        classifier_dropout: Some(0.0),
        seed: 1,
    }
}

fn load(dir: &Path, head: &HeadSpec) -> Deberta {
    let loaded = io::load_model(dir.to_str().unwrap()).unwrap();
    Deberta::load(&loaded, head).unwrap()
}

fn batch(g: &Weights, labels: Option<Tensor>) -> Batch {
    let ids = g.get("input_ids").unwrap().to_dtype(DType::U32).unwrap();
    let mask = g.get("attention_mask").unwrap();
    let n_tokens = mask.sum_all().unwrap().to_scalar::<i64>().unwrap() as usize;
    let b = ids.dims()[0];
    Batch {
        input_ids: ids,
        attention_mask: mask.to_dtype(DType::F32).unwrap(),
        token_type_ids: Some(
            g.get("token_type_ids")
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap(),
        ),
        labels: labels
            .unwrap_or_else(|| Tensor::zeros(b, DType::I64, &candle_core::Device::Cpu).unwrap()),
        n_tokens,
        n_target_tokens: b,
    }
}

fn set_head(m: &Deberta, path: &str, w: &Tensor, b: &Tensor) {
    let h = m
        .heads()
        .into_iter()
        .find(|h| h.path == path)
        .unwrap_or_else(|| panic!("no trained head `{path}`"));
    h.set(w, b).unwrap();
}

/// Hidden states (every position, padding included), ContextPooler output and logits of
/// each config equal transformers' within 1e-5 (relative to the largest reference value).
#[test]
fn tiny_debertas_match_transformers() {
    let g = load_golden("deberta_tiny_golden.safetensors");
    let bt = batch(&g, None);
    let ctx = Ctx::eval();
    for name in CONFIGS {
        let m = load(&golden(name), &seq(3));
        for head in ["pooler.dense", "classifier"] {
            set_head(
                &m,
                head,
                g.get(&format!("{name}.{head}.weight")).unwrap(),
                g.get(&format!("{name}.{head}.bias")).unwrap(),
            );
        }
        let h = m
            .encode(
                &bt.input_ids,
                bt.token_type_ids.as_ref(),
                &bt.attention_mask,
                &ctx,
            )
            .unwrap();
        let want = g.get(&format!("{name}.last_hidden_state")).unwrap();
        let d = max_rel_diff(&format!("{name} last_hidden_state"), &h, want, None);
        assert!(d < 1e-5, "{name}: {d}");
        let pooled = m.pool(&h, &ctx).unwrap();
        let want = g.get(&format!("{name}.pooled_output")).unwrap();
        let d = max_rel_diff(&format!("{name} pooled"), &pooled, want, None);
        assert!(d < 1e-5, "{name}: {d}");
        let logits = m.logits(&bt, &ctx).unwrap();
        let want = g.get(&format!("{name}.logits")).unwrap();
        let d = max_rel_diff(&format!("{name} logits"), &logits, want, None);
        assert!(d < 1e-5, "{name}: {d}");
    }
}

/// `build_relative_position` with and without log buckets, including the base-size
/// geometry (256 buckets, 512 positions) over 600 positions.
#[test]
fn relative_positions_match_transformers() {
    let g = load_golden("deberta_tiny_golden.safetensors");
    for (t, buckets, max_rel) in [(40, 8, 64), (30, 16, 20), (12, -1, 6), (600, 256, 512)] {
        let got = relative_positions(t, t, buckets, max_rel);
        let key = format!("rel_pos.{t}.{buckets}.{max_rel}");
        let row: Vec<i64> = g.get(&format!("{key}.row0")).unwrap().to_vec1().unwrap();
        let col: Vec<i64> = g.get(&format!("{key}.col0")).unwrap().to_vec1().unwrap();
        assert_eq!(&got[..t], row.as_slice(), "{key} row 0");
        let got_col: Vec<i64> = (0..t).map(|i| got[i * t]).collect();
        assert_eq!(got_col, col, "{key} column 0");
        if let Ok(full) = g.get(&key) {
            let full: Vec<i64> = full.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, full, "{key}");
        }
    }
}

/// PEFT SEQ_CLS adapters (LoRA on query/key/value_proj; on query/value_proj, pos_key_proj
/// and embed_proj) with pooler and classifier from `modules_to_save`; merged too.
#[test]
fn peft_seq_cls_adapters_match_peft() {
    let g = load_golden("deberta_tiny_golden.safetensors");
    let bt = batch(&g, None);
    for name in ["tiny-deberta-v3", "tiny-deberta-v2"] {
        let mut m = load(&golden(name), &seq(3));
        let kind = io::dash::load_any(&mut m, &golden(&format!("{name}-lora"))).unwrap();
        assert_eq!(kind, "lora");
        let logits = m.logits(&bt, &Ctx::eval()).unwrap();
        let want = g.get(&format!("{name}.lora_logits")).unwrap();
        let d = max_rel_diff(&format!("{name} lora"), &logits, want, None);
        assert!(d < 1e-5, "{name}: {d}");
        m.merge_adapters().unwrap();
        let merged = m.logits(&bt, &Ctx::eval()).unwrap();
        let want = g.get(&format!("{name}.lora_merged_logits")).unwrap();
        let d = max_rel_diff(&format!("{name} merged"), &merged, want, None);
        assert!(d < 1e-5, "{name} merged: {d}");
    }
}

/// Saving writes PEFT's tensor names (pooler and classifier under modules_to_save) and
/// loading the saved adapter gives the same logits.
#[test]
fn saved_seq_cls_adapter_has_peft_layout_and_round_trips() {
    let g = load_golden("deberta_tiny_golden.safetensors");
    let bt = batch(&g, None);
    let (base, adapter) = ("tiny-deberta-v3", "tiny-deberta-v3-lora");
    let mut m = load(&golden(base), &seq(3));
    let cfg = io::peft::load_lora(&mut m, &golden(adapter)).unwrap();
    let before = m.logits(&bt, &Ctx::eval()).unwrap();
    let d = tempfile::tempdir().unwrap();
    io::peft::save_lora(&m, &cfg.lora_config(), Some(base.into()), d.path()).unwrap();
    let ours = Weights::load_safetensors(&d.path().join("adapter_model.safetensors")).unwrap();
    let theirs =
        Weights::load_safetensors(&golden(adapter).join("adapter_model.safetensors")).unwrap();
    let a: Vec<&String> = ours.names().collect();
    let b: Vec<&String> = theirs.names().collect();
    assert_eq!(a, b, "tensor names");
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(c["task_type"], "SEQ_CLS");
    let mts = c["modules_to_save"].as_array().unwrap();
    assert!(mts.contains(&"classifier".into()) && mts.contains(&"pooler".into()));
    let mut m2 = load(&golden(base), &seq(3));
    io::dash::load_any(&mut m2, d.path()).unwrap();
    let after = m2.logits(&bt, &Ctx::eval()).unwrap();
    assert_eq!(max_rel_diff("round trip", &after, &before, None), 0.0);
}

/// Two LoRA training steps (cross-entropy, AdamW with weight decay) on the v3-like config
/// against PEFT + torch.optim.AdamW: losses, gradients of A, B, pooler and classifier,
/// updated values.
#[test]
fn training_steps_match_pytorch() {
    use lora_dash::train::optimizer::{AdamW, AdamWConfig};
    let g = load_golden("deberta_tiny_golden.safetensors");
    let s = load_golden("deberta_tiny_train_step.safetensors");
    let mut m = load(&golden("tiny-deberta-v3"), &seq(3));
    io::dash::load_any(&mut m, &golden("tiny-deberta-v3-lora")).unwrap();
    let vars = m.trainable_vars();
    // 2 layers × 3 modules × (A, B) + pooler and classifier weight and bias.
    assert_eq!(vars.len(), 16);
    let key = |n: &str| format!("base_model.model.{n}");
    for (n, v) in &vars {
        let init = s.get(&format!("init.{}", key(n))).unwrap();
        assert_eq!(max_rel_diff(n, v.as_tensor(), init, None), 0.0);
    }
    let bt = batch(&g, Some(s.get("labels").unwrap().clone()));
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
        let loss = m.loss(&bt, &Ctx::eval()).unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        let want = s
            .get(&format!("loss{step}"))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        println!("step {step}: loss {got} vs {want}");
        assert!(
            (got - want).abs() < 1e-5 * want.abs(),
            "loss {got} vs {want}"
        );
        let grads = loss.backward().unwrap();
        for (n, v) in &vars {
            let gg = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            let d = max_rel_diff(
                &format!("grad{step} {n}"),
                gg,
                s.get(&format!("grad{step}.{}", key(n))).unwrap(),
                None,
            );
            assert!(d < 1e-4, "grad{step} {n}: {d}");
        }
        opt.step(&grads, 1e-3).unwrap();
        for (n, v) in &vars {
            let d = max_rel_diff(
                &format!("step{step} {n}"),
                v.as_tensor(),
                s.get(&format!("step{step}.{}", key(n))).unwrap(),
                None,
            );
            assert!(d < 1e-5, "step{step} {n}: {d}");
        }
    }
}

/// Config options that are not computed exactly are refused naming the key; a checkpoint
/// tensor the config does not use is refused naming the tensor.
#[test]
fn unsupported_options_are_refused() {
    let dir = golden("tiny-deberta-v3");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let try_cfg = |key: &str, value: serde_json::Value| -> String {
        let d = tempfile::tempdir().unwrap();
        let mut c = base.clone();
        c[key] = value;
        std::fs::write(d.path().join("config.json"), c.to_string()).unwrap();
        std::fs::write(d.path().join("model.safetensors"), &weights).unwrap();
        let loaded = io::load_model(d.path().to_str().unwrap()).unwrap();
        match lora_dash::models::load(&loaded, &seq(2)) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    for (key, value) in [
        ("conv_kernel_size", serde_json::json!(3)),
        ("attention_head_size", serde_json::json!(4)),
        ("pos_att_type", serde_json::json!(["c2p", "p2p"])),
        ("hidden_act", serde_json::json!("gelu_new")),
        ("norm_rel_ebd", serde_json::json!("layer_norm|other")),
        ("pooler_hidden_act", serde_json::json!("relu")),
    ] {
        let e = try_cfg(key, value);
        println!("{key}: {e}");
        assert!(e.contains(key), "{key}: {e}");
    }
    // share_att_key false wants pos_key_proj / pos_query_proj the checkpoint lacks.
    let e = try_cfg("share_att_key", serde_json::json!(false));
    assert!(e.contains("pos_key_proj"), "{e}");
    // Without relative attention the relative embeddings and their LayerNorm are unused.
    let e = try_cfg("relative_attention", serde_json::json!(false));
    assert!(
        e.contains("rel_embeddings") || e.contains("encoder.LayerNorm"),
        "{e}"
    );
    // A decoder task on the encoder.
    let loaded = io::load_model(dir.to_str().unwrap()).unwrap();
    let e = lora_dash::models::load(&loaded, &HeadSpec::CausalLm)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("encoder"), "{e}");
}

/// The Hugging Face directory `merge` writes is read back as the same model.
#[test]
fn base_weights_round_trip() {
    let g = load_golden("deberta_tiny_golden.safetensors");
    let bt = batch(&g, None);
    for name in CONFIGS {
        let m = load(&golden(name), &seq(3));
        let logits = m.logits(&bt, &Ctx::eval()).unwrap();
        let d = tempfile::tempdir().unwrap();
        let src: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(golden(name).join("config.json")).unwrap(),
        )
        .unwrap();
        let cfg = m.hf_config(&src).unwrap();
        std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
        m.base_weights(false)
            .unwrap()
            .save_safetensors(&d.path().join("model.safetensors"), None)
            .unwrap();
        let m2 = load(d.path(), &seq(3));
        let again = m2.logits(&bt, &Ctx::eval()).unwrap();
        // The reloaded pooler and classifier are frozen layers: another matmul path.
        assert!(max_rel_diff(name, &again, &logits, None) < 1e-6);
    }
}
