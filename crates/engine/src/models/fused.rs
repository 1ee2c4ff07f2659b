//! Fused CPU kernels with hand-written backward passes for the transformer's elementwise hot
//! spots. candle composes GELU's backward from ~12 tensor ops and a LayerNorm from ~7 (each a full
//! pass over memory); on CPU these dominated the training step. Other devices and dtypes use
//! candle's own ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF: f32 = 0.044_715;
/// Rows handed to one rayon task.
const ROWS_PER_TASK: usize = 64;

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused op expects a contiguous input"),
    }
}

fn use_fused(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

// ---- GELU (tanh approximation) ----

#[inline]
fn gelu_value(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x)).tanh())
}

#[inline]
fn gelu_derivative(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x);
    let t = inner.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF * x * x)
}

struct Gelu;
struct GeluBackward;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, i)| {
            for (o, &v) in o.iter_mut().zip(i) {
                *o = gelu_value(v);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad_res.contiguous()?, &GeluBackward)?))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(4096).zip(x.par_chunks(4096).zip(g.par_chunks(4096))).for_each(|(o, (x, g))| {
            for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                *o = g * gelu_derivative(x);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU with the tanh approximation (DiT's `GELU(approximate="tanh")`).
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    if use_fused(xs) {
        xs.contiguous()?.apply_op1(Gelu)
    } else {
        xs.gelu()
    }
}

// ---- LayerNorm over the last dimension, no affine parameters ----

struct LayerNorm {
    eps: f32,
}
struct LayerNormBackward {
    eps: f32,
}

fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout)?;
        let d = layout.dims()[layout.dims().len() - 1];
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK).zip(x.par_chunks(d * ROWS_PER_TASK)).for_each(|(o, i)| {
            for (o, row) in o.chunks_mut(d).zip(i.chunks(d)) {
                let (mean, rstd) = row_stats(row, self.eps);
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - mean) * rstd;
                }
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let op = LayerNormBackward { eps: self.eps };
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad_res.contiguous()?, &op)?))
    }
}

impl CustomOp2 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
    }

    /// dx = rstd * (g - mean(g) - y * mean(g * y)), with y the normalised input.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let d = l1.dims()[l1.dims().len() - 1];
        let mut out = vec![0f32; x.len()];
        let chunk = d * ROWS_PER_TASK;
        out.par_chunks_mut(chunk).zip(x.par_chunks(chunk).zip(g.par_chunks(chunk))).for_each(|(o, (x, g))| {
            for (o, (row, grow)) in o.chunks_mut(d).zip(x.chunks(d).zip(g.chunks(d))) {
                let (mean, rstd) = row_stats(row, self.eps);
                let n = d as f32;
                let (mut g_mean, mut gy_mean) = (0f32, 0f32);
                for (&v, &gv) in row.iter().zip(grow) {
                    g_mean += gv;
                    gy_mean += gv * (v - mean) * rstd;
                }
                g_mean /= n;
                gy_mean /= n;
                for ((o, &v), &gv) in o.iter_mut().zip(row).zip(grow) {
                    let y = (v - mean) * rstd;
                    *o = rstd * (gv - g_mean - y * gy_mean);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// LayerNorm over the last dimension without affine parameters (DiT's `elementwise_affine=False`).
pub fn layer_norm_no_affine(xs: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused(xs) {
        return xs.contiguous()?.apply_op1(LayerNorm { eps: eps as f32 });
    }
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_ops_match_candle_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (5, 7, 33), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (5, 7, 33), &dev).unwrap();
        type Op = fn(&Tensor) -> Result<Tensor>;
        let cases: [(&str, Op, Op); 2] = [
            ("gelu", |t| gelu_tanh(t), |t| t.gelu()),
            (
                "layer_norm",
                |t| layer_norm_no_affine(t, 1e-6),
                |t| {
                    let mean = t.mean_keepdim(D::Minus1)?;
                    let c = t.broadcast_sub(&mean)?;
                    let var = c.sqr()?.mean_keepdim(D::Minus1)?;
                    c.broadcast_div(&(var + 1e-6)?.sqrt()?)
                },
            ),
        ];
        for (name, fused, reference) in cases {
            let (a, b) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&x).unwrap());
            let ya = fused(a.as_tensor()).unwrap();
            let yb = reference(b.as_tensor()).unwrap();
            assert!(max_diff(&ya, &yb) < 1e-5, "{name} forward");
            let ga = ya.mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = yb.mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(ga.get(a.as_tensor()).unwrap(), gb.get(b.as_tensor()).unwrap());
            assert!(d < 1e-4, "{name} backward differs by {d}");
        }
    }
}
