//! Regression tests for defects found by trying the tool as a new user would and by
//! mutating model, adapter and GGUF files: inputs destroyed by `--overwrite`, architectures
//! loaded but not computed, untrusted sizes, non-finite values, unchecked caches and flags.
//! Each test is named after the defect it guards against.

mod common;

use std::path::{Path, PathBuf};

use common::golden;
use lora_dash::cli::analyze_cmd::{self, AnalyzeArgs};
use lora_dash::cli::commands;
use lora_dash::Error;

/// A copy of the tiny golden model at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn tiny_copy(root: &Path) -> PathBuf {
    let m = root.join("m");
    copy_dir(&golden("tiny-llama"), &m);
    m
}

#[test]
fn overwrite_never_deletes_the_convert_input() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    let spec = m.to_str().unwrap();
    for (out, needle) in [
        (d.path().to_path_buf(), "contains the --model input"),
        (m.clone(), "is the --model input"),
        (m.join("sub"), "lies inside the --model input"),
    ] {
        let e = commands::convert(spec, &out, true).unwrap_err().to_string();
        assert!(e.contains(needle), "{}: {e}", out.display());
        assert!(m.join("model.safetensors").exists(), "input deleted");
    }
    // The same through a relative path with `..`.
    let rel = m.join("..").join("m");
    let e = commands::convert(spec, &rel, true).unwrap_err().to_string();
    assert!(e.contains("is the --model input"), "{e}");
    assert!(m.join("config.json").exists());
}

#[test]
fn overwrite_replaces_only_an_earlier_output_and_only_on_success() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    let out = d.path().join("out");
    commands::convert(m.to_str().unwrap(), &out, false).unwrap();
    // A second run replaces the earlier output with --overwrite only.
    assert!(matches!(
        commands::convert(m.to_str().unwrap(), &out, false),
        Err(Error::OutputExists(_))
    ));
    commands::convert(m.to_str().unwrap(), &out, true).unwrap();
    assert!(out.join("model.safetensors").exists());
    // A directory that is not an earlier output is not emptied.
    let notes = d.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), b"keep").unwrap();
    let e = commands::convert(m.to_str().unwrap(), &notes, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an earlier output"), "{e}");
    assert!(notes.join("todo.txt").exists());
    // A failed run leaves the previous output as it was (the model fails to load here).
    std::fs::write(m.join("config.json"), b"{ not json").unwrap();
    assert!(commands::convert(m.to_str().unwrap(), &out, true).is_err());
    assert!(out.join("model.safetensors").exists());
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary siblings left: {left:?}");
}

fn analyze_args(out: &Path, adapter: &Path) -> AnalyzeArgs {
    AnalyzeArgs {
        model: golden("tiny-llama").to_string_lossy().into_owned(),
        adapter: Some(adapter.to_path_buf()),
        out: out.to_path_buf(),
        s: 2,
        bins: 8,
        overwrite: true,
        ..Default::default()
    }
}

#[test]
fn overwrite_never_deletes_the_analyze_inputs() {
    let d = tempfile::tempdir().unwrap();
    let adapter = d.path().join("adapter");
    copy_dir(&golden("tiny-lora"), &adapter);
    for out in [adapter.clone(), d.path().to_path_buf(), adapter.join("x")] {
        let e = analyze_cmd::run(&analyze_args(&out, &adapter))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the --adapter input"), "{e}");
    }
    let e = analyze_cmd::run(&analyze_args(&golden("tiny-llama").join("a"), &adapter))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lies inside the --model input"), "{e}");
    assert!(adapter.join("adapter_model.safetensors").exists());
}

#[test]
fn analyze_bins_zero_is_refused_naming_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let mut a = analyze_args(&d.path().join("out"), &golden("tiny-lora"));
    a.bins = 0;
    let e = analyze_cmd::run(&a).unwrap_err().to_string();
    assert!(e.contains("--bins"), "{e}");
    assert!(!d.path().join("out").exists());
}

// ---- Architectures accepted but not computed; untrusted sizes --------------------------

/// The tiny model's config.json with `edit` applied, in a fresh copy of the model.
fn tiny_with_config(root: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let m = tiny_copy(root);
    let p = m.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    m
}

fn load_err(m: &Path) -> String {
    match lora_dash::io::load_model(m.to_str().unwrap()) {
        Ok(_) => panic!("{} loaded", m.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn qwen2_smollm3_and_sliding_window_mistral_are_refused_by_key() {
    let cases: [(&str, serde_json::Value, &str); 5] = [
        (
            "qwen2",
            serde_json::json!({"model_type": "qwen2"}),
            "`model_type`",
        ),
        (
            "qwen2 class",
            serde_json::json!({"model_type": null, "architectures": ["Qwen2ForCausalLM"]}),
            "`model_type`",
        ),
        (
            "smollm3",
            serde_json::json!({"model_type": "smollm3"}),
            "`no_rope_layers`",
        ),
        (
            "mistral window",
            serde_json::json!({"model_type": "mistral", "sliding_window": 64}),
            "`sliding_window`",
        ),
        (
            "llama with no_rope_layers",
            serde_json::json!({"no_rope_layers": [1, 0]}),
            "`no_rope_layers`",
        ),
    ];
    for (what, patch, needle) in cases {
        let d = tempfile::tempdir().unwrap();
        let m = tiny_with_config(d.path(), |v| {
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
        });
        let e = load_err(&m);
        assert!(e.contains(needle), "{what}: {e}");
    }
}

#[test]
fn mistral_without_an_effective_window_computes_as_llama() {
    let d = tempfile::tempdir().unwrap();
    let base = lora_dash::io::load_model(golden("tiny-llama").to_str().unwrap()).unwrap();
    for window in [
        serde_json::Value::Null,
        serde_json::json!(128),
        serde_json::json!(4096),
    ] {
        let m = tiny_with_config(&d.path().join(window.to_string()), |v| {
            v["model_type"] = "mistral".into();
            v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
            v["sliding_window"] = window.clone();
        });
        let loaded = lora_dash::io::load_model(m.to_str().unwrap()).unwrap();
        assert_eq!(
            loaded.config.resolve().unwrap(),
            base.config.resolve().unwrap()
        );
    }
}

#[test]
fn unknown_architectures_are_refused() {
    for (mt, arch) in [("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel")] {
        let mut c = lora_dash::io::load_model(golden("tiny-llama").to_str().unwrap())
            .unwrap()
            .config;
        c.model_type = Some(mt.into());
        c.architectures = Some(vec![arch.into()]);
        assert!(
            matches!(c.resolve(), Err(Error::UnknownArchitecture(_))),
            "{mt}"
        );
        // A llama model_type with a class that is not a llama causal LM.
        c.model_type = Some("llama".into());
        c.architectures = Some(vec!["LlamaForSequenceClassification".into()]);
        assert!(matches!(c.resolve(), Err(Error::UnknownArchitecture(_))));
    }
}

#[test]
fn huge_sizes_in_config_are_errors_not_aborts() {
    let big: [(&str, serde_json::Value, &str); 7] = [
        (
            "num_hidden_layers",
            1_000_000_000_000u64.into(),
            "num_hidden_layers",
        ),
        (
            "num_hidden_layers",
            1_000_000_000_000_000_000u64.into(),
            "num_hidden_layers",
        ),
        ("num_hidden_layers", 3.into(), "hold 2 layers"),
        (
            "hidden_size",
            1_000_000_000_000_000_000u64.into(),
            "hidden_size",
        ),
        ("vocab_size", u64::MAX.into(), "vocab_size"),
        (
            "intermediate_size",
            1_000_000_000_000u64.into(),
            "num_hidden_layers",
        ),
        ("vocab_size", 385.into(), "vocab_size"),
    ];
    for (key, v, needle) in big {
        let d = tempfile::tempdir().unwrap();
        let m = tiny_with_config(d.path(), |c| c[key] = v.clone());
        let e = load_err(&m);
        assert!(e.contains(needle), "{key}={v}: {e}");
    }
    // Non-finite or non-positive numerics.
    for (key, v) in [("rms_norm_eps", 0.0), ("rope_theta", -1.0)] {
        let d = tempfile::tempdir().unwrap();
        let m = tiny_with_config(d.path(), |c| c[key] = v.into());
        assert!(load_err(&m).contains(key));
    }
}

#[test]
fn checkpoint_tensors_the_model_does_not_use_are_refused() {
    use candle_core::{Device, Tensor};
    let cases: [(&str, Vec<usize>, &str); 3] = [
        (
            "model.layers.0.self_attn.q_proj.bias",
            vec![64],
            "not used by the model (attention_bias is false)",
        ),
        (
            "model.layers.2.input_layernorm.weight",
            vec![64],
            "hold 3 layers",
        ),
        ("score.weight", vec![2, 64], "`score.weight`"),
    ];
    for (name, shape, needle) in cases {
        let d = tempfile::tempdir().unwrap();
        let m = tiny_copy(d.path());
        let st = m.join("model.safetensors");
        let mut w = lora_dash::io::Weights::load_safetensors(&st).unwrap();
        w.insert(
            name,
            Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        w.save_safetensors(&st, None).unwrap();
        let e = load_err(&m);
        assert!(e.contains(needle), "{name}: {e}");
    }
    // A missing lm_head in an untied model is an error, not a silent tie.
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    let st = m.join("model.safetensors");
    let mut w = lora_dash::io::Weights::load_safetensors(&st).unwrap();
    w.remove("lm_head.weight");
    w.save_safetensors(&st, None).unwrap();
    assert!(load_err(&m).contains("lm_head.weight"));
}

// ---- Validation gaps -------------------------------------------------------------------

fn train_args(d: &Path) -> lora_dash::cli::TrainArgs {
    lora_dash::cli::TrainArgs {
        model: Some(golden("tiny-llama").to_string_lossy().into_owned()),
        data: Some(vec![d.join("data.json")]),
        out: Some(d.join("run")),
        ..Default::default()
    }
}

#[test]
fn invalid_numeric_flags_are_refused_with_the_flag_name() {
    let d = tempfile::tempdir().unwrap();
    type Edit = fn(&mut lora_dash::cli::TrainArgs);
    let cases: Vec<(Edit, &str)> = vec![
        (|a| a.adam_eps = Some(0.0), "--adam-eps"),
        (|a| a.adam_eps = Some(-1e-8), "--adam-eps"),
        (|a| a.adam_eps = Some(f64::NAN), "--adam-eps"),
        (|a| a.max_grad_norm = Some(f64::NAN), "--max-grad-norm"),
        (|a| a.max_grad_norm = Some(-1.0), "--max-grad-norm"),
        (|a| a.max_grad_norm = Some(f64::INFINITY), "--max-grad-norm"),
        (|a| a.weight_decay = Some(f64::NAN), "--weight-decay"),
        (|a| a.weight_decay = Some(f64::INFINITY), "--weight-decay"),
        (|a| a.weight_decay = Some(-0.1), "--weight-decay"),
        (|a| a.epochs = Some(f64::NAN), "--epochs"),
        (|a| a.epochs = Some(f64::INFINITY), "--epochs"),
        (|a| a.epochs = Some(1e300), "--epochs"),
        (|a| a.epochs = Some(0.0), "--epochs"),
        (|a| a.lr = Some(f64::NAN), "--lr"),
        (|a| a.lr = Some(0.0), "--lr"),
        (|a| a.beta1 = Some(f64::NAN), "--beta1"),
        (|a| a.beta2 = Some(1.0), "--beta2"),
        (
            |a| {
                a.batch_size = Some(usize::MAX);
                a.grad_accum = Some(2)
            },
            "--grad-accum",
        ),
        (
            |a| {
                a.method = Some("dash".into());
                a.dash_s = Some(0)
            },
            "--dash-s",
        ),
    ];
    for (edit, flag) in cases {
        let mut a = train_args(d.path());
        edit(&mut a);
        let shown = format!("{a:?}");
        let e = a.resolve().unwrap_err().to_string();
        assert!(e.contains(flag), "{flag}: {e}\n{shown}");
    }
    // 0 still disables clipping.
    let mut a = train_args(d.path());
    a.max_grad_norm = Some(0.0);
    assert_eq!(a.resolve().unwrap().max_grad_norm, None);
    assert_eq!(
        train_args(d.path()).resolve().unwrap().max_grad_norm,
        Some(1.0)
    );
}

#[test]
fn errors_quoting_file_content_are_cut_to_a_readable_length() {
    let d = tempfile::tempdir().unwrap();
    let long = "x".repeat(20_000);
    // TOML run config: toml quotes the offending line.
    let toml = d.path().join("run.toml");
    std::fs::write(&toml, format!("lr = {long}\n")).unwrap();
    let mut a = train_args(d.path());
    a.config = Some(toml);
    let e = a.resolve().unwrap_err().to_string();
    assert!(e.len() < 1_000, "{} characters", e.len());
    // config.json with a long string where a number belongs.
    let m = tiny_with_config(d.path(), |c| c["vocab_size"] = long.clone().into());
    let e = load_err(&m);
    assert!(e.contains("column") && e.len() < 1_000, "{e}");
    // An unknown architecture with a very long name.
    let m = tiny_with_config(&d.path().join("b"), |c| {
        c["model_type"] = long.clone().into()
    });
    let loaded = lora_dash::io::load_model(m.to_str().unwrap()).unwrap();
    let e = loaded.config.resolve().unwrap_err().to_string();
    assert!(e.len() < 1_000, "{} characters", e.len());
}
