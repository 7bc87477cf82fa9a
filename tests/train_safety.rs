//! Regression tests for training and output safety: an `--out` never destroys an input, a
//! failed run keeps the previous output, divergence and non-finite inputs are clear errors,
//! resume refuses changed data, and examples without loss tokens are reported.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::golden;
use lora_dash::cli::TrainArgs;
use lora_dash::io::{self, Weights};
use lora_dash::train::trainer::train;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/arithmetic.jsonl")
}

fn args(model: &Path, data: &Path, out: &Path) -> TrainArgs {
    TrainArgs {
        model: Some(model.to_string_lossy().into_owned()),
        data: Some(vec![data.to_path_buf()]),
        out: Some(out.to_path_buf()),
        rank: Some(4),
        batch_size: Some(2),
        cutoff_len: Some(48),
        max_steps: Some(4),
        max_records: Some(32),
        lr: Some(5e-3),
        overwrite: Some(true),
        ..Default::default()
    }
}

fn run(a: TrainArgs) -> Result<(), String> {
    a.resolve()
        .and_then(|c| train(&c))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn overwrite_never_deletes_the_model_or_the_data() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    copy_dir(&golden("tiny-llama"), &model);
    let before = listing(&model);
    // --out is the model directory.
    let e = run(args(&model, &data(), &model)).unwrap_err();
    assert!(e.contains("--model"), "{e}");
    assert_eq!(listing(&model), before);
    // --out contains the data file.
    let out = d.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    let inside = out.join("train.jsonl");
    std::fs::copy(data(), &inside).unwrap();
    let e = run(args(&model, &inside, &out)).unwrap_err();
    assert!(e.contains("--data"), "{e}");
    assert!(inside.is_file());
    // --out lies inside the model directory.
    let e = run(args(&model, &data(), &model.join("sub"))).unwrap_err();
    assert!(e.contains("--model"), "{e}");
    assert_eq!(listing(&model), before);
    // A directory that is not a run is not emptied.
    let other = d.path().join("photos");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("a.jpg"), b"x").unwrap();
    assert!(run(args(&model, &data(), &other)).is_err());
    assert!(other.join("a.jpg").is_file());
}

#[test]
fn failed_run_keeps_the_previous_output_and_counts_steps_from_one() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    run(args(&golden("tiny-llama"), &data(), &out)).unwrap();
    let before = listing(&out);
    // A learning rate that makes the loss blow up.
    let mut a = args(&golden("tiny-llama"), &data(), &out);
    a.lr = Some(1e30);
    a.max_grad_norm = Some(0.0);
    a.max_steps = Some(20);
    let e = run(a).unwrap_err();
    assert!(e.contains("diverged"), "{e}");
    let step: usize = e
        .split("step ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no step in `{e}`"));
    assert!(step >= 1, "{e}");
    assert_eq!(listing(&out), before, "the previous run is intact");
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "run")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn validation_errors_leave_no_out() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let mut a = args(&golden("tiny-llama"), &data(), &out);
    a.method = Some("dash".into());
    a.dash_t = Some(2);
    a.dash_s = Some(10_000);
    let e = run(a).unwrap_err();
    assert!(e.contains("dash_s"), "{e}");
    assert!(!out.exists());
}

#[test]
fn resume_refuses_changed_data() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("train.jsonl");
    std::fs::copy(data(), &file).unwrap();
    let out = d.path().join("run");
    let mut a = args(&golden("tiny-llama"), &file, &out);
    a.save_every = Some(2);
    run(a).unwrap();
    // Same path, different content.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text = text.replace('7', "8");
    std::fs::write(&file, text).unwrap();
    let mut r = args(&golden("tiny-llama"), &file, &out);
    r.save_every = Some(2);
    r.overwrite = None;
    r.resume = Some(out.join("checkpoints"));
    let e = run(r).unwrap_err();
    assert!(e.contains("training data") && e.contains("hash"), "{e}");
}

#[test]
fn examples_without_loss_tokens_are_an_error_when_all_are() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let mut a = args(&golden("tiny-llama"), &data(), &out);
    a.train_on_inputs = Some(false);
    a.cutoff_len = Some(4);
    let e = run(a).unwrap_err();
    assert!(
        e.contains("no example") && e.contains("train_on_inputs"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn non_finite_adapters_are_refused_by_merge_eval_and_analyze() {
    let d = tempfile::tempdir().unwrap();
    let adapter = d.path().join("nan-lora");
    copy_dir(&golden("tiny-lora"), &adapter);
    let wpath = adapter.join("adapter_model.safetensors");
    let mut w = Weights::load_safetensors(&wpath).unwrap();
    let name = w.names().find(|n| n.contains("lora_B")).unwrap().clone();
    let t = w.get(&name).unwrap().clone();
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[0] = f32::NAN;
    w.insert(
        name.clone(),
        Tensor::from_vec(v, t.dims(), t.device()).unwrap(),
    );
    w.save_safetensors(&wpath, None).unwrap();
    let model = golden("tiny-llama");
    let e = lora_dash::cli::commands::merge(
        model.to_str().unwrap(),
        &adapter,
        &d.path().join("m"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(&name), "{e}");
    assert!(!d.path().join("m").exists());
    let e =
        lora_dash::cli::commands::load_with_adapter(model.to_str().unwrap(), Some(&adapter), None)
            .err()
            .unwrap()
            .to_string();
    assert!(e.contains(&name), "{e}");
    let loaded = io::load_model(model.to_str().unwrap()).unwrap();
    let e = lora_dash::tsd::analysis::load_deltas(
        &loaded,
        &lora_dash::tsd::analysis::DeltaSource::Adapter(adapter.clone()),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains(&name), "{e}");
}
