//! Configuration and preflight: a [`RunConfig`] (a manifest's job) is checked and
//! built into a [`Run`] before a byte is written. Encoder names are checked against
//! the feature schema, weights resolved, encoders loaded, the store's spec derived
//! from what they report (and compared with an existing store's), the shards still to
//! do listed, and the first of them probed. Only then is the store created and the
//! null embeddings recorded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use tensorbake_encode::{EncodeError, EncoderConfig};
use tensorbake_ingest::pipeline::{Ingest, IngestConfig, IngestError};
use tensorbake_ingest::shards::Shard;
use tensorbake_kit::rank::Rank;
use tensorbake_kit::schema::Feature;
use tensorbake_store::{FeatureSpec, Location, Store, StoreError, StoreOptions, StoreSpec};

use crate::Run;
use crate::encode_stage::Loaded;
use crate::stats::RunStats;

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
/// read from disk map to the same part (docs/architecture.md: a nightly job is the
/// same command run again). SA-1B shards are named by the links file's `file_name`; other shards by
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
        let mut seen = BTreeSet::new();
        let mut features_of = Vec::with_capacity(self.encoders.len());
        for (i, e) in self.encoders.iter().enumerate() {
            let Some(feature) = Feature::from_name(&e.name) else {
                return Err(RunError::UnknownEncoder {
                    index: i + 1,
                    name: e.name.clone(),
                    suggestion: Feature::suggest(&e.name).map(|f| f.name().to_string()),
                    known: Feature::known_names(),
                });
            };
            features_of.push(feature);
            if !seen.insert(feature) {
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
            tensorbake_nn::weights::ModelDir::resolve(&e.weights).map_err(|source| {
                RunError::Encoder {
                    index: i + 1,
                    name: e.name.clone(),
                    source: Box::new(source.into()),
                }
            })?;
        }
        let ingest = self.ingest.build()?;
        let resolution = self.ingest.preprocess.resolution;
        let mut encoders = Vec::with_capacity(resolved.len());
        let mut features = BTreeMap::new();
        let mut nulls: BTreeMap<String, Tensor> = BTreeMap::new();
        for (i, ((given, e), &feature)) in self
            .encoders
            .iter()
            .zip(&resolved)
            .zip(&features_of)
            .enumerate()
        {
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
            // The condition of "nothing" (empty caption, black image) that conditioning
            // dropout and guidance need, recorded beside the parts.
            let null = if feature.null_input().is_some() {
                tensorbake_encode::null_embedding(encoder.as_ref(), resolution).map_err(err)?
            } else {
                Vec::new()
            };
            nulls.extend(null.into_iter().map(|(a, t)| (a.name().to_string(), t)));
            // The spec names the weights as the manifest does, whatever the mount.
            let mut model = serde_json::Value::String(info.model.clone());
            relabel(&mut model, &e.weights, &given.weights);
            relabel(&mut info.preprocess, &e.weights, &given.weights);
            let float = e.store_dtype.unwrap_or(feature.default_store_dtype());
            if !float.is_float() {
                return Err(RunError::Config(format!(
                    "[[encoders]] #{} ({}): store_dtype `{}` is not a float type (f32, bf16 or f16)",
                    i + 1,
                    e.name,
                    float.short_name()
                )));
            }
            let mut arrays = Vec::new();
            for a in &info.arrays {
                let dtype = a.array.store_dtype(float);
                features.insert(
                    a.array.name().to_string(),
                    FeatureSpec {
                        model: model.as_str().unwrap_or_default().to_string(),
                        weights_sha256: info.weights_sha256.clone(),
                        preprocess: info.preprocess.clone(),
                        dtype,
                        shape: a.shape.iter().map(|&d| d as u64).collect(),
                    },
                );
                arrays.push((a.array, dtype));
            }
            encoders.push(Loaded {
                feature,
                encoder,
                arrays,
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
        let encoder_names: Vec<String> = encoders
            .iter()
            .map(|l| l.feature.name().to_string())
            .collect();
        let stats = RunStats::new(todo.len() as u64, &encoder_names);
        Ok(Run {
            cfg: self.clone(),
            ingest,
            encoder_names,
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

#[cfg(test)]
mod tests {
    use super::*;

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
