//! The write stage alone at production sizes (`tensorbake bench write`): can the part
//! writers keep up with the GPU?
//!
//! At the design's target of 170 images/s, `sd_vae` + `siglip` + `t5` at 512 px and
//! 120 tokens give the store 2.79 MB of feature bytes per image, ~475 MB/s, to zstd,
//! checksum and fsync. This bench feeds `tensorbake run`'s own write stage (the same
//! [`WriteStage`] threads, queues, part writers and commits) with batches of those
//! arrays, made up front so that nothing but writing is timed, and measures the
//! wall-clock rate and the CPU time it takes (all threads of the process: the writer
//! threads and the rayon pool that encodes a shard's inner chunks). MB per CPU-second
//! says how many of a GPU node's cores the writers need; it does not depend on how
//! many cores this machine has.
//!
//! Beside it, in the same run, tensorstore (`scripts/bench/store_write.py`) writes the
//! same bytes into the same layout (shards, one zstd + crc32c inner chunk per sample,
//! fsync) with its own thread pools.
//!
//! With a CUDA device the batches sit on the GPU, as the encoders leave them, and the
//! writers copy them back as in a run (the report's device-to-host bytes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use crossbeam_channel::bounded;
use serde::Serialize;
use tensorbake_ingest::pipeline::ShardEnd;
use tensorbake_ingest::shards::Shard;
use tensorbake_kit::measure::median;
use tensorbake_kit::schema::Array;
use tensorbake_store::writer::SampleMeta;
use tensorbake_store::{DType, FeatureSpec, Location, Store, StoreOptions, StoreSpec};

use crate::encode_stage::ToWrite;
use crate::stats::RunStats;
use crate::write_stage::{PartOutcome, WriteStage};

/// The peer's script, written next to its request.
pub const TENSORSTORE_SCRIPT: &str = include_str!("../../scripts/bench/store_write.py");

/// Distinct batches made per array: batch `k` of every part is pool batch `k % POOL`.
const POOL: usize = 2;

/// Images per second the design asks of the whole pipeline on one H200.
pub const TARGET_IMAGES_S: f64 = 170.0;

/// What to write.
#[derive(Debug, Clone)]
pub struct WriteBenchConfig {
    /// Scratch directory: the store, the peer's store and the peer's input bytes.
    pub dir: PathBuf,
    /// Part writer threads (the run's `writers`).
    pub writers: usize,
    /// Parts (source shards) written.
    pub parts: usize,
    /// Samples per part.
    pub samples_per_part: usize,
    /// Samples per batch (the run's encoder batch).
    pub batch: usize,
    /// Batches that may wait per writer (the run's `write_queue / writers`).
    pub queue_per_writer: usize,
    /// zstd level of the inner chunks.
    pub zstd_level: i32,
    /// Where the batches sit when handed to the writers.
    pub device: Device,
    /// Timed rounds of each writer (the table shows medians).
    pub rounds: usize,
    /// Python with tensorstore, numpy and ml_dtypes; `None` measures tensorbake only.
    pub python: Option<PathBuf>,
}

/// The arrays `sd_vae` + `siglip` (so400m, 384 px) + `t5` (XXL, 120 tokens) give one
/// 512 px image, in the run's default store dtypes: array, dtype, per-sample shape.
#[must_use]
pub fn production_arrays() -> Vec<(Array, DType, Vec<u64>)> {
    let of =
        |a: Array, shape: Vec<u64>| (a, a.store_dtype(a.feature().default_store_dtype()), shape);
    vec![
        of(Array::SdVaeMean, vec![4, 64, 64]),
        of(Array::SdVaeStd, vec![4, 64, 64]),
        of(Array::SiglipHidden, vec![729, 1152]),
        of(Array::T5Hidden, vec![120, 4096]),
        of(Array::T5Len, vec![]),
    ]
}

/// One writer's figures.
#[derive(Debug, Clone, Serialize)]
pub struct WriterRow {
    /// `tensorbake` or `tensorstore`.
    pub writer: String,
    /// Feature bytes written (uncompressed), all parts.
    pub bytes: u64,
    /// Wall-clock seconds from the first batch sent to the last part committed.
    pub seconds: f64,
    /// CPU seconds of the process over the same span (user + system, all threads).
    pub cpu_seconds: f64,
    /// Feature MB (10^6 bytes) per second, wall clock.
    pub mb_s: f64,
    /// Feature MB per CPU-second.
    pub mb_per_cpu_s: f64,
    /// Samples (images) per second, wall clock.
    pub samples_s: f64,
}

/// The bench's result.
#[derive(Debug, Clone, Serialize)]
pub struct WriteBenchReport {
    /// Feature bytes per sample.
    pub sample_bytes: u64,
    /// Samples written by each writer.
    pub samples: u64,
    /// Writer threads (tensorbake).
    pub writers: usize,
    /// Rounds of each writer; every figure is the median over them.
    pub rounds: usize,
    /// Cores of this machine.
    pub cores: usize,
    /// Where the batches were (`cpu`, `cuda:0`).
    pub device: String,
    /// The writers' busy time over their wall time, all threads together (0..1).
    pub writer_busy_fraction: f64,
    /// Feature bytes as written / as stored on disk (zstd's gain).
    pub compression_ratio: f64,
    /// Bytes copied from the device by the writers (the last round).
    pub device_to_host_bytes: u64,
    /// tensorbake, then the peer when it ran.
    pub rows: Vec<WriterRow>,
    /// Why the peer did not run, if it did not.
    pub peer_note: Option<String>,
}

impl WriteBenchReport {
    /// Feature MB/s the store must take at [`TARGET_IMAGES_S`].
    #[must_use]
    pub fn target_mb_s(&self) -> f64 {
        TARGET_IMAGES_S * self.sample_bytes as f64 / 1e6
    }

    /// A Markdown table; the last column is the cores the target rate takes.
    #[must_use]
    pub fn table(&self) -> String {
        let target = self.target_mb_s();
        let mut s = format!(
            "write stage: {} samples of {:.2} MB ({} writers, batches on {}, {} cores here, \
             median of {} rounds); {TARGET_IMAGES_S:.0} images/s = {target:.0} MB/s\n\n\
             | writer | MB | seconds | MB/s | images/s | CPU s | MB per CPU s | cores for {target:.0} MB/s |\n\
             |---|---|---|---|---|---|---|---|\n",
            self.samples,
            self.sample_bytes as f64 / 1e6,
            self.writers,
            self.device,
            self.cores,
            self.rounds,
        );
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {:.0} | {:.2} | {:.0} | {:.1} | {:.2} | {:.0} | {:.1} |\n",
                r.writer,
                r.bytes as f64 / 1e6,
                r.seconds,
                r.mb_s,
                r.samples_s,
                r.cpu_seconds,
                r.mb_per_cpu_s,
                target / r.mb_per_cpu_s,
            ));
        }
        if let [ours, peer] = self.rows.as_slice() {
            s.push_str(&format!(
                "\ntensorbake / tensorstore: {:.2}x MB/s, {:.2}x MB per CPU s\n",
                ours.mb_s / peer.mb_s,
                ours.mb_per_cpu_s / peer.mb_per_cpu_s
            ));
        }
        s.push_str(&format!(
            "writers busy {:.0}% of their time; zstd ratio {:.3}\n",
            100.0 * self.writer_busy_fraction,
            self.compression_ratio
        ));
        if self.device_to_host_bytes > 0 {
            s.push_str(&format!(
                "copied back from {}: {:.0} MB\n",
                self.device,
                self.device_to_host_bytes as f64 / 1e6
            ));
        }
        if let Some(note) = &self.peer_note {
            s.push_str(&format!("({note})\n"));
        }
        s
    }
}

/// CPU seconds (user + system) of this process so far, all threads: `/proc/self/stat`
/// fields 14 and 15, in the kernel's fixed 100 ticks per second.
fn process_cpu_seconds() -> Result<f64, String> {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| format!("reading /proc/self/stat for the CPU time: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("/proc/self/stat has no command field")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64, String> {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|t| t as f64 / 100.0)
            .ok_or_else(|| format!("/proc/self/stat field {} unreadable", i + 3))
    };
    // after ")" field 3 is at index 0: utime (14) at 11, stime (15) at 12
    Ok(ticks(11)? + ticks(12)?)
}

/// The pool: for each array, [`POOL`] batches of `batch` samples (batch-major bytes).
fn make_pool(arrays: &[(Array, DType, Vec<u64>)], batch: usize) -> Vec<Vec<Vec<u8>>> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    arrays
        .iter()
        .map(|(a, dtype, shape)| {
            let n = usize::try_from(shape.iter().product::<u64>()).unwrap_or(0) * batch;
            (0..POOL)
                .map(|_| {
                    let mut buf = Vec::with_capacity(n * dtype.size());
                    if *a == Array::T5Len {
                        // lengths as real captions have them: 1..=120 tokens
                        for i in 0..n {
                            let len = 1 + (i as u32).wrapping_mul(37) % 120;
                            buf.extend_from_slice(&len.to_le_bytes());
                        }
                    } else {
                        tensorbake_store::bench::fill(&mut buf, *dtype, n, &mut state);
                    }
                    buf
                })
                .collect()
        })
        .collect()
}

/// The pool as tensors on `device`, one feature map per pool batch.
fn pool_tensors(
    arrays: &[(Array, DType, Vec<u64>)],
    pool: &[Vec<Vec<u8>>],
    batch: usize,
    device: &Device,
) -> Result<Vec<BTreeMap<String, Tensor>>, String> {
    (0..POOL)
        .map(|k| {
            arrays
                .iter()
                .zip(pool)
                .map(|((a, dtype, shape), bufs)| {
                    let mut dims = vec![batch];
                    dims.extend(shape.iter().map(|&d| d as usize));
                    let t = Tensor::from_raw_buffer(&bufs[k], dtype.candle(), &dims, &Device::Cpu)
                        .and_then(|t| t.to_device(device))
                        .map_err(|e| format!("making the {} batch: {e}", a.name()))?;
                    Ok((a.name().to_string(), t))
                })
                .collect()
        })
        .collect()
}

fn feature_specs(arrays: &[(Array, DType, Vec<u64>)]) -> BTreeMap<String, FeatureSpec> {
    arrays
        .iter()
        .map(|(a, dtype, shape)| {
            (
                a.name().to_string(),
                FeatureSpec {
                    model: format!("bench/{}", a.feature().name()),
                    weights_sha256: "0".repeat(64),
                    preprocess: serde_json::Value::Null,
                    dtype: *dtype,
                    shape: shape.clone(),
                },
            )
        })
        .collect()
}

/// Sends every part's batches to the writers as the encode stage does (shard `s` to
/// writer `s % writers`, the shards of a wave interleaved batch by batch, each
/// shard's end after its last batch) and returns what the writers report.
fn feed(
    cfg: &WriteBenchConfig,
    stage: &WriteStage<'_>,
    shards: &[Shard],
    batches: &[BTreeMap<String, Tensor>],
) -> Vec<PartOutcome> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..cfg.writers)
        .map(|_| bounded::<ToWrite>(cfg.queue_per_writer.max(1)))
        .unzip();
    std::thread::scope(|scope| {
        let handles: Vec<_> = rxs
            .into_iter()
            .map(|rx| scope.spawn(move || stage.run(rx)))
            .collect();
        let per_part = cfg.samples_per_part.div_ceil(cfg.batch);
        'send: for wave in shards.chunks(cfg.writers) {
            for k in 0..per_part {
                let n = cfg.batch.min(cfg.samples_per_part - k * cfg.batch);
                for s in wave {
                    let features = batches[k % POOL]
                        .iter()
                        .map(|(name, t)| (name.clone(), t.narrow(0, 0, n).expect("rows")))
                        .collect();
                    let meta = (0..n)
                        .map(|i| {
                            stage.stats.sample_read();
                            let j = k * cfg.batch + i;
                            SampleMeta {
                                key: format!("{}/{j:06}", s.name),
                                caption: format!("a photo, sample {j}"),
                                caption_raw: format!("A photo, sample {j}."),
                                orig_size: [2250, 1500],
                            }
                        })
                        .collect();
                    let msg = ToWrite::Batch {
                        shard: s.index,
                        meta,
                        features,
                    };
                    if txs[s.index % cfg.writers].send(msg).is_err() {
                        break 'send;
                    }
                }
            }
            for s in wave {
                let end = ShardEnd {
                    shard: s.index,
                    kept: cfg.samples_per_part as u64,
                    skipped: 0,
                    bytes: 0,
                    retries: 0,
                    error: None,
                };
                let msg = ToWrite::End {
                    end,
                    encode_error: None,
                };
                if txs[s.index % cfg.writers].send(msg).is_err() {
                    break 'send;
                }
            }
        }
        drop(txs);
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("writer thread panicked"))
            .collect()
    })
}

/// What one round of tensorbake's write stage measured.
struct Round {
    seconds: f64,
    cpu_seconds: f64,
    /// The writers' busy time over their wall time.
    busy: f64,
    /// Feature bytes as written and as stored.
    raw: u64,
    stored: u64,
    device_to_host_bytes: u64,
}

/// One timed round of tensorbake's write stage into a fresh store.
fn tensorbake_round(
    cfg: &WriteBenchConfig,
    round: usize,
    features: &BTreeMap<String, FeatureSpec>,
    options: StoreOptions,
    batches: &[BTreeMap<String, Tensor>],
) -> Result<Round, String> {
    let store_dir = cfg.dir.join(format!("tensorbake-{round}.zarr"));
    let _ = std::fs::remove_dir_all(&store_dir);
    let location = Location::Local(store_dir.clone());
    let store = Store::create_or_open_with(&location, StoreSpec::new(features.clone()), options)
        .map_err(|e| format!("creating {}: {e}", store_dir.display()))?;
    let shards: Vec<Shard> = (0..cfg.parts)
        .map(|i| Shard {
            index: i,
            url: format!("bench://write/{i:04}.tar"),
            name: format!("{i:04}.tar"),
        })
        .collect();
    let parts: Vec<String> = (0..cfg.parts).map(|i| format!("part-{i:04}")).collect();
    let stats = RunStats::new(cfg.parts as u64, &[]);
    let stage = WriteStage::new(
        &store,
        shards.iter().zip(parts.iter().map(String::as_str)),
        &stats,
    );
    let cpu0 = process_cpu_seconds()?;
    let t0 = Instant::now();
    let outcomes = feed(cfg, &stage, &shards, batches);
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds()? - cpu0;
    for o in &outcomes {
        if let PartOutcome::Failed(f) = o {
            return Err(format!(
                "the part of {} was not committed ({}): {}",
                f.shard, f.reason, f.error
            ));
        }
    }
    let samples = (cfg.parts * cfg.samples_per_part) as u64;
    let info = tensorbake_store::inspect(&location)
        .map_err(|e| format!("inspecting {}: {e}", store_dir.display()))?;
    if info.samples != samples {
        return Err(format!(
            "{} holds {} samples, {samples} were written",
            store_dir.display(),
            info.samples
        ));
    }
    let (raw, stored) = info
        .arrays
        .iter()
        .filter(|a| features.contains_key(&a.name))
        .fold((0u64, 0u64), |(r, s), a| {
            (
                r + a.raw_bytes_per_sample.unwrap_or(0) * samples,
                s + a.stored_bytes,
            )
        });
    if round + 1 < cfg.rounds {
        let _ = std::fs::remove_dir_all(&store_dir);
    }
    Ok(Round {
        seconds,
        cpu_seconds,
        busy: stats.write_time(cfg.writers).busy_s / (seconds * cfg.writers as f64),
        raw,
        stored,
        device_to_host_bytes: stats
            .device_to_host_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Runs the bench: `rounds` rounds, each tensorbake's write stage then the peer on
/// the same bytes (alternating, so both see the same machine); medians reported.
///
/// # Errors
/// A sentence naming what failed: the store, a part that did not commit, the peer.
pub fn run_write_bench(cfg: &WriteBenchConfig) -> Result<WriteBenchReport, String> {
    if cfg.writers == 0
        || cfg.parts == 0
        || cfg.samples_per_part == 0
        || cfg.batch == 0
        || cfg.rounds == 0
    {
        return Err(
            "writers, parts, samples per part, batch and rounds must all be at least 1".into(),
        );
    }
    let arrays = production_arrays();
    let features = feature_specs(&arrays);
    let sample_bytes: u64 = features.values().map(FeatureSpec::sample_bytes).sum();
    let options = StoreOptions {
        zstd_level: cfg.zstd_level,
        ..StoreOptions::default()
    };
    let pool = make_pool(&arrays, cfg.batch);
    let batches = pool_tensors(&arrays, &pool, cfg.batch, &cfg.device)?;
    // the uploads ran on this thread's stream; the writers copy back on their own
    // (as the run's model thread waits on a fence before handing a batch over)
    cfg.device.synchronize().map_err(|e| {
        format!(
            "waiting for the uploads to {}: {e}",
            device_name(&cfg.device)
        )
    })?;
    let samples = (cfg.parts * cfg.samples_per_part) as u64;
    let bytes = samples * sample_bytes;

    let (mut ours, mut peer, mut busy) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for round in 0..cfg.rounds {
        let r = tensorbake_round(cfg, round, &features, options, &batches)?;
        tracing::info!(round, r.seconds, r.cpu_seconds, "tensorbake write round");
        ours.push((r.seconds, r.cpu_seconds));
        busy.push(r.busy);
        last = Some(r);
        if let Some(python) = &cfg.python {
            let (secs, cpu, peer_bytes) = tensorstore_peer(python, cfg, &arrays, &pool, &options)?;
            if peer_bytes != bytes {
                return Err(format!(
                    "tensorstore wrote {peer_bytes} feature bytes, tensorbake {bytes}: not the same work"
                ));
            }
            tracing::info!(round, secs, cpu, "tensorstore write round");
            peer.push((secs, cpu));
        }
    }
    let row = |writer: &str, runs: &[(f64, f64)]| {
        let seconds = median(&runs.iter().map(|r| r.0).collect::<Vec<_>>());
        let cpu_seconds = median(&runs.iter().map(|r| r.1).collect::<Vec<_>>());
        WriterRow {
            writer: writer.to_string(),
            bytes,
            seconds,
            cpu_seconds,
            mb_s: bytes as f64 / 1e6 / seconds,
            mb_per_cpu_s: bytes as f64 / 1e6 / cpu_seconds.max(0.01),
            samples_s: samples as f64 / seconds,
        }
    };
    let mut rows = vec![row("tensorbake", &ours)];
    if !peer.is_empty() {
        rows.push(row("tensorstore", &peer));
    }
    let (raw, stored, d2h) = last.map_or((0, 0, 0), |r| (r.raw, r.stored, r.device_to_host_bytes));
    Ok(WriteBenchReport {
        sample_bytes,
        samples,
        writers: cfg.writers,
        rounds: cfg.rounds,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        device: device_name(&cfg.device),
        writer_busy_fraction: median(&busy),
        compression_ratio: if stored == 0 {
            0.0
        } else {
            raw as f64 / stored as f64
        },
        device_to_host_bytes: d2h,
        rows,
        peer_note: cfg
            .python
            .is_none()
            .then(|| "no Python given: tensorstore not measured".to_string()),
    })
}

fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The Zarr v3 data type name of a store dtype.
fn zarr_dtype(d: DType) -> &'static str {
    match d {
        DType::Bf16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
        DType::U16 => "uint16",
        DType::U32 => "uint32",
    }
}

/// Writes the pool's bytes and the request, runs the script: (seconds, CPU s, bytes).
fn tensorstore_peer(
    python: &Path,
    cfg: &WriteBenchConfig,
    arrays: &[(Array, DType, Vec<u64>)],
    pool: &[Vec<Vec<u8>>],
    options: &StoreOptions,
) -> Result<(f64, f64, u64), String> {
    let dir = cfg.dir.join("tensorstore");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| format!("writing {what}: {e}")
    };
    let mut request_arrays = Vec::new();
    for ((a, dtype, shape), bufs) in arrays.iter().zip(pool) {
        let file = dir.join(format!("{}.bin", a.name()));
        // the same pool every round: written once
        let len: usize = bufs.iter().map(Vec::len).sum();
        if std::fs::metadata(&file).map_or(true, |m| m.len() != len as u64) {
            std::fs::write(&file, bufs.concat()).map_err(io(&file))?;
        }
        let per: u64 = shape.iter().product::<u64>() * dtype.size() as u64;
        request_arrays.push(serde_json::json!({
            "name": a.name(),
            "dtype": zarr_dtype(*dtype),
            "shape": shape,
            "shard_samples": options.shard_samples(per),
            "file": file,
        }));
    }
    let request = serde_json::json!({
        "dir": dir.join("store"),
        "parts": cfg.parts,
        "samples": cfg.samples_per_part,
        "batch": cfg.batch,
        "pool": POOL,
        "zstd_level": cfg.zstd_level,
        "arrays": request_arrays,
    });
    let req = dir.join("request.json");
    std::fs::write(&req, request.to_string()).map_err(io(&req))?;
    let script = dir.join("store_write.py");
    std::fs::write(&script, TENSORSTORE_SCRIPT).map_err(io(&script))?;
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(&req)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    let _ = std::fs::remove_dir_all(dir.join("store"));
    if !out.status.success() {
        return Err(format!(
            "{} store_write.py failed ({}): {}",
            python.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "store_write.py printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let f = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("store_write.py output lacks {k}: {v}"))
    };
    Ok((f("seconds")?, f("cpu_seconds")?, f("bytes")? as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensorbake_kit::schema::Feature;

    /// The production mix is the 2.79 MB per image that the arithmetic
    /// assumes, with the run's array names and store dtypes.
    #[test]
    fn production_arrays_are_the_runs() {
        let a = production_arrays();
        let bytes: u64 = a
            .iter()
            .map(|(_, d, s)| s.iter().product::<u64>() * d.size() as u64)
            .sum();
        assert_eq!(
            bytes,
            2 * 4 * 64 * 64 * 4 + 729 * 1152 * 2 + 120 * 4096 * 2 + 4
        );
        let dtypes: Vec<DType> = a.iter().map(|x| x.1).collect();
        assert_eq!(
            dtypes,
            [DType::F32, DType::F32, DType::Bf16, DType::Bf16, DType::U32]
        );
        let mut features: Vec<Feature> = a.iter().map(|x| x.0.feature()).collect();
        features.dedup();
        assert_eq!(features, [Feature::SdVae, Feature::Siglip, Feature::T5]);
    }

    /// CPU time counts work done on another thread.
    #[test]
    fn cpu_time_counts_every_thread() {
        let before = process_cpu_seconds().unwrap();
        std::thread::spawn(|| {
            let t = Instant::now();
            let mut x = 0u64;
            while t.elapsed().as_millis() < 300 {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
            }
        })
        .join()
        .unwrap();
        let spent = process_cpu_seconds().unwrap() - before;
        assert!(spent >= 0.2, "{spent}");
    }

    /// A small run commits every part whole, and sample `i` of a part holds row
    /// `i % B` of pool batch `(i / B) % 2`: the rule the peer builds its arrays by.
    #[test]
    fn the_bench_commits_every_part_with_the_rows_sent() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WriteBenchConfig {
            dir: dir.path().to_path_buf(),
            writers: 2,
            parts: 3,
            samples_per_part: 5,
            batch: 2,
            queue_per_writer: 1,
            zstd_level: 1,
            device: Device::Cpu,
            rounds: 2,
            python: None,
        };
        let r = run_write_bench(&cfg).unwrap();
        assert_eq!(r.samples, 15);
        assert_eq!(r.rows.len(), 1);
        assert_eq!(r.rows[0].bytes, 15 * r.sample_bytes);
        assert!(r.compression_ratio > 1.0, "{}", r.compression_ratio);
        assert!(r.peer_note.is_some());
        // the earlier round's store is gone, the last one kept
        assert!(!dir.path().join("tensorbake-0.zarr").exists());
        let reader = tensorbake_store::StoreReader::open(&Location::Local(
            dir.path().join("tensorbake-1.zarr"),
        ))
        .unwrap();
        assert_eq!(reader.len(), 15);
        let pool = make_pool(&production_arrays(), 2);
        let row_bytes = 729 * 1152 * 2;
        for i in 0..15u64 {
            let t = reader
                .read_tensor(i, "siglip_hidden", &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap();
            let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
            let (k, row) = ((i % 5) as usize / 2, (i % 5) as usize % 2);
            let want = &pool[2][k % POOL][row * row_bytes..(row + 1) * row_bytes];
            assert!(
                want == &bytes[..],
                "sample {i} is not row {row} of pool batch {}",
                k % POOL
            );
        }
    }
}
