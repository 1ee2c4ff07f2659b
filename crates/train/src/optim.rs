//! AdamW with savable state, warmup + cosine learning rate, global-norm clipping, and EMA.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Decoupled-weight-decay Adam over named variables (names are the checkpoint tensor names).
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
    cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(mut vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, m, v, step: 0, cfg })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn step_count(&self) -> usize {
        self.step
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bias1 = 1.0 - b1.powi(self.step as i32);
        let bias2 = 1.0 - b2.powi(self.step as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            // Detached: otherwise each moment keeps the previous step's graph alive (a leak per step).
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?.detach();
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let update = ((&m / bias1)? / ((&v / bias2)?.sqrt()? + self.cfg.eps)?)?;
            // Decay matrices only; biases and norm gains stay undecayed.
            let decay = if var.rank() >= 2 { 1.0 - lr * self.cfg.weight_decay } else { 1.0 };
            var.set(&((var.as_tensor() * decay)? - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments as `m.<name>` / `v.<name>` plus the step count, for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        let device = self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        out.insert("step".into(), Tensor::new(&[self.step as u32], &device)?);
        Ok(out)
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let missing = |k: &str| TrainError::Checkpoint { path: "optimizer".into(), message: format!("missing {k}") };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let m = state.get(&format!("m.{name}")).ok_or_else(|| missing(&format!("m.{name}")))?;
            let v = state.get(&format!("v.{name}")).ok_or_else(|| missing(&format!("v.{name}")))?;
            self.m[i] = m.to_device(var.device())?.to_dtype(var.dtype())?;
            self.v[i] = v.to_device(var.device())?.to_dtype(var.dtype())?;
        }
        let step = state.get("step").ok_or_else(|| missing("step"))?;
        self.step = step.to_dtype(DType::U32)?.to_vec1::<u32>()?[0] as usize;
        Ok(())
    }
}

/// Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    // One device-to-host read per step, not one per parameter tensor.
    let squares = vars
        .iter()
        .filter_map(|(_, var)| grads.get(var.as_tensor()))
        .map(|g| g.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    let norm = Tensor::stack(&squares, 0)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / (norm + 1e-6);
        for (_, var) in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Linear warmup to `base`, then cosine decay to `base * final_fraction` at `total` steps.
pub fn warmup_cosine(step: usize, total: usize, warmup: usize, base: f64, final_fraction: f64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let progress = ((step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64).min(1.0);
    let floor = base * final_fraction;
    floor + (base - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Exponential moving average of the weights, with the usual warm-up of the decay.
pub struct Ema {
    pub shadow: HashMap<String, Tensor>,
    decay: f64,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        Ok(Self { shadow, decay })
    }

    pub fn update(&mut self, vars: &[(String, Var)], step: usize) -> Result<()> {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for (name, var) in vars {
            if let Some(s) = self.shadow.get_mut(name) {
                // Detached: the shadow must not chain to the previous step's graph through the Var.
                *s = ((&*s * d)? + (var.as_tensor() * (1.0 - d))?)?.detach();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_minimises_a_quadratic_and_state_round_trips() {
        let x = Var::new(&[3.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], AdamWConfig::default()).unwrap();
        for _ in 0..500 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.05).unwrap();
        }
        let v = x.as_tensor().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|a| a.abs() < 1e-2), "{v:?}");
        // Moments and EMA must not keep autograd graphs alive across steps (that leaked memory).
        assert!(opt.m.iter().chain(&opt.v).all(|t| !t.track_op()));
        let vars = vec![("x".to_string(), x.clone())];
        let mut ema = Ema::new(&vars, 0.9).unwrap();
        ema.update(&vars, 1).unwrap();
        assert!(ema.shadow.values().all(|t| !t.track_op()));
        let state = opt.state().unwrap();
        let mut other = AdamW::new(vec![("x".into(), x.clone())], AdamWConfig::default()).unwrap();
        other.load_state(&state).unwrap();
        assert_eq!(other.step_count(), 500);
    }

    #[test]
    fn schedule_and_clipping() {
        assert!((warmup_cosine(0, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((warmup_cosine(9, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!(warmup_cosine(100, 100, 10, 1.0, 0.1) - 0.1 < 1e-12);
        let x = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let mut grads = (x.as_tensor() * 1.0).unwrap().sum_all().unwrap().backward().unwrap();
        let vars = vec![("x".into(), x.clone())];
        // gradient (1, 1): norm sqrt(2)
        let norm = clip_grad_norm(&mut grads, &vars, 0.5).unwrap();
        assert!((norm - 2f64.sqrt()).abs() < 1e-6);
        let g = grads.get(x.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((g.sqrt() - 0.5).abs() < 1e-3);
    }
}
