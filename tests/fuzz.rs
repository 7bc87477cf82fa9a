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

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lora_dash::io::gguf::{GgufValue, Metadata};
use lora_dash::rng::Rng;
use serde_json::Value;

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Byte-level mutations, one to four per input.
fn mutate(rng: &mut Rng, seed: &[u8], others: &[Vec<u8>], focus: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next_u64() as u8);
            continue;
        }
        // Most edits land in the first `focus` bytes (headers), the rest anywhere.
        let span = if rng.below(5) > 0 {
            focus.min(b.len())
        } else {
            b.len()
        };
        let at = rng.below(span.max(1));
        match rng.below(9) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = [0u8, 0xff, 0x7f, 0x80, 1, b'"', b'{', b'['][rng.below(8)],
            2 => {
                let v: u64 = [u32::MAX as u64, u64::MAX, 0, 1, 1 << 31, 1 << 63][rng.below(6)];
                let n = if rng.below(2) == 0 { 4 } else { 8 };
                let end = (at + n).min(b.len());
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            3 => b.truncate(at),
            4 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                b.splice(at..at, bytes);
            }
            5 => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                b.drain(at..end);
            }
            6 => inflate_length(rng, &mut b, span),
            7 => {
                // Duplicate a chunk in place.
                let end = (at + 1 + rng.below(32)).min(b.len());
                let chunk = b[at..end].to_vec();
                b.splice(at..at, chunk);
            }
            _ => {
                if let Some(o) = others.get(rng.below(others.len().max(1))) {
                    if !o.is_empty() {
                        let from = rng.below(o.len());
                        let end = (from + 1 + rng.below(64)).min(o.len());
                        let end2 = (at + (end - from)).min(b.len());
                        b.splice(at..end2, o[from..end].iter().copied());
                    }
                }
            }
        }
    }
    b
}

/// Finds a little-endian u64 that looks like a length or count (1..=file size) and makes it
/// wrong: larger than the file, off by one, or huge.
fn inflate_length(rng: &mut Rng, b: &mut [u8], span: usize) {
    let len = b.len() as u64;
    let candidates: Vec<usize> = (0..span.min(b.len()).saturating_sub(8))
        .filter(|&i| {
            let v = u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
            (1..=len).contains(&v)
        })
        .collect();
    if candidates.is_empty() {
        return;
    }
    let i = candidates[rng.below(candidates.len())];
    let v = u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let nv = match rng.below(5) {
        0 => v + 1,
        1 => v - 1,
        2 => len + 1 + rng.below(1 << 16) as u64,
        3 => v.wrapping_mul(1 << 32),
        _ => u64::MAX - rng.below(16) as u64,
    };
    b[i..i + 8].copy_from_slice(&nv.to_le_bytes());
}

/// Structural JSON edits: a random node replaced by a boundary value or a wrong type, keys
/// removed or added.
fn mutate_json(rng: &mut Rng, v: &mut Value) {
    let boundary = |rng: &mut Rng| -> Value {
        match rng.below(12) {
            0 => Value::Null,
            1 => (-1).into(),
            2 => 0.into(),
            3 => u64::MAX.into(),
            4 => 1e308.into(),
            5 => "".into(),
            6 => "x".repeat(1 + rng.below(5000)).into(),
            7 => serde_json::json!([]),
            8 => serde_json::json!({}),
            9 => serde_json::json!([[[[[[[[[[1]]]]]]]]]]),
            10 => true.into(),
            _ => "é\u{0}\u{fffd}".into(),
        }
    };
    match v {
        Value::Object(m) if !m.is_empty() && rng.below(4) > 0 => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[rng.below(keys.len())];
            match rng.below(6) {
                0 => {
                    m.remove(k);
                }
                1 => {
                    m.insert(format!("{k}_x"), boundary(rng));
                }
                _ => mutate_json(rng, m.get_mut(k).unwrap()),
            }
        }
        Value::Array(a) if !a.is_empty() && rng.below(4) > 0 => match rng.below(5) {
            0 => a.truncate(rng.below(a.len())),
            1 => {
                let x = a[rng.below(a.len())].clone();
                a.push(x)
            }
            _ => {
                let i = rng.below(a.len());
                mutate_json(rng, &mut a[i])
            }
        },
        _ => *v = boundary(rng),
    }
}

/// Runs `target` on mutations of `seeds` until the time or iteration budget is spent.
/// Every seed must parse: a fuzz run from broken seeds would test nothing.
fn fuzz(name: &str, seeds: &[Vec<u8>], focus: usize, target: impl Fn(&[u8]) -> bool) {
    for s in seeds {
        assert!(target(s), "{name}: a seed does not parse");
    }
    fuzz_bytes(
        name,
        |rng| {
            let s = &seeds[rng.below(seeds.len())];
            mutate(rng, s, seeds, focus)
        },
        target,
    );
}

fn fuzz_bytes(name: &str, make: impl FnMut(&mut Rng) -> Vec<u8>, target: impl Fn(&[u8]) -> bool) {
    fuzz_inputs(name, make, |b| b.clone(), |b| target(b));
}

/// The loop: `make` draws an input, `target` parses it (true when accepted); a panic saves
/// `show(input)` and fails the test at the end.
fn fuzz_inputs<T>(
    name: &str,
    mut make: impl FnMut(&mut Rng) -> T,
    show: impl Fn(&T) -> Vec<u8>,
    target: impl Fn(&T) -> bool,
) {
    let budget = (
        env_num("LORA_DASH_FUZZ_SECS", 5),
        env_num("LORA_DASH_FUZZ_ITERS", 200_000),
    );
    let (iters, crashes) = run_fuzz(name, budget, &mut make, &show, &target);
    assert!(iters > 0);
    assert!(
        crashes.is_empty(),
        "{name}: inputs that panicked: {crashes:?}"
    );
}

/// [`fuzz_inputs`] without the verdict: (inputs tried, saved crashing inputs).
fn run_fuzz<T>(
    name: &str,
    (secs, max_iters): (u64, u64),
    make: &mut impl FnMut(&mut Rng) -> T,
    show: &impl Fn(&T) -> Vec<u8>,
    target: &impl Fn(&T) -> bool,
) -> (u64, Vec<PathBuf>) {
    let mut rng = Rng::derive(env_num("LORA_DASH_FUZZ_SEED", 1), name);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut iters, mut accepted) = (0u64, 0u64);
    let mut crashes = Vec::new();
    while iters < max_iters && Instant::now() < deadline {
        let input = make(&mut rng);
        iters += 1;
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(ok) => accepted += ok as u64,
            Err(_) => crashes.push(save_crash(name, &show(&input))),
        }
    }
    println!(
        "{name}: {iters} inputs, {accepted} accepted, {} crashes",
        crashes.len()
    );
    (iters, crashes)
}

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

fn save_crash(name: &str, input: &[u8]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut h);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes");
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("{name}-{:016x}.bin", h.finish()));
    let _ = std::fs::write(&p, input);
    p
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

type TinyTensor = (String, Vec<u64>, u32, Vec<u8>);

fn mutate_tensor(rng: &mut Rng, t: &mut Vec<TinyTensor>) {
    if t.is_empty() {
        return;
    }
    let i = rng.below(t.len());
    let big = [0u64, 1, 3, u32::MAX as u64, u64::MAX, 1 << 32][rng.below(6)];
    match rng.below(8) {
        0 => {
            let d = rng.below(t[i].1.len().max(1));
            if let Some(x) = t[i].1.get_mut(d) {
                *x = big;
            }
        }
        1 => {
            t[i].1.pop();
        }
        2 => t[i].1.push(1 + rng.below(3) as u64),
        3 => t[i].2 = rng.below(40) as u32,
        4 => {
            let n = rng.below(t[i].3.len() + 1);
            t[i].3.truncate(n);
        }
        5 => {
            let names = [
                "rope_freqs.weight",
                "blk.1.attn_q.weight",
                "output.weight",
                "blk.0.attn_q.bias",
                "x",
            ];
            t[i].0 = names[rng.below(names.len())].to_string();
        }
        6 => {
            t.remove(i);
        }
        _ => {
            let x = t[i].clone();
            t.push(x);
        }
    }
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

fn mutate_meta(rng: &mut Rng, m: &mut Metadata, keys: &[String]) {
    let k = keys[rng.below(keys.len())].clone();
    let weird = |rng: &mut Rng| -> GgufValue {
        match rng.below(10) {
            0 => GgufValue::U32(u32::MAX),
            1 => GgufValue::I32(-1),
            2 => GgufValue::U64(rng.below(12) as u64),
            3 => GgufValue::String(String::new()),
            4 => GgufValue::String(["a b", " ", "ab", "a  b", "Ġ", "<s>"][rng.below(6)].into()),
            5 => GgufValue::Bool(true),
            6 => GgufValue::Array(vec![]),
            7 => GgufValue::Array(vec![GgufValue::U8(1)]),
            8 => GgufValue::F32(f32::NAN),
            _ => GgufValue::String("\u{fffd}\u{0}é".repeat(1 + rng.below(4))),
        }
    };
    match rng.below(4) {
        0 => {
            m.remove(&k);
        }
        1 => {
            let w = weird(rng);
            m.insert(k, w);
        }
        _ => {
            if let Some(GgufValue::Array(a)) = m.get_mut(&k) {
                match rng.below(4) {
                    0 => a.truncate(rng.below(a.len() + 1)),
                    1 => a.push(weird(rng)),
                    _ if !a.is_empty() => {
                        let i = rng.below(a.len());
                        a[i] = weird(rng);
                    }
                    _ => {}
                }
            } else {
                let w = weird(rng);
                m.insert(k, w);
            }
        }
    }
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

// TSV data reader (GLUE-style tasks): add `fuzz_tsv_data_records` here, seeded with a small
// header + rows file, once that reader exists in `lora_dash::data`.

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

// ---- A tiny llama GGUF, written independently of the reader (ggml `docs/gguf.md`) -------

fn tiny_tokenizer_meta() -> Metadata {
    let s = |x: &str| GgufValue::String(x.into());
    let tokens = ["<s>", "</s>", "a", "b", "ab", "Ġ", "h", "e"];
    [
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array([3, 3, 1, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec()),
        ),
        ("tokenizer.ggml.merges", GgufValue::Array(vec![s("a b")])),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(0)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(true)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    use GgufValue::*;
    match v {
        U8(x) => out.push(*x),
        I8(x) => out.push(*x as u8),
        U16(x) => out.extend(x.to_le_bytes()),
        I16(x) => out.extend(x.to_le_bytes()),
        U32(x) => out.extend(x.to_le_bytes()),
        I32(x) => out.extend(x.to_le_bytes()),
        F32(x) => out.extend(x.to_le_bytes()),
        Bool(x) => out.push(*x as u8),
        String(s) => {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        // Mixed element types are written as the first one's type, as a corrupt file may.
        Array(items) => {
            out.extend(items.first().map(type_id).unwrap_or(8).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
        U64(x) => out.extend(x.to_le_bytes()),
        I64(x) => out.extend(x.to_le_bytes()),
        F64(x) => out.extend(x.to_le_bytes()),
    }
}

fn type_id(v: &GgufValue) -> u32 {
    use GgufValue::*;
    match v {
        U8(_) => 0,
        I8(_) => 1,
        U16(_) => 2,
        I16(_) => 3,
        U32(_) => 4,
        I32(_) => 5,
        F32(_) => 6,
        Bool(_) => 7,
        String(_) => 8,
        Array(_) => 9,
        U64(_) => 10,
        I64(_) => 11,
        F64(_) => 12,
    }
}

/// One layer, hidden 8, 2 heads of 4, 1 KV head, FFN 32, vocabulary 8; F32, F16 and
/// quantised (Q8_0, Q4_0, Q4_K, Q6_K) tensors so the dequantisers are reached too.
fn tiny_gguf_parts() -> (Vec<(String, GgufValue)>, Vec<TinyTensor>) {
    let (h, ff, vocab) = (8u64, 32u64, 8u64);
    let mut rng = Rng::new(7);
    let f32s = |n: u64, rng: &mut Rng| -> Vec<u8> {
        rng.uniform_vec(n as usize, -0.5, 0.5)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect()
    };
    let quant = |n: u64, blk: u64, size: u64, rng: &mut Rng| -> Vec<u8> {
        let mut b: Vec<u8> = (0..n / blk * size).map(|_| rng.next_u64() as u8).collect();
        // Small f16 scales at the start of each block keep the values finite.
        for c in b.chunks_mut(size as usize) {
            c[..2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
        }
        b
    };
    // (name, GGUF dims (innermost first), ggml type, data)
    let mut t: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = vec![
        (
            "token_embd.weight",
            vec![h, vocab],
            0,
            f32s(h * vocab, &mut rng),
        ),
        ("blk.0.attn_norm.weight", vec![h], 0, f32s(h, &mut rng)),
        ("blk.0.attn_q.weight", vec![h, h], 0, f32s(h * h, &mut rng)),
        ("blk.0.attn_k.weight", vec![h, 4], 0, f32s(h * 4, &mut rng)),
        (
            "blk.0.attn_output.weight",
            vec![h, h],
            2,
            quant(h * h, 32, 18, &mut rng),
        ),
        ("blk.0.ffn_norm.weight", vec![h], 0, f32s(h, &mut rng)),
        (
            "blk.0.ffn_gate.weight",
            vec![h, ff],
            12,
            quant(h * ff, 256, 144, &mut rng),
        ),
        (
            "blk.0.ffn_up.weight",
            vec![h, ff],
            14,
            quant(h * ff, 256, 210, &mut rng),
        ),
        (
            "blk.0.ffn_down.weight",
            vec![ff, h],
            8,
            quant(h * ff, 32, 34, &mut rng),
        ),
        ("output_norm.weight", vec![h], 0, f32s(h, &mut rng)),
    ];
    let v: Vec<u8> = rng
        .uniform_vec((h * 4) as usize, -0.5, 0.5)
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
        .collect();
    t.insert(4, ("blk.0.attn_v.weight", vec![h, 4], 1, v));
    let u = GgufValue::U32;
    let mut meta: Vec<(String, GgufValue)> = vec![
        (
            "general.architecture".into(),
            GgufValue::String("llama".into()),
        ),
        ("llama.context_length".into(), u(64)),
        ("llama.embedding_length".into(), u(h as u32)),
        ("llama.block_count".into(), u(1)),
        ("llama.feed_forward_length".into(), u(ff as u32)),
        ("llama.attention.head_count".into(), u(2)),
        ("llama.attention.head_count_kv".into(), u(1)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), GgufValue::F32(10000.0)),
        ("llama.rope.dimension_count".into(), u(4)),
    ];
    meta.extend(tiny_tokenizer_meta());
    let t = t
        .into_iter()
        .map(|(n, d, ty, data)| (n.to_string(), d, ty, data))
        .collect();
    (meta, t)
}

/// A GGUF file from metadata and tensors, data aligned to 32 bytes.
fn write_gguf(meta: &[(String, GgufValue)], t: &[TinyTensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((t.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_value(&mut out, &GgufValue::String(k.clone()));
        out.extend(type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let pad = |n: u64| n.div_ceil(32) * 32;
    let mut offset = 0u64;
    for (name, dims, ty, data) in t {
        put_value(&mut out, &GgufValue::String(name.clone()));
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = pad(offset + data.len() as u64);
    }
    let start = pad(out.len() as u64) as usize;
    out.resize(start, 0);
    for (_, _, _, data) in t {
        out.resize(pad((out.len() - start) as u64) as usize + start, 0);
        out.extend(data);
    }
    out
}
