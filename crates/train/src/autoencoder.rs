//! `flowgen train autoencoder`: the KL autoencoder 28x28x1 <-> 4x7x7 that the latent flow
//! models work in, its latent scale factor, and validation PSNR.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use flowgen_engine::config::AutoencoderSection;
use flowgen_engine::image::{to_images, Image};
use flowgen_engine::models::autoencoder::{AutoencoderConfig, AutoencoderKl};
use serde::{Deserialize, Serialize};

use crate::data::Digits;
use crate::error::{Result, TrainError};
use crate::init::trainable;
use crate::run::{batch_indices, seeded_normal, Run, RunPlace, StepLog, TrainOptions};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoencoderTraining {
    pub arch: AutoencoderConfig,
    /// Weight of KL(q(z|x) || N(0, I)) summed over latents, relative to the summed pixel MSE.
    pub kl_weight: f64,
    pub opts: TrainOptions,
}

impl AutoencoderTraining {
    pub fn mnist_default(opts: TrainOptions) -> Self {
        AutoencoderTraining {
            arch: AutoencoderConfig {
                in_channels: 1,
                out_channels: 1,
                latent_channels: 4,
                block_out_channels: vec![32, 64, 64],
                layers_per_block: 1,
                norm_num_groups: 16,
                mid_block_add_attention: true,
                use_quant_conv: true,
                use_post_quant_conv: true,
            },
            kl_weight: 1e-3,
            opts,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoencoderReport {
    pub val_psnr_db: f64,
    pub val_mse: f64,
    pub latent_std: f64,
    pub scaling_factor: f64,
    pub final_loss: f64,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    pub parameters: usize,
}

/// Summed-pixel MSE + kl_weight * KL, both per image, averaged over the batch and divided by pixels.
fn loss(ae: &AutoencoderKl, x: &Tensor, eps: &Tensor, kl_weight: f64) -> Result<(Tensor, Tensor)> {
    let posterior = ae.encode(x)?;
    let z = posterior.sample_with(eps)?;
    let recon = ae.decode(&z)?;
    let mse = (recon - x)?.sqr()?.mean_all()?;
    let pixels = x.elem_count() / x.dim(0)?;
    let kl = (posterior.kl()?.mean_all()? / pixels as f64)?;
    Ok(((&mse + (&kl * kl_weight)?)?, mse))
}

/// PSNR in dB of mean-latent reconstructions, on [0, 1] pixels.
pub fn psnr(ae: &AutoencoderKl, data: &Digits, device: &Device) -> Result<(f64, f64)> {
    let mut sum = 0.0;
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(250) {
        let (x, _) = data.batch(chunk, device)?;
        let recon = ae.decode(&ae.encode(&x)?.mean)?.clamp(-1f32, 1f32)?;
        // [-1, 1] -> [0, 1] divides the squared error by 4.
        sum += (recon - &x)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? / 4.0;
    }
    let mse = sum / (data.len() * data.rows * data.cols) as f64;
    Ok((10.0 * (1.0 / mse).log10(), mse))
}

/// Std of posterior samples over the training set; the latent scale is its inverse (as 0.18215 was for SD).
pub fn latent_std(ae: &AutoencoderKl, data: &Digits, device: &Device, seed: u64) -> Result<f64> {
    let (mut sum, mut sq, mut n) = (0f64, 0f64, 0usize);
    let idx: Vec<usize> = (0..data.len()).collect();
    for (i, chunk) in idx.chunks(250).enumerate() {
        let (x, _) = data.batch(chunk, device)?;
        let posterior = ae.encode(&x)?;
        let eps = seeded_normal(seed, i, 7, posterior.mean.dims(), device)?;
        let z = posterior.sample_with(&eps)?.to_dtype(DType::F64)?;
        sum += z.sum_all()?.to_scalar::<f64>()?;
        sq += z.sqr()?.sum_all()?.to_scalar::<f64>()?;
        n += z.elem_count();
    }
    let mean = sum / n as f64;
    Ok((sq / n as f64 - mean * mean).sqrt())
}

pub fn train(
    cfg: &AutoencoderTraining,
    (train_data, val_data): (&Digits, &Digits),
    place: RunPlace,
    progress: &mut dyn FnMut(&StepLog) -> ControlFlow<()>,
) -> Result<AutoencoderReport> {
    let RunPlace { out, device, resume } = place;
    cfg.arch.validate().map_err(|m| TrainError::invalid("autoencoder", m))?;
    let arch = cfg.arch.clone();
    let (ae, varmap) = trainable(cfg.opts.seed, device, |vb| AutoencoderKl::new(&arch, vb), |_| Ok(()))?;
    let run_id = format!("autoencoder {}", serde_json::to_string(cfg).unwrap_or_default());
    let mut run = Run::start(out, cfg.opts.clone(), &varmap, run_id, resume, &["loss", "mse", "grad_norm", "lr"])?;
    let parameters = run.vars.iter().map(|(_, v)| v.elem_count()).sum();
    for step in run.start_step..cfg.opts.steps {
        let idx = batch_indices(cfg.opts.seed, step, cfg.opts.batch_size, train_data.len());
        let (x, _) = train_data.batch(&idx, device)?;
        let latent_shape = [
            idx.len(),
            arch.latent_channels,
            x.dim(2)? / arch.downsample_factor(),
            x.dim(3)? / arch.downsample_factor(),
        ];
        let eps = seeded_normal(cfg.opts.seed, step, 2, &latent_shape, device)?;
        let (total, mse) = loss(&ae, &x, &eps, cfg.kl_weight)?;
        let outcome = run.optimise(step, &total)?;
        run.end_step(step, outcome, || Ok(vec![mse.to_dtype(DType::F64)?.to_scalar::<f64>()?]), progress)?;
    }
    run.plot_loss("autoencoder training loss");
    run.use_ema()?;
    let (val_psnr_db, val_mse) = psnr(&ae, val_data, device)?;
    let std = latent_std(&ae, train_data, device, cfg.opts.seed)?;
    let scaling_factor = 1.0 / std;

    let weights = out.join("autoencoder.safetensors");
    flowgen_engine::weights::save_safetensors(&run.ema.shadow, &weights)?;
    let section = AutoencoderSection {
        weights: "autoencoder.safetensors".into(),
        scaling_factor,
        shift_factor: 0.0,
        arch: cfg.arch.clone(),
    };
    let toml_path = out.join("autoencoder.toml");
    std::fs::write(&toml_path, toml::to_string_pretty(&section).unwrap_or_default())
        .map_err(|e| TrainError::io(&toml_path, e))?;

    // Originals above their reconstructions, for a look.
    let idx: Vec<usize> = (0..16).map(|i| i % val_data.len()).collect();
    let (x, _) = val_data.batch(&idx, device)?;
    let recon = ae.decode(&ae.encode(&x)?.mean)?;
    let mut images = to_images(&x)?;
    images.extend(to_images(&recon)?);
    let grid = Image::grid(&images)?;
    let png = out.join("reconstructions.png");
    std::fs::write(&png, grid.to_png(&[("Software", "flowgen".into())])?).map_err(|e| TrainError::io(&png, e))?;

    let report = AutoencoderReport {
        val_psnr_db,
        val_mse,
        latent_std: std,
        scaling_factor,
        final_loss: run.last_loss,
        train_seconds: run.train_seconds(),
        samples_per_second: run.mean_samples_per_second(),
        parameters,
    };
    let report_path = out.join("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report).unwrap_or_default())
        .map_err(|e| TrainError::io(&report_path, e))?;
    Ok(report)
}
