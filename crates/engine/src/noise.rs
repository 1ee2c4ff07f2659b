//! Seeded Gaussian noise, drawn on the host so a seed gives the same image on every device.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::Result;

/// N(0, I) of `shape` from `seed` alone.
pub fn gaussian(seed: u64, shape: &[usize]) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// A batch (B, *shape) where row i is drawn from `seeds[i]` only.
pub fn batch(seeds: &[u64], shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(seeds.len() * shape.iter().product::<usize>());
    for &seed in seeds {
        data.extend(gaussian(seed, shape));
    }
    let mut dims = vec![seeds.len()];
    dims.extend_from_slice(shape);
    Ok(Tensor::from_vec(data, dims, device)?)
}
