//! Networks with the official PyTorch module trees, so published checkpoints load unchanged.

pub mod autoencoder;
pub mod conv;
pub mod sit;

use candle_core::{Result, Tensor, D};

/// LayerNorm without affine parameters (DiT/SiT use `elementwise_affine=False`, eps 1e-6).
/// Written with differentiable ops so the trainer can backpropagate through it.
pub fn layer_norm_no_affine(xs: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}
