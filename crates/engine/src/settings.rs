//! One generation request, split in two: the solve settings every image of a batch shares, and
//! the per-image inputs (label, seed). `ModelConfig::solve_settings` fills what a caller left
//! out from the model's presets and defaults; the CLI, evaluation, benchmarks and the server
//! all go through it.

use serde::{Deserialize, Serialize};

use crate::config::{check_guidance_interval, ModelConfig, Preset};
use crate::error::{Error, Result};
use crate::samplers::Sampler;
use crate::schedule::{ScheduleAccess, ScheduleSpec};

/// What every image of one solve shares.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveSettings {
    pub sampler: Sampler,
    /// Steps of a fixed-step sampler; 0 for adaptive ones, which choose their own.
    pub steps: usize,
    /// The time grid of a fixed-step sampler (`Uniform` and unused for adaptive ones).
    pub schedule: ScheduleSpec,
    /// w in v = v_uncond + w (v_cond - v_uncond); 1 disables guidance.
    pub guidance: f64,
    /// Times s (0 noise, 1 data) between which guidance applies.
    pub guidance_interval: (f64, f64),
}

impl SolveSettings {
    /// Whether `model` can solve with these settings; the error names the field.
    pub fn check(&self, model: &ModelConfig) -> Result<()> {
        if !self.sampler.is_adaptive() && self.steps == 0 && self.schedule.own_steps().is_none() {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if !self.guidance.is_finite() || self.guidance < 0.0 {
            return Err(Error::invalid("guidance", format!("must be a finite number >= 0, got {}", self.guidance)));
        }
        if self.guidance != 1.0 && model.null_label().is_none() {
            return Err(Error::invalid(
                "guidance",
                "this model has no null label (trained without label dropout); use guidance 1",
            ));
        }
        let (lo, hi) = self.guidance_interval;
        check_guidance_interval(lo, hi).map_err(|e| Error::invalid("guidance_interval", e))?;
        if let Some(own) = self.sampler.own_steps() {
            if self.steps != own {
                return Err(Error::invalid("steps", format!("{} runs {own} steps, not {}", self.sampler, self.steps)));
            }
        }
        model.check_networks(&self.sampler)?;
        self.sampler.validate()
    }
}

/// Label and seed of each image; image i's noise depends on `seeds[i]` only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageInputs {
    pub labels: Vec<u32>,
    pub seeds: Vec<u64>,
}

impl ImageInputs {
    /// `n` images cycling over `labels`, image i seeded `seed + i`.
    pub fn cycle(labels: &[u32], n: usize, seed: u64) -> Self {
        ImageInputs {
            labels: labels.iter().cycle().take(n).copied().collect(),
            seeds: (0..n as u64).map(|i| seed.wrapping_add(i)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Images `range` of these inputs.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        ImageInputs { labels: self.labels[range.clone()].to_vec(), seeds: self.seeds[range].to_vec() }
    }

    /// These images followed by `other`'s.
    pub fn extend(&mut self, other: &ImageInputs) {
        self.labels.extend_from_slice(&other.labels);
        self.seeds.extend_from_slice(&other.seeds);
    }
}

/// Settings and images of one engine call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub settings: SolveSettings,
    pub inputs: ImageInputs,
}

/// What a caller asks for; every field left out comes from the preset, then `[defaults]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SettingsRequest {
    /// A `[presets.NAME]` of the model (else `[defaults] preset`, if any).
    pub preset: Option<String>,
    pub sampler: Option<String>,
    pub steps: Option<usize>,
    pub schedule: Option<String>,
    pub guidance: Option<f64>,
    pub guidance_interval: Option<(f64, f64)>,
}

impl ModelConfig {
    /// Fill `request` from the model's preset and defaults and check the result. Schedules may
    /// be the model's stored ones by name, and files only with `NamedAndFiles`.
    pub fn solve_settings(&self, request: &SettingsRequest, access: ScheduleAccess) -> Result<SolveSettings> {
        let preset = match request.preset.as_ref().or(self.defaults.preset.as_ref()) {
            Some(name) => self.preset(name)?.clone(),
            None => Preset::default(),
        };
        let sampler_text = request.sampler.as_ref().or(preset.sampler.as_ref()).unwrap_or(&self.defaults.sampler);
        let sampler = self.resolve_sampler(sampler_text)?;
        let (steps, schedule) = if sampler.is_adaptive() {
            adaptive_grid(&sampler, request)?
        } else {
            self.fixed_grid(&sampler, request, &preset, access)?
        };
        let guidance = request.guidance.or(preset.guidance).unwrap_or(self.defaults.guidance);
        let guidance_interval =
            request.guidance_interval.or(preset.guidance_interval).unwrap_or(self.guidance.interval);
        let settings = SolveSettings { sampler, steps, schedule, guidance, guidance_interval };
        settings.check(self)?;
        Ok(settings)
    }

    /// Steps and grid of a fixed-step sampler: an explicit or stored schedule fixes its own
    /// step count unless `steps` is given (then they must agree).
    /// A sampler that fixes its own steps (a FlowTurbo plan) takes them before any schedule.
    fn fixed_grid(
        &self,
        sampler: &Sampler,
        request: &SettingsRequest,
        preset: &Preset,
        access: ScheduleAccess,
    ) -> Result<(usize, ScheduleSpec)> {
        let text = request.schedule.as_ref().or(preset.schedule.as_ref()).unwrap_or(&self.defaults.schedule);
        let schedule = ScheduleSpec::resolve(text, &self.schedules, access)?;
        let steps = request
            .steps
            .or(sampler.own_steps())
            .or(schedule.own_steps())
            .or(preset.steps)
            .unwrap_or(self.defaults.steps);
        schedule.build(steps)?;
        Ok((steps, schedule))
    }
}

/// An adaptive sampler picks its own steps and takes no schedule.
fn adaptive_grid(sampler: &Sampler, request: &SettingsRequest) -> Result<(usize, ScheduleSpec)> {
    sampler.validate()?;
    match request.schedule.as_deref().map(str::trim) {
        None => Ok((0, ScheduleSpec::Uniform)),
        Some(text) if text.eq_ignore_ascii_case("uniform") => Ok((0, ScheduleSpec::Uniform)),
        Some(text) => Err(Error::invalid(
            "schedule",
            format!("{} is adaptive and chooses its own steps; it takes no schedule (got {text:?})", sampler.name()),
        )),
    }
}
