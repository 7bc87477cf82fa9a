//! Hugging Face `config.json` for the LLaMA family, read leniently and then resolved
//! into a plain config the model code uses.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `config.json` as Hugging Face writes it. Unknown keys are ignored; missing ones take
/// transformers' defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Newer transformers move `rope_theta` here.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// The resolved configuration the model code uses.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

fn first_id(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl HfConfig {
    pub fn from_json_str(s: &str, path: &std::path::Path) -> Result<Self> {
        serde_json::from_str(s)
            .map_err(|e| Error::format(path, format!("invalid config.json: {e}")))
    }

    pub fn resolve(&self) -> Result<LlamaConfig> {
        let arch_ok = self
            .model_type
            .as_deref()
            .map(|m| m == "llama" || m == "mistral" || m == "smollm3" || m == "qwen2")
            .unwrap_or(false)
            || self
                .architectures
                .as_ref()
                .map(|a| {
                    a.iter()
                        .any(|x| x == "LlamaForCausalLM" || x == "MistralForCausalLM")
                })
                .unwrap_or(false);
        if !arch_ok {
            let name = self
                .architectures
                .as_ref()
                .and_then(|a| a.first().cloned())
                .or(self.model_type.clone())
                .unwrap_or_else(|| "<none>".into());
            return Err(Error::UnknownArchitecture(name));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(Error::config(
                    "hidden_act",
                    format!("`{act}` is not supported (silu only)"),
                ));
            }
        }
        if self.num_attention_heads == 0
            || self.hidden_size % self.num_attention_heads != 0 && self.head_dim.is_none()
        {
            return Err(Error::config(
                "num_attention_heads",
                "must divide hidden_size",
            ));
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv_heads == 0 || self.num_attention_heads % num_kv_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                "must divide num_attention_heads",
            ));
        }
        let rope_theta = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let scaling = self
            .rope_scaling
            .as_ref()
            .or(self.rope_parameters.as_ref())
            .and_then(|p| p.get("rope_type").or(p.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        if scaling != "default" {
            return Err(Error::config(
                "rope_scaling",
                format!("rope type `{scaling}` is not supported"),
            ));
        }
        let eos = first_id(&self.eos_token_id);
        Ok(LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            bos_token_id: first_id(&self.bos_token_id).first().copied(),
            eos_token_ids: eos,
            pad_token_id: first_id(&self.pad_token_id).first().copied(),
        })
    }
}
