//! `tensorbake captions`: clean captions as PixArt does, build the SA-1B caption
//! index, look captions up.

use std::io::{BufRead, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tensorbake_ingest::caption::index::{BuildOptions, CaptionIndex, build_index};
use tensorbake_ingest::caption::{CaptionOutcome, CleanConfig};

/// Caption cleaning and the SA-1B caption index.
#[derive(Debug, Args)]
pub struct CaptionsArgs {
    #[command(subcommand)]
    command: CaptionsCommand,
}

#[derive(Debug, Subcommand)]
enum CaptionsCommand {
    /// Read one JSON string per line on stdin, write the cleaned caption as one JSON
    /// string per line on stdout (PixArt / diffusers `_clean_caption`, twice).
    /// Lines whose caption is skipped (too long, NUL bytes, not a JSON string)
    /// print `null`; a summary of the reasons goes to stderr.
    Clean {
        /// Also strip captioner lead-ins ("The image shows", ...).
        #[arg(long)]
        strip_boilerplate: bool,
        /// Do not apply PixArt's cleaning (only trim; with --strip-boilerplate, only strip).
        #[arg(long)]
        no_clean: bool,
        /// Longest caption accepted, in bytes.
        #[arg(long, default_value_t = CleanConfig::default().max_bytes)]
        max_bytes: usize,
    },
    /// Stream a caption tar (`SA1B_caption.tar.gz`; gzip or plain tar; a path,
    /// file:// or http(s) URL) into an embedded database keyed by sample id.
    /// Resumable: run it again after an interruption.
    Index {
        /// The caption tar: path or URL.
        source: String,
        /// The database file to create or resume.
        #[arg(long)]
        db: PathBuf,
        /// Tar entries per committed batch.
        #[arg(long, default_value_t = 100_000)]
        commit_every: u64,
    },
    /// Print the raw caption of each sample id (e.g. `sa_1234`) as JSON lines.
    Get {
        /// The caption index.
        #[arg(long)]
        db: PathBuf,
        /// Sample ids.
        ids: Vec<String>,
    },
}

/// Runs `tensorbake captions ...`.
pub fn run(args: CaptionsArgs) -> Result<ExitCode> {
    match args.command {
        CaptionsCommand::Clean {
            strip_boilerplate,
            no_clean,
            max_bytes,
        } => clean(&CleanConfig {
            clean: !no_clean,
            strip_boilerplate,
            max_bytes,
        }),
        CaptionsCommand::Index {
            source,
            db,
            commit_every,
        } => index(&source, &db, commit_every),
        CaptionsCommand::Get { db, ids } => get(&db, &ids),
    }
}

fn clean(config: &CleanConfig) -> Result<ExitCode> {
    let cleaner = config.build();
    let stdin = std::io::stdin().lock();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut counts: std::collections::BTreeMap<&'static str, u64> = Default::default();
    for (n, line) in stdin.split(b'\n').enumerate() {
        let line = line.context("reading stdin")?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        let outcome = match serde_json::from_slice::<String>(line) {
            Ok(raw) => Some(cleaner.clean(&raw)),
            Err(err) => {
                tracing::warn!(line = n + 1, %err, "not a JSON string; writing null");
                None
            }
        };
        let (reason, text) = match &outcome {
            Some(CaptionOutcome::Clean(s)) => ("ok", Some(s.as_str())),
            // The reference gives "" for these: keep line-for-line parity.
            Some(o @ (CaptionOutcome::Empty | CaptionOutcome::EmptyAfterClean)) => {
                (o.reason(), Some(""))
            }
            Some(o) => (o.reason(), None),
            None => ("invalid_json", None),
        };
        *counts.entry(reason).or_default() += 1;
        match text {
            Some(t) => serde_json::to_writer(&mut out, t)?,
            None => out.write_all(b"null")?,
        }
        out.write_all(b"\n")?;
    }
    out.flush().context("writing stdout")?;
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    eprintln!("captions: {}", summary.join(" "));
    Ok(ExitCode::SUCCESS)
}

/// Opens the caption source: a local path, a file:// URL, or an http(s) URL (streamed,
/// resumed with Range requests after a dropped connection).
fn open_source(source: &str) -> Result<Box<dyn Read + Send>> {
    let stream = tensorbake_ingest::source::open_url(source)
        .with_context(|| format!("opening caption source {source}"))?;
    Ok(Box::new(stream))
}

fn label(source: &str) -> String {
    source
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(source)
        .to_string()
}

fn index(source: &str, db: &Path, commit_every: u64) -> Result<ExitCode> {
    let options = BuildOptions {
        label: label(source),
        commit_every,
    };
    let reader = open_source(source)?;
    let started = std::time::Instant::now();
    let report = build_index(db, reader, &options, |p| {
        tracing::info!(
            entries = p.entries,
            captions = p.captions,
            source_bytes = p.source_bytes,
            "caption index batch committed"
        );
    })
    .with_context(|| format!("indexing {source} into {}", db.display()))?;
    let p = &report.progress;
    if report.already_complete {
        eprintln!(
            "{}: already complete ({} captions from {})",
            db.display(),
            p.captions,
            options.label
        );
    } else {
        let secs = started.elapsed().as_secs_f64();
        let fresh = p.entries - p.resumed_from;
        eprintln!(
            "{}: {} captions ({} entries, {} skipped, {} not UTF-8{}) in {:.1} s ({:.0} entries/s)",
            db.display(),
            p.captions,
            p.entries,
            p.skipped,
            p.invalid_utf8,
            if p.resumed_from > 0 {
                format!(", resumed after {}", p.resumed_from)
            } else {
                String::new()
            },
            secs,
            fresh as f64 / secs.max(1e-9)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn get(db: &Path, ids: &[String]) -> Result<ExitCode> {
    let index = CaptionIndex::open(db)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut missing = 0;
    for id in ids {
        match index.get_bytes(id)? {
            Some(bytes) => serde_json::to_writer(&mut out, &String::from_utf8_lossy(&bytes))?,
            None => {
                missing += 1;
                out.write_all(b"null")?;
            }
        }
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
