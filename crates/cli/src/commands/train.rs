use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use flowgen_engine::device::parse_device;
use flowgen_train::autoencoder::{self, AutoencoderTraining};
use flowgen_train::data::{Digits, Split};
use flowgen_train::run::{StepLog, TrainOptions};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum TrainCommand {
    /// KL autoencoder 28x28x1 <-> 4x7x7; writes autoencoder.safetensors + autoencoder.toml (with the
    /// latent scale factor) and reports validation PSNR.
    Autoencoder {
        #[command(flatten)]
        common: CommonArgs,
        /// Weight of the KL term relative to the pixel MSE.
        #[arg(long, default_value_t = 1e-3)]
        kl_weight: f64,
        /// Widths of the encoder levels (the decoder mirrors them); 3 levels give 28 -> 7.
        #[arg(long, value_delimiter = ',', default_value = "32,64,64")]
        channels: Vec<usize>,
        /// GroupNorm groups (must divide every width).
        #[arg(long, default_value_t = 16)]
        groups: usize,
    },
}

#[derive(Args)]
pub struct CommonArgs {
    /// Directory with MNIST in IDX format (train-images-idx3-ubyte[.gz], val-* or t10k-*).
    #[arg(long, default_value = "data/mnist")]
    data: PathBuf,
    /// Run directory: checkpoints, loss.csv, and the trained weights.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0.999)]
    ema_decay: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 250)]
    checkpoint_every: usize,
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Use only the first N training digits (quick runs).
    #[arg(long)]
    limit: Option<usize>,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl CommonArgs {
    fn options(&self) -> TrainOptions {
        TrainOptions {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            ema_decay: self.ema_decay,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            log_every: self.log_every.max(1),
        }
    }

    fn data(&self) -> Result<(Digits, Digits)> {
        let mut train = Digits::load(&self.data, Split::Train).context("loading training digits")?;
        let val = Digits::load(&self.data, Split::Val).context("loading validation digits")?;
        if let Some(n) = self.limit {
            train.truncate(n);
        }
        Ok((train, val))
    }
}

fn progress_bar(total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} (eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Progress bar updates, a plain log line every `every` steps when stderr is not a terminal
/// (background runs), and Ctrl-C: stop after the current step with a checkpoint saved.
fn report_step(bar: &ProgressBar, every: usize) -> impl FnMut(&StepLog) -> ControlFlow<()> + '_ {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
        tracing::warn!(error = %e, "Ctrl-C will not save a checkpoint");
    }
    move |log: &StepLog| {
        bar.set_position(log.step as u64);
        let line = format!("loss {:.4} lr {:.2e} {:.1} samples/s", log.loss, log.lr, log.samples_per_second);
        if bar.is_hidden() && log.step % every.max(1) == 0 {
            eprintln!("step {}/{} {line}", log.step, log.total);
        }
        bar.set_message(line);
        if stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

pub fn run(cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Autoencoder { common, kl_weight, channels, groups } => {
            let device = parse_device(&common.device)?;
            let (train, val) = common.data()?;
            let mut cfg = AutoencoderTraining { kl_weight, ..AutoencoderTraining::mnist_default(common.options()) };
            cfg.arch.block_out_channels = channels;
            cfg.arch.norm_num_groups = groups;
            let bar = progress_bar(common.steps);
            let report = autoencoder::train(&cfg, &train, &val, &common.out, &device, common.resume, &mut report_step(&bar, common.log_every))
                .context("training the autoencoder")?;
            bar.finish_and_clear();
            println!(
                "autoencoder: val PSNR {:.2} dB, latent std {:.4} (scaling factor {:.4}), {} parameters, {:.0} s, {:.0} samples/s -> {}",
                report.val_psnr_db,
                report.latent_std,
                report.scaling_factor,
                report.parameters,
                report.train_seconds,
                report.samples_per_second,
                common.out.display()
            );
            Ok(())
        }
    }
}
