//! The write stage: encoded batches in, one part per shard, committed when the shard
//! ends well; every shard ends as a [`PartOutcome`].

use std::collections::HashMap;
use std::time::Instant;

use crossbeam_channel::Receiver;
use tensorbake_ingest::shards::Shard;
use tensorbake_store::{PartWriter, Store, StoreError};

use crate::encode_stage::ToWrite;
use crate::report::{FailedShard, PartReport};
use crate::stats::RunStats;

/// What a writer saw of one shard.
pub(crate) enum PartOutcome {
    Committed(PartReport),
    Failed(FailedShard),
}

/// The write stage of one run (each writer thread runs one [`WriteStage::run`]).
pub(crate) struct WriteStage<'a> {
    pub(crate) store: &'a Store,
    /// The shards of this run with their parts, by shard index.
    pub(crate) shards: HashMap<usize, (&'a Shard, &'a str)>,
    pub(crate) stats: &'a RunStats,
}

impl<'a> WriteStage<'a> {
    /// The write stage of `shards`, each with the name of its part.
    pub(crate) fn new(
        store: &'a Store,
        shards: impl IntoIterator<Item = (&'a Shard, &'a str)>,
        stats: &'a RunStats,
    ) -> Self {
        Self {
            store,
            shards: shards
                .into_iter()
                .map(|(s, part)| (s.index, (s, part)))
                .collect(),
            stats,
        }
    }

    /// Runs until `rx` closes; its times go to the run's stats.
    pub(crate) fn run(&self, rx: Receiver<ToWrite>) -> Vec<PartOutcome> {
        let mut parts: HashMap<usize, PartWriter> = HashMap::new();
        let mut broken: HashMap<usize, StoreError> = HashMap::new();
        let mut outcomes = Vec::new();
        let open = |shard: usize| -> Result<PartWriter, StoreError> {
            let (s, part) = self.shards[&shard];
            self.store.part_writer(part, &s.url)
        };
        loop {
            let t0 = Instant::now();
            let Ok(msg) = rx.recv() else { break };
            self.stats.write.wait(t0.elapsed());
            self.stats.write_queue.received();
            let t0 = Instant::now();
            match msg {
                ToWrite::Batch {
                    shard,
                    meta,
                    features,
                } => {
                    let n = meta.len() as u64;
                    let from_gpu: usize = features
                        .values()
                        .filter(|t| !t.device().is_cpu())
                        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                        .sum();
                    self.stats
                        .device_to_host_bytes
                        .fetch_add(from_gpu as u64, std::sync::atomic::Ordering::Relaxed);
                    if broken.contains_key(&shard) {
                        self.stats.dropped(n);
                        self.stats.write.busy(t0.elapsed());
                        continue;
                    }
                    let w = match parts.entry(shard) {
                        std::collections::hash_map::Entry::Occupied(o) => Ok(o.into_mut()),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            open(shard).map(|w| v.insert(w))
                        }
                    };
                    match w.and_then(|w| w.push_batch(meta, &features)) {
                        Ok(()) => {
                            self.stats.written(n);
                            self.stats.write.samples(n);
                        }
                        Err(e) => {
                            tracing::warn!(
                                shard,
                                "writing failed; the part will not be committed: {e}"
                            );
                            self.stats.dropped(n);
                            parts.remove(&shard);
                            broken.insert(shard, e);
                        }
                    }
                }
                ToWrite::End { end, encode_error } => {
                    let shard = end.shard;
                    let (s, part) = self.shards[&shard];
                    let writer = parts.remove(&shard);
                    let failure = match (&end.error, encode_error, broken.remove(&shard)) {
                        (Some(e), _, _) => Some((e.reason().to_string(), e.to_string())),
                        (None, Some(e), _) => Some(("encode".to_string(), e.to_string())),
                        (None, None, Some(e)) => Some(("store".to_string(), e.to_string())),
                        (None, None, None) => None,
                    };
                    let outcome = match failure {
                        None => {
                            // A shard whose every sample was skipped still commits
                            // (empty), so that the next run does not read it again.
                            match writer
                                .map_or_else(|| open(shard), Ok)
                                .and_then(PartWriter::commit)
                            {
                                Ok(samples) => {
                                    self.stats.shard_committed();
                                    tracing::info!(shard = %s.name, part, samples, "part committed");
                                    PartOutcome::Committed(PartReport {
                                        index: shard,
                                        shard: s.name.clone(),
                                        part: part.to_string(),
                                        samples,
                                        skipped: end.skipped,
                                    })
                                }
                                Err(e) => failed_shard(s, end.kept, "store", e.to_string()),
                            }
                        }
                        Some((reason, error)) => failed_shard(s, end.kept, &reason, error),
                    };
                    if let PartOutcome::Failed(f) = &outcome {
                        self.stats.shard_failed();
                        tracing::warn!(shard = %f.shard, reason = %f.reason, "shard failed, not committed: {}", f.error);
                    }
                    outcomes.push(outcome);
                }
            }
            self.stats.write.busy(t0.elapsed());
        }
        outcomes
    }
}

fn failed_shard(s: &Shard, samples_read: u64, reason: &str, error: String) -> PartOutcome {
    PartOutcome::Failed(FailedShard {
        index: s.index,
        shard: s.name.clone(),
        url: s.url.clone(),
        reason: reason.to_string(),
        error,
        samples_read,
    })
}
