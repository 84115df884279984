//! tensorbake-run: the pipeline of `tensorbake run`, from shards to a committed store.
//!
//! A [`RunConfig`] (a manifest: `[source]`, `[[encoders]]`, the store, rank/world) is
//! built into a [`Run`], which has checked everything that can be checked before a
//! byte is written: encoder names, weights, the shard list and caption index, that the
//! first shards answer, and that an existing store has the same spec. Only then is the
//! store created. [`Run::run`] streams this rank's shards that are not yet committed
//! through three overlapping stages joined by bounded queues:
//!
//! ```text
//! ingest (shards in flight, rayon decode) --[encode_queue samples]--> prepare (one
//! thread: preprocessing, tokenizing, uploads) --[one batch]--> encode (one thread:
//! every model on each batch) --[write_queue batches]--> writers (threads, one part
//! per shard, committed last)
//! ```
//!
//! Backpressure flows upstream: when the encoders are the bottleneck the decode
//! threads block on a full queue, so memory stays bounded by the queue sizes whatever
//! the dataset size ([`Run::in_flight_bound`]).
//!
//! Batches never mix shards, and batch `k` of a shard is always its samples
//! `k*B .. (k+1)*B`: the batch a sample is encoded in depends only on its shard, not
//! on how shards interleave. So a part's bytes are the same whichever run, rank or
//! resumption wrote it, and a store finished after a kill equals one written in one go.
//!
//! A shard that fails (truncated tar, 404, an encoder error) is not committed; the
//! next run, the same command, tries it again. Committed parts are never rewritten.
//!
//! The crate follows the stages: `config` (the manifest's job, checks and preflight,
//! [`RunConfig::build`]), `encode_stage` (per-shard batches through the encoders),
//! `write_stage` (parts and commits), `report` (outcomes into the [`RunReport`]),
//! `stats` (the live counters every stage bumps) and [`metrics`] (those counters as
//! Prometheus text, and the endpoint of `run --metrics`).
//! Errors cross the stage seams typed ([`StageError`]); `docs/architecture.md` has the
//! dataflow.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Sender, bounded};
use tensorbake_ingest::pipeline::{Event, Ingest};
use tensorbake_ingest::shards::Shard;
use tensorbake_store::Store;

mod config;
mod encode_stage;
pub mod gpu;
pub mod metrics;
mod report;
mod stats;
#[cfg(test)]
mod wiring_tests;
pub mod write_bench;
mod write_stage;

pub use config::{RunConfig, RunError, RunOptions, part_for, resolve_weights};
pub use encode_stage::StageError;
pub use report::{
    EncoderTime, FailedShard, IngestTime, PartReport, QueueReport, RunReport, SampleCounts,
    ShardCounts, SkipReport, StageTime, Stages,
};
pub use stats::{RunStats, StatsSnapshot};

use encode_stage::{EncodeStage, Loaded, ToEncode, ToWrite};
use report::Finished;
use write_stage::WriteStage;

/// How often the GPU's busy fraction is sampled during a run.
const GPU_SAMPLE_PERIOD: std::time::Duration = std::time::Duration::from_millis(200);

/// A run, ready to go: configuration checked, encoders loaded, store opened.
pub struct Run {
    pub(crate) cfg: RunConfig,
    pub(crate) ingest: Ingest,
    /// Used by the encode thread only (encoders are `Send`, not `Sync`).
    pub(crate) encoders: Mutex<Vec<Loaded>>,
    pub(crate) encoder_names: Vec<String>,
    pub(crate) store: Store,
    /// Every shard of the manifest, this rank's, and this rank's still to do.
    pub(crate) listed: usize,
    pub(crate) mine: usize,
    pub(crate) todo: Vec<Shard>,
    pub(crate) part_of: HashMap<usize, String>,
    pub(crate) batch: usize,
    pub(crate) stats: RunStats,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("store", &self.cfg.store)
            .field("todo", &self.todo.len())
            .field("encoders", &self.encoder_names())
            .finish_non_exhaustive()
    }
}

/// Blocking send into the encode queue that counts the time spent waiting on a full
/// queue and the queue's depth.
fn send_timed(tx: &Sender<ToEncode>, msg: ToEncode, stats: &RunStats) -> bool {
    let ok = match tx.try_send(msg) {
        Ok(()) => true,
        Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
        Err(crossbeam_channel::TrySendError::Full(msg)) => {
            let t0 = Instant::now();
            let ok = tx.send(msg).is_ok();
            stats.ingest_blocked(t0.elapsed());
            ok
        }
    };
    if ok {
        stats.encode_queue.sent();
    }
    ok
}

const SKIP_DETAILS: usize = 1000;

impl Run {
    /// Live counters, for progress display from another thread.
    pub fn stats(&self) -> &RunStats {
        &self.stats
    }

    /// The store being written.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Shards of the manifest, this rank's, and this rank's still to do.
    pub fn shard_counts(&self) -> (usize, usize, usize) {
        (self.listed, self.mine, self.todo.len())
    }

    /// The encoders, in manifest order.
    pub fn encoder_names(&self) -> Vec<String> {
        self.encoder_names.clone()
    }

    /// Samples per encoder batch (the largest `batch` of the encoders).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The most samples that can be decoded but not yet handed to a part writer at
    /// any moment: the encode queue, a partial batch per shard in flight, the batch
    /// being prepared, the batch the models run, on a GPU the batch before it (held
    /// until its work is done), the write queues and the batches being written, and
    /// one sample per decode thread blocked on the full queue.
    pub fn in_flight_bound(&self) -> u64 {
        let o = &self.cfg.options;
        let b = self.batch as u64;
        let shards = self.cfg.ingest.parallel.shards_in_flight.max(1) as u64;
        let writers = o.writers as u64;
        let per_writer = (o.write_queue as u64 / writers).max(1);
        let held = {
            let encoders = self.encoders.lock().unwrap_or_else(|e| e.into_inner());
            u64::from(encode_stage::holds_a_batch(&encoders))
        };
        o.encode_queue as u64
            + shards * b
            + (2 + held) * b
            + writers * (per_writer + 1) * b
            + shards
    }

    /// Streams the shards still to do through the encoders into the store and
    /// reports. `stop` drains the run early: shards not started are left for the next
    /// run; shards in flight finish and commit.
    pub fn run(&self, stop: &AtomicBool) -> RunReport {
        let started = Instant::now();
        // the encoders' GPU, sampled for the report while the run runs
        let gpu = self
            .cfg
            .encoders
            .iter()
            .find_map(|e| gpu::cuda_index(&e.device))
            .map(|i| {
                let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
                let device = gpu::nvml_device(i, visible.as_deref());
                (
                    device.clone(),
                    gpu::BusySampler::start(&device, GPU_SAMPLE_PERIOD),
                )
            });
        let o = &self.cfg.options;
        let writers = o.writers.max(1);
        let (enc_tx, enc_rx) = bounded::<ToEncode>(o.encode_queue.max(1));
        let per_writer = (o.write_queue / writers).max(1);
        let (write_txs, write_rxs): (Vec<_>, Vec<_>) =
            (0..writers).map(|_| bounded::<ToWrite>(per_writer)).unzip();
        let skips: Mutex<Vec<SkipReport>> = Mutex::new(Vec::new());
        let names: HashMap<usize, &str> = self
            .todo
            .iter()
            .map(|s| (s.index, s.name.as_str()))
            .collect();

        let write = WriteStage::new(
            &self.store,
            self.todo
                .iter()
                .map(|s| (s, self.part_of[&s.index].as_str())),
            &self.stats,
        );
        let (summary, outcomes) = std::thread::scope(|scope| {
            let ingest = scope.spawn(|| {
                let tx = enc_tx;
                let on_event = |e: Event| match e {
                    Event::Sample(s) => {
                        self.stats.sample_read();
                        send_timed(&tx, ToEncode::Sample(s), &self.stats);
                    }
                    Event::Skip(s) => {
                        self.stats.sample_skipped(s.reason);
                        tracing::info!(shard = s.shard, key = %s.key, reason = s.reason, "skipped: {}", s.detail);
                        let mut v = skips.lock().unwrap_or_else(|e| e.into_inner());
                        if v.len() < SKIP_DETAILS {
                            v.push(SkipReport {
                                shard: names.get(&s.shard).copied().unwrap_or_default().to_string(),
                                key: s.key,
                                reason: s.reason.to_string(),
                                detail: s.detail,
                            });
                        }
                    }
                    Event::ShardEnd(end) => {
                        self.stats.shard_read(end.bytes, end.retries);
                        send_timed(&tx, ToEncode::End(end), &self.stats);
                    }
                };
                self.ingest.run(&self.todo, stop, &on_event)
            });
            let encode = scope.spawn(move || {
                let encoders = self.encoders.lock().unwrap_or_else(|e| e.into_inner());
                let stage = EncodeStage {
                    encoders: &encoders,
                    batch: self.batch,
                    stats: &self.stats,
                    hold: encode_stage::holds_a_batch(&encoders),
                };
                stage.run(enc_rx, write_txs)
            });
            let write = &write;
            let writer_handles: Vec<_> = write_rxs
                .into_iter()
                .map(|rx| scope.spawn(move || write.run(rx)))
                .collect();
            let summary = ingest.join().expect("ingest thread panicked");
            encode.join().expect("encode thread panicked");
            let mut outcomes = Vec::new();
            for h in writer_handles {
                outcomes.extend(h.join().expect("writer thread panicked"));
            }
            (summary, outcomes)
        });
        let mut report = self.report(Finished {
            summary,
            outcomes,
            skipped_samples: skips.into_inner().unwrap_or_default(),
            seconds: started.elapsed().as_secs_f64(),
        });
        report.gpu = gpu.map(|(device, sampler)| {
            let mut g = match sampler {
                Ok(s) => s.finish(),
                Err(e) => gpu::GpuReport {
                    nvml_device: device,
                    sampler_error: Some(e),
                    ..gpu::GpuReport::default()
                },
            };
            g.device_to_host_bytes = self.stats.device_to_host_bytes.load(Ordering::Relaxed);
            g.host_to_device_bytes = self.stats.host_to_device_bytes.load(Ordering::Relaxed);
            g
        });
        self.stats.finished.store(true, Ordering::SeqCst);
        report
    }
}
