//! flowgen-train: trains the models flowgen ships (on MNIST), and measures them.

pub mod autoencoder;
pub mod blockwise;
pub mod boss;
pub mod checkpoint;
pub mod classifier;
pub mod data;
pub mod error;
pub mod evaluate;
pub mod flowturbo;
pub mod init;
pub mod log;
pub mod losses;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod run;
pub mod sampler_bench;
pub mod velocity;

pub use error::{Result, TrainError};
