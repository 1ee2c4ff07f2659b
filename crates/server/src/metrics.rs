//! Prometheus metrics served at /metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    pub queue_depth: Gauge,
    pub queued_images: Gauge,
    pub live_jobs: Gauge,
    pub admissions_in_flight: Gauge,
    pub batch_size: Histogram,
    pub queue_seconds: Histogram,
    pub inference_seconds: Histogram,
    pub images: Counter,
    pub jobs: Family<StatusLabel, Counter>,
    pub failures: Family<KindLabel, Counter>,
    pub rejected: Family<KindLabel, Counter>,
    /// Shared queue: time from a dead worker's last heartbeat to another worker taking its job.
    pub redelivery_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flowgen");
        let m = Metrics {
            registry: Registry::default(),
            queue_depth: Gauge::default(),
            queued_images: Gauge::default(),
            live_jobs: Gauge::default(),
            admissions_in_flight: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            queue_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            inference_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            images: Counter::default(),
            jobs: Family::default(),
            failures: Family::default(),
            rejected: Family::default(),
            redelivery_seconds: Histogram::new(exponential_buckets(0.5, 2.0, 12)),
        };
        registry.register("queue_depth", "Jobs waiting in the queue", m.queue_depth.clone());
        registry.register("queued_images", "Images waiting in the queue", m.queued_images.clone());
        registry.register("live_jobs", "Jobs held in memory: queued and running", m.live_jobs.clone());
        registry.register(
            "admissions_in_flight",
            "Admitted jobs whose journal write is under way (each holds a queue slot)",
            m.admissions_in_flight.clone(),
        );
        registry.register("batch_size", "Images per engine batch", m.batch_size.clone());
        registry.register("queue_seconds", "Time a job waited before its batch started", m.queue_seconds.clone());
        registry.register("inference_seconds", "Engine time per batch", m.inference_seconds.clone());
        registry.register("images", "Images generated", m.images.clone());
        registry.register("jobs", "Jobs finished, by final status", m.jobs.clone());
        registry.register("failures", "Failed jobs by error type", m.failures.clone());
        registry.register("rejected_requests", "Requests refused, by reason", m.rejected.clone());
        registry.register(
            "redelivery_seconds",
            "Shared queue: time from a dead worker's last heartbeat to another worker taking over its job",
            m.redelivery_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn job_finished(&self, status: &str) {
        self.jobs.get_or_create(&StatusLabel { status: status.into() }).inc();
    }

    pub fn failure(&self, kind: &str) {
        self.failures.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }

    pub fn rejected(&self, kind: &str) {
        self.rejected.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
