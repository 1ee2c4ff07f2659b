//! Seeded, trainable parameters created through the same `new(cfg, vb)` as inference.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use flowgen_engine::random_model::random_var_builder;

use crate::error::{Result, TrainError};

/// Run `build` once on seeded random tensors, let `adjust` rewrite them (architecture-specific
/// init), then put them in a VarMap and build the trainable module from it.
pub fn trainable<M>(
    seed: u64,
    device: &Device,
    build: impl Fn(VarBuilder) -> candle_core::Result<M>,
    adjust: impl FnOnce(&mut HashMap<String, Tensor>) -> Result<()>,
) -> Result<(M, VarMap)> {
    let (vb, created) = random_var_builder(seed, device);
    build(vb)?;
    let mut tensors = created.lock().map_err(|_| TrainError::invalid("init", "poisoned"))?.clone();
    // Biases start at zero (the random builder draws them; norms ask for constants and keep them).
    for (name, t) in tensors.iter_mut() {
        if name.ends_with(".bias") && !name.contains("norm") {
            *t = t.zeros_like()?;
        }
    }
    adjust(&mut tensors)?;
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|_| TrainError::invalid("init", "poisoned"))?;
        for (name, t) in tensors {
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    let module = build(VarBuilder::from_varmap(&varmap, candle_core::DType::F32, device))?;
    Ok((module, varmap))
}

/// adaLN-Zero: every block starts as the identity and the output as zero (DiT's init).
pub fn sit_adaln_zero(tensors: &mut HashMap<String, Tensor>) -> Result<()> {
    for (name, t) in tensors.iter_mut() {
        let zero = name.contains("adaLN_modulation") || name.starts_with("final_layer.linear");
        let small = name.starts_with("t_embedder") || name.starts_with("y_embedder");
        if zero {
            *t = t.zeros_like()?;
        } else if small && name.ends_with("weight") {
            // The seeded draw has std 1/sqrt(fan_in); rescale it to DiT's N(0, 0.02^2).
            let fan_in = t.elem_count() / t.dim(0)?;
            *t = (&*t * (0.02 * (fan_in as f64).sqrt()))?;
        }
    }
    Ok(())
}

/// Named variables of a VarMap, sorted by name.
pub fn named_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap.data().lock().map_err(|_| TrainError::invalid("vars", "poisoned"))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

pub fn snapshot(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    Ok(vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<candle_core::Result<_>>()?)
}
