//! Flux's training objective: rectified-flow matching, as diffusers' Flux training
//! scripts (`examples/dreambooth/train_dreambooth_lora_flux.py`) and the SD3 paper
//! (Esser et al., <https://arxiv.org/abs/2403.03206>, section 3.1) do it.
//!
//! For clean latents `x0` and noise `n`: `x_t = (1 - t) x0 + t n`, the model predicts
//! the velocity and the loss is `mean((v - (n - x0))²)` per sample, then over the batch
//! (weighting 1, diffusers' `compute_loss_weighting_for_sd3` for these schemes).
//!
//! The sigma `t` is drawn in two steps:
//! 1. `u` by the weighting scheme (`compute_density_for_timestep_sampling`):
//!    `logit_normal` `u = sigmoid(N(logit_mean, logit_std))`, `uniform` `u ~ U(0, 1)`,
//!    `mode` `u = 1 - v - mode_scale (cos²(π v / 2) - 1 + v)` for `v ~ U(0, 1)`;
//! 2. shifted toward noise: by a fixed `shift` `s` (`s u / (1 + (s - 1) u)`, SD3), or by
//!    the image's size as Flux samples (`e^mu / (e^mu + 1/u - 1)`, `mu` from the number of
//!    packed image tokens by FluxPipeline's `calculate_shift`, 0.5 at 256 tokens to 1.15
//!    at 4096). diffusers' scripts then round `u` to the scheduler's 1000 timesteps;
//!    here it stays continuous.

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::noise::Noise;
use crate::schedulers::calculate_shift;

/// How `u` is drawn (diffusers' `weighting_scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightingScheme {
    /// `sigmoid(N(logit_mean, logit_std))` (SD3's choice, diffusers' default).
    #[default]
    LogitNormal,
    /// `U(0, 1)`.
    Uniform,
    /// Mode sampling with heavy tails (`mode_scale`).
    Mode,
}

/// The shift applied to `u`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shift {
    /// `s u / (1 + (s - 1) u)`.
    Fixed(f64),
    /// `e^mu / (e^mu + 1/u - 1)`.
    Mu(f64),
}

impl Shift {
    /// Flux's resolution-dependent shift for `image_tokens` packed latent tokens.
    #[must_use]
    pub fn for_tokens(image_tokens: usize) -> Self {
        Self::Mu(calculate_shift(image_tokens, 256, 4096, 0.5, 1.15))
    }

    /// The shifted sigma.
    #[must_use]
    pub fn apply(self, u: f64) -> f64 {
        match self {
            Self::Fixed(s) => s * u / (1.0 + (s - 1.0) * u),
            Self::Mu(mu) => {
                let e = mu.exp();
                e / (e + (1.0 / u - 1.0))
            }
        }
    }
}

/// The sigma sampler of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SigmaSampler {
    /// How `u` is drawn.
    pub scheme: WeightingScheme,
    /// `logit_normal` mean.
    pub logit_mean: f64,
    /// `logit_normal` standard deviation.
    pub logit_std: f64,
    /// `mode` scale.
    pub mode_scale: f64,
    /// The shift.
    pub shift: Shift,
}

impl SigmaSampler {
    /// `u` from the scheme's draws (a normal for `logit_normal`, a uniform in `(0, 1]`
    /// otherwise).
    #[must_use]
    pub fn u_of(&self, draw: f64) -> f64 {
        match self.scheme {
            WeightingScheme::LogitNormal => {
                let z = self.logit_mean + self.logit_std * draw;
                1.0 / (1.0 + (-z).exp())
            }
            WeightingScheme::Uniform => draw,
            WeightingScheme::Mode => {
                let c = (std::f64::consts::PI * draw / 2.0).cos();
                1.0 - draw - self.mode_scale * (c * c - 1.0 + draw)
            }
        }
    }

    /// `n` sigmas in `(0, 1)`, kept away from the ends by 1e-5 (a sigma of exactly 0 or
    /// 1 makes the shift's `1/u` blow up).
    pub fn sample(&self, noise: &mut Noise, n: usize) -> Vec<f64> {
        let draws = match self.scheme {
            WeightingScheme::LogitNormal => noise.normals(n),
            _ => noise.uniform(n),
        };
        draws
            .into_iter()
            .map(|d| self.shift.apply(self.u_of(d).clamp(1e-5, 1.0 - 1e-5)))
            .collect()
    }
}

/// `x_t = (1 - t) x0 + t n` for per-sample sigmas `t` `[B]` (f32) over `x0` `[B, ...]`.
///
/// # Errors
/// candle errors (shapes).
pub fn interpolate(x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
    let mut shape = vec![x0.dim(0)?];
    shape.extend(std::iter::repeat_n(1, x0.rank() - 1));
    let t = t.to_dtype(x0.dtype())?.reshape(shape)?;
    x0.broadcast_mul(&(1.0 - &t)?)? + noise.broadcast_mul(&t)?
}

/// The flow-matching loss per sample `[B]` (f32): `mean((pred - (noise - x0))²)` over
/// each sample's elements.
///
/// # Errors
/// candle errors (shapes).
pub fn loss_per_sample(pred: &Tensor, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let target = (noise - x0)?.to_dtype(DType::F32)?;
    let d = (pred.to_dtype(DType::F32)? - target)?;
    let b = d.dim(0)?;
    d.sqr()?.reshape((b, ()))?.mean(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shifts_and_schemes_follow_their_formulas() {
        // a fixed shift of 3 moves 0.5 to 0.75; mu = ln 3 is the same map
        assert!((Shift::Fixed(3.0).apply(0.5) - 0.75).abs() < 1e-12);
        assert!((Shift::Mu(3f64.ln()).apply(0.5) - 0.75).abs() < 1e-12);
        assert!((Shift::Fixed(1.0).apply(0.3) - 0.3).abs() < 1e-12);
        // Flux at 1024 px (4096 tokens) shifts by mu = 1.15, at 256 tokens by 0.5
        for (tokens, want) in [(4096, 1.15), (256, 0.5)] {
            let Shift::Mu(m) = Shift::for_tokens(tokens) else {
                panic!()
            };
            assert!((m - want).abs() < 1e-12, "{tokens}: {m}");
        }
        let s = SigmaSampler {
            scheme: WeightingScheme::LogitNormal,
            logit_mean: 0.0,
            logit_std: 1.0,
            mode_scale: 1.29,
            shift: Shift::Fixed(1.0),
        };
        assert!((s.u_of(0.0) - 0.5).abs() < 1e-12);
        assert!((s.u_of(1.0) - 1.0 / (1.0 + (-1f64).exp())).abs() < 1e-12);
        let mode = SigmaSampler {
            scheme: WeightingScheme::Mode,
            ..s
        };
        // mode sampling fixes the ends and the middle
        assert!(mode.u_of(1.0).abs() < 1e-12);
        assert!((mode.u_of(0.5) - 0.5).abs() < 1e-12);
        // the median of logit-normal sigmas shifted by 3 sits at 0.75
        let shifted = SigmaSampler {
            shift: Shift::Fixed(3.0),
            ..s
        };
        let mut v = shifted.sample(&mut Noise::new(4), 4001);
        v.sort_by(f64::total_cmp);
        assert!((v[2000] - 0.75).abs() < 0.03, "{}", v[2000]);
        assert!(v.iter().all(|&x| x > 0.0 && x < 1.0));
    }

    #[test]
    fn interpolation_and_loss_match_their_definitions() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev)?;
        let n = Tensor::new(&[[0.0f32, 0.0], [1.0, 1.0]], &dev)?;
        let t = Tensor::new(&[0.25f32, 1.0], &dev)?;
        let x = interpolate(&x0, &n, &t)?.to_vec2::<f32>()?;
        assert_eq!(x, [[0.75, 1.5], [1.0, 1.0]]);
        // target n - x0 = [[-1, -2], [-2, -3]]; a zero prediction costs its mean square
        let l = loss_per_sample(&x0.zeros_like()?, &x0, &n)?.to_vec1::<f32>()?;
        assert_eq!(l, [2.5, 6.5]);
        Ok(())
    }
}
