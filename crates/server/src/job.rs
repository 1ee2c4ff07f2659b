//! The job types every part of the server shares: what was accepted (`JobSpec`), how it is
//! journaled (`StoredJob`), its status and priority. No HTTP and no storage here.

use flowgen_engine::image::OutputFormat;
use flowgen_engine::{ImageInputs, ModelConfig, Sampler, ScheduleAccess, ScheduleSpec, SolveSettings};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        match text {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(ApiError::validation("priority", format!("{other:?} is not one of high, normal, low"))),
        }
    }

    /// Queue index: 0 is served first.
    pub fn rank(self) -> usize {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }
}

/// A validated job: everything needed to run it again after a restart. The journal stores it as
/// JSON with the settings' fields at the top level, as earlier releases wrote it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    pub model: String,
    pub labels: Vec<u32>,
    pub seeds: Vec<u64>,
    #[serde(flatten)]
    pub settings: JobSettings,
    pub priority: Priority,
    /// png, jpeg or webp (jobs journaled before formats existed are png).
    #[serde(default = "png")]
    pub output_format: String,
    /// JPEG quality 1-100 (jpeg only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_compression: Option<u8>,
}

fn png() -> String {
    "png".into()
}

/// The solve settings a job's images share, in canonical text (what is journaled and shown).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSettings {
    /// Canonical sampler plan (`Sampler::canonical`).
    pub sampler: String,
    pub steps: usize,
    pub guidance: f64,
    /// Times s where guidance applies; None only in jobs journaled before this field existed,
    /// which run with the model's interval.
    #[serde(default)]
    pub guidance_interval: Option<(f64, f64)>,
    /// Canonical schedule (`ScheduleSpec::canonical`): resolved against the model's stored ones.
    pub schedule: String,
}

impl JobSettings {
    pub fn of(settings: &SolveSettings) -> Self {
        JobSettings {
            sampler: settings.sampler.canonical(),
            steps: settings.steps,
            guidance: settings.guidance,
            guidance_interval: Some(settings.guidance_interval),
            schedule: settings.schedule.canonical(),
        }
    }

    /// The engine settings again (journaled text is parsed, never read as a path).
    pub fn to_settings(&self, model: &ModelConfig) -> flowgen_engine::Result<SolveSettings> {
        let sampler = Sampler::parse(&self.sampler)?;
        let adaptive = sampler.is_adaptive();
        Ok(SolveSettings {
            steps: if adaptive { 0 } else { self.steps },
            schedule: if adaptive {
                ScheduleSpec::Uniform
            } else {
                ScheduleSpec::resolve(&self.schedule, &model.schedules, ScheduleAccess::Named)?
            },
            sampler,
            guidance: self.guidance,
            guidance_interval: self.guidance_interval.unwrap_or(model.guidance.interval),
        })
    }

    /// Rewrite a job journaled by an earlier release in today's canonical form (e.g. "dopri5"
    /// -> "dopri5:rtol=1e-5,atol=1e-5,max_nfe=2000"), so it batches with new jobs.
    pub fn canonicalise(&mut self) {
        if let Ok(sampler) = Sampler::parse(&self.sampler) {
            if sampler.is_adaptive() {
                self.steps = 0;
            }
            self.sampler = sampler.canonical();
        }
    }
}

/// Jobs with equal keys can share one engine batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    model: String,
    sampler: String,
    steps: usize,
    guidance_bits: u64,
    guidance_interval_bits: Option<(u64, u64)>,
    schedule: String,
}

impl JobSpec {
    pub fn batch_key(&self) -> BatchKey {
        let s = &self.settings;
        BatchKey {
            model: self.model.clone(),
            sampler: s.sampler.clone(),
            steps: s.steps,
            guidance_bits: s.guidance.to_bits(),
            guidance_interval_bits: s.guidance_interval.map(|(lo, hi)| (lo.to_bits(), hi.to_bits())),
            schedule: s.schedule.clone(),
        }
    }

    pub fn n(&self) -> usize {
        self.labels.len()
    }

    /// How this job's images are encoded (checked at admission; PNG if the journal holds
    /// something this release cannot read).
    pub fn output(&self) -> OutputFormat {
        OutputFormat::parse(&self.output_format, self.output_compression).unwrap_or(OutputFormat::Png)
    }

    pub fn inputs(&self) -> ImageInputs {
        ImageInputs { labels: self.labels.clone(), seeds: self.seeds.clone() }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] =
        [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Cancelled];

    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

/// One journaled job (without its images).
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub id: String,
    pub owner: String,
    pub idempotency_key: Option<String>,
    pub request_hash: String,
    pub spec: JobSpec,
    pub status: JobStatus,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    pub nfe: Option<usize>,
    pub attempts: u32,
    pub inference_ms: Option<i64>,
    /// Sampler steps it got through (kept when it ends, for views served from the journal).
    pub steps: Steps,
}

/// Sampler steps completed, and the total when the sampler has a fixed one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Steps {
    pub done: usize,
    pub total: Option<usize>,
}

impl StoredJob {
    /// A job just admitted: queued, never started.
    pub fn accepted(id: &str, owner: &str, spec: JobSpec, created_ms: i64) -> Self {
        StoredJob {
            id: id.to_string(),
            owner: owner.to_string(),
            idempotency_key: None,
            request_hash: String::new(),
            spec,
            status: JobStatus::Queued,
            created_ms,
            started_ms: None,
            finished_ms: None,
            error: None,
            nfe: None,
            attempts: 0,
            inference_ms: None,
            steps: Steps::default(),
        }
    }
}
