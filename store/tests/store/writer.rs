//! Writing: dtype round trips, shard layout, spec refusal, commit semantics.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use tensorbake_store::writer::SampleMeta;
use tensorbake_store::{
    DType, FeatureValue, Location, Store, StoreError, StoreOptions, StoreReader,
};

use crate::common::{self, expected, options, record, spec, tensor_bytes};

fn check_sample(reader: &StoreReader, index: u64, e: &common::Expected) {
    let s = reader.get(index).unwrap();
    assert_eq!(s.key, e.key, "index {index}");
    assert_eq!(s.caption, e.caption, "{}", e.key);
    assert_eq!(s.caption_raw, e.caption_raw, "{}", e.key);
    assert_eq!(s.orig_size, e.orig_size, "{}", e.key);
    assert_eq!(s.features.len(), e.features.len());
    for (name, bytes) in &e.features {
        let t = &s.features[name];
        let want_shape: Vec<usize> = spec().features[name]
            .shape
            .iter()
            .map(|&d| d as usize)
            .collect();
        assert_eq!(t.dims(), want_shape.as_slice(), "{name}");
        assert_eq!(&tensor_bytes(name, t), bytes, "{} {name}", e.key);
    }
}

#[test]
fn every_dtype_and_string_round_trips_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::Local(dir.path().join("s.zarr"));
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let mut w = store.part_writer("a", "file:///a.tar").unwrap();
    let samples: Vec<_> = (0..21).map(|i| expected(1, i)).collect();
    for e in &samples {
        w.push(record(e)).unwrap();
    }
    assert_eq!(w.commit().unwrap(), 21);

    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(reader.len(), 21);
    for (i, e) in samples.iter().enumerate() {
        check_sample(&reader, i as u64, e);
    }
    // Shards: emb_bf16 holds 8 samples per shard -> 3 shard files, the last partial.
    let emb = dir.path().join("s.zarr/parts/a/emb_bf16");
    let shards: Vec<_> = std::fs::read_dir(emb.join("c"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(shards.len(), 3, "{shards:?}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(emb.join("zarr.json")).unwrap()).unwrap();
    assert_eq!(meta["shape"], serde_json::json!([21, 5, 7]));
    assert_eq!(meta["data_type"], "bfloat16");
    assert_eq!(
        meta["chunk_grid"]["configuration"]["chunk_shape"],
        serde_json::json!([8, 5, 7])
    );
    let sharding = &meta["codecs"][0];
    assert_eq!(sharding["name"], "sharding_indexed");
    assert_eq!(
        sharding["configuration"]["chunk_shape"],
        serde_json::json!([1, 5, 7])
    );
    let inner: Vec<&str> = sharding["configuration"]["codecs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(inner, ["bytes", "zstd", "crc32c"]);
    let key_meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("s.zarr/parts/a/key/zarr.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(key_meta["data_type"], "string");
    assert_eq!(
        key_meta["codecs"][0]["configuration"]["codecs"][0]["name"],
        "vlen-utf8"
    );
    // The root records the spec.
    let root: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("s.zarr/zarr.json")).unwrap())
            .unwrap();
    assert_eq!(
        root["attributes"]["tensorbake"]["features"]["emb_bf16"]["dtype"],
        "bfloat16"
    );
    assert_eq!(
        root["attributes"]["tensorbake"]["features"]["len_u32"]["shape"],
        serde_json::json!([])
    );
}

#[test]
fn tensors_and_batches_are_cast_and_split() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::Local(dir.path().join("s.zarr"));
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let samples: Vec<_> = (0..10).map(|i| expected(2, i)).collect();
    let mut w = store.part_writer("t", "t").unwrap();
    // First 4 one by one as tensors (f32 tensors for float features: cast on write).
    for e in &samples[..4] {
        let mut r = record(e);
        for (name, f) in &spec().features {
            let shape: Vec<usize> = f.shape.iter().map(|&d| d as usize).collect();
            let bytes = &e.features[name];
            let t = match f.dtype {
                DType::Bf16 => {
                    let v: Vec<f32> = bytes
                        .chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect();
                    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
                }
                DType::F16 => {
                    let v: Vec<f32> = bytes
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect();
                    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
                }
                DType::F32 => {
                    Tensor::from_raw_buffer(bytes, candle_core::DType::F32, &shape, &Device::Cpu)
                        .unwrap()
                }
                DType::U16 => {
                    let v: Vec<u32> = bytes
                        .chunks_exact(2)
                        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                        .collect();
                    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
                }
                DType::U32 => {
                    Tensor::from_raw_buffer(bytes, candle_core::DType::U32, &shape, &Device::Cpu)
                        .unwrap()
                }
            };
            r.features.insert(name.clone(), FeatureValue::Tensor(t));
        }
        w.push(r).unwrap();
    }
    // The other 6 as one batch-major batch, in the stored dtypes, each tensor a view
    // the writer must not read as if it were its whole storage: one row into a larger
    // tensor (an offset), or, with 2 or more dims per sample, transposed twice (strides).
    let rest = &samples[4..];
    let view = |t: Tensor, i: usize| -> Tensor {
        if i % 2 == 1 && t.rank() >= 3 {
            let r = t.rank();
            let v = t.transpose(r - 2, r - 1).unwrap().contiguous().unwrap();
            let v = v.transpose(r - 2, r - 1).unwrap();
            assert!(!v.is_contiguous());
            v
        } else {
            let padded = Tensor::cat(&[&t.narrow(0, 0, 1).unwrap(), &t], 0).unwrap();
            padded.narrow(0, 1, t.dim(0).unwrap()).unwrap()
        }
    };
    let meta: Vec<SampleMeta> = rest
        .iter()
        .map(|e| SampleMeta {
            key: e.key.clone(),
            caption: e.caption.clone(),
            caption_raw: e.caption_raw.clone(),
            orig_size: e.orig_size,
        })
        .collect();
    let mut batch = BTreeMap::new();
    for (name, f) in &spec().features {
        let mut shape = vec![rest.len()];
        shape.extend(f.shape.iter().map(|&d| d as usize));
        let bytes: Vec<u8> = rest.iter().flat_map(|e| e.features[name].clone()).collect();
        let t = if f.dtype == DType::U16 {
            let v: Vec<u32> = bytes
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        } else {
            Tensor::from_raw_buffer(&bytes, f.dtype.candle(), &shape, &Device::Cpu).unwrap()
        };
        batch.insert(name.clone(), view(t, batch.len()));
    }
    w.push_batch(meta, &batch).unwrap();
    w.commit().unwrap();
    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(reader.len(), 10);
    for (i, e) in samples.iter().enumerate() {
        check_sample(&reader, i as u64, e);
    }
}

#[test]
fn bad_samples_are_refused_naming_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::Local(dir.path().join("s.zarr"));
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let mut w = store.part_writer("x", "x").unwrap();
    let e = expected(3, 0);

    let mut r = record(&e);
    r.features.remove("lat_f16");
    let err = w.push(r).unwrap_err().to_string();
    assert!(
        err.contains("lat_f16") && err.contains("missing") && err.contains(&e.key),
        "{err}"
    );

    let mut r = record(&e);
    r.features
        .insert("extra".into(), FeatureValue::Bytes(vec![0]));
    assert!(w.push(r).unwrap_err().to_string().contains("extra"));

    let mut r = record(&e);
    r.features.insert(
        "emb_bf16".into(),
        FeatureValue::Tensor(
            Tensor::zeros((5, 6), candle_core::DType::BF16, &Device::Cpu).unwrap(),
        ),
    );
    let err = w.push(r).unwrap_err().to_string();
    assert!(
        err.contains("emb_bf16") && err.contains("[5, 6]") && err.contains("[5, 7]"),
        "{err}"
    );

    let mut r = record(&e);
    r.features.insert(
        "ids_u16".into(),
        FeatureValue::Tensor(Tensor::new(&[1u32, 2, 3, 4, 5, 70000], &Device::Cpu).unwrap()),
    );
    let err = w.push(r).unwrap_err().to_string();
    assert!(err.contains("ids_u16") && err.contains("70000"), "{err}");

    let mut r = record(&e);
    r.features
        .insert("lat_f32".into(), FeatureValue::Bytes(vec![0; 3]));
    let err = w.push(r).unwrap_err().to_string();
    assert!(err.contains("lat_f32") && err.contains("3 bytes"), "{err}");

    // Nothing of the refused samples was buffered.
    assert_eq!(w.samples(), 0);
    w.push(record(&e)).unwrap();
    assert_eq!(w.commit().unwrap(), 1);
    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(reader.len(), 1);
    check_sample(&reader, 0, &e);
}

/// Layout settings out of range are refused naming the key, before anything is written.
#[test]
fn a_layout_out_of_range_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.zarr");
    let loc = Location::Local(path.clone());
    let bad = [
        (
            StoreOptions {
                zstd_level: 30,
                ..options()
            },
            "zstd_level 30",
        ),
        (
            StoreOptions {
                shard_bytes: 0,
                ..options()
            },
            "shard_bytes",
        ),
        (
            StoreOptions {
                max_shard_samples: 0,
                ..options()
            },
            "max_shard_samples",
        ),
    ];
    for (o, names) in bad {
        let err = Store::create_or_open_with(&loc, spec(), o)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid store layout") && err.contains(names),
            "{err}"
        );
        assert!(!path.exists(), "{names}: something was written");
    }
    // zstd's own range holds: one of its fast negative levels and its highest write
    // and read back
    for level in [-5, 22] {
        let o = StoreOptions {
            zstd_level: level,
            ..options()
        };
        let loc = Location::Local(dir.path().join(format!("l{level}.zarr")));
        let store = Store::create_or_open_with(&loc, spec(), o).unwrap();
        let mut w = store.part_writer("p", "p").unwrap();
        let e = expected(5, 0);
        w.push(record(&e)).unwrap();
        w.commit().unwrap();
        check_sample(&StoreReader::open(&loc).unwrap(), 0, &e);
    }
}

#[test]
fn a_store_refuses_a_different_spec_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::Local(dir.path().join("s.zarr"));
    Store::create_or_open_with(&loc, spec(), options()).unwrap();
    // Same spec (new metadata is informational): fine.
    let mut same = spec();
    same.metadata = serde_json::json!({"run": 2});
    Store::create_or_open(&loc, same).unwrap();

    type Change = Box<dyn Fn(&mut tensorbake_store::StoreSpec)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|s| s.features.get_mut("emb_bf16").unwrap().weights_sha256 = "cd".repeat(32)),
            "features.emb_bf16.weights_sha256",
        ),
        (
            Box::new(|s| s.features.get_mut("lat_f32").unwrap().dtype = DType::F16),
            "features.lat_f32.dtype",
        ),
        (
            Box::new(|s| s.features.get_mut("lat_f32").unwrap().shape = vec![2, 4, 4]),
            "features.lat_f32.shape.1",
        ),
        (
            Box::new(|s| s.features.get_mut("emb_bf16").unwrap().model = "other".into()),
            "features.emb_bf16.model",
        ),
        (
            Box::new(|s| s.features.get_mut("emb_bf16").unwrap().preprocess["size"] = 9.into()),
            "features.emb_bf16.preprocess.size",
        ),
        (
            Box::new(|s| {
                s.features.remove("ids_u16");
            }),
            "features.ids_u16",
        ),
        (
            Box::new(|s| s.captions["clean"] = false.into()),
            "captions.clean",
        ),
        (Box::new(|s| s.resolution = Some(16)), "resolution"),
    ];
    for (change, field) in cases {
        let mut other = spec();
        change(&mut other);
        match Store::create_or_open(&loc, other) {
            Err(StoreError::SpecMismatch { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected a mismatch, got {other:?}"),
        }
    }
    let mut other = spec();
    other.features.get_mut("emb_bf16").unwrap().weights_sha256 = "cd".repeat(32);
    let msg = Store::create_or_open(&loc, other).unwrap_err().to_string();
    assert!(
        msg.contains("features.emb_bf16.weights_sha256")
            && msg.contains(&"ab".repeat(32))
            && msg.contains(&"cd".repeat(32)),
        "{msg}"
    );
}

#[test]
fn uncommitted_parts_are_invisible_and_committed_ones_are_never_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::Local(dir.path().join("s.zarr"));
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    {
        let mut w = store.part_writer("p", "src-p").unwrap();
        for i in 0..17 {
            w.push(record(&expected(4, i))).unwrap();
        }
        // Dropped without commit: whole shards were written, no marker.
    }
    assert!(dir.path().join("s.zarr/parts/p/emb_bf16/c/0/0/0").exists());
    assert!(!dir.path().join("s.zarr/parts/p/zarr.json").exists());
    assert!(store.committed_parts().unwrap().is_empty());
    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(reader.len(), 0);
    assert_eq!(reader.uncommitted_parts(), ["p"]);
    assert!(matches!(
        reader.get(0),
        Err(StoreError::IndexOutOfRange { .. })
    ));

    // The next writer of that part starts from nothing.
    let w = store.part_writer("p", "src-p").unwrap();
    assert!(
        !dir.path().join("s.zarr/parts/p").exists(),
        "leftovers were not deleted"
    );
    let mut w = w;
    for i in 0..5 {
        w.push(record(&expected(4, 100 + i))).unwrap();
    }
    w.commit().unwrap();
    assert_eq!(
        store
            .committed_parts()
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        ["p"]
    );
    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(reader.len(), 5);
    check_sample(&reader, 0, &expected(4, 100));

    match store.part_writer("p", "src-p") {
        Err(StoreError::PartCommitted {
            part, source_url, ..
        }) => assert_eq!((part.as_str(), source_url.as_str()), ("p", "src-p")),
        other => panic!("expected PartCommitted, got {other:?}"),
    }
    assert!(matches!(
        store.part_writer("../evil", "x"),
        Err(StoreError::InvalidPartName { .. })
    ));

    // A part whose captions are all empty (fill value) still has every shard on disk,
    // so verify does not mistake it for damage.
    let mut w = store.part_writer("nocap", "src-nocap").unwrap();
    for i in 0..6 {
        let mut r = record(&expected(5, i));
        r.caption = String::new();
        w.push(r).unwrap();
    }
    w.commit().unwrap();
    assert!(dir.path().join("s.zarr/parts/nocap/caption/c/1").exists());
    assert!(tensorbake_store::verify(&loc).unwrap().ok());
    assert_eq!(StoreReader::open(&loc).unwrap().get(0).unwrap().caption, "");

    // An empty part commits too (a shard whose samples were all skipped is done).
    store
        .part_writer("empty", "src-empty")
        .unwrap()
        .commit()
        .unwrap();
    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(
        reader.parts(),
        [
            ("empty".to_string(), 0),
            ("nocap".to_string(), 6),
            ("p".to_string(), 5)
        ]
    );
    assert_eq!(reader.len(), 11);
}

/// All files under `dir`, by relative path (commit markers left out: they hold the
/// commit time).
fn shard_files(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &std::path::Path, d: &std::path::Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if !p.ends_with("zarr.json") {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn the_same_samples_make_the_same_bytes_every_time() {
    // Shards of 64 inner chunks are encoded on several threads; their layout in the
    // shard must not depend on which thread finished first.
    let write = |name: &str| {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::Local(dir.path().join(name));
        let opts = tensorbake_store::StoreOptions {
            shard_bytes: 1 << 20,
            max_shard_samples: 64,
            ..tensorbake_store::StoreOptions::default()
        };
        let store = Store::create_or_open_with(&loc, spec(), opts).unwrap();
        let mut w = store.part_writer("a", "file:///a.tar").unwrap();
        for i in 0..150 {
            w.push(record(&expected(3, i))).unwrap();
        }
        w.commit().unwrap();
        (dir, dir_files(&loc))
    };
    fn dir_files(loc: &Location) -> BTreeMap<String, Vec<u8>> {
        match loc {
            Location::Local(p) => shard_files(p),
            Location::S3 { .. } => unreachable!(),
        }
    }
    let (_a, first) = write("a.zarr");
    assert!(first.len() > 10, "{:?}", first.keys());
    for _ in 0..3 {
        let (_b, again) = write("a.zarr");
        assert_eq!(
            first.keys().collect::<Vec<_>>(),
            again.keys().collect::<Vec<_>>()
        );
        for (k, v) in &first {
            assert!(
                &again[k] == v,
                "{k} differs between two writes of the same samples"
            );
        }
    }
}

/// A part written into the shard buffers an earlier part of the store gave back (full
/// of that part's samples) has the same shard files as the same part written alone:
/// its partial shards' padding is fill value again, stored as absent inner chunks.
#[test]
fn a_part_in_reused_buffers_writes_what_a_fresh_one_does() {
    let write_b = |store: &Store| {
        let mut w = store.part_writer("b", "b").unwrap();
        for i in 0..3 {
            w.push(record(&expected(41, i))).unwrap();
        }
        w.commit().unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("alone.zarr");
    write_b(
        &Store::create_or_open_with(&Location::Local(alone.clone()), spec(), options()).unwrap(),
    );
    let after = dir.path().join("after.zarr");
    let loc = Location::Local(after.clone());
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let mut a = store.part_writer("a", "a").unwrap();
    for i in 0..12 {
        a.push(record(&expected(40, i))).unwrap();
    }
    a.commit().unwrap();
    write_b(&store);
    let files = |root: &std::path::Path| shard_files(&root.join("parts/b"));
    assert_eq!(files(&alone), files(&after));
    let reader = StoreReader::open(&loc).unwrap();
    for i in 0..3 {
        check_sample(&reader, 12 + i, &expected(41, i));
    }
}
