//! `flowgen bench engine`: where the engine's time goes on this machine. Times the velocity
//! forward (fused CPU kernels and, with `--op-by-op`, candle's op-by-op path), the autoencoder
//! decode, one whole default generation and one training step of the model's recipe; breaks the
//! forward down by stage; and measures this machine's f32 GEMM rate at the same thread count, so
//! the forward's achieved GFLOP/s reads as a fraction of what the hardware does.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use flowgen_engine::candle_core::{DType, Device, Tensor};
use flowgen_engine::models::profile::{self, Stage};
use flowgen_engine::models::sit::{Sit, SitConfig};
use flowgen_engine::samplers::Unobserved;
use flowgen_engine::weights::WeightsFile;
use flowgen_engine::{ImageInputs, ModelConfig, NetworkArch, Pipeline, ScheduleAccess, SettingsRequest};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Args)]
pub struct EngineBenchArgs {
    /// Model directory [default: the shipped default model]; its network must be a SiT.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Images per forward.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 64])]
    batch: Vec<usize>,
    /// Also time one training step of the velocity recipe (forward, backward, clip, AdamW, EMA).
    #[arg(long)]
    train: bool,
    /// Samples per training step.
    #[arg(long, default_value_t = 128)]
    train_batch: usize,
    /// CPU threads for every kernel [default: rayon's, one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Timed repeats per figure, after the warm-up ones.
    #[arg(long, default_value_t = 30)]
    repeats: usize,
    /// Untimed runs before each figure.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Also time (and break down) the op-by-op forward (one candle op or fused op per layer), the
    /// path the fused block kernels replace.
    #[arg(long)]
    op_by_op: bool,
    /// Time the network only: no decode, generation or GEMM-rate figures.
    #[arg(long)]
    network_only: bool,
    /// Time the training step only (implies --train).
    #[arg(long)]
    train_only: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the report as a markdown table here.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// Milliseconds over repeats.
#[derive(Serialize, Clone, Copy)]
pub struct Stats {
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
    pub repeats: usize,
}

impl Stats {
    fn of(mut seconds: Vec<f64>) -> Self {
        seconds.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| seconds.get(((seconds.len() - 1) as f64 * q).round() as usize).copied().unwrap_or(f64::NAN);
        Stats { median_ms: 1e3 * at(0.5), p10_ms: 1e3 * at(0.1), p90_ms: 1e3 * at(0.9), repeats: seconds.len() }
    }
}

#[derive(Serialize)]
struct StageShare {
    stage: &'static str,
    ms: f64,
    share: f64,
}

#[derive(Serialize)]
struct ForwardRow {
    batch: usize,
    /// "fused" (what the engine runs) or "op-by-op" (candle's ops, the fused kernels off).
    path: &'static str,
    forward: Stats,
    ms_per_image: f64,
    gflops_per_s: f64,
    /// Achieved GFLOP/s over the measured GEMM rate (absent with --network-only).
    gemm_fraction: Option<f64>,
    /// Median forward broken down by stage; the last entry is the framework's time between ops.
    stages: Vec<StageShare>,
}

#[derive(Serialize)]
struct BatchRow {
    batch: usize,
    what: String,
    time: Stats,
    ms_per_image: f64,
}

#[derive(Serialize)]
struct TrainRow {
    batch: usize,
    step: Stats,
    samples_per_s: f64,
    /// Median ms of each phase: forward (with the loss), backward, optimizer (clip, AdamW, EMA).
    forward_ms: f64,
    backward_ms: f64,
    optimizer_ms: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    network: SitConfig,
    threads: usize,
    gflops_per_forward_image: f64,
    /// Best f32 GEMM rate of candle's matmul at these threads (square 512 and 1024).
    gemm_gflops_per_s: Option<f64>,
    forward: Vec<ForwardRow>,
    decode: Vec<BatchRow>,
    generate: Vec<BatchRow>,
    train: Option<TrainRow>,
}

/// Time `f` `repeats` times after `warmup` untimed runs.
fn time(warmup: usize, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<Stats> {
    for _ in 0..warmup {
        f()?;
    }
    let mut seconds = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        f()?;
        seconds.push(started.elapsed().as_secs_f64());
    }
    Ok(Stats::of(seconds))
}

/// The SiT network of a model directory, loaded directly (fused and op-by-op share its weights).
fn load_sit(dir: &Path, config: &ModelConfig, device: &Device) -> Result<(Sit, SitConfig)> {
    let NetworkArch::Sit(cfg) = &config.network.arch else {
        bail!("bench engine breaks down SiT networks; {} has a {} network", dir.display(), config.network.arch.kind());
    };
    let rows = cfg.label_rows().max(config.null_label().map_or(0, |n| n as usize + 1));
    let weights = WeightsFile::open(&dir.join(&config.network.weights))?;
    let sit = weights.build(DType::F32, device, |vb| Sit::with_label_rows(cfg, rows, vb))?;
    Ok((sit, cfg.clone()))
}

/// f32 GEMM GFLOP/s of candle's matmul: the best of square sizes 512 and 1024.
fn gemm_rate(device: &Device, repeats: usize) -> Result<f64> {
    let mut best = 0f64;
    for n in [512usize, 1024] {
        let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
        let stats = time(2, repeats.clamp(3, 10), || {
            a.matmul(&b)?;
            Ok(())
        })?;
        best = best.max(2.0 * (n * n * n) as f64 / (stats.median_ms * 1e-3) / 1e9);
    }
    Ok(best)
}

/// The forward's stages over `repeats` profiled runs, in ms per forward, plus the rest.
fn stage_breakdown(repeats: usize, mut forward: impl FnMut() -> Result<()>) -> Result<Vec<StageShare>> {
    profile::set_enabled(true);
    let started = Instant::now();
    let outcome = (0..repeats.max(1)).try_for_each(|_| forward());
    let wall = started.elapsed().as_secs_f64();
    let totals = profile::totals();
    profile::set_enabled(false);
    outcome?;
    let per = |s: f64| 1e3 * s / repeats.max(1) as f64;
    let stage_sum: f64 = totals.stage_s.iter().sum();
    let mut rows: Vec<StageShare> = Stage::ALL
        .iter()
        .zip(totals.stage_s)
        .map(|(stage, s)| {
            // A region's wall time is shared among its stages by their time summed over threads.
            let ms = if stage_sum > 0.0 { per(totals.region_s * s / stage_sum) } else { 0.0 };
            StageShare { stage: stage.name(), ms, share: 0.0 }
        })
        .collect();
    rows.push(StageShare { stage: "framework between ops", ms: per((wall - totals.region_s).max(0.0)), share: 0.0 });
    let total: f64 = rows.iter().map(|r| r.ms).sum();
    rows.iter_mut().for_each(|r| r.share = if total > 0.0 { r.ms / total } else { 0.0 });
    Ok(rows)
}

fn bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

pub fn run(args: EngineBenchArgs) -> Result<()> {
    if let Some(n) = args.threads {
        flowgen_engine::device::set_cpu_threads(n)?;
    }
    anyhow::ensure!(args.batch.iter().all(|&b| b >= 1), "--batch sizes must be at least 1");
    let batches: &[usize] = if args.train_only { &[] } else { &args.batch };
    let train = args.train || args.train_only;
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => super::default_model_dir()?,
    };
    let device = Device::Cpu;
    let config = ModelConfig::load(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let (sit, cfg) = load_sit(&dir, &config, &device).with_context(|| format!("loading {}", dir.display()))?;
    let ops = sit.clone().with_fused_kernels(false);
    let threads = args.threads.unwrap_or_else(flowgen_engine::device::cpu_threads);
    let paths: Vec<(&'static str, &Sit)> =
        if args.op_by_op { vec![("fused", &sit), ("op-by-op", &ops)] } else { vec![("fused", &sit)] };
    // Without an autoencoder there is no decode, and a latent state is no image to generate.
    let pipeline = if args.network_only || args.train_only || config.autoencoder.is_none() {
        None
    } else {
        Some(Pipeline::load(&dir, &device)?)
    };
    let measures_gemm = !(args.network_only || args.train_only);
    let steps = paths.len() * batches.len()
        + usize::from(measures_gemm)
        + if pipeline.is_some() { 2 * batches.len() } else { 0 }
        + usize::from(train);
    let progress = bar(steps as u64);

    let gemm = match measures_gemm {
        true => {
            progress.set_message("GEMM rate");
            let rate = gemm_rate(&device, args.repeats)?;
            progress.inc(1);
            Some(rate)
        }
        false => None,
    };
    let flops = cfg.forward_flops();
    let (c, h, w) = (cfg.in_channels * cfg.in_channels_scale, cfg.input_size, cfg.input_size);
    let mut forward_rows = Vec::new();
    for &batch in batches {
        let x = Tensor::randn(0f32, 1.0, (batch, c, h, w), &device)?;
        let t = Tensor::rand(0f32, 1.0, batch, &device)?;
        let y = Tensor::new((0..batch as u32).map(|i| i % cfg.num_classes as u32).collect::<Vec<_>>(), &device)?;
        for (path, net) in &paths {
            progress.set_message(format!("forward {path}, batch {batch}"));
            let mut forward = || -> Result<()> {
                net.forward(&x, &t, &y)?;
                Ok(())
            };
            let stats = time(args.warmup, args.repeats, &mut forward)?;
            let stages = stage_breakdown(args.repeats, &mut forward)?;
            let gflops = flops * batch as f64 / (stats.median_ms * 1e-3) / 1e9;
            forward_rows.push(ForwardRow {
                batch,
                path,
                forward: stats,
                ms_per_image: stats.median_ms / batch as f64,
                gflops_per_s: gflops,
                gemm_fraction: gemm.map(|g| gflops / g),
                stages,
            });
            progress.inc(1);
        }
    }

    let (mut decode_rows, mut generate_rows) = (Vec::new(), Vec::new());
    if let Some(pipeline) = &pipeline {
        let settings = config.solve_settings(&SettingsRequest::default(), ScheduleAccess::Named)?;
        let what = format!("{} {} steps, guidance {}", settings.sampler.canonical(), settings.steps, settings.guidance);
        for &batch in batches {
            progress.set_message(format!("decode, batch {batch}"));
            let (sc, sh, sw) = config.state_shape();
            let latent = Tensor::randn(0f32, 1.0, (batch, sc, sh, sw), &device)?;
            let stats = time(args.warmup.min(2), args.repeats.min(10), || {
                pipeline.decode(&latent)?;
                Ok(())
            })?;
            decode_rows.push(BatchRow {
                batch,
                what: "autoencoder decode".into(),
                time: stats,
                ms_per_image: stats.median_ms / batch as f64,
            });
            progress.inc(1);
            progress.set_message(format!("generate, batch {batch}"));
            let inputs = ImageInputs::cycle(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], batch, 0);
            let stats = time(1, args.repeats.min(10), || {
                pipeline.generate(&settings, &inputs, &mut Unobserved)?;
                Ok(())
            })?;
            generate_rows.push(BatchRow {
                batch,
                what: what.clone(),
                time: stats,
                ms_per_image: stats.median_ms / batch as f64,
            });
            progress.inc(1);
        }
    }

    let train = if train {
        progress.set_message(format!("training step, batch {}", args.train_batch));
        let mut step = flowgen_train::velocity::RecipeStep::new(&cfg, args.train_batch, &device)?;
        let mut phases = Vec::new();
        let stats = time(args.warmup.min(3), args.repeats.min(20), || {
            phases.push(step.run()?);
            Ok(())
        })?;
        let timed = &phases[phases.len().saturating_sub(stats.repeats)..];
        let phase =
            |f: fn(&flowgen_train::velocity::StepTimes) -> f64| Stats::of(timed.iter().map(f).collect()).median_ms;
        progress.inc(1);
        Some(TrainRow {
            batch: args.train_batch,
            step: stats,
            samples_per_s: args.train_batch as f64 / (stats.median_ms * 1e-3),
            forward_ms: phase(|p| p.forward_s),
            backward_ms: phase(|p| p.backward_s),
            optimizer_ms: phase(|p| p.optimizer_s),
        })
    } else {
        None
    };
    progress.finish_and_clear();

    let report = Report {
        model: format!("{} ({})", config.name, dir.display()),
        network: cfg,
        threads,
        gflops_per_forward_image: flops / 1e9,
        gemm_gflops_per_s: gemm,
        forward: forward_rows,
        decode: decode_rows,
        generate: generate_rows,
        train,
    };
    let markdown = to_markdown(&report);
    print!("{markdown}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn to_markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let n = &r.network;
    let _ = writeln!(
        s,
        "## bench engine: {}\n\nSiT hidden {}, depth {}, {} heads, {} tokens; {:.4} GFLOPs per image; {} threads{}\n",
        r.model,
        n.hidden_size,
        n.depth,
        n.num_heads,
        n.num_tokens(),
        r.gflops_per_forward_image,
        r.threads,
        r.gemm_gflops_per_s.map(|g| format!("; f32 GEMM {g:.1} GFLOP/s")).unwrap_or_default()
    );
    let _ = writeln!(s, "| forward | batch | median ms (p10-p90) | ms/image | GFLOP/s | of GEMM rate |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for f in &r.forward {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} ({:.3}-{:.3}) | {:.3} | {:.1} | {} |",
            f.path,
            f.batch,
            f.forward.median_ms,
            f.forward.p10_ms,
            f.forward.p90_ms,
            f.ms_per_image,
            f.gflops_per_s,
            f.gemm_fraction.map(|g| format!("{:.0}%", 100.0 * g)).unwrap_or_else(|| "-".into())
        );
    }
    let _ = writeln!(s, "\nForward by stage, ms per forward (share):\n");
    let stage_names: Vec<&str> =
        r.forward.first().map(|f| f.stages.iter().map(|x| x.stage).collect()).unwrap_or_default();
    let _ = writeln!(s, "| forward | batch | {} |", stage_names.join(" | "));
    let _ = writeln!(s, "|---|---|{}", "---|".repeat(stage_names.len()));
    for f in &r.forward {
        let cells: Vec<String> = f.stages.iter().map(|x| format!("{:.3} ({:.0}%)", x.ms, 100.0 * x.share)).collect();
        let _ = writeln!(s, "| {} | {} | {} |", f.path, f.batch, cells.join(" | "));
    }
    if !r.decode.is_empty() || !r.generate.is_empty() {
        let _ = writeln!(s, "\n| what | batch | median ms (p10-p90) | ms/image |");
        let _ = writeln!(s, "|---|---|---|---|");
        for row in r.decode.iter().chain(&r.generate) {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} ({:.2}-{:.2}) | {:.3} |",
                row.what, row.batch, row.time.median_ms, row.time.p10_ms, row.time.p90_ms, row.ms_per_image
            );
        }
    }
    if let Some(t) = &r.train {
        let _ = writeln!(
            s,
            "\nTraining step, batch {}: {:.1} ms ({:.1}-{:.1}), {:.0} samples/s; forward {:.1} ms, backward {:.1} ms, \
             clip + AdamW + EMA {:.1} ms (medians)",
            t.batch,
            t.step.median_ms,
            t.step.p10_ms,
            t.step.p90_ms,
            t.samples_per_s,
            t.forward_ms,
            t.backward_ms,
            t.optimizer_ms
        );
    }
    s
}
