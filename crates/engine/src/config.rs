//! `model.toml`: everything the engine needs to know about a model directory.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::autoencoder::AutoencoderConfig;
use crate::network::NetworkArch;
pub use crate::network::NetworkSection;
use crate::samplers::{Sampler, FRN_NETWORK, MAIN_NETWORK};
use crate::schedule::{ScheduleAccess, ScheduleSpec};
pub use crate::velocity::TimeConvention;

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
    /// The unconditional label row; when absent, inferred from the network (SiT: num_classes
    /// when trained with label dropout), so inference-only configs need not fake a dropout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub null_label: Option<u32>,
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
        GuidanceSection { channels: None, interval: full_interval(), null_label: None }
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
    /// A preset of `[presets]` applied over these defaults (request fields still win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
}

/// A named set of solve settings (`[presets.NAME]`); absent fields fall back to `[defaults]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<(f64, f64)>,
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
            preset: None,
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
    /// Networks beside the main one (`[networks.refiner]`), by the name samplers ask for.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub networks: BTreeMap<String, NetworkSection>,
    /// Named solve settings, e.g. `[presets.fast]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub presets: BTreeMap<String, Preset>,
    /// The plan this model recommends for a sampler asked for by its bare family name, e.g.
    /// `flowturbo = "flowturbo:H2P4R2"` (tuned for the refiner it ships).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sampler_plans: BTreeMap<String, String>,
    /// Named schedules stored in the model directory (`schedules/NAME.json` or `.txt`), loaded
    /// by `ModelConfig::load`.
    #[serde(skip)]
    pub schedules: BTreeMap<String, Vec<f64>>,
}

/// Directory of a model's stored schedules.
pub const SCHEDULES_DIR: &str = "schedules";

/// Asset names are plain words, so a name can never be read as a path.
pub fn check_asset_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid name (1-64 of a-z, 0-9, '-', '_', '.', not starting with '.')"))
    }
}

impl ModelConfig {
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let cfg: ModelConfig =
            toml::from_str(text).map_err(|e| Error::Config { path: path.to_path_buf(), message: e.to_string() })?;
        cfg.validate().map_err(|message| Error::Config { path: path.to_path_buf(), message })?;
        Ok(cfg)
    }

    /// Read `model.toml` and the schedules stored beside it, and check that the defaults and
    /// presets name samplers and schedules that exist, so a typo fails here, not per request.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("model.toml");
        let text = std::fs::read_to_string(&path).map_err(|error| Error::Io { path: path.clone(), error })?;
        let mut cfg = Self::from_toml_str(&text, &path)?;
        cfg.schedules = load_schedules(&model_dir.join(SCHEDULES_DIR))?;
        cfg.validate_settings().map_err(|message| Error::Config { path: path.clone(), message })?;
        Ok(cfg)
    }

    /// The sampler `text` names: the model's recommended plan when `text` is a key of
    /// `[sampler_plans]` (e.g. plain "flowturbo"), else the text parsed as it is.
    pub fn resolve_sampler(&self, text: &str) -> Result<Sampler> {
        let key = text.trim().to_ascii_lowercase();
        match self.sampler_plans.get(&key) {
            Some(plan) => Sampler::parse(plan),
            None => Sampler::parse(text),
        }
    }

    /// The auxiliary networks `sampler` calls are all in this model; the error names the one missing.
    pub fn check_networks(&self, sampler: &Sampler) -> Result<()> {
        if matches!(sampler, Sampler::Fra) && !self.network.arch.has_frn() {
            return Err(Error::invalid(
                "sampler",
                format!(
                    "fra reuses a blockwise network's features through its FRN; model {:?} has none ({} network{})",
                    self.name,
                    self.network.arch.kind(),
                    if matches!(self.network.arch, NetworkArch::Blockwise(_)) { " with frn_depth = 0" } else { "" }
                ),
            ));
        }
        for (name, _) in sampler.networks() {
            if !self.networks.contains_key(name) {
                return Err(Error::invalid(
                    "sampler",
                    format!(
                        "{sampler} calls the network {name:?}, which model {:?} does not have ([networks.{name}])",
                        self.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Floating-point operations of one forward pass for one image of the main network
    /// (`MAIN_NETWORK`) or of `[networks.NAME]`.
    /// For a blockwise model, `FRN_NETWORK` is an FRA evaluation: its FRN and one segment's blocks.
    pub fn network_flops(&self, name: &str) -> Option<f64> {
        if name == MAIN_NETWORK {
            return Some(self.network.arch.forward_flops());
        }
        if let (NetworkArch::Blockwise(cfg), true) = (&self.network.arch, name == FRN_NETWORK) {
            let parts = cfg.flops();
            return Some(parts.segment + parts.frn);
        }
        self.networks.get(name).map(|n| n.arch.forward_flops())
    }

    /// Network FLOPs one image cost, from its evaluations of each network (`MAIN_NETWORK` and
    /// `[networks.NAME]`); a guided evaluation runs two forwards (conditional, unconditional),
    /// an upper bound when guidance covers only part of [0, 1].
    pub fn solve_flops<'a>(&self, evaluations: impl IntoIterator<Item = (&'a str, f64)>, guided: bool) -> f64 {
        let forwards = if guided { 2.0 } else { 1.0 };
        evaluations.into_iter().map(|(name, n)| self.network_flops(name).unwrap_or(0.0) * n * forwards).sum()
    }

    /// The defaults and every preset resolve to valid solve settings.
    pub fn validate_settings(&self) -> std::result::Result<(), String> {
        for (name, plan) in &self.sampler_plans {
            let what = format!("[sampler_plans] {name}");
            let sampler = Sampler::parse(plan).map_err(|e| format!("{what}: {e}"))?;
            if sampler.name() != name.as_str() {
                return Err(format!("{what}: {plan:?} is a {} plan, not a {name} one", sampler.name()));
            }
            self.check_networks(&sampler).map_err(|e| format!("{what}: {e}"))?;
        }
        let check = |what: &str, sampler: &str, schedule: &str| -> std::result::Result<(), String> {
            let parsed = self.resolve_sampler(sampler).map_err(|e| format!("{what}: sampler {sampler:?}: {e}"))?;
            self.check_networks(&parsed).map_err(|e| format!("{what}: {e}"))?;
            ScheduleSpec::resolve(schedule, &self.schedules, ScheduleAccess::Named)
                .map_err(|e| format!("{what}: schedule {schedule:?}: {e}"))?;
            Ok(())
        };
        check("[defaults]", &self.defaults.sampler, &self.defaults.schedule)?;
        if let Some(name) = &self.defaults.preset {
            if !self.presets.contains_key(name) {
                return Err(format!("[defaults] preset {name:?} is not one of [presets]: {}", self.preset_names()));
            }
        }
        for (name, preset) in &self.presets {
            check_asset_name(name).map_err(|e| format!("[presets] {e}"))?;
            let what = format!("[presets.{name}]");
            check(
                &what,
                preset.sampler.as_deref().unwrap_or(&self.defaults.sampler),
                preset.schedule.as_deref().unwrap_or(&self.defaults.schedule),
            )?;
            if preset.steps == Some(0) {
                return Err(format!("{what} steps must be at least 1"));
            }
            if let Some((lo, hi)) = preset.guidance_interval {
                check_guidance_interval(lo, hi).map_err(|e| format!("{what} guidance_interval {e}"))?;
            }
            if let Some(g) = preset.guidance {
                if !(g.is_finite() && g >= 0.0) {
                    return Err(format!("{what} guidance must be a finite number >= 0"));
                }
            }
        }
        Ok(())
    }

    fn preset_names(&self) -> String {
        if self.presets.is_empty() {
            "(none)".into()
        } else {
            self.presets.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }

    /// The preset called `name`, or an error listing the model's presets.
    pub fn preset(&self, name: &str) -> Result<&Preset> {
        self.presets.get(name).ok_or_else(|| {
            Error::invalid("preset", format!("unknown preset {name:?}; this model has: {}", self.preset_names()))
        })
    }

    pub fn to_toml_string(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if matches!(self.network.arch, crate::network::NetworkArch::FlowturboRefiner(_)) {
            return Err("[network] a flowturbo-refiner corrects a velocity; it belongs in [networks.refiner]".into());
        }
        self.network.arch.validate().map_err(|e| format!("[network] {e}"))?;
        for (name, section) in &self.networks {
            let (c, h, w) = section.arch.state_shape();
            if (c, h, w) != self.network.arch.state_shape() {
                return Err(format!("[networks.{name}] works on {c}x{h}x{w} states, [network] on another shape"));
            }
            if name == MAIN_NETWORK {
                return Err(format!("[networks.{name}]: {MAIN_NETWORK:?} is the name of [network]"));
            }
            check_asset_name(name).map_err(|e| format!("[networks] {e}"))?;
            section.arch.validate().map_err(|e| format!("[networks.{name}] {e}"))?;
        }
        let channels = self.network.arch.in_channels();
        if let Some(ae) = &self.autoencoder {
            ae.arch.validate().map_err(|e| format!("[autoencoder] {e}"))?;
            if ae.arch.latent_channels != channels {
                return Err(format!(
                    "[autoencoder] latent_channels {} differs from [network] in_channels {channels}",
                    ae.arch.latent_channels
                ));
            }
            if !(ae.scaling_factor.is_finite() && ae.scaling_factor > 0.0) {
                return Err("[autoencoder] scaling_factor must be a positive number".into());
            }
        }
        if let Some(list) = &self.guidance.channels {
            if let Some(bad) = list.iter().find(|&&c| c >= channels) {
                return Err(format!("[guidance] channels: {bad} is not below in_channels {channels}"));
            }
            if let Some(dup) = list.iter().enumerate().find(|(i, c)| list[..*i].contains(c)).map(|(_, c)| c) {
                return Err(format!("[guidance] channels: {dup} is listed twice"));
            }
            if list.is_empty() {
                return Err("[guidance] channels: an empty list guides nothing; leave it out to guide all".into());
            }
        }
        if let Some(null) = self.guidance.null_label {
            self.network.arch.check_null_label(null).map_err(|e| format!("[guidance] null_label: {e}"))?;
        }
        let (lo, hi) = self.guidance.interval;
        check_guidance_interval(lo, hi).map_err(|e| format!("[guidance] interval {e}"))?;
        let classes = self.num_classes();
        if !self.label_names.is_empty() && self.label_names.len() != classes {
            return Err(format!("label_names has {} entries but num_classes is {classes}", self.label_names.len()));
        }
        if self.defaults.steps == 0 {
            return Err("[defaults] steps must be at least 1".into());
        }
        Ok(())
    }

    /// Index of the null (unconditional) label row: declared in `[guidance]`, else inferred
    /// from the network; None when the model cannot be guided.
    pub fn null_label(&self) -> Option<u32> {
        self.guidance.null_label.or_else(|| self.network.arch.inferred_null_label())
    }

    /// Number of classes the main network is conditioned on.
    pub fn num_classes(&self) -> usize {
        self.network.arch.num_classes()
    }

    /// Parse "7", or a label name such as "seven", into a class index.
    pub fn parse_label(&self, text: &str) -> Result<u32> {
        let text = text.trim();
        let n = self.num_classes();
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
        let (c, h, w) = self.state_shape();
        match &self.autoencoder {
            Some(ae) => {
                let f = ae.arch.downsample_factor();
                (ae.arch.out_channels, h * f, w * f)
            }
            None => (c, h, w),
        }
    }

    /// Shape of the state the sampler integrates (latent or pixel), without the batch.
    pub fn state_shape(&self) -> (usize, usize, usize) {
        self.network.arch.state_shape()
    }
}

/// Every `NAME.json` / `NAME.txt` in `dir` (absent: none), validated as schedules.
fn load_schedules(dir: &Path) -> Result<BTreeMap<String, Vec<f64>>> {
    let mut schedules = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(schedules),
        Err(error) => return Err(Error::Io { path: dir.to_path_buf(), error }),
    };
    for entry in entries {
        let path = entry.map_err(|error| Error::Io { path: dir.to_path_buf(), error })?.path();
        let (Some(stem), Some(ext)) = (path.file_stem().and_then(|s| s.to_str()), path.extension()) else { continue };
        if ext != "json" && ext != "txt" {
            continue;
        }
        let config_error = |message: String| Error::Config { path: path.clone(), message };
        check_asset_name(stem).map_err(|e| config_error(format!("schedule file name: {e}")))?;
        let points = ScheduleSpec::read_file(&path).map_err(|e| config_error(e.to_string()))?;
        if schedules.insert(stem.to_string(), points).is_some() {
            return Err(config_error(format!("schedule {stem:?} is stored twice (.json and .txt)")));
        }
    }
    Ok(schedules)
}
