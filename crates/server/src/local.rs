//! The embedded backend behind the queue boundary: the SQLite journal plus the in-memory table.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use crate::error::Result;
use crate::job::{JobStatus, Steps, StoredJob};
use crate::jobs::{now_ms, Jobs};
use crate::queue::{BatchJob, JobQueue, JobStore, Outcome, ProgressHub, QueueHead, Removed, Snapshot};
use crate::store::Store;

/// The embedded backend: the SQLite journal is the truth for what was accepted and how it
/// ended, and serves every job that ended; the in-memory table holds the live ones, orders the
/// queue and fans out progress.
pub struct LocalBackend {
    store: Store,
    jobs: Arc<Jobs>,
}

/// What opening the journal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub jobs: usize,
    pub queued: usize,
    /// Jobs a crash left running, queued again.
    pub requeued: usize,
    /// Jobs failed for good: they had been started `max_attempts` times (poison jobs).
    pub exhausted: usize,
    /// Queued jobs with more images than `queue.max_batch` allows now, failed at start.
    pub oversized: usize,
}

impl LocalBackend {
    /// Open the journal, put back what a crash interrupted (failing jobs already started
    /// `max_attempts` times), and load the live jobs into `jobs`.
    pub fn open(store: Store, jobs: Arc<Jobs>, max_attempts: u32, max_batch: usize) -> Result<(Self, Recovery)> {
        let requeued = store.requeue_interrupted()?;
        let exhausted = store.fail_exhausted(max_attempts, now_ms())?;
        let mut live = store.load_live()?;
        let oversized = fail_oversized(&store, &mut live, max_batch)?;
        let queued = live.iter().filter(|j| j.status == JobStatus::Queued).count();
        let requeued = requeued.saturating_sub(exhausted);
        let per_owner = store.count_by_owner()?;
        let total = per_owner.iter().map(|(_, n)| n).sum();
        let recovery = Recovery { jobs: total, queued, requeued, exhausted, oversized };
        jobs.restore(live, per_owner);
        Ok((LocalBackend { store, jobs }, recovery))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Put the in-memory job in the state the journal holds for it.
    fn follow_journal(&self, id: &str) {
        match self.store.load(id) {
            Ok(Some(stored)) => self.jobs.sync(&stored),
            Ok(None) => {}
            Err(err) => tracing::error!(job = %id, error = %err, "cannot read a job back from the journal"),
        }
    }
}

/// A job accepted under a larger `queue.max_batch` could never be batched now (it would sit at
/// the head of the queue for ever): fail it, in the journal and in `stored`, saying why.
fn fail_oversized(store: &Store, stored: &mut [StoredJob], max_batch: usize) -> Result<usize> {
    let mut failed = 0;
    for job in stored.iter_mut().filter(|j| j.status == JobStatus::Queued && j.spec.n() > max_batch) {
        let error = format!(
            "this job has {} images but queue.max_batch is now {max_batch} (the configuration changed after it \
             was accepted), so it cannot run; submit it again with n <= {max_batch}",
            job.spec.n()
        );
        let finished = now_ms();
        if store.finish(&job.id, JobStatus::Failed, finished, Some(&error), Steps::default())? {
            job.status = JobStatus::Failed;
            job.finished_ms = Some(finished);
            job.error = Some(error);
            failed += 1;
        }
    }
    Ok(failed)
}

impl JobQueue for LocalBackend {
    fn enqueue(&self, job: StoredJob) -> Result<()> {
        self.store.insert(&job)?;
        self.jobs.enqueue(job);
        Ok(())
    }

    fn head(&self) -> Option<QueueHead> {
        self.jobs.head()
    }

    fn changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.jobs.wake.notified())
    }

    fn notify(&self) {
        self.jobs.wake.notify_one();
    }

    fn claim(&self, max_images: usize) -> Result<Vec<BatchJob>> {
        let batch = self.jobs.take_batch(max_images);
        if batch.is_empty() {
            return Ok(batch);
        }
        let ids: Vec<String> = batch.iter().map(|j| j.id.clone()).collect();
        let marked = match self.store.mark_running(&ids, now_ms()) {
            Ok(marked) => marked,
            Err(err) => {
                // Without a journal entry the result could not be stored; leave the jobs queued.
                self.jobs.requeue_front(&ids);
                return Err(err);
            }
        };
        if marked.len() == ids.len() {
            return Ok(batch);
        }
        // A job the journal had already ended (cancelled meanwhile) does not run; memory follows.
        let (run, ended): (Vec<BatchJob>, Vec<BatchJob>) = batch.into_iter().partition(|j| marked.contains(&j.id));
        for job in ended {
            self.follow_journal(&job.id);
        }
        Ok(run)
    }

    fn ack(&self, id: &str, outcome: &Outcome) -> Result<bool> {
        let steps = self.jobs.steps(id);
        let (stored, status) = match outcome {
            Outcome::Succeeded(done) => {
                let all = Steps { done: steps.total.unwrap_or(steps.done), ..steps };
                (self.store.finish_succeeded(id, done, all)?, JobStatus::Succeeded)
            }
            Outcome::Failed { error } | Outcome::Crashed { error } => {
                (self.store.finish(id, JobStatus::Failed, now_ms(), Some(error), steps)?, JobStatus::Failed)
            }
        };
        if stored {
            self.jobs.mark_finished(id, status);
        } else {
            // It had ended already: whatever the journal says is what clients see.
            self.follow_journal(id);
        }
        Ok(stored)
    }

    fn release(&self, ids: &[String]) {
        self.jobs.requeue_front(ids);
    }

    fn cancel(&self, id: &str) -> Result<bool> {
        // The journal decides races with the batcher: whichever final state lands first wins.
        let steps = self.jobs.steps(id);
        let cancelled =
            self.store.finish(id, JobStatus::Cancelled, now_ms(), Some("cancelled by the client"), steps)?;
        if cancelled {
            self.jobs.mark_cancelled(id);
        }
        Ok(cancelled)
    }

    fn queued(&self) -> usize {
        self.jobs.queued()
    }
}

impl JobStore for LocalBackend {
    fn load(&self, id: &str) -> Result<Option<StoredJob>> {
        self.store.load(id)
    }

    fn idempotent(&self, owner: &str, key: &str) -> Result<Option<(String, String)>> {
        self.store.idempotent(owner, key)
    }

    fn list(
        &self,
        owner: &str,
        statuses: &[JobStatus],
        limit: usize,
        after: Option<&str>,
    ) -> Result<Option<(Vec<StoredJob>, bool)>> {
        self.store.list(owner, statuses, limit, after)
    }

    fn first_finished(&self, owner: &str) -> Result<Option<i64>> {
        self.store.first_finished(owner)
    }

    fn image(&self, id: &str, index: usize) -> Result<Option<Vec<u8>>> {
        self.store.image(id, index)
    }

    fn load_with_image(&self, id: &str, index: usize) -> Result<Option<(StoredJob, Option<Vec<u8>>)>> {
        self.store.load_with_image(id, index)
    }

    fn delete(&self, id: &str, owner: &str) -> Result<bool> {
        let deleted = self.store.delete(id, owner)?;
        if deleted {
            self.jobs.forget(&[Removed { id: id.to_string(), owner: owner.to_string() }]);
        }
        Ok(deleted)
    }

    fn expire(&self, before_ms: i64) -> Result<Vec<Removed>> {
        let removed = self.store.expire(before_ms)?;
        self.jobs.forget(&removed);
        Ok(removed)
    }
}

impl ProgressHub for LocalBackend {
    /// A live job's channel; for a job that ended, one that holds its final state.
    fn subscribe(&self, id: &str) -> Option<watch::Receiver<Snapshot>> {
        if let Some(live) = self.jobs.subscribe(id) {
            return Some(live);
        }
        let job = match self.store.load(id) {
            Ok(job) => job?,
            Err(err) => {
                tracing::error!(job = %id, error = %err, "cannot read a job from the journal");
                return None;
            }
        };
        let last = Snapshot { status: job.status, position: None, step: job.steps.done, total: job.steps.total };
        Some(watch::channel(last).1)
    }
}
