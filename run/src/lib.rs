//! tensorbake-run: the pipeline of `tensorbake run`, from shards to a committed store.
//!
//! A [`RunConfig`] (a manifest: `[source]`, `[[encoders]]`, the store, rank/world) is
//! built into a [`Run`], which has checked everything that can be checked before a
//! byte is written: encoder names, weights, the shard list and caption index, that the
//! first shards answer, and that an existing store has the same spec. Only then is the
//! store created. [`Run::run`] streams this rank's shards that are not yet committed
//! through three overlapping stages joined by bounded queues:
//!
//! ```text
//! ingest (shards in flight, rayon decode) --[encode_queue samples]--> encode (one
//! thread: every encoder on each batch) --[write_queue batches]--> writers (threads,
//! one part per shard, committed last)
//! ```
//!
//! Backpressure flows upstream: when the encoders are the bottleneck the decode
//! threads block on a full queue, so memory stays bounded by the queue sizes whatever
//! the dataset size ([`Run::in_flight_bound`]).
//!
//! Batches never mix shards, and batch `k` of a shard is always its samples
//! `k*B .. (k+1)*B`: the batch a sample is encoded in depends only on its shard, not
//! on how shards interleave. So a part's bytes are the same whichever run, rank or
//! resumption wrote it, and a store finished after a kill equals one written in one go.
//!
//! A shard that fails (truncated tar, 404, an encoder error) is not committed; the
//! next run, the same command, tries it again. Committed parts are never rewritten.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender, bounded};
use serde::{Deserialize, Serialize};
use tensorbake_encode::{DTypeName, EncodeError, Encoder, EncoderConfig, Input, Rgb8};
use tensorbake_ingest::pipeline::{Event, Ingest, IngestConfig, IngestError, Sample, ShardEnd};
use tensorbake_ingest::shards::Shard;
use tensorbake_kit::rank::Rank;
use tensorbake_store::writer::SampleMeta;
use tensorbake_store::{
    DType as StoreDType, FeatureSpec, Location, PartWriter, Store, StoreError, StoreOptions,
    StoreSpec,
};

mod report;
mod stats;

pub use report::{
    EncoderTime, FailedShard, IngestTime, PartReport, QueueReport, RunReport, SampleCounts,
    ShardCounts, SkipReport, StageTime, Stages,
};
pub use stats::{RunStats, StatsSnapshot};

/// The manifest's `[run]` table: queue sizes and threads of the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunOptions {
    /// Decoded samples that may wait for the encoders (default 256).
    pub encode_queue: usize,
    /// Encoded batches that may wait for the writers, all writers together (default 4).
    pub write_queue: usize,
    /// Writer threads: parts are encoded (zstd) and written in parallel (default 2).
    pub writers: usize,
    /// Check that the first shards answer before creating the store (default true).
    pub preflight: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            encode_queue: 256,
            write_queue: 4,
            writers: 2,
            preflight: true,
        }
    }
}

/// Everything a run needs; the binary fills it from a manifest and flags.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The job's name (recorded in the store's metadata and the report).
    pub name: String,
    /// The ingest stage (`base_dir` also anchors relative weight paths).
    pub ingest: IngestConfig,
    /// The `[[encoders]]` tables, in manifest order.
    pub encoders: Vec<EncoderConfig>,
    /// Where the store is.
    pub store: Location,
    /// How new parts are laid out (the manifest's `[zarr]`).
    pub layout: StoreOptions,
    /// This process's share of the shards.
    pub rank: Rank,
    /// Queues and threads.
    pub options: RunOptions,
}

/// Why a run could not start. Nothing has been written to the store when one of
/// these is returned.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is incomplete or contradictory.
    #[error("{0}")]
    Config(String),
    /// An `[[encoders]]` table names no known encoder.
    #[error(
        "[[encoders]] #{index}: unknown encoder `{name}`{}; known encoders: {known}",
        suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default()
    )]
    UnknownEncoder {
        /// 1-based position of the table.
        index: usize,
        /// The name given.
        name: String,
        /// The closest known name, if one is close.
        suggestion: Option<String>,
        /// The known names.
        known: String,
    },
    /// An encoder's weights could not be found or loaded.
    #[error("[[encoders]] #{index} ({name}): {source}")]
    Encoder {
        /// 1-based position of the table.
        index: usize,
        /// The encoder name.
        name: String,
        /// What failed.
        #[source]
        source: Box<EncodeError>,
    },
    /// The shard list or the caption index could not be made.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// None of the first shards could be reached.
    #[error("cannot read the shards: {0}")]
    Unreachable(String),
    /// The store could not be opened or created (e.g. its spec differs).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One loaded encoder and how its arrays are stored.
struct Loaded {
    name: String,
    encoder: Box<dyn Encoder>,
    /// Array name -> store dtype, in output order.
    arrays: Vec<(String, StoreDType)>,
    /// The empty caption's arrays (text encoders).
    null: Vec<(String, Tensor)>,
}

/// A run, ready to go: configuration checked, encoders loaded, store opened.
pub struct Run {
    cfg: RunConfig,
    ingest: Ingest,
    /// Used by the encode thread only (encoders are `Send`, not `Sync`).
    encoders: Mutex<Vec<Loaded>>,
    encoder_names: Vec<String>,
    store: Store,
    /// Every shard of the manifest, this rank's, and this rank's still to do.
    listed: usize,
    mine: usize,
    todo: Vec<Shard>,
    part_of: HashMap<usize, String>,
    batch: usize,
    stats: RunStats,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("store", &self.cfg.store)
            .field("todo", &self.todo.len())
            .field("encoders", &self.encoder_names())
            .finish_non_exhaustive()
    }
}

/// Levenshtein distance (for "did you mean").
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A weights location relative to the manifest: a relative path that names a
/// directory beside the manifest is taken from there; anything else (absolute paths,
/// hub ids `org/name`) is left as given.
pub fn resolve_weights(weights: &str, base: &Path) -> String {
    let p = Path::new(weights);
    if p.is_relative() && base.join(p).is_dir() {
        base.join(p).to_string_lossy().into_owned()
    } else {
        weights.to_string()
    }
}

/// The part of a shard: named after where the shard is in the dataset, not where it
/// was fetched from, so that a re-signed CDN link, another mirror, or the same files
/// read from disk map to the same part (DESIGN: a nightly job is the same command run
/// again). SA-1B shards are named by the links file's `file_name`; other shards by
/// their path without scheme, host, query and fragment.
pub fn part_for(shard: &Shard, kind: tensorbake_ingest::pipeline::SourceKind) -> String {
    let identity = match kind {
        tensorbake_ingest::pipeline::SourceKind::Sa1b => format!("sa1b/{}", shard.name),
        _ => {
            let url = shard.url.split(['?', '#']).next().unwrap_or(&shard.url);
            let path = match url.split_once("://") {
                Some(("file", rest)) => rest,
                Some((_, rest)) => rest.find('/').map_or("", |i| &rest[i..]),
                None => url,
            };
            path.to_string()
        }
    };
    tensorbake_store::part_name_for_source(&identity)
}

/// Replaces `from` by `to` in every string of a JSON value (paths that depend on
/// where the weights were mounted become the manifest's own spelling).
fn relabel(v: &mut serde_json::Value, from: &str, to: &str) {
    match v {
        serde_json::Value::String(s) if !from.is_empty() && s.contains(from) => {
            *s = s.replace(from, to);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| relabel(i, from, to)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|i| relabel(i, from, to)),
        _ => {}
    }
}

fn store_dtype(d: DTypeName) -> StoreDType {
    match d {
        DTypeName::F32 => StoreDType::F32,
        DTypeName::Bf16 => StoreDType::Bf16,
        DTypeName::F16 => StoreDType::F16,
    }
}

impl RunConfig {
    /// Checks the configuration, loads the encoders, opens (or, once everything is
    /// known to be well, creates) the store and works out which shards this rank
    /// still has to do. Returns an error, with nothing written, when any of that
    /// fails.
    pub fn build(&self) -> Result<Run, RunError> {
        if self.encoders.is_empty() {
            return Err(RunError::Config(
                "no [[encoders]]: a run computes at least one feature".into(),
            ));
        }
        let known = tensorbake_encode::KNOWN_ENCODERS;
        let mut seen = BTreeSet::new();
        for (i, e) in self.encoders.iter().enumerate() {
            if !known.contains(&e.name.as_str()) {
                let suggestion = known
                    .iter()
                    .map(|k| (distance(&e.name.to_lowercase(), k), *k))
                    .min()
                    .filter(|(d, _)| *d <= 3)
                    .map(|(_, k)| k.to_string());
                return Err(RunError::UnknownEncoder {
                    index: i + 1,
                    name: e.name.clone(),
                    suggestion,
                    known: known.join(", "),
                });
            }
            if !seen.insert(e.name.as_str()) {
                return Err(RunError::Config(format!(
                    "[[encoders]] #{}: `{}` is listed twice (its arrays would collide)",
                    i + 1,
                    e.name
                )));
            }
        }
        if self.options.writers == 0 || self.options.encode_queue == 0 {
            return Err(RunError::Config(
                "[run]: writers and encode_queue must be at least 1".into(),
            ));
        }
        let base = self.ingest.base_dir.clone();
        // Weights first: a missing directory is found in milliseconds, before the
        // caption index (minutes for SA-1B) is built.
        let resolved: Vec<EncoderConfig> = self
            .encoders
            .iter()
            .map(|e| EncoderConfig {
                weights: resolve_weights(&e.weights, &base),
                ..e.clone()
            })
            .collect();
        for (i, e) in resolved.iter().enumerate() {
            tensorbake_encode::weights::ModelDir::resolve(&e.weights).map_err(|source| {
                RunError::Encoder {
                    index: i + 1,
                    name: e.name.clone(),
                    source: Box::new(source),
                }
            })?;
        }
        let ingest = self.ingest.build()?;
        let resolution = self.ingest.preprocess.resolution;
        let mut encoders = Vec::with_capacity(resolved.len());
        let mut features = BTreeMap::new();
        for (i, (given, e)) in self.encoders.iter().zip(&resolved).enumerate() {
            let err = |source| RunError::Encoder {
                index: i + 1,
                name: e.name.clone(),
                source: Box::new(source),
            };
            let _span = tracing::info_span!("load", encoder = %e.name).entered();
            let t0 = Instant::now();
            let encoder = tensorbake_encode::build_encoder(e, resolution).map_err(err)?;
            tracing::info!(encoder = %e.name, seconds = t0.elapsed().as_secs_f64(), "encoder loaded");
            let mut info = encoder.info();
            let null = if encoder.takes_text() {
                tensorbake_encode::null_embedding(encoder.as_ref()).map_err(err)?
            } else {
                Vec::new()
            };
            // The spec names the weights as the manifest does, whatever the mount.
            let mut model = serde_json::Value::String(info.model.clone());
            relabel(&mut model, &e.weights, &given.weights);
            relabel(&mut info.preprocess, &e.weights, &given.weights);
            let float = e.store_dtype.map_or(
                if e.name.ends_with("_vae") {
                    StoreDType::F32
                } else {
                    StoreDType::Bf16
                },
                store_dtype,
            );
            let mut arrays = Vec::new();
            for a in &info.arrays {
                let integer = null
                    .iter()
                    .any(|(n, t)| n == &a.name && !t.dtype().is_float());
                let dtype = if integer { StoreDType::U32 } else { float };
                features.insert(
                    a.name.clone(),
                    FeatureSpec {
                        model: model.as_str().unwrap_or_default().to_string(),
                        weights_sha256: info.weights_sha256.clone(),
                        preprocess: info.preprocess.clone(),
                        dtype,
                        shape: a.shape.iter().map(|&d| d as u64).collect(),
                    },
                );
                arrays.push((a.name.clone(), dtype));
            }
            encoders.push(Loaded {
                name: e.name.clone(),
                encoder,
                arrays,
                null,
            });
        }
        let mut spec = StoreSpec::new(features);
        spec.captions = serde_json::to_value(&self.ingest.captions).unwrap_or_default();
        spec.resolution = Some(resolution);
        spec.metadata = serde_json::json!({
            "name": self.name,
            "source_kind": self.ingest.source.kind,
            "tensorbake": env!("CARGO_PKG_VERSION"),
        });

        let existing = Store::open_existing(&self.store, &spec, self.layout)?;
        let committed = match &existing {
            Some(s) => s.committed_parts()?,
            None => BTreeSet::new(),
        };
        let kind = self.ingest.source.kind;
        let listed = ingest.shards().len();
        let mine: Vec<Shard> = ingest
            .shards()
            .iter()
            .filter(|s| self.rank.owns(s.index))
            .cloned()
            .collect();
        let part_of: HashMap<usize, String> =
            mine.iter().map(|s| (s.index, part_for(s, kind))).collect();
        let todo: Vec<Shard> = mine
            .iter()
            .filter(|s| !committed.contains(&part_of[&s.index]))
            .cloned()
            .collect();
        if self.options.preflight && !todo.is_empty() {
            preflight(&ingest, &todo)?;
        }
        let store = match existing {
            Some(s) => s,
            None => Store::create_or_open_with(&self.store, spec, self.layout)?,
        };
        let nulls: BTreeMap<String, Tensor> = encoders
            .iter()
            .flat_map(|l| l.null.iter().cloned())
            .collect();
        if !nulls.is_empty() {
            store.record_null_embedding(&nulls)?;
        }
        let batch = self
            .encoders
            .iter()
            .map(|e| e.batch)
            .max()
            .unwrap_or(1)
            .max(1);
        let stats = RunStats::new(todo.len() as u64);
        Ok(Run {
            cfg: self.clone(),
            ingest,
            encoder_names: encoders.iter().map(|l| l.name.clone()).collect(),
            encoders: Mutex::new(encoders),
            store,
            listed,
            mine: mine.len(),
            todo,
            part_of,
            batch,
            stats,
        })
    }
}

/// Probes the first shards to do (up to 4, at once); fails only when none answers,
/// so that one missing shard is a counted failure and a wrong host or pattern an
/// error before anything is written.
fn preflight(ingest: &Ingest, todo: &[Shard]) -> Result<(), RunError> {
    let probe: Vec<&Shard> = todo.iter().take(4).collect();
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = probe
            .iter()
            .map(|s| scope.spawn(|| ingest.fetcher().probe(&s.url).map_err(|e| e.to_string())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("probe panicked".into())))
            .collect()
    });
    if results.iter().all(Result::is_err) {
        let first = results
            .into_iter()
            .find_map(Result::err)
            .unwrap_or_default();
        let n = probe.len();
        return Err(RunError::Unreachable(if n == 1 {
            first
        } else {
            format!("none of the first {n} shards answered; the first: {first}")
        }));
    }
    Ok(())
}

/// Decoded samples and shard ends on their way to the encoders.
enum ToEncode {
    Sample(Sample),
    End(ShardEnd),
}

/// Encoded batches and shard ends on their way to a writer.
enum ToWrite {
    Batch {
        shard: usize,
        meta: Vec<SampleMeta>,
        features: BTreeMap<String, Tensor>,
    },
    End {
        end: ShardEnd,
        /// Why the encoders dropped this shard's samples, if they did.
        encode_error: Option<String>,
    },
}

/// What a writer saw of one shard.
enum PartOutcome {
    Committed(PartReport),
    Failed(FailedShard),
}

/// Blocking send that counts the time spent waiting on a full queue.
fn send_timed<T>(tx: &Sender<T>, msg: T, waited: &Mutex<Duration>) -> bool {
    match tx.try_send(msg) {
        Ok(()) => true,
        Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
        Err(crossbeam_channel::TrySendError::Full(msg)) => {
            let t0 = Instant::now();
            let ok = tx.send(msg).is_ok();
            *waited.lock().unwrap_or_else(|e| e.into_inner()) += t0.elapsed();
            ok
        }
    }
}

const SKIP_DETAILS: usize = 1000;

impl Run {
    /// Live counters, for progress display from another thread.
    pub fn stats(&self) -> &RunStats {
        &self.stats
    }

    /// The store being written.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Shards of the manifest, this rank's, and this rank's still to do.
    pub fn shard_counts(&self) -> (usize, usize, usize) {
        (self.listed, self.mine, self.todo.len())
    }

    /// The encoders, in manifest order.
    pub fn encoder_names(&self) -> Vec<String> {
        self.encoder_names.clone()
    }

    /// Samples per encoder batch (the largest `batch` of the encoders).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The most samples that can be decoded but not yet handed to a part writer at
    /// any moment: the encode queue, a partial batch per shard in flight, the batch
    /// being encoded, the write queues and the batches being written, and one sample
    /// per decode thread blocked on the full queue.
    pub fn in_flight_bound(&self) -> u64 {
        let o = &self.cfg.options;
        let b = self.batch as u64;
        let shards = self.cfg.ingest.parallel.shards_in_flight.max(1) as u64;
        let writers = o.writers as u64;
        let per_writer = (o.write_queue as u64 / writers).max(1);
        o.encode_queue as u64 + shards * b + b + writers * (per_writer + 1) * b + shards
    }

    /// Streams the shards still to do through the encoders into the store and
    /// reports. `stop` drains the run early: shards not started are left for the next
    /// run; shards in flight finish and commit.
    pub fn run(&self, stop: &AtomicBool) -> RunReport {
        let started = Instant::now();
        let o = &self.cfg.options;
        let writers = o.writers.max(1);
        let (enc_tx, enc_rx) = bounded::<ToEncode>(o.encode_queue.max(1));
        let per_writer = (o.write_queue / writers).max(1);
        let (write_txs, write_rxs): (Vec<_>, Vec<_>) =
            (0..writers).map(|_| bounded::<ToWrite>(per_writer)).unzip();
        let ingest_blocked = Mutex::new(Duration::ZERO);
        let skips: Mutex<Vec<SkipReport>> = Mutex::new(Vec::new());
        let names: HashMap<usize, &str> = self
            .todo
            .iter()
            .map(|s| (s.index, s.name.as_str()))
            .collect();

        let (summary, encode_time, outcomes) = std::thread::scope(|scope| {
            let ingest = scope.spawn(|| {
                let tx = enc_tx;
                let on_event = |e: Event| match e {
                    Event::Sample(s) => {
                        self.stats.sample_read();
                        send_timed(&tx, ToEncode::Sample(s), &ingest_blocked);
                    }
                    Event::Skip(s) => {
                        self.stats.samples_skipped.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(shard = s.shard, key = %s.key, reason = s.reason, "skipped: {}", s.detail);
                        let mut v = skips.lock().unwrap_or_else(|e| e.into_inner());
                        if v.len() < SKIP_DETAILS {
                            v.push(SkipReport {
                                shard: names.get(&s.shard).copied().unwrap_or_default().to_string(),
                                key: s.key,
                                reason: s.reason.to_string(),
                                detail: s.detail,
                            });
                        }
                    }
                    Event::ShardEnd(end) => {
                        self.stats.shard_read(end.bytes);
                        send_timed(&tx, ToEncode::End(end), &ingest_blocked);
                    }
                };
                self.ingest.run(&self.todo, stop, &on_event)
            });
            let encode = scope.spawn(move || self.encode_stage(enc_rx, write_txs));
            let writer_handles: Vec<_> = write_rxs
                .into_iter()
                .map(|rx| scope.spawn(|| self.write_stage(rx)))
                .collect();
            let summary = ingest.join().expect("ingest thread panicked");
            let encode_time = encode.join().expect("encode thread panicked");
            let mut outcomes = Vec::new();
            let mut write_time = StageTime::default();
            for h in writer_handles {
                let (o, t) = h.join().expect("writer thread panicked");
                outcomes.extend(o);
                write_time.busy_s += t.busy_s;
                write_time.wait_s += t.wait_s;
                write_time.samples += t.samples;
            }
            (summary, encode_time, (outcomes, write_time))
        });
        let (outcomes, mut write_time) = outcomes;
        write_time.threads = writers;
        write_time.finish();
        let seconds = started.elapsed().as_secs_f64();

        let mut committed = Vec::new();
        let mut failed = Vec::new();
        for o in outcomes {
            match o {
                PartOutcome::Committed(p) => committed.push(p),
                PartOutcome::Failed(f) => failed.push(f),
            }
        }
        committed.sort_by_key(|p| p.index);
        failed.sort_by_key(|f| f.index);
        let snap = self.stats.snapshot();
        let (encode, encoders) = encode_time;
        let ingest_time = IngestTime {
            wall_s: summary.seconds,
            blocked_s: ingest_blocked
                .into_inner()
                .unwrap_or_default()
                .as_secs_f64(),
            samples_per_s: summary.kept as f64 / summary.seconds.max(1e-9),
            mb_per_s: summary.bytes as f64 / 1e6 / summary.seconds.max(1e-9),
        };
        let mut skipped_samples = skips.into_inner().unwrap_or_default();
        skipped_samples.sort_by(|a, b| (&a.shard, &a.key).cmp(&(&b.shard, &b.key)));
        RunReport {
            name: self.cfg.name.clone(),
            store: self.cfg.store.to_string(),
            rank: self.cfg.rank.rank,
            world: self.cfg.rank.world,
            rank_from: self.cfg.rank.origin.to_string(),
            encoders: self.encoder_names(),
            shards: ShardCounts {
                listed: self.listed,
                mine: self.mine,
                already_committed: self.mine - self.todo.len(),
                todo: self.todo.len(),
                committed: committed.len(),
                failed: failed.len(),
                not_started: self
                    .todo
                    .len()
                    .saturating_sub(committed.len() + failed.len()),
            },
            samples: SampleCounts {
                read: summary.kept,
                encoded: snap.samples_encoded,
                written: snap.samples_written,
                skipped: summary.skipped.clone(),
                lost_with_failed_shards: failed.iter().map(|f| f.samples_read).sum(),
            },
            bytes: summary.bytes,
            retries: summary.retries,
            seconds,
            samples_per_s: snap.samples_written as f64 / seconds.max(1e-9),
            stages: Stages {
                ingest: ingest_time,
                encode,
                encoders,
                write: write_time,
            },
            queues: QueueReport {
                encode_queue: o.encode_queue,
                write_queue: o.write_queue,
                batch: self.batch,
                in_flight_bound: self.in_flight_bound(),
                in_flight_high: snap.in_flight_high,
            },
            committed_parts: committed,
            failed_shards: failed,
            skipped_samples_truncated: summary.skipped.values().sum::<u64>()
                > skipped_samples.len() as u64,
            skipped_samples,
        }
    }

    /// The encode stage: per-shard batches of `self.batch`, every encoder on each.
    fn encode_stage(
        &self,
        rx: Receiver<ToEncode>,
        writers: Vec<Sender<ToWrite>>,
    ) -> (StageTime, BTreeMap<String, EncoderTime>) {
        let mut pending: HashMap<usize, Vec<Sample>> = HashMap::new();
        let mut failed: HashMap<usize, String> = HashMap::new();
        let mut time = StageTime {
            threads: 1,
            ..StageTime::default()
        };
        let encoders = self.encoders.lock().unwrap_or_else(|e| e.into_inner());
        let mut per_encoder: BTreeMap<String, EncoderTime> = self
            .encoder_names
            .iter()
            .map(|n| (n.clone(), EncoderTime::default()))
            .collect();
        let route = |shard: usize| &writers[shard % writers.len()];
        let flush = |shard: usize,
                     batch: Vec<Sample>,
                     failed: &mut HashMap<usize, String>,
                     time: &mut StageTime,
                     per_encoder: &mut BTreeMap<String, EncoderTime>| {
            if batch.is_empty() {
                return;
            }
            if failed.contains_key(&shard) {
                self.stats.dropped(batch.len() as u64);
                return;
            }
            let n = batch.len();
            let t0 = Instant::now();
            let result = encode_batch(&encoders, &batch, per_encoder);
            time.busy_s += t0.elapsed().as_secs_f64();
            match result {
                Ok(features) => {
                    time.samples += n as u64;
                    self.stats
                        .samples_encoded
                        .fetch_add(n as u64, Ordering::Relaxed);
                    let meta = batch
                        .into_iter()
                        .map(|s| SampleMeta {
                            key: s.key,
                            caption: s.caption.unwrap_or_default(),
                            caption_raw: s.caption_raw.unwrap_or_default(),
                            orig_size: [s.orig_width, s.orig_height],
                        })
                        .collect();
                    let msg = ToWrite::Batch {
                        shard,
                        meta,
                        features,
                    };
                    if route(shard).send(msg).is_err() {
                        self.stats.dropped(n as u64);
                    }
                }
                Err(why) => {
                    tracing::warn!(
                        shard,
                        "encoding failed; the shard will not be committed: {why}"
                    );
                    self.stats.dropped(n as u64);
                    failed.insert(shard, why);
                }
            }
        };
        loop {
            let t0 = Instant::now();
            let Ok(msg) = rx.recv() else { break };
            time.wait_s += t0.elapsed().as_secs_f64();
            match msg {
                ToEncode::Sample(s) => {
                    let shard = s.shard;
                    let p = pending.entry(shard).or_default();
                    p.push(s);
                    if p.len() >= self.batch {
                        let b = std::mem::take(p);
                        flush(shard, b, &mut failed, &mut time, &mut per_encoder);
                    }
                }
                ToEncode::End(end) => {
                    let shard = end.shard;
                    if let Some(b) = pending.remove(&shard) {
                        if end.error.is_some() {
                            // the shard will not be committed: do not encode its tail
                            self.stats.dropped(b.len() as u64);
                        } else {
                            flush(shard, b, &mut failed, &mut time, &mut per_encoder);
                        }
                    }
                    let msg = ToWrite::End {
                        end,
                        encode_error: failed.remove(&shard),
                    };
                    let _ = route(shard).send(msg);
                }
            }
        }
        time.finish();
        for t in per_encoder.values_mut() {
            t.samples_per_s = t.samples as f64 / t.busy_s.max(1e-9);
        }
        (time, per_encoder)
    }

    /// One writer thread: a part per shard, committed when the shard ends well.
    fn write_stage(&self, rx: Receiver<ToWrite>) -> (Vec<PartOutcome>, StageTime) {
        let mut parts: HashMap<usize, PartWriter> = HashMap::new();
        let mut broken: HashMap<usize, String> = HashMap::new();
        let mut outcomes = Vec::new();
        let mut time = StageTime::default();
        let shard_of: HashMap<usize, &Shard> = self.todo.iter().map(|s| (s.index, s)).collect();
        let open = |shard: usize| -> Result<PartWriter, StoreError> {
            let s = shard_of[&shard];
            self.store.part_writer(&self.part_of[&shard], &s.url)
        };
        loop {
            let t0 = Instant::now();
            let Ok(msg) = rx.recv() else { break };
            time.wait_s += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            match msg {
                ToWrite::Batch {
                    shard,
                    meta,
                    features,
                } => {
                    let n = meta.len() as u64;
                    if broken.contains_key(&shard) {
                        self.stats.dropped(n);
                        continue;
                    }
                    let w = match parts.entry(shard) {
                        std::collections::hash_map::Entry::Occupied(o) => Ok(o.into_mut()),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            open(shard).map(|w| v.insert(w))
                        }
                    };
                    match w.and_then(|w| w.push_batch(meta, &features)) {
                        Ok(()) => {
                            self.stats.written(n);
                            time.samples += n;
                        }
                        Err(e) => {
                            tracing::warn!(
                                shard,
                                "writing failed; the part will not be committed: {e}"
                            );
                            self.stats.dropped(n);
                            parts.remove(&shard);
                            broken.insert(shard, e.to_string());
                        }
                    }
                }
                ToWrite::End { end, encode_error } => {
                    let shard = end.shard;
                    let s = shard_of[&shard];
                    let writer = parts.remove(&shard);
                    let failure = match (&end.error, encode_error, broken.remove(&shard)) {
                        (Some(e), _, _) => Some((e.reason().to_string(), e.to_string())),
                        (None, Some(e), _) => Some(("encode".to_string(), e)),
                        (None, None, Some(e)) => Some(("store".to_string(), e)),
                        (None, None, None) => None,
                    };
                    let outcome = match failure {
                        None => {
                            // A shard whose every sample was skipped still commits
                            // (empty), so that the next run does not read it again.
                            match writer
                                .map_or_else(|| open(shard), Ok)
                                .and_then(PartWriter::commit)
                            {
                                Ok(samples) => {
                                    self.stats.shard_committed();
                                    tracing::info!(shard = %s.name, part = %self.part_of[&shard], samples, "part committed");
                                    PartOutcome::Committed(PartReport {
                                        index: shard,
                                        shard: s.name.clone(),
                                        part: self.part_of[&shard].clone(),
                                        samples,
                                        skipped: end.skipped,
                                    })
                                }
                                Err(e) => failed_shard(s, end.kept, "store", e.to_string()),
                            }
                        }
                        Some((reason, error)) => failed_shard(s, end.kept, &reason, error),
                    };
                    if let PartOutcome::Failed(f) = &outcome {
                        self.stats.shard_failed();
                        tracing::warn!(shard = %f.shard, reason = %f.reason, "shard failed, not committed: {}", f.error);
                    }
                    outcomes.push(outcome);
                }
            }
            time.busy_s += t0.elapsed().as_secs_f64();
        }
        (outcomes, time)
    }
}

/// Runs every encoder on one batch; outputs cast to their store dtype on the
/// encoder's device (bf16 halves the copy to the host).
fn encode_batch(
    encoders: &[Loaded],
    batch: &[Sample],
    per_encoder: &mut BTreeMap<String, EncoderTime>,
) -> Result<BTreeMap<String, Tensor>, String> {
    let images: Vec<Rgb8<'_>> = batch
        .iter()
        .map(|s| Rgb8 {
            width: s.resolution,
            height: s.resolution,
            pixels: &s.rgb,
        })
        .collect();
    let texts: Vec<&str> = batch
        .iter()
        .map(|s| s.caption.as_deref().unwrap_or(""))
        .collect();
    let mut out = BTreeMap::new();
    for l in encoders {
        let _span =
            tracing::debug_span!("encode", encoder = %l.name, batch = batch.len()).entered();
        let t0 = Instant::now();
        let input = if l.encoder.takes_text() {
            Input::Texts(&texts)
        } else {
            Input::Images(&images)
        };
        let arrays = l
            .encoder
            .encode(input)
            .map_err(|e| format!("encoder {}: {e}", l.name))?;
        for ((name, t), (_, dtype)) in arrays.into_iter().zip(&l.arrays) {
            let t = if dtype.is_float() && t.dtype() != dtype.candle() {
                t.to_dtype(dtype.candle())
                    .map_err(|e| format!("encoder {}: {name}: {e}", l.name))?
            } else {
                t
            };
            out.insert(name, t);
        }
        let e = per_encoder.entry(l.name.clone()).or_default();
        e.busy_s += t0.elapsed().as_secs_f64();
        e.samples += batch.len() as u64;
    }
    Ok(out)
}

fn failed_shard(s: &Shard, samples_read: u64, reason: &str, error: String) -> PartOutcome {
    PartOutcome::Failed(FailedShard {
        index: s.index,
        shard: s.name.clone(),
        url: s.url.clone(),
        reason: reason.to_string(),
        error,
        samples_read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_uses_edit_distance() {
        assert_eq!(distance("siglib", "siglip"), 1);
        assert_eq!(distance("t5", "t5"), 0);
        assert_eq!(distance("clip_visoin", "clip_vision"), 2);
        assert_eq!(distance("", "abc"), 3);
    }

    #[test]
    fn part_names_follow_the_dataset_path_not_the_transport() {
        let shard = |url: &str, name: &str| Shard {
            index: 0,
            url: url.into(),
            name: name.into(),
        };
        use tensorbake_ingest::pipeline::SourceKind::{Sa1b, Webdataset};
        // SA-1B: the links file's name, whatever the (re-signed) link
        let a = part_for(
            &shard("https://cdn.example/sa_000020.tar?sig=1", "sa_000020.tar"),
            Sa1b,
        );
        let b = part_for(&shard("/mnt/sa1b/sa_000020.tar", "sa_000020.tar"), Sa1b);
        assert_eq!(a, b);
        assert!(a.starts_with("sa_000020-"), "{a}");
        // WebDataset: the path, without scheme, host or query
        let c = part_for(
            &shard("https://host-a/data/pd12m/00042.tar?x=1", "00042.tar"),
            Webdataset,
        );
        let d = part_for(
            &shard("http://host-b:8080/data/pd12m/00042.tar", "00042.tar"),
            Webdataset,
        );
        let e = part_for(
            &shard("file:///data/pd12m/00042.tar", "00042.tar"),
            Webdataset,
        );
        let f = part_for(&shard("/data/pd12m/00042.tar", "00042.tar"), Webdataset);
        assert_eq!(c, d);
        assert_eq!(c, e);
        assert_eq!(c, f);
        // but another directory is another part
        let g = part_for(&shard("/data/other/00042.tar", "00042.tar"), Webdataset);
        assert_ne!(c, g);
    }

    #[test]
    fn relabel_rewrites_mount_dependent_paths() {
        let mut v = serde_json::json!({"tokenizer": "/mnt/x/models/t5/spiece.model",
                                       "n": 3, "list": ["/mnt/x/models/t5"]});
        relabel(&mut v, "/mnt/x/models/t5", "models/t5");
        assert_eq!(v["tokenizer"], "models/t5/spiece.model");
        assert_eq!(v["list"][0], "models/t5");
        assert_eq!(v["n"], 3);
    }

    #[test]
    fn options_reject_unknown_keys_and_round_trip() {
        let o: RunOptions = serde_json::from_str(r#"{"writers": 3}"#).unwrap();
        assert_eq!(o.writers, 3);
        assert_eq!(o.encode_queue, RunOptions::default().encode_queue);
        let again: RunOptions = serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(o, again);
        let e = serde_json::from_str::<RunOptions>(r#"{"writer": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("writer"), "{e}");
    }
}
