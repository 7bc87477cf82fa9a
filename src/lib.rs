//! lora-dash: LoRA and LoRA-Dash fine-tuning of Hugging Face models.
//!
//! LoRA-Dash is "Unleashing the Power of Task-Specific Directions in Parameter Efficient
//! Fine-tuning" (Si et al., ICLR 2025). Layout follows the data flow: `io` reads models and
//! adapters, `models` runs them, `adapters` holds the trainable methods, `tsd` the
//! task-specific-direction maths, `data` and `train` fine-tune, `cli` is the binary's front.

pub mod adapters;
pub mod cli;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod io;
pub mod models;
pub mod ops;
pub mod rng;
pub mod runtime;
pub mod train;
pub mod tsd;

pub use error::{Error, Result};
