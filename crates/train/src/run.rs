//! The parts every training command shares: options, seeded batches, resume, checkpoints, logs.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::error::{Result, TrainError};
use crate::init::{named_vars, snapshot};
use crate::log::LossLog;
use crate::optim::{clip_grad_norm, warmup_cosine, AdamW, AdamWConfig, Ema};

/// Where a run writes its checkpoints and results, on which device, and whether it continues
/// from the checkpoint already there.
#[derive(Clone, Copy)]
pub struct RunPlace<'a> {
    pub out: &'a Path,
    pub device: &'a Device,
    pub resume: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub ema_decay: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    pub log_every: usize,
}

impl TrainOptions {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(TrainError::invalid("steps", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(TrainError::invalid("batch-size", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainError::invalid("lr", "must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(TrainError::invalid("ema-decay", "must be in [0, 1)"));
        }
        Ok(())
    }
}

/// What a training loop reports after each step.
#[derive(Debug, Clone)]
pub struct StepLog {
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_second: f64,
}

/// A deterministic RNG for (seed, step, stream): batches do not depend on whether the run resumed.
pub fn step_rng(seed: u64, step: usize, stream: u64) -> ChaCha8Rng {
    let mixed = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    ChaCha8Rng::seed_from_u64(mixed)
}

/// Indices of the batch for `step`: an epoch-wise shuffle so every digit is seen once per epoch.
pub fn batch_indices(seed: u64, step: usize, batch: usize, n: usize) -> Vec<usize> {
    let per_epoch = (n / batch).max(1);
    let epoch = step / per_epoch;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut step_rng(seed, epoch, 1));
    let start = (step % per_epoch) * batch;
    (0..batch).map(|i| order[(start + i) % n]).collect()
}

/// Seeded N(0, I) of `shape` on the host, for noise that is reproducible and resumable.
pub fn seeded_normal(seed: u64, step: usize, stream: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = step_rng(seed, step, stream);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Optimizer, EMA, checkpointing and loss log of one run directory.
pub struct Run {
    pub dir: PathBuf,
    pub opts: TrainOptions,
    pub vars: Vec<(String, Var)>,
    pub opt: AdamW,
    pub ema: Ema,
    pub log: LossLog,
    pub start_step: usize,
    seconds_before: f64,
    started: Instant,
    run_id: String,
    samples_since: (Instant, usize),
    /// Loss of the latest step and samples/s over the latest logging interval.
    pub last_loss: f64,
    pub samples_per_second: f64,
}

impl Run {
    /// Set up a run; with `resume` and a checkpoint present, continue exactly where it stopped.
    pub fn start(
        dir: &Path,
        opts: TrainOptions,
        varmap: &VarMap,
        run_id: String,
        resume: bool,
        log_columns: &[&str],
    ) -> Result<Self> {
        opts.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let vars = named_vars(varmap)?;
        let mut opt = AdamW::new(vars.clone(), AdamWConfig { weight_decay: opts.weight_decay, ..Default::default() })?;
        let mut ema = Ema::new(&vars, opts.ema_decay)?;
        let (mut start_step, mut seconds_before) = (0, 0.0);
        if resume && Checkpoint::exists(dir) {
            let device = vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
            let ck = Checkpoint::load(dir, &device)?;
            if ck.meta.run != run_id {
                return Err(TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: format!(
                        "was written by a different run ({}); use a new --out or drop --resume",
                        ck.meta.run
                    ),
                });
            }
            for (name, var) in &vars {
                let t = ck.weights.get(name).ok_or_else(|| TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: format!("missing tensor {name}"),
                })?;
                var.set(t)?;
            }
            opt.load_state(&ck.optimizer)?;
            ema.shadow = ck.ema;
            start_step = ck.meta.step;
            seconds_before = ck.meta.train_seconds;
            tracing::info!(step = start_step, "resumed from checkpoint");
        }
        let log = LossLog::open(dir, log_columns, start_step)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            opts,
            vars,
            opt,
            ema,
            log,
            start_step,
            seconds_before,
            started: Instant::now(),
            run_id,
            samples_since: (Instant::now(), 0),
            last_loss: f64::NAN,
            samples_per_second: 0.0,
        })
    }

    pub fn lr(&self, step: usize) -> f64 {
        warmup_cosine(step, self.opts.steps, self.opts.warmup, self.opts.lr, 0.05)
    }

    /// Backward, clip, AdamW, EMA; returns the loss value.
    pub fn optimise(&mut self, step: usize, loss: &Tensor) -> Result<(f64, f64)> {
        self.optimise_with(step, loss, |_| Ok(()))
    }

    /// `optimise` for a network whose backward leaves some gradients outside the GradStore
    /// (`Sit::with_fused_training`): `merge` puts them in before clipping.
    pub fn optimise_with(
        &mut self,
        step: usize,
        loss: &Tensor,
        merge: impl FnOnce(&mut candle_core::backprop::GradStore) -> candle_core::Result<()>,
    ) -> Result<(f64, f64)> {
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(TrainError::Diverged { step, loss: value });
        }
        let mut grads = loss.backward()?;
        merge(&mut grads)?;
        let norm = clip_grad_norm(&mut grads, &self.vars, self.opts.grad_clip)?;
        self.opt.step(&grads, self.lr(step))?;
        self.ema.update(&self.vars, step)?;
        self.samples_since.1 += self.opts.batch_size;
        Ok((value, norm))
    }

    fn measure_rate(&mut self) -> f64 {
        let (since, n) = self.samples_since;
        let rate = n as f64 / since.elapsed().as_secs_f64().max(1e-9);
        self.samples_since = (Instant::now(), 0);
        rate
    }

    /// After the optimiser step `step`: every `log_every` steps append the loss, `extra()` columns,
    /// grad norm and lr to loss.csv; report progress; checkpoint when due, or when the progress
    /// callback asks to stop (then return `Interrupted`).
    pub fn end_step(
        &mut self,
        step: usize,
        (loss, grad_norm): (f64, f64),
        extra: impl FnOnce() -> Result<Vec<f64>>,
        progress: &mut dyn FnMut(&StepLog) -> ControlFlow<()>,
    ) -> Result<()> {
        self.last_loss = loss;
        let done = step + 1;
        let lr = self.lr(step);
        if done.is_multiple_of(self.opts.log_every) || done == self.opts.steps {
            self.samples_per_second = self.measure_rate();
            let mut row = vec![loss];
            row.extend(extra()?);
            row.extend([grad_norm, lr]);
            self.log.append(done, &row)?;
        }
        let log = StepLog { step: done, total: self.opts.steps, loss, lr, samples_per_second: self.samples_per_second };
        if let ControlFlow::Break(()) = progress(&log) {
            self.checkpoint(done)?;
            return Err(TrainError::Interrupted { step: done });
        }
        if self.due(done) {
            self.checkpoint(done)?;
        }
        Ok(())
    }

    /// Draw loss.png next to loss.csv; a plotting failure only warns.
    pub fn plot_loss(&self, title: &str) {
        if let Err(e) = crate::plot::plot_loss_csv(self.log.path(), &self.dir.join("loss.png"), title) {
            tracing::warn!(error = %e, "could not draw loss.png");
        }
    }

    pub fn train_seconds(&self) -> f64 {
        self.seconds_before + self.started.elapsed().as_secs_f64()
    }

    /// After the last step: training samples per second over the whole run (every session of a
    /// resumed one), rather than the latest logging window's rate.
    pub fn mean_samples_per_second(&self) -> f64 {
        (self.opts.steps * self.opts.batch_size) as f64 / self.train_seconds().max(1e-9)
    }

    /// Save a checkpoint after `steps_done` steps.
    pub fn checkpoint(&self, steps_done: usize) -> Result<()> {
        Checkpoint {
            meta: CheckpointMeta {
                step: steps_done,
                total_steps: self.opts.steps,
                seed: self.opts.seed,
                train_seconds: self.train_seconds(),
                run: self.run_id.clone(),
            },
            weights: snapshot(&self.vars)?,
            ema: self.ema.shadow.clone(),
            optimizer: self.opt.state()?,
        }
        .save(&self.dir)
    }

    pub fn due(&self, steps_done: usize) -> bool {
        steps_done == self.opts.steps
            || (self.opts.checkpoint_every > 0 && steps_done.is_multiple_of(self.opts.checkpoint_every))
    }

    /// Load the EMA weights into the live variables (for evaluation at the end of training).
    pub fn use_ema(&self) -> Result<()> {
        for (name, var) in &self.vars {
            if let Some(t) = self.ema.shadow.get(name) {
                var.set(t)?;
            }
        }
        Ok(())
    }
}
