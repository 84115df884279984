//! zarr-python (with the bfloat16 snippet of docs/store.md) and tensorstore open a store
//! written by tensorbake, and every value they read is the value written.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use tensorbake_store::{Location, Store};

use crate::common::{self, expected, options, record, spec};

#[test]
fn zarr_python_and_tensorstore_read_every_value() {
    let Some(python) = common::python("zarr_python_and_tensorstore_read_every_value") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.zarr");
    let loc = Location::Local(path.clone());
    let store = Store::create_or_open_with(&loc, spec(), options()).unwrap();
    let parts = [("p-a", 70u64, 21u64), ("p-b", 71, 5)];
    for (part, seed, n) in parts {
        let mut w = store.part_writer(part, part).unwrap();
        for i in 0..n {
            w.push(record(&expected(seed, i))).unwrap();
        }
        w.commit().unwrap();
    }
    // An uncommitted part must not show up for the Python readers either.
    let mut w = store.part_writer("p-c", "p-c").unwrap();
    w.push(record(&expected(72, 0))).unwrap();
    drop(w);

    let out = std::process::Command::new(&python)
        .arg(common::python_dir().join("read_store.py"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "read_store.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got["features"],
        serde_json::json!(spec().features.keys().collect::<Vec<_>>())
    );

    let numpy_dtype = |name: &str| match name {
        "orig_size" => "uint32",
        "emb_bf16" => "bfloat16",
        "lat_f16" => "float16",
        "lat_f32" => "float32",
        "ids_u16" => "uint16",
        "len_u32" => "uint32",
        other => panic!("{other}"),
    };
    for reader in ["zarr_python", "tensorstore"] {
        let by_part = got[reader].as_object().unwrap();
        assert_eq!(
            by_part.keys().collect::<Vec<_>>(),
            ["p-a", "p-b"],
            "{reader}"
        );
        for (part, seed, n) in parts {
            let samples: Vec<_> = (0..n).map(|i| expected(seed, i)).collect();
            let mut want: BTreeMap<String, (Vec<u64>, Vec<u8>)> = BTreeMap::new();
            for (name, f) in &spec().features {
                let mut shape = vec![n];
                shape.extend(&f.shape);
                want.insert(
                    name.clone(),
                    (
                        shape,
                        samples
                            .iter()
                            .flat_map(|e| e.features[name].clone())
                            .collect(),
                    ),
                );
            }
            want.insert(
                "orig_size".into(),
                (
                    vec![n, 2],
                    samples
                        .iter()
                        .flat_map(|e| {
                            e.orig_size
                                .iter()
                                .flat_map(|v| v.to_le_bytes())
                                .collect::<Vec<_>>()
                        })
                        .collect(),
                ),
            );
            let arrays = by_part[part].as_object().unwrap();
            for (name, (shape, bytes)) in &want {
                let a = &arrays[name.as_str()];
                assert_eq!(a["dtype"], numpy_dtype(name), "{reader} {part}/{name}");
                assert_eq!(
                    a["shape"],
                    serde_json::json!(shape),
                    "{reader} {part}/{name}"
                );
                assert_eq!(
                    a["sha256"],
                    hex::encode(Sha256::digest(bytes)),
                    "{reader} {part}/{name}: values differ"
                );
            }
            if reader == "zarr_python" {
                for (name, pick) in [
                    (
                        "key",
                        (|e: &common::Expected| e.key.clone()) as fn(&common::Expected) -> String,
                    ),
                    ("caption", |e| e.caption.clone()),
                    ("caption_raw", |e| e.caption_raw.clone()),
                ] {
                    let strings: Vec<String> = samples.iter().map(pick).collect();
                    assert_eq!(arrays[name], serde_json::json!(strings), "{part}/{name}");
                }
                assert_eq!(arrays.len(), want.len() + 3);
            } else {
                assert_eq!(
                    arrays.len(),
                    want.len(),
                    "tensorstore reads the numeric arrays"
                );
            }
        }
    }
}
