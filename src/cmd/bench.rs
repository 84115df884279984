//! `tensorbake bench`: whole-stage benchmarks beside their Python peers.
//!
//! A group of subcommands, one per stage: `bench decode` (image preprocessing vs
//! Pillow) for now; the engines live in the library crates, this file turns flags
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
    }
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
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
