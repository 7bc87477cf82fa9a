//! Model code: frozen base layers that accept adapters, and the architectures built on them.
//!
//! Two seams: [`Model`] is what the trainer, the Dash switch, adapter I/O, `merge`, `analyze`
//! and `eval` see of any architecture (its adaptable linear layers by module path, trainable
//! heads, a loss for a batch, its base weights); [`CausalLm`] adds what decoding needs.
//! `load` picks the architecture from `config.json`'s `model_type`.

pub mod beam;
pub mod bert;
pub mod config;
pub mod deberta;
pub mod generate;
pub mod head;
pub mod linear;
pub mod llama;
pub mod prefill;

use std::cell::RefCell;

use candle_core::{Device, Tensor, Var};

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::io::{LoadedModel, Weights};
use crate::rng::Rng;

pub use head::{HeadSpec, TrainableLinear};
pub use linear::Linear;
pub use llama::{KvCache, Llama};

/// Which kind of network an architecture is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Causal language model (LLaMA family).
    Decoder,
    /// Bidirectional encoder with a sequence-classification head (BERT).
    Encoder,
}

/// What the model's output means, fixed when it is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Next-token prediction; batch labels are shifted token ids (b, t).
    CausalLm,
    /// `num_labels` classes, cross-entropy; batch labels are class ids (b,).
    Classification { num_labels: usize },
    /// One regression output, mean squared error; batch labels are f32 scores (b,).
    Regression,
    /// An encoder without a task head (weights only: merge, analyze).
    Encode,
}

/// The architecture-independent face of a model.
pub trait Model {
    /// `model_type` as in `config.json` (`llama`, `bert`, `deberta-v2`).
    fn arch(&self) -> &'static str;
    fn family(&self) -> Family;
    fn objective(&self) -> Objective;
    /// Where the weights live; batches are moved there.
    fn device(&self) -> &Device;
    /// Every frozen linear layer that can carry an adapter, in layer order.
    fn linears(&self) -> Vec<&Linear>;
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    /// Whether `path` is an output head (LM head, classifier): excluded from `all-linear`.
    fn is_output_head(&self, path: &str) -> bool;
    /// Head layers absent from the checkpoint, trained fully (classifier; a missing pooler).
    fn heads(&self) -> Vec<&TrainableLinear> {
        Vec::new()
    }
    /// PEFT `modules_to_save` names of the trained heads (`classifier`, `pooler`).
    fn modules_to_save(&self) -> Vec<String> {
        Vec::new()
    }
    /// Mean loss of a batch (causal LM cross-entropy, classification cross-entropy or MSE).
    fn loss(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor>;
    /// Mean loss of a batch in evaluation mode, with no gradient to follow.
    fn validation_loss(&self, batch: &Batch) -> Result<Tensor> {
        self.loss(batch, &Ctx::eval())
    }
    /// Refuses a full fine-tune of `path` that the saved model could not represent.
    fn check_full_finetune(&self, _path: &str) -> Result<()> {
        Ok(())
    }
    /// Base weights in Hugging Face naming (adapters folded in when `merged`), heads included.
    fn base_weights(&self, merged: bool) -> Result<Weights>;
    /// `config.json` for a Hugging Face directory holding [`Model::base_weights`], derived
    /// from the source checkpoint's `config.json`.
    fn hf_config(&self, source: &serde_json::Value) -> Result<serde_json::Value>;
    /// What the user should know about how the model is computed (printed at training start).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// The decoder interface, for generation and likelihood scoring.
    fn as_causal_lm(&self) -> Option<&dyn CausalLm> {
        None
    }
    /// The classifier interface, for GLUE-style evaluation.
    fn as_classifier(&self) -> Option<&dyn SequenceClassifier> {
        None
    }

    /// Every trainable tensor: adapters named `<module path>.<adapter tensor>`, heads
    /// `<module path>.weight` / `.bias`.
    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self.linears().into_iter().flat_map(|l| l.vars()).collect();
        for h in self.heads() {
            v.extend(h.vars());
        }
        v
    }

    /// Folds every adapter into its base weight and drops the adapters.
    fn merge_adapters(&mut self) -> Result<()> {
        for l in self.linears_mut() {
            if l.adapter.is_some() {
                l.weight = l.merged_weight()?;
                l.adapter = None;
            }
        }
        Ok(())
    }
}

/// A causal language model as decoding sees it.
pub trait CausalLm {
    fn vocab_size(&self) -> usize;
    fn eos_token_ids(&self) -> &[u32];
    fn device(&self) -> &Device;
    /// Final hidden states (b, t, e); `attention_mask` (b, s) over cached plus new positions.
    fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor>;
    /// Logits (.., v) of hidden states (.., e).
    fn logits(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor>;
    /// Logits (b, t, v) of every position.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask, None, None, ctx)?;
        self.logits(&h, ctx)
    }
}

/// A sequence classifier / regressor as evaluation sees it.
pub trait SequenceClassifier {
    /// Logits (b, num_labels), or (b, 1) regression outputs.
    fn classify(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor>;
}

/// Builds the model `loaded` describes. `head` says what the run needs on top of the base
/// (the LM head of a decoder, or a classification / regression head of an encoder).
pub fn load(loaded: &LoadedModel, head: &HeadSpec) -> Result<Box<dyn Model>> {
    let model_type = loaded
        .config_json
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    match model_type {
        "bert" => Ok(Box::new(bert::Bert::load(loaded, head)?)),
        "deberta-v2" => Ok(Box::new(deberta::Deberta::load(loaded, head)?)),
        _ => {
            let cfg = loaded.config.resolve()?;
            if matches!(head, HeadSpec::Sequence { .. }) {
                return Err(Error::config(
                    "task",
                    format!(
                        "{}: `{}` is a decoder (causal LM); sequence-classification tasks need an encoder such as BERT",
                        loaded.path.display(),
                        loaded.config.model_type.as_deref().unwrap_or("llama")
                    ),
                ));
            }
            Ok(Box::new(Llama::load(&cfg, &loaded.weights)?))
        }
    }
}

/// Per-forward context: training mode and the generator for dropout masks.
pub struct Ctx {
    pub train: bool,
    rng: RefCell<Rng>,
}

impl Ctx {
    pub fn eval() -> Self {
        Ctx {
            train: false,
            rng: RefCell::new(Rng::new(0)),
        }
    }

    pub fn train(rng: Rng) -> Self {
        Ctx {
            train: true,
            rng: RefCell::new(rng),
        }
    }

    pub fn into_rng(self) -> Rng {
        self.rng.into_inner()
    }

    /// Dropout probability and mask seed for one fused LoRA layer (`ops::lora_linear`):
    /// `(p, a fresh seed)` in training mode, `(0, 0)` in eval mode or when `p == 0`, which
    /// then consumes no randomness. One draw per layer call, so a restored `Rng` replays it.
    pub fn dropout_seed(&self, p: f32) -> (f32, u64) {
        if !self.train || p == 0.0 {
            return (0.0, 0);
        }
        (p, self.rng.borrow_mut().next_u64())
    }

    /// Inverted dropout in training mode, identity otherwise.
    pub fn dropout(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        if !self.train || p == 0.0 {
            return Ok(x.clone());
        }
        crate::ops::dropout(x, p, &mut self.rng.borrow_mut())
    }
}
