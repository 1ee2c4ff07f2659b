//! WeightsFile loading: memory-mapped safetensors and PyTorch pickles (`.pt`/`.pth`, flat or
//! nested under `ema`/`model`/`state_dict`, with `module.`/`_orig_mod.` prefixes stripped).
//! Every load is checked as a whole: one error lists missing, unexpected and mis-shaped tensors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{pickle::PthTensors, DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// Wrapper prefixes that training frameworks add in front of the module tree.
const STRIPPED_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];
/// Sub-dictionaries of a training checkpoint that hold a state_dict, most preferred first.
const NESTED_KEYS: [&str; 4] = ["ema", "model", "state_dict", "module"];

enum Store {
    Safetensors(MmapedSafetensors),
    Pth(PthTensors),
}

/// An opened weights file, indexed by normalised tensor name.
pub struct WeightsFile {
    path: PathBuf,
    store: Store,
    /// normalised name -> (name in the file, shape)
    index: BTreeMap<String, (String, Vec<usize>)>,
}

fn normalise(name: &str) -> String {
    let mut name = name;
    loop {
        match STRIPPED_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
            Some(rest) => name = rest,
            None => return name.to_string(),
        }
    }
}

impl WeightsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let weights_err = |message: String| Error::Weights { path: path.to_path_buf(), message };
        if !path.exists() {
            return Err(weights_err("file not found".into()));
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let (store, raw): (Store, Vec<(String, Vec<usize>)>) = match ext.as_str() {
            "safetensors" => {
                // SAFETY: the file is mapped read-only; flowgen never writes weights it is serving.
                let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| weights_err(e.to_string()))?;
                let names = st.tensors().into_iter().map(|(n, view)| (n, view.shape().to_vec())).collect();
                (Store::Safetensors(st), names)
            }
            "pt" | "pth" | "bin" | "ckpt" => {
                let mut pth = PthTensors::new(path, None).map_err(|e| weights_err(e.to_string()))?;
                if pth.tensor_infos().is_empty() {
                    // A training checkpoint: a dict whose values are state_dicts.
                    for key in NESTED_KEYS {
                        if let Ok(nested) = PthTensors::new(path, Some(key)) {
                            if !nested.tensor_infos().is_empty() {
                                pth = nested;
                                break;
                            }
                        }
                    }
                }
                let names = pth
                    .tensor_infos()
                    .iter()
                    .map(|(n, info)| (n.clone(), info.layout.shape().dims().to_vec()))
                    .collect();
                (Store::Pth(pth), names)
            }
            other => {
                return Err(weights_err(format!("unsupported weights format {other:?}: use .safetensors, .pt or .pth")))
            }
        };
        if raw.is_empty() {
            return Err(weights_err("no tensors found (also looked under ema, model, state_dict)".into()));
        }
        let index = raw.into_iter().map(|(name, shape)| (normalise(&name), (name, shape))).collect();
        Ok(Self { path: path.to_path_buf(), store, index })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|(_, s)| s.as_slice())
    }

    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (raw, _) = self
            .index
            .get(name)
            .ok_or_else(|| Error::Weights { path: self.path.clone(), message: format!("no tensor {name}") })?;
        let tensor = match &self.store {
            Store::Safetensors(st) => st.load(raw, device)?,
            Store::Pth(pth) => pth
                .get(raw)?
                .ok_or_else(|| Error::Weights { path: self.path.clone(), message: format!("no tensor {raw}") })?
                .to_device(device)?,
        };
        Ok(tensor.to_dtype(dtype)?)
    }

    /// Build a module with `build(vb)`, then fail with one report if anything did not fit.
    pub fn build<M>(
        self,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
    ) -> Result<M> {
        let checkpoint = Arc::new(self);
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let backend = CheckingBackend { checkpoint: checkpoint.clone(), report: report.clone() };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let module = build(vb)?;
        let report = report.lock().map_err(|_| Error::EnginePanicked("weights report poisoned".into()))?;
        let unexpected: Vec<&str> = checkpoint.names().filter(|n| !report.requested.contains(*n)).collect();
        if report.missing.is_empty() && report.misshaped.is_empty() {
            if !unexpected.is_empty() {
                tracing::warn!(path = %checkpoint.path.display(), count = unexpected.len(), first = unexpected[0], "ignoring tensors the model does not use");
            }
            return Ok(module);
        }
        Err(Error::WeightsMismatch { path: checkpoint.path.clone(), report: report.render(&unexpected) })
    }
}

#[derive(Default)]
struct LoadReport {
    requested: BTreeSet<String>,
    missing: Vec<(String, Vec<usize>)>,
    misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl LoadReport {
    fn render(&self, unexpected: &[&str]) -> String {
        const SHOWN: usize = 20;
        let mut out = String::new();
        let mut section = |title: &str, lines: Vec<String>| {
            if lines.is_empty() {
                return;
            }
            out.push_str(&format!("  {title} ({}):\n", lines.len()));
            for line in lines.iter().take(SHOWN) {
                out.push_str(&format!("    {line}\n"));
            }
            if lines.len() > SHOWN {
                out.push_str(&format!("    ... and {} more\n", lines.len() - SHOWN));
            }
        };
        section("missing", self.missing.iter().map(|(n, s)| format!("{n} {s:?}")).collect());
        section(
            "mis-shaped",
            self.misshaped
                .iter()
                .map(|(n, want, got)| format!("{n}: model expects {want:?}, file has {got:?}"))
                .collect(),
        );
        section("unexpected", unexpected.iter().map(|n| n.to_string()).collect());
        out.trim_end().to_string()
    }
}

/// Records every tensor the model asks for instead of failing at the first miss, so the
/// user sees the whole mismatch at once. Misses are filled with broadcast zeros (no allocation).
struct CheckingBackend {
    checkpoint: Arc<WeightsFile>,
    report: Arc<Mutex<LoadReport>>,
}

impl CheckingBackend {
    fn placeholder(shape: &Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }
}

impl SimpleBackend for CheckingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut report = self.report.lock().map_err(|_| candle_core::Error::Msg("weights report poisoned".into()))?;
        report.requested.insert(name.to_string());
        match self.checkpoint.shape_of(name) {
            None => {
                report.missing.push((name.to_string(), s.dims().to_vec()));
                Self::placeholder(&s, dtype, dev)
            }
            Some(found) if found != s.dims() => {
                report.misshaped.push((name.to_string(), s.dims().to_vec(), found.to_vec()));
                Self::placeholder(&s, dtype, dev)
            }
            Some(_) => {
                drop(report);
                self.checkpoint.load(name, dtype, dev).map_err(|e| candle_core::Error::Msg(e.to_string()))
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Ok(mut report) = self.report.lock() {
            report.requested.insert(name.to_string());
        }
        self.checkpoint.load(name, dtype, dev).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.checkpoint.shape_of(name).is_some()
    }
}

/// Save named tensors as safetensors (the format every shipped model uses), readable by all
/// (the safetensors writer creates 0600 files, which a server running as another user cannot read).
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let error = |message: String| Error::Weights { path: path.to_path_buf(), message };
    candle_core::safetensors::save(tensors, path).map_err(|e| error(e.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|e| error(e.to_string()))?;
    }
    Ok(())
}
