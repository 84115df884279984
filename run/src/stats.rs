//! Live counters of a run, shared by the stages and read by progress displays, the
//! Prometheus endpoint (`metrics`) and the final report: one set of numbers, bumped
//! where the work happens, read by everyone.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::report::{EncoderTime, StageTime};

/// Busy and waiting time and samples of one stage (all its threads together).
#[derive(Debug, Default)]
pub(crate) struct StageClock {
    busy_ns: AtomicU64,
    wait_ns: AtomicU64,
    samples: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn secs(ns: &AtomicU64) -> f64 {
    ns.load(Ordering::Relaxed) as f64 / 1e9
}

impl StageClock {
    pub(crate) fn busy(&self, d: Duration) {
        self.busy_ns.fetch_add(nanos(d), Ordering::Relaxed);
    }

    pub(crate) fn wait(&self, d: Duration) {
        self.wait_ns.fetch_add(nanos(d), Ordering::Relaxed);
    }

    pub(crate) fn samples(&self, n: u64) {
        self.samples.fetch_add(n, Ordering::Relaxed);
    }

    /// The stage's time so far (`threads` is the caller's to set).
    pub(crate) fn time(&self) -> StageTime {
        let mut t = StageTime {
            threads: 0,
            busy_s: secs(&self.busy_ns),
            wait_s: secs(&self.wait_ns),
            samples: self.samples.load(Ordering::Relaxed),
            samples_per_s: 0.0,
        };
        t.finish();
        t
    }
}

/// One encoder's clocks: host time in its `run` (the model thread) with its samples,
/// host time preparing its inputs, and device time of its work on a GPU.
#[derive(Debug, Default)]
pub(crate) struct EncoderClock {
    pub(crate) run: StageClock,
    prepare_ns: AtomicU64,
    gpu_ns: AtomicU64,
    gpu_spans: AtomicU64,
}

impl EncoderClock {
    pub(crate) fn prepared(&self, d: Duration) {
        self.prepare_ns.fetch_add(nanos(d), Ordering::Relaxed);
    }

    /// Device time of one batch (measured with CUDA events).
    pub(crate) fn gpu(&self, d: Duration) {
        self.gpu_ns.fetch_add(nanos(d), Ordering::Relaxed);
        self.gpu_spans.fetch_add(1, Ordering::Relaxed);
    }
}

/// A queue's depth: messages sent and not yet received. Raised after a send and
/// lowered after a receive, so it can dip below zero for an instant (read as 0).
#[derive(Debug, Default)]
pub(crate) struct Depth(AtomicI64);

impl Depth {
    pub(crate) fn sent(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn received(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        u64::try_from(self.0.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

/// Counters every stage bumps as it goes; [`RunStats::snapshot`] reads them all.
#[derive(Debug)]
pub struct RunStats {
    started: Instant,
    /// Shards this run has to do.
    pub shards_todo: AtomicU64,
    /// Shards read to their end (or failure) by the ingest stage.
    pub shards_read: AtomicU64,
    /// Parts committed.
    pub shards_committed: AtomicU64,
    /// Shards that failed (not committed).
    pub shards_failed: AtomicU64,
    /// Samples decoded and kept by the ingest stage.
    pub samples_read: AtomicU64,
    /// Samples skipped by the ingest stage.
    pub samples_skipped: AtomicU64,
    /// Samples through the encoders.
    pub samples_encoded: AtomicU64,
    /// Samples handed to part writers.
    pub samples_written: AtomicU64,
    /// Bytes read from the sources (counted when a shard ends).
    pub bytes: AtomicU64,
    /// Requests after the first (resumes and retries), counted when a shard ends.
    pub retries: AtomicU64,
    /// Feature bytes the writers copied from a GPU to the host.
    pub device_to_host_bytes: AtomicU64,
    /// Model input bytes the encoders uploaded to a GPU.
    pub host_to_device_bytes: AtomicU64,
    /// Samples decoded but not yet written or dropped.
    pub in_flight: AtomicU64,
    /// The most `in_flight` ever was.
    pub in_flight_high: AtomicU64,
    /// Whether the run has finished (every stage done).
    pub finished: AtomicBool,
    skipped_by_reason: Mutex<BTreeMap<String, u64>>,
    ingest_blocked_ns: AtomicU64,
    /// The thread that prepares batches (preprocessing, tokenizing, uploads).
    pub(crate) prepare: StageClock,
    /// The thread that runs the models.
    pub(crate) encode: StageClock,
    pub(crate) write: StageClock,
    /// Per encoder, in manifest order: (feature name, its clocks).
    encoders: Vec<(String, EncoderClock)>,
    pub(crate) encode_queue: Depth,
    pub(crate) write_queue: Depth,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StatsSnapshot {
    /// Seconds since the run was built.
    pub elapsed_s: f64,
    /// See [`RunStats::shards_todo`].
    pub shards_todo: u64,
    /// See [`RunStats::shards_read`].
    pub shards_read: u64,
    /// See [`RunStats::shards_committed`].
    pub shards_committed: u64,
    /// See [`RunStats::shards_failed`].
    pub shards_failed: u64,
    /// See [`RunStats::samples_read`].
    pub samples_read: u64,
    /// See [`RunStats::samples_skipped`].
    pub samples_skipped: u64,
    /// See [`RunStats::samples_encoded`].
    pub samples_encoded: u64,
    /// See [`RunStats::samples_written`].
    pub samples_written: u64,
    /// See [`RunStats::bytes`].
    pub bytes: u64,
    /// See [`RunStats::retries`].
    pub retries: u64,
    /// See [`RunStats::in_flight`].
    pub in_flight: u64,
    /// See [`RunStats::in_flight_high`].
    pub in_flight_high: u64,
    /// Seconds the decode threads spent blocked on a full encode queue, together.
    pub ingest_blocked_s: f64,
    /// Messages (samples and shard ends) waiting for the encoders.
    pub encode_queue: u64,
    /// Encoded batches and shard ends waiting for the writers, all writers together.
    pub write_queue: u64,
    /// See [`RunStats::finished`].
    pub finished: bool,
}

impl RunStats {
    /// Counters of a run with `shards_todo` shards and these encoders (feature names,
    /// in manifest order).
    pub(crate) fn new(shards_todo: u64, encoders: &[String]) -> Self {
        Self {
            started: Instant::now(),
            shards_todo: AtomicU64::new(shards_todo),
            shards_read: AtomicU64::new(0),
            shards_committed: AtomicU64::new(0),
            shards_failed: AtomicU64::new(0),
            samples_read: AtomicU64::new(0),
            samples_skipped: AtomicU64::new(0),
            samples_encoded: AtomicU64::new(0),
            samples_written: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            device_to_host_bytes: AtomicU64::new(0),
            host_to_device_bytes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            in_flight_high: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            skipped_by_reason: Mutex::new(BTreeMap::new()),
            ingest_blocked_ns: AtomicU64::new(0),
            prepare: StageClock::default(),
            encode: StageClock::default(),
            write: StageClock::default(),
            encoders: encoders
                .iter()
                .map(|n| (n.clone(), EncoderClock::default()))
                .collect(),
            encode_queue: Depth::default(),
            write_queue: Depth::default(),
        }
    }

    pub(crate) fn sample_read(&self) {
        self.samples_read.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.in_flight_high.fetch_max(now, Ordering::SeqCst);
    }

    pub(crate) fn sample_skipped(&self, reason: &str) {
        self.samples_skipped.fetch_add(1, Ordering::Relaxed);
        let mut m = self
            .skipped_by_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *m.entry(reason.to_string()).or_default() += 1;
    }

    pub(crate) fn shard_read(&self, bytes: u64, retries: u64) {
        self.shards_read.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.retries.fetch_add(retries, Ordering::Relaxed);
    }

    pub(crate) fn ingest_blocked(&self, d: Duration) {
        self.ingest_blocked_ns
            .fetch_add(nanos(d), Ordering::Relaxed);
    }

    /// `n` samples left the pipeline without being written (their shard failed).
    pub(crate) fn dropped(&self, n: u64) {
        self.in_flight.fetch_sub(n, Ordering::SeqCst);
    }

    pub(crate) fn written(&self, n: u64) {
        self.samples_written.fetch_add(n, Ordering::Relaxed);
        self.in_flight.fetch_sub(n, Ordering::SeqCst);
    }

    pub(crate) fn shard_committed(&self) {
        self.shards_committed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn shard_failed(&self) {
        self.shards_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The clocks of encoder `i` (manifest order).
    pub(crate) fn encoder(&self, i: usize) -> &EncoderClock {
        &self.encoders[i].1
    }

    /// All counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            elapsed_s: self.started.elapsed().as_secs_f64(),
            shards_todo: g(&self.shards_todo),
            shards_read: g(&self.shards_read),
            shards_committed: g(&self.shards_committed),
            shards_failed: g(&self.shards_failed),
            samples_read: g(&self.samples_read),
            samples_skipped: g(&self.samples_skipped),
            samples_encoded: g(&self.samples_encoded),
            samples_written: g(&self.samples_written),
            bytes: g(&self.bytes),
            retries: g(&self.retries),
            in_flight: g(&self.in_flight),
            in_flight_high: g(&self.in_flight_high),
            ingest_blocked_s: secs(&self.ingest_blocked_ns),
            encode_queue: self.encode_queue.get(),
            write_queue: self.write_queue.get(),
            finished: self.finished.load(Ordering::SeqCst),
        }
    }

    /// Samples skipped so far, by reason.
    pub fn skipped_by_reason(&self) -> BTreeMap<String, u64> {
        self.skipped_by_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The preparing thread's time so far: busy preprocessing and uploading, waiting
    /// for decoded samples.
    pub fn prepare_time(&self) -> StageTime {
        StageTime {
            threads: 1,
            ..self.prepare.time()
        }
    }

    /// The model thread's time so far: busy running the encoders, waiting for a
    /// prepared batch.
    pub fn encode_time(&self) -> StageTime {
        StageTime {
            threads: 1,
            ..self.encode.time()
        }
    }

    /// The part writers' time so far, all `threads` together.
    pub fn write_time(&self, threads: usize) -> StageTime {
        StageTime {
            threads,
            ..self.write.time()
        }
    }

    /// Each encoder's time so far, by feature name.
    pub fn encoder_times(&self) -> BTreeMap<String, EncoderTime> {
        self.encoders
            .iter()
            .map(|(name, c)| {
                let t = c.run.time();
                let spans = c.gpu_spans.load(Ordering::Relaxed);
                (
                    name.clone(),
                    EncoderTime {
                        busy_s: t.busy_s,
                        prepare_s: secs(&c.prepare_ns),
                        gpu_s: (spans > 0).then(|| secs(&c.gpu_ns)),
                        samples: t.samples,
                        samples_per_s: t.samples_per_s,
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_skips_and_depths_add_up() {
        let s = RunStats::new(2, &["siglip".into(), "t5".into()]);
        s.sample_skipped("corrupt_image");
        s.sample_skipped("corrupt_image");
        s.sample_skipped("missing_caption");
        assert_eq!(
            s.skipped_by_reason(),
            BTreeMap::from([("corrupt_image".into(), 2), ("missing_caption".into(), 1)])
        );
        assert_eq!(s.snapshot().samples_skipped, 3);
        s.encoder(1).run.busy(Duration::from_millis(500));
        s.encoder(1).run.samples(4);
        s.encoder(1).prepared(Duration::from_millis(250));
        s.encoder(1).gpu(Duration::from_millis(100));
        s.encoder(1).gpu(Duration::from_millis(300));
        let t = s.encoder_times();
        assert_eq!(t["siglip"].samples, 0);
        assert_eq!(t["siglip"].gpu_s, None, "no span: no device time");
        assert_eq!(t["t5"].samples, 4);
        assert!((t["t5"].busy_s - 0.5).abs() < 1e-9);
        assert!((t["t5"].prepare_s - 0.25).abs() < 1e-9);
        assert!((t["t5"].gpu_s.unwrap() - 0.4).abs() < 1e-9);
        assert!((t["t5"].samples_per_s - 8.0).abs() < 1e-6);
        s.write.busy(Duration::from_secs(2));
        s.write.wait(Duration::from_secs(1));
        s.write.samples(6);
        let w = s.write_time(3);
        assert_eq!((w.threads, w.samples), (3, 6));
        assert!((w.busy_s - 2.0).abs() < 1e-9 && (w.wait_s - 1.0).abs() < 1e-9);
        assert!((w.samples_per_s - 3.0).abs() < 1e-9);
        // a receive seen before its send reads as an empty queue, not a huge one
        s.encode_queue.received();
        assert_eq!(s.snapshot().encode_queue, 0);
        s.encode_queue.sent();
        s.encode_queue.sent();
        assert_eq!(s.snapshot().encode_queue, 1);
        s.shard_read(100, 2);
        s.shard_read(50, 0);
        let snap = s.snapshot();
        assert_eq!((snap.shards_read, snap.bytes, snap.retries), (2, 150, 2));
    }
}
