//! The encode stage: decoded samples in, per-shard batches through every encoder,
//! encoded batches out to the part writers.
//!
//! Batches never mix shards and batch `k` of a shard is always its samples
//! `k*B .. (k+1)*B`, so the batch a sample is encoded in (and so its bytes) depends
//! only on its shard. A batch an encoder fails on marks its shard failed: the rest of
//! the shard is dropped here and the writer is told why ([`StageError`]), so the part
//! is not committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender};
use tensorbake_encode::{EncodeError, Encoder, Input, Rgb8};
use tensorbake_ingest::pipeline::{Sample, ShardEnd};
use tensorbake_kit::dtype::DType;
use tensorbake_kit::schema::{Array, Feature};
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
}

impl EncodeStage<'_> {
    /// Runs until `rx` closes; shard `s` goes to writer `s % writers.len()`. Its
    /// times (busy, waiting, per encoder) and queue depths go to the run's stats.
    pub(crate) fn run(&self, rx: Receiver<ToEncode>, writers: Vec<Sender<ToWrite>>) {
        let mut pending: HashMap<usize, Vec<Sample>> = HashMap::new();
        let mut failed: HashMap<usize, StageError> = HashMap::new();
        let stats = self.stats;
        let send = |shard: usize, msg: ToWrite| {
            let ok = writers[shard % writers.len()].send(msg).is_ok();
            if ok {
                stats.write_queue.sent();
            }
            ok
        };
        let flush = |shard: usize, batch: Vec<Sample>, failed: &mut HashMap<usize, StageError>| {
            if batch.is_empty() {
                return;
            }
            if failed.contains_key(&shard) {
                stats.dropped(batch.len() as u64);
                return;
            }
            let n = batch.len();
            let t0 = Instant::now();
            let result = encode_batch(self.encoders, &batch, stats);
            stats.encode.busy(t0.elapsed());
            match result {
                Ok(features) => {
                    stats.encode.samples(n as u64);
                    stats.samples_encoded.fetch_add(n as u64, Ordering::Relaxed);
                    let meta = batch
                        .into_iter()
                        .map(|s| SampleMeta {
                            key: s.key,
                            caption: s.caption.unwrap_or_default(),
                            caption_raw: s.caption_raw.unwrap_or_default(),
                            orig_size: [s.orig_width, s.orig_height],
                        })
                        .collect();
                    let msg = ToWrite::Batch {
                        shard,
                        meta,
                        features,
                    };
                    if !send(shard, msg) {
                        stats.dropped(n as u64);
                    }
                }
                Err(why) => {
                    tracing::warn!(
                        shard,
                        "encoding failed; the shard will not be committed: {why}"
                    );
                    stats.dropped(n as u64);
                    failed.insert(shard, why);
                }
            }
        };
        loop {
            let t0 = Instant::now();
            let Ok(msg) = rx.recv() else { break };
            stats.encode.wait(t0.elapsed());
            stats.encode_queue.received();
            match msg {
                ToEncode::Sample(s) => {
                    let shard = s.shard;
                    let p = pending.entry(shard).or_default();
                    p.push(s);
                    if p.len() >= self.batch {
                        let b = std::mem::take(p);
                        flush(shard, b, &mut failed);
                    }
                }
                ToEncode::End(end) => {
                    let shard = end.shard;
                    if let Some(b) = pending.remove(&shard) {
                        if end.error.is_some() {
                            // the shard will not be committed: do not encode its tail
                            stats.dropped(b.len() as u64);
                        } else {
                            flush(shard, b, &mut failed);
                        }
                    }
                    let msg = ToWrite::End {
                        end,
                        encode_error: failed.remove(&shard),
                    };
                    send(shard, msg);
                }
            }
        }
    }
}

/// Runs every encoder on one batch; outputs cast to their store dtype on the
/// encoder's device (bf16 halves the copy to the host).
fn encode_batch(
    encoders: &[Loaded],
    batch: &[Sample],
    stats: &RunStats,
) -> Result<BTreeMap<String, Tensor>, StageError> {
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
    let mut out = BTreeMap::new();
    for (i, l) in encoders.iter().enumerate() {
        let feature = l.feature;
        let _span =
            tracing::debug_span!("encode", encoder = %feature, batch = batch.len()).entered();
        let t0 = Instant::now();
        let input = if l.encoder.takes_text() {
            Input::Texts(&texts)
        } else {
            Input::Images(&images)
        };
        let arrays = l
            .encoder
            .encode(input)
            .map_err(|source| StageError::Encode {
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
        stats.encoder(i).busy(t0.elapsed());
        stats.encoder(i).samples(batch.len() as u64);
    }
    Ok(out)
}
