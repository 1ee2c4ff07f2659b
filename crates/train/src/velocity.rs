//! `flowgen train velocity`: a class-conditional latent SiT trained with I-CFM, W-CFM or OT-CFM
//! in the frame s = 0 noise, s = 1 data (x_s = (1 - s) x0 + s x1, target x1 - x0).

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flowgen_engine::config::{AutoencoderSection, Defaults, GuidanceSection, ModelConfig, NetworkSection};
use flowgen_engine::models::autoencoder::AutoencoderKl;
use flowgen_engine::models::sit::{Sit, SitConfig};
use flowgen_engine::random_model::{save_sit_weights, DIGIT_NAMES};
use flowgen_engine::{NetworkArch, TimeConvention};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::data::Digits;
use crate::error::{Result, TrainError};
use crate::init::{sit_adaln_zero, trainable};
use crate::losses::{gibbs_weights, ot_assignment, pair_costs, permute_rows, wcfm_eps, Objective};
use crate::run::{batch_indices, seeded_normal, step_rng, Run, RunPlace, StepLog, TrainOptions};

/// Training latents: posterior mean and std per digit, already multiplied by the latent scale.
pub struct Latents {
    pub mean: Tensor,
    pub std: Tensor,
    pub labels: Vec<u32>,
}

impl Latents {
    /// Encode every digit once; per step only a cheap reparameterised sample is drawn.
    pub fn encode(ae: &AutoencoderKl, section: &AutoencoderSection, data: &Digits, device: &Device) -> Result<Self> {
        let (mut means, mut stds) = (Vec::new(), Vec::new());
        let idx: Vec<usize> = (0..data.len()).collect();
        for chunk in idx.chunks(250) {
            let (x, _) = data.batch(chunk, device)?;
            let posterior = ae.encode(&x)?;
            let scale = section.scaling_factor;
            means.push(((&posterior.mean - section.shift_factor)? * scale)?);
            stds.push((posterior.std()? * scale)?);
        }
        Ok(Self {
            mean: Tensor::cat(&means, 0)?,
            std: Tensor::cat(&stds, 0)?,
            labels: data.labels.iter().map(|&l| l as u32).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.mean.elem_count() / self.len().max(1)
    }

    pub fn sample(&self, idx: &[usize], eps: &Tensor) -> Result<(Tensor, Vec<u32>)> {
        let rows = Tensor::new(idx.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(), self.mean.device())?;
        let x1 = (self.mean.index_select(&rows, 0)? + (self.std.index_select(&rows, 0)? * eps)?)?;
        Ok((x1, idx.iter().map(|&i| self.labels[i]).collect()))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VelocityTraining {
    pub sit: SitConfig,
    pub objective: Objective,
    pub opts: TrainOptions,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VelocityReport {
    pub objective: Objective,
    pub final_loss: f64,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    pub parameters: usize,
    pub steps: usize,
}

/// One training loss on a batch: returns (weighted loss, unweighted mean loss).
pub fn flow_matching_loss(
    sit: &Sit,
    x0: &Tensor,
    x1: &Tensor,
    s: &Tensor,
    labels: &Tensor,
    weights: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let b = x0.dim(0)?;
    let s_col = s.reshape((b, 1, 1, 1))?;
    let xs = (x0.broadcast_mul(&(1.0 - &s_col)?)? + x1.broadcast_mul(&s_col)?)?;
    let target = (x1 - x0)?;
    let pred = sit.forward(&xs, s, labels)?;
    let per_sample = (pred - target)?.sqr()?.flatten_from(1)?.mean(1)?;
    let plain = per_sample.mean_all()?;
    let weighted = match weights {
        Some(w) => (per_sample * w)?.mean_all()?,
        None => plain.clone(),
    };
    Ok((weighted, plain))
}

pub fn train(
    cfg: &VelocityTraining,
    latents: &Latents,
    place: RunPlace,
    progress: &mut dyn FnMut(&StepLog) -> ControlFlow<()>,
) -> Result<(VelocityReport, std::collections::HashMap<String, Tensor>)> {
    let RunPlace { out, device, resume } = place;
    cfg.sit.validate().map_err(|m| TrainError::invalid("network", m))?;
    let null = cfg.sit.null_label().ok_or_else(|| {
        TrainError::invalid("label-dropout", "must be above 0 so the model learns the null label for guidance")
    })?;
    let sit_cfg = cfg.sit.clone();
    let (sit, varmap) = trainable(cfg.opts.seed, device, |vb| Sit::new(&sit_cfg, vb), sit_adaln_zero)?;
    let sit = sit.with_fused_training();
    let run_id = format!("velocity {}", serde_json::to_string(cfg).unwrap_or_default());
    let mut run =
        Run::start(out, cfg.opts.clone(), &varmap, run_id, resume, &["loss", "plain_loss", "grad_norm", "lr"])?;
    let parameters = run.vars.iter().map(|(_, v)| v.elem_count()).sum();
    let shape = [cfg.opts.batch_size, cfg.sit.in_channels, cfg.sit.input_size, cfg.sit.input_size];
    for step in run.start_step..cfg.opts.steps {
        let idx = batch_indices(cfg.opts.seed, step, cfg.opts.batch_size, latents.len());
        let eps = seeded_normal(cfg.opts.seed, step, 2, &shape, device)?;
        let (x1, mut labels) = latents.sample(&idx, &eps)?;
        let mut x0 = seeded_normal(cfg.opts.seed, step, 3, &shape, device)?;
        let mut rng = step_rng(cfg.opts.seed, step, 4);
        let s: Vec<f32> = (0..idx.len()).map(|_| rng.random::<f32>()).collect();
        for label in labels.iter_mut() {
            if rng.random::<f64>() < cfg.sit.class_dropout_prob {
                *label = null;
            }
        }
        let weights = match &cfg.objective {
            Objective::Icfm => None,
            Objective::Otcfm => {
                x0 = permute_rows(&x0, &ot_assignment(&x0, &x1)?)?;
                None
            }
            Objective::Wcfm { kappa, cost } => {
                let w = gibbs_weights(&pair_costs(&x0, &x1, *cost)?, wcfm_eps(*kappa, latents.dim()));
                Some(Tensor::from_vec(w.iter().map(|&v| v as f32).collect::<Vec<_>>(), idx.len(), device)?)
            }
        };
        let s = Tensor::from_vec(s, idx.len(), device)?;
        let labels = Tensor::from_vec(labels, idx.len(), device)?;
        let (loss, plain) = flow_matching_loss(&sit, &x0, &x1, &s, &labels, weights.as_ref())?;
        let outcome = run.optimise_with(step, &loss, |grads| sit.take_weight_grads(grads))?;
        run.end_step(step, outcome, || Ok(vec![plain.to_dtype(DType::F64)?.to_scalar::<f64>()?]), progress)?;
    }
    run.plot_loss("velocity training loss");
    let report = VelocityReport {
        objective: cfg.objective.clone(),
        final_loss: run.last_loss,
        train_seconds: run.train_seconds(),
        samples_per_second: run.mean_samples_per_second(),
        parameters,
        steps: cfg.opts.steps,
    };
    Ok((report, run.ema.shadow.clone()))
}

/// What every trained model directory holds beside its network: its name, the autoencoder it
/// works in (copied in, so the directory is self-contained) and its sampling defaults.
pub struct ModelDirCommon<'a> {
    pub name: &'a str,
    pub autoencoder: &'a AutoencoderSection,
    pub autoencoder_weights: &'a Path,
    pub defaults: Defaults,
}

/// What a servable SiT model directory is made of, for `write_model_dir`.
pub struct ModelDirParts<'a> {
    pub sit: &'a SitConfig,
    /// The EMA velocity weights.
    pub ema: &'a std::collections::HashMap<String, Tensor>,
    pub common: ModelDirCommon<'a>,
}

/// Write a servable model directory: model.toml, EMA velocity weights, and the autoencoder.
pub fn write_model_dir(dir: &Path, parts: ModelDirParts) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    save_sit_weights(parts.sit, parts.ema, &dir.join("velocity.safetensors"))?;
    let network = NetworkSection {
        weights: "velocity.safetensors".into(),
        convention: TimeConvention::Sit,
        arch: NetworkArch::Sit(parts.sit.clone()),
    };
    write_model_toml(dir, "class-conditional latent flow model trained on MNIST by flowgen", network, parts.common)
}

/// model.toml naming `network` and the autoencoder, which is copied in beside it unless it is
/// already there.
pub(crate) fn write_model_toml(
    dir: &Path,
    description: &str,
    network: NetworkSection,
    common: ModelDirCommon,
) -> Result<()> {
    let ModelDirCommon { name, autoencoder, autoencoder_weights, defaults } = common;
    let ae_target = dir.join("autoencoder.safetensors");
    // Compared as files, not spellings: copying a file onto itself would truncate it.
    let same_file =
        ae_target.exists() && std::fs::canonicalize(&ae_target).ok() == std::fs::canonicalize(autoencoder_weights).ok();
    if !same_file {
        std::fs::copy(autoencoder_weights, &ae_target).map_err(|e| TrainError::io(autoencoder_weights, e))?;
    }
    let config = ModelConfig {
        name: name.to_string(),
        description: description.into(),
        label_names: DIGIT_NAMES.iter().map(|s| s.to_string()).collect(),
        network,
        autoencoder: Some(AutoencoderSection { weights: "autoencoder.safetensors".into(), ..autoencoder.clone() }),
        guidance: GuidanceSection::default(),
        defaults,
        networks: Default::default(),
        presets: Default::default(),
        sampler_plans: Default::default(),
        schedules: Default::default(),
    };
    let path = dir.join("model.toml");
    std::fs::write(&path, config.to_toml_string()).map_err(|e| TrainError::io(&path, e))?;
    Ok(())
}

/// One optimisation step of the velocity recipe, timed by `flowgen bench engine --train`: I-CFM
/// loss on a batch with label dropout, backward, global-norm clipping, AdamW and the EMA update,
/// exactly the calls `train` makes per step (the batch is drawn from seeded noise, not digits:
/// the cost does not depend on the data).
pub struct RecipeStep {
    sit: Sit,
    cfg: SitConfig,
    vars: Vec<(String, candle_core::Var)>,
    opt: crate::optim::AdamW,
    ema: crate::optim::Ema,
    batch: usize,
    step: usize,
    device: Device,
}

impl RecipeStep {
    /// Trainable weights initialised as `train` does (adaLN-Zero), AdamW and EMA at the CLI's defaults.
    pub fn new(cfg: &SitConfig, batch: usize, device: &Device) -> Result<Self> {
        cfg.validate().map_err(|m| TrainError::invalid("network", m))?;
        if batch == 0 {
            return Err(TrainError::invalid("batch", "must be at least 1"));
        }
        let sit_cfg = cfg.clone();
        let (sit, varmap) = trainable(0, device, |vb| Sit::new(&sit_cfg, vb), sit_adaln_zero)?;
        let sit = sit.with_fused_training();
        let vars = crate::init::named_vars(&varmap)?;
        let opt = crate::optim::AdamW::new(vars.clone(), crate::optim::AdamWConfig::default())?;
        let ema = crate::optim::Ema::new(&vars, 0.999)?;
        Ok(Self { sit, cfg: cfg.clone(), vars, opt, ema, batch, step: 0, device: device.clone() })
    }

    /// One step: its loss and how long each phase took.
    pub fn run(&mut self) -> Result<StepTimes> {
        let (b, c) = (self.batch, &self.cfg);
        let shape = [b, c.in_channels, c.input_size, c.input_size];
        let x1 = seeded_normal(1, self.step, 2, &shape, &self.device)?;
        let x0 = seeded_normal(1, self.step, 3, &shape, &self.device)?;
        let mut rng = step_rng(1, self.step, 4);
        let s: Vec<f32> = (0..b).map(|_| rng.random::<f32>()).collect();
        let null = c.null_label().unwrap_or(0);
        let labels: Vec<u32> = (0..b)
            .map(|i| if rng.random::<f64>() < c.class_dropout_prob { null } else { (i % c.num_classes) as u32 })
            .collect();
        let s = Tensor::from_vec(s, b, &self.device)?;
        let labels = Tensor::from_vec(labels, b, &self.device)?;
        let started = std::time::Instant::now();
        let (loss, _) = flow_matching_loss(&self.sit, &x0, &x1, &s, &labels, None)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let forward = started.elapsed().as_secs_f64();
        let mut grads = loss.backward()?;
        self.sit.take_weight_grads(&mut grads)?;
        let backward = started.elapsed().as_secs_f64() - forward;
        crate::optim::clip_grad_norm(&mut grads, &self.vars, 1.0)?;
        self.opt.step(&grads, 1e-3)?;
        self.ema.update(&self.vars, self.step)?;
        self.step += 1;
        let optimizer = started.elapsed().as_secs_f64() - forward - backward;
        Ok(StepTimes { loss: value, forward_s: forward, backward_s: backward, optimizer_s: optimizer })
    }
}

/// What one `RecipeStep::run` took, by phase (the optimizer phase is clip, AdamW and EMA).
#[derive(Debug, Clone, Copy)]
pub struct StepTimes {
    pub loss: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}
