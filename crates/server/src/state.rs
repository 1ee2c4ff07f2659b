//! Shared server state: configuration, models, the job backends, auth and rate limits, readiness
//! and drain on shutdown. Start-up wiring is in `startup`.

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
use crate::error::ApiError;
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::queue::{JobQueue, JobStore, ProgressHub};

pub struct AppState {
    pub config: ServerConfig,
    pub models: Models,
    /// The live job table: views, listings, admission (capacity and Idempotency-Key).
    pub jobs: Arc<Jobs>,
    pub queue: Arc<dyn JobQueue>,
    pub results: Arc<dyn JobStore>,
    pub progress: Arc<dyn ProgressHub>,
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

/// The parts `AppState` is built from (start-up wiring lives in `startup`).
pub struct Backends {
    pub jobs: Arc<Jobs>,
    pub queue: Arc<dyn JobQueue>,
    pub results: Arc<dyn JobStore>,
    pub progress: Arc<dyn ProgressHub>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(config: ServerConfig, models: Models, backends: Backends) -> Self {
        let limiter =
            match (NonZeroU32::new(config.auth.rate_limit_per_minute), NonZeroU32::new(config.auth.rate_limit_burst)) {
                (Some(rate), Some(burst)) => Some(RateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst))),
                _ => None,
            };
        let key_hashes = config.auth.api_keys.iter().map(|k| sha256(k.trim().as_bytes())).collect();
        let Backends { jobs, queue, results, progress, metrics } = backends;
        AppState {
            config,
            models,
            jobs,
            queue,
            results,
            progress,
            metrics,
            limiter,
            key_hashes,
            ready: AtomicBool::new(false),
            draining: watch::channel(false).0,
            batcher_done: watch::channel(false).0,
        }
    }

    /// Warm-up is done: readiness may turn 200.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
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
        self.queue.notify();
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
