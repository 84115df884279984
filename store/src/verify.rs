//! Checking a store's bytes: every shard of every array of every committed part is
//! read whole; its index checksum, every index entry's bounds and every inner chunk's
//! crc32c are checked, and shards that should exist but do not are reported. The
//! recorded null embeddings (`null/<array>`) are checked the same way.

use serde::Serialize;

use crate::layout::{self, ArrayKind, NULL_DIR};
use crate::location::{Backend, Location};
use crate::null::null_kind;
use crate::reader::StoreReader;
use crate::{Result, StoreError};

/// A committed part with problems.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DamagedPart {
    /// Part name.
    pub part: String,
    /// Source shard the part was made from (re-run it after deleting the part).
    pub source: String,
    /// One sentence per problem, naming the shard key.
    pub problems: Vec<String>,
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Committed parts checked.
    pub parts_checked: usize,
    /// Shard files checked.
    pub shards_checked: u64,
    /// Inner chunks whose checksum was checked.
    pub chunks_checked: u64,
    /// Parts with at least one problem.
    pub damaged: Vec<DamagedPart>,
    /// Empty-caption embedding arrays (`null/<array>`) checked.
    pub null_arrays_checked: usize,
    /// Problems of the null-embedding arrays, one sentence each naming the key.
    pub null_problems: Vec<String>,
}

impl VerifyReport {
    /// Whether no damage was found.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.damaged.is_empty() && self.null_problems.is_empty()
    }
}

/// Layout facts of an array read from its `zarr.json`.
struct ShardLayout {
    samples: u64,
    shard_samples: u64,
    inner_per_shard: u64,
    separator: String,
    dims: usize,
    inner_crc: bool,
}

fn parse_layout(doc: &serde_json::Value) -> std::result::Result<ShardLayout, String> {
    let shape = doc["shape"].as_array().ok_or("no shape")?;
    let samples = shape
        .first()
        .and_then(serde_json::Value::as_u64)
        .ok_or("empty shape")?;
    let outer: Vec<u64> = doc["chunk_grid"]["configuration"]["chunk_shape"]
        .as_array()
        .ok_or("no regular chunk grid")?
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect();
    let codecs = doc["codecs"].as_array().ok_or("no codecs")?;
    let sharding = codecs
        .iter()
        .find(|c| c["name"] == "sharding_indexed")
        .ok_or("not sharded (no sharding_indexed codec)")?;
    let cfg = &sharding["configuration"];
    let inner: Vec<u64> = cfg["chunk_shape"]
        .as_array()
        .ok_or("no inner chunk_shape")?
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect();
    if inner.len() != outer.len() || inner.contains(&0) || outer.contains(&0) {
        return Err(format!(
            "inner chunk shape {inner:?} does not fit shard shape {outer:?}"
        ));
    }
    if cfg["index_location"].as_str().unwrap_or("end") != "end" {
        return Err("shard index is not at the end".into());
    }
    let index_codecs = cfg["index_codecs"].as_array().ok_or("no index_codecs")?;
    if index_codecs.len() != 2
        || index_codecs[0]["name"] != "bytes"
        || index_codecs[1]["name"] != "crc32c"
    {
        return Err("shard index codecs are not [bytes, crc32c]".into());
    }
    let inner_codecs = cfg["codecs"].as_array().ok_or("no inner codecs")?;
    let inner_crc = inner_codecs.last().is_some_and(|c| c["name"] == "crc32c");
    let inner_per_shard = outer.iter().zip(&inner).map(|(o, i)| o / i).product();
    let separator = doc["chunk_key_encoding"]["configuration"]["separator"]
        .as_str()
        .unwrap_or("/")
        .to_string();
    if doc["chunk_key_encoding"]["name"] != "default" {
        return Err("chunk key encoding is not `default`".into());
    }
    Ok(ShardLayout {
        samples,
        shard_samples: outer[0],
        inner_per_shard,
        separator,
        dims: outer.len(),
        inner_crc,
    })
}

/// Checks one shard's bytes; returns (inner chunks checked, problems).
fn check_shard(bytes: &[u8], layout: &ShardLayout) -> (u64, Vec<String>) {
    let n = usize::try_from(layout.inner_per_shard).unwrap_or(usize::MAX);
    let index_len = n.saturating_mul(16).saturating_add(4);
    if bytes.len() < index_len {
        return (
            0,
            vec![format!(
                "{} bytes, shorter than its {index_len}-byte index (truncated)",
                bytes.len()
            )],
        );
    }
    let data_end = bytes.len() - index_len;
    let index = &bytes[data_end..bytes.len() - 4];
    let stored = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap_or([0; 4]));
    if crc32c::crc32c(index) != stored {
        return (
            0,
            vec!["shard index checksum mismatch (truncated or overwritten)".into()],
        );
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    for (i, entry) in index.chunks_exact(16).enumerate() {
        let offset = u64::from_le_bytes(entry[..8].try_into().unwrap_or([0; 8]));
        let len = u64::from_le_bytes(entry[8..].try_into().unwrap_or([0; 8]));
        if offset == u64::MAX && len == u64::MAX {
            continue; // absent inner chunk = fill value
        }
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > data_end as u64) || len < 4 {
            problems.push(format!(
                "inner chunk {i} at {offset}+{len} lies outside the shard data ({data_end} bytes)"
            ));
            continue;
        }
        let (o, l) = (offset as usize, len as usize);
        let chunk = &bytes[o..o + l];
        if layout.inner_crc {
            let want = u32::from_le_bytes(chunk[l - 4..].try_into().unwrap_or([0; 4]));
            if crc32c::crc32c(&chunk[..l - 4]) != want {
                problems.push(format!("inner chunk {i} checksum mismatch"));
            }
            checked += 1;
        }
    }
    (checked, problems)
}

/// Checks the metadata and every shard of the array under `prefix` (`parts/<part>/<name>`
/// or `null/<name>`), which must hold `samples` rows of `kind`; returns the problems.
fn check_array(
    backend: &Backend,
    prefix: &str,
    kind: &ArrayKind,
    samples: u64,
    report: &mut VerifyReport,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let meta_key = format!("{prefix}/zarr.json");
    let doc = match backend.get_json(&meta_key) {
        Ok(Some(doc)) => doc,
        Ok(None) => {
            problems.push(format!("{meta_key}: missing"));
            return Ok(problems);
        }
        Err(StoreError::Metadata { reason, .. }) => {
            problems.push(format!("{meta_key}: {reason}"));
            return Ok(problems);
        }
        Err(e) => return Err(e),
    };
    let layout = match parse_layout(&doc) {
        Ok(l) => l,
        Err(reason) => {
            problems.push(format!("{meta_key}: {reason}"));
            return Ok(problems);
        }
    };
    let want_dims = match kind {
        ArrayKind::Fixed { shape, .. } => shape.len() + 1,
        ArrayKind::Str => 1,
    };
    if layout.dims != want_dims {
        problems.push(format!(
            "{meta_key}: {} dimensions, expected {want_dims}",
            layout.dims
        ));
        return Ok(problems);
    }
    if layout.samples != samples {
        problems.push(format!(
            "{meta_key}: {} samples but {samples} expected",
            layout.samples
        ));
    }
    let shards = layout.samples.div_ceil(layout.shard_samples);
    for s in 0..shards {
        let mut key = format!("{prefix}/c{}{s}", layout.separator);
        for _ in 1..layout.dims {
            key.push_str(&layout.separator);
            key.push('0');
        }
        report.shards_checked += 1;
        match backend.get(&key)? {
            None => problems.push(format!("{key}: missing shard")),
            Some(bytes) => {
                let (checked, found) = check_shard(&bytes, &layout);
                report.chunks_checked += checked;
                problems.extend(found.into_iter().map(|p| format!("{key}: {p}")));
            }
        }
    }
    Ok(problems)
}

/// Verifies every shard of every committed part of the store at `location`, and the
/// recorded null embeddings under `null/`.
///
/// # Errors
/// Only when the store cannot be opened or listed; damage is reported, not raised.
pub fn verify(location: &Location) -> Result<VerifyReport> {
    let reader = StoreReader::open(location)?;
    let backend = reader.backend();
    let mut report = VerifyReport {
        parts_checked: reader.committed().len(),
        ..VerifyReport::default()
    };
    for part in reader.committed() {
        let mut problems = Vec::new();
        for (name, kind) in reader.array_kinds() {
            let prefix = format!("{}/{name}", layout::part_prefix(&part.name));
            problems.extend(check_array(
                backend,
                &prefix,
                kind,
                part.meta.samples,
                &mut report,
            )?);
        }
        if !problems.is_empty() {
            tracing::warn!(part = %part.name, problems = problems.len(), "damaged part");
            report.damaged.push(DamagedPart {
                part: part.name.clone(),
                source: part.meta.source.clone(),
                problems,
            });
        }
    }
    for name in reader.null_embeddings()? {
        let kind = null_kind(backend, reader.spec(), &name)?;
        let prefix = format!("{NULL_DIR}/{name}");
        let problems = check_array(backend, &prefix, &kind, 1, &mut report)?;
        report.null_arrays_checked += 1;
        if !problems.is_empty() {
            tracing::warn!(array = %name, problems = problems.len(), "damaged null embedding");
        }
        report.null_problems.extend(problems);
    }
    Ok(report)
}
