//! SmolLM2-135M-Instruct (GGUF Q4_1) against transformers on the same dequantised weights.
//! Runs when the model is present (`./scripts/fetch-smollm2.sh` or LORA_DASH_SMOLLM2_GGUF).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{load_golden, max_rel_diff, require_smollm2};
use lora_dash::io;
use lora_dash::models::Model;
use lora_dash::models::{Ctx, Llama};

fn model() -> Option<(io::LoadedModel, Llama)> {
    let path = require_smollm2()?;
    let loaded = io::load_model(path.to_str().unwrap()).unwrap();
    let m = Llama::load(&loaded.config.resolve().unwrap(), &loaded.weights).unwrap();
    Some((loaded, m))
}

#[test]
fn tokenizer_and_logits_match_transformers() {
    let Some((loaded, m)) = model() else { return };
    let g = load_golden("smollm2_golden.safetensors");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden("smollm2_golden.json")).unwrap(),
    )
    .unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    for (i, t) in meta["texts"].as_array().unwrap().iter().enumerate() {
        let want: Vec<u32> = g
            .get(&format!("ids_{i}"))
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_eq!(
            tok.encode(t["text"].as_str().unwrap()).unwrap(),
            want,
            "text {i}"
        );
    }
    let ids = g
        .get("ids_2")
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = m
        .forward(&ids, None, &Ctx::eval())
        .unwrap()
        .squeeze(0)
        .unwrap(); // (t, v)
    let t = logits.dims()[0];
    let head = logits.narrow(1, 0, 1024).unwrap();
    assert!(
        max_rel_diff(
            "logits[:, :1024]",
            &head,
            g.get("alpaca_logits_head").unwrap(),
            None
        ) < 1e-4
    );
    let last = logits.get(t - 1).unwrap();
    assert!(
        max_rel_diff(
            "last position, all 49152",
            &last,
            g.get("alpaca_logits_last").unwrap(),
            None
        ) < 1e-4
    );
    let argmax: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
    let want: Vec<u32> = g
        .get("alpaca_argmax")
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    assert_eq!(argmax, want);
}

/// δ from an f32 thin SVD and two thin products equals the naive f64 computation (full SVD,
/// dense ΔW) on a real weight; the top-8 sets agree.
#[test]
fn selection_matches_naive_f64_on_real_weights() {
    let Some((_, m)) = model() else { return };
    let l = m
        .linears()
        .into_iter()
        .find(|l| l.path == "model.layers.3.self_attn.q_proj")
        .unwrap();
    let (o, i) = (l.out_dim(), l.in_dim());
    let mut rng = lora_dash::rng::Rng::new(1);
    let a = Tensor::from_vec(rng.uniform_vec(8 * i, -0.05, 0.05), (8, i), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(rng.uniform_vec(o * 8, -0.05, 0.05), (o, 8), &Device::Cpu).unwrap();
    let svd = lora_dash::tsd::svd::thin_svd(&l.weight, 2).unwrap();
    let fast =
        lora_dash::tsd::select::change_rates(&svd.u, &svd.sigma, &svd.v, &a, &b, 2.0).unwrap();

    // Naive reference in f64: dense ΔW and faer's full SVD.
    let w: Vec<f32> = l.weight.flatten_all().unwrap().to_vec1().unwrap();
    let dw: Vec<f32> = (b.matmul(&a).unwrap() * 2.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let wm = faer::Mat::<f64>::from_fn(o, i, |r, c| w[r * i + c] as f64);
    let dm = faer::Mat::<f64>::from_fn(o, i, |r, c| dw[r * i + c] as f64);
    let full = wm.svd().unwrap();
    let (u, s, v) = (full.U(), full.S(), full.V());
    let k = o.min(i);
    let naive: Vec<f64> = (0..k)
        .map(|j| {
            let uj = u.col(j);
            let vj = v.col(j);
            let mut acc = 0f64;
            for r in 0..o {
                let mut row = 0f64;
                for c in 0..i {
                    row += dm[(r, c)] * vj[c];
                }
                acc += uj[r] * row;
            }
            acc.abs() / s[j]
        })
        .collect();
    let top = naive.iter().cloned().fold(0f64, f64::max);
    let worst = fast
        .iter()
        .zip(&naive)
        .map(|(a, b)| (*a as f64 - b).abs() / top)
        .fold(0f64, f64::max);
    println!("q_proj layer 3: max |δ_fast − δ_naive| / max δ = {worst:.2e}");
    assert!(worst < 1e-3);
    let sig32: Vec<f32> = (0..k).map(|j| s[j] as f32).collect();
    let naive32: Vec<f32> = naive.iter().map(|&x| x as f32).collect();
    let mut a_top = lora_dash::tsd::select::top_s(&fast, &svd.sigma, 8);
    let mut b_top = lora_dash::tsd::select::top_s(&naive32, &sig32, 8);
    a_top.sort();
    b_top.sort();
    assert_eq!(a_top, b_top);
}
