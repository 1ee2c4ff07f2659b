//! The engine's one error type.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    // The io error is part of the message, not a `source`, so chains do not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    #[error("{path}: invalid model config: {message}")]
    Config { path: PathBuf, message: String },

    /// A request or option is outside what the engine accepts; `field` names it.
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },

    #[error("{path}: weights do not fit the model\n{report}")]
    WeightsMismatch { path: PathBuf, report: String },

    #[error("{path}: cannot read weights: {message}")]
    Weights { path: PathBuf, message: String },

    #[error("solver gave up: {0}")]
    Solver(String),

    /// The step observer asked to stop (cancellation between steps).
    #[error("cancelled")]
    Cancelled,

    /// Encoding or decoding an image file (PNG, JPEG, WebP) failed.
    #[error("image encoding failed: {0}")]
    Png(String),

    #[error("engine is shut down")]
    EngineStopped,

    #[error("engine panicked: {0}")]
    EnginePanicked(String),
}

impl Error {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid { field, message: message.into() }
    }
}
