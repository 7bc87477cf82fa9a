//! Bounded mutation fuzzing of every parser that reads user files, on stable Rust: a
//! deterministic generator mutates valid seed files (bit flips, boundary bytes, u32/u64
//! extremes, truncation, length-field inflation, splices, and structural edits of JSON and
//! GGUF metadata), and each parser must return `Ok` or `Err`, never panic (arithmetic
//! overflow checks are on in test builds, so an overflow counts as a crash).
//!
//! Budget per target: `LORA_DASH_FUZZ_SECS` seconds (default 5) and at most
//! `LORA_DASH_FUZZ_ITERS` inputs (default 200000); `LORA_DASH_FUZZ_SEED` changes the stream.
//! An input that panics is saved under `<target>/tmp/fuzz-crashes/` and fails the test; once
//! fixed, it becomes a regression test in `tests/hardening.rs` or next to the parser.

mod common;
mod fuzz_support;

use std::path::{Path, PathBuf};

use fuzz_support::*;
use lora_dash::io::gguf::Metadata;
use lora_dash::rng::Rng;
use serde_json::Value;

#[test]
fn harness_catches_and_saves_panics() {
    let mut make = |rng: &mut Rng| vec![rng.below(4) as u8];
    let (iters, crashes) = run_fuzz(
        "selftest",
        (60, 40),
        &mut make,
        &|b: &Vec<u8>| b.clone(),
        &|b: &Vec<u8>| {
            assert!(b[0] != 0, "planted panic");
            true
        },
    );
    assert!(iters == 40 && !crashes.is_empty());
    assert_eq!(std::fs::read(&crashes[0]).unwrap(), [0]);
}

// ---- Targets ----------------------------------------------------------------------------

#[test]
fn fuzz_safetensors_header() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.safetensors");
    let seeds = vec![
        std::fs::read(common::golden("tiny-lora/adapter_model.safetensors")).unwrap(),
        std::fs::read(common::golden("tiny-dash/dash_adapter.safetensors")).unwrap(),
    ];
    fuzz("safetensors", &seeds, 2048, |b| {
        std::fs::write(&p, b).unwrap();
        match lora_dash::io::Weights::load_safetensors(&p) {
            Ok(w) => {
                let _ = w.check_finite();
                true
            }
            Err(_) => false,
        }
    });
}

#[test]
fn fuzz_gguf_reader() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.gguf");
    let (meta, tensors) = tiny_gguf_parts();
    let seed = write_gguf(&meta, &tensors);
    let load = |b: &[u8]| {
        std::fs::write(&p, b).unwrap();
        let opened = lora_dash::io::gguf::GgufFile::open(&p).is_ok();
        lora_dash::io::gguf::load(&p).is_ok() && opened
    };
    assert!(load(&seed), "the seed GGUF loads");
    let keys: Vec<String> = meta.iter().map(|(k, _)| k.clone()).collect();
    let focus = seed.len() - 600; // header and metadata, most of the file
    fuzz_bytes(
        "gguf",
        |rng| {
            if rng.below(2) == 0 {
                return mutate(rng, &seed, &[], focus);
            }
            // Structural: metadata values and tensor infos changed, then written properly.
            let (mut m, mut t) = (meta.clone(), tensors.clone());
            for _ in 0..1 + rng.below(3) {
                if rng.below(2) == 0 {
                    let mut map: Metadata = m.iter().cloned().collect();
                    mutate_meta(rng, &mut map, &keys);
                    m = map.into_iter().collect();
                } else {
                    mutate_tensor(rng, &mut t);
                }
            }
            write_gguf(&m, &t)
        },
        load,
    );
}

#[test]
fn fuzz_gguf_tokenizer_metadata() {
    let base = tiny_tokenizer_meta();
    lora_dash::io::gguf_tokenizer::load_tokenizer(&base).expect("the seed tokenizer builds");
    let keys: Vec<String> = base.keys().cloned().collect();
    fuzz_inputs(
        "gguf_tokenizer",
        |rng| {
            let mut m = base.clone();
            for _ in 0..1 + rng.below(3) {
                mutate_meta(rng, &mut m, &keys);
            }
            m
        },
        |m| format!("{m:#?}").into_bytes(),
        |m| match lora_dash::io::gguf_tokenizer::load_tokenizer(m) {
            Ok(t) => {
                for s in ["hello world 12", "<s>ab", "é\u{0}\t", ""] {
                    if let Ok(ids) = t.encode(s) {
                        let _ = t.decode(&ids);
                    }
                }
                true
            }
            Err(_) => false,
        },
    );
}

#[test]
fn fuzz_peft_adapter_config() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("adapter");
    std::fs::create_dir(&dir).unwrap();
    let src = common::golden("tiny-lora");
    let weights = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    let loaded = lora_dash::io::load_model(common::golden("tiny-llama").to_str().unwrap()).unwrap();
    let cfg = loaded.config.resolve().unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 2]], &candle_core::Device::Cpu).unwrap();
    let attach = |cfg_bytes: &[u8], w_bytes: &[u8]| -> bool {
        std::fs::write(dir.join("adapter_config.json"), cfg_bytes).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), w_bytes).unwrap();
        let mut m = lora_dash::models::Llama::load(&cfg, &loaded.weights).unwrap();
        match lora_dash::io::dash::load_any(&mut m, &dir) {
            // An adapter that loads must also run.
            Ok(_) => {
                let _ = m.forward(&ids, None, &lora_dash::models::Ctx::eval());
                true
            }
            Err(_) => false,
        }
    };
    let seed = serde_json::to_vec(&config).unwrap();
    assert!(attach(&seed, &weights), "the seed adapter loads");
    fuzz_bytes(
        "peft_adapter",
        |rng| {
            if rng.below(3) == 0 {
                mutate(rng, &seed, &[], seed.len())
            } else {
                let mut v = config.clone();
                for _ in 0..1 + rng.below(3) {
                    mutate_json(rng, &mut v);
                }
                serde_json::to_vec(&v).unwrap()
            }
        },
        |b| attach(b, &weights),
    );
}

#[test]
fn fuzz_json_data_records() {
    let d = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/arithmetic.jsonl"),
    )
    .unwrap();
    let lines: Vec<&str> = text.lines().take(6).collect();
    let jsonl = lines.join("\n").into_bytes();
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let array = serde_json::to_vec_pretty(&records).unwrap();
    let path = |jsonl: bool| d.path().join(if jsonl { "d.jsonl" } else { "d.json" });
    let read = |b: &[u8]| {
        let p = path(b.first() != Some(&b'['));
        std::fs::write(&p, b).unwrap();
        lora_dash::data::alpaca::load_records(&[p]).is_ok()
    };
    assert!(read(&jsonl) && read(&array), "the seeds parse");
    let seeds = [jsonl, array];
    fuzz_bytes(
        "json_records",
        |rng| {
            let s = &seeds[rng.below(2)];
            if rng.below(2) == 0 {
                return mutate(rng, s, &seeds, s.len());
            }
            let mut v: Vec<Value> = records.clone();
            let i = rng.below(v.len());
            mutate_json(rng, &mut v[i]);
            if s[0] == b'[' {
                serde_json::to_vec(&v).unwrap()
            } else {
                v.iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
                    .into_bytes()
            }
        },
        read,
    );
}

/// The GLUE TSV readers, every task over seeds of every layout (so a file of one task read
/// as another is exercised too), and the pair encoder on whatever rows parse.
#[test]
fn fuzz_tsv_data_records() {
    use lora_dash::data::glue::{read_glue_tsv, GlueTask, PairEncoder};
    let d = tempfile::tempdir().unwrap();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/glue");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tsv"))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    seeds.push(
        b"index\tsentence1\tsentence2\tlabel\n0\tA \"quoted\" man.\tA man.\tentailment\n".to_vec(),
    );
    seeds.push(b"gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n".to_vec());
    seeds.push(b"sentence\tlabel\nit 's a charming journey .\t1\n".to_vec());
    let loaded = lora_dash::io::load_model(common::golden("tiny-bert").to_str().unwrap()).unwrap();
    let enc = PairEncoder::new(loaded.tokenizer.as_ref().unwrap(), 16).unwrap();
    let path = d.path().join("f.tsv");
    let read = |b: &[u8]| {
        std::fs::write(&path, b).unwrap();
        let mut any = false;
        for t in GlueTask::ALL {
            if let Ok(f) = read_glue_tsv(t, &path) {
                any = true;
                for r in f.rows.iter().take(4) {
                    let _ = enc.encode(&r.text_a, r.text_b.as_deref());
                }
            }
        }
        any
    };
    fuzz("tsv_records", &seeds, 64, read);
}

#[test]
fn fuzz_hf_config_json() {
    let seed = std::fs::read(common::golden("tiny-llama/config.json")).unwrap();
    let v: Value = serde_json::from_slice(&seed).unwrap();
    let p = Path::new("config.json");
    let parse = |b: &[u8]| {
        let Ok(s) = std::str::from_utf8(b) else {
            return false;
        };
        match lora_dash::models::config::HfConfig::from_json_str(s, p) {
            Ok(c) => c.resolve().is_ok(),
            Err(_) => false,
        }
    };
    assert!(parse(&seed));
    fuzz_bytes(
        "hf_config",
        |rng| {
            let mut v = v.clone();
            for _ in 0..1 + rng.below(3) {
                mutate_json(rng, &mut v);
            }
            serde_json::to_vec(&v).unwrap()
        },
        parse,
    );
}
