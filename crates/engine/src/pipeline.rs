//! noise -> sampler -> optional latent decode -> u8 pixels, for one model directory.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::image::{to_images, Image};
use crate::models::autoencoder::AutoencoderKl;
use crate::noise;
use crate::samplers::{Fields, SolveStats, StepObserver};
use crate::schedule::Schedule;
use crate::settings::{ImageInputs, SolveSettings};
use crate::velocity::{Guidance, GuidedField, VelocityModel};
use crate::weights::WeightsFile;

/// Largest batch the engine accepts in one call; bigger requests are split by the caller.
pub const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone)]
pub struct Generation {
    /// One image per input; those of `stats.failures` are where their solve stopped.
    pub images: Vec<Image>,
    /// The final sampler state (latents for latent models), (B, C, H, W).
    pub state: Tensor,
    pub stats: SolveStats,
}

pub struct Pipeline {
    config: ModelConfig,
    velocity: Box<dyn VelocityModel>,
    /// Networks beside the main one (`[networks.NAME]`), for samplers that use them.
    auxiliary: BTreeMap<String, Box<dyn VelocityModel>>,
    autoencoder: Option<AutoencoderKl>,
    device: Device,
    dtype: DType,
}

impl Pipeline {
    /// Load `model.toml` and the weights it names; every mismatch is reported at once.
    pub fn load(model_dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::load(model_dir)?;
        let dtype = DType::F32;
        let null_label = config.null_label();
        let velocity = config.network.load(model_dir, null_label, dtype, device)?;
        let mut auxiliary = BTreeMap::new();
        for (name, section) in &config.networks {
            auxiliary.insert(name.clone(), section.load(model_dir, null_label, dtype, device)?);
        }
        let autoencoder = match &config.autoencoder {
            Some(ae) => {
                let arch = ae.arch.clone();
                Some(
                    WeightsFile::open(&model_dir.join(&ae.weights))?
                        .build(dtype, device, |vb| AutoencoderKl::new(&arch, vb))?,
                )
            }
            None => None,
        };
        Ok(Self { config, velocity, auxiliary, autoencoder, device: device.clone(), dtype })
    }

    pub fn from_parts(
        config: ModelConfig,
        velocity: Box<dyn VelocityModel>,
        autoencoder: Option<AutoencoderKl>,
        device: &Device,
    ) -> Self {
        let auxiliary = BTreeMap::new();
        Self { config, velocity, auxiliary, autoencoder, device: device.clone(), dtype: DType::F32 }
    }

    /// This pipeline with the auxiliary network `name` added (its `[networks.NAME]` section is
    /// the caller's to put in the config).
    pub fn with_network(mut self, name: &str, net: Box<dyn VelocityModel>) -> Self {
        self.auxiliary.insert(name.to_string(), net);
        self
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

    /// An auxiliary network by its `[networks.NAME]` name.
    pub fn network(&self, name: &str) -> Option<&dyn VelocityModel> {
        self.auxiliary.get(name).map(|n| n.as_ref())
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
    pub fn validate(&self, settings: &SolveSettings, inputs: &ImageInputs) -> Result<()> {
        if inputs.is_empty() {
            return Err(Error::invalid("n", "at least one image is required"));
        }
        if inputs.labels.len() != inputs.seeds.len() {
            return Err(Error::invalid(
                "seeds",
                format!("{} seeds for {} images", inputs.seeds.len(), inputs.labels.len()),
            ));
        }
        if inputs.len() > MAX_BATCH {
            return Err(Error::invalid(
                "n",
                format!("{} images in one batch exceeds the limit {MAX_BATCH}", inputs.len()),
            ));
        }
        let classes = self.config.num_classes();
        if let Some(bad) = inputs.labels.iter().find(|&&l| l as usize >= classes) {
            return Err(Error::invalid(
                "label",
                format!("{bad} is out of range: this model has classes 0..{}", classes - 1),
            ));
        }
        settings.check(&self.config)
    }

    /// Solve from each image's own noise to s = 1 and return the final state.
    pub fn sample_state(
        &self,
        settings: &SolveSettings,
        inputs: &ImageInputs,
        observer: &mut dyn StepObserver,
    ) -> Result<(Tensor, SolveStats)> {
        self.validate(settings, inputs)?;
        let (c, h, w) = self.config.state_shape();
        let x0 = noise::batch(&inputs.seeds, &[c, h, w], &self.device)?.to_dtype(self.dtype)?;
        self.solve_from(x0, settings, &inputs.labels, observer)
    }

    /// Solve from a given initial state (for references and evaluation on shared noise).
    pub fn solve_from(
        &self,
        x0: Tensor,
        settings: &SolveSettings,
        labels: &[u32],
        observer: &mut dyn StepObserver,
    ) -> Result<(Tensor, SolveStats)> {
        // An adaptive sampler takes no grid; it is handed the trivial one.
        let schedule = if settings.sampler.is_adaptive() {
            Schedule::uniform(1)?
        } else {
            settings.schedule.build(settings.steps)?
        };
        let guidance = self.guidance(settings.guidance, settings.guidance_interval);
        let field = GuidedField::new(self.velocity.as_ref(), labels, guidance.clone(), &self.device)?;
        // Auxiliary networks (a refiner) are guided like the main one, as FlowTurbo's release does.
        let mut auxiliary = Vec::new();
        for (name, _) in settings.sampler.networks() {
            let net = self.network(name).ok_or_else(|| {
                Error::invalid(
                    "sampler",
                    format!("{} calls the network {name:?}, which this model does not have", settings.sampler),
                )
            })?;
            auxiliary.push((name, GuidedField::new(net, labels, guidance.clone(), &self.device)?));
        }
        let mut fields = Fields::main(&field);
        for (name, aux) in &auxiliary {
            fields = fields.with(name, aux);
        }
        settings.sampler.solve_with(&fields, x0, &schedule, observer)
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

    pub fn generate(
        &self,
        settings: &SolveSettings,
        inputs: &ImageInputs,
        observer: &mut dyn StepObserver,
    ) -> Result<Generation> {
        let span = tracing::debug_span!("generate", images = inputs.len(), sampler = %settings.sampler);
        let _enter = span.enter();
        let (state, stats) = self.sample_state(settings, inputs, observer)?;
        let images = to_images(&self.decode(&state)?)?;
        Ok(Generation { images, state, stats })
    }
}
