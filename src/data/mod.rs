//! Training data: LLM-Adapters instruction records, their tokenisation with loss masks,
//! and deterministic, resumable batching.

pub mod alpaca;
pub mod batch;
pub mod glue;
pub mod tokenize;

pub use alpaca::{eval_prompt, generate_prompt, load_records, Record};
pub use batch::{collate, split_train_val, Batch, Loader, LoaderState};
pub use tokenize::{tokenize_record, Example};
