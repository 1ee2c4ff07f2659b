use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use flowgen_engine::candle_core::{DType, Device};
use flowgen_engine::config::{AutoencoderSection, Defaults, ModelConfig};
use flowgen_engine::device::parse_device;
use flowgen_engine::models::autoencoder::AutoencoderKl;
use flowgen_engine::models::blockwise::BlockwiseConfig;
use flowgen_engine::models::sit::{Sit, SitConfig};
use flowgen_engine::weights::WeightsFile;
use flowgen_engine::{NetworkArch, Pipeline, ScheduleAccess, ScheduleSpec, SettingsRequest};
use flowgen_train::autoencoder::{self, AutoencoderTraining};
use flowgen_train::blockwise::{self, AlignmentTargets, BlockwiseModelParts, BlockwiseTraining, FrnTraining};
use flowgen_train::boss::straighten::{self, StraightenTraining, StraightenedModel, TeacherSetup, Trajectories};
use flowgen_train::classifier::{self, ClassifierConfig, ClassifierTraining};
use flowgen_train::data::{Digits, Split};
use flowgen_train::flowturbo::{self, RefinerTraining};
use flowgen_train::losses::{elbow, tilt_relative_variance, wcfm_eps, Objective, PairCost};
use flowgen_train::run::seeded_normal;
use flowgen_train::run::{RunPlace, StepLog, TrainOptions};
use flowgen_train::velocity::{self, Latents, VelocityTraining};
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
    /// The small CNN whose features `flowgen eval` measures FD in; writes classifier.safetensors.
    Classifier {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Redraw OUT/loss.png from OUT/loss.csv (for example while a run is still going).
    PlotLoss {
        /// Run directory holding loss.csv.
        #[arg(long)]
        run: PathBuf,
    },
    /// Class-conditional latent transformer (SiT) with I-CFM, W-CFM or OT-CFM; writes a servable
    /// model directory to OUT/model.
    Velocity {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        velocity: VelocityArgs,
    },
    /// FlowTurbo's velocity refiner for a model directory's velocity network (the teacher, frozen):
    /// checkpoints in OUT, and at the end refiner.safetensors and [networks.refiner] in --model.
    Refiner {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        refiner: RefinerArgs,
    },
    /// Blockwise Flow Matching, stage 1: a feature trunk and per-segment velocity blocks trained
    /// in BFM's time (t = 1 noise) on a batch split evenly across segments, with the trunk's
    /// features aligned to the classifier's spatial map; writes a servable model to OUT/model.
    Blockwise {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        blockwise: BlockwiseArgs,
    },
    /// Blockwise Flow Matching, FRN stage: everything of --model frozen, a feature residual
    /// network trained to approximate the trunk from each segment's first-step anchor; installs
    /// it in --model (frn_depth in model.toml).
    BlockwiseFrn {
        #[command(flatten)]
        common: CommonArgs,
        /// A blockwise model directory (from `train blockwise`); the FRN is added to it.
        #[arg(long)]
        model: PathBuf,
        /// FRN blocks (the release: 4 against a 20-block trunk).
        #[arg(long, default_value_t = 1)]
        frn_depth: usize,
    },
    /// BOSS straightening: fine-tune a copy of --model's velocity network so that Euler on
    /// --schedule follows the guided teacher's trajectories; writes a servable model directory.
    Straighten {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        straighten: StraightenArgs,
    },
}

#[derive(Args)]
pub struct StraightenArgs {
    /// Model directory of the teacher (left unchanged).
    #[arg(long)]
    model: PathBuf,
    /// Schedule to straighten: a stored one (boss-K) or any schedule text with --nfe steps.
    #[arg(long)]
    schedule: String,
    /// Euler steps, for a schedule that does not fix its own (uniform, shift:X).
    #[arg(long)]
    nfe: Option<usize>,
    /// Teacher trajectories drawn; the first --held-out only measure the result.
    #[arg(long, default_value_t = 4000)]
    trajectories: usize,
    #[arg(long, default_value_t = 200)]
    held_out: usize,
    /// Uniform Heun steps of the teacher (the schedule's times are added to its grid).
    #[arg(long, default_value_t = 16)]
    teacher_steps: usize,
    /// Seed of trajectory 0 (trajectory i: seed + i, label i mod classes); apart from eval's 0..
    #[arg(long, default_value_t = 2_000_000)]
    noise_seed: u64,
    /// Guidance scale of the teacher and the served model [default: what --model is served with].
    #[arg(long)]
    guidance: Option<f64>,
    /// Where the straightened model directory goes [default: OUT/model].
    #[arg(long)]
    into: Option<PathBuf>,
}

#[derive(Args)]
pub struct BlockwiseArgs {
    /// Run directory of `flowgen train autoencoder` (autoencoder.toml + autoencoder.safetensors).
    #[arg(long)]
    autoencoder: PathBuf,
    /// The classifier whose second conv map (7x7 tokens) the trunk's features are aligned to.
    #[arg(long, default_value = "models/mnist-classifier")]
    classifier: PathBuf,
    /// Weight of the feature-alignment loss (the release: 0.05); 0 trains without alignment.
    #[arg(long, default_value_t = 0.05)]
    align_weight: f64,
    /// Time segments M.
    #[arg(long, default_value_t = 4)]
    segments: usize,
    /// Velocity blocks per segment.
    #[arg(long, default_value_t = 1)]
    segment_depth: usize,
    /// Blocks of the shared feature trunk.
    #[arg(long, default_value_t = 3)]
    trunk_depth: usize,
    /// Transformer width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Attention heads (hidden / heads must be a multiple of 4 for the 2-D RoPE).
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Inner width of the low-rank adaLN modulations (the release: hidden / 4).
    #[arg(long, default_value_t = 32)]
    lora: usize,
    /// Hidden width of the alignment projection head.
    #[arg(long, default_value_t = 256)]
    projection_hidden: usize,
    /// Patch size over the latent (1: 49 tokens for 7x7).
    #[arg(long, default_value_t = 1)]
    patch: usize,
    /// Probability of replacing a label by the null label (needed for guidance).
    #[arg(long, default_value_t = 0.1)]
    label_dropout: f64,
    /// Add a fixed sin-cos absolute position table to the patch embeddings (the release has 2-D
    /// RoPE only).
    #[arg(long)]
    abs_pos_embed: bool,
    /// Name written into the model directory's model.toml.
    #[arg(long, default_value = "mnist-latent-blockwise")]
    name: String,
}

#[derive(Args)]
pub struct RefinerArgs {
    /// Model directory whose velocity network is the teacher; the refiner is installed there.
    #[arg(long)]
    model: PathBuf,
    /// Refiner width (FlowTurbo's is one block of the predictor's width).
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Refiner blocks.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Attention heads (must divide --hidden).
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Smallest Euler step dt the teacher takes per example (dt ~ U(dt-min, dt-max]).
    #[arg(long, default_value_t = 0.0)]
    dt_min: f64,
    /// Largest Euler step dt; the release trains on (0, 0.12].
    #[arg(long, default_value_t = 0.12)]
    dt_max: f64,
    /// Store this plan as the model's recommended one (plain `--sampler flowturbo`).
    #[arg(long)]
    plan: Option<String>,
}

#[derive(Args)]
pub struct VelocityArgs {
    /// Run directory of `flowgen train autoencoder` (autoencoder.toml + autoencoder.safetensors).
    #[arg(long)]
    autoencoder: PathBuf,
    /// icfm (independent pairs), wcfm (Gibbs-weighted pairs) or otcfm (minibatch optimal assignment).
    #[arg(long, default_value = "icfm")]
    objective: String,
    /// W-CFM: eps = kappa * sqrt(d); "auto" picks kappa by the elbow of the tilt variance.
    #[arg(long, default_value = "auto")]
    kappa: String,
    /// W-CFM pair cost: euclidean or squared.
    #[arg(long, default_value = "euclidean")]
    cost: String,
    /// Transformer width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Attention heads (must divide --hidden).
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Patch size over the latent (1: one token per latent pixel, 49 tokens for 7x7).
    #[arg(long, default_value_t = 1)]
    patch: usize,
    /// Probability of replacing a label by the null label (needed for guidance).
    #[arg(long, default_value_t = 0.1)]
    label_dropout: f64,
    /// Name written into the model directory's model.toml.
    #[arg(long)]
    name: Option<String>,
}

#[derive(Args)]
pub struct CommonArgs {
    /// Directory with MNIST in IDX format (train-images-idx3-ubyte[.gz], val-* or t10k-*).
    #[arg(long, default_value = "data/mnist")]
    data: PathBuf,
    /// Run directory: checkpoints, loss.csv, and the trained weights.
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps in total (a resumed run continues to this count).
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    /// Training samples per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak AdamW learning rate, reached after --warmup steps, then cosine decay to 0.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0 disables).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Decay of the weight EMA that is saved as the model (warmed up over the first steps).
    #[arg(long, default_value_t = 0.999)]
    ema_decay: f64,
    /// Seeds initialisation, batch order and noise: a run is reproducible from it.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save a resumable checkpoint every N steps (and at the end or on Ctrl-C).
    #[arg(long, default_value_t = 250)]
    checkpoint_every: usize,
    /// Append a loss.csv row every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Use only the first N training digits (quick runs).
    #[arg(long)]
    limit: Option<usize>,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl CommonArgs {
    fn place<'a>(&'a self, device: &'a Device) -> RunPlace<'a> {
        RunPlace { out: &self.out, device, resume: self.resume }
    }

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
        if bar.is_hidden() && log.step.is_multiple_of(every.max(1)) {
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
            let place = common.place(&device);
            let report = autoencoder::train(&cfg, (&train, &val), place, &mut report_step(&bar, common.log_every))
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
        TrainCommand::Velocity { common, velocity } => train_velocity(common, velocity),
        TrainCommand::Refiner { common, refiner } => train_refiner(common, refiner),
        TrainCommand::Straighten { common, straighten } => train_straighten(common, straighten),
        TrainCommand::Blockwise { common, blockwise } => train_blockwise(common, blockwise),
        TrainCommand::BlockwiseFrn { common, model, frn_depth } => train_blockwise_frn(common, &model, frn_depth),
        TrainCommand::PlotLoss { run } => {
            let title = format!("training loss: {}", run.display());
            flowgen_train::plot::plot_loss_csv(&run.join("loss.csv"), &run.join("loss.png"), &title)?;
            println!("wrote {}", run.join("loss.png").display());
            Ok(())
        }
        TrainCommand::Classifier { common } => {
            let device = parse_device(&common.device)?;
            let (train, val) = common.data()?;
            let bar = progress_bar(common.steps);
            let cfg = ClassifierTraining { arch: ClassifierConfig::default(), opts: common.options() };
            let place = common.place(&device);
            let report = classifier::train(&cfg, (&train, &val), place, &mut report_step(&bar, common.log_every))
                .context("training the classifier")?;
            bar.finish_and_clear();
            println!(
                "classifier: val accuracy {:.2}%, final loss {:.4}, {:.0} s, {:.0} samples/s -> {}",
                100.0 * report.val_accuracy,
                report.final_loss,
                report.train_seconds,
                report.samples_per_second,
                common.out.display()
            );
            Ok(())
        }
    }
}

/// (kappa, tilt relative variance) points of the W-CFM elbow rule.
type KappaCurve = Vec<(f64, f64)>;

fn parse_objective(args: &VelocityArgs, latents: &Latents) -> Result<(Objective, Option<KappaCurve>)> {
    let cost = match args.cost.as_str() {
        "euclidean" => PairCost::Euclidean,
        "squared" => PairCost::SquaredEuclidean,
        other => bail!("--cost {other:?}: use euclidean or squared"),
    };
    match args.objective.as_str() {
        "icfm" => Ok((Objective::Icfm, None)),
        "otcfm" => Ok((Objective::Otcfm, None)),
        "wcfm" => {
            if args.kappa != "auto" {
                let kappa: f64 =
                    args.kappa.parse().with_context(|| format!("--kappa {:?} is not a number", args.kappa))?;
                if !(kappa.is_finite() && kappa > 0.0) {
                    bail!("--kappa must be positive");
                }
                return Ok((Objective::Wcfm { kappa, cost }, None));
            }
            let (kappa, curve) = choose_kappa(latents, cost)?;
            Ok((Objective::Wcfm { kappa, cost }, Some(curve)))
        }
        other => bail!("--objective {other:?}: use icfm, wcfm or otcfm"),
    }
}

/// W-CFM's elbow rule: the tilt relative variance over a log grid of kappa, elbow chosen.
fn choose_kappa(latents: &Latents, cost: PairCost) -> Result<(f64, KappaCurve)> {
    let device = latents.mean.device().clone();
    let n = latents.len().min(512);
    let x1 = latents.mean.narrow(0, 0, n)?;
    let x0 = seeded_normal(12345, 0, 0, x1.dims(), &device)?;
    let kappas: Vec<f64> = (0..13).map(|i| 10f64.powf(-2.0 + 0.25 * i as f64)).collect();
    let mut curve = Vec::new();
    for &k in &kappas {
        let rv = tilt_relative_variance(&x0, &x1, wcfm_eps(k, latents.dim()), cost)?;
        curve.push((k, rv));
    }
    // The variance spans decades, so the elbow is read on its logarithm.
    let ys: Vec<f64> = curve.iter().map(|c| c.1.max(1e-300).ln()).collect();
    let pick = elbow(&kappas, &ys);
    Ok((kappas[pick], curve))
}

fn train_velocity(common: CommonArgs, args: VelocityArgs) -> Result<()> {
    let device = parse_device(&common.device)?;
    let (train, _val) = common.data()?;
    let (section, ae_weights, ae) = load_autoencoder(&args.autoencoder, &device)?;
    let arch = section.arch.clone();
    eprintln!("encoding {} training digits", train.len());
    let latents = Latents::encode(&ae, &section, &train, &device)?;
    let (objective, curve) = parse_objective(&args, &latents)?;
    std::fs::create_dir_all(&common.out)?;
    if let (Some(curve), Objective::Wcfm { kappa, .. }) = (&curve, &objective) {
        let mut csv = String::from("kappa,tilt_relative_variance\n");
        for (k, v) in curve {
            csv.push_str(&format!("{k},{v}\n"));
        }
        std::fs::write(common.out.join("kappa_curve.csv"), csv)?;
        eprintln!("W-CFM kappa = {kappa} (elbow of the tilt variance; curve in kappa_curve.csv)");
    }
    let (c, h) = (arch.latent_channels, train.rows / arch.downsample_factor());
    let sit = SitConfig {
        input_size: h,
        in_channels: c,
        patch_size: args.patch,
        hidden_size: args.hidden,
        depth: args.depth,
        num_heads: args.heads,
        mlp_ratio: 4.0,
        num_classes: 10,
        class_dropout_prob: args.label_dropout,
        learn_sigma: false,
        in_channels_scale: 1,
    };
    let cfg = VelocityTraining { sit: sit.clone(), objective: objective.clone(), opts: common.options() };
    let bar = progress_bar(common.steps);
    let (report, ema) =
        velocity::train(&cfg, &latents, common.place(&device), &mut report_step(&bar, common.log_every))
            .context("training the velocity model")?;
    bar.finish_and_clear();
    let name = args.name.clone().unwrap_or_else(|| format!("mnist-latent-{}", objective.name()));
    let model_dir = common.out.join("model");
    let defaults = Defaults { sampler: "heun".into(), steps: 8, guidance: 2.0, ..Defaults::default() };
    let shared =
        velocity::ModelDirCommon { name: &name, autoencoder: &section, autoencoder_weights: &ae_weights, defaults };
    let parts = velocity::ModelDirParts { sit: &sit, ema: &ema, common: shared };
    velocity::write_model_dir(&model_dir, parts)?;
    std::fs::write(common.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    println!(
        "velocity ({}): final loss {:.4}, {} parameters, {:.0} s, {:.1} samples/s -> {}",
        objective.name(),
        report.final_loss,
        report.parameters,
        report.train_seconds,
        report.samples_per_second,
        model_dir.display()
    );
    Ok(())
}

fn train_refiner(common: CommonArgs, args: RefinerArgs) -> Result<()> {
    let device = parse_device(&common.device)?;
    if let Some(plan) = &args.plan {
        flowgen_engine::Sampler::parse(plan).with_context(|| format!("--plan {plan}"))?;
    }
    let config = ModelConfig::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let NetworkArch::Sit(teacher_cfg) = &config.network.arch else {
        bail!("{}: the teacher must be a sit network", args.model.display());
    };
    let teacher_cfg = teacher_cfg.clone();
    let teacher = WeightsFile::open(&args.model.join(&config.network.weights))?
        .build(DType::F32, &device, |vb| Sit::new(&teacher_cfg, vb))
        .context("loading the teacher")?;
    let section = config.autoencoder.clone().context("the model has no [autoencoder] to encode digits with")?;
    let arch = section.arch.clone();
    let ae = WeightsFile::open(&args.model.join(&section.weights))?
        .build(DType::F32, &device, |vb| AutoencoderKl::new(&arch, vb))?;
    let (train, _val) = common.data()?;
    eprintln!("encoding {} training digits", train.len());
    let latents = Latents::encode(&ae, &section, &train, &device)?;
    let cfg = RefinerTraining {
        refiner: RefinerTraining::refiner_for(&teacher_cfg, args.hidden, args.depth, args.heads),
        dt_range: (args.dt_min, args.dt_max),
        opts: common.options(),
    };
    let bar = progress_bar(common.steps);
    let (report, ema) =
        flowturbo::train(&cfg, &teacher, &latents, common.place(&device), &mut report_step(&bar, common.log_every))
            .context("training the refiner")?;
    bar.finish_and_clear();
    std::fs::write(common.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    flowturbo::install_refiner(&args.model, &cfg.refiner, &ema, args.plan.as_deref())
        .with_context(|| format!("installing the refiner in {}", args.model.display()))?;
    println!(
        "refiner: final loss {:.5} (reusing v unchanged: {:.5}), {} parameters, {:.1} % of the teacher's FLOPs, {:.0} s, {:.1} samples/s -> {}",
        report.final_loss,
        report.reuse_loss,
        report.parameters,
        100.0 * report.flops_ratio,
        report.train_seconds,
        report.samples_per_second,
        args.model.join(flowturbo::REFINER_WEIGHTS).display()
    );
    Ok(())
}

fn train_straighten(common: CommonArgs, args: StraightenArgs) -> Result<()> {
    let device = parse_device(&common.device)?;
    let pipeline = Pipeline::load(&args.model, &device).with_context(|| format!("loading {}", args.model.display()))?;
    let config = pipeline.config().clone();
    let NetworkArch::Sit(sit_cfg) = &config.network.arch else {
        bail!("{}: straightening needs a sit network", args.model.display());
    };
    if config.guidance.channels.is_some() {
        bail!(
            "{}: straightening supports guidance on all channels only ([guidance] channels is set)",
            args.model.display()
        );
    }
    let request = SettingsRequest {
        sampler: Some("euler".into()),
        schedule: Some(args.schedule.clone()),
        steps: args.nfe,
        guidance: args.guidance,
        ..Default::default()
    };
    let settings =
        config.solve_settings(&request, ScheduleAccess::NamedAndFiles).context("--schedule/--nfe/--guidance")?;
    let schedule = settings.schedule.build(settings.steps).context("--schedule")?;
    // A stored schedule keeps its name in the new model; any other is stored as straightened-K.
    let k = schedule.steps();
    let schedule_name = match &settings.schedule {
        ScheduleSpec::Uniform => "uniform".to_string(),
        ScheduleSpec::Named { name, .. } => name.clone(),
        _ => format!("straightened-{k}"),
    };
    let teacher = TeacherSetup {
        times: schedule.points().to_vec(),
        trajectories: args.trajectories,
        held_out: args.held_out,
        teacher_steps: args.teacher_steps,
        noise_seed: args.noise_seed,
        guidance: settings.guidance,
        guidance_interval: settings.guidance_interval,
    };
    let cfg = StraightenTraining { teacher: teacher.clone(), opts: common.options() };
    std::fs::create_dir_all(&common.out)?;
    let bar = ProgressBar::new(args.trajectories as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} teacher trajectories (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut on_done = |done: usize| {
        bar.set_position(done as u64);
        // A background run's log gets a line per batch instead of the bar.
        if bar.is_hidden() {
            eprintln!("teacher trajectories {done}/{} ({:.0} s)", args.trajectories, started.elapsed().as_secs_f64());
        }
    };
    let trajectories = Trajectories::cached(&common.out, &pipeline, &teacher, &mut on_done)
        .context("drawing the teacher's trajectories")?;
    bar.finish_and_clear();
    let trajectory_seconds = started.elapsed().as_secs_f64();
    eprintln!("{} teacher trajectories ready in {trajectory_seconds:.0} s", trajectories.len());
    let bar = progress_bar(common.steps);
    let weights = args.model.join(&config.network.weights);
    let (mut report, ema) = straighten::train(
        &cfg,
        sit_cfg,
        config.network.convention,
        &weights,
        &trajectories,
        common.place(&device),
        &mut report_step(&bar, common.log_every),
    )
    .context("straightening")?;
    bar.finish_and_clear();
    report.trajectory_seconds = trajectory_seconds;
    std::fs::write(common.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    let into = args.into.clone().unwrap_or_else(|| common.out.join("model"));
    let parts = StraightenedModel {
        teacher_dir: &args.model,
        schedule_name: &schedule_name,
        times: schedule.points(),
        guidance: settings.guidance,
    };
    straighten::write_model(&into, parts, sit_cfg, &ema).with_context(|| format!("writing {}", into.display()))?;
    let show = |v: &[f64]| v.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(", ");
    println!("| held out ({} trajectories) | chord loss per step | Euler {k} end RMSE |\n|---|---|---|", args.held_out);
    println!("| teacher | {} | {:.4} |", show(&report.teacher.chord_loss), report.teacher.euler_end_rmse);
    println!(
        "| straightened | {} | {:.4} |",
        show(&report.straightened.chord_loss),
        report.straightened.euler_end_rmse
    );
    println!(
        "straightened for euler on {schedule_name} ({k} steps, guidance {}): final loss {:.4}, trajectories {trajectory_seconds:.0} s, training {:.0} s ({:.1} samples/s) -> {}",
        settings.guidance,
        report.final_loss,
        report.train_seconds,
        report.samples_per_second,
        into.display()
    );
    Ok(())
}

/// Read a `train autoencoder` run directory's section and build the autoencoder.
fn load_autoencoder(dir: &std::path::Path, device: &Device) -> Result<(AutoencoderSection, PathBuf, AutoencoderKl)> {
    let section_path = dir.join("autoencoder.toml");
    let text = std::fs::read_to_string(&section_path).with_context(|| format!("reading {}", section_path.display()))?;
    let section: AutoencoderSection =
        toml::from_str(&text).with_context(|| format!("parsing {}", section_path.display()))?;
    let weights = dir.join(&section.weights);
    let arch = section.arch.clone();
    let ae = WeightsFile::open(&weights)?.build(DType::F32, device, |vb| AutoencoderKl::new(&arch, vb))?;
    Ok((section, weights, ae))
}

fn train_blockwise(common: CommonArgs, args: BlockwiseArgs) -> Result<()> {
    let device = parse_device(&common.device)?;
    let (train, _val) = common.data()?;
    let (section, ae_weights, ae) = load_autoencoder(&args.autoencoder, &device)?;
    eprintln!("encoding {} training digits", train.len());
    let latents = Latents::encode(&ae, &section, &train, &device)?;
    let targets = if args.align_weight > 0.0 {
        let classifier = classifier::Classifier::load(&args.classifier, &device)
            .with_context(|| format!("loading the classifier {}", args.classifier.display()))?;
        Some(AlignmentTargets::from_classifier(&classifier, &train, &device).context("alignment targets")?)
    } else {
        None
    };
    let arch = &section.arch;
    let net = BlockwiseConfig {
        input_size: train.rows / arch.downsample_factor(),
        in_channels: arch.latent_channels,
        patch_size: args.patch,
        hidden_size: args.hidden,
        num_heads: args.heads,
        mlp_ratio: 4.0,
        num_classes: 10,
        class_dropout_prob: args.label_dropout,
        learn_sigma: false,
        segments: args.segments,
        segment_depth: args.segment_depth,
        feature_alignment_depth: args.trunk_depth,
        frn_depth: 0,
        adaln_lora_dim: args.lora,
        dim_projection: match &targets {
            Some(t) => t.channels()?,
            None => 0,
        },
        projection_hidden: args.projection_hidden,
        rope_theta: 10000.0,
        abs_pos_embed: args.abs_pos_embed,
    };
    let cfg = BlockwiseTraining { net: net.clone(), align_weight: args.align_weight, opts: common.options() };
    let bar = progress_bar(common.steps);
    let (report, ema) = blockwise::train(
        &cfg,
        &latents,
        targets.as_ref(),
        common.place(&device),
        &mut report_step(&bar, common.log_every),
    )
    .context("training the blockwise model")?;
    bar.finish_and_clear();
    let model_dir = common.out.join("model");
    let defaults = Defaults { sampler: "euler".into(), steps: 8, guidance: 1.5, ..Defaults::default() };
    let shared = velocity::ModelDirCommon {
        name: &args.name,
        autoencoder: &section,
        autoencoder_weights: &ae_weights,
        defaults,
    };
    let parts = BlockwiseModelParts { net: &net, weights: &ema, common: shared };
    blockwise::write_model_dir(&model_dir, parts)?;
    std::fs::write(common.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    let flops = net.flops();
    println!(
        "blockwise: final loss {:.4} (velocity {:.4}, alignment {:.4}), {} parameters, GFLOPs per image and forward: trunk {:.4}, segment {:.4}; {:.0} s, {:.1} samples/s -> {}",
        report.final_loss,
        report.final_velocity_loss,
        report.final_align_loss,
        report.parameters,
        flops.trunk / 1e9,
        flops.segment / 1e9,
        report.train_seconds,
        report.samples_per_second,
        model_dir.display()
    );
    Ok(())
}

fn train_blockwise_frn(common: CommonArgs, model: &std::path::Path, frn_depth: usize) -> Result<()> {
    let device = parse_device(&common.device)?;
    let mut config = ModelConfig::load(model).with_context(|| format!("loading {}", model.display()))?;
    let NetworkArch::Blockwise(base_cfg) = &config.network.arch else {
        bail!("{}: the FRN stage needs a blockwise network", model.display());
    };
    let net = BlockwiseConfig { frn_depth, ..base_cfg.clone() };
    let weights_path = model.join(&config.network.weights);
    let base: std::collections::HashMap<String, _> =
        flowgen_engine::candle_core::safetensors::load(&weights_path, &device)
            .with_context(|| format!("reading {}", weights_path.display()))?
            .into_iter()
            .filter(|(name, _)| !name.starts_with("frn_blocks."))
            .collect();
    let section = config.autoencoder.clone().context("the model has no [autoencoder] to encode digits with")?;
    let arch = section.arch.clone();
    let ae = WeightsFile::open(&model.join(&section.weights))?
        .build(DType::F32, &device, |vb| AutoencoderKl::new(&arch, vb))?;
    let (train, _val) = common.data()?;
    eprintln!("encoding {} training digits", train.len());
    let latents = Latents::encode(&ae, &section, &train, &device)?;
    let cfg = FrnTraining { net: net.clone(), opts: common.options() };
    let bar = progress_bar(common.steps);
    let (report, frn) = blockwise::train_frn(
        &cfg,
        base.clone(),
        &latents,
        common.place(&device),
        &mut report_step(&bar, common.log_every),
    )
    .context("training the FRN")?;
    bar.finish_and_clear();
    std::fs::write(common.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    let mut all = base;
    all.extend(frn);
    flowgen_engine::weights::save_safetensors(&all, &weights_path)?;
    config.network.arch = NetworkArch::Blockwise(net.clone());
    let path = model.join("model.toml");
    std::fs::write(&path, config.to_toml_string()).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "blockwise FRN: final loss {:.5} (reusing the anchor: {:.5}), {} parameters, {:.4} GFLOPs per image and forward against the trunk's {:.4}; {:.0} s, {:.1} samples/s -> {}",
        report.final_loss,
        report.anchor_reuse_loss,
        report.parameters,
        net.flops().frn / 1e9,
        net.flops().trunk / 1e9,
        report.train_seconds,
        report.samples_per_second,
        weights_path.display()
    );
    Ok(())
}
