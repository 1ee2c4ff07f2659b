pub mod bench;
pub mod bench_engine;
pub mod bench_frontier;
pub mod bench_samplers;
pub mod bench_scale;
pub mod bench_steps;
pub mod eval;
pub mod generate;
pub mod model;
pub mod schedule;
pub mod serve;
pub mod train;

use std::path::PathBuf;

use anyhow::{bail, Result};

/// Where the shipped default model lives: $FLOWGEN_MODEL, ./models/default, or next to the binary.
pub fn default_model_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("FLOWGEN_MODEL") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates = vec![PathBuf::from("models/default")];
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/flowgen -> repository root
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join("models/default"));
        }
    }
    for dir in &candidates {
        if dir.join("model.toml").is_file() {
            return Ok(dir.clone());
        }
    }
    bail!(
        "no default model found (looked for models/default/model.toml here and next to the binary, and $FLOWGEN_MODEL); \
         pass --model DIR, or make a random-weights demo model with `flowgen model init-random --out DIR`"
    )
}

/// `LO,HI`: two times s with 0 <= LO <= HI <= 1.
pub fn parse_interval(text: &str) -> Result<(f64, f64), String> {
    let err = || format!("guidance_interval {text:?}: expected two numbers LO,HI");
    let (lo, hi) = text.split_once(',').ok_or_else(err)?;
    let (lo, hi) = (lo.trim().parse().map_err(|_| err())?, hi.trim().parse().map_err(|_| err())?);
    flowgen_engine::config::check_guidance_interval(lo, hi).map_err(|e| format!("guidance_interval {e}"))?;
    Ok((lo, hi))
}

/// `--samplers a,b:k=1,k2=2` is split at every comma; a `key=value` piece belongs to the sampler
/// before it ("dopri5:rtol=1e-4", "atol=1e-4" -> "dopri5:rtol=1e-4,atol=1e-4").
pub fn rejoin_parameters(pieces: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for piece in pieces {
        match names.last_mut() {
            Some(last) if piece.contains('=') && !piece.contains(':') && last.contains(':') => {
                last.push(',');
                last.push_str(piece);
            }
            _ => names.push(piece.trim().to_string()),
        }
    }
    names
}
