//! The small MNIST classifier whose penultimate features the evaluation's Frechet distance uses.

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};
use flowgen_engine::models::conv::{conv2d, Conv2d};
use serde::{Deserialize, Serialize};

use crate::data::Digits;
use crate::error::{Result, TrainError};
use crate::init::trainable;
use crate::run::{batch_indices, Run, RunPlace, StepLog, TrainOptions};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassifierConfig {
    pub channels: (usize, usize),
    /// Width of the penultimate layer: the feature space of the FD.
    pub features: usize,
    pub num_classes: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig { channels: (16, 32), features: 128, num_classes: 10 }
    }
}

/// conv-relu-pool x2, then a ReLU feature layer and the logits.
pub struct Classifier {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

impl Classifier {
    pub fn new(cfg: &ClassifierConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (c1, c2) = cfg.channels;
        Ok(Self {
            conv1: conv2d(1, c1, 3, 1, 1, vb.pp("conv1"))?,
            conv2: conv2d(c1, c2, 3, 1, 1, vb.pp("conv2"))?,
            fc1: linear(c2 * 7 * 7, cfg.features, vb.pp("fc1"))?,
            fc2: linear(cfg.features, cfg.num_classes, vb.pp("fc2"))?,
        })
    }

    /// Images in [-1, 1], (B, 1, 28, 28) -> penultimate features (B, features).
    pub fn features(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = xs.apply(&self.conv1)?.relu()?.max_pool2d(2)?;
        let h = h.apply(&self.conv2)?.relu()?.max_pool2d(2)?;
        h.flatten_from(1)?.apply(&self.fc1)?.relu()
    }

    /// The second conv stage's map as tokens: (B, 1, 28, 28) -> (B, 49, channels.1), one token
    /// per cell of the 7x7 grid, row-major (the latent grid of the shipped autoencoder).
    pub fn spatial_features(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = xs.apply(&self.conv1)?.relu()?.max_pool2d(2)?;
        let h = h.apply(&self.conv2)?.relu()?.max_pool2d(2)?;
        h.flatten_from(2)?.transpose(1, 2)?.contiguous()
    }

    pub fn logits(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.head(&self.features(xs)?)
    }

    /// Features -> logits.
    pub fn head(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        features.apply(&self.fc2)
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("classifier.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| TrainError::io(&cfg_path, e))?;
        let cfg: ClassifierConfig = serde_json::from_str(&text)
            .map_err(|e| TrainError::Data { path: cfg_path.clone(), message: e.to_string() })?;
        let weights = dir.join("classifier.safetensors");
        Ok(flowgen_engine::weights::WeightsFile::open(&weights)?
            .build(DType::F32, device, |vb| Classifier::new(&cfg, vb))?)
    }
}

impl Module for Classifier {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.logits(xs)
    }
}

/// Share of `data` classified correctly.
pub fn accuracy(model: &Classifier, data: &Digits, device: &Device) -> Result<f64> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let mut correct = 0usize;
    for chunk in idx.chunks(500) {
        let (x, y) = data.batch(chunk, device)?;
        let pred = model.logits(&x)?.argmax(D::Minus1)?;
        correct += pred.eq(&y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    }
    Ok(correct as f64 / data.len() as f64)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierReport {
    pub val_accuracy: f64,
    pub final_loss: f64,
    pub train_seconds: f64,
    pub samples_per_second: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierTraining {
    pub arch: ClassifierConfig,
    pub opts: TrainOptions,
}

pub fn train(
    training: &ClassifierTraining,
    (train_data, val_data): (&Digits, &Digits),
    place: RunPlace,
    progress: &mut dyn FnMut(&StepLog) -> ControlFlow<()>,
) -> Result<ClassifierReport> {
    let RunPlace { out, device, resume } = place;
    let (cfg, opts) = (&training.arch, &training.opts);
    let (model, varmap) = trainable(opts.seed, device, |vb| Classifier::new(cfg, vb), |_| Ok(()))?;
    let run_id = format!(
        "classifier {} {}",
        serde_json::to_string(cfg).unwrap_or_default(),
        serde_json::to_string(opts).unwrap_or_default()
    );
    let mut run = Run::start(out, opts.clone(), &varmap, run_id, resume, &["loss", "grad_norm", "lr"])?;
    for step in run.start_step..opts.steps {
        let idx = batch_indices(opts.seed, step, opts.batch_size, train_data.len());
        let (x, y) = train_data.batch(&idx, device)?;
        let loss = candle_nn::loss::cross_entropy(&model.logits(&x)?, &y)?;
        let outcome = run.optimise(step, &loss)?;
        run.end_step(step, outcome, || Ok(vec![]), progress)?;
    }
    run.plot_loss("classifier training loss");
    run.use_ema()?;
    let val_accuracy = accuracy(&model, val_data, device)?;
    flowgen_engine::weights::save_safetensors(&run.ema.shadow, &out.join("classifier.safetensors"))?;
    let cfg_path = out.join("classifier.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(cfg).unwrap_or_default())
        .map_err(|e| TrainError::io(&cfg_path, e))?;
    let report = ClassifierReport {
        val_accuracy,
        final_loss: run.last_loss,
        train_seconds: run.train_seconds(),
        samples_per_second: run.mean_samples_per_second(),
    };
    let report_path = out.join("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report).unwrap_or_default())
        .map_err(|e| TrainError::io(&report_path, e))?;
    Ok(report)
}
