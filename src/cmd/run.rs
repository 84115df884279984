//! `tensorbake run MANIFEST [--output STORE] [--rank R --world W]`: the whole
//! pipeline, shards to a committed store; resumable, idempotent, shardable.
//!
//! Progress goes to stderr (bars on a terminal, a line every `--progress-interval`
//! seconds otherwise); the JSON run report goes to stdout (and `--report FILE`). The
//! exit code is 0 when every shard this rank had to do was committed, 1 otherwise
//! (failed shards are listed; the same command again retries only them).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::manifest::Manifest;

/// Stream a manifest's shards through its encoders into a Zarr store.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The manifest (TOML).
    manifest: PathBuf,
    /// The store to write (a directory or s3://bucket/prefix); overrides the
    /// manifest's `store`.
    #[arg(long)]
    output: Option<String>,
    /// This worker's rank (shard i belongs to rank i % world); default from Slurm,
    /// Kubernetes (JOB_COMPLETION_INDEX) or RANK/WORLD_SIZE, else 0.
    #[arg(long)]
    rank: Option<usize>,
    /// Number of workers.
    #[arg(long)]
    world: Option<usize>,
    /// Also write the JSON run report to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Only the first N shards of the manifest (trials).
    #[arg(long)]
    limit_shards: Option<usize>,
    /// Shards streamed at once (overrides `[ingest] shards_in_flight`).
    #[arg(long)]
    shards_in_flight: Option<usize>,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, default_value_t = 10.0)]
    progress_interval: f64,
}

/// Builds the run of a manifest (nothing written on error) and runs it with progress
/// on stderr; returns the report.
pub fn build_and_run(
    manifest: &Manifest,
    origin: &str,
    base: &std::path::Path,
    output: Option<&str>,
    rank: tensorbake_kit::rank::Rank,
    progress_interval: Duration,
    tune: impl FnOnce(&mut tensorbake_run::RunConfig),
) -> Result<tensorbake_run::RunReport> {
    let mut cfg = manifest.run_config(base, output, rank)?;
    tune(&mut cfg);
    let run = cfg.build().with_context(|| format!("manifest {origin}"))?;
    let (listed, mine, todo) = run.shard_counts();
    eprintln!(
        "run: {} -> {}: {todo} shards to do ({} already committed{}), encoders {}",
        manifest.name,
        cfg.store,
        mine - todo,
        if rank.world > 1 {
            format!(
                "; rank {} of {} from {}: {mine} of {listed} shards",
                rank.rank, rank.world, rank.origin
            )
        } else {
            String::new()
        },
        run.encoder_names().join(", "),
    );
    let stop = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let report = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let r = run.run(&stop);
            done.store(true, Ordering::SeqCst);
            r
        });
        super::progress::watch("run", run.stats(), &done, progress_interval);
        worker.join().expect("run thread panicked")
    });
    for f in &report.failed_shards {
        eprintln!(
            "run: shard {} failed ({}), not committed: {}",
            f.shard, f.reason, f.error
        );
    }
    eprintln!(
        "run: {} parts committed ({} samples, {:.1} samples/s) in {:.1} s; {} failed; {} skipped samples",
        report.shards.committed,
        report.samples.written,
        report.samples_per_s,
        report.seconds,
        report.shards.failed,
        report.samples.skipped.values().sum::<u64>(),
    );
    Ok(report)
}

/// Runs the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let (manifest, base) = Manifest::load(&args.manifest)?;
    let rank = tensorbake_kit::rank::resolve(args.rank, args.world, |k| std::env::var(k).ok())?;
    let origin = args.manifest.display().to_string();
    let report = build_and_run(
        &manifest,
        &origin,
        &base,
        args.output.as_deref(),
        rank,
        Duration::from_secs_f64(args.progress_interval.max(0.1)),
        |cfg| {
            if let Some(n) = args.limit_shards {
                cfg.ingest.source.limit_shards = Some(n);
            }
            if let Some(n) = args.shards_in_flight {
                cfg.ingest.parallel.shards_in_flight = n;
            }
        },
    )?;
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    if report.complete() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: {} of {} shards not committed; run the same command again to retry them",
            report.shards.todo - report.shards.committed,
            report.shards.todo
        );
        Ok(ExitCode::FAILURE)
    }
}
