//! `flowgen train blockwise`: Blockwise Flow Matching (Park et al., NeurIPS 2025) in BFM's own
//! time (t = 1 noise, x_t = (1 - t) x + t eps, target eps - x), so the `lfm` adapter serves it.
//!
//! Stage 1 trains the trunk and every segment's blocks on a minibatch split evenly across the
//! segments, plus a REPA-style cosine alignment of the trunk's per-token features (through the
//! projection head) to a frozen representation of the clean image. The FRN stage freezes all of
//! that and trains only the feature residual network: anchor = trunk at the segment's start,
//! target = trunk at t, approximation = anchor + coeff * FRN with coeff the covered fraction.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use flowgen_engine::config::NetworkSection;
use flowgen_engine::models::blockwise::{Blockwise, BlockwiseConfig, StepInputs};
use flowgen_engine::weights::save_safetensors;
use flowgen_engine::{NetworkArch, TimeConvention};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::classifier::Classifier;
use crate::data::Digits;
use crate::error::{Result, TrainError};
use crate::init::{partly_trainable, trainable};
use crate::run::{batch_indices, seeded_normal, step_rng, Run, RunPlace, StepLog, TrainOptions};
use crate::velocity::{write_model_toml, Latents, ModelDirCommon};

/// File name of the blockwise network in a model directory.
pub const BLOCKWISE_WEIGHTS: &str = "velocity.safetensors";

/// Logged steps the reports average their losses over.
const REPORT_WINDOW: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockwiseTraining {
    pub net: BlockwiseConfig,
    /// Weight of the feature-alignment loss (the release: 0.05); 0 trains without alignment.
    pub align_weight: f64,
    pub opts: TrainOptions,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockwiseReport {
    /// Means over the last logged steps: total, velocity MSE and alignment (-cos) losses.
    pub final_loss: f64,
    pub final_velocity_loss: f64,
    pub final_align_loss: f64,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    pub parameters: usize,
    pub steps: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrnTraining {
    /// The stage-1 network's configuration with `frn_depth` set.
    pub net: BlockwiseConfig,
    pub opts: TrainOptions,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrnReport {
    /// Mean FRN loss |anchor + coeff FRN - trunk(t)|^2 over the last logged steps.
    pub final_loss: f64,
    /// The same error for reusing the anchor unchanged (a zero FRN), on the same batches.
    pub anchor_reuse_loss: f64,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    pub parameters: usize,
    pub steps: usize,
}

/// Rows per segment when `batch` is split as evenly as possible (the first ones get the extra).
pub fn segment_split(batch: usize, segments: usize) -> Vec<usize> {
    let (base, extra) = (batch / segments.max(1), batch % segments.max(1));
    (0..segments).map(|s| base + usize::from(s < extra)).collect()
}

/// Each row's segment and a time drawn uniformly inside it, rows grouped by segment in order.
pub fn segment_times(cfg: &BlockwiseConfig, batch: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<usize>) {
    let mut times = Vec::with_capacity(batch);
    let mut segments = Vec::with_capacity(batch);
    for (segment, rows) in segment_split(batch, cfg.segments).into_iter().enumerate() {
        let (start, end) = cfg.segment_bounds(segment);
        for _ in 0..rows {
            times.push((end + (start - end) * rng.random::<f64>()) as f32);
            segments.push(segment);
        }
    }
    (times, segments)
}

/// Unit vectors along the last dimension (a zero vector stays zero).
fn normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(xs.broadcast_div(&(norm + 1e-6)?)?)
}

/// REPA's alignment loss: the mean over samples and tokens of -cos(projected, target).
pub fn alignment_loss(projected: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok((normalize(projected)? * normalize(target)?)?.sum(D::Minus1)?.neg()?.mean_all()?)
}

/// Frozen per-token targets of the feature alignment: the shipped classifier's second conv map
/// of each clean training digit, (digits, tokens, channels), computed once.
pub struct AlignmentTargets {
    pub features: Tensor,
}

impl AlignmentTargets {
    pub fn from_classifier(classifier: &Classifier, data: &Digits, device: &Device) -> Result<Self> {
        let mut parts = Vec::new();
        let idx: Vec<usize> = (0..data.len()).collect();
        for chunk in idx.chunks(250) {
            let (x, _) = data.batch(chunk, device)?;
            parts.push(classifier.spatial_features(&x)?);
        }
        Ok(Self { features: Tensor::cat(&parts, 0)? })
    }

    pub fn tokens(&self) -> Result<usize> {
        Ok(self.features.dim(1)?)
    }

    pub fn channels(&self) -> Result<usize> {
        Ok(self.features.dim(2)?)
    }

    fn rows(&self, idx: &[usize]) -> Result<Tensor> {
        let rows =
            Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), self.features.device())?;
        Ok(self.features.index_select(&rows, 0)?)
    }
}

/// BFM's init: xavier-like seeded weights, every modulation that feeds a gate (the low-rank
/// up-projections, both global terms, the final layer) and the output at zero, so each block
/// starts as the identity; time and label embeddings N(0, 0.02^2). FRN blocks keep their draw.
pub fn blockwise_init(tensors: &mut HashMap<String, Tensor>) -> Result<()> {
    for (name, t) in tensors.iter_mut() {
        let zero = (name.contains("adaLN_modulation.2") && !name.starts_with("frn_blocks"))
            || name.starts_with("global_adaLN_modulation")
            || name.starts_with("final_layer.");
        let small = name.starts_with("t_embedder") || name.starts_with("y_embedder");
        if zero {
            *t = t.zeros_like()?;
        } else if small && name.ends_with("weight") {
            let fan_in = t.elem_count() / t.dim(0)?;
            *t = (&*t * (0.02 * (fan_in as f64).sqrt()))?;
        }
    }
    Ok(())
}

/// The FRN's blocks start as the identity (adaLN-Zero, as DiT), so its first residual is the
/// embedded state rather than random blocks' output (the release keeps the random draw; on a
/// few-thousand-step budget that start costs steps).
pub fn frn_init(tensors: &mut HashMap<String, Tensor>) -> Result<()> {
    for (name, t) in tensors.iter_mut() {
        if name.contains("adaLN_modulation") {
            *t = t.zeros_like()?;
        }
    }
    Ok(())
}

/// Losses of one stage-1 batch.
pub struct StageOneLoss {
    pub total: Tensor,
    pub velocity: Tensor,
    /// -cos alignment; None when training without alignment.
    pub align: Option<Tensor>,
}

/// Stage 1 on one batch: data latents `x`, noise `eps`, per-row times and segments, labels
/// (already dropped to the null label where chosen), and the alignment targets with its weight.
pub fn stage_one_loss(
    net: &Blockwise,
    (x, eps): (&Tensor, &Tensor),
    (t, segments): (&Tensor, &[usize]),
    labels: &Tensor,
    align: Option<(f64, &Tensor)>,
) -> Result<StageOneLoss> {
    let b = x.dim(0)?;
    let t_col = t.reshape((b, 1, 1, 1))?;
    let xt = (x.broadcast_mul(&(1.0 - &t_col)?)? + eps.broadcast_mul(&t_col)?)?;
    let target = (eps - x)?;
    let inputs = net.step_inputs(&xt, t, labels)?;
    let features = net.trunk(&inputs)?;
    let v = net.velocity_channels(net.heads_by_segment(&inputs, &features, segments)?)?;
    let velocity = (v - target)?.sqr()?.mean_all()?;
    match align {
        Some((weight, targets)) if weight > 0.0 => {
            let align = alignment_loss(&net.project(&features)?, targets)?;
            let total = (&velocity + (&align * weight)?)?;
            Ok(StageOneLoss { total, velocity, align: Some(align) })
        }
        _ => Ok(StageOneLoss { total: velocity.clone(), velocity, align: None }),
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn mean_tail(values: &[f64]) -> f64 {
    let tail = &values[values.len().saturating_sub(REPORT_WINDOW)..];
    tail.iter().sum::<f64>() / tail.len().max(1) as f64
}

/// One step's training batch, the same draw in both stages (resumable from the step alone).
struct Batch {
    idx: Vec<usize>,
    /// Data latents and noise, (B, C, H, W).
    x: Tensor,
    eps: Tensor,
    /// Network times (t = 1 noise) and their segments, rows grouped by segment.
    times: Vec<f32>,
    segments: Vec<usize>,
    /// Labels, dropped to the null label with the network's dropout probability.
    labels: Tensor,
}

fn draw_batch(
    net: &BlockwiseConfig,
    opts: &TrainOptions,
    step: usize,
    latents: &Latents,
    null: u32,
    device: &Device,
) -> Result<Batch> {
    let shape = [opts.batch_size, net.in_channels, net.input_size, net.input_size];
    let idx = batch_indices(opts.seed, step, opts.batch_size, latents.len());
    let (x, mut labels) = latents.sample(&idx, &seeded_normal(opts.seed, step, 2, &shape, device)?)?;
    let eps = seeded_normal(opts.seed, step, 3, &shape, device)?;
    let mut rng = step_rng(opts.seed, step, 4);
    let (times, segments) = segment_times(net, idx.len(), &mut rng);
    drop_labels(&mut labels, null, net.class_dropout_prob, &mut rng);
    let labels = Tensor::from_vec(labels, idx.len(), device)?;
    Ok(Batch { idx, x, eps, times, segments, labels })
}

/// Labels of a batch with each replaced by `null` with probability `dropout`.
fn drop_labels(labels: &mut [u32], null: u32, dropout: f64, rng: &mut ChaCha8Rng) {
    for label in labels.iter_mut() {
        if rng.random::<f64>() < dropout {
            *label = null;
        }
    }
}

/// Stage 1: trunk, segment blocks and projection head. Returns the EMA weights.
pub fn train(
    cfg: &BlockwiseTraining,
    latents: &Latents,
    targets: Option<&AlignmentTargets>,
    place: RunPlace,
    progress: &mut dyn FnMut(&StepLog) -> ControlFlow<()>,
) -> Result<(BlockwiseReport, HashMap<String, Tensor>)> {
    let RunPlace { out, device, resume } = place;
    cfg.net.validate().map_err(|m| TrainError::invalid("network", m))?;
    if !(cfg.align_weight.is_finite() && cfg.align_weight >= 0.0) {
        return Err(TrainError::invalid("align-weight", "must be 0 or positive"));
    }
    let null = cfg.net.null_label().ok_or_else(|| {
        TrainError::invalid("label-dropout", "must be above 0 so the model learns the null label for guidance")
    })?;
    let aligned = cfg.align_weight > 0.0;
    let targets = match (aligned, targets) {
        (true, Some(t)) => {
            if t.tokens()? != cfg.net.num_tokens() || t.channels()? != cfg.net.dim_projection {
                return Err(TrainError::invalid(
                    "alignment",
                    format!(
                        "targets are {} tokens of {} channels; the network has {} tokens and dim_projection {}",
                        t.tokens()?,
                        t.channels()?,
                        cfg.net.num_tokens(),
                        cfg.net.dim_projection
                    ),
                ));
            }
            Some(t)
        }
        (true, None) => return Err(TrainError::invalid("alignment", "align-weight > 0 needs alignment targets")),
        (false, _) => None,
    };
    let net_cfg = cfg.net.clone();
    let (net, varmap) = trainable(cfg.opts.seed, device, |vb| Blockwise::new(&net_cfg, vb), blockwise_init)?;
    let run_id = format!("blockwise {}", serde_json::to_string(cfg).unwrap_or_default());
    let columns = ["loss", "velocity_loss", "align_loss", "grad_norm", "lr"];
    let mut run = Run::start(out, cfg.opts.clone(), &varmap, run_id, resume, &columns)?;
    let parameters = run.vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut logged: Vec<(f64, f64, f64)> = Vec::new();
    for step in run.start_step..cfg.opts.steps {
        let Batch { idx, x, eps, times, segments, labels } =
            draw_batch(&cfg.net, &cfg.opts, step, latents, null, device)?;
        let t = Tensor::from_vec(times, idx.len(), device)?;
        let align_rows = targets.map(|t| t.rows(&idx)).transpose()?;
        let align = align_rows.as_ref().map(|rows| (cfg.align_weight, rows));
        let loss = stage_one_loss(&net, (&x, &eps), (&t, &segments), &labels, align)?;
        let outcome = run.optimise(step, &loss.total)?;
        run.end_step(
            step,
            outcome,
            || {
                let velocity = scalar(&loss.velocity)?;
                let align = loss.align.as_ref().map(scalar).transpose()?.unwrap_or(0.0);
                logged.push((outcome.0, velocity, align));
                Ok(vec![velocity, align])
            },
            progress,
        )?;
    }
    run.plot_loss("blockwise training loss (stage 1)");
    let column = |f: fn(&(f64, f64, f64)) -> f64| mean_tail(&logged.iter().map(f).collect::<Vec<_>>());
    let report = BlockwiseReport {
        final_loss: column(|l| l.0),
        final_velocity_loss: column(|l| l.1),
        final_align_loss: column(|l| l.2),
        train_seconds: run.train_seconds(),
        samples_per_second: run.mean_samples_per_second(),
        parameters,
        steps: cfg.opts.steps,
    };
    Ok((report, run.ema.shadow.clone()))
}

/// The FRN's loss on one batch: (loss, loss of reusing the anchor unchanged).
pub fn frn_loss(
    net: &Blockwise,
    (x, eps): (&Tensor, &Tensor),
    (t, t_start, coeff): (&Tensor, &Tensor, &Tensor),
    labels: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let b = x.dim(0)?;
    let mix = |t: &Tensor| -> Result<Tensor> {
        let col = t.reshape((b, 1, 1, 1))?;
        Ok((x.broadcast_mul(&(1.0 - &col)?)? + eps.broadcast_mul(&col)?)?)
    };
    // Anchor and target come from the frozen trunk (same noise draw, the segment's start and t).
    let anchor = net.trunk(&net.step_inputs(&mix(t_start)?, t_start, labels)?)?.detach();
    let inputs = net.step_inputs(&mix(t)?, t, labels)?;
    let target = net.trunk(&inputs)?.detach();
    let inputs = StepInputs { c: inputs.c.detach(), patches: inputs.patches.detach() };
    let approx = (&anchor + net.frn_residual(&inputs)?.broadcast_mul(&coeff.reshape((b, 1, 1))?)?)?;
    let loss = (approx - &target)?.sqr()?.mean_all()?;
    let reuse = (anchor - target)?.sqr()?.mean_all()?;
    Ok((loss, reuse))
}

/// The FRN stage: everything of `base` frozen, only `frn_blocks.*` trained. Returns the EMA of
/// the FRN weights.
pub fn train_frn(
    cfg: &FrnTraining,
    base: HashMap<String, Tensor>,
    latents: &Latents,
    place: RunPlace,
    progress: &mut dyn FnMut(&StepLog) -> ControlFlow<()>,
) -> Result<(FrnReport, HashMap<String, Tensor>)> {
    let RunPlace { out, device, resume } = place;
    cfg.net.validate().map_err(|m| TrainError::invalid("network", m))?;
    if cfg.net.frn_depth == 0 {
        return Err(TrainError::invalid("frn-depth", "must be at least 1"));
    }
    let null = cfg.net.null_label().ok_or_else(|| TrainError::invalid("model", "the model has no null label"))?;
    let net_cfg = cfg.net.clone();
    let (net, varmap) =
        partly_trainable(cfg.opts.seed, device, base, "frn_blocks.", |vb| Blockwise::new(&net_cfg, vb), frn_init)?;
    let run_id = format!("blockwise-frn {}", serde_json::to_string(cfg).unwrap_or_default());
    let mut run =
        Run::start(out, cfg.opts.clone(), &varmap, run_id, resume, &["loss", "anchor_reuse_loss", "grad_norm", "lr"])?;
    let parameters = run.vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut logged: Vec<(f64, f64)> = Vec::new();
    for step in run.start_step..cfg.opts.steps {
        let Batch { idx, x, eps, times, segments, labels } =
            draw_batch(&cfg.net, &cfg.opts, step, latents, null, device)?;
        let mut starts = Vec::with_capacity(idx.len());
        let mut coeffs = Vec::with_capacity(idx.len());
        for (&t, &segment) in times.iter().zip(&segments) {
            let (start, end) = cfg.net.segment_bounds(segment);
            starts.push(start as f32);
            coeffs.push(((start - t as f64) / (start - end)) as f32);
        }
        let n = idx.len();
        let t = Tensor::from_vec(times, n, device)?;
        let t_start = Tensor::from_vec(starts, n, device)?;
        let coeff = Tensor::from_vec(coeffs, n, device)?;
        let (loss, reuse) = frn_loss(&net, (&x, &eps), (&t, &t_start, &coeff), &labels)?;
        let outcome = run.optimise(step, &loss)?;
        run.end_step(
            step,
            outcome,
            || {
                let reuse = scalar(&reuse)?;
                logged.push((outcome.0, reuse));
                Ok(vec![reuse])
            },
            progress,
        )?;
    }
    run.plot_loss("blockwise FRN training loss");
    let report = FrnReport {
        final_loss: mean_tail(&logged.iter().map(|l| l.0).collect::<Vec<_>>()),
        anchor_reuse_loss: mean_tail(&logged.iter().map(|l| l.1).collect::<Vec<_>>()),
        train_seconds: run.train_seconds(),
        samples_per_second: run.mean_samples_per_second(),
        parameters,
        steps: cfg.opts.steps,
    };
    Ok((report, run.ema.shadow.clone()))
}

/// What a servable blockwise model directory is made of.
pub struct BlockwiseModelParts<'a> {
    pub net: &'a BlockwiseConfig,
    /// Every weight of the network (stage-1 EMA, plus the FRN's when trained).
    pub weights: &'a HashMap<String, Tensor>,
    pub common: ModelDirCommon<'a>,
}

/// Write a servable model directory: model.toml (kind blockwise, convention lfm), the weights
/// under their official names, and the autoencoder.
pub fn write_model_dir(dir: &Path, parts: BlockwiseModelParts) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    save_safetensors(parts.weights, &dir.join(BLOCKWISE_WEIGHTS))?;
    let network = NetworkSection {
        weights: BLOCKWISE_WEIGHTS.into(),
        convention: TimeConvention::Lfm,
        arch: NetworkArch::Blockwise(parts.net.clone()),
    };
    let description = "class-conditional latent blockwise flow model (BFM) trained on MNIST by flowgen";
    write_model_toml(dir, description, network, parts.common)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_batch_splits_evenly_and_times_stay_in_their_segment() {
        assert_eq!(segment_split(128, 6), vec![22, 22, 21, 21, 21, 21]);
        assert_eq!(segment_split(4, 6), vec![1, 1, 1, 1, 0, 0]);
        let cfg = BlockwiseConfig {
            input_size: 4,
            in_channels: 4,
            patch_size: 1,
            hidden_size: 16,
            num_heads: 2,
            mlp_ratio: 4.0,
            num_classes: 10,
            class_dropout_prob: 0.1,
            learn_sigma: false,
            segments: 4,
            segment_depth: 1,
            feature_alignment_depth: 1,
            frn_depth: 0,
            adaln_lora_dim: 4,
            dim_projection: 0,
            projection_hidden: 8,
            rope_theta: 10000.0,
            abs_pos_embed: false,
        };
        let (times, segments) = segment_times(&cfg, 37, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(times.len(), 37);
        for (&t, &s) in times.iter().zip(&segments) {
            let (start, end) = cfg.segment_bounds(s);
            assert!(end as f32 <= t && t <= start as f32, "t {t} outside segment {s} [{end}, {start}]");
            // Sampling dispatches the same time to the same segment (a draw on the lower edge
            // belongs to the next segment, as at sampling).
            if (t as f64 - end).abs() > 1e-5 {
                assert_eq!(cfg.segment_of(t as f64), s, "t {t}");
            }
        }
        assert!(segments.windows(2).all(|w| w[0] <= w[1]), "rows grouped by segment in order");
    }

    #[test]
    fn alignment_loss_is_minus_the_mean_cosine() {
        let dev = Device::Cpu;
        // Two tokens: parallel (cos 1) and orthogonal (cos 0); scale does not matter.
        let a = Tensor::from_vec(vec![2f32, 0., 0., 1.], (1, 2, 2), &dev).unwrap();
        let b = Tensor::from_vec(vec![5f32, 0., 3., 0.], (1, 2, 2), &dev).unwrap();
        let loss = alignment_loss(&a, &b).unwrap().to_scalar::<f32>().unwrap();
        assert!((loss + 0.5).abs() < 1e-5, "{loss}");
        // Opposite vectors: +1.
        let loss = alignment_loss(&a, &a.neg().unwrap()).unwrap().to_scalar::<f32>().unwrap();
        assert!((loss - 1.0).abs() < 1e-5, "{loss}");
    }
}
