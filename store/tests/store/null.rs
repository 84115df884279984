//! The embedding of the empty caption under `null/`: exact round trips of every dtype,
//! idempotent re-recording, refusals naming the array, reopening, verify, concurrency,
//! and that `null/` is never taken for a part.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType as CDType, Device, Tensor};
use tensorbake_store::{Location, Store, StoreError, StoreReader, inspect, verify};

use crate::common::{Rng, expected, options, record, spec, tensor_bytes};

/// A seeded null embedding for every feature of the test spec, with tensors of the
/// per-sample shape (lat_f16 given as f32 to exercise the cast), and the little-endian
/// bytes each must be stored as.
fn null_arrays(seed: u64) -> (BTreeMap<String, Tensor>, BTreeMap<String, Vec<u8>>) {
    let mut rng = Rng::new(seed, 7);
    let dev = Device::Cpu;
    let mut floats = |n: usize| (0..n).map(|_| rng.small_float()).collect::<Vec<f32>>();
    let bf = floats(35);
    let f16 = floats(18);
    let f32v = floats(18);
    let ids: Vec<u32> = (0..6)
        .map(|i| (seed as u32 * 1000 + i * 997) % 65_536)
        .collect();
    let len = 17 + seed as u32;
    let mut tensors = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    tensors.insert(
        "emb_bf16".to_string(),
        Tensor::from_vec(bf.clone(), (5, 7), &dev)
            .unwrap()
            .to_dtype(CDType::BF16)
            .unwrap(),
    );
    bytes.insert(
        "emb_bf16".to_string(),
        bf.iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    );
    tensors.insert(
        "lat_f16".to_string(),
        Tensor::from_vec(f16.clone(), (2, 3, 3), &dev).unwrap(),
    );
    bytes.insert(
        "lat_f16".to_string(),
        f16.iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
    );
    tensors.insert(
        "lat_f32".to_string(),
        Tensor::from_vec(f32v.clone(), (2, 3, 3), &dev).unwrap(),
    );
    bytes.insert(
        "lat_f32".to_string(),
        f32v.iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
    tensors.insert(
        "ids_u16".to_string(),
        Tensor::from_vec(ids.clone(), 6, &dev).unwrap(),
    );
    bytes.insert(
        "ids_u16".to_string(),
        ids.iter()
            .flat_map(|v| u16::try_from(*v).unwrap().to_le_bytes())
            .collect(),
    );
    tensors.insert("len_u32".to_string(), Tensor::new(len, &dev).unwrap());
    bytes.insert("len_u32".to_string(), len.to_le_bytes().to_vec());
    (tensors, bytes)
}

/// A store with one committed part of 5 samples.
fn store_with_part(dir: &Path) -> (Location, Store) {
    let loc = Location::Local(dir.join("s.zarr"));
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let mut w = store.part_writer("a", "file:///a.tar").unwrap();
    for i in 0..5 {
        w.push(record(&expected(3, i))).unwrap();
    }
    w.commit().unwrap();
    (loc, store)
}

fn check_read_back(reader: &StoreReader, want: &BTreeMap<String, Vec<u8>>) {
    for (name, bytes) in want {
        let t = reader
            .null_embedding(name, &Device::Cpu)
            .unwrap()
            .unwrap_or_else(|| panic!("{name} not recorded"));
        let shape: Vec<usize> = spec().features[name]
            .shape
            .iter()
            .map(|&d| d as usize)
            .collect();
        assert_eq!(t.dims(), shape.as_slice(), "{name}: no batch axis");
        assert_eq!(&tensor_bytes(name, &t), bytes, "{name}");
        // the byte API: the stored dtype, no widening of u16
        assert_eq!(
            reader.null_embedding_bytes(name).unwrap().as_ref(),
            Some(bytes),
            "{name} bytes"
        );
    }
}

fn null_err(e: StoreError) -> (String, String) {
    let text = e.to_string();
    match e {
        StoreError::NullEmbedding { array, .. } => (array, text),
        other => panic!("expected a NullEmbedding error, got {other:?}"),
    }
}

#[test]
fn every_dtype_round_trips_exactly_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (loc, store) = store_with_part(dir.path());
    let before = StoreReader::open(&loc).unwrap();
    assert_eq!(before.null_embeddings().unwrap(), Vec::<String>::new());
    assert!(
        before
            .null_embedding("emb_bf16", &Device::Cpu)
            .unwrap()
            .is_none()
    );

    let (tensors, bytes) = null_arrays(1);
    store.record_null_embedding(&tensors).unwrap();

    // Layout: a group with the caption and array list; arrays with a leading axis of 1,
    // the feature's dtype, zstd + crc32c inside the shard.
    let root = dir.path().join("s.zarr");
    let group: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("null/zarr.json")).unwrap()).unwrap();
    assert_eq!(group["node_type"], "group");
    assert_eq!(group["attributes"]["tensorbake_null"]["caption"], "");
    let listed: BTreeSet<String> = group["attributes"]["tensorbake_null"]["arrays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, tensors.keys().cloned().collect());
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("null/emb_bf16/zarr.json")).unwrap())
            .unwrap();
    assert_eq!(meta["shape"], serde_json::json!([1, 5, 7]));
    assert_eq!(meta["data_type"], "bfloat16");
    let codecs = meta["codecs"][0]["configuration"]["codecs"].to_string();
    assert!(
        codecs.contains("zstd") && codecs.contains("crc32c"),
        "{codecs}"
    );
    let scalar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("null/len_u32/zarr.json")).unwrap())
            .unwrap();
    assert_eq!(scalar["shape"], serde_json::json!([1]));
    assert_eq!(scalar["data_type"], "uint32");

    // A reader opened before the recording sees it too (it is read on demand).
    check_read_back(&before, &bytes);

    // Reopen everything.
    drop(store);
    drop(before);
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let reader = StoreReader::open(&loc).unwrap();
    check_read_back(&reader, &bytes);
    assert_eq!(
        reader.null_embeddings().unwrap(),
        tensors.keys().cloned().collect::<Vec<_>>()
    );

    // `null/` is not a part: the part list and the sample index are unchanged.
    assert_eq!(
        store.committed_parts().unwrap(),
        BTreeSet::from(["a".to_string()])
    );
    assert_eq!(reader.parts(), vec![("a".to_string(), 5)]);
    assert!(reader.uncommitted_parts().is_empty());
    assert_eq!(reader.len(), 5);

    // inspect lists the recorded names; verify checks them and finds them intact.
    let info = inspect(&loc).unwrap();
    assert_eq!(
        info.null_embeddings,
        tensors.keys().cloned().collect::<Vec<_>>()
    );
    assert!(info.uncommitted_parts.is_empty());
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["null_embeddings"].as_array().unwrap().len(), 5);
    let report = verify(&loc).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.null_arrays_checked, 5);
    assert!(report.null_problems.is_empty());
}

#[test]
fn re_recording_the_same_embedding_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let (loc, store) = store_with_part(dir.path());
    let (tensors, bytes) = null_arrays(2);
    store.record_null_embedding(&tensors).unwrap();
    let root = dir.path().join("s.zarr");
    let keys = [
        "null/zarr.json",
        "null/emb_bf16/zarr.json",
        "null/lat_f32/zarr.json",
    ];
    let stamp = |k: &str| {
        let p = root.join(k);
        (
            std::fs::read(&p).unwrap(),
            std::fs::metadata(&p).unwrap().modified().unwrap(),
        )
    };
    let first: Vec<_> = keys.iter().map(|k| stamp(k)).collect();
    // Same values, given in another dtype (f32 for the bf16 feature): same stored bytes.
    let mut again = tensors.clone();
    again.insert(
        "emb_bf16".into(),
        tensors["emb_bf16"].to_dtype(CDType::F32).unwrap(),
    );
    store.record_null_embedding(&again).unwrap();
    // A second store handle (another worker) records a subset: also a no-op.
    let other = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let subset: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| k.as_str() == "len_u32")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    other.record_null_embedding(&subset).unwrap();
    let second: Vec<_> = keys.iter().map(|k| stamp(k)).collect();
    assert_eq!(first, second, "nothing was rewritten");
    check_read_back(&StoreReader::open(&loc).unwrap(), &bytes);
}

#[test]
fn a_different_embedding_is_refused_naming_the_array() {
    let dir = tempfile::tempdir().unwrap();
    let (loc, store) = store_with_part(dir.path());
    let (tensors, bytes) = null_arrays(3);
    let only = |names: &[&str], from: &BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
        from.iter()
            .filter(|(k, _)| names.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    store
        .record_null_embedding(&only(&["emb_bf16", "len_u32"], &tensors))
        .unwrap();
    // Another tokenizer / model: different values for emb_bf16, plus a new array.
    let (changed, _) = null_arrays(4);
    let mut request = only(&["emb_bf16"], &changed);
    request.insert("lat_f32".into(), tensors["lat_f32"].clone());
    let (array, text) = null_err(store.record_null_embedding(&request).unwrap_err());
    assert_eq!(array, "emb_bf16");
    assert!(text.contains("different embedding"), "{text}");
    // Checked before writing: the new array of the refused call was not recorded.
    let reader = StoreReader::open(&loc).unwrap();
    assert_eq!(
        reader.null_embeddings().unwrap(),
        vec!["emb_bf16".to_string(), "len_u32".to_string()]
    );
    assert!(
        reader
            .null_embedding("lat_f32", &Device::Cpu)
            .unwrap()
            .is_none()
    );
    // The recorded one is unchanged.
    let t = reader
        .null_embedding("emb_bf16", &Device::Cpu)
        .unwrap()
        .unwrap();
    assert_eq!(tensor_bytes("emb_bf16", &t), bytes["emb_bf16"]);
    // A scalar differing by one is refused too.
    let (array, _) = null_err(
        store
            .record_null_embedding(&BTreeMap::from([(
                "len_u32".to_string(),
                Tensor::new(21u32, &Device::Cpu).unwrap(),
            )]))
            .unwrap_err(),
    );
    assert_eq!(array, "len_u32");
}

#[test]
fn unknown_arrays_and_wrong_shapes_are_refused_naming_the_array() {
    let dir = tempfile::tempdir().unwrap();
    let (loc, store) = store_with_part(dir.path());
    let (tensors, _) = null_arrays(5);
    let mut request = tensors.clone();
    request.insert(
        "t5_hidden".into(),
        Tensor::zeros((4, 3), CDType::F32, &Device::Cpu).unwrap(),
    );
    let (array, text) = null_err(store.record_null_embedding(&request).unwrap_err());
    assert_eq!(array, "t5_hidden");
    assert!(text.contains("not a feature"), "{text}");
    assert!(text.contains("emb_bf16"), "lists the features: {text}");
    // With a batch axis: refused, naming the array and both shapes.
    let batched = BTreeMap::from([(
        "lat_f32".to_string(),
        tensors["lat_f32"].unsqueeze(0).unwrap(),
    )]);
    let (array, text) = null_err(store.record_null_embedding(&batched).unwrap_err());
    assert_eq!(array, "lat_f32");
    assert!(
        text.contains("[1, 2, 3, 3]") && text.contains("[2, 3, 3]"),
        "{text}"
    );
    // An integer tensor for a float feature.
    let ints = BTreeMap::from([(
        "emb_bf16".to_string(),
        Tensor::zeros((5, 7), CDType::U32, &Device::Cpu).unwrap(),
    )]);
    assert_eq!(
        null_err(store.record_null_embedding(&ints).unwrap_err()).0,
        "emb_bf16"
    );
    // An empty request.
    null_err(store.record_null_embedding(&BTreeMap::new()).unwrap_err());
    // Nothing was written by the refused calls.
    let reader = StoreReader::open(&loc).unwrap();
    assert!(reader.null_embeddings().unwrap().is_empty());
    assert!(!dir.path().join("s.zarr/null").exists());
    // Reading an unknown name is an error naming it, not `None`.
    let (array, _) = null_err(
        reader
            .null_embedding("t5_hidden", &Device::Cpu)
            .unwrap_err(),
    );
    assert_eq!(array, "t5_hidden");
}

#[test]
fn verify_reports_a_damaged_null_array_and_the_reader_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let (loc, store) = store_with_part(dir.path());
    let (tensors, _) = null_arrays(6);
    store.record_null_embedding(&tensors).unwrap();
    let shard = dir.path().join("s.zarr/null/lat_f32/c/0/0/0/0");
    let mut data = std::fs::read(&shard).unwrap();
    data[3] ^= 0x40; // inside the first (only) inner chunk
    std::fs::write(&shard, &data).unwrap();
    let report = verify(&loc).unwrap();
    assert!(!report.ok());
    assert!(report.damaged.is_empty(), "the parts are intact");
    assert_eq!(report.null_problems.len(), 1, "{:?}", report.null_problems);
    assert!(
        report.null_problems[0].contains("null/lat_f32/c/0/0/0/0"),
        "{:?}",
        report.null_problems
    );
    let reader = StoreReader::open(&loc).unwrap();
    assert!(reader.null_embedding("lat_f32", &Device::Cpu).is_err());
    // The others still read.
    assert!(
        reader
            .null_embedding("emb_bf16", &Device::Cpu)
            .unwrap()
            .is_some()
    );
}

#[test]
fn concurrent_workers_record_safely() {
    let dir = tempfile::tempdir().unwrap();
    let (loc, _store) = store_with_part(dir.path());
    let (tensors, bytes) = null_arrays(7);
    // Four workers record the same embedding at once; two more record disjoint
    // subsets at the same time.
    let emb: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| k.as_str() == "emb_bf16")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let ids: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| k.as_str() == "ids_u16")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    std::thread::scope(|s| {
        let jobs = [&tensors, &tensors, &tensors, &tensors, &emb, &ids];
        for job in jobs {
            let loc = loc.clone();
            s.spawn(move || {
                let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
                store.record_null_embedding(job).unwrap();
            });
        }
    });
    let reader = StoreReader::open(&loc).unwrap();
    check_read_back(&reader, &bytes);
    assert_eq!(
        reader.null_embeddings().unwrap(),
        tensors.keys().cloned().collect::<Vec<_>>()
    );
    assert!(verify(&loc).unwrap().ok());
    // No temporary files are left behind.
    let mut stack = vec![dir.path().join("s.zarr/null")];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().to_string();
            assert!(
                !name.contains(".tmp-"),
                "leftover {}",
                entry.path().display()
            );
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
}
