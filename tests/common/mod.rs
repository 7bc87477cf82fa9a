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

/// Whether the tests run in CI (`CI=true`): there a missing fixture fails the test.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A fixture the current test needs is missing: in CI the test fails; elsewhere a
/// `SKIPPED` line naming the test goes straight to the terminal (libtest captures only the
/// print macros, and cannot mark a test ignored at run time), and the test returns early.
pub fn missing_fixture(what: &str, hint: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    if in_ci() {
        panic!("{test}: {what} not found ({hint}); fixtures are required when CI=true");
    }
    // One write, so the line does not interleave with libtest's own output.
    use std::io::Write;
    let line = format!("test {test} SKIPPED (passes without running): {what} not found ({hint})\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
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

/// The SmolLM2 GGUF for a test that needs it: None (after [`missing_fixture`]) when absent.
pub fn require_smollm2() -> Option<PathBuf> {
    let p = smollm2_gguf();
    if p.is_none() {
        missing_fixture(
            "the SmolLM2-135M-Instruct GGUF",
            "run ./scripts/fetch-smollm2.sh or set LORA_DASH_SMOLLM2_GGUF",
        );
    }
    p
}

/// The shared benchmark data directory: `LORA_DASH_DATA`, else `../shared/data` beside the
/// crate, when present.
pub fn shared_data() -> Option<PathBuf> {
    let p = match std::env::var_os("LORA_DASH_DATA").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("shared")
            .join("data"),
    };
    p.is_dir().then_some(p)
}

/// The shared data directory for a test that needs it: None (after [`missing_fixture`])
/// when absent.
pub fn require_shared_data() -> Option<PathBuf> {
    let p = shared_data();
    if p.is_none() {
        missing_fixture(
            "the shared data directory",
            "set LORA_DASH_DATA or place it at ../shared/data",
        );
    }
    p
}

/// A file inside the shared data for a test that needs it (same rules).
pub fn require_shared_file(rel: &str) -> Option<PathBuf> {
    let p = require_shared_data()?.join(rel);
    if p.exists() {
        return Some(p);
    }
    missing_fixture(
        &format!("shared data file `{rel}`"),
        "see ../shared/data/README.md",
    );
    None
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

/// An RTE-layout TSV of `n` rows built from a few sentence templates, written as
/// `dir/rte.tsv`.
pub fn rte_file(dir: &std::path::Path, n: usize) -> PathBuf {
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
