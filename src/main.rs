//! The `tensorbake` command line: argument parsing and wiring of the library crates.
//! Every capability lives in a library crate; each subcommand here only turns flags
//! into configs, calls the library, and prints.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod manifest;

/// Stream image datasets, bake frozen diffusion encoders into Zarr v3, train from the cache.
#[derive(Debug, Parser)]
#[command(name = "tensorbake", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `tensorbake_ingest=debug`.
    #[arg(long, global = true, env = "TENSORBAKE_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream a manifest's shards into clean samples; --list prints them as JSON lines.
    Ingest(cmd::ingest::Args),
    /// The whole pipeline: shards -> encoders -> a committed Zarr store (resumable).
    Run(cmd::run::Args),
    /// The whole job offline: synthetic SA-1B shards over loopback HTTP, tiny models, a store.
    Demo(cmd::demo::Args),
    /// Clean captions (PixArt / diffusers), index the SA-1B captions, look them up.
    Captions(cmd::captions::CaptionsArgs),
    /// Summarise a store (parts, samples, features, bytes); --verify checks every shard.
    Inspect(cmd::inspect::InspectArgs),
    /// Benchmarks of whole stages beside their Python peers.
    Bench(cmd::bench::BenchArgs),
    /// Run one encoder over image files (or captions) into a safetensors file.
    Encode(cmd::encode::EncodeArgs),
    /// Train PixArt-α (a Redux adapter, a fine-tune, text) from a store.
    Train(cmd::train::Args),
    /// Image variations (or text-to-image) from a training checkpoint, as a PNG grid.
    Sample(cmd::sample::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let result: anyhow::Result<ExitCode> = match cli.command {
        Command::Ingest(args) => cmd::ingest::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Captions(args) => cmd::captions::run(args),
        Command::Inspect(args) => cmd::inspect::run(&args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Encode(args) => cmd::encode::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Sample(args) => cmd::sample::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // The whole chain, outermost first: "what failed: because: because".
            eprintln!("error: {}", cmd::error_line(&err));
            ExitCode::FAILURE
        }
    }
}
