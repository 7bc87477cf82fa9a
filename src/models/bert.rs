//! BERT encoder with transformers' semantics (`modeling_bert.py`,
//! `BertForSequenceClassification`): word + absolute position + token-type embeddings,
//! post-LN blocks (LayerNorm with bias after each residual), exact (erf) GELU, bidirectional
//! attention with a key padding mask, tanh pooler on [CLS], dropout and a linear classifier;
//! cross-entropy for classification, mean squared error for one regression output.
//!
//! Module paths follow the class the run needs: `bert.encoder.layer.N.attention.self.query`
//! and `classifier` under a sequence head (the keys PEFT writes for
//! `AutoModelForSequenceClassification`), the bare `encoder.layer.N…` of `BertModel` without.
//! Checkpoints may use either naming.
//!
//! Shape letters: b batch, t positions, h heads, d head dim, e hidden size, n labels.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::io::{LoadedModel, Weights};
use crate::models::{
    Ctx, Family, HeadSpec, Linear, Model, Objective, SequenceClassifier, TrainableLinear,
};
use crate::ops;

/// BERT's `config.json` keys, transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "p01")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "p01")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub classifier_dropout: Option<f32>,
    #[serde(default)]
    pub is_decoder: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(default)]
    pub problem_type: Option<String>,
    /// Standard deviation of the initialisation of new head layers.
    #[serde(default = "init_range")]
    pub initializer_range: f32,
}

fn init_range() -> f32 {
    0.02
}

fn gelu() -> String {
    "gelu".into()
}
fn p01() -> f32 {
    0.1
}
fn max_pos() -> usize {
    512
}
fn two() -> usize {
    2
}
fn ln_eps() -> f64 {
    1e-12
}

impl BertConfig {
    pub fn from_json(v: &serde_json::Value, path: &std::path::Path) -> Result<Self> {
        let c: BertConfig = serde_json::from_value(v.clone())
            .map_err(|e| Error::format(path, format!("invalid BERT config.json: {e}")))?;
        let bad = |k: &str, why: String| Err(Error::format(path, format!("`{k}`: {why}")));
        if c.hidden_act != "gelu" {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (gelu only)", c.hidden_act),
            );
        }
        if let Some(p) = c.position_embedding_type.as_deref() {
            if p != "absolute" {
                return bad(
                    "position_embedding_type",
                    format!("`{p}` is not supported (absolute only)"),
                );
            }
        }
        if c.is_decoder || c.add_cross_attention {
            return bad(
                "is_decoder",
                "decoder / cross-attention BERT is not supported".into(),
            );
        }
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            return bad(
                "num_attention_heads",
                format!("must divide hidden_size {}", c.hidden_size),
            );
        }
        for (k, p) in [
            ("hidden_dropout_prob", c.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                c.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(k, format!("{p} is not in [0, 1)"));
            }
        }
        Ok(c)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: (Tensor, Tensor),
    inter: Linear,
    out: Linear,
    out_norm: (Tensor, Tensor),
}

/// The pooler: a frozen checkpoint layer (adaptable) or a trained head.
enum Pooler {
    Frozen(Linear),
    Trained(TrainableLinear),
}

/// The classifier: trained (absent from the checkpoint) or the checkpoint's own (frozen,
/// adaptable when targeted).
enum Classifier {
    Trained(TrainableLinear),
    Frozen(Linear),
}

pub struct Bert {
    pub cfg: BertConfig,
    /// `bert.` under a sequence head, empty for the bare encoder.
    prefix: String,
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    embed_norm: (Tensor, Tensor),
    layers: Vec<Layer>,
    pooler: Option<Pooler>,
    classifier: Option<Classifier>,
    classifier_dropout: f32,
    objective: Objective,
}

/// Checkpoint tensors of `BertForPreTraining` / `BertForMaskedLM` heads and buffers that a
/// sequence classifier does not use (transformers drops them the same way).
fn ignorable(name: &str) -> bool {
    name.starts_with("cls.")
        || name.ends_with("embeddings.position_ids")
        || name.starts_with("bert.cls.")
}

/// Looks tensors up under both namings and records what was used.
struct Source<'a> {
    w: &'a Weights,
    /// `bert.` when the checkpoint is a `BertFor*` one.
    ckpt_prefix: &'static str,
    used: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl Source<'_> {
    fn name(&self, rel: &str) -> String {
        format!("{}{rel}", self.ckpt_prefix)
    }

    fn has(&self, rel: &str) -> bool {
        self.w.contains(&self.name(rel))
    }

    fn get(&self, rel: &str, shape: &[usize]) -> Result<Tensor> {
        let mut n = self.name(rel);
        // Old checkpoints name LayerNorm parameters gamma / beta.
        if !self.w.contains(&n) && rel.contains("LayerNorm.") {
            let old = n
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            if self.w.contains(&old) {
                n = old;
            }
        }
        let t = self.w.get_shaped(&n, shape)?;
        self.used.borrow_mut().insert(n);
        Ok(t.to_dtype(DType::F32)?)
    }

    /// A top-level (unprefixed) tensor such as `classifier.weight`.
    fn get_top(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.w.get_shaped(name, shape)?;
        self.used.borrow_mut().insert(name.to_string());
        Ok(t.to_dtype(DType::F32)?)
    }

    fn linear(&self, rel: &str, path: String, out: usize, inp: usize) -> Result<Linear> {
        let w = self.get(&format!("{rel}.weight"), &[out, inp])?;
        let b = self.get(&format!("{rel}.bias"), &[out])?;
        Ok(Linear::new(path, w, Some(b)))
    }

    fn norm(&self, rel: &str, e: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.get(&format!("{rel}.weight"), &[e])?,
            self.get(&format!("{rel}.bias"), &[e])?,
        ))
    }
}

impl Bert {
    /// Builds the encoder and the heads `head` asks for; every tensor's shape is checked and
    /// a checkpoint tensor the model would not use is an error.
    pub fn load(loaded: &LoadedModel, head: &HeadSpec) -> Result<Self> {
        let cfg = BertConfig::from_json(&loaded.config_json, &loaded.path.join("config.json"))?;
        let w = &loaded.weights;
        let ckpt_prefix = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let src = Source {
            w,
            ckpt_prefix,
            used: Default::default(),
        };
        let (e, inter) = (cfg.hidden_size, cfg.intermediate_size);
        // Sizes are checked against the embedding tensor before anything is allocated.
        let word = src.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, e])?;
        let position = src.get(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, e],
        )?;
        let token_type = if cfg.type_vocab_size > 0 {
            Some(src.get(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, e],
            )?)
        } else {
            None
        };
        let embed_norm = src.norm("embeddings.LayerNorm", e)?;
        let n_layers_present = w
            .names()
            .filter_map(|n| {
                n.strip_prefix(ckpt_prefix)?
                    .strip_prefix("encoder.layer.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map(|m| m + 1)
            .unwrap_or(0);
        if n_layers_present != cfg.num_hidden_layers {
            return Err(Error::format(
                &loaded.path,
                format!(
                    "config says num_hidden_layers = {}, the checkpoint holds {n_layers_present} layers",
                    cfg.num_hidden_layers
                ),
            ));
        }
        let (prefix, wants_head) = match head {
            HeadSpec::Sequence { .. } => ("bert.".to_string(), true),
            HeadSpec::Base => {
                let has_cls = w.contains("classifier.weight");
                (if has_cls { "bert.".into() } else { String::new() }, has_cls)
            }
            HeadSpec::CausalLm => {
                return Err(Error::config(
                    "model",
                    format!(
                        "{}: BERT is an encoder; instruction tuning and generation need a causal LM (pass --task for GLUE)",
                        loaded.path.display()
                    ),
                ))
            }
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let r = format!("encoder.layer.{i}");
            let p = format!("{prefix}{r}");
            layers.push(Layer {
                q: src.linear(
                    &format!("{r}.attention.self.query"),
                    format!("{p}.attention.self.query"),
                    e,
                    e,
                )?,
                k: src.linear(
                    &format!("{r}.attention.self.key"),
                    format!("{p}.attention.self.key"),
                    e,
                    e,
                )?,
                v: src.linear(
                    &format!("{r}.attention.self.value"),
                    format!("{p}.attention.self.value"),
                    e,
                    e,
                )?,
                attn_out: src.linear(
                    &format!("{r}.attention.output.dense"),
                    format!("{p}.attention.output.dense"),
                    e,
                    e,
                )?,
                attn_norm: src.norm(&format!("{r}.attention.output.LayerNorm"), e)?,
                inter: src.linear(
                    &format!("{r}.intermediate.dense"),
                    format!("{p}.intermediate.dense"),
                    inter,
                    e,
                )?,
                out: src.linear(
                    &format!("{r}.output.dense"),
                    format!("{p}.output.dense"),
                    e,
                    inter,
                )?,
                out_norm: src.norm(&format!("{r}.output.LayerNorm"), e)?,
            });
        }
        let dev = word.device().clone();
        let seed = match head {
            HeadSpec::Sequence { seed, .. } => *seed,
            _ => 0,
        };
        let pooler = if src.has("pooler.dense.weight") {
            Some(Pooler::Frozen(src.linear(
                "pooler.dense",
                format!("{prefix}pooler.dense"),
                e,
                e,
            )?))
        } else if wants_head {
            Some(Pooler::Trained(TrainableLinear::init(
                &format!("{prefix}pooler.dense"),
                e,
                e,
                cfg.initializer_range,
                seed,
                &dev,
            )?))
        } else {
            None
        };
        let (classifier, objective) = match head {
            HeadSpec::Sequence { num_labels, .. } => {
                let n = *num_labels;
                if n == 0 {
                    return Err(Error::config("num_labels", "must be at least 1"));
                }
                let c = if w.contains("classifier.weight") {
                    Classifier::Frozen(Linear::new(
                        "classifier",
                        src.get_top("classifier.weight", &[n, e])?,
                        Some(src.get_top("classifier.bias", &[n])?),
                    ))
                } else {
                    Classifier::Trained(TrainableLinear::init(
                        "classifier",
                        e,
                        n,
                        cfg.initializer_range,
                        seed,
                        &dev,
                    )?)
                };
                (Some(c), objective_of(n))
            }
            _ => {
                if w.contains("classifier.weight") {
                    let n = w
                        .get("classifier.weight")?
                        .dims()
                        .first()
                        .copied()
                        .unwrap_or(0);
                    let c = Classifier::Frozen(Linear::new(
                        "classifier",
                        src.get_top("classifier.weight", &[n, e])?,
                        Some(src.get_top("classifier.bias", &[n])?),
                    ));
                    (Some(c), objective_of(n))
                } else {
                    (None, Objective::Encode)
                }
            }
        };
        let used = src.used.into_inner();
        if let Some(extra) = w.names().find(|n| !used.contains(*n) && !ignorable(n)) {
            return Err(Error::format(
                &loaded.path,
                format!("tensor `{extra}` is not part of a BERT encoder with a sequence head (another architecture?)"),
            ));
        }
        let classifier_dropout = match head {
            HeadSpec::Sequence {
                classifier_dropout: Some(p),
                ..
            } => *p,
            _ => cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob),
        };
        Ok(Bert {
            prefix,
            word,
            position,
            token_type,
            embed_norm,
            layers,
            pooler,
            classifier,
            classifier_dropout,
            objective,
            cfg,
        })
    }

    /// Final hidden states (b, t, e). `mask` (b, t) is 1 for real tokens, 0 for padding.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        mask: &Tensor,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let e = self.cfg.hidden_size;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::msg(format!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let ids = input_ids.flatten_all()?;
        if let Some(&bad) = ids
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&i| i as usize >= self.cfg.vocab_size)
        {
            return Err(Error::msg(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let mut x = self.word.index_select(&ids, 0)?.reshape((b, t, e))?; // (b, t, e)
        x = x.broadcast_add(&self.position.narrow(0, 0, t)?.unsqueeze(0)?)?;
        if let Some(tt) = &self.token_type {
            let types = match token_type_ids {
                Some(ty) => ty.flatten_all()?,
                None => Tensor::zeros(b * t, DType::U32, input_ids.device())?,
            };
            x = (x + tt.index_select(&types, 0)?.reshape((b, t, e))?)?;
        }
        let eps = self.cfg.layer_norm_eps;
        let p = self.cfg.hidden_dropout_prob;
        x = ctx.dropout(
            &ops::layer_norm(&x, &self.embed_norm.0, &self.embed_norm.1, eps)?,
            p,
        )?;
        let (h, d) = (
            self.cfg.num_attention_heads,
            e / self.cfg.num_attention_heads,
        );
        let scale = 1.0 / (d as f64).sqrt();
        for l in &self.layers {
            // Transposed views: `ops::attention` reads q, k, v through their strides.
            let heads = |y: Tensor| -> Result<Tensor> {
                Ok(y.reshape((b, t, h, d))?.transpose(1, 2)?) // (b, t, e) -> (b, h, t, d)
            };
            let q = heads(l.q.forward(&x, ctx)?)?;
            let k = heads(l.k.forward(&x, ctx)?)?;
            let v = heads(l.v.forward(&x, ctx)?)?;
            let a = ops::attention(&q, &k, &v, Some(mask), None, scale)?; // (b, h, t, d)
            let a = a.transpose(1, 2)?.reshape((b, t, e))?; // (b, t, e)
            let a = ctx.dropout(&l.attn_out.forward(&a, ctx)?, p)?;
            x = ops::layer_norm(&(a + &x)?, &l.attn_norm.0, &l.attn_norm.1, eps)?;
            let i = ops::gelu_erf(&l.inter.forward(&x, ctx)?)?; // (b, t, inter)
            let o = ctx.dropout(&l.out.forward(&i, ctx)?, p)?;
            x = ops::layer_norm(&(o + &x)?, &l.out_norm.0, &l.out_norm.1, eps)?;
        }
        Ok(x)
    }

    /// tanh(dense(hidden[:, 0])) (b, e).
    pub fn pool(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?; // (b, e)
        let y = match &self.pooler {
            Some(Pooler::Frozen(l)) => l.forward(&cls, ctx)?,
            Some(Pooler::Trained(l)) => l.forward(&cls)?,
            None => return Err(Error::msg("the model has no pooler")),
        };
        Ok(y.tanh()?)
    }

    /// Classifier outputs (b, n).
    pub fn logits(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        let hidden = self.encode(
            &batch.input_ids,
            batch.token_type_ids.as_ref(),
            &batch.attention_mask,
            ctx,
        )?;
        let pooled = ctx.dropout(&self.pool(&hidden, ctx)?, self.classifier_dropout)?;
        match &self.classifier {
            Some(Classifier::Trained(c)) => c.forward(&pooled),
            Some(Classifier::Frozen(c)) => c.forward(&pooled, ctx),
            None => Err(Error::msg(
                "the model has no classifier (load it with a sequence task)",
            )),
        }
    }
}

fn objective_of(num_labels: usize) -> Objective {
    if num_labels == 1 {
        Objective::Regression
    } else {
        Objective::Classification { num_labels }
    }
}

impl Model for Bert {
    fn arch(&self) -> &'static str {
        "bert"
    }

    fn family(&self) -> Family {
        Family::Encoder
    }

    fn objective(&self) -> Objective {
        self.objective
    }

    fn device(&self) -> &Device {
        self.word.device()
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut v = Vec::with_capacity(self.layers.len() * 6 + 2);
        for l in &self.layers {
            v.extend([&l.q, &l.k, &l.v, &l.attn_out, &l.inter, &l.out]);
        }
        if let Some(Pooler::Frozen(p)) = &self.pooler {
            v.push(p);
        }
        if let Some(Classifier::Frozen(c)) = &self.classifier {
            v.push(c);
        }
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::with_capacity(self.layers.len() * 6 + 2);
        for l in &mut self.layers {
            let Layer {
                q,
                k,
                v: val,
                attn_out,
                inter,
                out,
                ..
            } = l;
            v.extend([q, k, val, attn_out, inter, out]);
        }
        if let Some(Pooler::Frozen(p)) = &mut self.pooler {
            v.push(p);
        }
        if let Some(Classifier::Frozen(c)) = &mut self.classifier {
            v.push(c);
        }
        v
    }

    fn is_output_head(&self, path: &str) -> bool {
        path == "classifier"
    }

    fn heads(&self) -> Vec<&TrainableLinear> {
        let mut v = Vec::new();
        if let Some(Pooler::Trained(p)) = &self.pooler {
            v.push(p);
        }
        if let Some(Classifier::Trained(c)) = &self.classifier {
            v.push(c);
        }
        v
    }

    fn modules_to_save(&self) -> Vec<String> {
        let mut v = vec!["classifier".to_string()];
        if let Some(Pooler::Trained(_)) = &self.pooler {
            v.push("pooler".into());
        }
        v
    }

    fn loss(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        let logits = self.logits(batch, ctx)?; // (b, n)
        match self.objective {
            Objective::Regression => {
                let y = logits.squeeze(1)?; // (b,)
                let target = batch.labels.to_dtype(DType::F32)?;
                Ok((y - target)?.sqr()?.mean_all()?)
            }
            Objective::Classification { .. } => {
                let labels = batch.labels.to_dtype(DType::I64)?;
                ops::cross_entropy(&logits, &labels)
            }
            _ => Err(Error::msg("the model has no task head to compute a loss")),
        }
    }

    fn base_weights(&self, merged: bool) -> Result<Weights> {
        let mut w = Weights::new(None);
        let p = &self.prefix;
        w.insert(
            format!("{p}embeddings.word_embeddings.weight"),
            self.word.clone(),
        );
        w.insert(
            format!("{p}embeddings.position_embeddings.weight"),
            self.position.clone(),
        );
        if let Some(tt) = &self.token_type {
            w.insert(
                format!("{p}embeddings.token_type_embeddings.weight"),
                tt.clone(),
            );
        }
        let mut norm = |name: String, n: &(Tensor, Tensor)| {
            w.insert(format!("{name}.weight"), n.0.clone());
            w.insert(format!("{name}.bias"), n.1.clone());
        };
        norm(format!("{p}embeddings.LayerNorm"), &self.embed_norm);
        for (i, l) in self.layers.iter().enumerate() {
            norm(
                format!("{p}encoder.layer.{i}.attention.output.LayerNorm"),
                &l.attn_norm,
            );
            norm(
                format!("{p}encoder.layer.{i}.output.LayerNorm"),
                &l.out_norm,
            );
        }
        for l in self.linears() {
            let t = if merged {
                l.merged_weight()?
            } else {
                l.weight.clone()
            };
            w.insert(format!("{}.weight", l.path), t);
            if let Some(b) = &l.bias {
                w.insert(format!("{}.bias", l.path), b.clone());
            }
        }
        for h in self.heads() {
            w.insert(format!("{}.weight", h.path), h.weight.as_tensor().clone());
            w.insert(format!("{}.bias", h.path), h.bias.as_tensor().clone());
        }
        Ok(w)
    }

    fn hf_config(&self, source: &serde_json::Value) -> Result<serde_json::Value> {
        let mut cv = source.clone();
        if let serde_json::Value::Object(m) = &mut cv {
            m.insert("model_type".into(), serde_json::json!("bert"));
            m.insert("torch_dtype".into(), serde_json::json!("float32"));
            if self.classifier.is_some() {
                let n = num_labels_of(&self.objective);
                m.insert(
                    "architectures".into(),
                    serde_json::json!(["BertForSequenceClassification"]),
                );
                let id2label: serde_json::Map<String, serde_json::Value> = (0..n)
                    .map(|i| (i.to_string(), serde_json::json!(format!("LABEL_{i}"))))
                    .collect();
                let label2id: serde_json::Map<String, serde_json::Value> = (0..n)
                    .map(|i| (format!("LABEL_{i}"), serde_json::json!(i)))
                    .collect();
                m.insert("id2label".into(), serde_json::Value::Object(id2label));
                m.insert("label2id".into(), serde_json::Value::Object(label2id));
                let problem = if n == 1 {
                    "regression"
                } else {
                    "single_label_classification"
                };
                m.insert("problem_type".into(), serde_json::json!(problem));
                m.insert(
                    "classifier_dropout".into(),
                    serde_json::json!(self.classifier_dropout),
                );
            } else {
                m.insert("architectures".into(), serde_json::json!(["BertModel"]));
            }
        }
        Ok(cv)
    }

    fn as_classifier(&self) -> Option<&dyn SequenceClassifier> {
        self.classifier
            .as_ref()
            .map(|_| self as &dyn SequenceClassifier)
    }

    fn notes(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.cfg.attention_probs_dropout_prob > 0.0 {
            v.push(format!(
                "attention-probability dropout ({} in config.json) is not applied in training; hidden and classifier dropout are",
                self.cfg.attention_probs_dropout_prob
            ));
        }
        v
    }
}

fn num_labels_of(o: &Objective) -> usize {
    match o {
        Objective::Classification { num_labels } => *num_labels,
        _ => 1,
    }
}

impl SequenceClassifier for Bert {
    fn classify(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        self.logits(batch, ctx)
    }
}
