//! Fine-tuning: optimiser, learning-rate schedule, metrics log and loss plot.

pub mod checkpoint;
pub mod config;
pub mod dash;
pub mod metrics;
pub mod optimizer;
pub mod plot;
pub mod schedule;
pub mod trainer;
