//! `model.toml`: everything the engine needs to know about a model directory.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::autoencoder::AutoencoderConfig;
use crate::models::sit::SitConfig;

/// How a network's own time and velocity relate to the engine frame (s = 0 noise, s = 1 data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TimeConvention {
    /// SiT, FlowTurbo, W-CFM and our own models: t = s, u = v.
    #[default]
    Sit,
    /// LFM and BFM (noise at t = 1): t = 1 - s, u = -v.
    Lfm,
    /// Rectified-Flow / BOSS checkpoints: t = 999 (s (1 - 1e-3) + 1e-3), u = v.
    RectifiedFlow999,
}

impl TimeConvention {
    pub fn network_time(self, s: f64) -> f64 {
        match self {
            TimeConvention::Sit => s,
            TimeConvention::Lfm => 1.0 - s,
            TimeConvention::RectifiedFlow999 => 999.0 * (s * (1.0 - 1e-3) + 1e-3),
        }
    }

    pub fn velocity_sign(self) -> f64 {
        match self {
            TimeConvention::Lfm => -1.0,
            TimeConvention::Sit | TimeConvention::RectifiedFlow999 => 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Weights file relative to the model directory (.safetensors, .pt or .pth).
    pub weights: String,
    #[serde(default)]
    pub convention: TimeConvention,
    #[serde(flatten)]
    pub sit: SitConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutoencoderSection {
    pub weights: String,
    /// Latent = (encoder sample - shift_factor) * scaling_factor, as in diffusers.
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: f64,
    #[serde(flatten)]
    pub arch: AutoencoderConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuidanceSection {
    /// Channels the guided mix applies to; the rest follow the conditional velocity.
    /// None guides every channel (SiT checkpoints guide only [0, 1, 2]).
    #[serde(default)]
    pub channels: Option<Vec<usize>>,
    /// Guidance is applied only for s in [interval.0, interval.1].
    #[serde(default = "full_interval")]
    pub interval: (f64, f64),
}

/// The times s (0 noise, 1 data) between which guidance applies must lie in [0, 1], in order.
pub fn check_guidance_interval(lo: f64, hi: f64) -> std::result::Result<(), String> {
    if (0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi) && lo <= hi {
        Ok(())
    } else {
        Err(format!("({lo}, {hi}) must satisfy 0 <= lo <= hi <= 1"))
    }
}

fn full_interval() -> (f64, f64) {
    (0.0, 1.0)
}

impl Default for GuidanceSection {
    fn default() -> Self {
        GuidanceSection { channels: None, interval: full_interval() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default = "default_sampler")]
    pub sampler: String,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    #[serde(default = "default_schedule")]
    pub schedule: String,
}

fn default_sampler() -> String {
    "heun".into()
}
fn default_steps() -> usize {
    8
}
fn default_guidance() -> f64 {
    1.0
}
fn default_schedule() -> String {
    "uniform".into()
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            sampler: default_sampler(),
            steps: default_steps(),
            guidance: default_guidance(),
            schedule: default_schedule(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Optional names for the class labels ("zero", "one", ...), index = label.
    #[serde(default)]
    pub label_names: Vec<String>,
    pub network: NetworkSection,
    #[serde(default)]
    pub autoencoder: Option<AutoencoderSection>,
    #[serde(default)]
    pub guidance: GuidanceSection,
    #[serde(default)]
    pub defaults: Defaults,
}

impl ModelConfig {
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let cfg: ModelConfig =
            toml::from_str(text).map_err(|e| Error::Config { path: path.to_path_buf(), message: e.to_string() })?;
        cfg.validate().map_err(|message| Error::Config { path: path.to_path_buf(), message })?;
        Ok(cfg)
    }

    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("model.toml");
        let text = std::fs::read_to_string(&path).map_err(|error| Error::Io { path: path.clone(), error })?;
        Self::from_toml_str(&text, &path)
    }

    pub fn to_toml_string(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    fn validate(&self) -> std::result::Result<(), String> {
        self.network.sit.validate().map_err(|e| format!("[network] {e}"))?;
        if let Some(ae) = &self.autoencoder {
            ae.arch.validate().map_err(|e| format!("[autoencoder] {e}"))?;
            if ae.arch.latent_channels != self.network.sit.in_channels {
                return Err(format!(
                    "[autoencoder] latent_channels {} differs from [network] in_channels {}",
                    ae.arch.latent_channels, self.network.sit.in_channels
                ));
            }
            if !(ae.scaling_factor.is_finite() && ae.scaling_factor > 0.0) {
                return Err("[autoencoder] scaling_factor must be a positive number".into());
            }
        }
        if let Some(ch) = &self.guidance.channels {
            if let Some(bad) = ch.iter().find(|&&c| c >= self.network.sit.in_channels) {
                return Err(format!(
                    "[guidance] channels: {bad} is not below in_channels {}",
                    self.network.sit.in_channels
                ));
            }
        }
        let (lo, hi) = self.guidance.interval;
        check_guidance_interval(lo, hi).map_err(|e| format!("[guidance] interval {e}"))?;
        if !self.label_names.is_empty() && self.label_names.len() != self.network.sit.num_classes {
            return Err(format!(
                "label_names has {} entries but num_classes is {}",
                self.label_names.len(),
                self.network.sit.num_classes
            ));
        }
        if self.defaults.steps == 0 {
            return Err("[defaults] steps must be at least 1".into());
        }
        Ok(())
    }

    /// Index of the null (unconditional) label row, if the model was trained with label dropout.
    pub fn null_label(&self) -> Option<u32> {
        self.network.sit.null_label()
    }

    /// Parse "7", or a label name such as "seven", into a class index.
    pub fn parse_label(&self, text: &str) -> Result<u32> {
        let text = text.trim();
        let n = self.network.sit.num_classes;
        let idx = match text.parse::<u32>() {
            Ok(i) => i,
            Err(_) => self
                .label_names
                .iter()
                .position(|name| name.eq_ignore_ascii_case(text))
                .map(|i| i as u32)
                .ok_or_else(|| {
                    let known = if self.label_names.is_empty() {
                        String::new()
                    } else {
                        format!(" or one of {}", self.label_names.join(", "))
                    };
                    Error::invalid("label", format!("{text:?} is not a class index 0..{}{known}", n.saturating_sub(1)))
                })?,
        };
        if (idx as usize) >= n {
            return Err(Error::invalid("label", format!("{idx} is out of range: this model has classes 0..{}", n - 1)));
        }
        Ok(idx)
    }

    /// Expand "3", "seven", "0-9" or "1,4,7" into class indices.
    pub fn parse_labels(&self, spec: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((lo, hi)) if !lo.trim().is_empty() => {
                    let (lo, hi) = (self.parse_label(lo)?, self.parse_label(hi)?);
                    if lo > hi {
                        return Err(Error::invalid("label", format!("range {part:?} runs backwards")));
                    }
                    out.extend(lo..=hi);
                }
                _ => out.push(self.parse_label(part)?),
            }
        }
        if out.is_empty() {
            return Err(Error::invalid("label", format!("{spec:?} names no label")));
        }
        Ok(out)
    }

    /// (channels, height, width) of the images this model produces.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        match &self.autoencoder {
            Some(ae) => {
                let f = ae.arch.downsample_factor();
                let s = self.network.sit.input_size * f;
                (ae.arch.out_channels, s, s)
            }
            None => (self.network.sit.in_channels, self.network.sit.input_size, self.network.sit.input_size),
        }
    }

    /// Shape of the state the sampler integrates (latent or pixel), without the batch.
    pub fn state_shape(&self) -> (usize, usize, usize) {
        let s = &self.network.sit;
        (s.in_channels, s.input_size, s.input_size)
    }
}
