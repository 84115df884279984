//! `tensorbake ingest MANIFEST [--list]`: stream the manifest's shards through the
//! ingest stage (download, tar, grouping, captions, decoding) and report.
//!
//! With `--list`, one JSON object per kept sample goes to stdout in shard order:
//! `{"key", "shard", "fields", "caption", "width", "height"}`. Skipped samples and
//! failed shards go to stderr as JSON lines with their reason, and a final
//! `{"summary": ...}` line counts everything.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use serde_json::json;
use tensorbake_ingest::pipeline::Event;

use crate::manifest::Manifest;

/// Stream a manifest's shards into clean samples and report.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The manifest (TOML).
    manifest: PathBuf,
    /// Print one JSON line per kept sample on stdout, in shard order.
    #[arg(long)]
    list: bool,
    /// Shards streamed at once (overrides `[ingest] shards_in_flight`).
    #[arg(long)]
    shards_in_flight: Option<usize>,
    /// Only the first N shards.
    #[arg(long)]
    limit_shards: Option<usize>,
    /// This worker's rank (shard i belongs to rank i % world); default from Slurm,
    /// Kubernetes (JOB_COMPLETION_INDEX) or RANK/WORLD_SIZE, else 0.
    #[arg(long)]
    rank: Option<usize>,
    /// Number of workers.
    #[arg(long)]
    world: Option<usize>,
}

/// Per shard: the lines to print once all earlier shards are printed.
#[derive(Default)]
struct Reorder {
    next: usize,
    done: BTreeMap<usize, Vec<String>>,
    open: BTreeMap<usize, Vec<String>>,
}

impl Reorder {
    fn push(&mut self, shard: usize, line: String, out: &mut impl Write) {
        if shard == self.next {
            let _ = writeln!(out, "{line}");
        } else {
            self.open.entry(shard).or_default().push(line);
        }
    }

    fn finish(&mut self, shard: usize, out: &mut impl Write) {
        let lines = self.open.remove(&shard).unwrap_or_default();
        self.done.insert(shard, lines);
        while let Some(lines) = self.done.remove(&self.next) {
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
            self.next += 1;
            // lines of the new current shard that arrived early
            if let Some(early) = self.open.remove(&self.next) {
                for l in early {
                    let _ = writeln!(out, "{l}");
                }
            }
        }
        let _ = out.flush();
    }
}

/// Runs the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let (manifest, base) = Manifest::load(&args.manifest)?;
    let mut cfg = manifest.ingest_config(&base);
    if let Some(n) = args.shards_in_flight {
        cfg.parallel.shards_in_flight = n;
    }
    if let Some(n) = args.limit_shards {
        cfg.source.limit_shards = Some(n);
    }
    let rank = tensorbake_kit::rank::resolve(args.rank, args.world, |k| std::env::var(k).ok())?;
    let ingest = cfg.build()?;
    let shards: Vec<_> = ingest
        .shards()
        .iter()
        .filter(|s| rank.owns(s.index))
        .cloned()
        .collect();
    if rank.world > 1 {
        eprintln!(
            "{}",
            json!({"rank": rank.rank, "world": rank.world, "from": rank.origin, "shards": shards.len()})
        );
    }
    let names: Vec<String> = ingest.shards().iter().map(|s| s.name.clone()).collect();
    let urls: Vec<String> = ingest.shards().iter().map(|s| s.url.clone()).collect();
    // the reorder buffer counts positions in this worker's list
    let position: std::collections::HashMap<usize, usize> = shards
        .iter()
        .enumerate()
        .map(|(pos, s)| (s.index, pos))
        .collect();
    let state = Mutex::new(Reorder::default());
    // A progress bar on stderr when it is a terminal (indicatif hides itself otherwise;
    // the summary line at the end reports in any case).
    let bar = indicatif::ProgressBar::new(shards.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} shards {pos}/{len} [{elapsed_precise} < {eta}] {msg}",
        )
        .expect("valid template"),
    );
    let counts = Mutex::new((0u64, 0u64, 0u64)); // kept, skipped, bytes
    let stop = AtomicBool::new(false);
    let list = args.list;
    let on_event = |e: Event| {
        let mut st = state.lock().expect("reorder");
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        match e {
            Event::Sample(s) => {
                counts.lock().expect("counts").0 += 1;
                if list {
                    let line = json!({
                        "key": s.key, "shard": names[s.shard], "fields": s.fields,
                        "caption": s.caption, "width": s.orig_width, "height": s.orig_height,
                    });
                    st.push(position[&s.shard], line.to_string(), &mut out);
                }
            }
            Event::Skip(s) => {
                counts.lock().expect("counts").1 += 1;
                bar.suspend(|| eprintln!(
                    "{}",
                    json!({"skipped": s.key, "shard": names[s.shard], "reason": s.reason, "detail": s.detail})
                ));
            }
            Event::ShardEnd(end) => {
                let (kept, skipped, bytes) = {
                    let mut c = counts.lock().expect("counts");
                    c.2 += end.bytes;
                    *c
                };
                bar.inc(1);
                bar.set_message(format!(
                    "{kept} kept, {skipped} skipped, {:.1} MB/s",
                    bytes as f64 / 1e6 / bar.elapsed().as_secs_f64().max(1e-3)
                ));
                if let Some(err) = &end.error {
                    bar.suspend(|| eprintln!(
                        "{}",
                        json!({"failed_shard": names[end.shard], "url": urls[end.shard],
                               "reason": err.reason(), "error": err.to_string(), "kept_before_failure": end.kept})
                    ));
                }
                st.finish(position[&end.shard], &mut out);
            }
        }
    };
    let summary = ingest.run(&shards, &stop, &on_event);
    bar.finish_and_clear();
    eprintln!("{}", json!({ "summary": summary }));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reorder_prints_in_shard_order() {
        let mut r = Reorder::default();
        let mut out = Vec::new();
        r.push(1, "b1".into(), &mut out);
        r.push(0, "a1".into(), &mut out);
        r.push(2, "c1".into(), &mut out);
        r.finish(2, &mut out);
        r.push(1, "b2".into(), &mut out);
        r.finish(0, &mut out); // prints b1, b2 (early lines of the now-current shard)
        r.push(1, "b3".into(), &mut out);
        r.finish(1, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "a1\nb1\nb2\nb3\nc1\n");
    }
}
