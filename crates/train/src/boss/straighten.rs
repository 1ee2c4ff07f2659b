//! BOSS phase 2: straightening. A copy of the velocity network is fine-tuned so that at each time
//! tau_k of a chosen schedule its guided velocity is the chord of the teacher's trajectory to
//! tau_{k+1}: loss = |u(x_{tau_k}, tau_k) - (x_{tau_{k+1}} - x_{tau_k}) / (tau_{k+1} - tau_k)|^2.
//! Plain Euler on that schedule then follows the teacher's trajectory with K evaluations.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, IndexOp, Tensor};
use candle_nn::VarBuilder;
use flowgen_engine::config::{Defaults, ModelConfig, NetworkSection, SCHEDULES_DIR};
use flowgen_engine::models::sit::{Sit, SitConfig};
use flowgen_engine::random_model::save_sit_weights;
use flowgen_engine::samplers::VelocityField;
use flowgen_engine::weights::WeightsFile;
use flowgen_engine::{noise, GuidedField, NetworkArch, Pipeline, Schedule, TimeConvention};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::init::trainable;
use crate::run::{batch_indices, step_rng, Run, RunPlace, StepLog, TrainOptions};

/// File the teacher's trajectories are cached in, inside the run directory (so a resumed run
/// does not pay for them again).
const TRAJECTORY_FILE: &str = "trajectories.safetensors";
const TRAJECTORY_META: &str = "trajectories.json";

/// How the teacher's trajectories are drawn.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TeacherSetup {
    /// The schedule being straightened: tau_0 = 0 < ... < tau_K = 1 (engine frame).
    pub times: Vec<f64>,
    /// Trajectories in all; the first `held_out` are kept out of training for the report.
    pub trajectories: usize,
    pub held_out: usize,
    /// Uniform Heun steps of the teacher, merged with the schedule's times.
    pub teacher_steps: usize,
    /// Trajectory i starts from noise seed `noise_seed + i` with label i mod classes (kept apart
    /// from `eval`'s seeds 0.. so the measured images were never trained on).
    pub noise_seed: u64,
    /// Guidance the model is served with: scale and interval.
    pub guidance: f64,
    pub guidance_interval: (f64, f64),
}

impl TeacherSetup {
    pub fn steps(&self) -> usize {
        self.times.len().saturating_sub(1)
    }

    fn validate(&self) -> Result<()> {
        Schedule::explicit(self.times.clone()).map_err(|e| TrainError::invalid("schedule", e.to_string()))?;
        if self.teacher_steps == 0 {
            return Err(TrainError::invalid("teacher-steps", "must be at least 1"));
        }
        if self.held_out == 0 {
            return Err(TrainError::invalid("held-out", "must be at least 1 (the report is measured on them)"));
        }
        if self.trajectories <= self.held_out {
            return Err(TrainError::invalid(
                "trajectories",
                format!("must exceed --held-out ({}), got {}", self.held_out, self.trajectories),
            ));
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return Err(TrainError::invalid("guidance", "must be a finite number >= 0"));
        }
        Ok(())
    }

    /// The teacher's grid: the uniform Heun grid with the schedule's times added, and for each
    /// schedule time its index in that grid.
    pub fn teacher_grid(&self) -> (Vec<f64>, Vec<usize>) {
        let mut grid: Vec<f64> = (0..=self.teacher_steps).map(|i| i as f64 / self.teacher_steps as f64).collect();
        grid.extend(&self.times);
        grid.sort_by(f64::total_cmp);
        grid.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
        let at = self.times.iter().map(|&t| grid.iter().position(|&g| (g - t).abs() < 1e-9).unwrap_or(0)).collect();
        (grid, at)
    }

    fn guidance_at(&self, s: f64) -> f64 {
        let (lo, hi) = self.guidance_interval;
        if s >= lo && s <= hi {
            self.guidance
        } else {
            1.0
        }
    }
}

/// The teacher's states at the schedule's times: (N, K + 1, C, H, W), and each row's label.
pub struct Trajectories {
    pub states: Tensor,
    pub labels: Vec<u32>,
}

impl Trajectories {
    /// Run the guided teacher (Heun on `setup.teacher_grid()`) from every noise; `on_done` is told
    /// how many trajectories are finished.
    pub fn draw(pipeline: &Pipeline, setup: &TeacherSetup, on_done: &mut dyn FnMut(usize)) -> Result<Self> {
        setup.validate()?;
        let classes = pipeline.config().num_classes() as u32;
        let (c, h, w) = pipeline.config().state_shape();
        let (grid, at) = setup.teacher_grid();
        let device = pipeline.device();
        let mut per_batch = Vec::new();
        let labels: Vec<u32> = (0..setup.trajectories).map(|i| i as u32 % classes.max(1)).collect();
        const BATCH: usize = 250;
        for start in (0..setup.trajectories).step_by(BATCH) {
            let end = (start + BATCH).min(setup.trajectories);
            let seeds: Vec<u64> = (start..end).map(|i| setup.noise_seed.wrapping_add(i as u64)).collect();
            let guidance = pipeline.guidance(setup.guidance, setup.guidance_interval);
            let field = GuidedField::new(pipeline.velocity_model(), &labels[start..end], guidance, device)?;
            let n = end - start;
            let mut x = noise::batch(&seeds, &[c, h, w], device)?;
            let mut kept = vec![x.clone()];
            for (i, pair) in grid.windows(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                let dt = b - a;
                let v = field.velocity(&x, &vec![a; n])?;
                let predicted = (&x + (&v * dt)?)?;
                let v_end = field.velocity(&predicted, &vec![b; n])?;
                x = (&x + ((v + v_end)? * (dt / 2.0))?)?;
                if at[1..].contains(&(i + 1)) {
                    kept.push(x.clone());
                }
            }
            per_batch.push(Tensor::stack(&kept, 1)?);
            on_done(end);
        }
        Ok(Self { states: Tensor::cat(&per_batch, 0)?, labels })
    }

    /// Load the cached trajectories in `dir` if they were drawn with `setup`, else draw and cache them.
    pub fn cached(
        dir: &Path,
        pipeline: &Pipeline,
        setup: &TeacherSetup,
        on_done: &mut dyn FnMut(usize),
    ) -> Result<Self> {
        let (file, meta) = (dir.join(TRAJECTORY_FILE), dir.join(TRAJECTORY_META));
        let expected = serde_json::to_string(setup).map_err(|e| TrainError::invalid("setup", e.to_string()))?;
        if std::fs::read_to_string(&meta).ok().as_deref() == Some(expected.as_str()) {
            let tensors = candle_core::safetensors::load(&file, pipeline.device())?;
            if let (Some(states), Some(labels)) = (tensors.get("states"), tensors.get("labels")) {
                return Ok(Self { states: states.clone(), labels: labels.to_vec1::<u32>()? });
            }
        }
        let drawn = Self::draw(pipeline, setup, on_done)?;
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let labels = Tensor::from_vec(drawn.labels.clone(), drawn.labels.len(), pipeline.device())?;
        let tensors: HashMap<String, Tensor> =
            [("states".to_string(), drawn.states.clone()), ("labels".to_string(), labels)].into();
        flowgen_engine::weights::save_safetensors(&tensors, &file)?;
        std::fs::write(&meta, expected).map_err(|e| TrainError::io(&meta, e))?;
        Ok(drawn)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Rows `rows` at schedule indices `ks` and `ks + 1`: (x_k, x_{k+1}).
    fn pairs(&self, rows: &[usize], ks: &[usize]) -> Result<(Tensor, Tensor)> {
        let (n, points) = (self.states.dim(0)?, self.states.dim(1)?);
        let flat = self.states.reshape([&[n * points][..], &self.states.dims()[2..]].concat())?;
        let index = |offset: usize| {
            let idx: Vec<u32> = rows.iter().zip(ks).map(|(&r, &k)| (r * points + k + offset) as u32).collect();
            Tensor::new(idx.as_slice(), self.states.device())
        };
        Ok((flat.index_select(&index(0)?, 0)?, flat.index_select(&index(1)?, 0)?))
    }
}

/// The chord loss: mean squared difference between `velocity` at x_k and the chord
/// (x_next - x_k) / (tau_next - tau_k), with one pair of times per row.
pub fn chord_loss(velocity: &Tensor, x_k: &Tensor, x_next: &Tensor, tau_k: &[f64], tau_next: &[f64]) -> Result<Tensor> {
    let b = x_k.dim(0)?;
    let inverse: Vec<f32> = tau_k.iter().zip(tau_next).map(|(a, b)| (1.0 / (b - a)) as f32).collect();
    let inverse = Tensor::from_vec(inverse, (b, 1, 1, 1), x_k.device())?;
    let chord = (x_next - x_k)?.broadcast_mul(&inverse)?;
    Ok((velocity - chord)?.sqr()?.mean_all()?)
}

/// A network being straightened, with its time convention and null label.
pub struct Student<'a> {
    pub net: &'a Sit,
    pub convention: TimeConvention,
    pub null: u32,
}

/// u(x, s) in the engine frame with classifier-free guidance on all channels, differentiable:
/// row i mixes its conditional and null-label outputs with scale `scales[i]` (1: unguided).
pub fn guided_velocity(student: &Student, x: &Tensor, s: &[f64], labels: &[u32], scales: &[f64]) -> Result<Tensor> {
    let b = x.dim(0)?;
    let device = x.device();
    let (net, conv, null) = (student.net, student.convention, student.null);
    let t: Vec<f32> = s.iter().map(|&v| conv.network_time(v) as f32).collect();
    let times = Tensor::from_vec(t, b, device)?;
    if scales.iter().all(|&w| w == 1.0) {
        return Ok((net.forward(x, &times, &Tensor::new(labels, device)?)? * conv.velocity_sign())?);
    }
    let doubled_labels: Vec<u32> = labels.iter().copied().chain(std::iter::repeat_n(null, b)).collect();
    let out = net.forward(
        &Tensor::cat(&[x, x], 0)?,
        &Tensor::cat(&[&times, &times], 0)?,
        &Tensor::new(doubled_labels.as_slice(), device)?,
    )?;
    let (cond, uncond) = (out.i(..b)?, out.i(b..)?);
    let w = Tensor::from_vec(scales.iter().map(|&v| v as f32).collect::<Vec<_>>(), (b, 1, 1, 1), device)?;
    Ok(((&uncond + (cond - &uncond)?.broadcast_mul(&w)?)? * conv.velocity_sign())?)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StraightenTraining {
    pub teacher: TeacherSetup,
    pub opts: TrainOptions,
}

/// Held-out measures before (the teacher) and after (the straightened network).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldOut {
    /// Chord loss at each schedule step k.
    pub chord_loss: Vec<f64>,
    /// RMSE per latent value between K-step Euler on the schedule and the teacher's end state.
    pub euler_end_rmse: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StraightenReport {
    pub times: Vec<f64>,
    pub teacher: HeldOut,
    pub straightened: HeldOut,
    pub final_loss: f64,
    pub trajectory_seconds: f64,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    pub parameters: usize,
    pub steps: usize,
}

/// Fine-tune a copy of `teacher_weights` (the teacher network's file) on the trajectories.
/// Returns the report (without `trajectory_seconds`) and the EMA weights.
pub fn train(
    cfg: &StraightenTraining,
    sit_cfg: &SitConfig,
    convention: TimeConvention,
    teacher_weights: &Path,
    trajectories: &Trajectories,
    place: RunPlace,
    progress: &mut dyn FnMut(&StepLog) -> ControlFlow<()>,
) -> Result<(StraightenReport, HashMap<String, Tensor>)> {
    let RunPlace { out, device, resume } = place;
    cfg.teacher.validate()?;
    let null = sit_cfg.null_label().unwrap_or(0);
    if cfg.teacher.guidance != 1.0 && sit_cfg.null_label().is_none() {
        return Err(TrainError::invalid("guidance", "the model has no null label; straighten with guidance 1"));
    }
    if trajectories.len() != cfg.teacher.trajectories || trajectories.states.dim(1)? != cfg.teacher.times.len() {
        return Err(TrainError::invalid("trajectories", "were drawn with other settings"));
    }
    let file = WeightsFile::open(teacher_weights)?;
    let (student, varmap) = trainable(
        cfg.opts.seed,
        device,
        |vb| Sit::new(sit_cfg, vb),
        |tensors| {
            for (name, t) in tensors.iter_mut() {
                *t = file.load(name, DType::F32, device)?;
            }
            Ok(())
        },
    )?;
    let teacher = Sit::new(sit_cfg, VarBuilder::from_tensors(snapshot_of(&varmap)?, DType::F32, device))?;
    let run_id = format!("straighten {}", serde_json::to_string(cfg).unwrap_or_default());
    let mut run = Run::start(out, cfg.opts.clone(), &varmap, run_id, resume, &["loss", "grad_norm", "lr"])?;
    let parameters = run.vars.iter().map(|(_, v)| v.elem_count()).sum();
    let setup = &cfg.teacher;
    let (k_steps, held_out) = (setup.steps(), setup.held_out);
    let train_rows = trajectories.len() - held_out;
    for step in run.start_step..cfg.opts.steps {
        let rows: Vec<usize> = batch_indices(cfg.opts.seed, step, cfg.opts.batch_size, train_rows)
            .into_iter()
            .map(|i| i + held_out)
            .collect();
        let mut rng = step_rng(cfg.opts.seed, step, 5);
        let ks: Vec<usize> = rows.iter().map(|_| rng.random_range(0..k_steps)).collect();
        let (x_k, x_next) = trajectories.pairs(&rows, &ks)?;
        let tau_k: Vec<f64> = ks.iter().map(|&k| setup.times[k]).collect();
        let tau_next: Vec<f64> = ks.iter().map(|&k| setup.times[k + 1]).collect();
        let labels: Vec<u32> = rows.iter().map(|&r| trajectories.labels[r]).collect();
        let scales: Vec<f64> = tau_k.iter().map(|&s| setup.guidance_at(s)).collect();
        let u = guided_velocity(&Student { net: &student, convention, null }, &x_k, &tau_k, &labels, &scales)?;
        let loss = chord_loss(&u, &x_k, &x_next, &tau_k, &tau_next)?;
        let outcome = run.optimise(step, &loss)?;
        run.end_step(step, outcome, || Ok(vec![]), progress)?;
    }
    run.plot_loss("straightening: chord loss");
    let ema = run.ema.shadow.clone();
    let straightened = Sit::new(sit_cfg, VarBuilder::from_tensors(ema.clone(), DType::F32, device))?;
    let report = StraightenReport {
        times: setup.times.clone(),
        teacher: held_out_measures(&Student { net: &teacher, convention, null }, setup, trajectories)?,
        straightened: held_out_measures(&Student { net: &straightened, convention, null }, setup, trajectories)?,
        final_loss: run.last_loss,
        trajectory_seconds: 0.0,
        train_seconds: run.train_seconds(),
        samples_per_second: run.mean_samples_per_second(),
        parameters,
        steps: cfg.opts.steps,
    };
    Ok((report, ema))
}

fn snapshot_of(varmap: &candle_nn::VarMap) -> Result<HashMap<String, Tensor>> {
    crate::init::snapshot(&crate::init::named_vars(varmap)?)
}

/// Chord loss per step and K-step Euler end error on the held-out trajectories.
fn held_out_measures(net: &Student, setup: &TeacherSetup, trajectories: &Trajectories) -> Result<HeldOut> {
    let rows: Vec<usize> = (0..setup.held_out).collect();
    let labels: Vec<u32> = rows.iter().map(|&r| trajectories.labels[r]).collect();
    let n = rows.len();
    let mut chord = Vec::new();
    let mut x = trajectories.pairs(&rows, &vec![0; n])?.0;
    for k in 0..setup.steps() {
        let (x_k, x_next) = trajectories.pairs(&rows, &vec![k; n])?;
        let (a, b) = (setup.times[k], setup.times[k + 1]);
        let scales = vec![setup.guidance_at(a); n];
        let u = guided_velocity(net, &x_k, &vec![a; n], &labels, &scales)?;
        chord.push(chord_loss(&u, &x_k, &x_next, &vec![a; n], &vec![b; n])?.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        let u_own = guided_velocity(net, &x, &vec![a; n], &labels, &scales)?;
        x = (&x + (u_own * (b - a))?)?;
    }
    let end = trajectories.pairs(&rows, &vec![setup.steps() - 1; n])?.1;
    let mse = (x - end)?.sqr()?.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(HeldOut { chord_loss: chord, euler_end_rmse: mse.sqrt() })
}

/// What `write_model` puts in the straightened model's directory besides the weights.
pub struct StraightenedModel<'a> {
    /// The teacher's model directory (its autoencoder and [guidance] are reused).
    pub teacher_dir: &'a Path,
    /// Name of the straightened schedule: a stored schedule's name (written beside the model),
    /// or "uniform".
    pub schedule_name: &'a str,
    pub times: &'a [f64],
    pub guidance: f64,
}

/// Write a servable model directory whose defaults are Euler on the straightened schedule.
pub fn write_model(
    dir: &Path,
    parts: StraightenedModel,
    sit_cfg: &SitConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    let mut config = ModelConfig::load(parts.teacher_dir)?;
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let k = parts.times.len() - 1;
    config.name =
        format!("{}-straightened-{}-{k}", config.name, parts.schedule_name.trim_end_matches(&format!("-{k}")));
    config.description = format!(
        "{} straightened (BOSS) for Euler on {} ({k} steps) at guidance {}",
        config.description, parts.schedule_name, parts.guidance
    );
    config.network = NetworkSection {
        weights: "velocity.safetensors".into(),
        convention: config.network.convention,
        arch: NetworkArch::Sit(sit_cfg.clone()),
    };
    // Auxiliary networks and plans were trained for the teacher's field, not this one.
    config.networks.clear();
    config.sampler_plans.clear();
    config.presets.clear();
    config.schedules.clear();
    config.defaults = Defaults {
        sampler: "euler".into(),
        steps: k,
        guidance: parts.guidance,
        schedule: parts.schedule_name.to_string(),
        preset: None,
    };
    if parts.schedule_name != "uniform" {
        let schedules = dir.join(SCHEDULES_DIR);
        std::fs::create_dir_all(&schedules).map_err(|e| TrainError::io(&schedules, e))?;
        let file = schedules.join(format!("{}.json", parts.schedule_name));
        let text = serde_json::to_string(parts.times).map_err(|e| TrainError::invalid("schedule", e.to_string()))?;
        std::fs::write(&file, text).map_err(|e| TrainError::io(&file, e))?;
    }
    save_sit_weights(sit_cfg, weights, &dir.join("velocity.safetensors"))?;
    if let Some(ae) = &mut config.autoencoder {
        let (from, to) = (parts.teacher_dir.join(&ae.weights), dir.join("autoencoder.safetensors"));
        std::fs::copy(&from, &to).map_err(|e| TrainError::io(&from, e))?;
        ae.weights = "autoencoder.safetensors".into();
    }
    let path = dir.join("model.toml");
    std::fs::write(&path, config.to_toml_string()).map_err(|e| TrainError::io(&path, e))?;
    // Loading it back checks that the defaults name a schedule the directory has.
    ModelConfig::load(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_chord_loss_compares_velocity_with_the_chord_of_each_row() {
        let dev = Device::Cpu;
        // Row 0: from 0 to 2 over dt 0.5, chord 4; row 1: from 1 to 1.5 over dt 0.25, chord 2.
        let x_k = Tensor::new(&[[[[0f32]]], [[[1f32]]]], &dev).unwrap();
        let x_next = Tensor::new(&[[[[2f32]]], [[[1.5f32]]]], &dev).unwrap();
        let u = Tensor::new(&[[[[3f32]]], [[[2f32]]]], &dev).unwrap();
        let loss = chord_loss(&u, &x_k, &x_next, &[0.0, 0.5], &[0.5, 0.75]).unwrap();
        // ((3 - 4)^2 + (2 - 2)^2) / 2
        assert!((loss.to_scalar::<f32>().unwrap() - 0.5).abs() < 1e-6);
    }

    #[test]
    fn the_teacher_grid_contains_every_schedule_time_once() {
        let setup = TeacherSetup {
            times: vec![0.0, 0.35, 0.61, 0.86, 1.0],
            trajectories: 2,
            held_out: 1,
            teacher_steps: 4,
            noise_seed: 0,
            guidance: 1.0,
            guidance_interval: (0.0, 1.0),
        };
        let (grid, at) = setup.teacher_grid();
        assert_eq!(grid, vec![0.0, 0.25, 0.35, 0.5, 0.61, 0.75, 0.86, 1.0]);
        assert_eq!(at, vec![0, 2, 4, 6, 7]);
        let same = TeacherSetup { times: vec![0.0, 0.5, 1.0], ..setup };
        assert_eq!(same.teacher_grid(), (vec![0.0, 0.25, 0.5, 0.75, 1.0], vec![0, 2, 4]));
    }
}
