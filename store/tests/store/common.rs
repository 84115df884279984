//! Seeded fixtures shared by the tests.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tensorbake_store::{DType, FeatureSpec, FeatureValue, Record, StoreOptions, StoreSpec};

/// A spec with one feature of every dtype, a scalar-per-sample feature included.
pub fn spec() -> StoreSpec {
    let f = |dtype, shape: &[u64]| FeatureSpec {
        model: format!("test/{dtype}"),
        weights_sha256: "ab".repeat(32),
        preprocess: serde_json::json!({"size": 8, "mean": [0.5, 0.5, 0.5]}),
        dtype,
        shape: shape.to_vec(),
    };
    let mut features = BTreeMap::new();
    features.insert("emb_bf16".to_string(), f(DType::Bf16, &[5, 7]));
    features.insert("lat_f16".to_string(), f(DType::F16, &[2, 3, 3]));
    features.insert("lat_f32".to_string(), f(DType::F32, &[2, 3, 3]));
    features.insert("ids_u16".to_string(), f(DType::U16, &[6]));
    features.insert("len_u32".to_string(), f(DType::U32, &[]));
    let mut spec = StoreSpec::new(features);
    spec.captions = serde_json::json!({"clean": true, "strip_boilerplate": false});
    spec.resolution = Some(8);
    spec
}

/// Small shards so that a part of ~20 samples spans several shards, the last partial:
/// emb_bf16 / lat_f32 8 per shard, lat_f16 16, strings 4, ids 64, len 256.
pub fn options() -> StoreOptions {
    StoreOptions {
        shard_bytes: 1024,
        ..StoreOptions::default()
    }
}

/// xorshift64*, seeded per (part, sample).
pub struct Rng(u64);

impl Rng {
    pub fn new(a: u64, b: u64) -> Self {
        Self((a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A float in [-4, 4) with few mantissa bits (exact in bf16 and f16).
    pub fn small_float(&mut self) -> f32 {
        ((self.next() >> 40) % 256) as f32 / 32.0 - 4.0
    }
}

/// Expected contents of one sample: built-ins plus little-endian bytes per feature.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub key: String,
    pub caption: String,
    pub caption_raw: String,
    pub orig_size: [u32; 2],
    pub features: BTreeMap<String, Vec<u8>>,
}

/// Sample `i` of part `part_seed`: values from the seed; features given as raw bytes.
pub fn expected(part_seed: u64, i: u64) -> Expected {
    let mut rng = Rng::new(part_seed, i);
    let mut features = BTreeMap::new();
    let floats = |rng: &mut Rng, n: usize| (0..n).map(|_| rng.small_float()).collect::<Vec<f32>>();
    features.insert(
        "emb_bf16".into(),
        floats(&mut rng, 35)
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    );
    features.insert(
        "lat_f16".into(),
        floats(&mut rng, 18)
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
    );
    features.insert(
        "lat_f32".into(),
        floats(&mut rng, 18)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    );
    features.insert(
        "ids_u16".into(),
        (0..6)
            .flat_map(|_| ((rng.next() >> 48) as u16).to_le_bytes())
            .collect(),
    );
    features.insert(
        "len_u32".into(),
        ((rng.next() >> 33) as u32).to_le_bytes().to_vec(),
    );
    // Every few samples: empty caption, non-ASCII text, long caption.
    let caption = match i % 5 {
        0 => String::new(),
        1 => format!("ein Fahrrad, grün — 自転車 {i} 🚲"),
        2 => "a very long caption ".repeat(40),
        _ => format!("caption {part_seed}/{i}"),
    };
    Expected {
        key: format!("p{part_seed}_{i:05}"),
        caption_raw: format!("  RAW: {caption}  "),
        caption,
        orig_size: [
            (rng.next() % 5000) as u32 + 1,
            (rng.next() % 5000) as u32 + 1,
        ],
        features,
    }
}

/// The record of [`expected`] with every feature as raw bytes.
pub fn record(e: &Expected) -> Record {
    Record {
        key: e.key.clone(),
        caption: e.caption.clone(),
        caption_raw: e.caption_raw.clone(),
        orig_size: e.orig_size,
        features: e
            .features
            .iter()
            .map(|(k, v)| (k.clone(), FeatureValue::Bytes(v.clone())))
            .collect(),
    }
}

/// Little-endian bytes of a tensor read back (u16 features come back as U32).
pub fn tensor_bytes(name: &str, t: &candle_core::Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        candle_core::DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        candle_core::DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        candle_core::DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        candle_core::DType::U32 if name == "ids_u16" => t
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .flat_map(|v| u16::try_from(*v).unwrap().to_le_bytes())
            .collect(),
        candle_core::DType::U32 => t
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => panic!("unexpected dtype {other:?} for {name}"),
    }
}

/// The Python with zarr / tensorstore / moto (`TENSORBAKE_PYTHON`), or `None` after a
/// skip message; with `TENSORBAKE_REQUIRE_PYTHON=1` a missing Python fails the test.
pub fn python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("TENSORBAKE_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            assert!(
                std::env::var("TENSORBAKE_REQUIRE_PYTHON").as_deref() != Ok("1"),
                "{test}: TENSORBAKE_PYTHON is not set but TENSORBAKE_REQUIRE_PYTHON=1"
            );
            eprintln!("SKIP {test}: TENSORBAKE_PYTHON is not set (scripts/test.sh sets it)");
            None
        }
    }
}

/// `store/python/` (the interop scripts).
pub fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}
