use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use flowgen_engine::candle_core::Device;
use flowgen_engine::device::parse_device;
use flowgen_engine::{Pipeline, ScheduleAccess, ScheduleSpec, SettingsRequest};
use flowgen_train::classifier::Classifier;
use flowgen_train::data::{Digits, Split};
use flowgen_train::evaluate::{reference_sampler, EvalContext, EvalSetup};

/// The real digits and the classifier every quality measurement (FD, accuracy) is made against.
#[derive(Args)]
pub(super) struct QualityReferenceArgs {
    /// Classifier directory (classifier.json + classifier.safetensors).
    #[arg(long, default_value = "models/mnist-classifier")]
    classifier: PathBuf,
    /// MNIST in IDX format: the val split is the reference, train digits give the real-data floor.
    #[arg(long, default_value = "data/mnist")]
    data: PathBuf,
}

impl QualityReferenceArgs {
    /// The classifier, the train digits (for the real-data floor) and the val digits.
    pub(super) fn load(&self, device: &Device) -> Result<(Classifier, Digits, Digits)> {
        let classifier = Classifier::load(&self.classifier, device).context("loading the classifier")?;
        let train = Digits::load(&self.data, Split::Train).context("loading training digits")?;
        let val = Digits::load(&self.data, Split::Val).context("loading validation digits")?;
        Ok((classifier, train, val))
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model directory to evaluate.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    reference: QualityReferenceArgs,
    /// Sampler, or a comma-separated list evaluated on the same noise (one JSON object each).
    #[arg(long, default_value = "dopri5")]
    sampler: String,
    /// Step count, or a comma-separated list: every fixed-step sampler runs at each (same noise)
    /// [default: 8, or the steps of a stored or explicit --schedule].
    #[arg(long, value_delimiter = ',')]
    steps: Vec<usize>,
    /// Time grid of the fixed-step samplers: uniform, shift:X, a list, a schedule the model stores
    /// (e.g. boss-4, which fixes the steps) or a file [default: uniform].
    #[arg(long, default_value = "uniform")]
    schedule: String,
    /// Classifier-free guidance scale (1 = none) [default: from model.toml].
    #[arg(long)]
    guidance: Option<f64>,
    /// Apply guidance only for s in [LO, HI] (0 noise, 1 data) [default: from model.toml].
    #[arg(long, value_name = "LO,HI", value_parser = super::parse_interval)]
    guidance_interval: Option<(f64, f64)>,
    /// Images generated per sampler run (labels 0-9 in turn); also the number of real train digits in the floor.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Image i is drawn from seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also measure the straightness of the learned flow.
    #[arg(long)]
    straightness: bool,
    /// Skip the tight Dormand-Prince reference solve (and so the RMSE column): a quick quality check.
    #[arg(long)]
    no_reference: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let pipeline = Pipeline::load(&args.model, &device).with_context(|| format!("loading {}", args.model.display()))?;
    let (classifier, train, val) = args.reference.load(&device)?;
    anyhow::ensure!(args.n >= 2, "--n must be at least 2 for an FD");
    let cfg = pipeline.config();
    // Guidance as generate and the server fill it; samplers and steps are the evaluation's own.
    let wanted = SettingsRequest {
        guidance: args.guidance,
        guidance_interval: args.guidance_interval,
        sampler: Some("euler".into()),
        schedule: Some("uniform".into()),
        ..Default::default()
    };
    let defaults = cfg.solve_settings(&wanted, ScheduleAccess::Named).context("--guidance/--guidance-interval")?;
    let guidance = pipeline.guidance(defaults.guidance, defaults.guidance_interval);
    let setup = EvalSetup { classifier: &classifier, train: &train, val: &val, n: args.n, seed: args.seed, guidance };
    let mut ctx = EvalContext::new(setup, &device)?;
    ctx.with_reference = !args.no_reference;
    ctx.schedule =
        ScheduleSpec::resolve(&args.schedule, &cfg.schedules, ScheduleAccess::NamedAndFiles).context("--schedule")?;
    // A stored or explicit list fixes the step count; --steps may then only repeat it.
    let steps = match (ctx.schedule.own_steps(), args.steps.is_empty()) {
        (Some(own), true) => vec![own],
        (Some(own), false) if args.steps.iter().any(|&k| k != own) => {
            anyhow::bail!("--schedule {} has {own} steps; --steps {:?} does not match", args.schedule, args.steps)
        }
        (_, true) => vec![8],
        (_, false) => args.steps.clone(),
    };
    ctx.measure_autoencoder_floor(&pipeline, &classifier, &train).context("measuring the autoencoder's FD floor")?;
    anyhow::ensure!(steps.iter().all(|&k| k >= 1), "--steps must all be at least 1");
    let mut runs = Vec::new();
    let pieces: Vec<String> = args.sampler.split(',').map(String::from).collect();
    for name in super::rejoin_parameters(&pieces) {
        let sampler = pipeline.config().resolve_sampler(name.trim())?;
        pipeline.config().check_networks(&sampler)?;
        if let Some(own) = sampler.own_steps() {
            // A FlowTurbo plan fixes its own steps.
            runs.push((sampler, own));
        } else if sampler.is_adaptive() {
            // An adaptive solver ignores --steps: one run, at the reference tolerance unless
            // the plan names its own ("dopri5:rtol=1e-3").
            runs.push((if name.contains(':') { sampler } else { reference_sampler() }, 0));
        } else {
            runs.extend(steps.iter().map(|&k| (sampler.clone(), k)));
        }
    }
    for (i, (sampler, steps)) in runs.iter().enumerate() {
        let result = ctx.evaluate(&pipeline, &classifier, sampler, *steps, args.straightness && i == 0)?;
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(())
}
