//! DDIM (diffusers' `DDIMScheduler`, deterministic: `eta = 0`).
//!
//! - Paper: [Denoising Diffusion Implicit Models](https://arxiv.org/abs/2010.02502)
//! - Reference: diffusers `schedulers/scheduling_ddim.py` (0.42.1).
//!
//! `x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps`, with `x0` and `eps` from the
//! model output, `prev = t - T / n` (whatever the spacing, as diffusers), and
//! `abar_prev = 1` (`set_alpha_to_one`) or `abar_0` before the first training step.

use candle_core::{Result as CandleResult, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    BetaSchedule, Scheduler, SchedulerError, check_spacing, compute_dtype, lincomb, linspace,
    np_round, parse,
};

const fn yes() -> bool {
    true
}
fn epsilon() -> String {
    "epsilon".into()
}
const fn one() -> f64 {
    1.0
}
const fn ratio() -> f64 {
    0.995
}
fn leading() -> String {
    "leading".into()
}

/// diffusers' `DDIMScheduler` config; defaults are diffusers' (note `clip_sample: true`
/// and `leading` spacing, as diffusers has them: a PixArt DPM-Solver config read as DDIM
/// gets those too, exactly as `DDIMScheduler.from_config` does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdimConfig {
    /// The noise schedule.
    #[serde(flatten)]
    pub betas: BetaSchedule,
    /// Clamp the predicted `x0` to `[-clip_sample_range, clip_sample_range]`.
    #[serde(default = "yes")]
    pub clip_sample: bool,
    /// `abar_prev = 1` before the first training step (else `abar_0`).
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    /// Added to the `leading` timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// `epsilon`, `sample` or `v_prediction`.
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    /// Only `false`.
    #[serde(default)]
    pub thresholding: bool,
    /// Unused (thresholding).
    #[serde(default = "ratio")]
    pub dynamic_thresholding_ratio: f64,
    /// The `clip_sample` bound.
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    /// Unused (thresholding).
    #[serde(default = "one")]
    pub sample_max_value: f64,
    /// `linspace`, `leading` or `trailing`.
    #[serde(default = "leading")]
    pub timestep_spacing: String,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            betas: BetaSchedule::default(),
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: epsilon(),
            thresholding: false,
            dynamic_thresholding_ratio: ratio(),
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: leading(),
        }
    }
}

impl DdimConfig {
    /// DDIM for PixArt-α latents: PixArt's schedule (linear betas 1e-4..0.02 over 1000
    /// steps), no clipping (latents are not in [-1, 1]), otherwise diffusers' defaults.
    #[must_use]
    pub fn pixart() -> Self {
        Self {
            clip_sample: false,
            ..Self::default()
        }
    }

    /// Reads a diffusers `scheduler_config.json` (unknown keys ignored).
    ///
    /// # Errors
    /// Not JSON of this config's shape.
    pub fn from_json(json: &str) -> Result<Self, SchedulerError> {
        parse("DDIMScheduler", json)
    }

    /// Checks the config and builds the scheduler.
    ///
    /// # Errors
    /// A value this implementation does not support, naming the key.
    pub fn build(&self) -> Result<Ddim, SchedulerError> {
        Ddim::new(self.clone())
    }
}

/// diffusers' `DDIMScheduler` with `eta = 0`.
#[derive(Debug, Clone)]
pub struct Ddim {
    cfg: DdimConfig,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
}

impl Ddim {
    /// Builds the scheduler (no timesteps yet: call [`Ddim::set_timesteps`]).
    ///
    /// # Errors
    /// An unsupported config value, naming the key.
    pub fn new(cfg: DdimConfig) -> Result<Self, SchedulerError> {
        if cfg.thresholding {
            return Err(SchedulerError::Unsupported {
                key: "thresholding",
                value: "true".into(),
                why: "only false",
            });
        }
        if !matches!(
            cfg.prediction_type.as_str(),
            "epsilon" | "sample" | "v_prediction"
        ) {
            return Err(SchedulerError::Unsupported {
                key: "prediction_type",
                value: format!("{:?}", cfg.prediction_type),
                why: "epsilon, sample or v_prediction are",
            });
        }
        check_spacing(&cfg.timestep_spacing)?;
        let alphas_cumprod = cfg.betas.diffusers_alphas_cumprod()?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            cfg,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            num_inference_steps: 0,
        })
    }

    /// The config in use.
    #[must_use]
    pub fn config(&self) -> &DdimConfig {
        &self.cfg
    }

    /// Sets `n` inference steps (diffusers' `set_timesteps(n)`).
    ///
    /// # Errors
    /// `n` is 0 or more than the training timesteps.
    pub fn set_timesteps(&mut self, n: usize) -> Result<(), SchedulerError> {
        let t_train = self.alphas_cumprod.len();
        if n == 0 || n > t_train {
            return Err(SchedulerError::BadTimesteps(format!(
                "{n} inference steps; 1 to {t_train} are possible"
            )));
        }
        let ts: Vec<i64> = match self.cfg.timestep_spacing.as_str() {
            "linspace" => linspace(0.0, t_train as f64 - 1.0, n)
                .into_iter()
                .rev()
                .map(|x| np_round(x) as i64)
                .collect(),
            "leading" => {
                let ratio = t_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + self.cfg.steps_offset) as i64)
                    .collect()
            }
            _ => {
                // np.round(np.arange(T, 0, -T / n)) - 1
                let ratio = t_train as f64 / n as f64;
                let count = (t_train as f64 / ratio).ceil() as usize;
                (0..count)
                    .map(|i| np_round(t_train as f64 - i as f64 * ratio) as i64 - 1)
                    .collect()
            }
        };
        if let Some(bad) = ts.iter().find(|&&t| t < 0 || t as usize >= t_train) {
            return Err(SchedulerError::BadTimesteps(format!(
                "timestep {bad} outside [0, {t_train}) (steps_offset {})",
                self.cfg.steps_offset
            )));
        }
        self.timesteps = ts.iter().map(|&t| t as f64).collect();
        self.num_inference_steps = n;
        Ok(())
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> CandleResult<Tensor> {
        if self.num_inference_steps == 0 {
            candle_core::bail!("Ddim::step before set_timesteps");
        }
        let t_train = self.alphas_cumprod.len();
        if timestep < 0.0 || timestep.fract() != 0.0 || timestep as usize >= t_train {
            candle_core::bail!("Ddim::step: timestep {timestep} is not one of [0, {t_train})");
        }
        let t = timestep as usize;
        let prev = t as i64 - (t_train / self.num_inference_steps) as i64;
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let dtype = compute_dtype(sample);
        let x = sample.to_dtype(dtype)?;
        let m = model_output.to_dtype(dtype)?;
        let (mut x0, eps) = match self.cfg.prediction_type.as_str() {
            "epsilon" => (
                lincomb(1.0 / a_t.sqrt(), &x, -b_t.sqrt() / a_t.sqrt(), &m)?,
                m.clone(),
            ),
            "sample" => (
                m.clone(),
                lincomb(1.0 / b_t.sqrt(), &x, -a_t.sqrt() / b_t.sqrt(), &m)?,
            ),
            _ => (
                lincomb(a_t.sqrt(), &x, -b_t.sqrt(), &m)?,
                lincomb(a_t.sqrt(), &m, b_t.sqrt(), &x)?,
            ),
        };
        if self.cfg.clip_sample {
            let r = self.cfg.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        lincomb(a_prev.sqrt(), &x0, (1.0 - a_prev).sqrt(), &eps)?.to_dtype(model_output.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_are_diffusers() {
        let mut s = DdimConfig::pixart().build().unwrap();
        s.set_timesteps(50).unwrap();
        assert_eq!(s.timesteps()[..3], [980.0, 960.0, 940.0]);
        assert_eq!(*s.timesteps().last().unwrap(), 0.0);
        let mut s = DdimConfig {
            steps_offset: 1,
            ..DdimConfig::pixart()
        }
        .build()
        .unwrap();
        s.set_timesteps(50).unwrap();
        assert_eq!(s.timesteps()[0], 981.0);
        let mut s = DdimConfig {
            timestep_spacing: "trailing".into(),
            ..DdimConfig::pixart()
        }
        .build()
        .unwrap();
        s.set_timesteps(3).unwrap();
        // np.round(np.arange(1000, 0, -333.33)) - 1
        assert_eq!(s.timesteps(), &[999.0, 666.0, 332.0]);
        let mut s = DdimConfig {
            timestep_spacing: "linspace".into(),
            ..DdimConfig::pixart()
        }
        .build()
        .unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
        assert!(s.set_timesteps(1001).is_err());
    }
}
