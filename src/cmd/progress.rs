//! Progress of a run on stderr: one indicatif bar per stage on a terminal, a plain
//! line every few seconds otherwise (logs of batch jobs).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tensorbake_run::{RunStats, StatsSnapshot};

fn rate(n: u64, s: f64) -> f64 {
    n as f64 / s.max(1e-9)
}

/// Seconds left at the rate parts have been committed so far.
fn eta(s: &StatsSnapshot) -> Option<f64> {
    let done = s.shards_committed + s.shards_failed;
    (done > 0).then(|| s.elapsed_s / done as f64 * s.shards_todo.saturating_sub(done) as f64)
}

/// One plain progress line (what a batch job's log shows).
pub fn line(prefix: &str, s: &StatsSnapshot) -> String {
    format!(
        "{prefix}: {:.0} s: shards read {}/{}, committed {} ({} failed); samples read {} \
         ({} skipped), encoded {}, written {} ({:.1}/s); {:.1} MB read; eta {}",
        s.elapsed_s,
        s.shards_read,
        s.shards_todo,
        s.shards_committed,
        s.shards_failed,
        s.samples_read,
        s.samples_skipped,
        s.samples_encoded,
        s.samples_written,
        rate(s.samples_written, s.elapsed_s),
        s.bytes as f64 / 1e6,
        eta(s).map_or_else(|| "?".to_string(), |e| format!("{e:.0} s")),
    )
}

/// Shows the progress of `stats` until `done` is set. `interval` is the period of
/// the plain lines (stderr not a terminal).
pub fn watch(prefix: &str, stats: &RunStats, done: &AtomicBool, interval: Duration) {
    if std::io::stderr().is_terminal() {
        bars(stats, done);
        return;
    }
    let mut last = Instant::now();
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() >= interval {
            eprintln!("{}", line(prefix, &stats.snapshot()));
            last = Instant::now();
        }
    }
}

fn bars(stats: &RunStats, done: &AtomicBool) {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let todo = stats.snapshot().shards_todo;
    let multi = MultiProgress::new();
    let style = |t: &str| ProgressStyle::with_template(t).expect("valid template");
    let ingest = multi
        .add(ProgressBar::new(todo).with_style(style("ingest {bar:24} {pos}/{len} shards  {msg}")));
    let encode = multi.add(ProgressBar::new_spinner().with_style(style("encode {spinner} {msg}")));
    let store = multi.add(ProgressBar::new(todo).with_style(style(
        "store  {bar:24} {pos}/{len} parts [{elapsed_precise} < {eta_precise}]  {msg}",
    )));
    while !done.load(Ordering::SeqCst) {
        let s = stats.snapshot();
        ingest.set_position(s.shards_read);
        ingest.set_message(format!(
            "{} samples ({} skipped), {:.1} img/s, {:.1} MB/s",
            s.samples_read,
            s.samples_skipped,
            rate(s.samples_read, s.elapsed_s),
            s.bytes as f64 / 1e6 / s.elapsed_s.max(1e-9)
        ));
        encode.set_message(format!(
            "{} samples, {:.1}/s; {} decoded samples waiting",
            s.samples_encoded,
            rate(s.samples_encoded, s.elapsed_s),
            s.in_flight
        ));
        encode.tick();
        store.set_position(s.shards_committed + s.shards_failed);
        store.set_message(format!(
            "{} samples written, {} failed shards",
            s.samples_written, s.shards_failed
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    for b in [&ingest, &encode, &store] {
        b.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_counts_and_eta() {
        let s = StatsSnapshot {
            elapsed_s: 20.0,
            shards_todo: 10,
            shards_read: 5,
            shards_committed: 4,
            samples_read: 100,
            samples_written: 80,
            ..StatsSnapshot::default()
        };
        let l = line("run", &s);
        assert!(
            l.contains("shards read 5/10, committed 4 (0 failed)"),
            "{l}"
        );
        assert!(l.contains("written 80 (4.0/s)"), "{l}");
        // 4 parts in 20 s, 6 to go: 30 s
        assert!(l.ends_with("eta 30 s"), "{l}");
        let none = line("run", &StatsSnapshot::default());
        assert!(none.ends_with("eta ?"), "{none}");
    }
}
