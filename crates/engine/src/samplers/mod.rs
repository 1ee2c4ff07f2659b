//! ODE solvers for dx/ds = u(x, s) from s = 0 (noise) to s = 1 (data). Each counts network
//! evaluations (NFE) and reports every step to an observer that may stop the solve.

mod dopri5;
mod fixed;

use std::ops::ControlFlow;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::schedule::Schedule;

pub use dopri5::Dopri5Options;

/// A velocity field in the engine frame. `s` holds one time per batch row.
pub trait VelocityField {
    fn velocity(&self, x: &Tensor, s: &[f64]) -> Result<Tensor>;
}

impl<F: Fn(&Tensor, &[f64]) -> Result<Tensor>> VelocityField for F {
    fn velocity(&self, x: &Tensor, s: &[f64]) -> Result<Tensor> {
        self(x, s)
    }
}

/// Progress after a completed step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Steps completed so far (accepted steps for adaptive solvers).
    pub step: usize,
    /// Total steps when known in advance (fixed-step solvers).
    pub total: Option<usize>,
    /// Time reached; for an adaptive batch, the least advanced sample.
    pub s: f64,
    pub nfe: usize,
}

/// Called between steps; `ControlFlow::Break` stops the solve with `Error::Cancelled`.
pub trait StepObserver {
    fn on_step(&mut self, report: &StepReport) -> ControlFlow<()>;
}

impl<F: FnMut(&StepReport) -> ControlFlow<()>> StepObserver for F {
    fn on_step(&mut self, report: &StepReport) -> ControlFlow<()> {
        self(report)
    }
}

/// An observer that never stops the solve.
pub struct Unobserved;

impl StepObserver for Unobserved {
    fn on_step(&mut self, _: &StepReport) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SolveStats {
    /// Batched network evaluations performed.
    pub nfe: usize,
    /// Steps taken (accepted steps of the slowest sample for adaptive solvers).
    pub steps: usize,
    pub accepted: usize,
    pub rejected: usize,
    /// Evaluations each sample needed; equal to `nfe` except for adaptive solvers.
    pub per_sample_nfe: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    Euler,
    Midpoint,
    Heun,
    Rk4,
    /// FlowTurbo's pseudo-corrector: Heun reusing the previous step's end velocity (1 NFE/step).
    PseudoCorrector,
    Dopri5(Dopri5Options),
}

/// Names accepted by `Sampler::parse`, for help texts and API listings.
pub const SAMPLER_NAMES: [&str; 6] = ["euler", "midpoint", "heun", "rk4", "pseudo-corrector", "dopri5"];

impl Sampler {
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "euler" => Ok(Sampler::Euler),
            "midpoint" => Ok(Sampler::Midpoint),
            "heun" | "heun2" => Ok(Sampler::Heun),
            "rk4" => Ok(Sampler::Rk4),
            "pseudo-corrector" | "pc" | "flowturbo-p" => Ok(Sampler::PseudoCorrector),
            "dopri5" | "dopri" | "dormand-prince" => Ok(Sampler::Dopri5(Dopri5Options::default())),
            other => Err(Error::invalid(
                "sampler",
                format!("unknown sampler {other:?}; choose one of {}", SAMPLER_NAMES.join(", ")),
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Sampler::Euler => "euler",
            Sampler::Midpoint => "midpoint",
            Sampler::Heun => "heun",
            Sampler::Rk4 => "rk4",
            Sampler::PseudoCorrector => "pseudo-corrector",
            Sampler::Dopri5(_) => "dopri5",
        }
    }

    pub fn is_adaptive(&self) -> bool {
        matches!(self, Sampler::Dopri5(_))
    }

    /// NFE a fixed-step solve of `steps` steps costs (None for adaptive solvers).
    pub fn nfe_for(&self, steps: usize) -> Option<usize> {
        match self {
            Sampler::Euler => Some(steps),
            Sampler::Midpoint | Sampler::Heun => Some(2 * steps),
            Sampler::Rk4 => Some(4 * steps),
            Sampler::PseudoCorrector => Some(steps + 1),
            Sampler::Dopri5(_) => None,
        }
    }

    /// Integrate from `x0` (noise, s = 0) to s = 1. Adaptive solvers ignore the grid.
    pub fn solve(
        &self,
        field: &dyn VelocityField,
        x0: Tensor,
        schedule: &Schedule,
        observer: &mut dyn StepObserver,
    ) -> Result<(Tensor, SolveStats)> {
        match self {
            Sampler::Dopri5(opts) => dopri5::solve(opts, field, x0, observer),
            fixed_step => fixed::solve(fixed_step, field, x0, schedule, observer),
        }
    }
}
