//! GLUE end to end on the tiny DeBERTa-v3-like encoder (`tests/golden/tiny-deberta-v3`): a
//! LoRA run on RTE (validation metric, PEFT SEQ_CLS export with pooler and classifier in
//! `modules_to_save`), `merge` into a `DebertaV2ForSequenceClassification` directory with
//! the same logits, `eval --task`, a LoRA-Dash run on all linear layers with its rank-(r+s)
//! export, and `analyze`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Tensor;
use common::golden;
use lora_dash::cli::TrainArgs;
use lora_dash::data::{collate, EncodeOptions, Example, Task};
use lora_dash::io;
use lora_dash::models::{Ctx, HeadSpec, Model};
use lora_dash::train::metrics::read_records;
use lora_dash::train::trainer::train;

const BASE: &str = "tiny-deberta-v3";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lora-dash"))
}

fn base() -> PathBuf {
    golden(BASE)
}

/// An RTE-layout file of `n` rows from a few sentence templates.
fn rte_file(dir: &Path, n: usize) -> PathBuf {
    let subjects = [
        "the company",
        "a senator",
        "the river",
        "my neighbour",
        "the new law",
    ];
    let verbs = ["announced", "opposed", "crossed", "painted", "changed"];
    let mut s = String::from("index\tsentence1\tsentence2\tlabel\n");
    for i in 0..n {
        let (subj, verb) = (subjects[i % 5], verbs[(i / 5) % 5]);
        let a = format!(
            "In {}, {subj} {verb} the plan after a long debate.",
            1990 + i
        );
        let (b, label) = if i % 2 == 0 {
            (format!("{subj} {verb} the plan."), "entailment")
        } else {
            (
                format!("{} never existed.", subjects[(i + 2) % 5]),
                "not_entailment",
            )
        };
        s.push_str(&format!("{i}\t{a}\t{b}\t{label}\n"));
    }
    let p = dir.join("rte.tsv");
    std::fs::write(&p, s).unwrap();
    p
}

fn args(data: &Path, out: &Path) -> TrainArgs {
    TrainArgs {
        model: Some(base().to_string_lossy().into_owned()),
        task: Some("rte".into()),
        data: Some(vec![data.to_path_buf()]),
        eval_data: Some(vec![data.to_path_buf()]),
        eval_every: Some(3),
        out: Some(out.to_path_buf()),
        rank: Some(4),
        batch_size: Some(4),
        cutoff_len: Some(32),
        max_steps: Some(6),
        lr: Some(5e-3),
        target_modules: Some("query_proj,key_proj,value_proj".into()),
        overwrite: Some(true),
        ..Default::default()
    }
}

fn examples(data: &Path) -> Vec<Example> {
    let loaded = io::load_model(base().to_str().unwrap()).unwrap();
    Task::parse(Some("rte"))
        .unwrap()
        .load_examples(
            loaded.tokenizer.as_ref().unwrap(),
            &[data.to_path_buf()],
            EncodeOptions {
                cutoff_len: 32,
                train_on_inputs: true,
            },
        )
        .unwrap()
}

fn logits_of(m: &dyn Model, exs: &[Example]) -> Tensor {
    let refs: Vec<&Example> = exs.iter().collect();
    let b = collate(&refs, 0).unwrap();
    m.as_classifier()
        .unwrap()
        .classify(&b, &Ctx::eval())
        .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load_with(dir: &Path) -> Box<dyn Model> {
    lora_dash::cli::commands::load_with_adapter(base().to_str().unwrap(), Some(dir), None)
        .unwrap()
        .1
}

#[test]
fn lora_run_exports_heads_merges_and_evaluates() {
    let d = tempfile::tempdir().unwrap();
    let data = rte_file(d.path(), 24);
    let out = d.path().join("run");
    let s = train(&args(&data, &out).resolve().unwrap()).unwrap();
    assert_eq!(s.steps, 6);
    let recs = read_records(&out.join("metrics.jsonl")).unwrap();
    let evals = recs
        .iter()
        .filter_map(|r| r.extra.get("eval_accuracy").and_then(|v| v.as_f64()))
        .count();
    assert_eq!(evals, 2, "eval at steps 3 and 6");
    let cfg = json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let mts = cfg["modules_to_save"].as_array().unwrap();
    assert!(
        mts.contains(&"classifier".into()) && mts.contains(&"pooler".into()),
        "{mts:?}"
    );
    let w = io::Weights::load_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        w.get("base_model.model.classifier.weight").unwrap().dims(),
        &[2, 32]
    );
    assert_eq!(
        w.get("base_model.model.pooler.dense.weight")
            .unwrap()
            .dims(),
        &[32, 32]
    );
    assert!(w
        .get("base_model.model.deberta.encoder.layer.1.attention.self.key_proj.lora_A.weight")
        .is_ok());

    let exs = examples(&data);
    let with_adapter = logits_of(load_with(&out).as_ref(), &exs);
    let merged = d.path().join("merged");
    lora_dash::cli::commands::merge(base().to_str().unwrap(), &out, &merged, false).unwrap();
    let mc = json(&merged.join("config.json"));
    assert_eq!(mc["architectures"][0], "DebertaV2ForSequenceClassification");
    assert_eq!(mc["model_type"], "deberta-v2");
    let ml = io::load_model(merged.to_str().unwrap()).unwrap();
    let mm = lora_dash::models::load(&ml, &HeadSpec::Base).unwrap();
    let d_merged = max_abs(&logits_of(mm.as_ref(), &exs), &with_adapter);
    println!("merged vs adapter: max |diff| {d_merged:.3e}");
    assert!(d_merged < 1e-4, "{d_merged}");

    let ev = d.path().join("eval");
    let o = bin()
        .args(["eval", "--model", base().to_str().unwrap(), "--adapter"])
        .arg(&out)
        .args(["--task", "rte", "--data"])
        .arg(&data)
        .args(["--limit", "10", "--out"])
        .arg(&ev)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&ev.join("results.json"));
    assert_eq!(r["files"]["rte"]["examples"], 10);
    let preds: Vec<serde_json::Value> = std::fs::read_to_string(ev.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(preds.len(), 10);
    for (i, p) in preds.iter().enumerate() {
        let sc: Vec<f32> = p["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let want = with_adapter.get(i).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in sc.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "row {i}: {sc:?} vs {want:?}");
        }
    }
}

#[test]
fn dash_run_on_all_linear_exports_and_analyzes() {
    let d = tempfile::tempdir().unwrap();
    let data = rte_file(d.path(), 24);
    let full = d.path().join("dash");
    let mut a = args(&data, &full);
    a.method = Some("dash".into());
    a.dash_t = Some(2);
    a.dash_s = Some(3);
    a.target_modules = Some("all-linear".into());
    train(&a.resolve().unwrap()).unwrap();
    let tsd = json(&full.join("tsd.json"));
    let layers = tsd["layers"].as_object().unwrap();
    // all-linear: query/key/value_proj, attention.output.dense, intermediate and output
    // dense per layer; the pooler and classifier are trained heads, not adapted.
    assert_eq!(layers.len(), 12, "{:?}", layers.keys().collect::<Vec<_>>());
    assert!(!layers
        .keys()
        .any(|k| k.contains("classifier") || k.contains("pooler")));
    let exs = examples(&data);
    let native = logits_of(load_with(&full).as_ref(), &exs);
    let export = logits_of(load_with(&full.join("peft")).as_ref(), &exs);
    let de = max_abs(&native, &export);
    println!("native vs rank-(r+s) export: {de:.3e}");
    assert!(de < 1e-5, "{de}");
    let an = d.path().join("an");
    let o = bin()
        .args(["analyze", "--model", base().to_str().unwrap(), "--adapter"])
        .arg(&full)
        .args(["--s", "2", "--out"])
        .arg(&an)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(an.join("analysis.json").is_file());
}
