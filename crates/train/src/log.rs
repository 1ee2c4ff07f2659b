//! Loss curves as CSV (appended across resumed runs).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

pub struct LossLog {
    path: PathBuf,
}

impl LossLog {
    /// Open `run_dir/loss.csv`, dropping rows past `resume_step` left by a run that crashed.
    pub fn open(run_dir: &Path, columns: &[&str], resume_step: usize) -> Result<Self> {
        let path = run_dir.join("loss.csv");
        let header = format!("step,{}\n", columns.join(","));
        let kept = if resume_step > 0 && path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
            let mut out = header.clone();
            for line in text.lines().skip(1) {
                let step = line.split(',').next().and_then(|s| s.parse::<usize>().ok());
                if step.is_some_and(|s| s <= resume_step) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            out
        } else {
            header
        };
        std::fs::write(&path, kept).map_err(|e| TrainError::io(&path, e))?;
        Ok(Self { path })
    }

    pub fn append(&self, step: usize, values: &[f64]) -> Result<()> {
        let mut f =
            std::fs::OpenOptions::new().append(true).open(&self.path).map_err(|e| TrainError::io(&self.path, e))?;
        let row: Vec<String> = values.iter().map(|v| format!("{v:.6}")).collect();
        writeln!(f, "{step},{}", row.join(",")).map_err(|e| TrainError::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Read a loss CSV back: (header, rows).
pub fn read_csv(path: &Path) -> Result<(Vec<String>, Vec<Vec<f64>>)> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default().split(',').map(String::from).collect();
    let rows = lines.map(|l| l.split(',').filter_map(|v| v.parse::<f64>().ok()).collect()).collect();
    Ok((header, rows))
}
