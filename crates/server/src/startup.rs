//! Start-up wiring: open the embedded backend (journal recovery), build the state, warm the
//! engines, then start the batcher and the expiry of old results.

use std::sync::Arc;
use std::time::Duration;

use crate::config::ServerConfig;
use crate::engine::Models;
use crate::error::Result;
use crate::jobs::{now_ms, Jobs};
use crate::local::LocalBackend;
use crate::metrics::Metrics;
use crate::queue::JobStore;
use crate::redis_backend::{RedisBackend, RedisSettings};
use crate::state::{AppState, Backends};
use crate::store::Store;

/// Open the journal in `config.server.data_dir`, requeue what a crash interrupted, start the
/// batcher and warm the engines; readiness turns 200 once they are warm.
pub async fn start(config: ServerConfig, models: Models) -> Result<Arc<AppState>> {
    if !config.queue.url.trim().is_empty() {
        return start_shared(config, models).await;
    }
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(&config.server.data_dir)?;
    let journal = store.path().display().to_string();
    let ttl_ms = (config.queue.result_ttl_s as i64).saturating_mul(1000);
    let expired = store.expire(now_ms() - ttl_ms)?;
    let jobs = Arc::new(Jobs::new(
        config.queue.capacity,
        config.queue.max_queued_per_key,
        config.queue.max_stored_per_key,
        metrics.clone(),
    ));
    let (backend, recovery) =
        LocalBackend::open(store, jobs.clone(), config.queue.max_attempts, config.queue.max_batch)?;
    tracing::info!(jobs = recovery.jobs, queued = recovery.queued, requeued = recovery.requeued, expired = expired.len(), %journal, "journal loaded");
    if recovery.exhausted > 0 {
        tracing::error!(
            jobs = recovery.exhausted,
            max_attempts = config.queue.max_attempts,
            "failed jobs that were running at every one of their starts (poison jobs)"
        );
    }
    if recovery.oversized > 0 {
        tracing::error!(
            jobs = recovery.oversized,
            max_batch = config.queue.max_batch,
            "failed queued jobs with more images than queue.max_batch allows now"
        );
    }
    #[cfg(any(test, feature = "testing"))]
    let journal_handle = backend.store().clone();
    let backend = Arc::new(backend);
    let backends = Backends { jobs, queue: backend.clone(), results: backend.clone(), progress: backend, metrics };
    #[allow(unused_mut)]
    let mut state = AppState::new(config, models, backends);
    #[cfg(any(test, feature = "testing"))]
    {
        state.journal = Some(journal_handle);
    }
    let state = Arc::new(state);
    tokio::spawn(warm_then_batch(state.clone()));
    tokio::spawn(expire_results(state.clone(), ttl_ms));
    Ok(state)
}

/// The Redis backend: an API process is ready once Redis answers; a worker once its engines are
/// warm, when its batcher starts taking jobs from the streams.
async fn start_shared(config: ServerConfig, models: Models) -> Result<Arc<AppState>> {
    let role = config.server.role;
    let metrics = Arc::new(Metrics::new());
    let jobs = Arc::new(Jobs::new(
        config.queue.capacity,
        config.queue.max_queued_per_key,
        config.queue.max_stored_per_key,
        metrics.clone(),
    ));
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "flowgen".into());
    let consumer = format!("{host}-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let settings = RedisSettings::from_config(&config, consumer.clone());
    let url = settings.url.clone();
    let (opening_jobs, opening_metrics) = (jobs.clone(), metrics.clone());
    let backend = tokio::task::spawn_blocking(move || RedisBackend::open(settings, opening_jobs, opening_metrics))
        .await
        .map_err(|e| crate::error::ServerError::Task(e.to_string()))??;
    let backend = Arc::new(backend);
    backend.start_background(role.runs_engine());
    tracing::info!(role = role.as_str(), queue = %url, %consumer, "shared queue connected");
    let ttl_ms = (config.queue.result_ttl_s as i64).saturating_mul(1000);
    let pinged = backend.clone();
    let backends = Backends { jobs, queue: backend.clone(), results: backend.clone(), progress: backend, metrics };
    let state = Arc::new(AppState::new(config, models, backends));
    tokio::spawn(watch_redis(state.clone(), pinged));
    if role.runs_engine() {
        tokio::spawn(warm_then_batch(state.clone()));
    } else {
        state.set_ready();
        // No batch runs here: a drain has nothing to wait for.
        state.batcher_finished();
    }
    if role.runs_api() {
        tokio::spawn(expire_results(state.clone(), ttl_ms));
    }
    Ok(state)
}

/// Readiness is 503 while Redis does not answer, and 200 again once it does.
async fn watch_redis(state: Arc<AppState>, backend: Arc<RedisBackend>) {
    let mut draining = state.draining_receiver();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = draining.changed() => return,
        }
        let probe = backend.clone();
        let answered = tokio::task::spawn_blocking(move || probe.ping()).await.is_ok_and(|r| r.is_ok());
        state.journal_written(answered);
    }
}

async fn warm_then_batch(state: Arc<AppState>) {
    for engine in state.models.iter() {
        // The blocking task needs its own handle to the engine.
        let engine = engine.clone();
        let name = engine.config().name.clone();
        match tokio::task::spawn_blocking(move || crate::batcher::warm_up(engine.as_ref())).await {
            Ok(Ok(())) => tracing::info!(model = %name, "model warmed up"),
            Ok(Err(e)) => tracing::error!(model = %name, error = %e, "warm-up failed"),
            Err(e) => tracing::error!(model = %name, error = %e, "warm-up panicked"),
        }
    }
    state.set_ready();
    // Start the batcher after warm-up so the first batch does not wait behind it.
    tokio::spawn(crate::batcher::run(state));
}

async fn expire_results(state: Arc<AppState>, ttl_ms: i64) {
    let period = Duration::from_secs(state.config.queue.result_ttl_s.clamp(1, 60));
    let mut draining = state.draining_receiver();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = draining.changed() => return,
        }
        let results: Arc<dyn JobStore> = state.results.clone();
        let cutoff = now_ms() - ttl_ms;
        match tokio::task::spawn_blocking(move || results.expire(cutoff)).await {
            Ok(Ok(ids)) if !ids.is_empty() => tracing::info!(count = ids.len(), "expired finished jobs"),
            Ok(Err(e)) => tracing::error!(error = %e, "expiring old jobs failed"),
            _ => {}
        }
    }
}
