//! The server's storage and queue boundary: what the HTTP routes and the batcher need from a job
//! queue, a result store and a progress fan-out. `local::LocalBackend` implements all three with
//! the SQLite journal and the in-memory priority queue.
//!
//! The traits are shaped for a Redis Streams backend as well: `enqueue` is an XADD after the
//! durable write, `claim` an XREADGROUP by a consumer, `ack` an XACK with the result written once,
//! `release` and crash recovery an XCLAIM / XAUTOCLAIM back to the group, and `ProgressHub` one
//! pub/sub channel per job.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::Result;
use crate::job::{BatchKey, JobSpec, JobStatus, StoredJob};

/// What SSE subscribers watch.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub status: JobStatus,
    pub position: Option<usize>,
    pub step: usize,
    pub total: Option<usize>,
}

/// How a claimed job reports progress to its watchers and learns that it was cancelled.
pub trait JobProgress: Send + Sync {
    /// The engine completed `step` of `total` (ignored once the job is no longer running).
    fn step(&self, step: usize, total: Option<usize>);
    fn is_cancelled(&self) -> bool;
}

/// A job claimed for one engine batch.
#[derive(Clone)]
pub struct BatchJob {
    pub id: String,
    pub spec: Arc<JobSpec>,
    pub progress: Arc<dyn JobProgress>,
    /// Time it spent queued.
    pub waited: Duration,
}

/// The job a batch would start from now, and how many compatible images wait with it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueHead {
    pub key: BatchKey,
    pub enqueued: Instant,
    pub images: usize,
}

/// Results of a job that succeeded, written together with its final state.
pub struct Success {
    pub finished_ms: i64,
    /// Main-network evaluations (largest over the job's images).
    pub nfe: usize,
    pub inference_ms: i64,
    /// Encoded images (PNG, JPEG or WebP, as the job asked).
    pub pngs: Vec<Vec<u8>>,
}

/// How a claimed job ended.
pub enum Outcome {
    Succeeded(Success),
    Failed {
        error: String,
    },
    /// The engine panicked on it: a shared queue gives it to a worker again until it has been
    /// started `queue.max_attempts` times, then fails it into the dead-letter stream; the
    /// embedded journal fails it at once.
    Crashed {
        error: String,
    },
}

/// Jobs waiting, claimed and acknowledged. Every accepted job is durable before `enqueue`
/// returns, and a job claimed but never acknowledged runs again after a crash.
pub trait JobQueue: Send + Sync + 'static {
    /// Durably accept an admitted job, then queue it; the 202 follows only an `Ok`.
    fn enqueue(&self, job: StoredJob) -> Result<()>;
    /// The next batch's head job, if any is queued.
    fn head(&self) -> Option<QueueHead>;
    /// Resolves when the queue may have changed (a job queued or cancelled, a drain).
    fn changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Wake whoever waits in `changed`.
    fn notify(&self);
    /// Claim the head job and the compatible jobs behind it, up to `max_images` images, in
    /// priority then arrival order; they are running (one more attempt each) once this returns.
    fn claim(&self, max_images: usize) -> Result<Vec<BatchJob>>;
    /// Record how a claimed job ended; false when it had already ended (a cancel won).
    /// An error leaves the job as it was (running); the caller keeps the outcome and retries.
    fn ack(&self, id: &str, outcome: &Outcome) -> Result<bool>;
    /// Give claimed jobs back at the head of the queue (their batch never started).
    fn release(&self, ids: &[String]);
    /// Cancel a queued or running job; false when it had already ended.
    fn cancel(&self, id: &str) -> Result<bool>;
    /// Jobs waiting to be claimed.
    fn queued(&self) -> usize;
    /// The process is draining: claim nothing new (a shared queue hands back what it holds).
    fn drain(&self) {}
}

/// A job deleted from the store (expired, or deleted by its owner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub id: String,
    pub owner: String,
}

/// Every accepted job as stored, finished jobs' results, and their expiry. Jobs that ended are
/// served from here alone: the live table keeps only queued and running ones.
pub trait JobStore: Send + Sync + 'static {
    /// A job as stored now.
    fn load(&self, id: &str) -> Result<Option<StoredJob>>;
    /// The id and request hash of the job `owner` submitted with this Idempotency-Key.
    fn idempotent(&self, owner: &str, key: &str) -> Result<Option<(String, String)>>;
    /// One page of `owner`'s jobs, newest first, with one of `statuses` (any when empty), after
    /// the job `after`, and whether more follow; None when `after` is not a job of `owner`.
    fn list(
        &self,
        owner: &str,
        statuses: &[JobStatus],
        limit: usize,
        after: Option<&str>,
    ) -> Result<Option<(Vec<StoredJob>, bool)>>;
    /// When the first of `owner`'s finished jobs finished (it expires first).
    fn first_finished(&self, owner: &str) -> Result<Option<i64>>;
    /// Encoded image `index` of a succeeded job.
    fn image(&self, id: &str, index: usize) -> Result<Option<Vec<u8>>>;
    /// A job as stored and, when it succeeded, its image `index`, in one read (a download).
    fn load_with_image(&self, id: &str, index: usize) -> Result<Option<(StoredJob, Option<Vec<u8>>)>>;
    /// Delete a finished job of `owner` and its results; false when there is none.
    fn delete(&self, id: &str, owner: &str) -> Result<bool>;
    /// Delete jobs (and results) that finished before `before_ms`.
    fn expire(&self, before_ms: i64) -> Result<Vec<Removed>>;
}

/// Job state changes fanned out to any number of watchers (SSE streams).
pub trait ProgressHub: Send + Sync + 'static {
    /// A receiver that starts at the job's current state.
    fn subscribe(&self, id: &str) -> Option<watch::Receiver<Snapshot>>;
}
