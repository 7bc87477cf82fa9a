//! LLaMA-family decoder with Hugging Face semantics (transformers' `modeling_llama.py`):
//! RMSNorm, rotate-half RoPE, grouped-query attention, SiLU-gated MLP, tied or separate
//! LM head, causal plus padding mask. Every linear layer can carry an adapter.
//!
//! Shape letters: b batch, t new positions, s key positions (cache + new), h query heads,
//! g key/value heads, r = h/g, d head dim, e hidden size, v vocabulary.

use candle_core::{DType, Device, Tensor, D};

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::models::config::LlamaConfig;
use crate::models::{CausalLm, Ctx, Family, Linear, Model, Objective};
use crate::ops;

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
}

/// Keys and values of past positions, per layer: (b, g, s, d) each.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the rows `idx` of the batch (beam search reorders hypotheses).
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        for l in self.layers.iter_mut().flatten() {
            *l = (l.0.index_select(idx, 0)?, l.1.index_select(idx, 0)?);
        }
        Ok(())
    }
}

fn linear(w: &Weights, path: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get_shaped(&format!("{path}.weight"), &[out_dim, in_dim])?;
    let bias = if bias {
        Some(w.get_shaped(&format!("{path}.bias"), &[out_dim])?)
    } else {
        None
    };
    Ok(Linear::new(path, weight, bias))
}

impl Llama {
    /// Builds the model from weights in Hugging Face naming; every tensor's shape is checked.
    pub fn load(cfg: &LlamaConfig, w: &Weights) -> Result<Self> {
        let (e, hd) = (cfg.hidden_size, cfg.head_dim);
        let embed = w.get_shaped("model.embed_tokens.weight", &[cfg.vocab_size, e])?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let ab = cfg.attention_bias;
            let mb = cfg.mlp_bias;
            blocks.push(Block {
                input_norm: w.get_shaped(&format!("{p}.input_layernorm.weight"), &[e])?,
                attn: Attention {
                    q: linear(
                        w,
                        &format!("{p}.self_attn.q_proj"),
                        cfg.num_heads * hd,
                        e,
                        ab,
                    )?,
                    k: linear(
                        w,
                        &format!("{p}.self_attn.k_proj"),
                        cfg.num_kv_heads * hd,
                        e,
                        ab,
                    )?,
                    v: linear(
                        w,
                        &format!("{p}.self_attn.v_proj"),
                        cfg.num_kv_heads * hd,
                        e,
                        ab,
                    )?,
                    o: linear(
                        w,
                        &format!("{p}.self_attn.o_proj"),
                        e,
                        cfg.num_heads * hd,
                        ab,
                    )?,
                },
                post_norm: w.get_shaped(&format!("{p}.post_attention_layernorm.weight"), &[e])?,
                mlp: Mlp {
                    gate: linear(
                        w,
                        &format!("{p}.mlp.gate_proj"),
                        cfg.intermediate_size,
                        e,
                        mb,
                    )?,
                    up: linear(w, &format!("{p}.mlp.up_proj"), cfg.intermediate_size, e, mb)?,
                    down: linear(
                        w,
                        &format!("{p}.mlp.down_proj"),
                        e,
                        cfg.intermediate_size,
                        mb,
                    )?,
                },
            });
        }
        let norm = w.get_shaped("model.norm.weight", &[e])?;
        let lm_head = if cfg.tie_word_embeddings || !w.contains("lm_head.weight") {
            Linear::new("lm_head", embed.clone(), None)
        } else {
            linear(w, "lm_head", cfg.vocab_size, e, false)?
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
        })
    }

    pub fn linears_iter(&self) -> impl Iterator<Item = &Linear> {
        self.blocks
            .iter()
            .flat_map(|b| {
                [
                    &b.attn.q,
                    &b.attn.k,
                    &b.attn.v,
                    &b.attn.o,
                    &b.mlp.gate,
                    &b.mlp.up,
                    &b.mlp.down,
                ]
            })
            .chain(std::iter::once(&self.lm_head))
    }

    pub fn linears_iter_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| {
                let Block { attn, mlp, .. } = b;
                let Attention { q, k, v, o } = attn;
                let Mlp { gate, up, down } = mlp;
                [q, k, v, o, gate, up, down]
            })
            .chain(std::iter::once(&mut self.lm_head))
    }

    /// [`crate::adapters::inject_lora`] on this model.
    pub fn inject_lora(
        &mut self,
        cfg: &crate::adapters::LoraConfig,
        seed: u64,
    ) -> Result<Vec<String>> {
        crate::adapters::inject_lora(self, cfg, seed)
    }

    /// [`crate::adapters::inject_full`] on this model.
    pub fn inject_full(&mut self, targets: &crate::adapters::TargetModules) -> Result<Vec<String>> {
        crate::adapters::inject_full(self, targets)
    }

    /// All base weights in Hugging Face naming (adapters merged in when `merged`).
    fn base_weights_impl(&self, merged: bool) -> Result<Weights> {
        let mut w = Weights::new(None);
        w.insert("model.embed_tokens.weight", self.embed.clone());
        w.insert("model.norm.weight", self.norm.clone());
        for (i, b) in self.blocks.iter().enumerate() {
            w.insert(
                format!("model.layers.{i}.input_layernorm.weight"),
                b.input_norm.clone(),
            );
            w.insert(
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                b.post_norm.clone(),
            );
        }
        for l in self.linears_iter() {
            if l.path == "lm_head" && self.cfg.tie_word_embeddings {
                continue;
            }
            w.insert(
                format!("{}.weight", l.path),
                if merged {
                    l.merged_weight()?
                } else {
                    l.weight.clone()
                },
            );
            if let Some(b) = &l.bias {
                w.insert(format!("{}.bias", l.path), b.clone());
            }
        }
        Ok(w)
    }

    /// Final hidden states (b, t, e).
    ///
    /// `attention_mask` (b, s) marks real tokens (1) and padding (0) over cached plus new
    /// positions; `positions` (b, t) gives RoPE positions (default: cache length + 0..t).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let s = past + t;
        let dev = input_ids.device().clone();
        let pos: Vec<u32> = match positions {
            Some(p) => p.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?,
            None => (0..b).flat_map(|_| (past as u32)..(s as u32)).collect(),
        };
        let (cos, sin) = self.rope_tables(&pos, b, t, &dev)?; // (b, t, d/2)
        if let Some(m) = attention_mask {
            if m.dims() != [b, s] {
                return Err(Error::ShapeMismatch {
                    name: "attention_mask".into(),
                    expected: vec![b, s],
                    got: m.dims().to_vec(),
                });
            }
        }

        let ids = input_ids.flatten_all()?;
        let mut x = self
            .embed
            .index_select(&ids, 0)?
            .reshape((b, t, self.cfg.hidden_size))?;
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.blocks.len() {
                c.layers = (0..self.blocks.len()).map(|_| None).collect();
            }
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = ops::rms_norm(&x, &blk.input_norm, self.cfg.rms_norm_eps)?;
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let a = self.attention(&blk.attn, &h, &cos, &sin, attention_mask, layer_cache, ctx)?;
            x = (x + a)?;
            let h = ops::rms_norm(&x, &blk.post_norm, self.cfg.rms_norm_eps)?;
            let gate = blk.mlp.gate.forward(&h, ctx)?;
            let up = blk.mlp.up.forward(&h, ctx)?;
            let m = blk.mlp.down.forward(&ops::silu_mul(&gate, &up)?, ctx)?;
            x = (x + m)?;
        }
        ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Logits (.., v) of hidden states (.., e).
    pub fn logits(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.lm_head.forward(hidden, ctx)
    }

    /// Logits (b, t, v) of every position.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask, None, None, ctx)?;
        self.logits(&h, ctx)
    }

    /// Mean next-token cross-entropy; `labels` (b, t) are already shifted (label of
    /// position i is the token at i+1, −100 where ignored).
    pub fn loss(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        labels: &Tensor,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, Some(attention_mask), None, None, ctx)?; // (b, t, e)
        self.loss_from_hidden(&h, labels, ctx)
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Mean cross-entropy of the LM head's logits of `hidden` (.., e) against `labels`
    /// (..). Without an adapter on the head the (n, v) logits are never materialised
    /// (`ops::linear_cross_entropy` projects and scores rows in chunks).
    pub fn loss_from_hidden(&self, hidden: &Tensor, labels: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let e = self.cfg.hidden_size;
        let h = hidden.reshape(((), e))?; // (n, e)
        let labels = labels.flatten_all()?; // (n,)
        if self.lm_head.adapter.is_none() && self.lm_head.bias.is_none() {
            return ops::linear_cross_entropy(&h, &self.lm_head.weight, &labels);
        }
        let logits = self.lm_head.forward(&h, ctx)?; // (n, v)
        ops::cross_entropy(&logits, &labels)
    }

    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        key_mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (b, t, _e) = x.dims3()?;
        let (h, g, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let q =
            a.q.forward(x, ctx)?
                .reshape((b, t, h, d))?
                .transpose(1, 2)?
                .contiguous()?; // (b, h, t, d)
        let k =
            a.k.forward(x, ctx)?
                .reshape((b, t, g, d))?
                .transpose(1, 2)?
                .contiguous()?; // (b, g, t, d)
        let v =
            a.v.forward(x, ctx)?
                .reshape((b, t, g, d))?
                .transpose(1, 2)?
                .contiguous()?; // (b, g, t, d)
        let q = ops::rope(&q, cos, sin)?;
        let mut k = ops::rope(&k, cos, sin)?;
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?; // (b, g, s, d)
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let past = k.dims()[2] - t;
        // Fused attention: recomputes scores in backward instead of storing (b, h, t, s).
        let y = ops::causal_attention(&q, &k, &v, key_mask, past)?; // (b, h, t, d)
        let y = y.transpose(1, 2)?.reshape((b, t, h * d))?; // (b, t, h·d)
        a.o.forward(&y, ctx)
    }

    /// cos/sin tables (b, t, d/2) for the given positions, computed in f32 like transformers.
    fn rope_tables(
        &self,
        pos: &[u32],
        b: usize,
        t: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        let d = self.cfg.head_dim as f32;
        let base = self.cfg.rope_theta as f32;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / d))
            .collect();
        let mut cos = Vec::with_capacity(pos.len() * half);
        let mut sin = Vec::with_capacity(pos.len() * half);
        for &p in pos {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (b, t, half), dev)?,
            Tensor::from_vec(sin, (b, t, half), dev)?,
        ))
    }
}

impl Model for Llama {
    fn arch(&self) -> &'static str {
        "llama"
    }

    fn family(&self) -> Family {
        Family::Decoder
    }

    fn objective(&self) -> Objective {
        Objective::CausalLm
    }

    fn device(&self) -> &Device {
        self.embed.device()
    }

    fn linears(&self) -> Vec<&Linear> {
        self.linears_iter().collect()
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.linears_iter_mut().collect()
    }

    fn is_output_head(&self, path: &str) -> bool {
        path == "lm_head"
    }

    fn check_full_finetune(&self, path: &str) -> Result<()> {
        if path == "lm_head" && self.cfg.tie_word_embeddings {
            // The merged model could not hold a head that differs from the embeddings.
            return Err(Error::config(
                "target_modules",
                "lm_head is tied to the embeddings and cannot be fully fine-tuned",
            ));
        }
        Ok(())
    }

    fn loss(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        Llama::loss(
            self,
            &batch.input_ids,
            &batch.attention_mask,
            &batch.labels,
            ctx,
        )
    }

    fn validation_loss(&self, batch: &Batch) -> Result<Tensor> {
        let ctx = Ctx::eval();
        // Detached: no backward follows, so the loss need not form the hidden-state gradient
        // (one LM-head-sized GEMM per batch) that a tracked input would ask for.
        let h = self
            .forward_hidden(
                &batch.input_ids,
                Some(&batch.attention_mask),
                None,
                None,
                &ctx,
            )?
            .detach();
        self.loss_from_hidden(&h, &batch.labels, &ctx)
    }

    fn base_weights(&self, merged: bool) -> Result<Weights> {
        self.base_weights_impl(merged)
    }

    fn hf_config(&self, source: &serde_json::Value) -> Result<serde_json::Value> {
        let mut cv = source.clone();
        if let serde_json::Value::Object(m) = &mut cv {
            m.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
            m.insert("model_type".into(), serde_json::json!("llama"));
            m.insert("torch_dtype".into(), serde_json::json!("float32"));
            m.entry("hidden_act").or_insert(serde_json::json!("silu"));
            // Unset optional fields are left out rather than written as null.
            m.retain(|_, v| !v.is_null());
        }
        Ok(cv)
    }

    fn as_causal_lm(&self) -> Option<&dyn CausalLm> {
        Some(self)
    }
}

impl CausalLm for Llama {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.cfg.eos_token_ids
    }

    fn device(&self) -> &Device {
        self.embed.device()
    }

    fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        Llama::forward_hidden(self, input_ids, attention_mask, positions, cache, ctx)
    }

    fn logits(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        Llama::logits(self, hidden, ctx)
    }
}

/// Index of the largest value per row of (n, v) logits.
pub fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1()?)
}
