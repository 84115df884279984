//! `tensorbake train CONFIG.toml [--resume [CHECKPOINT]]`: trains a PixArt or Flux mode
//! from a store (docs/train.md).
//!
//! Everything is checked before the first step and before anything is written: the
//! config (unknown keys with file:line), the store's features, shapes and null
//! embeddings against the mode and the model, the weights. Progress goes to stderr
//! (a bar with the loss and samples/s on a terminal, a plain line every
//! `--progress-interval` seconds otherwise). SIGINT or SIGTERM finishes the current
//! step, writes a checkpoint and exits 130; a second one exits at once.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tensorbake_kit::schema::Array;
use tensorbake_store::{Location, StoreReader};
use tensorbake_train::config::TrainConfig;
use tensorbake_train::flux_task::FluxTask;
use tensorbake_train::grid::Prompt;
use tensorbake_train::pixart_task::PixArtTask;
use tensorbake_train::pixart_task::PromptInput;
use tensorbake_train::sample::{
    GridSampler, SampleSettings, Sampler, SchedulerChoice, prompts_from_store,
};
use tensorbake_train::trainer::{Outcome, Resume, StepLog, Task, Trainer, Validator};

/// Train from a store.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The training config (TOML).
    config: PathBuf,
    /// Continue a run: from the newest checkpoint in `out` (no value) or the given one.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    resume: Option<String>,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, default_value_t = 10.0)]
    progress_interval: f64,
}

/// A path of the config, relative to its directory.
fn relative_to(base: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_relative() {
        base.join(path)
    } else {
        path.to_path_buf()
    }
}

/// The store of a config.
fn open_store(cfg: &TrainConfig, base: &Path) -> Result<Arc<StoreReader>> {
    let location: Location = if cfg.store.contains("://") {
        cfg.store.parse()?
    } else {
        Location::from(relative_to(base, &cfg.store))
    };
    Ok(Arc::new(StoreReader::open(&location).with_context(
        || format!("opening the store {location}"),
    )?))
}

/// A task's constructor and its validation grids, as [`build_with`] takes them.
type BuildTask<T> = fn(&TrainConfig, &Path, &Arc<StoreReader>, &candle_core::Device) -> Result<T>;
type BuildValidator<T> = fn(&TrainConfig, &Path, &StoreReader, &T, &Path) -> Result<Validator<T>>;

/// Builds a run of the task `make` builds, with its validation grids when asked for
/// (nothing written on error).
fn build_with<T: Task + 'static>(
    cfg: TrainConfig,
    base: &Path,
    resume: Resume,
    make: BuildTask<T>,
    validator: BuildValidator<T>,
) -> Result<Trainer<T>> {
    let device = tensorbake_nn::parse_device(&cfg.device)?;
    let reader = open_store(&cfg, base)?;
    let task = make(&cfg, base, &reader, &device)?;
    let out = relative_to(base, &cfg.out);
    let validation = match cfg.validation_every {
        Some(every) => Some((every, validator(&cfg, base, &reader, &task, &out)?)),
        None => None,
    };
    let mut trainer = Trainer::new(cfg, task, reader, device, out, resume)?;
    if let Some((every, v)) = validation {
        trainer.set_validation(every, v);
    }
    Ok(trainer)
}

/// Builds a Flux run (nothing written on error).
pub fn build_flux(cfg: TrainConfig, base: &Path, resume: Resume) -> Result<Trainer<FluxTask>> {
    build_with(
        cfg,
        base,
        resume,
        |c, b, r, d| Ok(FluxTask::build(c, b, r, d)?),
        flux_validator,
    )
}

/// Builds a PixArt run (nothing written on error).
pub fn build(cfg: TrainConfig, base: &Path, resume: Resume) -> Result<Trainer<PixArtTask>> {
    build_with(
        cfg,
        base,
        resume,
        |c, b, r, d| Ok(PixArtTask::build(c, b, r, d)?),
        validator,
    )
}

/// The validation prompts of a run, embedded once (the adapter they go through is the
/// live one, applied when a grid is made).
fn validation_prompts(
    cfg: &TrainConfig,
    base: &Path,
    reader: &StoreReader,
    sampler: &dyn GridSampler,
) -> Result<Vec<(Prompt, PromptInput)>> {
    use tensorbake_train::config::ValidationImages;
    Ok(match &cfg.validation_images {
        Some(ValidationImages::Paths(paths)) => {
            let paths: Vec<PathBuf> = paths.iter().map(|p| relative_to(base, p)).collect();
            super::sample::image_prompts(&paths, reader, base, None, &cfg.device, cfg.mode)?
        }
        Some(ValidationImages::FromStore { from_store }) => {
            prompts_from_store(reader, sampler, *from_store, cfg.seed)?
        }
        None => super::sample::text_prompts(&cfg.validation_prompts, reader, base, &cfg.device)?,
    })
}

/// Writes a validation grid as `DIR/step-<step>.png`.
fn write_grid(
    sampler: &dyn GridSampler,
    prompts: &[(Prompt, PromptInput)],
    n: usize,
    cell: u32,
    dir: &Path,
    step: u64,
) -> std::result::Result<PathBuf, tensorbake_train::TrainError> {
    let grid = sampler
        .grid(prompts, n, cell)
        .map_err(|source| tensorbake_train::TrainError::Step { step, source })?;
    let io = |source| tensorbake_train::TrainError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join(format!("step-{step}.png"));
    grid.save_png(&path).map_err(io)?;
    Ok(path)
}

/// A sampler made from a run's task and the parts a validator owns.
type MakeSampler<T, P> = for<'a> fn(&'a T, &'a P) -> Box<dyn GridSampler + 'a>;

/// The validation grids of a run: the prompts embedded once, then each grid sampled
/// with the live task and written as `OUT/samples/step-<step>.png`, seeded the same
/// every time.
fn grid_validator<T: 'static, P: 'static>(
    cfg: &TrainConfig,
    base: &Path,
    reader: &StoreReader,
    task: &T,
    out: &Path,
    parts: P,
    make: MakeSampler<T, P>,
) -> Result<Validator<T>> {
    let prompts = validation_prompts(cfg, base, reader, &*make(task, &parts))?;
    let n = cfg.validation_n;
    let cell = reader.spec().resolution.unwrap_or(256).min(256);
    let dir = out.join("samples");
    Ok(Box::new(move |task: &T, step: u64| {
        write_grid(&*make(task, &parts), &prompts, n, cell, &dir, step)
    }))
}

/// A PixArt run's validation grids: the store's VAE decoder, PixArt's DPM-Solver++.
fn validator(
    cfg: &TrainConfig,
    base: &Path,
    reader: &StoreReader,
    task: &PixArtTask,
    out: &Path,
) -> Result<Validator<PixArtTask>> {
    let vae = super::sample::store_vae(
        reader,
        base,
        None,
        Array::SdVaeMean,
        task.dtype(),
        task.device(),
    )?;
    let settings = SampleSettings {
        steps: cfg.validation_steps.unwrap_or(20),
        guidance: cfg.validation_guidance.unwrap_or(4.5),
        seed: cfg.seed,
    };
    let parts = (vae, SchedulerChoice::pixart_dpm(), settings);
    grid_validator(
        cfg,
        base,
        reader,
        task,
        out,
        parts,
        |task, (vae, scheduler, settings)| {
            Box::new(Sampler {
                task,
                vae,
                scheduler,
                settings: *settings,
            })
        },
    )
}

/// A Flux run's validation grids: the store's Flux VAE decoder, the flow-match
/// scheduler beside the transformer (else FLUX.1-dev's), true CFG or the embedded
/// guidance.
fn flux_validator(
    cfg: &TrainConfig,
    base: &Path,
    reader: &StoreReader,
    task: &FluxTask,
    out: &Path,
) -> Result<Validator<FluxTask>> {
    use tensorbake_train::flux_sample::{
        FluxSampleSettings, FluxSampler, FluxSchedulerChoice, default_true_cfg,
    };
    let vae = super::sample::store_vae(
        reader,
        base,
        None,
        Array::FluxVaeMean,
        task.dtype(),
        task.device(),
    )?;
    let spec =
        tensorbake_train::trainer::resolve_spec(base, cfg.flux.as_deref().unwrap_or_default());
    let scheduler = FluxSchedulerChoice::for_model(Path::new(&spec)).map_err(anyhow::Error::msg)?;
    let settings = FluxSampleSettings {
        steps: cfg.validation_steps.unwrap_or(28),
        true_cfg: cfg
            .validation_guidance
            .unwrap_or_else(|| default_true_cfg(task.guidance().is_some())),
        guidance: task.guidance(),
        seed: cfg.seed,
    };
    let parts = (vae, scheduler, settings);
    grid_validator(
        cfg,
        base,
        reader,
        task,
        out,
        parts,
        |task, (vae, scheduler, settings)| {
            Box::new(FluxSampler {
                task,
                vae,
                scheduler,
                settings: *settings,
            })
        },
    )
}

/// Runs the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let cfg = TrainConfig::load(&args.config)?;
    let base = args
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let resume = match args.resume.as_deref() {
        None => Resume::No,
        Some("latest") => Resume::Latest,
        Some(p) => Resume::From(PathBuf::from(p)),
    };
    if cfg.mode.is_flux() {
        let trainer = build_flux(cfg.clone(), &base, resume)?;
        drive(trainer, &cfg, &base, args.progress_interval)
    } else {
        let trainer = build(cfg.clone(), &base, resume)?;
        drive(trainer, &cfg, &base, args.progress_interval)
    }
}

/// Runs a built trainer with progress and signal handling.
fn drive<T: Task>(
    mut trainer: Trainer<T>,
    cfg: &TrainConfig,
    base: &Path,
    progress_interval: f64,
) -> Result<ExitCode> {
    let steps = cfg.steps;
    let out = relative_to(base, &cfg.out);
    let (mode, batch) = (cfg.mode, cfg.batch_size * cfg.grad_accum);
    let start = trainer.start_step();
    eprintln!(
        "train: {mode}, {} trainable tensors, batch {batch}, steps {}..{steps}{}",
        trainer.task().vars().len(),
        start + 1,
        trainer
            .resumed_from()
            .map(|p| format!(", resumed from {}", p.display()))
            .unwrap_or_default()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let signals = Arc::new(AtomicUsize::new(0));
    {
        let (stop, signals) = (stop.clone(), signals.clone());
        // A second handler cannot be installed (a test harness, a library user):
        // then Ctrl-C kills as usual, which loses at most the steps since the last
        // checkpoint.
        let _ = ctrlc::set_handler(move || {
            if signals.fetch_add(1, Ordering::SeqCst) > 0 {
                eprintln!("train: second interrupt, exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("train: interrupted; finishing the step and writing a checkpoint");
            stop.store(true, Ordering::SeqCst);
        });
    }
    let interval = Duration::from_secs_f64(progress_interval.max(0.1));
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "train [{elapsed_precise}] {bar:40} {pos}/{len} steps  {msg}  eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(start);
        b
    });
    let mut last_line = Instant::now();
    let mut smoothed: Option<f64> = None;
    let mut on_step = |l: &StepLog| {
        let s = smoothed.map_or(l.loss, |s| 0.9 * s + 0.1 * l.loss);
        smoothed = Some(s);
        let parts = if mode.is_flux() {
            String::new() // flow matching: one term
        } else {
            format!(" (mse {:.4}, vb {:.4})", l.loss_mse, l.loss_vb)
        };
        let mut msg = format!(
            "loss {s:.4}{parts}  lr {:.2e}  |g| {:.3}  {:.1} samples/s",
            l.lr, l.grad_norm, l.samples_per_s
        );
        if let Some(v) = l.validation_s {
            msg.push_str(&format!("  (validation grid {v:.1} s)"));
        }
        if let Some(b) = &bar {
            b.set_position(l.step);
            b.set_message(msg);
        } else if last_line.elapsed() >= interval || l.step == steps {
            eprintln!("train: step {}/{steps}: {msg}", l.step);
            last_line = Instant::now();
        }
    };
    let outcome = trainer.run(&stop, &mut on_step)?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match outcome {
        Outcome::Finished(dir) => {
            eprintln!(
                "train: done: checkpoint {}, loss curve {}, log {}",
                dir.display(),
                out.join("loss.png").display(),
                out.join("log.jsonl").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Stopped(dir) => {
            eprintln!(
                "train: stopped; checkpoint {} (continue with --resume)",
                dir.display()
            );
            Ok(ExitCode::from(130))
        }
    }
}
