//! Samplers' schedulers, as diffusers runs them: DPM-Solver++ multistep and DDIM for
//! PixArt-α, flow-match Euler for Flux.
//!
//! Each scheduler is built from a diffusers `scheduler_config.json` (a pipeline's
//! `scheduler/` directory): the config struct deserializes it (unknown keys are ignored,
//! since upstream configs gain keys across diffusers versions, and every default is
//! diffusers'), a value this implementation does not support is an error naming the key,
//! and [`AnyScheduler::used_config`] gives back every value actually used, for the
//! trainer's `OUT/config.json`.
//!
//! | type | diffusers class | used by |
//! |---|---|---|
//! | [`DpmSolverMultistep`] | `DPMSolverMultistepScheduler` (`dpmsolver++`, order 1-3, midpoint / heun) | PixArt-α pipelines, 20 steps |
//! | [`Ddim`] | `DDIMScheduler` (eta 0) | PixArt-α, 50 steps |
//! | [`FlowMatchEulerDiscrete`] | `FlowMatchEulerDiscreteScheduler` (static or dynamic shift) | Flux, 28 steps (dev) |
//!
//! The loop is diffusers': `set_timesteps(n)`, then for each `t` of
//! [`Scheduler::timesteps`] the model is evaluated at `t` and
//! `sample = step(model_output, t, sample)`; the first sample is Gaussian noise times
//! [`Scheduler::init_noise_sigma`].
//!
//! **PixArt's learned variance.** PixArt-α predicts `2C` channels (epsilon and the
//! learned-range variance, see [`crate::diffusion`]). diffusers' PixArt pipeline keeps
//! only the first `C` (`noise_pred.chunk(2, dim=1)[0]` when `out_channels // 2 ==
//! latent_channels`) after classifier-free guidance and before `scheduler.step`; so does
//! tensorbake's sampler: these schedulers take the `C` epsilon channels only. (The
//! PixArt scheduler config has `variance_type: null`; `learned` / `learned_range` are
//! rejected here, since diffusers then slices a fixed 3 channels.)
//!
//! **Precision.** The training schedule is held as diffusers holds it, in f32
//! (`alphas_cumprod`, the DPM-Solver sigmas: near `t = 0` f32 cancellation moves them by
//! up to 1e-4 relative, and diffusers' images carry that); everything computed from it
//! per step is f64; the tensors are updated in their own dtype, in f32 for half types
//! (diffusers casts the sample to f32 in `step` and the result back to the model
//! output's dtype; so does this). Trajectories agree with diffusers' within 1e-6
//! relative (`docs/sample.md`).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use tensorbake_train::schedulers::{DpmSolverMultistepConfig, Scheduler};
//!
//! let mut s = DpmSolverMultistepConfig::pixart().build()?;
//! s.set_timesteps(20)?;
//! let mut x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu)?;
//! for t in s.timesteps().to_vec() {
//!     let eps = x.zeros_like()?; // the model's epsilon at (x, t)
//!     x = s.step(&eps, t, &x)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod ddim;
mod dpm_solver;
mod flow_match;

pub use ddim::{Ddim, DdimConfig};
pub use dpm_solver::{DpmSolverMultistep, DpmSolverMultistepConfig};
pub use flow_match::{FlowMatchEulerDiscrete, FlowMatchEulerDiscreteConfig, calculate_shift};

use candle_core::{DType, Result as CandleResult, Tensor};
use serde::{Deserialize, Serialize};

/// Why a scheduler could not be built or set up.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A config value this implementation does not support.
    #[error("scheduler config: `{key}` = {value} is not supported: {why}")]
    Unsupported {
        /// The config key.
        key: &'static str,
        /// Its value, as written.
        value: String,
        /// What is supported instead.
        why: &'static str,
    },
    /// A config that cannot describe a schedule (no steps, betas out of range, ...).
    #[error("scheduler config: {0}")]
    Invalid(String),
    /// The JSON does not deserialize into the scheduler's config.
    #[error("scheduler config for {scheduler}: {source}")]
    Parse {
        /// The diffusers class being read.
        scheduler: &'static str,
        /// serde's message.
        source: serde_json::Error,
    },
    /// `_class_name` names a scheduler that is not implemented.
    #[error(
        "scheduler `{0}` is not implemented (DPMSolverMultistepScheduler, DDIMScheduler, \
         FlowMatchEulerDiscreteScheduler are)"
    )]
    UnknownClass(String),
    /// `set_timesteps` got an unusable request.
    #[error("set_timesteps: {0}")]
    BadTimesteps(String),
}

/// A scheduler in diffusers' sampling loop. Built from its config, then
/// `set_timesteps` (an inherent method: the flow-match one also takes the shift `mu`).
pub trait Scheduler {
    /// The timesteps to evaluate the model at, in order (integers in `[0, T)` for the
    /// DDPM-family schedulers, `sigma * T` for flow matching).
    fn timesteps(&self) -> &[f64];

    /// One step: the sample at the next timestep from the model's output at
    /// `timestep` (one of [`Scheduler::timesteps`]) and the current `sample`. Steps
    /// must be taken in order; the first call locates `timestep` in the schedule
    /// (diffusers' `_init_step_index`).
    ///
    /// # Errors
    /// `set_timesteps` not called, a timestep not in the schedule, tensor errors.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> CandleResult<Tensor>;

    /// The std of the initial noise (1 for all schedulers here).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The model input at `timestep` (the identity for all schedulers here).
    ///
    /// # Errors
    /// None here; other schedulers scale.
    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> CandleResult<Tensor> {
        Ok(sample.clone())
    }
}

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}

/// The DDPM noise schedule of a diffusers scheduler config: the keys shared by the
/// DDPM-family schedulers (and what [`crate::diffusion::NoiseSchedule`] is built from).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BetaSchedule {
    /// Training timesteps `T`.
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: usize,
    /// First beta.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` (linear in sqrt(beta)) or `squaredcos_cap_v2`.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// Explicit betas, overriding the three above.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale to zero terminal SNR (Lin et al. 2023).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl Default for BetaSchedule {
    fn default() -> Self {
        Self {
            num_train_timesteps: default_num_train_timesteps(),
            beta_start: default_beta_start(),
            beta_end: default_beta_end(),
            beta_schedule: default_beta_schedule(),
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }
}

/// `numpy.linspace(start, end, n)`: `start + i * step`, the last value exactly `end`.
pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = end;
            v
        }
    }
}

impl BetaSchedule {
    /// The betas, in f64.
    ///
    /// # Errors
    /// An unknown `beta_schedule`, no steps, betas outside `(0, 1]`.
    pub fn betas(&self) -> Result<Vec<f64>, SchedulerError> {
        let n = self.num_train_timesteps;
        let mut betas = if let Some(b) = &self.trained_betas {
            b.clone()
        } else {
            match self.beta_schedule.as_str() {
                "linear" => linspace(self.beta_start, self.beta_end, n),
                "scaled_linear" => linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                "squaredcos_cap_v2" => {
                    let f = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                            (1.0 - f(t2) / f(t1)).min(0.999)
                        })
                        .collect()
                }
                other => {
                    return Err(SchedulerError::Unsupported {
                        key: "beta_schedule",
                        value: format!("{other:?}"),
                        why: "linear, scaled_linear and squaredcos_cap_v2 are",
                    });
                }
            }
        };
        if betas.len() < 2 {
            return Err(SchedulerError::Invalid(format!(
                "{} training timesteps; at least 2 are needed",
                betas.len()
            )));
        }
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let first_bad = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b <= 1.0));
        if let Some((i, b)) = first_bad {
            return Err(SchedulerError::Invalid(format!(
                "beta {i} is {b}; betas must lie in (0, 1]"
            )));
        }
        Ok(betas)
    }

    /// `alphas_cumprod = cumprod(1 - betas)`, in f64.
    ///
    /// # Errors
    /// As [`BetaSchedule::betas`].
    pub fn alphas_cumprod(&self) -> Result<Vec<f64>, SchedulerError> {
        Ok(cumprod_alphas(&self.betas()?))
    }
}

impl BetaSchedule {
    /// `alphas_cumprod` as diffusers holds it: betas in f32 (`torch.linspace(...,
    /// dtype=float32)`; `scaled_linear` squares in f32), `1 - beta` in f32, the
    /// cumulative product accumulated in f64 and stored in f32 (torch's CPU `cumprod`),
    /// returned as the f64 values of those f32s. Near `t = 0`, `1 - abar` in f32 is off
    /// by up to ~1e-4 relative (cancellation), which moves diffusers' small sigmas
    /// (`sigma_min`) and its last steps by more than 1e-6; holding the schedule as
    /// diffusers does makes the samplers reproduce diffusers' trajectories (the step
    /// coefficients are f64). diffusers' own f32 linspace differs from the rounded exact
    /// one in the last bit of a third of the betas, which moves trajectories by ~1e-7.
    ///
    /// # Errors
    /// As [`BetaSchedule::betas`].
    pub fn diffusers_alphas_cumprod(&self) -> Result<Vec<f64>, SchedulerError> {
        let betas = self.betas()?;
        let betas32: Vec<f32> = if self.trained_betas.is_none()
            && self.beta_schedule == "scaled_linear"
            && !self.rescale_betas_zero_snr
        {
            linspace(
                self.beta_start.sqrt(),
                self.beta_end.sqrt(),
                self.num_train_timesteps,
            )
            .into_iter()
            .map(|b| {
                let b = b as f32;
                b * b
            })
            .collect()
        } else {
            betas.iter().map(|&b| b as f32).collect()
        };
        let mut acc = 1f64;
        Ok(betas32
            .iter()
            .map(|&b| {
                acc *= f64::from(1f32 - b);
                f64::from(acc as f32)
            })
            .collect())
    }
}

pub(crate) fn cumprod_alphas(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`: shifts and scales `sqrt(alphas_cumprod)` so
/// the last is 0 and the first unchanged.
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let sqrt_ac: Vec<f64> = cumprod_alphas(betas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let ac: Vec<f64> = sqrt_ac
        .iter()
        .map(|s| {
            let r = (s - last) * (first / (first - last));
            r * r
        })
        .collect();
    let mut out = Vec::with_capacity(ac.len());
    out.push(1.0 - ac[0]);
    for w in ac.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// `numpy.round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// The DDPM-family timestep spacings.
pub(crate) fn check_spacing(spacing: &str) -> Result<(), SchedulerError> {
    match spacing {
        "linspace" | "leading" | "trailing" => Ok(()),
        other => Err(SchedulerError::Unsupported {
            key: "timestep_spacing",
            value: format!("{other:?}"),
            why: "linspace, leading and trailing are",
        }),
    }
}

/// The dtype the update is computed in: f32 for half types (diffusers casts the sample
/// to f32 in `step`), f64 for f32 and f64 samples (the f32 result is then the exact
/// update rounded once; the latents are small next to the model).
pub(crate) fn compute_dtype(sample: &Tensor) -> DType {
    match sample.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        _ => DType::F64,
    }
}

/// `a * x + b * y` for scalars `a`, `b`.
pub(crate) fn lincomb(a: f64, x: &Tensor, b: f64, y: &Tensor) -> CandleResult<Tensor> {
    x.affine(a, 0.0)? + y.affine(b, 0.0)?
}

/// Python's `json` writes `Infinity`, `-Infinity` and `NaN` (PixArt's config has
/// `"lambda_min_clipped": -Infinity`), which is not JSON: those bare tokens become
/// strings, which [`py_float`] reads back.
pub(crate) fn python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Reads a float written as a number or as Python's `Infinity` / `-Infinity` / `NaN`.
pub(crate) fn py_float<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum F {
        Num(f64),
        Text(String),
    }
    match F::deserialize(d)? {
        F::Num(v) => Ok(v),
        F::Text(t) => match t.as_str() {
            "Infinity" | "inf" => Ok(f64::INFINITY),
            "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            "NaN" | "nan" => Ok(f64::NAN),
            _ => Err(serde::de::Error::custom(format!("`{t}` is not a number"))),
        },
    }
}

/// Writes a float as a number, or as Python's spelling when it is not finite.
pub(crate) fn ser_py_float<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else if v.is_nan() {
        s.serialize_str("NaN")
    } else if *v > 0.0 {
        s.serialize_str("Infinity")
    } else {
        s.serialize_str("-Infinity")
    }
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    scheduler: &'static str,
    json: &str,
) -> Result<T, SchedulerError> {
    serde_json::from_str(&python_json(json))
        .map_err(|source| SchedulerError::Parse { scheduler, source })
}

/// One of the schedulers, chosen by a config's `_class_name`, for a sampler that takes
/// whichever scheduler a pipeline ships.
#[derive(Debug)]
pub enum AnyScheduler {
    /// `DPMSolverMultistepScheduler`.
    DpmSolverMultistep(DpmSolverMultistep),
    /// `DDIMScheduler`.
    Ddim(Ddim),
    /// `FlowMatchEulerDiscreteScheduler`.
    FlowMatchEulerDiscrete(FlowMatchEulerDiscrete),
}

impl AnyScheduler {
    /// Builds the scheduler a diffusers `scheduler_config.json` names in `_class_name`.
    ///
    /// # Errors
    /// Not JSON, an unknown class, an unsupported value (naming the key).
    pub fn from_config_json(json: &str) -> Result<Self, SchedulerError> {
        #[derive(Deserialize)]
        struct Class {
            #[serde(rename = "_class_name")]
            class_name: Option<String>,
        }
        let class: Class = parse("a diffusers scheduler", json)?;
        let name = class.class_name.unwrap_or_default();
        Self::from_class_and_json(&name, json)
    }

    /// Builds the scheduler `class` (a diffusers class name) from `json`, whatever class
    /// the config itself names (diffusers' `Scheduler.from_config(other.config)`, e.g. a
    /// DDIM sampler for a PixArt pipeline that ships a DPM-Solver config).
    ///
    /// # Errors
    /// As [`AnyScheduler::from_config_json`].
    pub fn from_class_and_json(class: &str, json: &str) -> Result<Self, SchedulerError> {
        Ok(match class {
            "DPMSolverMultistepScheduler" => Self::DpmSolverMultistep(
                parse::<DpmSolverMultistepConfig>("DPMSolverMultistepScheduler", json)?.build()?,
            ),
            "DDIMScheduler" => Self::Ddim(parse::<DdimConfig>("DDIMScheduler", json)?.build()?),
            "FlowMatchEulerDiscreteScheduler" => Self::FlowMatchEulerDiscrete(
                parse::<FlowMatchEulerDiscreteConfig>("FlowMatchEulerDiscreteScheduler", json)?
                    .build()?,
            ),
            other => return Err(SchedulerError::UnknownClass(other.to_string())),
        })
    }

    /// `set_timesteps(n)`; `mu` is the flow-match shift exponent (required with
    /// `use_dynamic_shifting`, ignored by the others).
    ///
    /// # Errors
    /// As the scheduler's own `set_timesteps`.
    pub fn set_timesteps(&mut self, n: usize, mu: Option<f64>) -> Result<(), SchedulerError> {
        match self {
            Self::DpmSolverMultistep(s) => s.set_timesteps(n),
            Self::Ddim(s) => s.set_timesteps(n),
            Self::FlowMatchEulerDiscrete(s) => s.set_timesteps(n, mu),
        }
    }

    /// Every config value the scheduler uses (defaults filled in), with `_class_name`.
    #[must_use]
    pub fn used_config(&self) -> serde_json::Value {
        let (class, v) = match self {
            Self::DpmSolverMultistep(s) => (
                "DPMSolverMultistepScheduler",
                serde_json::to_value(s.config()),
            ),
            Self::Ddim(s) => ("DDIMScheduler", serde_json::to_value(s.config())),
            Self::FlowMatchEulerDiscrete(s) => (
                "FlowMatchEulerDiscreteScheduler",
                serde_json::to_value(s.config()),
            ),
        };
        let mut v = v.unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert("_class_name".into(), class.into());
        }
        v
    }

    fn inner(&self) -> &dyn Scheduler {
        match self {
            Self::DpmSolverMultistep(s) => s,
            Self::Ddim(s) => s,
            Self::FlowMatchEulerDiscrete(s) => s,
        }
    }
}

impl Scheduler for AnyScheduler {
    fn timesteps(&self) -> &[f64] {
        self.inner().timesteps()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> CandleResult<Tensor> {
        match self {
            Self::DpmSolverMultistep(s) => s.step(model_output, timestep, sample),
            Self::Ddim(s) => s.step(model_output, timestep, sample),
            Self::FlowMatchEulerDiscrete(s) => s.step(model_output, timestep, sample),
        }
    }

    fn init_noise_sigma(&self) -> f64 {
        self.inner().init_noise_sigma()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_is_numpys() {
        let v = linspace(0.0001, 0.02, 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(v[0], 0.0001);
        assert_eq!(v[999], 0.02);
        // numpy.linspace(0.0001, 0.02, 1000)[[1, 500, 998]], bit for bit
        assert_eq!(
            [v[1], v[500], v[998]],
            [
                0.00011991991991991993,
                0.010059959959959959,
                0.01998008008008008
            ]
        );
        assert_eq!(linspace(3.0, 3.0, 1), vec![3.0]);
    }

    #[test]
    fn python_json_reads_non_finite_floats() {
        let t = python_json(r#"{"a": -Infinity, "b": "x -Infinity \" NaN", "c": [Infinity, NaN]}"#);
        assert_eq!(
            t,
            r#"{"a": "-Infinity", "b": "x -Infinity \" NaN", "c": ["Infinity", "NaN"]}"#
        );
    }

    #[test]
    fn numpy_rounding_is_half_to_even() {
        assert_eq!(np_round(0.5), 0.0);
        assert_eq!(np_round(1.5), 2.0);
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(-0.5), 0.0);
        assert_eq!(np_round(2.4999), 2.0);
    }

    #[test]
    fn beta_schedules() {
        let lin = BetaSchedule::default();
        let b = lin.betas().unwrap();
        assert_eq!((b[0], b[999]), (0.0001, 0.02));
        let ac = lin.alphas_cumprod().unwrap();
        assert!((ac[999] - 4.035e-5).abs() < 1e-7, "{}", ac[999]);
        let scaled = BetaSchedule {
            beta_schedule: "scaled_linear".into(),
            beta_start: 0.00085,
            beta_end: 0.012,
            ..BetaSchedule::default()
        };
        let b = scaled.betas().unwrap();
        assert!((b[0] - 0.00085).abs() < 1e-15 && (b[999] - 0.012).abs() < 1e-15);
        let zsnr = BetaSchedule {
            rescale_betas_zero_snr: true,
            ..BetaSchedule::default()
        };
        let ac = zsnr.alphas_cumprod().unwrap();
        assert!(ac[999].abs() < 1e-12);
        assert!((ac[0] - 0.9999).abs() < 1e-12);
        let bad = BetaSchedule {
            beta_schedule: "quad".into(),
            ..BetaSchedule::default()
        };
        assert!(
            bad.betas()
                .unwrap_err()
                .to_string()
                .contains("beta_schedule")
        );
    }

    #[test]
    fn any_scheduler_by_class_name_records_what_it_uses() {
        let s = AnyScheduler::from_config_json(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": true}"#,
        )
        .unwrap();
        let used = s.used_config();
        assert_eq!(used["_class_name"], "FlowMatchEulerDiscreteScheduler");
        assert_eq!(used["shift"], 3.0);
        assert_eq!(used["time_shift_type"], "exponential");
        let err = AnyScheduler::from_config_json(r#"{"_class_name": "EulerDiscreteScheduler"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("EulerDiscreteScheduler"));
        let err = AnyScheduler::from_config_json(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("algorithm_type"), "{err}");
    }
}
