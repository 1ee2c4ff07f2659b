//! The batcher: groups compatible queued jobs into one engine batch and records the outcome.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgen_engine::image::generation_metadata;
use flowgen_engine::{Error as EngineError, GenerationRequest, ImageInputs, SolveSettings, StepReport};
use tracing::Instrument;

use crate::engine::{Engine, EngineOutput};
use crate::jobs::now_ms;
use crate::queue::{BatchJob, JobQueue, Outcome, QueueHead, Success};
use crate::state::AppState;

/// Run batches until draining starts; the batch in flight always finishes first.
pub async fn run(state: Arc<AppState>) {
    let mut draining = state.draining_receiver();
    let max_batch = state.config.queue.max_batch;
    loop {
        if *draining.borrow() {
            break;
        }
        let Some(head) = state.queue.head() else {
            tokio::select! {
                _ = state.queue.changed() => {}
                _ = draining.changed() => {}
            }
            continue;
        };
        wait_for_company(&state, &head, &mut draining).await;
        if *draining.borrow() {
            break;
        }
        let queue = state.queue.clone();
        let claimed = tokio::task::spawn_blocking(move || queue.claim(max_batch)).await;
        let batch = match claimed.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(error = %err, "cannot claim a batch (journal unwritable?); retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            continue;
        }
        let ids: Vec<&str> = batch.iter().map(|j| j.id.as_str()).collect();
        let span = tracing::info_span!("batch", jobs = ?ids, images = batch.iter().map(|j| j.spec.n()).sum::<usize>());
        run_batch(&state, batch).instrument(span).await;
    }
    state.batcher_finished();
}

/// Wait for compatible jobs until the batch is full or the oldest job has waited enough.
async fn wait_for_company(state: &AppState, head: &QueueHead, draining: &mut tokio::sync::watch::Receiver<bool>) {
    let max_wait = Duration::from_millis(state.config.queue.max_wait_ms);
    let max_batch = state.config.queue.max_batch;
    let deadline = head.enqueued + max_wait;
    loop {
        match state.queue.head() {
            Some(now) if now.key == head.key && now.images < max_batch && Instant::now() < deadline => {
                tokio::select! {
                    _ = state.queue.changed() => {}
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                    _ = draining.changed() => {}
                }
                if *draining.borrow() {
                    return;
                }
            }
            _ => return,
        }
    }
}

async fn run_batch(state: &Arc<AppState>, batch: Vec<BatchJob>) {
    for job in &batch {
        state.metrics.queue_seconds.observe(job.waited.as_secs_f64());
    }
    match execute(state, &batch).await {
        Ok(solved) => record(state, &batch, solved).await,
        Err(EngineError::Cancelled) => {}
        Err(err) if batch.len() > 1 => {
            // Isolate the faulty job: run each job alone so only that one fails.
            tracing::warn!(error = %err, "batch failed; retrying its jobs one by one");
            for job in batch {
                if job.progress.is_cancelled() {
                    continue;
                }
                let single = vec![job];
                match execute(state, &single).await {
                    Ok(solved) => record(state, &single, solved).await,
                    Err(EngineError::Cancelled) => {}
                    Err(err) => fail(state, &single[0], &err).await,
                }
            }
        }
        Err(err) => fail(state, &batch[0], &err).await,
    }
}

/// A finished engine call: the settings its jobs share, output and time.
struct Solved {
    settings: SolveSettings,
    output: EngineOutput,
    seconds: f64,
}

/// One engine call for the whole batch; stops early only when every job in it was cancelled.
async fn execute(state: &Arc<AppState>, batch: &[BatchJob]) -> Result<Solved, EngineError> {
    let model = &batch[0].spec.model;
    let engine: Arc<dyn Engine> = state
        .models
        .get(model)
        .cloned()
        .ok_or_else(|| EngineError::invalid("model", format!("model {model:?} is no longer served")))?;
    let settings = batch[0].spec.settings.to_settings(engine.config())?;
    let mut inputs = ImageInputs::default();
    for job in batch {
        inputs.extend(&job.spec.inputs());
    }
    let request = GenerationRequest { settings: settings.clone(), inputs };
    let watchers: Vec<_> = batch.iter().map(|j| j.progress.clone()).collect();
    let progress = Box::new(move |report: &StepReport| {
        let mut live = false;
        for job in &watchers {
            if job.is_cancelled() {
                continue;
            }
            live = true;
            job.step(report.step, report.total);
        }
        if live {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    });
    let images = request.inputs.len();
    let clock = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || engine.generate(request, progress)).await;
    let seconds = clock.elapsed().as_secs_f64();
    let output = match outcome {
        Ok(result) => result?,
        Err(join) => return Err(EngineError::EnginePanicked(join.to_string())),
    };
    if output.images.len() != images {
        return Err(EngineError::EnginePanicked(format!(
            "engine returned {} images for {images}",
            output.images.len()
        )));
    }
    state.metrics.batch_size.observe(images as f64);
    state.metrics.inference_seconds.observe(seconds);
    state.jobs.record_throughput(images, seconds);
    Ok(Solved { settings, output, seconds })
}

/// Encode each job's images in its format and journal them together with its success.
async fn record(state: &Arc<AppState>, batch: &[BatchJob], solved: Solved) {
    let Solved { settings, output, seconds } = solved;
    let queue = state.queue.clone();
    let jobs: Vec<BatchJob> = batch.to_vec();
    let finished = now_ms();
    let inference_ms = (seconds * 1000.0).round() as i64;
    let written = tokio::task::spawn_blocking(move || {
        let mut outcomes = Vec::new();
        let mut offset = 0;
        for job in &jobs {
            let range = offset..offset + job.spec.n();
            offset = range.end;
            if job.progress.is_cancelled() {
                continue;
            }
            let finished = Finished { settings: &settings, output: &output, range, finished, inference_ms };
            outcomes.push((job.id.clone(), store_job(queue.as_ref(), job, finished)));
        }
        outcomes
    })
    .await;
    let outcomes = match written {
        Ok(o) => o,
        Err(join) => {
            for job in batch {
                fail_with(state, &job.id, "internal", &format!("storing results failed: {join}")).await;
            }
            return;
        }
    };
    for (id, outcome) in outcomes {
        match outcome {
            Ok(true) => {
                let n = batch.iter().find(|j| j.id == id).map(|j| j.spec.n()).unwrap_or(0);
                state.metrics.images.inc_by(n as u64);
                tracing::info!(job = %id, images = n, seconds, "job succeeded");
            }
            // Cancelled while the batch ran: the journal already says so.
            Ok(false) => {}
            Err(JobFailure::Engine(err)) => fail_with(state, &id, "engine", &err).await,
            Err(JobFailure::Internal(err)) => fail_with(state, &id, "internal", &err).await,
        }
    }
}

/// One job's share of a solved batch.
struct Finished<'a> {
    settings: &'a SolveSettings,
    output: &'a EngineOutput,
    /// The job's images in the batch.
    range: std::ops::Range<usize>,
    finished: i64,
    inference_ms: i64,
}

/// Encode a job's images in its format and acknowledge it with them; Ok(false) when a cancel
/// won the race.
fn store_job(queue: &dyn JobQueue, job: &BatchJob, part: Finished) -> Result<bool, JobFailure> {
    let inputs = job.spec.inputs();
    let stats = part.output.stats.for_samples(part.range.clone());
    if let Err(unsolved) = stats.require_all() {
        // The solver gave up on one of this job's images; its batch-mates are unaffected.
        return Err(JobFailure::Engine(unsolved.to_string()));
    }
    let nfe = stats.per_sample_nfe.iter().copied().max().unwrap_or_else(|| stats.nfe());
    let format = job.spec.output();
    let pngs = part.output.images[part.range]
        .iter()
        .enumerate()
        .map(|(i, image)| {
            image.encode(format, &generation_metadata(&job.spec.model, part.settings, &inputs, &stats, i))
        })
        .collect::<Result<Vec<Vec<u8>>, _>>()
        .map_err(|e| JobFailure::Internal(e.to_string()))?;
    let done = Success { finished_ms: part.finished, nfe, inference_ms: part.inference_ms, pngs };
    queue.ack(&job.id, Outcome::Succeeded(done)).map_err(|e| JobFailure::Internal(e.to_string()))
}

/// Why one job of a solved batch did not succeed.
enum JobFailure {
    /// The solver gave up on some of its images.
    Engine(String),
    /// Encoding or storing its results failed.
    Internal(String),
}

async fn fail(state: &Arc<AppState>, job: &BatchJob, err: &EngineError) {
    let kind = match err {
        EngineError::EnginePanicked(_) => "panic",
        EngineError::Invalid { .. } | EngineError::Config { .. } => "invalid",
        _ => "engine",
    };
    fail_with(state, &job.id, kind, &err.to_string()).await;
}

async fn fail_with(state: &Arc<AppState>, id: &str, kind: &str, message: &str) {
    tracing::error!(job = %id, kind, error = %message, "job failed");
    state.metrics.failure(kind);
    let queue = state.queue.clone();
    let (id_owned, error) = (id.to_string(), message.to_string());
    match tokio::task::spawn_blocking(move || queue.ack(&id_owned, Outcome::Failed { error })).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(job = %id, error = %e, "cannot journal a failure"),
        Err(e) => tracing::error!(job = %id, error = %e, "cannot journal a failure"),
    }
}

/// One tiny generation per model so the first request does not pay for lazy set-up.
pub fn warm_up(engine: &dyn Engine) -> flowgen_engine::Result<()> {
    let cfg = engine.config();
    let settings = SolveSettings {
        sampler: flowgen_engine::Sampler::Euler,
        steps: 1,
        schedule: flowgen_engine::ScheduleSpec::Uniform,
        guidance: if cfg.null_label().is_some() { cfg.defaults.guidance } else { 1.0 },
        guidance_interval: cfg.guidance.interval,
    };
    let inputs = ImageInputs { labels: vec![0], seeds: vec![0] };
    engine.generate(GenerationRequest { settings, inputs }, Box::new(|_: &StepReport| ControlFlow::Continue(())))?;
    Ok(())
}
