//! Model code: frozen base layers that accept adapters, and the architectures built on them.

pub mod config;
pub mod linear;
pub mod beam;
pub mod generate;
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

    /// Inverted dropout in training mode, identity otherwise.
    pub fn dropout(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        if !self.train || p == 0.0 {
            return Ok(x.clone());
        }
        crate::ops::dropout(x, p, &mut self.rng.borrow_mut())
    }
}
