//! Reading a store: committed parts in name order form one global index; `get(i)` is
//! the same sample on every read of the same set of committed parts.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use serde::Serialize;
use zarrs::array::{
    Array, ArrayBytes, ArrayShardedReadableExt, ArrayShardedReadableExtCache, CodecOptions,
};
use zarrs::storage::ReadableWritableListableStorageTraits;

use crate::layout::{self, ArrayKind};
use crate::location::{Backend, Location};
use crate::spec::{DType, StoreSpec};
use crate::writer::{PartMeta, part_arrays, read_parts, read_root};
use crate::{Result, StoreError};

/// One sample read back from the store.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Global index.
    pub index: u64,
    /// The part it lives in.
    pub part: String,
    /// Sample key.
    pub key: String,
    /// Cleaned caption.
    pub caption: String,
    /// Caption as found in the source.
    pub caption_raw: String,
    /// Original image size `[width, height]`.
    pub orig_size: [u32; 2],
    /// Feature tensors (CPU), by name, with the feature's shape and candle dtype.
    pub features: BTreeMap<String, Tensor>,
}

pub(crate) struct OpenArray {
    pub(crate) array: Array<dyn ReadableWritableListableStorageTraits>,
    pub(crate) cache: ArrayShardedReadableExtCache,
    /// Set when the array has exactly the layout's codec chain (see [`crate::direct`]),
    /// so rows can be decoded without zarrs' codec pipeline.
    direct: Option<crate::direct::Direct>,
}

pub(crate) struct PartEntry {
    pub(crate) name: String,
    pub(crate) meta: PartMeta,
    arrays: OnceLock<BTreeMap<String, OpenArray>>,
}

/// A read-only view of the committed parts of a store, taken when it is opened.
/// `Send + Sync`: share it (in an `Arc`) between loader threads.
pub struct StoreReader {
    backend: Backend,
    spec: StoreSpec,
    arrays: Vec<(String, ArrayKind)>,
    parts: Vec<PartEntry>,
    /// `offsets[p]` = global index of the first sample of part `p`; last = total.
    offsets: Vec<u64>,
    uncommitted: Vec<String>,
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader")
            .field("location", &self.backend.location)
            .field("parts", &self.parts.len())
            .field("samples", &self.len())
            .finish_non_exhaustive()
    }
}

/// Samples of a fixed-size array as a candle tensor `[n, ...shape]`.
pub(crate) fn tensor_from_le_bytes(
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    match dtype {
        DType::U16 => {
            let v: Vec<u32> = bytes
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            Tensor::from_vec(v, shape, device)
        }
        _ => Tensor::from_raw_buffer(bytes, dtype.candle(), shape, device),
    }
}

impl StoreReader {
    /// Opens the store at `location` and indexes its committed parts.
    ///
    /// # Errors
    /// [`StoreError::NotAStore`] when there is no tensorbake store; storage errors.
    pub fn open(location: &Location) -> Result<Self> {
        let backend = Backend::open(location, false, 512)?;
        let spec = read_root(&backend)?.ok_or_else(|| StoreError::NotAStore {
            location: location.to_string(),
            reason: "no zarr.json".into(),
        })?;
        let mut parts = Vec::new();
        let mut uncommitted = Vec::new();
        let mut offsets = vec![0u64];
        for (name, meta) in read_parts(&backend)? {
            match meta {
                Some(meta) => {
                    offsets.push(offsets.last().copied().unwrap_or(0) + meta.samples);
                    parts.push(PartEntry {
                        name,
                        meta,
                        arrays: OnceLock::new(),
                    });
                }
                None => uncommitted.push(name),
            }
        }
        let arrays = part_arrays(&spec);
        Ok(Self {
            backend,
            spec,
            arrays,
            parts,
            offsets,
            uncommitted,
        })
    }

    /// The store location.
    #[must_use]
    pub fn location(&self) -> &Location {
        &self.backend.location
    }

    /// The spec the store was created with.
    #[must_use]
    pub fn spec(&self) -> &StoreSpec {
        &self.spec
    }

    /// Number of committed samples.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Whether there are no committed samples.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Committed part names with their sample counts, in index order.
    #[must_use]
    pub fn parts(&self) -> Vec<(String, u64)> {
        self.parts
            .iter()
            .map(|p| (p.name.clone(), p.meta.samples))
            .collect()
    }

    /// Part directories without a commit marker (invisible to reads).
    #[must_use]
    pub fn uncommitted_parts(&self) -> &[String] {
        &self.uncommitted
    }

    /// Names of every array of a part (built-ins, then features).
    #[must_use]
    pub fn array_names(&self) -> Vec<String> {
        self.arrays.iter().map(|(n, _)| n.clone()).collect()
    }

    /// What array `name` holds per sample: a string, or a numeric dtype and per-sample
    /// shape (as stored: `uint16` stays `uint16`).
    ///
    /// # Errors
    /// [`StoreError::UnknownArray`] naming the store and the array.
    pub fn array_kind(&self, name: &str) -> Result<ArrayKind> {
        self.kind(name).cloned()
    }

    /// The commit marker of committed part `name` (source URL, samples, ...); `None`
    /// for a part that is not committed or does not exist.
    #[must_use]
    pub fn committed_part(&self, name: &str) -> Option<&PartMeta> {
        self.parts.iter().find(|p| p.name == name).map(|p| &p.meta)
    }

    pub(crate) fn kind(&self, name: &str) -> Result<&ArrayKind> {
        self.arrays
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k)
            .ok_or_else(|| StoreError::UnknownArray {
                location: self.backend.location.to_string(),
                name: name.to_string(),
                available: self.array_names().join(", "),
            })
    }

    /// (part index, row within the part) of global sample `index`.
    pub(crate) fn locate(&self, index: u64) -> Result<(usize, u64)> {
        if index >= self.len() {
            return Err(StoreError::IndexOutOfRange {
                location: self.backend.location.to_string(),
                index,
                len: self.len(),
            });
        }
        let p = self.offsets.partition_point(|&o| o <= index) - 1;
        Ok((p, index - self.offsets[p]))
    }

    fn part_arrays(&self, p: usize) -> Result<&BTreeMap<String, OpenArray>> {
        let entry = &self.parts[p];
        if let Some(arrays) = entry.arrays.get() {
            return Ok(arrays);
        }
        let mut opened = BTreeMap::new();
        for (name, _) in &self.arrays {
            let array = Array::open(
                self.backend.storage.clone(),
                &layout::array_path(&entry.name, name),
            )
            .map_err(|e| StoreError::ArrayCreate {
                location: self.backend.location.to_string(),
                part: entry.name.clone(),
                array: name.clone(),
                source: Box::new(e),
            })?;
            if array.shape().first().copied() != Some(entry.meta.samples) {
                return Err(StoreError::Metadata {
                    location: self.backend.location.to_string(),
                    key: format!("{}/zarr.json", layout::array_path(&entry.name, name)),
                    reason: format!(
                        "length {:?} but the part has {} samples",
                        array.shape().first(),
                        entry.meta.samples
                    ),
                });
            }
            let cache = ArrayShardedReadableExtCache::new(&array);
            let direct =
                crate::direct::shard_samples(&array, &cache).map(crate::direct::Direct::new);
            opened.insert(
                name.clone(),
                OpenArray {
                    array,
                    cache,
                    direct,
                },
            );
        }
        let _ = entry.arrays.set(opened);
        Ok(entry.arrays.get().expect("set above"))
    }

    fn open_array(&self, p: usize, name: &str) -> Result<&OpenArray> {
        self.part_arrays(p)?
            .get(name)
            .ok_or_else(|| StoreError::UnknownArray {
                location: self.backend.location.to_string(),
                name: name.to_string(),
                available: self.array_names().join(", "),
            })
    }

    fn array_error(&self, p: usize, name: &str, source: zarrs::array::ArrayError) -> StoreError {
        StoreError::Array {
            location: self.backend.location.to_string(),
            part: self.parts[p].name.clone(),
            array: name.to_string(),
            source: Box::new(source),
        }
    }

    /// The decoded bytes of row `row` of array `name` in part `p`.
    fn read_row(&self, p: usize, row: u64, name: &str) -> Result<ArrayBytes<'static>> {
        let open = self.open_array(p, name)?;
        let mut indices = vec![0u64; open.array.dimensionality()];
        indices[0] = row;
        // One inner chunk: decode it on this thread. Parallelism comes from the loader's
        // threads; a rayon fan-out per sample only adds wake-ups.
        let single = CodecOptions::default().with_concurrent_target(1);
        open.array
            .retrieve_subchunk_opt::<ArrayBytes<'static>>(&open.cache, &indices, &single)
            .map_err(|e| self.array_error(p, name, e))
    }

    /// Row bytes of a fixed-size array (little-endian elements), through zarrs' codecs.
    fn read_fixed_zarrs(&self, p: usize, row: u64, name: &str) -> Result<Vec<u8>> {
        let bytes = self.read_row(p, row, name)?;
        bytes
            .into_fixed()
            .map(|b| b.into_owned())
            .map_err(|e| self.array_error(p, name, e.into()))
    }

    /// Row bytes of a fixed-size array (little-endian elements).
    pub(crate) fn read_fixed(&self, index: u64, name: &str) -> Result<Vec<u8>> {
        let (p, row) = self.locate(index)?;
        let want = usize::try_from(self.kind(name)?.sample_bytes()).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(want);
        if let Some(got) = self.decode_direct(p, row, name, &mut out)? {
            self.check_row_len(p, row, name, got, want)?;
            return Ok(out);
        }
        self.read_fixed_zarrs(p, row, name)
    }

    /// Row `row` of array `name` in part `p` through [`crate::direct`] into `out`; the
    /// bytes written, or `None` where zarrs' path has to read it.
    fn decode_direct<C: zstd::zstd_safe::WriteBuf + ?Sized>(
        &self,
        p: usize,
        row: u64,
        name: &str,
        out: &mut C,
    ) -> Result<Option<usize>> {
        let open = self.open_array(p, name)?;
        let Some(direct) = &open.direct else {
            return Ok(None);
        };
        crate::direct::decode_row(open, direct, row, out).map_err(|e| self.array_error(p, name, e))
    }

    /// The error for a numeric read of a string array.
    fn string_array(&self, name: &str) -> StoreError {
        StoreError::UnknownArray {
            location: self.backend.location.to_string(),
            name: format!("{name} (a string array; use read_string)"),
            available: self.array_names().join(", "),
        }
    }

    fn check_row_len(&self, p: usize, row: u64, name: &str, got: usize, want: usize) -> Result<()> {
        if got == want {
            return Ok(());
        }
        Err(StoreError::Metadata {
            location: self.backend.location.to_string(),
            key: layout::array_path(&self.parts[p].name, name),
            reason: format!(
                "row {row} decoded to {got} bytes, the array's dtype and shape say {want}"
            ),
        })
    }

    /// Sample `index` of numeric array `name` decoded straight into `out`, which must be
    /// exactly one sample's bytes (little-endian, C order, the stored dtype): the
    /// compressed bytes are checked and decompressed into place, with no buffer in
    /// between, on stores with the layout's codecs (any other falls back to zarrs).
    ///
    /// # Errors
    /// As [`Self::read_bytes`]; a wrong `out` length names the array and both sizes.
    pub fn read_bytes_into(&self, index: u64, name: &str, out: &mut [u8]) -> Result<()> {
        let kind = self.kind(name)?;
        if matches!(kind, ArrayKind::Str) {
            return Err(self.string_array(name));
        }
        let want = usize::try_from(kind.sample_bytes()).unwrap_or(usize::MAX);
        let (p, row) = self.locate(index)?;
        self.check_row_len(p, row, name, want, out.len())?;
        if let Some(got) = self.decode_direct(p, row, name, out)? {
            return self.check_row_len(p, row, name, got, want);
        }
        let bytes = self.read_fixed_zarrs(p, row, name)?;
        self.check_row_len(p, row, name, bytes.len(), want)?;
        out.copy_from_slice(&bytes);
        Ok(())
    }

    /// Sample `index` of numeric array `name` as its decoded little-endian bytes, in C
    /// order, in the stored dtype (no candle tensor, no widening): what language
    /// bindings hand to their own array types without another copy.
    ///
    /// # Errors
    /// Out of range index, unknown or string array, decode errors (a damaged shard
    /// fails its checksum) naming the store, part and array.
    pub fn read_bytes(&self, index: u64, name: &str) -> Result<Vec<u8>> {
        if matches!(self.kind(name)?, ArrayKind::Str) {
            return Err(self.string_array(name));
        }
        self.read_fixed(index, name)
    }

    /// The string of a string array (`key`, `caption`, `caption_raw`) for a sample.
    ///
    /// # Errors
    /// Out of range index, unknown array, decode errors.
    pub fn read_string(&self, index: u64, name: &str) -> Result<String> {
        let (p, row) = self.locate(index)?;
        let bytes = self.read_row(p, row, name)?;
        let err = |reason: String| StoreError::Metadata {
            location: self.backend.location.to_string(),
            key: layout::array_path(&self.parts[p].name, name),
            reason,
        };
        let v = bytes.into_variable().map_err(|e| err(e.to_string()))?;
        String::from_utf8(v.bytes().to_vec())
            .map_err(|e| err(format!("row {row} is not UTF-8: {e}")))
    }

    /// Sample `index` of feature / numeric array `name` as a tensor on `device`.
    ///
    /// # Errors
    /// Out of range index, unknown or string array, decode errors.
    pub fn read_tensor(&self, index: u64, name: &str, device: &Device) -> Result<Tensor> {
        let ArrayKind::Fixed { dtype, shape } = self.kind(name)?.clone() else {
            return Err(self.string_array(name));
        };
        let bytes = self.read_fixed(index, name)?;
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        tensor_from_le_bytes(&bytes, dtype, &shape, device).map_err(|source| StoreError::Candle {
            name: name.to_string(),
            source,
        })
    }

    /// Reads sample `index`: built-in arrays and every feature (CPU tensors).
    ///
    /// # Errors
    /// Out of range index, decode errors (a damaged shard fails its checksum).
    pub fn get(&self, index: u64) -> Result<Sample> {
        let (p, _) = self.locate(index)?;
        let orig = self.read_fixed(index, "orig_size")?;
        let orig_size = [
            u32::from_le_bytes([orig[0], orig[1], orig[2], orig[3]]),
            u32::from_le_bytes([orig[4], orig[5], orig[6], orig[7]]),
        ];
        let mut features = BTreeMap::new();
        for name in self.spec.features.keys() {
            features.insert(name.clone(), self.read_tensor(index, name, &Device::Cpu)?);
        }
        Ok(Sample {
            index,
            part: self.parts[p].name.clone(),
            key: self.read_string(index, "key")?,
            caption: self.read_string(index, "caption")?,
            caption_raw: self.read_string(index, "caption_raw")?,
            orig_size,
            features,
        })
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    pub(crate) fn committed(&self) -> &[PartEntry] {
        &self.parts
    }

    pub(crate) fn array_kinds(&self) -> &[(String, ArrayKind)] {
        &self.arrays
    }
}

/// Size figures of one array across the committed parts.
#[derive(Debug, Clone, Serialize)]
pub struct ArrayInfo {
    /// Array name.
    pub name: String,
    /// `string` or the numeric dtype name.
    pub dtype: String,
    /// Per-sample shape.
    pub shape: Vec<u64>,
    /// Bytes on storage (shards + metadata) over all committed parts.
    pub stored_bytes: u64,
    /// Stored bytes per sample.
    pub bytes_per_sample: f64,
    /// Uncompressed bytes per sample (`null` for strings).
    pub raw_bytes_per_sample: Option<u64>,
    /// Uncompressed / stored (`null` for strings).
    pub compression_ratio: Option<f64>,
}

/// What `tensorbake inspect` prints.
#[derive(Debug, Clone, Serialize)]
pub struct StoreInfo {
    /// The store location.
    pub location: String,
    /// Layout version.
    pub format_version: u32,
    /// Number of committed parts.
    pub parts: usize,
    /// Part directories without a commit marker.
    pub uncommitted_parts: Vec<String>,
    /// Total committed samples.
    pub samples: u64,
    /// The recorded spec (features with model, weights, preprocess, dtype, shape).
    pub spec: StoreSpec,
    /// Per-array size figures.
    pub arrays: Vec<ArrayInfo>,
    /// Stored bytes of all arrays of committed parts.
    pub stored_bytes: u64,
    /// Stored bytes per sample, all arrays.
    pub bytes_per_sample: f64,
    /// Uncompressed / stored for the numeric arrays together.
    pub compression_ratio: Option<f64>,
    /// Feature arrays whose null embedding (empty caption, black image) is recorded under `null/`.
    pub null_embeddings: Vec<String>,
}

/// Summarises the store at `location`.
///
/// # Errors
/// As [`StoreReader::open`]; storage errors while sizing arrays.
pub fn inspect(location: &Location) -> Result<StoreInfo> {
    let reader = StoreReader::open(location)?;
    let samples = reader.len();
    let mut arrays = Vec::new();
    let (mut total_stored, mut numeric_stored, mut numeric_raw) = (0u64, 0u64, 0u64);
    for (name, kind) in reader.array_kinds() {
        let mut stored = 0u64;
        for part in reader.committed() {
            stored += reader
                .backend()
                .size_prefix(&format!("{}/{name}", layout::part_prefix(&part.name)))?;
        }
        total_stored += stored;
        let per_sample = if samples == 0 {
            0.0
        } else {
            stored as f64 / samples as f64
        };
        let (dtype, shape, raw) = match kind {
            ArrayKind::Fixed { dtype, shape } => {
                let raw = kind.sample_bytes();
                numeric_stored += stored;
                numeric_raw += raw * samples;
                (dtype.to_string(), shape.clone(), Some(raw))
            }
            ArrayKind::Str => ("string".to_string(), Vec::new(), None),
        };
        arrays.push(ArrayInfo {
            name: name.clone(),
            dtype,
            shape,
            stored_bytes: stored,
            bytes_per_sample: per_sample,
            raw_bytes_per_sample: raw,
            compression_ratio: raw
                .filter(|_| stored > 0)
                .map(|r| (r * samples) as f64 / stored as f64),
        });
    }
    Ok(StoreInfo {
        location: location.to_string(),
        format_version: reader.spec().format_version,
        parts: reader.committed().len(),
        uncommitted_parts: reader.uncommitted_parts().to_vec(),
        samples,
        spec: reader.spec().clone(),
        arrays,
        stored_bytes: total_stored,
        bytes_per_sample: if samples == 0 {
            0.0
        } else {
            total_stored as f64 / samples as f64
        },
        compression_ratio: (numeric_stored > 0).then(|| numeric_raw as f64 / numeric_stored as f64),
        null_embeddings: reader.null_embeddings()?,
    })
}
