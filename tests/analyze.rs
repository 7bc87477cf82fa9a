//! The `analyze` study on the tiny model: δ against a naive f64 reference (full SVD of W in
//! f64, dense ΔW read straight from the files) for a PEFT LoRA adapter, a LoRA-Dash adapter
//! and a fine-tuned model directory; the output directory and its figures; bad inputs.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::golden;
use lora_dash::adapters::TargetModules;
use lora_dash::cli::analyze_cmd::{run, AnalyzeArgs};
use lora_dash::io::{self, Weights};
use lora_dash::models::Llama;
use lora_dash::models::Model;
use lora_dash::rng::Rng;
use lora_dash::tsd::analysis::{analyze, load_deltas, DeltaSource, LayerDelta};
use lora_dash::tsd::select::top_s;
use lora_dash::tsd::svd::SvdCache;
use lora_dash::Error;

fn tiny_path() -> String {
    golden("tiny-llama").to_string_lossy().into_owned()
}

fn tiny() -> (io::LoadedModel, Llama) {
    let loaded = io::load_model(&tiny_path()).unwrap();
    let m = Llama::load(&loaded.config.resolve().unwrap(), &loaded.weights).unwrap();
    (loaded, m)
}

/// Writes tiny-llama with W + ΔW (ΔW uniform in ±amp) on the `targets` layers to `dir`.
fn make_finetuned(dir: &Path, targets: &str, seed: u64, amp: f32) {
    let (loaded, mut m) = tiny();
    m.inject_full(&TargetModules::parse(targets).unwrap())
        .unwrap();
    let mut rng = Rng::new(seed);
    for (_, v) in m.trainable_vars() {
        let t = Tensor::from_vec(
            rng.uniform_vec(v.elem_count(), -amp, amp),
            v.dims(),
            &Device::Cpu,
        )
        .unwrap();
        v.set(&t).unwrap();
    }
    io::hf::write_hf_dir(&loaded, &m.base_weights(true).unwrap(), dir, true).unwrap();
}

fn to_f64(t: &Tensor) -> faer::Mat<f64> {
    let (o, i) = t.dims2().unwrap();
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    faer::Mat::<f64>::from_fn(o, i, |r, c| v[r * i + c] as f64)
}

/// δ_j = |u_jᵀ ΔW v_j| / σ_j from faer's full f64 SVD of W, with ΔW dense; also σ.
fn naive_rates(w: &faer::Mat<f64>, dw: &faer::Mat<f64>) -> (Vec<f64>, Vec<f64>) {
    let (o, i) = (w.nrows(), w.ncols());
    let svd = w.svd().unwrap();
    let (u, s, v) = (svd.U(), svd.S(), svd.V());
    let k = o.min(i);
    let delta = (0..k)
        .map(|j| {
            let mut acc = 0f64;
            for r in 0..o {
                let mut row = 0f64;
                for c in 0..i {
                    row += dw[(r, c)] * v[(c, j)];
                }
                acc += u[(r, j)] * row;
            }
            acc.abs() / s[j]
        })
        .collect();
    (delta, (0..k).map(|j| s[j]).collect())
}

/// Checks `got` δ against the reference: max error relative to the largest δ, and the top-s
/// set whenever the reference separates the s-th and (s+1)-th δ clearly.
fn check_layer(label: &str, got: &[f32], want: &[f64], sigma: &[f64], s: usize) -> f64 {
    assert_eq!(got.len(), want.len(), "{label}: k");
    let top = want.iter().cloned().fold(0f64, f64::max);
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - b).abs() / top)
        .fold(0f64, f64::max);
    // f32 SVD and products against f64: ~1e-4 of the largest δ on these matrices.
    assert!(
        worst < 5e-4,
        "{label}: max |δ − δ_ref| / max δ = {worst:.2e}"
    );
    let mut sorted = want.to_vec();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    if sorted[s - 1] - sorted[s] > 1e-3 * top {
        let w32: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        let s32: Vec<f32> = sigma.iter().map(|&x| x as f32).collect();
        let mut a = top_s(got, &s32, s);
        let mut b = top_s(&w32, &s32, s);
        a.sort();
        b.sort();
        assert_eq!(a, b, "{label}: top-{s}");
    }
    worst
}

#[test]
fn lora_and_dash_deltas_match_naive_f64_reference() {
    let (loaded, base) = tiny();
    let s = 4;
    for (dir, scale) in [("tiny-lora", Some(2.0)), ("tiny-dash", None)] {
        let src = load_deltas(&loaded, &DeltaSource::Adapter(golden(dir))).unwrap();
        assert_eq!(src.layers.len(), 14, "{dir}");
        let (a, sp) = analyze("tiny", &base, &src, None, s, &SvdCache::disabled(), None).unwrap();
        let mut worst = 0f64;
        for (name, d) in &src.layers {
            let w = to_f64(
                &loaded
                    .weights
                    .get(&format!("{name}.weight"))
                    .unwrap()
                    .clone(),
            );
            // The reference ΔW comes from the adapter files, not from the loader under test.
            let dw = match scale {
                Some(scale) => {
                    let f =
                        Weights::load_safetensors(&golden(dir).join("adapter_model.safetensors"))
                            .unwrap();
                    let key = |t: &str| format!("base_model.model.{name}.{t}");
                    let la = to_f64(f.get(&key("lora_A.weight")).unwrap());
                    let lb = to_f64(f.get(&key("lora_B.weight")).unwrap());
                    let mut p = &lb * &la;
                    p *= faer::Scale(scale);
                    p
                }
                None => {
                    let f =
                        Weights::load_safetensors(&golden(dir).join("dash_adapter.safetensors"))
                            .unwrap();
                    let key = |t: &str| format!("base_model.model.{name}.{t}");
                    let la = to_f64(f.get(&key("lora_A.weight")).unwrap());
                    let lb = to_f64(f.get(&key("lora_B.weight")).unwrap());
                    let u = to_f64(f.get(&key("dash_U")).unwrap());
                    let v = to_f64(f.get(&key("dash_V")).unwrap());
                    let c: Vec<f32> = f.get(&key("dash_c")).unwrap().to_vec1().unwrap();
                    let mut p = &lb * &la;
                    p *= faer::Scale(2.0); // lora_alpha 8 / r 4
                    let uc = faer::Mat::<f64>::from_fn(u.nrows(), u.ncols(), |r, j| {
                        u[(r, j)] * c[j] as f64
                    });
                    p + &uc * v.transpose()
                }
            };
            assert!(
                matches!(d, LayerDelta::LowRank { .. }),
                "{dir}: adapters stay low-rank"
            );
            let (want, sigma) = naive_rates(&w, &dw);
            worst = worst.max(check_layer(
                &format!("{dir} {name}"),
                &sp.delta[name],
                &want,
                &sigma,
                s,
            ));
            let rec = a.layers.iter().find(|l| &l.layer == name).unwrap();
            assert_eq!(rec.source.indices.len(), s);
            assert!(rec.source.concentration > 0.0 && rec.source.concentration <= 1.0);
        }
        println!("{dir}: max over 14 layers of |δ − δ_ref| / max δ = {worst:.2e}");
    }
}

#[test]
fn finetuned_delta_matches_naive_f64_reference_and_skips_unchanged_layers() {
    let d = tempfile::tempdir().unwrap();
    let ft = d.path().join("ft");
    make_finetuned(&ft, "q_proj,down_proj", 7, 0.02);
    let (loaded, base) = tiny();
    let src = load_deltas(
        &loaded,
        &DeltaSource::Finetuned(ft.to_string_lossy().into_owned()),
    )
    .unwrap();
    let names: Vec<&str> = src.layers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.down_proj"
        ]
    );
    let (_, sp) = analyze("tiny", &base, &src, None, 5, &SvdCache::disabled(), None).unwrap();
    let tuned = Weights::load_safetensors(&ft.join("model.safetensors")).unwrap();
    let mut worst = 0f64;
    for name in names {
        let key = format!("{name}.weight");
        let w = to_f64(loaded.weights.get(&key).unwrap());
        let dw = to_f64(tuned.get(&key).unwrap()) - &w;
        let (want, sigma) = naive_rates(&w, &dw);
        worst = worst.max(check_layer(name, &sp.delta[name], &want, &sigma, 5));
    }
    println!("finetuned: max |δ − δ_ref| / max δ = {worst:.2e}");
}

fn args(out: &Path) -> AnalyzeArgs {
    AnalyzeArgs {
        model: tiny_path(),
        out: out.to_path_buf(),
        s: 4,
        bins: 16,
        ..Default::default()
    }
}

fn png_ok(p: &Path) -> usize {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
    assert_eq!(&b[b.len() - 8..b.len() - 4], b"IEND", "{}", p.display());
    b.len()
}

#[test]
fn cli_writes_json_csv_spectra_and_plots() {
    let d = tempfile::tempdir().unwrap();
    let ft = d.path().join("ft");
    make_finetuned(&ft, "q_proj,v_proj,up_proj", 3, 0.05);
    let out = d.path().join("study");
    let mut a = args(&out);
    a.adapter = Some(golden("tiny-lora"));
    a.compare_finetuned = Some(ft.to_string_lossy().into_owned());
    a.plot_layers = Some(r"layers\.1\.".into());
    let res = run(&a).unwrap();
    // tiny-lora adapts all 7 linears of both blocks; the fine-tune changed 3 of them per block.
    assert_eq!(res.layers.len(), 6);
    assert_eq!(res.unmatched_layers.len(), 8);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("analysis.json")).unwrap()).unwrap();
    assert_eq!(json["layers"].as_array().unwrap().len(), 6);
    for key in [
        "mean_overlap",
        "mean_jaccard",
        "mean_spearman",
        "mean_spearman_projection",
        "chance_overlap",
        "mean_null_concentration",
    ] {
        assert!(
            json["summary"][key].is_number(),
            "{key}: {}",
            json["summary"]
        );
    }
    let csv = std::fs::read_to_string(out.join("layers.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 7);
    let ncol = lines[0].split(',').count();
    assert!(lines.iter().all(|l| l.split(',').count() == ncol), "{csv}");
    let spectra = Weights::load_safetensors(&out.join("spectra.safetensors")).unwrap();
    assert_eq!(spectra.len(), 18);
    let mut sizes = Vec::new();
    for name in ["tsd_heatmap.png", "compare_tsd_heatmap.png", "overlap.png"] {
        sizes.push((name.to_string(), png_ok(&out.join(name))));
    }
    let deltas: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("delta_")
        })
        .collect();
    assert_eq!(deltas.len(), 3, "{deltas:?}");
    for p in &deltas {
        assert!(p.to_string_lossy().contains("layers.1."));
        sizes.push((
            p.file_name().unwrap().to_string_lossy().into_owned(),
            png_ok(p),
        ));
    }
    println!("figures (bytes): {sizes:?}");
    assert!(sizes.iter().all(|(_, n)| *n > 3000), "{sizes:?}");

    // An existing output is refused without --overwrite and replaced with it.
    assert!(matches!(run(&a), Err(Error::OutputExists(_))));
    a.overwrite = true;
    a.plot_layers = None;
    run(&a).unwrap();
}

#[test]
fn a_source_agrees_perfectly_with_itself() {
    let d = tempfile::tempdir().unwrap();
    let mut a = args(&d.path().join("self"));
    a.adapter = Some(golden("tiny-lora"));
    a.compare_adapter = Some(golden("tiny-lora"));
    let res = run(&a).unwrap();
    let s = &res.summary;
    println!(
        "self-comparison: overlap {:?} jaccard {:?} spearman {:?}",
        s.mean_overlap, s.mean_jaccard, s.mean_spearman
    );
    assert_eq!(s.mean_overlap, Some(1.0));
    assert_eq!(s.mean_jaccard, Some(1.0));
    assert!((s.mean_spearman.unwrap() - 1.0).abs() < 1e-12);
    assert!((s.mean_spearman_projection.unwrap() - 1.0).abs() < 1e-12);
    assert_eq!(
        s.source.mean_null_overlap,
        s.compare.as_ref().unwrap().mean_null_overlap
    );
}

fn err_text(a: &AnalyzeArgs) -> String {
    let e = run(a).expect_err("must fail").to_string();
    println!("error: {e}");
    e
}

#[test]
fn bad_inputs_fail_clearly() {
    let d = tempfile::tempdir().unwrap();
    let (loaded, _) = tiny();

    // A PEFT adapter whose A does not fit the layer (adapter for another base).
    let bad = d.path().join("bad-lora");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(
        golden("tiny-lora/adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let mut w = Weights::new(None);
    w.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    w.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        Tensor::zeros((64, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    w.save_safetensors(&bad.join("adapter_model.safetensors"), None)
        .unwrap();
    let mut a = args(&d.path().join("o1"));
    a.adapter = Some(bad);
    assert!(err_text(&a).contains("q_proj.lora_A.weight"));

    // A LoRA-Dash adapter on a base whose weights differ (hash check).
    let other = d.path().join("other-base");
    make_finetuned(&other, "q_proj", 1, 0.01);
    let mut a = args(&d.path().join("o2"));
    a.model = other.to_string_lossy().into_owned();
    a.adapter = Some(golden("tiny-dash"));
    assert!(err_text(&a).contains("hash mismatch"));

    // A fine-tuned model with a tensor of another shape: the tensor is named.
    let mis = d.path().join("mismatch");
    let mut weights = loaded.weights.clone();
    let q = "model.layers.1.self_attn.k_proj.weight";
    weights.insert(
        q,
        Tensor::zeros((16, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    io::hf::write_hf_dir(&loaded, &weights, &mis, false).unwrap();
    let mut a = args(&d.path().join("o3"));
    a.finetuned = Some(mis.to_string_lossy().into_owned());
    assert!(err_text(&a).contains(q));

    // Sources with no changed layer in common, and a "fine-tune" identical to the base.
    let head = d.path().join("head-only");
    make_finetuned(&head, "lm_head", 2, 0.01);
    let mut a = args(&d.path().join("o4"));
    a.adapter = Some(golden("tiny-lora"));
    a.compare_finetuned = Some(head.to_string_lossy().into_owned());
    assert!(err_text(&a).contains("no layer in common"));
    let mut a = args(&d.path().join("o5"));
    a.finetuned = Some(tiny_path());
    assert!(err_text(&a).contains("changes no linear layer"));

    // Option errors: s beyond min(out, in), both sources, none, a plot regex matching nothing.
    let mut a = args(&d.path().join("o6"));
    a.adapter = Some(golden("tiny-lora"));
    a.s = 33;
    assert!(err_text(&a).contains("exceeds min(out, in) = 32"));
    a.s = 4;
    a.finetuned = Some(tiny_path());
    assert!(err_text(&a).contains("not both"));
    a.finetuned = None;
    a.plot_layers = Some("nothing_like_this".into());
    assert!(err_text(&a).contains("plot_layers"));
    a.plot_layers = Some("(".into());
    assert!(err_text(&a).contains("invalid regex"));
    let mut a = args(&d.path().join("o7"));
    a.adapter = Some(d.path().join("missing"));
    err_text(&a);
    assert!(
        !d.path().join("o1").exists() && !d.path().join("o6").exists(),
        "failed runs leave no output"
    );
}
