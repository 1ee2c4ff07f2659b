use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use flowgen_engine::random_model::{tiny_latent_config, with_tiny_blockwise, with_tiny_refiner, write_random_model};
use flowgen_engine::{candle_core::Device, Pipeline};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write a tiny MNIST-shaped latent model with seeded random weights (for tests and demos:
    /// it runs the whole pipeline but draws noise-like images, not digits).
    InitRandom {
        /// Directory to create (model.toml, velocity and autoencoder weights).
        #[arg(long)]
        out: PathBuf,
        /// Seeds the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Name written into model.toml.
        #[arg(long, default_value = "random-tiny-latent")]
        name: String,
        /// Add a random FlowTurbo refiner ([networks.refiner]) with this recommended plan, e.g.
        /// flowturbo:H1P2R2.
        #[arg(long, conflicts_with = "blockwise")]
        refiner: Option<String>,
        /// Make the network a tiny blockwise one (BFM: 4 time segments and an FRN, so `fra` runs).
        #[arg(long)]
        blockwise: bool,
    },
    /// Load a model directory, check its weights, and print its configuration.
    Check {
        /// Model directory (model.toml and its weights).
        #[arg(long)]
        model: PathBuf,
    },
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::InitRandom { out, seed, name, refiner, blockwise } => {
            let mut config = tiny_latent_config(&name);
            if blockwise {
                config = with_tiny_blockwise(config);
            }
            if let Some(plan) = &refiner {
                flowgen_engine::Sampler::parse(plan).with_context(|| format!("--refiner {plan}"))?;
                config = with_tiny_refiner(config, plan);
            }
            write_random_model(&out, &config, seed)
                .with_context(|| format!("writing a random model to {}", out.display()))?;
            println!("wrote random-weights model {name:?} to {}", out.display());
            Ok(())
        }
        ModelCommand::Check { model } => {
            let pipeline =
                Pipeline::load(&model, &Device::Cpu).with_context(|| format!("loading {}", model.display()))?;
            let cfg = pipeline.config();
            let (c, h, w) = cfg.image_shape();
            println!("{}: ok ({}x{}x{} images, {} classes)", cfg.name, c, h, w, cfg.num_classes());
            print!("{}", cfg.to_toml_string());
            Ok(())
        }
    }
}
