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

/// Run the CPU kernels on `threads` threads: candle's GEMMs read `RAYON_NUM_THREADS` on every call
/// and the fused kernels use rayon's global pool, so both are set. Call before any tensor work:
/// the global pool can be sized only once per process.
pub fn set_cpu_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Err(Error::invalid("threads", "must be at least 1"));
    }
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().map_err(|e| {
        Error::invalid("threads", format!("the thread pool was already started ({e}); set it before any work"))
    })
}

/// Threads the CPU kernels run on (rayon's global pool).
pub fn cpu_threads() -> usize {
    rayon::current_num_threads()
}
