use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use flowgen_engine::image::{generation_metadata, Image, OutputFormat};
use flowgen_engine::samplers::{Dopri5Options, MAIN_NETWORK};
use flowgen_engine::{
    device::parse_device, EngineHandle, Generation, GenerationRequest, ImageInputs, ModelConfig, Pipeline, Sampler,
    ScheduleAccess, SettingsRequest, SolveSettings,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;

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
    /// Sampler plan [default: from model.toml]: euler, midpoint, heun, rk4, pseudo-corrector, or
    /// dopri5[:rtol=R,atol=A,max_nfe=M].
    #[arg(long)]
    sampler: Option<String>,
    /// A preset stored in the model's model.toml ([presets.NAME]); other flags override its fields.
    #[arg(long)]
    preset: Option<String>,
    /// Steps of a fixed-step sampler [default: from model.toml].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 disables it [default: from model.toml].
    #[arg(long)]
    guidance: Option<f64>,
    /// Apply guidance only for s in [LO, HI] (0 noise, 1 data) [default: from model.toml].
    #[arg(long, value_name = "LO,HI", value_parser = super::parse_interval)]
    guidance_interval: Option<(f64, f64)>,
    /// uniform, shift:X (SD3 time shift), a list "0,0.4,1", a schedule the model stores (its
    /// schedules/NAME.json), or a file of s values from 0 to 1 [default: from model.toml].
    #[arg(long)]
    schedule: Option<String>,
    /// Relative tolerance of dopri5 (same as dopri5:rtol=R).
    #[arg(long)]
    rtol: Option<f64>,
    /// Absolute tolerance of dopri5 (same as dopri5:atol=A).
    #[arg(long)]
    atol: Option<f64>,
    /// Evaluations one image may use under dopri5 before it fails (same as dopri5:max_nfe=M).
    #[arg(long)]
    max_nfe: Option<usize>,
    /// Image format: png (settings in tEXt chunks), jpeg or webp (settings in XMP).
    #[arg(long, default_value = "png")]
    format: String,
    /// JPEG quality, 1-100 [default: 90].
    #[arg(long)]
    quality: Option<u8>,
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
    format: &'static str,
    label: u32,
    seed: u64,
    /// Canonical sampler plan: `flowgen generate --sampler` takes it back.
    sampler: String,
    steps: usize,
    /// Main-network evaluations of this image.
    nfe: usize,
    /// Batched evaluations of every network of its batch, by network.
    evaluations: BTreeMap<String, usize>,
    /// Network GFLOPs this image cost (every network's forwards; two per guided evaluation).
    gflops: f64,
    guidance: f64,
    guidance_interval: (f64, f64),
    schedule: String,
}

#[derive(Serialize)]
struct Manifest {
    model: String,
    images: Vec<ManifestEntry>,
}

/// The solve settings of this run: flags over the preset over model.toml's defaults.
fn solve_settings(args: &GenerateArgs, cfg: &ModelConfig) -> Result<SolveSettings> {
    let request = SettingsRequest {
        preset: args.preset.clone(),
        sampler: args.sampler.clone(),
        steps: args.steps,
        schedule: args.schedule.clone(),
        guidance: args.guidance,
        guidance_interval: args.guidance_interval,
    };
    let mut settings =
        cfg.solve_settings(&request, ScheduleAccess::NamedAndFiles).context("invalid generation options")?;
    let tolerances = (args.rtol, args.atol, args.max_nfe);
    match &mut settings.sampler {
        Sampler::Dopri5(opts) => {
            *opts = Dopri5Options {
                rtol: args.rtol.unwrap_or(opts.rtol),
                atol: args.atol.unwrap_or(opts.atol),
                max_nfe: args.max_nfe.unwrap_or(opts.max_nfe),
            };
            opts.validate().context("invalid generation options")?;
        }
        other if tolerances != (None, None, None) => {
            bail!("--rtol, --atol and --max-nfe apply to dopri5 only, not {}", other.name())
        }
        _ => {}
    }
    Ok(settings)
}

/// Labels and seeds of the n images.
fn image_inputs(args: &GenerateArgs, cfg: &ModelConfig) -> Result<ImageInputs> {
    let mut labels = Vec::new();
    for spec in &args.labels {
        labels.extend(cfg.parse_labels(spec).with_context(|| format!("--label {spec}"))?);
    }
    let n = args.n.unwrap_or(if labels.is_empty() { 16 } else { labels.len() });
    if n == 0 {
        bail!("--n must be at least 1");
    }
    if labels.is_empty() {
        labels = (0..cfg.num_classes() as u32).collect();
    }
    Ok(ImageInputs::cycle(&labels, n, args.seed))
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Write one chunk's images and add their manifest entries.
fn write_chunk(
    (args, format): (&GenerateArgs, OutputFormat),
    model: &ModelConfig,
    (start, request): (usize, &GenerationRequest),
    generation: &Generation,
    manifest: &mut Manifest,
) -> Result<()> {
    let GenerationRequest { settings, inputs } = request;
    let stats = &generation.stats;
    for (j, image) in generation.images.iter().enumerate() {
        let file = format!("{:03}.{}", start + j, format.extension());
        let bytes = image.encode(format, &generation_metadata(&model.name, settings, inputs, stats, j))?;
        let mut own = stats.evaluations.clone();
        own.insert(MAIN_NETWORK.to_string(), stats.sample_nfe(j));
        let guided = settings.guidance != 1.0 && model.null_label().is_some();
        std::fs::write(args.out.join(&file), bytes).with_context(|| format!("writing {file}"))?;
        manifest.images.push(ManifestEntry {
            file,
            format: format.name(),
            label: inputs.labels[j],
            seed: inputs.seeds[j],
            sampler: settings.sampler.canonical(),
            steps: if settings.sampler.is_adaptive() { stats.steps } else { settings.steps },
            nfe: stats.sample_nfe(j),
            evaluations: stats.evaluations.clone(),
            gflops: model.solve_flops(own.iter().map(|(k, &n)| (k.as_str(), n as f64)), guided) / 1e9,
            guidance: settings.guidance,
            guidance_interval: settings.guidance_interval,
            schedule: settings.schedule.canonical(),
        });
    }
    Ok(())
}

type Pending = (usize, GenerationRequest, std::sync::mpsc::Receiver<flowgen_engine::Result<Generation>>);

/// Submit every chunk of `batch_size` images up front, so the engine never waits on file writing;
/// each reports its progress into its share of `bar`.
fn submit_chunks(
    engine: &EngineHandle,
    all: GenerationRequest,
    batch_size: usize,
    (bar, units_per_chunk): (&ProgressBar, u64),
) -> Result<Vec<Pending>> {
    let n = all.inputs.len();
    let adaptive = all.settings.sampler.is_adaptive();
    let count = n.div_ceil(batch_size);
    let mut pending = Vec::with_capacity(count);
    for (index, start) in (0..n).step_by(batch_size).enumerate() {
        let chunk = all.inputs.slice(start..(start + batch_size).min(n));
        let request = GenerationRequest { settings: all.settings.clone(), inputs: chunk };
        let (progress_bar, base) = (bar.clone(), index as u64 * units_per_chunk);
        let progress = Box::new(move |r: &flowgen_engine::StepReport| {
            progress_bar.set_position(base + if adaptive { (r.s * 1000.0) as u64 } else { r.step as u64 });
            progress_bar.set_message(format!("batch {}/{count} nfe {}", index + 1, r.nfe));
            ControlFlow::Continue(())
        });
        pending.push((start, request.clone(), engine.submit(request, progress)?));
    }
    Ok(pending)
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
    let settings = solve_settings(&args, &cfg)?;
    let format = OutputFormat::parse(&args.format, args.quality).context("--format/--quality")?;
    let inputs = image_inputs(&args, &cfg)?;
    let n = inputs.len();
    // Fail on bad options before any image is made.
    pipeline.validate(&settings, &inputs.slice(0..1)).context("invalid generation options")?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;

    // Progress in sampler steps for fixed-step solvers, in thousandths of s for adaptive ones.
    let units_per_chunk =
        if settings.sampler.is_adaptive() { 1000 } else { settings.schedule.build(settings.steps)?.steps() as u64 };
    let bar = progress_bar(units_per_chunk * n.div_ceil(args.batch_size) as u64);
    let engine = EngineHandle::spawn(pipeline, 2)?;
    let started = Instant::now();
    let pending = submit_chunks(
        &engine,
        GenerationRequest { settings: settings.clone(), inputs },
        args.batch_size,
        (&bar, units_per_chunk),
    )?;
    let mut manifest = Manifest { model: cfg.name.clone(), images: Vec::with_capacity(n) };
    let mut all_images: Vec<Image> = Vec::with_capacity(n);
    for (start, request, reply) in pending {
        let images = start..start + request.inputs.len();
        let generation =
            reply.recv().context("engine stopped")?.with_context(|| format!("generating images {images:?}"))?;
        generation.stats.require_all().with_context(|| format!("generating images {images:?}"))?;
        write_chunk((&args, format), &cfg, (start, &request), &generation, &mut manifest)?;
        all_images.extend(generation.images);
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let grid = Image::grid(&all_images)?;
    std::fs::write(args.out.join("grid.png"), grid.to_png(&[("Software", "flowgen".into())])?)
        .context("writing grid.png")?;
    std::fs::write(args.out.join("manifest.json"), serde_json::to_string_pretty(&manifest)?)
        .context("writing manifest.json")?;
    let total_nfe: usize = manifest.images.iter().map(|m| m.nfe).sum();
    let total_gflops: f64 = manifest.images.iter().map(|m| m.gflops).sum();
    let others: String = manifest.images.first().map_or(String::new(), |m| {
        m.evaluations
            .iter()
            .filter(|(k, _)| k.as_str() != MAIN_NETWORK)
            .map(|(k, v)| format!(", {v} {k} evaluations"))
            .collect()
    });
    println!(
        "generated {n} images with {} in {seconds:.2} s ({:.2} images/s, {:.1} NFE/image{others}, {:.3} GFLOPs/image) -> {}",
        settings.sampler,
        n as f64 / seconds,
        total_nfe as f64 / n as f64,
        total_gflops / n as f64,
        args.out.display()
    );
    Ok(())
}
