//! The on-disk layout: keys, array definitions (sharding, codecs, chunk sizes) and part
//! names. `docs/store.md` describes the same layout for people and other readers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zarrs::array::CodecSpecificOptions;
use zarrs::array::codec::array_to_bytes::sharding::{ShardingCodecOptions, SubchunkWriteOrder};
use zarrs::array::codec::{Crc32cCodec, ZstdCodec};
use zarrs::array::{Array, ArrayBuilder, data_type};
use zarrs::storage::ReadableWritableListableStorageTraits;

use crate::spec::DType;

/// Arrays every part has besides the features: the sample key, the cleaned caption,
/// the raw caption (strings), and the original image size `[width, height]` (uint32).
pub const BUILTIN_ARRAYS: [&str; 4] = ["key", "caption", "caption_raw", "orig_size"];

/// Name of the group that holds the parts.
pub const PARTS_DIR: &str = "parts";

/// Name of the group that holds the embedding of the empty caption, one array per
/// feature array (see [`crate::null`]).
pub const NULL_DIR: &str = "null";

/// Attribute of the `null` group: `{caption: "", arrays: [...]}`.
pub const NULL_ATTR: &str = "tensorbake_null";

/// Attribute of the root group holding the [`crate::StoreSpec`] (+ layout).
pub const ROOT_ATTR: &str = "tensorbake";

/// Attribute of a part group holding `{source, samples, committed, ...}`.
pub const PART_ATTR: &str = "tensorbake_part";

/// Writer-side layout choices. They shape the arrays a writer creates (each array's
/// own `zarr.json` records them, so readers need none of this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreOptions {
    /// Target uncompressed bytes per Zarr shard (per array). Samples per shard is the
    /// largest power of two with `samples * sample_bytes <= shard_bytes`, clamped to
    /// `[1, max_shard_samples]`. Default 128 MiB: 64 SigLIP samples, 128 T5@120
    /// samples, 1024 SD latent moments at 512 px.
    #[serde(default = "default_shard_bytes")]
    pub shard_bytes: u64,
    /// Upper bound of samples per shard (default 1024).
    #[serde(default = "default_max_shard_samples")]
    pub max_shard_samples: u64,
    /// zstd level of inner chunks (default 3).
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
}

const fn default_shard_bytes() -> u64 {
    128 << 20
}
const fn default_max_shard_samples() -> u64 {
    1024
}
const fn default_zstd_level() -> i32 {
    3
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            shard_bytes: default_shard_bytes(),
            max_shard_samples: default_max_shard_samples(),
            zstd_level: default_zstd_level(),
        }
    }
}

impl StoreOptions {
    /// Checks each setting's range, naming the key of the first one outside it.
    ///
    /// # Errors
    /// A sentence such as "zstd_level 30 is outside zstd's levels -131072..=22".
    pub fn validate(&self) -> Result<(), String> {
        let levels = zstd::compression_level_range();
        if !levels.contains(&self.zstd_level) {
            return Err(format!(
                "zstd_level {} is outside zstd's levels {}..={} (default 3)",
                self.zstd_level,
                levels.start(),
                levels.end()
            ));
        }
        if self.shard_bytes == 0 {
            return Err("shard_bytes is 0 (default 134217728, 128 MiB)".into());
        }
        if self.max_shard_samples == 0 {
            return Err("max_shard_samples is 0 (default 1024)".into());
        }
        Ok(())
    }

    /// Samples per shard for an array whose samples take `sample_bytes` uncompressed.
    #[must_use]
    pub fn shard_samples(&self, sample_bytes: u64) -> u64 {
        let fit = (self.shard_bytes / sample_bytes.max(1)).max(1);
        let pow2 = 1u64 << (63 - fit.leading_zeros());
        pow2.clamp(1, self.max_shard_samples.max(1))
    }
}

/// What one array of a part holds per sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrayKind {
    /// Fixed-size numeric samples.
    Fixed {
        /// Element type.
        dtype: DType,
        /// Per-sample shape.
        shape: Vec<u64>,
    },
    /// One UTF-8 string per sample (`string` data type, `vlen-utf8` codec).
    Str,
}

impl ArrayKind {
    /// Uncompressed bytes per sample (strings: a nominal 256, for shard sizing).
    #[must_use]
    pub fn sample_bytes(&self) -> u64 {
        match self {
            Self::Fixed { dtype, shape } => shape.iter().product::<u64>() * dtype.size() as u64,
            Self::Str => 256,
        }
    }
}

/// Key of a part's directory: `parts/<part>`.
#[must_use]
pub fn part_prefix(part: &str) -> String {
    format!("{PARTS_DIR}/{part}")
}

/// Zarr path (`/parts/<part>/<array>`) of an array.
#[must_use]
pub fn array_path(part: &str, array: &str) -> String {
    format!("/{PARTS_DIR}/{part}/{array}")
}

/// Zarr path (`/null/<array>`) of the null embedding of a feature array.
#[must_use]
pub fn null_array_path(array: &str) -> String {
    format!("/{NULL_DIR}/{array}")
}

/// Builds the (unsaved) zarrs array of `kind` with `samples` rows at `path`.
///
/// Chunk grid: shards of `shard_samples` whole samples; inner chunk = one sample;
/// inner codecs `bytes` (or `vlen-utf8`) -> `zstd` -> `crc32c`; shard index
/// `bytes` -> `crc32c` at the end of the shard.
///
/// # Errors
/// Any zarrs error building the metadata.
pub fn build_array(
    storage: Arc<dyn ReadableWritableListableStorageTraits>,
    path: &str,
    kind: &ArrayKind,
    samples: u64,
    shard_samples: u64,
    options: &StoreOptions,
) -> Result<Array<dyn ReadableWritableListableStorageTraits>, zarrs::array::ArrayCreateError> {
    let (dt, fill, per_sample): (
        zarrs::array::DataType,
        zarrs::array::builder::ArrayBuilderFillValue,
        &[u64],
    ) = match kind {
        ArrayKind::Fixed { dtype, shape } => {
            let dt = match dtype {
                DType::Bf16 => data_type::bfloat16(),
                DType::F16 => data_type::float16(),
                DType::F32 => data_type::float32(),
                DType::U16 => data_type::uint16(),
                DType::U32 => data_type::uint32(),
            };
            let fill = match dtype {
                DType::Bf16 => half::bf16::ZERO.into(),
                DType::F16 => half::f16::ZERO.into(),
                DType::F32 => 0f32.into(),
                DType::U16 => 0u16.into(),
                DType::U32 => 0u32.into(),
            };
            (dt, fill, shape.as_slice())
        }
        ArrayKind::Str => (data_type::string(), "".into(), &[]),
    };
    let mut shape = vec![samples];
    shape.extend_from_slice(per_sample);
    let mut shard = vec![shard_samples];
    shard.extend_from_slice(per_sample);
    let mut inner = vec![1u64];
    inner.extend_from_slice(per_sample);
    // Scalars per sample still need a non-empty chunk along axis 0 only.
    let mut builder = ArrayBuilder::new(shape, shard, dt, fill);
    builder.subchunk_shape(inner).bytes_to_bytes_codecs(vec![
        Arc::new(ZstdCodec::new(options.zstd_level, false)),
        Arc::new(Crc32cCodec::new()),
    ]);
    // Inner chunks are encoded in parallel; laying them out in C order (not in the
    // order they finish) makes a shard's bytes a function of its data alone, so the
    // same samples written twice (a resumed run, another rank) are the same file.
    builder.codec_specific_options(CodecSpecificOptions::default().with_option(
        ShardingCodecOptions::default().with_subchunk_write_order(SubchunkWriteOrder::C),
    ));
    builder.build(storage, path)
}

/// Checks that `name` is a safe single path component: `[A-Za-z0-9._-]`, not empty,
/// not starting with `.`, at most 128 bytes.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn check_component(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > 128 {
        return Err("longer than 128 bytes".into());
    }
    if name.starts_with('.') {
        return Err("starts with '.'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!("contains {c:?} (allowed: A-Z a-z 0-9 _ - .)"));
    }
    Ok(())
}

/// The part name for a source shard URL: its basename without extensions, reduced to
/// `[A-Za-z0-9_-]` (at most 64 bytes), then `-` and the first 12 hex digits of the
/// sha256 of the whole URL. Stable (same URL, same name), safe as a path component
/// and an S3 key, unique enough (48 bits of hash) that two shards with the same
/// basename from different places never share a part.
///
/// `https://host/pd12m/00042.tar?sig=x` -> `00042-<hash>`, `sa_000020.tar` ->
/// `sa_000020-<hash>`.
#[must_use]
pub fn part_name_for_source(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or(url);
    let base = without_query
        .trim_end_matches('/')
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or("");
    let stem = base.split('.').next().unwrap_or("");
    let mut clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    clean.truncate(64);
    let clean = clean.trim_matches('-').to_string();
    let hash = hex::encode(Sha256::digest(url.as_bytes()));
    if clean.is_empty() {
        format!("part-{}", &hash[..12])
    } else {
        format!("{clean}-{}", &hash[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_are_stable_safe_and_distinct() {
        let a = part_name_for_source("https://host/pd12m/00042.tar?sig=abc");
        assert!(a.starts_with("00042-"), "{a}");
        assert_eq!(a.len(), "00042-".len() + 12);
        assert_eq!(
            a,
            part_name_for_source("https://host/pd12m/00042.tar?sig=abc")
        );
        // Same basename elsewhere: another part.
        assert_ne!(
            a,
            part_name_for_source("https://other/pd12m/00042.tar?sig=abc")
        );
        let b = part_name_for_source("s3://bucket/sa-1b/sa_000020.tar.gz");
        assert!(b.starts_with("sa_000020-"), "{b}");
        let c = part_name_for_source("/data/weird name (1).tar");
        assert!(c.starts_with("weird_name__1_-"), "{c}");
        check_component(&c).unwrap();
        let d = part_name_for_source("https://host/");
        assert!(d.starts_with("host-"), "{d}");
        let e = part_name_for_source("");
        assert!(e.starts_with("part-"), "{e}");
        check_component(&e).unwrap();
    }

    #[test]
    fn shard_sizes_follow_the_design() {
        let o = StoreOptions::default();
        assert_eq!(o.shard_samples(729 * 1152 * 2), 64); // SigLIP bf16
        assert_eq!(o.shard_samples(120 * 4096 * 2), 128); // T5@120 bf16
        assert_eq!(o.shard_samples(4 * 64 * 64 * 4), 1024); // SD mean f32 = 64 KiB
        assert_eq!(o.shard_samples(8), 1024); // orig_size
        assert_eq!(o.shard_samples(u64::MAX), 1);
        let small = StoreOptions {
            shard_bytes: 100,
            ..StoreOptions::default()
        };
        assert_eq!(small.shard_samples(30), 2);
    }
}
