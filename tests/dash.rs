//! LoRA-Dash end to end on the tiny model: the switch, resume, s = 0, the gradient of c,
//! merge and the rank-(r+s) export, and the errors users can run into.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::golden;
use lora_dash::adapters::{Adapter, DashLayer, LoraConfig, TargetModules};
use lora_dash::cli::TrainArgs;
use lora_dash::io;
use lora_dash::models::Model;
use lora_dash::models::{Ctx, Llama};
use lora_dash::train::metrics::read_records;
use lora_dash::train::trainer::train;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/arithmetic.jsonl")
}

fn args(out: &Path) -> TrainArgs {
    TrainArgs {
        model: Some(golden("tiny-llama").to_string_lossy().into_owned()),
        data: Some(vec![data()]),
        out: Some(out.to_path_buf()),
        rank: Some(4),
        target_modules: Some("all-linear".into()),
        batch_size: Some(2),
        cutoff_len: Some(48),
        max_steps: Some(6),
        max_records: Some(64),
        lr: Some(5e-3),
        overwrite: Some(true),
        ..Default::default()
    }
}

fn dash(mut a: TrainArgs, t: usize, s: usize) -> TrainArgs {
    a.method = Some("dash".into());
    a.dash_t = Some(t);
    a.dash_s = Some(s);
    a
}

fn losses(dir: &Path) -> Vec<(usize, f64)> {
    read_records(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| (r.step, r.loss))
        .collect()
}

fn tiny() -> Llama {
    let loaded = io::load_model(golden("tiny-llama").to_str().unwrap()).unwrap();
    Llama::load(&loaded.config.resolve().unwrap(), &loaded.weights).unwrap()
}

#[test]
fn s_zero_is_exactly_lora() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("lora"), d.path().join("dash"));
    train(&args(&a).resolve().unwrap()).unwrap();
    // `--dash-s 0` is refused as a flag; a config built in code may still ask for it.
    let mut cfg = dash(args(&b), 3, 1).resolve().unwrap();
    if let lora_dash::train::config::Method::Dash(d) = &mut cfg.method {
        d.s = 0;
    }
    train(&cfg).unwrap();
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb, "s = 0 must reproduce the LoRA run bit for bit");
}

#[test]
fn switch_happens_at_step_t_with_accumulation_and_writes_outputs() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let mut a = dash(args(&out), 3, 2);
    a.grad_accum = Some(2);
    a.max_steps = Some(5);
    train(&a.resolve().unwrap()).unwrap();
    let recs = read_records(&out.join("metrics.jsonl")).unwrap();
    let switched: Vec<usize> = recs
        .iter()
        .filter(|r| r.extra.contains_key("dash_switch"))
        .map(|r| r.step)
        .collect();
    assert_eq!(
        switched,
        vec![3],
        "switch must happen once, after optimizer step t"
    );
    let tsd: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tsd.json")).unwrap()).unwrap();
    let layers = tsd["layers"].as_object().unwrap();
    assert_eq!(layers.len(), 14);
    for (name, l) in layers {
        let idx = l["indices"].as_array().unwrap();
        assert_eq!(idx.len(), 2, "{name}");
        for key in ["sigma", "delta", "percentile"] {
            assert_eq!(l[key].as_array().unwrap().len(), 2, "{name}.{key}");
        }
        let delta: Vec<f64> = l["delta"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(delta[0] >= delta[1] && delta[1] > 0.0, "{name}: {delta:?}");
    }
    // The snapshot at the switch is a PEFT adapter; the export has rank r + s, scale 1.
    assert!(out.join("switch/adapter_model.safetensors").exists());
    let export: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("peft/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(export["r"], 6);
    assert_eq!(export["lora_alpha"].as_f64(), Some(6.0));
    assert!(out.join("dash_config.json").exists() && out.join("dash_adapter.safetensors").exists());

    // The switch snapshot reproduces the recorded δ of the selected directions.
    let mut m = tiny();
    io::peft::load_lora(&mut m, &out.join("switch")).unwrap();
    let l = m
        .linears()
        .into_iter()
        .find(|l| l.path == "model.layers.1.mlp.down_proj")
        .unwrap();
    let lora = l.adapter.as_ref().unwrap().as_lora().unwrap();
    let svd = lora_dash::tsd::svd::thin_svd(&l.weight, 1).unwrap();
    let delta = lora_dash::tsd::select::change_rates(
        &svd.u,
        &svd.sigma,
        &svd.v,
        lora.a.as_tensor(),
        lora.b.as_tensor(),
        lora.scale,
    )
    .unwrap();
    let rec = &layers["model.layers.1.mlp.down_proj"];
    let idx: Vec<usize> = rec["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(lora_dash::tsd::select::top_s(&delta, &svd.sigma, 2), idx);
}

#[test]
fn resume_before_and_after_the_switch_matches_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full");
    let mut a = dash(args(&full), 3, 2);
    a.save_every = Some(2);
    a.dropout = Some(0.1);
    train(&a.clone().resolve().unwrap()).unwrap();
    let want = losses(&full);
    for ck in ["step-000002", "step-000004"] {
        let out = d.path().join(format!("resumed-{ck}"));
        // Continue in a copy of the run directory so the metrics log carries over.
        copy_dir(&full, &out);
        let mut r = a.clone();
        r.out = Some(out.clone());
        r.overwrite = Some(false);
        r.resume = Some(out.join("checkpoints").join(ck));
        train(&r.resolve().unwrap()).unwrap();
        assert_eq!(losses(&out), want, "resumed from {ck}");
    }
    // Plain LoRA resumes exactly too.
    let lora_full = d.path().join("lora-full");
    let mut l = args(&lora_full);
    l.save_every = Some(3);
    train(&l.clone().resolve().unwrap()).unwrap();
    let out = d.path().join("lora-resumed");
    copy_dir(&lora_full, &out);
    l.out = Some(out.clone());
    l.resume = Some(out.clone());
    train(&l.resolve().unwrap()).unwrap();
    assert_eq!(losses(&out), losses(&lora_full));
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

/// A tiny model whose every linear layer carries a Dash adapter with non-zero A, B and c.
fn dashed_model(s: usize) -> Llama {
    let mut m = tiny();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: TargetModules::parse("all-linear").unwrap(),
    };
    m.inject_lora(&cfg, 5).unwrap();
    let mut rng = lora_dash::rng::Rng::new(9);
    for l in m.linears_mut() {
        let Some(Adapter::Lora(lora)) = l.adapter.take() else {
            continue;
        };
        let b = Tensor::from_vec(
            rng.uniform_vec(lora.b.elem_count(), -0.3, 0.3),
            lora.b.dims(),
            &Device::Cpu,
        )
        .unwrap();
        lora.b.set(&b).unwrap();
        let svd = lora_dash::tsd::svd::thin_svd(&l.weight, 1).unwrap();
        let idx: Vec<usize> = (0..s).map(|i| 3 * i + 1).collect();
        let (u, v) = svd.columns(&idx).unwrap();
        let d = DashLayer::new(lora, u, v, idx, false).unwrap();
        d.c.set(&Tensor::from_vec(rng.uniform_vec(s, -0.5, 0.5), s, &Device::Cpu).unwrap())
            .unwrap();
        l.adapter = Some(Adapter::Dash(d));
    }
    m
}

fn batch() -> (Tensor, Tensor, Tensor) {
    let g = common::load_golden("tiny_logits.safetensors");
    let ids = g.get("input_ids").unwrap().to_dtype(DType::U32).unwrap();
    let mask = g
        .get("attention_mask")
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let lab = g.get("input_ids").unwrap().to_dtype(DType::I64).unwrap();
    let (b, t) = lab.dims2().unwrap();
    let pad = Tensor::full(-100i64, (b, 1), &Device::Cpu).unwrap();
    let shifted = Tensor::cat(&[&lab.narrow(1, 1, t - 1).unwrap(), &pad], 1).unwrap();
    // Ignore targets at padded positions.
    let keep = mask.narrow(1, 1, t - 1).unwrap();
    let keep = Tensor::cat(
        &[
            &keep,
            &Tensor::zeros((b, 1), DType::F32, &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let shifted = keep
        .ge(0.5)
        .unwrap()
        .where_cond(
            &shifted,
            &Tensor::full(-100i64, (b, t), &Device::Cpu).unwrap(),
        )
        .unwrap();
    (ids, mask, shifted)
}

#[test]
fn gradient_of_c_matches_finite_differences() {
    let m = dashed_model(3);
    let (ids, mask, labels) = batch();
    let ctx = Ctx::eval();
    let l = m
        .linears()
        .into_iter()
        .find(|l| l.path == "model.layers.0.mlp.up_proj")
        .unwrap();
    let c = l.adapter.as_ref().unwrap().as_dash().unwrap().c.clone();
    let loss = m.loss(&ids, &mask, &labels, &ctx).unwrap();
    let grad: Vec<f32> = loss
        .backward()
        .unwrap()
        .get(c.as_tensor())
        .expect("c has a gradient")
        .to_vec1()
        .unwrap();
    let c0: Vec<f32> = c.as_tensor().to_vec1().unwrap();
    let eps = 1e-2f32;
    for i in 0..c0.len() {
        let f = |delta: f32| {
            let mut v = c0.clone();
            v[i] += delta;
            c.set(&Tensor::from_vec(v, c0.len(), &Device::Cpu).unwrap())
                .unwrap();
            m.loss(&ids, &mask, &labels, &ctx)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let fd = (f(eps) - f(-eps)) / (2.0 * eps as f64);
        let rel = (fd - grad[i] as f64).abs() / fd.abs().max(1e-3);
        println!(
            "c[{i}]: analytic {} finite-difference {fd:.6} rel {rel:.2e}",
            grad[i]
        );
        assert!(rel < 2e-2, "c[{i}]: {} vs {fd}", grad[i]);
    }
}

#[test]
fn merged_forward_and_rank_r_plus_s_export_reproduce_the_dash_layers() {
    let mut m = dashed_model(3);
    let (ids, mask, _) = batch();
    let ctx = Ctx::eval();
    let want = m.forward(&ids, Some(&mask), &ctx).unwrap();
    let keep = Some(&mask);

    let d = tempfile::tempdir().unwrap();
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: TargetModules::parse("all-linear").unwrap(),
    };
    io::dash::save_peft_export(&m, &lora, 3, None, d.path()).unwrap();
    let mut e = tiny();
    let cfg = io::peft::load_lora(&mut e, d.path()).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha), (7, 7.0));
    let got = e.forward(&ids, Some(&mask), &ctx).unwrap();
    assert!(common::max_rel_diff("export vs dash", &got, &want, keep) < 1e-5);

    // Native adapter round trip.
    let nd = d.path().join("native");
    std::fs::create_dir(&nd).unwrap();
    io::dash::save_native(&m, &lora, 100, 3, false, None, &nd).unwrap();
    let mut n = tiny();
    io::dash::load_native(&mut n, &nd).unwrap();
    let got = n.forward(&ids, Some(&mask), &ctx).unwrap();
    assert!(common::max_rel_diff("native round trip", &got, &want, keep) < 1e-6);

    m.merge_adapters().unwrap();
    let merged = m.forward(&ids, Some(&mask), &ctx).unwrap();
    assert!(common::max_rel_diff("merged vs unmerged", &merged, &want, keep) < 1e-5);
}

#[test]
fn bad_dash_settings_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let err = dash(args(&d.path().join("a")), 0, 2)
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(err.contains("dash_t"), "{err}");
    let err = dash(args(&d.path().join("b")), 6, 2)
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(err.contains("dash_t") && err.contains('6'), "{err}");
    // k_proj is 32 x 64: at most 32 directions.
    let err = train(&dash(args(&d.path().join("c")), 2, 33).resolve().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("dash_s") && err.contains("k_proj"), "{err}");
    let mut a = args(&d.path().join("e"));
    a.dash_s = Some(3);
    let err = a.resolve().unwrap_err().to_string();
    assert!(err.contains("--method dash"), "{err}");

    // A Dash adapter refuses a base whose weights differ from the one it was trained on.
    let m = dashed_model(2);
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: TargetModules::parse("all-linear").unwrap(),
    };
    io::dash::save_native(&m, &lora, 100, 2, false, None, d.path()).unwrap();
    let loaded = io::load_model(golden("tiny-llama").to_str().unwrap()).unwrap();
    let mut w = loaded.weights.clone();
    let name = "model.layers.1.self_attn.o_proj.weight";
    w.insert(name, (w.get(name).unwrap() * 1.01).unwrap());
    let mut other = Llama::load(&loaded.config.resolve().unwrap(), &w).unwrap();
    let err = io::dash::load_native(&mut other, d.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hash mismatch") && err.contains("o_proj"),
        "{err}"
    );
}
