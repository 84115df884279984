//! `tensorbake run MANIFEST [--output STORE] [--rank R --world W]`: the whole
//! pipeline, shards to a committed store; resumable, idempotent, shardable.
//!
//! Progress goes to stderr (bars on a terminal, a line every `--progress-interval`
//! seconds otherwise); the JSON run report goes to stdout (and `--report FILE`). The
//! exit code is 0 when every shard this rank had to do was committed, 1 otherwise
//! (failed shards are listed; the same command again retries only them).
//!
//! SIGINT or SIGTERM (Ctrl-C, a scheduler's preemption) drains the run: no new shard
//! is started, the shards in flight finish and commit, the report is written (exit 1:
//! not every shard was done); a second signal exits at once (committed parts are kept
//! either way, and the same command again does the rest). With `--devices` the parent
//! passes each signal on to its workers, which run in a process group of their own.
//!
//! `--metrics ADDR` serves the run's counters as Prometheus text at
//! `http://ADDR/metrics` while it runs (and `--metrics-hold` seconds after, so the
//! last scrape sees the final numbers); `--metrics-file PATH` writes the same text
//! to a file (atomically: written beside it, then renamed) every progress interval
//! and once more at the end, for batch systems without a scraper (Slurm) and
//! node_exporter's textfile collector.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tensorbake_run::metrics::MetricsEndpoint;

use crate::manifest::Manifest;

/// Set by the first SIGINT or SIGTERM: the run drains ([`tensorbake_run::Run::run`]).
static STOP: AtomicBool = AtomicBool::new(false);

/// The `--devices` parent's workers, to pass signals on to.
static WORKERS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

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
    /// Seconds between progress lines when stderr is not a terminal (and between
    /// rewrites of `--metrics-file`).
    #[arg(long, default_value_t = 10.0)]
    progress_interval: f64,
    /// Serve Prometheus metrics at http://ADDR/metrics during the run (HOST:PORT, or
    /// :PORT for every interface; port 0 picks a free one, printed on stderr).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Write the Prometheus metrics to this file every progress interval and at the
    /// end (replaced atomically).
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
    /// Seconds to keep serving `--metrics` after the run ends, so that the last
    /// scrape sees the final numbers.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    metrics_hold: f64,
    /// One worker process per GPU of this node (comma-separated CUDA indices, e.g.
    /// 0,1,2,3): worker i sees only its GPU (`CUDA_VISIBLE_DEVICES`, `LOCAL_RANK=i`)
    /// and is rank `rank·n + i` of `world·n`, so nodes and GPUs share one rank rule.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    devices: Vec<String>,
}

/// How a run is watched: progress lines and metrics.
#[derive(Debug)]
pub struct Watch {
    /// Seconds between progress lines (stderr not a terminal) and metrics file writes.
    pub progress_interval: Duration,
    /// Where the Prometheus metrics go.
    pub metrics: Metrics,
}

impl Watch {
    /// Progress lines every `interval`, no metrics.
    pub fn progress(interval: Duration) -> Self {
        Self {
            progress_interval: interval,
            metrics: Metrics::default(),
        }
    }
}

/// Where a run's Prometheus metrics go (nothing by default).
#[derive(Debug, Default)]
pub struct Metrics {
    /// The bound endpoint of `--metrics`.
    endpoint: Option<MetricsEndpoint>,
    /// `--metrics-file`.
    file: Option<PathBuf>,
    /// `--metrics-hold`.
    hold: Duration,
}

impl Metrics {
    /// Binds the endpoint and checks the file can be written, before anything else
    /// happens, so that a wrong address or path fails the run before the store is
    /// touched.
    fn open(addr: Option<&str>, file: Option<&Path>, hold: f64) -> Result<Self> {
        let endpoint = addr
            .map(MetricsEndpoint::bind)
            .transpose()
            .context("--metrics")?;
        if let Some(path) = file {
            let probe = temp_beside(path);
            std::fs::write(&probe, b"")
                .and_then(|()| std::fs::remove_file(&probe))
                .with_context(|| {
                    format!("--metrics-file {}: cannot write there", path.display())
                })?;
        }
        if !hold.is_finite() || hold < 0.0 {
            anyhow::bail!("--metrics-hold {hold}: not a number of seconds");
        }
        Ok(Self {
            endpoint,
            file: file.map(Path::to_path_buf),
            hold: Duration::from_secs_f64(hold),
        })
    }
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The file `path` is written through before it is renamed over `path`.
fn temp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

/// Replaces `path` with `text` atomically (readers see the old or the new file).
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = temp_beside(path);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing the metrics to {}", path.display()))
}

/// Builds the run of a manifest (nothing written on error) and runs it with progress
/// on stderr; returns the report.
pub fn build_and_run(
    manifest: &Manifest,
    origin: &str,
    base: &std::path::Path,
    output: Option<&str>,
    rank: tensorbake_kit::rank::Rank,
    watch: &Watch,
    tune: impl FnOnce(&mut tensorbake_run::RunConfig),
) -> Result<tensorbake_run::RunReport> {
    let (progress_interval, metrics) = (watch.progress_interval, &watch.metrics);
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
    if let Some(ep) = &metrics.endpoint {
        let addr = ep.local_addr().context("--metrics")?;
        eprintln!("run: metrics on http://{addr}/metrics");
    }
    let stop = &STOP;
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!(
                "run: interrupted again: exiting now (committed parts are kept; the same command again does the rest)"
            );
            std::process::exit(130);
        }
        eprintln!(
            "run: interrupted: finishing the shards in flight and starting no more (again to exit now)"
        );
    });
    let done = AtomicBool::new(false);
    let text = || run.metrics_text();
    let write_file = |path: &Path| {
        if let Err(e) = write_atomically(path, &text()) {
            eprintln!("run: warning: {e:#}");
        }
    };
    let serving = AtomicBool::new(false);
    let report = std::thread::scope(|scope| {
        // stops the endpoint however this closure ends (a panic of the run included),
        // before the scope waits for its threads
        let _stop_serving = StopOnDrop(&serving);
        if let Some(ep) = &metrics.endpoint {
            let stop = &serving;
            scope.spawn(move || ep.serve(&text, stop));
        }
        let worker = scope.spawn(|| {
            let r = run.run(stop);
            done.store(true, Ordering::SeqCst);
            r
        });
        let file_writer = metrics.file.as_deref().map(|path| {
            let (done, write_file) = (&done, &write_file);
            scope.spawn(move || {
                let mut last = Instant::now();
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                    if last.elapsed() >= progress_interval {
                        write_file(path);
                        last = Instant::now();
                    }
                }
            })
        });
        super::progress::watch("run", run.stats(), &done, progress_interval);
        let report = worker.join().expect("run thread panicked");
        // the final numbers, once every stage is done and no periodic write is left
        // that could land after them
        if let Some(h) = file_writer {
            h.join().expect("metrics file thread panicked");
        }
        if let Some(path) = metrics.file.as_deref() {
            write_file(path);
        }
        if metrics.endpoint.is_some() && !metrics.hold.is_zero() {
            eprintln!(
                "run: serving the final metrics for {:.0} s",
                metrics.hold.as_secs_f64()
            );
            // a signal ends the hold early
            let until = Instant::now() + metrics.hold;
            while !STOP.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
            }
        }
        report
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
    if !args.devices.is_empty() {
        return run_devices(&args, rank);
    }
    let metrics = Metrics::open(
        args.metrics.as_deref(),
        args.metrics_file.as_deref(),
        args.metrics_hold,
    )?;
    let origin = args.manifest.display().to_string();
    let report = build_and_run(
        &manifest,
        &origin,
        &base,
        args.output.as_deref(),
        rank,
        &Watch {
            progress_interval: Duration::from_secs_f64(args.progress_interval.max(0.1)),
            metrics,
        },
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

/// Worker `i` of `n` on a node that is `outer`: its rank and world.
fn worker_rank(outer: tensorbake_kit::rank::Rank, i: usize, n: usize) -> (usize, usize) {
    (outer.rank * n + i, outer.world * n)
}

/// `path` with `.gpuI` before its extension (`run.prom` -> `run.gpu1.prom`), so
/// that each worker's metrics file is its own and keeps its suffix.
fn per_worker_path(path: &Path, i: usize) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.gpu{i}.{}", ext.to_string_lossy()),
        None => format!("{stem}.gpu{i}"),
    };
    path.with_file_name(name)
}

/// `--metrics` for worker `i`: port + i (port 0 stays 0: each picks a free one).
fn per_worker_addr(addr: &str, i: usize) -> Result<String> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("--metrics {addr}: expected HOST:PORT or :PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--metrics {addr}: bad port"))?;
    if port == 0 {
        return Ok(addr.to_string());
    }
    let port = usize::from(port) + i;
    anyhow::ensure!(
        port <= usize::from(u16::MAX),
        "--metrics {addr}: port + {i} is past 65535"
    );
    Ok(format!("{host}:{port}"))
}

/// `--devices`: one `tensorbake run` per device, each with its rank and its GPU,
/// their stderr lines prefixed with the device, their reports gathered into one.
fn run_devices(args: &Args, outer: tensorbake_kit::rank::Rank) -> Result<ExitCode> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let n = args.devices.len();
    for d in &args.devices {
        anyhow::ensure!(
            !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()),
            "--devices {}: `{d}` is not a GPU index",
            args.devices.join(",")
        );
    }
    let mut seen = args.devices.clone();
    seen.sort();
    seen.dedup();
    anyhow::ensure!(
        seen.len() == n,
        "--devices {}: a GPU is listed twice",
        args.devices.join(",")
    );
    let exe = std::env::current_exe().context("finding this executable")?;
    // The workers run in a process group of their own, so that a signal reaches each
    // of them once: from here. A scheduler's SIGTERM to this process alone (what
    // Kubernetes sends the container's first process) drains them; a second signal
    // makes them exit at once. The parent waits for them either way.
    let _ = ctrlc::set_handler(|| {
        let again = STOP.swap(true, Ordering::SeqCst);
        eprintln!(
            "run: interrupted{}: passing it on to the workers and waiting for them",
            if again { " again" } else { "" }
        );
        let pids = WORKERS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for pid in pids {
            // a worker that has finished is gone: nothing to say about it
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    });
    let mut workers = Vec::with_capacity(n);
    for (i, device) in args.devices.iter().enumerate() {
        let (rank, world) = worker_rank(outer, i, n);
        let mut c = Command::new(&exe);
        c.arg("run")
            .arg(&args.manifest)
            .args(["--rank", &rank.to_string(), "--world", &world.to_string()])
            .args(["--progress-interval", &args.progress_interval.to_string()])
            .args(["--metrics-hold", &args.metrics_hold.to_string()])
            .env("CUDA_VISIBLE_DEVICES", device)
            .env("LOCAL_RANK", i.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(o) = &args.output {
            c.args(["--output", o]);
        }
        if let Some(v) = args.limit_shards {
            c.args(["--limit-shards", &v.to_string()]);
        }
        if let Some(v) = args.shards_in_flight {
            c.args(["--shards-in-flight", &v.to_string()]);
        }
        if let Some(a) = &args.metrics {
            c.args(["--metrics", &per_worker_addr(a, i)?]);
        }
        if let Some(p) = &args.metrics_file {
            c.arg("--metrics-file").arg(per_worker_path(p, i));
        }
        let mut child = c
            .spawn()
            .with_context(|| format!("starting the worker for GPU {device}"))?;
        WORKERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        let stderr = child.stderr.take();
        let tag = format!("[gpu {device}] ");
        let relay = std::thread::spawn(move || {
            if let Some(e) = stderr {
                for line in std::io::BufReader::new(e).lines().map_while(Result::ok) {
                    eprintln!("{tag}{line}");
                }
            }
        });
        eprintln!("run: worker {i} on GPU {device}: rank {rank} of {world}");
        workers.push((device.clone(), i, rank, child, relay));
    }
    let mut entries = Vec::with_capacity(n);
    let mut all_ok = true;
    for (device, i, rank, child, relay) in workers {
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for the worker on GPU {device}"))?;
        let _ = relay.join();
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let code = out.status.code();
        all_ok &= out.status.success();
        if !out.status.success() {
            eprintln!(
                "run: the worker on GPU {device} (rank {rank}) ended with {}",
                out.status
            );
        }
        entries.push(serde_json::json!({
            "device": device,
            "local_rank": i,
            "rank": rank,
            "exit_code": code,
            "report": report,
        }));
    }
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "devices": args.devices,
        "rank": outer.rank,
        "world": outer.world,
        "workers": entries,
    }))?;
    println!("{json}");
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "error: a worker did not finish its shards; run the same command again to retry them"
        );
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_share_the_rank_rule_and_get_their_own_outputs() {
        let node = |rank, world| tensorbake_kit::rank::Rank {
            rank,
            world,
            origin: "test",
        };
        // node 1 of 2 with 4 GPUs: ranks 4..8 of 8
        let ranks: Vec<_> = (0..4).map(|i| worker_rank(node(1, 2), i, 4)).collect();
        assert_eq!(ranks, [(4, 8), (5, 8), (6, 8), (7, 8)]);
        assert_eq!(worker_rank(node(0, 1), 1, 2), (1, 2));
        assert_eq!(
            per_worker_path(Path::new("/m/run.prom"), 2),
            Path::new("/m/run.gpu2.prom")
        );
        assert_eq!(per_worker_path(Path::new("m"), 0), Path::new("m.gpu0"));
        assert_eq!(
            per_worker_addr("127.0.0.1:9100", 3).unwrap(),
            "127.0.0.1:9103"
        );
        assert_eq!(per_worker_addr(":0", 3).unwrap(), ":0");
        assert!(per_worker_addr(":65535", 1).is_err());
        assert!(per_worker_addr("9100", 1).is_err());
    }
}
