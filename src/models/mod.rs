//! Model code: frozen base layers that accept adapters, and the architectures built on them.

pub mod beam;
pub mod config;
pub mod generate;
pub mod linear;
pub mod llama;

use std::cell::RefCell;

use candle_core::Tensor;

use crate::error::Result;
use crate::rng::Rng;

pub use linear::Linear;
pub use llama::{KvCache, Llama};

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
