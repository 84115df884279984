//! Store benchmark: `cargo bench -p tensorbake-store --bench store`.
//!
//! Writes latent-, SigLIP- and T5-sized stores under `$TENSORBAKE_BENCH_DIR` (default:
//! a temporary directory), measures write MB/s and random single-sample reads/s, runs
//! zarr-python and tensorstore on the same store through `$TENSORBAKE_PYTHON` (or
//! `/opt/refvenv/bin/python` when present), and prints a Markdown table.
//! `TENSORBAKE_BENCH_READS` sets the reads per reader (default 200).

use std::path::PathBuf;

use tensorbake_store::bench::{BenchConfig, default_profiles, run_bench};

fn main() {
    // `cargo bench` passes `--bench`; anything else (`cargo test --all-targets`) only
    // checks that the target builds and must not write hundreds of MB.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("store bench: run it with `cargo bench -p tensorbake-store --bench store`");
        return;
    }
    let python = std::env::var_os("TENSORBAKE_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from("/opt/refvenv/bin/python");
            p.exists().then_some(p)
        });
    let tmp;
    let dir = match std::env::var_os("TENSORBAKE_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().expect("temporary directory");
            tmp.path().to_path_buf()
        }
    };
    let reads = std::env::var("TENSORBAKE_BENCH_READS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let config = BenchConfig {
        dir,
        python,
        reads,
        profiles: default_profiles(),
    };
    match run_bench(&config) {
        Ok(report) => println!("{}", report.table()),
        Err(e) => {
            eprintln!("store bench failed: {e}");
            std::process::exit(1);
        }
    }
}
