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
