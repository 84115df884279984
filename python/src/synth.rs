//! Seeded synthetic stores written by tensorbake-store's own writer: the benchmark's
//! production-sized stores and the tests' every-dtype stores (`tensorbake._testing`).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use tensorbake_store::{
    DType, FeatureSpec, FeatureValue, Location, Record, Store, StoreError, StoreOptions, StoreSpec,
};

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn new(a: u64, b: u64, c: u64) -> Self {
        Self(a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Roughly N(0, 1) (Irwin-Hall of four uniforms), full mantissa: compresses like
    /// real embeddings (barely).
    fn normal(&mut self) -> f32 {
        let v = self.next();
        let u = |s: u32| ((v >> s) & 0xFFFF) as f32 / 65536.0;
        (u(0) + u(16) + u(32) + u(48) - 2.0) * 1.73
    }
}

/// Little-endian bytes of one sample of `f`, seeded.
fn values(f: &FeatureSpec, rng: &mut Rng) -> Vec<u8> {
    let n = usize::try_from(f.elements()).unwrap_or(0);
    let mut out = Vec::with_capacity(n * f.dtype.size());
    for _ in 0..n {
        match f.dtype {
            DType::Bf16 => out.extend(half::bf16::from_f32(rng.normal()).to_le_bytes()),
            DType::F16 => out.extend(half::f16::from_f32(rng.normal()).to_le_bytes()),
            DType::F32 => out.extend(rng.normal().to_le_bytes()),
            DType::U16 => out.extend(((rng.next() >> 48) as u16).to_le_bytes()),
            DType::U32 => out.extend(((rng.next() >> 33) as u32 % 100_000).to_le_bytes()),
        }
    }
    out
}

fn caption(part: &str, i: u64) -> String {
    match i % 5 {
        0 => String::new(),
        1 => format!("ein Fahrrad, grün — 自転車 {i} 🚲"),
        2 => "a very long caption ".repeat(20),
        _ => format!("caption {part}/{i}"),
    }
}

/// Writes `parts` (name, samples) into a store of `spec` at `location`, seeded by
/// `seed`; records null embeddings for `null_arrays`; leaves `uncommitted` parts
/// half-written (no commit marker).
pub(crate) fn write(
    location: &str,
    spec: StoreSpec,
    parts: &[(String, u64)],
    uncommitted: &[(String, u64)],
    null_arrays: &[String],
    seed: u64,
    shard_bytes: Option<u64>,
) -> Result<(), StoreError> {
    let loc: Location = location.parse()?;
    let mut options = StoreOptions::default();
    if let Some(b) = shard_bytes {
        options.shard_bytes = b;
    }
    let store = Store::create_or_open_with(&loc, spec.clone(), options)?;
    let all = parts
        .iter()
        .map(|p| (p, true))
        .chain(uncommitted.iter().map(|p| (p, false)));
    for (p_index, ((name, samples), commit)) in all.enumerate() {
        let mut w = store.part_writer(name, &format!("synthetic://{name}.tar"))?;
        for i in 0..*samples {
            let mut features = BTreeMap::new();
            for (f_index, (fname, f)) in spec.features.iter().enumerate() {
                let mut rng = Rng::new(seed, (p_index as u64) << 32 | i, f_index as u64 + 1);
                features.insert(fname.clone(), FeatureValue::Bytes(values(f, &mut rng)));
            }
            let c = caption(name, i);
            let mut rng = Rng::new(seed, (p_index as u64) << 32 | i, 0);
            w.push(Record {
                key: format!("{name}_{i:05}"),
                caption_raw: format!("  RAW: {c} "),
                caption: c,
                orig_size: [
                    (rng.next() % 5000) as u32 + 1,
                    (rng.next() % 5000) as u32 + 1,
                ],
                features,
            })?;
        }
        if commit {
            w.commit()?;
        }
    }
    if !null_arrays.is_empty() {
        let mut tensors = BTreeMap::new();
        for name in null_arrays {
            let f = spec
                .features
                .get(name)
                .ok_or_else(|| StoreError::NullEmbedding {
                    location: location.to_string(),
                    array: name.clone(),
                    reason: "not a feature of the spec".into(),
                })?;
            let mut rng = Rng::new(seed, u64::MAX, 7);
            let bytes = values(f, &mut rng);
            let shape: Vec<usize> = f.shape.iter().map(|&d| d as usize).collect();
            let cerr = |source| StoreError::Candle {
                name: name.clone(),
                source,
            };
            let t = match f.dtype {
                DType::U16 => {
                    let v: Vec<u32> = bytes
                        .chunks_exact(2)
                        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                        .collect();
                    Tensor::from_vec(v, shape, &Device::Cpu).map_err(cerr)?
                }
                d => Tensor::from_raw_buffer(&bytes, d.candle(), &shape, &Device::Cpu)
                    .map_err(cerr)?,
            };
            tensors.insert(name.clone(), t);
        }
        store.record_null_embedding(&tensors)?;
    }
    Ok(())
}
