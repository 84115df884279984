//! Rows of the layout's arrays decoded without zarrs' codec pipeline.
//!
//! Every numeric array tensorbake writes is sharded with one sample per inner chunk
//! and the inner codecs `bytes` (little-endian) -> `zstd` -> `crc32c` (see
//! [`crate::layout::build_array`]). zarrs decodes such a chunk through three buffers (the
//! read, the checksum codec's copy, the zstd output) and creates a zstd context for every
//! chunk, whose CPU-feature probe traps to the hypervisor in a VM. Here the shard index
//! is read once per shard (crc32c checked) and the chunk's bytes come from zarrs'
//! storage, as before; the checksum is checked in place and the frame is decompressed by a
//! thread-local zstd context straight into the caller's buffer. Arrays with any other
//! codec chain, and absent inner chunks (the fill value), take zarrs' path.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zarrs::array::{ArrayError, ArrayShardedReadableExtCache, CodecError};
use zarrs::storage::ReadableWritableListableStorageTraits;
use zarrs::storage::byte_range::ByteRange;
use zstd::zstd_safe::WriteBuf;

use crate::reader::OpenArray;

type ZarrsArray = zarrs::array::Array<dyn ReadableWritableListableStorageTraits>;

/// Samples per shard if `array` has exactly the layout's codecs (and this host is
/// little-endian, so the stored bytes are the in-memory ones); `None` otherwise.
pub(crate) fn shard_samples(
    array: &ZarrsArray,
    cache: &ArrayShardedReadableExtCache,
) -> Option<u64> {
    if cfg!(target_endian = "big") || !cache.array_is_exclusively_sharded() {
        return None;
    }
    let meta = serde_json::to_value(array.metadata()).ok()?;
    let codecs = meta.get("codecs")?.as_array()?;
    let [sharding] = codecs.as_slice() else {
        return None;
    };
    if sharding.get("name")?.as_str()? != "sharding_indexed" {
        return None;
    }
    let config = sharding.get("configuration")?;
    let inner: Vec<&str> = config
        .get("codecs")?
        .as_array()?
        .iter()
        .map(|c| c.get("name").and_then(serde_json::Value::as_str))
        .collect::<Option<_>>()?;
    let bytes_endian = config
        .get("codecs")?
        .get(0)?
        .get("configuration")
        .and_then(|c| c.get("endian"));
    let little = bytes_endian.is_none_or(|e| e.as_str() == Some("little"));
    let crc_at_end = config
        .get("codecs")?
        .get(2)
        .and_then(|c| c.get("configuration"))
        .and_then(|c| c.get("location"))
        .is_none_or(|l| l.as_str() == Some("end"));
    let one_sample = config.get("chunk_shape")?.get(0)?.as_u64()? == 1;
    if inner != ["bytes", "zstd", "crc32c"] || !little || !crc_at_end || !one_sample {
        return None;
    }
    let grid = meta.get("chunk_grid")?;
    if grid.get("name")?.as_str()? != "regular" {
        return None;
    }
    grid.get("configuration")?
        .get("chunk_shape")?
        .get(0)?
        .as_u64()
}

thread_local! {
    /// One zstd decompression context per thread, made on first use.
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Absent inner chunks are `u64::MAX` in both words of their index entry.
const ABSENT: u64 = u64::MAX;

/// The direct path's view of one array: its shard length and the shard indexes read
/// so far (`[offset, size]` per inner chunk; `None` for a shard file that is absent).
/// zarrs' own byte-range lookup overflows on absent inner chunks, so the index is read
/// here: the last `16 * shard_samples + 4` bytes of the shard, crc32c checked.
pub(crate) struct Direct {
    shard_samples: u64,
    indexes: Mutex<HashMap<u64, Option<Arc<[u64]>>>>,
}

impl Direct {
    pub(crate) fn new(shard_samples: u64) -> Self {
        Self {
            shard_samples,
            indexes: Mutex::new(HashMap::new()),
        }
    }

    fn index(&self, array: &ZarrsArray, shard: &[u64]) -> Result<Option<Arc<[u64]>>, ArrayError> {
        if let Some(hit) = self
            .indexes
            .lock()
            .ok()
            .and_then(|m| m.get(&shard[0]).cloned())
        {
            return Ok(hit);
        }
        let entries = usize::try_from(self.shard_samples * 2).unwrap_or(usize::MAX);
        let len = entries as u64 * 8 + 4;
        let read = array
            .storage()
            .get_partial(&array.chunk_key(shard), ByteRange::Suffix(len))?;
        let index = match read {
            None => None,
            Some(bytes) => {
                let words = checked(&bytes, || "shard index".to_string())?;
                if words.len() != entries * 8 {
                    return Err(ArrayError::CodecError(CodecError::Other(format!(
                        "shard index is {} bytes, expected {}",
                        words.len(),
                        entries * 8
                    ))));
                }
                let parsed: Vec<u64> = words
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                    .collect();
                Some(Arc::from(parsed))
            }
        };
        if let Ok(mut m) = self.indexes.lock() {
            m.insert(shard[0], index.clone());
        }
        Ok(index)
    }
}

fn codec_io(e: std::io::Error) -> ArrayError {
    ArrayError::CodecError(CodecError::IOError(Arc::new(e)))
}

/// `bytes` without its trailing crc32c, which must match; `what` names them in the
/// error (made only on failure: this runs for every read).
fn checked(bytes: &[u8], what: impl FnOnce() -> String) -> Result<&[u8], ArrayError> {
    let Some(split) = bytes.len().checked_sub(4) else {
        return Err(ArrayError::CodecError(CodecError::Other(format!(
            "{} is {} bytes, shorter than its crc32c",
            what(),
            bytes.len()
        ))));
    };
    let (data, stored) = bytes.split_at(split);
    if crc32c::crc32c(data).to_le_bytes() != stored {
        return Err(ArrayError::CodecError(CodecError::InvalidChecksum));
    }
    Ok(data)
}

/// Decodes row `row` of `open` (an array [`shard_samples`] accepted) into `out`, a
/// `[u8]` (written from its start) or a `Vec<u8>` (appended to its spare capacity,
/// which must hold the row). Returns the bytes written, or `None` when the row is an
/// absent inner chunk or in an absent shard (the caller takes zarrs' path, which
/// writes the fill value or reports the missing shard).
///
/// # Errors
/// Storage errors; [`CodecError::InvalidChecksum`] for bytes that fail their crc32c;
/// zstd's error for a frame that does not decode or does not fit `out`.
pub(crate) fn decode_row<C: WriteBuf + ?Sized>(
    open: &OpenArray,
    direct: &Direct,
    row: u64,
    out: &mut C,
) -> Result<Option<usize>, ArrayError> {
    let array = &open.array;
    let mut shard = vec![0u64; array.dimensionality()];
    shard[0] = row / direct.shard_samples;
    let Some(index) = direct.index(array, &shard)? else {
        return Ok(None);
    };
    let slot = usize::try_from(row % direct.shard_samples).unwrap_or(usize::MAX) * 2;
    let (offset, size) = (index[slot], index[slot + 1]);
    if offset == ABSENT && size == ABSENT {
        return Ok(None);
    }
    let range = ByteRange::FromStart(offset, Some(size));
    let Some(encoded) = array
        .storage()
        .get_partial(&array.chunk_key(&shard), range)?
    else {
        return Ok(None);
    };
    let frame = checked(&encoded, || format!("inner chunk of row {row}"))?;
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = match &mut *slot {
            Some(d) => d,
            empty => empty.insert(zstd::bulk::Decompressor::new().map_err(codec_io)?),
        };
        dctx.decompress_to_buffer(frame, out)
            .map(Some)
            .map_err(codec_io)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use zarrs::array::codec::ZstdCodec;
    use zarrs::array::{ArrayBuilder, ArrayShardedReadableExtCache, data_type};
    use zarrs::storage::ReadableWritableListableStorageTraits;

    use super::shard_samples;
    use crate::layout::{ArrayKind, StoreOptions, build_array};
    use crate::spec::DType;

    /// The layout's arrays take the direct path, with their shard length; an
    /// unsharded array, or one without the checksum, does not.
    #[test]
    fn only_the_layouts_codec_chain_is_decoded_directly() {
        let storage: Arc<dyn ReadableWritableListableStorageTraits> =
            Arc::new(zarrs::storage::store::MemoryStore::new());
        for dtype in [DType::Bf16, DType::F32, DType::U16] {
            let kind = ArrayKind::Fixed {
                dtype,
                shape: vec![3, 4],
            };
            let a = build_array(
                storage.clone(),
                "/a",
                &kind,
                20,
                8,
                &StoreOptions::default(),
            )
            .unwrap();
            let cache = ArrayShardedReadableExtCache::new(&a);
            assert_eq!(shard_samples(&a, &cache), Some(8), "{dtype}");
        }
        let mut plain = ArrayBuilder::new(vec![20, 3], vec![1, 3], data_type::float32(), 0f32);
        plain.bytes_to_bytes_codecs(vec![Arc::new(ZstdCodec::new(3, false))]);
        let plain = plain.build(storage.clone(), "/b").unwrap();
        let cache = ArrayShardedReadableExtCache::new(&plain);
        assert_eq!(shard_samples(&plain, &cache), None);
        let mut no_crc = ArrayBuilder::new(vec![20, 3], vec![8, 3], data_type::float32(), 0f32);
        no_crc
            .subchunk_shape(vec![1, 3])
            .bytes_to_bytes_codecs(vec![Arc::new(ZstdCodec::new(3, false))]);
        let no_crc = no_crc.build(storage, "/c").unwrap();
        let cache = ArrayShardedReadableExtCache::new(&no_crc);
        assert_eq!(shard_samples(&no_crc, &cache), None);
    }
}
