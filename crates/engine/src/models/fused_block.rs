//! The SiT/DiT block and final layer as CPU f32 kernels for inference.
//!
//! candle runs a block as about 30 ops, each allocating its output and handing its work to the
//! thread pool; at batch 1 those hand-offs, not arithmetic, were most of the forward. Here a block
//! is three parallel passes: over rows (norm, modulation, qkv), over (sample, head) pairs
//! (attention), and over rows again (projection, gated residual, norm, MLP, gated residual), each
//! thread running single-threaded GEMMs on its own rows while they are in cache. The arithmetic is
//! the op-by-op path's (tests hold the two to 1e-5); there is no backward, so anything under
//! autograd keeps candle's ops.

use candle_core::{bail, DType, Device, Layout, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::fused::{fast_exp, gelu_value, matmul, row_stats, slice, softmax_rows, strided_gemm};
use super::profile::{self, Stage};

/// Rows of the token matrix one task takes at most: enough for the GEMM kernels to run at speed
/// (256 measured ahead of 128 at batch 64 on two cores),
/// few enough that a large batch still spreads over every thread.
const MAX_ROWS_PER_TASK: usize = 256;

/// Whether the fused kernels may run on these tensors: contiguous CPU f32, outside any autograd
/// graph (the kernels have no backward).
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op() && t.is_contiguous())
}

/// A linear layer's transposed weight (in, out), row-major, and bias (out).
pub(crate) type LinearRef<'a> = (&'a Tensor, &'a Tensor);

/// The weights of one adaLN-Zero block.
pub(crate) struct BlockWeights<'a> {
    pub ada_ln_modulation: LinearRef<'a>,
    pub qkv: LinearRef<'a>,
    pub proj: LinearRef<'a>,
    pub fc1: LinearRef<'a>,
    pub fc2: LinearRef<'a>,
    pub num_heads: usize,
    pub eps: f32,
}

/// A raw output pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes a region no other task touches (one head's columns of one sample).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => slice(cpu, layout),
        _ => bail!("the fused kernels run on the CPU only"),
    }
}

/// A linear layer's (weight, bias) slices checked against (in, out).
fn linear_slices<'a>(
    (w, b): (&'a [f32], &'a [f32]),
    (fan_in, fan_out): (usize, usize),
    name: &str,
) -> Result<(&'a [f32], &'a [f32])> {
    if w.len() != fan_in * fan_out || b.len() != fan_out {
        bail!("{name}: weight {} / bias {} do not fit {fan_in} -> {fan_out}", w.len(), b.len());
    }
    Ok((w, b))
}

/// out (rows x n, contiguous) = a (rows x k, row stride a_rs) W + bias, with W (k, n) row-major.
fn linear_rows(a: &[f32], a_rs: usize, rows: usize, (w, bias): (&[f32], &[f32]), out: &mut [f32]) {
    let n = bias.len();
    let k = w.len() / n.max(1);
    if rows == 0 || n == 0 {
        return;
    }
    matmul(out, (rows, n, k), (a, a_rs, 1), (w, n, 1), Parallelism::None);
    for row in out[..rows * n].chunks_mut(n) {
        for (o, &b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

/// silu(c) W^T + b: the per-sample adaLN rows (B, chunks * D).
fn ada_ln_rows(c: &[f32], (w, bias): (&[f32], &[f32]), batch: usize) -> Vec<f32> {
    let act: Vec<f32> = c.iter().map(|&v| v / (1.0 + fast_exp(-v))).collect();
    let mut out = vec![0f32; batch * bias.len()];
    let d = c.len() / batch.max(1);
    linear_rows(&act, d, batch, (w, bias), &mut out);
    out
}

/// Where one sample's modulation rows live: `rows[sample * stride + chunk * d ..][..d]`.
pub(crate) struct Modulation<'a> {
    pub rows: &'a [f32],
    pub stride: usize,
    pub d: usize,
}

impl Modulation<'_> {
    fn chunk(&self, sample: usize, chunk: usize) -> &[f32] {
        let start = sample * self.stride + chunk * self.d;
        &self.rows[start..start + self.d]
    }
}

/// h = LayerNorm(x) * (1 + scale) + shift, row by row; rows start at token row `first`.
pub(crate) fn norm_modulate(
    x: &[f32],
    h: &mut [f32],
    first: usize,
    tokens: usize,
    m: &Modulation,
    (shift, scale): (usize, usize),
    eps: f32,
) {
    let d = m.d;
    for (i, (h, x)) in h.chunks_mut(d).zip(x.chunks(d)).enumerate() {
        let sample = (first + i) / tokens;
        let (mean, rstd) = row_stats(x, eps);
        let (sh, sc) = (m.chunk(sample, shift), m.chunk(sample, scale));
        for (((h, &x), &sh), &sc) in h.iter_mut().zip(x).zip(sh).zip(sc) {
            *h = ((x - mean) * rstd) * (1.0 + sc) + sh;
        }
    }
}

/// out = x + h * gate, row by row; rows start at token row `first`.
pub(crate) fn gated_add(
    out: &mut [f32],
    x: &[f32],
    h: &[f32],
    first: usize,
    tokens: usize,
    m: &Modulation,
    gate: usize,
) {
    let d = m.d;
    for (i, ((o, x), h)) in out.chunks_mut(d).zip(x.chunks(d)).zip(h.chunks(d)).enumerate() {
        let g = m.chunk((first + i) / tokens, gate);
        for (((o, &x), &h), &g) in o.iter_mut().zip(x).zip(h).zip(g) {
            *o = x + h * g;
        }
    }
}

/// Rows per task for a token matrix of `rows` rows: equal chunks of at most MAX_ROWS_PER_TASK,
/// as many as a multiple of the threads, so no thread waits on a short last chunk.
fn rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tasks = rows.div_ceil(MAX_ROWS_PER_TASK).next_multiple_of(threads);
    rows.div_ceil(tasks).max(1)
}

/// Per-head geometry of a (B*T, 3D) qkv matrix: tokens, width, head width.
#[derive(Clone, Copy)]
struct Heads {
    t: usize,
    d: usize,
    hd: usize,
}

impl Heads {
    /// Offset of (sample, head)'s q in qkv; k and v follow at +d and +2d. Rows have stride 3d.
    fn qkv_base(self, sample: usize, head: usize) -> usize {
        sample * self.t * 3 * self.d + head * self.hd
    }

    /// Offset of (sample, head)'s columns in a (B*T, D) matrix. Rows have stride d.
    fn out_base(self, sample: usize, head: usize) -> usize {
        sample * self.t * self.d + head * self.hd
    }
}

/// softmax(q k^T / sqrt(hd)) of one (sample, head): a t x t matrix.
fn attention_probs(qkv: &[f32], g: Heads, (sample, head): (usize, usize)) -> Vec<f32> {
    let base = g.qkv_base(sample, head);
    let (q, k) = (&qkv[base..], &qkv[base + g.d..]);
    let mut probs = vec![0f32; g.t * g.t];
    // SAFETY: q and k reach (t - 1) rows of stride 3d plus hd values inside qkv (the callers
    // check qkv's length); probs is t x t and local.
    unsafe {
        strided_gemm(
            (g.t, g.t, g.hd),
            probs.as_mut_ptr(),
            g.t,
            q.as_ptr(),
            (3 * g.d, 1),
            k.as_ptr(),
            (1, 3 * g.d),
            (g.hd as f32).powf(-0.5),
            Parallelism::None,
        );
    }
    softmax_rows(&mut probs, g.t);
    probs
}

/// One attention head of one sample: softmax(q k^T / sqrt(hd)) v into that head's columns of
/// `out` (B*T, D). qkv rows are [q; k; v], each head-contiguous (timm's layout).
fn attention_head(qkv: &[f32], out: SharedOut, task: (usize, usize), g: Heads) {
    let probs = attention_probs(qkv, g, task);
    let v = &qkv[g.qkv_base(task.0, task.1) + 2 * g.d..];
    // SAFETY: v reaches (t - 1) rows of stride 3d plus hd values inside qkv; out's region (t rows
    // of stride d, hd columns at this head) is written by this task only.
    unsafe {
        strided_gemm(
            (g.t, g.hd, g.t),
            out.ptr().add(g.out_base(task.0, task.1)),
            g.d,
            probs.as_ptr(),
            (g.t, 1),
            v.as_ptr(),
            (3 * g.d, 1),
            1.0,
            Parallelism::None,
        );
    }
}

/// The backward of one (sample, head), recomputing its probabilities: writes dq, dk, dv into
/// that head's columns of `dqkv` (B*T, 3D) from the output gradient `dout` (B*T, D).
fn attention_head_backward(qkv: &[f32], dout: &[f32], dqkv: SharedOut, task: (usize, usize), g: Heads) {
    let (t, d, hd) = (g.t, g.d, g.hd);
    let probs = attention_probs(qkv, g, task);
    let base = g.qkv_base(task.0, task.1);
    let (q, k, v) = (&qkv[base..], &qkv[base + d..], &qkv[base + 2 * d..]);
    let dout = &dout[g.out_base(task.0, task.1)..];
    let mut dprobs = vec![0f32; t * t];
    // SAFETY: every operand is addressed inside its buffer (rows of stride 3d or d, hd columns at
    // this head, t x t locals); this task alone writes this head's columns of dqkv.
    unsafe {
        // dv = P^T dout
        strided_gemm(
            (t, hd, t),
            dqkv.ptr().add(base + 2 * d),
            3 * d,
            probs.as_ptr(),
            (1, t),
            dout.as_ptr(),
            (d, 1),
            1.0,
            Parallelism::None,
        );
        // dP = dout v^T
        strided_gemm(
            (t, t, hd),
            dprobs.as_mut_ptr(),
            t,
            dout.as_ptr(),
            (d, 1),
            v.as_ptr(),
            (1, 3 * d),
            1.0,
            Parallelism::None,
        );
    }
    // dS = P * (dP - rowsum(dP * P)), and the score scale folded into dq and dk below.
    for (dp, p) in dprobs.chunks_mut(t).zip(probs.chunks(t)) {
        let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
        dp.iter_mut().zip(p).for_each(|(dp, &p)| *dp = p * (*dp - dot));
    }
    let scale = (hd as f32).powf(-0.5);
    unsafe {
        // dq = scale dS k, dk = scale dS^T q
        strided_gemm(
            (t, hd, t),
            dqkv.ptr().add(base),
            3 * d,
            dprobs.as_ptr(),
            (t, 1),
            k.as_ptr(),
            (3 * d, 1),
            scale,
            Parallelism::None,
        );
        strided_gemm(
            (t, hd, t),
            dqkv.ptr().add(base + d),
            3 * d,
            dprobs.as_ptr(),
            (1, t),
            q.as_ptr(),
            (3 * d, 1),
            scale,
            Parallelism::None,
        );
    }
}

/// Multi-head attention over a (B*T, 3D) qkv matrix -> (B*T, D), one task per (sample, head).
pub(crate) fn attention_rows(qkv: &[f32], b: usize, num_heads: usize, (t, d): (usize, usize)) -> Vec<f32> {
    let g = Heads { t, d, hd: d / num_heads.max(1) };
    let mut out = vec![0f32; b * t * d];
    let ptr = SharedOut(out.as_mut_ptr());
    (0..b * num_heads).into_par_iter().for_each(|task| {
        profile::stage(Stage::Attention, || attention_head(qkv, ptr, (task / num_heads, task % num_heads), g))
    });
    out
}

/// The backward of `attention_rows`: d qkv (B*T, 3D) from d out (B*T, D).
pub(crate) fn attention_rows_backward(
    qkv: &[f32],
    dout: &[f32],
    b: usize,
    num_heads: usize,
    (t, d): (usize, usize),
) -> Vec<f32> {
    let g = Heads { t, d, hd: d / num_heads.max(1) };
    let mut dqkv = vec![0f32; qkv.len()];
    let ptr = SharedOut(dqkv.as_mut_ptr());
    (0..b * num_heads)
        .into_par_iter()
        .for_each(|task| attention_head_backward(qkv, dout, ptr, (task / num_heads, task % num_heads), g));
    dqkv
}

/// Multi-head self-attention of a (B, T, 3D) qkv tensor as one op: (B, T, D), with a backward
/// that recomputes each head's probabilities (no T x T matrix is kept between the passes).
struct Attention {
    num_heads: usize,
}

impl Attention {
    fn geometry(&self, layout: &Layout) -> Result<(usize, Heads)> {
        let (b, t, d3) = layout.shape().dims3()?;
        let heads = self.num_heads;
        if d3 % 3 != 0 || heads == 0 || (d3 / 3) % heads != 0 {
            bail!("attention over qkv {:?} with {heads} heads", layout.shape());
        }
        let d = d3 / 3;
        Ok((b, Heads { t, d, hd: d / heads }))
    }
}

impl candle_core::CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (b, g) = self.geometry(layout)?;
        let out = attention_rows(slice(storage, layout)?, b, self.num_heads, (g.t, g.d));
        Ok((candle_core::CpuStorage::F32(out), (b, g.t, g.d).into()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let op = AttentionBackward { num_heads: self.num_heads };
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad_res.contiguous()?, &op)?))
    }
}

struct AttentionBackward {
    num_heads: usize,
}

impl candle_core::CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &Layout,
        s2: &candle_core::CpuStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (b, g) = Attention { num_heads: self.num_heads }.geometry(l1)?;
        if l2.shape().dims3()? != (b, g.t, g.d) {
            bail!("attention gradient {:?} for qkv {:?}", l2.shape(), l1.shape());
        }
        let dqkv = attention_rows_backward(slice(s1, l1)?, slice(s2, l2)?, b, self.num_heads, (g.t, g.d));
        Ok((candle_core::CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

/// softmax(q k^T / sqrt(hd)) v over heads of a (B, T, 3D) qkv tensor (timm's row layout
/// [q; k; v], each head-contiguous) -> (B, T, D), differentiable; CPU f32 only (see `applies_op`).
pub(crate) fn attention(qkv: &Tensor, num_heads: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(Attention { num_heads })
}

/// Whether `attention` runs on this tensor (any autograd state: it has a backward).
pub(crate) fn applies_op(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// One adaLN-Zero block, x (B, T, D) and conditioning c (B, D) -> (B, T, D).
pub(crate) fn block_forward(x: &Tensor, c: &Tensor, w: &BlockWeights) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let (heads, eps) = (w.num_heads, w.eps);
    if heads == 0 || d % heads != 0 || c.dims2()? != (b, d) {
        bail!("fused block: x {:?}, c {:?}, {heads} heads", x.shape(), c.shape());
    }
    let list = [
        x,
        c,
        w.ada_ln_modulation.0,
        w.ada_ln_modulation.1,
        w.qkv.0,
        w.qkv.1,
        w.proj.0,
        w.proj.1,
        w.fc1.0,
        w.fc1.1,
        w.fc2.0,
        w.fc2.1,
    ];
    let guards: Vec<_> = list.iter().map(|t| t.storage_and_layout()).collect();
    let s = guards.iter().map(|(st, l)| cpu_f32(st, l)).collect::<Result<Vec<_>>>()?;
    let (xs, cs) = (s[0], s[1]);
    let mlp = s[9].len();
    let ada = linear_slices((s[2], s[3]), (d, 6 * d), "adaLN_modulation")?;
    let qkv_w = linear_slices((s[4], s[5]), (d, 3 * d), "attn.qkv")?;
    let proj_w = linear_slices((s[6], s[7]), (d, d), "attn.proj")?;
    let fc1_w = linear_slices((s[8], s[9]), (d, mlp), "mlp.fc1")?;
    let fc2_w = linear_slices((s[10], s[11]), (mlp, d), "mlp.fc2")?;

    let ada_rows = profile::stage(Stage::NormModulate, || ada_ln_rows(cs, ada, b));
    let m = Modulation { rows: &ada_rows, stride: 6 * d, d };
    let rows = b * t;
    let chunk = rows_per_task(rows);

    // Pass 1, over rows: h = modulate(norm(x)), qkv = h W^T + b.
    let mut qkv = vec![0f32; rows * 3 * d];
    qkv.par_chunks_mut(chunk * 3 * d).enumerate().for_each(|(i, out)| {
        let (first, n) = (i * chunk, out.len() / (3 * d));
        let mut h = vec![0f32; n * d];
        let x = &xs[first * d..(first + n) * d];
        profile::stage(Stage::NormModulate, || norm_modulate(x, &mut h, first, t, &m, (0, 1), eps));
        profile::stage(Stage::Attention, || linear_rows(&h, d, n, qkv_w, out));
    });

    // Pass 2, over (sample, head): attention into each head's columns.
    let attn = attention_rows(&qkv, b, heads, (t, d));

    // Pass 3, over rows: x1 = x + gate * proj(attn); out = x1 + gate * mlp(modulate(norm(x1))).
    let mut y = vec![0f32; rows * d];
    y.par_chunks_mut(chunk * d).enumerate().for_each(|(i, y)| {
        let (first, n) = (i * chunk, y.len() / d);
        let x = &xs[first * d..(first + n) * d];
        let mut a = vec![0f32; n * d];
        profile::stage(Stage::Attention, || {
            linear_rows(&attn[first * d..], d, n, proj_w, &mut a);
            gated_add(y, x, &a, first, t, &m, 2);
        });
        let mut h = vec![0f32; n * d];
        profile::stage(Stage::NormModulate, || norm_modulate(y, &mut h, first, t, &m, (3, 4), eps));
        profile::stage(Stage::Mlp, || {
            let mut f = vec![0f32; n * mlp];
            linear_rows(&h, d, n, fc1_w, &mut f);
            f.iter_mut().for_each(|v| *v = gelu_value(*v));
            linear_rows(&f, mlp, n, fc2_w, &mut a);
            gated_add_in_place(y, &a, first, t, &m, 5);
        });
    });
    drop(guards);
    Tensor::from_vec(y, (b, t, d), &Device::Cpu)
}

/// y += h * gate, row by row; rows start at token row `first`.
fn gated_add_in_place(y: &mut [f32], h: &[f32], first: usize, tokens: usize, m: &Modulation, gate: usize) {
    let d = m.d;
    for (i, (y, h)) in y.chunks_mut(d).zip(h.chunks(d)).enumerate() {
        let g = m.chunk((first + i) / tokens, gate);
        for ((y, &h), &g) in y.iter_mut().zip(h).zip(g) {
            *y += h * g;
        }
    }
}

/// The final layer: modulate(norm(x)) W^T + b with its own adaLN rows, x (B, T, D) -> (B, T, out).
pub(crate) fn final_layer_forward(
    x: &Tensor,
    c: &Tensor,
    ada_ln_modulation: LinearRef,
    linear: LinearRef,
    eps: f32,
) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    if c.dims2()? != (b, d) {
        bail!("fused final layer: x {:?}, c {:?}", x.shape(), c.shape());
    }
    let list = [x, c, ada_ln_modulation.0, ada_ln_modulation.1, linear.0, linear.1];
    let guards: Vec<_> = list.iter().map(|t| t.storage_and_layout()).collect();
    let s = guards.iter().map(|(st, l)| cpu_f32(st, l)).collect::<Result<Vec<_>>>()?;
    let out_dim = s[5].len();
    let ada = linear_slices((s[2], s[3]), (d, 2 * d), "final_layer.adaLN_modulation")?;
    let lin = linear_slices((s[4], s[5]), (d, out_dim), "final_layer.linear")?;
    let ada_rows = ada_ln_rows(s[1], ada, b);
    let m = Modulation { rows: &ada_rows, stride: 2 * d, d };
    let rows = b * t;
    let chunk = rows_per_task(rows);
    let xs = s[0];
    let mut y = vec![0f32; rows * out_dim];
    y.par_chunks_mut(chunk * out_dim.max(1)).enumerate().for_each(|(i, y)| {
        let (first, n) = (i * chunk, y.len() / out_dim.max(1));
        let mut h = vec![0f32; n * d];
        norm_modulate(&xs[first * d..(first + n) * d], &mut h, first, t, &m, (0, 1), eps);
        linear_rows(&h, d, n, lin, y);
    });
    drop(guards);
    Tensor::from_vec(y, (b, t, out_dim), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use crate::models::sit::{Sit, SitConfig};
    use crate::random_model::random_var_builder;
    use candle_core::{DType, Device, Tensor, D};

    fn config(
        input_size: usize,
        patch_size: usize,
        hidden_size: usize,
        num_heads: usize,
        learn_sigma: bool,
    ) -> SitConfig {
        SitConfig {
            input_size,
            in_channels: 4,
            patch_size,
            hidden_size,
            depth: 2,
            num_heads,
            mlp_ratio: 4.0,
            num_classes: 10,
            class_dropout_prob: 0.1,
            learn_sigma,
            in_channels_scale: 1,
        }
    }

    /// timm's attention composed of candle ops, with a differentiable softmax.
    fn attention_reference(qkv: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let (b, t, d3) = qkv.dims3()?;
        let (d, hd) = (d3 / 3, d3 / 3 / heads);
        let qkv = qkv.reshape((b, t, 3, heads, hd))?.permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * (hd as f64).powf(-0.5))?;
        let (k, v) = (qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let scores = q.matmul(&k.t()?)?;
        let e = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
    }

    #[test]
    fn fused_attention_matches_candle_forward_and_backward() {
        let dev = Device::Cpu;
        for (b, t, heads, hd) in [(2, 5, 2, 4), (3, 49, 4, 8), (1, 7, 1, 3)] {
            let d = heads * hd;
            let qkv = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.5, (b, t, 3 * d), &dev).unwrap()).unwrap();
            let reference = candle_core::Var::from_tensor(qkv.as_tensor()).unwrap();
            let ya = super::attention(qkv.as_tensor(), heads).unwrap();
            let yb = attention_reference(reference.as_tensor(), heads).unwrap();
            let diff =
                |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff(&ya, &yb) < 1e-5, "forward differs by {}", diff(&ya, &yb));
            let probe = Tensor::randn(0f32, 1.0, (b, t, d), &dev).unwrap();
            let ga = (ya * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (yb * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (ga, gb) = (ga.get(qkv.as_tensor()).unwrap(), gb.get(reference.as_tensor()).unwrap());
            // q, k and v all receive gradients (candle's softmax_last_dim has no backward).
            for part in 0..3 {
                let norm =
                    gb.narrow(2, part * d, d).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(norm > 1e-3, "part {part} of the reference gradient is zero");
            }
            assert!(diff(ga, gb) < 1e-4, "gradient differs by {}", diff(ga, gb));
        }
    }

    /// The fused kernels against candle's op-by-op path on random weights (none zero, unlike
    /// adaLN-Zero's init, so every term counts), over batch sizes that split rows unevenly.
    #[test]
    fn fused_sit_forward_equals_the_op_by_op_path() {
        let dev = Device::Cpu;
        for cfg in [config(7, 1, 32, 2, false), config(8, 2, 48, 3, true), config(4, 1, 16, 1, false)] {
            let (vb, _) = random_var_builder(7, &dev);
            let fused = Sit::new(&cfg, vb).unwrap();
            let plain = fused.clone().with_fused_kernels(false);
            for batch in [1, 3, 70] {
                let x = Tensor::randn(0f32, 1.0, (batch, 4, cfg.input_size, cfg.input_size), &dev).unwrap();
                let t = Tensor::rand(0f32, 1.0, batch, &dev).unwrap();
                let y = Tensor::new((0..batch as u32).map(|i| i % 11).collect::<Vec<_>>(), &dev).unwrap();
                let a = fused.forward_full(&x, &t, &y).unwrap();
                let b = plain.forward_full(&x, &t, &y).unwrap();
                assert_eq!(a.dims(), b.dims());
                let scale =
                    b.abs().unwrap().max_all().unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
                let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(scale > 0.1, "the output should not be trivially small ({scale})");
                assert!(diff < 1e-5 * scale.max(1.0), "{cfg:?} batch {batch}: fused differs by {diff}");
            }
        }
    }
}
