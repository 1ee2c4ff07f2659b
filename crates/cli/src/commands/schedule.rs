//! `flowgen schedule boss`: Bellman optimal Euler step sizes (BOSS phase 1), stored in the model
//! directory as named schedules (`schedules/boss-K.json`) that every command and the server use
//! by name.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use flowgen_engine::config::{check_asset_name, SCHEDULES_DIR};
use flowgen_engine::device::parse_device;
use flowgen_engine::{Pipeline, ScheduleAccess, SettingsRequest};
use flowgen_train::boss::{bellman_path, cost_matrix, path_times, uniform_path, CostSetup};
use flowgen_train::plot::{line_plot, PlotSpec, Series};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Search Bellman optimal Euler schedules for NFE budgets and store them in the model.
    Boss(BossArgs),
}

#[derive(Args)]
pub struct BossArgs {
    /// Model directory; the schedules are written to its schedules/ folder.
    #[arg(long)]
    model: PathBuf,
    /// Euler step budgets, one schedule each (boss-K).
    #[arg(long, value_delimiter = ',', default_value = "2,4,6,8")]
    nfe: Vec<usize>,
    /// Uniform Euler steps of the reference trajectories (anchor grid of K_MAX + 1 times).
    #[arg(long, default_value_t = 100)]
    kmax: usize,
    /// Reference trajectories averaged into the cost matrix.
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// Seed of trajectory 0 (trajectory i uses seed + i and label i mod classes).
    #[arg(long, default_value_t = 1_000_000)]
    seed: u64,
    /// Guidance scale of the reference [default: what the model is served with].
    #[arg(long)]
    guidance: Option<f64>,
    /// Name prefix of the stored schedules: PREFIX-K.
    #[arg(long, default_value = "boss")]
    prefix: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(cmd: ScheduleCommand) -> Result<()> {
    match cmd {
        ScheduleCommand::Boss(args) => boss(args),
    }
}

fn boss(args: BossArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let pipeline = Pipeline::load(&args.model, &device).with_context(|| format!("loading {}", args.model.display()))?;
    let cfg = pipeline.config();
    // The guidance the model is served with (its defaults), unless overridden.
    let served = SettingsRequest {
        guidance: args.guidance,
        sampler: Some("euler".into()),
        schedule: Some("uniform".into()),
        ..Default::default()
    };
    let served = cfg.solve_settings(&served, ScheduleAccess::Named).context("--guidance")?;
    let guidance = pipeline.guidance(served.guidance, served.guidance_interval);
    for &k in &args.nfe {
        check_asset_name(&format!("{}-{k}", args.prefix)).map_err(anyhow::Error::msg).context("--prefix")?;
        anyhow::ensure!(k >= 1 && k <= args.kmax, "--nfe {k}: each budget must be between 1 and --kmax {}", args.kmax);
    }
    let setup = CostSetup { k_max: args.kmax, n: args.n, seed: args.seed, guidance, batch: 100 };
    let bar = ProgressBar::new(args.kmax as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} reference steps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let cost = cost_matrix(&pipeline, &setup, &mut |step| bar.set_position(step as u64))?;
    bar.finish_and_clear();
    let search_seconds = started.elapsed().as_secs_f64();

    let dir = args.model.join(SCHEDULES_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut series = Vec::new();
    println!("| schedule | s values | one-jump error | uniform's |\n|---|---|---|---|");
    for &k in &args.nfe {
        let path = bellman_path(&cost, k)?;
        let times = path_times(&path, args.kmax);
        let name = format!("{}-{k}", args.prefix);
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, serde_json::to_string(&times)?).with_context(|| format!("writing {}", file.display()))?;
        let uniform = uniform_path(k, args.kmax).map_or("-".to_string(), |p| format!("{:.4}", cost.path_cost(&p)));
        let shown: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
        println!("| {name} | {} | {:.4} | {uniform} |", shown.join(", "), cost.path_cost(&path));
        // Step size against the time it starts from: small at both ends, large in between.
        let steps = times.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
        series.push(Series::line(name.clone(), steps));
    }
    let plot = dir.join(format!("{}.png", args.prefix));
    let spec = PlotSpec {
        title: "Bellman optimal Euler step sizes",
        x_label: "s (0 noise, 1 data)",
        y_label: "step size",
        log_x: false,
        log_y: false,
    };
    line_plot(&plot, &spec, &series)?;
    println!(
        "cost matrix from {} trajectories of {} Euler steps (guidance {}) in {search_seconds:.1} s; schedules and {} written to {}",
        args.n,
        args.kmax,
        served.guidance,
        plot.file_name().and_then(|f| f.to_str()).unwrap_or("the plot"),
        dir.display()
    );
    Ok(())
}
