//! Adaptive Dormand-Prince 5(4) with error control per sample: every batch row keeps its own
//! time and step size, so an image follows exactly the steps it would take if solved alone.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use candle_core::{DType, Tensor};

use super::{Parameters, Sampler, SolveStats, StepObserver, StepReport, VelocityField};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Dopri5Options {
    pub rtol: f64,
    pub atol: f64,
    /// Evaluations a single sample may use before the solve fails.
    pub max_nfe: usize,
}

impl Default for Dopri5Options {
    /// LFM's published setting (torchdiffeq dopri5, atol = rtol = 1e-5).
    fn default() -> Self {
        Dopri5Options { rtol: 1e-5, atol: 1e-5, max_nfe: 2000 }
    }
}

impl Dopri5Options {
    /// `rtol`, `atol` and `max_nfe` from a sampler's parameter list; absent ones keep the default.
    pub(super) fn from_parameters(params: &mut Parameters) -> Result<Sampler> {
        let default = Dopri5Options::default();
        let opts = Dopri5Options {
            rtol: params.number("rtol", default.rtol)?,
            atol: params.number("atol", default.atol)?,
            max_nfe: params.number("max_nfe", default.max_nfe)?,
        };
        // The parameter lives inside the sampler text, so the sampler is the field to name.
        opts.validate().map_err(|e| match e {
            Error::Invalid { field, message } => Error::invalid("sampler", format!("dopri5: {field} {message}")),
            other => other,
        })?;
        Ok(Sampler::Dopri5(opts))
    }

    /// "rtol=1e-5,atol=1e-5,max_nfe=2000": `{:e}` prints the shortest text that parses back exactly.
    pub(super) fn canonical_parameters(&self) -> String {
        format!("rtol={:e},atol={:e},max_nfe={}", self.rtol, self.atol, self.max_nfe)
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.rtol.is_finite() && self.rtol > 0.0) {
            return Err(Error::invalid("rtol", format!("must be a positive number, got {}", self.rtol)));
        }
        if !(self.atol.is_finite() && self.atol >= 0.0) {
            return Err(Error::invalid("atol", format!("must be a non-negative number, got {}", self.atol)));
        }
        if self.max_nfe < 8 {
            return Err(Error::invalid("max_nfe", format!("must be at least 8, got {}", self.max_nfe)));
        }
        Ok(())
    }
}

const C: [f64; 6] = [1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
const A: [&[f64]; 6] = [
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0],
    &[9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0],
    // 5th-order solution weights; the 7th stage is evaluated here (FSAL).
    &[35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0],
];
/// 5th-order minus embedded 4th-order weights, for the error estimate.
const E: [f64; 7] = [
    35.0 / 384.0 - 5179.0 / 57600.0,
    0.0,
    500.0 / 1113.0 - 7571.0 / 16695.0,
    125.0 / 192.0 - 393.0 / 640.0,
    -2187.0 / 6784.0 - -92097.0 / 339200.0,
    11.0 / 84.0 - 187.0 / 2100.0,
    -1.0 / 40.0,
];
const SAFETY: f64 = 0.9;
const MIN_FACTOR: f64 = 0.2;
const MAX_FACTOR: f64 = 10.0;
const MIN_STEP: f64 = 1e-10;

/// sum_i w_i k_i over the nonzero weights.
fn combine(ks: &[Tensor], weights: &[f64]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (k, &w) in ks.iter().zip(weights) {
        if w == 0.0 {
            continue;
        }
        let term = (k * w)?;
        acc = Some(match acc {
            Some(a) => (a + term)?,
            None => term,
        });
    }
    acc.ok_or_else(|| Error::Solver("empty Runge-Kutta combination".into()))
}

/// Per-row column tensor (B, 1, 1, ...) broadcastable against the state.
fn per_row(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![values.len()];
    shape.extend(std::iter::repeat_n(1, like.rank() - 1));
    let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Ok(Tensor::from_vec(data, shape, like.device())?.to_dtype(like.dtype())?)
}

/// Root-mean-square over each row of `num / scale`.
fn rms_per_row(num: &Tensor, scale: &Tensor) -> Result<Vec<f64>> {
    let ratio = num.div(scale)?.flatten_from(1)?.to_dtype(DType::F64)?;
    Ok(ratio.sqr()?.mean(1)?.sqrt()?.to_vec1::<f64>()?)
}

fn tolerance_scale(opts: &Dopri5Options, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(((a.abs()?.maximum(&b.abs()?)? * opts.rtol)? + opts.atol)?)
}

/// Rows `rows` of `t` (all of it when that is every row, to skip the copy).
fn take_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor> {
    if rows.len() == t.dim(0)? && rows.iter().enumerate().all(|(i, &r)| i == r) {
        return Ok(t.clone());
    }
    let index = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), t.device())?;
    Ok(t.index_select(&index, 0)?)
}

/// Select rows: where `mask[i]` take `on_true[i]`, else `on_false[i]` (bit-exact).
fn select_rows(mask: &[bool], on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
    if mask.iter().all(|&m| m) {
        return Ok(on_true.clone());
    }
    if mask.iter().all(|&m| !m) {
        return Ok(on_false.clone());
    }
    let mut shape = vec![mask.len()];
    shape.extend(std::iter::repeat_n(1, on_true.rank() - 1));
    let bits: Vec<u8> = mask.iter().map(|&m| u8::from(m)).collect();
    let m = Tensor::from_vec(bits, shape, on_true.device())?.broadcast_as(on_true.shape())?;
    Ok(m.where_cond(on_true, on_false)?)
}

/// Per-sample bookkeeping; rows leave the active batch when they reach s = 1 or fail, so a batch
/// costs what its images need, not what its slowest image needs times the batch size.
struct Row {
    s: f64,
    h: f64,
    nfe: usize,
    accepted: usize,
    rejected: usize,
}

/// Initial step size per sample (Hairer, Norsett & Wanner, II.4); costs one extra evaluation.
fn initial_steps(opts: &Dopri5Options, field: &dyn VelocityField, x: &Tensor, k1: &Tensor) -> Result<Vec<f64>> {
    let batch = x.dim(0)?;
    let scale = tolerance_scale(opts, x, x)?;
    let d0 = rms_per_row(x, &scale)?;
    let d1 = rms_per_row(k1, &scale)?;
    let h0: Vec<f64> =
        d0.iter().zip(&d1).map(|(&a, &b)| if a < 1e-5 || b < 1e-5 { 1e-6 } else { 0.01 * a / b }).collect();
    let x1 = (x + k1.broadcast_mul(&per_row(&h0, x)?)?)?;
    let k_probe = field.velocity(&x1, &h0)?;
    let d2 = rms_per_row(&(k_probe - k1)?, &scale)?;
    Ok((0..batch)
        .map(|i| {
            let d2 = d2[i] / h0[i];
            let h1 =
                if d1[i].max(d2) <= 1e-15 { (h0[i] * 1e-3).max(1e-6) } else { (0.01 / d1[i].max(d2)).powf(1.0 / 5.0) };
            (100.0 * h0[i]).min(h1).min(1.0)
        })
        .collect())
}

/// One embedded Runge-Kutta attempt for the active rows: the 5th-order state, the FSAL stage
/// and each row's scaled error norm.
fn attempt(
    opts: &Dopri5Options,
    field: &dyn VelocityField,
    rows: &[usize],
    x: &Tensor,
    k1: &Tensor,
    (s, step): (&[f64], &[f64]),
) -> Result<(Tensor, Tensor, Vec<f64>)> {
    let h_col = per_row(step, x)?;
    let mut ks = vec![k1.clone()];
    let mut x_new = x.clone();
    for (stage, weights) in A.iter().enumerate() {
        let times: Vec<f64> = s.iter().zip(step).map(|(&si, &hi)| si + C[stage] * hi).collect();
        let x_stage = (x + combine(&ks, weights)?.broadcast_mul(&h_col)?)?;
        ks.push(field.velocity_of_rows(&x_stage, &times, rows)?);
        x_new = x_stage;
    }
    let error = combine(&ks, &E)?.broadcast_mul(&h_col)?;
    let norms = rms_per_row(&error, &tolerance_scale(opts, x, &x_new)?)?;
    let k7 = ks.pop().ok_or_else(|| Error::Solver("missing stage".into()))?;
    Ok((x_new, k7, norms))
}

impl Row {
    /// Apply one attempt's error norm: advance or shrink. Err(reason) when the row must stop.
    fn update(&mut self, step: f64, norm: f64, max_nfe: usize) -> std::result::Result<bool, String> {
        let accepted = norm.is_finite() && norm <= 1.0;
        if accepted {
            self.accepted += 1;
            self.s = if step == 1.0 - self.s { 1.0 } else { self.s + step };
            let factor =
                if norm == 0.0 { MAX_FACTOR } else { (SAFETY * norm.powf(-0.2)).clamp(MIN_FACTOR, MAX_FACTOR) };
            self.h = step * factor;
        } else {
            self.rejected += 1;
            let factor = if norm.is_finite() { (SAFETY * norm.powf(-0.2)).clamp(MIN_FACTOR, 1.0) } else { MIN_FACTOR };
            self.h = step * factor;
            if self.h < MIN_STEP {
                return Err(format!("step size underflow at s = {:.6} (error norm {norm:.3e})", self.s));
            }
        }
        if self.nfe > max_nfe && self.s < 1.0 {
            return Err(format!(
                "used more than {max_nfe} evaluations and reached only s = {:.4}; raise max_nfe or loosen rtol/atol",
                self.s
            ));
        }
        Ok(accepted)
    }

    /// This row's next step, clipped to land exactly on s = 1.
    fn next_step(&self) -> f64 {
        if self.s + self.h >= 1.0 - 1e-9 {
            1.0 - self.s
        } else {
            self.h
        }
    }
}

/// Move the rows not in `keep` (positions in `active`) out of the batch into `done`; returns
/// the state and FSAL stage of the rows that go on.
fn retire_rows(
    active: &mut Vec<usize>,
    keep: &[usize],
    (x, k1): (Tensor, Tensor),
    done: &mut [Option<Tensor>],
) -> Result<(Tensor, Tensor)> {
    for (j, &i) in active.iter().enumerate() {
        if !keep.contains(&j) {
            done[i] = Some(x.narrow(0, j, 1)?);
        }
    }
    *active = keep.iter().map(|&j| active[j]).collect();
    Ok((take_rows(&x, keep)?, take_rows(&k1, keep)?))
}

pub(super) fn solve(
    opts: &Dopri5Options,
    field: &dyn VelocityField,
    x0: Tensor,
    observer: &mut dyn StepObserver,
) -> Result<(Tensor, SolveStats)> {
    opts.validate()?;
    let batch = x0.dim(0)?;
    let mut k1 = field.velocity(&x0, &vec![0.0; batch])?;
    let h = initial_steps(opts, field, &x0, &k1)?;
    let mut rows: Vec<Row> = h.into_iter().map(|h| Row { s: 0.0, h, nfe: 2, accepted: 0, rejected: 0 }).collect();
    let mut nfe = 2;
    // Finished (or failed) rows, by index in the batch; `active` lists the rows still solving.
    let mut done: Vec<Option<Tensor>> = vec![None; batch];
    let mut failures = BTreeMap::new();
    let mut active: Vec<usize> = (0..batch).collect();
    let mut x = x0;
    while !active.is_empty() {
        let s: Vec<f64> = active.iter().map(|&i| rows[i].s).collect();
        let step: Vec<f64> = active.iter().map(|&i| rows[i].next_step()).collect();
        let (x_new, k7, norms) = attempt(opts, field, &active, &x, &k1, (&s, &step))?;
        nfe += A.len();
        let mut accept = vec![false; active.len()];
        let mut keep = Vec::with_capacity(active.len());
        for (j, &i) in active.iter().enumerate() {
            rows[i].nfe += A.len();
            match rows[i].update(step[j], norms[j], opts.max_nfe) {
                Ok(accepted) => accept[j] = accepted,
                Err(why) => {
                    failures.insert(i, why);
                }
            }
            if !failures.contains_key(&i) && rows[i].s < 1.0 {
                keep.push(j);
            }
        }
        x = select_rows(&accept, &x_new, &x)?;
        k1 = select_rows(&accept, &k7, &k1)?;
        if keep.len() < active.len() {
            (x, k1) = retire_rows(&mut active, &keep, (x, k1), &mut done)?;
        }
        if accept.iter().any(|&a| a) {
            let slowest = active.iter().map(|&i| rows[i].s).fold(1.0, f64::min);
            let step = rows.iter().map(|r| r.accepted).max().unwrap_or(0);
            if let ControlFlow::Break(()) = observer.on_step(&StepReport { step, total: None, s: slowest, nfe }) {
                return Err(Error::Cancelled);
            }
        }
    }
    let parts = done
        .into_iter()
        .map(|t| t.ok_or_else(|| Error::Solver("a row was lost".into())))
        .collect::<Result<Vec<_>>>()?;
    let x = Tensor::cat(&parts, 0)?;
    let mut stats = SolveStats::main_only(
        nfe,
        rows.iter().map(|r| r.accepted).max().unwrap_or(0),
        rows.iter().map(|r| r.accepted).sum(),
        rows.iter().map(|r| r.rejected).sum(),
        rows.iter().map(|r| r.nfe).collect(),
    );
    stats.failures = failures;
    Ok((x, stats))
}
