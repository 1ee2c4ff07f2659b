//! A sampler step's arithmetic in one pass each (the CPU analogue of FlowTurbo's sample-aware
//! compilation): the guidance mix reads the doubled batch once and writes the guided velocity,
//! and the update rules write the next state, each with one allocation instead of one per
//! candle op. Other devices and dtypes use candle's ops, with the same results.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::Result;
use crate::models::fused::slice;

fn fusable(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
        && tensors.windows(2).all(|w| w[0].shape() == w[1].shape())
}

/// x + h k
struct Axpy(f32);

impl CustomOp2 for Axpy {
    fn name(&self) -> &'static str {
        "sampler-axpy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, k) = (slice(s1, l1)?, slice(s2, l2)?);
        let h = self.0;
        let out: Vec<f32> = x.iter().zip(k).map(|(&x, &k)| x + h * k).collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// x + h/2 (a + b)
struct Trapezoid(f32);

impl CustomOp3 for Trapezoid {
    fn name(&self) -> &'static str {
        "sampler-trapezoid"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, a, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let half = self.0 / 2.0;
        let out: Vec<f32> = x.iter().zip(a).zip(b).map(|((&x, &a), &b)| x + half * (a + b)).collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// x + h k in one pass.
pub fn axpy(x: &Tensor, k: &Tensor, h: f64) -> Result<Tensor> {
    if fusable(&[x, k]) {
        return Ok(x.apply_op2_no_bwd(k, &Axpy(h as f32))?);
    }
    Ok((x + (k * h)?)?)
}

/// x + h/2 (a + b) in one pass: the update Heun's and FlowTurbo's steps end with.
pub fn trapezoid(x: &Tensor, a: &Tensor, b: &Tensor, h: f64) -> Result<Tensor> {
    if fusable(&[x, a, b]) {
        return Ok(x.apply_op3_no_bwd(a, b, &Trapezoid(h as f32))?);
    }
    Ok((x + ((a + b)? * (h / 2.0))?)?)
}

/// The guided velocity from a doubled-batch output (conditional rows, then unconditional):
/// sign (cond + (w_i - 1) m_c (cond - uncond)), per-row weight w_i, per-channel mask m_c.
struct GuidanceMix {
    excess: Vec<f32>,
    mask: Option<Vec<f32>>,
    sign: f32,
}

impl CustomOp1 for GuidanceMix {
    fn name(&self) -> &'static str {
        "sampler-guidance-mix"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = slice(storage, layout)?;
        let dims = layout.shape().dims();
        let rows = self.excess.len();
        let channels = dims.get(1).copied().unwrap_or(1);
        let per_row = data.len() / (2 * rows).max(1);
        let per_channel = per_row / channels.max(1);
        let (cond, uncond) = data.split_at(rows * per_row);
        let mut out = Vec::with_capacity(rows * per_row);
        for (row, &excess) in self.excess.iter().enumerate() {
            let span = row * per_row..(row + 1) * per_row;
            for (j, (&c, &u)) in cond[span.clone()].iter().zip(&uncond[span]).enumerate() {
                let m = self.mask.as_ref().map_or(1.0, |m| m[j / per_channel.max(1)]);
                out.push(self.sign * (c + excess * m * (c - u)));
            }
        }
        let mut shape = dims.to_vec();
        shape[0] = rows;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// The guided velocity of `out`, the network's output on the doubled batch [x; x] with
/// [labels; null]: `weights` per row (1 = unguided), `mask` per channel (None = all guided),
/// times `sign` (the time convention's). `unfused` computes the same with candle's ops.
pub fn guidance_mix(
    out: &Tensor,
    weights: &[f64],
    mask: Option<&Tensor>,
    sign: f64,
    unfused: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let fused = out.device().is_cpu() && out.dtype() == DType::F32 && out.is_contiguous() && out.rank() >= 2;
    if !fused || out.dim(0)? != 2 * weights.len() {
        return unfused();
    }
    let mask = mask.map(|m| m.flatten_all()?.to_vec1::<f32>()).transpose()?;
    if mask.as_ref().is_some_and(|m| m.len() != out.dim(1).unwrap_or(0)) {
        return unfused();
    }
    let excess = weights.iter().map(|&w| (w - 1.0) as f32).collect();
    Ok(out.apply_op1_no_bwd(&GuidanceMix { excess, mask, sign: sign as f32 })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_updates_equal_candles_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 4, 5, 5), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (3, 4, 5, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (3, 4, 5, 5), &dev).unwrap();
        let plain_axpy = (&x + (&a * 0.3).unwrap()).unwrap();
        assert!(diff(&axpy(&x, &a, 0.3).unwrap(), &plain_axpy) < 1e-6);
        let plain_trap = (&x + ((&a + &b).unwrap() * 0.15).unwrap()).unwrap();
        assert!(diff(&trapezoid(&x, &a, &b, 0.3).unwrap(), &plain_trap) < 1e-6);
        // A strided view is not fused, and still right.
        let view = x.narrow(1, 0, 2).unwrap();
        let k = a.narrow(1, 0, 2).unwrap();
        let expected = (&view + (&k * 2.0).unwrap()).unwrap();
        assert!(diff(&axpy(&view, &k, 2.0).unwrap(), &expected) < 1e-6);
    }

    #[test]
    fn fused_guidance_mix_equals_the_composed_ops() {
        let dev = Device::Cpu;
        let out = Tensor::randn(0f32, 1.0, (6, 4, 3, 3), &dev).unwrap();
        let (cond, uncond) = (out.narrow(0, 0, 3).unwrap(), out.narrow(0, 3, 3).unwrap());
        let weights = [1.5, 1.0, 3.0];
        let mask = Tensor::new(&[1f32, 1.0, 1.0, 0.0], &dev).unwrap().reshape((1, 4, 1, 1)).unwrap();
        let w = Tensor::new(&[0.5f32, 0.0, 2.0], &dev).unwrap().reshape((3, 1, 1, 1)).unwrap();
        let delta = (&cond - &uncond).unwrap().broadcast_mul(&w).unwrap();
        for (m, sign) in [(None, 1.0), (Some(&mask), -1.0)] {
            let d = match m {
                Some(m) => delta.broadcast_mul(m).unwrap(),
                None => delta.clone(),
            };
            let expected = ((&cond + d).unwrap() * sign).unwrap();
            let fused = guidance_mix(&out, &weights, m, sign, || unreachable!("fusable")).unwrap();
            assert!(diff(&fused, &expected) < 1e-6);
        }
    }
}
