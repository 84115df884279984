//! Reading: global index, determinism, shuffled prefetching loader.

use std::collections::BTreeSet;
use std::sync::Arc;

use tensorbake_store::{Loader, LoaderConfig, Location, Store, StoreReader, epoch_order};

use crate::common::{expected, options, record, spec, tensor_bytes};

/// Three parts (written out of name order) of 11, 0 and 14 samples.
fn store(dir: &std::path::Path) -> Location {
    let loc = Location::Local(dir.join("s.zarr"));
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    for (part, seed, n) in [("c", 42u64, 14u64), ("a", 40, 11), ("b", 41, 0)] {
        let mut w = store.part_writer(part, part).unwrap();
        for i in 0..n {
            w.push(record(&expected(seed, i))).unwrap();
        }
        w.commit().unwrap();
    }
    loc
}

#[test]
fn the_global_index_is_parts_in_name_order_and_stable() {
    let dir = tempfile::tempdir().unwrap();
    let loc = store(dir.path());
    let r1 = StoreReader::open(&loc).unwrap();
    assert_eq!(r1.len(), 25);
    assert_eq!(
        r1.parts(),
        [("a".into(), 11), ("b".into(), 0), ("c".into(), 14)]
    );
    for i in 0..25u64 {
        let (seed, row) = if i < 11 { (40, i) } else { (42, i - 11) };
        let s = r1.get(i).unwrap();
        assert_eq!(s.key, expected(seed, row).key);
        assert_eq!(s.part, if i < 11 { "a" } else { "c" });
    }
    // A new reader, and a reader opened after an uncommitted part appeared: same samples.
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let mut w = store.part_writer("aa", "aa").unwrap();
    for i in 0..9 {
        w.push(record(&expected(50, i))).unwrap();
    }
    drop(w);
    let r2 = StoreReader::open(&loc).unwrap();
    assert_eq!(r2.len(), 25);
    for i in [0u64, 10, 11, 24] {
        let (a, b) = (r1.get(i).unwrap(), r2.get(i).unwrap());
        assert_eq!(a.key, b.key);
        for (name, t) in &a.features {
            assert_eq!(tensor_bytes(name, t), tensor_bytes(name, &b.features[name]));
        }
    }
}

#[test]
fn loader_epochs_are_seeded_complete_and_match_get() {
    let dir = tempfile::tempdir().unwrap();
    let loc = store(dir.path());
    let reader = Arc::new(StoreReader::open(&loc).unwrap());
    let arrays = vec![
        "emb_bf16".to_string(),
        "ids_u16".to_string(),
        "orig_size".to_string(),
        "caption".to_string(),
        "len_u32".to_string(),
    ];
    let run = |seed, epoch, threads| {
        let mut cfg = LoaderConfig::new(seed, epoch, 4, arrays.clone());
        cfg.prefetch_threads = threads;
        Loader::new(reader.clone(), &cfg)
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    };
    let a = run(7, 0, 3);
    assert_eq!(a.len(), 7); // 25 samples / 4 = 6 full + 1 of 1
    let order: Vec<u64> = a.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(
        order,
        epoch_order(25, 7, 0),
        "batches must come in epoch order"
    );
    let set: BTreeSet<u64> = order.iter().copied().collect();
    assert_eq!(set.len(), 25, "every sample exactly once per epoch");
    // Same seed and epoch, another thread count: same batches.
    let b = run(7, 0, 1);
    assert_eq!(
        b.iter().map(|x| x.keys.clone()).collect::<Vec<_>>(),
        a.iter().map(|x| x.keys.clone()).collect::<Vec<_>>()
    );
    // Another epoch or seed: another order.
    let c = run(7, 1, 2);
    assert_ne!(
        c.iter().flat_map(|x| x.indices.clone()).collect::<Vec<_>>(),
        order
    );
    let d = run(8, 0, 2);
    assert_ne!(
        d.iter().flat_map(|x| x.indices.clone()).collect::<Vec<_>>(),
        order
    );

    // Batch contents are the samples `get` returns, stacked on axis 0.
    for batch in &a {
        let n = batch.indices.len();
        assert_eq!(batch.tensors["emb_bf16"].dims(), [n, 5, 7]);
        assert_eq!(batch.tensors["ids_u16"].dims(), [n, 6]);
        assert_eq!(batch.tensors["len_u32"].dims(), [n]);
        assert_eq!(batch.tensors["orig_size"].dims(), [n, 2]);
        for (j, &i) in batch.indices.iter().enumerate() {
            let s = reader.get(i).unwrap();
            assert_eq!(batch.keys[j], s.key);
            assert_eq!(batch.strings["caption"][j], s.caption);
            for name in ["emb_bf16", "ids_u16", "len_u32"] {
                let row = batch.tensors[name].get(j).unwrap();
                assert_eq!(
                    tensor_bytes(name, &row),
                    tensor_bytes(name, &s.features[name]),
                    "{name} of {}",
                    s.key
                );
            }
            let o = batch.tensors["orig_size"]
                .get(j)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(o, s.orig_size);
        }
    }

    // drop_last, no shuffle.
    let mut cfg = LoaderConfig::new(0, 0, 4, vec![]);
    cfg.drop_last = true;
    cfg.shuffle = false;
    let batches: Vec<_> = Loader::new(reader.clone(), &cfg)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(batches.len(), 6);
    assert_eq!(batches[0].indices, [0, 1, 2, 3]);
    // A loader dropped half way stops its threads (the test would hang otherwise).
    let mut l = Loader::new(reader.clone(), &LoaderConfig::new(1, 0, 1, arrays.clone())).unwrap();
    l.next().unwrap().unwrap();
    drop(l);
    // Unknown arrays are refused up front.
    let err = Loader::new(
        reader.clone(),
        &LoaderConfig::new(1, 0, 4, vec!["nope".into()]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("nope") && err.contains("emb_bf16"), "{err}");
}

/// The byte-level API language bindings read with: stored dtype (u16 stays u16), no
/// candle, the same bytes as the writer got; kinds and commit markers by name.
#[test]
fn read_bytes_array_kind_and_committed_part_for_bindings() {
    use tensorbake_store::layout::ArrayKind;
    use tensorbake_store::{DType, StoreError};
    let dir = tempfile::tempdir().unwrap();
    let loc = store(dir.path());
    let r = StoreReader::open(&loc).unwrap();
    for i in [0u64, 10, 11, 24] {
        let (seed, row) = if i < 11 { (40, i) } else { (42, i - 11) };
        let e = expected(seed, row);
        for (name, bytes) in &e.features {
            assert_eq!(&r.read_bytes(i, name).unwrap(), bytes, "{name} {i}");
        }
        let orig = r.read_bytes(i, "orig_size").unwrap();
        assert_eq!(orig[..4], e.orig_size[0].to_le_bytes());
    }
    assert_eq!(
        r.array_kind("ids_u16").unwrap(),
        ArrayKind::Fixed {
            dtype: DType::U16,
            shape: vec![6]
        }
    );
    assert_eq!(r.array_kind("caption").unwrap(), ArrayKind::Str);
    assert!(matches!(
        r.array_kind("nope"),
        Err(StoreError::UnknownArray { name, .. }) if name == "nope"
    ));
    assert!(matches!(
        r.read_bytes(0, "key"),
        Err(StoreError::UnknownArray { .. })
    ));
    assert!(matches!(
        r.read_bytes(25, "emb_bf16"),
        Err(StoreError::IndexOutOfRange { .. })
    ));
    let meta = r.committed_part("c").unwrap();
    assert_eq!((meta.source.as_str(), meta.samples), ("c", 14));
    assert!(r.committed_part("zz").is_none());
}

/// Rows decode the same through the reader's direct path (checksum checked in place,
/// zstd straight into the caller's buffer) as through zarrs' codecs: every dtype,
/// every sample, across shards; an array with another codec chain (here unsharded,
/// no crc32c) falls back to zarrs and reads the same; wrong buffer sizes and damaged
/// bytes are errors naming the part and array.
#[test]
fn direct_decoding_matches_zarrs_and_refuses_damage() {
    use std::sync::Arc as StdArc;
    use zarrs::array::codec::ZstdCodec;
    use zarrs::array::{ArrayBuilder, ArraySubset, data_type};

    let dir = tempfile::tempdir().unwrap();
    let loc = store(dir.path());
    let r = StoreReader::open(&loc).unwrap();
    for i in 0..r.len() {
        let (seed, row) = if i < 11 { (40, i) } else { (42, i - 11) };
        for (name, bytes) in &expected(seed, row).features {
            let mut out = vec![0xAAu8; bytes.len()];
            r.read_bytes_into(i, name, &mut out).unwrap();
            assert_eq!(&out, bytes, "{name} {i}");
            assert_eq!(&r.read_bytes(i, name).unwrap(), bytes, "{name} {i}");
        }
    }
    let err = r
        .read_bytes_into(0, "emb_bf16", &mut [0u8; 3])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("emb_bf16") && err.contains("70") && err.contains('3'),
        "{err}"
    );
    assert!(r.read_bytes_into(0, "key", &mut [0u8; 4]).is_err());

    // A sample whose features are all zero is stored as absent inner chunks (the fill
    // value): zarrs' path reads it, its neighbours still take the direct one.
    {
        let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
        let mut w = store.part_writer("z", "z").unwrap();
        for i in 0..3 {
            let mut e = expected(43, i);
            if i == 1 {
                e.features.values_mut().for_each(|b| b.fill(0));
            }
            w.push(record(&e)).unwrap();
        }
        w.commit().unwrap();
        let r = StoreReader::open(&loc).unwrap();
        for i in 0..3u64 {
            let mut e = expected(43, i);
            if i == 1 {
                e.features.values_mut().for_each(|b| b.fill(0));
            }
            for (name, bytes) in &e.features {
                let mut out = vec![0xAAu8; bytes.len()];
                r.read_bytes_into(25 + i, name, &mut out).unwrap();
                assert_eq!(&out, bytes, "{name} z/{i}");
                assert_eq!(&r.read_bytes(25 + i, name).unwrap(), bytes, "{name} z/{i}");
            }
        }
    }

    // Rewrite part a's lat_f32 unsharded with zstd only: the reader takes zarrs' path.
    let root = dir.path().join("s.zarr");
    let storage: StdArc<dyn zarrs::storage::ReadableWritableListableStorageTraits> =
        StdArc::new(zarrs::filesystem::FilesystemStore::new(&root).unwrap());
    let old = zarrs::array::Array::open(storage.clone(), "/parts/a/lat_f32").unwrap();
    let all = ArraySubset::new_with_shape(old.shape().to_vec());
    let values: Vec<f32> = old.retrieve_array_subset(&all).unwrap();
    std::fs::remove_dir_all(root.join("parts/a/lat_f32")).unwrap();
    let mut builder = ArrayBuilder::new(
        old.shape().to_vec(),
        vec![1, 2, 3, 3],
        data_type::float32(),
        0f32,
    );
    builder.bytes_to_bytes_codecs(vec![StdArc::new(ZstdCodec::new(3, false))]);
    let plain = builder.build(storage, "/parts/a/lat_f32").unwrap();
    plain.store_metadata().unwrap();
    plain.store_array_subset(&all, values).unwrap();
    let r = StoreReader::open(&loc).unwrap();
    for i in 0..11 {
        let want = &expected(40, i).features["lat_f32"];
        let mut out = vec![0u8; want.len()];
        r.read_bytes_into(i, "lat_f32", &mut out).unwrap();
        assert_eq!(&out, want, "fallback {i}");
    }

    // One flipped byte inside an inner chunk of part c's bf16 embeddings.
    let shard = root.join("parts/c/emb_bf16/c/0/0/0");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[6] ^= 0x10;
    std::fs::write(&shard, bytes).unwrap();
    let r = StoreReader::open(&loc).unwrap();
    let mut out = vec![0u8; 70];
    let into = r
        .read_bytes_into(11, "emb_bf16", &mut out)
        .unwrap_err()
        .to_string();
    let owned = r.read_bytes(11, "emb_bf16").unwrap_err().to_string();
    for err in [into, owned] {
        assert!(
            err.contains("part c") && err.contains("emb_bf16") && err.contains("checksum"),
            "{err}"
        );
    }
    // The other samples of that shard still read.
    r.read_bytes_into(12, "emb_bf16", &mut out).unwrap();
    assert_eq!(out, expected(42, 1).features["emb_bf16"]);
}
