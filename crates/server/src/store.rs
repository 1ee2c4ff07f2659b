//! The SQLite journal: a job is written here before it is acknowledged, and its images are written
//! in the same transaction that marks it succeeded, so a crash at any point loses nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Result, ServerError};
pub use crate::job::StoredJob;
use crate::job::{JobSpec, JobStatus, Steps};
use crate::queue::{Removed, Success};

/// One writer connection behind a mutex, and a pool of read-only connections beside it: in WAL
/// mode readers never wait for the writer, so image downloads and status reads cannot delay commits.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    readers: r2d2::Pool<SqliteConnectionManager>,
    path: PathBuf,
}

/// Read connections; more readers than this wait for one (at most `READ_WAIT`).
pub const READERS: u32 = 4;
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    error TEXT,
    nfe INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    inference_ms INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
);
";

impl Store {
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .map_err(|error| ServerError::Io { context: format!("creating {}", data_dir.display()), error })?;
        let path = data_dir.join("jobs.sqlite");
        let conn = Connection::open(&path)?;
        // WAL + FULL: a committed job survives a killed process and a power cut.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        add_missing_columns(&conn)?;
        let manager = SqliteConnectionManager::file(&path).with_init(|c| {
            c.busy_timeout(std::time::Duration::from_secs(5))?;
            c.pragma_update(None, "query_only", true)
        });
        let readers =
            r2d2::Pool::builder().max_size(READERS).min_idle(Some(1)).connection_timeout(READ_WAIT).build(manager)?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)), readers, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back), so go on.
        let mut conn = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut conn)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.readers.get()?;
        f(&conn)
    }

    /// Test hook: a read connection with an open read transaction, as a slow image download holds
    /// one; the transaction ends when the guard is dropped.
    #[cfg(any(test, feature = "testing"))]
    pub fn hold_read(&self) -> Result<HeldRead> {
        let conn = self.readers.get()?;
        conn.execute_batch("BEGIN")?;
        conn.query_row("SELECT count(*) FROM jobs", [], |r| r.get::<_, i64>(0))?;
        Ok(HeldRead(conn))
    }

    pub fn insert(&self, job: &StoredJob) -> Result<()> {
        let spec = serde_json::to_string(&job.spec)
            .map_err(|e| ServerError::Corrupt { id: job.id.clone(), message: e.to_string() })?;
        self.with(|c| {
            c.execute(
                "INSERT INTO jobs (id, owner, idempotency_key, request_hash, spec, status, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![job.id, job.owner, job.idempotency_key, job.request_hash, spec, job.status.as_str(), job.created_ms],
            )?;
            Ok(())
        })
    }

    /// Jobs the engine is starting now; counts an attempt each. Returns the ids it marked: a job
    /// left out had already ended in the journal (a cancel won the race) and must not run.
    pub fn mark_running(&self, ids: &[String], started_ms: i64) -> Result<Vec<String>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let mut marked = Vec::with_capacity(ids.len());
            for id in ids {
                let changed = tx.execute(
                    "UPDATE jobs SET status = 'running', started_ms = ?2, attempts = attempts + 1 WHERE id = ?1 AND status IN ('queued', 'running')",
                    params![id, started_ms],
                )?;
                if changed == 1 {
                    marked.push(id.clone());
                }
            }
            tx.commit()?;
            Ok(marked)
        })
    }

    /// Store the images and mark succeeded, atomically; false when the job was cancelled meanwhile.
    pub fn finish_succeeded(&self, id: &str, done: &Success, steps: Steps) -> Result<bool> {
        let Success { finished_ms, nfe, inference_ms, pngs } = done;
        self.with(|c| {
            let tx = c.transaction()?;
            let changed = tx.execute(
                "UPDATE jobs SET status = 'succeeded', finished_ms = ?2, nfe = ?3, inference_ms = ?4, steps_done = ?5, steps_total = ?6 WHERE id = ?1 AND status = 'running'",
                params![id, finished_ms, *nfe as i64, inference_ms, steps.done as i64, steps.total.map(|t| t as i64)],
            )?;
            if changed == 0 {
                return Ok(false);
            }
            for (i, png) in pngs.iter().enumerate() {
                tx.execute("INSERT OR REPLACE INTO images (job_id, idx, png) VALUES (?1, ?2, ?3)", params![id, i as i64, png])?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    /// Mark failed or cancelled unless already final, with the steps it got through; false when
    /// it was final.
    pub fn finish(
        &self,
        id: &str,
        status: JobStatus,
        finished_ms: i64,
        error: Option<&str>,
        steps: Steps,
    ) -> Result<bool> {
        self.with(|c| {
            let changed = c.execute(
                "UPDATE jobs SET status = ?2, finished_ms = ?3, error = ?4, steps_done = ?5, steps_total = ?6 WHERE id = ?1 AND status IN ('queued', 'running')",
                params![id, status.as_str(), finished_ms, error, steps.done as i64, steps.total.map(|t| t as i64)],
            )?;
            Ok(changed == 1)
        })
    }

    /// After a crash: jobs that were running go back to the queue.
    pub fn requeue_interrupted(&self) -> Result<usize> {
        self.with(|c| Ok(c.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'", [])?))
    }

    /// Fail the queued jobs that were already started `max_attempts` times (each time the process
    /// died under them); returns how many.
    pub fn fail_exhausted(&self, max_attempts: u32, finished_ms: i64) -> Result<usize> {
        let error = format!(
            "the server stopped {max_attempts} times while running this job (out of memory or a device fault?); \
             it is not retried again (queue.max_attempts = {max_attempts})"
        );
        self.with(|c| {
            Ok(c.execute(
                "UPDATE jobs SET status = 'failed', finished_ms = ?2, error = ?3 WHERE status = 'queued' AND attempts >= ?1",
                params![max_attempts as i64, finished_ms, error],
            )?)
        })
    }

    /// Every journaled job in acceptance order.
    pub fn load_all(&self) -> Result<Vec<StoredJob>> {
        self.select("ORDER BY seq", params![])
    }

    /// Jobs not yet final (queued, or running when a crash interrupted them), in acceptance order.
    pub fn load_live(&self) -> Result<Vec<StoredJob>> {
        self.select("WHERE status IN ('queued', 'running') ORDER BY seq", params![])
    }

    /// One journaled job, as the journal has it now.
    pub fn load(&self, id: &str) -> Result<Option<StoredJob>> {
        Ok(self.select("WHERE id = ?1", params![id])?.pop())
    }

    /// The job `owner` submitted with this Idempotency-Key: its id and request hash.
    pub fn idempotent(&self, owner: &str, key: &str) -> Result<Option<(String, String)>> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT id, request_hash FROM jobs WHERE owner = ?1 AND idempotency_key = ?2",
                params![owner, key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })
    }

    /// One page of `owner`'s jobs, newest first, with one of `statuses` (any when empty), after
    /// the job `after`; whether more follow. None when `after` is not a job of `owner`.
    pub fn list(
        &self,
        owner: &str,
        statuses: &[JobStatus],
        limit: usize,
        after: Option<&str>,
    ) -> Result<Option<(Vec<StoredJob>, bool)>> {
        let below = match after {
            None => i64::MAX,
            Some(cursor) => {
                let seq = self.read(|c| {
                    Ok(c.query_row("SELECT seq FROM jobs WHERE id = ?1 AND owner = ?2", params![cursor, owner], |r| {
                        r.get::<_, i64>(0)
                    })
                    .optional()?)
                })?;
                match seq {
                    Some(seq) => seq,
                    None => return Ok(None),
                }
            }
        };
        // Statuses are our own fixed words, never client text, so they may be spelled into the SQL.
        let filter = if statuses.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = statuses.iter().map(|s| format!("'{}'", s.as_str())).collect();
            format!("AND status IN ({})", names.join(", "))
        };
        let fetch = limit.saturating_add(1).min(i64::MAX as usize) as i64;
        let mut jobs = self.select(
            &format!("WHERE owner = ?1 AND seq < ?2 {filter} ORDER BY seq DESC LIMIT ?3"),
            params![owner, below, fetch],
        )?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        Ok(Some((jobs, more)))
    }

    /// How many jobs each owner has in the journal.
    pub fn count_by_owner(&self) -> Result<Vec<(String, usize)>> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT owner, count(*) FROM jobs GROUP BY owner")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as usize)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// When `owner`'s earliest-finished job finished, if any has.
    pub fn first_finished(&self, owner: &str) -> Result<Option<i64>> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT min(finished_ms) FROM jobs WHERE owner = ?1 AND status IN ('succeeded', 'failed', 'cancelled')",
                params![owner],
                |r| r.get::<_, Option<i64>>(0),
            )?)
        })
    }

    /// A job and, when it succeeded, its image `index`, read in one go (an image download).
    pub fn load_with_image(&self, id: &str, index: usize) -> Result<Option<(StoredJob, Option<Vec<u8>>)>> {
        self.read(|c| {
            let Some(job) = select_on(c, "WHERE id = ?1", params![id])?.pop() else { return Ok(None) };
            let image = if job.status == JobStatus::Succeeded { image_on(c, id, index)? } else { None };
            Ok(Some((job, image)))
        })
    }

    fn select(&self, tail: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<StoredJob>> {
        self.read(|c| select_on(c, tail, args))
    }

    /// Fault injection for tests: refuse (or allow again) every write, as a full or failing disk
    /// would, through SQLite's own read-only switch.
    #[cfg(any(test, feature = "testing"))]
    pub fn refuse_writes(&self, refuse: bool) -> Result<()> {
        self.with(|c| Ok(c.pragma_update(None, "query_only", refuse)?))
    }

    pub fn image(&self, id: &str, index: usize) -> Result<Option<Vec<u8>>> {
        self.read(|c| image_on(c, id, index))
    }

    /// Delete finished jobs (and images) that finished before `before_ms`; returns them.
    pub fn expire(&self, before_ms: i64) -> Result<Vec<Removed>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let removed: Vec<Removed> = {
                let mut stmt = tx.prepare(
                    "SELECT id, owner FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_ms < ?1",
                )?;
                let rows = stmt.query_map(params![before_ms], |r| Ok(Removed { id: r.get(0)?, owner: r.get(1)? }))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for job in &removed {
                tx.execute("DELETE FROM images WHERE job_id = ?1", params![job.id])?;
                tx.execute("DELETE FROM jobs WHERE id = ?1", params![job.id])?;
            }
            tx.commit()?;
            Ok(removed)
        })
    }

    /// Delete one finished job of `owner` and its images; false when there is no such job.
    pub fn delete(&self, id: &str, owner: &str) -> Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let deleted = tx.execute(
                "DELETE FROM jobs WHERE id = ?1 AND owner = ?2 AND status IN ('succeeded', 'failed', 'cancelled')",
                params![id, owner],
            )?;
            if deleted == 1 {
                tx.execute("DELETE FROM images WHERE job_id = ?1", params![id])?;
            }
            tx.commit()?;
            Ok(deleted == 1)
        })
    }
}

fn select_on(c: &Connection, tail: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<StoredJob>> {
    let mut stmt = c.prepare_cached(&format!(
            "SELECT id, owner, idempotency_key, request_hash, spec, status, created_ms, started_ms, finished_ms, error, nfe, attempts, inference_ms, steps_done, steps_total FROM jobs {tail}"
        ))?;
    let rows = stmt.query_map(args, |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, Option<i64>>(7)?,
            r.get::<_, Option<i64>>(8)?,
            r.get::<_, Option<String>>(9)?,
            r.get::<_, Option<i64>>(10)?,
            r.get::<_, i64>(11)?,
            r.get::<_, Option<i64>>(12)?,
            Steps {
                done: r.get::<_, i64>(13)?.max(0) as usize,
                total: r.get::<_, Option<i64>>(14)?.map(|t| t.max(0) as usize),
            },
        ))
    })?;
    let mut jobs = Vec::new();
    for row in rows {
        let (
            id,
            owner,
            idempotency_key,
            request_hash,
            spec,
            status,
            created_ms,
            started_ms,
            finished_ms,
            error,
            nfe,
            attempts,
            inference_ms,
            steps,
        ) = row?;
        let mut spec: JobSpec =
            serde_json::from_str(&spec).map_err(|e| ServerError::Corrupt { id: id.clone(), message: e.to_string() })?;
        spec.settings.canonicalise();
        let status = JobStatus::parse(&status)
            .ok_or_else(|| ServerError::Corrupt { id: id.clone(), message: format!("unknown status {status:?}") })?;
        jobs.push(StoredJob {
            id,
            owner,
            idempotency_key,
            request_hash,
            spec,
            status,
            created_ms,
            started_ms,
            finished_ms,
            error,
            nfe: nfe.map(|v| v as usize),
            attempts: attempts as u32,
            inference_ms,
            steps,
        });
    }
    Ok(jobs)
}

fn image_on(c: &Connection, id: &str, index: usize) -> Result<Option<Vec<u8>>> {
    let mut stmt = c.prepare_cached("SELECT png FROM images WHERE job_id = ?1 AND idx = ?2")?;
    Ok(stmt.query_row(params![id, index as i64], |r| r.get(0)).optional()?)
}

/// Columns later releases added, so a journal written by an earlier one opens unchanged.
fn add_missing_columns(conn: &Connection) -> Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('jobs')")?;
    let present: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    for (name, definition) in [("steps_done", "INTEGER NOT NULL DEFAULT 0"), ("steps_total", "INTEGER")] {
        if !present.iter().any(|p| p == name) {
            conn.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {name} {definition}"))?;
        }
    }
    Ok(())
}

/// A read transaction held open by a test; rolled back before the connection returns to the pool.
#[cfg(any(test, feature = "testing"))]
pub struct HeldRead(r2d2::PooledConnection<SqliteConnectionManager>);

#[cfg(any(test, feature = "testing"))]
impl Drop for HeldRead {
    fn drop(&mut self) {
        let _ = self.0.execute_batch("ROLLBACK");
    }
}
