//! DeBERTa-v2/v3 `config.json` (`model_type` `deberta-v2`), read leniently with the defaults
//! of transformers 4.46.3's `DebertaV2Config`, and resolved into the values
//! `modeling_deberta_v2.py` actually computes with. Options this crate does not compute
//! exactly are refused with an error naming the key.

use serde::Deserialize;

use crate::error::{Error, Result};

/// `DebertaV2Config`'s keys and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct DebertaConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "p01")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "p01")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "d_init")]
    pub initializer_range: f32,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub relative_attention: bool,
    #[serde(default = "minus_one")]
    pub max_relative_positions: i64,
    #[serde(default = "minus_one")]
    pub position_buckets: i64,
    #[serde(default = "yes")]
    pub position_biased_input: bool,
    /// A list, or a `|`-separated string (`"p2c|c2p"`), as transformers accepts.
    #[serde(default)]
    pub pos_att_type: Option<serde_json::Value>,
    #[serde(default)]
    pub share_att_key: bool,
    #[serde(default)]
    pub norm_rel_ebd: Option<String>,
    #[serde(default)]
    pub conv_kernel_size: usize,
    #[serde(default)]
    pub attention_head_size: Option<usize>,
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default)]
    pub pooler_hidden_size: Option<usize>,
    #[serde(default)]
    pub pooler_dropout: f32,
    #[serde(default = "gelu")]
    pub pooler_hidden_act: String,
    /// Dropout before the classifier (`DebertaV2ForSequenceClassification` reads
    /// `cls_dropout`, falling back to `hidden_dropout_prob`).
    #[serde(default)]
    pub cls_dropout: Option<f32>,
}

fn d_vocab() -> usize {
    128100
}
fn d_hidden() -> usize {
    1536
}
fn d_layers() -> usize {
    24
}
fn d_heads() -> usize {
    24
}
fn d_inter() -> usize {
    6144
}
fn gelu() -> String {
    "gelu".into()
}
fn p01() -> f32 {
    0.1
}
fn d_max_pos() -> usize {
    512
}
fn d_init() -> f32 {
    0.02
}
fn d_eps() -> f64 {
    1e-7
}
fn minus_one() -> i64 {
    -1
}
fn yes() -> bool {
    true
}

/// Which disentangled terms the attention adds (`pos_att_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PosAtt {
    /// Content-to-position: query · position key.
    pub c2p: bool,
    /// Position-to-content: key · position query.
    pub p2c: bool,
}

impl PosAtt {
    /// transformers' `scale_factor`: 1 plus one per term, counted even without
    /// `relative_attention`.
    pub fn scale_factor(&self) -> usize {
        1 + self.c2p as usize + self.p2c as usize
    }
}

/// The relative-position geometry of the encoder (`relative_attention` true).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelGeometry {
    /// `position_buckets` (> 0: log buckets) or -1.
    pub buckets: i64,
    /// `max_relative_positions`, defaulted to `max_position_embeddings` when < 1.
    pub max_relative: i64,
    /// `att_span` = `pos_ebd_size`: buckets when > 0, else `max_relative`; the table of
    /// relative embeddings holds 2 · span rows.
    pub span: usize,
}

impl DebertaConfig {
    pub fn from_json(v: &serde_json::Value, path: &std::path::Path) -> Result<Self> {
        let c: DebertaConfig = serde_json::from_value(v.clone())
            .map_err(|e| Error::format(path, format!("invalid DeBERTa-v2 config.json: {e}")))?;
        let bad = |k: &str, why: String| Err(Error::format(path, format!("`{k}`: {why}")));
        if c.hidden_act != "gelu" {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (gelu only)", c.hidden_act),
            );
        }
        if c.pooler_hidden_act != "gelu" && c.pooler_hidden_act != "tanh" {
            return bad(
                "pooler_hidden_act",
                format!("`{}` is not supported (gelu or tanh)", c.pooler_hidden_act),
            );
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!("must divide hidden_size {}", c.hidden_size),
            );
        }
        let d = c.hidden_size / c.num_attention_heads;
        if let Some(a) = c.attention_head_size.filter(|&a| a != d) {
            return bad(
                "attention_head_size",
                format!("{a} differs from hidden_size / num_attention_heads = {d}; not supported"),
            );
        }
        if c.conv_kernel_size > 0 {
            return bad(
                "conv_kernel_size",
                format!(
                    "{}: the convolution layer of DeBERTa-v2 xlarge is not supported",
                    c.conv_kernel_size
                ),
            );
        }
        if let Some(p) = c.pooler_hidden_size.filter(|&p| p != c.hidden_size) {
            return bad(
                "pooler_hidden_size",
                format!(
                    "{p} differs from hidden_size {}; not supported",
                    c.hidden_size
                ),
            );
        }
        if c.embedding_size == Some(0) {
            return bad("embedding_size", "must be positive".into());
        }
        for (k, p) in [
            ("hidden_dropout_prob", c.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                c.attention_probs_dropout_prob,
            ),
            ("pooler_dropout", c.pooler_dropout),
            ("cls_dropout", c.cls_dropout.unwrap_or(0.0)),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(k, format!("{p} is not in [0, 1)"));
            }
        }
        let in_file = |e: Error| Error::format(path, e.to_string());
        c.pos_att().map_err(in_file)?;
        c.norm_rel().map_err(in_file)?;
        if c.relative_attention {
            let g = c.rel_geometry();
            if g.span == 0 {
                return bad(
                    "max_relative_positions",
                    "the relative-position span is 0".into(),
                );
            }
        }
        Ok(c)
    }

    /// Head dim d.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Width of the token embeddings (`embedding_size`, else `hidden_size`).
    pub fn embed_dim(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    /// `pos_att_type`, lower-cased as transformers does; entries other than `c2p` / `p2c`
    /// are refused.
    pub fn pos_att(&self) -> Result<PosAtt> {
        let items: Vec<String> = match &self.pos_att_type {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) => s
                .to_lowercase()
                .split('|')
                .map(|x| x.trim().to_string())
                .collect(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        Error::config("pos_att_type", format!("entry {x} is not a string"))
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::config(
                    "pos_att_type",
                    format!("{other} is neither a list nor a string"),
                ))
            }
        };
        let mut p = PosAtt::default();
        for it in items {
            match it.as_str() {
                "c2p" => p.c2p = true,
                "p2c" => p.p2c = true,
                other => {
                    return Err(Error::config(
                        "pos_att_type",
                        format!("entry `{other}` is not supported (c2p and p2c only)"),
                    ))
                }
            }
        }
        Ok(p)
    }

    /// Whether the relative embeddings go through the encoder's LayerNorm (`norm_rel_ebd`
    /// holding `layer_norm`); entries other than `none` / `layer_norm` are refused.
    pub fn norm_rel(&self) -> Result<bool> {
        let s = self
            .norm_rel_ebd
            .as_deref()
            .unwrap_or("none")
            .to_lowercase();
        let mut ln = false;
        for it in s.split('|').map(str::trim) {
            match it {
                "none" => {}
                "layer_norm" => ln = true,
                other => {
                    return Err(Error::config(
                        "norm_rel_ebd",
                        format!("entry `{other}` is not supported (none or layer_norm)"),
                    ))
                }
            }
        }
        Ok(ln)
    }

    /// The relative-position geometry, as `DisentangledSelfAttention.__init__` resolves it.
    pub fn rel_geometry(&self) -> RelGeometry {
        let max_relative = if self.max_relative_positions < 1 {
            self.max_position_embeddings as i64
        } else {
            self.max_relative_positions
        };
        let span = if self.position_buckets > 0 {
            self.position_buckets
        } else {
            max_relative
        };
        RelGeometry {
            buckets: self.position_buckets,
            max_relative,
            span: span.max(0) as usize,
        }
    }

    /// Dropout before the classifier.
    pub fn classifier_dropout(&self) -> f32 {
        self.cls_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}
