//! The stages wired as `Run::run` wires them, with a fake encoder and no subprocess:
//! samples of several shards interleaved go through the encode stage into two
//! writers; whole shards commit, a shard the encoder fails on does not, and every
//! committed sample holds what the encoder made of it.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use crossbeam_channel::bounded;
use tensorbake_encode::{ArraySpec, EncodeError, Encoder, EncoderInfo, Input};
use tensorbake_ingest::pipeline::{Sample, ShardEnd};
use tensorbake_ingest::shards::Shard;
use tensorbake_kit::dtype::DType;
use tensorbake_kit::schema::{Array, Feature};
use tensorbake_store::{FeatureSpec, Location, Store, StoreReader, StoreSpec};

use crate::encode_stage::{EncodeStage, Loaded, ToEncode};
use crate::stats::RunStats;
use crate::write_stage::{PartOutcome, WriteStage};

/// Writes `[first pixel, width, height, batch size]` per image; refuses a batch that
/// holds an image whose first pixel is 255.
struct FakeEncoder;

impl Encoder for FakeEncoder {
    fn encode(&self, input: Input<'_>) -> tensorbake_encode::Result<Vec<(Array, Tensor)>> {
        let Input::Images(images) = input else {
            panic!("the fake encoder takes images")
        };
        if images.iter().any(|im| im.pixels[0] == 255) {
            return Err(EncodeError::BadInput {
                encoder: "clip_vision".into(),
                why: "poisoned image".into(),
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
        Ok(vec![(Array::ClipImageEmbeds, t)])
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
    let shards: Vec<Shard> = (0..3)
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
    let stats = RunStats::new(3, &["clip_vision".to_string()]);
    let write = WriteStage {
        store: &store,
        shards: shards
            .iter()
            .zip(&parts)
            .map(|(s, p)| (s.index, (s, p.as_str())))
            .collect(),
        stats: &stats,
    };
    // shard 0: 5 samples, shard 1: 3, shard 2: 2 with the second poisoned; interleaved
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
        }
    }
    inputs.push(ToEncode::End(end(1, 3)));
    inputs.push(ToEncode::End(end(2, 2)));
    inputs.push(ToEncode::End(end(0, 5)));

    let (enc_tx, enc_rx) = bounded(2);
    let (w_txs, w_rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| bounded(1)).unzip();
    let outcomes = std::thread::scope(|scope| {
        let stats = &stats;
        // encoders are Send, not Sync: the encode thread owns them, as in Run::run
        let e = scope.spawn(move || {
            let encode = EncodeStage {
                encoders: &encoders,
                batch: 2,
                stats,
            };
            encode.run(enc_rx, w_txs)
        });
        let writers: Vec<_> = w_rxs
            .into_iter()
            .map(|rx| scope.spawn(|| write.run(rx)))
            .collect();
        for m in inputs {
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
    // the poisoned batch is the only one of shard 2: 8 samples through the encoder
    assert_eq!(stage.samples, 8);
    assert_eq!(per_encoder["clip_vision"].samples, 8);
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
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].index, failed[0].reason.as_str()), (2, "encode"));
    assert!(
        failed[0].error.contains("encoder clip_vision") && failed[0].error.contains("poisoned"),
        "{}",
        failed[0].error
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
