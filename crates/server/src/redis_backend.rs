//! The shared backend behind the queue boundary: Redis Streams with a consumer group, so API and
//! worker processes can run apart and any number of workers share one queue.
//!
//! - A job is a hash (`{prefix}:job:{id}`); its id goes on the stream of its priority. Every
//!   state change is one Lua script, so it is atomic however many processes race.
//! - API processes accept (the 202 follows the script that writes the hash and the stream entry,
//!   with the capacity and per-key checks inside it), serve status, images and SSE, and cancel.
//! - Workers read entries with XREADGROUP into a small local queue (the same `Jobs` table the
//!   embedded backend uses, so batching is the same), start each job when its batch starts (one
//!   more attempt), heartbeat what they hold (XCLAIM JUSTID), take over the jobs of a worker that
//!   stopped heartbeating (XAUTOCLAIM past `queue.visibility_timeout_s`), and write a result
//!   once: a job that is no longer running is not written again.
//! - A job that was running whenever its worker died, or on which the engine panicked, runs again
//!   until it has been started `queue.max_attempts` times; then it fails with its error and goes
//!   to the dead-letter stream (`{prefix}:dead`).
//! - Progress and cancellation travel over pub/sub (`{prefix}:events`, `{prefix}:cancel`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::{Script, Value};
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::error::{Refusal, Result, ServerError};
use crate::job::{JobSpec, JobStatus, Priority, Steps, StoredJob};
use crate::jobs::{now_ms, Jobs};
use crate::metrics::Metrics;
use crate::queue::{BatchJob, JobProgress, JobQueue, JobStore, Outcome, ProgressHub, QueueHead, Removed, Snapshot};

/// The consumer group every worker joins.
const GROUP: &str = "workers";
const PRIORITIES: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

/// What the backend needs from the configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    /// This process's name in the consumer group.
    pub consumer: String,
    pub visibility: Duration,
    pub max_attempts: u32,
    pub capacity: usize,
    pub per_key: usize,
    pub stored_per_key: usize,
    pub max_batch: usize,
    pub ttl_ms: i64,
}

impl RedisSettings {
    pub fn from_config(config: &ServerConfig, consumer: String) -> Self {
        let q = &config.queue;
        RedisSettings {
            url: q.url.trim().to_string(),
            prefix: q.redis_prefix.clone(),
            consumer,
            visibility: Duration::from_secs(q.visibility_timeout_s),
            max_attempts: q.max_attempts,
            capacity: q.capacity,
            per_key: q.max_queued_per_key,
            stored_per_key: q.max_stored_per_key,
            max_batch: q.max_batch,
            ttl_ms: (q.result_ttl_s as i64).saturating_mul(1000),
        }
    }
}

/// Every key and channel name, under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.to_string() }
    }

    pub fn job(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }

    fn image_prefix(&self, id: &str) -> String {
        format!("{}:img:{id}:", self.prefix)
    }

    fn owner_prefix(&self) -> String {
        format!("{}:owner:", self.prefix)
    }

    fn owner(&self, owner: &str) -> String {
        format!("{}{owner}", self.owner_prefix())
    }

    fn finished(&self) -> String {
        format!("{}:finished", self.prefix)
    }

    fn idempotency(&self, owner: &str, key: &str) -> String {
        format!("{}:idem:{owner}:{key}", self.prefix)
    }

    fn queued(&self) -> String {
        format!("{}:queued", self.prefix)
    }

    fn queued_by_owner(&self) -> String {
        format!("{}:queued_by_owner", self.prefix)
    }

    pub fn stream(&self, priority: Priority) -> String {
        let name = match priority {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        };
        format!("{}:stream:{name}", self.prefix)
    }

    /// Jobs failed for good after `queue.max_attempts` starts, with their error.
    pub fn dead_letter(&self) -> String {
        format!("{}:dead", self.prefix)
    }

    fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    fn cancels(&self) -> String {
        format!("{}:cancel", self.prefix)
    }
}

// Accept a job: refuse it past the shared capacity and per-key limits, or answer the job an
// earlier request with the same Idempotency-Key made; else write it and queue it.
const ENQUEUE: &str = r#"
if ARGV[7] == '1' then
  local prior = redis.call('GET', KEYS[3])
  if prior then return {2, prior} end
end
local stored = redis.call('ZCARD', KEYS[2])
if stored >= tonumber(ARGV[6]) then return {-3, tostring(stored)} end
local mine = tonumber(redis.call('HGET', KEYS[5], ARGV[2]) or '0')
if mine >= tonumber(ARGV[5]) then return {-2, tostring(mine)} end
local all = tonumber(redis.call('GET', KEYS[4]) or '0')
if all >= tonumber(ARGV[4]) then return {-1, tostring(all)} end
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local entry = redis.call('XADD', KEYS[6], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'stream', KEYS[6], 'entry', entry)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], ARGV[8])
  redis.call('HSET', KEYS[1], 'idem_key', KEYS[3])
end
redis.call('INCR', KEYS[4])
redis.call('HINCRBY', KEYS[5], ARGV[2], 1)
redis.call('PUBLISH', ARGV[9], ARGV[1] .. ' queued 0 -')
return {1, entry}
"#;

// Start a queued job for a batch: one more attempt. Anything else is not run.
const START: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' then return {-1, status or 'gone'} end
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('DECR', KEYS[2])
redis.call('HINCRBY', KEYS[3], owner, -1)
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started_ms', ARGV[1], 'worker', ARGV[2], 'step', '0', 'seen_ms', ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' running 0 -')
return {attempts, 'running'}
"#;

// A batch that never started: the job is queued again, and the start did not count.
const UNSTART: &str = r#"
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('INCR', KEYS[2])
redis.call('HINCRBY', KEYS[3], owner, 1)
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'step', '0')
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' queued 0 -')
return 1
"#;

// A running job whose run ended without a result (its worker died, or the engine panicked): queue
// it again, or fail it into the dead-letter stream once it has been started max_attempts times.
// ARGV[7] 'new' gives it a fresh stream entry (any worker may take it); 'keep' leaves the entry
// with the worker that took it over.
const REQUEUE: &str = r#"
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local stream = redis.call('HGET', KEYS[1], 'stream')
local entry = redis.call('HGET', KEYS[1], 'entry')
local step = redis.call('HGET', KEYS[1], 'step') or '0'
if attempts >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_ms', ARGV[1], 'error', ARGV[3])
  redis.call('ZADD', KEYS[5], ARGV[1], ARGV[4])
  redis.call('XADD', KEYS[4], '*', 'id', ARGV[4], 'error', ARGV[3], 'attempts', tostring(attempts),
    'worker', redis.call('HGET', KEYS[1], 'worker') or '')
  redis.call('XACK', stream, ARGV[5], entry)
  redis.call('XDEL', stream, entry)
  redis.call('PUBLISH', ARGV[6], ARGV[4] .. ' failed ' .. step .. ' -')
  return 0
end
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('INCR', KEYS[2])
redis.call('HINCRBY', KEYS[3], owner, 1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'step', '0')
if ARGV[7] == 'new' then
  redis.call('XACK', stream, ARGV[5], entry)
  redis.call('XDEL', stream, entry)
  redis.call('HSET', KEYS[1], 'entry', redis.call('XADD', stream, '*', 'id', ARGV[4]))
end
redis.call('PUBLISH', ARGV[6], ARGV[4] .. ' queued 0 -')
return 1
"#;

// Write how a running job ended, with its images, once: a job no longer running is left alone.
const FINISH: &str = r#"
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_ms', ARGV[2], 'error', ARGV[3], 'nfe', ARGV[4],
  'inference_ms', ARGV[5], 'step', ARGV[6], 'total', ARGV[7])
for i = 13, #ARGV do
  redis.call('SET', ARGV[12] .. (i - 13), ARGV[i], 'PX', ARGV[8])
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[9])
local stream = redis.call('HGET', KEYS[1], 'stream')
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', stream, ARGV[10], entry)
redis.call('XDEL', stream, entry)
local total = ARGV[7]
if total == '' then total = '-' end
redis.call('PUBLISH', ARGV[11], ARGV[9] .. ' ' .. ARGV[1] .. ' ' .. ARGV[6] .. ' ' .. total)
return 1
"#;

// Cancel a queued or running job; the worker running it hears of it on the cancel channel.
const CANCEL: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
if status == 'queued' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  redis.call('DECR', KEYS[3])
  redis.call('HINCRBY', KEYS[4], owner, -1)
end
local stream = redis.call('HGET', KEYS[1], 'stream')
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', stream, ARGV[3], entry)
redis.call('XDEL', stream, entry)
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_ms', ARGV[1], 'error', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
local step = redis.call('HGET', KEYS[1], 'step') or '0'
redis.call('PUBLISH', ARGV[4], ARGV[2] .. ' cancelled ' .. step .. ' -')
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 1
"#;

// Delete a job that ended (of ARGV[1], or anyone's when it is empty) with its images, its
// Idempotency-Key and its index entries; returns its owner, or '' when nothing was deleted.
const DELETE: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return ''
end
if ARGV[1] ~= '' and owner ~= ARGV[1] then return '' end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'cancelled' then return '' end
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
for i = 0, n - 1 do redis.call('DEL', ARGV[4] .. i) end
local idem = redis.call('HGET', KEYS[1], 'idem_key')
if idem then redis.call('DEL', idem) end
redis.call('ZREM', ARGV[3] .. owner, ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
return owner
"#;

// A queued job a stopping worker held: a fresh stream entry, so any worker takes it at once.
const HAND_BACK: &str = r#"
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local stream = redis.call('HGET', KEYS[1], 'stream')
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry ~= ARGV[2] then return 0 end
redis.call('XACK', stream, ARGV[1], entry)
redis.call('XDEL', stream, entry)
redis.call('HSET', KEYS[1], 'entry', redis.call('XADD', stream, '*', 'id', ARGV[3]))
return 1
"#;

struct Scripts {
    hand_back: Script,
    enqueue: Script,
    start: Script,
    unstart: Script,
    requeue: Script,
    finish: Script,
    cancel: Script,
    delete: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            hand_back: Script::new(HAND_BACK),
            enqueue: Script::new(ENQUEUE),
            start: Script::new(START),
            unstart: Script::new(UNSTART),
            requeue: Script::new(REQUEUE),
            finish: Script::new(FINISH),
            cancel: Script::new(CANCEL),
            delete: Script::new(DELETE),
        }
    }
}

/// A stream entry a worker holds (in its pending list), queued locally or running.
#[derive(Debug, Clone)]
struct Held {
    stream: String,
    entry: String,
}

/// Wire form of a progress event: `id status step total` (total `-` when unknown).
fn parse_event(text: &str) -> Option<(String, Snapshot)> {
    let mut parts = text.split(' ');
    let id = parts.next()?.to_string();
    let status = JobStatus::parse(parts.next()?)?;
    let step = parts.next()?.parse().ok()?;
    let total = parts.next().and_then(|t| t.parse().ok());
    Some((id, Snapshot { status, position: None, step, total }))
}

fn bulk(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn array(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) => items,
        _ => &[],
    }
}

/// Stream entries `[[entry, [field, value, ...]], ...]` as (entry id, job id).
fn stream_entries(value: &Value) -> Vec<(String, String)> {
    array(value)
        .iter()
        .filter_map(|item| {
            let parts = array(item);
            let entry = bulk(parts.first()?)?;
            let fields = array(parts.get(1)?);
            let job = fields.chunks(2).find(|pair| bulk(&pair[0]).as_deref() == Some("id")).and_then(|p| p.get(1))?;
            Some((entry, bulk(job)?))
        })
        .collect()
}

/// The hash fields of a job just accepted.
fn job_fields(job: &StoredJob) -> Result<Vec<(String, String)>> {
    let spec = serde_json::to_string(&job.spec)
        .map_err(|e| ServerError::Corrupt { id: job.id.clone(), message: e.to_string() })?;
    let mut fields = vec![
        ("id".to_string(), job.id.clone()),
        ("owner".to_string(), job.owner.clone()),
        ("hash".to_string(), job.request_hash.clone()),
        ("spec".to_string(), spec),
        ("status".to_string(), JobStatus::Queued.as_str().to_string()),
        ("created_ms".to_string(), job.created_ms.to_string()),
        ("attempts".to_string(), "0".to_string()),
        ("step".to_string(), "0".to_string()),
        ("n".to_string(), job.spec.n().to_string()),
    ];
    if let Some(key) = &job.idempotency_key {
        fields.push(("idem".to_string(), key.clone()));
    }
    Ok(fields)
}

/// A job read back from its hash; None when there is no such job.
fn parse_job(id: &str, map: &HashMap<String, String>) -> Result<Option<StoredJob>> {
    if map.is_empty() {
        return Ok(None);
    }
    let corrupt = |message: String| ServerError::Corrupt { id: id.to_string(), message };
    let text = |key: &str| map.get(key).filter(|v| !v.is_empty()).cloned();
    let number = |key: &str| map.get(key).and_then(|v| v.parse::<i64>().ok());
    let status = map
        .get("status")
        .and_then(|s| JobStatus::parse(s))
        .ok_or_else(|| corrupt(format!("status {:?}", map.get("status"))))?;
    let spec: JobSpec = serde_json::from_str(map.get("spec").map(String::as_str).unwrap_or(""))
        .map_err(|e| corrupt(format!("spec: {e}")))?;
    Ok(Some(StoredJob {
        id: id.to_string(),
        owner: text("owner").ok_or_else(|| corrupt("no owner".into()))?,
        idempotency_key: text("idem"),
        request_hash: text("hash").unwrap_or_default(),
        spec,
        status,
        created_ms: number("created_ms").unwrap_or(0),
        started_ms: number("started_ms"),
        finished_ms: number("finished_ms"),
        error: text("error"),
        nfe: number("nfe").map(|n| n.max(0) as usize),
        attempts: number("attempts").unwrap_or(0).max(0) as u32,
        inference_ms: number("inference_ms"),
        steps: Steps {
            done: number("step").unwrap_or(0).max(0) as usize,
            total: number("total").map(|t| t.max(0) as usize),
        },
    }))
}

type Connection = r2d2::PooledConnection<redis::Client>;

pub struct RedisBackend {
    pool: r2d2::Pool<redis::Client>,
    client: redis::Client,
    keys: Keys,
    settings: RedisSettings,
    scripts: Scripts,
    /// Worker side: jobs taken from the streams, queued locally until their batch starts.
    jobs: Arc<Jobs>,
    held: Mutex<HashMap<String, Held>>,
    /// Jobs this worker started and has not written the end of.
    running: Mutex<HashSet<String>>,
    /// SSE watchers of live jobs, fed by the events channel.
    watchers: Mutex<HashMap<String, watch::Sender<Snapshot>>>,
    metrics: Arc<Metrics>,
    /// Draining: no new jobs are read; heartbeats go on for the batch that finishes.
    draining: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisBackend {
    /// Connect (failing with the URL when Redis cannot be reached) and create the consumer
    /// group of each priority's stream.
    pub fn open(settings: RedisSettings, jobs: Arc<Jobs>, metrics: Arc<Metrics>) -> Result<Self> {
        let client = redis::Client::open(settings.url.as_str())?;
        let pool = r2d2::Pool::builder()
            .max_size(16)
            .connection_timeout(Duration::from_secs(5))
            .build(client.clone())
            .map_err(|e| ServerError::RedisPool(format!("queue.url {}: {e}", settings.url)))?;
        let keys = Keys::new(&settings.prefix);
        let backend = RedisBackend {
            pool,
            client,
            keys,
            settings,
            scripts: Scripts::new(),
            jobs,
            held: Mutex::new(HashMap::new()),
            running: Mutex::new(HashSet::new()),
            watchers: Mutex::new(HashMap::new()),
            metrics,
            draining: AtomicBool::new(false),
        };
        backend.create_groups()?;
        Ok(backend)
    }

    /// The consumer group on each priority's stream (again after Redis lost its data).
    fn create_groups(&self) -> Result<()> {
        let mut con = self.connection()?;
        for priority in PRIORITIES {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.keys.stream(priority))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query(&mut *con);
            match created {
                Ok(()) => {}
                // Another process created it first.
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Whether Redis answers now (readiness follows it).
    pub fn ping(&self) -> Result<()> {
        let mut con = self.connection()?;
        let _: String = redis::cmd("PING").query(&mut *con)?;
        Ok(())
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn connection(&self) -> Result<Connection> {
        self.pool.get().map_err(|e| ServerError::RedisPool(format!("queue.url {}: {e}", self.settings.url)))
    }

    /// Start the pub/sub listener (every role) and, for a worker, the stream reader and the
    /// heartbeat/takeover loop. They run for the life of the process (heartbeats go on while a
    /// draining worker finishes its batch).
    pub fn start_background(self: &Arc<Self>, runs_engine: bool) {
        let me = self.clone();
        std::thread::Builder::new().name("redis-events".into()).spawn(move || me.listen()).ok();
        if runs_engine {
            let me = self.clone();
            std::thread::Builder::new().name("redis-reader".into()).spawn(move || me.read_streams()).ok();
            let me = self.clone();
            std::thread::Builder::new().name("redis-heartbeat".into()).spawn(move || me.maintain()).ok();
        }
    }

    /// Listen to the events and cancel channels, reconnecting after a lost connection.
    fn listen(&self) {
        loop {
            if let Err(err) = self.listen_once() {
                tracing::warn!(error = %err, "redis pub/sub connection lost; reconnecting in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    /// Returns only when the connection fails.
    fn listen_once(&self) -> Result<()> {
        let mut con = self.client.get_connection()?;
        let mut pubsub = con.as_pubsub();
        pubsub.subscribe(self.keys.events())?;
        pubsub.subscribe(self.keys.cancels())?;
        pubsub.set_read_timeout(Some(Duration::from_millis(500)))?;
        // Events missed while disconnected: read the watched jobs' state again.
        self.refresh_watchers();
        let cancels = self.keys.cancels();
        loop {
            let message = match pubsub.get_message() {
                Ok(message) => message,
                Err(e) if e.is_timeout() => {
                    self.prune_watchers();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let payload: String = message.get_payload().unwrap_or_default();
            if message.get_channel_name() == cancels {
                self.cancelled_elsewhere(&payload);
            } else if let Some((id, snapshot)) = parse_event(&payload) {
                self.publish_local(&id, snapshot);
            }
        }
    }

    /// Tell a job's watchers; a final state is never overwritten by a late earlier event.
    fn publish_local(&self, id: &str, snapshot: Snapshot) {
        let mut watchers = lock(&self.watchers);
        let Some(sender) = watchers.get(id) else { return };
        let last = snapshot.status.is_final();
        sender.send_if_modified(|s| {
            if s.status.is_final() || *s == snapshot {
                return false;
            }
            *s = snapshot;
            true
        });
        if last {
            watchers.remove(id);
        }
    }

    fn prune_watchers(&self) {
        lock(&self.watchers).retain(|_, sender| sender.receiver_count() > 0);
    }

    fn refresh_watchers(&self) {
        let ids: Vec<String> = lock(&self.watchers).keys().cloned().collect();
        for id in ids {
            if let Ok(Some(job)) = self.load(&id) {
                self.publish_local(&id, snapshot_of(&job));
            }
        }
    }

    /// A job this worker holds was cancelled: stop it at its next step and let it go.
    fn cancelled_elsewhere(&self, id: &str) {
        if lock(&self.held).remove(id).is_some() {
            lock(&self.running).remove(id);
            self.jobs.mark_cancelled(id);
            self.jobs.wake.notify_one();
            tracing::info!(job = %id, "job cancelled by a client");
        }
    }

    /// Worker: read new entries whenever no batch runs here and the local queue has room, so
    /// a busy worker leaves new jobs to idle ones.
    fn read_streams(&self) {
        let mut con: Option<redis::Connection> = None;
        while !self.draining.load(Ordering::SeqCst) {
            let room = self.settings.max_batch.saturating_sub(self.jobs.queued());
            if room == 0 || !lock(&self.running).is_empty() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let reader = match con.as_mut() {
                Some(c) => c,
                None => match self.client.get_connection() {
                    Ok(c) => con.insert(c),
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot reach redis to read jobs; retrying in 1 s");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let mut read = redis::cmd("XREADGROUP");
            read.arg("GROUP").arg(GROUP).arg(&self.settings.consumer).arg("COUNT").arg(room).arg("BLOCK").arg(500);
            read.arg("STREAMS");
            for priority in PRIORITIES {
                read.arg(self.keys.stream(priority));
            }
            read.arg(">").arg(">").arg(">");
            let reply: redis::RedisResult<Value> = read.query(reader);
            match reply {
                Ok(value) => {
                    for stream in array(&value) {
                        let parts = array(stream);
                        let (Some(name), Some(entries)) = (parts.first().and_then(bulk), parts.get(1)) else {
                            continue;
                        };
                        for (entry, id) in stream_entries(entries) {
                            self.hold(&name, &entry, &id, None);
                        }
                    }
                }
                Err(err) if err.code() == Some("NOGROUP") => {
                    // A Redis that restarted without its data has no group: make it again.
                    tracing::warn!("the job streams' consumer group is gone (Redis lost its data?); creating it again");
                    if let Err(err) = self.create_groups() {
                        tracing::warn!(error = %err, "cannot create the consumer group; retrying in 1 s");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "reading the job streams failed; retrying in 1 s");
                    con = None;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Take a stream entry into the local queue, or acknowledge it when its job has ended.
    /// `taken_over` is how long its previous worker had been silent.
    fn hold(&self, stream: &str, entry: &str, id: &str, taken_over: Option<Duration>) {
        let mut job = match self.load(id) {
            Ok(job) => job,
            Err(err) => {
                tracing::error!(job = %id, error = %err, "cannot read a job from redis; it is retried after the visibility timeout");
                return;
            }
        };
        if job.as_ref().is_some_and(|j| j.status == JobStatus::Running) && taken_over.is_some() {
            // Its worker died while running it: that start counts; past max_attempts it fails.
            let error = format!(
                "the worker running this job stopped (it crashed or was killed) at each of its {} starts \
                 (queue.max_attempts); it is not retried",
                self.settings.max_attempts
            );
            match self.requeue(id, &error, "keep") {
                Ok(1) => tracing::warn!(job = %id, "took over a job whose worker died while running it"),
                Ok(_) => {
                    tracing::error!(job = %id, "job failed for good: its worker died at every start (dead-lettered)")
                }
                Err(err) => {
                    tracing::error!(job = %id, error = %err, "cannot requeue a job taken over");
                    return;
                }
            }
            job = self.load(id).ok().flatten();
        }
        match job {
            Some(job) if job.status == JobStatus::Queued => {
                if let Some(delay) = taken_over {
                    self.metrics.redelivery_seconds.observe(delay.as_secs_f64());
                    tracing::info!(job = %id, silent_ms = delay.as_millis() as u64, "job taken over from a silent worker");
                }
                let mut held = lock(&self.held);
                if held.contains_key(id) {
                    return;
                }
                held.insert(id.to_string(), Held { stream: stream.to_string(), entry: entry.to_string() });
                drop(held);
                // The first heartbeat: a takeover measures its worker's silence from here.
                if let Ok(mut con) = self.connection() {
                    let _: redis::RedisResult<()> =
                        redis::cmd("HSET").arg(self.keys.job(id)).arg("seen_ms").arg(now_ms()).query(&mut *con);
                }
                self.jobs.enqueue(job);
            }
            // Running on another worker that is alive (read again after a group reset): not ours.
            Some(job) if job.status == JobStatus::Running => {}
            _ => {
                // Ended, expired or deleted: nothing to run.
                if let Ok(mut con) = self.connection() {
                    let _: redis::RedisResult<()> = redis::pipe()
                        .cmd("XACK")
                        .arg(stream)
                        .arg(GROUP)
                        .arg(entry)
                        .cmd("XDEL")
                        .arg(stream)
                        .arg(entry)
                        .query(&mut *con);
                }
            }
        }
    }

    /// Worker: heartbeat the held entries and take over those of silent workers, every third
    /// of the visibility timeout.
    fn maintain(&self) {
        let period = self.settings.visibility / 3;
        loop {
            std::thread::sleep(period.max(Duration::from_millis(200)));
            if let Err(err) = self.heartbeat() {
                tracing::warn!(error = %err, "heartbeat to redis failed");
            }
            // Even while a batch runs here: a dead worker's jobs then run next on this one, not
            // whenever every worker happens to be idle at a tick (minutes under steady load).
            if self.jobs.queued() < self.settings.max_batch {
                if let Err(err) = self.take_over() {
                    tracing::warn!(error = %err, "taking over silent workers' jobs failed");
                }
            }
        }
    }

    fn heartbeat(&self) -> Result<()> {
        let held: Vec<(String, Held)> = lock(&self.held).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut by_stream: HashMap<&str, Vec<&str>> = HashMap::new();
        for (_, h) in &held {
            by_stream.entry(h.stream.as_str()).or_default().push(h.entry.as_str());
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for (stream, entries) in by_stream {
            // Resets each entry's idle time without counting a delivery.
            pipe.cmd("XCLAIM").arg(stream).arg(GROUP).arg(&self.settings.consumer).arg(0).arg(entries).arg("JUSTID");
        }
        for (id, _) in &held {
            pipe.cmd("HSET").arg(self.keys.job(id)).arg("seen_ms").arg(now).ignore();
        }
        let mut con = self.connection()?;
        let _: Vec<Value> = pipe.query(&mut *con)?;
        Ok(())
    }

    fn take_over(&self) -> Result<()> {
        let idle_ms = self.settings.visibility.as_millis() as u64;
        let mut con = self.connection()?;
        for priority in PRIORITIES {
            let stream = self.keys.stream(priority);
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg(&self.settings.consumer)
                .arg(idle_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(self.settings.max_batch.saturating_sub(self.jobs.queued()).max(1))
                .query(&mut *con)?;
            let claimed = array(&reply).get(1).map(stream_entries).unwrap_or_default();
            for (entry, id) in claimed {
                // Last heard of: a heartbeat, or its acceptance (read by a worker that died before holding it).
                let (seen, created): (Option<i64>, Option<i64>) =
                    redis::cmd("HMGET").arg(self.keys.job(&id)).arg("seen_ms").arg("created_ms").query(&mut *con)?;
                let last = seen.or(created).unwrap_or_else(now_ms);
                let silent = Duration::from_millis((now_ms() - last).max(0) as u64);
                self.hold(&stream, &entry, &id, Some(silent));
            }
        }
        Ok(())
    }

    fn requeue(&self, id: &str, error: &str, mode: &str) -> Result<i64> {
        let mut con = self.connection()?;
        let code: i64 = self
            .scripts
            .requeue
            .key(self.keys.job(id))
            .key(self.keys.queued())
            .key(self.keys.queued_by_owner())
            .key(self.keys.dead_letter())
            .key(self.keys.finished())
            .arg(now_ms())
            .arg(self.settings.max_attempts)
            .arg(error)
            .arg(id)
            .arg(GROUP)
            .arg(self.keys.events())
            .arg(mode)
            .invoke(&mut *con)?;
        Ok(code)
    }

    /// The job is no longer held here.
    fn let_go(&self, id: &str) {
        lock(&self.held).remove(id);
        lock(&self.running).remove(id);
    }

    /// Entries of the dead-letter stream: (job id, error).
    pub fn dead_letters(&self) -> Result<Vec<(String, String)>> {
        let mut con = self.connection()?;
        let reply: Value = redis::cmd("XRANGE").arg(self.keys.dead_letter()).arg("-").arg("+").query(&mut *con)?;
        Ok(array(&reply)
            .iter()
            .filter_map(|item| {
                let parts = array(item);
                let fields = array(parts.get(1)?);
                let field = |name: &str| {
                    fields
                        .chunks(2)
                        .find(|p| bulk(&p[0]).as_deref() == Some(name))
                        .and_then(|p| p.get(1))
                        .and_then(bulk)
                };
                Some((field("id")?, field("error").unwrap_or_default()))
            })
            .collect())
    }
}

fn snapshot_of(job: &StoredJob) -> Snapshot {
    Snapshot { status: job.status, position: None, step: job.steps.done, total: job.steps.total }
}

/// A running job's progress: written to its hash and published for the API's SSE watchers.
struct RedisProgress {
    local: Arc<dyn JobProgress>,
    id: String,
    job_key: String,
    events: String,
    pool: r2d2::Pool<redis::Client>,
    /// When progress last went to Redis: a round trip per job and step would slow the batch.
    published: Mutex<Option<Instant>>,
}

/// The most often one job's progress is written to Redis (its final step always is).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

impl JobProgress for RedisProgress {
    fn step(&self, step: usize, total: Option<usize>) {
        self.local.step(step, total);
        if self.local.is_cancelled() {
            return;
        }
        {
            let mut published = lock(&self.published);
            let due = published.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) || Some(step) == total;
            if !due {
                return;
            }
            *published = Some(Instant::now());
        }
        let Ok(mut con) = self.pool.get() else { return };
        let total_text = total.map(|t| t.to_string()).unwrap_or_default();
        let event =
            format!("{} running {step} {}", self.id, total.map(|t| t.to_string()).unwrap_or_else(|| "-".into()));
        let written: redis::RedisResult<()> = redis::pipe()
            .cmd("HSET")
            .arg(&self.job_key)
            .arg("step")
            .arg(step)
            .arg("total")
            .arg(total_text)
            .ignore()
            .cmd("PUBLISH")
            .arg(&self.events)
            .arg(event)
            .ignore()
            .query(&mut *con);
        if let Err(err) = written {
            tracing::debug!(job = %self.id, error = %err, "progress not published");
        }
    }

    fn is_cancelled(&self) -> bool {
        self.local.is_cancelled()
    }
}

impl JobQueue for RedisBackend {
    fn enqueue(&self, job: StoredJob) -> Result<()> {
        let fields = job_fields(&job)?;
        let idempotency = job.idempotency_key.as_deref().map(|key| self.keys.idempotency(&job.owner, key));
        let mut con = self.connection()?;
        let mut call = self.scripts.enqueue.prepare_invoke();
        call.key(self.keys.job(&job.id))
            .key(self.keys.owner(&job.owner))
            .key(idempotency.clone().unwrap_or_else(|| format!("{}:idem:-", self.settings.prefix)))
            .key(self.keys.queued())
            .key(self.keys.queued_by_owner())
            .key(self.keys.stream(job.spec.priority))
            .arg(&job.id)
            .arg(&job.owner)
            .arg(job.created_ms)
            .arg(self.settings.capacity)
            .arg(self.settings.per_key)
            .arg(self.settings.stored_per_key)
            .arg(if idempotency.is_some() { "1" } else { "0" })
            .arg(format!("{}\t{}", job.id, job.request_hash))
            .arg(self.keys.events());
        for (field, value) in &fields {
            call.arg(field).arg(value);
        }
        let (code, detail): (i64, String) = call.invoke(&mut *con)?;
        let count = || detail.parse().unwrap_or(0);
        match code {
            1 => {
                self.jobs.landed_elsewhere(&job);
                Ok(())
            }
            2 => {
                let (id, request_hash) = detail.split_once('\t').unwrap_or((detail.as_str(), ""));
                Err(ServerError::Refused(Refusal::Duplicate { id: id.into(), request_hash: request_hash.into() }))
            }
            -1 => Err(ServerError::Refused(Refusal::QueueFull { queued: count() })),
            -2 => Err(ServerError::Refused(Refusal::KeyQueueFull { queued: count() })),
            _ => Err(ServerError::Refused(Refusal::StoreFull { stored: count() })),
        }
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
        let mut con = match self.connection() {
            Ok(con) => con,
            Err(err) => {
                let ids: Vec<String> = batch.iter().map(|j| j.id.clone()).collect();
                self.jobs.requeue_front(&ids);
                return Err(err);
            }
        };
        let mut started = Vec::with_capacity(batch.len());
        let mut untried = Vec::new();
        for job in batch {
            if !untried.is_empty() {
                untried.push(job.id.clone());
                continue;
            }
            let outcome: redis::RedisResult<(i64, String)> = self
                .scripts
                .start
                .key(self.keys.job(&job.id))
                .key(self.keys.queued())
                .key(self.keys.queued_by_owner())
                .arg(now_ms())
                .arg(&self.settings.consumer)
                .arg(self.keys.events())
                .arg(&job.id)
                .invoke(&mut *con);
            match outcome {
                Ok((attempts, _)) if attempts > 0 => {
                    lock(&self.running).insert(job.id.clone());
                    let progress = RedisProgress {
                        local: job.progress.clone(),
                        id: job.id.clone(),
                        job_key: self.keys.job(&job.id),
                        events: self.keys.events(),
                        pool: self.pool.clone(),
                        published: Mutex::new(None),
                    };
                    started.push(BatchJob { progress: Arc::new(progress), ..job });
                }
                Ok((_, status)) => {
                    // Cancelled, finished elsewhere or expired meanwhile: it does not run here.
                    tracing::info!(job = %job.id, %status, "job ended before its batch started");
                    self.let_go(&job.id);
                    self.jobs.forget(&[Removed { id: job.id.clone(), owner: String::new() }]);
                }
                Err(err) => {
                    tracing::error!(job = %job.id, error = %err, "cannot start a job in redis");
                    untried.push(job.id.clone());
                }
            }
        }
        if !untried.is_empty() {
            self.jobs.requeue_front(&untried);
            if started.is_empty() {
                return Err(ServerError::RedisPool("cannot start jobs in redis".into()));
            }
        }
        Ok(started)
    }

    fn ack(&self, id: &str, outcome: &Outcome) -> Result<bool> {
        let steps = self.jobs.steps(id);
        let mut con = self.connection()?;
        let (written, status) = match outcome {
            Outcome::Crashed { error } => {
                let error =
                    format!("{error}; it was started {} times (queue.max_attempts)", self.settings.max_attempts);
                drop(con);
                let code = self.requeue(id, &error, "new")?;
                self.let_go(id);
                match code {
                    1 => {
                        tracing::warn!(job = %id, "the engine panicked on this job; it is queued again");
                        self.jobs.forget(&[Removed { id: id.to_string(), owner: String::new() }]);
                        return Ok(true);
                    }
                    0 => (true, JobStatus::Failed),
                    _ => (false, JobStatus::Failed),
                }
            }
            Outcome::Succeeded(done) => {
                let total = steps.total.unwrap_or(steps.done);
                let mut call = self.scripts.finish.prepare_invoke();
                call.key(self.keys.job(id))
                    .key(self.keys.finished())
                    .arg("succeeded")
                    .arg(done.finished_ms)
                    .arg("")
                    .arg(done.nfe)
                    .arg(done.inference_ms)
                    .arg(total)
                    .arg(steps.total.map(|t| t.to_string()).unwrap_or_default())
                    // Images outlive the sweep that deletes them with their job by an hour at most.
                    .arg(self.settings.ttl_ms.saturating_add(3_600_000))
                    .arg(id)
                    .arg(GROUP)
                    .arg(self.keys.events())
                    .arg(self.keys.image_prefix(id));
                for png in &done.pngs {
                    call.arg(png.as_slice());
                }
                let code: i64 = call.invoke(&mut *con)?;
                (code == 1, JobStatus::Succeeded)
            }
            Outcome::Failed { error } => {
                let code: i64 = self
                    .scripts
                    .finish
                    .key(self.keys.job(id))
                    .key(self.keys.finished())
                    .arg("failed")
                    .arg(now_ms())
                    .arg(error)
                    .arg("")
                    .arg("")
                    .arg(steps.done)
                    .arg(steps.total.map(|t| t.to_string()).unwrap_or_default())
                    .arg(self.settings.ttl_ms)
                    .arg(id)
                    .arg(GROUP)
                    .arg(self.keys.events())
                    .arg(self.keys.image_prefix(id))
                    .invoke(&mut *con)?;
                (code == 1, JobStatus::Failed)
            }
        };
        self.let_go(id);
        if written {
            self.jobs.mark_finished(id, status);
        } else {
            tracing::warn!(job = %id, "job had already ended (cancelled, or finished by another worker): result not written");
            self.jobs.forget(&[Removed { id: id.to_string(), owner: String::new() }]);
        }
        Ok(written)
    }

    fn release(&self, ids: &[String]) {
        if let Ok(mut con) = self.connection() {
            for id in ids {
                let undone: redis::RedisResult<i64> = self
                    .scripts
                    .unstart
                    .key(self.keys.job(id))
                    .key(self.keys.queued())
                    .key(self.keys.queued_by_owner())
                    .arg(self.keys.events())
                    .arg(id)
                    .invoke(&mut *con);
                if let Err(err) = undone {
                    tracing::error!(job = %id, error = %err, "cannot give a job back in redis; it is taken over after the visibility timeout");
                }
                lock(&self.running).remove(id);
            }
        }
        self.jobs.requeue_front(ids);
    }

    fn cancel(&self, id: &str) -> Result<bool> {
        let mut con = self.connection()?;
        let code: i64 = self
            .scripts
            .cancel
            .key(self.keys.job(id))
            .key(self.keys.finished())
            .key(self.keys.queued())
            .key(self.keys.queued_by_owner())
            .arg(now_ms())
            .arg(id)
            .arg(GROUP)
            .arg(self.keys.events())
            .arg(self.keys.cancels())
            .arg("cancelled by the client")
            .invoke(&mut *con)?;
        Ok(code == 1)
    }

    /// Jobs queued in the whole deployment.
    /// Read no more jobs, and give the ones held here and not started back to the streams.
    fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let running = lock(&self.running).clone();
        let held: Vec<(String, Held)> = lock(&self.held)
            .iter()
            .filter(|(id, _)| !running.contains(*id))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let Ok(mut con) = self.connection() else { return };
        for (id, h) in held {
            let handed: redis::RedisResult<i64> =
                self.scripts.hand_back.key(self.keys.job(&id)).arg(GROUP).arg(&h.entry).arg(&id).invoke(&mut *con);
            match handed {
                Ok(_) => {
                    lock(&self.held).remove(&id);
                    self.jobs.forget(&[Removed { id: id.clone(), owner: String::new() }]);
                }
                Err(err) => {
                    tracing::warn!(job = %id, error = %err, "cannot hand a job back; another worker takes it over after the visibility timeout")
                }
            }
        }
    }

    fn queued(&self) -> usize {
        let counted = self.connection().and_then(|mut con| {
            let n: Option<i64> = redis::cmd("GET").arg(self.keys.queued()).query(&mut *con)?;
            Ok(n.unwrap_or(0).max(0) as usize)
        });
        counted.unwrap_or_else(|_| self.jobs.queued())
    }
}

impl JobStore for RedisBackend {
    fn load(&self, id: &str) -> Result<Option<StoredJob>> {
        let mut con = self.connection()?;
        let map: HashMap<String, String> = redis::cmd("HGETALL").arg(self.keys.job(id)).query(&mut *con)?;
        parse_job(id, &map)
    }

    fn idempotent(&self, owner: &str, key: &str) -> Result<Option<(String, String)>> {
        let mut con = self.connection()?;
        let found: Option<String> = redis::cmd("GET").arg(self.keys.idempotency(owner, key)).query(&mut *con)?;
        Ok(found.map(|text| match text.split_once('\t') {
            Some((id, hash)) => (id.to_string(), hash.to_string()),
            None => (text, String::new()),
        }))
    }

    fn list(
        &self,
        owner: &str,
        statuses: &[JobStatus],
        limit: usize,
        after: Option<&str>,
    ) -> Result<Option<(Vec<StoredJob>, bool)>> {
        let mut con = self.connection()?;
        let ids: Vec<String> =
            redis::cmd("ZRANGE").arg(self.keys.owner(owner)).arg(0).arg(-1).arg("REV").query(&mut *con)?;
        let start = match after {
            None => 0,
            Some(after) => match ids.iter().position(|id| id == after) {
                Some(at) => at + 1,
                None => return Ok(None),
            },
        };
        let mut page = Vec::new();
        let mut has_more = false;
        for chunk in ids[start..].chunks(64) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HGETALL").arg(self.keys.job(id));
            }
            let maps: Vec<HashMap<String, String>> = pipe.query(&mut *con)?;
            for (id, map) in chunk.iter().zip(maps) {
                let Some(job) = parse_job(id, &map)? else { continue };
                if !statuses.is_empty() && !statuses.contains(&job.status) {
                    continue;
                }
                if page.len() == limit {
                    has_more = true;
                    break;
                }
                page.push(job);
            }
            if has_more {
                break;
            }
        }
        Ok(Some((page, has_more)))
    }

    fn first_finished(&self, owner: &str) -> Result<Option<i64>> {
        let Some((jobs, _)) =
            self.list(owner, &[JobStatus::Succeeded, JobStatus::Failed, JobStatus::Cancelled], usize::MAX, None)?
        else {
            return Ok(None);
        };
        Ok(jobs.iter().filter_map(|j| j.finished_ms).min())
    }

    fn image(&self, id: &str, index: usize) -> Result<Option<Vec<u8>>> {
        let mut con = self.connection()?;
        let bytes: Option<Vec<u8>> =
            redis::cmd("GET").arg(format!("{}{index}", self.keys.image_prefix(id))).query(&mut *con)?;
        Ok(bytes)
    }

    fn load_with_image(&self, id: &str, index: usize) -> Result<Option<(StoredJob, Option<Vec<u8>>)>> {
        let Some(job) = self.load(id)? else { return Ok(None) };
        let bytes = if job.status == JobStatus::Succeeded { self.image(id, index)? } else { None };
        Ok(Some((job, bytes)))
    }

    fn delete(&self, id: &str, owner: &str) -> Result<bool> {
        let mut con = self.connection()?;
        let deleted: String = self
            .scripts
            .delete
            .key(self.keys.job(id))
            .key(self.keys.finished())
            .arg(owner)
            .arg(id)
            .arg(self.keys.owner_prefix())
            .arg(self.keys.image_prefix(id))
            .invoke(&mut *con)?;
        Ok(!deleted.is_empty())
    }

    fn expire(&self, before_ms: i64) -> Result<Vec<Removed>> {
        let mut con = self.connection()?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.finished())
            .arg("-inf")
            .arg(format!("({before_ms}"))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(1000)
            .query(&mut *con)?;
        let mut removed = Vec::new();
        for id in ids {
            let owner: String = self
                .scripts
                .delete
                .key(self.keys.job(&id))
                .key(self.keys.finished())
                .arg("")
                .arg(&id)
                .arg(self.keys.owner_prefix())
                .arg(self.keys.image_prefix(&id))
                .invoke(&mut *con)?;
            if !owner.is_empty() {
                removed.push(Removed { id, owner });
            }
        }
        Ok(removed)
    }
}

impl ProgressHub for RedisBackend {
    /// A channel fed by the events channel, starting at the job's state in Redis.
    fn subscribe(&self, id: &str) -> Option<watch::Receiver<Snapshot>> {
        let job = match self.load(id) {
            Ok(job) => job?,
            Err(err) => {
                tracing::error!(job = %id, error = %err, "cannot read a job from redis");
                return None;
            }
        };
        if job.status.is_final() {
            return Some(watch::channel(snapshot_of(&job)).1);
        }
        let receiver = {
            let mut watchers = lock(&self.watchers);
            let sender = watchers.entry(id.to_string()).or_insert_with(|| watch::channel(snapshot_of(&job)).0);
            sender.subscribe()
        };
        // An event published between the read above and the registration is not lost: read again.
        if let Ok(Some(now)) = self.load(id) {
            self.publish_local(id, snapshot_of(&now));
        }
        Some(receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_their_wire_form() {
        let (id, snap) = parse_event("gen_1 running 3 8").unwrap();
        assert_eq!(id, "gen_1");
        assert_eq!(snap, Snapshot { status: JobStatus::Running, position: None, step: 3, total: Some(8) });
        let (_, snap) = parse_event("gen_2 succeeded 5 -").unwrap();
        assert_eq!((snap.status, snap.total), (JobStatus::Succeeded, None));
        assert!(parse_event("gen_3 exploded 1 2").is_none());
        assert!(parse_event("").is_none());
    }
}
