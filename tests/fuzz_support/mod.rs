//! The fuzzing engine of `tests/fuzz.rs`: a deterministic generator, byte-level and
//! structural mutations, the bounded loop that catches panics and saves the inputs, and a
//! tiny llama GGUF written independently of the reader (ggml `docs/gguf.md`) as a seed.
#![allow(dead_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lora_dash::io::gguf::{GgufValue, Metadata};
use lora_dash::rng::Rng;
use serde_json::Value;

pub fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Byte-level mutations, one to four per input.
pub fn mutate(rng: &mut Rng, seed: &[u8], others: &[Vec<u8>], focus: usize) -> Vec<u8> {
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
pub fn inflate_length(rng: &mut Rng, b: &mut [u8], span: usize) {
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
pub fn mutate_json(rng: &mut Rng, v: &mut Value) {
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
pub fn fuzz(name: &str, seeds: &[Vec<u8>], focus: usize, target: impl Fn(&[u8]) -> bool) {
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

pub fn fuzz_bytes(
    name: &str,
    make: impl FnMut(&mut Rng) -> Vec<u8>,
    target: impl Fn(&[u8]) -> bool,
) {
    fuzz_inputs(name, make, |b| b.clone(), |b| target(b));
}

/// The loop: `make` draws an input, `target` parses it (true when accepted); a panic saves
/// `show(input)` and fails the test at the end.
pub fn fuzz_inputs<T>(
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
pub fn run_fuzz<T>(
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

pub fn save_crash(name: &str, input: &[u8]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut h);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes");
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("{name}-{:016x}.bin", h.finish()));
    let _ = std::fs::write(&p, input);
    p
}

pub type TinyTensor = (String, Vec<u64>, u32, Vec<u8>);

pub fn mutate_tensor(rng: &mut Rng, t: &mut Vec<TinyTensor>) {
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

pub fn mutate_meta(rng: &mut Rng, m: &mut Metadata, keys: &[String]) {
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

// ---- A tiny llama GGUF, written independently of the reader (ggml `docs/gguf.md`) -------

pub fn tiny_tokenizer_meta() -> Metadata {
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

pub fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
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

pub fn type_id(v: &GgufValue) -> u32 {
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
pub fn tiny_gguf_parts() -> (Vec<(String, GgufValue)>, Vec<TinyTensor>) {
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
pub fn write_gguf(meta: &[(String, GgufValue)], t: &[TinyTensor]) -> Vec<u8> {
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
