//! Server errors: `ServerError` for start-up and internals, `ApiError` for what a client sees.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("journal database: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("journal database readers: {0}")]
    ReadPool(#[from] r2d2::Error),
    #[error("{context}: {error}")]
    Io { context: String, error: std::io::Error },
    #[error("engine: {0}")]
    Engine(#[from] flowgen_engine::Error),
    #[error("stored job {id} is unreadable: {message}")]
    Corrupt { id: String, message: String },
    #[error("background task failed: {0}")]
    Task(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis connections: {0}")]
    RedisPool(String),
    /// The shared queue refused a job at admission (checked atomically across API processes).
    #[error("job refused: {0:?}")]
    Refused(Refusal),
}

/// Why the shared queue refused a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `queue.capacity` jobs are queued.
    QueueFull { queued: usize },
    /// The owner has `queue.max_queued_per_key` jobs queued.
    KeyQueueFull { queued: usize },
    /// The owner stores `queue.max_stored_per_key` jobs.
    StoreFull { stored: usize },
    /// Another API process accepted a job with this Idempotency-Key first.
    Duplicate { id: String, request_hash: String },
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    /// validation | overloaded | not_found | unauthorized | forbidden | conflict | too_large | unsupported_media_type | misdirected | unavailable | timeout | internal
    pub error_type: &'static str,
    /// The request field at fault, for validation errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub enum ApiError {
    Validation {
        field: String,
        message: String,
    },
    Malformed(String),
    Overloaded {
        message: String,
        retry_after_s: u64,
    },
    NotFound(String),
    Unauthorized,
    Forbidden(String),
    Conflict(String),
    TooLarge(String),
    /// The body is not declared as `application/json` (415): a cross-site form post, or a client bug.
    UnsupportedMediaType(String),
    Unavailable(String),
    /// The Host header names a host this server does not answer to.
    MisdirectedHost(String),
    /// The request body arrived too slowly.
    SlowBody(String),
    Timeout(String),
    /// The detail is logged, never sent.
    Internal(String),
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Validation { field: field.into(), message: message.into() }
    }
}

impl From<ServerError> for ApiError {
    fn from(err: ServerError) -> Self {
        ApiError::Internal(err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error_type, error, field) = match self {
            ApiError::Validation { field, message } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "validation", format!("{field}: {message}"), Some(field))
            }
            ApiError::Malformed(m) => (StatusCode::BAD_REQUEST, "validation", m, None),
            ApiError::Overloaded { message, retry_after_s } => {
                let body = ErrorBody { error: message, error_type: "overloaded", field: None };
                let mut resp = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s.max(1)));
                return resp;
            }
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m, None),
            ApiError::Unauthorized => {
                let body = ErrorBody {
                    error: "missing or invalid API key: send `Authorization: Bearer <key>`".into(),
                    error_type: "unauthorized",
                    field: None,
                };
                let mut resp = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return resp;
            }
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m, None),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m, None),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large", m, None),
            ApiError::UnsupportedMediaType(m) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", m, Some("Content-Type".to_string()))
            }
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m, None),
            ApiError::MisdirectedHost(m) => {
                (StatusCode::MISDIRECTED_REQUEST, "misdirected", m, Some("Host".to_string()))
            }
            ApiError::SlowBody(m) => (StatusCode::REQUEST_TIMEOUT, "timeout", m, None),
            ApiError::Timeout(m) => (StatusCode::GATEWAY_TIMEOUT, "timeout", m, None),
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error".into(), None)
            }
        };
        (status, axum::Json(ErrorBody { error, error_type, field })).into_response()
    }
}
