//! HTTP request and response bodies, and the validation that turns a request into a `JobSpec`.

use flowgen_engine::image::OutputFormat;
use flowgen_engine::{Error as EngineError, ImageInputs, ModelConfig, ScheduleAccess, SettingsRequest, SolveSettings};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::LimitsSection;
use crate::engine::Models;
use crate::error::ApiError;
pub use crate::job::{BatchKey, JobSettings, JobSpec, JobStatus, Priority};

/// A class label: its index (7) or its name ("seven", "7").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum LabelValue {
    Index(i64),
    Name(String),
    /// A JSON number with a fraction part, such as 3.0: an index when it is whole.
    Number(f64),
}

/// Body of `POST /v1/generations`. Every field is optional; defaults come from the model.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationBody {
    /// Model name (GET /v1/models); the first served model when absent or "default".
    pub model: Option<String>,
    /// One label per image, cycled to `n`; all classes in turn when absent.
    pub labels: Option<Vec<LabelValue>>,
    /// Shorthand for `labels: [label]`.
    pub label: Option<LabelValue>,
    /// Number of images (default: number of labels, or 1).
    #[serde(default, deserialize_with = "whole_number")]
    pub n: Option<i64>,
    /// Image i uses seed + i; random when absent. The seeds used are returned.
    #[serde(default, deserialize_with = "whole_seed")]
    pub seed: Option<u64>,
    /// A named set of settings of the model (GET /v1/models lists them); fields given here win.
    pub preset: Option<String>,
    /// A sampler plan, e.g. "heun" or "dopri5:rtol=1e-4,atol=1e-4,max_nfe=500".
    pub sampler: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    pub steps: Option<i64>,
    pub guidance: Option<f64>,
    /// Times s (0 noise, 1 data) between which guidance applies, as [lo, hi] (either order); the
    /// model's interval when absent.
    pub guidance_interval: Option<[f64; 2]>,
    /// uniform, shift:<alpha>, an explicit list "0,0.5,1", or the name of a schedule the model
    /// stores (never a file path).
    pub schedule: Option<String>,
    /// high | normal | low (default normal).
    pub priority: Option<String>,
    /// png (default, settings in tEXt chunks), jpeg or webp (settings in XMP), as in OpenAI's API.
    pub output_format: Option<String>,
    /// JPEG quality 1-100 (jpeg only; default 90).
    #[serde(default, deserialize_with = "whole_number")]
    pub output_compression: Option<i64>,
}

/// A JSON number's integer value, also when written with a zero fraction (3.0), as JSON Schema's
/// "integer" allows; None for a fraction or a float beyond `MAX_SEED`.
fn integral(n: &serde_json::Number) -> Option<i128> {
    match (n.as_i64(), n.as_u64(), n.as_f64()) {
        (Some(i), _, _) => Some(i.into()),
        (None, Some(u), _) => Some(u.into()),
        (None, None, Some(x)) if x.fract() == 0.0 && x.abs() <= MAX_SEED as f64 => Some(x as i128),
        _ => None,
    }
}

/// `integral` for an `Option<i64>` field.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<serde_json::Number>::deserialize(d)?
        .map(|n| integral(&n).and_then(|i| i64::try_from(i).ok()).ok_or(n))
        .transpose()
        .map_err(|n| serde::de::Error::custom(format!("expected a whole number, got {n}")))
}

/// `integral` for the seed, which is never negative.
fn whole_seed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<serde_json::Number>::deserialize(d)?
        .map(|n| integral(&n).and_then(|i| u64::try_from(i).ok()).ok_or(n))
        .transpose()
        .map_err(|n| serde::de::Error::custom(format!("expected a whole number 0 or more, got {n}")))
}

/// Largest seed: every image's seed (seed + i) stays exact in a JSON number any client can read.
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// An engine error about a request, as the 422 naming its field.
fn engine_validation(err: EngineError) -> ApiError {
    match err {
        EngineError::Invalid { field, message } => ApiError::validation(field, message),
        other => ApiError::validation("body", other.to_string()),
    }
}

fn label(cfg: &ModelConfig, field: &str, value: &LabelValue) -> Result<u32, ApiError> {
    let classes = cfg.num_classes();
    let index = match value {
        LabelValue::Index(i) if *i >= 0 && (*i as usize) < classes => *i as u32,
        LabelValue::Index(i) => {
            return Err(ApiError::validation(field, format!("{i} is out of range: classes are 0..{}", classes - 1)))
        }
        LabelValue::Name(name) => cfg.parse_label(name).map_err(|e| ApiError::validation(field, e.to_string()))?,
        LabelValue::Number(x) if x.fract() == 0.0 && *x >= 0.0 && *x < classes as f64 => *x as u32,
        LabelValue::Number(x) => {
            return Err(ApiError::validation(field, format!("{x} is not a class index 0..{}", classes - 1)))
        }
    };
    if index as usize >= classes {
        return Err(ApiError::validation(field, format!("{index} is out of range: classes are 0..{}", classes - 1)));
    }
    Ok(index)
}

/// Check every field against the model and the limits; the error names the field and the limit.
pub fn validate(body: &GenerationBody, models: &Models, limits: &LimitsSection) -> Result<JobSpec, ApiError> {
    if models.is_empty() {
        return Err(ApiError::Unavailable("no model is loaded".into()));
    }
    let (model, engine) = models.resolve(body.model.as_deref()).ok_or_else(|| {
        ApiError::validation(
            "model",
            format!(
                "unknown model {:?}; served: {} (or \"default\")",
                body.model.as_deref().unwrap_or(""),
                models.names().join(", ")
            ),
        )
    })?;
    let model = model.to_string();
    let cfg = engine.config();
    let labels = validate_labels(body, cfg, limits)?;
    let settings = validate_settings(body, cfg, limits)?;
    let priority = match &body.priority {
        Some(p) => Priority::parse(p)?,
        None => Priority::Normal,
    };
    let output = validate_output(body.output_format.as_deref(), body.output_compression)?;
    if let Some(seed) = body.seed.filter(|s| *s > MAX_SEED) {
        return Err(ApiError::validation("seed", format!("must be at most {MAX_SEED} (2^53 - 1), got {seed}")));
    }
    let seed = body.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let inputs = ImageInputs::cycle(&labels, labels.len(), seed);
    Ok(JobSpec {
        model,
        labels: inputs.labels,
        seeds: inputs.seeds,
        settings: JobSettings::of(&settings),
        priority,
        output_format: output.name().to_string(),
        output_compression: output.quality(),
    })
}

/// `output_format` and `output_compression` (JPEG quality) as an encoding.
pub fn validate_output(format: Option<&str>, compression: Option<i64>) -> Result<OutputFormat, ApiError> {
    let quality = match compression {
        Some(q) if !(1..=100).contains(&q) => {
            return Err(ApiError::validation("output_compression", format!("must be between 1 and 100, got {q}")))
        }
        Some(q) => Some(q as u8),
        None => None,
    };
    let format = format.unwrap_or("png");
    // As OpenAI-compatible servers do, a quality for a lossless format is ignored, not refused.
    let quality =
        if format.eq_ignore_ascii_case("jpeg") || format.eq_ignore_ascii_case("jpg") { quality } else { None };
    OutputFormat::parse(format, quality).map_err(engine_validation)
}

/// One label per image (`n` of them, cycling over the given ones; all classes when none).
fn validate_labels(body: &GenerationBody, cfg: &ModelConfig, limits: &LimitsSection) -> Result<Vec<u32>, ApiError> {
    if let (Some(_), Some(_)) = (&body.labels, &body.label) {
        return Err(ApiError::validation("labels", "give `labels` or `label`, not both"));
    }
    let mut labels = Vec::new();
    if let Some(list) = &body.labels {
        if list.is_empty() {
            return Err(ApiError::validation("labels", "must not be empty"));
        }
        if list.len() > limits.max_n {
            return Err(ApiError::validation(
                "labels",
                format!("{} labels exceed the limit {}", list.len(), limits.max_n),
            ));
        }
        for (i, v) in list.iter().enumerate() {
            labels.push(label(cfg, &format!("labels[{i}]"), v)?);
        }
    }
    if let Some(v) = &body.label {
        labels.push(label(cfg, "label", v)?);
    }
    let n = match body.n {
        Some(n) if n < 1 || n as usize > limits.max_n => {
            return Err(ApiError::validation("n", format!("must be between 1 and {}, got {n}", limits.max_n)))
        }
        Some(n) => n as usize,
        None => labels.len().max(1),
    };
    if labels.is_empty() {
        labels = (0..cfg.num_classes() as u32).collect();
    }
    Ok(labels.iter().cycle().take(n).copied().collect())
}

/// The shared solve settings, filled from the model like the CLI's, within the server's limits.
fn validate_settings(
    body: &GenerationBody,
    cfg: &ModelConfig,
    limits: &LimitsSection,
) -> Result<SolveSettings, ApiError> {
    let steps = match body.steps {
        Some(k) if k < 1 || k as usize > limits.max_steps => {
            return Err(ApiError::validation("steps", format!("must be between 1 and {}, got {k}", limits.max_steps)))
        }
        Some(k) => Some(k as usize),
        None => None,
    };
    if let Some(g) = body.guidance {
        if !g.is_finite() || g < 0.0 || g > limits.max_guidance {
            return Err(ApiError::validation(
                "guidance",
                format!("must be between 0 and {}, got {g}", limits.max_guidance),
            ));
        }
    }
    let request = SettingsRequest {
        preset: body.preset.clone(),
        sampler: body.sampler.clone(),
        steps,
        schedule: body.schedule.clone(),
        guidance: body.guidance,
        // "Between a and b" in either order.
        guidance_interval: body.guidance_interval.map(|[a, b]| (a.min(b), a.max(b))),
    };
    let mut settings = cfg.solve_settings(&request, ScheduleAccess::Named).map_err(engine_validation)?;
    if let flowgen_engine::Sampler::Dopri5(opts) = &mut settings.sampler {
        // The adaptive solver's cost is its NFE cap, not `steps`: the server bounds it.
        let asked = body.sampler.as_deref().is_some_and(|s| s.to_ascii_lowercase().contains("max_nfe"));
        if opts.max_nfe > limits.max_nfe {
            if asked {
                return Err(ApiError::validation(
                    "sampler",
                    format!("max_nfe {} exceeds the server's limit {} (limits.max_nfe)", opts.max_nfe, limits.max_nfe),
                ));
            }
            opts.max_nfe = limits.max_nfe;
        }
    }
    if settings.steps > limits.max_steps {
        return Err(ApiError::validation(
            "schedule",
            format!("{} steps exceed the limit {}", settings.steps, limits.max_steps),
        ));
    }
    if settings.guidance > limits.max_guidance {
        return Err(ApiError::validation(
            "guidance",
            format!("must be between 0 and {}, got {}", limits.max_guidance, settings.guidance),
        ));
    }
    Ok(settings)
}

/// A job as `GET /v1/generations/{id}` shows it. Times are Unix milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub model: String,
    /// Jobs ahead of this one (0 = next); only while queued.
    pub queue_position: Option<usize>,
    /// Sampler steps completed and the total (null total for adaptive samplers).
    pub step: usize,
    pub total: Option<usize>,
    pub n: usize,
    pub labels: Vec<u32>,
    pub seeds: Vec<u64>,
    pub sampler: String,
    pub steps: usize,
    pub guidance: f64,
    /// Times s where guidance applied, [lo, hi] (null for jobs journaled before it was recorded).
    pub guidance_interval: Option<[f64; 2]>,
    pub schedule: String,
    pub priority: Priority,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Time spent queued and in the engine.
    pub queue_seconds: Option<f64>,
    pub inference_seconds: Option<f64>,
    /// Network evaluations of the solve (largest over the job's images).
    pub nfe: Option<usize>,
    /// Times the engine started this job (more than 1 after a crash mid-run).
    pub attempts: u32,
    /// png, jpeg or webp.
    pub output_format: String,
    /// Image URLs, once succeeded.
    pub images: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelInfo {
    pub id: String,
    pub object: &'static str,
    pub owned_by: &'static str,
    pub description: String,
    pub classes: usize,
    pub label_names: Vec<String>,
    /// Output images: channels, height, width.
    pub image_shape: [usize; 3],
    /// Canonical sampler plan and steps used when a request names none.
    pub default_sampler: String,
    pub default_steps: usize,
    pub default_schedule: String,
    /// Presets a request may name in `preset`.
    pub presets: Vec<String>,
    /// Schedules the model stores, usable by name in `schedule`.
    pub schedules: Vec<String>,
    /// The plan a bare family name runs on this model, e.g. flowturbo -> flowturbo:H2P4R2.
    pub sampler_plans: std::collections::BTreeMap<String, String>,
    /// Networks beside the velocity network (a FlowTurbo refiner) that samplers may call.
    pub networks: Vec<String>,
    pub default_guidance: f64,
    /// Times s (0 noise, 1 data) where guidance applies by default.
    pub default_guidance_interval: [f64; 2],
    pub guidance_supported: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Limits {
    pub max_n: usize,
    pub max_steps: usize,
    pub max_guidance: f64,
    /// Most evaluations an adaptive sampler (dopri5) may spend per image.
    pub max_nfe: usize,
    pub max_batch: usize,
    pub queue_capacity: usize,
    /// Jobs one API key may have queued at once.
    pub max_queued_per_key: usize,
    /// Jobs one API key may keep stored (finished ones until they expire or are deleted).
    pub max_stored_per_key: usize,
    /// Seconds a finished job and its images are kept.
    pub result_ttl_s: u64,
    pub body_limit_bytes: usize,
}

/// One page of `GET /v1/generations`, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub data: Vec<JobView>,
    /// More jobs follow: ask again with `after` = the last id of this page.
    pub has_more: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelsResponse {
    pub object: &'static str,
    pub data: Vec<ModelInfo>,
    /// Sampler families with their parameters, e.g. "dopri5[:rtol=R,atol=A,max_nfe=M]".
    pub samplers: Vec<String>,
    pub schedules: Vec<&'static str>,
    pub limits: Limits,
}

/// OpenAI-style synchronous request: `prompt` names the class ("7" or "seven").
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAiImageRequest {
    pub prompt: String,
    /// A served model name or "default"; the default model when absent.
    pub model: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    pub n: Option<i64>,
    /// b64_json (default) or url.
    pub response_format: Option<String>,
    /// Must match the model's image size when given, e.g. "28x28".
    pub size: Option<String>,
    #[serde(default, deserialize_with = "whole_seed")]
    pub seed: Option<u64>,
    /// Accepted for OpenAI compatibility and ignored.
    pub user: Option<String>,
    /// Accepted for OpenAI compatibility and ignored ("standard", "hd", "auto", ...): a flow model
    /// has no quality switch; choose steps and sampler through /v1/generations instead.
    pub quality: Option<String>,
    /// Accepted for OpenAI compatibility and ignored.
    pub style: Option<String>,
    /// Accepted for OpenAI compatibility and ignored.
    pub moderation: Option<String>,
    /// png (default), jpeg or webp.
    pub output_format: Option<String>,
    /// JPEG quality 1-100.
    #[serde(default, deserialize_with = "whole_number")]
    pub output_compression: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OpenAiImage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub revised_prompt: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OpenAiImageResponse {
    pub created: i64,
    pub data: Vec<OpenAiImage>,
}
