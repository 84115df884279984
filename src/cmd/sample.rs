//! `tensorbake sample --config TRAIN.toml --checkpoint CKPT [--image IMG ...]
//! [--from-store N] [--prompt-file FILE] --n N [--steps S] [--guidance G] [--seed S]
//! --out GRID.png`: image variations (or text-to-image) from a checkpoint, as a grid
//! (docs/sample.md).
//!
//! The models are the training run's: PixArt and the adapter, or Flux (with its LoRA,
//! trained blocks or adapter), of the config, with the checkpoint's trained weights
//! (`--ema` for its averaged ones). The VAE decoder (SD's or Flux's) and the SigLIP /
//! CLIP / T5 encoders are the ones the store records (path or hub id and sha256), so a
//! prompt image is embedded exactly as `run` embedded the training samples. Inputs are checked before any model loads; the grid is written whole
//! (a temporary file renamed into place).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tensorbake_encode::{EncoderConfig, Input, Rgb8, build_encoder};
use tensorbake_kit::schema::Array;
use tensorbake_store::{FeatureSpec, Location, StoreReader};
use tensorbake_train::checkpoint;
use tensorbake_train::config::{Mode, TrainConfig};
use tensorbake_train::flux_sample::{
    FluxSampleSettings, FluxSampler, FluxSchedulerChoice, default_true_cfg,
};
use tensorbake_train::flux_task::FluxTask;
use tensorbake_train::grid::{Image, Prompt};
use tensorbake_train::pixart_task::{PixArtTask, PromptInput};
use tensorbake_train::sample::{
    GridSampler, SampleSettings, Sampler, SchedulerChoice, prompts_from_store,
};
use tensorbake_train::trainer::resolve_spec;

/// Sample image variations from a checkpoint into a grid.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The training config of the run (mode, models, store).
    #[arg(long)]
    config: PathBuf,
    /// A checkpoint directory of the run (`OUT/checkpoint-<step>`), or `latest`.
    #[arg(long)]
    checkpoint: String,
    /// Prompt images (image modes); embedded with the store's SigLIP.
    #[arg(long = "image", value_name = "IMG")]
    images: Vec<PathBuf>,
    /// The first N samples of the store's shuffled order as prompts.
    #[arg(long, value_name = "N")]
    from_store: Option<usize>,
    /// Captions, one per line (`pixart_text`); embedded with the store's T5.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// Variations per prompt.
    #[arg(long, default_value_t = 4)]
    n: usize,
    /// Denoising steps (default: PixArt 20, Flux 28).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale, 1 disables it (default: PixArt 4.5; Flux's true
    /// CFG 2.5 without a guidance embedder, 1 with one).
    #[arg(long)]
    guidance: Option<f64>,
    /// The embedded guidance of a guidance-distilled Flux (default: the training
    /// config's `guidance`, 3.5).
    #[arg(long, value_name = "G")]
    guidance_embed: Option<f64>,
    /// Seeds the initial noise (the same seed gives the same images).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// PixArt: `dpm` (DPM-Solver++ 2M, the default), `ddim`, or a diffusers
    /// scheduler_config.json. Flux: a FlowMatchEulerDiscreteScheduler config (default:
    /// the one beside the transformer, else FLUX.1-dev's).
    #[arg(long)]
    scheduler: Option<String>,
    /// Use the checkpoint's EMA weights.
    #[arg(long)]
    ema: bool,
    /// The VAE to decode with, instead of the one the store records (a mismatch is a warning).
    #[arg(long)]
    vae: Option<String>,
    /// The SigLIP to embed `--image`s with, instead of the one the store records.
    #[arg(long)]
    siglip: Option<String>,
    /// The CLIP vision model to embed `--image`s with (`flux_clip_image`), instead of
    /// the one the store records.
    #[arg(long)]
    clip_vision: Option<String>,
    /// Grid cell side in pixels (default: the store's resolution).
    #[arg(long)]
    cell: Option<u32>,
    /// The grid (PNG).
    #[arg(long)]
    out: PathBuf,
}

/// The weights location a store feature records (`model` is "SPEC (description)"),
/// resolved as `run` saw it: relative paths against the store's parent directory (where
/// the manifest usually sits), then `base`, then as given (a hub id, or relative to the
/// working directory).
pub fn recorded_weights(spec: &FeatureSpec, store: &Location, base: &Path) -> String {
    let given = spec
        .model
        .split(" (")
        .next()
        .unwrap_or(&spec.model)
        .trim()
        .to_string();
    let p = Path::new(&given);
    if p.is_absolute() {
        return given;
    }
    let mut candidates = Vec::new();
    if let Location::Local(dir) = store
        && let Some(parent) = dir.parent()
    {
        candidates.push(parent.join(p));
    }
    candidates.push(base.join(p));
    candidates
        .into_iter()
        .find(|c| c.exists())
        .map_or(given, |c| c.to_string_lossy().into_owned())
}

/// The store's record of `array`, or an error saying the store lacks it.
fn record<'a>(reader: &'a StoreReader, array: Array, what: &str) -> Result<&'a FeatureSpec> {
    reader.spec().array(array).with_context(|| {
        format!(
            "store {} has no `{array}` record: {what}",
            reader.location()
        )
    })
}

/// The decoder of the VAE whose latents `latent` (`sd_vae_mean` or `flux_vae_mean`)
/// the store holds (or `given`, with a warning when its weights are not the recorded
/// ones).
pub fn store_vae(
    reader: &StoreReader,
    base: &Path,
    given: Option<&str>,
    latent: Array,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<tensorbake_nn::vae::VaeDecoder> {
    let rec = record(
        reader,
        latent,
        &format!("the decoder must be the VAE whose encoder made the latents ({latent})"),
    )?;
    let spec = match given {
        Some(g) => g.to_string(),
        None => recorded_weights(rec, reader.location(), base),
    };
    let located =
        tensorbake_nn::vae::locate(&spec).with_context(|| format!("the VAE decoder {spec}"))?;
    let sha = located.fingerprint()?;
    if sha != rec.weights_sha256 {
        let msg = format!(
            "the VAE {spec} (sha256 {sha}) is not the one that encoded the store ({}, sha256 {})",
            rec.model, rec.weights_sha256
        );
        if given.is_some() {
            eprintln!("warning: {msg}; the images may be wrong");
        } else {
            bail!("{msg}; pass the right one with --vae");
        }
    }
    Ok(located.decoder("vae decoder", dtype, device)?)
}

/// Reads and preprocesses prompt images as `run` does (shortest side to the store's
/// resolution, centre crop), each error naming its file; nothing else is loaded first.
fn read_images(paths: &[PathBuf], resolution: u32) -> Result<Vec<Image>> {
    let cfg = tensorbake_ingest::image::PreprocessConfig {
        resolution,
        ..Default::default()
    };
    paths
        .iter()
        .map(|p| {
            let bytes =
                std::fs::read(p).with_context(|| format!("prompt image {}", p.display()))?;
            if bytes.is_empty() {
                bail!("prompt image {}: the file is empty", p.display());
            }
            let img = tensorbake_ingest::image::preprocess(&bytes, &cfg)
                .with_context(|| format!("prompt image {}", p.display()))?;
            Ok(Image {
                width: resolution,
                height: resolution,
                pixels: img.rgb,
            })
        })
        .collect()
}

/// The image prompts: each image embedded as the mode conditions, with the store's
/// SigLIP (`siglip_hidden`) or CLIP vision model (`clip_image_embeds`, flux_clip_image).
pub fn image_prompts(
    paths: &[PathBuf],
    reader: &StoreReader,
    base: &Path,
    encoder: Option<&str>,
    device: &str,
    mode: Mode,
) -> Result<Vec<(Prompt, PromptInput)>> {
    let resolution = reader
        .spec()
        .resolution
        .context("the store records no resolution")?;
    let images = read_images(paths, resolution)?;
    let (array, name, what) = if mode == Mode::FluxClipImage {
        (Array::ClipImageEmbeds, "clip_vision", "CLIP vision")
    } else {
        (Array::SiglipHidden, "siglip", "SigLIP")
    };
    let rec = record(
        reader,
        array,
        &format!("mode `{mode}` embeds prompt images with {what}"),
    )?;
    let weights = encoder.map_or_else(
        || recorded_weights(rec, reader.location(), base),
        String::from,
    );
    let cfg = EncoderConfig {
        name: name.into(),
        weights: weights.clone(),
        dtype: if device == "cpu" {
            tensorbake_kit::dtype::DType::F32
        } else {
            tensorbake_kit::dtype::DType::Bf16
        },
        batch: 8,
        device: device.into(),
        max_length: None,
        store_dtype: None,
    };
    let enc = build_encoder(&cfg, resolution)
        .with_context(|| format!("the store's {what} ({weights})"))?;
    let info = enc.info();
    if info.weights_sha256 != rec.weights_sha256 {
        eprintln!(
            "warning: {what} {weights} (sha256 {}) is not the one that made the store ({}): the prompts are embedded differently from the training samples",
            info.weights_sha256, rec.weights_sha256
        );
    }
    let views: Vec<Rgb8<'_>> = images
        .iter()
        .map(|i| Rgb8 {
            width: i.width,
            height: i.height,
            pixels: &i.pixels,
        })
        .collect();
    let out = enc.encode(Input::Images(&views))?;
    let (_, embedded) = out
        .into_iter()
        .find(|(a, _)| *a == array)
        .with_context(|| format!("the {what} encoder gave no `{array}`"))?;
    images
        .into_iter()
        .enumerate()
        .map(|(i, img)| {
            let e = embedded.get(i)?;
            let input = if array == Array::ClipImageEmbeds {
                PromptInput::ClipImage(e)
            } else {
                PromptInput::Siglip(e)
            };
            Ok((Prompt::Image(img), input))
        })
        .collect()
}

/// The text prompts: each caption cleaned as the store's captions were, embedded with
/// the store's T5 at its length.
pub fn text_prompts(
    captions: &[String],
    reader: &StoreReader,
    base: &Path,
    device: &str,
) -> Result<Vec<(Prompt, PromptInput)>> {
    let rec = record(
        reader,
        Array::T5Hidden,
        "pixart_text embeds prompts with T5",
    )?;
    let weights = recorded_weights(rec, reader.location(), base);
    let max_length = rec.preprocess["max_length"].as_u64().map(|n| n as usize);
    let cfg = EncoderConfig {
        name: "t5".into(),
        weights: weights.clone(),
        dtype: if device == "cpu" {
            tensorbake_kit::dtype::DType::F32
        } else {
            tensorbake_kit::dtype::DType::Bf16
        },
        batch: 8,
        device: device.into(),
        max_length,
        store_dtype: None,
    };
    let enc = build_encoder(&cfg, 0).with_context(|| format!("the store's T5 ({weights})"))?;
    let clean: tensorbake_ingest::caption::CleanConfig =
        serde_json::from_value(reader.spec().captions.clone()).unwrap_or_default();
    let cleaner = clean.build();
    let cleaned: Vec<String> = captions
        .iter()
        .map(|c| match cleaner.clean(c) {
            tensorbake_ingest::caption::CaptionOutcome::Clean(s) => s,
            _ => String::new(),
        })
        .collect();
    let refs: Vec<&str> = cleaned.iter().map(String::as_str).collect();
    let out = enc.encode(Input::Texts(&refs))?;
    let (hidden, lens) = (&out[0].1, &out[1].1);
    let lens: Vec<u32> = lens.to_dtype(candle_core::DType::U32)?.to_vec1()?;
    captions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Ok((
                Prompt::Caption(c.clone()),
                PromptInput::T5 {
                    hidden: hidden.get(i)?,
                    len: lens[i],
                },
            ))
        })
        .collect()
}

/// The scheduler a `--scheduler` value names.
pub fn scheduler_choice(s: &str) -> Result<SchedulerChoice> {
    Ok(match s {
        "dpm" | "dpm++" | "dpmsolver" => SchedulerChoice::pixart_dpm(),
        "ddim" => SchedulerChoice::pixart_ddim(),
        path => SchedulerChoice::from_file(Path::new(path)).map_err(anyhow::Error::msg)?,
    })
}

/// Runs the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let t0 = Instant::now();
    let cfg = TrainConfig::load(&args.config)?;
    let base = args
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let out_dir = base.join(&cfg.out);
    let ckpt = if args.checkpoint == "latest" {
        checkpoint::list(&out_dir)
            .pop()
            .map(|(_, d)| d)
            .with_context(|| {
                format!(
                    "--checkpoint latest: no complete checkpoint in {}",
                    out_dir.display()
                )
            })?
    } else {
        PathBuf::from(&args.checkpoint)
    };
    let state = checkpoint::read_state(&ckpt)?;
    if state.mode != cfg.mode {
        bail!(
            "checkpoint {} was written by mode `{}`, the config {} is mode `{}`",
            ckpt.display(),
            state.mode,
            args.config.display(),
            cfg.mode
        );
    }
    let weights_dir = if args.ema {
        if !state.ema {
            bail!(
                "checkpoint {} has no EMA weights (the run had no `ema`)",
                ckpt.display()
            );
        }
        ckpt.join(checkpoint::EMA_DIR)
    } else {
        ckpt.clone()
    };
    let text = cfg.mode == Mode::PixartText;
    if text && !args.images.is_empty() {
        bail!("mode `pixart_text` takes --prompt-file or --from-store, not --image");
    }
    if !text && args.prompt_file.is_some() {
        bail!(
            "mode `{}` takes --image or --from-store, not --prompt-file",
            cfg.mode
        );
    }
    if args.images.is_empty() && args.prompt_file.is_none() && args.from_store.is_none() {
        bail!("nothing to sample: give --image, --prompt-file or --from-store N");
    }
    if args.n == 0 || args.steps == Some(0) {
        bail!("--n and --steps must be at least 1");
    }
    let flux = cfg.mode.is_flux();
    if !flux && args.guidance_embed.is_some() {
        bail!(
            "--guidance-embed is for guidance-distilled Flux models; mode `{}` is PixArt's",
            cfg.mode
        );
    }
    if args.siglip.is_some() && cfg.mode == Mode::FluxClipImage {
        bail!(
            "mode `flux_clip_image` embeds prompt images with CLIP: give --clip-vision, not --siglip"
        );
    }
    if args.clip_vision.is_some() && cfg.mode != Mode::FluxClipImage {
        bail!(
            "--clip-vision is for mode `flux_clip_image`; mode `{}` embeds images with SigLIP",
            cfg.mode
        );
    }
    let pixart_scheduler = if flux {
        None
    } else {
        Some(scheduler_choice(
            args.scheduler.as_deref().unwrap_or("dpm"),
        )?)
    };
    let flux_scheduler = match (flux, &args.scheduler) {
        (true, Some(path)) => {
            Some(FluxSchedulerChoice::from_file(Path::new(path)).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };
    let captions = match &args.prompt_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("prompt file {}", p.display()))?;
            let lines: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if lines.is_empty() {
                bail!("prompt file {}: no captions", p.display());
            }
            lines
        }
        None => Vec::new(),
    };
    // the images are read (and refused) before any model loads
    let location: Location = if cfg.store.contains("://") {
        cfg.store.parse()?
    } else {
        Location::from(base.join(&cfg.store))
    };
    let reader = Arc::new(
        StoreReader::open(&location).with_context(|| format!("opening the store {location}"))?,
    );
    if let Some(res) = reader.spec().resolution {
        read_images(&args.images, res)?;
    }
    let device = tensorbake_nn::parse_device(&cfg.device)?;
    let dtype = tensorbake_nn::conv_compute_dtype(cfg.dtype, &device)?;
    let image_encoder = args.clip_vision.as_deref().or(args.siglip.as_deref());
    let prompts_of = |sampler: &dyn GridSampler| -> Result<Vec<(Prompt, PromptInput)>> {
        let mut prompts = Vec::new();
        if !args.images.is_empty() {
            prompts.extend(image_prompts(
                &args.images,
                &reader,
                &base,
                image_encoder,
                &cfg.device,
                cfg.mode,
            )?);
        }
        if !captions.is_empty() {
            prompts.extend(text_prompts(&captions, &reader, &base, &cfg.device)?);
        }
        if let Some(n) = args.from_store {
            // the training run's order (its seed), whatever the noise seed
            prompts.extend(prompts_from_store(&reader, sampler, n, cfg.seed)?);
        }
        Ok(prompts)
    };
    let cell = args.cell.or(reader.spec().resolution).unwrap_or(256);
    let (grid, images, secs) = if let Some(scheduler) = &pixart_scheduler {
        let vae = store_vae(
            &reader,
            &base,
            args.vae.as_deref(),
            Array::SdVaeMean,
            dtype,
            &device,
        )?;
        // the run's models with the checkpoint's trained weights
        let task = PixArtTask::build(&cfg, &base, &reader, &device)?;
        tensorbake_train::trainer::load_trained(&task, &weights_dir, &device)?;
        let settings = SampleSettings {
            steps: args.steps.unwrap_or(20),
            guidance: args.guidance.unwrap_or(4.5),
            seed: args.seed,
        };
        let sampler = Sampler {
            task: &task,
            vae: &vae,
            scheduler,
            settings,
        };
        let prompts = prompts_of(&sampler)?;
        eprintln!(
            "sample: {} prompts x {} variations, {} steps of {}, guidance {}, from {}",
            prompts.len(),
            args.n,
            settings.steps,
            scheduler.class,
            settings.guidance,
            weights_dir.display()
        );
        let ts = Instant::now();
        let grid = sampler.grid(&prompts, args.n, cell)?;
        (grid, prompts.len() * args.n, ts.elapsed().as_secs_f64())
    } else {
        let vae = store_vae(
            &reader,
            &base,
            args.vae.as_deref(),
            Array::FluxVaeMean,
            dtype,
            &device,
        )?;
        let task = FluxTask::build(&cfg, &base, &reader, &device)?;
        tensorbake_train::trainer::load_trained(&task, &weights_dir, &device)?;
        let scheduler = match flux_scheduler {
            Some(s) => s,
            None => FluxSchedulerChoice::for_model(Path::new(&resolve_spec(
                &base,
                cfg.flux.as_deref().unwrap_or_default(),
            )))
            .map_err(anyhow::Error::msg)?,
        };
        let guidance = match (task.guidance(), args.guidance_embed) {
            (Some(g), given) => Some(given.unwrap_or(g)),
            (None, None) => None,
            (None, Some(_)) => bail!(
                "--guidance-embed: this Flux has no guidance embedder (guidance_embeds false); \
                 use --guidance for true CFG"
            ),
        };
        let settings = FluxSampleSettings {
            steps: args.steps.unwrap_or(28),
            true_cfg: args
                .guidance
                .unwrap_or_else(|| default_true_cfg(guidance.is_some())),
            guidance,
            seed: args.seed,
        };
        let sampler = FluxSampler {
            task: &task,
            vae: &vae,
            scheduler: &scheduler,
            settings,
        };
        let prompts = prompts_of(&sampler)?;
        eprintln!(
            "sample: {} prompts x {} variations, {} steps of {}, true CFG {}{}, from {}",
            prompts.len(),
            args.n,
            settings.steps,
            scheduler.source,
            settings.true_cfg,
            guidance.map_or_else(String::new, |g| format!(", embedded guidance {g}")),
            weights_dir.display()
        );
        let ts = Instant::now();
        let grid = sampler.grid(&prompts, args.n, cell)?;
        (grid, prompts.len() * args.n, ts.elapsed().as_secs_f64())
    };
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    grid.save_png(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "sample: wrote {} ({} x {} cells of {cell} px): {images} images in {secs:.1} s ({:.2} s per image), {:.1} s in all",
        args.out.display(),
        images / args.n,
        args.n + 1,
        secs / images.max(1) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
