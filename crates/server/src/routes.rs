//! HTTP routes, the OpenAPI document and the SSE progress stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::stream::{self, Stream};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutError, TimeoutLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_scalar::{Scalar, Servable};

use crate::api::{
    self, GenerationBody, JobList, JobStatus, JobView, LabelValue, Limits, ModelInfo, ModelsResponse, OpenAiImage,
    OpenAiImageRequest, OpenAiImageResponse, Priority,
};
use crate::error::{ApiError, ErrorBody};
use crate::jobs::{now_ms, view_of, Admission};
use crate::queue::Snapshot;
use crate::state::AppState;
use crate::store::StoredJob;
use flowgen_engine::image::OutputFormat;

type AppResult<T> = Result<T, ApiError>;

#[derive(OpenApi)]
#[openapi(
    info(title = "flowgen", description = "Flow-matching image generation: queued jobs, progress, cancellation."),
    paths(create_generation, list_generations, get_generation, delete_generation, generation_events, cancel_generation, generation_image, openai_generate, list_models, health, ready, metrics),
    components(schemas(GenerationBody, LabelValue, JobView, JobList, JobStatus, Priority, ErrorBody, ModelsResponse, ModelInfo, Limits, OpenAiImageRequest, OpenAiImageResponse, OpenAiImage)),
    modifiers(&BearerAuth, &EdgeResponses)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Answers every route can give before a handler runs: a Host not allowed (421), too many open
/// connections (503), a missing key (401), an unreadable body, path or query (400), and for routes
/// with a body, a body that arrives too slowly (408).
struct EdgeResponses;

impl utoipa::Modify for EdgeResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            for operation in [item.get.as_mut(), item.post.as_mut(), item.delete.as_mut()].into_iter().flatten() {
                let responses = &mut operation.responses.responses;
                responses.entry("421".into()).or_insert_with(|| {
                    error("The Host header names a host this server does not answer to (server.allowed_hosts)").into()
                });
                responses
                    .entry("503".into())
                    .or_insert_with(|| error("Too many open connections (server.max_connections)").into());
                if operation.security.is_some() {
                    responses
                        .entry("401".into())
                        .or_insert_with(|| error("Missing or invalid API key (when auth.api_keys is set)").into());
                }
                if operation.request_body.is_some() || operation.parameters.is_some() {
                    responses.entry("400".into()).or_insert_with(|| {
                        error("The body is not JSON, or a path or query value cannot be read").into()
                    });
                }
                if operation.request_body.is_some() {
                    responses.entry("408".into()).or_insert_with(|| {
                        error("The request body did not arrive within server.body_timeout_s").into()
                    });
                }
            }
        }
    }
}

/// The router; `serve` binds it, tests drive it with `oneshot`.
pub fn app(state: Arc<AppState>) -> Router {
    let cfg = &state.config.server;
    let timeout = Duration::from_secs(cfg.request_timeout_s);
    let document = crate::openapi::document(&ApiDoc::openapi(), &state.config, &state.models);
    // Serialized once: each request gets a cheap clone of the bytes.
    let document_bytes = Bytes::from(document.to_string());
    let docs_page = Scalar::with_url("/docs", document);
    // Everything but the synchronous endpoint (it has its own deadline) and SSE (it streams).
    let bounded = Router::new()
        .route("/v1/generations", post(create_generation).get(list_generations))
        .route("/v1/generations/{id}", get(get_generation).delete(delete_generation))
        .route("/v1/generations/{id}/cancel", post(cancel_generation))
        .route("/v1/generations/{id}/images/{index}", get(generation_image))
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], document_bytes.clone()) }),
        )
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout));
    let mut router = Router::new()
        .merge(bounded)
        .route("/v1/generations/{id}/events", get(generation_events))
        .route("/v1/images/generations", post(openai_generate))
        .merge(docs_page)
        .layer(DefaultBodyLimit::max(cfg.body_limit_bytes))
        // A body that trickles in slower than this is cut off with 408, on every route.
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(cfg.body_timeout_s)))
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .layer(TraceLayer::new_for_http());
    if !cfg.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = cfg.cors_origins.iter().filter_map(|o| o.parse().ok()).collect();
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::HeaderName::from_static("idempotency-key"),
                ]),
        );
    }
    router.with_state(state)
}

/// A worker's router: probes and metrics only (jobs are submitted to an API process).
pub fn worker_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::NotFound(
                "this process is a worker (server.role = worker): it serves /health, /ready and /metrics; \
                 submit jobs to an API process"
                    .into(),
            )
        })
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// DNS rebinding defence: a page that points its own name at this server still sends that name
/// as `Host`, which is refused unless `server.allowed_hosts` lists it.
async fn check_host(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    match host {
        Some(host) if !state.config.host_allowed(host) => {
            let shown: String = host.chars().take(64).collect();
            ApiError::MisdirectedHost(format!(
                "this server does not answer to Host {shown:?}: add the name to server.allowed_hosts"
            ))
            .into_response()
        }
        _ => next.run(request).await,
    }
}

/// What a connection past `server.max_connections` is served: the probes, and 503 for the rest.
pub fn probes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(|| async {
            let mut response = ApiError::Unavailable(crate::connections::TOO_MANY_CONNECTIONS.into()).into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        })
        .with_state(state)
}

/// The authenticated caller (a hash of its API key, or "anonymous" when auth is off).
pub struct Caller(pub String);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        state.authenticate(header).map(Caller)
    }
}

/// JSON routes take only `application/json` bodies, so a browser form post from another site (which
/// cannot set that type without a CORS preflight) never reaches them.
fn require_json(headers: &HeaderMap) -> AppResult<()> {
    let declared = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = declared.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        let got = if declared.is_empty() { "none".to_string() } else { format!("{declared:?}") };
        Err(ApiError::UnsupportedMediaType(format!(
            "the body must be sent as Content-Type: application/json, got {got}"
        )))
    }
}

fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>, limit: usize) -> AppResult<T> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("the request body exceeds the limit of {limit} bytes"))
        } else if caused_by::<TimeoutError>(&rejection) {
            ApiError::SlowBody("the request body did not arrive within server.body_timeout_s".into())
        } else {
            ApiError::Malformed(rejection.body_text())
        }
    })?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::Malformed(format!("the body is not valid JSON: {inner}"))
        } else {
            let field = if path == "." { "body".to_string() } else { path };
            ApiError::validation(field, inner.to_string())
        }
    })
}

fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<E>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// 404 for an unknown job, 403 for another key's job.
async fn owned_view(state: &AppState, caller: &Caller, id: &str) -> AppResult<JobView> {
    let (owner, view) =
        state.find(id).await?.ok_or_else(|| ApiError::NotFound(format!("no job {id:?} (unknown or expired)")))?;
    if owner != caller.0 {
        return Err(ApiError::Forbidden(format!("job {id:?} belongs to another API key")));
    }
    Ok(view)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> crate::error::Result<T> + Send + 'static) -> AppResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(e.to_string()))?.map_err(ApiError::from)
}

/// Journal a validated job, then queue it; returns the id and whether it is new.
async fn submit(
    state: &Arc<AppState>,
    owner: &str,
    idempotency_key: Option<String>,
    request_hash: String,
    spec: api::JobSpec,
) -> AppResult<(String, bool)> {
    if state.is_draining() {
        state.metrics.rejected("draining");
        return Err(ApiError::Unavailable("the server is shutting down and accepts no new jobs".into()));
    }
    if let Some(key) = idempotency_key.as_deref() {
        // Live jobs are found in memory, ended ones only in the store; `admit` looks in memory
        // again, for a first request that lands in between.
        if state.jobs.replay(owner, key, &request_hash)?.is_none() {
            let results = state.results.clone();
            let (who, what) = (owner.to_string(), key.to_string());
            if let Some((id, hash)) = blocking(move || results.idempotent(&who, &what)).await? {
                if hash != request_hash {
                    return Err(ApiError::Conflict(format!(
                        "Idempotency-Key {key:?} was used for a different request (job {id})"
                    )));
                }
                return Ok((id, false));
            }
        }
    }
    match state.jobs.admit(owner, idempotency_key.as_deref(), &request_hash)? {
        Admission::StoreFull { stored } => Err(store_full(state, owner, stored).await),
        Admission::Existing { id, landing: None } => Ok((id, false)),
        Admission::Existing { id, landing: Some(mut landing) } => {
            // The first request with this key is still being journaled: its outcome is this one's.
            let landed = landing.wait_for(Option::is_some).await.map(|v| *v == Some(true)).unwrap_or(false);
            if landed {
                Ok((id, false))
            } else {
                Err(ApiError::Unavailable(
                    "the first request with this Idempotency-Key could not be journaled; send it again".into(),
                ))
            }
        }
        Admission::New { id, landed } => {
            let request_key = (idempotency_key.clone(), request_hash.clone());
            let job = StoredJob {
                idempotency_key: idempotency_key.clone(),
                request_hash,
                ..StoredJob::accepted(&id, owner, spec, now_ms())
            };
            let (images, sampler, steps) = (job.spec.n(), job.spec.settings.sampler.clone(), job.spec.settings.steps);
            // The journal write and its bookkeeping run to their end in a task of their own, even
            // when the client goes away or the request times out: no slot or key is left behind.
            let worker = state.clone();
            let (job_id, job_owner) = (id.clone(), owner.to_string());
            let written = tokio::task::spawn_blocking(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.queue.enqueue(job)))
                    .unwrap_or_else(|_| Err(crate::error::ServerError::Task("journaling a job panicked".into())));
                if result.is_err() {
                    worker.jobs.abandon(&job_id, &job_owner, idempotency_key.as_deref());
                }
                // A shared queue's refusal (full, or a replay) says nothing about its health.
                if !matches!(result, Err(crate::error::ServerError::Refused(_))) {
                    worker.journal_written(result.is_ok());
                }
                landed.send_replace(Some(result.is_ok()));
                result
            })
            .await;
            match written {
                Ok(Ok(())) => {
                    tracing::info!(job = %id, images, %sampler, steps, "job accepted");
                    Ok((id, true))
                }
                Ok(Err(crate::error::ServerError::Refused(refusal))) => {
                    refused(state, owner, &request_key, refusal).await
                }
                Ok(Err(err)) => {
                    tracing::error!(job = %id, error = %err, "cannot journal a new job");
                    Err(ApiError::Unavailable(
                        "the job journal cannot be written just now; nothing was queued, retry".into(),
                    ))
                }
                Err(join) => Err(ApiError::Internal(format!("journaling job {id}: {join}"))),
            }
        }
    }
}

/// What the shared queue's atomic admission check decided, as the embedded queue would answer.
async fn refused(
    state: &AppState,
    owner: &str,
    (idempotency_key, request_hash): &(Option<String>, String),
    refusal: crate::error::Refusal,
) -> AppResult<(String, bool)> {
    use crate::error::Refusal;
    let q = &state.config.queue;
    match refusal {
        Refusal::Duplicate { id, request_hash: first } => {
            if &first == request_hash {
                return Ok((id, false));
            }
            let key = idempotency_key.as_deref().unwrap_or_default();
            Err(ApiError::Conflict(format!("Idempotency-Key {key:?} was used for a different request (job {id})")))
        }
        // The shared queue has no local throughput estimate: a short retry.
        Refusal::QueueFull { .. } => Err(crate::jobs::queue_full(&state.metrics, q.capacity, 5)),
        Refusal::KeyQueueFull { queued } => {
            Err(crate::jobs::key_queue_full(&state.metrics, queued, q.max_queued_per_key, 5))
        }
        Refusal::StoreFull { stored } => {
            state.metrics.rejected("key_store_full");
            Err(store_full(state, owner, stored).await)
        }
    }
}

/// 429 for a key that keeps as many jobs as it may: its oldest finished job expiring (or one it
/// deletes) frees a place.
async fn store_full(state: &AppState, owner: &str, stored: usize) -> ApiError {
    let cap = state.config.queue.max_stored_per_key;
    let ttl_ms = (state.config.queue.result_ttl_s as i64).saturating_mul(1000);
    let results = state.results.clone();
    let who = owner.to_string();
    let first = blocking(move || results.first_finished(&who)).await.ok().flatten();
    let retry_after_s = match first {
        Some(finished) => ((finished.saturating_add(ttl_ms) - now_ms()).max(0) as u64).div_ceil(1000).max(1),
        None => 5,
    };
    ApiError::Overloaded {
        message: format!(
            "this API key stores {stored} jobs, the most one key may keep (queue.max_stored_per_key = {cap}); \
             finished jobs expire queue.result_ttl_s = {}s after they finish (the next in {retry_after_s}s), \
             or DELETE /v1/generations/{{id}} frees a place",
            state.config.queue.result_ttl_s
        ),
        retry_after_s,
    }
}

fn hash_json<T: serde::Serialize>(value: &T) -> String {
    let text = serde_json::to_string(value).unwrap_or_default();
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Queue a generation job.
#[utoipa::path(post, path = "/v1/generations", request_body = GenerationBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeat a submission safely: the same key and body return the same job")),
    responses(
        (status = 202, description = "Accepted; poll the Location", body = JobView),
        (status = 200, description = "Idempotent replay of an earlier submission", body = JobView),
        (status = 401, body = ErrorBody), (status = 403, description = "priority high without the right to it", body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = ErrorBody),
        (status = 422, description = "A field is invalid; `field` names it", body = ErrorBody),
        (status = 429, description = "Queue full, this key's queue or store full, or rate limited; see Retry-After", body = ErrorBody),
        (status = 503, description = "Shutting down, or the journal cannot be written", body = ErrorBody)),
    security(("bearer" = [])))]
async fn create_generation(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> AppResult<Response> {
    require_json(&headers)?;
    state.check_rate(&caller.0)?;
    let body: GenerationBody = parse_body(body, state.config.server.body_limit_bytes)?;
    let spec = api::validate(&body, &state.models, &state.config.limits)?;
    if spec.priority == Priority::High && !state.may_use_high_priority(&caller.0) {
        return Err(ApiError::Forbidden(
            "priority: \"high\" is reserved for keys listed in auth.high_priority_keys".into(),
        ));
    }
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) => Some(k.to_string()),
            _ => return Err(ApiError::validation("Idempotency-Key", "must be 1 to 255 visible ASCII characters")),
        },
    };
    // The body hash only matters for detecting a reused Idempotency-Key.
    let request_hash = if idempotency_key.is_some() { hash_json(&body) } else { String::new() };
    let (id, new) = submit(&state, &caller.0, idempotency_key, request_hash, spec).await?;
    let view = owned_view(&state, &caller, &id).await?;
    let status = if new { StatusCode::ACCEPTED } else { StatusCode::OK };
    let mut response = (status, Json(view)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/generations/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Most jobs one page of `GET /v1/generations` returns.
const MAX_LIST_LIMIT: usize = 500;

/// The caller's jobs (those not yet expired), newest first, optionally filtered by status.
#[utoipa::path(get, path = "/v1/generations",
    params(
        ("status" = Option<String>, Query, description = "Comma-separated statuses to keep, e.g. queued,running"),
        ("limit" = Option<usize>, Query, description = "Jobs per page, 1..=500 (default 50)"),
        ("after" = Option<String>, Query, description = "Cursor: the last id of the previous page"),
    ),
    responses((status = 200, body = JobList), (status = 404, description = "`after` names no job of the caller", body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_generations(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<std::collections::HashMap<String, String>>, QueryRejection>,
) -> AppResult<Json<JobList>> {
    let Query(params) =
        query.map_err(|rejection| ApiError::Malformed(format!("the query string: {}", rejection.body_text())))?;
    if let Some(unknown) = params.keys().find(|k| !matches!(k.as_str(), "status" | "limit" | "after")) {
        return Err(ApiError::validation(unknown, "unknown query parameter; use status, limit or after"));
    }
    let mut statuses = Vec::new();
    for name in params.get("status").map(|s| s.split(',')).into_iter().flatten().filter(|s| !s.is_empty()) {
        statuses.push(JobStatus::parse(name).ok_or_else(|| {
            ApiError::validation(
                "status",
                format!("{name:?} is not one of {}", JobStatus::ALL.map(JobStatus::as_str).join(", ")),
            )
        })?);
    }
    let limit = match params.get("limit") {
        None => 50,
        Some(text) => match text.parse::<usize>() {
            Ok(k) if (1..=MAX_LIST_LIMIT).contains(&k) => k,
            _ => {
                return Err(ApiError::validation(
                    "limit",
                    format!("must be between 1 and {MAX_LIST_LIMIT}, got {text:?}"),
                ))
            }
        },
    };
    let after = params.get("after").filter(|a| !a.is_empty()).cloned();
    let results = state.results.clone();
    let (owner, cursor) = (caller.0.clone(), after.clone());
    let page = blocking(move || results.list(&owner, &statuses, limit, cursor.as_deref())).await?.ok_or_else(|| {
        ApiError::NotFound(format!("after: no job {:?} among your jobs (expired?)", after.unwrap_or_default()))
    })?;
    let (stored, has_more) = page;
    // Live jobs show their progress; the store has the rest as it ended.
    let ids: Vec<&str> = stored.iter().map(|j| j.id.as_str()).collect();
    let live = state.jobs.live_views(&ids);
    let data = stored.iter().zip(live).map(|(job, live)| live.unwrap_or_else(|| view_of(job, None))).collect();
    Ok(Json(JobList { data, has_more }))
}

/// A job's status, progress, timings, seeds and image URLs.
#[utoipa::path(get, path = "/v1/generations/{id}", params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_generation(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<JobView>> {
    owned_view(&state, &caller, &id).await.map(Json)
}

/// Delete a finished job and its images (they would expire after queue.result_ttl_s anyway);
/// a queued or running job is cancelled first.
#[utoipa::path(delete, path = "/v1/generations/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted with its images"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "Still queued or running: cancel it first", body = ErrorBody)),
    security(("bearer" = [])))]
async fn delete_generation(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<StatusCode> {
    let view = owned_view(&state, &caller, &id).await?;
    if !view.status.is_final() {
        return Err(ApiError::Conflict(format!("job {id} is {}: cancel it before deleting it", view.status.as_str())));
    }
    let results = state.results.clone();
    let (target, owner) = (id.clone(), caller.0.clone());
    if blocking(move || results.delete(&target, &owner)).await? {
        tracing::info!(job = %id, "job deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no job {id:?} (already deleted or expired)")))
    }
}

/// Cancel a job: a queued one at once, a running one within one sampler step (batch-mates go on).
#[utoipa::path(post, path = "/v1/generations/{id}/cancel", params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, description = "Already finished", body = ErrorBody)),
    security(("bearer" = [])))]
async fn cancel_generation(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<JobView>> {
    let view = owned_view(&state, &caller, &id).await?;
    if view.status.is_final() {
        return Err(ApiError::Conflict(format!("job {id} already {}", view.status.as_str())));
    }
    let queue = state.queue.clone();
    let target = id.clone();
    if blocking(move || queue.cancel(&target)).await? {
        tracing::info!(job = %id, "job cancelled");
    } else {
        let now = owned_view(&state, &caller, &id).await?;
        return Err(ApiError::Conflict(format!("job {id} already {}", now.status.as_str())));
    }
    owned_view(&state, &caller, &id).await.map(Json)
}

/// One generated image in the job's format (PNG with the settings as text chunks; JPEG and WebP
/// with them in XMP).
#[utoipa::path(get, path = "/v1/generations/{id}/images/{index}", params(("id" = String, Path), ("index" = usize, Path)),
    responses((status = 200, description = "The image in the job's output_format", content((Vec<u8> = "image/png"), (Vec<u8> = "image/jpeg"), (Vec<u8> = "image/webp"))), (status = 404, body = ErrorBody), (status = 409, description = "Not finished", body = ErrorBody)),
    security(("bearer" = [])))]
async fn generation_image(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    path: Result<Path<(String, usize)>, PathRejection>,
) -> AppResult<Response> {
    let Path((id, index)) = path.map_err(|rejection| {
        ApiError::Malformed(format!("the image index must be a whole number 0 or more: {}", rejection.body_text()))
    })?;
    // A live job has no images yet; one that ended is read with its image in one go.
    let (owner, view, bytes) = match state.jobs.view(&id) {
        Some((owner, view)) => (owner, view, None),
        None => {
            let results = state.results.clone();
            let target = id.clone();
            let (job, bytes) = blocking(move || results.load_with_image(&target, index))
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no job {id:?} (unknown or expired)")))?;
            (job.owner.clone(), view_of(&job, None), bytes)
        }
    };
    if owner != caller.0 {
        return Err(ApiError::Forbidden(format!("job {id:?} belongs to another API key")));
    }
    if view.status != JobStatus::Succeeded {
        return Err(ApiError::Conflict(format!("job {id} is {} and has no images", view.status.as_str())));
    }
    if index >= view.n {
        return Err(ApiError::NotFound(format!("job {id} has images 0..{}", view.n - 1)));
    }
    let bytes = bytes.ok_or_else(|| ApiError::NotFound(format!("image {index} of job {id} is gone (expired)")))?;
    let format = OutputFormat::parse(&view.output_format, None).unwrap_or(OutputFormat::Png);
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (header::CACHE_CONTROL, "private, max-age=31536000, immutable".to_string()),
            (header::CONTENT_DISPOSITION, format!("inline; filename=\"{id}-{index}.{}\"", format.extension())),
        ],
        bytes,
    )
        .into_response())
}

/// Server-Sent Events: queued (with position), started, progress, then succeeded | failed | cancelled.
#[utoipa::path(get, path = "/v1/generations/{id}/events", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", description = "A late subscriber first gets the current state"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn generation_events(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Response> {
    owned_view(&state, &caller, &id).await?;
    let rx = subscribe(&state, &id).await?;
    let mut response = Sse::new(event_stream(state, id, rx)).keep_alive(KeepAlive::default()).into_response();
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

struct EventCursor {
    state: Arc<AppState>,
    id: String,
    rx: watch::Receiver<Snapshot>,
    draining: watch::Receiver<bool>,
    last: Option<Snapshot>,
    pending: std::collections::VecDeque<Event>,
    /// The final status seen; its event (with the job's final view) is sent last.
    ended: Option<JobStatus>,
    done: bool,
}

fn event(name: &str, data: serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

impl EventCursor {
    /// Events that take a subscriber from `last` to `now`, in order.
    fn transitions(&mut self, now: Snapshot) {
        let id = self.id.clone();
        let prev = self.last.clone();
        let was = prev.as_ref().map(|p| p.status);
        match now.status {
            JobStatus::Queued => {
                if prev.as_ref().map(|p| (p.status, p.position)) != Some((JobStatus::Queued, now.position)) {
                    self.pending.push_back(event(
                        "queued",
                        serde_json::json!({"id": id, "status": "queued", "queue_position": now.position}),
                    ));
                }
            }
            JobStatus::Running | JobStatus::Succeeded | JobStatus::Failed => {
                if was.is_none_or(|s| s == JobStatus::Queued) && (now.status == JobStatus::Running || was.is_some()) {
                    self.pending.push_back(event("started", serde_json::json!({"id": id, "status": "running"})));
                }
                let last_step = prev.as_ref().map(|p| p.step).unwrap_or(0);
                if now.status == JobStatus::Running
                    && now.step > 0
                    && (now.step != last_step || was != Some(JobStatus::Running))
                {
                    self.pending.push_back(event(
                        "progress",
                        serde_json::json!({"id": id, "step": now.step, "total": now.total}),
                    ));
                }
            }
            JobStatus::Cancelled => {}
        }
        if now.status.is_final() {
            self.ended = Some(now.status);
        }
        self.last = Some(now);
    }
}

fn event_stream(
    state: Arc<AppState>,
    id: String,
    rx: watch::Receiver<Snapshot>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let draining = state.draining_receiver();
    let cursor =
        EventCursor { state, id, rx, draining, last: None, pending: Default::default(), ended: None, done: false };
    stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(ev) = c.pending.pop_front() {
                return Some((Ok(ev), c));
            }
            if c.done {
                return None;
            }
            if let Some(status) = c.ended {
                let view = c.state.find(&c.id).await.ok().flatten().map(|(_, view)| view);
                c.pending.push_back(event(status.as_str(), serde_json::to_value(view).unwrap_or_default()));
                c.done = true;
                continue;
            }
            if c.last.is_some() {
                tokio::select! {
                    // A job that ended leaves the live table and its channel closes, but only
                    // after its final state, which `changed` still reports.
                    changed = c.rx.changed() => if changed.is_err() { return None },
                    _ = c.draining.wait_for(|d| *d) => return None,
                }
            }
            let now = c.rx.borrow_and_update().clone();
            c.transitions(now);
        }
    })
}

/// A job's progress channel (one holding the final state for a job that ended, which may take a
/// store read).
async fn subscribe(state: &Arc<AppState>, id: &str) -> AppResult<watch::Receiver<Snapshot>> {
    let progress = state.progress.clone();
    let target = id.to_string();
    let rx = tokio::task::spawn_blocking(move || progress.subscribe(&target))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    rx.ok_or_else(|| ApiError::NotFound(format!("no job {id:?} (unknown or expired)")))
}

fn prompt_label(prompt: &str) -> LabelValue {
    // "7", "seven", "a seven", "digit 7": the last word names the class.
    let word = prompt.split_whitespace().last().unwrap_or("").trim_matches(|c: char| !c.is_alphanumeric());
    match word.parse::<i64>() {
        Ok(i) => LabelValue::Index(i),
        Err(_) => LabelValue::Name(word.to_lowercase()),
    }
}

/// OpenAI-compatible synchronous generation: `prompt` names the class ("7" or "seven").
#[utoipa::path(post, path = "/v1/images/generations", request_body = OpenAiImageRequest,
    responses((status = 200, body = OpenAiImageResponse), (status = 415, description = "The body is not sent as application/json", body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 504, description = "Not done in time; the job goes on (see error)", body = ErrorBody)),
    security(("bearer" = [])))]
async fn openai_generate(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> AppResult<Json<OpenAiImageResponse>> {
    require_json(&headers)?;
    state.check_rate(&caller.0)?;
    let req: OpenAiImageRequest = parse_body(body, state.config.server.body_limit_bytes)?;
    let url_format = match req.response_format.as_deref() {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => {
            return Err(ApiError::validation("response_format", format!("{other:?} is not b64_json or url")))
        }
    };
    let spec = openai_spec(&state, &req)?;
    let (id, _) = submit(&state, &caller.0, None, String::new(), spec).await?;
    let status = wait_until_final(&state, &id).await?;
    let view = owned_view(&state, &caller, &id).await?;
    if status != JobStatus::Succeeded {
        return Err(ApiError::Internal(format!("job {id} {}: {}", status.as_str(), view.error.unwrap_or_default())));
    }
    let mut data = Vec::with_capacity(view.n);
    for index in 0..view.n {
        if url_format {
            data.push(OpenAiImage {
                b64_json: None,
                url: Some(format!("/v1/generations/{id}/images/{index}")),
                revised_prompt: None,
            });
            continue;
        }
        let results = state.results.clone();
        let target = id.clone();
        let bytes = blocking(move || results.image(&target, index))
            .await?
            .ok_or_else(|| ApiError::Internal(format!("image {index} of {id} missing")))?;
        data.push(OpenAiImage {
            b64_json: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            url: None,
            revised_prompt: None,
        });
    }
    Ok(Json(OpenAiImageResponse { created: now_ms() / 1000, data }))
}

/// The job an OpenAI-style request stands for; `prompt` names the class.
fn openai_spec(state: &AppState, req: &OpenAiImageRequest) -> AppResult<api::JobSpec> {
    if req.prompt.trim().is_empty() {
        return Err(ApiError::validation("prompt", "name a class, e.g. \"7\" or \"seven\""));
    }
    let generation = GenerationBody {
        model: req.model.clone(),
        label: Some(prompt_label(&req.prompt)),
        n: Some(req.n.unwrap_or(1)),
        seed: req.seed,
        output_format: req.output_format.clone(),
        output_compression: req.output_compression,
        ..Default::default()
    };
    let spec = api::validate(&generation, &state.models, &state.config.limits).map_err(|e| match e {
        ApiError::Validation { field, message } if field == "label" => ApiError::validation("prompt", message),
        other => other,
    })?;
    if let Some(size) = &req.size {
        let cfg = state.models.get(&spec.model).map(|e| e.config().image_shape());
        if let Some((_, h, w)) = cfg {
            if size != &format!("{w}x{h}") && size != "auto" {
                return Err(ApiError::validation("size", format!("this model makes {w}x{h} images, not {size}")));
            }
        }
    }
    Ok(spec)
}

/// Wait for job `id` to end, at most the request timeout; 503 when the server starts draining.
async fn wait_until_final(state: &Arc<AppState>, id: &str) -> AppResult<JobStatus> {
    let mut rx = subscribe(state, id).await?;
    let mut draining = state.draining_receiver();
    let deadline = Duration::from_secs(state.config.server.request_timeout_s);
    let finished = tokio::time::timeout(deadline, async {
        tokio::select! {
            r = rx.wait_for(|s| s.status.is_final()) => r.map(|s| s.status).ok(),
            _ = draining.wait_for(|d| *d) => None,
        }
    })
    .await;
    match finished {
        Ok(Some(status)) => Ok(status),
        Ok(None) => Err(ApiError::Unavailable(format!("the server is shutting down; job {id} stays queued"))),
        Err(_) => Err(ApiError::Timeout(format!(
            "job {id} did not finish in {}s; poll /v1/generations/{id}",
            deadline.as_secs()
        ))),
    }
}

/// Served models, samplers and limits.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelsResponse)), security(("bearer" = [])))]
async fn list_models(State(state): State<Arc<AppState>>, _caller: Caller) -> Json<ModelsResponse> {
    let data = state
        .models
        .iter()
        .map(|engine| {
            let cfg = engine.config();
            let (c, h, w) = cfg.image_shape();
            // Checked when the model loaded, so this is the settings a bare request gets.
            let defaults = cfg.solve_settings(&Default::default(), flowgen_engine::ScheduleAccess::Named).ok();
            ModelInfo {
                id: cfg.name.clone(),
                object: "model",
                owned_by: "local",
                description: cfg.description.clone(),
                classes: cfg.num_classes(),
                label_names: cfg.label_names.clone(),
                image_shape: [c, h, w],
                default_sampler: defaults.as_ref().map(|d| d.sampler.canonical()).unwrap_or_default(),
                default_steps: defaults.as_ref().map(|d| d.steps).unwrap_or(cfg.defaults.steps),
                default_schedule: defaults.as_ref().map(|d| d.schedule.canonical()).unwrap_or_default(),
                presets: cfg.presets.keys().cloned().collect(),
                schedules: cfg.schedules.keys().cloned().collect(),
                sampler_plans: cfg.sampler_plans.clone(),
                networks: cfg.networks.keys().cloned().collect(),
                default_guidance: cfg.defaults.guidance,
                default_guidance_interval: [cfg.guidance.interval.0, cfg.guidance.interval.1],
                guidance_supported: cfg.null_label().is_some(),
            }
        })
        .collect();
    let c = &state.config;
    Json(ModelsResponse {
        object: "list",
        data,
        samplers: flowgen_engine::samplers::sampler_syntax(),
        schedules: vec!["uniform", "shift:<alpha>", "<s0>,<s1>,...,1", "<name of a schedule the model stores>"],
        limits: Limits {
            max_n: c.limits.max_n,
            max_steps: c.limits.max_steps,
            max_guidance: c.limits.max_guidance,
            max_nfe: c.limits.max_nfe,
            max_batch: c.queue.max_batch,
            queue_capacity: c.queue.capacity,
            max_queued_per_key: c.queue.max_queued_per_key,
            max_stored_per_key: c.queue.max_stored_per_key,
            result_ttl_s: c.queue.result_ttl_s,
            body_limit_bytes: c.server.body_limit_bytes,
        },
    })
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "Alive")))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: models loaded and warmed up, the journal writable, not draining.
#[utoipa::path(get, path = "/ready", responses((status = 200, description = "Ready"), (status = 503, description = "Warming up, draining, or the journal cannot be written")))]
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        Json(serde_json::json!({"status": "ready", "queued": state.queue.queued()})).into_response()
    } else {
        let why = if state.is_draining() {
            "draining"
        } else if !state.journal_ok() {
            "journal_unwritable"
        } else {
            "warming_up"
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": why}))).into_response()
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<Arc<AppState>>) -> AppResult<Response> {
    let text = state.metrics.encode().map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}
