//! AdamW with f32 master weights and moments, Adafactor (f32 factored second moments,
//! f32 or stochastically rounded bf16 master weights, updatable one tensor at a time
//! during the backward), global-norm gradient clipping, and an exponential moving
//! average of the trained weights.
//!
//! candle-nn's `AdamW` keeps its moments in the parameter's dtype and cannot save
//! them; this one keeps every variable, first and second moment in f32 (the
//! variables are f32 masters; compute casts them), and its state is plain tensors by
//! name so a checkpoint restores it bit for bit. The update is PyTorch's `AdamW`:
//! `p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g²;
//! p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor, Var};

use crate::recompute::ApplyFn;

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

/// Adafactor's hyper-parameters (the learning rate comes per step): transformers'
/// `Adafactor(lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
/// beta1=None)`, the memory-lean setting (no first moment).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorConfig {
    /// `(eps1, eps2)`: added to the squared gradient; `eps2` is unused without
    /// parameter scaling.
    pub eps: (f64, f64),
    /// Each update is scaled down to an RMS of at most this.
    pub clip_threshold: f64,
    /// The second-moment decay `beta2_t = 1 - t^decay_rate`.
    pub decay_rate: f64,
    /// Decoupled weight decay (`p -= wd * lr * p`).
    pub weight_decay: f64,
    /// Seeds the stochastic rounding of bf16 master weights.
    pub seed: u64,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            weight_decay: 0.0,
            seed: 0,
        }
    }
}

/// One variable's second-moment estimate.
#[derive(Debug, Clone)]
enum SecondMoment {
    /// Row and column means (`[..., R]`, `[..., C]`) for tensors of rank 2 and more.
    Factored { row: Tensor, col: Tensor },
    /// The full estimate for vectors.
    Full(Tensor),
}

/// Adafactor over named variables, f32 (masters) or bf16 (rounded stochastically after
/// each update: [`tensorbake_nn::ops::stochastic_round_bf16`], seeded by the config's
/// seed, the variable's name and its step, so the rounding does not depend on the order
/// the variables are updated in). The state is f32 whatever the variable's dtype:
/// `R + C` numbers for an `R x C` matrix.
#[derive(Debug)]
pub struct Adafactor {
    cfg: AdafactorConfig,
    vars: Vec<(String, Var)>,
    index: std::collections::HashMap<candle_core::TensorId, usize>,
    moments: Vec<SecondMoment>,
    /// Updates per variable (transformers keeps `state["step"]` per parameter).
    var_steps: Vec<u64>,
    step: u64,
}

/// `rms(x) = ||x|| / sqrt(numel)`.
fn rms(x: &Tensor) -> Result<f64> {
    Ok(f64::from(x.sqr()?.mean_all()?.to_scalar::<f32>()?).sqrt())
}

impl Adafactor {
    /// An optimizer over `vars` (f32 or bf16), its moments at zero.
    ///
    /// # Errors
    /// A variable that is neither f32 nor bf16; candle errors.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdafactorConfig) -> Result<Self> {
        let mut moments = Vec::with_capacity(vars.len());
        let mut index = std::collections::HashMap::new();
        for (i, (name, var)) in vars.iter().enumerate() {
            if !matches!(var.dtype(), DType::F32 | DType::BF16) {
                candle_core::bail!(
                    "Adafactor: variable {name} is {:?}; master weights are f32 or bf16",
                    var.dtype()
                );
            }
            index.insert(var.as_tensor().id(), i);
            let dims = var.dims();
            let dev = var.device();
            moments.push(if dims.len() >= 2 {
                let r = dims.len();
                let mut col = dims[..r - 2].to_vec();
                col.push(dims[r - 1]);
                SecondMoment::Factored {
                    row: Tensor::zeros(&dims[..r - 1], DType::F32, dev)?,
                    col: Tensor::zeros(col, DType::F32, dev)?,
                }
            } else {
                SecondMoment::Full(Tensor::zeros(dims, DType::F32, dev)?)
            });
        }
        let n = vars.len();
        Ok(Self {
            cfg,
            vars,
            index,
            moments,
            var_steps: vec![0; n],
            step: 0,
        })
    }

    /// Optimizer steps done so far.
    #[must_use]
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The variables, by name.
    #[must_use]
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The position of a variable among [`Adafactor::vars`].
    #[must_use]
    pub fn position(&self, var: &Var) -> Option<usize> {
        self.index.get(&var.as_tensor().id()).copied()
    }

    /// Updates variable `i` with its gradient `g` at learning rate `lr` (what a step
    /// does for each variable; called alone during a backward).
    ///
    /// # Errors
    /// candle errors (shape mismatch).
    pub fn update_one(&mut self, i: usize, g: &Tensor, lr: f64) -> Result<()> {
        let (name, var) = &self.vars[i];
        self.var_steps[i] += 1;
        let t = self.var_steps[i];
        let beta2t = 1.0 - (t as f64).powf(self.cfg.decay_rate);
        let g = g.to_dtype(DType::F32)?;
        let sq = (g.sqr()? + self.cfg.eps.0)?;
        let update = match &mut self.moments[i] {
            SecondMoment::Factored { row, col } => {
                let r = sq.rank();
                *row = ((&*row * beta2t)? + (sq.mean(r - 1)? * (1.0 - beta2t))?)?;
                *col = ((&*col * beta2t)? + (sq.mean(r - 2)? * (1.0 - beta2t))?)?;
                let rf = row
                    .broadcast_div(&row.mean_keepdim(r - 2)?)?
                    .sqrt()?
                    .recip()?
                    .unsqueeze(r - 1)?;
                let cf = col.sqrt()?.recip()?.unsqueeze(r - 2)?;
                rf.broadcast_mul(&cf)?.mul(&g)?
            }
            SecondMoment::Full(v) => {
                *v = ((&*v * beta2t)? + (&sq * (1.0 - beta2t))?)?;
                v.sqrt()?.recip()?.mul(&g)?
            }
        };
        let denom = (rms(&update)? / self.cfg.clip_threshold).max(1.0);
        let update = (update * (lr / denom))?;
        let p = var.as_tensor().to_dtype(DType::F32)?;
        let p = if self.cfg.weight_decay == 0.0 {
            p
        } else {
            (&p * (1.0 - self.cfg.weight_decay * lr))?
        };
        let p = (p - update)?;
        let p = if var.dtype() == DType::BF16 {
            let seed = tensorbake_kit::rng::SplitMix64::for_name(
                self.cfg.seed,
                &format!("round {name} {t}"),
            )
            .next_u64();
            tensorbake_nn::ops::stochastic_round_bf16(&p, seed)?
        } else {
            p
        };
        var.set(&p)
    }

    /// One step: each variable with a gradient updated ([`Adafactor::update_one`]); a
    /// `None` gradient (none, or already applied during the backward) leaves it.
    ///
    /// # Errors
    /// candle errors (shape mismatch).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        for (i, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                self.update_one(i, g, lr)?;
            }
        }
        Ok(())
    }

    /// The state to checkpoint: `row.<name>` / `col.<name>` or `v.<name>` tensors and
    /// `step.<name>` (one-element) per variable, and the step count.
    ///
    /// # Errors
    /// candle errors.
    pub fn state(&self) -> Result<(BTreeMap<String, Tensor>, u64)> {
        let mut t = BTreeMap::new();
        for (i, (name, var)) in self.vars.iter().enumerate() {
            match &self.moments[i] {
                SecondMoment::Factored { row, col } => {
                    t.insert(format!("row.{name}"), row.clone());
                    t.insert(format!("col.{name}"), col.clone());
                }
                SecondMoment::Full(v) => {
                    t.insert(format!("v.{name}"), v.clone());
                }
            }
            t.insert(
                format!("step.{name}"),
                Tensor::new(&[self.var_steps[i] as f32], var.device())?,
            );
        }
        Ok((t, self.step))
    }

    /// Restores an [`Adafactor::state`].
    ///
    /// # Errors
    /// A tensor missing or of the wrong shape, naming it.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        let get = |key: String, like: &Tensor| -> Result<Tensor> {
            let t = tensors.get(&key).ok_or_else(|| {
                candle_core::Error::Msg(format!("optimizer state has no `{key}`"))
            })?;
            if t.dims() != like.dims() {
                candle_core::bail!(
                    "optimizer state `{key}` has shape {:?}, want {:?}",
                    t.dims(),
                    like.dims()
                );
            }
            t.to_dtype(DType::F32)?.to_device(like.device())
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            match &mut self.moments[i] {
                SecondMoment::Factored { row, col } => {
                    *row = get(format!("row.{name}"), row)?;
                    *col = get(format!("col.{name}"), col)?;
                }
                SecondMoment::Full(v) => *v = get(format!("v.{name}"), v)?,
            }
            let one = Tensor::zeros(1, DType::F32, var.device())?;
            let s = get(format!("step.{name}"), &one)?.to_vec1::<f32>()?[0];
            self.var_steps[i] = s as u64;
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

/// A run's optimizer: AdamW, or Adafactor (shared with the update hook of the
/// backward, [`Optimizer::in_backward`]).
#[derive(Debug)]
pub enum Optimizer {
    /// AdamW.
    AdamW(AdamW),
    /// Adafactor.
    Adafactor(Arc<Mutex<Adafactor>>),
}

fn locked(a: &Mutex<Adafactor>) -> std::sync::MutexGuard<'_, Adafactor> {
    a.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Optimizer {
    /// The variables, by name.
    #[must_use]
    pub fn vars(&self) -> Vec<(String, Var)> {
        match self {
            Self::AdamW(o) => o.vars().to_vec(),
            Self::Adafactor(o) => locked(o).vars().to_vec(),
        }
    }

    /// One update with the gradients not applied during the backward.
    ///
    /// # Errors
    /// candle errors.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        match self {
            Self::AdamW(o) => o.step(grads, lr),
            Self::Adafactor(o) => locked(o).step(grads, lr),
        }
    }

    /// The state to checkpoint and the step count.
    ///
    /// # Errors
    /// candle errors.
    pub fn state(&self) -> Result<(BTreeMap<String, Tensor>, u64)> {
        match self {
            Self::AdamW(o) => Ok(o.state()),
            Self::Adafactor(o) => locked(o).state(),
        }
    }

    /// Restores a saved [`Optimizer::state`].
    ///
    /// # Errors
    /// A tensor missing or of the wrong shape, naming it.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        match self {
            Self::AdamW(o) => o.load_state(tensors, step),
            Self::Adafactor(o) => locked(o).load_state(tensors, step),
        }
    }

    /// The hook that updates each variable at learning rate `lr` as soon as a
    /// recomputed block's backward has its gradient (Adafactor; `None` for AdamW), adding
    /// the gradients' squared norms to `sq` (the step's logged gradient norm).
    #[must_use]
    pub fn in_backward(&self, lr: f64, sq: Arc<Mutex<f64>>) -> Option<ApplyFn> {
        let Self::Adafactor(o) = self else {
            return None;
        };
        let o = o.clone();
        Some(Arc::new(move |var: &Var, g: &Tensor| {
            let mut opt = locked(&o);
            let Some(i) = opt.position(var) else {
                return Ok(false);
            };
            let n = f64::from(
                g.to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?,
            );
            *sq.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += n;
            opt.update_one(i, g, lr)?;
            Ok(true)
        }))
    }
}

/// An exponential moving average of variables: `ema = d * ema + (1 - d) * p` (in f32
/// whatever the masters' dtype).
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
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::F32)?.copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { decay, shadow })
    }

    /// Moves toward the variables' current values (call after each optimizer step).
    ///
    /// # Errors
    /// candle errors.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        for ((_, s), (_, v)) in self.shadow.iter_mut().zip(vars) {
            let v = v.as_tensor().to_dtype(DType::F32)?;
            *s = ((&*s * self.decay)? + (v * (1.0 - self.decay))?)?;
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

    /// Five steps equal transformers' `Adafactor` (goldens from
    /// `tests/fixtures/optim/make_adafactor_golden.py`), with a step where one variable
    /// has no gradient; a saved and restored state continues identically.
    #[test]
    fn adafactor_matches_transformers() -> Result<()> {
        let dev = Device::Cpu;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/optim/golden.safetensors");
        let g = candle_core::safetensors::load(path, &dev)?;
        let names = ["w", "b", "k"];
        let vars: Vec<(String, Var)> = names
            .iter()
            .map(|n| Ok((n.to_string(), Var::from_tensor(&g[&format!("init.{n}")])?)))
            .collect::<Result<_>>()?;
        let cfg = AdafactorConfig {
            weight_decay: 0.01,
            ..AdafactorConfig::default()
        };
        let mut opt = Adafactor::new(vars.clone(), cfg)?;
        let grads_of = |k: usize| -> Vec<Option<Tensor>> {
            names
                .iter()
                .map(|n| g.get(&format!("grad{k}.{n}")).cloned())
                .collect()
        };
        for k in 1..=3 {
            opt.step(&grads_of(k), 1e-2)?;
        }
        // the rest of the run from a restored state
        let (state, steps) = opt.state()?;
        let vars2: Vec<(String, Var)> = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
            .collect::<Result<_>>()?;
        let mut opt2 = Adafactor::new(vars2.clone(), cfg)?;
        opt2.load_state(&state, steps)?;
        for k in 4..=5 {
            opt.step(&grads_of(k), 1e-2)?;
            opt2.step(&grads_of(k), 1e-2)?;
        }
        assert_eq!(opt.steps(), 5);
        for ((n, v), (_, v2)) in vars.iter().zip(&vars2) {
            let want = &g[&format!("final.{n}")];
            let moved = (want - &g[&format!("init.{n}")])?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let err = (v.as_tensor() - want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(moved > 1e-3, "{n} barely moves ({moved})");
            assert!(err < 1e-5, "{n}: off transformers by {err} (moved {moved})");
            assert_eq!(
                v.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                v2.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                "{n}: the restored optimizer diverges"
            );
        }
        Ok(())
    }

    /// bf16 masters: updates far below half a bf16 place still move the weight on
    /// average (stochastic rounding), where rounding to nearest would leave it; the
    /// state stays f32.
    #[test]
    fn adafactor_keeps_bf16_masters_moving_by_stochastic_rounding() -> Result<()> {
        let dev = Device::Cpu;
        let n = 4096;
        let w0 = Tensor::ones((1, n), DType::BF16, &dev)?;
        let var = Var::from_tensor(&w0)?;
        let mut opt = Adafactor::new(vec![("w".into(), var.clone())], AdafactorConfig::default())?;
        // the update's RMS clips to 1, so each step moves by lr = 1e-4: 1/78 of the
        // bf16 spacing (2^-7) just below 1
        let lr = 1e-4;
        let steps = 200;
        for _ in 0..steps {
            opt.step(&[Some(Tensor::ones((1, n), DType::F32, &dev)?)], lr)?;
        }
        assert_eq!(var.dtype(), DType::BF16);
        let mean = var
            .as_tensor()
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        let want = 1.0 - lr as f32 * steps as f32;
        assert!(
            (mean - want).abs() < 2e-3,
            "mean {mean}, exact {want} (round to nearest would stay at 1)"
        );
        let (state, _) = opt.state()?;
        assert!(state.values().all(|t| t.dtype() == DType::F32));
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
