//! `tensorbake inspect` end to end on stores written with tensorbake-store.

use std::collections::BTreeMap;
use std::path::Path;

use tensorbake_store::{
    DType, FeatureSpec, FeatureValue, Location, Record, Store, StoreOptions, StoreSpec,
};

use crate::util::{tempdir, tensorbake};

fn spec() -> StoreSpec {
    let mut features = BTreeMap::new();
    features.insert(
        "siglip_hidden".to_string(),
        FeatureSpec {
            model: "google/siglip-so400m-patch14-384".into(),
            weights_sha256: "5e".repeat(32),
            preprocess: serde_json::json!({"resize": 384, "mean": 0.5, "std": 0.5}),
            dtype: DType::Bf16,
            shape: vec![9, 16],
        },
    );
    features.insert(
        "sd_vae_mean".to_string(),
        FeatureSpec {
            model: "stabilityai/sd-vae-ft-ema".into(),
            weights_sha256: "7a".repeat(32),
            preprocess: serde_json::json!({"resolution": 64}),
            dtype: DType::F32,
            shape: vec![4, 8, 8],
        },
    );
    let mut s = StoreSpec::new(features);
    s.resolution = Some(64);
    s
}

/// bfloat16 of `v` (exact for the quarter-steps used here: the high half of the f32).
fn bf16_bits(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

/// Parts `a` (n_a samples) and `b` (n_b), plus an uncommitted `c`. Values: a smooth,
/// seeded ramp (compressible, like real latents).
fn write_store(path: &Path, parts: &[(&str, u64)], uncommitted: bool) {
    let loc = Location::Local(path.to_path_buf());
    let store = Store::create_or_open_with(
        &loc,
        spec(),
        StoreOptions {
            shard_bytes: 4096,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let sample = |part: &str, i: u64| {
        let mut features = BTreeMap::new();
        let bf: Vec<u8> = (0..9 * 16)
            .flat_map(|j| bf16_bits(((i * 7 + j) % 13) as f32 / 4.0).to_le_bytes())
            .collect();
        let lat: Vec<u8> = (0..4 * 8 * 8)
            .flat_map(|j| (((i + j) % 5) as f32 * 0.5).to_le_bytes())
            .collect();
        features.insert("siglip_hidden".to_string(), FeatureValue::Bytes(bf));
        features.insert("sd_vae_mean".to_string(), FeatureValue::Bytes(lat));
        Record {
            key: format!("{part}-{i:04}"),
            caption: format!("a photo number {i}"),
            caption_raw: format!("A photo number {i}."),
            orig_size: [1500, 1000 + i as u32],
            features,
        }
    };
    for (part, n) in parts {
        let mut w = store
            .part_writer(part, &format!("https://example.com/{part}.tar"))
            .unwrap();
        for i in 0..*n {
            w.push(sample(part, i)).unwrap();
        }
        w.commit().unwrap();
    }
    if uncommitted {
        let mut w = store.part_writer("c", "https://example.com/c.tar").unwrap();
        for i in 0..40 {
            w.push(sample("c", i)).unwrap();
        }
    }
}

#[test]
fn inspect_json_counts_committed_samples_and_describes_arrays() {
    let dir = tempdir();
    let store = dir.path().join("s.zarr");
    write_store(&store, &[("a", 30), ("b", 12)], true);
    let out = tensorbake(dir.path(), &["inspect", store.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["samples"], 42);
    assert_eq!(v["parts"], 2);
    assert_eq!(v["uncommitted_parts"], serde_json::json!(["c"]));
    assert_eq!(
        v["spec"]["features"]["siglip_hidden"]["weights_sha256"],
        "5e".repeat(32)
    );
    let arrays: BTreeMap<String, serde_json::Value> = v["arrays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap().to_string(), a.clone()))
        .collect();
    assert_eq!(
        arrays.keys().collect::<Vec<_>>(),
        [
            "caption",
            "caption_raw",
            "key",
            "orig_size",
            "sd_vae_mean",
            "siglip_hidden"
        ]
    );
    let sig = &arrays["siglip_hidden"];
    assert_eq!(sig["dtype"], "bfloat16");
    assert_eq!(sig["shape"], serde_json::json!([9, 16]));
    assert_eq!(sig["raw_bytes_per_sample"], 9 * 16 * 2);
    // Stored bytes are the files on disk (committed parts only).
    let on_disk: u64 = ["a", "b"]
        .iter()
        .map(|p| dir_size(&store.join("parts").join(p).join("siglip_hidden")))
        .sum();
    assert_eq!(sig["stored_bytes"], on_disk);
    let ratio = sig["compression_ratio"].as_f64().unwrap();
    assert!((ratio - (42.0 * 288.0 / on_disk as f64)).abs() < 1e-9);
    assert!(ratio > 1.0, "a repetitive ramp must compress: {ratio}");
    assert_eq!(
        arrays["caption"]["compression_ratio"],
        serde_json::Value::Null
    );
    assert!(v.get("verify").is_none());

    // The table names the same things.
    let out = tensorbake(dir.path(), &["inspect", store.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("samples      42"), "{text}");
    assert!(text.contains("2 committed, 1 uncommitted"), "{text}");
    assert!(
        text.contains("siglip_hidden") && text.contains("google/siglip-so400m-patch14-384"),
        "{text}"
    );
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dir_size(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

#[test]
fn inspect_verify_reports_a_truncated_shard() {
    let dir = tempdir();
    let store = dir.path().join("s.zarr");
    write_store(&store, &[("a", 30), ("b", 12)], false);
    let ok = tensorbake(
        dir.path(),
        &["inspect", store.to_str().unwrap(), "--json", "--verify"],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["verify"]["ok"], true);
    assert_eq!(v["verify"]["parts_checked"], 2);
    assert_eq!(v["verify"]["damaged"], serde_json::json!([]));

    // Shard 1 of part b's latents loses its tail.
    let shard = store.join("parts/b/sd_vae_mean/c/1/0/0/0");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();

    let bad = tensorbake(
        dir.path(),
        &["inspect", store.to_str().unwrap(), "--json", "--verify"],
    );
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(v["verify"]["ok"], false);
    let damaged = v["verify"]["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1);
    assert_eq!(damaged[0]["part"], "b");
    assert_eq!(damaged[0]["source"], "https://example.com/b.tar");
    let problems = damaged[0]["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0]
            .as_str()
            .unwrap()
            .contains("parts/b/sd_vae_mean/c/1/0/0/0")
    );
    // Without --verify the damage is not looked for, and the summary still works.
    assert!(
        tensorbake(dir.path(), &["inspect", store.to_str().unwrap()])
            .status
            .success()
    );
    // The table shows the damaged part too.
    let text = tensorbake(
        dir.path(),
        &["inspect", store.to_str().unwrap(), "--verify"],
    );
    assert_eq!(text.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&text.stdout).contains("damaged part b"));
}

#[test]
fn inspect_of_something_else_fails_with_a_clear_error() {
    let dir = tempdir();
    let out = tensorbake(
        dir.path(),
        &["inspect", dir.path().join("nothing").to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no tensorbake store") && err.contains("nothing"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("zarr.json"),
        r#"{"zarr_format":3,"node_type":"group","attributes":{}}"#,
    )
    .unwrap();
    let out = tensorbake(dir.path(), &["inspect", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("attributes.tensorbake"));
}
