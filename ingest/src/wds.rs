//! Tar streams to samples, by the WebDataset rule.
//!
//! The rule is the Python `webdataset` library's (`base_plus_ext` + `group_by_keys`):
//! a member's name splits into a key and a field by the regex
//! `^((?:.*/|)[^.]+)[.]([^/]*)$` — the key is the directory plus the basename up to
//! its first dot, the field is the rest, lower-cased; names that do not match (no dot,
//! or a top-level name that starts with a dot) are skipped; the regex's backtracking
//! gives `dir/.x` the key `dir/` and the field `x`, and so does this. Consecutive
//! members with the same key form one sample. Only regular files count; metadata
//! members (`__name__`) are skipped. A field seen twice in one sample is an error for
//! that sample. A gzip stream is detected by its magic bytes, whatever the name.
//!
//! Members are read one at a time from the stream; the bytes of a member are only
//! held when the caller wants that field ([`GroupOptions::load`]), so a large member
//! (SA-1B's mask `.json`) streams past without being buffered.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read};

use crate::source::SourceError;

/// Splits a member name into (key, field) as `webdataset.tariterators.base_plus_ext`
/// does, before lower-casing. `None` for names the library skips.
pub fn split_key(name: &str) -> Option<(&str, &str)> {
    // The regex tries the longest directory prefix first (greedy `.*/`), then shorter
    // ones; after the prefix, `[^.]+` runs to the first dot, and the field after that
    // dot must hold no '/'.
    let bytes = name.as_bytes();
    let mut starts: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .map(|(i, _)| i + 1)
        .collect();
    starts.reverse();
    starts.push(0);
    for start in starts {
        let Some(rel) = name[start..].find('.') else {
            continue;
        };
        let dot = start + rel;
        if dot == start {
            continue;
        }
        let field = &name[dot + 1..];
        if field.contains('/') {
            continue;
        }
        return Some((&name[..dot], field));
    }
    None
}

/// Whether `webdataset` skips a member as metadata (`__name__` at the top level, or
/// the `skip_meta` pattern `__[^/]*__($|/)`).
fn is_meta(name: &str) -> bool {
    let first = name.split('/').next().unwrap_or("");
    first.len() >= 4 && first.starts_with("__") && first.ends_with("__")
}

/// One sample: a key and its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    /// The WebDataset key (directory components + basename up to the first dot).
    pub key: String,
    /// Every field name of the sample, lower-cased, in member order.
    pub fields: Vec<String>,
    /// The bytes of the fields that were loaded.
    pub data: BTreeMap<String, Vec<u8>>,
}

/// What a tar stream yields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEvent {
    /// A complete sample.
    Sample(RawSample),
    /// A sample dropped because a field occurred twice (`webdataset` raises
    /// "duplicate file name in tar file").
    Duplicate {
        /// The sample key.
        key: String,
        /// The repeated field.
        field: String,
    },
}

/// How members become samples.
pub struct GroupOptions<'a> {
    /// Members for which this returns true take no part in grouping at all (the
    /// SA-1B adapter ignores everything but `.jpg`). Receives the raw member name.
    pub ignore: &'a dyn Fn(&str) -> bool,
    /// Whether a field's bytes are loaded (others are streamed past).
    pub load: &'a dyn Fn(&str) -> bool,
    /// A member larger than this is an error for its sample (bytes).
    pub max_member_bytes: u64,
}

/// A whole shard could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The network source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The gzip layer is corrupt.
    #[error("corrupt gzip stream after {samples} samples: {source}")]
    CorruptGzip {
        /// Samples delivered before the error.
        samples: u64,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// The stream ended inside a member or header.
    #[error("truncated tar after {samples} samples: {source}")]
    Truncated {
        /// Samples delivered before the error.
        samples: u64,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// A header or member is malformed.
    #[error("corrupt tar after {samples} samples: {source}")]
    Corrupt {
        /// Samples delivered before the error.
        samples: u64,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// The consumer asked to stop.
    #[error("stopped by the consumer")]
    Stopped,
}

impl TarError {
    /// A short snake_case reason for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Source(e) => e.reason(),
            Self::CorruptGzip { .. } => "corrupt_gzip",
            Self::Truncated { .. } => "truncated_tar",
            Self::Corrupt { .. } => "corrupt_tar",
            Self::Stopped => "stopped",
        }
    }
}

/// Counters of one tar stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TarStats {
    /// Regular members seen.
    pub members: u64,
    /// Samples delivered.
    pub samples: u64,
    /// Whether the stream was gzip.
    pub gzip: bool,
}

/// Reads `reader` (tar or tar.gz) and calls `sink` for every event, in order. `sink`
/// returns `false` to stop early.
pub fn read_samples(
    reader: impl Read,
    opts: &GroupOptions<'_>,
    mut sink: impl FnMut(TarEvent) -> bool,
) -> Result<TarStats, TarError> {
    let mut buffered = BufReader::with_capacity(256 * 1024, reader);
    let head = buffered.fill_buf().map_err(|e| classify(e, false, 0))?;
    let gzip = head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b;
    let stream: Box<dyn Read> = if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    let mut stats = TarStats {
        gzip,
        ..TarStats::default()
    };
    let mut archive = tar::Archive::new(stream);
    let entries = archive.entries().map_err(|e| classify(e, gzip, 0))?;

    // The sample being assembled, and whether it is poisoned by a duplicate field.
    let mut current: Option<(RawSample, Option<String>)> = None;
    let mut emit = |cur: Option<(RawSample, Option<String>)>, stats: &mut TarStats| -> bool {
        match cur {
            None => true,
            Some((s, None)) => {
                stats.samples += 1;
                sink(TarEvent::Sample(s))
            }
            Some((s, Some(field))) => sink(TarEvent::Duplicate { key: s.key, field }),
        }
    };
    for entry in entries {
        let mut entry = entry.map_err(|e| classify(e, gzip, stats.samples))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        stats.members += 1;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if is_meta(&name) || (opts.ignore)(&name) {
            continue;
        }
        let Some((key, field)) = split_key(&name) else {
            continue;
        };
        let field = field.to_lowercase();
        if current.as_ref().is_none_or(|(s, _)| s.key != key) {
            if !emit(current.take(), &mut stats) {
                return Err(TarError::Stopped);
            }
            current = Some((
                RawSample {
                    key: key.to_string(),
                    fields: Vec::new(),
                    data: BTreeMap::new(),
                },
                None,
            ));
        }
        let (sample, dup) = current.as_mut().expect("set above");
        if sample.fields.contains(&field) {
            dup.get_or_insert(field);
            continue;
        }
        if (opts.load)(&field) && dup.is_none() {
            let size = entry.header().size().unwrap_or(0);
            if size > opts.max_member_bytes {
                return Err(TarError::Corrupt {
                    samples: stats.samples,
                    source: io::Error::other(format!(
                        "member {name} is {size} bytes, over the limit of {}",
                        opts.max_member_bytes
                    )),
                });
            }
            let mut data = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut data)
                .map_err(|e| classify(e, gzip, stats.samples))?;
            sample.data.insert(field.clone(), data);
        }
        sample.fields.push(field);
    }
    if !emit(current.take(), &mut stats) {
        return Err(TarError::Stopped);
    }
    Ok(stats)
}

/// Maps an I/O error from the source / gzip / tar layers to what went wrong.
fn classify(e: io::Error, gzip: bool, samples: u64) -> TarError {
    if e.get_ref().is_some_and(|inner| inner.is::<SourceError>()) {
        let inner = e
            .into_inner()
            .expect("checked")
            .downcast::<SourceError>()
            .expect("checked");
        return TarError::Source(*inner);
    }
    let msg = e.to_string();
    if e.kind() == io::ErrorKind::UnexpectedEof
        || msg.contains("entire block")
        || msg.contains("unexpected EOF")
    {
        return TarError::Truncated { samples, source: e };
    }
    if gzip
        && (e.kind() == io::ErrorKind::InvalidInput
            || e.kind() == io::ErrorKind::InvalidData
            || msg.contains("deflate")
            || msg.contains("gzip"))
    {
        return TarError::CorruptGzip { samples, source: e };
    }
    TarError::Corrupt { samples, source: e }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_split_matches_the_webdataset_regex() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("a.jpg", Some(("a", "jpg"))),
            ("a.seg.png", Some(("a", "seg.png"))),
            ("dir/x.y/b.JPG", Some(("dir/x.y/b", "JPG"))),
            ("./sa_1.jpg", Some(("./sa_1", "jpg"))),
            ("noext", None),
            (".hidden.txt", None),
            // the regex backtracks to a shorter directory prefix (values from
            // webdataset 1.0.2's base_plus_ext)
            ("dir/.hidden", Some(("dir/", "hidden"))),
            ("dir/sub/.x", Some(("dir/sub/", "x"))),
            ("x/.y.z", Some(("x/", "y.z"))),
            ("a/b.c/d.e", Some(("a/b.c/d", "e"))),
            ("a.b.c/d", None),
            ("a.", Some(("a", ""))),
            ("dir.v1/a", None),
        ];
        for (name, want) in cases {
            assert_eq!(split_key(name), *want, "{name}");
        }
        assert!(
            is_meta("__index__")
                && is_meta("__x__/y.txt")
                && !is_meta("__x_.txt")
                && !is_meta("a/__b__")
        );
    }

    fn tar_of(members: &[(&str, &[u8])], gzip: bool) -> Vec<u8> {
        let dir =
            std::env::temp_dir().join(format!("tb-wds-{}-{}", std::process::id(), members.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(if gzip { "t.tar.gz" } else { "t.tar" });
        let owned: Vec<(String, Vec<u8>)> = members
            .iter()
            .map(|(n, d)| (n.to_string(), d.to_vec()))
            .collect();
        tensorbake_kit::synth::write_tar(&p, &owned, gzip).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        bytes
    }

    fn collect(
        bytes: &[u8],
        load: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<TarEvent>, TarStats), TarError> {
        let opts = GroupOptions {
            ignore: &|_| false,
            load,
            max_member_bytes: 1 << 30,
        };
        let mut ev = Vec::new();
        let stats = read_samples(bytes, &opts, |e| {
            ev.push(e);
            true
        })?;
        Ok((ev, stats))
    }

    #[test]
    fn groups_consecutive_members_and_poisons_duplicates() {
        let t = tar_of(
            &[
                ("a.jpg", b"A"),
                ("a.TXT", b"cap a"),
                ("b.jpg", b"B"),
                ("b.jpg", b"B2"),
                ("c.jpg", b"C"),
                ("__meta__", b"m"),
                ("a.json", b"{}"),
            ],
            true,
        );
        let (ev, stats) = collect(&t, &|f| f != "json").unwrap();
        assert!(stats.gzip);
        assert_eq!(stats.samples, 3);
        let TarEvent::Sample(a) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (a.key.as_str(), a.fields.clone()),
            ("a", vec!["jpg".to_string(), "txt".to_string()])
        );
        assert_eq!(a.data["txt"], b"cap a");
        assert_eq!(
            ev[1],
            TarEvent::Duplicate {
                key: "b".into(),
                field: "jpg".into()
            }
        );
        // a later `a` is a new sample, as in webdataset; json listed but not loaded
        let TarEvent::Sample(a2) = &ev[3] else {
            panic!()
        };
        assert_eq!(a2.fields, vec!["json"]);
        assert!(a2.data.is_empty());
    }

    #[test]
    fn truncated_and_corrupt_streams_are_classified() {
        let big = vec![7u8; 200_000];
        let t = tar_of(&[("a.jpg", &big), ("b.jpg", &big)], false);
        let cut = &t[..300_000];
        let err = collect(cut, &|_| true).unwrap_err();
        assert_eq!(err.reason(), "truncated_tar", "{err}");
        assert!(err.to_string().contains("after 1 samples"), "{err}");
        let gz = tar_of(&[("a.jpg", &big), ("b.jpg", &big)], true);
        let mut bad = gz.clone();
        for b in bad.iter_mut().skip(40).take(200) {
            *b ^= 0x5a;
        }
        let err = collect(&bad, &|_| true).unwrap_err();
        assert_eq!(err.reason(), "corrupt_gzip", "{err}");
        let err = collect(&gz[..gz.len() / 2], &|_| true).unwrap_err();
        assert_eq!(err.reason(), "truncated_tar", "{err}");
    }
}
