//! The encode stage: decoded samples in, per-shard batches through every encoder,
//! encoded batches out to the part writers.
//!
//! Two threads, so that the device never waits on the host:
//!
//! ```text
//! decoded samples --> prepare (batches; every encoder's preprocessing, tokenizing and
//!                     upload) --[one batch]--> models (every encoder's run; the batch
//!                     is held until its GPU work is done) --> writers
//! ```
//!
//! While the models run batch `k`, batch `k+1` is preprocessed and uploaded (pinned
//! memory, [`tensorbake_nn::ops::transfer`]), and on a GPU batch `k` is handed to the
//! writers only once its work is done (a fence waited for after `k+1` is queued), so
//! the GPU always has the next batch's work queued and the copy back reads finished
//! results. Each encoder's device time is measured with CUDA events around its work.
//!
//! Batches never mix shards and batch `k` of a shard is always its samples
//! `k*B .. (k+1)*B`, so the batch a sample is encoded in (and so its bytes) depends
//! only on its shard. A batch an encoder fails on (preparing or running it) marks its
//! shard failed: the rest of the shard is dropped here and the writer is told why
//! ([`StageError`]), so the part is not committed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{Device, Tensor};
use crossbeam_channel::{Receiver, Sender, bounded};
use tensorbake_encode::{EncodeError, Encoder, Input, Prepared, Rgb8};
use tensorbake_ingest::pipeline::{Sample, ShardEnd};
use tensorbake_kit::dtype::DType;
use tensorbake_kit::schema::{Array, Feature};
use tensorbake_nn::ops::transfer::{Fence, GpuSpan};
use tensorbake_store::writer::SampleMeta;

use crate::stats::RunStats;

/// Why a stage dropped a shard: the typed error travels to the writer, which reports it.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// An encoder failed on a batch of the shard.
    #[error("encoder {feature}: {source}")]
    Encode {
        /// The feature whose encoder failed.
        feature: Feature,
        /// The encoder's error.
        #[source]
        source: Box<EncodeError>,
    },
    /// The GPU failed on a batch (an error of its queued work, surfacing when the
    /// batch's work was waited for).
    #[error("the GPU failed on a batch: {source}")]
    Device {
        /// candle's (CUDA's) error.
        #[source]
        source: candle_core::Error,
    },
    /// An output could not be cast to its store dtype.
    #[error("encoder {feature}: {array}: {source}")]
    Cast {
        /// The feature.
        feature: Feature,
        /// The array being cast.
        array: Array,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
}

/// One loaded encoder and the store dtype of each array it writes, in output order.
pub(crate) struct Loaded {
    pub(crate) feature: Feature,
    pub(crate) encoder: Box<dyn Encoder>,
    pub(crate) arrays: Vec<(Array, DType)>,
}

/// Decoded samples and shard ends on their way to the encoders.
pub(crate) enum ToEncode {
    Sample(Sample),
    End(ShardEnd),
}

/// Encoded batches and shard ends on their way to a writer.
pub(crate) enum ToWrite {
    Batch {
        shard: usize,
        meta: Vec<SampleMeta>,
        features: BTreeMap<String, Tensor>,
    },
    End {
        end: ShardEnd,
        /// Why the encoders dropped this shard's samples, if they did.
        encode_error: Option<StageError>,
    },
}

/// The encode stage of one run.
pub(crate) struct EncodeStage<'a> {
    pub(crate) encoders: &'a [Loaded],
    /// Samples per batch.
    pub(crate) batch: usize,
    pub(crate) stats: &'a RunStats,
    /// Hold each batch until its device work is done, handing it to the writers
    /// after the next batch is queued ([`holds_a_batch`]).
    pub(crate) hold: bool,
}

/// A prepared batch on its way to the model thread, or a shard's end.
enum ToRun {
    Batch {
        shard: usize,
        meta: Vec<SampleMeta>,
        /// One per encoder, or why preparing failed.
        prepared: Result<Vec<Prepared>, StageError>,
    },
    End(ShardEnd),
}

/// Device time of each encoder's work on a batch, by encoder index.
type Spans = Vec<(usize, GpuSpan)>;

/// A batch whose GPU work may still be running: handed on once its fence is passed.
struct Held {
    shard: usize,
    meta: Vec<SampleMeta>,
    features: BTreeMap<String, Tensor>,
    fence: Fence,
    spans: Spans,
}

/// Whether batches wait for their GPU work before going to the writers: only when
/// some encoder runs on a GPU (on the CPU the work is done when `run` returns).
pub(crate) fn holds_a_batch(encoders: &[Loaded]) -> bool {
    encoders.iter().any(|l| !l.encoder.device().is_cpu())
}

impl EncodeStage<'_> {
    /// Runs until `rx` closes; shard `s` goes to writer `s % writers.len()`. Its
    /// times (preparing, running, per encoder) and queue depths go to the run's stats.
    pub(crate) fn run(&self, rx: Receiver<ToEncode>, writers: Vec<Sender<ToWrite>>) {
        // shards whose encoding failed: the model thread adds them, the preparing
        // thread stops preparing their batches
        let failed_shards = Mutex::new(HashSet::new());
        // a rendezvous: one batch prepared (or being prepared) while one runs
        let (tx, to_run) = bounded::<ToRun>(0);
        std::thread::scope(|scope| {
            let failed_shards = &failed_shards;
            std::thread::Builder::new()
                .name("prepare".into())
                .spawn_scoped(scope, move || self.prepare_loop(&rx, &tx, failed_shards))
                .expect("spawning the preparing thread");
            self.model_loop(&to_run, &writers, failed_shards);
        });
    }

    /// Groups samples into per-shard batches and prepares each for every encoder.
    fn prepare_loop(
        &self,
        rx: &Receiver<ToEncode>,
        tx: &Sender<ToRun>,
        failed_shards: &Mutex<HashSet<usize>>,
    ) {
        let stats = self.stats;
        let mut pending: HashMap<usize, Vec<Sample>> = HashMap::new();
        let prepare = |shard: usize, batch: Vec<Sample>| -> bool {
            if batch.is_empty() {
                return true;
            }
            let failed = failed_shards
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&shard);
            if failed {
                stats.dropped(batch.len() as u64);
                return true;
            }
            let t0 = Instant::now();
            let prepared = prepare_batch(self.encoders, &batch, stats);
            stats.prepare.busy(t0.elapsed());
            stats.prepare.samples(batch.len() as u64);
            let meta = batch
                .into_iter()
                .map(|s| SampleMeta {
                    key: s.key,
                    caption: s.caption.unwrap_or_default(),
                    caption_raw: s.caption_raw.unwrap_or_default(),
                    orig_size: [s.orig_width, s.orig_height],
                })
                .collect();
            tx.send(ToRun::Batch {
                shard,
                meta,
                prepared,
            })
            .is_ok()
        };
        loop {
            let t0 = Instant::now();
            let Ok(msg) = rx.recv() else { break };
            stats.prepare.wait(t0.elapsed());
            stats.encode_queue.received();
            let ok = match msg {
                ToEncode::Sample(s) => {
                    let shard = s.shard;
                    let p = pending.entry(shard).or_default();
                    p.push(s);
                    if p.len() >= self.batch {
                        let b = std::mem::take(p);
                        prepare(shard, b)
                    } else {
                        true
                    }
                }
                ToEncode::End(end) => {
                    let tail = pending.remove(&end.shard).unwrap_or_default();
                    let ok = if end.error.is_some() {
                        // the shard will not be committed: do not encode its tail
                        stats.dropped(tail.len() as u64);
                        true
                    } else {
                        prepare(end.shard, tail)
                    };
                    ok && tx.send(ToRun::End(end)).is_ok()
                }
            };
            if !ok {
                break;
            }
        }
    }

    /// Runs every encoder on each prepared batch and hands batches to the writers,
    /// each once its GPU work is done.
    fn model_loop(
        &self,
        to_run: &Receiver<ToRun>,
        writers: &[Sender<ToWrite>],
        failed_shards: &Mutex<HashSet<usize>>,
    ) {
        let stats = self.stats;
        let hold = self.hold;
        // one fence event per device, however many encoders share it
        let mut devices: Vec<&Device> = Vec::new();
        for d in self.encoders.iter().map(|l| l.encoder.device()) {
            if !devices.iter().any(|k| k.same_device(d)) {
                devices.push(d);
            }
        }
        let mut failed: HashMap<usize, StageError> = HashMap::new();
        let mut held: Option<Held> = None;
        let send = |shard: usize, msg: ToWrite| {
            let ok = writers[shard % writers.len()].send(msg).is_ok();
            if ok {
                stats.write_queue.sent();
            }
            ok
        };
        let fail = |shard: usize, why: StageError, failed: &mut HashMap<usize, StageError>| {
            tracing::warn!(
                shard,
                "encoding failed; the shard will not be committed: {why}"
            );
            failed_shards
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(shard);
            failed.entry(shard).or_insert(why);
        };
        // waits for a held batch's work, then hands it to its writer
        let release = |h: Held, failed: &mut HashMap<usize, StageError>| {
            let n = h.meta.len() as u64;
            let t0 = Instant::now();
            let done = h.fence.wait();
            stats.encode.wait(t0.elapsed());
            if let Err(source) = done {
                stats.dropped(n);
                fail(h.shard, StageError::Device { source }, failed);
                return;
            }
            for (i, span) in &h.spans {
                match span.elapsed() {
                    Ok(d) => stats.encoder(*i).gpu(d),
                    Err(e) => tracing::warn!("reading an encoder's GPU time: {e}"),
                }
            }
            if failed.contains_key(&h.shard) {
                stats.dropped(n);
                return;
            }
            stats.encode.samples(n);
            stats.samples_encoded.fetch_add(n, Ordering::Relaxed);
            let msg = ToWrite::Batch {
                shard: h.shard,
                meta: h.meta,
                features: h.features,
            };
            if !send(h.shard, msg) {
                stats.dropped(n);
            }
        };
        loop {
            let t0 = Instant::now();
            let Ok(msg) = to_run.recv() else { break };
            stats.encode.wait(t0.elapsed());
            match msg {
                ToRun::Batch {
                    shard,
                    meta,
                    prepared,
                } => {
                    let n = meta.len() as u64;
                    if failed.contains_key(&shard) {
                        stats.dropped(n);
                        continue;
                    }
                    let t0 = Instant::now();
                    let result = prepared.and_then(|p| run_batch(self.encoders, p, stats));
                    let result = result.and_then(|(features, spans)| {
                        let fence = if hold {
                            Fence::now(&devices).map_err(|source| StageError::Device { source })?
                        } else {
                            Fence::default()
                        };
                        Ok(Held {
                            shard,
                            meta,
                            features,
                            fence,
                            spans,
                        })
                    });
                    stats.encode.busy(t0.elapsed());
                    match result {
                        Ok(h) if hold => {
                            // the GPU has this batch queued: now wait for the one before
                            if let Some(prev) = held.replace(h) {
                                release(prev, &mut failed);
                            }
                        }
                        Ok(h) => release(h, &mut failed),
                        Err(why) => {
                            stats.dropped(n);
                            fail(shard, why, &mut failed);
                        }
                    }
                }
                ToRun::End(end) => {
                    if let Some(h) = held.take() {
                        release(h, &mut failed);
                    }
                    let shard = end.shard;
                    let msg = ToWrite::End {
                        end,
                        encode_error: failed.remove(&shard),
                    };
                    send(shard, msg);
                }
            }
        }
        if let Some(h) = held.take() {
            release(h, &mut failed);
        }
    }
}

/// Every encoder's host half of one batch, in encoder order; its uploaded bytes
/// and each encoder's time go to the stats.
fn prepare_batch(
    encoders: &[Loaded],
    batch: &[Sample],
    stats: &RunStats,
) -> Result<Vec<Prepared>, StageError> {
    let images: Vec<Rgb8<'_>> = batch
        .iter()
        .map(|s| Rgb8 {
            width: s.resolution,
            height: s.resolution,
            pixels: &s.rgb,
        })
        .collect();
    let texts: Vec<&str> = batch
        .iter()
        .map(|s| s.caption.as_deref().unwrap_or(""))
        .collect();
    encoders
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let t0 = Instant::now();
            let input = if l.encoder.takes_text() {
                Input::Texts(&texts)
            } else {
                Input::Images(&images)
            };
            let p = l
                .encoder
                .prepare(input)
                .map_err(|source| StageError::Encode {
                    feature: l.feature,
                    source: Box::new(source),
                })?;
            stats
                .host_to_device_bytes
                .fetch_add(p.uploaded_bytes(), Ordering::Relaxed);
            stats.encoder(i).prepared(t0.elapsed());
            Ok(p)
        })
        .collect()
}

/// Runs every encoder on its prepared batch; outputs cast to their store dtype on the
/// encoder's device (bf16 halves the copy to the host). Returns the arrays by store
/// name and the device time span of each encoder on a GPU.
fn run_batch(
    encoders: &[Loaded],
    prepared: Vec<Prepared>,
    stats: &RunStats,
) -> Result<(BTreeMap<String, Tensor>, Spans), StageError> {
    let mut out = BTreeMap::new();
    let mut spans = Vec::new();
    for (i, (l, p)) in encoders.iter().zip(prepared).enumerate() {
        let feature = l.feature;
        let n = p.len() as u64;
        let device_err = |source| StageError::Device { source };
        let _span = tracing::debug_span!("encode", encoder = %feature, batch = n).entered();
        let t0 = Instant::now();
        let span = GpuSpan::start(l.encoder.device()).map_err(device_err)?;
        let arrays = l.encoder.run(p).map_err(|source| StageError::Encode {
            feature,
            source: Box::new(source),
        })?;
        for ((array, t), (_, dtype)) in arrays.into_iter().zip(&l.arrays) {
            let t = if dtype.is_float() && t.dtype() != dtype.candle() {
                t.to_dtype(dtype.candle())
                    .map_err(|source| StageError::Cast {
                        feature,
                        array,
                        source,
                    })?
            } else {
                t
            };
            out.insert(array.name().to_string(), t);
        }
        if let Some(span) = span {
            span.stop().map_err(device_err)?;
            spans.push((i, span));
        }
        stats.encoder(i).run.busy(t0.elapsed());
        stats.encoder(i).run.samples(n);
    }
    Ok((out, spans))
}
