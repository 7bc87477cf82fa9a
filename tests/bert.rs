//! BERT against transformers / PEFT (golden files of `tests/golden/make_golden_bert.py`):
//! the tiny random encoder's hidden states, pooler and logits, the regression head, PEFT
//! sequence-classification adapters (with a classifier, and with a pooler the checkpoint
//! lacks), two training steps, the sentence-pair tokenisation, and all-MiniLM-L6-v2.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use common::{golden, load_golden, max_rel_diff};
use lora_dash::data::glue::PairEncoder;
use lora_dash::data::Batch;
use lora_dash::io::{self, Weights};
use lora_dash::models::bert::Bert;
use lora_dash::models::{Ctx, HeadSpec, Model};

fn seq(num_labels: usize) -> HeadSpec {
    HeadSpec::Sequence {
        num_labels,
        classifier_dropout: Some(0.0),
        seed: 1,
    }
}

fn load(dir: &Path, head: &HeadSpec) -> Bert {
    let loaded = io::load_model(dir.to_str().unwrap()).unwrap();
    Bert::load(&loaded, head).unwrap()
}

fn batch(g: &Weights, labels: Option<Tensor>) -> Batch {
    let ids = g.get("input_ids").unwrap().to_dtype(DType::U32).unwrap();
    let n_tokens = g
        .get("attention_mask")
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<i64>()
        .unwrap() as usize;
    let b = ids.dims()[0];
    Batch {
        input_ids: ids,
        attention_mask: g
            .get("attention_mask")
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
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

fn set_head(m: &Bert, path: &str, w: &Tensor, b: &Tensor) {
    let h = m
        .heads()
        .into_iter()
        .find(|h| h.path == path)
        .unwrap_or_else(|| panic!("no trained head `{path}`"));
    h.set(w, b).unwrap();
}

/// Encoder, pooler and classifier of the tiny random BERT equal transformers' (eager
/// attention, eval mode) on a batch with padding, token types and truncated pairs.
#[test]
fn tiny_bert_matches_transformers() {
    let g = load_golden("bert_tiny_golden.safetensors");
    let m = load(&golden("tiny-bert"), &seq(3));
    set_head(
        &m,
        "classifier",
        g.get("classifier.weight").unwrap(),
        g.get("classifier.bias").unwrap(),
    );
    let bt = batch(&g, None);
    let ctx = Ctx::eval();
    let h = m
        .encode(
            &bt.input_ids,
            bt.token_type_ids.as_ref(),
            &bt.attention_mask,
            &ctx,
        )
        .unwrap();
    let mask = &bt.attention_mask;
    let d = max_rel_diff(
        "last_hidden_state",
        &h,
        g.get("last_hidden_state").unwrap(),
        Some(mask),
    );
    assert!(d < 1e-5, "{d}");
    let pooled = m.pool(&h, &ctx).unwrap();
    let d = max_rel_diff(
        "pooled_output",
        &pooled,
        g.get("pooled_output").unwrap(),
        None,
    );
    assert!(d < 1e-5, "{d}");
    let logits = m.logits(&bt, &ctx).unwrap();
    let d = max_rel_diff("logits", &logits, g.get("logits").unwrap(), None);
    assert!(d < 1e-5, "{d}");
    // The trait's classifier path gives the same logits.
    let l2 = m.as_classifier().unwrap().classify(&bt, &ctx).unwrap();
    assert_eq!(max_rel_diff("classify", &l2, &logits, None), 0.0);
}

/// One regression output and transformers' MSE loss.
#[test]
fn tiny_bert_regression_head_and_loss_match() {
    let g = load_golden("bert_tiny_golden.safetensors");
    let m = load(&golden("tiny-bert"), &seq(1));
    set_head(
        &m,
        "classifier",
        g.get("regression.classifier.weight").unwrap(),
        g.get("regression.classifier.bias").unwrap(),
    );
    let bt = batch(&g, Some(g.get("regression.labels").unwrap().clone()));
    let logits = m.logits(&bt, &Ctx::eval()).unwrap();
    let d = max_rel_diff(
        "regression logits",
        &logits,
        g.get("regression.logits").unwrap(),
        None,
    );
    assert!(d < 1e-5, "{d}");
    let loss = m
        .loss(&bt, &Ctx::eval())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = g
        .get("regression.loss")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    println!("mse {loss} vs {want}");
    assert!((loss - want).abs() < 1e-5 * want.abs(), "{loss} vs {want}");
}

/// PEFT SEQ_CLS adapters: LoRA on query/key/value plus the trained classifier (and, on the
/// pooler-less base, the trained pooler) from `modules_to_save`; merged equals unmerged.
#[test]
fn peft_seq_cls_adapters_match_peft() {
    let g = load_golden("bert_tiny_golden.safetensors");
    let want = load_golden("bert_tiny_lora_logits.safetensors");
    let bt = batch(&g, None);
    for (base, adapter, key) in [
        ("tiny-bert", "tiny-bert-lora", ""),
        ("tiny-bert-nopool", "tiny-bert-nopool-lora", "nopool."),
    ] {
        let mut m = load(&golden(base), &seq(3));
        let kind = io::dash::load_any(&mut m, &golden(adapter)).unwrap();
        assert_eq!(kind, "lora");
        let logits = m.logits(&bt, &Ctx::eval()).unwrap();
        let d = max_rel_diff(
            adapter,
            &logits,
            want.get(&format!("{key}logits")).unwrap(),
            None,
        );
        assert!(d < 1e-5, "{adapter}: {d}");
        m.merge_adapters().unwrap();
        let merged = m.logits(&bt, &Ctx::eval()).unwrap();
        let d = max_rel_diff(
            "merged",
            &merged,
            want.get(&format!("{key}merged_logits")).unwrap(),
            None,
        );
        assert!(d < 1e-5, "{adapter} merged: {d}");
    }
    // The head spec is read off the adapter (3 labels) when none is given.
    let spec = io::dash::head_spec_of(&golden("tiny-bert-lora")).unwrap();
    assert!(
        matches!(spec, HeadSpec::Sequence { num_labels: 3, .. }),
        "{spec:?}"
    );
}

/// Saving writes PEFT's key names and config (task_type SEQ_CLS, heads in
/// modules_to_save), and loading the saved adapter gives the same logits.
#[test]
fn saved_seq_cls_adapter_has_peft_layout_and_round_trips() {
    let g = load_golden("bert_tiny_golden.safetensors");
    let bt = batch(&g, None);
    for (base, adapter) in [
        ("tiny-bert", "tiny-bert-lora"),
        ("tiny-bert-nopool", "tiny-bert-nopool-lora"),
    ] {
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
        assert_eq!(a, b, "{adapter}: tensor names");
        let c: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(c["task_type"], "SEQ_CLS");
        let mts: Vec<&str> = c["modules_to_save"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(mts.contains(&"classifier"), "{mts:?}");
        assert_eq!(
            mts.contains(&"pooler"),
            base == "tiny-bert-nopool",
            "{mts:?}"
        );
        let mut m2 = load(&golden(base), &seq(3));
        io::dash::load_any(&mut m2, d.path()).unwrap();
        let after = m2.logits(&bt, &Ctx::eval()).unwrap();
        assert_eq!(max_rel_diff("round trip", &after, &before, None), 0.0);
    }
}

/// Adapters that do not fit are refused with the tensor or file named.
#[test]
fn mismatched_adapters_are_refused() {
    // Trained for 3 labels, loaded for 2.
    let mut m = load(&golden("tiny-bert"), &seq(2));
    let e = io::dash::load_any(&mut m, &golden("tiny-bert-lora"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("classifier.weight") && e.contains("[3, 32]"),
        "{e}"
    );
    // An encoder adapter on a decoder base.
    let loaded = io::load_model(golden("tiny-llama").to_str().unwrap()).unwrap();
    let mut llama = lora_dash::models::load(&loaded, &HeadSpec::CausalLm).unwrap();
    let e = io::dash::load_any(llama.as_mut(), &golden("tiny-bert-lora"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("SEQ_CLS"), "{e}");
    // A decoder adapter on an encoder.
    let mut m = load(&golden("tiny-bert"), &seq(3));
    let e = io::dash::load_any(&mut m, &golden("tiny-lora"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("causal-LM adapter"), "{e}");
    // A sequence head on a decoder, and a decoder task on an encoder.
    let e = lora_dash::models::load(&loaded, &seq(2))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("decoder"), "{e}");
    let bl = io::load_model(golden("tiny-bert").to_str().unwrap()).unwrap();
    let e = lora_dash::models::load(&bl, &HeadSpec::CausalLm)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("encoder"), "{e}");
}

/// Two LoRA training steps (cross-entropy, AdamW with weight decay) on the tiny BERT against
/// PEFT + torch.optim.AdamW: losses, gradients of A, B and the classifier, updated values.
#[test]
fn training_steps_match_pytorch() {
    use lora_dash::train::optimizer::{AdamW, AdamWConfig};
    let g = load_golden("bert_tiny_golden.safetensors");
    let s = load_golden("bert_tiny_train_step.safetensors");
    let mut m = load(&golden("tiny-bert"), &seq(3));
    io::dash::load_any(&mut m, &golden("tiny-bert-lora")).unwrap();
    let vars = m.trainable_vars();
    assert_eq!(vars.len(), 14);
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

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden(name)).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_encodings(dir: &Path, entries: &[(String, Option<String>, usize, Vec<u32>, Vec<u32>)]) {
    let loaded = io::load_model(dir.to_str().unwrap()).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let mut by_len: std::collections::HashMap<usize, PairEncoder> = Default::default();
    for (a, b, max_len, ids, types) in entries {
        let enc = by_len
            .entry(*max_len)
            .or_insert_with(|| PairEncoder::new(tok, *max_len).unwrap());
        let (gi, gt) = enc.encode(a, b.as_deref()).unwrap();
        assert_eq!(&gi, ids, "ids of {a:?} / {b:?} at {max_len}");
        assert_eq!(&gt, types, "type ids of {a:?} / {b:?} at {max_len}");
    }
}

/// `tokenizer(a, b, truncation=True, max_length=24)` on the tiny tokenizer.
#[test]
fn pair_encoding_matches_transformers_tiny() {
    let j = json("bert_tiny_inputs.json");
    let max_len = j["max_length"].as_u64().unwrap() as usize;
    let entries: Vec<_> = j["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["text_a"].as_str().unwrap().to_string(),
                t["text_b"].as_str().map(String::from),
                max_len,
                ids_of(&t["input_ids"]),
                ids_of(&t["token_type_ids"]),
            )
        })
        .collect();
    assert_eq!(entries.len(), 8);
    check_encodings(&golden("tiny-bert"), &entries);
}

/// all-MiniLM-L6-v2 (`scripts/fetch-minilm.sh`, or `LORA_DASH_MINILM`), when present;
/// required in CI.
fn minilm() -> Option<PathBuf> {
    let p = std::env::var_os("LORA_DASH_MINILM")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("LORA_DASH_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".cache").join("lora-dash"))
                })?;
            Some(cache.join("all-MiniLM-L6-v2"))
        });
    match p {
        Some(p) if p.join("model.safetensors").is_file() => Some(p),
        _ => {
            common::missing_fixture("all-MiniLM-L6-v2", "run ./scripts/fetch-minilm.sh");
            None
        }
    }
}

/// The real BERT tokenizer: 36 texts (pairs, singles, quotes, accents, specials, an over-long
/// word) at max_length 128 and 24, against transformers' `BertTokenizerFast`.
#[test]
fn pair_encoding_matches_transformers_minilm() {
    let Some(dir) = minilm() else { return };
    let j = json("bert_minilm_tokenizer_golden.json");
    let entries: Vec<_> = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["text_a"].as_str().unwrap().to_string(),
                t["text_b"].as_str().map(String::from),
                t["max_length"].as_u64().unwrap() as usize,
                ids_of(&t["input_ids"]),
                ids_of(&t["token_type_ids"]),
            )
        })
        .collect();
    assert_eq!(entries.len(), 72);
    check_encodings(&dir, &entries);
}

/// all-MiniLM-L6-v2 as `BertForSequenceClassification(num_labels=2)`: [CLS] hidden state,
/// pooled output and logits on four RTE pairs up to 128 tokens.
#[test]
fn minilm_matches_transformers() {
    let Some(dir) = minilm() else { return };
    let g = load_golden("bert_minilm_golden.safetensors");
    let m = load(&dir, &seq(2));
    set_head(
        &m,
        "classifier",
        g.get("classifier.weight").unwrap(),
        g.get("classifier.bias").unwrap(),
    );
    let bt = batch(&g, None);
    let ctx = Ctx::eval();
    let h = m
        .encode(
            &bt.input_ids,
            bt.token_type_ids.as_ref(),
            &bt.attention_mask,
            &ctx,
        )
        .unwrap();
    let cls = h.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let d = max_rel_diff("cls_hidden", &cls, g.get("cls_hidden").unwrap(), None);
    assert!(d < 1e-5, "{d}");
    let d = max_rel_diff(
        "pooled",
        &m.pool(&h, &ctx).unwrap(),
        g.get("pooled_output").unwrap(),
        None,
    );
    assert!(d < 1e-5, "{d}");
    let logits = m.logits(&bt, &ctx).unwrap();
    let d = max_rel_diff("logits", &logits, g.get("logits").unwrap(), None);
    assert!(d < 1e-4, "{d}");
}
