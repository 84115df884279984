//! Flow-match Euler (diffusers' `FlowMatchEulerDiscreteScheduler`), Flux's sampler.
//!
//! - Papers: [Flow Matching for Generative Modeling](https://arxiv.org/abs/2210.02747),
//!   [Scaling Rectified Flow Transformers (SD3)](https://arxiv.org/abs/2403.03206) for the
//!   shift.
//! - Reference: diffusers `schedulers/scheduling_flow_match_euler_discrete.py` and
//!   `pipelines/flux/pipeline_flux.py` (`calculate_shift`, the sigmas it passes), 0.42.1.
//!
//! `x_t = (1 - sigma) x0 + sigma noise`; the model predicts the velocity
//! `noise - x0`, and each step is `x += (sigma_next - sigma) v`. The sigmas are shifted
//! toward noise: statically, `shift s / (1 + (shift - 1) s)`, or (Flux) by
//! `exp(mu) / (exp(mu) + (1 / s - 1))` with `mu` growing linearly with the number of
//! image tokens ([`calculate_shift`]).

use candle_core::{Result as CandleResult, Tensor};
use serde::{Deserialize, Serialize};

use super::{Scheduler, SchedulerError, compute_dtype, linspace, parse};

const fn thousand() -> usize {
    1000
}
const fn one() -> f64 {
    1.0
}
const fn base_shift() -> Option<f64> {
    Some(0.5)
}
const fn max_shift() -> Option<f64> {
    Some(1.15)
}
const fn base_seq() -> usize {
    256
}
const fn max_seq() -> usize {
    4096
}
fn exponential() -> String {
    "exponential".into()
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` config; defaults are diffusers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowMatchEulerDiscreteConfig {
    /// Training timesteps `T` (timesteps are `sigma * T`).
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    /// The static shift (used when `use_dynamic_shifting` is off).
    #[serde(default = "one")]
    pub shift: f64,
    /// Shift by `mu` given to `set_timesteps` (Flux).
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` tokens ([`calculate_shift`]).
    #[serde(default = "base_shift")]
    pub base_shift: Option<f64>,
    /// `mu` at `max_image_seq_len` tokens.
    #[serde(default = "max_shift")]
    pub max_shift: Option<f64>,
    /// Token count of `base_shift`.
    #[serde(default = "base_seq")]
    pub base_image_seq_len: usize,
    /// Token count of `max_shift`.
    #[serde(default = "max_seq")]
    pub max_image_seq_len: usize,
    /// Only `false`.
    #[serde(default)]
    pub invert_sigmas: bool,
    /// Stretch the shifted sigmas so the last one is this.
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    /// Only `false`.
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Only `false`.
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// Only `false`.
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// `exponential` (`exp(mu) / (exp(mu) + (1/s - 1))`) or `linear`
    /// (`mu / (mu + (1/s - 1))`).
    #[serde(default = "exponential")]
    pub time_shift_type: String,
    /// Only `false`.
    #[serde(default)]
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: base_shift(),
            max_shift: max_shift(),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: exponential(),
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchEulerDiscreteConfig {
    /// FLUX.1-dev's `scheduler/scheduler_config.json`: `shift` 3.0 (unused), dynamic
    /// shifting from `mu` 0.5 at 256 tokens to 1.15 at 4096 (FLUX.1-schnell ships
    /// `shift` 1.0 without dynamic shifting: [`FlowMatchEulerDiscreteConfig::default`]).
    #[must_use]
    pub fn flux_dev() -> Self {
        Self {
            shift: 3.0,
            use_dynamic_shifting: true,
            ..Self::default()
        }
    }

    /// Reads a diffusers `scheduler_config.json` (unknown keys ignored).
    ///
    /// # Errors
    /// Not JSON of this config's shape.
    pub fn from_json(json: &str) -> Result<Self, SchedulerError> {
        parse("FlowMatchEulerDiscreteScheduler", json)
    }

    /// Checks the config and builds the scheduler.
    ///
    /// # Errors
    /// A value this implementation does not support, naming the key.
    pub fn build(&self) -> Result<FlowMatchEulerDiscrete, SchedulerError> {
        FlowMatchEulerDiscrete::new(self.clone())
    }

    /// FluxPipeline's `mu` for `image_seq_len` packed latent tokens (`(H/16) * (W/16)`
    /// for an `H x W` image), from this config's `base_*` / `max_*` values.
    #[must_use]
    pub fn mu_for(&self, image_seq_len: usize) -> f64 {
        calculate_shift(
            image_seq_len,
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift.unwrap_or(0.5),
            self.max_shift.unwrap_or(1.15),
        )
    }
}

/// FluxPipeline's `calculate_shift`: `mu` linear in the image's token count, `base_shift`
/// at `base_seq_len` tokens and `max_shift` at `max_seq_len`.
#[must_use]
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` (deterministic).
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscrete {
    cfg: FlowMatchEulerDiscreteConfig,
    sigma_min: f64,
    sigma_max: f64,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: Option<usize>,
}

impl FlowMatchEulerDiscrete {
    /// Builds the scheduler (no timesteps yet: call `set_timesteps`).
    ///
    /// # Errors
    /// An unsupported config value, naming the key.
    pub fn new(cfg: FlowMatchEulerDiscreteConfig) -> Result<Self, SchedulerError> {
        for (key, on) in [
            ("invert_sigmas", cfg.invert_sigmas),
            ("use_karras_sigmas", cfg.use_karras_sigmas),
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("stochastic_sampling", cfg.stochastic_sampling),
        ] {
            if on {
                return Err(SchedulerError::Unsupported {
                    key,
                    value: "true".into(),
                    why: "only false",
                });
            }
        }
        if !matches!(cfg.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(SchedulerError::Unsupported {
                key: "time_shift_type",
                value: format!("{:?}", cfg.time_shift_type),
                why: "exponential or linear",
            });
        }
        let t = cfg.num_train_timesteps;
        if t < 2 {
            return Err(SchedulerError::Invalid(format!(
                "num_train_timesteps {t}; at least 2 are needed"
            )));
        }
        // sigmas = linspace(1, T, T)[::-1] / T, statically shifted
        let static_shift = |s: f64| {
            if cfg.use_dynamic_shifting {
                s
            } else {
                cfg.shift * s / (1.0 + (cfg.shift - 1.0) * s)
            }
        };
        let sigma_max = static_shift(1.0);
        let sigma_min = static_shift(1.0 / t as f64);
        Ok(Self {
            cfg,
            sigma_min,
            sigma_max,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
        })
    }

    /// The config in use.
    #[must_use]
    pub fn config(&self) -> &FlowMatchEulerDiscreteConfig {
        &self.cfg
    }

    /// The sigmas of the current timesteps, with the final 0 appended.
    #[must_use]
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// diffusers' `set_timesteps(n, mu=mu)` without explicit sigmas: timesteps evenly
    /// spaced from `sigma_max * T` to `sigma_min * T`, then shifted. `mu` is required
    /// with `use_dynamic_shifting` and ignored otherwise.
    ///
    /// # Errors
    /// `n == 0`; `mu` missing under dynamic shifting.
    pub fn set_timesteps(&mut self, n: usize, mu: Option<f64>) -> Result<(), SchedulerError> {
        if n == 0 {
            return Err(SchedulerError::BadTimesteps("0 inference steps".into()));
        }
        let t = self.cfg.num_train_timesteps as f64;
        let sigmas: Vec<f64> = linspace(self.sigma_max * t, self.sigma_min * t, n)
            .into_iter()
            .map(|x| x / t)
            .collect();
        self.set_sigmas(&sigmas, mu)
    }

    /// diffusers' `set_timesteps(sigmas=sigmas, mu=mu)`: the given (unshifted) sigmas,
    /// shifted as configured.
    ///
    /// # Errors
    /// No sigmas; `mu` missing under dynamic shifting.
    pub fn set_sigmas(&mut self, sigmas: &[f64], mu: Option<f64>) -> Result<(), SchedulerError> {
        if sigmas.is_empty() {
            return Err(SchedulerError::BadTimesteps("no sigmas".into()));
        }
        let mut s: Vec<f64> = if self.cfg.use_dynamic_shifting {
            let Some(mu) = mu else {
                return Err(SchedulerError::BadTimesteps(
                    "`mu` is required when `use_dynamic_shifting` is set".into(),
                ));
            };
            let linear = self.cfg.time_shift_type == "linear";
            sigmas
                .iter()
                .map(|&x| {
                    let r = 1.0 / x - 1.0;
                    if linear {
                        mu / (mu + r)
                    } else {
                        mu.exp() / (mu.exp() + r)
                    }
                })
                .collect()
        } else {
            let k = self.cfg.shift;
            sigmas
                .iter()
                .map(|&x| k * x / (1.0 + (k - 1.0) * x))
                .collect()
        };
        if let Some(terminal) = self.cfg.shift_terminal.filter(|v| *v != 0.0) {
            let last = 1.0 - s[s.len() - 1];
            let scale = last / (1.0 - terminal);
            for x in &mut s {
                *x = 1.0 - (1.0 - *x) / scale;
            }
        }
        let t = self.cfg.num_train_timesteps as f64;
        self.timesteps = s.iter().map(|x| x * t).collect();
        s.push(0.0);
        self.sigmas = s;
        self.step_index = None;
        Ok(())
    }

    /// What FluxPipeline does for `n` steps at `image_seq_len` packed tokens: sigmas
    /// `linspace(1, 1/n, n)` and `mu = calculate_shift(image_seq_len, ...)` from this
    /// config.
    ///
    /// # Errors
    /// `n == 0`.
    pub fn set_timesteps_flux(
        &mut self,
        n: usize,
        image_seq_len: usize,
    ) -> Result<(), SchedulerError> {
        if n == 0 {
            return Err(SchedulerError::BadTimesteps("0 inference steps".into()));
        }
        let sigmas = linspace(1.0, 1.0 / n as f64, n);
        let mu = self.cfg.mu_for(image_seq_len);
        self.set_sigmas(&sigmas, Some(mu))
    }
}

impl Scheduler for FlowMatchEulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> CandleResult<Tensor> {
        if self.timesteps.is_empty() {
            candle_core::bail!("FlowMatchEulerDiscrete::step before set_timesteps");
        }
        let i = match self.step_index {
            Some(i) => i,
            None => {
                let hits: Vec<usize> = self
                    .timesteps
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| **x == timestep)
                    .map(|(i, _)| i)
                    .collect();
                match hits.len() {
                    0 => candle_core::bail!(
                        "FlowMatchEulerDiscrete::step: timestep {timestep} is not in the schedule"
                    ),
                    1 => hits[0],
                    _ => hits[1],
                }
            }
        };
        if i >= self.timesteps.len() {
            candle_core::bail!("FlowMatchEulerDiscrete::step: all steps are taken");
        }
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        let dtype = compute_dtype(sample);
        let prev = (sample.to_dtype(dtype)? + model_output.to_dtype(dtype)?.affine(dt, 0.0)?)?;
        self.step_index = Some(i + 1);
        prev.to_dtype(model_output.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_shift_and_sigmas() {
        let c = FlowMatchEulerDiscreteConfig::flux_dev();
        // 1024 px: 128x128 latents packed 2x2 -> 4096 tokens; 256 px -> 256 tokens
        assert!((c.mu_for(4096) - 1.15).abs() < 1e-12);
        assert!((c.mu_for(256) - 0.5).abs() < 1e-12);
        let mut s = c.build().unwrap();
        assert!(s.set_timesteps(28, None).is_err());
        s.set_timesteps_flux(28, 1024).unwrap();
        assert_eq!(s.timesteps().len(), 28);
        assert!((s.sigmas()[0] - 1.0).abs() < 1e-12);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        assert!(s.sigmas().windows(2).all(|w| w[0] > w[1]));
    }
}
