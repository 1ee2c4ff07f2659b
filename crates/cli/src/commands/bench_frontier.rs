//! `flowgen bench frontier`: FD against network GFLOPs per image for several models and samplers
//! at the same step counts and from one noise set, so models of different architectures (a
//! blockwise network against a single one) compare at equal compute.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use flowgen_engine::device::parse_device;
use flowgen_engine::{Pipeline, ScheduleAccess, SettingsRequest};
use flowgen_train::evaluate::{EvalContext, EvalResult, EvalSetup};
use flowgen_train::plot::{line_plot, PlotSpec, Series};
use indicatif::{ProgressBar, ProgressStyle};

use super::eval::QualityReferenceArgs;

#[derive(Args)]
pub struct FrontierBenchArgs {
    /// Model directories to compare (the same latent shape, so they share the noise).
    #[arg(long, value_delimiter = ',', default_value = "models/default")]
    models: Vec<PathBuf>,
    /// Fixed-step samplers; each runs on every model that takes it (fra needs a blockwise model
    /// with an FRN).
    #[arg(long, value_delimiter = ',', default_value = "euler,fra")]
    samplers: Vec<String>,
    /// Step counts of every run.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,16,32")]
    steps: Vec<usize>,
    /// Images per run (labels 0-9 in turn, image i from seed + i), the same for every run.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per batched solve.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[command(flatten)]
    reference: QualityReferenceArgs,
    /// Classifier-free guidance scale of every run [default: what each model is served with].
    #[arg(long)]
    guidance: Option<f64>,
    /// Where frontier.md, frontier.csv, frontier.json and frontier.png go.
    #[arg(long, default_value = "bench-frontier")]
    out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Instead of running anything, join the frontier.json files of earlier runs (the same --n,
    /// --seed and data, for example one run per model on its own core) into one report in --out.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["models", "samplers", "steps", "guidance"])]
    merge: Vec<PathBuf>,
}

/// A line of the plot: one model with one sampler over the step counts.
fn series_name(e: &EvalResult) -> String {
    format!("{} {}", e.model, e.sampler)
}

pub fn run(args: FrontierBenchArgs) -> Result<()> {
    if !args.merge.is_empty() {
        return merge(&args.merge, &args.out);
    }
    anyhow::ensure!(args.n >= 2, "--n must be at least 2 for an FD");
    anyhow::ensure!(!args.steps.is_empty() && args.steps.iter().all(|&k| k >= 1), "--steps must all be at least 1");
    let device = parse_device(&args.device)?;
    let (classifier, train, val) = args.reference.load(&device)?;
    let mut pipelines = Vec::new();
    for dir in &args.models {
        let pipeline = Pipeline::load(dir, &device).with_context(|| format!("loading {}", dir.display()))?;
        let mut samplers = Vec::new();
        for name in &args.samplers {
            let sampler = pipeline.config().resolve_sampler(name).with_context(|| format!("--samplers {name}"))?;
            anyhow::ensure!(!sampler.is_adaptive(), "--samplers {name}: the frontier compares fixed-step samplers");
            match pipeline.config().check_networks(&sampler) {
                Ok(()) => samplers.push(sampler),
                Err(why) => eprintln!("{}: skipping {name}: {why}", dir.display()),
            }
        }
        pipelines.push((dir, pipeline, samplers));
    }
    // Models are told apart by name, or by name and directory where two share a name.
    let labels: Vec<String> = pipelines
        .iter()
        .map(|(dir, pipeline, _)| {
            let name = &pipeline.config().name;
            let shared = pipelines.iter().filter(|(_, other, _)| &other.config().name == name).count() > 1;
            if shared {
                format!("{name} ({})", dir.display())
            } else {
                name.clone()
            }
        })
        .collect();
    let total: usize = pipelines.iter().map(|(_, _, s)| s.len() * args.steps.len()).sum();
    anyhow::ensure!(total > 0, "no model takes any of --samplers {:?}", args.samplers);
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} runs (eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut points = Vec::new();
    let mut fd_floor = 0.0;
    for ((dir, pipeline, samplers), label) in pipelines.iter().zip(&labels) {
        let cfg = pipeline.config();
        let wanted = SettingsRequest { guidance: args.guidance, sampler: Some("euler".into()), ..Default::default() };
        let served = cfg.solve_settings(&wanted, ScheduleAccess::Named).context("--guidance")?;
        let guidance = pipeline.guidance(served.guidance, served.guidance_interval);
        let setup =
            EvalSetup { classifier: &classifier, train: &train, val: &val, n: args.n, seed: args.seed, guidance };
        let mut ctx = EvalContext::new(setup, &device)?;
        ctx.set_batch(args.batch);
        ctx.with_reference = false;
        fd_floor = ctx.fd_floor;
        for sampler in samplers {
            for &steps in &args.steps {
                bar.set_message(format!("{} {} {steps} steps", cfg.name, sampler.canonical()));
                let eval = ctx
                    .evaluate(pipeline, &classifier, sampler, steps, false)
                    .with_context(|| format!("{}: {} at {steps} steps", dir.display(), sampler.canonical()))?;
                // A background run's log gets a line per run instead of the bar.
                if bar.is_hidden() {
                    eprintln!(
                        "{label} {} {steps} steps: FD ratio {:.3}, {:.3} GFLOPs/image ({}/{total} runs, {:.0} s)",
                        sampler.canonical(),
                        eval.fd_ratio,
                        eval.gflops_per_image,
                        points.len() + 1,
                        started.elapsed().as_secs_f64()
                    );
                }
                points.push(EvalResult { model: label.clone(), ..eval });
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    write_report(&points, fd_floor, args.n, &args.out)?;
    println!(
        "{} runs in {:.0} s -> {}/frontier.{{md,csv,json,png}}",
        points.len(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// One report from several runs' frontier.json: they must share the image count and the real-data
/// floor, or their FDs would not be comparable.
fn merge(inputs: &[PathBuf], out: &std::path::Path) -> Result<()> {
    let mut points: Vec<EvalResult> = Vec::new();
    for path in inputs {
        let text = std::fs::read_to_string(path).with_context(|| format!("--merge: reading {}", path.display()))?;
        let more: Vec<EvalResult> = serde_json::from_str(&text)
            .with_context(|| format!("--merge: {} is not a frontier.json", path.display()))?;
        // Every run of every file must share the first run's images: same n, seeds and data.
        let seed = |s: Option<u64>| s.map_or_else(|| "unknown".to_string(), |v| v.to_string());
        if let Some(first) = points.first().or(more.first()) {
            for other in &more {
                let seeds_differ = matches!((first.seed, other.seed), (Some(a), Some(b)) if a != b);
                anyhow::ensure!(
                    first.n == other.n
                        && !seeds_differ
                        && (first.fd_floor - other.fd_floor).abs() <= 1e-9 * first.fd_floor.abs().max(1.0),
                    "--merge: {} has a run with n {}, seed {} and FD floor {:.4}, the first run n {}, seed {} and floor {:.4}; only runs on the same images and data can share a frontier",
                    path.display(),
                    other.n,
                    seed(other.seed),
                    other.fd_floor,
                    first.n,
                    seed(first.seed),
                    first.fd_floor
                );
            }
        }
        // A model name already taken by another file's runs (two models of one name) gets that
        // file's folder, as a single frontier run tells such models apart by directory.
        let taken: Vec<String> = points.iter().map(|p| p.model.clone()).collect();
        let folder = path.parent().map(|p| p.display().to_string()).unwrap_or_default();
        points.extend(more.into_iter().map(|p| {
            if taken.contains(&p.model) {
                EvalResult { model: format!("{} ({folder})", p.model), ..p }
            } else {
                p
            }
        }));
    }
    let Some(first) = points.first() else {
        anyhow::bail!("--merge: the files hold no runs");
    };
    let (fd_floor, n) = (first.fd_floor, first.n);
    write_report(&points, fd_floor, n, out)?;
    println!("{} runs from {} files -> {}/frontier.{{md,csv,json,png}}", points.len(), inputs.len(), out.display());
    Ok(())
}

fn write_report(points: &[EvalResult], fd_floor: f64, n: usize, out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let markdown = to_markdown(points, fd_floor, n);
    std::fs::write(out.join("frontier.md"), &markdown)?;
    std::fs::write(out.join("frontier.csv"), to_csv(points))?;
    std::fs::write(out.join("frontier.json"), serde_json::to_string_pretty(points)?)?;
    let mut names: Vec<String> = Vec::new();
    for p in points {
        if !names.contains(&series_name(p)) {
            names.push(series_name(p));
        }
    }
    let series: Vec<Series> = names
        .iter()
        .map(|name| {
            let mut line: Vec<(f64, f64)> =
                points.iter().filter(|p| &series_name(p) == name).map(|p| (p.gflops_per_image, p.fd_ratio)).collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series::line(name.clone(), line)
        })
        .collect();
    let spec = PlotSpec {
        title: "FD / real-data floor vs network GFLOPs per image",
        x_label: "GFLOPs per image",
        y_label: "FD ratio",
        log_x: true,
        log_y: true,
    };
    line_plot(&out.join("frontier.png"), &spec, &series)?;
    print!("{markdown}");
    Ok(())
}

fn other_evaluations(eval: &EvalResult) -> String {
    if eval.other_evaluations_per_image.is_empty() {
        return "-".into();
    }
    eval.other_evaluations_per_image.iter().map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", ")
}

fn to_markdown(points: &[EvalResult], fd_floor: f64, n: usize) -> String {
    let mut out = format!(
        "{n} images per run, one noise set (image i: label i mod 10, seed i), real-data FD floor {fd_floor:.2}\n\n\
         | model | sampler | steps | NFE (full network) | other evaluations | GFLOPs/image | FD | FD ratio | accuracy | ms/image batched |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    for e in points {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {:.3} | {:.2} | {:.3} | {:.1} % | {:.2} |\n",
            e.model,
            e.sampler,
            e.steps,
            e.nfe_per_image,
            other_evaluations(e),
            e.gflops_per_image,
            e.fd,
            e.fd_ratio,
            100.0 * e.accuracy,
            1000.0 * e.seconds_per_image
        ));
    }
    out
}

fn to_csv(points: &[EvalResult]) -> String {
    let mut out = String::from(
        "model,sampler,steps,nfe_per_image,other_evaluations,gflops_per_image,fd,fd_floor,fd_ratio,accuracy,ms_per_image_batched\n",
    );
    for e in points {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{}\n",
            e.model,
            e.sampler,
            e.steps,
            e.nfe_per_image,
            other_evaluations(e).replace(", ", ";"),
            e.gflops_per_image,
            e.fd,
            e.fd_floor,
            e.fd_ratio,
            e.accuracy,
            1000.0 * e.seconds_per_image
        ));
    }
    out
}
