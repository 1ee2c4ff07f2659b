//! Networks with the official PyTorch module trees, so published checkpoints load unchanged.

pub mod autoencoder;
pub mod blockwise;
pub mod conv;
pub mod fused;
pub(crate) mod fused_block;
pub mod fused_block_train;
pub mod profile;
pub mod sit;

pub use fused::{gelu_tanh, layer_norm_no_affine};

/// The shape rules every patch transformer here shares: positive sizes, whole patches, whole heads.
pub(crate) fn check_transformer_shape(
    positive: &[(&str, usize)],
    input_size: usize,
    patch_size: usize,
    hidden_size: usize,
    num_heads: usize,
) -> std::result::Result<(), String> {
    if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err(format!("{name} must be at least 1"));
    }
    if !input_size.is_multiple_of(patch_size) {
        return Err(format!("input_size {input_size} is not a multiple of patch_size {patch_size}"));
    }
    if !hidden_size.is_multiple_of(num_heads) {
        return Err(format!("hidden_size {hidden_size} is not a multiple of num_heads {num_heads}"));
    }
    Ok(())
}

/// The MLP width and label-dropout rules shared by the patch transformers.
pub(crate) fn check_training_knobs(mlp_ratio: f64, class_dropout_prob: f64) -> std::result::Result<(), String> {
    if mlp_ratio.is_nan() || mlp_ratio <= 0.0 {
        return Err("mlp_ratio must be positive".into());
    }
    if !(0.0..1.0).contains(&class_dropout_prob) {
        return Err("class_dropout_prob must be in [0, 1)".into());
    }
    Ok(())
}
