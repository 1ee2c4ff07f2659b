//! KL autoencoder with the diffusers `AutoencoderKL` module tree (`encoder.down_blocks.N.resnets.M`,
//! `decoder.up_blocks.N.*`, `quant_conv`, `post_quant_conv`), so the SD VAE and our small MNIST
//! autoencoder load through one definition.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{group_norm, linear, GroupNorm, Linear, VarBuilder};

use super::conv::{conv2d, Conv2d};
use serde::{Deserialize, Serialize};

const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutoencoderConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
}

fn default_image_channels() -> usize {
    3
}
fn default_layers_per_block() -> usize {
    1
}
fn default_norm_num_groups() -> usize {
    32
}
fn yes() -> bool {
    true
}

impl AutoencoderConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels must list at least one width".into());
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err("in_channels, out_channels and latent_channels must be at least 1".into());
        }
        if self.layers_per_block == 0 {
            return Err("layers_per_block must be at least 1".into());
        }
        if let Some(c) =
            self.block_out_channels.iter().find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "block_out_channels entry {c} is not a multiple of norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        Ok(())
    }

    /// Pixels per latent cell along each side.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn last_width(&self) -> usize {
        self.block_out_channels[self.block_out_channels.len() - 1]
    }
}

fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 3, 1, 1, vb)
}

fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 1, 1, 0, vb)
}

#[derive(Debug, Clone)]
struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let norm1 = group_norm(groups, cin, NORM_EPS, vb.pp("norm1"))?;
        let conv1 = conv3x3(cin, cout, vb.pp("conv1"))?;
        let norm2 = group_norm(groups, cout, NORM_EPS, vb.pp("norm2"))?;
        let conv2 = conv3x3(cout, cout, vb.pp("conv2"))?;
        let conv_shortcut = if cin != cout { Some(conv1x1(cin, cout, vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self { norm1, conv1, norm2, conv2, conv_shortcut })
    }
}

impl Module for ResnetBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = xs.apply(&self.norm1)?.silu()?.apply(&self.conv1)?;
        let h = h.apply(&self.norm2)?.silu()?.apply(&self.conv2)?;
        let skip = match &self.conv_shortcut {
            Some(conv) => xs.apply(conv)?,
            None => xs.clone(),
        };
        skip + h
    }
}

/// Single-head self-attention over spatial positions (the VAE mid block).
#[derive(Debug, Clone)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let group_norm = group_norm(groups, channels, NORM_EPS, vb.pp("group_norm"))?;
        // Older diffusers checkpoints (the original SD VAE uploads) use query/key/value/proj_attn.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy { ["query", "key", "value", "proj_attn"] } else { ["to_q", "to_k", "to_v", "to_out.0"] };
        let to_q = linear(channels, channels, vb.pp(names[0]))?;
        let to_k = linear(channels, channels, vb.pp(names[1]))?;
        let to_v = linear(channels, channels, vb.pp(names[2]))?;
        let to_out = linear(channels, channels, vb.pp(names[3]))?;
        Ok(Self { group_norm, to_q, to_k, to_v, to_out })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = xs.apply(&self.group_norm)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = tokens.apply(&self.to_q)?;
        let k = tokens.apply(&self.to_k)?;
        let v = tokens.apply(&self.to_v)?;
        let scores = (q.matmul(&k.t()?)? * (c as f64).powf(-0.5))?;
        let attn = super::fused::softmax_last_dim(&scores)?;
        let out = attn.matmul(&v)?.apply(&self.to_out)?;
        xs + out.transpose(1, 2)?.reshape((b, c, h, w))?
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnet_1: ResnetBlock2D,
    attention: Option<AttentionBlock>,
    resnet_2: ResnetBlock2D,
}

impl MidBlock {
    fn new(cfg: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.last_width();
        let g = cfg.norm_num_groups;
        let resnet_1 = ResnetBlock2D::new(c, c, g, vb.pp("resnets.0"))?;
        let attention =
            if cfg.mid_block_add_attention { Some(AttentionBlock::new(c, g, vb.pp("attentions.0"))?) } else { None };
        let resnet_2 = ResnetBlock2D::new(c, c, g, vb.pp("resnets.1"))?;
        Ok(Self { resnet_1, attention, resnet_2 })
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.apply(&self.resnet_1)?;
        if let Some(attn) = &self.attention {
            h = h.apply(attn)?;
        }
        h.apply(&self.resnet_2)
    }
}

/// Stride-2 conv with diffusers' asymmetric (0, 1, 0, 1) padding.
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
}

impl Module for Downsample {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?.apply(&self.conv)
    }
}

/// Nearest 2x upsampling followed by a 3x3 conv.
#[derive(Debug, Clone)]
struct Upsample {
    conv: Conv2d,
}

impl Module for Upsample {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        xs.upsample_nearest2d(2 * h, 2 * w)?.apply(&self.conv)
    }
}

#[derive(Debug, Clone)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample>,
}

#[derive(Debug, Clone)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample>,
}

#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(cfg: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        let widths = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = conv3x3(cfg.in_channels, widths[0], vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(widths.len());
        let mut cin = widths[0];
        for (i, &cout) in widths.iter().enumerate() {
            let vb_block = vb.pp("down_blocks").pp(i);
            let mut resnets = Vec::with_capacity(cfg.layers_per_block);
            for j in 0..cfg.layers_per_block {
                let block_in = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock2D::new(block_in, cout, g, vb_block.pp("resnets").pp(j))?);
            }
            let downsampler = if i + 1 < widths.len() {
                Some(Downsample { conv: conv2d(cout, cout, 3, 2, 0, vb_block.pp("downsamplers.0.conv"))? })
            } else {
                None
            };
            down_blocks.push(EncoderBlock { resnets, downsampler });
            cin = cout;
        }
        let mid_block = MidBlock::new(cfg, vb.pp("mid_block"))?;
        let conv_norm_out = group_norm(g, cfg.last_width(), NORM_EPS, vb.pp("conv_norm_out"))?;
        let conv_out = conv3x3(cfg.last_width(), 2 * cfg.latent_channels, vb.pp("conv_out"))?;
        Ok(Self { conv_in, down_blocks, mid_block, conv_norm_out, conv_out })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.apply(&self.conv_in)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = h.apply(resnet)?;
            }
            if let Some(down) = &block.downsampler {
                h = h.apply(down)?;
            }
        }
        h.apply(&self.mid_block)?.apply(&self.conv_norm_out)?.silu()?.apply(&self.conv_out)
    }
}

#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<DecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(cfg: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let conv_in = conv3x3(cfg.latent_channels, reversed[0], vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(cfg, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut cin = reversed[0];
        for (i, &cout) in reversed.iter().enumerate() {
            let vb_block = vb.pp("up_blocks").pp(i);
            let mut resnets = Vec::with_capacity(cfg.layers_per_block + 1);
            for j in 0..=cfg.layers_per_block {
                let block_in = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock2D::new(block_in, cout, g, vb_block.pp("resnets").pp(j))?);
            }
            let upsampler = if i + 1 < reversed.len() {
                Some(Upsample { conv: conv3x3(cout, cout, vb_block.pp("upsamplers.0.conv"))? })
            } else {
                None
            };
            up_blocks.push(DecoderBlock { resnets, upsampler });
            cin = cout;
        }
        let first = cfg.block_out_channels[0];
        let conv_norm_out = group_norm(g, first, NORM_EPS, vb.pp("conv_norm_out"))?;
        let conv_out = conv3x3(first, cfg.out_channels, vb.pp("conv_out"))?;
        Ok(Self { conv_in, mid_block, up_blocks, conv_norm_out, conv_out })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.apply(&self.conv_in)?.apply(&self.mid_block)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = h.apply(resnet)?;
            }
            if let Some(up) = &block.upsampler {
                h = h.apply(up)?;
            }
        }
        h.apply(&self.conv_norm_out)?.silu()?.apply(&self.conv_out)
    }
}

/// The posterior q(z | x) as a diagonal Gaussian.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// exp(logvar / 2).
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// mean + std * eps for given standard-normal noise (seeded samples, reparameterised training).
    pub fn sample_with(&self, eps: &Tensor) -> Result<Tensor> {
        &self.mean + self.std()?.mul(eps)?
    }

    pub fn sample(&self) -> Result<Tensor> {
        self.sample_with(&self.mean.randn_like(0.0, 1.0)?)
    }

    /// KL(q || N(0, I)) summed over latent dims, per sample: (B,).
    pub fn kl(&self) -> Result<Tensor> {
        let terms = ((self.mean.sqr()? + self.logvar.exp()?)? - 1.0)?.sub(&self.logvar)?;
        terms.flatten_from(1)?.sum(1)? * 0.5
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    cfg: AutoencoderConfig,
}

impl AutoencoderKl {
    pub fn new(cfg: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        let encoder = Encoder::new(cfg, vb.pp("encoder"))?;
        let decoder = Decoder::new(cfg, vb.pp("decoder"))?;
        let l = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv { Some(conv1x1(2 * l, 2 * l, vb.pp("quant_conv"))?) } else { None };
        let post_quant_conv =
            if cfg.use_post_quant_conv { Some(conv1x1(l, l, vb.pp("post_quant_conv"))?) } else { None };
        Ok(Self { encoder, decoder, quant_conv, post_quant_conv, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &AutoencoderConfig {
        &self.cfg
    }

    /// Pixels in [-1, 1] -> posterior over latents (before the latent scale factor).
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = xs.apply(&self.encoder)?;
        if let Some(conv) = &self.quant_conv {
            moments = moments.apply(conv)?;
        }
        let parts = moments.chunk(2, 1)?;
        let logvar = parts[1].clamp(-30f32, 20f32)?;
        Ok(DiagonalGaussian { mean: parts[0].clone(), logvar })
    }

    /// Latents (before the latent scale factor) -> pixels, nominally in [-1, 1].
    pub fn decode(&self, zs: &Tensor) -> Result<Tensor> {
        let zs = match &self.post_quant_conv {
            Some(conv) => zs.apply(conv)?,
            None => zs.clone(),
        };
        zs.apply(&self.decoder)
    }
}
