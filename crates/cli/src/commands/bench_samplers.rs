//! `flowgen bench samplers`: quality, cost and speed of every sampler at equal network-evaluation
//! budgets on one model, from one noise set, as a table, CSV and plots.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use flowgen_engine::device::parse_device;
use flowgen_engine::{Pipeline, ScheduleAccess, SettingsRequest};
use flowgen_train::evaluate::{reference_sampler, EvalContext, EvalSetup};
use flowgen_train::sampler_bench::{
    gemm_gflops, mark_pareto, plan_runs, plot, to_csv, to_markdown, BenchRow, BenchSetup, ScheduleChoice,
    DEFAULT_BUDGETS,
};
use indicatif::{ProgressBar, ProgressStyle};

use super::eval::QualityReferenceArgs;

#[derive(Args)]
pub struct SamplersBenchArgs {
    /// Model directory.
    #[arg(long, default_value = "models/default")]
    model: PathBuf,
    /// Network evaluations per image to compare at (each sampler runs the step count that spends
    /// exactly this many, where one does).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_BUDGETS)]
    nfe: Vec<usize>,
    /// Sampler families and plans (flowturbo:H2P4R2; plain flowturbo is the model's recommended
    /// plan); dopri5 (any plan) is the reference the RMSE column is measured against. [default:
    /// euler,midpoint,heun,rk4,pseudo-corrector,dopri5, and flowturbo when the model recommends a plan]
    #[arg(long, value_delimiter = ',')]
    samplers: Option<Vec<String>>,
    /// Schedules of the fixed-step samplers: uniform, shift:X, and the prefix of the model's stored
    /// schedules (boss: boss-K for a run of K steps, where the model has one).
    #[arg(long, value_delimiter = ',', default_value = "uniform,shift:2,boss")]
    schedules: Vec<String>,
    /// Images per run (labels 0-9 in turn, image i from seed + i), the same for every run.
    #[arg(long, default_value_t = 256)]
    n: usize,
    /// Image i is drawn from seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per batched solve (the quality run's batches; ms/image batched is timed on them).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Images solved one at a time for ms/image alone (after one warm-up solve).
    #[arg(long, default_value_t = 4)]
    alone: usize,
    #[command(flatten)]
    reference: QualityReferenceArgs,
    /// Classifier-free guidance scale [default: what the model is served with].
    #[arg(long)]
    guidance: Option<f64>,
    /// Where samplers.csv, samplers.md and the plots go.
    #[arg(long, default_value = "bench-samplers")]
    out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: SamplersBenchArgs) -> Result<()> {
    let started = Instant::now();
    anyhow::ensure!(args.n >= 2 * args.batch, "--n must be at least twice --batch: the first batch is a warm-up");
    anyhow::ensure!(args.nfe.iter().all(|&b| b >= 1), "--nfe budgets must all be at least 1");
    let device = parse_device(&args.device)?;
    let pipeline = Pipeline::load(&args.model, &device).with_context(|| format!("loading {}", args.model.display()))?;
    let (classifier, train, val) = args.reference.load(&device)?;
    let cfg = pipeline.config();
    let names = match &args.samplers {
        Some(names) => super::rejoin_parameters(names),
        None => {
            let mut names: Vec<String> =
                ["euler", "midpoint", "heun", "rk4", "pseudo-corrector", "dopri5"].map(String::from).to_vec();
            if cfg.sampler_plans.contains_key("flowturbo") {
                names.insert(5, "flowturbo".into());
            }
            if cfg.network.arch.has_frn() {
                names.insert(1, "fra".into());
            }
            names
        }
    };
    let mut samplers = Vec::new();
    for name in &names {
        let sampler = cfg.resolve_sampler(name).with_context(|| format!("--samplers {name}"))?;
        cfg.check_networks(&sampler).with_context(|| format!("--samplers {name}"))?;
        // A bare "dopri5" is the tight reference; a plan with parameters is taken as given.
        samplers.push(if sampler.is_adaptive() && !name.contains(':') { reference_sampler() } else { sampler });
    }
    let schedules: Vec<ScheduleChoice> =
        args.schedules.iter().map(|s| ScheduleChoice::parse(s)).collect::<Result<_, _>>().context("--schedules")?;
    let runs = plan_runs(&args.nfe, &samplers, &schedules, &cfg.schedules);
    anyhow::ensure!(!runs.is_empty(), "no sampler spends exactly any of the budgets {:?}", args.nfe);

    let wanted = SettingsRequest { guidance: args.guidance, sampler: Some("euler".into()), ..Default::default() };
    let served = cfg.solve_settings(&wanted, ScheduleAccess::Named).context("--guidance")?;
    let guidance = pipeline.guidance(served.guidance, served.guidance_interval);
    let setup = EvalSetup {
        classifier: &classifier,
        train: &train,
        val: &val,
        n: args.n,
        seed: args.seed,
        guidance: guidance.clone(),
    };
    let mut ctx = EvalContext::new(setup, &device)?;
    ctx.set_batch(args.batch);
    ctx.with_reference = runs.iter().any(|r| r.sampler == reference_sampler());
    ctx.measure_autoencoder_floor(&pipeline, &classifier, &train).context("measuring the autoencoder's FD floor")?;
    let forward_flops = cfg.network.arch.forward_flops();
    let gemm = gemm_gflops(&device).context("measuring GEMM throughput")?;

    // Progress in network evaluations per image, so the estimate weighs long runs fairly.
    let cost = |r: &flowgen_train::sampler_bench::BenchRun| r.budget.unwrap_or(100) as u64;
    let bar = ProgressBar::new(runs.iter().map(cost).sum());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} NFE  elapsed {elapsed}, about {eta} left  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if ctx.with_reference {
        // The reference first: every other run's RMSE needs it.
        bar.set_message("dopri5 reference");
        ctx.reference(&pipeline)?;
    }
    let mut rows = Vec::with_capacity(runs.len());
    for run in &runs {
        bar.set_message(format!("{} {} steps, {}", run.sampler.name(), run.steps, run.schedule.canonical()));
        ctx.schedule = run.schedule.clone();
        let eval = ctx.evaluate(&pipeline, &classifier, &run.sampler, run.steps, false)?;
        let alone = ctx.seconds_per_image_alone(&pipeline, &run.sampler, run.steps, args.alone)?;
        // Costs as measured: the evaluations each network actually ran (a blockwise FRA solve's
        // FRN steps are only known once solved).
        rows.push(BenchRow {
            gflops_per_image: eval.gflops_per_image,
            auxiliary_evaluations: eval.other_evaluations_per_image.clone(),
            ms_per_image_alone: 1000.0 * alone,
            ms_per_image_batched: 1000.0 * eval.seconds_per_image,
            group: run.group.clone(),
            budget: run.budget,
            pareto: false,
            eval,
        });
        bar.inc(cost(run));
    }
    bar.finish_and_clear();
    mark_pareto(&mut rows);

    let setup = BenchSetup {
        model: cfg.name.clone(),
        n: args.n,
        seed: args.seed,
        batch: args.batch,
        alone_images: args.alone,
        guidance: guidance.scale,
        guidance_interval: guidance.interval,
        fd_floor: ctx.fd_floor,
        fd_autoencoder_floor: ctx.fd_autoencoder_floor,
        gemm_gflops: gemm,
        forward_gflops: forward_flops / 1e9,
        device: args.device.clone(),
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let md = to_markdown(&setup, &rows);
    std::fs::write(args.out.join("samplers.md"), &md)?;
    std::fs::write(args.out.join("samplers.csv"), to_csv(&rows))?;
    std::fs::write(
        args.out.join("samplers.json"),
        serde_json::to_string_pretty(&serde_json::json!({"setup": setup, "rows": rows}))?,
    )?;
    let plots = plot(&rows, &args.out).context("drawing the plots")?;
    println!(
        "{md}\n{} runs in {:.0} s; written to {}: samplers.md, .csv, .json, {}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        args.out.display(),
        plots.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::rejoin_parameters;

    #[test]
    fn parameters_after_a_comma_stay_with_their_sampler() {
        let pieces: Vec<String> =
            ["heun", "dopri5:rtol=1e-4", "atol=1e-4", "flowturbo:H2P4R2", "condition=refined", "euler"]
                .map(String::from)
                .to_vec();
        assert_eq!(
            rejoin_parameters(&pieces),
            ["heun", "dopri5:rtol=1e-4,atol=1e-4", "flowturbo:H2P4R2,condition=refined", "euler"]
        );
    }
}
