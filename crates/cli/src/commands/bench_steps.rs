//! `flowgen bench steps`: what one sampler step costs beyond its network forwards (the guidance
//! mix, the update rule, per-step tensor set-up): every network is timed inside the same solves.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use std::sync::{Arc, Mutex};

use flowgen_engine::candle_core::{DType, Device, Tensor};
use flowgen_engine::device::parse_device;
use flowgen_engine::samplers::Unobserved;
use flowgen_engine::{ImageInputs, ModelConfig, Pipeline, ScheduleAccess, SettingsRequest, VelocityModel};
use serde::Serialize;

#[derive(Args)]
pub struct StepsBenchArgs {
    /// Model directory [default: the shipped default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Images per solve.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 64])]
    batch: Vec<usize>,
    /// Samplers [default: euler,heun,pseudo-corrector, and flowturbo when the model recommends a plan].
    #[arg(long, value_delimiter = ',')]
    samplers: Option<Vec<String>>,
    /// Steps of the fixed-step samplers (a FlowTurbo plan runs its own).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Timed solves per row, after two warm-up solves; medians are reported.
    #[arg(long, default_value_t = 15)]
    repeats: usize,
    /// Classifier-free guidance scale [default: what the model is served with].
    #[arg(long)]
    guidance: Option<f64>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct StepRow {
    sampler: String,
    batch: usize,
    steps: usize,
    ms_per_solve: f64,
    /// Time inside the network forwards of the same solves (doubled batch when guided).
    forward_ms_per_solve: f64,
    /// (solve - forwards) / steps, median over solves: what a step adds to its forwards.
    overhead_ms_per_step: f64,
    overhead_fraction: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A network that adds the seconds spent in its forwards to `spent`, so one solve tells its
/// network time from the rest (on the CPU a forward returns when its result is computed).
struct Timed {
    inner: Box<dyn VelocityModel>,
    spent: Arc<Mutex<f64>>,
}

impl VelocityModel for Timed {
    fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> flowgen_engine::Result<Tensor> {
        let started = Instant::now();
        let out = self.inner.forward(x, t, y)?;
        if let Ok(mut spent) = self.spent.lock() {
            *spent += started.elapsed().as_secs_f64();
        }
        Ok(out)
    }

    fn convention(&self) -> flowgen_engine::TimeConvention {
        self.inner.convention()
    }
}

/// The model's networks, each timed into `spent` (no autoencoder: the solve is what is measured).
fn timed_pipeline(model: &std::path::Path, device: &Device, spent: &Arc<Mutex<f64>>) -> Result<Pipeline> {
    let config = ModelConfig::load(model)?;
    let null = config.null_label();
    let wrap = |inner| Box::new(Timed { inner, spent: spent.clone() }) as Box<dyn VelocityModel>;
    let main = wrap(config.network.load(model, null, DType::F32, device)?);
    let mut networks = Vec::new();
    for (name, section) in &config.networks {
        networks.push((name.clone(), wrap(section.load(model, null, DType::F32, device)?)));
    }
    let mut pipeline = Pipeline::from_parts(config, main, None, device);
    for (name, net) in networks {
        pipeline = pipeline.with_network(&name, net);
    }
    Ok(pipeline)
}

pub fn run(args: StepsBenchArgs) -> Result<()> {
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => super::default_model_dir()?,
    };
    let device = parse_device(&args.device)?;
    let spent = Arc::new(Mutex::new(0.0f64));
    let pipeline = timed_pipeline(&model, &device, &spent).with_context(|| format!("loading {}", model.display()))?;
    let cfg = pipeline.config();
    let names = args.samplers.clone().unwrap_or_else(|| {
        let mut names: Vec<String> = ["euler", "heun", "pseudo-corrector"].map(String::from).to_vec();
        if cfg.sampler_plans.contains_key("flowturbo") {
            names.push("flowturbo".into());
        }
        names
    });
    let mut rows = Vec::new();
    for &batch in &args.batch {
        anyhow::ensure!(batch >= 1, "--batch sizes must be at least 1");
        for name in &names {
            // A plan with its own step count (FlowTurbo) takes no --steps.
            let own_steps = cfg.resolve_sampler(name).with_context(|| format!("--samplers {name}"))?.own_steps();
            let request = SettingsRequest {
                sampler: Some(name.clone()),
                steps: if own_steps.is_some() { None } else { Some(args.steps) },
                guidance: args.guidance,
                ..Default::default()
            };
            let settings =
                cfg.solve_settings(&request, ScheduleAccess::Named).with_context(|| format!("--samplers {name}"))?;
            anyhow::ensure!(
                !settings.sampler.is_adaptive(),
                "{name}: steps of an adaptive solver vary; pick a fixed-step one"
            );
            let inputs = ImageInputs::cycle(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], batch, 0);
            let solve_once = || -> Result<(f64, f64)> {
                let before = *spent.lock().map_err(|_| anyhow::anyhow!("timer poisoned"))?;
                let started = Instant::now();
                let (state, _) = pipeline.sample_state(&settings, &inputs, &mut Unobserved)?;
                state.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let total = started.elapsed().as_secs_f64();
                let forwards = *spent.lock().map_err(|_| anyhow::anyhow!("timer poisoned"))? - before;
                Ok((total, forwards))
            };
            solve_once()?;
            solve_once()?;
            let timed: Vec<(f64, f64)> = (0..args.repeats.max(1)).map(|_| solve_once()).collect::<Result<_>>()?;
            let (solve, forwards) =
                (median(timed.iter().map(|t| t.0).collect()), median(timed.iter().map(|t| t.1).collect()));
            let rest = median(timed.iter().map(|t| t.0 - t.1).collect());
            rows.push(StepRow {
                sampler: settings.sampler.canonical(),
                batch,
                steps: settings.steps,
                ms_per_solve: 1000.0 * solve,
                forward_ms_per_solve: 1000.0 * forwards,
                overhead_ms_per_step: 1000.0 * rest / settings.steps as f64,
                overhead_fraction: rest / solve,
            });
        }
    }
    println!("| sampler | batch | steps | ms/solve | forwards ms/solve | overhead ms/step | overhead share |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.3} | {:.1}% |",
            r.sampler,
            r.batch,
            r.steps,
            r.ms_per_solve,
            r.forward_ms_per_solve,
            r.overhead_ms_per_step,
            100.0 * r.overhead_fraction
        );
    }
    println!(
        "{} rows on {} ({}; medians of {} solves after 2 warm-ups)",
        rows.len(),
        cfg.name,
        args.device,
        args.repeats
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
