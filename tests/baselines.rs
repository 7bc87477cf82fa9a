//! PiSSA and MiLoRA end to end (tiny LLaMA and tiny BERT): training, the native adapter,
//! `merge`, the rank-2r PEFT export read back by our PEFT reader, exact resume,
//! `--dash-lr-scale`, and the errors users can run into.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use common::golden;
use lora_dash::cli::commands::{load_with_adapter, merge};
use lora_dash::cli::TrainArgs;
use lora_dash::data::{collate, EncodeOptions, Example, Task};
use lora_dash::io;
use lora_dash::models::{Ctx, HeadSpec, Model};
use lora_dash::train::metrics::read_records;
use lora_dash::train::trainer::train;

const TOL: f32 = 1e-4;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/arithmetic.jsonl")
}

fn tiny() -> String {
    golden("tiny-llama").to_string_lossy().into_owned()
}

fn args(out: &Path, method: &str) -> TrainArgs {
    TrainArgs {
        model: Some(tiny()),
        method: Some(method.into()),
        data: Some(vec![data()]),
        out: Some(out.to_path_buf()),
        rank: Some(4),
        target_modules: Some("q_proj,v_proj,down_proj".into()),
        batch_size: Some(2),
        cutoff_len: Some(48),
        max_steps: Some(4),
        max_records: Some(32),
        lr: Some(5e-3),
        dropout: Some(0.1),
        overwrite: Some(true),
        ..Default::default()
    }
}

fn losses(dir: &Path) -> Vec<(usize, f64)> {
    read_records(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| (r.step, r.loss))
        .collect()
}

fn max_rel(label: &str, got: &Tensor, want: &Tensor) -> f32 {
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    let d = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        / scale;
    println!("{label}: max |diff| / max |ref| = {d:.3e}");
    d
}

fn causal_logits(m: &dyn Model) -> Tensor {
    let ids = Tensor::new(
        &[[1u32, 17, 45, 99, 200, 3, 8, 250]],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    m.as_causal_lm()
        .unwrap()
        .forward(&ids, None, &Ctx::eval())
        .unwrap()
}

fn load_base(dir: &str) -> Box<dyn Model> {
    let l = io::load_model(dir).unwrap();
    lora_dash::models::load(&l, &HeadSpec::CausalLm).unwrap()
}

/// Trains, then: merge's model, the native adapter and the PEFT export on the original base
/// give the same logits; the adapter moved away from its init.
#[test]
fn pissa_and_milora_train_merge_and_export() {
    let d = tempfile::tempdir().unwrap();
    for (method, rslora) in [("pissa", false), ("milora", true)] {
        let out = d.path().join(method);
        let mut a = args(&out, method);
        a.use_rslora = Some(rslora);
        let s = train(&a.resolve().unwrap()).unwrap();
        assert_eq!(s.steps, 4);
        assert_eq!(s.adapted_layers, 6);
        assert!(out.join("pissa_config.json").exists());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("pissa_config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["method"], method);
        let pc = io::peft::PeftConfig::read(&out.join("peft")).unwrap();
        assert_eq!(pc.r, 8);
        let want_alpha = if rslora { 16.0 * 2f64.sqrt() } else { 32.0 };
        assert!(
            (pc.lora_alpha - want_alpha).abs() < 1e-9,
            "{}",
            pc.lora_alpha
        );

        let (_, native) = load_with_adapter(&tiny(), Some(&out), None).unwrap();
        let want = causal_logits(native.as_ref());
        let merged = d.path().join(format!("{method}-merged"));
        merge(&tiny(), &out, &merged, false).unwrap();
        let got = causal_logits(load_base(merged.to_str().unwrap()).as_ref());
        assert!(max_rel(&format!("{method}: merged vs native"), &got, &want) < TOL);
        let (_, exported) = load_with_adapter(&tiny(), Some(&out.join("peft")), None).unwrap();
        let got = causal_logits(exported.as_ref());
        assert!(max_rel(&format!("{method}: PEFT export vs native"), &got, &want) < TOL);
        // Training changed the model (the init alone reproduces the base).
        let base = causal_logits(load_base(&tiny()).as_ref());
        assert!(max_rel(&format!("{method}: trained vs base"), &want, &base) > 1e-4);
        // analyze takes the run, with ΔW relative to the original W: the same directions
        // as the merged model's W* − W.
        let an = d.path().join(format!("{method}-analysis"));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lora-dash"))
            .args(["analyze", "--model", &tiny(), "--s", "4", "--adapter"])
            .arg(&out)
            .arg("--compare-finetuned")
            .arg(&merged)
            .arg("--out")
            .arg(&an)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let a: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(an.join("analysis.json")).unwrap())
                .unwrap();
        assert_eq!(a["source"]["kind"], method);
        let jaccard = a["summary"]["mean_jaccard"].as_f64().unwrap();
        println!("{method}: analyze adapter vs merged model, mean Jaccard of TSD {jaccard}");
        assert_eq!(jaccard, 1.0);
    }
}

/// DoRA: a PEFT adapter with `use_dora` and magnitude vectors in the run directory, whose
/// logits (our PEFT reader) match merge's; resume is exact.
#[test]
fn dora_trains_merges_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full");
    let mut a = args(&full, "dora");
    a.max_steps = Some(5);
    a.save_every = Some(2);
    a.use_rslora = Some(true);
    train(&a.clone().resolve().unwrap()).unwrap();
    let pc = io::peft::PeftConfig::read(&full).unwrap();
    assert!(pc.use_dora);
    let w = io::Weights::load_safetensors(&full.join("adapter_model.safetensors")).unwrap();
    let k = "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector";
    assert_eq!(w.get(k).unwrap().dims(), &[64]);
    let (_, native) = load_with_adapter(&tiny(), Some(&full), None).unwrap();
    let want = causal_logits(native.as_ref());
    let merged = d.path().join("merged");
    merge(&tiny(), &full, &merged, false).unwrap();
    let got = causal_logits(load_base(merged.to_str().unwrap()).as_ref());
    assert!(max_rel("dora: merged vs adapter", &got, &want) < TOL);

    let out = d.path().join("resumed");
    copy_dir(&full, &out);
    a.out = Some(out.clone());
    a.overwrite = Some(false);
    a.resume = Some(out.join("checkpoints").join("step-000004"));
    train(&a.resolve().unwrap()).unwrap();
    assert_eq!(losses(&out), losses(&full));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), p).unwrap();
        }
    }
}

#[test]
fn pissa_resume_matches_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full");
    let mut a = args(&full, "pissa");
    a.max_steps = Some(5);
    a.save_every = Some(2);
    train(&a.clone().resolve().unwrap()).unwrap();
    let out = d.path().join("resumed");
    copy_dir(&full, &out);
    a.out = Some(out.clone());
    a.overwrite = Some(false);
    a.resume = Some(out.join("checkpoints").join("step-000002"));
    train(&a.resolve().unwrap()).unwrap();
    assert_eq!(losses(&out), losses(&full));
    let wa = io::Weights::load_safetensors(&full.join("pissa_adapter.safetensors")).unwrap();
    let wb = io::Weights::load_safetensors(&out.join("pissa_adapter.safetensors")).unwrap();
    for n in wa.names() {
        let (x, y) = (wa.get(n).unwrap(), wb.get(n).unwrap());
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(x, y, "{n}");
    }
}

#[test]
fn bad_settings_are_refused_clearly() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let mut a = args(&out, "milora");
    a.rank = Some(65);
    let e = train(&a.resolve().unwrap()).unwrap_err().to_string();
    println!("{e}");
    assert!(
        e.contains("min(out, in) = 64") && e.contains("q_proj"),
        "{e}"
    );
    let mut a = args(&out, "pissa");
    a.dash_lr_scale = Some(2.0);
    let e = a.resolve().unwrap_err().to_string();
    assert!(e.contains("need --method dash"), "{e}");
    let mut a = args(&out, "dash");
    a.dash_t = Some(2);
    a.dash_lr_scale = Some(0.0);
    let e = a.resolve().unwrap_err().to_string();
    assert!(e.contains("dash-lr-scale"), "{e}");
    let e = args(&out, "pisa").resolve().unwrap_err().to_string();
    assert!(e.contains("pissa, milora"), "{e}");
}

/// `--dash-lr-scale 1` is the default bit for bit; another scale changes only the phase
/// after the switch.
#[test]
fn dash_lr_scale_one_is_the_default() {
    let d = tempfile::tempdir().unwrap();
    let run = |name: &str, scale: Option<f64>| {
        let out = d.path().join(name);
        let mut a = args(&out, "dash");
        a.dropout = Some(0.0);
        a.dash_t = Some(2);
        a.dash_s = Some(2);
        a.dash_lr_scale = scale;
        train(&a.resolve().unwrap()).unwrap();
        losses(&out)
    };
    let base = run("default", None);
    assert_eq!(run("one", Some(1.0)), base);
    let fast = run("fast", Some(50.0));
    assert_eq!(
        fast[..3],
        base[..3],
        "c only trains after the switch at step 2"
    );
    assert_ne!(fast[3], base[3]);
}

/// An RTE-layout file of `n` rows.
fn rte_file(dir: &Path, n: usize) -> PathBuf {
    let mut s = String::from("index\tsentence1\tsentence2\tlabel\n");
    for i in 0..n {
        let (b, label) = if i % 2 == 0 {
            ("the plan passed.", "entailment")
        } else {
            ("nothing happened.", "not_entailment")
        };
        s.push_str(&format!(
            "{i}\tIn {}, the council voted and the plan passed.\t{b}\t{label}\n",
            1990 + i
        ));
    }
    let p = dir.join("rte.tsv");
    std::fs::write(&p, s).unwrap();
    p
}

fn classify(m: &dyn Model, exs: &[Example]) -> Tensor {
    let refs: Vec<&Example> = exs.iter().collect();
    let b = collate(&refs, 0).unwrap();
    m.as_classifier()
        .unwrap()
        .classify(&b, &Ctx::eval())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// PiSSA and DoRA on an encoder with a classification head: the PEFT export (PiSSA's
/// `peft/`, DoRA's run directory) and the merged model give the native adapter's logits.
#[test]
fn pissa_and_dora_on_the_tiny_bert_merge_and_export() {
    let d = tempfile::tempdir().unwrap();
    let data = rte_file(d.path(), 16);
    let bert = golden("tiny-bert").to_string_lossy().into_owned();
    let loaded = io::load_model(&bert).unwrap();
    let exs = Task::parse(Some("rte"))
        .unwrap()
        .load_examples(
            loaded.tokenizer.as_ref().unwrap(),
            std::slice::from_ref(&data),
            EncodeOptions {
                cutoff_len: 32,
                train_on_inputs: true,
            },
        )
        .unwrap();
    for method in ["pissa", "dora"] {
        let out = d.path().join(method);
        let a = TrainArgs {
            model: Some(bert.clone()),
            task: Some("rte".into()),
            method: Some(method.into()),
            data: Some(vec![data.clone()]),
            out: Some(out.clone()),
            rank: Some(4),
            target_modules: Some("query,value,dense".into()),
            batch_size: Some(4),
            cutoff_len: Some(32),
            max_steps: Some(4),
            lr: Some(5e-3),
            overwrite: Some(true),
            ..Default::default()
        };
        train(&a.resolve().unwrap()).unwrap();
        let (_, native) = load_with_adapter(&bert, Some(&out), None).unwrap();
        let want = classify(native.as_ref(), &exs);
        let export = if method == "pissa" {
            out.join("peft")
        } else {
            out.clone()
        };
        let (_, exported) = load_with_adapter(&bert, Some(&export), None).unwrap();
        let got = classify(exported.as_ref(), &exs);
        assert!(
            max_rel(
                &format!("bert {method}: PEFT export vs native"),
                &got,
                &want
            ) < TOL
        );
        let merged = d.path().join(format!("{method}-merged"));
        merge(&bert, &out, &merged, false).unwrap();
        let ml = io::load_model(merged.to_str().unwrap()).unwrap();
        let mm = lora_dash::models::load(&ml, &HeadSpec::Base).unwrap();
        let got = classify(mm.as_ref(), &exs);
        assert!(max_rel(&format!("bert {method}: merged vs native"), &got, &want) < TOL);
    }
}

/// `dash-lr-scale` is a key of the TOML run config too.
#[test]
fn dash_lr_scale_reads_from_toml() {
    let d = tempfile::tempdir().unwrap();
    let toml = d.path().join("run.toml");
    std::fs::write(
        &toml,
        "method = \"dash\"\ndash-t = 2\ndash-lr-scale = 3.5\n",
    )
    .unwrap();
    let mut a = args(&d.path().join("run"), "dash");
    a.method = None;
    a.config = Some(toml);
    let cfg = a.resolve().unwrap();
    assert_eq!(cfg.method.dash().unwrap().lr_scale, 3.5);
}
