use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use flowgen_engine::image::{generation_metadata, Image};
use flowgen_engine::samplers::Dopri5Options;
use flowgen_engine::{device::parse_device, EngineHandle, GenerationRequest, Pipeline, Sampler, ScheduleSpec};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (model.toml + weights); defaults to the shipped default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Class label: an index, a name ("seven"), a range "0-9" or a list "1,4,7"; repeatable.
    /// Labels cycle over the n images.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Number of images [default: the number of labels given, else 16].
    #[arg(long)]
    n: Option<usize>,
    /// Seed of image 0; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampler [default: from model.toml]. One of euler, midpoint, heun, rk4, pseudo-corrector, dopri5.
    #[arg(long)]
    sampler: Option<String>,
    /// Steps of a fixed-step sampler [default: from model.toml].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 disables it [default: from model.toml].
    #[arg(long)]
    guidance: Option<f64>,
    /// Apply guidance only for s in [LO, HI] (0 noise, 1 data) [default: from model.toml].
    #[arg(long, value_name = "LO,HI", value_parser = super::parse_interval)]
    guidance_interval: Option<(f64, f64)>,
    /// uniform, shift:X (SD3 time shift), or a file of s values from 0 to 1 [default: from model.toml].
    #[arg(long)]
    schedule: Option<String>,
    /// Relative tolerance of dopri5.
    #[arg(long, default_value_t = 1e-5)]
    rtol: f64,
    /// Absolute tolerance of dopri5.
    #[arg(long, default_value_t = 1e-5)]
    atol: f64,
    /// Evaluations one image may use under dopri5 before the run fails.
    #[arg(long, default_value_t = 2000)]
    max_nfe: usize,
    /// Images per engine batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Output directory.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Serialize)]
struct ManifestEntry {
    file: String,
    label: u32,
    seed: u64,
    sampler: String,
    steps: usize,
    nfe: usize,
    guidance: f64,
    guidance_interval: (f64, f64),
    schedule: String,
}

#[derive(Serialize)]
struct Manifest {
    model: String,
    images: Vec<ManifestEntry>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => super::default_model_dir()?,
    };
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = parse_device(&args.device)?;
    let pipeline =
        Pipeline::load(&model_dir, &device).with_context(|| format!("loading model {}", model_dir.display()))?;
    let cfg = pipeline.config().clone();

    let mut labels = Vec::new();
    for spec in &args.labels {
        labels.extend(cfg.parse_labels(spec).with_context(|| format!("--label {spec}"))?);
    }
    let n = args.n.unwrap_or(if labels.is_empty() { 16 } else { labels.len() });
    if n == 0 {
        bail!("--n must be at least 1");
    }
    if labels.is_empty() {
        labels = (0..cfg.network.sit.num_classes as u32).collect();
    }
    let labels: Vec<u32> = labels.iter().cycle().take(n).copied().collect();
    let seeds: Vec<u64> = (0..n as u64).map(|i| args.seed.wrapping_add(i)).collect();

    let sampler_name = args.sampler.clone().unwrap_or_else(|| cfg.defaults.sampler.clone());
    let mut sampler = Sampler::parse(&sampler_name).context("--sampler")?;
    if let Sampler::Dopri5(_) = sampler {
        sampler = Sampler::Dopri5(Dopri5Options { rtol: args.rtol, atol: args.atol, max_nfe: args.max_nfe });
    }
    let schedule_text = args.schedule.clone().unwrap_or_else(|| cfg.defaults.schedule.clone());
    let schedule = ScheduleSpec::parse(&schedule_text).context("--schedule")?;
    let steps = match (args.steps, &schedule) {
        (Some(k), _) => k,
        (None, ScheduleSpec::Explicit(points)) => points.len() - 1,
        (None, _) => cfg.defaults.steps,
    };
    let guidance = args.guidance.unwrap_or(cfg.defaults.guidance);
    let guidance_interval = args.guidance_interval.unwrap_or(cfg.guidance.interval);

    let template = GenerationRequest {
        labels: Vec::new(),
        seeds: Vec::new(),
        sampler,
        steps,
        schedule,
        guidance,
        guidance_interval,
    };
    // Fail on bad options before any image is made.
    pipeline
        .validate(&GenerationRequest { labels: labels[..1].to_vec(), seeds: seeds[..1].to_vec(), ..template.clone() })
        .context("invalid generation options")?;

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let chunks: Vec<(usize, usize)> =
        (0..n).step_by(args.batch_size).map(|start| (start, (start + args.batch_size).min(n))).collect();
    // Progress in sampler steps for fixed-step solvers, in thousandths of s for adaptive ones.
    let units_per_chunk =
        if template.sampler.is_adaptive() { 1000 } else { template.schedule.build(steps)?.steps() as u64 };
    let bar = ProgressBar::new(units_per_chunk * chunks.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let engine = EngineHandle::spawn(pipeline, 2)?;

    let started = Instant::now();
    let mut manifest = Manifest { model: cfg.name.clone(), images: Vec::with_capacity(n) };
    let mut all_images: Vec<Image> = Vec::with_capacity(n);
    let mut total_nfe = 0usize;
    // Submit every chunk up front so the engine never waits on PNG writing.
    let chunk_count = chunks.len();
    let mut pending = Vec::new();
    for (chunk_index, &(start, end)) in chunks.iter().enumerate() {
        let request = GenerationRequest {
            labels: labels[start..end].to_vec(),
            seeds: seeds[start..end].to_vec(),
            ..template.clone()
        };
        let progress_bar = bar.clone();
        let adaptive = template.sampler.is_adaptive();
        let base = chunk_index as u64 * units_per_chunk;
        let progress = Box::new(move |r: &flowgen_engine::StepReport| {
            let done = if adaptive { (r.s * 1000.0) as u64 } else { r.step as u64 };
            progress_bar.set_position(base + done);
            progress_bar.set_message(format!("batch {}/{} nfe {}", chunk_index + 1, chunk_count, r.nfe));
            ControlFlow::Continue(())
        });
        pending.push((start, request.clone(), engine.submit(request, progress)?));
    }
    for (start, request, reply) in pending {
        let generation = reply
            .recv()
            .context("engine stopped")?
            .with_context(|| format!("generating images {start}..{}", start + request.labels.len()))?;
        let stats = &generation.stats;
        for (j, image) in generation.images.iter().enumerate() {
            let i = start + j;
            let file = format!("{i:03}.png");
            let png = image.to_png(&generation_metadata(&cfg.name, &request, stats, j))?;
            std::fs::write(args.out.join(&file), png).with_context(|| format!("writing {file}"))?;
            let nfe = stats.per_sample_nfe.get(j).copied().unwrap_or(stats.nfe);
            total_nfe += nfe;
            manifest.images.push(ManifestEntry {
                file,
                label: request.labels[j],
                seed: request.seeds[j],
                sampler: request.sampler.name().to_string(),
                steps: if request.sampler.is_adaptive() { stats.steps } else { steps },
                nfe,
                guidance,
                guidance_interval,
                schedule: request.schedule.to_string(),
            });
        }
        all_images.extend(generation.images);
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let grid = Image::grid(&all_images)?;
    std::fs::write(args.out.join("grid.png"), grid.to_png(&[("Software", "flowgen".into())])?)
        .context("writing grid.png")?;
    let manifest_json = serde_json::to_string_pretty(&manifest)?;
    std::fs::write(args.out.join("manifest.json"), manifest_json).context("writing manifest.json")?;
    println!(
        "generated {n} images with {} in {seconds:.2} s ({:.2} images/s, {:.1} NFE/image) -> {}",
        template.sampler.name(),
        n as f64 / seconds,
        total_nfe as f64 / n as f64,
        args.out.display()
    );
    Ok(())
}
