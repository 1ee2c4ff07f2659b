//! Blockwise Flow Matching's FRA sampler (the released `sample_ode_frn`): Euler steps on the
//! schedule, each evaluation letting the network reuse its trunk features within a segment
//! (full trunk at a segment's first step, anchor + coeff x FRN after). Any other fixed-step
//! sampler runs a blockwise model with the full trunk at every evaluation.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use candle_core::Tensor;

use super::fused::axpy;
use super::{SolveStats, StepObserver, StepReport, VelocityField, MAIN_NETWORK};
use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::velocity::FeatureMemo;

/// Name under which evaluations that reused the trunk's anchor through the FRN are counted
/// (the others count as `MAIN_NETWORK` evaluations, trunk included).
pub const FRN_NETWORK: &str = "frn";

pub(super) fn solve(
    field: &dyn VelocityField,
    x0: Tensor,
    schedule: &Schedule,
    observer: &mut dyn StepObserver,
) -> Result<(Tensor, SolveStats)> {
    if !field.reuses_features() {
        return Err(Error::invalid(
            "sampler",
            "fra needs a blockwise model with a feature residual network (frn_depth > 0)",
        ));
    }
    let batch = x0.dim(0)?;
    let total = schedule.steps();
    let mut memo = FeatureMemo::default();
    let mut x = x0;
    for (i, (s0, s1)) in schedule.intervals().enumerate() {
        let v = field.velocity_with_memo(&x, &vec![s0; batch], &mut memo)?;
        x = axpy(&x, &v, s1 - s0)?;
        let report = StepReport { step: i + 1, total: Some(total), s: s1, nfe: i + 1 - memo.reused };
        if let ControlFlow::Break(()) = observer.on_step(&report) {
            return Err(Error::Cancelled);
        }
    }
    let full = total - memo.reused;
    let evaluations = BTreeMap::from([(MAIN_NETWORK.to_string(), full), (FRN_NETWORK.to_string(), memo.reused)]);
    let stats = SolveStats {
        evaluations,
        steps: total,
        accepted: total,
        rejected: 0,
        per_sample_nfe: vec![full; batch],
        failures: BTreeMap::new(),
    };
    Ok((x, stats))
}
