//! GLUE end to end on the tiny BERT: LoRA and LoRA-Dash training with a classification or
//! regression head, validation metrics, resume, the PEFT export with its heads, merge into a
//! `BertForSequenceClassification` directory, `eval --task` outputs, `analyze`, and the
//! errors users can run into.

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

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lora-dash"))
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/glue")
        .join(name)
}

/// An RTE-layout file of `n` rows built from a few sentence templates (with a `"` in some).
fn rte_file(dir: &Path, n: usize) -> PathBuf {
    let subjects = [
        "the company",
        "a senator",
        "the river",
        "my neighbour",
        "the \"new\" law",
    ];
    let verbs = ["announced", "opposed", "crossed", "painted", "changed"];
    let mut s = String::from("index\tsentence1\tsentence2\tlabel\n");
    for i in 0..n {
        let a = format!(
            "In {}, {} {} the plan after a long debate.",
            1990 + i,
            subjects[i % 5],
            verbs[(i / 5) % 5]
        );
        let (b, label) = if i % 2 == 0 {
            (
                format!("{} {} the plan.", subjects[i % 5], verbs[(i / 5) % 5]),
                "entailment",
            )
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
        model: Some(golden("tiny-bert").to_string_lossy().into_owned()),
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
        overwrite: Some(true),
        ..Default::default()
    }
}

fn examples(data: &Path, task: &str) -> Vec<Example> {
    let loaded = io::load_model(golden("tiny-bert").to_str().unwrap()).unwrap();
    Task::parse(Some(task))
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

/// LoRA: validation logs the task metric, the run directory is a PEFT SEQ_CLS adapter whose
/// classifier is the trained one, merge writes a classifier model with the same logits, and
/// `eval --task` writes the metrics and one prediction per row.
#[test]
fn lora_run_exports_heads_merges_and_evaluates() {
    let d = tempfile::tempdir().unwrap();
    let data = rte_file(d.path(), 24);
    let out = d.path().join("run");
    let s = train(&args(&data, &out).resolve().unwrap()).unwrap();
    assert_eq!(s.steps, 6);
    let recs = read_records(&out.join("metrics.jsonl")).unwrap();
    let evals: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.extra.get("eval_accuracy").and_then(|v| v.as_f64()))
        .collect();
    assert_eq!(evals.len(), 2, "eval at steps 3 and 6");
    assert!(evals.iter().all(|a| (0.0..=1.0).contains(a)));
    let cfg = json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let w = io::Weights::load_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    let cls = w.get("base_model.model.classifier.weight").unwrap();
    assert_eq!(cls.dims(), &[2, 32]);
    // The classifier trained: it moved away from its seeded initialisation.
    let loaded = io::load_model(golden("tiny-bert").to_str().unwrap()).unwrap();
    let fresh = lora_dash::models::load(&loaded, &Task::parse(Some("rte")).unwrap().head(None, 42))
        .unwrap();
    let init = fresh
        .heads()
        .iter()
        .find(|h| h.path == "classifier")
        .unwrap()
        .weight
        .as_tensor()
        .clone();
    assert!(max_abs(cls, &init) > 1e-4);

    // Adapter vs merged model: same logits.
    let exs = examples(&data, "rte");
    let (_, m) = lora_dash::cli::commands::load_with_adapter(
        golden("tiny-bert").to_str().unwrap(),
        Some(&out),
        None,
    )
    .unwrap();
    let with_adapter = logits_of(m.as_ref(), &exs);
    let merged = d.path().join("merged");
    lora_dash::cli::commands::merge(golden("tiny-bert").to_str().unwrap(), &out, &merged, false)
        .unwrap();
    let mc = json(&merged.join("config.json"));
    assert_eq!(mc["architectures"][0], "BertForSequenceClassification");
    assert_eq!(mc["id2label"].as_object().unwrap().len(), 2);
    let ml = io::load_model(merged.to_str().unwrap()).unwrap();
    let mm = lora_dash::models::load(&ml, &HeadSpec::Base).unwrap();
    let d_merged = max_abs(&logits_of(mm.as_ref(), &exs), &with_adapter);
    println!("merged vs adapter: max |diff| {d_merged:.3e}");
    assert!(d_merged < 1e-4, "{d_merged}");

    // eval --task: metrics and per-row predictions (file order, 0-based index).
    let ev = d.path().join("eval");
    let o = bin()
        .args([
            "eval",
            "--model",
            golden("tiny-bert").to_str().unwrap(),
            "--adapter",
        ])
        .arg(&out)
        .args(["--task", "rte", "--data"])
        .arg(&data)
        .args(["--limit", "10", "--out"])
        .arg(&ev)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&ev.join("results.json"));
    assert_eq!(r["task"], "rte");
    assert_eq!(r["files"]["rte"]["examples"], 10);
    let acc = r["files"]["rte"]["accuracy"].as_f64().unwrap();
    let preds: Vec<serde_json::Value> = std::fs::read_to_string(ev.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(preds.len(), 10);
    let mut correct = 0;
    for (i, p) in preds.iter().enumerate() {
        assert_eq!(p["index"], i);
        assert_eq!(p["label"], (i % 2) as u64, "row {i}: RTE entailment = 0");
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
        let argmax = if sc[1] > sc[0] { 1 } else { 0 };
        assert_eq!(p["prediction"], argmax);
        correct += (p["prediction"] == p["label"]) as usize;
    }
    assert!((acc - correct as f64 / 10.0).abs() < 1e-12);
}

/// LoRA-Dash on an encoder: the switch at step t, the native adapter and the rank-(r+s)
/// export both carry the heads and give the model's logits; resuming after the switch
/// matches an uninterrupted run.
#[test]
fn dash_run_switches_exports_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let data = rte_file(d.path(), 24);
    let mk = |out: &Path| {
        let mut a = args(&data, out);
        a.method = Some("dash".into());
        a.dash_t = Some(2);
        a.dash_s = Some(3);
        a.target_modules = Some("all-linear".into());
        a
    };
    let full = d.path().join("full");
    train(&mk(&full).resolve().unwrap()).unwrap();
    let tsd = json(&full.join("tsd.json"));
    let layers = tsd["layers"].as_object().unwrap();
    // all-linear: six per layer and the pooler, never the classifier.
    assert_eq!(layers.len(), 13, "{:?}", layers.keys().collect::<Vec<_>>());
    assert!(layers.contains_key("bert.pooler.dense"));
    assert!(!layers.keys().any(|k| k.contains("classifier")));
    let exs = examples(&data, "rte");
    let g = golden("tiny-bert");
    let load = |dir: &Path| {
        lora_dash::cli::commands::load_with_adapter(g.to_str().unwrap(), Some(dir), None)
            .unwrap()
            .1
    };
    let native = logits_of(load(&full).as_ref(), &exs);
    let export = logits_of(load(&full.join("peft")).as_ref(), &exs);
    let de = max_abs(&native, &export);
    println!("native vs rank-(r+s) export: {de:.3e}");
    assert!(de < 1e-5, "{de}");
    // `all-linear` is written as the exact adapted paths (PEFT 0.13 cannot resolve it on a
    // sequence classifier whose heads it wraps): 13 alternatives, the classifier not among them.
    let tm = json(&full.join("peft").join("adapter_config.json"))["target_modules"].clone();
    let tm = tm.as_str().expect("a regex string");
    assert!(tm.starts_with("^(") && tm.ends_with(")$"), "{tm}");
    assert_eq!(tm.split('|').count(), 13, "{tm}");
    assert!(
        tm.contains(r"bert\.pooler\.dense") && !tm.contains("classifier"),
        "{tm}"
    );

    // Interrupted after the switch (checkpoint at step 4), resumed to step 6.
    let part = d.path().join("part");
    let mut a = mk(&part);
    a.save_every = Some(4);
    train(&a.resolve().unwrap()).unwrap();
    let mut r = mk(&part);
    r.resume = Some(part.join("checkpoints"));
    r.overwrite = None;
    train(&r.resolve().unwrap()).unwrap();
    let l1: Vec<f64> = read_records(&full.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r.loss)
        .collect();
    let l2: Vec<f64> = read_records(&part.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r.loss)
        .collect();
    assert_eq!(l1, l2);
    let resumed = logits_of(load(&part).as_ref(), &exs);
    assert_eq!(max_abs(&native, &resumed), 0.0);

    // analyze reads the encoder adapter.
    let an = d.path().join("an");
    let o = bin()
        .args(["analyze", "--model", g.to_str().unwrap(), "--adapter"])
        .arg(&full)
        .args(["--s", "2", "--out"])
        .arg(&an)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(an.join("analysis.json").is_file());
}

/// STS-B trains as regression: one output, MSE, Pearson and Spearman.
#[test]
fn stsb_trains_as_regression() {
    let d = tempfile::tempdir().unwrap();
    let data = fixture("stsb_dev.tsv");
    let out = d.path().join("run");
    let mut a = args(&data, &out);
    a.task = Some("stsb".into());
    a.batch_size = Some(2);
    let s = train(&a.resolve().unwrap()).unwrap();
    let m = s.eval_metrics.unwrap();
    assert!(
        m.contains_key("pearson") && m.contains_key("spearmanr"),
        "{m:?}"
    );
    let w = io::Weights::load_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        w.get("base_model.model.classifier.weight").unwrap().dims(),
        &[1, 32]
    );
}

/// What users get wrong, each a one-line error naming the problem.
#[test]
fn bad_glue_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let data = rte_file(d.path(), 8);
    let fail = |a: TrainArgs, needle: &str| {
        let out = a.out.clone().unwrap();
        let e = a
            .resolve()
            .and_then(|c| train(&c))
            .err()
            .expect("an error")
            .to_string();
        assert!(e.contains(needle), "`{e}` lacks `{needle}`");
        assert!(!out.exists(), "{}: left behind after `{e}`", out.display());
    };
    let out = d.path().join("x");
    let mut a = args(&data, &out);
    a.task = Some("glue9".into());
    fail(a, "unknown task");
    // An SST-2 layout given as RTE names the file and line.
    let sst = d.path().join("sst.tsv");
    std::fs::write(&sst, "sentence\tlabel\ngood film\t1\n").unwrap();
    let mut a = args(&sst, &out);
    a.eval_data = None;
    fail(a, "sst.tsv");
    // A test file without labels.
    let test = d.path().join("test.tsv");
    std::fs::write(&test, "index\tsentence1\tsentence2\n0\ta b\tc d\n").unwrap();
    let mut a = args(&test, &out);
    a.eval_data = None;
    fail(a, "label");
    // A decoder base for a GLUE task, an encoder for instruction tuning.
    let mut a = args(&data, &out);
    a.model = Some(golden("tiny-llama").to_string_lossy().into_owned());
    a.target_modules = Some("q_proj".into());
    fail(a, "decoder");
    let mut a = args(&data, &out);
    a.task = None;
    a.data = Some(vec![
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/arithmetic.jsonl")
    ]);
    a.eval_data = None;
    fail(a, "encoder");
}

/// MNLI: three labels, trained on the 12-column train layout and evaluated on both dev files
/// (16 columns) in one call, results keyed by file; MRPC's BOM header and QQP's malformed row
/// train too.
#[test]
fn mnli_two_dev_files_and_other_layouts() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("mnli");
    let mut a = args(&fixture("mnli_train.tsv"), &out);
    a.task = Some("mnli".into());
    a.eval_data = None;
    a.max_steps = Some(2);
    train(&a.resolve().unwrap()).unwrap();
    let ev = d.path().join("eval");
    let o = bin()
        .args([
            "eval",
            "--model",
            golden("tiny-bert").to_str().unwrap(),
            "--adapter",
        ])
        .arg(&out)
        .args(["--task", "mnli", "--data"])
        .arg(fixture("mnli_dev_matched.tsv"))
        .arg(fixture("mnli_dev_mismatched.tsv"))
        .arg("--out")
        .arg(&ev)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json(&ev.join("results.json"));
    for k in ["mnli_dev_matched", "mnli_dev_mismatched"] {
        let acc = r["files"][k]["accuracy"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&acc), "{k}: {r}");
    }
    let preds = std::fs::read_to_string(ev.join("predictions.jsonl")).unwrap();
    assert!(preds.lines().all(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["scores"].as_array().unwrap().len() == 3
    }));
    // An adapter trained for MNLI (3 labels) is refused for RTE.
    let o = bin()
        .args([
            "eval",
            "--model",
            golden("tiny-bert").to_str().unwrap(),
            "--adapter",
        ])
        .arg(&out)
        .args(["--task", "rte", "--data"])
        .arg(rte_file(d.path(), 4))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("mnli"), "{e}");
    for (task, file) in [("mrpc", "mrpc_train.tsv"), ("qqp", "qqp_train.tsv")] {
        let out = d.path().join(task);
        let mut a = args(&fixture(file), &out);
        a.task = Some(task.into());
        a.eval_data = None;
        a.max_steps = Some(1);
        a.batch_size = Some(2);
        train(&a.resolve().unwrap()).unwrap_or_else(|e| panic!("{task}: {e}"));
    }
}
