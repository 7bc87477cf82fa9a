//! Task-specific directions: SVD of frozen weights (cached, in the background), change
//! rates of core directions, selection.

pub mod select;
pub mod svd;
