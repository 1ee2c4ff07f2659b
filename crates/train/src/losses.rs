//! Flow-matching objectives on batches of (noise x0, data x1) pairs, s = 0 noise, s = 1 data:
//! I-CFM (independent pairs), W-CFM (Gibbs-weighted independent pairs) and OT-CFM (exact
//! minibatch optimal assignment).

use candle_core::{DType, Tensor};
use pathfinding::prelude::{kuhn_munkres_min, Matrix};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The W-CFM pair cost c(x0, x1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairCost {
    /// ||x0 - x1|| (the paper notes' form).
    Euclidean,
    /// ||x0 - x1||^2.
    SquaredEuclidean,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Objective {
    Icfm,
    /// Pair weights exp(-c(x0, x1) / eps) with eps = kappa * sqrt(d).
    Wcfm {
        kappa: f64,
        cost: PairCost,
    },
    Otcfm,
}

impl Objective {
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Icfm => "icfm",
            Objective::Wcfm { .. } => "wcfm",
            Objective::Otcfm => "otcfm",
        }
    }
}

/// Rows of a (B, ...) tensor as f64 vectors.
fn rows(x: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(x.flatten_from(1)?.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Per-pair costs c(x0_i, x1_i).
pub fn pair_costs(x0: &Tensor, x1: &Tensor, cost: PairCost) -> Result<Vec<f64>> {
    let (a, b) = (rows(x0)?, rows(x1)?);
    Ok(a.iter()
        .zip(&b)
        .map(|(p, q)| {
            let d2 = squared_distance(p, q);
            match cost {
                PairCost::Euclidean => d2.sqrt(),
                PairCost::SquaredEuclidean => d2,
            }
        })
        .collect())
}

/// W-CFM weights exp(-c / eps), computed in log space and normalised to mean 1 over the batch.
pub fn gibbs_weights(costs: &[f64], eps: f64) -> Vec<f64> {
    if costs.is_empty() {
        return Vec::new();
    }
    if !eps.is_finite() {
        return vec![1.0; costs.len()];
    }
    let logs: Vec<f64> = costs.iter().map(|c| -c / eps).collect();
    let max = logs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let raw: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
    let mean = raw.iter().sum::<f64>() / raw.len() as f64;
    raw.iter().map(|w| w / mean).collect()
}

/// eps = kappa * sqrt(d) for data of dimension d.
pub fn wcfm_eps(kappa: f64, dim: usize) -> f64 {
    kappa * (dim as f64).sqrt()
}

/// Optimal assignment minimising sum_i ||x0_perm[i] - x1_i||^2: returns perm with x0 row perm[i]
/// paired to x1 row i.
pub fn ot_assignment(x0: &Tensor, x1: &Tensor) -> Result<Vec<usize>> {
    let (a, b) = (rows(x0)?, rows(x1)?);
    let n = a.len();
    if n != b.len() {
        return Err(TrainError::invalid("batch", format!("{n} noise rows for {} data rows", b.len())));
    }
    // Integer costs for the exact Hungarian solver; 1e6 resolution relative to the largest cost.
    let costs: Vec<f64> = b.iter().flat_map(|q| a.iter().map(move |p| squared_distance(p, q))).collect();
    let max = costs.iter().cloned().fold(0.0, f64::max).max(1e-12);
    let scaled: Vec<i64> = costs.iter().map(|c| (c / max * 1e6).round() as i64).collect();
    let matrix = Matrix::from_vec(n, n, scaled).map_err(|e| TrainError::invalid("batch", e.to_string()))?;
    let (_, assignment) = kuhn_munkres_min(&matrix);
    Ok(assignment)
}

/// Reorder rows of `x` by `perm`.
pub fn permute_rows(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = perm.iter().map(|&i| i as u32).collect();
    Ok(x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)?)
}

/// Relative variance Var(tau)/E[tau]^2 of the source tilt tau_i = mean_j exp(-c(x0_i, x1_j)/eps),
/// the quantity W-CFM's elbow rule reads to choose kappa.
pub fn tilt_relative_variance(x0: &Tensor, x1: &Tensor, eps: f64, cost: PairCost) -> Result<f64> {
    let (a, b) = (rows(x0)?, rows(x1)?);
    let logs: Vec<Vec<f64>> = a
        .iter()
        .map(|p| {
            b.iter()
                .map(|q| {
                    let d2 = squared_distance(p, q);
                    -(match cost {
                        PairCost::Euclidean => d2.sqrt(),
                        PairCost::SquaredEuclidean => d2,
                    }) / eps
                })
                .collect()
        })
        .collect();
    // A common shift keeps exp() in range and cancels in the ratio.
    let shift = logs.iter().flatten().cloned().fold(f64::NEG_INFINITY, f64::max);
    let tau: Vec<f64> =
        logs.iter().map(|row| row.iter().map(|l| (l - shift).exp()).sum::<f64>() / row.len() as f64).collect();
    let mean = tau.iter().sum::<f64>() / tau.len() as f64;
    let var = tau.iter().map(|t| (t - mean) * (t - mean)).sum::<f64>() / tau.len() as f64;
    Ok(var / (mean * mean))
}

/// The elbow of a decreasing curve (x ascending): the point farthest from the chord joining the
/// ends, in (log x, y normalised to [0, 1]) coordinates.
pub fn elbow(xs: &[f64], ys: &[f64]) -> usize {
    if xs.len() < 3 {
        return 0;
    }
    let lx: Vec<f64> = xs.iter().map(|x| x.ln()).collect();
    let (ymin, ymax) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &y| (lo.min(y), hi.max(y)));
    let span = (ymax - ymin).max(1e-300);
    let ny: Vec<f64> = ys.iter().map(|y| (y - ymin) / span).collect();
    let xspan = (lx[lx.len() - 1] - lx[0]).max(1e-300);
    let nx: Vec<f64> = lx.iter().map(|x| (x - lx[0]) / xspan).collect();
    let (x0, y0, x1, y1) = (nx[0], ny[0], nx[nx.len() - 1], ny[ny.len() - 1]);
    let norm = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt().max(1e-300);
    (0..xs.len())
        .map(|i| (i, ((y1 - y0) * nx[i] - (x1 - x0) * ny[i] + x1 * y0 - y1 * x0).abs() / norm))
        .fold((0, -1.0), |best, (i, d)| if d > best.1 { (i, d) } else { best })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gibbs_weights_normalise_and_tend_to_icfm() {
        let costs = [1.0, 2.0, 3.0, 10.0];
        let w = gibbs_weights(&costs, 1.0);
        assert!((w.iter().sum::<f64>() / 4.0 - 1.0).abs() < 1e-12);
        // Ratios are exp(-(c_i - c_j) / eps).
        assert!((w[0] / w[1] - 1f64.exp()).abs() < 1e-9);
        // Huge costs do not underflow in log space.
        let w = gibbs_weights(&[1e6, 1e6 + 1.0], 1.0);
        assert!(w.iter().all(|v| v.is_finite() && *v > 0.0), "{w:?}");
        // eps -> infinity gives equal weights: I-CFM.
        for eps in [1e8, f64::INFINITY] {
            assert!(gibbs_weights(&costs, eps).iter().all(|v| (v - 1.0).abs() < 1e-6));
        }
        assert!((wcfm_eps(0.5, 196) - 7.0).abs() < 1e-12);
    }

    fn brute_force(x0: &[Vec<f64>], x1: &[Vec<f64>]) -> f64 {
        fn permutations(n: usize) -> Vec<Vec<usize>> {
            if n == 0 {
                return vec![vec![]];
            }
            let mut out = Vec::new();
            for p in permutations(n - 1) {
                for i in 0..=p.len() {
                    let mut q = p.clone();
                    q.insert(i, n - 1);
                    out.push(q);
                }
            }
            out
        }
        permutations(x0.len())
            .iter()
            .map(|perm| (0..x1.len()).map(|i| squared_distance(&x0[perm[i]], &x1[i])).sum::<f64>())
            .fold(f64::INFINITY, f64::min)
    }

    #[test]
    fn ot_assignment_equals_brute_force() {
        let dev = Device::Cpu;
        for (n, seed) in [(2usize, 0u64), (4, 1), (6, 2), (7, 3)] {
            let x0 = crate::run::seeded_normal(seed, 0, 0, &[n, 3], &dev).unwrap();
            let x1 = crate::run::seeded_normal(seed, 0, 1, &[n, 3], &dev).unwrap();
            let perm = ot_assignment(&x0, &x1).unwrap();
            let mut sorted = perm.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            let (a, b) = (rows(&x0).unwrap(), rows(&x1).unwrap());
            let ours: f64 = (0..n).map(|i| squared_distance(&a[perm[i]], &b[i])).sum();
            let best = brute_force(&a, &b);
            assert!((ours - best).abs() < 1e-4 * best.max(1.0), "n={n}: {ours} vs {best}");
            let permuted = permute_rows(&x0, &perm).unwrap();
            assert_eq!(rows(&permuted).unwrap()[0], a[perm[0]]);
        }
    }

    #[test]
    fn tilt_variance_falls_with_kappa_and_elbow_is_found() {
        let dev = Device::Cpu;
        let x0 = crate::run::seeded_normal(0, 0, 0, &[64, 8], &dev).unwrap();
        let x1 = (crate::run::seeded_normal(0, 0, 1, &[64, 8], &dev).unwrap() * 0.5).unwrap();
        let kappas = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0];
        let rv: Vec<f64> = kappas
            .iter()
            .map(|&k| tilt_relative_variance(&x0, &x1, wcfm_eps(k, 8), PairCost::Euclidean).unwrap())
            .collect();
        assert!(rv.windows(2).all(|w| w[1] <= w[0] + 1e-12), "{rv:?}");
        let e = elbow(&kappas, &rv);
        assert!(e > 0 && e < kappas.len() - 1, "{e} {rv:?}");
        // A sharp corner is found exactly.
        assert_eq!(elbow(&[1.0, 10.0, 100.0, 1000.0], &[1.0, 0.1, 0.05, 0.0]), 1);
    }
}
