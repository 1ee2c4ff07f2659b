//! Adaptive Dormand-Prince 5(4) with error control per sample: every batch row keeps its own
//! time and step size, so an image follows exactly the steps it would take if solved alone.

use std::cell::Cell;
use std::ops::ControlFlow;

use candle_core::{DType, Tensor};

use super::{SolveStats, StepObserver, StepReport, VelocityField};
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

pub(super) fn solve(
    opts: &Dopri5Options,
    field: &dyn VelocityField,
    x0: Tensor,
    observer: &mut dyn StepObserver,
) -> Result<(Tensor, SolveStats)> {
    opts.validate()?;
    let batch = x0.dim(0)?;
    let mut s = vec![0.0f64; batch];
    let mut per_sample_nfe = vec![0usize; batch];
    let nfe = Cell::new(0usize);
    let eval = |x: &Tensor, times: &[f64], active: &[bool], per_sample: &mut [usize]| -> Result<Tensor> {
        nfe.set(nfe.get() + 1);
        for (count, &a) in per_sample.iter_mut().zip(active) {
            *count += usize::from(a);
        }
        field.velocity(x, times)
    };
    let all = vec![true; batch];

    // Initial step size per sample (Hairer, Norsett & Wanner, II.4), costs one extra evaluation.
    let mut x = x0;
    let mut k1 = eval(&x, &s, &all, &mut per_sample_nfe)?;
    let mut h = {
        let scale = tolerance_scale(opts, &x, &x)?;
        let d0 = rms_per_row(&x, &scale)?;
        let d1 = rms_per_row(&k1, &scale)?;
        let h0: Vec<f64> =
            d0.iter().zip(&d1).map(|(&a, &b)| if a < 1e-5 || b < 1e-5 { 1e-6 } else { 0.01 * a / b }).collect();
        let x1 = (&x + k1.broadcast_mul(&per_row(&h0, &x)?)?)?;
        let k_probe = eval(&x1, &h0, &all, &mut per_sample_nfe)?;
        let d2 = rms_per_row(&(k_probe - &k1)?, &scale)?;
        (0..batch)
            .map(|i| {
                let d2 = d2[i] / h0[i];
                let h1 = if d1[i].max(d2) <= 1e-15 {
                    (h0[i] * 1e-3).max(1e-6)
                } else {
                    (0.01 / d1[i].max(d2)).powf(1.0 / 5.0)
                };
                (100.0 * h0[i]).min(h1).min(1.0)
            })
            .collect::<Vec<f64>>()
    };

    let (mut accepted_steps, mut rejected_steps) = (vec![0usize; batch], vec![0usize; batch]);
    loop {
        let active: Vec<bool> = s.iter().map(|&si| si < 1.0).collect();
        if !active.iter().any(|&a| a) {
            break;
        }
        // Clip to land exactly on s = 1; finished rows take zero steps and stay put.
        let step: Vec<f64> = (0..batch)
            .map(|i| {
                if !active[i] {
                    0.0
                } else if s[i] + h[i] >= 1.0 - 1e-9 {
                    1.0 - s[i]
                } else {
                    h[i]
                }
            })
            .collect();
        let h_col = per_row(&step, &x)?;
        let mut ks = vec![k1.clone()];
        for (stage, weights) in A.iter().enumerate() {
            let times: Vec<f64> = (0..batch).map(|i| s[i] + C[stage] * step[i]).collect();
            let x_stage = (&x + combine(&ks, weights)?.broadcast_mul(&h_col)?)?;
            let k = eval(&x_stage, &times, &active, &mut per_sample_nfe)?;
            ks.push(k);
            if stage == A.len() - 1 {
                ks.push(x_stage);
            }
        }
        let x_new = ks.pop().ok_or_else(|| Error::Solver("missing stage".into()))?;
        let error = combine(&ks, &E)?.broadcast_mul(&h_col)?;
        let scale = tolerance_scale(opts, &x, &x_new)?;
        let norms = rms_per_row(&error, &scale)?;

        let mut accept = vec![false; batch];
        for i in 0..batch {
            if !active[i] {
                continue;
            }
            let norm = norms[i];
            if norm.is_finite() && norm <= 1.0 {
                accept[i] = true;
                accepted_steps[i] += 1;
                s[i] = if step[i] == 1.0 - s[i] { 1.0 } else { s[i] + step[i] };
                let factor =
                    if norm == 0.0 { MAX_FACTOR } else { (SAFETY * norm.powf(-0.2)).clamp(MIN_FACTOR, MAX_FACTOR) };
                h[i] = step[i] * factor;
            } else {
                rejected_steps[i] += 1;
                let factor =
                    if norm.is_finite() { (SAFETY * norm.powf(-0.2)).clamp(MIN_FACTOR, 1.0) } else { MIN_FACTOR };
                h[i] = step[i] * factor;
                if h[i] < MIN_STEP {
                    return Err(Error::Solver(format!(
                        "step size underflow at s = {:.6} for sample {i} (error norm {norm:.3e})",
                        s[i]
                    )));
                }
            }
            if per_sample_nfe[i] > opts.max_nfe {
                return Err(Error::Solver(format!(
                    "sample {i} used more than {} evaluations and reached only s = {:.4}; raise the NFE cap or loosen rtol/atol",
                    opts.max_nfe, s[i]
                )));
            }
        }
        let k7 = ks.pop().ok_or_else(|| Error::Solver("missing stage".into()))?;
        x = select_rows(&accept, &x_new, &x)?;
        k1 = select_rows(&accept, &k7, &k1)?;

        if accept.iter().any(|&a| a) {
            let slowest = s.iter().cloned().fold(f64::INFINITY, f64::min);
            let step_count = accepted_steps.iter().copied().max().unwrap_or(0);
            let report = StepReport { step: step_count, total: None, s: slowest, nfe: nfe.get() };
            if let ControlFlow::Break(()) = observer.on_step(&report) {
                return Err(Error::Cancelled);
            }
        }
    }
    let stats = SolveStats {
        nfe: nfe.get(),
        steps: accepted_steps.iter().copied().max().unwrap_or(0),
        accepted: accepted_steps.iter().sum(),
        rejected: rejected_steps.iter().sum(),
        per_sample_nfe,
    };
    Ok((x, stats))
}
