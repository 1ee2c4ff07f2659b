//! Where a transformer forward spends its time, by stage, for `flowgen bench engine`.
//!
//! Off by default: each probe then costs one relaxed atomic load. On, a *region* is wall time on
//! the calling thread inside the network's own code, and a *stage* is time inside one kind of
//! work summed over the threads that did it; a region's wall time is shared among its stages in
//! proportion, and what lies outside every region is the framework's overhead between ops.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The kinds of work a transformer forward is broken into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Patch, time and label embeddings (and the position table).
    Embeddings,
    /// qkv, scores, softmax, weighted values and the output projection with its gated residual.
    Attention,
    /// fc1, GELU, fc2 and the gated residual.
    Mlp,
    /// LayerNorms, adaLN modulation (the per-sample linear and the shift/scale over tokens).
    NormModulate,
    /// The final adaLN, LayerNorm, linear and unpatchify.
    FinalLayer,
}

impl Stage {
    pub const ALL: [Stage; 5] =
        [Stage::Embeddings, Stage::Attention, Stage::Mlp, Stage::NormModulate, Stage::FinalLayer];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Embeddings => "embeddings",
            Stage::Attention => "attention",
            Stage::Mlp => "mlp",
            Stage::NormModulate => "norms and modulation",
            Stage::FinalLayer => "final layer",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static STAGE_NS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static REGION_NS: AtomicU64 = AtomicU64::new(0);

/// Turn the probes on or off (the counters are cleared either way).
pub fn set_enabled(on: bool) {
    reset();
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub fn reset() {
    STAGE_NS.iter().for_each(|c| c.store(0, Ordering::Relaxed));
    REGION_NS.store(0, Ordering::Relaxed);
}

fn add(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Run `f` as wall time on this thread inside the network (see the module note).
pub fn region<T>(f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let started = Instant::now();
    let out = f();
    add(&REGION_NS, started);
    out
}

/// Run `f` as work of `stage` (on any thread).
pub fn stage<T>(stage: Stage, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let started = Instant::now();
    let out = f();
    add(&STAGE_NS[stage.index()], started);
    out
}

/// A region that is all one stage: one op sequence on the calling thread.
pub fn timed<T>(s: Stage, f: impl FnOnce() -> T) -> T {
    region(|| stage(s, f))
}

/// Seconds since the last reset: inside regions, and per stage (summed over threads).
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub region_s: f64,
    pub stage_s: [f64; 5],
}

pub fn totals() -> Totals {
    let s = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 * 1e-9;
    let mut stage_s = [0.0; 5];
    for (o, c) in stage_s.iter_mut().zip(&STAGE_NS) {
        *o = s(c);
    }
    Totals { region_s: s(&REGION_NS), stage_s }
}
