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

use crate::report::{EncoderTime, StageTime};
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
    /// Runs until `rx` closes; shard `s` goes to writer `s % writers.len()`.
    pub(crate) fn run(
        &self,
        rx: Receiver<ToEncode>,
        writers: Vec<Sender<ToWrite>>,
    ) -> (StageTime, BTreeMap<String, EncoderTime>) {
        let mut pending: HashMap<usize, Vec<Sample>> = HashMap::new();
        let mut failed: HashMap<usize, StageError> = HashMap::new();
        let mut time = StageTime {
            threads: 1,
            ..StageTime::default()
        };
        let mut per_encoder: BTreeMap<String, EncoderTime> = self
            .encoders
            .iter()
            .map(|l| (l.feature.name().to_string(), EncoderTime::default()))
            .collect();
        let route = |shard: usize| &writers[shard % writers.len()];
        let mut flush = |shard: usize,
                         batch: Vec<Sample>,
                         failed: &mut HashMap<usize, StageError>,
                         time: &mut StageTime| {
            if batch.is_empty() {
                return;
            }
            if failed.contains_key(&shard) {
                self.stats.dropped(batch.len() as u64);
                return;
            }
            let n = batch.len();
            let t0 = Instant::now();
            let result = encode_batch(self.encoders, &batch, &mut per_encoder);
            time.busy_s += t0.elapsed().as_secs_f64();
            match result {
                Ok(features) => {
                    time.samples += n as u64;
                    self.stats
                        .samples_encoded
                        .fetch_add(n as u64, Ordering::Relaxed);
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
                    if route(shard).send(msg).is_err() {
                        self.stats.dropped(n as u64);
                    }
                }
                Err(why) => {
                    tracing::warn!(
                        shard,
                        "encoding failed; the shard will not be committed: {why}"
                    );
                    self.stats.dropped(n as u64);
                    failed.insert(shard, why);
                }
            }
        };
        loop {
            let t0 = Instant::now();
            let Ok(msg) = rx.recv() else { break };
            time.wait_s += t0.elapsed().as_secs_f64();
            match msg {
                ToEncode::Sample(s) => {
                    let shard = s.shard;
                    let p = pending.entry(shard).or_default();
                    p.push(s);
                    if p.len() >= self.batch {
                        let b = std::mem::take(p);
                        flush(shard, b, &mut failed, &mut time);
                    }
                }
                ToEncode::End(end) => {
                    let shard = end.shard;
                    if let Some(b) = pending.remove(&shard) {
                        if end.error.is_some() {
                            // the shard will not be committed: do not encode its tail
                            self.stats.dropped(b.len() as u64);
                        } else {
                            flush(shard, b, &mut failed, &mut time);
                        }
                    }
                    let msg = ToWrite::End {
                        end,
                        encode_error: failed.remove(&shard),
                    };
                    let _ = route(shard).send(msg);
                }
            }
        }
        time.finish();
        for t in per_encoder.values_mut() {
            t.samples_per_s = t.samples as f64 / t.busy_s.max(1e-9);
        }
        (time, per_encoder)
    }
}

/// Runs every encoder on one batch; outputs cast to their store dtype on the
/// encoder's device (bf16 halves the copy to the host).
fn encode_batch(
    encoders: &[Loaded],
    batch: &[Sample],
    per_encoder: &mut BTreeMap<String, EncoderTime>,
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
    for l in encoders {
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
        let e = per_encoder.entry(feature.name().to_string()).or_default();
        e.busy_s += t0.elapsed().as_secs_f64();
        e.samples += batch.len() as u64;
    }
    Ok(out)
}
