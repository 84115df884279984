//! `tensorbake demo [--out DIR]`: the whole job on synthetic data, offline.
//!
//! Synthesizes SA-1B-style shards (gzip tars of real JPEGs and large mask `.json`
//! members, shuffled) with a SAM-LLaVA-style caption tar, writes tiny random-weight
//! models in the real Hugging Face layouts (`sd_vae`, `siglip`, `clip_vision`, `t5`),
//! serves the shards on a loopback HTTP port and runs the pipeline as a real job
//! would: shard list from the links file, HTTP streaming, caption index built on first
//! use, caption cleaning, decoding and resizing, the four encoders, a committed Zarr
//! store. Then it reads the store back the way the trainer does (shuffled batches of
//! tensors), and runs the seed's two PixArt runs on it with a tiny random PixArt (a
//! fresh Redux adapter for the frozen PixArt, then PixArt fine-tuned to that adapter),
//! each ending with a sample grid. With `--flux` the store also gets what Flux needs (a
//! tiny Flux VAE among the encoders, T5 at FLUX.1-schnell's 256 tokens) and a tiny
//! de-distilled Flux trains a LoRA on the CLIP image embedding (`flux_clip_image`),
//! ending with a sample grid too. It leaves in DIR: `shards/`, `models/`, `store/`,
//! `manifest.toml` (which `tensorbake run DIR/manifest.toml` runs again offline from
//! DIR/shards), `train-*.toml` (for `tensorbake train` / `tensorbake sample`) and
//! `train/` (logs, loss plots, checkpoints, grids).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use tensorbake_kit::http::FileServer;
use tensorbake_kit::schema::Array;
use tensorbake_kit::synth::{Sa1bSpec, write_sa1b};
use tensorbake_nn::tiny::{TinyModel, write_tiny_model};
use tensorbake_store::{Loader, LoaderConfig, Location, StoreReader};

use crate::manifest::Manifest;

/// The whole job offline: synthetic SA-1B over loopback HTTP, tiny models, a store.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the demo writes its data, models, store and manifest.
    #[arg(long, default_value = "tensorbake-demo")]
    out: PathBuf,
    /// Number of shards to synthesize.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Images per shard.
    #[arg(long, default_value_t = 24)]
    images_per_shard: usize,
    /// Target resolution (a multiple of 8, the VAE's downscale).
    #[arg(long, default_value_t = 256)]
    resolution: u32,
    /// Optimizer steps of each demo training (a tiny PixArt, two image modes).
    #[arg(long, default_value_t = 30)]
    train_steps: u64,
    /// Also the Flux half: a tiny Flux VAE, T5 at Flux's length (256), a tiny Flux
    /// trained as `flux_clip_image` (a LoRA on the CLIP image embedding).
    #[arg(long)]
    flux: bool,
}

/// The models the demo writes, by feature; the manifest's `[[encoders]]` (with
/// `--flux`, [`TinyModel::FluxVae`] too).
const MODELS: [TinyModel; 4] = [
    TinyModel::SdVae,
    TinyModel::Siglip,
    TinyModel::ClipVision,
    TinyModel::T5,
];

/// The demo's models: [`MODELS`], and the Flux VAE for `--flux`.
fn models_for(flux: bool) -> Vec<TinyModel> {
    let mut m = MODELS.to_vec();
    if flux {
        m.insert(1, TinyModel::FluxVae);
    }
    m
}

fn manifest_text(links: &str, captions: &str, resolution: u32, flux: bool) -> String {
    let mut text = format!(
        "# Written by `tensorbake demo`: SA-1B-style synthetic shards, tiny random-weight\n\
         # models. `tensorbake run` on this file reads the shards from disk.\n\
         name = \"demo\"\nstore = \"store\"\n\n[source]\nkind = \"sa1b\"\nlinks = \"{links}\"\n\
         captions = \"{captions}\"\ncaption_db = \"shards/captions.redb\"\n\n\
         [preprocess]\nresolution = {resolution}\n\n[captions]\nclean = true\nstrip_boilerplate = true\n"
    );
    for m in models_for(flux) {
        let name = m.feature();
        text.push_str(&format!(
            "\n[[encoders]]\nname = \"{name}\"\nweights = \"models/{name}\"\ndevice = \"cpu\"\n\
             dtype = \"f32\"\nbatch = 8\n"
        ));
        if m == TinyModel::T5 {
            // Flux takes the null T5 at its training length (schnell-style: 256)
            text.push_str(if flux {
                "max_length = 256\n"
            } else {
                "max_length = 32\n"
            });
        }
    }
    text
}

/// Runs the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let out = &args.out;
    let shards_dir = out.join("shards");
    let t0 = std::time::Instant::now();
    eprintln!(
        "demo: writing {} synthetic SA-1B shards of {} images to {}",
        args.shards,
        args.images_per_shard,
        shards_dir.display()
    );
    let spec = Sa1bSpec {
        shards: args.shards,
        images_per_shard: args.images_per_shard,
        short_side: 640,
        mask_json_bytes: 200_000,
        seed: 2024,
        base_url: None,
    };
    let layout = write_sa1b(&shards_dir, &spec).context("writing synthetic shards")?;
    // the kept manifest reads the shards from disk: links with relative paths
    write_links(&layout.links, &layout.shards, |name| {
        format!("shards/{name}")
    })?;
    let models = out.join("models");
    eprintln!(
        "demo: writing tiny random-weight models ({}) to {}",
        models_for(args.flux)
            .iter()
            .map(|m| m.feature().name())
            .collect::<Vec<_>>()
            .join(", "),
        models.display()
    );
    for (i, m) in models_for(args.flux).into_iter().enumerate() {
        write_tiny_model(m, &models.join(m.feature().name()), 100 + i as u64)
            .with_context(|| format!("writing the tiny {} model", m.feature()))?;
    }
    std::fs::write(
        out.join("manifest.toml"),
        manifest_text(
            "shards/links.tsv",
            "shards/SA1B_caption.tar.gz",
            args.resolution,
            args.flux,
        ),
    )?;
    let store_dir = out.join("store");
    if store_dir.exists() {
        eprintln!(
            "demo: removing the store of an earlier demo at {}",
            store_dir.display()
        );
        std::fs::remove_dir_all(&store_dir)
            .with_context(|| format!("removing {}", store_dir.display()))?;
    }

    // this run streams the shards over HTTP from a loopback server
    let server = FileServer::start(&shards_dir).context("starting the loopback server")?;
    let http_links = shards_dir.join("links-http.tsv");
    write_links(&http_links, &layout.shards, |name| server.url(name))?;
    let text = manifest_text(
        "shards/links-http.tsv",
        &server.url("SA1B_caption.tar.gz"),
        args.resolution,
        args.flux,
    );
    let manifest = Manifest::parse(&text, "demo manifest")?;
    let _ = std::fs::remove_file(shards_dir.join("captions.redb"));
    eprintln!("demo: streaming from {}", server.base_url());
    let rank = tensorbake_kit::rank::Rank {
        rank: 0,
        world: 1,
        origin: "demo",
    };
    let report = super::run::build_and_run(
        &manifest,
        "demo manifest",
        out,
        None,
        rank,
        &super::run::Watch::progress(Duration::from_secs(5)),
        |_| {},
    )?;

    // read it back as the trainer will: shuffled batches of tensors
    let reader = std::sync::Arc::new(StoreReader::open(&Location::from(store_dir.as_path()))?);
    let mut arrays: Vec<String> = [
        Array::SdVaeMean,
        Array::SiglipHidden,
        Array::ClipImageEmbeds,
        Array::T5Hidden,
    ]
    .iter()
    .map(|a| a.name().to_string())
    .collect();
    if args.flux {
        arrays.insert(1, Array::FluxVaeMean.name().to_string());
    }
    let cfg = LoaderConfig::new(7, 0, 16, arrays.clone());
    let mut loaded = 0usize;
    let mut shapes = Vec::new();
    for batch in Loader::new(reader.clone(), &cfg)? {
        let batch = batch?;
        if shapes.is_empty() {
            shapes = arrays
                .iter()
                .filter_map(|a| batch.tensors.get(a).map(|t| format!("{a} {:?}", t.dims())))
                .collect();
        }
        loaded += batch.keys.len();
    }
    let trained = train_demo(
        out,
        &models,
        reader.len() as usize,
        args.resolution,
        args.train_steps,
        args.flux,
    )?;
    let store_bytes = dir_size(&store_dir);
    let total = layout.caption_of.len();
    println!("tensorbake demo: {}", out.display());
    println!(
        "  shards                {} committed, {} failed",
        report.shards.committed, report.shards.failed
    );
    println!(
        "  samples in store      {} of {total}",
        report.samples.written
    );
    println!(
        "  bytes streamed        {:.1} MB over {}",
        report.bytes as f64 / 1e6,
        server.base_url()
    );
    println!(
        "  ingest                {:.1} images/s (decode, resize to {})",
        report.stages.ingest.samples_per_s, args.resolution
    );
    for (name, t) in &report.stages.encoders {
        println!(
            "  encoder {name:<13} {:.1} samples/s (CPU, tiny weights)",
            t.samples_per_s
        );
    }
    println!(
        "  store                 {} ({:.1} MB, {} parts)",
        store_dir.display(),
        store_bytes as f64 / 1e6,
        reader.parts().len()
    );
    println!(
        "  read back             {loaded} samples in shuffled batches of 16: {}",
        shapes.join(", ")
    );
    for t in &trained {
        println!(
            "  train {:<15} loss {:.3} -> {:.3} in {} steps ({:.0} samples/s); checkpoint {}, loss plot {}, sample grid {}",
            t.mode,
            t.first,
            t.last,
            t.steps,
            t.samples_per_s,
            t.checkpoint.display(),
            t.plot.display(),
            t.grid.display()
        );
    }
    println!(
        "  total time            {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "  run again offline     tensorbake run {}",
        out.join("manifest.toml").display()
    );
    let ok = report.complete()
        && report.samples.written as usize == total
        && loaded == total
        && trained
            .iter()
            .all(|t| t.last.is_finite() && t.grid.is_file());
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What one demo training did.
struct Trained {
    mode: String,
    grid: PathBuf,
    first: f64,
    last: f64,
    steps: u64,
    samples_per_s: f64,
    checkpoint: PathBuf,
    plot: PathBuf,
}

/// The seed's two PixArt runs on the demo store, with a tiny random PixArt: a fresh
/// Redux adapter trained for a frozen PixArt, then PixArt fine-tuned to that adapter;
/// with `flux`, a tiny de-distilled Flux's LoRA on the CLIP image embedding. Each is a
/// config file in `out` that `tensorbake train` runs again.
fn train_demo(
    out: &Path,
    models: &Path,
    samples: usize,
    resolution: u32,
    steps: u64,
    flux: bool,
) -> Result<Vec<Trained>> {
    let pixart = models.join("pixart");
    // Caption tokens as wide as the tiny T5's and SigLIP's (32); latents of the store.
    tensorbake_nn::tiny::write_tiny_pixart(
        &pixart,
        300,
        tensorbake_nn::tiny::TinyPixart::Xl512,
        32,
        (resolution / 8) as usize,
    )
    .context("writing the tiny PixArt")?;
    let train_dir = out.join("train");
    if train_dir.exists() {
        std::fs::remove_dir_all(&train_dir)
            .with_context(|| format!("removing {}", train_dir.display()))?;
    }
    let batch = samples.clamp(1, 8);
    let common = format!(
        "store = \"store\"\npixart = \"models/pixart\"\nsteps = {steps}\nbatch_size = {batch}\n\
         lr = 1e-3\nweight_decay = 0.0\ngrad_clip = 1.0\nredux_tokens = 16\ncheckpoint_every = {steps}\n\
         seed = 1\ndevice = \"cpu\"\ndtype = \"f32\"\n\
         # a sample grid at the end: 2 stored samples, 3 variations each\n\
         validation_every = {steps}\nvalidation_images = {{ from_store = 2 }}\nvalidation_n = 3\nvalidation_steps = 10\n"
    );
    let adapter_ckpt = format!("train/redux-adapter/checkpoint-{steps}/redux.safetensors");
    let mut configs = vec![
        (
            "redux-adapter",
            format!(
                "# `tensorbake train` on the demo store: a fresh Redux adapter for a frozen tiny PixArt.\nmode = \"pixart_redux_adapter\"\nout = \"train/redux-adapter\"\n{common}"
            ),
        ),
        (
            "finetune",
            format!(
                "# `tensorbake train` on the demo store: the tiny PixArt fine-tuned to the adapter trained first.\nmode = \"pixart_finetune\"\nredux = \"{adapter_ckpt}\"\nout = \"train/finetune\"\n{common}"
            ),
        ),
    ];
    if flux {
        // T5 as wide as the tiny T5 (32), the pooled slot as the tiny CLIP's projection (16);
        // no guidance embedder (OpenFLUX.1-style), so the T5 length is 256
        tensorbake_nn::tiny::write_tiny_flux(&models.join("flux"), 301, false, 32, 16)
            .context("writing the tiny Flux")?;
        configs.push((
            "flux-clip-image",
            format!(
                "# `tensorbake train` on the demo store: a LoRA of a tiny de-distilled Flux taking the
\
                 # CLIP image embedding in its pooled slot (the seed's Flux runs).
\
                 mode = \"flux_clip_image\"\nflux = \"models/flux\"\nout = \"train/flux-clip-image\"\n\
                 lora = {{ rank = 4 }}\nstore = \"store\"\nsteps = {steps}\nbatch_size = {batch}\n\
                 lr = 1e-3\nweight_decay = 0.0\ngrad_clip = 1.0\ncheckpoint_every = {steps}\nseed = 1\n\
                 device = \"cpu\"\ndtype = \"f32\"\ncond_dropout = 0.1\n\
                 validation_every = {steps}\nvalidation_images = {{ from_store = 2 }}\nvalidation_n = 3\n\
                 validation_steps = 10\n"
            ),
        ));
    }
    let mut done = Vec::new();
    for (name, text) in configs {
        let path = out.join(format!("train-{name}.toml"));
        std::fs::write(&path, &text).with_context(|| path.display().to_string())?;
        let cfg = tensorbake_train::config::TrainConfig::parse(&text, &path.display().to_string())?;
        let mode = cfg.mode.to_string();
        eprintln!(
            "demo: training {mode} ({steps} steps, batch {batch}): {}",
            path.display()
        );
        let mut losses = Vec::new();
        let mut rate = 0.0;
        let mut on_step = |l: &tensorbake_train::trainer::StepLog| {
            losses.push(l.loss);
            rate = l.samples_per_s;
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        let resume = tensorbake_train::trainer::Resume::No;
        let outcome = if cfg.mode.is_flux() {
            super::train::build_flux(cfg, out, resume)?.run(&stop, &mut on_step)?
        } else {
            super::train::build(cfg, out, resume)?.run(&stop, &mut on_step)?
        };
        let checkpoint = match outcome {
            tensorbake_train::trainer::Outcome::Finished(d)
            | tensorbake_train::trainer::Outcome::Stopped(d) => d,
        };
        let k = losses.len().clamp(1, 5);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        done.push(Trained {
            grid: out.join(format!("train/{name}/samples/step-{steps}.png")),
            mode,
            first: mean(&losses[..k]),
            last: mean(&losses[losses.len() - k..]),
            steps,
            samples_per_s: rate,
            checkpoint,
            plot: out.join(format!("train/{name}/loss.png")),
        });
    }
    Ok(done)
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Writes an SA-1B links file (`file_name\tcdn_link`) for `shards`, each link `url(name)`.
pub(crate) fn write_links(
    path: &Path,
    shards: &[PathBuf],
    url: impl Fn(&str) -> String,
) -> Result<()> {
    let mut text = String::from("file_name\tcdn_link\n");
    for s in shards {
        let name = s
            .file_name()
            .and_then(|n| n.to_str())
            .context("shard name")?;
        text.push_str(&format!("{name}\t{}\n", url(name)));
    }
    std::fs::write(path, text).with_context(|| path.display().to_string())
}
