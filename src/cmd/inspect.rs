//! `tensorbake inspect STORE [--json] [--verify]`: what a store holds and whether its
//! bytes are intact.
//!
//! Exit status: 0 when the store opened (and, with `--verify`, no damage was found);
//! 2 when `--verify` found damaged parts or a damaged null embedding (the
//! report lists them); 1 on any error.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tensorbake_store::{Location, StoreInfo, VerifyReport, inspect, verify};

/// Arguments of `tensorbake inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The store: a directory, or s3://bucket/prefix (endpoint and credentials from
    /// AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP).
    pub store: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Read every shard of every committed part and check its checksums.
    #[arg(long)]
    pub verify: bool,
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn print_table(info: &StoreInfo, report: Option<&VerifyReport>) {
    println!("store        {}", info.location);
    println!("format       {}", info.format_version);
    println!(
        "parts        {} committed, {} uncommitted",
        info.parts,
        info.uncommitted_parts.len()
    );
    println!("samples      {}", info.samples);
    println!(
        "stored       {} ({} per sample, compression {})",
        human_bytes(info.stored_bytes as f64),
        human_bytes(info.bytes_per_sample),
        info.compression_ratio
            .map_or_else(|| "-".to_string(), |r| format!("{r:.3}x"))
    );
    if let Some(res) = info.spec.resolution {
        println!("resolution   {res}");
    }
    println!();
    println!(
        "{:<20} {:<9} {:<16} {:>12} {:>12} {:>8}  model",
        "array", "dtype", "shape", "stored", "per sample", "ratio"
    );
    for a in &info.arrays {
        let model = info.spec.features.get(&a.name).map_or(String::new(), |f| {
            format!(
                "{} (sha256 {})",
                f.model,
                f.weights_sha256.get(..12).unwrap_or(&f.weights_sha256)
            )
        });
        println!(
            "{:<20} {:<9} {:<16} {:>12} {:>12} {:>8}  {}",
            a.name,
            a.dtype,
            format!("{:?}", a.shape),
            human_bytes(a.stored_bytes as f64),
            human_bytes(a.bytes_per_sample),
            a.compression_ratio
                .map_or_else(|| "-".to_string(), |r| format!("{r:.3}x")),
            model
        );
    }
    println!();
    println!(
        "null         {}",
        if info.null_embeddings.is_empty() {
            "no null embedding (empty caption, black image) recorded".to_string()
        } else {
            format!(
                "embedding of nothing (empty caption / black image) for {}",
                info.null_embeddings.join(", ")
            )
        }
    );
    if !info.uncommitted_parts.is_empty() {
        println!();
        println!(
            "uncommitted (invisible to readers, redone by the next run): {}",
            info.uncommitted_parts.join(", ")
        );
    }
    if let Some(report) = report {
        println!();
        println!(
            "verify       {} parts, {} shards, {} chunks checked: {}",
            report.parts_checked,
            report.shards_checked,
            report.chunks_checked,
            if report.ok() {
                "ok".to_string()
            } else {
                format!(
                    "{} damaged parts, {} null-embedding problems",
                    report.damaged.len(),
                    report.null_problems.len()
                )
            }
        );
        if report.null_arrays_checked > 0 {
            println!(
                "             {} null-embedding arrays checked",
                report.null_arrays_checked
            );
        }
        for p in &report.null_problems {
            println!("damaged null embedding: {p}");
        }
        for d in &report.damaged {
            println!("damaged part {} (source {}):", d.part, d.source);
            for p in &d.problems {
                println!("  {p}");
            }
        }
    }
}

/// Runs `tensorbake inspect`.
pub fn run(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let location: Location = args.store.parse()?;
    let info = inspect(&location).with_context(|| format!("inspecting {location}"))?;
    let report = if args.verify {
        Some(verify(&location).with_context(|| format!("verifying {location}"))?)
    } else {
        None
    };
    if args.json {
        let mut doc = serde_json::to_value(&info)?;
        if let Some(r) = &report {
            doc["verify"] = serde_json::to_value(r)?;
            doc["verify"]["ok"] = r.ok().into();
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_table(&info, report.as_ref());
    }
    Ok(match report {
        Some(r) if !r.ok() => ExitCode::from(2),
        _ => ExitCode::SUCCESS,
    })
}
