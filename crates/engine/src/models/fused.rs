//! Fused CPU kernels with hand-written backward passes for the transformer's elementwise hot
//! spots. candle composes GELU's backward from ~12 tensor ops and a LayerNorm from ~7 (each a full
//! pass over memory); on CPU these dominated the training step. Other devices and dtypes use
//! candle's own ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF: f32 = 0.044_715;
/// Rows handed to one rayon task.
const ROWS_PER_TASK: usize = 64;

/// The f32 data of a contiguous CPU tensor (the sampler's fused ops use it too).
pub(crate) fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
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

/// e^x to 3e-7 relative error: Cody-Waite reduction to |r| <= ln2/2, a degree-6 polynomial and
/// an exponent-bit scale. Branch-free so the loops below vectorise, unlike libm's `expf`.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without SSE4.1's roundps.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// tanh to 2e-7 absolute error; glibc's `tanhf` (through `expm1f`) took a sixth of a training step.
#[inline(always)]
fn fast_tanh(x: f32) -> f32 {
    1.0 - 2.0 / (fast_exp(2.0 * x) + 1.0)
}

#[inline(always)]
pub(crate) fn gelu_value(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_tanh(SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x)))
}

#[inline(always)]
pub(crate) fn gelu_derivative(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x);
    let t = fast_tanh(inner);
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

// ---- GEMM and softmax building blocks shared by the fused kernels ----

/// Products this large (multiply-adds) split over the thread pool; smaller ones stay on one
/// thread, where handing them over would cost more than it saves.
const PARALLEL_GEMM_MACS: usize = 1 << 20;

/// The pool for products of this size, or none (see PARALLEL_GEMM_MACS).
pub(crate) fn parallelism_for(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m * n * k >= PARALLEL_GEMM_MACS {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    }
}

/// dst (m x n, rows of stride dst_rs) = scale * lhs (m x k) rhs (k x n); lhs and rhs given by
/// (row stride, column stride).
///
/// # Safety
/// Every addressed element must lie inside its buffer, and no other thread may touch dst's
/// elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn strided_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

/// dst (m x n, contiguous) = lhs (m x k) rhs (k x n), each operand a slice with its (row stride,
/// column stride); the bounds are checked, so this one is safe to call.
pub(crate) fn matmul(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    parallelism: gemm::Parallelism,
) {
    let reach =
        |len: usize, rs: usize, cs: usize, r: usize, c: usize| r == 0 || c == 0 || (r - 1) * rs + (c - 1) * cs < len;
    assert!(
        dst.len() >= m * n && reach(lhs.len(), lhs_rs, lhs_cs, m, k) && reach(rhs.len(), rhs_rs, rhs_cs, k, n),
        "fused GEMM operands do not hold a {m}x{k} by {k}x{n} product"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert above bounds every element gemm addresses; dst is exclusively borrowed.
    unsafe {
        strided_gemm(
            (m, n, k),
            dst.as_mut_ptr(),
            n,
            lhs.as_ptr(),
            (lhs_rs, lhs_cs),
            rhs.as_ptr(),
            (rhs_rs, rhs_cs),
            1.0,
            parallelism,
        )
    }
}

/// Softmax of each row of `n` values, in place.
pub(crate) fn softmax_rows(scores: &mut [f32], n: usize) {
    for row in scores.chunks_mut(n.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Exponentials in their own loop, so it vectorises; the sum is a separate reduction.
        row.iter_mut().for_each(|v| *v = fast_exp(*v - max));
        let inv = 1.0 / row.iter().sum::<f32>();
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

// ---- Softmax over the last dimension, with a backward ----

/// candle_nn's `softmax_last_dim` has no backward: under autograd the gradient stopped at every
/// attention's scores, so query and key projections never trained.
struct SoftmaxLastDim;
struct SoftmaxBackward;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout)?;
        let d = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut out = x.to_vec();
        out.par_chunks_mut(d * ROWS_PER_TASK).for_each(|rows| softmax_rows(rows, d));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxBackward)?))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    /// dx = y * (g - sum(g * y)) per row, with y the softmax output.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; y.len()];
        let chunk = d * ROWS_PER_TASK;
        out.par_chunks_mut(chunk).zip(y.par_chunks(chunk).zip(g.par_chunks(chunk))).for_each(|(o, (y, g))| {
            for ((o, y), g) in o.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                o.iter_mut().zip(y).zip(g).for_each(|((o, y), g)| *o = y * (g - dot));
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension that gradients pass through: a fused op on the CPU in f32,
/// composed ops under autograd elsewhere, candle's kernel for inference elsewhere.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if use_fused(xs) {
        return xs.contiguous()?.apply_op1(SoftmaxLastDim);
    }
    if xs.track_op() {
        let e = xs.broadcast_sub(&xs.max_keepdim(D::Minus1)?)?.exp()?;
        return e.broadcast_div(&e.sum_keepdim(D::Minus1)?);
    }
    candle_nn::ops::softmax_last_dim(xs)
}

// ---- LayerNorm over the last dimension, no affine parameters ----

struct LayerNorm {
    eps: f32,
}
struct LayerNormBackward {
    eps: f32,
}

pub(crate) fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
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

// ---- Per-sample modulation, gating and bias over tokens ----
//
// candle's backward of a (B, D) row broadcast over (B, T, D) sums over leading dimensions with a
// divide/modulo per element on one thread; these ops reduce contiguous rows instead.

/// (B, T, D) of a token tensor whose per-sample rows are (B, D).
fn token_dims(tokens: &Layout, rows: &Layout) -> Result<(usize, usize, usize)> {
    let (b, t, d) = tokens.shape().dims3()?;
    if rows.shape().dims2()? != (b, d) {
        candle_core::bail!("per-sample rows {:?} do not match tokens {:?}", rows.shape(), tokens.shape());
    }
    Ok((b, t, d))
}

/// The per-sample token loop of scale, modulate and gated residual: out[b, t, i] =
/// f(x[b, t, i], h[b, t, i], r1[b, i], r2[b, i]) with (B, D) rows r1, r2 over (B, T, D) tokens
/// x, h. Callers pass an unused operand twice; `f` ignores it and the compiler drops it.
fn map_tokens(
    (x, h): (&[f32], &[f32]),
    (r1, r2): (&[f32], &[f32]),
    (t, d): (usize, usize),
    f: impl Fn(f32, f32, f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let tokens = x.par_chunks(t * d).zip(h.par_chunks(t * d));
    let rows = r1.par_chunks(d).zip(r2.par_chunks(d));
    out.par_chunks_mut(t * d).zip(tokens.zip(rows)).for_each(|(o, ((x, h), (r1, r2)))| {
        for ((o, x), h) in o.chunks_mut(d).zip(x.chunks(d)).zip(h.chunks(d)) {
            for ((((o, &x), &h), &a), &b) in o.iter_mut().zip(x).zip(h).zip(r1).zip(r2) {
                *o = f(x, h, a, b);
            }
        }
    });
    out
}

/// a * (offset + s) with s a (B, D) row per sample; the gradient of modulate and gate.
struct ScaleTokens {
    offset: f32,
}

impl CustomOp2 for ScaleTokens {
    fn name(&self) -> &'static str {
        "fused-scale-tokens"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, t, d) = token_dims(l1, l2)?;
        let (a, s) = (slice(s1, l1)?, slice(s2, l2)?);
        let offset = self.offset;
        let out = map_tokens((a, a), (s, s), (t, d), |a, _, s, _| a * (offset + s));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// sum over tokens of a (or of a * b): (B, T, D) -> (B, D).
struct TokenSum;

fn token_sum(a: &[f32], b: Option<&[f32]>, (n, t, d): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let rows = i * t * d..(i + 1) * t * d;
        match b {
            None => a[rows].chunks(d).for_each(|a| o.iter_mut().zip(a).for_each(|(o, a)| *o += a)),
            Some(b) => a[rows.clone()]
                .chunks(d)
                .zip(b[rows].chunks(d))
                .for_each(|(a, b)| o.iter_mut().zip(a).zip(b).for_each(|((o, a), b)| *o += a * b)),
        }
    });
    out
}

impl CustomOp1 for TokenSum {
    fn name(&self) -> &'static str {
        "fused-token-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = layout.shape().dims3()?;
        Ok((CpuStorage::F32(token_sum(slice(storage, layout)?, None, (b, t, d))), Shape::from((b, d))))
    }
}

impl CustomOp2 for TokenSum {
    fn name(&self) -> &'static str {
        "fused-token-dot"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = l1.shape().dims3()?;
        if l2.shape() != l1.shape() {
            candle_core::bail!("token dot of {:?} and {:?}", l1.shape(), l2.shape());
        }
        let out = token_sum(slice(s1, l1)?, Some(slice(s2, l2)?), (b, t, d));
        Ok((CpuStorage::F32(out), Shape::from((b, d))))
    }
}

/// x * (1 + scale) + shift with (B, D) rows over (B, T, D) tokens.
struct Modulate;

impl CustomOp3 for Modulate {
    fn name(&self) -> &'static str {
        "fused-modulate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, t, d) = token_dims(l1, l2)?;
        token_dims(l1, l3)?;
        let (x, shift, scale) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let out = map_tokens((x, x), (shift, scale), (t, d), |x, _, shift, scale| x * (1.0 + scale) + shift);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _shift: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(scale, &ScaleTokens { offset: 1.0 })?;
        let dshift = grad.apply_op1_no_bwd(&TokenSum)?;
        let dscale = grad.apply_op2_no_bwd(x, &TokenSum)?;
        Ok((Some(dx), Some(dshift), Some(dscale)))
    }
}

/// x + h * gate with a (B, D) gate row per sample: adaLN-Zero's gated residual.
struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "fused-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, t, d) = token_dims(l1, l3)?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("gated residual of {:?} and {:?}", l1.shape(), l2.shape());
        }
        let (x, h, gate) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let out = map_tokens((x, h), (gate, gate), (t, d), |x, h, g, _| x + h * g);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        h: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dh = grad.apply_op2_no_bwd(gate, &ScaleTokens { offset: 0.0 })?;
        let dgate = grad.apply_op2_no_bwd(h, &TokenSum)?;
        Ok((Some(grad), Some(dh), Some(dgate)))
    }
}

fn use_fused_all(xs: &[&Tensor]) -> bool {
    xs.iter().all(|x| use_fused(x))
}

/// x * (1 + scale) + shift with per-sample (B, D) modulation over (B, T, D) tokens.
pub fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if use_fused_all(&[xs, shift, scale]) {
        return xs.contiguous()?.apply_op3(&shift.contiguous()?, &scale.contiguous()?, Modulate);
    }
    xs.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// LayerNorm (no affine) then x * (1 + scale) + shift with (B, D) rows over (B, T, D) tokens, as
/// one node of the autograd graph: candle accumulates every graph edge's gradient through a
/// zeroed buffer and an add, so an op less is two passes over the activations less.
struct NormModulate {
    eps: f32,
}

impl CustomOp3 for NormModulate {
    fn name(&self) -> &'static str {
        "fused-norm-modulate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, t, d) = token_dims(l1, l2)?;
        token_dims(l1, l3)?;
        let (x, shift, scale) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let mut out = vec![0f32; x.len()];
        let eps = self.eps;
        let rows = shift.par_chunks(d).zip(scale.par_chunks(d));
        out.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).zip(rows).for_each(|((o, x), (shift, scale))| {
            for (o, row) in o.chunks_mut(d).zip(x.chunks(d)) {
                let (mean, rstd) = row_stats(row, eps);
                for (((o, &v), &sh), &sc) in o.iter_mut().zip(row).zip(shift).zip(scale) {
                    *o = ((v - mean) * rstd) * (1.0 + sc) + sh;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _shift: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let normed = x.apply_op1_no_bwd(&LayerNorm { eps: self.eps })?;
        let dnormed = grad.apply_op2_no_bwd(&scale.contiguous()?, &ScaleTokens { offset: 1.0 })?;
        let dx = x.apply_op2_no_bwd(&dnormed, &LayerNormBackward { eps: self.eps })?;
        let dshift = grad.apply_op1_no_bwd(&TokenSum)?;
        let dscale = grad.apply_op2_no_bwd(&normed, &TokenSum)?;
        Ok((Some(dx), Some(dshift), Some(dscale)))
    }
}

/// modulate(layer_norm_no_affine(x), shift, scale), fused on the CPU in f32.
pub fn norm_modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused_all(&[xs, shift, scale]) {
        let op = NormModulate { eps: eps as f32 };
        return xs.contiguous()?.apply_op3(&shift.contiguous()?, &scale.contiguous()?, op);
    }
    modulate(&layer_norm_no_affine(xs, eps)?, shift, scale)
}

/// x + h * gate with a per-sample (B, D) gate over (B, T, D) tokens.
pub fn gated_residual(xs: &Tensor, h: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if use_fused_all(&[xs, h, gate]) {
        return xs.contiguous()?.apply_op3(&h.contiguous()?, &gate.contiguous()?, GatedResidual);
    }
    xs + h.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// `candle_nn::Linear` (same tensor names) whose forward is `linear_forward`. Outside autograd
/// on the CPU in f32 its weight is kept transposed, (in, out) row-major, and the layer holds a
/// view of it: a GEMM streams such a right-hand side as it is, while torch's (out, in) layout made
/// the small-row products of batch-1 inference run at a fifth of the speed. Same values, no copy
/// kept of the original layout.
#[derive(Debug, Clone)]
pub struct Linear {
    layer: candle_nn::Linear,
    weight_in_out: Option<Tensor>,
}

/// A linear layer with weight and bias under `vb`, as `candle_nn::linear`.
pub fn linear(in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> Result<Linear> {
    Linear::from_layer(candle_nn::linear(in_dim, out_dim, vb)?)
}

impl Linear {
    fn from_layer(layer: candle_nn::Linear) -> Result<Self> {
        let weight = layer.weight();
        if !use_fused(weight) || weight.track_op() {
            return Ok(Self { layer, weight_in_out: None });
        }
        let weight_in_out = weight.t()?.contiguous()?;
        let layer = candle_nn::Linear::new(weight_in_out.t()?, layer.bias().cloned());
        Ok(Self { layer, weight_in_out: Some(weight_in_out) })
    }

    /// The weight as stored (torch's (out, in), the Var itself in training) and the bias.
    pub(crate) fn weight_and_bias(&self) -> Option<(Tensor, Tensor)> {
        Some((self.layer.weight().clone(), self.layer.bias()?.clone()))
    }

    /// The (in, out) weight and the bias, when the layer keeps its weight transposed and has a bias.
    pub(crate) fn parts(&self) -> Option<(&Tensor, &Tensor)> {
        Some((self.weight_in_out.as_ref()?, self.layer.bias()?))
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        linear_forward(&self.layer, xs)
    }
}

/// x W^T + b over the last dimension of x (any rank), as one op and one autograd node. W may be
/// any 2-D layout, (out, in) or the transposed view of an (in, out) matrix.
struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1)?;
        let (out_dim, in_dim) = l2.shape().dims2()?;
        let bias = slice(s3, l3)?;
        let rows = x.len() / in_dim.max(1);
        if l1.dims().last() != Some(&in_dim) || bias.len() != out_dim {
            candle_core::bail!("linear of {:?} with weight {:?} and bias {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let w = s2.as_slice::<f32>()?;
        let (w_rs, w_cs) = (l2.stride()[0], l2.stride()[1]);
        let last = l2.start_offset() + (out_dim.max(1) - 1) * w_rs + (in_dim.max(1) - 1) * w_cs;
        if out_dim > 0 && in_dim > 0 && last >= w.len() {
            candle_core::bail!("linear weight layout {l2:?} exceeds its storage");
        }
        let mut out = vec![0f32; rows * out_dim];
        if rows > 0 && out_dim > 0 && in_dim > 0 {
            let parallelism = parallelism_for(rows, out_dim, in_dim);
            // rhs(i, o) = W[o, i]: the weight read through its own strides.
            matmul(
                &mut out,
                (rows, out_dim, in_dim),
                (x, in_dim, 1),
                (&w[l2.start_offset()..], w_cs, w_rs),
                parallelism,
            );
            out.par_chunks_mut(out_dim * ROWS_PER_TASK).for_each(|o| {
                for row in o.chunks_mut(out_dim) {
                    row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
                }
            });
        }
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_dim, in_dim) = w.dims2()?;
        let rows = grad.elem_count() / out_dim.max(1);
        let grad = grad.contiguous()?.reshape((rows, out_dim))?;
        let dx = grad.matmul(w)?.reshape(x.dims())?;
        let dw = grad.t()?.matmul(&x.contiguous()?.reshape((rows, in_dim))?)?;
        // Summed as one sample of `rows` tokens: a single pass over contiguous rows.
        let dbias = grad.reshape((1, rows, out_dim))?.apply_op1_no_bwd(&TokenSum)?.reshape(bias.dims())?;
        Ok((Some(dx), Some(dw), Some(dbias)))
    }
}

/// A linear layer (x W^T + b over the last dimension): one fused op on the CPU in f32, candle's
/// own forward elsewhere or without a bias. Same weights and result as `candle_nn::Linear`.
pub fn linear_forward(layer: &candle_nn::Linear, xs: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    match layer.bias() {
        Some(bias) if use_fused_all(&[xs, bias, layer.weight()]) => {
            xs.contiguous()?.apply_op3(layer.weight(), bias, LinearOp)
        }
        _ => layer.forward(xs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Value and gradient of every input, fused against candle's composition of the same formula.
    fn check_against_reference(
        name: &str,
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        let vars_a: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let vars_b: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ta: Vec<Tensor> = vars_a.iter().map(|v| v.as_tensor().clone()).collect();
        let tb: Vec<Tensor> = vars_b.iter().map(|v| v.as_tensor().clone()).collect();
        let (ya, yb) = (fused(&ta).unwrap(), reference(&tb).unwrap());
        assert_eq!(ya.dims(), yb.dims(), "{name} shape");
        assert!(max_diff(&ya, &yb) < 1e-5, "{name} forward");
        let probe = Tensor::randn(0f32, 1.0, ya.dims(), &Device::Cpu).unwrap();
        let ga = ya.mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = yb.mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, (a, b)) in ta.iter().zip(&tb).enumerate() {
            let d = max_diff(ga.get(a).unwrap(), gb.get(b).unwrap());
            assert!(d < 1e-4, "{name}: gradient of input {i} differs by {d}");
        }
    }

    #[test]
    fn fused_modulation_gate_and_linear_match_candle_with_gradients() {
        let dev = Device::Cpu;
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (b, t, d) = (3, 5, 8);
        check_against_reference(
            "modulate",
            &[randn(&[b, t, d]), randn(&[b, d]), randn(&[b, d])],
            |x| modulate(&x[0], &x[1], &x[2]),
            |x| x[0].broadcast_mul(&(x[2].unsqueeze(1)? + 1.0)?)?.broadcast_add(&x[1].unsqueeze(1)?),
        );
        check_against_reference(
            "gated_residual",
            &[randn(&[b, t, d]), randn(&[b, t, d]), randn(&[b, d])],
            |x| gated_residual(&x[0], &x[1], &x[2]),
            |x| &x[0] + x[1].broadcast_mul(&x[2].unsqueeze(1)?)?,
        );
        check_against_reference(
            "norm_modulate",
            &[randn(&[b, t, d]), randn(&[b, d]), randn(&[b, d])],
            |x| norm_modulate(&x[0], &x[1], &x[2], 1e-6),
            |x| {
                let mean = x[0].mean_keepdim(D::Minus1)?;
                let c = x[0].broadcast_sub(&mean)?;
                let n = c.broadcast_div(&(c.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?;
                n.broadcast_mul(&(x[2].unsqueeze(1)? + 1.0)?)?.broadcast_add(&x[1].unsqueeze(1)?)
            },
        );
        for input in [vec![b, t, d], vec![b, d], vec![300, d]] {
            check_against_reference(
                "linear",
                &[randn(&input), randn(&[6, d]), randn(&[6])],
                |x| linear_forward(&candle_nn::Linear::new(x[1].clone(), Some(x[2].clone())), &x[0]),
                |x| x[0].broadcast_matmul(&x[1].t()?)?.broadcast_add(&x[2]),
            );
        }
        // An inference layer keeps its weight as the transposed view of an (in, out) matrix.
        let (x, w, bias) = (randn(&[b, t, d]), randn(&[6, d]), randn(&[6]));
        let stored = Linear::from_layer(candle_nn::Linear::new(w.clone(), Some(bias.clone()))).unwrap();
        assert!(stored.parts().is_some(), "an untracked CPU f32 layer keeps its weight transposed");
        let reference = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        assert!(max_diff(&candle_core::Module::forward(&stored, &x).unwrap(), &reference) < 1e-5, "transposed layout");
    }

    #[test]
    fn fused_softmax_passes_gradients_like_the_composed_softmax() {
        let x = Tensor::randn(0f32, 2.0, (3, 4, 9), &Device::Cpu).unwrap();
        check_against_reference(
            "softmax",
            &[x],
            |x| softmax_last_dim(&x[0]),
            |x| {
                let e = x[0].broadcast_sub(&x[0].max_keepdim(D::Minus1)?)?.exp()?;
                e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
            },
        );
    }

    #[test]
    fn fast_tanh_and_exp_are_accurate_over_the_float_range() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.005;
            let t = (x as f64).tanh();
            assert!((fast_tanh(x) as f64 - t).abs() < 3e-7, "tanh({x})");
        }
        for i in -8_600..=8_700 {
            let x = i as f32 * 0.01;
            let e = (x as f64).exp();
            assert!(((fast_exp(x) as f64 - e) / e).abs() < 5e-7, "exp({x})");
        }
        assert_eq!(fast_tanh(1e4), 1.0);
        assert_eq!(fast_tanh(-1e4), -1.0);
        assert!(fast_tanh(f32::NAN).is_nan());
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
