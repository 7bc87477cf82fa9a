//! Regression tests for broken GGUF files that used to convert or load: sizes, byte extents
//! and token ids are checked against the tensors, the file and the vocabulary.

use super::testutil::*;
use super::*;

/// The tiny llama GGUF rewritten with `edit` applied to its metadata and tensors.
fn tiny_edited(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, GgufValue)>, &mut Vec<TestTensor>),
) -> PathBuf {
    let src = dir.join("tiny.gguf");
    write_tiny_llama(&src, false, "smollm");
    let g = GgufFile::open(&src).unwrap();
    let mut meta: Vec<(String, GgufValue)> = g
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tensors: Vec<TestTensor> = g
        .tensors
        .iter()
        .map(|t| TestTensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ggml_type,
            data: g.tensor_bytes(t).unwrap().to_vec(),
        })
        .collect();
    edit(&mut meta, &mut tensors);
    let out = dir.join("edited.gguf");
    let meta: Vec<(&str, GgufValue)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write_gguf(&out, 3, 32, &meta, &tensors);
    out
}

fn set(meta: &mut Vec<(String, GgufValue)>, key: &str, v: GgufValue) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.to_string(), v));
}

fn load_err(edit: impl FnOnce(&mut Vec<(String, GgufValue)>, &mut Vec<TestTensor>)) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = tiny_edited(d.path(), edit);
    match load(&p) {
        Ok(_) => panic!("the edited GGUF loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unedited_copy_still_loads() {
    let d = tempfile::tempdir().unwrap();
    let p = tiny_edited(d.path(), |_, _| {});
    load(&p).unwrap();
}

#[test]
fn huge_block_count_is_an_error_not_an_abort() {
    for n in [u32::MAX as u64, u64::MAX, 1 << 40] {
        let e = load_err(|m, _| set(m, "llama.block_count", GgufValue::U64(n)));
        assert!(e.contains("num_hidden_layers"), "{n}: {e}");
    }
    // A count that fits but disagrees with the tensors present.
    for n in [1, 3] {
        let e = load_err(|m, _| set(m, "llama.block_count", GgufValue::U32(n)));
        assert!(e.contains("hold 2 layers"), "{n}: {e}");
    }
    let e = load_err(|m, _| {
        m.retain(|(k, _)| k != "llama.rope.dimension_count");
        set(m, "llama.embedding_length", GgufValue::U64(1 << 62))
    });
    assert!(e.contains("overflows"), "{e}");
}

#[test]
fn tensor_dims_disagreeing_with_the_config_are_refused() {
    let e = load_err(|m, _| {
        set(
            m,
            "llama.feed_forward_length",
            GgufValue::U32(TINY_FF as u32 * 2),
        )
    });
    assert!(e.contains("mlp.gate_proj.weight"), "{e}");
    let e = load_err(|m, _| set(m, "llama.vocab_size", GgufValue::U32(10_000)));
    assert!(e.contains("model.embed_tokens.weight"), "{e}");
}

#[test]
fn tensor_byte_extent_is_checked_against_type_and_file() {
    // Data cut short: the last tensor's bytes lie past the end of the file.
    let e = load_err(|_, t| {
        let last = t.last_mut().unwrap();
        last.data.truncate(last.data.len() / 2);
    });
    assert!(e.contains("past the end of the file"), "{e}");
    // Dims whose element count overflows.
    let e = load_err(|_, t| t[1].dims = vec![u64::MAX, 3]);
    assert!(e.contains(&t_name(1)), "{e}");
    // A type without a known layout.
    let e = load_err(|_, t| t[2].ty = GgmlType::Other(99));
    assert!(e.contains("ggml type 99"), "{e}");
}

/// Name of the tiny file's `i`-th tensor.
fn t_name(i: usize) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.gguf");
    write_tiny_llama(&p, false, "smollm");
    GgufFile::open(&p).unwrap().tensors[i].name.clone()
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let vocab = (3 + 256 + TINY_MERGES.len()) as u32;
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
    ] {
        let e = load_err(|m, _| set(m, key, GgufValue::U32(vocab + 5)));
        assert!(e.contains(key), "{key}: {e}");
        let e = load_err(|m, _| set(m, key, GgufValue::I32(-1)));
        assert!(e.contains(key), "{key}: {e}");
    }
    // More tokenizer tokens than embedding rows.
    let e = load_err(|m, _| {
        let mut toks = m
            .iter()
            .find(|(k, _)| k == "tokenizer.ggml.tokens")
            .unwrap()
            .1
            .as_array()
            .unwrap()
            .to_vec();
        toks.push(GgufValue::String("extra".into()));
        set(m, "tokenizer.ggml.tokens", GgufValue::Array(toks));
        set(m, "llama.vocab_size", GgufValue::U32(vocab));
    });
    assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
}

#[test]
fn tensors_the_model_does_not_use_are_refused() {
    let extra = |name: &str| TestTensor {
        name: name.into(),
        dims: vec![4],
        ty: GgmlType::F32,
        data: f32_bytes(&[1.0; 4]),
    };
    let e = load_err(|_, t| t.push(extra("rope_freqs.weight")));
    assert!(e.contains("rope_freqs.weight"), "{e}");
    let e = load_err(|_, t| t.push(extra("blk.5.attn_norm.weight")));
    assert!(e.contains("num_hidden_layers"), "{e}");
    // A bias the config does not enable (attention_bias follows layer 0 only).
    let e = load_err(|_, t| {
        let mut b = extra("blk.1.attn_q.bias");
        b.dims = vec![TINY_HIDDEN as u64];
        b.data = f32_bytes(&vec![0.5; TINY_HIDDEN]);
        t.push(b);
    });
    assert!(e.contains("model.layers.1.self_attn.q_proj.bias"), "{e}");
    // The same tensor twice.
    let e = load_err(|_, t| {
        let dup = TestTensor {
            name: t[0].name.clone(),
            dims: t[0].dims.clone(),
            ty: t[0].ty,
            data: t[0].data.clone(),
        };
        t.push(dup);
    });
    assert!(e.contains("twice"), "{e}");
}

#[test]
fn rank_zero_attention_tensor_is_an_error_not_a_panic() {
    let e = load_err(|_, t| {
        let q = t
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_q.weight")
            .unwrap();
        q.dims = vec![];
        q.ty = GgmlType::F32;
        q.data = f32_bytes(&[1.0]);
    });
    assert!(e.contains("blk.0.attn_q.weight"), "{e}");
}
