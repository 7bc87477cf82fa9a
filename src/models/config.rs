//! Hugging Face `config.json` for the LLaMA family, read leniently and then resolved
//! into a plain config the model code uses.
//!
//! Only what `models::llama` computes exactly resolves: `llama`, and `mistral` when its
//! sliding window covers every position. Relatives that load the same tensors but compute
//! differently (Qwen2's q/k/v biases, SmolLM3's RoPE-free layers, Mistral's sliding window)
//! are refused by name rather than run wrong. Sizes are checked with overflow-safe
//! arithmetic, and against the tensors actually present before the model allocates anything.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{clip, Error, Result};
use crate::io::Weights;

/// `config.json` as Hugging Face writes it. Unknown keys are ignored; missing ones take
/// transformers' defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// Mistral's attention window (null: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<serde_json::Value>,
    /// SmolLM3: per layer, whether it applies RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_rope_layers: Option<serde_json::Value>,
}

/// Most decoder layers a config may declare; real models have at most a few hundred.
pub const MAX_LAYERS: usize = 1 << 16;
/// Most parameters a config may declare (2^40, 4 TiB in f32).
pub const MAX_PARAMS: usize = 1 << 40;

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
    let id = |x: &serde_json::Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    match v {
        Some(n @ serde_json::Value::Number(_)) => id(n).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(id).collect(),
        _ => vec![],
    }
}

/// The architecture a config asks for, from `model_type`, else `architectures`.
fn check_architecture(c: &HfConfig) -> Result<()> {
    let archs = c.architectures.as_deref().unwrap_or_default();
    let named = |m: &str, class: &str| {
        c.model_type.as_deref() == Some(m) || archs.iter().any(|a| a == class)
    };
    if named("qwen2", "Qwen2ForCausalLM") {
        return Err(Error::config(
            "model_type",
            "`qwen2` is not supported: Qwen2 adds biases to q/k/v (without an `attention_bias` key) and optional sliding-window layers, which this LLaMA implementation does not compute",
        ));
    }
    if named("smollm3", "SmolLM3ForCausalLM") {
        return Err(Error::config(
            "no_rope_layers",
            "`smollm3` is not supported: it skips RoPE on the layers `no_rope_layers` marks, which this LLaMA implementation does not compute",
        ));
    }
    let known = |m: &str| matches!(m, "llama" | "mistral");
    let known_class = |a: &str| matches!(a, "LlamaForCausalLM" | "MistralForCausalLM");
    let ok = match c.model_type.as_deref() {
        Some(m) => known(m) && archs.iter().all(|a| known_class(a)),
        None => !archs.is_empty() && archs.iter().all(|a| known_class(a)),
    };
    if !ok {
        let name = archs
            .iter()
            .find(|a| !known_class(a))
            .cloned()
            .or(c.model_type.clone())
            .unwrap_or_else(|| "<none>".into());
        return Err(Error::UnknownArchitecture(clip(&name)));
    }
    if let Some(w) = &c.sliding_window {
        if !w.is_null() {
            let covers = w
                .as_u64()
                .is_some_and(|w| w >= c.max_position_embeddings as u64);
            if !covers {
                return Err(Error::config(
                    "sliding_window",
                    format!(
                        "sliding-window attention ({w} of {} positions) is not supported; only a window covering max_position_embeddings (or null) computes like full attention",
                        c.max_position_embeddings
                    ),
                ));
            }
        }
    }
    if c.no_rope_layers.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(Error::config(
            "no_rope_layers",
            "layers without RoPE are not supported",
        ));
    }
    Ok(())
}

impl HfConfig {
    pub fn from_json_str(s: &str, path: &std::path::Path) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| {
            Error::format(
                path,
                format!("invalid config.json: {}", clip(&e.to_string())),
            )
        })
    }

    /// The resolved config, or an error naming the key that is not supported or not
    /// consistent. Sizes are only checked for overflow here; [`LlamaConfig::check_weights`]
    /// checks them against the tensors.
    pub fn resolve(&self) -> Result<LlamaConfig> {
        check_architecture(self)?;
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
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::config("rms_norm_eps", "must be a positive number"));
        }
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(Error::config("rope_theta", "must be a positive number"));
        }
        if self.head_dim == Some(0) {
            return Err(Error::config("head_dim", "must be positive"));
        }
        let eos = first_id(&self.eos_token_id);
        let cfg = LlamaConfig {
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
        };
        cfg.check_sizes()?;
        Ok(cfg)
    }
}

/// `a · b`, or an error naming `field` when it overflows.
fn mul(field: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::config(field, format!("{a} × {b} overflows")))
}

/// A tensor a checkpoint may hold that the model recomputes instead of reading: the RoPE
/// `inv_freq` buffers older transformers saved (and itself ignores on load).
fn ignorable(name: &str) -> bool {
    name == "model.rotary_emb.inv_freq"
        || name.starts_with("model.layers.") && name.ends_with(".self_attn.rotary_emb.inv_freq")
}

impl LlamaConfig {
    /// Every size positive where it must be, and the parameter count computable without
    /// overflow and below [`MAX_PARAMS`], layers at most [`MAX_LAYERS`]: a corrupt config
    /// gives an error here instead of an allocation failure later.
    pub fn check_sizes(&self) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(Error::config(field, "must be positive"));
            }
        }
        if self.num_layers > MAX_LAYERS {
            return Err(Error::config(
                "num_hidden_layers",
                format!("{} is more than {MAX_LAYERS}", self.num_layers),
            ));
        }
        let e = self.hidden_size;
        let q = mul("num_attention_heads", self.num_heads, self.head_dim)?;
        let kv = mul("num_key_value_heads", self.num_kv_heads, self.head_dim)?;
        let attn = [mul("hidden_size", q, e)?, mul("hidden_size", kv, e)?];
        let attn = attn[0]
            .checked_mul(2)
            .and_then(|x| x.checked_add(attn[1].checked_mul(2)?));
        let mlp = mul("intermediate_size", self.intermediate_size, e)?.checked_mul(3);
        let layer = attn
            .zip(mlp)
            .and_then(|(a, m)| a.checked_add(m)?.checked_add(2 * e));
        let embed = mul("vocab_size", self.vocab_size, e)?;
        let total = layer
            .and_then(|l| l.checked_mul(self.num_layers))
            .and_then(|t| t.checked_add(embed.checked_mul(2)?));
        match total {
            Some(t) if t <= MAX_PARAMS => Ok(()),
            _ => Err(Error::config(
                "num_hidden_layers",
                format!(
                    "the sizes declare more than {MAX_PARAMS} parameters ({} layers of hidden size {e}, vocabulary {})",
                    self.num_layers, self.vocab_size
                ),
            )),
        }
    }

    /// The tensors a checkpoint must hold for this config, with their shapes.
    fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (e, hd) = (self.hidden_size, self.head_dim);
        let (q, kv, ff) = (
            self.num_heads * hd,
            self.num_kv_heads * hd,
            self.intermediate_size,
        );
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![self.vocab_size, e],
            ),
            ("model.norm.weight".to_string(), vec![e]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![self.vocab_size, e]));
        }
        for i in 0..self.num_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![e]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![e]));
            let linears = [
                ("self_attn.q_proj", q, e, self.attention_bias),
                ("self_attn.k_proj", kv, e, self.attention_bias),
                ("self_attn.v_proj", kv, e, self.attention_bias),
                ("self_attn.o_proj", e, q, self.attention_bias),
                ("mlp.gate_proj", ff, e, self.mlp_bias),
                ("mlp.up_proj", ff, e, self.mlp_bias),
                ("mlp.down_proj", e, ff, self.mlp_bias),
            ];
            for (m, o, i, bias) in linears {
                out.push((format!("{p}.{m}.weight"), vec![o, i]));
                if bias {
                    out.push((format!("{p}.{m}.bias"), vec![o]));
                }
            }
        }
        out
    }

    /// Checks the config against a checkpoint before anything is allocated for it: the
    /// layer count equals the layers present, every tensor the model reads is there with
    /// its shape, and no tensor is left unused (a bias the config does not enable, a layer
    /// beyond `num_hidden_layers`, a head it does not have). A tied `lm_head.weight` must
    /// equal the embeddings.
    pub fn check_weights(&self, w: &Weights) -> Result<()> {
        let from = w
            .origin()
            .map(|p| format!(" in {}", p.display()))
            .unwrap_or_default();
        let layers: BTreeSet<usize> = w
            .names()
            .filter_map(|n| {
                n.strip_prefix("model.layers.")?
                    .split('.')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        let contiguous = layers.iter().enumerate().all(|(i, &l)| i == l);
        if layers.len() != self.num_layers || !contiguous {
            return Err(Error::config(
                "num_hidden_layers",
                format!(
                    "is {} but the weights{from} hold {} layers{}",
                    self.num_layers,
                    layers.len(),
                    if contiguous {
                        String::new()
                    } else {
                        format!(" (numbered up to {})", layers.last().copied().unwrap_or(0))
                    }
                ),
            ));
        }
        let embed = w.get("model.embed_tokens.weight")?;
        if embed.dims() != [self.vocab_size, self.hidden_size] {
            return Err(Error::config(
                "vocab_size",
                format!(
                    "vocab_size {} × hidden_size {} does not match the embedding `model.embed_tokens.weight`{from} of shape {:?}",
                    self.vocab_size,
                    self.hidden_size,
                    embed.dims()
                ),
            ));
        }
        let expected = self.expected_tensors();
        for (name, shape) in &expected {
            w.get_shaped(name, shape)?;
        }
        let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for name in w.names() {
            if known.contains(name.as_str()) || ignorable(name) {
                continue;
            }
            if name == "lm_head.weight" && self.tie_word_embeddings {
                let same = w.get(name)?.dims() == embed.dims()
                    && w.get(name)?
                        .ne(embed)?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<u8>()?
                        == 0;
                if same {
                    continue;
                }
                return Err(Error::config(
                    "tie_word_embeddings",
                    format!("is true but `lm_head.weight`{from} differs from the embeddings"),
                ));
            }
            let why = if name.ends_with(".bias") && name.contains(".self_attn.") {
                " (attention_bias is false)"
            } else if name.ends_with(".bias") && name.contains(".mlp.") {
                " (mlp_bias is false)"
            } else {
                ""
            };
            return Err(Error::config(
                "architecture",
                format!("tensor `{name}`{from} is not used by the model{why}"),
            ));
        }
        Ok(())
    }
}
