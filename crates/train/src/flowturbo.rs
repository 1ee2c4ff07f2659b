//! `flowgen train refiner`: FlowTurbo's velocity refiner (Zhao et al., NeurIPS 2024) for a
//! trained velocity network, with the released recipe: from x_s the frozen teacher takes one
//! Euler step of size dt, and the refiner learns the change of velocity over it,
//! loss = |R(x', s + dt, v) + v - teacher(x', s + dt)|^2 with v = teacher(x_s, s).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Tensor};
use flowgen_engine::config::{ModelConfig, NetworkSection};
use flowgen_engine::models::sit::{Sit, SitConfig};
use flowgen_engine::random_model::save_sit_weights;
use flowgen_engine::samplers::REFINER_NETWORK;
use flowgen_engine::{NetworkArch, TimeConvention};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::init::{sit_adaln_zero, trainable};
use crate::run::{batch_indices, seeded_normal, step_rng, Run, RunPlace, StepLog, TrainOptions};
use crate::velocity::Latents;

/// File name of the refiner's weights in a model directory.
pub const REFINER_WEIGHTS: &str = "refiner.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefinerTraining {
    /// The refiner's SiT (`in_channels_scale` 2; classes and null label as the teacher's).
    pub refiner: SitConfig,
    /// dt ~ U(lo, hi]; the release uses (0, 0.12].
    pub dt_range: (f64, f64),
    pub opts: TrainOptions,
}

/// Logged steps the report's losses are averaged over (dt changes per batch, so one batch's
/// loss says little).
const REPORT_WINDOW: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefinerReport {
    /// Mean training loss over the last logged steps.
    pub final_loss: f64,
    /// The same error for a refiner that outputs 0 (plain velocity reuse), on the same batches.
    pub reuse_loss: f64,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    pub parameters: usize,
    pub steps: usize,
    /// Forward FLOPs of the refiner over those of the teacher, per image.
    pub flops_ratio: f64,
}

impl RefinerTraining {
    /// A refiner for `teacher`: the same grid, patch, classes and label dropout.
    pub fn refiner_for(teacher: &SitConfig, hidden: usize, depth: usize, heads: usize) -> SitConfig {
        SitConfig {
            hidden_size: hidden,
            depth,
            num_heads: heads,
            in_channels_scale: 2,
            learn_sigma: false,
            ..teacher.clone()
        }
    }

    fn validate(&self, teacher: &SitConfig) -> Result<()> {
        NetworkArch::FlowturboRefiner(self.refiner.clone())
            .validate()
            .map_err(|m| TrainError::invalid("refiner", m))?;
        let (lo, hi) = self.dt_range;
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo < hi && hi <= 1.0) {
            return Err(TrainError::invalid(
                "dt-min/dt-max",
                format!("need 0 <= dt-min < dt-max <= 1, got {lo}, {hi}"),
            ));
        }
        let same = self.refiner.in_channels == teacher.in_channels
            && self.refiner.input_size == teacher.input_size
            && self.refiner.num_classes == teacher.num_classes;
        if !same {
            return Err(TrainError::invalid("refiner", "must work on the teacher's states and classes"));
        }
        Ok(())
    }
}

/// The refiner's loss on one batch: (loss, loss of a zero refiner, i.e. reusing v unchanged).
pub fn refiner_loss(
    refiner: &Sit,
    teacher: &Sit,
    xs: &Tensor,
    s: &Tensor,
    dt: f64,
    labels: &Tensor,
    dropped: &Tensor,
) -> Result<(Tensor, Tensor)> {
    // The teacher is frozen and unguided; its first call sees the labels undropped, as released.
    let v = teacher.forward(xs, s, labels)?.detach();
    let x_next = (xs + (&v * dt)?)?;
    let s_next = (s + dt)?;
    let target = teacher.forward(&x_next, &s_next, dropped)?.detach();
    let offset = refiner.forward(&Tensor::cat(&[&x_next, &v], 1)?, &s_next, dropped)?;
    let loss = (offset + &v - &target)?.sqr()?.mean_all()?;
    let reuse = (&v - &target)?.sqr()?.mean_all()?;
    Ok((loss, reuse))
}

pub fn train(
    cfg: &RefinerTraining,
    teacher: &Sit,
    latents: &Latents,
    place: RunPlace,
    progress: &mut dyn FnMut(&StepLog) -> ControlFlow<()>,
) -> Result<(RefinerReport, HashMap<String, Tensor>)> {
    let RunPlace { out, device, resume } = place;
    let teacher_cfg = teacher.config().clone();
    cfg.validate(&teacher_cfg)?;
    let null = teacher_cfg.null_label().ok_or_else(|| {
        TrainError::invalid("model", "the teacher has no null label, so a guided refiner cannot be trained")
    })?;
    let refiner_cfg = cfg.refiner.clone();
    let (refiner, varmap) = trainable(cfg.opts.seed, device, |vb| Sit::new(&refiner_cfg, vb), sit_adaln_zero)?;
    let refiner = refiner.with_fused_training();
    let run_id = format!("refiner {}", serde_json::to_string(cfg).unwrap_or_default());
    let mut run =
        Run::start(out, cfg.opts.clone(), &varmap, run_id, resume, &["loss", "reuse_loss", "grad_norm", "lr"])?;
    let parameters = run.vars.iter().map(|(_, v)| v.elem_count()).sum();
    let shape = [cfg.opts.batch_size, teacher_cfg.in_channels, teacher_cfg.input_size, teacher_cfg.input_size];
    // (loss, reuse loss) of each logged step.
    let mut logged: Vec<(f64, f64)> = Vec::new();
    for step in run.start_step..cfg.opts.steps {
        let idx = batch_indices(cfg.opts.seed, step, cfg.opts.batch_size, latents.len());
        let eps = seeded_normal(cfg.opts.seed, step, 2, &shape, device)?;
        let (x1, labels) = latents.sample(&idx, &eps)?;
        let x0 = seeded_normal(cfg.opts.seed, step, 3, &shape, device)?;
        let mut rng = step_rng(cfg.opts.seed, step, 4);
        let s: Vec<f32> = (0..idx.len()).map(|_| rng.random::<f32>()).collect();
        // One dt per batch, as the release draws it; (lo, hi] so that dt is never 0.
        let (lo, hi) = cfg.dt_range;
        let dt = hi - (hi - lo) * rng.random::<f64>();
        // One label-drop mask, shared by the refiner and the teacher's second call.
        let dropped: Vec<u32> = labels
            .iter()
            .map(|&l| if rng.random::<f64>() < teacher_cfg.class_dropout_prob { null } else { l })
            .collect();
        let s = Tensor::from_vec(s, idx.len(), device)?;
        let s_col = s.reshape((idx.len(), 1, 1, 1))?;
        let xs = (x0.broadcast_mul(&(1.0 - &s_col)?)? + x1.broadcast_mul(&s_col)?)?;
        let labels = Tensor::from_vec(labels, idx.len(), device)?;
        let dropped = Tensor::from_vec(dropped, idx.len(), device)?;
        let (loss, reuse) = refiner_loss(&refiner, teacher, &xs, &s, dt, &labels, &dropped)?;
        let outcome = run.optimise_with(step, &loss, |grads| refiner.take_weight_grads(grads))?;
        let mut reuse_now = None;
        run.end_step(
            step,
            outcome,
            || {
                let value = reuse.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                reuse_now = Some(value);
                Ok(vec![value])
            },
            progress,
        )?;
        if let Some(reuse) = reuse_now {
            logged.push((run.last_loss, reuse));
        }
    }
    let window = &logged[logged.len().saturating_sub(REPORT_WINDOW)..];
    let mean = |f: fn(&(f64, f64)) -> f64| window.iter().map(f).sum::<f64>() / window.len().max(1) as f64;
    run.plot_loss("refiner training loss (reuse_loss: a refiner that outputs 0)");
    let report = RefinerReport {
        final_loss: mean(|l| l.0),
        reuse_loss: mean(|l| l.1),
        train_seconds: run.train_seconds(),
        samples_per_second: run.mean_samples_per_second(),
        parameters,
        steps: cfg.opts.steps,
        flops_ratio: cfg.refiner.forward_flops() / teacher_cfg.forward_flops(),
    };
    Ok((report, run.ema.shadow.clone()))
}

/// Put the refiner into `model_dir`: its weights as `refiner.safetensors`, `[networks.refiner]`
/// in model.toml, and `plan` (if given) as the model's recommended `flowturbo` plan.
pub fn install_refiner(
    model_dir: &Path,
    refiner: &SitConfig,
    weights: &HashMap<String, Tensor>,
    plan: Option<&str>,
) -> Result<()> {
    let mut config = ModelConfig::load(model_dir)?;
    let section = NetworkSection {
        weights: REFINER_WEIGHTS.into(),
        convention: TimeConvention::Sit,
        arch: NetworkArch::FlowturboRefiner(refiner.clone()),
    };
    config.networks.insert(REFINER_NETWORK.to_string(), section);
    if let Some(plan) = plan {
        // Canonical when it parses; a plan that does not is refused below, naming the problem.
        let plan = flowgen_engine::Sampler::parse(plan).map(|s| s.canonical()).unwrap_or_else(|_| plan.to_string());
        config.sampler_plans.insert("flowturbo".into(), plan);
    }
    config.validate_settings().map_err(|m| TrainError::invalid("plan", m))?;
    // Checked before anything is written, so a bad plan leaves the directory as it was.
    save_sit_weights(refiner, weights, &model_dir.join(REFINER_WEIGHTS))?;
    let path = model_dir.join("model.toml");
    std::fs::write(&path, config.to_toml_string()).map_err(|e| TrainError::io(&path, e))?;
    Ok(())
}
