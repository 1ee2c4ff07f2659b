//! Network kinds a model directory can name in `[network]` (and `[networks.NAME]`): each kind
//! says what callers need (classes, null label, state shape) and builds its velocity adapter.
//! A new kind is one model file plus one variant here.

use std::path::Path;

use candle_core::{DType, Device};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::Result;
use crate::models::blockwise::{Blockwise, BlockwiseConfig};
use crate::models::sit::{Sit, SitConfig};
use crate::velocity::{BlockwiseVelocity, SitVelocity, TimeConvention, VelocityModel};
use crate::weights::WeightsFile;

/// The architecture of one network, tagged by `kind` in model.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum NetworkArch {
    /// SiT/DiT transformer (official module tree).
    Sit(SitConfig),
    /// FlowTurbo's velocity refiner: a SiT over concat(x, v) (`in_channels_scale = 2`) that
    /// predicts the offset to add to v; the sampler concatenates, the network sees 2C channels.
    FlowturboRefiner(SitConfig),
    /// Blockwise Flow Matching: a feature trunk and per-segment velocity blocks, dispatched by
    /// each row's time (official `bfm.py` module tree).
    Blockwise(BlockwiseConfig),
}

impl NetworkArch {
    /// Every kind model.toml may name.
    pub const KINDS: &'static [&'static str] = &["sit", "flowturbo-refiner", "blockwise"];
    /// The kind of a `[network]` without `kind` (files written before kinds existed).
    pub const DEFAULT_KIND: &'static str = "sit";

    pub fn kind(&self) -> &'static str {
        match self {
            NetworkArch::Sit(_) => "sit",
            NetworkArch::FlowturboRefiner(_) => "flowturbo-refiner",
            NetworkArch::Blockwise(_) => "blockwise",
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            NetworkArch::Sit(cfg) => cfg.validate(),
            NetworkArch::FlowturboRefiner(cfg) if cfg.in_channels_scale != 2 => Err(format!(
                "in_channels_scale = {}: a refiner takes x and v side by side, so it must be 2",
                cfg.in_channels_scale
            )),
            NetworkArch::FlowturboRefiner(cfg) => cfg.validate(),
            NetworkArch::Blockwise(cfg) => cfg.validate(),
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            NetworkArch::Sit(cfg) | NetworkArch::FlowturboRefiner(cfg) => cfg.num_classes,
            NetworkArch::Blockwise(cfg) => cfg.num_classes,
        }
    }

    pub fn in_channels(&self) -> usize {
        self.state_shape().0
    }

    /// (channels, height, width) of the state the network takes.
    pub fn state_shape(&self) -> (usize, usize, usize) {
        match self {
            NetworkArch::Sit(cfg) | NetworkArch::FlowturboRefiner(cfg) => {
                (cfg.in_channels, cfg.input_size, cfg.input_size)
            }
            NetworkArch::Blockwise(cfg) => (cfg.in_channels, cfg.input_size, cfg.input_size),
        }
    }

    /// Floating-point operations of one forward pass for one image (a blockwise model: the
    /// trunk and one segment's blocks).
    pub fn forward_flops(&self) -> f64 {
        match self {
            NetworkArch::Sit(cfg) | NetworkArch::FlowturboRefiner(cfg) => cfg.forward_flops(),
            NetworkArch::Blockwise(cfg) => cfg.forward_flops(),
        }
    }

    /// Whether the network has a feature residual network for FRA (a blockwise one with frn_depth > 0).
    pub fn has_frn(&self) -> bool {
        matches!(self, NetworkArch::Blockwise(cfg) if cfg.frn_depth > 0)
    }

    /// The null label implied by the architecture alone (trained with label dropout).
    pub fn inferred_null_label(&self) -> Option<u32> {
        match self {
            NetworkArch::Sit(cfg) | NetworkArch::FlowturboRefiner(cfg) => cfg.null_label(),
            NetworkArch::Blockwise(cfg) => cfg.null_label(),
        }
    }

    /// Whether `label` can be this network's null label.
    pub fn check_null_label(&self, label: u32) -> std::result::Result<(), String> {
        // Both module trees append the null row after the classes.
        let classes = self.num_classes();
        if label as usize == classes {
            Ok(())
        } else {
            Err(format!("{label}: a {} null label is the row after the classes, {classes}", self.kind()))
        }
    }
}

/// One network of a model directory: its weights, time convention and architecture. In
/// model.toml the architecture is chosen by `kind` (`sit` when absent, as in older files).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NetworkSection {
    /// Weights file relative to the model directory (.safetensors, .pt or .pth).
    pub weights: String,
    pub convention: TimeConvention,
    #[serde(flatten)]
    pub arch: NetworkArch,
}

impl<'de> Deserialize<'de> for NetworkSection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut table = toml::Table::deserialize(deserializer)?;
        let weights = match table.remove("weights") {
            Some(toml::Value::String(w)) => w,
            Some(other) => return Err(D::Error::custom(format!("weights must be a file name, got {other}"))),
            None => return Err(D::Error::missing_field("weights")),
        };
        let convention = match table.remove("convention") {
            Some(value) => TimeConvention::deserialize(value).map_err(D::Error::custom)?,
            None => TimeConvention::default(),
        };
        let kind = match table.get("kind") {
            None => NetworkArch::DEFAULT_KIND.to_string(),
            Some(toml::Value::String(k)) => k.clone(),
            Some(other) => return Err(D::Error::custom(format!("kind must be a string, got {other}"))),
        };
        if !NetworkArch::KINDS.contains(&kind.as_str()) {
            return Err(D::Error::custom(format!(
                "unknown network kind {kind:?}; known kinds: {}",
                NetworkArch::KINDS.join(", ")
            )));
        }
        table.insert("kind".into(), toml::Value::String(kind));
        let arch = NetworkArch::deserialize(toml::Value::Table(table)).map_err(D::Error::custom)?;
        Ok(NetworkSection { weights, convention, arch })
    }
}

impl NetworkSection {
    /// Load this network's weights from `model_dir` and wrap it for the samplers.
    pub fn load(
        &self,
        model_dir: &Path,
        null_label: Option<u32>,
        dtype: DType,
        device: &Device,
    ) -> Result<Box<dyn VelocityModel>> {
        let weights = WeightsFile::open(&model_dir.join(&self.weights))?;
        match &self.arch {
            NetworkArch::Sit(cfg) | NetworkArch::FlowturboRefiner(cfg) => {
                let rows = cfg.label_rows().max(null_label.map_or(0, |n| n as usize + 1));
                let net = weights.build(dtype, device, |vb| Sit::with_label_rows(cfg, rows, vb))?;
                Ok(Box::new(SitVelocity { net, convention: self.convention }))
            }
            NetworkArch::Blockwise(cfg) => {
                let rows = cfg.label_rows().max(null_label.map_or(0, |n| n as usize + 1));
                let net = weights.build(dtype, device, |vb| Blockwise::with_label_rows(cfg, rows, vb))?;
                Ok(Box::new(BlockwiseVelocity { net, convention: self.convention }))
            }
        }
    }
}
