//! The Hugging Face config of a llama GGUF, from its `llama.*` metadata, with the special
//! token ids checked against the vocabulary.

use super::GgufFile;
use crate::error::{Error, Result};
use crate::models::config::HfConfig;

pub(super) fn meta_u64(g: &GgufFile, key: &str) -> Option<u64> {
    g.get(key).and_then(|v| v.as_u64())
}

fn required_usize(g: &GgufFile, key: &str) -> Result<usize> {
    meta_u64(g, key).map(|x| x as usize).ok_or_else(|| {
        Error::format(
            g.path(),
            format!("metadata `{key}` is missing or not an integer"),
        )
    })
}

/// The tokenizer's vocabulary must fit the model's, and the special token ids given in the
/// metadata must lie inside both.
fn check_token_ids(g: &GgufFile, vocab: usize) -> Result<()> {
    let n_tokens = g
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .map(|a| a.len());
    if let Some(n) = n_tokens.filter(|&n| n > vocab) {
        return Err(Error::format(
            g.path(),
            format!("metadata `tokenizer.ggml.tokens` holds {n} tokens, more than the vocabulary of {vocab}"),
        ));
    }
    let limit = n_tokens.unwrap_or(vocab).min(vocab);
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
    ] {
        let Some(v) = g.get(key) else { continue };
        match v.as_u64() {
            Some(id) if id < limit as u64 => {}
            _ => {
                return Err(Error::format(
                    g.path(),
                    format!(
                        "metadata `{key}` ({}) is not a token id of the vocabulary of {limit}",
                        crate::error::clip(&format!("{v:?}"))
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Builds the Hugging Face config of a llama GGUF from its metadata.
pub fn hf_config(g: &GgufFile) -> Result<HfConfig> {
    let arch = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::format(g.path(), "metadata `general.architecture` is missing"))?;
    if arch != "llama" {
        return Err(Error::UnknownArchitecture(arch.to_string()));
    }
    if meta_u64(g, "llama.expert_count").unwrap_or(0) > 0 {
        return Err(Error::config(
            "llama.expert_count",
            "mixture-of-experts models are not supported",
        ));
    }
    let hidden = required_usize(g, "llama.embedding_length")?;
    let heads = required_usize(g, "llama.attention.head_count")?;
    let kv_heads = meta_u64(g, "llama.attention.head_count_kv")
        .map(|x| x as usize)
        .unwrap_or(heads);
    if heads == 0 {
        return Err(Error::config(
            "llama.attention.head_count",
            "must be positive",
        ));
    }
    let head_dim = meta_u64(g, "llama.attention.key_length")
        .map(|x| x as usize)
        .unwrap_or(hidden / heads);
    if let Some(rot) = meta_u64(g, "llama.rope.dimension_count") {
        if rot as usize != head_dim {
            return Err(Error::config(
                "llama.rope.dimension_count",
                format!("partial rotary ({rot} of {head_dim}) is not supported"),
            ));
        }
    }
    let vocab = meta_u64(g, "llama.vocab_size")
        .map(|x| x as usize)
        .or_else(|| {
            g.get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
        })
        .or_else(|| {
            g.tensor_info("token_embd.weight")
                .and_then(|t| t.dims.get(1).map(|&d| d as usize))
        })
        .ok_or_else(|| Error::format(g.path(), "cannot tell the vocabulary size"))?;
    check_token_ids(g, vocab)?;
    let rope_scaling = match g.get("llama.rope.scaling.type").and_then(|v| v.as_str()) {
        None | Some("none") => None,
        Some(t) => Some(serde_json::json!({
            "rope_type": t,
            "factor": g.get("llama.rope.scaling.factor").and_then(|v| v.as_f64()),
        })),
    };
    let id = |key: &str| meta_u64(g, key).map(serde_json::Value::from);
    Ok(HfConfig {
        architectures: Some(vec!["LlamaForCausalLM".into()]),
        model_type: Some("llama".into()),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: required_usize(g, "llama.feed_forward_length")?,
        num_hidden_layers: required_usize(g, "llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: (head_dim != hidden / heads).then_some(head_dim),
        rms_norm_eps: g
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-5),
        rope_theta: Some(
            g.get("llama.rope.freq_base")
                .and_then(|v| v.as_f64())
                .unwrap_or(10000.0),
        ),
        rope_parameters: None,
        rope_scaling,
        max_position_embeddings: meta_u64(g, "llama.context_length")
            .map(|x| x as usize)
            .unwrap_or(2048),
        tie_word_embeddings: g.tensor_info("output.weight").is_none(),
        attention_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
        mlp_bias: g.tensor_info("blk.0.ffn_up.bias").is_some(),
        hidden_act: Some("silu".into()),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        pad_token_id: id("tokenizer.ggml.padding_token_id"),
        ..Default::default()
    })
}
