//! PixArt-α's training objective, as its IDDPM code computes it: epsilon prediction with
//! a learned-range variance trained through the variational bound.
//!
//! - Papers: [Denoising Diffusion Probabilistic Models](https://arxiv.org/abs/2006.11239),
//!   [Improved DDPM](https://arxiv.org/abs/2102.09672) (learned variance, the hybrid loss),
//!   [PixArt-α](https://arxiv.org/abs/2310.00426).
//! - Reference code: PixArt-alpha `diffusion/model/gaussian_diffusion.py`,
//!   `diffusion_utils.py`, `respace.py`, `diffusion/iddpm.py`
//!   (<https://github.com/PixArt-alpha/PixArt-alpha>), from OpenAI's improved-diffusion.
//!
//! The formulas are in `docs/train.md` ("Objective"). In short, for a batch with
//! timesteps `t` and the model output `[eps, v]` (`2C` channels):
//!
//! - `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise` ([`NoiseSchedule::q_sample`]);
//! - `mse = mean((noise - eps)^2)` over `C, H, W`;
//! - the model's variance interpolates, in log space, between the clipped posterior
//!   variance and `beta_t`: `log var = frac log(beta_t) + (1 - frac) log(beta~_t)`,
//!   `frac = (v + 1) / 2`;
//! - `vb` = `KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) / ln 2` per sample (mean over
//!   `C, H, W`), the decoder NLL at `t == 0`, computed on `eps` with its gradient stopped
//!   (IDDPM's `frozen_out`): the VB term trains only `v`;
//! - `loss = mse + vb` (`RescaledMse` scales `vb` by `T / 1000`; PixArt trains with `Mse`,
//!   and with `T = 1000` the two agree).
//!
//! Everything is per sample (`[B]`; the trainer averages) and built from candle ops, so
//! the gradient reaches the model output; no fused kernels are involved. The schedule is
//! kept in f64 and gathered per sample in the compute dtype, as IDDPM's
//! `_extract_into_tensor` does (`.float()`): in f32 the losses and gradients match
//! PixArt's to ~1e-7 relative (`tests/diffusion_math.rs`).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use tensorbake_train::diffusion::Objective;
//!
//! let dev = Device::Cpu;
//! let obj = Objective::pixart();
//! let x0 = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev)?;
//! let noise = x0.randn_like(0.0, 1.0)?;
//! let t = Tensor::new(&[0u32, 999], &dev)?;
//! let x_t = obj.schedule.q_sample(&x0, &t, &noise)?;
//! let out = Tensor::zeros((2, 8, 8, 8), DType::F32, &dev)?; // the model's [eps, v]
//! let losses = obj.training_losses(&out, &x0, &x_t, &t, &noise)?;
//! assert_eq!(losses.loss.dims(), &[2]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::schedulers::{BetaSchedule, SchedulerError, cumprod_alphas, linspace};

/// The DDPM forward process of a beta schedule and the IDDPM quantities derived from it,
/// in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f64>,
    log_betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    sqrt_alphas_cumprod: Vec<f64>,
    sqrt_one_minus_alphas_cumprod: Vec<f64>,
    sqrt_recip_alphas_cumprod: Vec<f64>,
    sqrt_recipm1_alphas_cumprod: Vec<f64>,
    posterior_variance: Vec<f64>,
    posterior_log_variance_clipped: Vec<f64>,
    posterior_mean_coef1: Vec<f64>,
    posterior_mean_coef2: Vec<f64>,
}

/// `q(x_{t-1} | x_t, x0)`: mean `[B, C, ...]`, variance and clipped log variance
/// `[B, 1, ...]`.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// `coef1_t x0 + coef2_t x_t`.
    pub mean: Tensor,
    /// `beta_t (1 - abar_{t-1}) / (1 - abar_t)`.
    pub variance: Tensor,
    /// Its log, with `t = 0` (variance 0) replaced by `t = 1`.
    pub log_variance_clipped: Tensor,
}

impl NoiseSchedule {
    /// From explicit betas.
    ///
    /// # Errors
    /// Fewer than 2 betas, or one outside `(0, 1]`.
    pub fn from_betas(betas: Vec<f64>) -> std::result::Result<Self, SchedulerError> {
        if betas.len() < 2 {
            return Err(SchedulerError::Invalid(format!(
                "{} betas; at least 2 are needed",
                betas.len()
            )));
        }
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b <= 1.0))
        {
            return Err(SchedulerError::Invalid(format!(
                "beta {i} is {b}; betas must lie in (0, 1]"
            )));
        }
        let ac = cumprod_alphas(&betas);
        let n = betas.len();
        let ac_prev: Vec<f64> = std::iter::once(1.0)
            .chain(ac[..n - 1].iter().copied())
            .collect();
        let posterior_variance: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - ac_prev[i]) / (1.0 - ac[i]))
            .collect();
        let posterior_log_variance_clipped =
            (0..n).map(|i| posterior_variance[i.max(1)].ln()).collect();
        Ok(Self {
            log_betas: betas.iter().map(|b| b.ln()).collect(),
            sqrt_alphas_cumprod: ac.iter().map(|a| a.sqrt()).collect(),
            sqrt_one_minus_alphas_cumprod: ac.iter().map(|a| (1.0 - a).sqrt()).collect(),
            sqrt_recip_alphas_cumprod: ac.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_alphas_cumprod: ac.iter().map(|a| (1.0 / a - 1.0).sqrt()).collect(),
            posterior_mean_coef1: (0..n)
                .map(|i| betas[i] * ac_prev[i].sqrt() / (1.0 - ac[i]))
                .collect(),
            posterior_mean_coef2: (0..n)
                .map(|i| (1.0 - ac_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i]))
                .collect(),
            posterior_variance,
            posterior_log_variance_clipped,
            alphas_cumprod: ac,
            betas,
        })
    }

    /// Betas `numpy.linspace(beta_start, beta_end, steps)`.
    ///
    /// # Errors
    /// As [`NoiseSchedule::from_betas`].
    pub fn linear(
        beta_start: f64,
        beta_end: f64,
        steps: usize,
    ) -> std::result::Result<Self, SchedulerError> {
        Self::from_betas(linspace(beta_start, beta_end, steps))
    }

    /// IDDPM's named `linear` schedule for `steps` steps: Ho et al.'s 1e-4..0.02 over
    /// 1000 steps, both bounds scaled by `1000 / steps`.
    ///
    /// # Errors
    /// `steps < 2`, or betas above 1 (fewer than 20 steps).
    pub fn iddpm_linear(steps: usize) -> std::result::Result<Self, SchedulerError> {
        let scale = 1000.0 / steps.max(1) as f64;
        Self::linear(scale * 0.0001, scale * 0.02, steps)
    }

    /// PixArt-α's: linear betas 1e-4..0.02 over 1000 steps.
    #[must_use]
    pub fn pixart() -> Self {
        Self::linear(0.0001, 0.02, 1000).unwrap_or_else(|_| unreachable!("a valid schedule"))
    }

    /// From the noise schedule of a diffusers scheduler config (`num_train_timesteps`,
    /// `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`), computed in f64 as
    /// IDDPM does (diffusers computes its betas in f32).
    ///
    /// # Errors
    /// As [`BetaSchedule::betas`].
    pub fn from_beta_schedule(cfg: &BetaSchedule) -> std::result::Result<Self, SchedulerError> {
        Self::from_betas(cfg.betas()?)
    }

    /// Training timesteps `T`.
    #[must_use]
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// `beta_t`.
    #[must_use]
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// `abar_t = prod_{s <= t} (1 - beta_s)`.
    #[must_use]
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// `beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)` (0 at `t = 0`).
    #[must_use]
    pub fn posterior_variance(&self) -> &[f64] {
        &self.posterior_variance
    }

    /// `log beta~_t` with `t = 0` taking `t = 1`'s value.
    #[must_use]
    pub fn posterior_log_variance_clipped(&self) -> &[f64] {
        &self.posterior_log_variance_clipped
    }

    /// The posterior mean's `x0` coefficient `beta_t sqrt(abar_{t-1}) / (1 - abar_t)`.
    #[must_use]
    pub fn posterior_mean_coef1(&self) -> &[f64] {
        &self.posterior_mean_coef1
    }

    /// The posterior mean's `x_t` coefficient
    /// `(1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t)`.
    #[must_use]
    pub fn posterior_mean_coef2(&self) -> &[f64] {
        &self.posterior_mean_coef2
    }

    /// `arr[t]` in `like`'s dtype and device, shaped `[B, 1, ...]` to broadcast against
    /// `like` (`[B, ...]`). `t` is an integer tensor `[B]`.
    fn gather(&self, arr: &[f64], t: &Tensor, like: &Tensor) -> Result<Tensor> {
        if !t.dtype().is_int() {
            candle_core::bail!("timesteps must be an integer tensor, got {:?}", t.dtype());
        }
        let b = t.dims1()?;
        let table = Tensor::from_slice(arr, arr.len(), like.device())?;
        let mut shape = vec![1; like.rank().max(1)];
        shape[0] = b;
        table
            .index_select(&t.to_device(like.device())?, 0)?
            .to_dtype(like.dtype())?
            .reshape(shape)
    }

    /// `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`.
    ///
    /// # Errors
    /// Shape mismatch, non-integer or out-of-range `t`.
    pub fn q_sample(&self, x_start: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let a = self.gather(&self.sqrt_alphas_cumprod, t, x_start)?;
        let s = self.gather(&self.sqrt_one_minus_alphas_cumprod, t, x_start)?;
        x_start.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
    }

    /// The posterior `q(x_{t-1} | x_t, x0)`.
    ///
    /// # Errors
    /// As [`NoiseSchedule::q_sample`].
    pub fn q_posterior(&self, x_start: &Tensor, x_t: &Tensor, t: &Tensor) -> Result<Posterior> {
        let c1 = self.gather(&self.posterior_mean_coef1, t, x_t)?;
        let c2 = self.gather(&self.posterior_mean_coef2, t, x_t)?;
        Ok(Posterior {
            mean: (x_start.broadcast_mul(&c1)? + x_t.broadcast_mul(&c2)?)?,
            variance: self.gather(&self.posterior_variance, t, x_t)?,
            log_variance_clipped: self.gather(&self.posterior_log_variance_clipped, t, x_t)?,
        })
    }

    /// `x0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps`.
    ///
    /// # Errors
    /// As [`NoiseSchedule::q_sample`].
    pub fn predict_xstart_from_eps(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        eps: &Tensor,
    ) -> Result<Tensor> {
        let a = self.gather(&self.sqrt_recip_alphas_cumprod, t, x_t)?;
        let b = self.gather(&self.sqrt_recipm1_alphas_cumprod, t, x_t)?;
        x_t.broadcast_mul(&a)? - eps.broadcast_mul(&b)?
    }

    /// The learned-range log variance: `frac log(beta_t) + (1 - frac) log(beta~_t)` with
    /// `frac = (v + 1) / 2` (`v` in `[-1, 1]` spans the two; it is not clamped).
    ///
    /// # Errors
    /// As [`NoiseSchedule::q_sample`].
    pub fn learned_range_log_variance(&self, v: &Tensor, t: &Tensor) -> Result<Tensor> {
        let min_log = self.gather(&self.posterior_log_variance_clipped, t, v)?;
        let max_log = self.gather(&self.log_betas, t, v)?;
        let frac = ((v + 1.0)? / 2.0)?;
        frac.broadcast_mul(&max_log)? + (1.0 - &frac)?.broadcast_mul(&min_log)?
    }

    /// `p(x_{t-1} | x_t)` of an epsilon prediction with a learned-range variance:
    /// `(mean, log_variance)`, no clipping of the predicted `x0` (IDDPM's
    /// `clip_denoised=False` in training).
    ///
    /// # Errors
    /// As [`NoiseSchedule::q_sample`].
    pub fn p_mean_log_variance(
        &self,
        eps: &Tensor,
        v: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let log_var = self.learned_range_log_variance(v, t)?;
        let x0 = self.predict_xstart_from_eps(x_t, t, eps)?;
        let mean = self.q_posterior(&x0, x_t, t)?.mean;
        Ok((mean, log_var))
    }
}

/// `KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))` elementwise, in nats;
/// arguments broadcast.
///
/// # Errors
/// Shapes that do not broadcast.
pub fn normal_kl(
    mean1: &Tensor,
    logvar1: &Tensor,
    mean2: &Tensor,
    logvar2: &Tensor,
) -> Result<Tensor> {
    // 0.5 * (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2))
    let a = (logvar2 - 1.0)?.broadcast_sub(logvar1)?;
    let a = a.broadcast_add(&logvar1.broadcast_sub(logvar2)?.exp()?)?;
    let sq = mean1.broadcast_sub(mean2)?.sqr()?;
    let b = sq.broadcast_mul(&logvar2.neg()?.exp()?)?;
    a.broadcast_add(&b)? * 0.5
}

/// The tanh approximation of the standard normal CDF:
/// `0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
///
/// # Errors
/// Tensor errors only.
pub fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let cube = (x.sqr()? * x)?;
    let inner = ((x + (cube * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
    (inner.tanh()? + 1.0)? * 0.5
}

/// `max(x, min)` with torch's `clamp(min=...)` gradient (1 where `x >= min`).
fn clamp_min(x: &Tensor, min: f64) -> Result<Tensor> {
    let floor = x.ones_like()?.affine(0.0, min)?;
    x.ge(min)?.where_cond(x, &floor)
}

/// The log-likelihood of `x` (data in `[-1, 1]` from 8-bit values) under a Gaussian
/// discretized to bins of width `2/255`, the outer bins open-ended; in nats, elementwise.
///
/// # Errors
/// Shapes differ.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Result<Tensor> {
    if x.dims() != means.dims() || x.dims() != log_scales.dims() {
        candle_core::bail!(
            "discretized_gaussian_log_likelihood: shapes {:?}, {:?}, {:?}",
            x.dims(),
            means.dims(),
            log_scales.dims()
        );
    }
    let centered = (x - means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    let cdf_plus = approx_standard_normal_cdf(&(&inv_stdv * (&centered + 1.0 / 255.0)?)?)?;
    let cdf_min = approx_standard_normal_cdf(&(&inv_stdv * (&centered - 1.0 / 255.0)?)?)?;
    let log_cdf_plus = clamp_min(&cdf_plus, 1e-12)?.log()?;
    let log_one_minus_cdf_min = clamp_min(&(1.0 - &cdf_min)?, 1e-12)?.log()?;
    let log_cdf_delta = clamp_min(&(&cdf_plus - &cdf_min)?, 1e-12)?.log()?;
    let upper = x
        .gt(0.999)?
        .where_cond(&log_one_minus_cdf_min, &log_cdf_delta)?;
    x.lt(-0.999)?.where_cond(&log_cdf_plus, &upper)
}

/// The mean over every axis but the first: `[B, ...]` -> `[B]`.
///
/// # Errors
/// A rank-0 tensor.
pub fn mean_flat(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(1)?.mean(1)
}

/// How the VB term is weighted (IDDPM's loss types with a learned variance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// `loss = mse + vb` (PixArt-α's: `IDDPM(..)` without `rescale_learned_sigmas`).
    #[default]
    Mse,
    /// `loss = mse + vb * T / 1000` (identical to `Mse` for `T = 1000`).
    RescaledMse,
}

/// What the model outputs besides epsilon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variance {
    /// `2C` channels: epsilon and the learned-range variance `v` (PixArt-α,
    /// `pred_sigma`/`learn_sigma`), trained by the VB term.
    #[default]
    LearnedRange,
    /// `C` channels, epsilon only, no VB term (as diffusers-based trainers do; the
    /// sampler's variance is fixed).
    EpsilonOnly,
}

/// The per-sample losses of a batch, each `[B]`.
#[derive(Debug, Clone)]
pub struct Losses {
    /// What to minimise: `mse + vb`, or `mse` alone for [`Variance::EpsilonOnly`].
    pub loss: Tensor,
    /// `mean((noise - eps)^2)`.
    pub mse: Tensor,
    /// The VB term in bits (`None` for [`Variance::EpsilonOnly`]).
    pub vb: Option<Tensor>,
}

/// A diffusion training objective: a noise schedule, the model's variance and the loss
/// weighting.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// The forward process.
    pub schedule: NoiseSchedule,
    /// What the model predicts besides epsilon.
    pub variance: Variance,
    /// How the VB term is weighted.
    pub loss_type: LossType,
}

impl Objective {
    /// PixArt-α's: the PixArt schedule, learned-range variance, loss type MSE.
    #[must_use]
    pub fn pixart() -> Self {
        Self {
            schedule: NoiseSchedule::pixart(),
            variance: Variance::LearnedRange,
            loss_type: LossType::Mse,
        }
    }

    /// Epsilon prediction alone (`C` output channels, MSE only) on `schedule`.
    #[must_use]
    pub fn epsilon_only(schedule: NoiseSchedule) -> Self {
        Self {
            schedule,
            variance: Variance::EpsilonOnly,
            loss_type: LossType::Mse,
        }
    }

    /// The model's output channels for latents of `latent_channels` (8 for PixArt's 4).
    #[must_use]
    pub fn output_channels(&self, latent_channels: usize) -> usize {
        match self.variance {
            Variance::LearnedRange => 2 * latent_channels,
            Variance::EpsilonOnly => latent_channels,
        }
    }

    /// IDDPM's `training_losses` for a model output `[B, 2C, H, W]` (or `[B, C, H, W]`
    /// epsilon only) at `x_t = q_sample(x_start, t, noise)`; `t` an integer tensor `[B]`.
    /// Per-sample losses `[B]`, differentiable in `model_output` (the VB term only
    /// through the variance half).
    ///
    /// # Errors
    /// Shapes that do not fit (the message gives them), non-integer `t`.
    pub fn training_losses(
        &self,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        noise: &Tensor,
    ) -> Result<Losses> {
        let dims = x_start.dims();
        if dims.len() < 2 || x_t.dims() != dims || noise.dims() != dims {
            candle_core::bail!(
                "training_losses: x_start {:?}, x_t {:?}, noise {:?} must be one [B, C, ...] shape",
                dims,
                x_t.dims(),
                noise.dims()
            );
        }
        let c = dims[1];
        let mut want = dims.to_vec();
        want[1] = self.output_channels(c);
        if model_output.dims() != want.as_slice() {
            candle_core::bail!(
                "training_losses: model output {:?}, expected {:?} ({:?} variance)",
                model_output.dims(),
                want,
                self.variance
            );
        }
        if t.dims() != [dims[0]] {
            candle_core::bail!(
                "training_losses: timesteps {:?} for a batch of {}",
                t.dims(),
                dims[0]
            );
        }
        let eps = model_output.narrow(1, 0, c)?;
        let mse = mean_flat(&(noise - &eps)?.sqr()?)?;
        match self.variance {
            Variance::EpsilonOnly => Ok(Losses {
                loss: mse.clone(),
                mse,
                vb: None,
            }),
            Variance::LearnedRange => {
                let v = model_output.narrow(1, c, c)?;
                let mut vb = self.vb_terms_bpd(&eps.detach(), &v, x_start, x_t, t)?;
                if self.loss_type == LossType::RescaledMse {
                    vb = (vb * (self.schedule.num_timesteps() as f64 / 1000.0))?;
                }
                Ok(Losses {
                    loss: (&mse + &vb)?,
                    mse,
                    vb: Some(vb),
                })
            }
        }
    }

    /// IDDPM's `_vb_terms_bpd` with `clip_denoised=False`: the KL term in bits per
    /// dimension, the decoder NLL where `t == 0`.
    ///
    /// # Errors
    /// As [`Objective::training_losses`].
    pub fn vb_terms_bpd(
        &self,
        eps: &Tensor,
        v: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        let s = &self.schedule;
        let q = s.q_posterior(x_start, x_t, t)?;
        let (mean, log_var) = s.p_mean_log_variance(eps, v, x_t, t)?;
        let ln2 = std::f64::consts::LN_2;
        let kl = (mean_flat(&normal_kl(
            &q.mean,
            &q.log_variance_clipped,
            &mean,
            &log_var,
        )?)? / ln2)?;
        let nll = discretized_gaussian_log_likelihood(x_start, &mean, &(&log_var * 0.5)?)?;
        let nll = (mean_flat(&nll.neg()?)? / ln2)?;
        let first = t.to_device(kl.device())?.eq(0.0)?;
        first.where_cond(&nll, &kl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn pixart_schedule_facts() {
        let s = NoiseSchedule::pixart();
        assert_eq!(s.num_timesteps(), 1000);
        assert_eq!(s.betas()[0], 1e-4);
        assert_eq!(s.betas()[999], 0.02);
        assert_eq!(s.posterior_variance()[0], 0.0);
        assert_eq!(
            s.posterior_log_variance_clipped()[0],
            s.posterior_log_variance_clipped()[1]
        );
        // t = 0: the posterior mean is x0 itself
        assert!((s.posterior_mean_coef1()[0] - 1.0).abs() < 1e-12);
        assert_eq!(s.posterior_mean_coef2()[0], 0.0);
        assert!(NoiseSchedule::iddpm_linear(10).is_err());
        assert!(NoiseSchedule::from_betas(vec![0.1, 0.0]).is_err());
    }

    #[test]
    fn eps_only_and_shape_errors() -> Result<()> {
        let dev = Device::Cpu;
        let obj = Objective::epsilon_only(NoiseSchedule::pixart());
        let x0 = Tensor::ones((2, 4, 2, 2), DType::F32, &dev)?;
        let noise = x0.zeros_like()?;
        let t = Tensor::new(&[5u32, 7], &dev)?;
        let x_t = obj.schedule.q_sample(&x0, &t, &noise)?;
        let out = x0.affine(3.0, 0.0)?;
        let l = obj.training_losses(&out, &x0, &x_t, &t, &noise)?;
        assert_eq!(l.loss.to_vec1::<f32>()?, vec![9.0, 9.0]);
        assert!(l.vb.is_none());
        let wide = Tensor::zeros((2, 8, 2, 2), DType::F32, &dev)?;
        let err = obj
            .training_losses(&wide, &x0, &x_t, &t, &noise)
            .unwrap_err();
        assert!(err.to_string().contains("expected [2, 4, 2, 2]"), "{err}");
        let tf = Tensor::new(&[5f32, 7.0], &dev)?;
        assert!(obj.schedule.q_sample(&x0, &tf, &noise).is_err());
        Ok(())
    }
}
