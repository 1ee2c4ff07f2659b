//! Blockwise Flow Matching (Park, Lee, Joo, Kim; NeurIPS 2025): a shared feature trunk computes
//! per-token semantic features from x_t, and each of M time segments has its own small stack of
//! velocity blocks conditioned per token on concat(c, features). An optional feature residual
//! network (FRN) approximates the trunk from the segment's first-step anchor. The module tree and
//! tensor names are the official `src/model/bfm.py`, so its checkpoints load unchanged.
//!
//! Network time is BFM's own: t = 1 is noise, t = 0 data, and segment s covers
//! t in [1 - (s + 1)/M, 1 - s/M] (segment 0 is the noisiest).

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use super::fused::{gated_residual, linear, modulate, Linear};
use super::sit::{Mlp, TimestepEmbedder};
use super::{check_training_knobs, check_transformer_shape, layer_norm_no_affine};

const NORM_EPS: f64 = 1e-6;
const FREQUENCY_EMBEDDING_SIZE: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlockwiseConfig {
    /// Spatial size of the (latent) input, square (official `context_size`).
    pub input_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub hidden_size: usize,
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
    /// M, the number of equal time segments.
    pub segments: usize,
    /// Velocity blocks per segment.
    pub segment_depth: usize,
    /// Blocks of the shared feature trunk (`representation_blocks`).
    pub feature_alignment_depth: usize,
    /// Blocks of the feature residual network; 0 when the model has none.
    #[serde(default)]
    pub frn_depth: usize,
    /// Inner width of the low-rank adaLN modulations.
    pub adaln_lora_dim: usize,
    /// Width of the feature-alignment target; 0 when the projection head is absent (it is only
    /// used in training).
    #[serde(default)]
    pub dim_projection: usize,
    /// Hidden width of the projection head (official 2048).
    #[serde(default = "default_projection_hidden")]
    pub projection_hidden: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Add a fixed 2-D sin-cos position table to both patch embeddings (not in the release,
    /// which has RoPE only; off for official checkpoints).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abs_pos_embed: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}

fn default_projection_hidden() -> usize {
    2048
}

fn default_rope_theta() -> f64 {
    10000.0
}

/// Floating-point operations of one forward pass for one image, by part (2 per multiply-add of
/// every matrix product, element-wise work left out).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockwiseFlops {
    /// Feature trunk: its patch embedding, global modulation and blocks.
    pub trunk: f64,
    /// One segment's velocity head: time and label embedding, patch embedding, per-token global
    /// modulation, its blocks and the final layer.
    pub segment: f64,
    /// The FRN: its patch embedding and blocks (0 without an FRN).
    pub frn: f64,
}

impl BlockwiseConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("input_size", self.input_size),
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("num_classes", self.num_classes),
            ("segments", self.segments),
            ("segment_depth", self.segment_depth),
            ("adaln_lora_dim", self.adaln_lora_dim),
        ];
        check_transformer_shape(&positive, self.input_size, self.patch_size, self.hidden_size, self.num_heads)?;
        // 2-D RoPE rotates half of each head with the row and half with the column, in pairs.
        if !self.head_dim().is_multiple_of(4) {
            return Err(format!("head dim {} (hidden_size / num_heads) must be a multiple of 4", self.head_dim()));
        }
        check_training_knobs(self.mlp_ratio, self.class_dropout_prob)?;
        if self.rope_theta.is_nan() || self.rope_theta <= 1.0 {
            return Err("rope_theta must be above 1".into());
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    pub fn grid_size(&self) -> usize {
        self.input_size / self.patch_size.max(1)
    }

    pub fn num_tokens(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    fn patch_dim(&self) -> usize {
        self.in_channels * self.patch_size * self.patch_size
    }

    pub fn null_label(&self) -> Option<u32> {
        (self.class_dropout_prob > 0.0).then_some(self.num_classes as u32)
    }

    pub fn label_rows(&self) -> usize {
        self.num_classes + usize::from(self.class_dropout_prob > 0.0)
    }

    /// The segment a network time falls in: min(floor((1 - t) M), M - 1), so a segment's start
    /// time (its noisiest end) belongs to it, as in the official sampler's loops. A tolerance
    /// of 1e-6 keeps boundary times that f32 rounds just below a boundary in their segment.
    pub fn segment_of(&self, t: f64) -> usize {
        let m = self.segments;
        let position = ((1.0 - t) * m as f64 + 1e-6).floor();
        if position.is_nan() || position < 0.0 {
            0
        } else {
            (position as usize).min(m - 1)
        }
    }

    /// (start, end) network times of segment `s`: start = 1 - s/M (noisier), end = 1 - (s+1)/M.
    pub fn segment_bounds(&self, s: usize) -> (f64, f64) {
        let m = self.segments as f64;
        (1.0 - s as f64 / m, 1.0 - (s + 1) as f64 / m)
    }

    /// FLOPs of one forward of each part for one image.
    pub fn flops(&self) -> BlockwiseFlops {
        let n = self.num_tokens() as f64;
        let d = self.hidden_size as f64;
        let r = self.adaln_lora_dim as f64;
        let patch_in = self.patch_dim() as f64;
        let patch_out = (self.out_channels() * self.patch_size * self.patch_size) as f64;
        let attention_and_mlp = n * d * 3.0 * d + 2.0 * n * n * d + n * d * d + 2.0 * n * d * self.mlp_hidden() as f64;
        let trunk_block = d * r + r * 6.0 * d + attention_and_mlp; // per-sample low-rank adaLN
        let velocity_block = n * (2.0 * d * r + r * 6.0 * d) + attention_and_mlp; // per-token adaLN
        let frn_block = d * 6.0 * d + attention_and_mlp;
        let trunk = n * patch_in * d + d * 6.0 * d + self.feature_alignment_depth as f64 * trunk_block;
        let segment = FREQUENCY_EMBEDDING_SIZE as f64 * d
            + d * d
            + n * patch_in * d
            + n * 2.0 * d * 6.0 * d
            + self.segment_depth as f64 * velocity_block
            + n * 2.0 * d * 2.0 * d
            + n * d * patch_out;
        let frn = if self.frn_depth > 0 { n * patch_in * d + self.frn_depth as f64 * frn_block } else { 0.0 };
        BlockwiseFlops { trunk: 2.0 * trunk, segment: 2.0 * segment, frn: 2.0 * frn }
    }

    /// FLOPs of a plain forward (trunk and one segment) for one image.
    pub fn forward_flops(&self) -> f64 {
        let f = self.flops();
        f.trunk + f.segment
    }
}

// ---- Helpers ----

/// (B, C, H, W) -> (B, N, C p p): patches flattened in (c, p1, p2) order, tokens row-major.
pub fn patchify(xs: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let (gh, gw) = (h / p, w / p);
    xs.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, gh * gw, c * p * p))
}

/// (B, N, C p p) in (c, p1, p2) order -> (B, C, H, W) of a square grid.
pub fn unpatchify(xs: &Tensor, p: usize, c: usize) -> Result<Tensor> {
    let (b, n, _) = xs.dims3()?;
    let g = (n as f64).sqrt().round() as usize;
    xs.reshape((b, g, g, c, p, p))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, g * p, g * p))
}

/// cos and sin tables (N, head_dim / 2) of the 2-D RoPE: pair k < head_dim/4 rotates with the
/// token's row at frequency theta^(-4k/head_dim), the other pairs with its column, k counted
/// from head_dim/4 (FiT's `VisionRotaryEmbedding` with interleaved pairs).
pub fn rope_tables(grid: usize, head_dim: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let quarter = head_dim / 4;
    let freqs: Vec<f64> = (0..quarter).map(|k| 1.0 / theta.powf(2.0 * k as f64 / (head_dim / 2) as f64)).collect();
    let (mut cos, mut sin) =
        (Vec::with_capacity(grid * grid * 2 * quarter), Vec::with_capacity(grid * grid * 2 * quarter));
    for row in 0..grid {
        for col in 0..grid {
            for pos in [row as f64, col as f64] {
                for f in &freqs {
                    cos.push((pos * f).cos() as f32);
                    sin.push((pos * f).sin() as f32);
                }
            }
        }
    }
    let shape = (grid * grid, 2 * quarter);
    Ok((Tensor::from_vec(cos, shape, device)?, Tensor::from_vec(sin, shape, device)?))
}

/// Interleaved-pair rotation of (B, H, N, Dh): candle's kernel at inference, composed ops when
/// gradients flow (the kernel has no backward).
fn rope_interleaved(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        candle_nn::rotary_emb::rope_i_slow(xs, cos, sin)
    } else {
        candle_nn::rotary_emb::rope_i(&xs.contiguous()?, cos, sin)
    }
}

/// RMSNorm with a learnable weight over the last dimension (official `norms.RMSNorm`).
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))? })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.track_op() || self.weight.track_op() {
            candle_nn::ops::rms_norm_slow(xs, &self.weight, NORM_EPS as f32)
        } else {
            candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, NORM_EPS as f32)
        }
    }
}

// ---- Small blocks ----

/// Multi-head self-attention with RMSNorm q/k norms and 2-D RoPE.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    proj: Linear,
    num_heads: usize,
}

impl Attention {
    fn new(cfg: &BlockwiseConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            qkv: linear(d, 3 * d, vb.pp("qkv"))?,
            q_norm: RmsNorm::new(cfg.head_dim(), vb.pp("q_norm"))?,
            k_norm: RmsNorm::new(cfg.head_dim(), vb.pp("k_norm"))?,
            proj: linear(d, d, vb.pp("proj"))?,
            num_heads: cfg.num_heads,
        })
    }

    fn forward(&self, xs: &Tensor, rope: &Rope) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let head_dim = d / self.num_heads;
        let qkv = xs.apply(&self.qkv)?.reshape((b, n, 3, self.num_heads, head_dim))?.permute((2, 0, 3, 1, 4))?;
        // Norms before the rotation, as the official Attention.
        let q = rope_interleaved(&qkv.i(0)?.contiguous()?.apply(&self.q_norm)?, &rope.cos, &rope.sin)?;
        let k = rope_interleaved(&qkv.i(1)?.contiguous()?.apply(&self.k_norm)?, &rope.cos, &rope.sin)?;
        let v = qkv.i(2)?.contiguous()?;
        let q = (q * (head_dim as f64).powf(-0.5))?;
        let attn = super::fused::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?.apply(&self.proj)
    }
}

/// A block's adaLN modulation: the low-rank `lora` form SiLU -> Linear(in, r) -> Linear(r, 6D)
/// (keys `.1`, `.2`) or the plain SiLU -> Linear(in, 6D) (key `.1`) of the FRN blocks.
#[derive(Debug, Clone)]
enum Modulation {
    LowRank(Linear, Linear),
    Plain(Linear),
}

impl Modulation {
    fn forward(&self, c: &Tensor) -> Result<Tensor> {
        match self {
            Modulation::LowRank(down, up) => c.silu()?.apply(down)?.apply(up),
            Modulation::Plain(full) => c.silu()?.apply(full),
        }
    }
}

/// Conditioning of a block: one row per sample (trunk, FRN) or per token (velocity blocks).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Conditioning {
    PerSample,
    PerToken,
}

/// The official `TransformerBlock`: adaLN-Zero with the modulation plus an optional global term.
#[derive(Debug, Clone)]
struct Block {
    attn: Attention,
    mlp: Mlp,
    modulation: Modulation,
    conditioning: Conditioning,
}

impl Block {
    fn new(cfg: &BlockwiseConfig, kind: BlockKind, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let vm = vb.pp("adaLN_modulation");
        let (modulation, conditioning) = match kind {
            BlockKind::Trunk => (
                Modulation::LowRank(
                    linear(d, cfg.adaln_lora_dim, vm.pp("1"))?,
                    linear(cfg.adaln_lora_dim, 6 * d, vm.pp("2"))?,
                ),
                Conditioning::PerSample,
            ),
            BlockKind::Velocity => (
                Modulation::LowRank(
                    linear(2 * d, cfg.adaln_lora_dim, vm.pp("1"))?,
                    linear(cfg.adaln_lora_dim, 6 * d, vm.pp("2"))?,
                ),
                Conditioning::PerToken,
            ),
            BlockKind::Frn => (Modulation::Plain(linear(d, 6 * d, vm.pp("1"))?), Conditioning::PerSample),
        };
        Ok(Self {
            attn: Attention::new(cfg, vb.pp("attn"))?,
            mlp: Mlp::new(cfg.hidden_size, cfg.mlp_hidden(), vb.pp("mlp"))?,
            modulation,
            conditioning,
        })
    }

    /// xs (B, N, D); c (B, Dc) or (B, N, Dc); global, when given, shaped like the modulation.
    fn forward(&self, xs: &Tensor, c: &Tensor, global: Option<&Tensor>, rope: &Rope) -> Result<Tensor> {
        let mut m = self.modulation.forward(c)?;
        if let Some(global) = global {
            m = (m + global)?;
        }
        let chunks = m.chunk(6, D::Minus1)?;
        let (shift_msa, scale_msa, gate_msa) = (&chunks[0], &chunks[1], &chunks[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&chunks[3], &chunks[4], &chunks[5]);
        let h = self.modulate(&layer_norm_no_affine(xs, NORM_EPS)?, shift_msa, scale_msa)?;
        let xs = self.gate(xs, &self.attn.forward(&h, rope)?, gate_msa)?;
        let h = self.modulate(&layer_norm_no_affine(&xs, NORM_EPS)?, shift_mlp, scale_mlp)?.apply(&self.mlp)?;
        self.gate(&xs, &h, gate_mlp)
    }

    fn modulate(&self, xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        match self.conditioning {
            Conditioning::PerSample => modulate(xs, shift, scale),
            Conditioning::PerToken => xs.mul(&(scale + 1.0)?)?.add(shift),
        }
    }

    fn gate(&self, xs: &Tensor, h: &Tensor, gate: &Tensor) -> Result<Tensor> {
        match self.conditioning {
            Conditioning::PerSample => gated_residual(xs, h, gate),
            Conditioning::PerToken => xs + h.mul(gate)?,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum BlockKind {
    Trunk,
    Velocity,
    Frn,
}

/// The final layer: per-token shift and scale from concat(c, features), LayerNorm, linear out.
#[derive(Debug, Clone)]
struct FinalLayer {
    ada_ln_modulation: Linear,
    linear: Linear,
}

impl FinalLayer {
    fn new(cfg: &BlockwiseConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let out = cfg.patch_size * cfg.patch_size * cfg.out_channels();
        Ok(Self {
            ada_ln_modulation: linear(2 * d, 2 * d, vb.pp("adaLN_modulation.1"))?,
            linear: linear(d, out, vb.pp("linear"))?,
        })
    }

    fn forward(&self, xs: &Tensor, c_tok: &Tensor) -> Result<Tensor> {
        let chunks = c_tok.silu()?.apply(&self.ada_ln_modulation)?.chunk(2, D::Minus1)?;
        layer_norm_no_affine(xs, NORM_EPS)?.mul(&(&chunks[1] + 1.0)?)?.add(&chunks[0])?.apply(&self.linear)
    }
}

/// The projection head MLP(D -> P -> P -> dim_projection) with SiLU, used only by the
/// feature-alignment loss (`linear_projection.{0,2,4}`).
#[derive(Debug, Clone)]
pub struct ProjectionHead {
    layers: [Linear; 3],
}

impl ProjectionHead {
    fn new(cfg: &BlockwiseConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p) = (cfg.hidden_size, cfg.projection_hidden);
        Ok(Self {
            layers: [linear(d, p, vb.pp("0"))?, linear(p, p, vb.pp("2"))?, linear(p, cfg.dim_projection, vb.pp("4"))?],
        })
    }
}

impl Module for ProjectionHead {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply(&self.layers[0])?.silu()?.apply(&self.layers[1])?.silu()?.apply(&self.layers[2])
    }
}

#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

// ---- The model ----

/// Everything one step of a segment needs besides the state: the conditioning c = t_emb + y_emb
/// and the state's patches (shared by the trunk, the FRN and the velocity head).
pub struct StepInputs {
    pub c: Tensor,
    pub patches: Tensor,
}

#[derive(Debug, Clone)]
pub struct Blockwise {
    t_embedder: TimestepEmbedder,
    y_embedder: Embedding,
    representation_x_embedder: Linear,
    representation_blocks: Vec<Block>,
    linear_projection: Option<ProjectionHead>,
    x_embedder: Linear,
    velocity_blocks: Vec<Vec<Block>>,
    global_ada_ln: Linear,
    global_ada_ln2: Linear,
    final_layer: FinalLayer,
    frn_blocks: Vec<Block>,
    rope: Rope,
    /// (1, N, D) fixed sin-cos table when `abs_pos_embed` is set.
    pos_embed: Option<Tensor>,
    cfg: BlockwiseConfig,
}

impl Blockwise {
    pub fn new(cfg: &BlockwiseConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_label_rows(cfg, cfg.label_rows(), vb)
    }

    /// Like `new` with an explicit label-table size (a declared null label adds the last row).
    pub fn with_label_rows(cfg: &BlockwiseConfig, label_rows: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let blocks = |kind, depth: usize, vb: VarBuilder| {
            (0..depth).map(|i| Block::new(cfg, kind, vb.pp(i))).collect::<Result<Vec<_>>>()
        };
        let velocity_blocks = (0..cfg.segments)
            .map(|s| blocks(BlockKind::Velocity, cfg.segment_depth, vb.pp("velocity_blocks").pp(s)))
            .collect::<Result<Vec<_>>>()?;
        let linear_projection =
            if cfg.dim_projection > 0 { Some(ProjectionHead::new(cfg, vb.pp("linear_projection"))?) } else { None };
        let (cos, sin) = rope_tables(cfg.grid_size(), cfg.head_dim(), cfg.rope_theta, vb.device())?;
        Ok(Self {
            t_embedder: TimestepEmbedder::new(d, vb.pp("t_embedder"))?,
            y_embedder: embedding(label_rows, d, vb.pp("y_embedder.embedding_table"))?,
            representation_x_embedder: linear(cfg.patch_dim(), d, vb.pp("representation_x_embedder.proj"))?,
            representation_blocks: blocks(
                BlockKind::Trunk,
                cfg.feature_alignment_depth,
                vb.pp("representation_blocks"),
            )?,
            linear_projection,
            x_embedder: linear(cfg.patch_dim(), d, vb.pp("x_embedder.proj"))?,
            velocity_blocks,
            global_ada_ln: linear(d, 6 * d, vb.pp("global_adaLN_modulation.1"))?,
            global_ada_ln2: linear(2 * d, 6 * d, vb.pp("global_adaLN_modulation2.1"))?,
            final_layer: FinalLayer::new(cfg, vb.pp("final_layer"))?,
            frn_blocks: blocks(BlockKind::Frn, cfg.frn_depth, vb.pp("frn_blocks"))?,
            rope: Rope { cos: cos.to_dtype(vb.dtype())?, sin: sin.to_dtype(vb.dtype())? },
            pos_embed: if cfg.abs_pos_embed {
                let table = super::sit::sincos_pos_embed_2d(d, cfg.grid_size());
                Some(Tensor::from_vec(table, (1, cfg.num_tokens(), d), vb.device())?.to_dtype(vb.dtype())?)
            } else {
                None
            },
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &BlockwiseConfig {
        &self.cfg
    }

    pub fn has_frn(&self) -> bool {
        !self.frn_blocks.is_empty()
    }

    /// c = t_emb(t) + y_emb(y), and the patches of `xs`.
    pub fn step_inputs(&self, xs: &Tensor, t: &Tensor, y: &Tensor) -> Result<StepInputs> {
        let patches = patchify(xs, self.cfg.patch_size)?;
        let c = (t.apply(&self.t_embedder)?.to_dtype(patches.dtype())? + y.apply(&self.y_embedder)?)?;
        Ok(StepInputs { c, patches })
    }

    /// Tokens of a patch embedding, with the absolute table when the model has one.
    fn embed(&self, patches: &Tensor, embedder: &Linear) -> Result<Tensor> {
        let h = patches.apply(embedder)?;
        match &self.pos_embed {
            Some(table) => h.broadcast_add(table),
            None => Ok(h),
        }
    }

    /// The trunk's per-token semantic features (B, N, D).
    pub fn trunk(&self, inputs: &StepInputs) -> Result<Tensor> {
        let global = inputs.c.silu()?.apply(&self.global_ada_ln)?;
        let mut h = self.embed(&inputs.patches, &self.representation_x_embedder)?;
        for block in &self.representation_blocks {
            h = block.forward(&h, &inputs.c, Some(&global), &self.rope)?;
        }
        Ok(h)
    }

    /// The FRN's residual (B, N, D); FRA's features are anchor + coeff * residual.
    pub fn frn_residual(&self, inputs: &StepInputs) -> Result<Tensor> {
        if self.frn_blocks.is_empty() {
            return Err(candle_core::Error::Msg("this blockwise model has no FRN (frn_depth = 0)".into()));
        }
        let mut h = self.embed(&inputs.patches, &self.representation_x_embedder)?;
        for block in &self.frn_blocks {
            h = block.forward(&h, &inputs.c, None, &self.rope)?;
        }
        Ok(h)
    }

    /// The projection head over trunk features, for the alignment loss.
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        match &self.linear_projection {
            Some(head) => features.apply(head),
            None => {
                Err(candle_core::Error::Msg("this blockwise model has no projection head (dim_projection = 0)".into()))
            }
        }
    }

    /// Segment `segment`'s velocity (B, C_out, H, W) from the step inputs and trunk features.
    pub fn velocity_head(&self, inputs: &StepInputs, features: &Tensor, segment: usize) -> Result<Tensor> {
        let blocks = self.velocity_blocks.get(segment).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "segment {segment} is not below the model's {} segments",
                self.cfg.segments
            ))
        })?;
        let (b, n, d) = features.dims3()?;
        let c_tok = Tensor::cat(&[&inputs.c.unsqueeze(1)?.broadcast_as((b, n, d))?, features], D::Minus1)?;
        let global = c_tok.silu()?.apply(&self.global_ada_ln2)?;
        let mut h = self.embed(&inputs.patches, &self.x_embedder)?;
        for block in blocks {
            h = block.forward(&h, &c_tok, Some(&global), &self.rope)?;
        }
        let out = self.final_layer.forward(&h, &c_tok)?;
        unpatchify(&out, self.cfg.patch_size, self.cfg.out_channels())
    }

    /// The velocity of one segment for the whole batch, trunk included (all channels).
    pub fn forward_segment(&self, xs: &Tensor, t: &Tensor, y: &Tensor, segment: usize) -> Result<Tensor> {
        let inputs = self.step_inputs(xs, t, y)?;
        let features = self.trunk(&inputs)?;
        self.velocity_head(&inputs, &features, segment)
    }

    /// The velocity with each row's segment taken from its own time: rows are grouped by segment
    /// (an adaptive solver's batch may span several), the trunk runs once on the whole batch.
    pub fn forward_full(&self, xs: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        let times = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let segments: Vec<usize> = times.iter().map(|&ti| self.cfg.segment_of(ti)).collect();
        let inputs = self.step_inputs(xs, t, y)?;
        let features = self.trunk(&inputs)?;
        self.heads_by_segment(&inputs, &features, &segments)
    }

    /// Velocity heads for rows with per-row segments, merged back in row order.
    pub fn heads_by_segment(&self, inputs: &StepInputs, features: &Tensor, segments: &[usize]) -> Result<Tensor> {
        let first = segments.first().copied().unwrap_or(0);
        if segments.iter().all(|&s| s == first) {
            return self.velocity_head(inputs, features, first);
        }
        let device = features.device();
        let mut order = Vec::with_capacity(segments.len());
        let mut parts = Vec::new();
        for segment in 0..self.cfg.segments {
            let rows: Vec<u32> = (0..segments.len()).filter(|&r| segments[r] == segment).map(|r| r as u32).collect();
            if rows.is_empty() {
                continue;
            }
            let index = Tensor::from_vec(rows.clone(), rows.len(), device)?;
            let part_inputs =
                StepInputs { c: inputs.c.index_select(&index, 0)?, patches: inputs.patches.index_select(&index, 0)? };
            parts.push(self.velocity_head(&part_inputs, &features.index_select(&index, 0)?, segment)?);
            order.extend(rows);
        }
        // Row r of the result is row position_of[r] of the concatenation.
        let mut position_of = vec![0u32; order.len()];
        for (position, &row) in order.iter().enumerate() {
            position_of[row as usize] = position as u32;
        }
        let merged = Tensor::cat(&parts, 0)?;
        merged.index_select(&Tensor::from_vec(position_of, segments.len(), device)?, 0)
    }

    /// Like `forward_full`, keeping only the velocity channels of a `learn_sigma` output.
    pub fn forward(&self, xs: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        let out = self.forward_full(xs, t, y)?;
        self.velocity_channels(out)
    }

    /// The first in_channels of a `learn_sigma` output; the output itself otherwise.
    pub fn velocity_channels(&self, out: Tensor) -> Result<Tensor> {
        if self.cfg.learn_sigma {
            out.narrow(1, 0, self.cfg.in_channels)
        } else {
            Ok(out)
        }
    }
}

// ---- Feature residual approximation (FRA) ----

/// The trunk features kept between the FRA evaluations of one solve: taken at the first
/// evaluation in a segment, reused with the FRN at the segment's later steps.
struct FraAnchor {
    segment: usize,
    /// Network time the anchor was taken at (the segment's start on an aligned grid).
    time: f64,
    features: Tensor,
}

/// FRA's forward (the released `sample_ode_frn`): the full trunk at the first evaluation in a
/// segment, kept as the anchor; later evaluations in the same segment use anchor + coeff x FRN
/// with coeff = (t_anchor - t) / segment length, the fraction of the segment covered since. A
/// batch whose rows span segments, a batch of another size (guidance switching on or off) or a
/// model without an FRN runs the full network and takes a new anchor where it can.
pub fn forward_fra(
    net: &Blockwise,
    xs: &Tensor,
    t: &Tensor,
    y: &Tensor,
    memo: &mut crate::velocity::FeatureMemo,
) -> crate::error::Result<Tensor> {
    let cfg = net.config();
    let times = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let Some(&time) = times.first() else { return Ok(net.forward(xs, t, y)?) };
    let segment = cfg.segment_of(time);
    if !net.has_frn() || times.iter().any(|&ti| cfg.segment_of(ti) != segment) {
        return Ok(net.forward(xs, t, y)?);
    }
    let inputs = net.step_inputs(xs, t, y)?;
    let anchor = memo.state.as_ref().and_then(|s| s.downcast_ref::<FraAnchor>());
    let reusable = anchor.filter(|a| a.segment == segment && a.features.dim(0).ok() == Some(xs.dim(0).unwrap_or(0)));
    let features = match reusable {
        Some(anchor) => {
            let length = 1.0 / cfg.segments as f64;
            let coeff: Vec<f32> = times.iter().map(|&ti| ((anchor.time - ti) / length) as f32).collect();
            let coeff = Tensor::from_vec(coeff, (times.len(), 1, 1), xs.device())?.to_dtype(anchor.features.dtype())?;
            let features = (&anchor.features + net.frn_residual(&inputs)?.broadcast_mul(&coeff)?)?;
            memo.reused += 1;
            features
        }
        None => {
            let features = net.trunk(&inputs)?;
            memo.state = Some(Box::new(FraAnchor { segment, time, features: features.clone() }));
            features
        }
    };
    Ok(net.velocity_channels(net.velocity_head(&inputs, &features, segment)?)?)
}
