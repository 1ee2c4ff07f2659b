//! `flowgen bench serve`: drive a real server with concurrent clients and compare its delivered
//! images per second with the raw engine's, measured in the same run on the same model.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use flowgen_engine::{
    device::parse_device, EngineHandle, GenerationRequest, ImageInputs, Pipeline, ScheduleAccess, SettingsRequest,
};
use flowgen_server::{Engine, Models, Overrides, ServerConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Load-test `flowgen serve` in-process against the raw engine throughput.
    Serve(ServeBenchArgs),
    /// Quality, cost and speed of every sampler at equal network-evaluation budgets.
    Samplers(super::bench_samplers::SamplersBenchArgs),
    /// FD against network GFLOPs per image across models and samplers (e.g. blockwise vs SiT).
    Frontier(super::bench_frontier::FrontierBenchArgs),
    /// Per-step cost of each sampler beyond its network forwards (guidance mix, update, set-up).
    Steps(super::bench_steps::StepsBenchArgs),
    /// Where the engine's time goes: forward by stage, decode, generation, a training step, GEMM rate.
    Engine(super::bench_engine::EngineBenchArgs),
}

#[derive(Args)]
pub struct ServeBenchArgs {
    /// Model directory [default: the shipped default model].
    #[arg(long)]
    pub(super) model: Option<PathBuf>,
    /// Concurrent clients, each submitting, following SSE to the end, then fetching its PNGs.
    #[arg(long, default_value_t = 16)]
    pub(super) clients: usize,
    /// Jobs in total.
    #[arg(long, default_value_t = 64)]
    pub(super) jobs: usize,
    /// Images per job.
    #[arg(long, default_value_t = 2)]
    pub(super) n: usize,
    /// Sampler of every job.
    #[arg(long, default_value = "euler")]
    pub(super) sampler: String,
    /// Steps of every job.
    #[arg(long, default_value_t = 8)]
    pub(super) steps: usize,
    /// The server's batcher limit, in images (the raw engine runs batches of this size too).
    #[arg(long, default_value_t = 32)]
    pub(super) max_batch: usize,
    /// How long the batcher waits for compatible jobs to fill a batch.
    #[arg(long, default_value_t = 20)]
    pub(super) max_wait_ms: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub(super) device: String,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
    /// Also run the load against real processes: one API and each of these numbers of workers
    /// (e.g. 1,2) sharing a private redis-server (Debian's redis-server must be installed).
    #[arg(long, value_delimiter = ',')]
    pub(super) workers: Vec<usize>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    sampler: String,
    steps: usize,
    clients: usize,
    jobs: usize,
    images_per_job: usize,
    max_batch: usize,
    raw_engine_images_per_s: f64,
    raw_before_images_per_s: f64,
    raw_after_images_per_s: f64,
    server_images_per_s: f64,
    ratio: f64,
    latency_p50_s: f64,
    latency_p90_s: f64,
    latency_p99_s: f64,
    latency_max_s: f64,
    /// One image download each, measured while other jobs run and commit.
    image_get_p50_ms: f64,
    image_get_p99_ms: f64,
    /// One single-image job at a time: submit to succeeded (SSE), less the engine's own time.
    queue_overhead_p50_ms: f64,
    queue_overhead_p90_ms: f64,
    succeeded: usize,
    failed: usize,
    lost: usize,
    wall_s: f64,
    /// `--workers`: the same load through Redis, one API and N worker processes.
    scale_out: Vec<super::bench_scale::ScaleOutRow>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Serve(args) => serve(args),
        BenchCommand::Samplers(args) => super::bench_samplers::run(args),
        BenchCommand::Frontier(args) => super::bench_frontier::run(args),
        BenchCommand::Steps(args) => super::bench_steps::run(args),
        BenchCommand::Engine(args) => super::bench_engine::run(args),
    }
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// What the client threads collected.
#[derive(Default)]
pub(super) struct ClientResults {
    pub(super) latencies: Vec<f64>,
    pub(super) image_gets: Vec<f64>,
    pub(super) failures: Vec<String>,
    pub(super) ids: Vec<String>,
}

fn serve(args: ServeBenchArgs) -> Result<()> {
    if args.clients == 0 || args.jobs == 0 || args.n == 0 || args.n > args.max_batch {
        bail!("--clients, --jobs and --n must be at least 1, and --n at most --max-batch");
    }
    let model_dir = match &args.model {
        Some(d) => d.clone(),
        None => super::default_model_dir()?,
    };
    let device = parse_device(&args.device)?;
    let pipeline = Pipeline::load(&model_dir, &device).with_context(|| format!("loading {}", model_dir.display()))?;
    let cfg = pipeline.config().clone();
    // The same settings a server job with this sampler and these steps gets.
    let wanted = SettingsRequest {
        sampler: Some(args.sampler.clone()),
        steps: Some(args.steps),
        schedule: Some("uniform".into()),
        ..Default::default()
    };
    let settings = cfg.solve_settings(&wanted, ScheduleAccess::Named).context("--sampler/--steps")?;
    let engine: Arc<dyn Engine> = Arc::new(EngineHandle::spawn(pipeline, 2)?);
    let classes = cfg.num_classes() as u32;
    let total_images = args.jobs * args.n;
    let request = |start: usize, count: usize| GenerationRequest {
        settings: settings.clone(),
        inputs: ImageInputs {
            labels: (start..start + count).map(|i| i as u32 % classes).collect(),
            seeds: (start..start + count).map(|i| i as u64).collect(),
        },
    };
    let nothing = || Box::new(|_: &flowgen_engine::StepReport| std::ops::ControlFlow::Continue(()));
    engine.generate(request(0, args.max_batch.min(total_images)), nothing()).context("warm-up")?;
    // Raw throughput is measured before and after the server run and averaged, so drift in the
    // machine's load (thermal, other processes) does not favour either side.
    let raw_run = || -> Result<f64> {
        let clock = Instant::now();
        let mut done = 0;
        while done < total_images {
            let count = args.max_batch.min(total_images - done);
            engine.generate(request(done, count), nothing()).context("raw engine run")?;
            done += count;
        }
        Ok(total_images as f64 / clock.elapsed().as_secs_f64())
    };
    eprintln!("raw engine: {total_images} images in batches of {}", args.max_batch);
    let raw_before = raw_run()?;
    eprintln!("raw engine: {raw_before:.1} images/s");
    let data_dir = tempfile::tempdir().context("temporary data directory")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (base, shutdown) = start_server(&runtime, &args, &model_dir, data_dir.path(), engine.clone())?;
    let clock = Instant::now();
    let results = drive_clients(&args, &base, classes);
    let wall = clock.elapsed().as_secs_f64();
    let succeeded = count_succeeded(&base, &results.ids)?;
    let overhead = super::bench_scale::queue_overhead(&base, &args, 20)?;
    let _ = shutdown.send(());
    let raw_after = raw_run()?;
    eprintln!("raw engine again: {raw_after:.1} images/s");
    let mut report = summarise(&args, &cfg.name, (raw_before, raw_after), results, (succeeded, wall));
    report.queue_overhead_p50_ms = percentile(&overhead, 50.0);
    report.queue_overhead_p90_ms = percentile(&overhead, 90.0);
    if !args.workers.is_empty() {
        // The in-process engine stays loaded but idle: each worker process loads its own.
        report.scale_out =
            super::bench_scale::run(&args, &args.workers, &model_dir, classes, report.raw_engine_images_per_s)?;
    }
    print_report(&report);
    super::bench_scale::print(&report.scale_out);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    let failed = report.failed + report.scale_out.iter().map(|r| r.failed).sum::<usize>();
    let lost = report.lost + report.scale_out.iter().map(|r| r.lost).sum::<usize>();
    if failed > 0 || lost > 0 {
        bail!("{failed} jobs failed and {lost} were lost");
    }
    Ok(())
}

/// The real server on a free loopback port, in `runtime`; its base URL and a shutdown trigger.
fn start_server(
    runtime: &tokio::runtime::Runtime,
    args: &ServeBenchArgs,
    model_dir: &std::path::Path,
    data_dir: &std::path::Path,
    engine: Arc<dyn Engine>,
) -> Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.to_path_buf()),
        models: vec![model_dir.to_path_buf()],
        ..Default::default()
    };
    let mut config = ServerConfig::load(None, &overrides)?;
    config.queue.max_batch = args.max_batch;
    config.queue.max_wait_ms = args.max_wait_ms;
    config.queue.capacity = args.jobs.max(config.queue.capacity);
    config.limits.max_n = args.n.max(config.limits.max_n).min(args.max_batch);
    config.limits.max_steps = config.limits.max_steps.max(args.steps);
    config.validate()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = flowgen_server::start(config, Models::new(vec![engine])).await?;
        while !state.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(flowgen_server::serve(listener, state, async move {
            let _ = rx.await;
        }));
        anyhow::Ok((format!("http://{addr}"), tx))
    })
}

/// `args.clients` threads submitting jobs until `args.jobs` are done, each following its job's
/// SSE stream to the end and fetching its images.
pub(super) fn drive_clients(args: &ServeBenchArgs, base: &str, classes: u32) -> ClientResults {
    let bar = ProgressBar::new(args.jobs as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} jobs {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let next = AtomicUsize::new(0);
    let results = Mutex::new(ClientResults::default());
    let agent: ureq::Agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).build();
    std::thread::scope(|scope| {
        for _ in 0..args.clients {
            let (next, results, agent, bar) = (&next, &results, agent.clone(), bar.clone());
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= args.jobs {
                    break;
                }
                let started = Instant::now();
                let body = serde_json::json!({
                    "labels": [i as u32 % classes], "n": args.n, "seed": (i * args.n) as u64,
                    "sampler": args.sampler, "steps": args.steps,
                });
                let outcome = one_job(&agent, base, &body, args.n);
                if let Ok(mut r) = results.lock() {
                    match outcome {
                        Ok((id, gets)) => {
                            r.ids.push(id);
                            r.image_gets.extend(gets);
                            r.latencies.push(started.elapsed().as_secs_f64());
                        }
                        Err(e) => r.failures.push(format!("job {i}: {e:#}")),
                    }
                }
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    results.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Every accepted job must have succeeded, as the server itself reports.
pub(super) fn count_succeeded(base: &str, ids: &[String]) -> Result<usize> {
    let agent: ureq::Agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).build();
    let mut succeeded = 0;
    for id in ids {
        let view: serde_json::Value = agent.get(&format!("{base}/v1/generations/{id}")).call()?.into_json()?;
        if view["status"] == "succeeded" {
            succeeded += 1;
        }
    }
    Ok(succeeded)
}

fn summarise(
    args: &ServeBenchArgs,
    model: &str,
    (raw_before, raw_after): (f64, f64),
    results: ClientResults,
    (succeeded, wall): (usize, f64),
) -> Report {
    let raw_rate = 0.5 * (raw_before + raw_after);
    for f in results.failures.iter().take(5) {
        eprintln!("failure: {f}");
    }
    let mut lat = results.latencies;
    lat.sort_by(f64::total_cmp);
    let server_rate = (succeeded * args.n) as f64 / wall;
    let mut gets = results.image_gets;
    gets.sort_by(f64::total_cmp);
    Report {
        model: model.to_string(),
        sampler: args.sampler.clone(),
        steps: args.steps,
        clients: args.clients,
        jobs: args.jobs,
        images_per_job: args.n,
        max_batch: args.max_batch,
        raw_engine_images_per_s: raw_rate,
        raw_before_images_per_s: raw_before,
        raw_after_images_per_s: raw_after,
        server_images_per_s: server_rate,
        ratio: server_rate / raw_rate,
        latency_p50_s: percentile(&lat, 50.0),
        latency_p90_s: percentile(&lat, 90.0),
        latency_p99_s: percentile(&lat, 99.0),
        latency_max_s: lat.last().copied().unwrap_or(f64::NAN),
        image_get_p50_ms: 1000.0 * percentile(&gets, 50.0),
        image_get_p99_ms: 1000.0 * percentile(&gets, 99.0),
        queue_overhead_p50_ms: f64::NAN,
        queue_overhead_p90_ms: f64::NAN,
        succeeded,
        failed: results.failures.len(),
        lost: args.jobs - succeeded - results.failures.len(),
        wall_s: wall,
        scale_out: Vec::new(),
    }
}

fn print_report(report: &Report) {
    println!("| metric | value |\n|---|---|");
    println!("| model / sampler / steps | {} / {} / {} |", report.model, report.sampler, report.steps);
    println!("| clients x jobs x images | {} x {} x {} |", report.clients, report.jobs, report.images_per_job);
    println!(
        "| raw engine images/s (batch {}; before / after) | {:.2} ({:.2} / {:.2}) |",
        report.max_batch, report.raw_engine_images_per_s, report.raw_before_images_per_s, report.raw_after_images_per_s
    );
    println!("| server images/s | {:.2} |", report.server_images_per_s);
    println!("| server / raw | {:.3} |", report.ratio);
    println!(
        "| latency p50 / p90 / p99 / max (s) | {:.3} / {:.3} / {:.3} / {:.3} |",
        report.latency_p50_s, report.latency_p90_s, report.latency_p99_s, report.latency_max_s
    );
    println!("| image GET p50 / p99 (ms) | {:.2} / {:.2} |", report.image_get_p50_ms, report.image_get_p99_ms);
    println!(
        "| queue overhead p50 / p90 (ms; one 1-image job at a time, less inference) | {:.1} / {:.1} |",
        report.queue_overhead_p50_ms, report.queue_overhead_p90_ms
    );
    println!("| succeeded / failed / lost | {} / {} / {} |", report.succeeded, report.failed, report.lost);
}

/// Submit, follow the SSE stream to the final event, fetch every PNG; returns the job id and the
/// seconds each image download took.
fn one_job(agent: &ureq::Agent, base: &str, body: &serde_json::Value, n: usize) -> Result<(String, Vec<f64>)> {
    let created: serde_json::Value =
        agent.post(&format!("{base}/v1/generations")).send_json(body.clone())?.into_json()?;
    let id = created["id"].as_str().context("no id in the 202 response")?.to_string();
    let events = agent.get(&format!("{base}/v1/generations/{id}/events")).call()?;
    let mut last_event = String::new();
    for line in BufReader::new(events.into_reader()).lines() {
        let line = line?;
        if let Some(name) = line.strip_prefix("event:") {
            last_event = name.trim().to_string();
            if matches!(last_event.as_str(), "succeeded" | "failed" | "cancelled") {
                break;
            }
        }
    }
    if last_event != "succeeded" {
        bail!("job {id} ended with {last_event:?}");
    }
    let mut gets = Vec::with_capacity(n);
    for i in 0..n {
        let mut png = Vec::new();
        let started = Instant::now();
        agent.get(&format!("{base}/v1/generations/{id}/images/{i}")).call()?.into_reader().read_to_end(&mut png)?;
        gets.push(started.elapsed().as_secs_f64());
        if !png.starts_with(b"\x89PNG") {
            bail!("image {i} of {id} is not a PNG");
        }
    }
    Ok((id, gets))
}
