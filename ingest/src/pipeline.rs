//! The ingest runtime: shards in, clean decoded samples out.
//!
//! [`IngestConfig`] (the manifest's `[source]`, `[preprocess]`, `[captions]` and
//! `[network]` tables) is built into an [`Ingest`], which streams shards with several
//! in flight at once. Per shard, a reader thread pulls the byte stream through gzip and
//! tar into samples and hands them on in small batches through a bounded channel; the
//! shard's worker decodes and preprocesses each batch on the rayon pool while the reader
//! goes on, so network, decompression and decoding overlap and memory stays bounded
//! (a few batches per shard in flight). Every outcome is reported in order through one
//! callback: a kept [`Sample`], a counted [`Skip`], or the end of a shard (with the
//! reason if it failed). A failed shard never stops the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::caption::CleanConfig;
use crate::caption::index::CaptionIndex;
use crate::image::{PreprocessConfig, preprocess};
use crate::shards::{
    Shard, ShardListError, brace_expand, name_of, parse_list, parse_sa1b_links, resolve,
};
use crate::source::{Fetcher, NetworkConfig, SourceError};
use crate::wds::{GroupOptions, RawSample, TarError, TarEvent, read_samples};

/// The dataset layouts tensorbake reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Any WebDataset: samples grouped by key; image and caption are fields.
    #[default]
    Webdataset,
    /// SA-1B: gzip shards of `./sa_<id>.jpg` (+ mask `.json`, ignored) listed by a links
    /// file; captions from a separate caption tar, joined by id through an index.
    Sa1b,
    /// PD12M as img2dataset writes it: WebDataset with `jpg`, `txt`, `json`.
    Pd12m,
}

/// The manifest's `[source]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Layout of the shards.
    pub kind: SourceKind,
    /// Shard URLs or paths, each may be a brace pattern (`webdataset`, `pd12m`).
    #[serde(default)]
    pub urls: Vec<String>,
    /// A file (path or URL) listing shards, one per line (alternative to `urls`).
    #[serde(default)]
    pub url_list: Option<String>,
    /// SA-1B links file (path or URL), TSV with header `file_name<TAB>cdn_link`.
    #[serde(default)]
    pub links: Option<String>,
    /// SA-1B caption tar (path or URL) of `sa_<id>.txt` members.
    #[serde(default)]
    pub captions: Option<String>,
    /// Where the SA-1B caption index lives (built on first use); default
    /// `<manifest dir>/<captions file stem>.captions.redb`.
    #[serde(default)]
    pub caption_db: Option<String>,
    /// The WebDataset field holding the caption (`txt` by default; `none` for none).
    #[serde(default)]
    pub caption_field: Option<String>,
    /// Fields that may hold the image, first present wins.
    #[serde(default = "default_image_fields")]
    pub image_fields: Vec<String>,
    /// Skip samples without a caption (`missing_caption`) instead of keeping them
    /// with a null caption.
    #[serde(default = "default_true")]
    pub require_caption: bool,
    /// Use only the first N shards of the list (for trials).
    #[serde(default)]
    pub limit_shards: Option<usize>,
}

fn default_image_fields() -> Vec<String> {
    ["jpg", "jpeg", "png", "webp"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

const fn default_true() -> bool {
    true
}

/// How much runs at once: the manifest's `[ingest]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Shards streamed at the same time.
    pub shards_in_flight: usize,
    /// Samples decoded together on the rayon pool.
    pub decode_batch: usize,
    /// Largest tar member loaded into memory, in MiB (larger: the shard fails).
    pub max_member_mib: u64,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            shards_in_flight: 4,
            decode_batch: 32,
            max_member_mib: 256,
        }
    }
}

/// Everything the ingest stage needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IngestConfig {
    /// `[source]`.
    pub source: SourceConfig,
    /// `[preprocess]`.
    pub preprocess: PreprocessConfig,
    /// `[captions]`.
    pub captions: CleanConfig,
    /// `[network]`.
    pub network: NetworkConfig,
    /// `[ingest]`.
    pub parallel: ParallelConfig,
    /// Directory relative paths are resolved against (the manifest's).
    pub base_dir: PathBuf,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: SourceKind::Webdataset,
            urls: Vec::new(),
            url_list: None,
            links: None,
            captions: None,
            caption_db: None,
            caption_field: None,
            image_fields: default_image_fields(),
            require_caption: true,
            limit_shards: None,
        }
    }
}

/// Errors building the ingest stage (before any shard is read).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The source configuration is incomplete or contradictory.
    #[error("[source]: {0}")]
    Config(String),
    /// The shard list could not be made.
    #[error(transparent)]
    ShardList(#[from] ShardListError),
    /// A links / list / caption file could not be fetched.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The caption index could not be opened or built.
    #[error("caption index {db}: {why}")]
    Captions {
        /// The index path.
        db: String,
        /// What failed.
        why: String,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A kept sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The shard's index in the list.
    pub shard: usize,
    /// The sample key (SA-1B: `sa_<id>`).
    pub key: String,
    /// All field names of the sample, sorted.
    pub fields: Vec<String>,
    /// The cleaned caption (None when the source has none).
    pub caption: Option<String>,
    /// The caption as found.
    pub caption_raw: Option<String>,
    /// Original image width (as displayed, after EXIF orientation).
    pub orig_width: u32,
    /// Original image height.
    pub orig_height: u32,
    /// `resolution x resolution` RGB8 bytes, HWC.
    pub rgb: Vec<u8>,
    /// The side of `rgb`.
    pub resolution: u32,
}

/// A sample dropped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skip {
    /// The shard's index in the list.
    pub shard: usize,
    /// The sample key.
    pub key: String,
    /// snake_case reason (`corrupt_image`, `missing_caption`, `duplicate_field`, ...).
    pub reason: &'static str,
    /// A human sentence with the specifics.
    pub detail: String,
}

/// The end of one shard.
#[derive(Debug)]
pub struct ShardEnd {
    /// The shard's index in the list.
    pub shard: usize,
    /// Samples kept.
    pub kept: u64,
    /// Samples skipped.
    pub skipped: u64,
    /// Bytes read from the source.
    pub bytes: u64,
    /// Requests after the first (resumes, retries).
    pub retries: u64,
    /// Why the shard failed, if it did (samples before the failure were reported).
    pub error: Option<TarError>,
}

/// One reported outcome.
#[derive(Debug)]
pub enum Event {
    /// A kept sample.
    Sample(Sample),
    /// A skipped sample.
    Skip(Skip),
    /// A shard finished (or failed).
    ShardEnd(ShardEnd),
}

/// Totals of a run of [`Ingest::run`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Samples kept.
    pub kept: u64,
    /// Skipped samples by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Shards read to the end.
    pub shards_ok: u64,
    /// Shards that failed, by reason.
    pub failed_shards: BTreeMap<String, u64>,
    /// Bytes read from sources.
    pub bytes: u64,
    /// Requests after the first (resumes and retries).
    pub retries: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl Summary {
    /// Adds one event to the totals.
    pub fn count(&mut self, e: &Event) {
        match e {
            Event::Sample(_) => self.kept += 1,
            Event::Skip(s) => *self.skipped.entry(s.reason.to_string()).or_default() += 1,
            Event::ShardEnd(end) => {
                self.bytes += end.bytes;
                self.retries += end.retries;
                match &end.error {
                    None => self.shards_ok += 1,
                    Some(e) => {
                        *self
                            .failed_shards
                            .entry(e.reason().to_string())
                            .or_default() += 1
                    }
                }
            }
        }
    }
}

/// The built ingest stage.
pub struct Ingest {
    cfg: IngestConfig,
    shards: Vec<Shard>,
    fetcher: Fetcher,
    cleaner: crate::caption::Cleaner,
    captions: Option<CaptionIndex>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("shards", &self.shards.len())
            .field("kind", &self.cfg.source.kind)
            .finish()
    }
}

impl IngestConfig {
    /// Resolves the shard list (fetching a links or list file if need be), opens or
    /// builds the SA-1B caption index, and returns the runnable stage.
    pub fn build(&self) -> Result<Ingest, IngestError> {
        self.preprocess
            .validate()
            .map_err(|e| IngestError::Config(format!("[preprocess]: {e}")))?;
        let src = &self.source;
        let base = self.base_dir.as_path();
        let fetcher = Fetcher::new(self.network.clone()).map_err(|source| IngestError::Io {
            path: "network runtime".into(),
            source,
        })?;
        let mut list: Vec<(String, String)> = Vec::new();
        match src.kind {
            SourceKind::Sa1b => {
                let links = src.links.as_deref().ok_or_else(|| {
                    IngestError::Config(
                        "kind = \"sa1b\" needs `links` (the SA-1B links TSV)".into(),
                    )
                })?;
                let links = resolve(links, base);
                let text = read_text(&fetcher, &links)?;
                list = parse_sa1b_links(&text, &links)?
                    .into_iter()
                    .map(|(name, url)| (name, resolve(&url, base)))
                    .collect();
                if !src.urls.is_empty() {
                    return Err(IngestError::Config(
                        "kind = \"sa1b\" takes `links`, not `urls`".into(),
                    ));
                }
            }
            SourceKind::Webdataset | SourceKind::Pd12m => {
                for pattern in &src.urls {
                    for u in brace_expand(pattern)? {
                        let url = resolve(&u, base);
                        list.push((name_of(&url), url));
                    }
                }
                if let Some(l) = &src.url_list {
                    let l = resolve(l, base);
                    let text = read_text(&fetcher, &l)?;
                    for url in parse_list(&text, &l, base)? {
                        list.push((name_of(&url), url));
                    }
                }
                if list.is_empty() {
                    return Err(IngestError::Config(
                        "no shards: give `urls` or `url_list`".into(),
                    ));
                }
            }
        }
        if let Some(n) = src.limit_shards {
            list.truncate(n);
        }
        let shards = list
            .into_iter()
            .enumerate()
            .map(|(index, (name, url))| Shard { index, url, name })
            .collect();
        let captions = match src.kind {
            SourceKind::Sa1b => self.caption_index(&fetcher)?,
            _ => None,
        };
        Ok(Ingest {
            cfg: self.clone(),
            shards,
            fetcher,
            cleaner: self.captions.build(),
            captions,
        })
    }

    /// The SA-1B caption index (built on first use), or `None` when the manifest gives
    /// no caption tar and does not require captions.
    fn caption_index(&self, fetcher: &Fetcher) -> Result<Option<CaptionIndex>, IngestError> {
        let src = &self.source;
        let Some(captions) = src.captions.as_deref() else {
            if src.require_caption {
                return Err(IngestError::Config(
                    "kind = \"sa1b\" needs `captions` (SA1B_caption.tar.gz), or require_caption = false".into(),
                ));
            }
            return Ok(None);
        };
        let captions = resolve(captions, &self.base_dir);
        let db = match &src.caption_db {
            Some(p) => resolve(p, &self.base_dir),
            None => {
                let stem = name_of(&captions);
                let stem = stem.split('.').next().unwrap_or("captions").to_string();
                self.base_dir
                    .join(format!("{stem}.captions.redb"))
                    .to_string_lossy()
                    .into_owned()
            }
        };
        let options = crate::caption::index::BuildOptions::new(captions.clone());
        let mut last_report = Instant::now();
        crate::caption::index::open_or_build(
            Path::new(&db),
            &options,
            || fetcher.open(&captions).map_err(std::io::Error::other),
            |p| {
                if last_report.elapsed().as_secs() >= 10 {
                    tracing::info!(db = %db, progress = ?p, "indexing captions");
                    last_report = Instant::now();
                }
            },
        )
        .map(Some)
        .map_err(|e| IngestError::Captions {
            db: db.clone(),
            why: e.to_string(),
        })
    }
}

fn read_text(fetcher: &Fetcher, url: &str) -> Result<String, IngestError> {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut fetcher.open(url)?, &mut s).map_err(|source| {
        IngestError::Io {
            path: url.to_string(),
            source,
        }
    })?;
    Ok(s)
}

impl Ingest {
    /// The shards, in manifest order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &IngestConfig {
        &self.cfg
    }

    /// The fetcher shards are opened with (e.g. to [`Fetcher::probe`] them first).
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// Streams `shards` (a subset of [`Ingest::shards`]) with up to
    /// `shards_in_flight` at once and reports every outcome to `on_event`, which is
    /// called from several threads; events of one shard arrive in order, its
    /// [`Event::ShardEnd`] last. `on_event` may block (backpressure). `stop` ends the
    /// run early: shards not started are not reported.
    pub fn run(
        &self,
        shards: &[Shard],
        stop: &AtomicBool,
        on_event: &(dyn Fn(Event) + Sync),
    ) -> Summary {
        let start = Instant::now();
        let next = AtomicUsize::new(0);
        let summary = std::sync::Mutex::new(Summary::default());
        let counted = |e: Event| {
            summary.lock().expect("summary").count(&e);
            on_event(e);
        };
        let workers = self
            .cfg
            .parallel
            .shards_in_flight
            .clamp(1, shards.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= shards.len() || stop.load(Ordering::SeqCst) {
                            break;
                        }
                        self.run_shard(&shards[i], &counted);
                    }
                });
            }
        });
        let mut s = summary.into_inner().expect("summary");
        s.seconds = start.elapsed().as_secs_f64();
        s
    }

    /// Streams one shard, reporting its samples in order and then its end.
    pub fn run_shard(&self, shard: &Shard, on_event: &(dyn Fn(Event) + Sync)) {
        let span = tracing::info_span!("shard", index = shard.index, name = %shard.name);
        let _enter = span.enter();
        let mut end = ShardEnd {
            shard: shard.index,
            kept: 0,
            skipped: 0,
            bytes: 0,
            retries: 0,
            error: None,
        };
        let stream = match self.fetcher.open(&shard.url) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(url = %shard.url, reason = e.reason(), "shard failed to open: {e}");
                end.error = Some(TarError::Source(e));
                on_event(Event::ShardEnd(end));
                return;
            }
        };
        let stats = stream.stats();
        let batch = self.cfg.parallel.decode_batch.max(1);
        let (tx, rx) = crossbeam_channel::bounded::<Vec<TarEvent>>(2);
        let result = std::thread::scope(|scope| {
            let reader = scope.spawn(move || {
                let sa1b = self.cfg.source.kind == SourceKind::Sa1b;
                let image_fields = &self.cfg.source.image_fields;
                let caption_field = self.caption_field();
                let ignore = |name: &str| sa1b && !name.to_ascii_lowercase().ends_with(".jpg");
                let load = |f: &str| {
                    image_fields.iter().any(|i| i == f) || caption_field.as_deref() == Some(f)
                };
                let opts = GroupOptions {
                    ignore: &ignore,
                    load: &load,
                    max_member_bytes: self.cfg.parallel.max_member_mib << 20,
                };
                let mut pending = Vec::with_capacity(batch);
                let r = read_samples(stream, &opts, |ev| {
                    pending.push(ev);
                    if pending.len() >= batch {
                        return tx
                            .send(std::mem::replace(&mut pending, Vec::with_capacity(batch)))
                            .is_ok();
                    }
                    true
                });
                if !pending.is_empty() {
                    let _ = tx.send(pending);
                }
                r
            });
            for events in rx {
                let outcomes: Vec<Event> = events
                    .into_par_iter()
                    .map(|ev| self.process(shard, ev))
                    .collect();
                for o in outcomes {
                    match &o {
                        Event::Sample(_) => end.kept += 1,
                        _ => end.skipped += 1,
                    }
                    on_event(o);
                }
            }
            reader.join().expect("tar reader thread panicked")
        });
        end.bytes = stats.bytes.load(Ordering::Relaxed);
        end.retries = stats.retries.load(Ordering::Relaxed);
        if let Err(e) = result {
            tracing::debug!(url = %shard.url, reason = e.reason(), kept = end.kept, "shard failed: {e}");
            end.error = Some(e);
        }
        on_event(Event::ShardEnd(end));
    }

    fn caption_field(&self) -> Option<String> {
        match (&self.cfg.source.caption_field, self.cfg.source.kind) {
            (Some(f), _) if f == "none" => None,
            (Some(f), _) => Some(f.to_lowercase()),
            (None, SourceKind::Sa1b) => None,
            (None, _) => Some("txt".into()),
        }
    }

    /// One raw sample -> kept or skipped (runs on the rayon pool).
    fn process(&self, shard: &Shard, ev: TarEvent) -> Event {
        let skip = |key: String, reason: &'static str, detail: String| {
            Event::Skip(Skip {
                shard: shard.index,
                key,
                reason,
                detail,
            })
        };
        let s: RawSample = match ev {
            TarEvent::Sample(s) => s,
            TarEvent::Duplicate { key, field } => {
                return skip(
                    key,
                    "duplicate_field",
                    format!("field `{field}` occurs twice in {}", shard.name),
                );
            }
        };
        let key = match self.cfg.source.kind {
            SourceKind::Sa1b => s.key.trim_start_matches("./").to_string(),
            _ => s.key.clone(),
        };
        let Some(image) = self
            .cfg
            .source
            .image_fields
            .iter()
            .find_map(|f| s.data.get(f))
        else {
            return skip(
                key,
                "missing_image",
                format!(
                    "no image field (looked for {:?})",
                    self.cfg.source.image_fields
                ),
            );
        };
        // caption: from a field, or from the SA-1B index
        let raw_caption: Option<Vec<u8>> = match (&self.captions, self.caption_field()) {
            // bytes, so that a caption that is not UTF-8 is counted as such by the cleaner
            (Some(index), _) => match index.get_bytes(&key) {
                Ok(c) => c,
                Err(e) => return skip(key, "caption_index", e.to_string()),
            },
            (None, Some(f)) => s.data.get(&f).cloned(),
            (None, None) => None,
        };
        let wants_caption = self.captions.is_some() || self.caption_field().is_some();
        let (caption, caption_raw) = match raw_caption {
            None if wants_caption && self.cfg.source.require_caption => {
                return skip(key, "missing_caption", "no caption for this sample".into());
            }
            None => (None, None),
            Some(bytes) => match self.cleaner.clean_bytes(&bytes) {
                crate::caption::CaptionOutcome::Clean(c) => {
                    (Some(c), Some(String::from_utf8_lossy(&bytes).into_owned()))
                }
                other => {
                    if self.cfg.source.require_caption {
                        return skip(
                            key,
                            other.reason(),
                            format!("caption: {}", other.reason().replace('_', " ")),
                        );
                    }
                    (None, Some(String::from_utf8_lossy(&bytes).into_owned()))
                }
            },
        };
        match preprocess(image, &self.cfg.preprocess) {
            Ok(p) => {
                let mut fields = s.fields;
                fields.sort();
                Event::Sample(Sample {
                    shard: shard.index,
                    key,
                    fields,
                    caption,
                    caption_raw,
                    orig_width: p.orig_width,
                    orig_height: p.orig_height,
                    rgb: p.rgb,
                    resolution: self.cfg.preprocess.resolution,
                })
            }
            Err(e) => skip(key, e.reason(), e.to_string()),
        }
    }
}

/// Shared handle so that a run can be stopped from a signal handler or another thread.
pub type StopFlag = Arc<AtomicBool>;
