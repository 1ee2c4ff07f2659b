//! The trainer's one error type.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, TrainError>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Engine(#[from] flowgen_engine::Error),

    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },

    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },

    /// Stopped on request after saving a checkpoint; `--resume` continues.
    #[error("interrupted after step {step}; the checkpoint was saved, continue with --resume")]
    Interrupted { step: usize },

    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged { step: usize, loss: f64 },
}

impl TrainError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        TrainError::Invalid { field, message: message.into() }
    }

    pub fn io(path: &std::path::Path, error: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), error }
    }
}
