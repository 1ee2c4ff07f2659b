//! The queue boundary run against the embedded SQLite implementation: enqueue, claim, ack,
//! release, cancel, and a crash between claim and ack.

use std::sync::Arc;

use flowgen_server::job::{JobSettings, JobSpec, JobStatus, Priority, StoredJob};
use flowgen_server::jobs::Jobs;
use flowgen_server::local::{LocalBackend, Recovery};
use flowgen_server::metrics::Metrics;
use flowgen_server::queue::{JobQueue, JobStore, Outcome, Success};
use flowgen_server::store::Store;

fn job(id: &str, priority: Priority, sampler: &str, seed: u64) -> StoredJob {
    let settings = JobSettings {
        sampler: sampler.into(),
        steps: 4,
        guidance: 1.0,
        guidance_interval: Some((0.0, 1.0)),
        schedule: "uniform".into(),
    };
    StoredJob::accepted(
        id,
        "anonymous",
        JobSpec {
            model: "m".into(),
            labels: vec![1],
            seeds: vec![seed],
            settings,
            priority,
            output_format: "png".into(),
            output_compression: None,
        },
        1,
    )
}

fn open(dir: &std::path::Path) -> (LocalBackend, Arc<Jobs>, Recovery) {
    let jobs = Arc::new(Jobs::new(16, 16, 100, Arc::new(Metrics::new())));
    let (backend, recovery) = LocalBackend::open(Store::open(dir).unwrap(), jobs.clone(), 3, 32).unwrap();
    (backend, jobs, recovery)
}

fn ids(batch: &[flowgen_server::queue::BatchJob]) -> Vec<&str> {
    batch.iter().map(|j| j.id.as_str()).collect()
}

#[test]
fn claim_ack_release_cancel_and_crash_requeue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (queue, jobs, recovery) = open(dir.path());
        assert_eq!(recovery, Recovery { jobs: 0, queued: 0, requeued: 0, exhausted: 0, oversized: 0 });
        queue.enqueue(job("b", Priority::Normal, "euler", 2)).unwrap();
        queue.enqueue(job("c", Priority::Normal, "heun", 3)).unwrap();
        queue.enqueue(job("a", Priority::High, "euler", 1)).unwrap();
        queue.enqueue(job("d", Priority::Low, "heun", 4)).unwrap();
        assert_eq!(queue.queued(), 4);
        // The high-priority job leads; its compatible batch-mate comes along, the others wait.
        let batch = queue.claim(32).unwrap();
        assert_eq!(ids(&batch), ["a", "b"]);
        assert_eq!(queue.queued(), 2);
        assert!(batch.iter().all(|j| jobs.view(&j.id).unwrap().1.status == JobStatus::Running));
        let done = Success { finished_ms: 5, nfe: 4, inference_ms: 3, pngs: vec![b"png-a".to_vec()] };
        assert!(queue.ack("a", &Outcome::Succeeded(done)).unwrap());
        assert_eq!(queue.image("a", 0).unwrap().as_deref(), Some(&b"png-a"[..]));
        // A job that ended leaves memory; the journal serves it.
        assert!(jobs.view("a").is_none());
        assert_eq!(queue.load("a").unwrap().map(|j| (j.status, j.nfe)), Some((JobStatus::Succeeded, Some(4))));
        // A second acknowledgement of a finished job changes nothing.
        assert!(!queue.ack("a", &Outcome::Failed { error: "late".into() }).unwrap());
        // A batch that never started goes back to the head of its queue.
        let batch = queue.claim(32).unwrap();
        assert_eq!(ids(&batch), ["c", "d"]);
        queue.release(&["c".to_string(), "d".to_string()]);
        assert_eq!(queue.head().unwrap().images, 2);
        assert!(queue.cancel("d").unwrap());
        assert!(!queue.cancel("d").unwrap(), "a cancelled job cannot be cancelled again");
        assert!(jobs.view("d").is_none());
        assert_eq!(queue.load("d").unwrap().unwrap().status, JobStatus::Cancelled);
        assert_eq!(jobs.live(), 2, "b running, c queued");
        assert_eq!(ids(&queue.claim(32).unwrap()), ["c"]);
        // "b" and "c" are claimed but never acknowledged: the process dies here.
    }
    let (queue, jobs, recovery) = open(dir.path());
    assert_eq!(recovery, Recovery { jobs: 4, queued: 2, requeued: 2, exhausted: 0, oversized: 0 });
    let batch = queue.claim(32).unwrap();
    assert_eq!(ids(&batch), ["b"], "requeued in acceptance order, compatible jobs together");
    assert_eq!(jobs.live(), 2, "only the requeued jobs are loaded into memory");
    assert_eq!(jobs.view("b").unwrap().1.attempts, 2, "the rerun counts as a second attempt");
    assert!(queue.ack("b", &Outcome::Failed { error: "engine said no".into() }).unwrap());
    assert_eq!(queue.load("b").unwrap().unwrap().error.as_deref(), Some("engine said no"));
    assert_eq!(ids(&queue.claim(32).unwrap()), ["c"]);
    let status = |id: &str| queue.load(id).unwrap().map(|j| j.status);
    assert_eq!((status("a"), status("d")), (Some(JobStatus::Succeeded), Some(JobStatus::Cancelled)));
    assert_eq!(queue.image("a", 0).unwrap().as_deref(), Some(&b"png-a"[..]), "results survive the crash");
    // Expiry removes finished jobs and their results from the journal and from memory.
    let expired = queue.expire(i64::MAX).unwrap();
    assert_eq!(expired.len(), 3, "{expired:?}");
    assert!(queue.image("a", 0).unwrap().is_none() && queue.load("a").unwrap().is_none());
}
