//! noise -> sampler -> optional latent decode -> u8 pixels, for one model directory.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::image::{to_images, Image};
use crate::models::autoencoder::AutoencoderKl;
use crate::models::sit::Sit;
use crate::noise;
use crate::samplers::{Sampler, SolveStats, StepObserver};
use crate::schedule::ScheduleSpec;
use crate::velocity::{Guidance, GuidedField, SitVelocity, VelocityModel};
use crate::weights::Checkpoint;

/// Largest batch the engine accepts in one call; bigger requests are split by the caller.
pub const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// One label per image.
    pub labels: Vec<u32>,
    /// One seed per image; image i's noise depends on `seeds[i]` only.
    pub seeds: Vec<u64>,
    pub sampler: Sampler,
    /// Steps of a fixed-step sampler (ignored by adaptive ones; 0 lets an explicit schedule decide).
    pub steps: usize,
    pub schedule: ScheduleSpec,
    pub guidance: f64,
    /// Times s (0 noise, 1 data) between which guidance applies; callers usually pass the
    /// model's `[guidance] interval`.
    pub guidance_interval: (f64, f64),
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub images: Vec<Image>,
    /// The final sampler state (latents for latent models), (B, C, H, W).
    pub state: Tensor,
    pub stats: SolveStats,
}

pub struct Pipeline {
    config: ModelConfig,
    velocity: Box<dyn VelocityModel>,
    autoencoder: Option<AutoencoderKl>,
    device: Device,
    dtype: DType,
}

impl Pipeline {
    /// Load `model.toml` and the weights it names; every mismatch is reported at once.
    pub fn load(model_dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::load(model_dir)?;
        let dtype = DType::F32;
        let net_cfg = config.network.sit.clone();
        let net = Checkpoint::open(&model_dir.join(&config.network.weights))?
            .build(dtype, device, |vb| Sit::new(&net_cfg, vb))?;
        let velocity = Box::new(SitVelocity { net, convention: config.network.convention });
        let autoencoder = match &config.autoencoder {
            Some(ae) => {
                let arch = ae.arch.clone();
                Some(
                    Checkpoint::open(&model_dir.join(&ae.weights))?
                        .build(dtype, device, |vb| AutoencoderKl::new(&arch, vb))?,
                )
            }
            None => None,
        };
        Ok(Self { config, velocity, autoencoder, device: device.clone(), dtype })
    }

    pub fn from_parts(
        config: ModelConfig,
        velocity: Box<dyn VelocityModel>,
        autoencoder: Option<AutoencoderKl>,
        device: &Device,
    ) -> Self {
        Self { config, velocity, autoencoder, device: device.clone(), dtype: DType::F32 }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn velocity_model(&self) -> &dyn VelocityModel {
        self.velocity.as_ref()
    }

    pub fn autoencoder(&self) -> Option<&AutoencoderKl> {
        self.autoencoder.as_ref()
    }

    /// Guidance with this model's null label and guided channels.
    pub fn guidance(&self, scale: f64, interval: (f64, f64)) -> Guidance {
        Guidance {
            scale,
            null_label: self.config.null_label(),
            channels: self.config.guidance.channels.clone(),
            interval,
        }
    }

    /// Check a request against this model before any work is done.
    pub fn validate(&self, req: &GenerationRequest) -> Result<()> {
        if req.labels.is_empty() {
            return Err(Error::invalid("n", "at least one image is required"));
        }
        if req.labels.len() != req.seeds.len() {
            return Err(Error::invalid("seeds", format!("{} seeds for {} images", req.seeds.len(), req.labels.len())));
        }
        if req.labels.len() > MAX_BATCH {
            return Err(Error::invalid(
                "n",
                format!("{} images in one batch exceeds the limit {MAX_BATCH}", req.labels.len()),
            ));
        }
        let classes = self.config.network.sit.num_classes;
        if let Some(bad) = req.labels.iter().find(|&&l| l as usize >= classes) {
            return Err(Error::invalid(
                "label",
                format!("{bad} is out of range: this model has classes 0..{}", classes - 1),
            ));
        }
        if !req.sampler.is_adaptive() && req.steps == 0 && !matches!(req.schedule, ScheduleSpec::Explicit(_)) {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            return Err(Error::invalid("guidance", format!("must be a finite number >= 0, got {}", req.guidance)));
        }
        if req.guidance != 1.0 && self.config.null_label().is_none() {
            return Err(Error::invalid(
                "guidance",
                "this model has no null label (trained without label dropout); use guidance 1",
            ));
        }
        let (lo, hi) = req.guidance_interval;
        crate::config::check_guidance_interval(lo, hi).map_err(|e| Error::invalid("guidance_interval", e))?;
        if let Sampler::Dopri5(opts) = &req.sampler {
            opts.validate()?;
        }
        Ok(())
    }

    /// Solve from each image's own noise to s = 1 and return the final state.
    pub fn sample_state(
        &self,
        req: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<(Tensor, SolveStats)> {
        self.validate(req)?;
        let (c, h, w) = self.config.state_shape();
        let x0 = noise::batch(&req.seeds, &[c, h, w], &self.device)?.to_dtype(self.dtype)?;
        self.solve_from(x0, req, observer)
    }

    /// Solve from a given initial state (for references and evaluation on shared noise).
    pub fn solve_from(
        &self,
        x0: Tensor,
        req: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<(Tensor, SolveStats)> {
        let schedule = req.schedule.build(if req.sampler.is_adaptive() { 1 } else { req.steps })?;
        let field = GuidedField::new(
            self.velocity.as_ref(),
            &req.labels,
            self.guidance(req.guidance, req.guidance_interval),
            self.config.network.sit.in_channels,
            self.dtype,
            &self.device,
        )?;
        req.sampler.solve(&field, x0, &schedule, observer)
    }

    /// Sampler state -> pixels in [-1, 1] (latent decode when the model has an autoencoder).
    pub fn decode(&self, state: &Tensor) -> Result<Tensor> {
        match (&self.autoencoder, &self.config.autoencoder) {
            (Some(ae), Some(section)) => {
                let z = ((state / section.scaling_factor)? + section.shift_factor)?;
                Ok(ae.decode(&z)?)
            }
            _ => Ok(state.clone()),
        }
    }

    pub fn generate(&self, req: &GenerationRequest, observer: &mut dyn StepObserver) -> Result<Generation> {
        let span = tracing::debug_span!("generate", images = req.labels.len(), sampler = req.sampler.name());
        let _enter = span.enter();
        let (state, stats) = self.sample_state(req, observer)?;
        let images = to_images(&self.decode(&state)?)?;
        Ok(Generation { images, state, stats })
    }
}
