//! The store benchmark: write MB/s and random single-sample reads per second for
//! latent-, SigLIP- and T5-sized samples, with zarr-python and tensorstore reading the
//! same store in the same run (through the Python scripts in `store/python/`).
//!
//! Run it with `cargo bench -p tensorbake-store --bench store` (or wire
//! [`run_bench`] into a `bench` subcommand). The table it prints is in `docs/store.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;
use tensorbake_kit::schema::Array;

use crate::layout::StoreOptions;
use crate::location::Location;
use crate::reader::StoreReader;
use crate::spec::{DType, FeatureSpec, StoreSpec};
use crate::writer::{FeatureValue, Record, Store};
use crate::{Result, StoreError};

const PY_BF16: &str = include_str!("../python/tensorbake_zarr.py");
const PY_BENCH: &str = include_str!("../python/store_bench.py");

/// One sample size to measure.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Row label (`latent`, `siglip`, `t5`).
    pub name: String,
    /// Features written per sample (name, dtype, shape); reads fetch all of them.
    pub features: Vec<(String, DType, Vec<u64>)>,
    /// Samples written.
    pub samples: u64,
}

/// The design's three sizes, scaled to a few hundred MB in total: SD latent moments at
/// 512 px (2 x 4x64x64 f32, 128 KiB) x 512, SigLIP so400m (729x1152 bf16, 1.6 MiB) x 64,
/// T5-XXL at 120 tokens (120x4096 bf16, 0.94 MiB) x 96.
#[must_use]
pub fn default_profiles() -> Vec<Profile> {
    vec![
        Profile {
            name: "latent".into(),
            features: vec![
                (Array::SdVaeMean.name().into(), DType::F32, vec![4, 64, 64]),
                (Array::SdVaeStd.name().into(), DType::F32, vec![4, 64, 64]),
            ],
            samples: 512,
        },
        Profile {
            name: "siglip".into(),
            features: vec![(
                Array::SiglipHidden.name().into(),
                DType::Bf16,
                vec![729, 1152],
            )],
            samples: 64,
        },
        Profile {
            name: "t5".into(),
            features: vec![(Array::T5Hidden.name().into(), DType::Bf16, vec![120, 4096])],
            samples: 96,
        },
    ]
}

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Scratch directory (each profile's store is written there and deleted after).
    pub dir: PathBuf,
    /// Python with zarr / tensorstore / ml_dtypes; `None` measures tensorbake only.
    pub python: Option<PathBuf>,
    /// Random single-sample reads per reader.
    pub reads: usize,
    /// Sizes to measure.
    pub profiles: Vec<Profile>,
}

/// One row of the result table.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// Profile name.
    pub profile: String,
    /// Uncompressed bytes per sample (all features).
    pub sample_bytes: u64,
    /// Samples written.
    pub samples: u64,
    /// Write throughput, uncompressed feature MB (10^6 bytes) per second, commit included.
    pub write_mb_s: f64,
    /// Compression ratio of the feature arrays (uncompressed / stored).
    pub compression_ratio: f64,
    /// tensorbake random single-sample reads per second.
    pub tensorbake_reads_s: f64,
    /// zarr-python reads per second, same samples (if Python ran).
    pub zarr_python_reads_s: Option<f64>,
    /// tensorstore reads per second, same samples (if Python ran).
    pub tensorstore_reads_s: Option<f64>,
}

/// All rows, with a note on the Python peers.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// One row per profile.
    pub rows: Vec<BenchRow>,
    /// Why the Python columns are empty, if they are.
    pub python_note: Option<String>,
}

impl BenchReport {
    /// A Markdown table with read-rate ratios tensorbake / peer.
    #[must_use]
    pub fn table(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
        let r = |a: f64, b: Option<f64>| {
            b.map_or_else(|| "-".to_string(), |b| format!("{:.2}x", a / b))
        };
        let mut s = String::from(
            "| sample | bytes/sample | samples | write MB/s | zstd ratio | tensorbake reads/s | zarr-python reads/s | tensorstore reads/s | vs zarr-python | vs tensorstore |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        for row in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {:.0} | {:.3} | {:.0} | {} | {} | {} | {} |\n",
                row.profile,
                row.sample_bytes,
                row.samples,
                row.write_mb_s,
                row.compression_ratio,
                row.tensorbake_reads_s,
                f(row.zarr_python_reads_s),
                f(row.tensorstore_reads_s),
                r(row.tensorbake_reads_s, row.zarr_python_reads_s),
                r(row.tensorbake_reads_s, row.tensorstore_reads_s),
            ));
        }
        if let Some(note) = &self.python_note {
            s.push_str(&format!("\n({note})\n"));
        }
        s
    }
}

/// Appends `n` seeded values of `dtype` (little-endian) with the spread of real
/// embeddings, approximately N(0, 1), to `buf`; `state` is the xorshift state (not 0).
pub fn fill(buf: &mut Vec<u8>, dtype: DType, n: usize, state: &mut u64) {
    let mut next = || {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    };
    for _ in 0..n {
        let r = next();
        // Sum of four 16-bit uniforms: bell-shaped, mean 0, variance ~1.
        let v = ((r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48)) as f32
            / 65536.0
            - 2.0;
        let v = v * 1.73;
        match dtype {
            DType::Bf16 => buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            DType::F16 => buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            DType::F32 => buf.extend_from_slice(&v.to_le_bytes()),
            DType::U16 | DType::U32 => {
                buf.extend_from_slice(&((r >> 40) as u32).to_le_bytes()[..dtype.size()])
            }
        }
    }
}

fn python_peers(
    python: &Path,
    dir: &Path,
    store: &Path,
    arrays: &[String],
    reads: &[(String, u64)],
) -> Result<(f64, f64)> {
    let bench_err = |m: String| StoreError::Bench(m);
    std::fs::write(dir.join("tensorbake_zarr.py"), PY_BF16)
        .map_err(|e| bench_err(e.to_string()))?;
    std::fs::write(dir.join("store_bench.py"), PY_BENCH).map_err(|e| bench_err(e.to_string()))?;
    let request = serde_json::json!({"arrays": arrays, "reads": reads});
    let req_path = dir.join("request.json");
    std::fs::write(&req_path, request.to_string()).map_err(|e| bench_err(e.to_string()))?;
    let out = std::process::Command::new(python)
        .arg(dir.join("store_bench.py"))
        .arg(store)
        .arg(&req_path)
        .output()
        .map_err(|e| bench_err(format!("cannot run {}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(bench_err(format!(
            "{} store_bench.py failed: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| bench_err(format!("store_bench.py output: {e}")))?;
    Ok((
        v["zarr_python"].as_f64().unwrap_or(0.0),
        v["tensorstore"].as_f64().unwrap_or(0.0),
    ))
}

/// Writes each profile's store, measures, runs the Python peers, deletes the store.
///
/// # Errors
/// Store errors; Python failures are errors too (a missing Python is not: `python: None`).
pub fn run_bench(config: &BenchConfig) -> Result<BenchReport> {
    let mut rows = Vec::new();
    let python_note = config
        .python
        .is_none()
        .then(|| "no Python given: zarr-python and tensorstore not measured".to_string());
    for profile in &config.profiles {
        let path = config.dir.join(format!("bench-{}.zarr", profile.name));
        let _ = std::fs::remove_dir_all(&path);
        let location = Location::Local(path.clone());
        let features: BTreeMap<String, FeatureSpec> = profile
            .features
            .iter()
            .map(|(n, dt, shape)| {
                (
                    n.clone(),
                    FeatureSpec {
                        model: format!("bench/{n}"),
                        weights_sha256: "0".repeat(64),
                        preprocess: serde_json::Value::Null,
                        dtype: *dt,
                        shape: shape.clone(),
                    },
                )
            })
            .collect();
        let sample_bytes: u64 = features.values().map(FeatureSpec::sample_bytes).sum();
        let store = Store::create_or_open_with(
            &location,
            StoreSpec::new(features.clone()),
            StoreOptions::default(),
        )?;
        // Generate first (not timed), then push and commit (timed).
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ profile.samples;
        let records: Vec<Record> = (0..profile.samples)
            .map(|i| {
                let feats = features
                    .iter()
                    .map(|(n, f)| {
                        let mut buf =
                            Vec::with_capacity(usize::try_from(f.sample_bytes()).unwrap_or(0));
                        fill(
                            &mut buf,
                            f.dtype,
                            usize::try_from(f.elements()).unwrap_or(0),
                            &mut state,
                        );
                        (n.clone(), FeatureValue::Bytes(buf))
                    })
                    .collect();
                Record {
                    key: format!("{:08}", i),
                    caption: format!("caption {i}"),
                    caption_raw: format!("Caption {i}."),
                    orig_size: [640, 480],
                    features: feats,
                }
            })
            .collect();
        let start = Instant::now();
        let mut writer = store.part_writer("bench-part", "bench://generated")?;
        for r in records {
            writer.push(r)?;
        }
        writer.commit()?;
        let write_s = start.elapsed().as_secs_f64();
        let write_mb_s = (sample_bytes * profile.samples) as f64 / 1e6 / write_s;

        let info = crate::reader::inspect(&location)?;
        let (raw, stored) = info
            .arrays
            .iter()
            .filter(|a| features.contains_key(&a.name))
            .fold((0u64, 0u64), |(r, s), a| {
                (
                    r + a.raw_bytes_per_sample.unwrap_or(0) * profile.samples,
                    s + a.stored_bytes,
                )
            });

        let reader = StoreReader::open(&location)?;
        let names: Vec<String> = features.keys().cloned().collect();
        let mut state = 12345u64;
        let indices: Vec<u64> = (0..config.reads)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % profile.samples
            })
            .collect();
        for n in &names {
            reader.read_tensor(indices[0], n, &Device::Cpu)?;
        }
        let start = Instant::now();
        for &i in &indices {
            for n in &names {
                std::hint::black_box(reader.read_tensor(i, n, &Device::Cpu)?);
            }
        }
        let tensorbake_reads_s = indices.len() as f64 / start.elapsed().as_secs_f64();
        let (zp, tsr) = match &config.python {
            Some(py) => {
                let reads: Vec<(String, u64)> = indices
                    .iter()
                    .map(|&i| ("bench-part".to_string(), i))
                    .collect();
                let (a, b) = python_peers(py, &config.dir, &path, &names, &reads)?;
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        tracing::info!(profile = %profile.name, write_mb_s, tensorbake_reads_s, "bench row");
        rows.push(BenchRow {
            profile: profile.name.clone(),
            sample_bytes,
            samples: profile.samples,
            write_mb_s,
            compression_ratio: if stored == 0 {
                0.0
            } else {
                raw as f64 / stored as f64
            },
            tensorbake_reads_s,
            zarr_python_reads_s: zp,
            tensorstore_reads_s: tsr,
        });
        drop(reader);
        let _ = std::fs::remove_dir_all(&path);
    }
    Ok(BenchReport { rows, python_note })
}
