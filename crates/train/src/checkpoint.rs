//! Training checkpoints: weights, EMA, optimizer moments and the step, written atomically so a
//! crash mid-save never leaves a checkpoint that cannot be resumed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    pub step: usize,
    pub total_steps: usize,
    pub seed: u64,
    /// Seconds of training so far, summed over resumed runs.
    pub train_seconds: f64,
    /// What produced it (command line), to refuse resuming a different run.
    pub run: String,
}

pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub weights: HashMap<String, Tensor>,
    pub ema: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

fn dir_of(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

fn ck_err(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.to_path_buf(), message: message.into() }
}

impl Checkpoint {
    pub fn save(&self, run_dir: &Path) -> Result<()> {
        let final_dir = dir_of(run_dir);
        let tmp = run_dir.join("checkpoint.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        for (file, tensors) in [("weights", &self.weights), ("ema", &self.ema), ("optimizer", &self.optimizer)] {
            let path = tmp.join(format!("{file}.safetensors"));
            flowgen_engine::weights::save_safetensors(tensors, &path).map_err(|e| ck_err(&path, e.to_string()))?;
        }
        let meta = serde_json::to_string_pretty(&self.meta).map_err(|e| ck_err(&tmp, e.to_string()))?;
        std::fs::write(tmp.join("state.json"), meta).map_err(|e| TrainError::io(&tmp, e))?;
        let old = run_dir.join("checkpoint.old");
        if final_dir.exists() {
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&final_dir, &old).map_err(|e| TrainError::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    pub fn exists(run_dir: &Path) -> bool {
        dir_of(run_dir).join("state.json").is_file()
    }

    pub fn load(run_dir: &Path, device: &Device) -> Result<Self> {
        let dir = dir_of(run_dir);
        let state = dir.join("state.json");
        let text = std::fs::read_to_string(&state).map_err(|e| TrainError::io(&state, e))?;
        let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| ck_err(&state, e.to_string()))?;
        let load = |file: &str| {
            let path = dir.join(format!("{file}.safetensors"));
            candle_core::safetensors::load(&path, device).map_err(|e| ck_err(&path, e.to_string()))
        };
        Ok(Self { meta, weights: load("weights")?, ema: load("ema")?, optimizer: load("optimizer")? })
    }
}
