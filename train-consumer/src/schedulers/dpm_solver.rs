//! DPM-Solver++ multistep (diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"`), the sampler of diffusers' PixArt-α pipelines.
//!
//! - Paper: [DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
//!   Models](https://arxiv.org/abs/2211.01095)
//! - Reference: diffusers `schedulers/scheduling_dpmsolver_multistep.py` (0.42.1).
//!
//! With `sigma = sqrt((1 - abar) / abar)`, `alpha_t = 1 / sqrt(sigma^2 + 1)`,
//! `sigma_t = sigma * alpha_t` and `lambda = ln(alpha_t / sigma_t)`, each step converts
//! the model output to a data prediction `x0` and takes the order-1, 2 or 3 multistep
//! update from the last `x0`s (orders ramp up over the first steps and, with
//! `lower_order_final`, down over the last).

use candle_core::{Result as CandleResult, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    BetaSchedule, Scheduler, SchedulerError, check_spacing, compute_dtype, lincomb, linspace,
    np_round, parse, py_float, ser_py_float,
};

const fn two() -> usize {
    2
}
fn epsilon() -> String {
    "epsilon".into()
}
fn dpmsolver_pp() -> String {
    "dpmsolver++".into()
}
fn midpoint() -> String {
    "midpoint".into()
}
const fn yes() -> bool {
    true
}
fn zero() -> String {
    "zero".into()
}
const fn neg_inf() -> f64 {
    f64::NEG_INFINITY
}
fn linspace_spacing() -> String {
    "linspace".into()
}
const fn ratio() -> f64 {
    0.995
}
const fn one() -> f64 {
    1.0
}
fn exponential() -> String {
    "exponential".into()
}

/// diffusers' `DPMSolverMultistepScheduler` config; defaults are diffusers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpmSolverMultistepConfig {
    /// The noise schedule.
    #[serde(flatten)]
    pub betas: BetaSchedule,
    /// 1, 2 or 3.
    #[serde(default = "two")]
    pub solver_order: usize,
    /// `epsilon`, `sample` or `v_prediction`.
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    /// Dynamic thresholding; only `false`.
    #[serde(default)]
    pub thresholding: bool,
    /// Unused (thresholding).
    #[serde(default = "ratio")]
    pub dynamic_thresholding_ratio: f64,
    /// Unused (thresholding).
    #[serde(default = "one")]
    pub sample_max_value: f64,
    /// Only `dpmsolver++`.
    #[serde(default = "dpmsolver_pp")]
    pub algorithm_type: String,
    /// `midpoint` or `heun` (second-order update).
    #[serde(default = "midpoint")]
    pub solver_type: String,
    /// Lower orders in the last steps when there are fewer than 15.
    #[serde(default = "yes")]
    pub lower_order_final: bool,
    /// First order in the last step.
    #[serde(default)]
    pub euler_at_final: bool,
    /// Only `false`.
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Only `false`.
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// Only `false`.
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// Only `false`.
    #[serde(default)]
    pub use_lu_lambdas: bool,
    /// Only `false`.
    #[serde(default)]
    pub use_flow_sigmas: bool,
    /// Unused (flow sigmas).
    #[serde(default = "one")]
    pub flow_shift: f64,
    /// `zero` (the last step lands on sigma 0) or `sigma_min`.
    #[serde(default = "zero")]
    pub final_sigmas_type: String,
    /// Timesteps whose `lambda` is below this are not used (`-inf`: all are).
    #[serde(
        default = "neg_inf",
        deserialize_with = "py_float",
        serialize_with = "ser_py_float"
    )]
    pub lambda_min_clipped: f64,
    /// Only `null`: the sampler passes epsilon only (see the module docs).
    #[serde(default)]
    pub variance_type: Option<String>,
    /// `linspace`, `leading` or `trailing`.
    #[serde(default = "linspace_spacing")]
    pub timestep_spacing: String,
    /// Added to the `leading` timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// Only `false` (flow sigmas).
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    /// Unused (flow sigmas).
    #[serde(default = "exponential")]
    pub time_shift_type: String,
}

impl Default for DpmSolverMultistepConfig {
    fn default() -> Self {
        Self {
            betas: BetaSchedule::default(),
            solver_order: 2,
            prediction_type: epsilon(),
            thresholding: false,
            dynamic_thresholding_ratio: ratio(),
            sample_max_value: 1.0,
            algorithm_type: dpmsolver_pp(),
            solver_type: midpoint(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: zero(),
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: linspace_spacing(),
            steps_offset: 0,
            use_dynamic_shifting: false,
            time_shift_type: exponential(),
        }
    }
}

fn unsupported(
    key: &'static str,
    value: impl std::fmt::Debug,
    why: &'static str,
) -> SchedulerError {
    SchedulerError::Unsupported {
        key,
        value: format!("{value:?}"),
        why,
    }
}

impl DpmSolverMultistepConfig {
    /// The scheduler of PixArt-α's diffusers pipelines (`PixArt-alpha/PixArt-XL-2-512x512`
    /// `scheduler/scheduler_config.json`): linear betas 1e-4..0.02 over 1000 steps,
    /// `dpmsolver++`, order 2, midpoint, `lower_order_final`, linspace spacing, epsilon.
    /// These are diffusers' defaults.
    #[must_use]
    pub fn pixart() -> Self {
        Self::default()
    }

    /// Reads a diffusers `scheduler_config.json` (unknown keys ignored).
    ///
    /// # Errors
    /// Not JSON of this config's shape.
    pub fn from_json(json: &str) -> Result<Self, SchedulerError> {
        parse("DPMSolverMultistepScheduler", json)
    }

    /// Checks the config and builds the scheduler.
    ///
    /// # Errors
    /// A value this implementation does not support, naming the key.
    pub fn build(&self) -> Result<DpmSolverMultistep, SchedulerError> {
        DpmSolverMultistep::new(self.clone())
    }

    fn validate(&self) -> Result<(), SchedulerError> {
        if self.algorithm_type != "dpmsolver++" {
            return Err(unsupported(
                "algorithm_type",
                &self.algorithm_type,
                "only dpmsolver++ (the deterministic data-prediction solver)",
            ));
        }
        if !(1..=3).contains(&self.solver_order) {
            return Err(unsupported("solver_order", self.solver_order, "1, 2 or 3"));
        }
        if !matches!(self.solver_type.as_str(), "midpoint" | "heun") {
            return Err(unsupported(
                "solver_type",
                &self.solver_type,
                "midpoint or heun",
            ));
        }
        if !matches!(
            self.prediction_type.as_str(),
            "epsilon" | "sample" | "v_prediction"
        ) {
            return Err(unsupported(
                "prediction_type",
                &self.prediction_type,
                "epsilon, sample or v_prediction",
            ));
        }
        if !matches!(self.final_sigmas_type.as_str(), "zero" | "sigma_min") {
            return Err(unsupported(
                "final_sigmas_type",
                &self.final_sigmas_type,
                "zero or sigma_min",
            ));
        }
        if let Some(v) = &self.variance_type {
            return Err(unsupported(
                "variance_type",
                v,
                "only null: the sampler drops a learned variance before the scheduler",
            ));
        }
        for (key, on) in [
            ("thresholding", self.thresholding),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("use_flow_sigmas", self.use_flow_sigmas),
            ("use_dynamic_shifting", self.use_dynamic_shifting),
        ] {
            if on {
                return Err(unsupported(key, true, "only false"));
            }
        }
        check_spacing(&self.timestep_spacing)
    }
}

/// `alpha_t, sigma_t` of a sigma (`sigma = sigma_t / alpha_t`, variance preserving).
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = ln(alpha_t) - ln(sigma_t)` (`+inf` at sigma 0).
fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// diffusers' `DPMSolverMultistepScheduler` for `dpmsolver++`.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    cfg: DpmSolverMultistepConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// The last `solver_order` data predictions, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    step_index: Option<usize>,
}

impl DpmSolverMultistep {
    /// Builds the scheduler (no timesteps yet: call [`DpmSolverMultistep::set_timesteps`]).
    ///
    /// # Errors
    /// An unsupported config value, naming the key.
    pub fn new(cfg: DpmSolverMultistepConfig) -> Result<Self, SchedulerError> {
        cfg.validate()?;
        let mut alphas_cumprod = cfg.betas.diffusers_alphas_cumprod()?;
        if cfg.betas.rescale_betas_zero_snr
            && let Some(last) = alphas_cumprod.last_mut()
        {
            // diffusers: avoids an infinite sigma at the last training step
            *last = 2f64.powi(-24);
        }
        Ok(Self {
            model_outputs: vec![None; cfg.solver_order],
            cfg,
            alphas_cumprod,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            lower_order_nums: 0,
            step_index: None,
        })
    }

    /// The config in use.
    #[must_use]
    pub fn config(&self) -> &DpmSolverMultistepConfig {
        &self.cfg
    }

    /// The sigmas of the current timesteps, with the final one appended.
    #[must_use]
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// `alphas_cumprod` of the training schedule.
    #[must_use]
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Sets `n` inference steps (diffusers' `set_timesteps(n)`) and resets the solver.
    ///
    /// # Errors
    /// `n == 0`.
    pub fn set_timesteps(&mut self, n: usize) -> Result<(), SchedulerError> {
        if n == 0 {
            return Err(SchedulerError::BadTimesteps("0 inference steps".into()));
        }
        let t_train = self.alphas_cumprod.len();
        // sqrt((1 - abar) / abar) in f32, as diffusers computes and keeps it
        let train_sigmas: Vec<f64> = self
            .alphas_cumprod
            .iter()
            .map(|&a| {
                let a = a as f32;
                f64::from(((1.0 - a) / a).sqrt())
            })
            .collect();
        // searchsorted(flip(lambda_t), lambda_min_clipped): lambda falls with t
        let clipped = train_sigmas
            .iter()
            .rev()
            .take_while(|s| lambda(**s) < self.cfg.lambda_min_clipped)
            .count();
        let last = t_train - clipped;
        let ts: Vec<i64> = match self.cfg.timestep_spacing.as_str() {
            "linspace" => {
                let mut v: Vec<i64> = linspace(0.0, last as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(|x| np_round(x) as i64)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            "leading" => {
                let ratio = last / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.cfg.steps_offset) as i64)
                    .collect()
            }
            _ => {
                // trailing: np.arange(last, 0, -T / n).round() - 1
                let ratio = t_train as f64 / n as f64;
                let count = (last as f64 / ratio).ceil() as usize;
                (0..count)
                    .map(|i| np_round(last as f64 - i as f64 * ratio) as i64 - 1)
                    .collect()
            }
        };
        if let Some(bad) = ts.iter().find(|&&t| t < 0 || t as usize >= t_train) {
            return Err(SchedulerError::BadTimesteps(format!(
                "timestep {bad} outside [0, {t_train}) for {n} steps with {} spacing",
                self.cfg.timestep_spacing
            )));
        }
        let mut sigmas: Vec<f64> = ts.iter().map(|&t| train_sigmas[t as usize]).collect();
        sigmas.push(if self.cfg.final_sigmas_type == "sigma_min" {
            train_sigmas[0]
        } else {
            0.0
        });
        self.timesteps = ts.iter().map(|&t| t as f64).collect();
        self.sigmas = sigmas;
        self.model_outputs = vec![None; self.cfg.solver_order];
        self.lower_order_nums = 0;
        self.step_index = None;
        Ok(())
    }

    /// diffusers' `index_for_timestep`: the position of `t`, the second one if it occurs
    /// twice, the last step if absent.
    fn index_for_timestep(&self, t: f64) -> usize {
        let hits: Vec<usize> = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, x)| **x == t)
            .map(|(i, _)| i)
            .collect();
        match hits.len() {
            0 => self.timesteps.len() - 1,
            1 => hits[0],
            _ => hits[1],
        }
    }

    /// The model output as a data prediction `x0` at step `i`.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, i: usize) -> CandleResult<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let sample = sample.to_dtype(model_output.dtype())?;
        match self.cfg.prediction_type.as_str() {
            "epsilon" => lincomb(1.0 / alpha_t, &sample, -sigma_t / alpha_t, model_output),
            "v_prediction" => lincomb(alpha_t, &sample, -sigma_t, model_output),
            _ => Ok(model_output.clone()),
        }
    }
}

impl Scheduler for DpmSolverMultistep {
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
            candle_core::bail!("DPMSolverMultistep::step before set_timesteps");
        }
        let i = match self.step_index {
            Some(i) => i,
            None => self.index_for_timestep(timestep),
        };
        let n = self.timesteps.len();
        if i >= n {
            candle_core::bail!("DPMSolverMultistep::step: all {n} steps are taken");
        }
        let few = self.cfg.lower_order_final && n < 15;
        let lower_order_final =
            i == n - 1 && (self.cfg.euler_at_final || few || self.cfg.final_sigmas_type == "zero");
        let lower_order_second = i + 2 == n && few;

        let dtype = compute_dtype(sample);
        let x0 = self.convert(model_output, sample, i)?.to_dtype(dtype)?;
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(x0.clone());
        }
        let sample = sample.to_dtype(dtype)?;

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let lambda_t = lambda(self.sigmas[i + 1]);
        let lambda_s0 = lambda(self.sigmas[i]);
        let h = lambda_t - lambda_s0;
        let em1 = (-h).exp() - 1.0; // exp(-h) - 1
        let order = self.cfg.solver_order;
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            // x_t = (sigma_t / sigma_s) x - alpha_t (exp(-h) - 1) x0
            lincomb(sigma_t / sigma_s0, &sample, -alpha_t * em1, &x0)?
        } else {
            let out = |k: usize| -> CandleResult<&Tensor> {
                self.model_outputs[order - 1 - k]
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("missing model output".into()))
            };
            let (m0, m1) = (out(0)?, out(1)?);
            let lambda_s1 = lambda(self.sigmas[i - 1]);
            let h0 = lambda_s0 - lambda_s1;
            let r0 = h0 / h;
            // D1 = (m0 - m1) / r0
            let d1 = ((m0 - m1)? * (1.0 / r0))?;
            let base = lincomb(sigma_t / sigma_s0, &sample, -alpha_t * em1, m0)?;
            if order == 2 || self.lower_order_nums < 2 || lower_order_second {
                let c1 = if self.cfg.solver_type == "heun" {
                    alpha_t * (em1 / h + 1.0)
                } else {
                    -0.5 * alpha_t * em1
                };
                (base + (d1 * c1)?)?
            } else {
                let m2 = out(2)?;
                let lambda_s2 = lambda(self.sigmas[i - 2]);
                let r1 = (lambda_s1 - lambda_s2) / h;
                let d1_1 = ((m1 - m2)? * (1.0 / r1))?;
                // D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)
                let diff = (&d1 - &d1_1)?;
                let d1c = (&d1 + (&diff * (r0 / (r0 + r1)))?)?;
                let d2 = (&diff * (1.0 / (r0 + r1)))?;
                let c1 = alpha_t * (em1 / h + 1.0);
                let c2 = -alpha_t * ((em1 + h) / (h * h) - 0.5);
                ((base + (d1c * c1)?)? + (d2 * c2)?)?
            }
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        prev.to_dtype(model_output.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PixArt-alpha/PixArt-XL-2-512x512 `scheduler/scheduler_config.json`, as shipped.
    const PIXART: &str = r#"{
      "_class_name": "DPMSolverMultistepScheduler",
      "_diffusers_version": "0.22.0.dev0",
      "algorithm_type": "dpmsolver++",
      "beta_end": 0.02,
      "beta_schedule": "linear",
      "beta_start": 0.0001,
      "dynamic_thresholding_ratio": 0.995,
      "euler_at_final": false,
      "lambda_min_clipped": -Infinity,
      "lower_order_final": true,
      "num_train_timesteps": 1000,
      "prediction_type": "epsilon",
      "sample_max_value": 1.0,
      "solver_order": 2,
      "solver_type": "midpoint",
      "steps_offset": 0,
      "thresholding": false,
      "timestep_spacing": "linspace",
      "trained_betas": null,
      "use_karras_sigmas": false,
      "use_lu_lambdas": false,
      "variance_type": null
    }"#;

    #[test]
    fn pixart_config_parses_to_the_preset_and_round_trips() {
        let c = DpmSolverMultistepConfig::from_json(PIXART).unwrap();
        assert_eq!(c, DpmSolverMultistepConfig::pixart());
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            text.contains(r#""lambda_min_clipped":"-Infinity""#),
            "{text}"
        );
        assert_eq!(DpmSolverMultistepConfig::from_json(&text).unwrap(), c);
    }

    #[test]
    fn pixart_timesteps_are_diffusers() {
        let mut s = DpmSolverMultistepConfig::pixart().build().unwrap();
        s.set_timesteps(20).unwrap();
        // np.linspace(0, 999, 21).round()[::-1][:-1]
        assert_eq!(
            s.timesteps(),
            &[
                999.0, 949.0, 899.0, 849.0, 799.0, 749.0, 699.0, 649.0, 599.0, 549.0, 500.0, 450.0,
                400.0, 350.0, 300.0, 250.0, 200.0, 150.0, 100.0, 50.0
            ]
        );
        assert_eq!(s.sigmas().len(), 21);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
    }

    #[test]
    fn unsupported_values_name_their_key() {
        for (json, key) in [
            (r#"{"algorithm_type": "dpmsolver"}"#, "algorithm_type"),
            (r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas"),
            (r#"{"variance_type": "learned_range"}"#, "variance_type"),
            (r#"{"solver_order": 4}"#, "solver_order"),
            (r#"{"timestep_spacing": "karras"}"#, "timestep_spacing"),
        ] {
            let err = DpmSolverMultistepConfig::from_json(json)
                .unwrap()
                .build()
                .unwrap_err();
            assert!(err.to_string().contains(key), "{json}: {err}");
        }
    }
}
