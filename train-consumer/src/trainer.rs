//! The training loop, whatever is trained: a [`Task`] (a mode over its models) says
//! which store arrays it reads, which variables train, how a micro-batch becomes a
//! loss and gradients, and how weights are saved; the [`Trainer`] does the rest:
//! seeded epochs from the store, gradient accumulation, clipping, AdamW, EMA, the
//! learning-rate schedule, `log.jsonl`, `loss.png`, checkpoints, resume and stopping.
//!
//! Resume is bit-identical to an uninterrupted run: everything random comes from the
//! saved noise stream, the data order is a function of `(seed, epoch)` and the saved
//! position, and the variables, moments and EMA are restored in f32 exactly.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use tensorbake_store::{Batch, Loader, LoaderConfig, StoreReader};

use crate::checkpoint::{self, EMA_DIR, OPTIMIZER_FILE, TrainerState};
use crate::config::TrainConfig;
use crate::lr::Lr;
use crate::noise::Noise;
use crate::optim::{
    Adafactor, AdafactorConfig, AdamW, AdamWConfig, Ema, Optimizer, clip_grad_norm,
};
use crate::recompute::SideGrads;
use crate::{TrainError, plot};

/// Losses of one micro-batch (means over its samples).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Losses {
    /// The optimised loss.
    pub loss: f64,
    /// Its epsilon-MSE part.
    pub mse: f64,
    /// Its variational-bound part (0 without learned variance).
    pub vb: f64,
}

/// A mode over its models: what the loop needs to know.
pub trait Task {
    /// The store arrays a batch must hold.
    fn arrays(&self) -> Vec<String>;
    /// The trainable variables (f32 or bf16 masters), by the name they are saved under.
    fn vars(&self) -> Vec<(String, Var)>;
    /// Forward and backward of one micro-batch of optimizer step `step` (1-based; the
    /// warm-up schedules read it): its losses, and the gradients of `loss * scale` for
    /// each of [`Task::vars`], in that order (`None`: no gradient).
    ///
    /// # Errors
    /// candle errors.
    fn step(
        &self,
        batch: &Batch,
        noise: &mut Noise,
        scale: f64,
        step: u64,
    ) -> candle_core::Result<(Losses, Vec<Option<Tensor>>)> {
        self.step_with(batch, noise, scale, step, &SideGrads::default())
    }
    /// [`Task::step`] with the recomputed blocks' parameter gradients going through
    /// `side` (gradient checkpointing): kept for the returned list, or applied by an
    /// optimizer during the backward ([`SideGrads::applying`]; `None` returned for
    /// those).
    ///
    /// # Errors
    /// candle errors.
    fn step_with(
        &self,
        batch: &Batch,
        noise: &mut Noise,
        scale: f64,
        step: u64,
        side: &SideGrads,
    ) -> candle_core::Result<(Losses, Vec<Option<Tensor>>)>;
    /// Writes the model files of `weights` (variable name -> tensor, the trained ones)
    /// into `dir`, in the layout users load (diffusers, BFL).
    ///
    /// # Errors
    /// I/O and encoding errors naming the file.
    fn save(&self, dir: &Path, weights: &BTreeMap<String, Tensor>) -> Result<(), TrainError>;
    /// The files [`Task::save`] writes into `dir` that hold the trained tensors under
    /// their variable names (what a resume reads back).
    fn saved_files(&self, dir: &Path) -> Vec<PathBuf>;
    /// Facts recorded in `OUT/config.json` beside the config (models, fingerprints).
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// A value that moves linearly from `start` to `end` over the first `steps` optimizer
/// steps and stays at `end` (`steps = 0`: `end` throughout): the warm-ups of the
/// conditioning dropout and of Flux's pooled blend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    /// The value at step 1.
    pub start: f64,
    /// The value from step `steps + 1` on.
    pub end: f64,
    /// The steps of the ramp.
    pub steps: u64,
}

impl Ramp {
    /// The conditioning-dropout probability of a config: `cond_dropout`, or the ramp to
    /// it from `cond_dropout_start` over `cond_dropout_ramp_steps`.
    #[must_use]
    pub fn dropout(cfg: &TrainConfig) -> Self {
        Self {
            start: cfg.cond_dropout_start.unwrap_or(cfg.cond_dropout),
            end: cfg.cond_dropout,
            steps: cfg.cond_dropout_ramp_steps,
        }
    }

    /// The value at optimizer step `step` (1-based).
    #[must_use]
    pub fn at(&self, step: u64) -> f64 {
        if self.steps == 0 {
            return self.end;
        }
        let f = (step.saturating_sub(1) as f64 / self.steps as f64).min(1.0);
        self.start + (self.end - self.start) * f
    }
}

/// `x` `[B, ...]` with the samples in `dropped` replaced by `null` (the condition of
/// nothing, `x`'s per-sample shape): conditioning dropout, differentiable in both.
///
/// # Errors
/// candle errors (shapes).
pub fn replace_dropped(x: &Tensor, null: &Tensor, dropped: &[bool]) -> candle_core::Result<Tensor> {
    if !dropped.iter().any(|&d| d) {
        return Ok(x.clone());
    }
    let keep: Vec<f32> = dropped.iter().map(|&d| if d { 0.0 } else { 1.0 }).collect();
    let mut shape = vec![dropped.len()];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    let keep = Tensor::from_vec(keep, shape, x.device())?.to_dtype(x.dtype())?;
    let drop = (1.0 - &keep)?;
    x.broadcast_mul(&keep)? + null.unsqueeze(0)?.broadcast_mul(&drop)?
}

/// A model path of a config: relative to the config's directory `base` when it exists
/// there, else as given (an absolute path, a hub id).
#[must_use]
pub fn resolve_spec(base: &Path, spec: &str) -> String {
    let rel = base.join(spec);
    if Path::new(spec).is_relative() && rel.exists() {
        rel.to_string_lossy().into_owned()
    } else {
        spec.to_string()
    }
}

/// One line of `OUT/log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// Optimizer step (1-based).
    pub step: u64,
    /// The loss (mean over the step's samples).
    pub loss: f64,
    /// Its epsilon-MSE part.
    pub loss_mse: f64,
    /// Its variational-bound part.
    pub loss_vb: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The gradient's global norm before clipping.
    pub grad_norm: f64,
    /// Training throughput of this step.
    pub samples_per_s: f64,
    /// The data epoch the step's last micro-batch came from.
    pub epoch: u64,
    /// Seconds since this process started training.
    pub elapsed_s: f64,
    /// Seconds the validation grid written after this step took (apart from
    /// `samples_per_s`, which times the step alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_s: Option<f64>,
}

/// Writes a validation grid for the task at a step; returns the file.
pub type Validator<T> = Box<dyn FnMut(&T, u64) -> Result<PathBuf, TrainError>>;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every step done; the final checkpoint.
    Finished(PathBuf),
    /// Stopped early (SIGINT); the checkpoint written on the way out.
    Stopped(PathBuf),
}

/// A configured run, ready to go (nothing written yet).
pub struct Trainer<T: Task> {
    cfg: TrainConfig,
    task: T,
    reader: Arc<StoreReader>,
    device: Device,
    out: PathBuf,
    opt: Optimizer,
    ema: Option<Ema>,
    lr: Lr,
    noise: Noise,
    state: TrainerState,
    batches_per_epoch: usize,
    history: Vec<(u64, f64)>,
    resumed_from: Option<PathBuf>,
    validation: Option<(u64, Validator<T>)>,
}

impl<T: Task> std::fmt::Debug for Trainer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("mode", &self.cfg.mode)
            .field("out", &self.out)
            .field("step", &self.state.step)
            .finish_non_exhaustive()
    }
}

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// A fresh run (refused if `out` already holds checkpoints).
    No,
    /// The newest complete checkpoint in `out`.
    Latest,
    /// This checkpoint directory.
    From(PathBuf),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Config keys that may change when a run is resumed (they do not change what is
/// computed, only how long, where or how often it is saved).
const RESUMABLE_KEYS: [&str; 5] = [
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "prefetch",
    "out",
];

impl<T: Task> Trainer<T> {
    /// Sets up a run of `task` on `reader` into `out`. Checks that the store can feed
    /// a step (enough samples for a batch), and on resume that the checkpoint is this
    /// run's (same mode, same variables, same config but for [`RESUMABLE_KEYS`]).
    /// Writes nothing.
    ///
    /// # Errors
    /// [`TrainError::Store`] for a store too small; [`TrainError::Checkpoint`] for a
    /// checkpoint that does not fit; [`TrainError::Config`] when `out` holds
    /// checkpoints and no resume was asked for.
    pub fn new(
        cfg: TrainConfig,
        task: T,
        reader: Arc<StoreReader>,
        device: Device,
        out: PathBuf,
        resume: Resume,
    ) -> Result<Self, TrainError> {
        let n = reader.len();
        let batches_per_epoch = (n / cfg.batch_size as u64) as usize;
        if batches_per_epoch == 0 {
            return Err(TrainError::Store {
                store: reader.location().to_string(),
                why: format!(
                    "{n} committed samples, fewer than one batch of {} (lower `batch_size` or run `tensorbake run` on more shards)",
                    cfg.batch_size
                ),
            });
        }
        let vars = task.vars();
        if vars.is_empty() {
            return Err(TrainError::Config(format!(
                "mode `{}` has nothing to train with this configuration",
                cfg.mode
            )));
        }
        let step_err = |source| TrainError::Step { step: 0, source };
        let mut opt = match cfg.optimizer {
            crate::config::OptimizerKind::Adamw => {
                let opt_cfg = AdamWConfig {
                    betas: cfg.adam_betas,
                    eps: cfg.adam_eps,
                    weight_decay: cfg.weight_decay,
                };
                Optimizer::AdamW(AdamW::new(vars.clone(), opt_cfg).map_err(step_err)?)
            }
            crate::config::OptimizerKind::Adafactor => {
                let opt_cfg = AdafactorConfig {
                    weight_decay: cfg.weight_decay,
                    seed: cfg.seed,
                    ..AdafactorConfig::default()
                };
                Optimizer::Adafactor(Arc::new(std::sync::Mutex::new(
                    Adafactor::new(vars.clone(), opt_cfg).map_err(step_err)?,
                )))
            }
        };
        let mut ema = cfg
            .ema
            .map(|d| Ema::new(&vars, d))
            .transpose()
            .map_err(step_err)?;
        let mut noise = Noise::new(cfg.seed);
        let mut state = TrainerState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            noise: noise.state(),
            samples_seen: 0,
            mode: cfg.mode,
            trained: vars.iter().map(|(n, _)| n.clone()).collect(),
            ema: cfg.ema.is_some(),
            tensorbake: env!("CARGO_PKG_VERSION").to_string(),
        };
        let existing = checkpoint::list(&out);
        let from = match resume {
            Resume::No => {
                if let Some((step, dir)) = existing.last() {
                    return Err(TrainError::Config(format!(
                        "{} already holds checkpoints (latest {}, step {step}): pass --resume to continue that run, or choose another `out`",
                        out.display(),
                        dir.display()
                    )));
                }
                None
            }
            Resume::Latest => Some(existing.last().map(|(_, d)| d.clone()).ok_or_else(|| {
                TrainError::Checkpoint {
                    path: out.clone(),
                    why: "--resume: no complete checkpoint in this directory".into(),
                }
            })?),
            Resume::From(dir) => Some(dir),
        };
        let mut history = Vec::new();
        if let Some(dir) = &from {
            let saved = checkpoint::read_state(dir)?;
            let bad = |why: String| TrainError::Checkpoint {
                path: dir.clone(),
                why,
            };
            if saved.mode != cfg.mode {
                return Err(bad(format!(
                    "was written by mode `{}`, this config is mode `{}`",
                    saved.mode, cfg.mode
                )));
            }
            if saved.trained != state.trained {
                return Err(bad(
                    "trains other variables than this config (different train_blocks or model)"
                        .into(),
                ));
            }
            check_same_config(&out, &cfg).map_err(bad)?;
            load_trained(&task, dir, &device)?;
            let moments = load_tensors(&[dir.join(OPTIMIZER_FILE)], &device).map_err(&bad)?;
            opt.load_state(&moments, saved.step)
                .map_err(|e| bad(e.to_string()))?;
            if let Some(ema) = &mut ema {
                if !saved.ema {
                    return Err(bad(
                        "has no EMA weights, but this config asks for `ema`".into()
                    ));
                }
                let averaged =
                    load_tensors(&task.saved_files(&dir.join(EMA_DIR)), &device).map_err(&bad)?;
                ema.load(&averaged).map_err(|e| bad(e.to_string()))?;
            }
            noise = Noise::from_state(saved.noise);
            history = read_history(&out.join("log.jsonl"), saved.step);
            state = TrainerState {
                trained: state.trained,
                ema: state.ema,
                ..saved
            };
        }
        Ok(Self {
            lr: Lr::new(&cfg),
            cfg,
            task,
            reader,
            device,
            out,
            opt,
            ema,
            noise,
            state,
            batches_per_epoch,
            history,
            resumed_from: from,
            validation: None,
        })
    }

    /// Calls `validate` every `every` steps and after the last one (validation grids);
    /// its time is logged as `validation_s`, apart from the step's.
    pub fn set_validation(&mut self, every: u64, validate: Validator<T>) {
        self.validation = Some((every, validate));
    }

    /// The step the run starts from (0 when fresh).
    #[must_use]
    pub fn start_step(&self) -> u64 {
        self.state.step
    }

    /// The checkpoint it resumes from, if any.
    #[must_use]
    pub fn resumed_from(&self) -> Option<&Path> {
        self.resumed_from.as_deref()
    }

    /// The task.
    #[must_use]
    pub fn task(&self) -> &T {
        &self.task
    }

    /// Trains to `cfg.steps`, calling `on_step` after each step; stops early (with a
    /// checkpoint) when `stop` is set.
    ///
    /// # Errors
    /// I/O errors writing the outputs; candle errors of a step (naming it); store read
    /// errors.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        on_step: &mut dyn FnMut(&StepLog),
    ) -> Result<Outcome, TrainError> {
        std::fs::create_dir_all(&self.out).map_err(io(&self.out))?;
        checkpoint::remove_partial(&self.out);
        self.write_config()?;
        let log_path = self.out.join("log.jsonl");
        // A resumed run redoes the steps after its checkpoint: drop their old lines.
        rewrite_log(&log_path, self.state.step)?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        let started = Instant::now();
        let mut loader: Option<Loader> = None;
        let mut last_saved = self.resumed_from.as_ref().map(|_| self.state.step);
        while self.state.step < self.cfg.steps {
            if stop.load(Ordering::SeqCst) {
                let dir = if last_saved == Some(self.state.step) {
                    checkpoint::checkpoint_dir(&self.out, self.state.step)
                } else {
                    self.save_checkpoint()?
                };
                return Ok(Outcome::Stopped(dir));
            }
            let mut entry = self.one_step(&mut loader, started)?;
            let step = entry.step;
            if let Some((every, validate)) = &mut self.validation
                && (step.is_multiple_of(*every) || step == self.cfg.steps)
            {
                let t0 = Instant::now();
                let path = validate(&self.task, step)?;
                let secs = t0.elapsed().as_secs_f64();
                tracing::info!(step, path = %path.display(), seconds = secs, "validation grid written");
                entry.validation_s = Some(secs);
            }
            let line = serde_json::to_string(&entry).unwrap_or_default();
            writeln!(log, "{line}").map_err(io(&log_path))?;
            self.history.push((step, entry.loss));
            on_step(&entry);
            if step.is_multiple_of(self.cfg.checkpoint_every) && step < self.cfg.steps {
                self.save_checkpoint()?;
                last_saved = Some(step);
            }
        }
        log.flush().map_err(io(&log_path))?;
        let dir = if last_saved == Some(self.state.step) {
            checkpoint::checkpoint_dir(&self.out, self.state.step)
        } else {
            self.save_checkpoint()?
        };
        Ok(Outcome::Finished(dir))
    }

    /// One optimizer step (its `grad_accum` micro-batches, clipping, AdamW, EMA): the
    /// state advances, nothing is written.
    fn one_step(
        &mut self,
        loader: &mut Option<Loader>,
        started: Instant,
    ) -> Result<StepLog, TrainError> {
        let t0 = Instant::now();
        let step = self.state.step + 1;
        let step_err = |source| TrainError::Step { step, source };
        let vars = self.task.vars();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut sums = Losses::default();
        let scale = 1.0 / self.cfg.grad_accum as f64;
        let lr = self.lr.at(step);
        // With `update_in_backward`, each recomputed block's tensors are updated in its
        // backward; the rest after it, below.
        let applied_sq = Arc::new(std::sync::Mutex::new(0f64));
        let side = match self.cfg.update_in_backward {
            true => self
                .opt
                .in_backward(lr, applied_sq.clone())
                .map_or_else(SideGrads::default, SideGrads::applying),
            false => SideGrads::default(),
        };
        for _ in 0..self.cfg.grad_accum {
            let batch = self.next_batch(loader)?;
            let (l, grads) = self
                .task
                .step_with(&batch, &mut self.noise, scale, step, &side)
                .map_err(step_err)?;
            sums.loss += l.loss * scale;
            sums.mse += l.mse * scale;
            sums.vb += l.vb * scale;
            for (a, g) in acc.iter_mut().zip(grads) {
                *a = match (a.take(), g) {
                    (Some(a), Some(g)) => Some((a + g).map_err(step_err)?),
                    (a, g) => a.or(g),
                };
            }
            self.state.samples_seen += batch.keys.len() as u64;
        }
        let rest = clip_grad_norm(&mut acc, self.cfg.grad_clip).map_err(step_err)?;
        let applied = *applied_sq
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let grad_norm = (rest * rest + applied).sqrt();
        self.opt.step(&acc, lr).map_err(step_err)?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.opt.vars()).map_err(step_err)?;
        }
        self.state.step = step;
        self.state.noise = self.noise.state();
        let secs = t0.elapsed().as_secs_f64();
        Ok(StepLog {
            step,
            loss: sums.loss,
            loss_mse: sums.mse,
            loss_vb: sums.vb,
            lr,
            grad_norm,
            samples_per_s: (self.cfg.batch_size * self.cfg.grad_accum) as f64 / secs.max(1e-9),
            epoch: self.state.epoch,
            elapsed_s: started.elapsed().as_secs_f64(),
            validation_s: None,
        })
    }

    /// Runs `n` steps as [`Trainer::run`] does, writing nothing (no log, checkpoint or
    /// validation): what `tensorbake bench train` times. `on_step` sees each step's
    /// line.
    ///
    /// # Errors
    /// candle errors of a step (naming it); store read errors.
    pub fn bench_steps(
        &mut self,
        n: u64,
        on_step: &mut dyn FnMut(&StepLog),
    ) -> Result<(), TrainError> {
        let started = Instant::now();
        let mut loader: Option<Loader> = None;
        for _ in 0..n {
            let entry = self.one_step(&mut loader, started)?;
            on_step(&entry);
        }
        Ok(())
    }

    /// The next micro-batch, opening the next epoch's loader when one ends.
    fn next_batch(&mut self, loader: &mut Option<Loader>) -> Result<Batch, TrainError> {
        loop {
            if self.state.batch_in_epoch >= self.batches_per_epoch {
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
                *loader = None;
            }
            if loader.is_none() {
                let mut c = LoaderConfig::new(
                    self.cfg.seed,
                    self.state.epoch,
                    self.cfg.batch_size,
                    self.task.arrays(),
                );
                c.drop_last = true;
                c.start_batch = self.state.batch_in_epoch;
                c.prefetch_threads = self.cfg.prefetch;
                c.device = self.device.clone();
                *loader = Some(Loader::new(self.reader.clone(), &c)?);
            }
            match loader.as_mut().and_then(Iterator::next) {
                Some(b) => {
                    self.state.batch_in_epoch += 1;
                    return Ok(b?);
                }
                None => {
                    // the epoch ended early (cannot happen with drop_last); next one
                    self.state.batch_in_epoch = self.batches_per_epoch;
                }
            }
        }
    }

    /// Writes `OUT/checkpoint-<step>/`, prunes old ones, redraws `loss.png`.
    fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let step = self.state.step;
        let step_err = |source| TrainError::Step { step, source };
        let weights: BTreeMap<String, Tensor> = self
            .opt
            .vars()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let (moments, _) = self.opt.state().map_err(step_err)?;
        let ema = self.ema.as_ref().map(Ema::tensors);
        let task = &self.task;
        let dir = checkpoint::write(&self.out, &self.state, |dir| {
            task.save(dir, &weights)?;
            let path = dir.join(OPTIMIZER_FILE);
            save_safetensors(&moments, &path).map_err(step_err)?;
            if let Some(ema) = &ema {
                let e = dir.join(EMA_DIR);
                std::fs::create_dir_all(&e).map_err(io(&e))?;
                task.save(&e, ema)?;
            }
            Ok(())
        })?;
        checkpoint::prune(&self.out, self.cfg.keep_checkpoints);
        self.plot()?;
        tracing::info!(step, path = %dir.display(), "checkpoint written");
        Ok(dir)
    }

    fn plot(&self) -> Result<(), TrainError> {
        let path = self.out.join("loss.png");
        let title = format!(
            "{} loss (smoothed), step {}",
            self.cfg.mode, self.state.step
        );
        plot::loss_png(&self.history, &title, &path).map_err(io(&path))
    }

    /// `OUT/config.json`: every value the run uses, and what the task says of itself.
    fn write_config(&self) -> Result<(), TrainError> {
        let path = self.out.join("config.json");
        let v = serde_json::json!({
            "config": self.cfg,
            "models": self.task.describe(),
            "store": {
                "location": self.reader.location().to_string(),
                "samples": self.reader.len(),
                "batches_per_epoch": self.batches_per_epoch,
            },
            "trained": {
                "variables": self.state.trained.len(),
                "elements": self.opt.vars().iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
            },
        });
        let text = serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
        std::fs::write(&path, text).map_err(io(&path))
    }
}

/// On resume the config must equal the run's recorded one but for [`RESUMABLE_KEYS`].
fn check_same_config(out: &Path, cfg: &TrainConfig) -> Result<(), String> {
    let path = out.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(()); // a checkpoint copied elsewhere: nothing to compare with
    };
    let Ok(saved) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Err(format!("{} is not JSON", path.display()));
    };
    let now = serde_json::to_value(cfg).unwrap_or_default();
    let (Some(a), Some(b)) = (saved["config"].as_object(), now.as_object()) else {
        return Ok(());
    };
    for (k, v) in b {
        if RESUMABLE_KEYS.contains(&k.as_str()) {
            continue;
        }
        if a.get(k) != Some(v) {
            return Err(format!(
                "the run was started with `{k}` = {}, this config has {v}; a resumed run must compute the same steps (only {} may change)",
                a.get(k).map_or("(absent)".to_string(), ToString::to_string),
                RESUMABLE_KEYS.join(", ")
            ));
        }
    }
    Ok(())
}

/// Sets the task's variables to the trained weights a checkpoint (or its `ema/`) holds
/// (a resume; a sampler of the checkpoint).
///
/// # Errors
/// [`TrainError::Checkpoint`] naming the directory and the tensor missing or unfit.
pub fn load_trained<T: Task>(task: &T, dir: &Path, device: &Device) -> Result<(), TrainError> {
    let bad = |why: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        why,
    };
    let trained = load_tensors(&task.saved_files(dir), device).map_err(&bad)?;
    for (name, var) in task.vars() {
        let t = trained
            .get(&name)
            .ok_or_else(|| bad(format!("has no trained tensor `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(bad(format!(
                "`{name}` has shape {:?}, the model's is {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype()).map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(format!("`{name}`: {e}")))?;
    }
    Ok(())
}

/// Tensors of safetensors files, by name, on `device`.
fn load_tensors(files: &[PathBuf], device: &Device) -> Result<BTreeMap<String, Tensor>, String> {
    let mut out = BTreeMap::new();
    for f in files {
        let t = candle_core::safetensors::load(f, device)
            .map_err(|e| format!("{}: {e}", f.display()))?;
        out.extend(t);
    }
    Ok(out)
}

/// Saves tensors (moved to the CPU) as one safetensors file, atomically.
///
/// # Errors
/// candle errors (I/O included).
pub fn save_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
) -> candle_core::Result<()> {
    let cpu: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&cpu, &tmp)?;
    std::fs::rename(&tmp, path).map_err(candle_core::Error::wrap)
}

/// The `(step, loss)` points of `log.jsonl` up to `up_to`.
fn read_history(path: &Path, up_to: u64) -> Vec<(u64, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<StepLog>(l).ok())
        .filter(|e| e.step <= up_to)
        .map(|e| (e.step, e.loss))
        .collect()
}

/// Keeps the lines of `log.jsonl` up to step `up_to` (a fresh run: none).
fn rewrite_log(path: &Path, up_to: u64) -> Result<(), TrainError> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|e| e.step <= up_to))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(io(path))
}

#[cfg(test)]
#[path = "trainer_tests.rs"]
mod tests;
