//! In-memory table of live jobs (queued and running) and the priority queue. The SQLite journal
//! is the source of truth for what was accepted and how it ended, and a job that ends leaves this
//! table: the journal serves it from then on, so memory holds what is live, not a day of results.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{watch, Notify};

use crate::api::{JobSpec, JobStatus, JobView};
use crate::error::ApiError;
use crate::job::Steps;
use crate::metrics::Metrics;
use crate::queue::{BatchJob, JobProgress, QueueHead, Removed, Snapshot};
use crate::store::StoredJob;

struct Entry {
    job: StoredJob,
    spec: Arc<JobSpec>,
    enqueued: Instant,
    live: Arc<LiveJob>,
}

/// A job's progress channel and cancel flag, shared with the batch that runs it.
pub struct LiveJob {
    events: watch::Sender<Snapshot>,
    cancel: AtomicBool,
}

impl JobProgress for LiveJob {
    fn step(&self, step: usize, total: Option<usize>) {
        self.events.send_if_modified(|s| {
            if s.status != JobStatus::Running {
                return false;
            }
            s.step = step;
            s.total = total;
            true
        });
    }

    fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

pub enum Admission {
    /// Go ahead and journal this job under this id; say how it went on `landed`.
    New { id: String, landed: watch::Sender<Option<bool>> },
    /// The Idempotency-Key was seen before with the same body; while that first request is still
    /// being journaled, `landing` says when it is (true) or that it failed (false).
    Existing { id: String, landing: Option<watch::Receiver<Option<bool>>> },
    /// The owner already stores `stored` jobs, the most one key may keep.
    StoreFull { stored: usize },
}

/// One priority's queued jobs: a FIFO per owner, owners taken in turn (round-robin), so one key
/// cannot starve the others by queueing many jobs.
#[derive(Default)]
struct Lane {
    turns: VecDeque<String>,
    by_owner: HashMap<String, VecDeque<String>>,
}

impl Lane {
    fn push_back(&mut self, owner: &str, id: String) {
        let queue = self.by_owner.entry(owner.to_string()).or_default();
        if queue.is_empty() {
            self.turns.push_back(owner.to_string());
        }
        queue.push_back(id);
    }

    /// Back at the head: the owner's turn comes first again.
    fn push_front(&mut self, owner: &str, id: String) {
        let queue = self.by_owner.entry(owner.to_string()).or_default();
        queue.push_front(id);
        self.turns.retain(|o| o != owner);
        self.turns.push_front(owner.to_string());
    }

    fn remove(&mut self, owner: &str, id: &str) -> bool {
        let Some(queue) = self.by_owner.get_mut(owner) else { return false };
        let before = queue.len();
        queue.retain(|x| x != id);
        let removed = queue.len() != before;
        if queue.is_empty() {
            self.by_owner.remove(owner);
            self.turns.retain(|o| o != owner);
        }
        removed
    }

    /// Owners that were just served go to the back of the turn order.
    fn served(&mut self, owners: &[String]) {
        for owner in owners {
            if let Some(at) = self.turns.iter().position(|o| o == owner) {
                if let Some(o) = self.turns.remove(at) {
                    self.turns.push_back(o);
                }
            }
        }
    }

    /// Service order: each owner's first job in turn order, then each one's second, and so on.
    fn ordered(&self) -> Vec<&String> {
        let queues: Vec<&VecDeque<String>> = self.turns.iter().filter_map(|o| self.by_owner.get(o)).collect();
        let depth = queues.iter().map(|q| q.len()).max().unwrap_or(0);
        let mut out = Vec::with_capacity(queues.iter().map(|q| q.len()).sum());
        for d in 0..depth {
            out.extend(queues.iter().filter_map(|q| q.get(d)));
        }
        out
    }

    fn len(&self) -> usize {
        self.by_owner.values().map(VecDeque::len).sum()
    }

    fn owner_len(&self, owner: &str) -> usize {
        self.by_owner.get(owner).map_or(0, VecDeque::len)
    }
}

#[derive(Default)]
struct Inner {
    lanes: [Lane; 3],
    entries: HashMap<String, Entry>,
    idempotency: HashMap<(String, String), (String, String)>,
    /// Admitted jobs whose journal write is under way, by id; their replays wait on it.
    landing: HashMap<String, watch::Receiver<Option<bool>>>,
    /// Admitted, not yet journaled, per owner.
    reserved: HashMap<String, usize>,
    /// Journaled jobs (live or finished, not yet expired or deleted), per owner.
    stored: HashMap<String, usize>,
    /// Images per second over recent batches, for Retry-After.
    throughput: f64,
}

impl Inner {
    /// Every queued id in service order: priority, then round-robin between owners.
    fn ordered(&self) -> Vec<&String> {
        self.lanes.iter().flat_map(Lane::ordered).collect()
    }

    fn queued(&self) -> usize {
        self.lanes.iter().map(Lane::len).sum()
    }

    /// Queued ids in no particular order, for sums that need no ordering.
    fn queued_ids(&self) -> impl Iterator<Item = &String> {
        self.lanes.iter().flat_map(|l| l.by_owner.values().flatten())
    }

    /// The job served next, without building the whole order.
    fn first(&self) -> Option<&String> {
        self.lanes.iter().find_map(|l| l.turns.front().and_then(|o| l.by_owner.get(o)).and_then(VecDeque::front))
    }

    fn unqueue(&mut self, id: &str) {
        let Some(e) = self.entries.get(id) else { return };
        let (owner, rank) = (e.job.owner.clone(), e.spec.priority.rank());
        self.lanes[rank].remove(&owner, id);
    }

    fn queue_back(&mut self, id: &str) {
        let Some(e) = self.entries.get(id) else { return };
        let (owner, rank) = (e.job.owner.clone(), e.spec.priority.rank());
        self.lanes[rank].push_back(&owner, id.to_string());
    }
}

pub struct Jobs {
    inner: Mutex<Inner>,
    pub wake: Notify,
    capacity: usize,
    per_key: usize,
    stored_per_key: usize,
    metrics: Arc<Metrics>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Jobs {
    /// A table that queues at most `capacity` jobs, `per_key` of them for one owner, and admits
    /// no job for an owner who already stores `stored_per_key`.
    pub fn new(capacity: usize, per_key: usize, stored_per_key: usize, metrics: Arc<Metrics>) -> Self {
        Jobs { inner: Mutex::new(Inner::default()), wake: Notify::new(), capacity, per_key, stored_per_key, metrics }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Load the journal's live jobs at start-up (queued ones keep their acceptance order) and
    /// how many jobs each owner stores.
    pub fn restore(&self, live: Vec<StoredJob>, stored: Vec<(String, usize)>) {
        let mut inner = self.lock();
        inner.stored = stored.into_iter().collect();
        for job in live.into_iter().filter(|j| !j.status.is_final()) {
            let queued = job.status == JobStatus::Queued;
            let id = job.id.clone();
            insert(&mut inner, job);
            if queued {
                inner.queue_back(&id);
            }
        }
        self.refresh(&mut inner);
        drop(inner);
        self.wake.notify_one();
    }

    /// Check idempotency, the owner's cap and capacity, and hold a queue slot for a job about to
    /// be journaled; `enqueue` or `abandon` releases it.
    pub fn admit(&self, owner: &str, idempotency_key: Option<&str>, request_hash: &str) -> Result<Admission, ApiError> {
        let mut inner = self.lock();
        if let Some(existing) = Self::replay_locked(&inner, owner, idempotency_key, request_hash)? {
            return Ok(existing);
        }
        let stored = inner.stored.get(owner).copied().unwrap_or(0) + inner.reserved.get(owner).copied().unwrap_or(0);
        if stored >= self.stored_per_key {
            self.metrics.rejected("key_store_full");
            return Ok(Admission::StoreFull { stored });
        }
        let reserved_total: usize = inner.reserved.values().sum();
        let mine = inner.lanes.iter().map(|l| l.owner_len(owner)).sum::<usize>()
            + inner.reserved.get(owner).copied().unwrap_or(0);
        if mine >= self.per_key {
            return Err(key_queue_full(&self.metrics, mine, self.per_key, self.retry_after(&inner)));
        }
        if inner.queued() + reserved_total >= self.capacity {
            return Err(queue_full(&self.metrics, self.capacity, self.retry_after(&inner)));
        }
        *inner.reserved.entry(owner.to_string()).or_default() += 1;
        self.count(&inner);
        let id = format!("gen_{}", uuid::Uuid::new_v4().simple());
        let (landed, landing) = watch::channel(None);
        if let Some(key) = idempotency_key {
            inner.idempotency.insert((owner.to_string(), key.to_string()), (id.clone(), request_hash.to_string()));
            inner.landing.insert(id.clone(), landing);
        }
        Ok(Admission::New { id, landed })
    }

    /// A live job submitted with this Idempotency-Key (ended ones are in the journal).
    pub fn replay(
        &self,
        owner: &str,
        idempotency_key: &str,
        request_hash: &str,
    ) -> Result<Option<Admission>, ApiError> {
        Self::replay_locked(&self.lock(), owner, Some(idempotency_key), request_hash)
    }

    fn replay_locked(
        inner: &Inner,
        owner: &str,
        idempotency_key: Option<&str>,
        request_hash: &str,
    ) -> Result<Option<Admission>, ApiError> {
        let Some(key) = idempotency_key else { return Ok(None) };
        let Some((id, hash)) = inner.idempotency.get(&(owner.to_string(), key.to_string())) else { return Ok(None) };
        if hash != request_hash {
            return Err(ApiError::Conflict(format!(
                "Idempotency-Key {key:?} was used for a different request (job {id})"
            )));
        }
        Ok(Some(Admission::Existing { id: id.clone(), landing: inner.landing.get(id).cloned() }))
    }

    /// Seconds until the queued images are likely done, for Retry-After.
    fn retry_after(&self, inner: &Inner) -> u64 {
        let images: usize = inner.queued_ids().filter_map(|id| inner.entries.get(id)).map(|e| e.spec.n()).sum();
        let retry = if inner.throughput > 0.0 { (images as f64 / inner.throughput).ceil() as u64 } else { 5 };
        retry.clamp(1, 300)
    }

    fn release_reservation(inner: &mut Inner, owner: &str) {
        if let Some(count) = inner.reserved.get_mut(owner) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                inner.reserved.remove(owner);
            }
        }
    }

    /// The journal refused job `id`: release its slot and its Idempotency-Key.
    pub fn abandon(&self, id: &str, owner: &str, idempotency_key: Option<&str>) {
        let mut inner = self.lock();
        Self::release_reservation(&mut inner, owner);
        inner.landing.remove(id);
        if let Some(key) = idempotency_key {
            inner.idempotency.remove(&(owner.to_string(), key.to_string()));
        }
        self.count(&inner);
    }

    /// The job is journaled: queue it.
    pub fn enqueue(&self, job: StoredJob) {
        let mut inner = self.lock();
        Self::release_reservation(&mut inner, &job.owner);
        *inner.stored.entry(job.owner.clone()).or_default() += 1;
        let id = job.id.clone();
        inner.landing.remove(&id);
        insert(&mut inner, job);
        inner.queue_back(&id);
        self.refresh(&mut inner);
        drop(inner);
        self.wake.notify_one();
    }

    /// The job is durably in a shared queue that another process may serve: release its slot;
    /// from now on the store answers for it (views, Idempotency-Key replays).
    pub fn landed_elsewhere(&self, job: &StoredJob) {
        let mut inner = self.lock();
        Self::release_reservation(&mut inner, &job.owner);
        inner.landing.remove(&job.id);
        if let Some(key) = &job.idempotency_key {
            let entry = (job.owner.clone(), key.clone());
            if inner.idempotency.get(&entry).is_some_and(|(id, _)| id == &job.id)
                && !inner.entries.contains_key(&job.id)
            {
                inner.idempotency.remove(&entry);
            }
        }
        self.count(&inner);
    }

    /// A live job's owner and view; None once it has ended (the journal has it then).
    pub fn view(&self, id: &str) -> Option<(String, JobView)> {
        let inner = self.lock();
        inner.entries.get(id).map(|e| (e.job.owner.clone(), view_of_entry(e)))
    }

    /// Views of those of `ids` that are live, in the same order.
    pub fn live_views(&self, ids: &[&str]) -> Vec<Option<JobView>> {
        let inner = self.lock();
        ids.iter().map(|id| inner.entries.get(*id).map(view_of_entry)).collect()
    }

    /// Jobs in memory: queued, running, nothing else.
    pub fn live(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Snapshot>> {
        self.lock().entries.get(id).map(|e| e.live.events.subscribe())
    }

    /// The steps a live job has reported (all of them once it succeeded).
    pub fn steps(&self, id: &str) -> Steps {
        let inner = self.lock();
        let Some(e) = inner.entries.get(id) else { return Steps::default() };
        let snap = e.live.events.borrow();
        Steps { done: snap.step, total: snap.total }
    }

    /// The journal recorded the cancellation: flag it for the batcher, tell its watchers, and
    /// let it go.
    pub fn mark_cancelled(&self, id: &str) {
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get(id) {
            e.live.cancel.store(true, Ordering::SeqCst);
            e.live.events.send_modify(|s| {
                s.status = JobStatus::Cancelled;
                s.position = None;
            });
            self.metrics.job_finished("cancelled");
        }
        retire(&mut inner, id);
        self.refresh(&mut inner);
    }

    /// The head job's batch key, when it was queued, and how many compatible images are waiting.
    pub fn head(&self) -> Option<QueueHead> {
        let inner = self.lock();
        let head = inner.entries.get(inner.first()?)?;
        let key = head.spec.batch_key();
        let images = inner
            .queued_ids()
            .filter_map(|id| inner.entries.get(id))
            .filter(|e| e.spec.batch_key() == key)
            .map(|e| e.spec.n())
            .sum();
        Some(QueueHead { key, enqueued: head.enqueued, images })
    }

    /// Take the head job and every compatible queued job that fits, in service order (priority,
    /// then owners in turn, each owner's jobs first come first served).
    pub fn take_batch(&self, max_images: usize) -> Vec<BatchJob> {
        let mut inner = self.lock();
        let order: Vec<String> = inner.ordered().into_iter().cloned().collect();
        let Some(key) = order.first().and_then(|id| inner.entries.get(id)).map(|e| e.spec.batch_key()) else {
            return Vec::new();
        };
        let mut chosen = Vec::new();
        let mut images = 0;
        for id in order {
            let Some(e) = inner.entries.get(&id) else { continue };
            if e.spec.batch_key() != key || images + e.spec.n() > max_images {
                continue;
            }
            images += e.spec.n();
            chosen.push(id);
        }
        let started = now_ms();
        let now = Instant::now();
        let mut batch = Vec::with_capacity(chosen.len());
        let mut served: [Vec<String>; 3] = Default::default();
        for id in &chosen {
            inner.unqueue(id);
            if let Some(e) = inner.entries.get(id) {
                served[e.spec.priority.rank()].push(e.job.owner.clone());
            }
            if let Some(e) = inner.entries.get_mut(id) {
                e.job.status = JobStatus::Running;
                e.job.started_ms = Some(started);
                e.job.attempts += 1;
                e.live.events.send_modify(|s| {
                    s.status = JobStatus::Running;
                    s.position = None;
                    s.step = 0;
                });
                batch.push(BatchJob {
                    id: id.clone(),
                    spec: e.spec.clone(),
                    progress: e.live.clone(),
                    waited: now.saturating_duration_since(e.enqueued),
                });
            }
        }
        for (lane, owners) in inner.lanes.iter_mut().zip(&served) {
            lane.served(owners);
        }
        self.refresh(&mut inner);
        batch
    }

    /// The journal recorded how a job ended: tell its watchers and let it go.
    pub fn mark_finished(&self, id: &str, status: JobStatus) {
        let mut inner = self.lock();
        let Some(e) = inner.entries.get(id) else { return };
        e.live.events.send_modify(|s| {
            s.status = status;
            s.position = None;
            if status == JobStatus::Succeeded {
                s.step = s.total.unwrap_or(s.step);
            }
        });
        self.metrics.job_finished(status.as_str());
        let was_queued = e.job.status == JobStatus::Queued;
        retire(&mut inner, id);
        if was_queued {
            self.refresh(&mut inner);
        } else {
            self.count(&inner);
        }
    }

    /// Put jobs whose batch never started back at the head of their queues.
    pub fn requeue_front(&self, ids: &[String]) {
        let mut inner = self.lock();
        for id in ids.iter().rev() {
            let Some(e) = inner.entries.get_mut(id) else { continue };
            if e.job.status != JobStatus::Running {
                continue;
            }
            e.job.status = JobStatus::Queued;
            e.job.attempts = e.job.attempts.saturating_sub(1);
            e.live.events.send_modify(|s| s.status = JobStatus::Queued);
            let (owner, rank) = (e.job.owner.clone(), e.spec.priority.rank());
            inner.lanes[rank].push_front(&owner, id.clone());
        }
        self.refresh(&mut inner);
    }

    /// Make memory say what the journal says about a job (after a write that changed nothing or
    /// failed): its status, times and error; a job no longer queued leaves the queue.
    pub fn sync(&self, stored: &StoredJob) {
        let mut inner = self.lock();
        let Some(e) = inner.entries.get_mut(&stored.id) else { return };
        let was = e.job.status;
        if was == stored.status {
            return;
        }
        if stored.status.is_final() {
            drop(inner);
            if stored.status == JobStatus::Cancelled {
                self.mark_cancelled(&stored.id);
            } else {
                self.mark_finished(&stored.id, stored.status);
            }
            return;
        }
        e.job.status = stored.status;
        e.job.started_ms = stored.started_ms;
        e.job.finished_ms = stored.finished_ms;
        e.job.error = stored.error.clone();
        e.job.nfe = stored.nfe;
        e.job.inference_ms = stored.inference_ms;
        e.job.attempts = stored.attempts;
        let status = stored.status;
        e.live.events.send_modify(|s| {
            s.status = status;
            s.position = None;
        });
        if was == JobStatus::Queued {
            inner.unqueue(&stored.id);
        }
        if status == JobStatus::Queued {
            inner.queue_back(&stored.id);
        }
        self.refresh(&mut inner);
    }

    pub fn record_throughput(&self, images: usize, seconds: f64) {
        if seconds <= 0.0 {
            return;
        }
        let mut inner = self.lock();
        let rate = images as f64 / seconds;
        inner.throughput = if inner.throughput > 0.0 { 0.8 * inner.throughput + 0.2 * rate } else { rate };
    }

    pub fn queued(&self) -> usize {
        self.lock().queued()
    }

    /// Jobs deleted from the journal no longer count against their owners.
    pub fn forget(&self, removed: &[Removed]) {
        let mut inner = self.lock();
        for job in removed {
            retire(&mut inner, &job.id);
            if let Some(count) = inner.stored.get_mut(&job.owner) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    inner.stored.remove(&job.owner);
                }
            }
        }
    }

    /// Queue positions and gauges after any queue change.
    fn refresh(&self, inner: &mut Inner) {
        let mut position = 0;
        let mut images = 0;
        for id in inner.ordered() {
            if let Some(e) = inner.entries.get(id) {
                e.live.events.send_if_modified(|s| {
                    let changed = s.position != Some(position);
                    s.position = Some(position);
                    changed
                });
                images += e.spec.n();
            }
            position += 1;
        }
        self.metrics.queue_depth.set(position as i64);
        self.metrics.queued_images.set(images as i64);
        self.count(inner);
    }

    /// The gauges of what memory holds.
    fn count(&self, inner: &Inner) {
        self.metrics.live_jobs.set(inner.entries.len() as i64);
        self.metrics.admissions_in_flight.set(inner.reserved.values().sum::<usize>() as i64);
    }
}

/// 429 for a key with `queued` jobs queued, the most `queue.max_queued_per_key` allows.
pub(crate) fn key_queue_full(metrics: &Metrics, queued: usize, per_key: usize, retry_after_s: u64) -> ApiError {
    metrics.rejected("key_queue_full");
    ApiError::Overloaded {
        message: format!(
            "this API key already has {queued} jobs queued, the most one key may have (queue.max_queued_per_key = {per_key}); \
             retry when some have started"
        ),
        retry_after_s,
    }
}

/// 429 for a queue holding `queue.capacity` jobs.
pub(crate) fn queue_full(metrics: &Metrics, capacity: usize, retry_after_s: u64) -> ApiError {
    metrics.rejected("queue_full");
    ApiError::Overloaded { message: format!("the queue is full ({capacity} jobs); retry later"), retry_after_s }
}

fn insert(inner: &mut Inner, job: StoredJob) {
    let snapshot = Snapshot { status: job.status, position: None, step: 0, total: None };
    let (events, _) = watch::channel(snapshot);
    if let Some(key) = &job.idempotency_key {
        inner.idempotency.insert((job.owner.clone(), key.clone()), (job.id.clone(), job.request_hash.clone()));
    }
    let live = LiveJob { events, cancel: AtomicBool::new(job.status == JobStatus::Cancelled) };
    let entry = Entry { spec: Arc::new(job.spec.clone()), enqueued: Instant::now(), live: Arc::new(live), job };
    inner.entries.insert(entry.job.id.clone(), entry);
}

/// A job that ended leaves memory: the journal serves it from now on.
fn retire(inner: &mut Inner, id: &str) {
    inner.unqueue(id);
    inner.landing.remove(id);
    if let Some(e) = inner.entries.remove(id) {
        if let Some(key) = e.job.idempotency_key {
            inner.idempotency.remove(&(e.job.owner, key));
        }
    }
}

fn view_of_entry(e: &Entry) -> JobView {
    let snap = e.live.events.borrow().clone();
    view_of(&e.job, Some(&snap))
}

/// What clients see of a job: live progress from `live`, or what the journal kept of it.
pub fn view_of(job: &StoredJob, live: Option<&Snapshot>) -> JobView {
    let spec = &job.spec;
    let (position, step, total) = match live {
        Some(snap) => (snap.position, snap.step, snap.total),
        None => (None, job.steps.done, job.steps.total),
    };
    let images = if job.status == JobStatus::Succeeded {
        (0..spec.n()).map(|i| format!("/v1/generations/{}/images/{i}", job.id)).collect()
    } else {
        Vec::new()
    };
    JobView {
        id: job.id.clone(),
        status: job.status,
        model: spec.model.clone(),
        queue_position: if job.status == JobStatus::Queued { position } else { None },
        step: if job.status == JobStatus::Succeeded { total.unwrap_or(step) } else { step },
        total,
        n: spec.n(),
        labels: spec.labels.clone(),
        seeds: spec.seeds.clone(),
        sampler: spec.settings.sampler.clone(),
        steps: spec.settings.steps,
        guidance: spec.settings.guidance,
        guidance_interval: spec.settings.guidance_interval.map(|(lo, hi)| [lo, hi]),
        schedule: spec.settings.schedule.clone(),
        priority: spec.priority,
        created_at_ms: job.created_ms,
        started_at_ms: job.started_ms,
        finished_at_ms: job.finished_ms,
        queue_seconds: job.started_ms.map(|s| (s - job.created_ms).max(0) as f64 / 1000.0),
        inference_seconds: job.inference_ms.map(|ms| ms as f64 / 1000.0),
        nfe: job.nfe,
        attempts: job.attempts,
        output_format: spec.output_format.clone(),
        images,
        error: job.error.clone(),
    }
}
