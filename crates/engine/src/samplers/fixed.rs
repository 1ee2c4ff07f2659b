//! Fixed-grid explicit Runge-Kutta solvers and FlowTurbo's pseudo-corrector.

use std::cell::Cell;
use std::ops::ControlFlow;

use candle_core::Tensor;

use super::{Sampler, SolveStats, StepObserver, StepReport, VelocityField};
use crate::error::{Error, Result};
use crate::schedule::Schedule;

use super::fused::{axpy as step, trapezoid};

pub(super) fn solve(
    sampler: &Sampler,
    field: &dyn VelocityField,
    x0: Tensor,
    schedule: &Schedule,
    observer: &mut dyn StepObserver,
) -> Result<(Tensor, SolveStats)> {
    let batch = x0.dim(0)?;
    let nfe = Cell::new(0usize);
    let eval = |x: &Tensor, s: f64| -> Result<Tensor> {
        nfe.set(nfe.get() + 1);
        field.velocity(x, &vec![s; batch])
    };
    let total = schedule.steps();
    let mut x = x0;
    // Velocity at the previous step's predicted end point (pseudo-corrector only).
    let mut cache: Option<Tensor> = None;
    for (i, (s0, s1)) in schedule.intervals().enumerate() {
        let h = s1 - s0;
        x = match sampler {
            Sampler::Euler => step(&x, &eval(&x, s0)?, h)?,
            Sampler::Midpoint => {
                let k1 = eval(&x, s0)?;
                let k2 = eval(&step(&x, &k1, h / 2.0)?, s0 + h / 2.0)?;
                step(&x, &k2, h)?
            }
            Sampler::Heun => {
                let k1 = eval(&x, s0)?;
                let k2 = eval(&step(&x, &k1, h)?, s1)?;
                trapezoid(&x, &k1, &k2, h)?
            }
            Sampler::Rk4 => {
                let k1 = eval(&x, s0)?;
                let k2 = eval(&step(&x, &k1, h / 2.0)?, s0 + h / 2.0)?;
                let k3 = eval(&step(&x, &k2, h / 2.0)?, s0 + h / 2.0)?;
                let k4 = eval(&step(&x, &k3, h)?, s1)?;
                let sum = ((k1 + k4)? + ((k2 + k3)? * 2.0)?)?;
                step(&x, &sum, h / 6.0)?
            }
            Sampler::PseudoCorrector => {
                let d0 = match cache.take() {
                    Some(d) => d,
                    None => eval(&x, s0)?,
                };
                let d1 = eval(&step(&x, &d0, h)?, s1)?;
                let next = trapezoid(&x, &d0, &d1, h)?;
                cache = Some(d1);
                next
            }
            Sampler::Dopri5(_) | Sampler::FlowTurbo(_) | Sampler::Fra => {
                return Err(Error::Solver(format!("{} has its own solver", sampler.name())))
            }
        };
        let report = StepReport { step: i + 1, total: Some(total), s: s1, nfe: nfe.get() };
        if let ControlFlow::Break(()) = observer.on_step(&report) {
            return Err(Error::Cancelled);
        }
    }
    let nfe = nfe.get();
    let stats = SolveStats::main_only(nfe, total, total, 0, vec![nfe; batch]);
    Ok((x, stats))
}
