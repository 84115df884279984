//! The JSON report of a run: what was done, what was skipped and why, where the time
//! went (per stage: busy and waiting), and how full the queues got; and how the
//! stages' outcomes become it.

use std::collections::BTreeMap;

use serde::Serialize;
use tensorbake_ingest::pipeline::Summary;

use crate::Run;
use crate::write_stage::PartOutcome;

/// What the stages of [`Run::run`] hand back when they are done.
pub(crate) struct Finished {
    pub(crate) summary: Summary,
    pub(crate) outcomes: Vec<PartOutcome>,
    pub(crate) skipped_samples: Vec<SkipReport>,
    pub(crate) seconds: f64,
}

impl Run {
    /// The report of a finished run: shard outcomes in shard order, counts, per-stage
    /// times and queue figures (from the run's stats, as the metrics show them).
    pub(crate) fn report(&self, done: Finished) -> RunReport {
        let Finished {
            summary,
            outcomes,
            mut skipped_samples,
            seconds,
        } = done;
        let o = &self.cfg.options;

        let mut committed = Vec::new();
        let mut failed = Vec::new();
        for o in outcomes {
            match o {
                PartOutcome::Committed(p) => committed.push(p),
                PartOutcome::Failed(f) => failed.push(f),
            }
        }
        committed.sort_by_key(|p| p.index);
        failed.sort_by_key(|f| f.index);
        let snap = self.stats.snapshot();
        let ingest_time = IngestTime {
            wall_s: summary.seconds,
            blocked_s: snap.ingest_blocked_s,
            samples_per_s: summary.kept as f64 / summary.seconds.max(1e-9),
            mb_per_s: summary.bytes as f64 / 1e6 / summary.seconds.max(1e-9),
        };
        skipped_samples.sort_by(|a, b| (&a.shard, &a.key).cmp(&(&b.shard, &b.key)));
        RunReport {
            name: self.cfg.name.clone(),
            store: self.cfg.store.to_string(),
            rank: self.cfg.rank.rank,
            world: self.cfg.rank.world,
            rank_from: self.cfg.rank.origin.to_string(),
            encoders: self.encoder_names(),
            shards: ShardCounts {
                listed: self.listed,
                mine: self.mine,
                already_committed: self.mine - self.todo.len(),
                todo: self.todo.len(),
                committed: committed.len(),
                failed: failed.len(),
                not_started: self
                    .todo
                    .len()
                    .saturating_sub(committed.len() + failed.len()),
            },
            samples: SampleCounts {
                read: summary.kept,
                encoded: snap.samples_encoded,
                written: snap.samples_written,
                skipped: summary.skipped.clone(),
                lost_with_failed_shards: failed.iter().map(|f| f.samples_read).sum(),
            },
            bytes: summary.bytes,
            retries: summary.retries,
            seconds,
            samples_per_s: snap.samples_written as f64 / seconds.max(1e-9),
            stages: Stages {
                ingest: ingest_time,
                prepare: self.stats.prepare_time(),
                encode: self.stats.encode_time(),
                encoders: self.stats.encoder_times(),
                write: self.stats.write_time(self.cfg.options.writers.max(1)),
            },
            gpu: None,
            queues: QueueReport {
                encode_queue: o.encode_queue,
                write_queue: o.write_queue,
                batch: self.batch,
                in_flight_bound: self.in_flight_bound(),
                in_flight_high: snap.in_flight_high,
            },
            committed_parts: committed,
            failed_shards: failed,
            skipped_samples_truncated: summary.skipped.values().sum::<u64>()
                > skipped_samples.len() as u64,
            skipped_samples,
        }
    }
}

/// Everything a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The job's name.
    pub name: String,
    /// The store written.
    pub store: String,
    /// This process's rank.
    pub rank: usize,
    /// The number of ranks.
    pub world: usize,
    /// Where rank and world came from (flags, Slurm, Kubernetes, torchrun).
    pub rank_from: String,
    /// The encoders, in manifest order.
    pub encoders: Vec<String>,
    /// Shard counts.
    pub shards: ShardCounts,
    /// Sample counts.
    pub samples: SampleCounts,
    /// Bytes read from the sources.
    pub bytes: u64,
    /// Requests after the first (resumes and retries).
    pub retries: u64,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// Samples written per second of wall-clock time.
    pub samples_per_s: f64,
    /// Time per stage.
    pub stages: Stages,
    /// The encoders' GPU, when they ran on one: its busy fraction (NVML) and the
    /// feature bytes copied back from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<crate::gpu::GpuReport>,
    /// Queue sizes and how full the pipeline got.
    pub queues: QueueReport,
    /// Parts committed by this run, in shard order.
    pub committed_parts: Vec<PartReport>,
    /// Shards that failed (not committed: the next run tries them again).
    pub failed_shards: Vec<FailedShard>,
    /// Skipped samples with their reasons (the first 1000).
    pub skipped_samples: Vec<SkipReport>,
    /// Whether more samples were skipped than `skipped_samples` lists.
    pub skipped_samples_truncated: bool,
}

impl RunReport {
    /// Whether every shard this run set out to do was committed.
    pub fn complete(&self) -> bool {
        self.shards.committed == self.shards.todo
    }
}

/// Shards, by what became of them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ShardCounts {
    /// In the manifest.
    pub listed: usize,
    /// This rank's.
    pub mine: usize,
    /// This rank's, committed by an earlier run (skipped).
    pub already_committed: usize,
    /// This rank's, to do in this run.
    pub todo: usize,
    /// Committed by this run.
    pub committed: usize,
    /// Failed in this run.
    pub failed: usize,
    /// Not started (the run was stopped).
    pub not_started: usize,
}

/// Samples, by what became of them.
#[derive(Debug, Clone, Serialize)]
pub struct SampleCounts {
    /// Decoded and kept by the ingest stage.
    pub read: u64,
    /// Through the encoders.
    pub encoded: u64,
    /// Written into parts (committed, or of parts that failed later).
    pub written: u64,
    /// Skipped by the ingest stage, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Read from shards that then failed (not in the store).
    pub lost_with_failed_shards: u64,
}

/// Time of a stage: busy (working) and waiting (for input or a full queue).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageTime {
    /// Threads of the stage.
    pub threads: usize,
    /// Seconds working, all threads together.
    pub busy_s: f64,
    /// Seconds waiting for input, all threads together.
    pub wait_s: f64,
    /// Samples handled.
    pub samples: u64,
    /// Samples per busy second.
    pub samples_per_s: f64,
}

impl StageTime {
    pub(crate) fn finish(&mut self) {
        self.samples_per_s = self.samples as f64 / self.busy_s.max(1e-9);
    }
}

/// Time of the ingest stage (many threads: download, tar, decode on rayon).
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestTime {
    /// Seconds from the first shard opened to the last shard read.
    pub wall_s: f64,
    /// Seconds the decode threads spent blocked on a full encode queue, all together
    /// (high: the encoders are the bottleneck).
    pub blocked_s: f64,
    /// Samples kept per wall second.
    pub samples_per_s: f64,
    /// Source megabytes per wall second.
    pub mb_per_s: f64,
}

/// Time of one encoder.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EncoderTime {
    /// Host seconds in the model thread running the encoder (model, output cast).
    /// On a GPU launches return before the work is done: this is the time to queue
    /// it, and `gpu_s` the time it ran.
    pub busy_s: f64,
    /// Host seconds preparing the encoder's inputs (preprocessing or tokenizing, the
    /// upload), on the preparing thread, overlapped with the model thread.
    pub prepare_s: f64,
    /// Device seconds of the encoder's work (CUDA events around each batch); `None`
    /// off a GPU.
    pub gpu_s: Option<f64>,
    /// Samples encoded.
    pub samples: u64,
    /// Samples per busy second.
    pub samples_per_s: f64,
}

/// The stages.
#[derive(Debug, Clone, Serialize)]
pub struct Stages {
    /// Streaming, tar, captions, decoding.
    pub ingest: IngestTime,
    /// Preparing batches (one thread: preprocessing and uploads, the next batch while
    /// the models run the current one); `wait_s` high means decoding is the
    /// bottleneck.
    pub prepare: StageTime,
    /// Running the models, all encoders together (one thread); `wait_s` high means
    /// preparing is the bottleneck.
    pub encode: StageTime,
    /// Each encoder.
    pub encoders: BTreeMap<String, EncoderTime>,
    /// The part writers (zstd, storage).
    pub write: StageTime,
}

/// Queue sizes and the most samples held at once.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueueReport {
    /// Decoded samples that may wait for the encoders.
    pub encode_queue: usize,
    /// Encoded batches that may wait for the writers.
    pub write_queue: usize,
    /// Samples per encoder batch.
    pub batch: usize,
    /// The most decoded samples the pipeline can hold before the writers.
    pub in_flight_bound: u64,
    /// The most it held in this run.
    pub in_flight_high: u64,
}

/// A committed part.
#[derive(Debug, Clone, Serialize)]
pub struct PartReport {
    /// The shard's position in the manifest's list.
    pub index: usize,
    /// The shard's name.
    pub shard: String,
    /// The part's name in the store.
    pub part: String,
    /// Samples in the part.
    pub samples: u64,
    /// Samples of the shard skipped.
    pub skipped: u64,
}

/// A shard that failed.
#[derive(Debug, Clone, Serialize)]
pub struct FailedShard {
    /// The shard's position in the manifest's list.
    pub index: usize,
    /// The shard's name.
    pub shard: String,
    /// Where it was read from.
    pub url: String,
    /// snake_case reason (`truncated_tar`, `http_not_found`, `encode`, `store`, ...).
    pub reason: String,
    /// The error.
    pub error: String,
    /// Samples read before the failure (not in the store).
    pub samples_read: u64,
}

/// A skipped sample.
#[derive(Debug, Clone, Serialize)]
pub struct SkipReport {
    /// The shard's name.
    pub shard: String,
    /// The sample key.
    pub key: String,
    /// snake_case reason.
    pub reason: String,
    /// The specifics.
    pub detail: String,
}
