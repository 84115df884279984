//! Creating a store and writing parts.
//!
//! A [`PartWriter`] buffers samples per array until a whole Zarr shard is full, then
//! encodes and writes that shard. [`PartWriter::commit`] writes the last (partial)
//! shards, then every array's `zarr.json` with its final length, and finally the part
//! group's `zarr.json` with `committed: true`, atomically. Until then the part does not
//! exist for readers; a writer that dies leaves only shard files, which the next
//! [`Store::part_writer`] for that part deletes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use zarrs::array::{Array, ArrayBytes, ArrayBytesOffsets};
use zarrs::storage::ReadableWritableListableStorageTraits;

use crate::layout::{
    self, ArrayKind, BUILTIN_ARRAYS, PART_ATTR, PARTS_DIR, ROOT_ATTR, StoreOptions,
};
use crate::location::{Backend, Location};
use crate::spec::{DType, StoreSpec};
use crate::{Result, StoreError};

/// The value of one feature of one sample.
#[derive(Debug, Clone)]
pub enum FeatureValue {
    /// A tensor of the feature's shape, on any device. Float tensors are cast to the
    /// feature's dtype; `uint16`/`uint32` features take `U8` or `U32` tensors
    /// (values must fit).
    Tensor(Tensor),
    /// The sample's elements as little-endian bytes of the feature's dtype, C order.
    Bytes(Vec<u8>),
}

/// One sample to write: the built-in arrays plus one value per feature.
#[derive(Debug, Clone)]
pub struct Record {
    /// Sample key (WebDataset key, SA-1B id...).
    pub key: String,
    /// Cleaned caption.
    pub caption: String,
    /// Caption as found in the source.
    pub caption_raw: String,
    /// Original image size `[width, height]`.
    pub orig_size: [u32; 2],
    /// One value per feature of the spec, by feature name.
    pub features: BTreeMap<String, FeatureValue>,
}

/// The built-in fields of a sample, for [`PartWriter::push_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleMeta {
    /// Sample key.
    pub key: String,
    /// Cleaned caption.
    pub caption: String,
    /// Caption as found in the source.
    pub caption_raw: String,
    /// Original image size `[width, height]`.
    pub orig_size: [u32; 2],
}

/// The commit marker of a part: `attributes.tensorbake_part` of `parts/<part>/zarr.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartMeta {
    /// The source shard URL this part was made from.
    pub source: String,
    /// Number of samples in the part (= axis 0 of every array).
    pub samples: u64,
    /// `true` once the part is complete. Only committed parts exist for readers.
    pub committed: bool,
    /// Samples per Zarr shard, by array.
    #[serde(default)]
    pub shard_samples: BTreeMap<String, u64>,
    /// Seconds since the Unix epoch at commit.
    #[serde(default)]
    pub committed_at: u64,
    /// Version of the tensorbake-store crate that wrote the part.
    #[serde(default)]
    pub writer: String,
}

/// A store opened for writing: its spec is fixed, parts are added one by one.
#[derive(Debug)]
pub struct Store {
    pub(crate) backend: Arc<Backend>,
    pub(crate) spec: Arc<StoreSpec>,
    pub(crate) options: StoreOptions,
    buffers: Arc<ShardBuffers>,
}

/// Shard buffers of finished parts, kept for the next parts of the same store: a
/// part takes one per fixed-size array (a shard long) and gives it back when it is
/// committed or dropped, so that a run's later parts write into memory already paged
/// in rather than fault a fresh 100 MB buffer in per array and part. Holds at most
/// what the parts open at one time used.
#[derive(Debug, Default)]
struct ShardBuffers {
    /// (buffer, bytes of it that may be non-zero)
    free: std::sync::Mutex<Vec<(Vec<u8>, usize)>>,
}

impl ShardBuffers {
    /// A buffer of exactly `len` bytes and how much of it may be non-zero: a kept one
    /// of that length, else a fresh zeroed one.
    fn take(&self, len: usize) -> (Vec<u8>, usize) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        match free.iter().position(|(b, _)| b.len() == len) {
            Some(i) => free.swap_remove(i),
            None => (vec![0; len], 0),
        }
    }

    fn give_back(&self, buffer: Vec<u8>, dirty: usize) {
        if !buffer.is_empty() {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.push((buffer, dirty));
        }
    }
}

pub(crate) fn group_json(attr: &str, value: serde_json::Value) -> Vec<u8> {
    let mut attributes = serde_json::Map::new();
    if !value.is_null() {
        attributes.insert(attr.to_string(), value);
    }
    let doc = serde_json::json!({
        "zarr_format": 3,
        "node_type": "group",
        "attributes": attributes,
    });
    serde_json::to_vec_pretty(&doc).unwrap_or_default()
}

/// Reads the spec recorded in the root `zarr.json`, `None` if there is no root.
pub(crate) fn read_root(backend: &Backend) -> Result<Option<StoreSpec>> {
    let Some(root) = backend.get_json("zarr.json")? else {
        return Ok(None);
    };
    let not_ours = |reason: &str| StoreError::NotAStore {
        location: backend.location.to_string(),
        reason: reason.to_string(),
    };
    let mut attr = root
        .get("attributes")
        .and_then(|a| a.get(ROOT_ATTR))
        .cloned()
        .ok_or_else(|| {
            not_ours("zarr.json has no attributes.tensorbake (not written by tensorbake)")
        })?;
    if let Some(map) = attr.as_object_mut() {
        map.remove("layout");
    }
    serde_json::from_value(attr)
        .map(Some)
        .map_err(|e| StoreError::Metadata {
            location: backend.location.to_string(),
            key: "zarr.json".into(),
            reason: format!("attributes.tensorbake: {e}"),
        })
}

/// Part names with their commit markers (`None`: not committed).
pub(crate) type PartList = Vec<(String, Option<PartMeta>)>;

/// Lists the part directories and reads each one's commit marker (in parallel: one
/// GET per part on S3). Parts without a readable marker map to `None`.
pub(crate) fn read_parts(backend: &Backend) -> Result<PartList> {
    let names = backend.list_dirs(PARTS_DIR)?;
    let threads = names.len().clamp(1, 16);
    let chunk = names.len().div_ceil(threads).max(1);
    let results: Vec<Result<PartList>> = std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .chunks(chunk)
            .map(|group| {
                scope.spawn(move || {
                    group
                        .iter()
                        .map(|name| Ok((name.clone(), read_part_meta(backend, name)?)))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(StoreError::Metadata {
                        location: backend.location.to_string(),
                        key: format!("{PARTS_DIR}/"),
                        reason: "a thread reading part markers panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut out = Vec::with_capacity(names.len());
    for r in results {
        out.extend(r?);
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The commit marker of one part: `None` when absent or not committed. A marker that
/// does not parse (never written by tensorbake, which writes it atomically) counts as
/// absent too, with a warning.
pub(crate) fn read_part_meta(backend: &Backend, part: &str) -> Result<Option<PartMeta>> {
    let key = format!("{}/zarr.json", layout::part_prefix(part));
    let doc = match backend.get_json(&key) {
        Ok(Some(doc)) => doc,
        Ok(None) => return Ok(None),
        Err(StoreError::Metadata { reason, .. }) => {
            tracing::warn!(part, %reason, "unreadable part marker; treating the part as uncommitted");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let Some(attr) = doc.get("attributes").and_then(|a| a.get(PART_ATTR)) else {
        return Ok(None);
    };
    match serde_json::from_value::<PartMeta>(attr.clone()) {
        Ok(meta) if meta.committed => Ok(Some(meta)),
        Ok(_) => Ok(None),
        Err(e) => {
            tracing::warn!(part, error = %e, "invalid part marker; treating the part as uncommitted");
            Ok(None)
        }
    }
}

/// The arrays of a part for `spec`: built-ins first, then features by name.
pub(crate) fn part_arrays(spec: &StoreSpec) -> Vec<(String, ArrayKind)> {
    let mut arrays = vec![
        ("key".to_string(), ArrayKind::Str),
        ("caption".to_string(), ArrayKind::Str),
        ("caption_raw".to_string(), ArrayKind::Str),
        (
            "orig_size".to_string(),
            ArrayKind::Fixed {
                dtype: DType::U32,
                shape: vec![2],
            },
        ),
    ];
    debug_assert_eq!(arrays.len(), BUILTIN_ARRAYS.len());
    for (name, f) in &spec.features {
        arrays.push((
            name.clone(),
            ArrayKind::Fixed {
                dtype: f.dtype,
                shape: f.shape.clone(),
            },
        ));
    }
    arrays
}

impl Store {
    /// Opens the store at `location`, creating it with `spec` if there is none. An
    /// existing store must have been created with the same spec: otherwise the error
    /// names the first differing field (e.g. `features.siglip_hidden.weights_sha256`).
    ///
    /// # Errors
    /// [`StoreError::SpecMismatch`], [`StoreError::InvalidSpec`], storage errors.
    pub fn create_or_open(location: &Location, spec: StoreSpec) -> Result<Self> {
        Self::create_or_open_with(location, spec, StoreOptions::default())
    }

    /// [`Store::create_or_open`] with explicit writer [`StoreOptions`].
    ///
    /// # Errors
    /// See [`Store::create_or_open`].
    pub fn create_or_open_with(
        location: &Location,
        spec: StoreSpec,
        options: StoreOptions,
    ) -> Result<Self> {
        spec.validate()?;
        options.validate().map_err(StoreError::InvalidLayout)?;
        let backend = Backend::open(location, true, 0)?;
        let stored = if let Some(stored) = read_root(&backend)? {
            stored
        } else {
            let mut attr =
                serde_json::to_value(&spec).map_err(|e| StoreError::InvalidSpec(e.to_string()))?;
            if let Some(map) = attr.as_object_mut() {
                map.insert(
                    "layout".into(),
                    serde_json::to_value(options).unwrap_or_default(),
                );
            }
            backend.put_atomic(
                &format!("{PARTS_DIR}/zarr.json"),
                group_json("", serde_json::Value::Null),
            )?;
            backend.put_atomic("zarr.json", group_json(ROOT_ATTR, attr))?;
            tracing::info!(store = %location, features = spec.features.len(), "created store");
            // Another worker may have created it at the same moment: compare with what won.
            read_root(&backend)?.ok_or_else(|| StoreError::NotAStore {
                location: location.to_string(),
                reason: "zarr.json vanished right after it was written".into(),
            })?
        };
        if let Some((field, stored, requested)) = stored.first_difference(&spec) {
            return Err(StoreError::SpecMismatch {
                location: location.to_string(),
                field,
                stored,
                requested,
            });
        }
        Ok(Self {
            backend: Arc::new(backend),
            spec: Arc::new(stored),
            options,
            buffers: Arc::default(),
        })
    }

    /// Opens an existing store for writing, without creating anything: `None` when
    /// there is no store at `location` yet (no directory, or no root `zarr.json`).
    /// Like [`Store::create_or_open`], a store of another spec is an error naming the
    /// first differing field. A pipeline uses this to learn which parts are done and
    /// to refuse a mismatch before it writes a single byte.
    ///
    /// # Errors
    /// [`StoreError::SpecMismatch`], [`StoreError::NotAStore`] (a `zarr.json` that
    /// tensorbake did not write), storage errors.
    pub fn open_existing(
        location: &Location,
        spec: &StoreSpec,
        options: StoreOptions,
    ) -> Result<Option<Self>> {
        spec.validate()?;
        options.validate().map_err(StoreError::InvalidLayout)?;
        if let Location::Local(path) = location
            && !path.is_dir()
        {
            return Ok(None);
        }
        let backend = Backend::open(location, false, 0)?;
        let Some(stored) = read_root(&backend)? else {
            return Ok(None);
        };
        if let Some((field, stored, requested)) = stored.first_difference(spec) {
            return Err(StoreError::SpecMismatch {
                location: location.to_string(),
                field,
                stored,
                requested,
            });
        }
        Ok(Some(Self {
            backend: Arc::new(backend),
            spec: Arc::new(stored),
            options,
            buffers: Arc::default(),
        }))
    }

    /// The spec the store was created with.
    #[must_use]
    pub fn spec(&self) -> &StoreSpec {
        &self.spec
    }

    /// The store location.
    #[must_use]
    pub fn location(&self) -> &Location {
        &self.backend.location
    }

    /// Names of the committed parts (the shards already done).
    ///
    /// # Errors
    /// Storage errors.
    pub fn committed_parts(&self) -> Result<BTreeSet<String>> {
        Ok(read_parts(&self.backend)?
            .into_iter()
            .filter_map(|(name, meta)| meta.map(|_| name))
            .collect())
    }

    /// Starts writing part `part` made from `source`. Leftovers of an uncommitted
    /// earlier attempt are deleted first; a committed part is refused.
    ///
    /// # Errors
    /// [`StoreError::PartCommitted`], [`StoreError::InvalidPartName`], storage errors.
    pub fn part_writer(&self, part: &str, source: &str) -> Result<PartWriter> {
        layout::check_component(part).map_err(|reason| StoreError::InvalidPartName {
            part: part.to_string(),
            reason,
        })?;
        if let Some(meta) = read_part_meta(&self.backend, part)? {
            return Err(StoreError::PartCommitted {
                location: self.backend.location.to_string(),
                part: part.to_string(),
                source_url: meta.source,
            });
        }
        let prefix = layout::part_prefix(part);
        self.backend.erase_prefix(&prefix)?;
        let mut arrays = Vec::new();
        for (name, kind) in part_arrays(&self.spec) {
            let shard_samples = self.options.shard_samples(kind.sample_bytes());
            let array = layout::build_array(
                self.backend.storage.clone(),
                &layout::array_path(part, &name),
                &kind,
                shard_samples,
                shard_samples,
                &self.options,
            )
            .map_err(|e| StoreError::ArrayCreate {
                location: self.backend.location.to_string(),
                part: part.to_string(),
                array: name.clone(),
                source: Box::new(e),
            })?;
            arrays.push(ArrayWriter {
                name,
                kind,
                shard_samples,
                array,
                fixed: Vec::new(),
                filled: 0,
                dirty: 0,
                strings: Vec::new(),
                buffered: 0,
                shards_written: 0,
            });
        }
        tracing::debug!(part, source, "part writer started");
        Ok(PartWriter {
            backend: self.backend.clone(),
            buffers: self.buffers.clone(),
            spec: self.spec.clone(),
            part: part.to_string(),
            source: source.to_string(),
            arrays,
            samples: 0,
        })
    }
}

struct ArrayWriter {
    name: String,
    kind: ArrayKind,
    shard_samples: u64,
    array: Array<dyn ReadableWritableListableStorageTraits>,
    /// The shard being filled (fixed-size arrays), a whole shard long, taken on the
    /// first sample from the store's kept buffers or allocated zeroed; `filled` bytes
    /// of it hold this shard's samples and at most `dirty` bytes are not zero (the
    /// rest of a fresh one are still the allocator's untouched zero pages).
    fixed: Vec<u8>,
    filled: usize,
    dirty: usize,
    strings: Vec<String>,
    buffered: u64,
    shards_written: u64,
}

/// Writes one part. Not `Sync`: one writer per part, on one thread.
pub struct PartWriter {
    backend: Arc<Backend>,
    buffers: Arc<ShardBuffers>,
    spec: Arc<StoreSpec>,
    part: String,
    source: String,
    arrays: Vec<ArrayWriter>,
    samples: u64,
}

impl Drop for PartWriter {
    /// Gives the shard buffers back to the store, committed or not.
    fn drop(&mut self) {
        for a in &mut self.arrays {
            self.buffers
                .give_back(std::mem::take(&mut a.fixed), a.dirty);
        }
    }
}

impl std::fmt::Debug for PartWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartWriter")
            .field("part", &self.part)
            .field("source", &self.source)
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

/// A tensor's values as the little-endian bytes of a store dtype.
pub(crate) enum LeBytes {
    /// A contiguous CPU tensor in the store dtype on a little-endian host: its storage
    /// is read in place ([`LeBytes::view`]), no copy at all.
    Tensor(Tensor),
    /// Bytes made by a conversion (uint16 from u32 values, or a big-endian host).
    Bytes(Vec<u8>),
}

/// The bytes of a [`LeBytes`], borrowed (for a tensor: under its storage's read lock).
pub(crate) enum LeView<'a> {
    Slice(&'a [u8]),
    Storage(candle_core::StorageRef<'a>, usize, usize),
}

impl LeView<'_> {
    /// The bytes, little-endian.
    pub(crate) fn bytes(&self) -> &[u8] {
        use candle_core::{CpuStorage, Storage};
        match self {
            Self::Slice(b) => b,
            Self::Storage(storage, start, end) => match &**storage {
                Storage::Cpu(CpuStorage::BF16(v)) => bytemuck::cast_slice(&v[*start..*end]),
                Storage::Cpu(CpuStorage::F16(v)) => bytemuck::cast_slice(&v[*start..*end]),
                Storage::Cpu(CpuStorage::F32(v)) => bytemuck::cast_slice(&v[*start..*end]),
                Storage::Cpu(CpuStorage::U32(v)) => bytemuck::cast_slice(&v[*start..*end]),
                // `tensor_to_le_bytes` makes `LeBytes::Tensor` of CPU tensors of these
                // four dtypes only
                _ => &[],
            },
        }
    }
}

impl LeBytes {
    /// Borrows the bytes.
    pub(crate) fn view(&self) -> LeView<'_> {
        match self {
            Self::Tensor(t) => {
                let (storage, layout) = t.storage_and_layout();
                let (start, end) = layout.contiguous_offsets().unwrap_or((0, 0));
                LeView::Storage(storage, start, end)
            }
            Self::Bytes(b) => LeView::Slice(b),
        }
    }

    /// Owned bytes (a copy).
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        self.view().bytes().to_vec()
    }
}

/// Converts `tensor` to the little-endian values of `dtype` (on the CPU): in place
/// when it already is one (contiguous, on the CPU, in `dtype`), else one conversion.
pub(crate) fn tensor_to_le_bytes(
    tensor: &Tensor,
    dtype: DType,
) -> std::result::Result<LeBytes, String> {
    let err = |e: candle_core::Error| e.to_string();
    let t = tensor.to_device(&Device::Cpu).map_err(err)?;
    // contiguous from here on: flattening copies a strided view
    let t = t.flatten_all().map_err(err)?;
    let src = t.dtype();
    let t = if dtype.is_float() {
        if !src.is_float() {
            return Err(format!(
                "is {src:?}, a {dtype} feature needs a float tensor"
            ));
        }
        if src == dtype.candle() {
            t
        } else {
            t.to_dtype(dtype.candle()).map_err(err)?
        }
    } else {
        if !matches!(src, candle_core::DType::U32 | candle_core::DType::U8) {
            return Err(format!(
                "is {src:?}, a {dtype} feature needs a U32 or U8 tensor"
            ));
        }
        let t = t.to_dtype(candle_core::DType::U32).map_err(err)?;
        if dtype == DType::U16 {
            return t
                .to_vec1::<u32>()
                .map_err(err)?
                .iter()
                .map(|&v| {
                    u16::try_from(v)
                        .map(u16::to_le_bytes)
                        .map_err(|_| format!("value {v} does not fit uint16"))
                })
                .collect::<std::result::Result<Vec<[u8; 2]>, String>>()
                .map(|v| LeBytes::Bytes(v.concat()));
        }
        t
    };
    if cfg!(target_endian = "little") {
        return Ok(LeBytes::Tensor(t));
    }
    let bytes = match dtype {
        DType::Bf16 => t
            .to_vec1::<half::bf16>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U32 | DType::U16 => t
            .to_vec1::<u32>()
            .map_err(err)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    };
    Ok(LeBytes::Bytes(bytes))
}

impl PartWriter {
    /// The part name.
    #[must_use]
    pub fn part(&self) -> &str {
        &self.part
    }

    /// Samples pushed so far.
    #[must_use]
    pub fn samples(&self) -> u64 {
        self.samples
    }

    fn bad(&self, key: &str, reason: String) -> StoreError {
        StoreError::BadSample {
            part: self.part.clone(),
            key: key.to_string(),
            reason,
        }
    }

    /// Adds one sample. When an array's buffer holds a whole shard, the shard is
    /// encoded and written. A sample that does not fit the spec is refused before
    /// anything is buffered.
    ///
    /// # Errors
    /// [`StoreError::BadSample`] naming the feature; encoding / storage errors.
    pub fn push(&mut self, record: Record) -> Result<()> {
        let Record {
            key,
            caption,
            caption_raw,
            orig_size,
            mut features,
        } = record;
        let mut encoded: Vec<LeBytes> = Vec::with_capacity(self.spec.features.len());
        for (name, f) in &self.spec.features {
            let value = features
                .remove(name)
                .ok_or_else(|| self.bad(&key, self.missing(name)))?;
            let expected = usize::try_from(f.sample_bytes()).unwrap_or(usize::MAX);
            let bytes = match value {
                FeatureValue::Bytes(b) => LeBytes::Bytes(b),
                FeatureValue::Tensor(t) => {
                    let dims: Vec<u64> = t.dims().iter().map(|&d| d as u64).collect();
                    if dims != f.shape {
                        return Err(self.bad(
                            &key,
                            format!(
                                "tensor {name} has shape {dims:?}, the store has {:?}",
                                f.shape
                            ),
                        ));
                    }
                    tensor_to_le_bytes(&t, f.dtype)
                        .map_err(|r| self.bad(&key, format!("tensor {name} {r}")))?
                }
            };
            let got = bytes.view().bytes().len();
            if got != expected {
                return Err(self.bad(
                    &key,
                    format!(
                        "feature {name} has {got} bytes, expected {expected} ({} x {:?})",
                        f.dtype, f.shape
                    ),
                ));
            }
            encoded.push(bytes);
        }
        if let Some(extra) = features.keys().next() {
            return Err(self.bad(&key, format!("feature {extra} is not in the store spec")));
        }
        let views: Vec<LeView<'_>> = encoded.iter().map(LeBytes::view).collect();
        let rows: Vec<&[u8]> = views.iter().map(LeView::bytes).collect();
        self.push_rows(
            SampleMeta {
                key,
                caption,
                caption_raw,
                orig_size,
            },
            &rows,
        )
    }

    /// "feature `name` is missing (the store has ...)".
    fn missing(&self, name: &str) -> String {
        format!(
            "feature {name} is missing (the store has {})",
            self.spec
                .features
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// Buffers one checked sample: `rows` are its feature bytes in spec order. Each
    /// array's shard buffer is reserved whole on first use and kept across its shards,
    /// so samples are copied once, into place, and no shard regrows its buffer.
    fn push_rows(&mut self, meta: SampleMeta, rows: &[&[u8]]) -> Result<()> {
        let orig: Vec<u8> = meta
            .orig_size
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut rows = rows.iter();
        let buffers = &self.buffers;
        for a in &mut self.arrays {
            match a.name.as_str() {
                "key" => a.strings.push(meta.key.clone()),
                "caption" => a.strings.push(meta.caption.clone()),
                "caption_raw" => a.strings.push(meta.caption_raw.clone()),
                name => {
                    let row: &[u8] = if name == "orig_size" {
                        &orig
                    } else {
                        rows.next().copied().unwrap_or_default()
                    };
                    if a.fixed.is_empty() {
                        // a fresh one is zeroed by the allocator (zero pages): a partial
                        // last shard's padding is then never written, only read
                        let shard = usize::try_from(a.shard_samples).unwrap_or(1);
                        (a.fixed, a.dirty) = buffers.take(row.len().saturating_mul(shard));
                    }
                    a.fixed[a.filled..a.filled + row.len()].copy_from_slice(row);
                    a.filled += row.len();
                    a.dirty = a.dirty.max(a.filled);
                }
            }
            a.buffered += 1;
        }
        self.samples += 1;
        for i in 0..self.arrays.len() {
            if self.arrays[i].buffered == self.arrays[i].shard_samples {
                self.flush(i)?;
            }
        }
        Ok(())
    }

    /// Adds a batch: `meta[i]` and row `i` of every feature tensor (`[B, ...shape]`,
    /// batch-major, any device) form sample `i`. Each tensor is read once; its rows
    /// go straight into the shard buffers.
    ///
    /// # Errors
    /// As [`PartWriter::push`]; also a tensor whose first dimension is not `meta.len()`.
    pub fn push_batch(
        &mut self,
        meta: Vec<SampleMeta>,
        features: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let n = meta.len();
        let first_key = meta.first().map(|m| m.key.clone()).unwrap_or_default();
        if let Some(extra) = features
            .keys()
            .find(|k| !self.spec.features.contains_key(*k))
        {
            return Err(self.bad(
                &first_key,
                format!("feature {extra} is not in the store spec"),
            ));
        }
        let mut columns: Vec<(LeBytes, usize)> = Vec::with_capacity(self.spec.features.len());
        for (name, f) in &self.spec.features {
            let Some(t) = features.get(name) else {
                return Err(self.bad(&first_key, self.missing(name)));
            };
            let dims: Vec<u64> = t.dims().iter().map(|&d| d as u64).collect();
            let mut want = vec![n as u64];
            want.extend_from_slice(&f.shape);
            if dims != want {
                return Err(self.bad(
                    &first_key,
                    format!("batch tensor {name} has shape {dims:?}, expected {want:?}"),
                ));
            }
            let bytes = tensor_to_le_bytes(t, f.dtype)
                .map_err(|r| self.bad(&first_key, format!("tensor {name} {r}")))?;
            let row = usize::try_from(f.sample_bytes()).unwrap_or(usize::MAX);
            columns.push((bytes, row));
        }
        let views: Vec<(LeView<'_>, usize)> =
            columns.iter().map(|(b, row)| (b.view(), *row)).collect();
        let whole: Vec<(&[u8], usize)> = views.iter().map(|(v, row)| (v.bytes(), *row)).collect();
        for (i, m) in meta.into_iter().enumerate() {
            let rows: Vec<&[u8]> = whole
                .iter()
                .map(|(bytes, row)| &bytes[i * row..(i + 1) * row])
                .collect();
            self.push_rows(m, &rows)?;
        }
        Ok(())
    }

    /// Encodes and writes the buffered samples of array `i` as its next shard; a
    /// partial shard (only at commit) is padded with the fill value, which the
    /// sharding codec stores as absent inner chunks.
    fn flush(&mut self, i: usize) -> Result<()> {
        let location = self.backend.location.to_string();
        let part = self.part.clone();
        let a = &mut self.arrays[i];
        if a.buffered == 0 {
            return Ok(());
        }
        let shard = a.shards_written;
        let s = a.shard_samples;
        let array_err = |e: zarrs::array::ArrayError| StoreError::Array {
            location: location.clone(),
            part: part.clone(),
            array: a.name.clone(),
            source: Box::new(e),
        };
        let mut shape = a.array.shape().to_vec();
        shape[0] = (shard + 1) * s;
        a.array
            .set_shape(shape.clone())
            .map_err(|e| StoreError::ArrayCreate {
                location: location.clone(),
                part: part.clone(),
                array: a.name.clone(),
                source: Box::new(e),
            })?;
        let mut indices = vec![0u64; shape.len()];
        indices[0] = shard;
        let bytes = match &a.kind {
            ArrayKind::Fixed { .. } => {
                // a partial (last) shard: the fill value after its samples, where an
                // earlier shard of the part left bytes; beyond them the zero pages are
                // still the allocator's. Borrowed: the buffer is kept for the next shard.
                if a.dirty > a.filled {
                    a.fixed[a.filled..a.dirty].fill(0);
                    a.dirty = a.filled;
                }
                ArrayBytes::new_flen(&a.fixed[..])
            }
            ArrayKind::Str => {
                let mut strings = std::mem::take(&mut a.strings);
                strings.resize(usize::try_from(s).unwrap_or(usize::MAX), String::new());
                let mut offsets = Vec::with_capacity(strings.len() + 1);
                let mut data = Vec::new();
                offsets.push(0usize);
                for st in &strings {
                    data.extend_from_slice(st.as_bytes());
                    offsets.push(data.len());
                }
                let offsets = ArrayBytesOffsets::new(offsets)
                    .map_err(|e| array_err(zarrs::array::ArrayError::Other(e.to_string())))?;
                ArrayBytes::new_vlen(data, offsets)
                    .map_err(|e| array_err(zarrs::array::ArrayError::Other(e.to_string())))?
            }
        };
        // Store the shard even when every sample in it is the fill value (a part whose
        // captions are all empty): `verify` expects every shard of the part to exist.
        let options = zarrs::array::CodecOptions::default().with_store_empty_chunks(true);
        a.array
            .store_chunk_opt(&indices, bytes, &options)
            .map_err(array_err)?;
        tracing::trace!(part = %part, array = %a.name, shard, samples = a.buffered, "wrote shard");
        a.filled = 0;
        a.buffered = 0;
        a.shards_written += 1;
        Ok(())
    }

    /// Writes the remaining partial shards, every array's metadata (length = samples
    /// pushed) and last, atomically, the part's `zarr.json` with `committed: true`.
    /// Returns the number of samples in the part.
    ///
    /// # Errors
    /// Encoding / storage errors; the part then stays uncommitted.
    pub fn commit(mut self) -> Result<u64> {
        for i in 0..self.arrays.len() {
            self.flush(i)?;
        }
        let location = self.backend.location.to_string();
        for a in &mut self.arrays {
            let mut shape = a.array.shape().to_vec();
            shape[0] = self.samples;
            a.array
                .set_shape(shape)
                .map_err(|e| StoreError::ArrayCreate {
                    location: location.clone(),
                    part: self.part.clone(),
                    array: a.name.clone(),
                    source: Box::new(e),
                })?;
            a.array.store_metadata().map_err(|e| StoreError::Storage {
                location: location.clone(),
                op: "write",
                key: format!("{}/zarr.json", layout::array_path(&self.part, &a.name)),
                source: Box::new(e),
            })?;
        }
        let meta = PartMeta {
            source: self.source.clone(),
            samples: self.samples,
            committed: true,
            shard_samples: self
                .arrays
                .iter()
                .map(|a| (a.name.clone(), a.shard_samples))
                .collect(),
            committed_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            writer: format!("tensorbake-store {}", env!("CARGO_PKG_VERSION")),
        };
        let value = serde_json::to_value(&meta).unwrap_or_default();
        self.backend.put_atomic(
            &format!("{}/zarr.json", layout::part_prefix(&self.part)),
            group_json(PART_ATTR, value),
        )?;
        tracing::info!(part = %self.part, source = %self.source, samples = self.samples, "committed part");
        Ok(self.samples)
    }
}
