//! The stages wired as `Run::run` wires them, with a fake encoder and no subprocess:
//! samples of several shards interleaved go through the encode stage into two
//! writers; whole shards commit, a shard the encoder fails on does not, and every
//! committed sample holds what the encoder made of it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use crossbeam_channel::bounded;
use tensorbake_encode::{ArraySpec, EncodeError, Encoder, EncoderInfo, Input, Prepared};
use tensorbake_ingest::pipeline::{Sample, ShardEnd};
use tensorbake_ingest::shards::Shard;
use tensorbake_kit::dtype::DType;
use tensorbake_kit::schema::{Array, Feature};
use tensorbake_store::{FeatureSpec, Location, Store, StoreReader, StoreSpec};

use crate::encode_stage::{EncodeStage, Loaded, ToEncode, ToWrite};
use crate::stats::RunStats;
use crate::write_stage::{PartOutcome, WriteStage};

/// Writes `[first pixel, width, height, batch size]` per image; refuses to prepare a
/// batch that holds an image whose first pixel is 254, and to run one with 255.
struct FakeEncoder;

impl Encoder for FakeEncoder {
    fn prepare(&self, input: Input<'_>) -> tensorbake_encode::Result<Prepared> {
        let Input::Images(images) = input else {
            panic!("the fake encoder takes images")
        };
        if images.iter().any(|im| im.pixels[0] == 254) {
            return Err(EncodeError::BadInput {
                encoder: "clip_vision".into(),
                why: "unpreparable image".into(),
            });
        }
        let n = images.len() as f32;
        let rows: Vec<f32> = images
            .iter()
            .flat_map(|im| {
                [
                    f32::from(im.pixels[0]),
                    im.width as f32,
                    im.height as f32,
                    n,
                ]
            })
            .collect();
        let t = Tensor::from_vec(rows, (images.len(), 4), &Device::Cpu)
            .map_err(EncodeError::candle("fake"))?;
        Ok(Prepared::new(Feature::ClipVision, t, images.len(), 0))
    }

    fn run(&self, prepared: Prepared) -> tensorbake_encode::Result<Vec<(Array, Tensor)>> {
        let t: Tensor = prepared.take(Feature::ClipVision)?;
        let first: Vec<f32> = t
            .narrow(1, 0, 1)
            .and_then(|c| c.flatten_all())
            .and_then(|c| c.to_vec1())
            .map_err(EncodeError::candle("fake"))?;
        if first.contains(&255.0) {
            return Err(EncodeError::BadInput {
                encoder: "clip_vision".into(),
                why: "poisoned image".into(),
            });
        }
        Ok(vec![(Array::ClipImageEmbeds, t)])
    }

    fn device(&self) -> &Device {
        &Device::Cpu
    }

    fn info(&self) -> EncoderInfo {
        EncoderInfo {
            feature: Feature::ClipVision,
            model: "fake".into(),
            weights_sha256: "0".repeat(64),
            preprocess: serde_json::json!({}),
            arrays: vec![ArraySpec {
                array: Array::ClipImageEmbeds,
                shape: vec![4],
            }],
        }
    }
}

fn sample(shard: usize, i: u8, first_pixel: u8) -> Sample {
    let mut rgb = vec![i; 2 * 2 * 3];
    rgb[0] = first_pixel;
    Sample {
        shard,
        key: format!("s{shard}_{i:02}"),
        fields: vec!["jpg".into()],
        caption: Some(format!("caption {shard} {i}")),
        caption_raw: Some(format!("Caption {shard} {i}.")),
        orig_width: 100 + u32::from(i),
        orig_height: 50,
        rgb,
        resolution: 2,
    }
}

fn end(shard: usize, kept: u64) -> ShardEnd {
    ShardEnd {
        shard,
        kept,
        skipped: 0,
        bytes: 0,
        retries: 0,
        error: None,
    }
}

#[test]
fn stages_commit_whole_shards_and_drop_a_shard_the_encoder_fails_on() {
    whole_shards_commit(false);
}

/// The same with each batch held until the next is queued, as on a GPU: the held
/// batch still reaches its writer before its shard's end, and the last one at the end
/// of the input.
#[test]
fn holding_each_batch_until_the_next_runs_commits_the_same() {
    whole_shards_commit(true);
}

fn whole_shards_commit(hold: bool) {
    let dir = tempfile::tempdir().unwrap();
    let location = Location::from(dir.path().join("store"));
    let mut features = BTreeMap::new();
    features.insert(
        "clip_image_embeds".to_string(),
        FeatureSpec {
            model: "fake".into(),
            weights_sha256: "0".repeat(64),
            preprocess: serde_json::json!({}),
            dtype: DType::F32,
            shape: vec![4],
        },
    );
    let store = Store::create_or_open(&location, StoreSpec::new(features)).unwrap();
    let shards: Vec<Shard> = (0..4)
        .map(|i| Shard {
            index: i,
            url: format!("http://host/data/{i:05}.tar"),
            name: format!("{i:05}.tar"),
        })
        .collect();
    let parts: Vec<String> = shards
        .iter()
        .map(|s| tensorbake_store::part_name_for_source(&s.url))
        .collect();
    let encoders = [Loaded {
        feature: Feature::ClipVision,
        encoder: Box::new(FakeEncoder),
        arrays: vec![(Array::ClipImageEmbeds, DType::F32)],
    }];
    let stats = RunStats::new(4, &["clip_vision".to_string()]);
    let write = WriteStage::new(
        &store,
        shards.iter().zip(parts.iter().map(String::as_str)),
        &stats,
    );
    // shard 0: 5 samples, shard 1: 3, shard 2: 2 with the second poisoned for the
    // model, shard 3: 2 with the first unpreparable; interleaved
    let mut inputs = Vec::new();
    for i in 0..5u8 {
        inputs.push(ToEncode::Sample(sample(0, i, 10 + i)));
        if i < 3 {
            inputs.push(ToEncode::Sample(sample(1, i, 20 + i)));
        }
        if i < 2 {
            inputs.push(ToEncode::Sample(sample(
                2,
                i,
                if i == 1 { 255 } else { 30 },
            )));
            inputs.push(ToEncode::Sample(sample(
                3,
                i,
                if i == 0 { 254 } else { 40 },
            )));
        }
    }
    inputs.push(ToEncode::End(end(1, 3)));
    inputs.push(ToEncode::End(end(2, 2)));
    inputs.push(ToEncode::End(end(3, 2)));
    inputs.push(ToEncode::End(end(0, 5)));

    let (enc_tx, enc_rx) = bounded(2);
    let (w_txs, w_rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| bounded(1)).unzip();
    let outcomes = std::thread::scope(|scope| {
        let stats = &stats;
        let e = scope.spawn(move || {
            let encode = EncodeStage {
                encoders: &encoders,
                batch: 2,
                stats,
                hold,
            };
            encode.run(enc_rx, w_txs)
        });
        let writers: Vec<_> = w_rxs
            .into_iter()
            .map(|rx| scope.spawn(|| write.run(rx)))
            .collect();
        for m in inputs {
            if matches!(m, ToEncode::Sample(_)) {
                stats.sample_read();
            }
            enc_tx.send(m).unwrap();
            stats.encode_queue.sent();
        }
        drop(enc_tx);
        e.join().unwrap();
        let outcomes: Vec<PartOutcome> = writers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        outcomes
    });
    let (stage, per_encoder) = (stats.encode_time(), stats.encoder_times());
    // the poisoned batch is the only one of shard 2, the unpreparable one the only
    // one of shard 3: all 12 samples prepared (or tried), 8 through the model
    assert_eq!(stats.prepare_time().samples, 12);
    assert_eq!(stage.samples, 8);
    assert_eq!(
        per_encoder["clip_vision"].samples, 8,
        "a failed run counts no samples"
    );
    assert_eq!(per_encoder["clip_vision"].gpu_s, None);
    // nothing left in flight: every sample was written or dropped with its shard
    assert_eq!(stats.snapshot().in_flight, 0);
    // every message sent to the writers was received: both queues are empty
    let snap = stats.snapshot();
    assert_eq!((snap.encode_queue, snap.write_queue), (0, 0));
    assert_eq!(stats.write_time(2).samples, 8);
    let mut committed: Vec<(usize, u64)> = Vec::new();
    let mut failed = Vec::new();
    for o in outcomes {
        match o {
            PartOutcome::Committed(p) => committed.push((p.index, p.samples)),
            PartOutcome::Failed(f) => failed.push(f),
        }
    }
    committed.sort_unstable();
    assert_eq!(committed, [(0, 5), (1, 3)]);
    failed.sort_by_key(|f| f.index);
    assert_eq!(failed.len(), 2);
    assert_eq!((failed[0].index, failed[0].reason.as_str()), (2, "encode"));
    assert!(
        failed[0].error.contains("encoder clip_vision") && failed[0].error.contains("poisoned"),
        "{}",
        failed[0].error
    );
    assert_eq!((failed[1].index, failed[1].reason.as_str()), (3, "encode"));
    assert!(
        failed[1].error.contains("unpreparable"),
        "{}",
        failed[1].error
    );

    let reader = StoreReader::open(&location).unwrap();
    assert_eq!(reader.len(), 8);
    assert_eq!(reader.uncommitted_parts().len(), 0);
    for i in 0..reader.len() {
        let s = reader.get(i).unwrap();
        let (shard, k): (usize, u8) = {
            let rest = s.key.strip_prefix('s').unwrap();
            let (a, b) = rest.split_once('_').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        let row: Vec<f32> = s.features["clip_image_embeds"].to_vec1().unwrap();
        let base = if shard == 0 { 10 } else { 20 };
        // batches of 2 per shard: shard 0 ends with a batch of 1, shard 1 too
        let last = (shard == 0 && k == 4) || (shard == 1 && k == 2);
        let batch = if last { 1.0 } else { 2.0 };
        assert_eq!(row, [f32::from(base + k), 2.0, 2.0, batch], "{}", s.key);
        assert_eq!(s.caption, format!("caption {shard} {k}"));
        assert_eq!(s.orig_size, [100 + u32::from(k), 50]);
    }
}

/// Counts prepared batches; `run` of batch `k` (but the last) waits until batch
/// `k + 1` is being prepared, and counts whether it came.
struct Overlap {
    batches: usize,
    prepared: Mutex<usize>,
    more: Condvar,
    overlapped: Arc<AtomicUsize>,
}

impl Encoder for Overlap {
    fn prepare(&self, input: Input<'_>) -> tensorbake_encode::Result<Prepared> {
        let Input::Images(images) = input else {
            panic!("images")
        };
        let mut n = self.prepared.lock().unwrap();
        *n += 1;
        self.more.notify_all();
        Ok(Prepared::new(Feature::ClipVision, *n, images.len(), 0))
    }

    fn run(&self, prepared: Prepared) -> tensorbake_encode::Result<Vec<(Array, Tensor)>> {
        let b = prepared.len();
        let k: usize = prepared.take(Feature::ClipVision)?;
        if k < self.batches {
            let n = self.prepared.lock().unwrap();
            let (n, _) = self
                .more
                .wait_timeout_while(n, Duration::from_secs(20), |n| *n <= k)
                .unwrap();
            if *n > k {
                self.overlapped.fetch_add(1, AtomicOrdering::SeqCst);
            }
        }
        let t = Tensor::full(k as f32, (b, 4), &Device::Cpu).map_err(EncodeError::candle("o"))?;
        Ok(vec![(Array::ClipImageEmbeds, t)])
    }

    fn device(&self) -> &Device {
        &Device::Cpu
    }

    fn info(&self) -> EncoderInfo {
        FakeEncoder.info()
    }
}

/// While the model runs batch `k`, batch `k + 1` is prepared: with a sequential
/// stage every `run` would wait out its timeout for a batch that cannot come.
#[test]
fn the_next_batch_is_prepared_while_the_model_runs_the_current_one() {
    let batches = 4;
    let overlapped = Arc::new(AtomicUsize::new(0));
    let overlap = Overlap {
        batches,
        prepared: Mutex::new(0),
        more: Condvar::new(),
        overlapped: overlapped.clone(),
    };
    let encoders = [Loaded {
        feature: Feature::ClipVision,
        encoder: Box::new(overlap),
        arrays: vec![(Array::ClipImageEmbeds, DType::F32)],
    }];
    let stats = RunStats::new(1, &["clip_vision".to_string()]);
    let (enc_tx, enc_rx) = bounded(64);
    let (w_tx, w_rx) = bounded(64);
    for i in 0..(2 * batches) as u8 {
        stats.sample_read();
        enc_tx.send(ToEncode::Sample(sample(0, i, i))).unwrap();
    }
    enc_tx.send(ToEncode::End(end(0, 8))).unwrap();
    drop(enc_tx);
    EncodeStage {
        encoders: &encoders,
        batch: 2,
        stats: &stats,
        hold: false,
    }
    .run(enc_rx, vec![w_tx]);
    let got: Vec<f32> = w_rx
        .try_iter()
        .filter_map(|m| match m {
            ToWrite::Batch { features, .. } => Some(
                features["clip_image_embeds"]
                    .get(0)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()[0],
            ),
            ToWrite::End { .. } => None,
        })
        .collect();
    assert_eq!(got, [1.0, 2.0, 3.0, 4.0], "every batch, in order");
    assert_eq!(
        overlapped.load(AtomicOrdering::SeqCst),
        batches - 1,
        "each batch but the last ran while the next was being prepared"
    );
    assert_eq!(stats.encode_time().samples, 8);
}
