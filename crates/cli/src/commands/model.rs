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
    /// Run the model's velocity network once on given inputs: x (B, C, H, W) f32, t (B,) f32 in
    /// the network's own time, y (B,) u32 labels, read from a safetensors file; writes `velocity`
    /// (for parity checks against another implementation, e.g. tests/reference/torch_reference.py).
    Forward {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// safetensors file holding x, t and y.
        #[arg(long)]
        inputs: PathBuf,
        /// safetensors file to write `velocity` to.
        #[arg(long)]
        out: PathBuf,
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
        ModelCommand::Forward { model, inputs, out } => forward(&model, &inputs, &out),
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

fn forward(model: &std::path::Path, inputs: &std::path::Path, out: &std::path::Path) -> Result<()> {
    use flowgen_engine::candle_core::{safetensors, DType};
    let config = flowgen_engine::ModelConfig::load(model).with_context(|| format!("loading {}", model.display()))?;
    let device = Device::Cpu;
    let net = config.network.load(model, config.null_label(), DType::F32, &device)?;
    let tensors = safetensors::load(inputs, &device).with_context(|| format!("reading {}", inputs.display()))?;
    let get = |name: &str| {
        tensors.get(name).with_context(|| format!("{}: no tensor {name:?} (expected x, t and y)", inputs.display()))
    };
    let (x, t, y) = (get("x")?.to_dtype(DType::F32)?, get("t")?.to_dtype(DType::F32)?, get("y")?.to_dtype(DType::U32)?);
    let velocity = net.forward(&x, &t, &y).context("running the velocity network")?;
    safetensors::save(&std::collections::HashMap::from([("velocity".to_string(), velocity)]), out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote the velocity of {} inputs to {}", x.dim(0)?, out.display());
    Ok(())
}
