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

/// Tensors from `frozen` (plain, no gradient) except names starting with `trainable_prefix`,
/// which come from a VarMap of trainable variables.
struct FrozenExcept {
    frozen: HashMap<String, Tensor>,
    trainable: VarMap,
    trainable_prefix: String,
}

impl candle_nn::var_builder::SimpleBackend for FrozenExcept {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: candle_core::DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            candle_core::bail!("{name}: shape {:?} where the model expects {s:?}", tensor.shape());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: candle_core::DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = if name.starts_with(&self.trainable_prefix) {
            let data = self.trainable.data().lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
            data.get(name).map(|v| v.as_tensor().clone())
        } else {
            self.frozen.get(name).cloned()
        };
        tensor
            .ok_or_else(|| candle_core::Error::Msg(format!("{name} is missing from the frozen weights")))?
            .to_device(dev)?
            .to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if name.starts_with(&self.trainable_prefix) {
            self.trainable.data().lock().map(|d| d.contains_key(name)).unwrap_or(false)
        } else {
            self.frozen.contains_key(name)
        }
    }
}

/// A module built from `frozen` weights with only the tensors named `trainable_prefix...`
/// trainable (seeded, biases at zero, then `adjust`ed): the VarMap holds just those.
pub fn partly_trainable<M>(
    seed: u64,
    device: &Device,
    frozen: HashMap<String, Tensor>,
    trainable_prefix: &str,
    build: impl Fn(VarBuilder) -> candle_core::Result<M>,
    adjust: impl FnOnce(&mut HashMap<String, Tensor>) -> Result<()>,
) -> Result<(M, VarMap)> {
    let (vb, created) = random_var_builder(seed, device);
    build(vb)?;
    let created = created.lock().map_err(|_| TrainError::invalid("init", "poisoned"))?.clone();
    let mut fresh: HashMap<String, Tensor> =
        created.into_iter().filter(|(n, _)| n.starts_with(trainable_prefix)).collect();
    if fresh.is_empty() {
        return Err(TrainError::invalid("init", format!("the model has no tensors named {trainable_prefix}*")));
    }
    for (name, t) in fresh.iter_mut() {
        if name.ends_with(".bias") && !name.contains("norm") {
            *t = t.zeros_like()?;
        }
    }
    adjust(&mut fresh)?;
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|_| TrainError::invalid("init", "poisoned"))?;
        for (name, t) in fresh {
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    let backend = FrozenExcept { frozen, trainable: varmap.clone(), trainable_prefix: trainable_prefix.to_string() };
    let module = build(VarBuilder::from_backend(Box::new(backend), candle_core::DType::F32, device.clone()))?;
    Ok((module, varmap))
}
