//! flowgen-engine: flow-matching image generation with candle.
//!
//! One time frame everywhere: samplers integrate dx/ds = u(x, s) from s = 0 (noise) to
//! s = 1 (data); each model's own convention is mapped by [`velocity::GuidedField`].

pub mod config;
pub mod device;
pub mod error;
pub mod handle;
pub mod image;
pub mod models;
pub mod network;
pub mod noise;
pub mod pipeline;
pub mod random_model;
pub mod samplers;
pub mod schedule;
pub mod settings;
pub mod velocity;
pub mod weights;

pub use candle_core;
pub use candle_nn;
pub use config::{ModelConfig, TimeConvention};
pub use error::{Error, Result};
pub use handle::EngineHandle;
pub use network::NetworkArch;
pub use pipeline::{Generation, Pipeline};
pub use samplers::{Sampler, SolveStats, StepObserver, StepReport};
pub use schedule::{Schedule, ScheduleAccess, ScheduleSpec};
pub use settings::{GenerationRequest, ImageInputs, SettingsRequest, SolveSettings};
pub use velocity::{Guidance, GuidedField, VelocityModel};
