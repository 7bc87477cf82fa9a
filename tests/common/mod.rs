//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use lora_dash::io::Weights;

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join(name)
}

pub fn load_golden(name: &str) -> Weights {
    Weights::load_safetensors(&golden(name)).expect("golden file")
}

/// Path of the SmolLM2 GGUF when present (env LORA_DASH_SMOLLM2_GGUF, else the cache).
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LORA_DASH_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    let cache = std::env::var("LORA_DASH_CACHE")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("lora-dash"))
        })?;
    let p = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

/// Shared benchmark data directory (`../shared/data` beside the crate), when present.
pub fn shared_data() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared")
        .join("data");
    p.exists().then_some(p)
}

/// Max |a−b| / (|b| + atol-scale) over positions where `keep` (b, t) is 1; prints and returns it.
pub fn max_rel_diff(label: &str, got: &Tensor, want: &Tensor, keep: Option<&Tensor>) -> f32 {
    let g = got.to_dtype(DType::F32).unwrap();
    let w = want.to_dtype(DType::F32).unwrap();
    assert_eq!(g.dims(), w.dims(), "{label}: shape");
    let scale = w
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    let mut diff = (g - &w).unwrap().abs().unwrap();
    if let Some(k) = keep {
        let k = k.to_dtype(DType::F32).unwrap();
        let mut shape = k.dims().to_vec();
        while shape.len() < diff.rank() {
            shape.push(1);
        }
        diff = diff.broadcast_mul(&k.reshape(shape).unwrap()).unwrap();
    }
    let m = diff.max_all().unwrap().to_scalar::<f32>().unwrap() / scale;
    println!("{label}: max |diff| / max |ref| = {m:.3e}");
    m
}
