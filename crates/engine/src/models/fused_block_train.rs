//! The SiT/DiT block as one autograd node for CPU f32 training, with a hand-written backward.
//!
//! candle's backward gives every edge of the graph a zeroed gradient buffer and an add, so a
//! block of a dozen activation-sized ops paid for two dozen extra passes over memory, and each op
//! allocated its own output. Here the forward keeps the activations its backward needs and the
//! backward runs whole-matrix GEMMs and row loops. The graph sees one op per block with inputs
//! x and c; the weights' gradients go to a `WeightGrads` list that the trainer merges into the
//! `GradStore` after `backward()` (`Sit::take_weight_grads`). Tests hold values and gradients to
//! candle's own to 1e-4.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::fused::{fast_exp, gelu_derivative, gelu_value, matmul, parallelism_for, row_stats, slice};
use super::fused_block::{self, attention_rows, attention_rows_backward, Modulation};

/// Weight gradients computed inside backward passes, waiting to join the GradStore.
pub type WeightGrads = Arc<Mutex<Vec<(Tensor, Tensor)>>>;

/// A linear layer's torch-layout weight (out, in) and bias.
pub(crate) type TrainLinear = (Tensor, Tensor);

/// The trainable weights of one block (Var tensors), in torch layout.
#[derive(Clone)]
pub(crate) struct TrainBlockWeights {
    pub ada_ln_modulation: TrainLinear,
    pub qkv: TrainLinear,
    pub proj: TrainLinear,
    pub fc1: TrainLinear,
    pub fc2: TrainLinear,
    pub num_heads: usize,
    pub eps: f32,
}

impl TrainBlockWeights {
    fn linears(&self) -> [&TrainLinear; 5] {
        [&self.ada_ln_modulation, &self.qkv, &self.proj, &self.fc1, &self.fc2]
    }
}

/// What the forward keeps for the backward, all row-major over the B*T token rows.
struct Saved {
    ada: Vec<f32>,
    h1: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    a1: Vec<f32>,
    x1: Vec<f32>,
    h2: Vec<f32>,
    pre: Vec<f32>,
    ge: Vec<f32>,
    a2: Vec<f32>,
}

/// One block's forward (saving activations) and backward.
pub(crate) struct TrainBlockOp {
    weights: TrainBlockWeights,
    saved: Mutex<Option<Saved>>,
    grads: WeightGrads,
}

fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(slice(cpu, layout)?.to_vec()),
        _ => bail!("the fused training block runs on the CPU only"),
    }
}

/// a (rows x in) W^T + b with torch's (out, in) W.
fn linear(a: &[f32], rows: usize, (w, b): (&[f32], &[f32])) -> Vec<f32> {
    let (out, inn) = (b.len(), w.len() / b.len().max(1));
    let mut y = vec![0f32; rows * out];
    matmul(&mut y, (rows, out, inn), (a, inn, 1), (w, 1, inn), parallelism_for(rows, out, inn));
    y.par_chunks_mut(out.max(1) * 64)
        .for_each(|y| y.chunks_mut(out).for_each(|r| r.iter_mut().zip(b).for_each(|(y, b)| *y += b)));
    y
}

/// Gradients of a linear layer from its input `a` (rows x in) and output gradient `d` (rows x out):
/// (d a-input, dW (out, in), db).
fn linear_backward(a: &[f32], d: &[f32], rows: usize, w: &[f32], out: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let inn = w.len() / out.max(1);
    let mut da = vec![0f32; rows * inn];
    matmul(&mut da, (rows, inn, out), (d, out, 1), (w, inn, 1), parallelism_for(rows, inn, out));
    let mut dw = vec![0f32; out * inn];
    matmul(&mut dw, (out, inn, rows), (d, 1, out), (a, inn, 1), parallelism_for(out, inn, rows));
    let db = d.chunks(out.max(1)).fold(vec![0f32; out], |mut acc, r| {
        acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
        acc
    });
    (da, dw, db)
}

/// Per-sample chunk `k` (of `d` values) of the (B, chunks*D) adaLN rows.
fn chunk(rows: &[f32], sample: usize, k: usize, chunks: usize, d: usize) -> &[f32] {
    &rows[(sample * chunks + k) * d..][..d]
}

/// f(x) element by element, in chunks a vectorised loop runs over.
fn map_elements(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(o, x)| {
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x));
    });
    out
}

/// Per sample: h = LayerNorm(x) (1 + scale) + shift for chunks (shift, scale) of `ada`; the
/// inference kernel's row loop, one task per sample.
fn norm_modulate(
    x: &[f32],
    ada: &[f32],
    (t, d, chunks): (usize, usize, usize),
    pair: (usize, usize),
    eps: f32,
) -> Vec<f32> {
    let m = Modulation { rows: ada, stride: chunks * d, d };
    let mut h = vec![0f32; x.len()];
    h.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).enumerate().for_each(|(s, (h, x))| {
        fused_block::norm_modulate(x, h, s * t, t, &m, pair, eps);
    });
    h
}

/// The backward of `norm_modulate` plus a residual gradient: returns dx = resid + LN'(dn) with
/// dn = dh (1 + scale), and writes d shift, d scale into their chunks of `dada`.
#[allow(clippy::too_many_arguments)]
fn norm_modulate_backward(
    x: &[f32],
    dh: &[f32],
    resid: &[f32],
    ada: &[f32],
    dada: &mut [f32],
    (t, d, chunks): (usize, usize, usize),
    (sh, sc): (usize, usize),
    eps: f32,
) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    let per_sample: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d).zip(dh.par_chunks(t * d).zip(resid.par_chunks(t * d))))
        .enumerate()
        .map(|(s, (dx, (x, (dh, resid))))| {
            let scale = chunk(ada, s, sc, chunks, d);
            let (mut dshift, mut dscale) = (vec![0f32; d], vec![0f32; d]);
            let mut dn = vec![0f32; d];
            for (((dx, x), dh), resid) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dh.chunks(d)).zip(resid.chunks(d)) {
                let (mean, rstd) = row_stats(x, eps);
                let (mut g_mean, mut gy_mean) = (0f32, 0f32);
                for i in 0..d {
                    let n = (x[i] - mean) * rstd;
                    dshift[i] += dh[i];
                    dscale[i] += dh[i] * n;
                    dn[i] = dh[i] * (1.0 + scale[i]);
                    g_mean += dn[i];
                    gy_mean += dn[i] * n;
                }
                g_mean /= d as f32;
                gy_mean /= d as f32;
                for i in 0..d {
                    let n = (x[i] - mean) * rstd;
                    dx[i] = resid[i] + rstd * (dn[i] - g_mean - n * gy_mean);
                }
            }
            (dshift, dscale)
        })
        .collect();
    for (s, (dshift, dscale)) in per_sample.into_iter().enumerate() {
        dada[(s * chunks + sh) * d..][..d].copy_from_slice(&dshift);
        dada[(s * chunks + sc) * d..][..d].copy_from_slice(&dscale);
    }
    dx
}

/// out = x + a * gate per sample (chunk `gate` of `ada`); the inference kernel's row loop.
fn gated(x: &[f32], a: &[f32], ada: &[f32], (t, d, chunks): (usize, usize, usize), gate: usize) -> Vec<f32> {
    let m = Modulation { rows: ada, stride: chunks * d, d };
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(t * d).zip(x.par_chunks(t * d).zip(a.par_chunks(t * d))).enumerate().for_each(
        |(s, (o, (x, a)))| {
            fused_block::gated_add(o, x, a, s * t, t, &m, gate);
        },
    );
    out
}

/// The backward of `gated` for its branch: d a = dy * gate, and d gate (summed over tokens)
/// written into its chunk of `dada`.
fn gated_backward(
    dy: &[f32],
    a: &[f32],
    ada: &[f32],
    dada: &mut [f32],
    (t, d, chunks): (usize, usize, usize),
    gate: usize,
) -> Vec<f32> {
    let mut da = vec![0f32; dy.len()];
    let dgates: Vec<Vec<f32>> = da
        .par_chunks_mut(t * d)
        .zip(dy.par_chunks(t * d).zip(a.par_chunks(t * d)))
        .enumerate()
        .map(|(s, (da, (dy, a)))| {
            let g = chunk(ada, s, gate, chunks, d);
            let mut dg = vec![0f32; d];
            for ((da, dy), a) in da.chunks_mut(d).zip(dy.chunks(d)).zip(a.chunks(d)) {
                for i in 0..d {
                    da[i] = dy[i] * g[i];
                    dg[i] += dy[i] * a[i];
                }
            }
            dg
        })
        .collect();
    for (s, dg) in dgates.into_iter().enumerate() {
        dada[(s * chunks + gate) * d..][..d].copy_from_slice(&dg);
    }
    da
}

impl TrainBlockOp {
    fn dims(&self, x: &Layout, c: &Layout) -> Result<(usize, usize, usize)> {
        let (b, t, d) = x.shape().dims3()?;
        let heads = self.weights.num_heads;
        if c.shape().dims2()? != (b, d) || heads == 0 || d % heads != 0 {
            bail!("fused training block: x {:?}, c {:?}, {heads} heads", x.shape(), c.shape());
        }
        Ok((b, t, d))
    }

    fn weight_data(&self) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        self.weights.linears().iter().map(|(w, b)| Ok((cpu_f32(w)?, cpu_f32(b)?))).collect()
    }
}

impl CustomOp2 for TrainBlockOp {
    fn name(&self) -> &'static str {
        "fused-sit-block-train"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = self.dims(l1, l2)?;
        let (x, c) = (slice(s1, l1)?, slice(s2, l2)?);
        let w = self.weight_data()?;
        let rows = b * t;
        let geo = (t, d, 6);
        let eps = self.weights.eps;
        let act: Vec<f32> = c.iter().map(|&v| v / (1.0 + fast_exp(-v))).collect();
        let ada = linear(&act, b, (&w[0].0, &w[0].1));
        let h1 = norm_modulate(x, &ada, geo, (0, 1), eps);
        let qkv = linear(&h1, rows, (&w[1].0, &w[1].1));
        let attn = attention_rows(&qkv, b, self.weights.num_heads, (t, d));
        let a1 = linear(&attn, rows, (&w[2].0, &w[2].1));
        let x1 = gated(x, &a1, &ada, geo, 2);
        let h2 = norm_modulate(&x1, &ada, geo, (3, 4), eps);
        let pre = linear(&h2, rows, (&w[3].0, &w[3].1));
        let ge = map_elements(&pre, gelu_value);
        let a2 = linear(&ge, rows, (&w[4].0, &w[4].1));
        let y = gated(&x1, &a2, &ada, geo, 5);
        let saved = Saved { ada, h1, qkv, attn, a1, x1, h2, pre, ge, a2 };
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("fused block state poisoned".into()))? = Some(saved);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, c: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, t, d) = x.dims3()?;
        let rows = b * t;
        let geo = (t, d, 6);
        let eps = self.weights.eps;
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused block state poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("fused block: backward without a saved forward".into()))?;
        let Saved { ada, h1, qkv, attn, a1, x1, h2, pre, ge, a2 } = saved;
        let (xs, cs, g) = (cpu_f32(&x.contiguous()?)?, cpu_f32(&c.contiguous()?)?, cpu_f32(&grad.contiguous()?)?);
        let w = self.weight_data()?;
        let mlp = w[3].1.len();
        let mut dada = vec![0f32; b * 6 * d];

        let da2 = gated_backward(&g, &a2, &ada, &mut dada, geo, 5);
        let (mut dpre, dw2, db2) = linear_backward(&ge, &da2, rows, &w[4].0, d);
        dpre.par_chunks_mut(1 << 14).zip(pre.par_chunks(1 << 14)).for_each(|(g, p)| {
            g.iter_mut().zip(p).for_each(|(g, &p)| *g *= gelu_derivative(p));
        });
        let (dh2, dw1, db1) = linear_backward(&h2, &dpre, rows, &w[3].0, mlp);
        let dx1 = norm_modulate_backward(&x1, &dh2, &g, &ada, &mut dada, geo, (3, 4), eps);
        let da1 = gated_backward(&dx1, &a1, &ada, &mut dada, geo, 2);
        let (dattn, dwp, dbp) = linear_backward(&attn, &da1, rows, &w[2].0, d);
        let dqkv = attention_rows_backward(&qkv, &dattn, b, self.weights.num_heads, (t, d));
        let (dh1, dwqkv, dbqkv) = linear_backward(&h1, &dqkv, rows, &w[1].0, 3 * d);
        let dx = norm_modulate_backward(&xs, &dh1, &dx1, &ada, &mut dada, geo, (0, 1), eps);
        let act: Vec<f32> = cs.iter().map(|&v| v / (1.0 + fast_exp(-v))).collect();
        let (dact, dwada, dbada) = linear_backward(&act, &dada, b, &w[0].0, 6 * d);
        let dc: Vec<f32> = dact
            .iter()
            .zip(&cs)
            .map(|(g, &v)| {
                let s = 1.0 / (1.0 + fast_exp(-v));
                g * s * (1.0 + v * (1.0 - s))
            })
            .collect();

        let device = x.device();
        let as_tensor = |data: Vec<f32>, like: &Tensor| Tensor::from_vec(data, like.shape(), device);
        let mut pending = self.grads.lock().map_err(|_| candle_core::Error::Msg("weight gradients poisoned".into()))?;
        let layers = self.weights.linears();
        let weight_grads = [(dwada, dbada), (dwqkv, dbqkv), (dwp, dbp), (dw1, db1), (dw2, db2)];
        for ((wt, bt), (dw, db)) in layers.iter().zip(weight_grads) {
            pending.push((wt.clone(), as_tensor(dw, wt)?));
            pending.push((bt.clone(), as_tensor(db, bt)?));
        }
        Ok((Some(as_tensor(dx, x)?), Some(as_tensor(dc, c)?)))
    }
}

/// One block as a single autograd node; weight gradients land in `grads` during backward.
pub(crate) fn block_forward_train(
    x: &Tensor,
    c: &Tensor,
    weights: TrainBlockWeights,
    grads: &WeightGrads,
) -> Result<Tensor> {
    let op = TrainBlockOp { weights, saved: Mutex::new(None), grads: grads.clone() };
    x.contiguous()?.apply_op2(&c.contiguous()?, op)
}

/// Add the pending weight gradients into `store` (summing with what is there already).
pub(crate) fn merge_weight_grads(grads: &WeightGrads, store: &mut candle_core::backprop::GradStore) -> Result<()> {
    let pending =
        std::mem::take(&mut *grads.lock().map_err(|_| candle_core::Error::Msg("weight gradients poisoned".into()))?);
    for (weight, grad) in pending {
        let total = match store.get(&weight) {
            Some(existing) => (existing + grad)?,
            None => grad,
        };
        store.insert(&weight, total);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    use crate::models::sit::{Sit, SitConfig};

    /// Loss and every gradient through fused training blocks equal candle's autograd through the
    /// op-by-op blocks, on the same weights.
    #[test]
    fn fused_training_block_matches_candle_autograd() {
        let dev = Device::Cpu;
        for (hidden, heads, batch, input) in [(32, 2, 3, 7), (24, 3, 2, 4)] {
            let cfg = SitConfig {
                input_size: input,
                in_channels: 4,
                patch_size: 1,
                hidden_size: hidden,
                depth: 2,
                num_heads: heads,
                mlp_ratio: 4.0,
                num_classes: 10,
                class_dropout_prob: 0.1,
                learn_sigma: false,
                in_channels_scale: 1,
            };
            let varmap = VarMap::new();
            let plain = Sit::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
            // Non-zero biases everywhere, so every gradient term is exercised.
            for var in varmap.all_vars() {
                var.set(&Tensor::randn(0f32, 0.3, var.shape(), &dev).unwrap()).unwrap();
            }
            let fused = plain.clone().with_fused_training();
            let x = Tensor::randn(0f32, 1.0, (batch, 4, input, input), &dev).unwrap();
            let t = Tensor::rand(0f32, 1.0, batch, &dev).unwrap();
            let y = Tensor::new((0..batch as u32).collect::<Vec<_>>(), &dev).unwrap();
            let target = Tensor::randn(0f32, 1.0, (batch, 4, input, input), &dev).unwrap();
            let loss =
                |net: &Sit| (net.forward(&x, &t, &y).unwrap() - &target).unwrap().sqr().unwrap().mean_all().unwrap();
            let (la, lb) = (loss(&fused), loss(&plain));
            let scalar = |l: &Tensor| l.to_scalar::<f32>().unwrap();
            assert!(
                (scalar(&la) - scalar(&lb)).abs() < 1e-5 * scalar(&lb).abs().max(1.0),
                "loss {} vs {}",
                scalar(&la),
                scalar(&lb)
            );
            let mut ga = la.backward().unwrap();
            let data = varmap.data().lock().unwrap();
            let qkv = data.get("blocks.0.attn.qkv.weight").unwrap();
            assert!(ga.get(qkv.as_tensor()).is_none(), "the block weights' gradients come from the fused backward");
            fused.take_weight_grads(&mut ga).unwrap();
            let gb = lb.backward().unwrap();
            for (name, var) in data.iter() {
                let (a, b) = (ga.get(var.as_tensor()), gb.get(var.as_tensor()));
                let (Some(a), Some(b)) = (a, b) else {
                    panic!("{name}: gradient missing ({} / {})", a.is_some(), b.is_some())
                };
                let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-3);
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4 * scale.max(1.0), "{name}: gradient differs by {diff} (scale {scale})");
            }
        }
    }
}
