//! `tensorbake demo [--out DIR]`: the whole job on synthetic data, offline.
//!
//! Synthesizes SA-1B-style shards (gzip tars of real JPEGs and large mask `.json`
//! members, shuffled) with a SAM-LLaVA-style caption tar, serves them on a loopback
//! HTTP port, and streams them through the pipeline as a real job would: shard list
//! from the links file, HTTP streaming, caption index built on first use, caption
//! cleaning, decoding and resizing. It leaves in DIR: `shards/` (the data, with a
//! links file of relative paths) and `manifest.toml`, which
//! `tensorbake ingest DIR/manifest.toml --list` runs again offline.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use tensorbake_ingest::pipeline::Event;
use tensorbake_kit::http::FileServer;
use tensorbake_kit::synth::{Sa1bSpec, write_sa1b};

use crate::manifest::Manifest;

/// Run the pipeline on synthetic SA-1B-style shards served over loopback HTTP.
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
    /// Target resolution.
    #[arg(long, default_value_t = 256)]
    resolution: u32,
}

fn manifest_text(links: &str, captions: &str, resolution: u32) -> String {
    format!(
        "# Written by `tensorbake demo`: SA-1B-style synthetic shards.\n\
         name = \"demo\"\nstore = \"store\"\n\n[source]\nkind = \"sa1b\"\nlinks = \"{links}\"\n\
         captions = \"{captions}\"\ncaption_db = \"shards/captions.redb\"\n\n\
         [preprocess]\nresolution = {resolution}\n\n[captions]\nclean = true\nstrip_boilerplate = true\n"
    )
}

/// Runs the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let out = &args.out;
    let shards_dir = out.join("shards");
    let t0 = std::time::Instant::now();
    eprintln!(
        "demo: writing {} synthetic SA-1B shards to {}",
        args.shards,
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
    std::fs::write(
        out.join("manifest.toml"),
        manifest_text(
            "shards/links.tsv",
            "shards/SA1B_caption.tar.gz",
            args.resolution,
        ),
    )?;

    // this run streams them over HTTP from a loopback server
    let server = FileServer::start(&shards_dir).context("starting the loopback server")?;
    let http_links = shards_dir.join("links-http.tsv");
    write_links(&http_links, &layout.shards, |name| server.url(name))?;
    let text = manifest_text(
        "shards/links-http.tsv",
        &server.url("SA1B_caption.tar.gz"),
        args.resolution,
    );
    let manifest = Manifest::parse(&text, "demo manifest")?;
    let _ = std::fs::remove_file(shards_dir.join("captions.redb"));
    let ingest = manifest.ingest_config(out).build()?;
    eprintln!(
        "demo: streaming {} shards from {}",
        ingest.shards().len(),
        server.base_url()
    );
    let stop = AtomicBool::new(false);
    let summary = ingest.run(ingest.shards(), &stop, &|e| {
        if let Event::Skip(s) = e {
            eprintln!("demo: skipped {} ({})", s.key, s.reason);
        }
    });
    println!("tensorbake demo: {}", out.display());
    println!(
        "  shards streamed      {} ok, {} failed",
        summary.shards_ok,
        summary.failed_shards.values().sum::<u64>()
    );
    println!(
        "  samples kept         {} of {}",
        summary.kept,
        layout.caption_of.len()
    );
    println!(
        "  bytes streamed       {:.1} MB",
        summary.bytes as f64 / 1e6
    );
    println!(
        "  ingest time          {:.2} s ({:.1} images/s)",
        summary.seconds,
        summary.kept as f64 / summary.seconds.max(1e-9)
    );
    println!("  total time           {:.2} s", t0.elapsed().as_secs_f64());
    println!(
        "  run again offline    tensorbake ingest {} --list",
        out.join("manifest.toml").display()
    );
    let ok = summary.kept as usize == layout.caption_of.len() && summary.failed_shards.is_empty();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn write_links(path: &Path, shards: &[PathBuf], url: impl Fn(&str) -> String) -> Result<()> {
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
