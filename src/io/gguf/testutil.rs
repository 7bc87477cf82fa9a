//! Test-only GGUF writer and a tiny llama model with a byte-level BPE tokenizer, written
//! independently of the reader (layout from ggml's `docs/gguf.md`).

use std::collections::BTreeMap;
use std::path::Path;

use super::{GgmlType, GgufValue};

pub(crate) struct TestTensor {
    pub name: String,
    /// GGUF order (`dims[0]` innermost).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
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

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
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
        String(s) => put_str(out, s),
        Array(items) => {
            out.extend(items.first().map(type_id).unwrap_or(8).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
        U64(x) => out.extend(x.to_le_bytes()),
        I64(x) => out.extend(x.to_le_bytes()),
        F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// Writes a GGUF file; tensor data is laid out in order, each start padded to `alignment`.
pub(crate) fn write_gguf(
    path: &Path,
    version: u32,
    alignment: u64,
    meta: &[(&str, GgufValue)],
    tensors: &[TestTensor],
) {
    let pad = |n: usize| (n as u64).div_ceil(alignment) * alignment;
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        out.extend(type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ty.id().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = pad(offset as usize + t.data.len());
    }
    let start = pad(out.len()) as usize;
    out.resize(start, 0);
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize(start + off as usize, 0);
        out.extend(&t.data);
    }
    std::fs::write(path, out).unwrap();
}

pub(crate) fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
        .collect()
}

/// ggml's `quantize_row_q8_0_ref`, and the values it dequantises to (q * f16(d)).
pub(crate) fn q8_0_bytes(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut out = Vec::new();
    let mut deq = Vec::new();
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let dh = half::f16::from_f32(d);
        out.extend(dh.to_bits().to_le_bytes());
        for v in blk {
            let q = (v * id).round() as i8;
            out.push(q as u8);
            deq.push(q as f32 * dh.to_f32());
        }
    }
    (out, deq)
}

/// Deterministic values in [-1, 1).
pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// GPT-2's byte -> printable character table (`bytes_to_unicode`).
pub(crate) fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// Tiny byte-level BPE: 3 control tokens (ids 0..3), 256 byte tokens, then one token per merge.
pub(crate) const TINY_MERGES: &[&str] = &[
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
];

pub(crate) fn tiny_tokenizer_meta(
    pre: &str,
    add_bos: Option<bool>,
) -> Vec<(&'static str, GgufValue)> {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3i32, 3, 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    for m in TINY_MERGES {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    let s = |x: &str| GgufValue::String(x.to_string());
    let mut meta = vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s(pre)),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            GgufValue::Array(TINY_MERGES.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.padding_token_id", GgufValue::U32(0)),
    ];
    if let Some(b) = add_bos {
        meta.push(("tokenizer.ggml.add_bos_token", GgufValue::Bool(b)));
    }
    meta
}

/// Id of a tiny-vocabulary token given as its byte-level string.
pub(crate) fn tiny_id(token: &str) -> u32 {
    let chars = byte_chars();
    if let Some(i) = TINY_MERGES.iter().position(|m| m.replace(' ', "") == token) {
        return (3 + 256 + i) as u32;
    }
    let c = token.chars().next().unwrap();
    (3 + chars.iter().position(|&x| x == c).unwrap()) as u32
}

pub(crate) const TINY_HIDDEN: usize = 32;
pub(crate) const TINY_HEADS: usize = 4;
pub(crate) const TINY_KV_HEADS: usize = 2;
pub(crate) const TINY_FF: usize = 64;
pub(crate) const TINY_LAYERS: usize = 2;

/// llama.cpp's `permute` written as its numpy reshape: (n_head, 2, hd/2, cols) -> swap 1,2.
pub(crate) fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let src = (h * 2 + s) * half + i; // index in (n_head, 2, half)
                out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Writes a tiny llama GGUF and returns the Hugging Face tensors (name -> (shape, values)) the
/// reader must produce. Mixed storage: Q8_0 embedding, F16 v_proj (and lm_head), F32 others.
pub(crate) fn write_tiny_llama(
    path: &Path,
    tied: bool,
    pre: &str,
) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let vocab = 3 + 256 + TINY_MERGES.len();
    let (h, kvd) = (TINY_HIDDEN, TINY_HIDDEN / TINY_HEADS * TINY_KV_HEADS);
    let mut expected = BTreeMap::new();
    let mut tensors = Vec::new();
    let mut seed = 1;
    let mut add =
        |gguf: &str, hf: &str, shape: [usize; 2], ty: GgmlType, perm_heads: Option<usize>| {
            seed += 1;
            let n = shape[0] * shape[1];
            let mut vals = pseudo_random(n, seed);
            if shape[0] == 1 {
                vals.iter_mut().for_each(|v| *v += 1.0);
            }
            let stored = match perm_heads {
                Some(nh) => llama_cpp_permute(&vals, shape[0], shape[1], nh),
                None => vals.clone(),
            };
            let (data, exp) = match ty {
                GgmlType::F32 => (f32_bytes(&stored), vals),
                GgmlType::F16 => (
                    f16_bytes(&stored),
                    vals.iter()
                        .map(|v| half::f16::from_f32(*v).to_f32())
                        .collect(),
                ),
                GgmlType::Q8_0 => {
                    let (d, deq) = q8_0_bytes(&stored);
                    (d, deq)
                }
                _ => unreachable!(),
            };
            let hf_shape = if shape[0] == 1 {
                vec![shape[1]]
            } else {
                shape.to_vec()
            };
            let dims = hf_shape.iter().rev().map(|&d| d as u64).collect();
            tensors.push(TestTensor {
                name: gguf.into(),
                dims,
                ty,
                data,
            });
            expected.insert(hf.to_string(), (hf_shape, exp));
        };
    add(
        "token_embd.weight",
        "model.embed_tokens.weight",
        [vocab, h],
        GgmlType::Q8_0,
        None,
    );
    for l in 0..TINY_LAYERS {
        let g = |s: &str| format!("blk.{l}.{s}.weight");
        let f = |s: &str| format!("model.layers.{l}.{s}.weight");
        add(
            &g("attn_norm"),
            &f("input_layernorm"),
            [1, h],
            GgmlType::F32,
            None,
        );
        add(
            &g("attn_q"),
            &f("self_attn.q_proj"),
            [h, h],
            GgmlType::F32,
            Some(TINY_HEADS),
        );
        add(
            &g("attn_k"),
            &f("self_attn.k_proj"),
            [kvd, h],
            GgmlType::F32,
            Some(TINY_KV_HEADS),
        );
        add(
            &g("attn_v"),
            &f("self_attn.v_proj"),
            [kvd, h],
            GgmlType::F16,
            None,
        );
        add(
            &g("attn_output"),
            &f("self_attn.o_proj"),
            [h, h],
            GgmlType::F32,
            None,
        );
        add(
            &g("ffn_norm"),
            &f("post_attention_layernorm"),
            [1, h],
            GgmlType::F32,
            None,
        );
        add(
            &g("ffn_gate"),
            &f("mlp.gate_proj"),
            [TINY_FF, h],
            GgmlType::F32,
            None,
        );
        add(
            &g("ffn_up"),
            &f("mlp.up_proj"),
            [TINY_FF, h],
            GgmlType::F32,
            None,
        );
        add(
            &g("ffn_down"),
            &f("mlp.down_proj"),
            [h, TINY_FF],
            GgmlType::F32,
            None,
        );
    }
    add(
        "output_norm.weight",
        "model.norm.weight",
        [1, h],
        GgmlType::F32,
        None,
    );
    if !tied {
        add(
            "output.weight",
            "lm_head.weight",
            [vocab, h],
            GgmlType::F16,
            None,
        );
    }
    let u = |x: usize| GgufValue::U32(x as u32);
    let mut meta = vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("general.alignment", GgufValue::U32(64)),
        ("llama.context_length", u(256)),
        ("llama.embedding_length", u(h)),
        ("llama.block_count", u(TINY_LAYERS)),
        ("llama.feed_forward_length", u(TINY_FF)),
        ("llama.attention.head_count", u(TINY_HEADS)),
        ("llama.attention.head_count_kv", u(TINY_KV_HEADS)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        ),
        ("llama.rope.freq_base", GgufValue::F32(10000.0)),
        ("llama.rope.dimension_count", u(h / TINY_HEADS)),
    ];
    meta.extend(tiny_tokenizer_meta(pre, Some(false)));
    write_gguf(path, 3, 64, &meta, &tensors);
    expected
}
