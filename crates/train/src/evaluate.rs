//! `flowgen eval`: sample quality in the classifier's feature space (FD against the val split,
//! with the real-data floor), class accuracy, solver error against a tight Dormand-Prince
//! reference from the same noise, NFE, speed, and optionally straightness.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use flowgen_engine::samplers::{Dopri5Options, Unobserved, VelocityField, MAIN_NETWORK};
use flowgen_engine::{noise, Guidance, GuidedField, ImageInputs, Pipeline, Sampler, ScheduleSpec, SolveSettings};
use serde::{Deserialize, Serialize};

use crate::classifier::Classifier;
use crate::data::Digits;
use crate::error::Result;
use crate::metrics::fd_of_features;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    pub model: String,
    pub sampler: String,
    pub steps: usize,
    /// Canonical schedule of a fixed-step sampler ("uniform", "boss-4", ...).
    #[serde(default = "uniform_name")]
    pub schedule: String,
    pub guidance: f64,
    /// Times s (0 noise, 1 data) at which guidance applies.
    pub guidance_interval: (f64, f64),
    pub n: usize,
    /// Seed of image 0 (image i is drawn from seed + i); absent in results written before it was
    /// recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub fd: f64,
    pub fd_floor: f64,
    pub fd_ratio: f64,
    pub accuracy: f64,
    /// None when the run skipped the reference solve (`eval --no-reference`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmse_vs_reference: Option<f64>,
    pub nfe_per_image: f64,
    /// Measured evaluations per image of the networks beside the main one (a refiner, a
    /// blockwise model's FRN), by name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub other_evaluations_per_image: std::collections::BTreeMap<String, f64>,
    /// Network FLOPs per image from the measured evaluations of every network (two forwards
    /// per guided evaluation).
    #[serde(default)]
    pub gflops_per_image: f64,
    pub seconds_per_image: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub straightness: Option<f64>,
    /// FD of the same n train digits passed through the model's autoencoder: the best a latent
    /// model can reach with this autoencoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd_autoencoder_floor: Option<f64>,
    /// The same, decoding a draw from each digit's latent posterior instead of its mean: the
    /// floor of a velocity model trained on posterior samples (as `train velocity` does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd_autoencoder_sampled_floor: Option<f64>,
}

fn uniform_name() -> String {
    "uniform".into()
}

/// What stays fixed across a sweep: labels, seeds, the val features, the real-data floor, and
/// the reference solutions.
pub struct EvalContext {
    pub labels: Vec<u32>,
    pub seeds: Vec<u64>,
    /// Classifier-free guidance of every solve (scale and interval).
    pub guidance: Guidance,
    /// Time grid of every fixed-step solve (uniform unless set; a stored list fixes the steps).
    pub schedule: ScheduleSpec,
    val_features: Vec<Vec<f64>>,
    pub fd_floor: f64,
    pub fd_autoencoder_floor: Option<f64>,
    pub fd_autoencoder_sampled_floor: Option<f64>,
    /// The tight Dormand-Prince solve: final states, total NFE, seconds per image.
    reference: Option<Solved>,
    /// Whether results carry the RMSE against the reference (which costs one tight solve).
    pub with_reference: bool,
    batch: usize,
}

fn features(classifier: &Classifier, images: &Tensor) -> Result<(Vec<Vec<f64>>, Vec<u32>)> {
    let feats = classifier.features(images)?;
    let preds = classifier.head(&feats)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok((feats.to_dtype(DType::F64)?.to_vec2::<f64>()?, preds))
}

fn digit_features(classifier: &Classifier, data: &Digits, n: usize, device: &Device) -> Result<Vec<Vec<f64>>> {
    let idx: Vec<usize> = (0..n.min(data.len())).collect();
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(500) {
        let (x, _) = data.batch(chunk, device)?;
        out.extend(features(classifier, &x)?.0);
    }
    Ok(out)
}

/// Pixels as users get them: decoded, clamped and quantised to 8 bits.
fn as_delivered(pixels: &Tensor) -> Result<Tensor> {
    Ok(((((pixels.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.round()? / 127.5)? - 1.0)?)
}

/// What an evaluation compares against and how it draws: the classifier whose features FD uses,
/// the train digits for the real-data floor, the val digits as the reference, and the `n` labels
/// (0-9 in turn) and seeds (`seed + i`) every sampler run shares.
pub struct EvalSetup<'a> {
    pub classifier: &'a Classifier,
    pub train: &'a Digits,
    pub val: &'a Digits,
    pub n: usize,
    pub seed: u64,
    pub guidance: Guidance,
}

impl EvalContext {
    pub fn new(setup: EvalSetup<'_>, device: &Device) -> Result<Self> {
        let EvalSetup { classifier, train, val, n, seed, guidance } = setup;
        let val_features = digit_features(classifier, val, val.len(), device)?;
        let floor_features = digit_features(classifier, train, n, device)?;
        let fd_floor = fd_of_features(&floor_features, &val_features)?;
        Ok(Self {
            labels: (0..n as u32).map(|i| i % 10).collect(),
            seeds: (0..n as u64).map(|i| seed.wrapping_add(i)).collect(),
            guidance,
            schedule: ScheduleSpec::Uniform,
            val_features,
            fd_floor,
            fd_autoencoder_floor: None,
            fd_autoencoder_sampled_floor: None,
            reference: None,
            with_reference: true,
            batch: 100,
        })
    }

    /// Set the FDs of `n` train digits round-tripped through the pipeline's autoencoder (decoding
    /// the posterior mean, and a posterior sample) against val; both stay None for a pixel model.
    pub fn measure_autoencoder_floor(
        &mut self,
        pipeline: &Pipeline,
        classifier: &Classifier,
        train: &Digits,
    ) -> Result<()> {
        let Some(autoencoder) = pipeline.autoencoder() else { return Ok(()) };
        let n = self.labels.len().min(train.len());
        let (mut from_mean, mut from_sample) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for start in (0..n).step_by(self.batch) {
            let idx: Vec<usize> = (start..(start + self.batch).min(n)).collect();
            let (x, _) = train.batch(&idx, pipeline.device())?;
            let posterior = autoencoder.encode(&x)?;
            let noise = crate::run::seeded_normal(self.seeds[0], start, 7, posterior.mean.dims(), pipeline.device())?;
            let sample = posterior.sample_with(&noise)?;
            from_mean.extend(features(classifier, &as_delivered(&autoencoder.decode(&posterior.mean)?)?)?.0);
            from_sample.extend(features(classifier, &as_delivered(&autoencoder.decode(&sample)?)?)?.0);
        }
        self.fd_autoencoder_floor = Some(fd_of_features(&from_mean, &self.val_features)?);
        self.fd_autoencoder_sampled_floor = Some(fd_of_features(&from_sample, &self.val_features)?);
        Ok(())
    }

    fn settings(&self, sampler: Sampler, steps: usize) -> SolveSettings {
        let schedule = if sampler.is_adaptive() { ScheduleSpec::Uniform } else { self.schedule.clone() };
        SolveSettings {
            sampler,
            steps,
            schedule,
            guidance: self.guidance.scale,
            guidance_interval: self.guidance.interval,
        }
    }

    /// Images per solve (the last one may be smaller).
    pub fn set_batch(&mut self, batch: usize) {
        self.batch = batch.max(1);
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Final states of `sampler` for all n images, with what they cost and seconds per image:
    /// the median over full batches after the first (a warm-up), so one batch slowed by
    /// something else on the machine does not move it.
    fn solve_all(&self, pipeline: &Pipeline, sampler: &Sampler, steps: usize) -> Result<Solved> {
        let (mut states, mut nfe) = (Vec::new(), 0usize);
        let mut other: std::collections::BTreeMap<String, f64> = Default::default();
        let mut flops = 0.0;
        let guided = self.guidance.scale != 1.0;
        let settings = self.settings(sampler.clone(), steps);
        let mut timed = Vec::new();
        for start in (0..self.labels.len()).step_by(self.batch) {
            let end = (start + self.batch).min(self.labels.len());
            let inputs =
                ImageInputs { labels: self.labels[start..end].to_vec(), seeds: self.seeds[start..end].to_vec() };
            let started = Instant::now();
            let (state, stats) = pipeline.sample_state(&settings, &inputs, &mut Unobserved)?;
            timed.push((started.elapsed().as_secs_f64(), end - start));
            stats.require_all()?;
            nfe += stats.per_sample_nfe.iter().sum::<usize>();
            // Batched evaluations: every image of the batch went through each of them.
            let images = (end - start) as f64;
            for (name, &count) in stats.evaluations.iter().filter(|(name, _)| name.as_str() != MAIN_NETWORK) {
                *other.entry(name.clone()).or_default() += count as f64 * images;
            }
            let counts = stats.evaluations.iter().map(|(name, &count)| (name.as_str(), count as f64));
            flops += pipeline.config().solve_flops(counts, guided) * images;
            states.push(state);
        }
        let full: Vec<(f64, usize)> = timed.iter().skip(1).copied().filter(|&(_, k)| k == self.batch).collect();
        let counted = if full.is_empty() { timed } else { full };
        let per_image: Vec<f64> = counted.iter().map(|&(t, k)| t / k.max(1) as f64).collect();
        let n = self.labels.len().max(1) as f64;
        other.values_mut().for_each(|v| *v /= n);
        Ok(Solved {
            state: Tensor::cat(&states, 0)?,
            nfe,
            other_per_image: other,
            gflops_per_image: flops / n / 1e9,
            seconds_per_image: median(per_image),
        })
    }

    /// Seconds per image of `sampler` solving one image at a time: one warm-up solve, then the
    /// median of `images` timed ones (the first images of the evaluation).
    pub fn seconds_per_image_alone(
        &self,
        pipeline: &Pipeline,
        sampler: &Sampler,
        steps: usize,
        images: usize,
    ) -> Result<f64> {
        let settings = self.settings(sampler.clone(), steps);
        let images = images.clamp(1, self.labels.len());
        let one = |i: usize| -> Result<()> {
            let inputs = ImageInputs { labels: vec![self.labels[i]], seeds: vec![self.seeds[i]] };
            pipeline.sample_state(&settings, &inputs, &mut Unobserved)?.1.require_all()?;
            Ok(())
        };
        one(0)?;
        let mut times = Vec::with_capacity(images);
        for i in 0..images {
            let started = Instant::now();
            one(i)?;
            times.push(started.elapsed().as_secs_f64());
        }
        Ok(median(times))
    }

    /// The tight Dormand-Prince solution from the same noise (computed once per context).
    pub fn reference(&mut self, pipeline: &Pipeline) -> Result<Tensor> {
        if let Some(Solved { state, .. }) = &self.reference {
            return Ok(state.clone());
        }
        let solved = self.solve_all(pipeline, &reference_sampler(), 0)?;
        let state = solved.state.clone();
        self.reference = Some(solved);
        Ok(state)
    }

    pub fn evaluate(
        &mut self,
        pipeline: &Pipeline,
        classifier: &Classifier,
        sampler: &Sampler,
        steps: usize,
        straightness: bool,
    ) -> Result<EvalResult> {
        // The reference sampler itself is solved once, not twice.
        let solved = match &self.reference {
            Some(solved) if *sampler == reference_sampler() => solved.clone(),
            _ => {
                let solved = self.solve_all(pipeline, sampler, steps)?;
                if *sampler == reference_sampler() {
                    self.reference = Some(solved.clone());
                }
                solved
            }
        };
        let state = &solved.state;
        let mut feats = Vec::with_capacity(self.labels.len());
        let mut correct = 0usize;
        for start in (0..self.labels.len()).step_by(self.batch) {
            let end = (start + self.batch).min(self.labels.len());
            let pixels = as_delivered(&pipeline.decode(&state.narrow(0, start, end - start)?)?)?;
            let (f, preds) = features(classifier, &pixels)?;
            correct += preds.iter().zip(&self.labels[start..end]).filter(|(p, l)| p == l).count();
            feats.extend(f);
        }
        let fd = fd_of_features(&feats, &self.val_features)?;
        let rmse = if self.with_reference {
            let reference = self.reference(pipeline)?;
            Some((state - &reference)?.sqr()?.mean_all()?.sqrt()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
        } else {
            None
        };
        let n = self.labels.len();
        Ok(EvalResult {
            model: pipeline.config().name.clone(),
            sampler: sampler.canonical(),
            steps: if sampler.is_adaptive() { 0 } else { steps },
            schedule: if sampler.is_adaptive() { "uniform".into() } else { self.schedule.canonical() },
            guidance: self.guidance.scale,
            guidance_interval: self.guidance.interval,
            n,
            seed: self.seeds.first().copied(),
            fd,
            fd_floor: self.fd_floor,
            fd_ratio: fd / self.fd_floor.max(1e-12),
            accuracy: correct as f64 / n as f64,
            rmse_vs_reference: rmse,
            nfe_per_image: solved.nfe as f64 / n as f64,
            other_evaluations_per_image: solved.other_per_image,
            gflops_per_image: solved.gflops_per_image,
            seconds_per_image: solved.seconds_per_image,
            straightness: if straightness { Some(self.straightness(pipeline, 64)?) } else { None },
            fd_autoencoder_floor: self.fd_autoencoder_floor,
            fd_autoencoder_sampled_floor: self.fd_autoencoder_sampled_floor,
        })
    }

    /// Mean over an Euler trajectory of ||u(x_s, s) - (x_1 - x_0)||^2 per dimension: 0 for a
    /// perfectly straight flow. Measured on the first `STRAIGHTNESS_IMAGES` images: a mean over
    /// that many trajectories is already stable, and 64 steps each would otherwise dominate eval.
    pub fn straightness(&self, pipeline: &Pipeline, steps: usize) -> Result<f64> {
        let images = self.labels.len().min(STRAIGHTNESS_IMAGES);
        let model = pipeline.velocity_model();
        let (c, h, w) = pipeline.config().state_shape();
        let mut total = 0.0;
        let mut count = 0usize;
        for start in (0..images).step_by(self.batch) {
            let end = (start + self.batch).min(images);
            let field = GuidedField::new(model, &self.labels[start..end], self.guidance.clone(), pipeline.device())?;
            let x0 = noise::batch(&self.seeds[start..end], &[c, h, w], pipeline.device())?;
            let mut x = x0.clone();
            let mut velocities = Vec::with_capacity(steps);
            for k in 0..steps {
                let s = k as f64 / steps as f64;
                let u = field.velocity(&x, &vec![s; end - start])?;
                x = (&x + (&u * (1.0 / steps as f64))?)?;
                velocities.push(u);
            }
            let chord = (&x - &x0)?;
            for u in velocities {
                total +=
                    (u - &chord)?.sqr()?.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? * (end - start) as f64;
            }
            count += (end - start) * steps;
        }
        Ok(total / count as f64)
    }
}

/// The middle value (the mean of the two middle ones for an even count); NaN when empty.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// How many trajectories `EvalContext::straightness` averages over.
pub const STRAIGHTNESS_IMAGES: usize = 256;

/// The Dormand-Prince settings of the RMSE reference (and of `eval --sampler dopri5`).
/// One sampler's final states for every image of an evaluation, and what they cost.
#[derive(Clone)]
struct Solved {
    state: Tensor,
    /// Main-network evaluations summed over images.
    nfe: usize,
    other_per_image: std::collections::BTreeMap<String, f64>,
    gflops_per_image: f64,
    seconds_per_image: f64,
}

pub fn reference_sampler() -> Sampler {
    Sampler::Dopri5(Dopri5Options { rtol: 1e-5, atol: 1e-5, max_nfe: 5000 })
}
