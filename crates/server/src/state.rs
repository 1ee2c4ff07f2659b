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

use crate::api::JobView;
use crate::config::ServerConfig;
use crate::engine::Models;
use crate::error::ApiError;
use crate::jobs::{view_of, Jobs};
use crate::metrics::Metrics;
use crate::queue::{JobQueue, JobStore, ProgressHub};

pub struct AppState {
    pub config: ServerConfig,
    pub models: Models,
    /// The live job table (queued and running jobs): views, admission (capacity, Idempotency-Key).
    pub jobs: Arc<Jobs>,
    pub queue: Arc<dyn JobQueue>,
    pub results: Arc<dyn JobStore>,
    pub progress: Arc<dyn ProgressHub>,
    pub metrics: Arc<Metrics>,
    /// The embedded journal, for tests that make its writes fail.
    #[cfg(any(test, feature = "testing"))]
    pub journal: Option<crate::store::Store>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    key_hashes: Vec<[u8; 32]>,
    /// Callers (as `authenticate` names them) allowed `priority: high`.
    high_priority_callers: Vec<String>,
    ready: AtomicBool,
    /// The last journal write succeeded; readiness is 503 while it does not.
    journal_ok: AtomicBool,
    draining: watch::Sender<bool>,
    batcher_done: watch::Sender<bool>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// How a key's caller is named in the journal: the first 8 bytes of its hash, in hex.
fn caller_name(hash: &[u8; 32]) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
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
        let high_priority_callers =
            config.auth.high_priority_keys.iter().map(|k| caller_name(&sha256(k.trim().as_bytes()))).collect();
        let Backends { jobs, queue, results, progress, metrics } = backends;
        AppState {
            config,
            models,
            jobs,
            queue,
            results,
            progress,
            metrics,
            #[cfg(any(test, feature = "testing"))]
            journal: None,
            limiter,
            key_hashes,
            high_priority_callers,
            ready: AtomicBool::new(false),
            journal_ok: AtomicBool::new(true),
            draining: watch::channel(false).0,
            batcher_done: watch::channel(false).0,
        }
    }

    /// Warm-up is done: readiness may turn 200.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_draining() && self.journal_ok()
    }

    pub fn journal_ok(&self) -> bool {
        self.journal_ok.load(Ordering::SeqCst)
    }

    /// Record whether a journal write worked; readiness follows.
    pub fn journal_written(&self, ok: bool) {
        let was = self.journal_ok.swap(ok, Ordering::SeqCst);
        if was && !ok {
            tracing::error!("the job journal cannot be written: readiness is 503 until it can");
        } else if !was && ok {
            tracing::info!("the job journal is writable again");
        }
    }

    /// A job's owner and view: live from memory, else as the store keeps it (every job that ended).
    pub async fn find(&self, id: &str) -> Result<Option<(String, JobView)>, ApiError> {
        if let Some(live) = self.jobs.view(id) {
            return Ok(Some(live));
        }
        let results = self.results.clone();
        let target = id.to_string();
        let stored = tokio::task::spawn_blocking(move || results.load(&target))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
        Ok(stored.map(|job| (job.owner.clone(), view_of(&job, None))))
    }

    /// `priority: high` is for keys granted it; an open API has one caller, who may order its own jobs.
    pub fn may_use_high_priority(&self, caller: &str) -> bool {
        self.key_hashes.is_empty() || self.high_priority_callers.iter().any(|c| c == caller)
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
        self.queue.drain();
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
            Ok(caller_name(&offered))
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
