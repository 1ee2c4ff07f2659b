//! The batcher: groups compatible queued jobs into one engine batch and records the outcome.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgen_engine::image::generation_metadata;
use flowgen_engine::{Error as EngineError, GenerationRequest, ImageInputs, SolveSettings, StepReport};
use tracing::Instrument;

use crate::engine::{Engine, EngineOutput};
use crate::jobs::now_ms;
use crate::queue::{BatchJob, Outcome, QueueHead, Success};
use crate::state::AppState;

/// Outcomes the journal refused (a full or failing disk): kept and retried, so a job's final state
/// reaches the journal, and then memory, as soon as the journal can be written again.
type Unjournaled = Vec<(String, Outcome)>;

/// Run batches until draining starts; the batch in flight always finishes first.
pub async fn run(state: Arc<AppState>) {
    let mut draining = state.draining_receiver();
    let max_batch = state.config.queue.max_batch;
    let mut unjournaled: Unjournaled = Vec::new();
    loop {
        if !unjournaled.is_empty() {
            unjournaled = journal(&state, std::mem::take(&mut unjournaled)).await;
            if !unjournaled.is_empty() {
                // No new batch while results cannot be stored: they would be lost.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = draining.changed() => {}
                }
                if *draining.borrow() {
                    break;
                }
                continue;
            }
        }
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
                state.journal_written(false);
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
        unjournaled = run_batch(&state, batch).instrument(span).await;
    }
    if !unjournaled.is_empty() {
        unjournaled = journal(&state, unjournaled).await;
        if !unjournaled.is_empty() {
            tracing::error!(
                jobs = unjournaled.len(),
                "stopping with results the journal refused; those jobs rerun at the next start"
            );
        }
    }
    state.batcher_finished();
}

/// Journal each outcome (memory follows each write that lands); returns those the journal refused.
async fn journal(state: &Arc<AppState>, outcomes: Unjournaled) -> Unjournaled {
    let queue = state.queue.clone();
    let writer = state.clone();
    let written = tokio::task::spawn_blocking(move || {
        let mut refused = Vec::new();
        for (id, outcome) in outcomes {
            match queue.ack(&id, &outcome) {
                Ok(true) => record_outcome(&writer, &id, &outcome),
                // Cancelled while it ran: the journal already says so, and memory follows it.
                Ok(false) => {}
                Err(err) => {
                    tracing::error!(job = %id, error = %err, "cannot journal how a job ended; retrying");
                    refused.push((id, outcome));
                }
            }
        }
        writer.journal_written(refused.is_empty());
        refused
    })
    .await;
    written.unwrap_or_else(|join| {
        tracing::error!(error = %join, "journaling outcomes panicked; those jobs rerun at the next start");
        Vec::new()
    })
}

fn record_outcome(state: &AppState, id: &str, outcome: &Outcome) {
    if let Outcome::Succeeded(done) = outcome {
        state.metrics.images.inc_by(done.pngs.len() as u64);
        tracing::info!(job = %id, images = done.pngs.len(), "job succeeded");
    }
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

async fn run_batch(state: &Arc<AppState>, batch: Vec<BatchJob>) -> Unjournaled {
    for job in &batch {
        state.metrics.queue_seconds.observe(job.waited.as_secs_f64());
    }
    match execute(state, &batch).await {
        Ok(solved) => record(state, &batch, solved).await,
        Err(EngineError::Cancelled) => Vec::new(),
        Err(err) if batch.len() > 1 => {
            // Isolate the faulty job: run each job alone so only that one fails.
            tracing::warn!(error = %err, "batch failed; retrying its jobs one by one");
            let mut refused = Vec::new();
            for job in batch {
                if job.progress.is_cancelled() {
                    continue;
                }
                let single = vec![job];
                refused.extend(match execute(state, &single).await {
                    Ok(solved) => record(state, &single, solved).await,
                    Err(EngineError::Cancelled) => Vec::new(),
                    Err(err) => fail(state, &single[0], &err).await,
                });
            }
            refused
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

/// Encode each job's images in its format and journal them together with its success; returns
/// the outcomes the journal refused.
async fn record(state: &Arc<AppState>, batch: &[BatchJob], solved: Solved) -> Unjournaled {
    let Solved { settings, output, seconds } = solved;
    let jobs: Vec<BatchJob> = batch.to_vec();
    let finished = now_ms();
    let inference_ms = (seconds * 1000.0).round() as i64;
    let encoded = tokio::task::spawn_blocking(move || {
        let mut outcomes = Vec::new();
        let mut offset = 0;
        for job in &jobs {
            let range = offset..offset + job.spec.n();
            offset = range.end;
            if job.progress.is_cancelled() {
                continue;
            }
            let part = Finished { settings: &settings, output: &output, range, finished, inference_ms };
            // A panic encoding one job's images fails that job only, never its batch-mates.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| encode_job(job, part)))
                .unwrap_or_else(|_| Err(JobFailure::Internal("encoding the images panicked".into())));
            outcomes.push((job.id.clone(), result));
        }
        outcomes
    })
    .await;
    let encoded = match encoded {
        Ok(o) => o,
        Err(join) => batch.iter().map(|j| (j.id.clone(), Err(JobFailure::Internal(join.to_string())))).collect(),
    };
    let outcomes = encoded
        .into_iter()
        .map(|(id, result)| {
            let outcome = match result {
                Ok(outcome) => outcome,
                Err(JobFailure::Engine(err)) => failure(state, &id, "engine", &err),
                Err(JobFailure::Internal(err)) => failure(state, &id, "internal", &err),
            };
            (id, outcome)
        })
        .collect();
    journal(state, outcomes).await
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

/// A job's success with its images encoded in its format.
fn encode_job(job: &BatchJob, part: Finished) -> Result<Outcome, JobFailure> {
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
    Ok(Outcome::Succeeded(Success { finished_ms: part.finished, nfe, inference_ms: part.inference_ms, pngs }))
}

/// Why one job of a solved batch did not succeed.
enum JobFailure {
    /// The solver gave up on some of its images.
    Engine(String),
    /// Encoding or storing its results failed.
    Internal(String),
}

async fn fail(state: &Arc<AppState>, job: &BatchJob, err: &EngineError) -> Unjournaled {
    let outcome = match err {
        // A panic may be the machine's fault rather than the job's: a shared queue retries it.
        EngineError::EnginePanicked(detail) => match failure(state, &job.id, "panic", detail) {
            Outcome::Failed { error } => Outcome::Crashed { error },
            other => other,
        },
        EngineError::Invalid { .. } | EngineError::Config { .. } => {
            failure(state, &job.id, "invalid", &err.to_string())
        }
        _ => failure(state, &job.id, "engine", &err.to_string()),
    };
    journal(state, vec![(job.id.clone(), outcome)]).await
}

/// A failed outcome: the detail goes to the log; the job's error says what a client can act on,
/// never internal text (SQLite, panics, join errors).
fn failure(state: &AppState, id: &str, kind: &str, detail: &str) -> Outcome {
    tracing::error!(job = %id, kind, error = %detail, "job failed");
    state.metrics.failure(kind);
    let error = match kind {
        "panic" => format!("the engine failed unexpectedly (a panic) while running this job; the server log has the details (job {id})"),
        "internal" => format!("storing this job's results failed; the server log has the details (job {id})"),
        _ => detail.to_string(),
    };
    Outcome::Failed { error }
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
