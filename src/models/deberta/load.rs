//! Building a [`Deberta`] from a checkpoint: tensors under `deberta.` (a
//! `DebertaV2For*` checkpoint) or bare (`DebertaV2Model`), every shape checked, every
//! tensor the model would not use refused, and the heads a run needs initialised when the
//! checkpoint lacks them.

use std::cell::RefCell;
use std::collections::HashSet;

use candle_core::{DType, Tensor};

use super::config::DebertaConfig;
use super::{Classifier, Deberta, Layer, Pooler, RelEmbeddings};
use crate::error::{Error, Result};
use crate::io::{LoadedModel, Weights};
use crate::models::{HeadSpec, Linear, Objective, TrainableLinear};

/// Tensors of pre-training heads and buffers a sequence classifier does not use
/// (transformers drops them the same way).
fn ignorable(name: &str) -> bool {
    name.starts_with("lm_predictions.")
        || name.starts_with("mask_predictions.")
        || name.starts_with("cls.")
        || name.starts_with("deberta.lm_predictions.")
        || name.ends_with("embeddings.position_ids")
}

/// Looks tensors up under the checkpoint's prefix and records what was used.
struct Source<'a> {
    w: &'a Weights,
    ckpt_prefix: &'static str,
    used: RefCell<HashSet<String>>,
}

impl Source<'_> {
    fn get(&self, rel: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_top(&format!("{}{rel}", self.ckpt_prefix), shape)
    }

    /// A top-level (unprefixed) tensor such as `classifier.weight`.
    fn get_top(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.w.get_shaped(name, shape)?;
        self.used.borrow_mut().insert(name.to_string());
        Ok(t.to_dtype(DType::F32)?)
    }

    fn linear(
        &self,
        rel: &str,
        path: String,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear> {
        let w = self.get(&format!("{rel}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.get(&format!("{rel}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(path, w, b))
    }

    fn norm(&self, rel: &str, e: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.get(&format!("{rel}.weight"), &[e])?,
            self.get(&format!("{rel}.bias"), &[e])?,
        ))
    }
}

pub(super) fn objective_of(num_labels: usize) -> Objective {
    if num_labels == 1 {
        Objective::Regression
    } else {
        Objective::Classification { num_labels }
    }
}

impl Deberta {
    /// Builds the encoder and the heads `head` asks for.
    pub fn load(loaded: &LoadedModel, head: &HeadSpec) -> Result<Self> {
        let cfg = DebertaConfig::from_json(&loaded.config_json, &loaded.path.join("config.json"))?;
        let pos_att = cfg.pos_att()?;
        let norm_rel = cfg.norm_rel()?;
        let w = &loaded.weights;
        let ckpt_prefix = if w.contains("deberta.embeddings.word_embeddings.weight") {
            "deberta."
        } else {
            ""
        };
        let src = Source {
            w,
            ckpt_prefix,
            used: Default::default(),
        };
        let (e, m, inter) = (cfg.hidden_size, cfg.embed_dim(), cfg.intermediate_size);
        let (prefix, wants_head) = match head {
            HeadSpec::Sequence { .. } => ("deberta.".to_string(), true),
            HeadSpec::Base => {
                let has_cls = w.contains("classifier.weight");
                (if has_cls { "deberta.".into() } else { String::new() }, has_cls)
            }
            HeadSpec::CausalLm => {
                return Err(Error::config(
                    "model",
                    format!(
                        "{}: DeBERTa is an encoder; instruction tuning and generation need a causal LM (pass --task for GLUE)",
                        loaded.path.display()
                    ),
                ))
            }
        };
        let word = src.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, m])?;
        let position = if cfg.position_biased_input {
            Some(src.get(
                "embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, m],
            )?)
        } else {
            None
        };
        let token_type = if cfg.type_vocab_size > 0 {
            Some(src.get(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, m],
            )?)
        } else {
            None
        };
        let embed_proj = if m != e {
            Some(src.linear(
                "embeddings.embed_proj",
                format!("{prefix}embeddings.embed_proj"),
                e,
                m,
                false,
            )?)
        } else {
            None
        };
        let embed_norm = src.norm("embeddings.LayerNorm", e)?;
        let rel = if cfg.relative_attention {
            let g = cfg.rel_geometry();
            let table = src.get("encoder.rel_embeddings.weight", &[2 * g.span, e])?;
            let norm = if norm_rel {
                Some(src.norm("encoder.LayerNorm", e)?)
            } else {
                None
            };
            Some(RelEmbeddings {
                table,
                norm,
                geometry: g,
            })
        } else {
            None
        };
        // transformers builds the encoder's LayerNorm from `norm_rel_ebd` alone; without
        // relative attention it is unused but kept, so merged directories hold it too.
        let idle_rel_norm = if !cfg.relative_attention && norm_rel {
            Some(src.norm("encoder.LayerNorm", e)?)
        } else {
            None
        };
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
        let separate_pos = cfg.relative_attention && !cfg.share_att_key;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let r = format!("encoder.layer.{i}");
            let p = format!("{prefix}{r}");
            let lin = |name: &str, out: usize, inp: usize| {
                src.linear(
                    &format!("{r}.{name}"),
                    format!("{p}.{name}"),
                    out,
                    inp,
                    true,
                )
            };
            layers.push(Layer {
                q: lin("attention.self.query_proj", e, e)?,
                k: lin("attention.self.key_proj", e, e)?,
                v: lin("attention.self.value_proj", e, e)?,
                pos_k: if separate_pos && pos_att.c2p {
                    Some(lin("attention.self.pos_key_proj", e, e)?)
                } else {
                    None
                },
                pos_q: if separate_pos && pos_att.p2c {
                    Some(lin("attention.self.pos_query_proj", e, e)?)
                } else {
                    None
                },
                attn_out: lin("attention.output.dense", e, e)?,
                attn_norm: src.norm(&format!("{r}.attention.output.LayerNorm"), e)?,
                inter: lin("intermediate.dense", inter, e)?,
                out: lin("output.dense", e, inter)?,
                out_norm: src.norm(&format!("{r}.output.LayerNorm"), e)?,
            });
        }
        let dev = word.device().clone();
        let seed = match head {
            HeadSpec::Sequence { seed, .. } => *seed,
            _ => 0,
        };
        let init = |path: &str, inp: usize, out: usize| {
            TrainableLinear::init(path, inp, out, cfg.initializer_range, seed, &dev)
        };
        // ContextPooler and classifier are top-level modules of the sequence classifier.
        let pooler = if w.contains("pooler.dense.weight") {
            Some(Pooler::Frozen(Linear::new(
                "pooler.dense",
                src.get_top("pooler.dense.weight", &[e, e])?,
                Some(src.get_top("pooler.dense.bias", &[e])?),
            )))
        } else if wants_head {
            Some(Pooler::Trained(init("pooler.dense", e, e)?))
        } else {
            None
        };
        let frozen_classifier = |n: usize| -> Result<Classifier> {
            Ok(Classifier::Frozen(Linear::new(
                "classifier",
                src.get_top("classifier.weight", &[n, e])?,
                Some(src.get_top("classifier.bias", &[n])?),
            )))
        };
        let (classifier, objective) = match head {
            HeadSpec::Sequence { num_labels, .. } => {
                let n = *num_labels;
                if n == 0 {
                    return Err(Error::config("num_labels", "must be at least 1"));
                }
                let c = if w.contains("classifier.weight") {
                    frozen_classifier(n)?
                } else {
                    Classifier::Trained(init("classifier", e, n)?)
                };
                (Some(c), objective_of(n))
            }
            _ if w.contains("classifier.weight") => {
                let n = w
                    .get("classifier.weight")?
                    .dims()
                    .first()
                    .copied()
                    .unwrap_or(0);
                (Some(frozen_classifier(n)?), objective_of(n))
            }
            _ => (None, Objective::Encode),
        };
        let used = src.used.into_inner();
        if let Some(extra) = w.names().find(|n| !used.contains(*n) && !ignorable(n)) {
            return Err(Error::format(
                &loaded.path,
                format!("tensor `{extra}` is not part of a DeBERTa-v2 encoder with a sequence head as config.json describes it (another architecture or option?)"),
            ));
        }
        let classifier_dropout = match head {
            HeadSpec::Sequence {
                classifier_dropout: Some(p),
                ..
            } => *p,
            _ => cfg.classifier_dropout(),
        };
        Ok(Deberta {
            prefix,
            word,
            position,
            token_type,
            embed_proj,
            embed_norm,
            rel,
            idle_rel_norm,
            pos_att,
            layers,
            pooler,
            classifier,
            classifier_dropout,
            objective,
            cfg,
        })
    }
}
