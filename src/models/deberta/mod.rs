//! DeBERTa-v2 / v3 encoder with transformers 4.46.3's semantics (`modeling_deberta_v2.py`,
//! `DebertaV2Model`, `DebertaV2ForSequenceClassification`): word (+ absolute position when
//! `position_biased_input`) (+ token-type) embeddings, `embed_proj` when `embedding_size`
//! differs, LayerNorm and the padding-mask multiply; post-LN blocks whose self-attention
//! is disentangled ([`crate::ops::disentangled_attention`]: content-to-position and
//! position-to-content terms over (log-)bucketed relative positions, scaled by
//! `1/√(d · (1 + |pos_att_type|))`); ContextPooler (dense + `pooler_hidden_act` on the
//! first token) and a linear classifier; cross-entropy, or MSE for one regression output.
//!
//! Module paths are those PEFT sees under `DebertaV2ForSequenceClassification`:
//! `deberta.encoder.layer.N.attention.self.query_proj`, `pooler.dense`, `classifier`;
//! the bare `encoder.layer.N…` of `DebertaV2Model` without a head.
//!
//! Shape letters: b batch, t positions, h heads, d head dim, e hidden size, m embedding
//! size, r = 2·span relative embeddings, n labels.

pub mod config;
mod load;
pub mod rel_pos;

use candle_core::{DType, Device, Tensor};

use self::config::{DebertaConfig, PosAtt, RelGeometry};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::models::{Ctx, Family, Linear, Model, Objective, SequenceClassifier, TrainableLinear};
use crate::ops;

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    /// `pos_key_proj` / `pos_query_proj` (relative attention without `share_att_key`).
    pos_k: Option<Linear>,
    pos_q: Option<Linear>,
    attn_out: Linear,
    attn_norm: (Tensor, Tensor),
    inter: Linear,
    out: Linear,
    out_norm: (Tensor, Tensor),
}

/// The encoder's relative embeddings (r, e) and their optional LayerNorm.
struct RelEmbeddings {
    table: Tensor,
    norm: Option<(Tensor, Tensor)>,
    geometry: RelGeometry,
}

enum Pooler {
    Frozen(Linear),
    Trained(TrainableLinear),
}

enum Classifier {
    Trained(TrainableLinear),
    Frozen(Linear),
}

pub struct Deberta {
    pub cfg: DebertaConfig,
    /// `deberta.` under a sequence head, empty for the bare encoder.
    prefix: String,
    word: Tensor,
    position: Option<Tensor>,
    token_type: Option<Tensor>,
    embed_proj: Option<Linear>,
    embed_norm: (Tensor, Tensor),
    rel: Option<RelEmbeddings>,
    /// The relative LayerNorm of a config without relative attention (unused).
    idle_rel_norm: Option<(Tensor, Tensor)>,
    pos_att: PosAtt,
    layers: Vec<Layer>,
    pooler: Option<Pooler>,
    classifier: Option<Classifier>,
    classifier_dropout: f32,
    objective: Objective,
}

impl Deberta {
    /// Final hidden states (b, t, e). `mask` (b, t) is 1 for real tokens, 0 for padding.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        mask: &Tensor,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let (e, m) = (self.cfg.hidden_size, self.cfg.embed_dim());
        if self.position.is_some() && t > self.cfg.max_position_embeddings {
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
        let mut x = self.word.index_select(&ids, 0)?.reshape((b, t, m))?; // (b, t, m)
        if let Some(pos) = &self.position {
            x = x.broadcast_add(&pos.narrow(0, 0, t)?.unsqueeze(0)?)?;
        }
        if let Some(tt) = &self.token_type {
            let types = match token_type_ids {
                Some(ty) => ty.flatten_all()?,
                None => Tensor::zeros(b * t, DType::U32, input_ids.device())?,
            };
            x = (x + tt.index_select(&types, 0)?.reshape((b, t, m))?)?;
        }
        if let Some(proj) = &self.embed_proj {
            x = proj.forward(&x, ctx)?; // (b, t, m) -> (b, t, e)
        }
        let eps = self.cfg.layer_norm_eps;
        let p = self.cfg.hidden_dropout_prob;
        let maskf = mask.to_dtype(DType::F32)?; // (b, t)
        x = ops::layer_norm(&x, &self.embed_norm.0, &self.embed_norm.1, eps)?;
        x = ctx.dropout(&x.broadcast_mul(&maskf.unsqueeze(2)?)?, p)?;

        let (h, d) = (self.cfg.num_attention_heads, self.cfg.head_dim());
        let scale = 1.0 / ((d * self.pos_att.scale_factor()) as f64).sqrt();
        let rel = match &self.rel {
            Some(r) => {
                let table = match &r.norm {
                    Some((w, bias)) => ops::layer_norm(&r.table, w, bias, eps)?,
                    None => r.table.clone(),
                }; // (r, e)
                let (c2p, p2c) = rel_pos::tables(t, &r.geometry);
                let index = ops::RelIndex::new(t, r.geometry.span, c2p, p2c)?;
                Some((table, index))
            }
            None => None,
        };
        // (r, e) -> (h, r, d)
        let pos_heads = |y: Tensor| -> Result<Tensor> {
            let r = y.dim(0)?;
            Ok(y.reshape((r, h, d))?.transpose(0, 1)?.contiguous()?)
        };
        for l in &self.layers {
            // (b, t, e) -> (b, h, t, d), transposed views.
            let heads =
                |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, t, h, d))?.transpose(1, 2)?) };
            let q = heads(l.q.forward(&x, ctx)?)?;
            let k = heads(l.k.forward(&x, ctx)?)?;
            let v = heads(l.v.forward(&x, ctx)?)?;
            let (mut pk, mut pq) = (None, None);
            if let Some((table, _)) = &rel {
                // `pos_dropout`, drawn in every layer as transformers does.
                let table = ctx.dropout(table, p)?;
                if self.pos_att.c2p {
                    let proj = l.pos_k.as_ref().unwrap_or(&l.k);
                    pk = Some(pos_heads(proj.forward(&table, ctx)?)?);
                }
                if self.pos_att.p2c {
                    let proj = l.pos_q.as_ref().unwrap_or(&l.q);
                    pq = Some(pos_heads(proj.forward(&table, ctx)?)?);
                }
            }
            let index = rel.as_ref().map(|(_, i)| i);
            let a = ops::disentangled_attention(
                &q,
                &k,
                &v,
                pk.as_ref(),
                pq.as_ref(),
                index,
                Some(&maskf),
                scale,
            )?; // (b, h, t, d)
            let a = a.transpose(1, 2)?.reshape((b, t, e))?; // (b, t, e)
            let a = ctx.dropout(&l.attn_out.forward(&a, ctx)?, p)?;
            x = ops::layer_norm(&(a + &x)?, &l.attn_norm.0, &l.attn_norm.1, eps)?;
            let i = ops::gelu_erf(&l.inter.forward(&x, ctx)?)?; // (b, t, inter)
            let o = ctx.dropout(&l.out.forward(&i, ctx)?, p)?;
            x = ops::layer_norm(&(o + &x)?, &l.out_norm.0, &l.out_norm.1, eps)?;
        }
        Ok(x)
    }

    /// ContextPooler: `act(dense(dropout(hidden[:, 0])))` (b, e).
    pub fn pool(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?; // (b, e)
        let first = ctx.dropout(&first, self.cfg.pooler_dropout)?;
        let y = match &self.pooler {
            Some(Pooler::Frozen(l)) => l.forward(&first, ctx)?,
            Some(Pooler::Trained(l)) => l.forward(&first)?,
            None => return Err(Error::msg("the model has no pooler")),
        };
        match self.cfg.pooler_hidden_act.as_str() {
            "tanh" => Ok(y.tanh()?),
            _ => ops::gelu_erf(&y),
        }
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

impl Model for Deberta {
    fn arch(&self) -> &'static str {
        "deberta-v2"
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
        let mut v: Vec<&Linear> = self.embed_proj.iter().collect();
        for l in &self.layers {
            v.extend([&l.q, &l.k, &l.v]);
            v.extend(l.pos_k.iter().chain(l.pos_q.iter()));
            v.extend([&l.attn_out, &l.inter, &l.out]);
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
        let mut v: Vec<&mut Linear> = self.embed_proj.iter_mut().collect();
        for l in &mut self.layers {
            let Layer {
                q,
                k,
                v: val,
                pos_k,
                pos_q,
                attn_out,
                inter,
                out,
                ..
            } = l;
            v.extend([q, k, val]);
            v.extend(pos_k.iter_mut().chain(pos_q.iter_mut()));
            v.extend([attn_out, inter, out]);
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
        if let Some(pos) = &self.position {
            w.insert(
                format!("{p}embeddings.position_embeddings.weight"),
                pos.clone(),
            );
        }
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
        let rel_norm = self.rel.as_ref().and_then(|r| r.norm.as_ref());
        if let Some(n) = rel_norm.or(self.idle_rel_norm.as_ref()) {
            norm(format!("{p}encoder.LayerNorm"), n);
        }
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
        if let Some(r) = &self.rel {
            w.insert(format!("{p}encoder.rel_embeddings.weight"), r.table.clone());
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
            m.insert("model_type".into(), serde_json::json!("deberta-v2"));
            m.insert("torch_dtype".into(), serde_json::json!("float32"));
            if self.classifier.is_some() {
                let n = match self.objective {
                    Objective::Classification { num_labels } => num_labels,
                    _ => 1,
                };
                m.insert(
                    "architectures".into(),
                    serde_json::json!(["DebertaV2ForSequenceClassification"]),
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
                    "cls_dropout".into(),
                    serde_json::json!(self.classifier_dropout),
                );
            } else {
                m.insert(
                    "architectures".into(),
                    serde_json::json!(["DebertaV2Model"]),
                );
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
                "attention-probability dropout ({} in config.json) is not applied in training; hidden, relative-embedding, pooler and classifier dropout are",
                self.cfg.attention_probs_dropout_prob
            ));
        }
        v
    }
}

impl SequenceClassifier for Deberta {
    fn classify(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        self.logits(batch, ctx)
    }
}
