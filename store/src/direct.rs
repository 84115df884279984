//! Rows of the layout's arrays decoded without zarrs' codec pipeline.
//!
//! Every numeric array tensorbake writes is sharded with one sample per inner chunk
//! and the inner codecs `bytes` (little-endian) -> `zstd` -> `crc32c` (see
//! [`crate::layout::build_array`]). zarrs decodes such a chunk through three buffers (the
//! read, the checksum codec's copy, the zstd output) and creates a zstd context for every
//! chunk, whose CPU-feature probe traps to the hypervisor in a VM. Here the chunk's byte
//! range comes from zarrs' cached shard index and its bytes from zarrs' storage, as
//! before; the checksum is checked in place and the frame is decompressed by a
//! thread-local zstd context straight into the caller's buffer. Arrays with any other
//! codec chain, and absent inner chunks (the fill value), take zarrs' path.

use std::cell::RefCell;

use zarrs::array::{ArrayError, ArrayShardedReadableExt, ArrayShardedReadableExtCache, CodecError};
use zarrs::storage::ReadableWritableListableStorageTraits;
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

fn codec_io(e: std::io::Error) -> ArrayError {
    ArrayError::CodecError(CodecError::IOError(std::sync::Arc::new(e)))
}

/// Decodes row `row` of `open` (an array [`shard_samples`] accepted) into `out`, a
/// `[u8]` (written from its start) or a `Vec<u8>` (appended to its spare capacity,
/// which must hold the row). Returns the bytes written, or `None` when the row is an
/// absent inner chunk (the caller takes zarrs' path, which writes the fill value).
///
/// # Errors
/// Storage errors; [`CodecError::InvalidChecksum`] for bytes that fail their crc32c;
/// zstd's error for a frame that does not decode or does not fit `out`.
pub(crate) fn decode_row<C: WriteBuf + ?Sized>(
    open: &OpenArray,
    row: u64,
    shard_samples: u64,
    out: &mut C,
) -> Result<Option<usize>, ArrayError> {
    let array = &open.array;
    let mut subchunk = vec![0u64; array.dimensionality()];
    subchunk[0] = row;
    let Some(range) = array.subchunk_byte_range(&open.cache, &subchunk)? else {
        return Ok(None);
    };
    let mut shard = vec![0u64; array.dimensionality()];
    shard[0] = row / shard_samples;
    let Some(encoded) = array
        .storage()
        .get_partial(&array.chunk_key(&shard), range)?
    else {
        return Ok(None);
    };
    let Some(split) = encoded.len().checked_sub(4) else {
        return Err(ArrayError::CodecError(CodecError::Other(format!(
            "inner chunk of row {row} is {} bytes, shorter than its crc32c",
            encoded.len()
        ))));
    };
    let (frame, stored) = encoded.split_at(split);
    if crc32c::crc32c(frame).to_le_bytes() != stored {
        return Err(ArrayError::CodecError(CodecError::InvalidChecksum));
    }
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
