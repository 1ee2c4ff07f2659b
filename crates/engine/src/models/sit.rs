//! SiT / DiT transformer velocity model with the official module tree
//! (`x_embedder.proj`, `t_embedder.mlp.0`, `y_embedder.embedding_table`, `blocks.N.*`,
//! `final_layer.*`, `pos_embed`), so SiT/DiT/LFM-DiT/FlowTurbo checkpoints load by name.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{conv2d, embedding, Conv2d, Conv2dConfig, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use super::fused::{gated_residual, linear, norm_modulate, Linear};
use super::fused_block::{self, BlockWeights, LinearRef};
use super::fused_block_train::{self, TrainBlockWeights, WeightGrads};
use super::profile::{self, Stage};
use super::{check_training_knobs, check_transformer_shape, gelu_tanh};

const NORM_EPS: f64 = 1e-6;
const FREQUENCY_EMBEDDING_SIZE: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SitConfig {
    /// Spatial size of the (latent) input, square.
    pub input_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub hidden_size: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub num_classes: usize,
    /// > 0 adds the null-label row used for classifier-free guidance.
    #[serde(default)]
    pub class_dropout_prob: f64,
    /// Output 2 * in_channels; the first in_channels are the velocity.
    #[serde(default)]
    pub learn_sigma: bool,
    /// The patch embedding takes in_channels * this (FlowTurbo's refiner: 2, x and v side by side).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub in_channels_scale: usize,
}

fn default_mlp_ratio() -> f64 {
    4.0
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl SitConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("input_size", self.input_size),
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("hidden_size", self.hidden_size),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("num_classes", self.num_classes),
            ("in_channels_scale", self.in_channels_scale),
        ];
        check_transformer_shape(&positive, self.input_size, self.patch_size, self.hidden_size, self.num_heads)?;
        // The 2-D sin-cos position embedding splits hidden into four equal parts.
        if !self.hidden_size.is_multiple_of(4) {
            return Err(format!("hidden_size {} must be a multiple of 4", self.hidden_size));
        }
        check_training_knobs(self.mlp_ratio, self.class_dropout_prob)
    }

    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    /// Channels the patch embedding takes.
    pub fn embed_channels(&self) -> usize {
        self.in_channels * self.in_channels_scale
    }

    pub fn grid_size(&self) -> usize {
        self.input_size / self.patch_size
    }

    pub fn num_tokens(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Floating-point operations of one forward pass for one image (2 per multiply-add of every
    /// matrix product; element-wise work is left out, as FLOP counts usually do).
    pub fn forward_flops(&self) -> f64 {
        let tokens = (self.input_size / self.patch_size.max(1)).pow(2) as f64;
        let d = self.hidden_size as f64;
        let patch_in = (self.embed_channels() * self.patch_size * self.patch_size) as f64;
        let patch_out = (self.out_channels() * self.patch_size * self.patch_size) as f64;
        let embed = tokens * patch_in * d + FREQUENCY_EMBEDDING_SIZE as f64 * d + d * d;
        let block = d * 6.0 * d // adaLN modulation
            + tokens * d * 3.0 * d // qkv
            + 2.0 * tokens * tokens * d // q k^T and attention x v
            + tokens * d * d // attention output projection
            + 2.0 * tokens * d * self.mlp_hidden() as f64; // MLP
        let last = d * 2.0 * d + tokens * d * patch_out;
        2.0 * (embed + self.depth as f64 * block + last)
    }

    pub fn null_label(&self) -> Option<u32> {
        (self.class_dropout_prob > 0.0).then_some(self.num_classes as u32)
    }

    pub fn label_rows(&self) -> usize {
        self.num_classes + usize::from(self.class_dropout_prob > 0.0)
    }
}

/// Sinusoidal embedding of scalar times, cos first, as DiT's `TimestepEmbedder.timestep_embedding`.
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half).map(|k| (-(max_period.ln()) * k as f64 / half as f64).exp() as f32).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?;
    if dim % 2 == 1 {
        let pad = Tensor::zeros((emb.dim(0)?, 1), DType::F32, t.device())?;
        return Tensor::cat(&[emb, pad], D::Minus1);
    }
    Ok(emb)
}

/// MAE-style fixed 2-D sin-cos position embedding, shape (grid*grid, dim): the first half encodes
/// the column index, the second half the row index; each half is [sin, cos].
pub fn sincos_pos_embed_2d(dim: usize, grid: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut out = Vec::with_capacity(grid * grid * dim);
    for row in 0..grid {
        for col in 0..grid {
            for pos in [col as f64, row as f64] {
                out.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                out.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
struct PatchEmbed {
    proj: Conv2d,
}

impl PatchEmbed {
    fn new(cfg: &SitConfig, vb: VarBuilder) -> Result<Self> {
        let conv_cfg = Conv2dConfig { stride: cfg.patch_size, ..Default::default() };
        let proj = conv2d(cfg.embed_channels(), cfg.hidden_size, cfg.patch_size, conv_cfg, vb.pp("proj"))?;
        Ok(Self { proj })
    }
}

impl Module for PatchEmbed {
    /// (B, C, H, W) -> (B, T, D), tokens row-major.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.proj.forward(xs)?.flatten_from(2)?.transpose(1, 2)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedder {
    linear_1: Linear,
    linear_2: Linear,
    /// The weights' dtype: times arrive in f32 (bf16 would round them coarsely) and the
    /// embedding is cast only after the sinusoids.
    dtype: DType,
}

impl TimestepEmbedder {
    pub(crate) fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        let linear_1 = linear(FREQUENCY_EMBEDDING_SIZE, hidden, vb.pp("mlp.0"))?;
        let linear_2 = linear(hidden, hidden, vb.pp("mlp.2"))?;
        Ok(Self { linear_1, linear_2, dtype: vb.dtype() })
    }
}

impl Module for TimestepEmbedder {
    fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let freq = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, 10000.0)?.to_dtype(self.dtype)?;
        freq.apply(&self.linear_1)?.silu()?.apply(&self.linear_2)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
}

impl Attention {
    fn new(cfg: &SitConfig, vb: VarBuilder) -> Result<Self> {
        let qkv = linear(cfg.hidden_size, 3 * cfg.hidden_size, vb.pp("qkv"))?;
        let proj = linear(cfg.hidden_size, cfg.hidden_size, vb.pp("proj"))?;
        Ok(Self { qkv, proj, num_heads: cfg.num_heads })
    }
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let head_dim = d / self.num_heads;
        if fused_block::applies_op(xs) {
            return fused_block::attention(&xs.apply(&self.qkv)?, self.num_heads)?.apply(&self.proj);
        }
        // qkv rows are [q; k; v], each head-contiguous (timm Attention).
        let qkv = xs.apply(&self.qkv)?.reshape((b, t, 3, self.num_heads, head_dim))?.permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * (head_dim as f64).powf(-0.5))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let attn = super::fused::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?.apply(&self.proj)
    }
}

/// timm's `Mlp` with GELU-tanh (`fc1`, `fc2`), shared by the SiT and blockwise blocks.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub(crate) fn new(hidden: usize, mlp_hidden: usize, vb: VarBuilder) -> Result<Self> {
        let fc1 = linear(hidden, mlp_hidden, vb.pp("fc1"))?;
        let fc2 = linear(mlp_hidden, hidden, vb.pp("fc2"))?;
        Ok(Self { fc1, fc2 })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        gelu_tanh(&xs.apply(&self.fc1)?)?.apply(&self.fc2)
    }
}

/// adaLN-Zero transformer block.
#[derive(Debug, Clone)]
struct SitBlock {
    attn: Attention,
    mlp: Mlp,
    ada_ln_modulation: Linear,
}

impl SitBlock {
    fn new(cfg: &SitConfig, vb: VarBuilder) -> Result<Self> {
        let attn = Attention::new(cfg, vb.pp("attn"))?;
        let mlp = Mlp::new(cfg.hidden_size, cfg.mlp_hidden(), vb.pp("mlp"))?;
        let ada_ln_modulation = linear(cfg.hidden_size, 6 * cfg.hidden_size, vb.pp("adaLN_modulation.1"))?;
        Ok(Self { attn, mlp, ada_ln_modulation })
    }

    fn forward(&self, xs: &Tensor, c: &Tensor) -> Result<Tensor> {
        use Stage::{Attention as A, Mlp as M, NormModulate as N};
        let chunks = profile::timed(N, || c.silu()?.apply(&self.ada_ln_modulation)?.chunk(6, D::Minus1))?;
        let (shift_msa, scale_msa, gate_msa) = (&chunks[0], &chunks[1], &chunks[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&chunks[3], &chunks[4], &chunks[5]);
        let h = profile::timed(N, || norm_modulate(xs, shift_msa, scale_msa, NORM_EPS))?;
        let xs = profile::timed(A, || gated_residual(xs, &h.apply(&self.attn)?, gate_msa))?;
        let h = profile::timed(N, || norm_modulate(&xs, shift_mlp, scale_mlp, NORM_EPS))?;
        profile::timed(M, || gated_residual(&xs, &h.apply(&self.mlp)?, gate_mlp))
    }

    fn weights(&self) -> Option<BlockWeights<'_>> {
        Some(BlockWeights {
            ada_ln_modulation: self.ada_ln_modulation.parts()?,
            qkv: self.attn.qkv.parts()?,
            proj: self.attn.proj.parts()?,
            fc1: self.mlp.fc1.parts()?,
            fc2: self.mlp.fc2.parts()?,
            num_heads: self.attn.num_heads,
            eps: NORM_EPS as f32,
        })
    }

    fn train_weights(&self) -> Option<TrainBlockWeights> {
        Some(TrainBlockWeights {
            ada_ln_modulation: self.ada_ln_modulation.weight_and_bias()?,
            qkv: self.attn.qkv.weight_and_bias()?,
            proj: self.attn.proj.weight_and_bias()?,
            fc1: self.mlp.fc1.weight_and_bias()?,
            fc2: self.mlp.fc2.weight_and_bias()?,
            num_heads: self.attn.num_heads,
            eps: NORM_EPS as f32,
        })
    }

    /// Under autograd on the CPU in f32: the block as one node whose weight gradients go to
    /// `grads`; elsewhere the op-by-op forward.
    fn forward_train(&self, xs: &Tensor, c: &Tensor, grads: &WeightGrads) -> Result<Tensor> {
        match self.train_weights() {
            Some(w) if fused_block::applies_op(xs) && fused_block::applies_op(c) => {
                fused_block_train::block_forward_train(xs, c, w, grads)
            }
            _ => self.forward(xs, c),
        }
    }

    /// The fused CPU kernel when it applies (f32 CPU inference), else the op-by-op forward.
    fn forward_fast(&self, xs: &Tensor, c: &Tensor) -> Result<Tensor> {
        match self.weights() {
            Some(w) if fused_block::applies(&[xs, c]) && untracked(&w) => {
                profile::region(|| fused_block::block_forward(xs, c, &w))
            }
            _ => self.forward(xs, c),
        }
    }
}

fn untracked(w: &BlockWeights) -> bool {
    let [a, q, p, f1, f2] = [w.ada_ln_modulation, w.qkv, w.proj, w.fc1, w.fc2];
    fused_block::applies(&[a.0, a.1, q.0, q.1, p.0, p.1, f1.0, f1.1, f2.0, f2.1])
}

#[derive(Debug, Clone)]
struct FinalLayer {
    linear: Linear,
    ada_ln_modulation: Linear,
}

impl FinalLayer {
    fn new(cfg: &SitConfig, vb: VarBuilder) -> Result<Self> {
        let out = cfg.patch_size * cfg.patch_size * cfg.out_channels();
        let ada_ln_modulation = linear(cfg.hidden_size, 2 * cfg.hidden_size, vb.pp("adaLN_modulation.1"))?;
        let output = linear(cfg.hidden_size, out, vb.pp("linear"))?;
        Ok(Self { linear: output, ada_ln_modulation })
    }

    fn forward(&self, xs: &Tensor, c: &Tensor) -> Result<Tensor> {
        let chunks = c.silu()?.apply(&self.ada_ln_modulation)?.chunk(2, D::Minus1)?;
        norm_modulate(xs, &chunks[0], &chunks[1], NORM_EPS)?.apply(&self.linear)
    }

    /// The fused CPU kernel when it applies (f32 CPU inference), else the op-by-op forward.
    fn forward_fast(&self, xs: &Tensor, c: &Tensor) -> Result<Tensor> {
        let parts: Option<(LinearRef, LinearRef)> = self.ada_ln_modulation.parts().zip(self.linear.parts());
        match parts {
            Some((ada, lin)) if fused_block::applies(&[xs, c, ada.0, ada.1, lin.0, lin.1]) => {
                fused_block::final_layer_forward(xs, c, ada, lin, NORM_EPS as f32)
            }
            _ => self.forward(xs, c),
        }
    }
}

/// The SiT/DiT transformer: `forward(x, t, y)` with t in the network's own time units.
#[derive(Debug, Clone)]
pub struct Sit {
    x_embedder: PatchEmbed,
    t_embedder: TimestepEmbedder,
    y_embedder: Embedding,
    pos_embed: Tensor,
    blocks: Vec<SitBlock>,
    final_layer: FinalLayer,
    cfg: SitConfig,
    /// Use the fused CPU inference kernels where they apply.
    fast: bool,
    /// Set by `with_fused_training`: where the block weights' gradients wait for `take_weight_grads`.
    weight_grads: Option<WeightGrads>,
}

impl Sit {
    pub fn new(cfg: &SitConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_label_rows(cfg, cfg.label_rows(), vb)
    }

    /// Like `new` with an explicit label-table size (a declared null label adds the last row).
    pub fn with_label_rows(cfg: &SitConfig, label_rows: usize, vb: VarBuilder) -> Result<Self> {
        let x_embedder = PatchEmbed::new(cfg, vb.pp("x_embedder"))?;
        let t_embedder = TimestepEmbedder::new(cfg.hidden_size, vb.pp("t_embedder"))?;
        let y_embedder = embedding(label_rows, cfg.hidden_size, vb.pp("y_embedder.embedding_table"))?;
        let pos_shape = (1, cfg.num_tokens(), cfg.hidden_size);
        // Official checkpoints store the frozen table; our own weights may omit it (it is fixed).
        let pos_embed = if vb.contains_tensor("pos_embed") {
            vb.get(pos_shape, "pos_embed")?
        } else {
            Self::fixed_pos_embed(cfg, vb.device())?.to_dtype(vb.dtype())?
        };
        let vb_blocks = vb.pp("blocks");
        let blocks = (0..cfg.depth).map(|i| SitBlock::new(cfg, vb_blocks.pp(i))).collect::<Result<Vec<_>>>()?;
        let final_layer = FinalLayer::new(cfg, vb.pp("final_layer"))?;
        Ok(Self {
            x_embedder,
            t_embedder,
            y_embedder,
            pos_embed,
            blocks,
            final_layer,
            cfg: cfg.clone(),
            fast: true,
            weight_grads: None,
        })
    }

    /// The fixed sin-cos table, shape (1, T, D), as stored under `pos_embed`.
    pub fn fixed_pos_embed(cfg: &SitConfig, device: &Device) -> Result<Tensor> {
        let table = sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size());
        Tensor::from_vec(table, (1, cfg.num_tokens(), cfg.hidden_size), device)
    }

    pub fn config(&self) -> &SitConfig {
        &self.cfg
    }

    /// x: (B, C, H, W), t: (B,) network time, y: (B,) u32 labels -> (B, out_channels, H, W).
    pub fn forward_full(&self, xs: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        if self.fast && xs.device().is_cpu() {
            // Run the whole forward on a pool thread: each parallel pass of the fused kernels is
            // then shared with the other threads in place, not handed over and waited for.
            return rayon::scope(|_| self.forward_layers(xs, t, y));
        }
        self.forward_layers(xs, t, y)
    }

    fn forward_layers(&self, xs: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        let b = xs.dim(0)?;
        let (mut h, c) = profile::timed(Stage::Embeddings, || -> Result<_> {
            let h = xs.apply(&self.x_embedder)?.broadcast_add(&self.pos_embed)?;
            let c = (t.apply(&self.t_embedder)?.to_dtype(h.dtype())? + y.apply(&self.y_embedder)?)?;
            Ok((h, c))
        })?;
        let training = h.track_op() || c.track_op();
        for block in &self.blocks {
            h = match &self.weight_grads {
                Some(grads) if training => block.forward_train(&h, &c, grads)?,
                _ if self.fast => block.forward_fast(&h, &c)?,
                _ => block.forward(&h, &c)?,
            };
        }
        profile::timed(Stage::FinalLayer, || {
            let h =
                if self.fast { self.final_layer.forward_fast(&h, &c)? } else { self.final_layer.forward(&h, &c)? };
            self.unpatchify(&h, b)
        })
    }

    /// Train with each block as one autograd node on the CPU in f32 (a hand-written backward,
    /// far fewer passes over memory). The blocks' weight gradients are then not in the
    /// `GradStore` that `backward()` returns: the caller must call `take_weight_grads` after it.
    pub fn with_fused_training(mut self) -> Self {
        self.weight_grads = Some(Default::default());
        self
    }

    /// Move the block weights' gradients of the last backward into `store` (a no-op without
    /// `with_fused_training`).
    pub fn take_weight_grads(&self, store: &mut candle_core::backprop::GradStore) -> Result<()> {
        match &self.weight_grads {
            Some(grads) => fused_block_train::merge_weight_grads(grads, store),
            None => Ok(()),
        }
    }

    /// The same network on candle's op-by-op path only (the fused CPU kernels off): the
    /// reference the fused path is tested and benchmarked against.
    pub fn with_fused_kernels(mut self, on: bool) -> Self {
        self.fast = on;
        self
    }

    /// Like `forward_full`, keeping only the velocity channels of a `learn_sigma` output.
    pub fn forward(&self, xs: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        let out = self.forward_full(xs, t, y)?;
        if self.cfg.learn_sigma {
            out.narrow(1, 0, self.cfg.in_channels)
        } else {
            Ok(out)
        }
    }

    /// (B, T, p*p*C) ordered (p_row, p_col, c) -> (B, C, H, W).
    fn unpatchify(&self, xs: &Tensor, b: usize) -> Result<Tensor> {
        let p = self.cfg.patch_size;
        let g = self.cfg.grid_size();
        let c = self.cfg.out_channels();
        xs.reshape((b, g, g, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, c, g * p, g * p))
    }
}
