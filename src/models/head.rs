//! Task heads. A head layer that the checkpoint lacks (the classifier of a GLUE run, a
//! pooler a sentence-embedding checkpoint dropped) is initialised as transformers does —
//! weight normal(0, initializer_range), bias 0 — from a seed, trains fully and is saved with the adapter
//! (PEFT's `modules_to_save`).

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::rng::Rng;

/// What a run needs on top of the base network.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadSpec {
    /// The decoder's own LM head.
    CausalLm,
    /// Whatever heads the checkpoint holds, none added (for merging and analysing weights).
    Base,
    /// Sequence classification (`num_labels` ≥ 2) or regression (`num_labels` = 1), as
    /// transformers' `*ForSequenceClassification`.
    Sequence {
        num_labels: usize,
        /// Dropout before the classifier; None takes the config's (`classifier_dropout`,
        /// else `hidden_dropout_prob`).
        classifier_dropout: Option<f32>,
        /// Seed of the initialisation of head layers the checkpoint lacks.
        seed: u64,
    },
}

/// A fully trainable linear layer y = x·Wᵀ + b.
pub struct TrainableLinear {
    /// Module path, e.g. `classifier` or `bert.pooler.dense`.
    pub path: String,
    /// (out, in)
    pub weight: Var,
    /// (out)
    pub bias: Var,
}

impl TrainableLinear {
    /// transformers' `_init_weights` for `nn.Linear`: N(0, std²) weight (std is the config's
    /// `initializer_range`, 0.02 by default), zero bias. The values depend only on `seed` and
    /// the path.
    pub fn init(
        path: &str,
        in_dim: usize,
        out_dim: usize,
        std: f32,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let mut rng = Rng::derive(seed, path);
        let w: Vec<f32> = (0..in_dim * out_dim).map(|_| rng.normal() * std).collect();
        let weight = Tensor::from_vec(w, (out_dim, in_dim), dev)?;
        let bias = Tensor::zeros(out_dim, DType::F32, dev)?;
        Ok(TrainableLinear {
            path: path.to_string(),
            weight: Var::from_tensor(&weight)?,
            bias: Var::from_tensor(&bias)?,
        })
    }

    pub fn from_tensors(path: &str, weight: &Tensor, bias: &Tensor) -> Result<Self> {
        Ok(TrainableLinear {
            path: path.to_string(),
            // A trained head is f32 whatever dtype the checkpoint's frozen weights are stored in.
            weight: Var::from_tensor(&weight.to_dtype(candle_core::DType::F32)?)?,
            bias: Var::from_tensor(&bias.to_dtype(candle_core::DType::F32)?)?,
        })
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x (n, in) → (n, out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }

    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (format!("{}.weight", self.path), self.weight.clone()),
            (format!("{}.bias", self.path), self.bias.clone()),
        ]
    }

    /// Replaces the values (loading a trained head); shapes must match.
    /// Sets both tensors (moved to the head's device when they are elsewhere).
    pub fn set(&self, weight: &Tensor, bias: &Tensor) -> Result<()> {
        self.weight.set(&weight.to_device(self.weight.device())?)?;
        self.bias.set(&bias.to_device(self.bias.device())?)?;
        Ok(())
    }
}
