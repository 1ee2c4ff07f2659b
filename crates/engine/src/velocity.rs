//! The adapter between networks and samplers: maps the engine time s to the network's own
//! time, fixes the velocity sign, and applies classifier-free guidance in one batched forward.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::blockwise::Blockwise;
use crate::models::sit::Sit;
use crate::samplers::VelocityField;

/// How a network's own time and velocity relate to the engine frame (s = 0 noise, s = 1 data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TimeConvention {
    /// SiT, FlowTurbo, W-CFM and our own models: t = s, u = v.
    #[default]
    Sit,
    /// LFM and BFM (noise at t = 1): t = 1 - s, u = -v.
    Lfm,
    /// Rectified-Flow / BOSS checkpoints: t = 999 (s (1 - 1e-3) + 1e-3), u = v.
    RectifiedFlow999,
}

impl TimeConvention {
    pub fn network_time(self, s: f64) -> f64 {
        match self {
            TimeConvention::Sit => s,
            TimeConvention::Lfm => 1.0 - s,
            TimeConvention::RectifiedFlow999 => 999.0 * (s * (1.0 - 1e-3) + 1e-3),
        }
    }

    pub fn velocity_sign(self) -> f64 {
        match self {
            TimeConvention::Lfm => -1.0,
            TimeConvention::Sit | TimeConvention::RectifiedFlow999 => 1.0,
        }
    }
}

/// What a network may keep between the evaluations of one solve to make later ones cheaper
/// (blockwise FRA: the trunk's anchor features of the current segment). Opaque to samplers,
/// which only make one per solve and read how many evaluations reused it.
#[derive(Default)]
pub struct FeatureMemo {
    pub(crate) state: Option<Box<dyn std::any::Any + Send>>,
    /// Evaluations that reused the memo instead of running the full network.
    pub reused: usize,
}

/// A network that predicts velocity in its own convention: v = net(x, t, y).
pub trait VelocityModel: Send + Sync {
    fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor>;
    fn convention(&self) -> TimeConvention;

    /// Like `forward`, reusing and updating `memo` where the network can (the default cannot).
    fn forward_with_memo(&self, x: &Tensor, t: &Tensor, y: &Tensor, memo: &mut FeatureMemo) -> Result<Tensor> {
        let _ = memo;
        self.forward(x, t, y)
    }

    /// Whether `forward_with_memo` can reuse anything.
    fn reuses_features(&self) -> bool {
        false
    }
}

/// A SiT/DiT transformer together with the time convention its checkpoint was trained in.
pub struct SitVelocity {
    pub net: Sit,
    pub convention: TimeConvention,
}

impl VelocityModel for SitVelocity {
    fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(self.net.forward(x, t, y)?)
    }
    fn convention(&self) -> TimeConvention {
        self.convention
    }
}

/// A blockwise model: each row's segment follows from its own network time.
pub struct BlockwiseVelocity {
    pub net: Blockwise,
    pub convention: TimeConvention,
}

impl VelocityModel for BlockwiseVelocity {
    fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(self.net.forward(x, t, y)?)
    }
    fn convention(&self) -> TimeConvention {
        self.convention
    }
    fn forward_with_memo(&self, x: &Tensor, t: &Tensor, y: &Tensor, memo: &mut FeatureMemo) -> Result<Tensor> {
        crate::models::blockwise::forward_fra(&self.net, x, t, y, memo)
    }
    fn reuses_features(&self) -> bool {
        self.net.has_frn()
    }
}

/// Classifier-free guidance settings for one solve.
#[derive(Debug, Clone, PartialEq)]
pub struct Guidance {
    /// w in v = v_uncond + w (v_cond - v_uncond); 1 disables guidance.
    pub scale: f64,
    pub null_label: Option<u32>,
    /// Channels the guided mix applies to (None = all); others follow the conditional velocity.
    pub channels: Option<Vec<usize>>,
    /// Guidance only for s in [lo, hi].
    pub interval: (f64, f64),
}

impl Guidance {
    pub fn none() -> Self {
        Guidance { scale: 1.0, null_label: None, channels: None, interval: (0.0, 1.0) }
    }

    fn active_at(&self, s: f64) -> bool {
        self.scale != 1.0 && s >= self.interval.0 && s <= self.interval.1
    }
}

/// u(x, s) for a batch with fixed labels, as samplers see it.
pub struct GuidedField<'a> {
    model: &'a dyn VelocityModel,
    labels: Tensor,
    null_labels: Option<Tensor>,
    /// [labels; null labels], the doubled batch's labels, built once for every guided step.
    doubled_labels: Option<Tensor>,
    guidance: Guidance,
    /// The guided-channel mask, built at the first guided evaluation (it needs the state's
    /// channel count and dtype) and reused at every step after.
    mask: std::sync::OnceLock<Option<Tensor>>,
}

impl<'a> GuidedField<'a> {
    pub fn new(model: &'a dyn VelocityModel, labels: &[u32], guidance: Guidance, device: &Device) -> Result<Self> {
        if !guidance.scale.is_finite() {
            return Err(Error::invalid("guidance", "must be a finite number"));
        }
        let null_labels = if guidance.scale != 1.0 {
            let null = guidance.null_label.ok_or_else(|| {
                Error::invalid(
                    "guidance",
                    "this model has no null label (trained without label dropout); use guidance 1",
                )
            })?;
            Some(Tensor::from_vec(vec![null; labels.len()], labels.len(), device)?)
        } else {
            None
        };
        let labels = Tensor::from_vec(labels.to_vec(), labels.len(), device)?;
        let doubled_labels = null_labels.as_ref().map(|null| Tensor::cat(&[&labels, null], 0)).transpose()?;
        Ok(Self { model, labels, null_labels, doubled_labels, guidance, mask: std::sync::OnceLock::new() })
    }

    /// Network times, kept in f32 whatever the model dtype (bf16 would round them coarsely).
    fn times(&self, s: &[f64], device: &Device) -> Result<Tensor> {
        let conv = self.model.convention();
        let t: Vec<f32> = s.iter().map(|&si| conv.network_time(si) as f32).collect();
        Ok(Tensor::from_vec(t, s.len(), device)?)
    }

    /// (1, C, 1, 1) 0/1 mask of the guided channels of velocity `v`; None when all are guided.
    fn channel_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if let Some(mask) = self.mask.get() {
            return Ok(mask.clone());
        }
        let mask = self.build_channel_mask(x)?;
        let _ = self.mask.set(mask.clone());
        Ok(mask)
    }

    fn build_channel_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let channels = x.dim(1)?;
        let Some(list) = &self.guidance.channels else { return Ok(None) };
        let mut mask = vec![0f32; channels];
        for &c in list {
            if c >= channels {
                return Err(Error::invalid("guidance channels", format!("{c} is not below {channels}")));
            }
            mask[c] = 1.0;
        }
        if mask.iter().all(|&m| m == 1.0) {
            return Ok(None);
        }
        let mut shape = vec![1, channels];
        shape.extend(std::iter::repeat_n(1, x.rank() - 2));
        Ok(Some(Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?))
    }
}

impl VelocityField for GuidedField<'_> {
    fn velocity(&self, x: &Tensor, s: &[f64]) -> Result<Tensor> {
        Ok(self.guided(x, None, s, self.own_labels(), false)?.0)
    }

    fn velocity_of_rows(&self, x: &Tensor, s: &[f64], rows: &[usize]) -> Result<Tensor> {
        if rows.len() == self.labels.dim(0)? {
            return self.velocity(x, s);
        }
        let index = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), x.device())?;
        let labels = self.labels.index_select(&index, 0)?;
        let null = self.null_labels.as_ref().map(|n| n.index_select(&index, 0)).transpose()?;
        Ok(self.guided(x, None, s, Labels { cond: &labels, null: null.as_ref(), doubled: None }, false)?.0)
    }

    fn velocity_paths(&self, x: &Tensor, x_uncond: Option<&Tensor>, s: &[f64]) -> Result<(Tensor, Option<Tensor>)> {
        self.guided(x, x_uncond, s, self.own_labels(), true)
    }

    fn velocity_with_memo(&self, x: &Tensor, s: &[f64], memo: &mut FeatureMemo) -> Result<Tensor> {
        let labels = self.own_labels();
        let mut forward = |x: &Tensor, t: &Tensor, y: &Tensor| self.model.forward_with_memo(x, t, y, memo);
        Ok(self.guided_by(&mut forward, x, None, s, labels, false)?.0)
    }

    fn reuses_features(&self) -> bool {
        self.model.reuses_features()
    }
}

/// One forward of the wrapped network: (x, network time, labels) -> output.
type Forward<'f> = dyn FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'f;

/// The labels of one evaluation: conditional, null, and both stacked when already built.
#[derive(Clone, Copy)]
struct Labels<'t> {
    cond: &'t Tensor,
    null: Option<&'t Tensor>,
    doubled: Option<&'t Tensor>,
}

impl GuidedField<'_> {
    /// The labels the field was built with (conditional, null and the doubled batch).
    fn own_labels(&self) -> Labels<'_> {
        Labels { cond: &self.labels, null: self.null_labels.as_ref(), doubled: self.doubled_labels.as_ref() }
    }

    /// The guided velocity at `x` and, when only some channels are guided, the unconditional
    /// pass's path: guided channels as guided, the others from the unconditional output (at
    /// `x_uncond` when given), as the doubled batch of SiT's `forward_with_cfg` carries it.
    fn guided(
        &self,
        x: &Tensor,
        x_uncond: Option<&Tensor>,
        s: &[f64],
        labels: Labels,
        want_path: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut forward = |x: &Tensor, t: &Tensor, y: &Tensor| self.model.forward(x, t, y);
        self.guided_by(&mut forward, x, x_uncond, s, labels, want_path)
    }

    /// `guided` with the network's forward given (plain, or reusing a solve's memo).
    fn guided_by(
        &self,
        forward: &mut Forward,
        x: &Tensor,
        x_uncond: Option<&Tensor>,
        s: &[f64],
        labels: Labels,
        want_path: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let b = x.dim(0)?;
        if s.len() != b || labels.cond.dim(0)? != b {
            return Err(Error::invalid(
                "batch",
                format!("{} labels and {} times for a batch of {b}", labels.cond.dim(0)?, s.len()),
            ));
        }
        let weights: Vec<f64> =
            s.iter().map(|&si| if self.guidance.active_at(si) { self.guidance.scale } else { 1.0 }).collect();
        let sign = self.model.convention().velocity_sign();
        let (v, uncond_path) = match labels.null {
            Some(null) if weights.iter().any(|&w| w != 1.0) => {
                // Conditional and unconditional halves in one forward.
                let xx = Tensor::cat(&[x, x_uncond.unwrap_or(x)], 0)?;
                let doubled_s: Vec<f64> = s.iter().chain(s).copied().collect();
                let tt = self.times(&doubled_s, x.device())?;
                let yy = match labels.doubled {
                    Some(yy) => yy.clone(),
                    None => Tensor::cat(&[labels.cond, null], 0)?,
                };
                let out = forward(&xx, &tt, &yy)?;
                let cond = out.narrow(0, 0, b)?;
                // Masked by the output's channels: a refiner takes 2C channels and returns C.
                let mask = self.channel_mask(&cond)?;
                if mask.is_none() || !want_path {
                    // One pass over the doubled batch, sign included.
                    let composed = || self.mix(&out, b, &weights, mask.as_ref(), sign);
                    let guided = crate::samplers::fused::guidance_mix(&out, &weights, mask.as_ref(), sign, composed)?;
                    return Ok((guided, None));
                }
                let uncond = out.narrow(0, b, b)?;
                let mask = mask.ok_or_else(|| Error::Solver("guidance mask vanished".into()))?;
                let delta = self.mix_delta(&cond, &uncond, &weights)?;
                let guided = (cond + delta.broadcast_mul(&mask)?)?;
                let unguided = mask.affine(-1.0, 1.0)?;
                let path = (guided.broadcast_mul(&mask)? + uncond.broadcast_mul(&unguided)?)?;
                (guided, Some(path))
            }
            _ => {
                let t = self.times(s, x.device())?;
                (forward(x, &t, labels.cond)?, None)
            }
        };
        let signed = |v: Tensor| -> Result<Tensor> { Ok(if sign < 0.0 { v.neg()? } else { v }) };
        Ok((signed(v)?, uncond_path.map(signed).transpose()?))
    }
}

impl GuidedField<'_> {
    /// (w_i - 1) (cond - uncond) with one weight per row.
    fn mix_delta(&self, cond: &Tensor, uncond: &Tensor, weights: &[f64]) -> Result<Tensor> {
        let mut shape = vec![weights.len()];
        shape.extend(std::iter::repeat_n(1, cond.rank() - 1));
        let w: Vec<f32> = weights.iter().map(|&w| (w - 1.0) as f32).collect();
        let w = Tensor::from_vec(w, shape, cond.device())?.to_dtype(cond.dtype())?;
        Ok((cond - uncond)?.broadcast_mul(&w)?)
    }

    /// The guidance mix with candle's ops (devices and dtypes the fused pass does not cover).
    fn mix(&self, out: &Tensor, b: usize, weights: &[f64], mask: Option<&Tensor>, sign: f64) -> Result<Tensor> {
        let (cond, uncond) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
        let mut delta = self.mix_delta(&cond, &uncond, weights)?;
        if let Some(mask) = mask {
            delta = delta.broadcast_mul(mask)?;
        }
        let guided = (cond + delta)?;
        Ok(if sign < 0.0 { guided.neg()? } else { guided })
    }
}
