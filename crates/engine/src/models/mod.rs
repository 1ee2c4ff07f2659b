//! Networks with the official PyTorch module trees, so published checkpoints load unchanged.

pub mod autoencoder;
pub mod blockwise;
pub mod conv;
pub mod fused;
pub mod sit;

pub use fused::{gelu_tanh, layer_norm_no_affine};
