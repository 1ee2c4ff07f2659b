//! BOSS (Nguyen et al., ICLR 2024), phase 1: Bellman optimal step sizes. Reference trajectories
//! of K_max uniform Euler steps give, for every pair of anchors i < j, the squared error of one
//! Euler jump from anchor i to anchor j; a dynamic programme then picks the K anchors whose jumps
//! add up to the least error. Times are in the engine frame (s = 0 noise, s = 1 data).

pub mod straighten;

use candle_core::{DType, Tensor};
use flowgen_engine::samplers::VelocityField;
use flowgen_engine::{noise, Guidance, GuidedField, Pipeline};

use crate::error::{Result, TrainError};

/// How the reference trajectories are drawn.
#[derive(Debug, Clone)]
pub struct CostSetup {
    /// Uniform Euler steps of the reference (the anchor grid has k_max + 1 points).
    pub k_max: usize,
    /// Trajectories averaged over.
    pub n: usize,
    /// Image i uses seed + i and label i mod classes, as `eval` does.
    pub seed: u64,
    pub guidance: Guidance,
    pub batch: usize,
}

/// c[i][j]: mean over trajectories of sum_pixels (x_i + v_i (t_j - t_i) - x_j)^2, for i < j.
#[derive(Debug, Clone, PartialEq)]
pub struct CostMatrix {
    pub k_max: usize,
    /// Row-major (k_max + 1) x (k_max + 1); only i < j is meaningful.
    pub cost: Vec<f64>,
}

impl CostMatrix {
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.cost[i * (self.k_max + 1) + j]
    }

    /// The total one-jump error along a path of anchor indices.
    pub fn path_cost(&self, path: &[usize]) -> f64 {
        path.windows(2).map(|w| self.get(w[0], w[1])).sum()
    }
}

/// The cost matrix of `pipeline`'s model; `on_step` is told each completed reference step.
pub fn cost_matrix(pipeline: &Pipeline, setup: &CostSetup, on_step: &mut dyn FnMut(usize)) -> Result<CostMatrix> {
    if setup.k_max < 2 || setup.n == 0 || setup.batch == 0 {
        return Err(TrainError::invalid("kmax", "needs k_max >= 2, n >= 1 and batch >= 1"));
    }
    let k_max = setup.k_max;
    let classes = pipeline.config().num_classes() as u32;
    let (c, h, w) = pipeline.config().state_shape();
    let mut cost = vec![0.0f64; (k_max + 1) * (k_max + 1)];
    for start in (0..setup.n).step_by(setup.batch) {
        let end = (start + setup.batch).min(setup.n);
        let labels: Vec<u32> = (start..end).map(|i| i as u32 % classes).collect();
        let seeds: Vec<u64> = (start..end).map(|i| setup.seed.wrapping_add(i as u64)).collect();
        let field = GuidedField::new(pipeline.velocity_model(), &labels, setup.guidance.clone(), pipeline.device())?;
        let mut x = noise::batch(&seeds, &[c, h, w], pipeline.device())?;
        // States at every anchor and velocities at every anchor but the last, flattened per image.
        let (mut states, mut velocities) = (Vec::with_capacity(k_max + 1), Vec::with_capacity(k_max));
        for j in 0..k_max {
            let s = j as f64 / k_max as f64;
            let v = field.velocity(&x, &vec![s; end - start])?;
            states.push(rows(&x)?);
            velocities.push(rows(&v)?);
            x = (&x + (&v * (1.0 / k_max as f64))?)?;
            if start == 0 {
                on_step(j + 1);
            }
        }
        states.push(rows(&x)?);
        accumulate(&mut cost, k_max, &states, &velocities);
    }
    for value in &mut cost {
        *value /= setup.n as f64;
    }
    Ok(CostMatrix { k_max, cost })
}

/// (B, ...) -> one Vec<f32> per image.
fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.flatten_from(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Add each image's squared one-jump errors to `cost`.
fn accumulate(cost: &mut [f64], k_max: usize, states: &[Vec<Vec<f32>>], velocities: &[Vec<Vec<f32>>]) {
    let images = states[0].len();
    for i in 0..k_max {
        for j in i + 1..=k_max {
            let dt = ((j - i) as f64 / k_max as f64) as f32;
            let mut total = 0.0f64;
            for b in 0..images {
                let (xi, vi, xj) = (&states[i][b], &velocities[i][b], &states[j][b]);
                total += xi.iter().zip(vi).zip(xj).map(|((&a, &v), &t)| ((a + v * dt - t) as f64).powi(2)).sum::<f64>();
            }
            cost[i * (k_max + 1) + j] += total;
        }
    }
}

/// The K-jump path 0 -> k_max of least total cost (anchor indices, K + 1 of them).
pub fn bellman_path(cost: &CostMatrix, k: usize) -> Result<Vec<usize>> {
    let k_max = cost.k_max;
    if k == 0 || k > k_max {
        return Err(TrainError::invalid("nfe", format!("each budget must be between 1 and k_max = {k_max}, got {k}")));
    }
    // value[m][i]: least cost from anchor i to k_max in exactly m jumps; next[m][i]: the first jump.
    let mut value = vec![vec![f64::INFINITY; k_max + 1]; k + 1];
    let mut next = vec![vec![usize::MAX; k_max + 1]; k + 1];
    value[0][k_max] = 0.0;
    for m in 1..=k {
        for i in 0..k_max {
            for j in i + 1..=k_max {
                let through = cost.get(i, j) + value[m - 1][j];
                if through < value[m][i] {
                    value[m][i] = through;
                    next[m][i] = j;
                }
            }
        }
    }
    let mut path = vec![0];
    let mut at = 0;
    for m in (1..=k).rev() {
        at = next[m][at];
        if at == usize::MAX {
            return Err(TrainError::invalid("nfe", format!("no {k}-step path over {k_max} anchors")));
        }
        path.push(at);
    }
    Ok(path)
}

/// Anchor indices -> s values in [0, 1].
pub fn path_times(path: &[usize], k_max: usize) -> Vec<f64> {
    path.iter().map(|&j| j as f64 / k_max as f64).collect()
}

/// The uniform K-step path over the same anchors, when k divides k_max (for comparison).
pub fn uniform_path(k: usize, k_max: usize) -> Option<Vec<usize>> {
    (k > 0 && k_max.is_multiple_of(k)).then(|| (0..=k).map(|i| i * k_max / k).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_costs(k_max: usize, seed: u64) -> CostMatrix {
        let mut state = seed;
        let cost = (0..(k_max + 1) * (k_max + 1))
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 40) as f64 / (1u64 << 24) as f64
            })
            .collect();
        CostMatrix { k_max, cost }
    }

    /// Every increasing path 0 -> k_max with exactly k jumps.
    fn all_paths(k_max: usize, k: usize) -> Vec<Vec<usize>> {
        fn extend(path: &mut Vec<usize>, k_max: usize, left: usize, out: &mut Vec<Vec<usize>>) {
            let at = *path.last().unwrap_or(&0);
            if left == 0 {
                if at == k_max {
                    out.push(path.clone());
                }
                return;
            }
            for j in at + 1..=k_max {
                path.push(j);
                extend(path, k_max, left - 1, out);
                path.pop();
            }
        }
        let mut out = Vec::new();
        extend(&mut vec![0], k_max, k, &mut out);
        out
    }

    #[test]
    fn the_programme_finds_the_brute_force_optimum_for_every_budget() {
        for seed in 0..5 {
            let costs = random_costs(9, seed);
            for k in 1..=9 {
                let best = all_paths(9, k).into_iter().map(|p| costs.path_cost(&p)).fold(f64::INFINITY, f64::min);
                let path = bellman_path(&costs, k).unwrap();
                assert_eq!(path.len(), k + 1);
                assert_eq!((path[0], path[k]), (0, 9));
                assert!(path.windows(2).all(|w| w[0] < w[1]), "{path:?}");
                assert!((costs.path_cost(&path) - best).abs() < 1e-12, "seed {seed} k {k}");
            }
        }
        assert!(bellman_path(&random_costs(4, 0), 5).is_err());
        assert!(bellman_path(&random_costs(4, 0), 0).is_err());
    }

    #[test]
    fn times_run_from_noise_to_data() {
        assert_eq!(path_times(&[0, 25, 100], 100), vec![0.0, 0.25, 1.0]);
        assert_eq!(uniform_path(4, 100), Some(vec![0, 25, 50, 75, 100]));
        assert_eq!(uniform_path(3, 100), None);
    }

    #[test]
    fn a_straight_field_costs_nothing_and_curvature_is_charged_by_jump_length() {
        // x(s) = s^2 per pixel: v = 2s. One jump i -> j misses by (t_j - t_i)^2 per pixel.
        let k_max = 4;
        let t = |j: usize| j as f64 / k_max as f64;
        let states: Vec<Vec<Vec<f32>>> = (0..=k_max).map(|j| vec![vec![(t(j) * t(j)) as f32; 2]]).collect();
        let velocities: Vec<Vec<Vec<f32>>> = (0..k_max).map(|j| vec![vec![(2.0 * t(j)) as f32; 2]]).collect();
        let mut cost = vec![0.0; (k_max + 1) * (k_max + 1)];
        accumulate(&mut cost, k_max, &states, &velocities);
        let c = CostMatrix { k_max, cost };
        for (i, j) in [(0, 1), (0, 4), (1, 3), (2, 4)] {
            let expected = 2.0 * (t(j) - t(i)).powi(4);
            assert!((c.get(i, j) - expected).abs() < 1e-6, "{i}->{j}: {} vs {expected}", c.get(i, j));
        }
    }
}
