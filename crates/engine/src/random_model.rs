//! Seeded random weights and throw-away model directories, for tests and demos before a
//! trained model exists. Weights are N(0, 1/fan_in) (constants where the layer asks for them).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::{AutoencoderSection, Defaults, GuidanceSection, ModelConfig, NetworkSection, TimeConvention};
use crate::error::{Error, Result};
use crate::models::autoencoder::{AutoencoderConfig, AutoencoderKl};
use crate::models::blockwise::Blockwise;
use crate::models::sit::{Sit, SitConfig};
use crate::network::NetworkArch;
use crate::weights::save_safetensors;

/// A VarBuilder backend creating seeded random tensors and remembering them for saving.
struct RandomBackend {
    rng: Mutex<ChaCha8Rng>,
    created: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SimpleBackend for RandomBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(t) = self.created.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?.get(name) {
            return Ok(t.clone());
        }
        let dims = s.dims().to_vec();
        let n = s.elem_count();
        let values: Vec<f32> = match h {
            Init::Const(c) => vec![c as f32; n],
            _ => {
                let fan_in = if dims.len() >= 2 { n / dims[0] } else { 50 };
                let normal = Normal::new(0.0f32, (1.0 / fan_in as f32).sqrt())
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let mut rng = self.rng.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
                (0..n).map(|_| normal.sample(&mut *rng)).collect()
            }
        };
        let t = Tensor::from_vec(values, dims, dev)?.to_dtype(dtype)?;
        self.created
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("random backend cannot create {name} without a shape")))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// A VarBuilder that invents seeded random weights, and the map where they end up.
pub fn random_var_builder(seed: u64, device: &Device) -> (VarBuilder<'static>, Arc<Mutex<HashMap<String, Tensor>>>) {
    let created = Arc::new(Mutex::new(HashMap::new()));
    let backend = RandomBackend { rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)), created: created.clone() };
    (VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone()), created)
}

/// Label names of MNIST-style digit models, index = class.
pub const DIGIT_NAMES: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];

/// The architecture of the tiny MNIST-shaped latent model (28x28x1 <-> 4x7x7).
pub fn tiny_latent_config(name: &str) -> ModelConfig {
    ModelConfig {
        name: name.to_string(),
        description: "random weights: a test fixture, not a trained model".into(),
        label_names: DIGIT_NAMES.iter().map(|s| s.to_string()).collect(),
        network: NetworkSection {
            weights: "velocity.safetensors".into(),
            convention: TimeConvention::Sit,
            arch: NetworkArch::Sit(SitConfig {
                input_size: 7,
                in_channels: 4,
                patch_size: 1,
                hidden_size: 32,
                depth: 2,
                num_heads: 2,
                mlp_ratio: 2.0,
                num_classes: 10,
                class_dropout_prob: 0.1,
                learn_sigma: false,
                in_channels_scale: 1,
            }),
        },
        autoencoder: Some(AutoencoderSection {
            weights: "autoencoder.safetensors".into(),
            scaling_factor: 1.0,
            shift_factor: 0.0,
            arch: AutoencoderConfig {
                in_channels: 1,
                out_channels: 1,
                latent_channels: 4,
                block_out_channels: vec![16, 32, 32],
                layers_per_block: 1,
                norm_num_groups: 8,
                mid_block_add_attention: true,
                use_quant_conv: true,
                use_post_quant_conv: true,
            },
        }),
        guidance: GuidanceSection::default(),
        defaults: Defaults { steps: 4, guidance: 1.5, ..Defaults::default() },
        networks: Default::default(),
        presets: Default::default(),
        sampler_plans: Default::default(),
        schedules: Default::default(),
    }
}

/// `config` with a FlowTurbo refiner beside its SiT (one block of half the width, written with
/// random weights by `write_random_model`) and `plan` as its recommended `flowturbo` plan.
pub fn with_tiny_refiner(mut config: ModelConfig, plan: &str) -> ModelConfig {
    // A refiner is a SiT over (x, v): it follows a SiT main network only.
    let (NetworkArch::Sit(sit) | NetworkArch::FlowturboRefiner(sit)) = &config.network.arch else {
        return config;
    };
    let refiner = SitConfig {
        hidden_size: (sit.hidden_size / 2).max(sit.num_heads * 4),
        depth: 1,
        in_channels_scale: 2,
        learn_sigma: false,
        ..sit.clone()
    };
    config.networks.insert(
        crate::samplers::REFINER_NETWORK.to_string(),
        NetworkSection {
            weights: "refiner.safetensors".into(),
            convention: TimeConvention::Sit,
            arch: NetworkArch::FlowturboRefiner(refiner),
        },
    );
    // Stored in canonical form, as every plan the engine reports is.
    let plan = crate::samplers::Sampler::parse(plan).map(|s| s.canonical()).unwrap_or_else(|_| plan.to_string());
    config.sampler_plans.insert("flowturbo".into(), plan);
    config
}

/// `config` with its network replaced by a tiny blockwise one of the same latent shape and
/// classes (BFM's time convention, 4 segments of one block, a 2-block trunk and a 1-block FRN).
pub fn with_tiny_blockwise(mut config: ModelConfig) -> ModelConfig {
    let (c, h, _) = config.network.arch.state_shape();
    let net = crate::models::blockwise::BlockwiseConfig {
        input_size: h,
        in_channels: c,
        patch_size: 1,
        hidden_size: 32,
        num_heads: 2,
        mlp_ratio: 2.0,
        num_classes: config.network.arch.num_classes(),
        class_dropout_prob: 0.1,
        learn_sigma: false,
        segments: 4,
        segment_depth: 1,
        feature_alignment_depth: 2,
        frn_depth: 1,
        adaln_lora_dim: 8,
        dim_projection: 0,
        projection_hidden: 64,
        rope_theta: 10000.0,
        abs_pos_embed: false,
    };
    config.network = NetworkSection {
        weights: "velocity.safetensors".into(),
        convention: TimeConvention::Lfm,
        arch: NetworkArch::Blockwise(net),
    };
    config
}

/// Save `tensors` plus the fixed `pos_embed` table so the file has the official key set.
pub fn save_sit_weights(net_cfg: &SitConfig, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut all = tensors.clone();
    all.insert("pos_embed".into(), Sit::fixed_pos_embed(net_cfg, &Device::Cpu)?);
    save_safetensors(&all, path)
}

/// Write `config` and seeded random weights for it into `dir`.
pub fn write_random_model(dir: &Path, config: &ModelConfig, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|error| Error::Io { path: dir.to_path_buf(), error })?;
    let device = Device::Cpu;
    let sections = std::iter::once(&config.network).chain(config.networks.values());
    for (i, section) in sections.enumerate() {
        // The main network keeps the seed it always had; auxiliary ones get their own.
        let net_seed = if i == 0 { seed } else { seed.wrapping_add(100 + i as u64) };
        let (vb, created) = random_var_builder(net_seed, &device);
        let path = dir.join(&section.weights);
        match &section.arch {
            NetworkArch::Sit(sit) | NetworkArch::FlowturboRefiner(sit) => {
                Sit::new(sit, vb)?;
                let tensors = created.lock().map_err(|_| Error::EnginePanicked("poisoned".into()))?.clone();
                save_sit_weights(sit, &tensors, &path)?;
            }
            NetworkArch::Blockwise(cfg) => {
                Blockwise::new(cfg, vb)?;
                let tensors = created.lock().map_err(|_| Error::EnginePanicked("poisoned".into()))?.clone();
                save_safetensors(&tensors, &path)?;
            }
        }
    }
    if let Some(ae) = &config.autoencoder {
        let (vb, created) = random_var_builder(seed.wrapping_add(1), &device);
        AutoencoderKl::new(&ae.arch, vb)?;
        let tensors = created.lock().map_err(|_| Error::EnginePanicked("poisoned".into()))?.clone();
        save_safetensors(&tensors, &dir.join(&ae.weights))?;
    }
    let path = dir.join("model.toml");
    std::fs::write(&path, config.to_toml_string()).map_err(|error| Error::Io { path, error })?;
    Ok(())
}
