//! `tensorbake bench`: whole-stage benchmarks beside their Python peers.
//!
//! A group of subcommands, one per stage: `bench decode` (image preprocessing vs
//! Pillow), `bench train`, `bench sample`, `bench encode` (the frozen encoders) and `bench run`
//! (the whole pipeline); the engines live in the library crates, this file turns flags
//! into their configs and prints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use tensorbake_ingest::image::bench::{DecodeBenchConfig, run_decode_bench};

/// `tensorbake bench <what>`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// JPEG decode + resize shortest side + centre crop: images/s on one core,
    /// beside Pillow and Pillow with `Image.draft` on the same files.
    Decode(DecodeArgs),
    /// One PixArt training step (docs/train.md, Speed): samples/s and peak memory,
    /// beside diffusers' PixArtTransformer2DModel doing the same step in PyTorch.
    Train(TrainArgs),
    /// Sampling with guidance and VAE decode (docs/sample.md, Speed): seconds per
    /// image, beside diffusers' PixArtAlphaPipeline on the same models.
    Sample(SampleArgs),
    /// The frozen encoders at full size with random weights (docs/encoders.md,
    /// Throughput): items/s and the fraction of the FLOP ceiling, beside the same
    /// models in PyTorch (eager and torch.compile); `--check` compares each with the
    /// CPU in f32 first.
    Encode(EncodeArgs),
    /// The whole pipeline at SA-1B scale (docs/run.md, Speed): synthetic 1500 px
    /// shards over loopback, full-size random-weight encoders, a store on local disk;
    /// images/s, the GPU's busy fraction, where the time went.
    Run(super::bench_run::RunArgs),
    /// The run's write stage alone at production sizes (docs/run.md, Writers): the
    /// arrays of sd_vae + siglip + t5 for each image, zstd, crc32c and fsync through
    /// the run's own part writers; MB/s, MB per CPU-second and the cores 170 images/s
    /// takes, beside tensorstore writing the same bytes into the same layout.
    Write(WriteArgs),
}

#[derive(Debug, Args)]
struct WriteArgs {
    /// Part writer threads (the manifest's `writers`).
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// Parts (source shards) to write (default: 2 per writer).
    #[arg(long)]
    parts: Option<usize>,
    /// Images per part.
    #[arg(long, default_value_t = 128)]
    samples_per_part: usize,
    /// Images per batch handed to the writers (the encoders' batch).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Batches that may wait per writer (the manifest's `write_queue / writers`).
    #[arg(long, default_value_t = 2)]
    queue_per_writer: usize,
    /// zstd level of the inner chunks (the store's default: 3).
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Where the batches sit (cpu | cuda | cuda:N); on CUDA the writers copy them back.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Python with tensorstore (else $TENSORBAKE_PYTHON, else python3).
    #[arg(long, env = "TENSORBAKE_PYTHON")]
    python: Option<PathBuf>,
    /// Skip the tensorstore run.
    #[arg(long)]
    no_tensorstore: bool,
    /// Timed rounds of each writer, alternating (the table shows medians).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the stores here instead of a temporary directory (kept afterwards).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct EncodeArgs {
    /// Encoders (repeatable): sd_vae, flux_vae, siglip, clip_vision, t5 (120 and 512
    /// tokens), t5@N, clip_text. Default: all.
    #[arg(long = "encoder", value_name = "NAME")]
    encoders: Vec<String>,
    /// cpu | cuda | cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Items per forward (default: 1 on the CPU; on CUDA 32 for the VAEs, 64 SigLIP,
    /// 256 CLIP, 128 T5@120, 32 T5@512).
    #[arg(long)]
    batch: Option<usize>,
    /// Compute dtype (default: bf16 on CUDA, f32 on the CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Model sizes: full (the real configs) or tiny (the tests' fixtures).
    #[arg(long, default_value = "full")]
    preset: String,
    /// Untimed forwards before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Forwards per timed round.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Timed rounds (the table shows the median).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Check each encoder against the same weights on the CPU in f32 first.
    #[arg(long)]
    check: bool,
    /// The FLOP ceiling in TFLOP/s (default on CUDA in bf16/f16: 989.4, an H100/H200 SXM).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Python with torch, diffusers and transformers (else $TENSORBAKE_PYTHON, else python3).
    #[arg(long, env = "TENSORBAKE_PYTHON")]
    python: Option<PathBuf>,
    /// Skip the PyTorch runs.
    #[arg(long)]
    no_torch: bool,
    /// PyTorch runs, comma-separated: eager, compile.
    #[arg(long, default_value = "eager,compile")]
    torch_modes: String,
    /// torch.compile mode (default: max-autotune for the VAEs, default for the others).
    #[arg(long)]
    compile_mode: Option<String>,
    /// Keep the work directory (configs, the peer script) here instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SampleArgs {
    /// Model sizes: tiny (the tests'), small (CPU: a small PixArt at 512 px, SD-VAE's
    /// decoder), xl-512 (PixArt-XL-2-512x512, for a GPU).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Images per round (one batch).
    #[arg(long, default_value_t = 1)]
    images: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Guidance scale.
    #[arg(long, default_value_t = 4.5)]
    guidance: f64,
    /// Timed rounds (after one untimed).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// cpu | cuda | cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype (f32; bf16 or f16 on CUDA).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Python with torch and diffusers (else $TENSORBAKE_PYTHON, else python3).
    #[arg(long, env = "TENSORBAKE_PYTHON")]
    python: Option<PathBuf>,
    /// Skip the diffusers runs.
    #[arg(long)]
    no_diffusers: bool,
    /// Keep the work directory (models, store) here instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Model sizes: tiny (the tests'), small (CPU), xl-512 (PixArt-XL-2-512x512, for a GPU).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Modes to time (repeatable): adapter (PixArt frozen), finetune (PixArt trained),
    /// flux-lora (a LoRA on a frozen Flux), flux-full (all of Flux).
    #[arg(long = "mode", value_name = "MODE", default_values_t = ["adapter".to_string(), "finetune".to_string()])]
    modes: Vec<String>,
    /// Samples per step (default: 8 for small and tiny, 32 for xl-512).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps before them.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// cpu | cuda | cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, or bf16 on CUDA (PyTorch: AMP autocast).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Recompute each block in the backward (both sides).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Python with torch and diffusers (else $TENSORBAKE_PYTHON, else python3).
    #[arg(long, env = "TENSORBAKE_PYTHON")]
    python: Option<PathBuf>,
    /// Skip the PyTorch runs.
    #[arg(long)]
    no_torch: bool,
    /// Keep the work directory (models, store) here instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DecodeArgs {
    /// JPEG files to use instead of synthetic photos (repeatable).
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// Number of synthetic photos (seeds 0..count).
    #[arg(long, default_value_t = 8)]
    count: u64,
    /// Width of the synthetic photos (SA-1B landscape: 2250).
    #[arg(long, default_value_t = 2250)]
    width: u32,
    /// Height of the synthetic photos (SA-1B shortest side: 1500).
    #[arg(long, default_value_t = 1500)]
    height: u32,
    /// JPEG quality of the synthetic photos.
    #[arg(long, default_value_t = 90)]
    quality: u8,
    /// Output side in pixels.
    #[arg(long, default_value_t = 512)]
    resolution: u32,
    /// Minimum timed seconds per pipeline and round.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds; each runs every pipeline once, the table shows the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Python interpreter with Pillow (else $TENSORBAKE_PYTHON, else python3).
    #[arg(long, env = "TENSORBAKE_PYTHON")]
    python: Option<PathBuf>,
    /// Skip the Pillow runs.
    #[arg(long)]
    no_pillow: bool,
    /// Also time the other Rust pipelines that were considered (libjpeg-turbo at
    /// full size and at M/8, zune-jpeg, jpeg-decoder).
    #[arg(long)]
    candidates: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Runs a bench subcommand.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        BenchCommand::Decode(args) => decode(args),
        BenchCommand::Train(args) => train(args),
        BenchCommand::Sample(args) => sample(args),
        BenchCommand::Encode(args) => encode(args),
        BenchCommand::Run(args) => super::bench_run::run(args),
        BenchCommand::Write(args) => write(args),
    }
}

fn write(args: WriteArgs) -> anyhow::Result<ExitCode> {
    use tensorbake_run::write_bench::{WriteBenchConfig, run_write_bench};
    let (dir, keep) = workdir(args.workdir, "write")?;
    let cfg = WriteBenchConfig {
        dir: dir.clone(),
        writers: args.writers,
        parts: args.parts.unwrap_or(2 * args.writers.max(1)),
        samples_per_part: args.samples_per_part,
        batch: args.batch,
        queue_per_writer: args.queue_per_writer,
        zstd_level: args.zstd_level,
        device: tensorbake_nn::parse_device(&args.device)?,
        rounds: args.rounds,
        python: (!args.no_tensorstore)
            .then(|| args.python.unwrap_or_else(|| PathBuf::from("python3"))),
    };
    let report = run_write_bench(&cfg);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = report.map_err(|e| anyhow::anyhow!("bench write: {e}"))?;
    print!("{}", report.table());
    write_json(args.json.as_ref(), &report)?;
    Ok(ExitCode::SUCCESS)
}

fn decode(args: DecodeArgs) -> anyhow::Result<ExitCode> {
    let cfg = DecodeBenchConfig {
        images: args.images,
        count: args.count,
        width: args.width,
        height: args.height,
        quality: args.quality,
        resolution: args.resolution,
        seconds: args.seconds,
        rounds: args.rounds,
        python: (!args.no_pillow).then(|| args.python.unwrap_or_else(|| PathBuf::from("python3"))),
        candidates: args.candidates,
    };
    let workdir =
        std::env::temp_dir().join(format!("tensorbake-bench-decode-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let report = run_decode_bench(&cfg, &workdir);
    let _ = std::fs::remove_dir_all(&workdir);
    let report = report.context("bench decode")?;
    print!("{}", report.table());
    write_json(args.json.as_ref(), &report)?;
    Ok(ExitCode::SUCCESS)
}

/// A work directory: the one asked for (kept), or a fresh temporary one (removed).
fn workdir(asked: Option<PathBuf>, what: &str) -> anyhow::Result<(PathBuf, bool)> {
    let (dir, keep) = match asked {
        Some(d) => (d, true),
        None => (
            std::env::temp_dir().join(format!("tensorbake-bench-{what}-{}", std::process::id())),
            false,
        ),
    };
    if keep && dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        anyhow::bail!("--workdir {} is not empty", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok((dir, keep))
}

fn write_json(path: Option<&PathBuf>, report: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    use tensorbake_train::bench::{BenchMode, Preset, TrainBenchConfig, run_train_bench};
    let preset = Preset::parse(&args.preset)?;
    let modes = args
        .modes
        .iter()
        .map(|m| BenchMode::parse(m))
        .collect::<Result<Vec<_>, _>>()?;
    let dtype = parse_dtype(&args.dtype)?;
    let cfg = TrainBenchConfig {
        preset,
        modes,
        batch_size: args
            .batch_size
            .unwrap_or(if preset == Preset::Xl512 { 32 } else { 8 }),
        steps: args.steps,
        warmup: args.warmup,
        device: args.device,
        dtype,
        gradient_checkpointing: args.gradient_checkpointing,
        python: (!args.no_torch).then(|| args.python.unwrap_or_else(|| PathBuf::from("python3"))),
    };
    let (dir, keep) = workdir(args.workdir, "train")?;
    let report = run_train_bench(&cfg, &dir);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = report.context("bench train")?;
    print!("{}", report.table());
    write_json(args.json.as_ref(), &report)?;
    Ok(ExitCode::SUCCESS)
}

fn parse_dtype(s: &str) -> anyhow::Result<tensorbake_kit::dtype::DType> {
    s.parse().map_err(|e| anyhow::anyhow!("--dtype {s}: {e}"))
}

fn sample(args: SampleArgs) -> anyhow::Result<ExitCode> {
    use tensorbake_train::bench::{Preset, SampleBenchConfig, run_sample_bench};
    let cfg = SampleBenchConfig {
        preset: Preset::parse(&args.preset)?,
        images: args.images,
        steps: args.steps,
        guidance: args.guidance,
        rounds: args.rounds,
        device: args.device,
        dtype: parse_dtype(&args.dtype)?,
        python: (!args.no_diffusers)
            .then(|| args.python.unwrap_or_else(|| PathBuf::from("python3"))),
    };
    let (dir, keep) = workdir(args.workdir, "sample")?;
    let report = run_sample_bench(&cfg, &dir);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = report.context("bench sample")?;
    print!("{}", report.table());
    write_json(args.json.as_ref(), &report)?;
    Ok(ExitCode::SUCCESS)
}

fn encode(args: EncodeArgs) -> anyhow::Result<ExitCode> {
    use tensorbake_encode::bench::{BenchEncoder, EncodeBenchConfig, Preset, run_encode_bench};
    let encoders = if args.encoders.is_empty() {
        BenchEncoder::all()
    } else {
        let mut v = Vec::new();
        for name in &args.encoders {
            v.extend(BenchEncoder::parse(name).context("--encoder")?);
        }
        v
    };
    let torch_modes: Vec<String> = args
        .torch_modes
        .split(',')
        .filter(|m| !m.is_empty())
        .map(String::from)
        .collect();
    if let Some(m) = torch_modes
        .iter()
        .find(|m| !matches!(m.as_str(), "eager" | "compile"))
    {
        anyhow::bail!("--torch-modes: unknown mode `{m}` (eager, compile)");
    }
    let cfg = EncodeBenchConfig {
        encoders,
        preset: Preset::parse(&args.preset).context("--preset")?,
        batch: args.batch,
        device: args.device,
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        warmup: args.warmup,
        iters: args.iters,
        rounds: args.rounds,
        check: args.check,
        peak_tflops: args.peak_tflops,
        python: (!args.no_torch).then(|| args.python.unwrap_or_else(|| PathBuf::from("python3"))),
        torch_modes,
        compile_mode: args.compile_mode,
    };
    let (dir, keep) = workdir(args.workdir, "encode")?;
    let report = run_encode_bench(&cfg, &dir);
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = report.context("bench encode")?;
    print!("{}", report.table());
    write_json(args.json.as_ref(), &report)?;
    Ok(if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
