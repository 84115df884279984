//! Parity of the diffusion math with its references, on the goldens beside the scripts
//! that made them:
//!
//! - the IDDPM objective ([`tensorbake_train::diffusion`]) against
//!   `fixtures/diffusion/make_diffusion_golden.py` (PixArt-alpha's formulas in torch,
//!   checked against PixArt's own code);
//! - the schedulers ([`tensorbake_train::schedulers`]) against diffusers 0.42.1, step by
//!   step, from `fixtures/schedulers/make_scheduler_golden.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// `max |ours - reference| / max |reference|`, in f64.
fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shapes differ");
    let (o, r) = (f64s(ours), f64s(reference));
    let diff = o
        .iter()
        .zip(&r)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    let scale = r.iter().map(|v| v.abs()).fold(0f64, f64::max);
    diff / scale.max(1e-300)
}

mod objective {
    use super::*;
    use tensorbake_train::diffusion::{
        LossType, NoiseSchedule, Objective, approx_standard_normal_cdf,
        discretized_gaussian_log_likelihood,
    };

    fn golden() -> HashMap<String, Tensor> {
        load("diffusion/golden.safetensors")
    }

    fn check(label: &str, ours: &Tensor, reference: &Tensor, tol: f64, worst: &mut f64) {
        let e = rel_err(ours, reference);
        eprintln!("{label}: rel err {e:.3e}");
        assert!(e <= tol, "{label}: rel err {e:e} > {tol:e}");
        *worst = worst.max(e);
    }

    #[test]
    fn schedule_is_iddpms() {
        let g = golden();
        let s = NoiseSchedule::pixart();
        let mut worst = 0f64;
        for (name, ours) in [
            ("betas", s.betas()),
            ("alphas_cumprod", s.alphas_cumprod()),
            ("posterior_variance", s.posterior_variance()),
            (
                "posterior_log_variance_clipped",
                s.posterior_log_variance_clipped(),
            ),
            ("posterior_mean_coef1", s.posterior_mean_coef1()),
            ("posterior_mean_coef2", s.posterior_mean_coef2()),
        ] {
            let t = Tensor::from_slice(ours, ours.len(), &Device::Cpu).unwrap();
            check(name, &t, &g[name], 1e-14, &mut worst);
        }
        eprintln!("schedule: worst rel err {worst:.3e}");
    }

    #[test]
    fn standalone_functions() {
        let g = golden();
        let mut worst = 0f64;
        let cdf = approx_standard_normal_cdf(&g["cdf_x"]).unwrap();
        check(
            "approx_standard_normal_cdf",
            &cdf,
            &g["cdf"],
            1e-14,
            &mut worst,
        );
        let ll = discretized_gaussian_log_likelihood(
            &g["dgll_x"],
            &g["dgll_means"],
            &g["dgll_log_scales"],
        )
        .unwrap();
        check(
            "discretized_gaussian_log_likelihood",
            &ll,
            &g["dgll"],
            1e-13,
            &mut worst,
        );
    }

    fn run(suffix: &str, dtype: DType, tol: f64) {
        let g = golden();
        let get = |k: &str| g[&format!("{k}_{suffix}")].clone();
        let obj = Objective::pixart();
        let t = g["t"].clone();
        let x0 = get("x_start");
        let noise = get("noise");
        assert_eq!(x0.dtype(), dtype);
        let mut worst = 0f64;
        let x_t = obj.schedule.q_sample(&x0, &t, &noise).unwrap();
        check(&format!("x_t {suffix}"), &x_t, &get("x_t"), tol, &mut worst);
        // against the golden x_t from here on, so each check isolates one formula
        let x_t = get("x_t");
        let mo = get("model_output");
        let c = x0.dim(1).unwrap();
        let (eps, v) = (mo.narrow(1, 0, c).unwrap(), mo.narrow(1, c, c).unwrap());
        let q = obj.schedule.q_posterior(&x0, &x_t, &t).unwrap();
        check(
            &format!("true_mean {suffix}"),
            &q.mean,
            &get("true_mean"),
            tol,
            &mut worst,
        );
        let lv = q
            .log_variance_clipped
            .broadcast_as(x0.shape())
            .unwrap()
            .contiguous()
            .unwrap();
        check(
            &format!("true_log_variance {suffix}"),
            &lv,
            &get("true_log_variance"),
            tol,
            &mut worst,
        );
        let (mean, log_var) = obj
            .schedule
            .p_mean_log_variance(&eps, &v, &x_t, &t)
            .unwrap();
        check(
            &format!("model_mean {suffix}"),
            &mean,
            &get("model_mean"),
            tol,
            &mut worst,
        );
        check(
            &format!("model_log_variance {suffix}"),
            &log_var,
            &get("model_log_variance"),
            tol,
            &mut worst,
        );

        let var = Var::from_tensor(&mo).unwrap();
        let l = obj
            .training_losses(var.as_tensor(), &x0, &x_t, &t, &noise)
            .unwrap();
        let vb = l.vb.clone().unwrap();
        check(
            &format!("loss {suffix}"),
            &l.loss,
            &get("loss"),
            tol,
            &mut worst,
        );
        check(
            &format!("mse {suffix}"),
            &l.mse,
            &get("mse"),
            tol,
            &mut worst,
        );
        check(&format!("vb {suffix}"), &vb, &get("vb"), tol, &mut worst);
        let grads = l.loss.sum_all().unwrap().backward().unwrap();
        let grad = grads.get(var.as_tensor()).unwrap();
        check(
            &format!("d loss / d output {suffix}"),
            grad,
            &get("grad"),
            tol,
            &mut worst,
        );
        let grads = vb.sum_all().unwrap().backward().unwrap();
        let grad_vb = grads.get(var.as_tensor()).unwrap();
        check(
            &format!("d vb / d output {suffix}"),
            grad_vb,
            &get("grad_vb"),
            tol,
            &mut worst,
        );
        // the stop-gradient: the VB term does not reach the epsilon half
        let eps_half = grad_vb.narrow(1, 0, c).unwrap().abs().unwrap();
        assert_eq!(f64s(&eps_half.max_all().unwrap())[0], 0.0);

        // epsilon only
        let obj_eps = Objective::epsilon_only(NoiseSchedule::pixart());
        let var = Var::from_tensor(&eps).unwrap();
        let l = obj_eps
            .training_losses(var.as_tensor(), &x0, &x_t, &t, &noise)
            .unwrap();
        check(
            &format!("eps-only loss {suffix}"),
            &l.loss,
            &get("eps_loss"),
            tol,
            &mut worst,
        );
        let grads = l.loss.sum_all().unwrap().backward().unwrap();
        check(
            &format!("eps-only grad {suffix}"),
            grads.get(var.as_tensor()).unwrap(),
            &get("eps_grad"),
            tol,
            &mut worst,
        );

        // a 100-step schedule, RESCALED_MSE (VB x 0.1)
        let obj100 = Objective {
            schedule: NoiseSchedule::iddpm_linear(100).unwrap(),
            loss_type: LossType::RescaledMse,
            ..Objective::pixart()
        };
        let t100 = g["t100"].clone();
        let n = t100.dim(0).unwrap();
        let (x0n, noisen) = (x0.narrow(0, 0, n).unwrap(), noise.narrow(0, 0, n).unwrap());
        let x_t100 = obj100.schedule.q_sample(&x0n, &t100, &noisen).unwrap();
        check(
            &format!("x_t (100 steps) {suffix}"),
            &x_t100,
            &get("x_t100"),
            tol,
            &mut worst,
        );
        let var = Var::from_tensor(&mo.narrow(0, 0, n).unwrap()).unwrap();
        let l = obj100
            .training_losses(var.as_tensor(), &x0n, &get("x_t100"), &t100, &noisen)
            .unwrap();
        check(
            &format!("loss (100 steps, rescaled) {suffix}"),
            &l.loss,
            &get("loss100"),
            tol,
            &mut worst,
        );
        check(
            &format!("vb (100 steps, rescaled) {suffix}"),
            l.vb.as_ref().unwrap(),
            &get("vb100"),
            tol,
            &mut worst,
        );
        let grads = l.loss.sum_all().unwrap().backward().unwrap();
        check(
            &format!("grad (100 steps, rescaled) {suffix}"),
            grads.get(var.as_tensor()).unwrap(),
            &get("grad100"),
            tol,
            &mut worst,
        );
        eprintln!("objective {suffix}: worst rel err {worst:.3e} (bound {tol:e})");
    }

    #[test]
    fn pixart_objective_f32() {
        run("f32", DType::F32, 1e-5);
    }

    #[test]
    fn pixart_objective_f64() {
        run("f64", DType::F64, 1e-12);
    }
}

mod schedulers {
    use super::*;
    use serde::Deserialize;
    use tensorbake_train::schedulers::{AnyScheduler, Scheduler};

    #[derive(Deserialize)]
    struct Case {
        name: String,
        class: String,
        config: String,
        steps: usize,
        #[serde(default)]
        mu: Option<f64>,
        #[serde(default)]
        image_seq_len: Option<usize>,
        #[serde(default)]
        flux_pipeline: bool,
    }

    fn cases() -> Vec<Case> {
        let text = std::fs::read_to_string(fixture("schedulers/cases.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn build(case: &Case) -> AnyScheduler {
        let mut s = AnyScheduler::from_class_and_json(&case.class, &case.config)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        match (&mut s, case.flux_pipeline) {
            (AnyScheduler::FlowMatchEulerDiscrete(f), true) => f
                .set_timesteps_flux(case.steps, case.image_seq_len.unwrap())
                .unwrap(),
            _ => s.set_timesteps(case.steps, case.mu).unwrap(),
        }
        s
    }

    /// Runs one case in `dtype` from the golden initial sample, feeding the golden model
    /// outputs, and returns the worst per-step error of our own (accumulated) sample.
    fn trajectory(case: &Case, g: &HashMap<String, Tensor>, dtype: DType) -> f64 {
        let mut s = build(case);
        let ts = s.timesteps().to_vec();
        assert_eq!(ts.len(), case.steps, "{}", case.name);
        let mut x = g[&format!("{}_x", case.name)].to_dtype(dtype).unwrap();
        let outputs = &g[&format!("{}_outputs", case.name)];
        let samples = &g[&format!("{}_samples", case.name)];
        let mut worst = 0f64;
        for (k, &t) in ts.iter().enumerate() {
            let out = outputs.get(k).unwrap().to_dtype(dtype).unwrap();
            x = s.step(&out, t, &x).unwrap();
            assert_eq!(x.dtype(), dtype);
            worst = worst.max(rel_err(&x, &samples.get(k).unwrap()));
        }
        worst
    }

    #[test]
    fn schedules_are_diffusers() {
        let g = load("schedulers/golden.safetensors");
        for case in cases() {
            let s = build(&case);
            let ours = Tensor::new(s.timesteps(), &Device::Cpu).unwrap();
            let theirs = &g[&format!("{}_timesteps", case.name)];
            let e = rel_err(&ours, theirs);
            eprintln!("{}: timesteps rel err {e:.3e}", case.name);
            if case.class == "FlowMatchEulerDiscreteScheduler" {
                // diffusers keeps sigma * T in f32
                assert!(e < 1e-6, "{}: timesteps {e:e}", case.name);
            } else {
                assert_eq!(f64s(&ours), f64s(theirs), "{}: timesteps", case.name);
            }
            let sigmas = match &s {
                AnyScheduler::DpmSolverMultistep(d) => Some(d.sigmas().to_vec()),
                AnyScheduler::FlowMatchEulerDiscrete(f) => Some(f.sigmas().to_vec()),
                AnyScheduler::Ddim(_) => None,
            };
            if let Some(sig) = sigmas {
                let ours = Tensor::new(sig.as_slice(), &Device::Cpu).unwrap();
                let e = rel_err(&ours, &g[&format!("{}_sigmas", case.name)]);
                eprintln!("{}: sigmas rel err {e:.3e}", case.name);
                assert!(e < 1e-6, "{}: sigmas {e:e}", case.name);
            }
        }
    }

    #[test]
    fn trajectories_match_diffusers_step_by_step() {
        let g = load("schedulers/golden.safetensors");
        let mut worst = (0f64, 0f64);
        for case in cases() {
            let e32 = trajectory(&case, &g, DType::F32);
            let e64 = trajectory(&case, &g, DType::F64);
            eprintln!(
                "{} ({} steps): worst per-step rel err f32 {e32:.3e}, f64 {e64:.3e}",
                case.name, case.steps
            );
            assert!(e32 <= 1e-6, "{}: f32 {e32:e}", case.name);
            assert!(e64 <= 1e-6, "{}: f64 {e64:e}", case.name);
            worst = (worst.0.max(e32), worst.1.max(e64));
        }
        eprintln!(
            "schedulers: worst rel err f32 {:.3e}, f64 {:.3e}",
            worst.0, worst.1
        );
    }

    #[test]
    fn pixart_config_file_as_shipped() {
        // the PixArt config's own text (-Infinity included) through the class dispatch
        let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0",
            "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear",
            "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995, "euler_at_final": false,
            "lambda_min_clipped": -Infinity, "lower_order_final": true, "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "sample_max_value": 1.0, "solver_order": 2,
            "solver_type": "midpoint", "steps_offset": 0, "thresholding": false,
            "timestep_spacing": "linspace", "trained_betas": null, "use_karras_sigmas": false,
            "use_lu_lambdas": false, "variance_type": null}"#;
        let s = AnyScheduler::from_config_json(text).unwrap();
        let used = s.used_config();
        assert_eq!(used["lambda_min_clipped"], "-Infinity");
        assert_eq!(used["final_sigmas_type"], "zero");
        assert_eq!(s.init_noise_sigma(), 1.0);
    }
}
