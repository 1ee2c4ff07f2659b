//! Device selection by name.

use candle_core::Device;

use crate::error::{Error, Result};

/// "cpu", "cuda", "cuda:N", or "auto" (CUDA when built with it and present, else CPU).
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    let cuda = |ordinal: usize| {
        Device::new_cuda(ordinal).map_err(|e| {
            let hint = if cfg!(feature = "cuda") {
                ""
            } else {
                " (this build has no CUDA support: rebuild with --features cuda)"
            };
            Error::invalid("device", format!("cannot open cuda:{ordinal}: {e}{hint}"))
        })
    };
    match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if cfg!(feature = "cuda") { cuda(0).unwrap_or(Device::Cpu) } else { Device::Cpu }),
        "cuda" | "gpu" => cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(ordinal) => cuda(ordinal),
            None => Err(Error::invalid("device", format!("{other:?} is not cpu, cuda, cuda:N or auto"))),
        },
    }
}
