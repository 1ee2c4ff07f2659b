//! Shared server state, start-up (journal recovery, batcher, warm-up) and drain on shutdown.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::engine::Models;
use crate::error::{ApiError, Result};
use crate::jobs::{now_ms, Jobs};
use crate::metrics::Metrics;
use crate::store::Store;

pub struct AppState {
    pub config: ServerConfig,
    pub models: Models,
    pub jobs: Arc<Jobs>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    key_hashes: Vec<[u8; 32]>,
    ready: AtomicBool,
    draining: watch::Sender<bool>,
    batcher_done: watch::Sender<bool>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl AppState {
    /// Open the journal, requeue what a crash interrupted, start the batcher and warm the engines.
    pub async fn start(config: ServerConfig, models: Models) -> Result<Arc<Self>> {
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(&config.server.data_dir)?;
        let requeued = store.requeue_interrupted()?;
        let ttl_ms = (config.queue.result_ttl_s as i64).saturating_mul(1000);
        let expired = store.expire(now_ms() - ttl_ms)?;
        let stored = store.load_all()?;
        let queued = stored.iter().filter(|j| j.status == crate::api::JobStatus::Queued).count();
        tracing::info!(jobs = stored.len(), queued, requeued, expired = expired.len(), journal = %store.path().display(), "journal loaded");
        let jobs = Arc::new(Jobs::new(config.queue.capacity, metrics.clone()));
        jobs.restore(stored);

        let limiter =
            match (NonZeroU32::new(config.auth.rate_limit_per_minute), NonZeroU32::new(config.auth.rate_limit_burst)) {
                (Some(rate), Some(burst)) => Some(RateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst))),
                _ => None,
            };
        let key_hashes = config.auth.api_keys.iter().map(|k| sha256(k.trim().as_bytes())).collect();
        let state = Arc::new(AppState {
            config,
            models,
            jobs,
            store,
            metrics,
            limiter,
            key_hashes,
            ready: AtomicBool::new(false),
            draining: watch::channel(false).0,
            batcher_done: watch::channel(false).0,
        });

        let warm = state.clone();
        tokio::spawn(async move {
            for engine in warm.models.iter() {
                // The blocking task needs its own handle to the engine.
                let engine = engine.clone();
                let name = engine.config().name.clone();
                match tokio::task::spawn_blocking(move || crate::batcher::warm_up(engine.as_ref())).await {
                    Ok(Ok(())) => tracing::info!(model = %name, "model warmed up"),
                    Ok(Err(e)) => tracing::error!(model = %name, error = %e, "warm-up failed"),
                    Err(e) => tracing::error!(model = %name, error = %e, "warm-up panicked"),
                }
            }
            warm.ready.store(true, Ordering::SeqCst);
            // Start the batcher after warm-up so the first batch does not wait behind it.
            tokio::spawn(crate::batcher::run(warm.clone()));
        });

        let expiry = state.clone();
        tokio::spawn(async move {
            let period = Duration::from_secs(expiry.config.queue.result_ttl_s.clamp(1, 60));
            let mut draining = expiry.draining_receiver();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = draining.changed() => return,
                }
                let store = expiry.store.clone();
                let cutoff = now_ms() - ttl_ms;
                match tokio::task::spawn_blocking(move || store.expire(cutoff)).await {
                    Ok(Ok(ids)) if !ids.is_empty() => {
                        tracing::info!(count = ids.len(), "expired finished jobs");
                        expiry.jobs.forget(&ids);
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "expiring old jobs failed"),
                    _ => {}
                }
            }
        });
        Ok(state)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_draining()
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    pub fn draining_receiver(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Stop taking jobs; readiness turns 503 and the batcher stops after its current batch.
    pub fn begin_drain(&self) {
        self.draining.send_replace(true);
        self.jobs.wake.notify_one();
    }

    pub(crate) fn batcher_finished(&self) {
        self.batcher_done.send_replace(true);
    }

    /// Wait for the running batch to finish, at most `grace`; true when it did.
    pub async fn wait_for_batcher(&self, grace: Duration) -> bool {
        if !self.ready.load(Ordering::SeqCst) {
            return true;
        }
        let mut done = self.batcher_done.subscribe();
        let finished = tokio::time::timeout(grace, done.wait_for(|d| *d)).await.is_ok();
        finished
    }

    /// The caller's identity: a hash of its key, or "anonymous" when the API is open.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<String, ApiError> {
        if self.key_hashes.is_empty() {
            return Ok("anonymous".into());
        }
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(ApiError::Unauthorized)?;
        // Compare fixed-size hashes, and all of them, so timing says nothing about the keys.
        let offered = sha256(token.as_bytes());
        let mut matched = subtle::Choice::from(0u8);
        for known in &self.key_hashes {
            matched |= known.ct_eq(&offered);
        }
        if bool::from(matched) {
            Ok(offered[..8].iter().map(|b| format!("{b:02x}")).collect())
        } else {
            Err(ApiError::Unauthorized)
        }
    }

    /// One submission by `owner`; 429 with Retry-After beyond the configured rate.
    pub fn check_rate(&self, owner: &str) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter.check_key(&owner.to_string()).map_err(|not_until| {
            self.metrics.rejected("rate_limit");
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::Overloaded {
                message: format!(
                    "rate limit of {} submissions per minute exceeded",
                    self.config.auth.rate_limit_per_minute
                ),
                retry_after_s: wait.as_secs_f64().ceil() as u64,
            }
        })
    }
}
