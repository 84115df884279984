//! The empty caption's embedding, from the text encoder into the store and back: what
//! Flux reconditioning and conditioning dropout read (docs/store.md, `null/`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use tensorbake_encode::{EncoderConfig, build_encoder, null_embedding};
use tensorbake_store::{DType as StoreDType, FeatureSpec, Location, Store, StoreReader, StoreSpec};

use crate::util::{tempdir, tensorbake};

#[test]
fn t5_null_embedding_is_recorded_by_the_store_and_read_back() {
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("encode/tests/fixtures/text");
    let cfg = EncoderConfig {
        name: "t5".into(),
        weights: text.join("t5").to_string_lossy().into_owned(),
        dtype: Default::default(),
        batch: 4,
        device: "cpu".into(),
        max_length: Some(32),
        store_dtype: None,
    };
    let enc = build_encoder(&cfg, 0).unwrap();
    let info = enc.info();
    // the spec a `run` would write: t5_hidden in bf16, t5_len as u32
    let features: BTreeMap<String, FeatureSpec> = info
        .arrays
        .iter()
        .map(|a| {
            let dtype = if a.array == "t5_len" {
                StoreDType::U32
            } else {
                StoreDType::Bf16
            };
            let spec = FeatureSpec {
                model: info.model.clone(),
                weights_sha256: info.weights_sha256.clone(),
                preprocess: info.preprocess.clone(),
                dtype,
                shape: a.shape.iter().map(|&d| d as u64).collect(),
            };
            (a.array.name().to_string(), spec)
        })
        .collect();
    let dir = tempdir();
    let loc = Location::from(dir.path().join("store"));
    let store = Store::create_or_open(&loc, StoreSpec::new(features)).unwrap();
    let null: BTreeMap<String, candle_core::Tensor> = null_embedding(enc.as_ref(), 0)
        .unwrap()
        .into_iter()
        .map(|(a, t)| (a.name().to_string(), t))
        .collect();
    assert_eq!(null["t5_hidden"].dims(), &[32, 48]);
    store.record_null_embedding(&null).unwrap();

    let reader = StoreReader::open(&loc).unwrap();
    let hidden = reader
        .null_embedding("t5_hidden", &Device::Cpu)
        .unwrap()
        .expect("recorded");
    assert_eq!(hidden.dtype(), DType::BF16);
    let want = null["t5_hidden"].to_dtype(DType::BF16).unwrap();
    let same = hidden
        .eq(&want)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .min_all()
        .unwrap();
    assert_eq!(
        same.to_scalar::<f32>().unwrap(),
        1.0,
        "bf16 bytes differ from the encoder's"
    );
    // and the encoder's "" matches transformers' (golden `t5_null`, f32) up to bf16 rounding
    let g = candle_core::safetensors::load(text.join("golden.safetensors"), &Device::Cpu).unwrap();
    let golden = &g["t5_null"];
    let diff = (hidden
        .to_dtype(DType::F32)
        .unwrap()
        .narrow(0, 0, 1)
        .unwrap()
        - golden.narrow(0, 0, 1).unwrap())
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    let scale = golden
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff <= scale * 1e-2,
        "first row differs by {diff} (scale {scale})"
    );
    let len = reader
        .null_embedding("t5_len", &Device::Cpu)
        .unwrap()
        .expect("recorded");
    assert_eq!(
        len.to_dtype(DType::U32)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap(),
        1,
        "`</s>` only"
    );

    // inspect lists it
    let out = tensorbake(dir.path(), &["inspect", "store", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["null_embeddings"],
        serde_json::json!(["t5_hidden", "t5_len"])
    );
}
