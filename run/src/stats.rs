//! Live counters of a run, shared by the stages and read by progress displays.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

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
    /// Samples decoded but not yet written or dropped.
    pub in_flight: AtomicU64,
    /// The most `in_flight` ever was.
    pub in_flight_high: AtomicU64,
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
    /// See [`RunStats::in_flight`].
    pub in_flight: u64,
    /// See [`RunStats::in_flight_high`].
    pub in_flight_high: u64,
}

impl RunStats {
    pub(crate) fn new(shards_todo: u64) -> Self {
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
            in_flight: AtomicU64::new(0),
            in_flight_high: AtomicU64::new(0),
        }
    }

    pub(crate) fn sample_read(&self) {
        self.samples_read.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.in_flight_high.fetch_max(now, Ordering::SeqCst);
    }

    pub(crate) fn shard_read(&self, bytes: u64) {
        self.shards_read.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
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
            in_flight: g(&self.in_flight),
            in_flight_high: g(&self.in_flight_high),
        }
    }
}
