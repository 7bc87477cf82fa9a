//! Task-specific directions: SVD of frozen weights (cached, in the background), change
//! rates of core directions, selection, and the TSD study (`analysis`, `plots`).

pub mod analysis;
pub mod metrics;
pub mod plots;
pub mod select;
pub mod svd;
