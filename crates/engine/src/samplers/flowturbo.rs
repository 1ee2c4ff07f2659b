//! FlowTurbo (Zhao et al., NeurIPS 2024), as its released assembler runs it on one grid:
//! `a` Heun steps, then `b` pseudo-corrector steps reusing the cached velocity, then `c` refiner
//! steps where a small network corrects the cached velocity instead of calling the predictor.

use std::cell::Cell;
use std::fmt;
use std::ops::ControlFlow;

use candle_core::Tensor;

use super::fused::{axpy as step, trapezoid};
use super::{Fields, Parameters, Sampler, SolveStats, StepObserver, StepReport};
use crate::error::{Error, Result};
use crate::schedule::Schedule;

/// Name of the auxiliary network (`[networks.refiner]`) refiner steps call.
pub const REFINER_NETWORK: &str = "refiner";

/// What the second refiner call of a step is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefinerCondition {
    /// The velocity cached before the step (the released `models_assemble.py`).
    Cached,
    /// The refined velocity of the step's first call (the unused `transport/integrators.py`).
    Refined,
}

impl RefinerCondition {
    fn name(self) -> &'static str {
        match self {
            RefinerCondition::Cached => "cached",
            RefinerCondition::Refined => "refined",
        }
    }
}

/// `H{a}P{b}R{c}`: Heun, pseudo-corrector and refiner steps, in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTurboPlan {
    pub heun: usize,
    pub pseudo: usize,
    pub refine: usize,
    pub condition: RefinerCondition,
}

/// Each block kind may repeat at most this often (a plan is a handful of steps).
const MAX_BLOCKS: usize = 1000;

impl FlowTurboPlan {
    pub fn steps(&self) -> usize {
        self.heun + self.pseudo + self.refine
    }

    /// Predictor evaluations: 2 per Heun step, 1 per pseudo-corrector step, plus one at the
    /// start when no Heun step fills the cache (the first P or R step needs a velocity).
    pub fn velocity_evaluations(&self) -> usize {
        2 * self.heun + self.pseudo + usize::from(self.heun == 0 && self.steps() > 0)
    }

    /// Refiner evaluations: 2 per refiner step.
    pub fn refiner_evaluations(&self) -> usize {
        2 * self.refine
    }

    /// "H2P4R2" (case-insensitive; a missing block counts 0, e.g. "H8" or "P5R3").
    fn parse_blocks(text: &str) -> Result<(usize, usize, usize)> {
        let bad = |why: String| {
            Error::invalid(
                "sampler",
                format!("flowturbo:{text}: {why}; write the plan as H<a>P<b>R<c>, e.g. flowturbo:H2P4R2"),
            )
        };
        let upper = text.trim().to_ascii_uppercase();
        let mut counts = [None::<usize>; 3];
        let mut rest = upper.as_str();
        let mut last = None;
        while !rest.is_empty() {
            let letter = rest.as_bytes()[0];
            let slot = match letter {
                b'H' => 0,
                b'P' => 1,
                b'R' => 2,
                _ => return Err(bad(format!("{:?} is not H, P or R", letter as char))),
            };
            if last.is_some_and(|l| l >= slot) {
                return Err(bad("the blocks run H, then P, then R, each at most once".into()));
            }
            last = Some(slot);
            let digits: String = rest[1..].chars().take_while(|c| c.is_ascii_digit()).collect();
            if digits.is_empty() {
                return Err(bad(format!("{} has no count", letter as char)));
            }
            let n: usize = digits.parse().map_err(|_| bad(format!("{digits} is not a count")))?;
            if n > MAX_BLOCKS {
                return Err(bad(format!("{n} {} steps exceed the limit {MAX_BLOCKS}", letter as char)));
            }
            counts[slot] = Some(n);
            rest = &rest[1 + digits.len()..];
        }
        let [h, p, r] = counts.map(|c| c.unwrap_or(0));
        if h + p + r == 0 {
            return Err(bad("the plan has no steps".into()));
        }
        Ok((h, p, r))
    }

    /// Parser of the `flowturbo` family: `flowturbo:H2P4R2[,condition=cached|refined]`.
    pub(super) fn from_parameters(params: &mut Parameters) -> Result<Sampler> {
        let Some(blocks) = params.take_positional() else {
            return Err(Error::invalid(
                "sampler",
                "flowturbo needs a plan such as flowturbo:H2P4R2 (Heun, pseudo-corrector and refiner \
                 steps); a model that ships a refiner also answers to plain \"flowturbo\" with its own",
            ));
        };
        let (heun, pseudo, refine) = Self::parse_blocks(&blocks)?;
        let condition = match params.text("condition").map(|c| c.to_ascii_lowercase()).as_deref() {
            None | Some("cached") | Some("v") => RefinerCondition::Cached,
            Some("refined") | Some("d") => RefinerCondition::Refined,
            Some(other) => {
                return Err(Error::invalid(
                    "sampler",
                    format!("flowturbo: condition = {other:?}: use cached (the release) or refined"),
                ))
            }
        };
        Ok(Sampler::FlowTurbo(FlowTurboPlan { heun, pseudo, refine, condition }))
    }
}

impl fmt::Display for FlowTurboPlan {
    /// The parameters after `flowturbo:`: "H2P4R2", plus ",condition=refined" when not the release's.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "H{}P{}R{}", self.heun, self.pseudo, self.refine)?;
        if self.condition != RefinerCondition::Cached {
            write!(f, ",condition={}", self.condition.name())?;
        }
        Ok(())
    }
}

/// A velocity as the release's doubled batch holds it: the guided one, and where guidance
/// covers only some channels, the unconditional half's own (which conditions the refiner's
/// unconditional pass).
#[derive(Clone)]
struct Velocity {
    guided: Tensor,
    uncond: Option<Tensor>,
}

impl Velocity {
    fn uncond(&self) -> &Tensor {
        self.uncond.as_ref().unwrap_or(&self.guided)
    }
}

pub(super) fn solve(
    plan: &FlowTurboPlan,
    fields: &Fields,
    x0: Tensor,
    schedule: &Schedule,
    observer: &mut dyn StepObserver,
) -> Result<(Tensor, SolveStats)> {
    let total = schedule.steps();
    if total != plan.steps() {
        return Err(Error::invalid(
            "steps",
            format!("flowturbo:{plan} runs {} steps, the grid has {total}", plan.steps()),
        ));
    }
    let batch = x0.dim(0)?;
    let refiner = if plan.refine > 0 { Some(fields.network(REFINER_NETWORK)?) } else { None };
    let (velocity_calls, refiner_calls) = (Cell::new(0usize), Cell::new(0usize));
    let velocity = |x: &Tensor, s: f64| -> Result<Velocity> {
        velocity_calls.set(velocity_calls.get() + 1);
        let (guided, uncond) = fields.main.velocity_paths(x, None, &vec![s; batch])?;
        Ok(Velocity { guided, uncond })
    };
    // R(x, s, v) + base: the refiner sees x and its conditioning velocity side by side.
    let refined = |x: &Tensor, s: f64, condition: &Velocity, base: &Velocity| -> Result<Velocity> {
        let net = refiner.ok_or_else(|| Error::Solver("flowturbo: refiner step without a refiner".into()))?;
        refiner_calls.set(refiner_calls.get() + 1);
        let input = Tensor::cat(&[x, &condition.guided], 1)?;
        let input_uncond = condition.uncond.as_ref().map(|u| Tensor::cat(&[x, u], 1)).transpose()?;
        let (offset, offset_uncond) = net.velocity_paths(&input, input_uncond.as_ref(), &vec![s; batch])?;
        let uncond = match (offset_uncond, &base.uncond) {
            (None, None) => None,
            (path, _) => Some((path.as_ref().unwrap_or(&offset) + base.uncond())?),
        };
        Ok(Velocity { guided: (offset + &base.guided)?, uncond })
    };
    let mut x = x0;
    // The velocity the next block starts from: the predicted end point's (H, P) or the refined one (R).
    let mut cache: Option<Velocity> = None;
    for (i, (s0, s1)) in schedule.intervals().enumerate() {
        let h = s1 - s0;
        let cached = match cache.take() {
            Some(d) => d,
            None => velocity(&x, s0)?,
        };
        if i < plan.heun + plan.pseudo {
            // A Heun step evaluates its start; a pseudo-corrector step reuses the cache.
            let d0 = if i < plan.heun && i > 0 { velocity(&x, s0)? } else { cached };
            let d1 = velocity(&step(&x, &d0.guided, h)?, s1)?;
            x = trapezoid(&x, &d0.guided, &d1.guided, h)?;
            cache = Some(d1);
        } else {
            let d0 = refined(&x, s0, &cached, &cached)?;
            let condition = match plan.condition {
                RefinerCondition::Cached => &cached,
                RefinerCondition::Refined => &d0,
            };
            let d1 = refined(&step(&x, &d0.guided, h)?, s1, condition, &d0)?;
            x = trapezoid(&x, &d0.guided, &d1.guided, h)?;
            cache = Some(d0);
        }
        let report = StepReport { step: i + 1, total: Some(total), s: s1, nfe: velocity_calls.get() };
        if let ControlFlow::Break(()) = observer.on_step(&report) {
            return Err(Error::Cancelled);
        }
    }
    let nfe = velocity_calls.get();
    let mut stats = SolveStats::main_only(nfe, total, total, 0, vec![nfe; batch]);
    if plan.refine > 0 {
        stats.evaluations.insert(REFINER_NETWORK.to_string(), refiner_calls.get());
    }
    Ok((x, stats))
}
