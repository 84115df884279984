//! AdamW with f32 master weights and moments, global-norm gradient clipping, and an
//! exponential moving average of the trained weights.
//!
//! candle-nn's `AdamW` keeps its moments in the parameter's dtype and cannot save
//! them; this one keeps every variable, first and second moment in f32 (the
//! variables are f32 masters; compute casts them), and its state is plain tensors by
//! name so a checkpoint restores it bit for bit. The update is PyTorch's `AdamW`:
//! `p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g²;
//! p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, Var};

/// The optimizer's hyper-parameters (the learning rate comes per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// `(beta1, beta2)`.
    pub betas: (f64, f64),
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over named f32 variables.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// An optimizer over `vars` (f32), moments at zero.
    ///
    /// # Errors
    /// A variable that is not f32.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            if var.dtype() != DType::F32 {
                candle_core::bail!(
                    "AdamW: variable {name} is {:?}, master weights must be f32",
                    var.dtype()
                );
            }
            m.push(var.zeros_like()?);
            v.push(var.zeros_like()?);
        }
        Ok(Self {
            cfg,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// Updates done so far.
    #[must_use]
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The variables, by name.
    #[must_use]
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with `grads[i]` the (accumulated, clipped) gradient of variable `i`
    /// in f32; a `None` gradient leaves the variable and its moments as they are.
    ///
    /// # Errors
    /// candle errors (shape mismatch).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let (b1, b2) = self.cfg.betas;
        let t = self.step as i32;
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let g = g.to_dtype(DType::F32)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let p = var.as_tensor();
            let decayed = (p * (1.0 - lr * self.cfg.weight_decay))?;
            let denom = ((&v / c2)?.sqrt()? + self.cfg.eps)?;
            let update = ((&m / c1)? / denom)?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The state to checkpoint: `m.<name>` and `v.<name>` tensors, and the step count.
    #[must_use]
    pub fn state(&self) -> (BTreeMap<String, Tensor>, u64) {
        let mut t = BTreeMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            t.insert(format!("m.{name}"), self.m[i].clone());
            t.insert(format!("v.{name}"), self.v[i].clone());
        }
        (t, self.step)
    }

    /// Restores a [`AdamW::state`].
    ///
    /// # Errors
    /// A moment missing or of the wrong shape, naming the variable.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (which, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{which}.{name}");
                let t = tensors.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no `{key}`"))
                })?;
                if t.dims() != var.dims() {
                    candle_core::bail!(
                        "optimizer state `{key}` has shape {:?}, the variable {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                *slot = t.to_dtype(DType::F32)?.to_device(var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1); returns the
/// norm before clipping. `max_norm <= 0` only measures.
///
/// # Errors
/// candle errors.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += f64::from(
            g.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?,
        );
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// An exponential moving average of variables: `ema = d * ema + (1 - d) * p`.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// Starts at the current values.
    ///
    /// # Errors
    /// candle errors.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { decay, shadow })
    }

    /// Moves toward the variables' current values (call after each optimizer step).
    ///
    /// # Errors
    /// candle errors.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        for ((_, s), (_, v)) in self.shadow.iter_mut().zip(vars) {
            *s = ((&*s * self.decay)? + (v.as_tensor() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    /// The averaged tensors, by name.
    #[must_use]
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.shadow.iter().cloned().collect()
    }

    /// Restores averaged tensors saved by a checkpoint.
    ///
    /// # Errors
    /// A tensor missing, naming it.
    pub fn load(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, s) in &mut self.shadow {
            let t = tensors
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("EMA state has no `{name}`")))?;
            *s = t.to_dtype(DType::F32)?.to_device(s.device())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_the_reference_update() -> Result<()> {
        // Two steps of PyTorch AdamW by hand on one scalar.
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32], &dev)?)?;
        let cfg = AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg)?;
        let (lr, mut p, mut m, mut v) = (0.01f64, 1.0f64, 0.0f64, 0.0f64);
        for (t, g) in [(1, 0.5f64), (2, -0.25)] {
            opt.step(&[Some(Tensor::new(&[g as f32], &dev)?)], lr)?;
            p *= 1.0 - lr * 0.1;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let mh = m / (1.0 - 0.9f64.powi(t));
            let vh = v / (1.0 - 0.999f64.powi(t));
            p -= lr * mh / (vh.sqrt() + 1e-8);
        }
        let got = f64::from(var.as_tensor().to_vec1::<f32>()?[0]);
        assert!((got - p).abs() < 1e-6, "{got} vs {p}");
        // state round trip gives the same next update
        let (state, steps) = opt.state();
        let var2 = Var::from_tensor(&var.as_tensor().copy()?)?;
        let mut opt2 = AdamW::new(vec![("w".into(), var2.clone())], cfg)?;
        opt2.load_state(&state, steps)?;
        let g = Tensor::new(&[0.1f32], &dev)?;
        opt.step(&[Some(g.clone())], lr)?;
        opt2.step(&[Some(g)], lr)?;
        assert_eq!(
            var.as_tensor().to_vec1::<f32>()?,
            var2.as_tensor().to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn clipping_scales_to_the_global_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![
            Some(Tensor::new(&[3.0f32], &dev)?),
            None,
            Some(Tensor::new(&[4.0f32], &dev)?),
        ];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 5.0).abs() < 1e-9);
        let a = g[0].as_ref().unwrap().to_vec1::<f32>()?[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
        let n = clip_grad_norm(&mut g, 10.0)?;
        assert!((n - 1.0).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn ema_follows_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[0.0f32], &dev)?)?;
        let vars = vec![("w".to_string(), var.clone())];
        let mut ema = Ema::new(&vars, 0.9)?;
        var.set(&Tensor::new(&[1.0f32], &dev)?)?;
        ema.update(&vars)?;
        ema.update(&vars)?;
        let v = ema.tensors()["w"].to_vec1::<f32>()?[0];
        assert!((v - 0.19).abs() < 1e-6, "{v}");
        Ok(())
    }
}
