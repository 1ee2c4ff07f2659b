//! What the server needs from an engine: a model config and a blocking batched `generate`.
//! The real one wraps `EngineHandle`; tests use `testing::FakeEngine` (feature `testing`).

use std::sync::Arc;

use flowgen_engine::handle::Progress;
use flowgen_engine::image::Image;
use flowgen_engine::{EngineHandle, GenerationRequest, ModelConfig, SolveStats};

pub struct EngineOutput {
    pub images: Vec<Image>,
    pub stats: SolveStats,
}

pub trait Engine: Send + Sync + 'static {
    fn config(&self) -> &ModelConfig;
    /// Runs on a blocking thread; `progress` returning `Break` cancels with `Error::Cancelled`.
    fn generate(&self, request: GenerationRequest, progress: Progress) -> flowgen_engine::Result<EngineOutput>;
}

impl Engine for EngineHandle {
    fn config(&self) -> &ModelConfig {
        EngineHandle::config(self)
    }

    fn generate(&self, request: GenerationRequest, progress: Progress) -> flowgen_engine::Result<EngineOutput> {
        let generation = EngineHandle::generate(self, request, progress)?;
        Ok(EngineOutput { images: generation.images, stats: generation.stats })
    }
}

/// A model's configuration without its weights: what an API process validates requests against
/// (workers load the weights and run them).
pub struct ConfigOnly {
    config: ModelConfig,
}

impl ConfigOnly {
    pub fn new(config: ModelConfig) -> Self {
        ConfigOnly { config }
    }
}

impl Engine for ConfigOnly {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn generate(&self, _: GenerationRequest, _: Progress) -> flowgen_engine::Result<EngineOutput> {
        Err(flowgen_engine::Error::invalid(
            "server.role",
            "this process is an API process (server.role = api) and loads no weights; workers run jobs",
        ))
    }
}

/// The model name that always means the default model (unless a served model has that name).
pub const DEFAULT_ALIAS: &str = "default";

/// The served models by name; the first is the default.
#[derive(Clone)]
pub struct Models {
    entries: Vec<(String, Arc<dyn Engine>)>,
}

impl Models {
    pub fn new(engines: Vec<Arc<dyn Engine>>) -> Self {
        Models { entries: engines.into_iter().map(|e| (e.config().name.clone(), e)).collect() }
    }

    pub fn default_name(&self) -> Option<&str> {
        self.entries.first().map(|(n, _)| n.as_str())
    }

    /// The model a request names: its name, or the default for none or the alias "default"
    /// (so OpenAI-style clients that must send a model id can name it without knowing it).
    pub fn resolve(&self, name: Option<&str>) -> Option<(&str, &Arc<dyn Engine>)> {
        let found = match name {
            None => self.entries.first(),
            Some(name) => self.entries.iter().find(|(n, _)| n == name).or_else(|| {
                if name == DEFAULT_ALIAS {
                    self.entries.first()
                } else {
                    None
                }
            }),
        };
        found.map(|(n, e)| (n.as_str(), e))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Engine>> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, e)| e)
    }

    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Engine>> {
        self.entries.iter().map(|(_, e)| e)
    }
}
