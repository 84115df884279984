//! The embeddings of "nothing" ("null embeddings"): the empty caption for text features,
//! a black image for SigLIP and CLIP (the feature schema's `NullInput`), which Flux
//! reconditioning, conditioning dropout and classifier-free guidance need.
//!
//! ```text
//! STORE/null/zarr.json    group; attributes.tensorbake_null = {caption: "", image: "black",
//!                         inputs: {array: "empty caption" | "black image"}, arrays: [...]},
//!                         written after the arrays
//! STORE/null/<array>      one array per recorded feature array, shape [1, ...feature shape]
//! ```
//!
//! Each array keeps the leading axis of a part array, of length 1 (the null input as a
//! one-sample batch), so it is built, encoded and checked exactly like a part
//! array: the feature's dtype, one shard of one inner chunk, `zstd` + `crc32c`. The
//! reader drops that axis: [`StoreReader::null_embedding`] returns the per-sample shape.
//!
//! Writing is safe from several processes at once: each array is encoded completely in
//! memory, then its shard and afterwards its `zarr.json` are written atomically (the
//! array's `zarr.json` is its own commit marker), and the group's `zarr.json` last. Two
//! workers recording the same embedding write identical bytes, so the last one wins
//! harmlessly; a different embedding for an array already recorded is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use zarrs::array::{Array, ArrayBytes, CodecOptions};
use zarrs::storage::store::MemoryStore;
use zarrs::storage::{ListableStorageTraits, ReadableStorageTraits};

use crate::layout::{self, ArrayKind, NULL_ATTR, NULL_DIR};
use crate::location::Backend;
use crate::reader::{StoreReader, tensor_from_le_bytes};
use crate::spec::StoreSpec;
use crate::writer::{Store, group_json, tensor_to_le_bytes};
use tensorbake_kit::schema::NullInput;

use crate::{Result, StoreError};

/// The caption whose embedding the `null` group holds for text features.
pub const NULL_CAPTION: &str = "";

/// What input a null array is the embedding of: the schema's null input of its feature
/// (arrays outside the schema are taken as text, the group's original meaning).
fn null_input_label(array: &str) -> &'static str {
    tensorbake_kit::schema::Array::from_name(array)
        .and_then(|a| a.feature().null_input())
        .map_or(NullInput::EmptyCaption.label(), NullInput::label)
}

fn null_err(backend: &Backend, array: &str, reason: String) -> StoreError {
    StoreError::NullEmbedding {
        location: backend.location.to_string(),
        array: array.to_string(),
        reason,
    }
}

/// The kind of the null array of feature `name`; an error naming it when the spec has
/// no such feature.
pub(crate) fn null_kind(backend: &Backend, spec: &StoreSpec, name: &str) -> Result<ArrayKind> {
    let f = spec.features.get(name).ok_or_else(|| {
        null_err(
            backend,
            name,
            format!(
                "not a feature of the store spec (features: {})",
                spec.features.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    Ok(ArrayKind::Fixed {
        dtype: f.dtype,
        shape: f.shape.clone(),
    })
}

/// Key of the `zarr.json` of null array `name`.
pub(crate) fn null_meta_key(name: &str) -> String {
    format!("{NULL_DIR}/{name}/zarr.json")
}

/// The recorded null arrays: the `null` group exists and the array's `zarr.json` too,
/// restricted to feature arrays of `spec`, by name.
pub(crate) fn recorded_null_arrays(backend: &Backend, spec: &StoreSpec) -> Result<Vec<String>> {
    if backend.get(&format!("{NULL_DIR}/zarr.json"))?.is_none() {
        return Ok(Vec::new());
    }
    Ok(recorded_arrays_on_storage(backend, spec)?
        .into_iter()
        .collect())
}

/// The decoded little-endian bytes of null array `name`, `None` when it is not
/// recorded. The stored array must have the dtype and shape of `kind`.
pub(crate) fn read_null_bytes(
    backend: &Backend,
    name: &str,
    kind: &ArrayKind,
) -> Result<Option<Vec<u8>>> {
    let ArrayKind::Fixed { dtype, shape } = kind else {
        return Err(null_err(backend, name, "not a numeric array".into()));
    };
    let meta_key = null_meta_key(name);
    let Some(doc) = backend.get_json(&meta_key)? else {
        return Ok(None);
    };
    let mut want_shape = vec![1u64];
    want_shape.extend_from_slice(shape);
    let stored_shape: Option<Vec<u64>> = doc["shape"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect());
    let stored_dtype = doc["data_type"].as_str().unwrap_or("");
    if stored_shape.as_deref() != Some(want_shape.as_slice()) || stored_dtype != dtype.zarr_name() {
        return Err(StoreError::Metadata {
            location: backend.location.to_string(),
            key: meta_key,
            reason: format!(
                "null array has shape {stored_shape:?} and data type {stored_dtype:?}, \
                 the store spec wants {want_shape:?} and {}",
                dtype.zarr_name()
            ),
        });
    }
    let path = layout::null_array_path(name);
    let array_err = |e: zarrs::array::ArrayError| StoreError::Array {
        location: backend.location.to_string(),
        part: NULL_DIR.to_string(),
        array: name.to_string(),
        source: Box::new(e),
    };
    let array =
        Array::open(backend.storage.clone(), &path).map_err(|e| StoreError::ArrayCreate {
            location: backend.location.to_string(),
            part: NULL_DIR.to_string(),
            array: name.to_string(),
            source: Box::new(e),
        })?;
    let indices = vec![0u64; array.dimensionality()];
    let bytes = array
        .retrieve_chunk::<ArrayBytes<'static>>(&indices)
        .map_err(array_err)?
        .into_fixed()
        .map_err(|e| array_err(e.into()))?
        .into_owned();
    let want = usize::try_from(kind.sample_bytes()).unwrap_or(usize::MAX);
    if bytes.len() != want {
        return Err(null_err(
            backend,
            name,
            format!("decoded {} bytes, expected {want}", bytes.len()),
        ));
    }
    Ok(Some(bytes))
}

/// Encodes `bytes` as null array `name` in memory and returns the keys to write, the
/// array's `zarr.json` last.
fn encode_null_array(
    store: &Store,
    name: &str,
    kind: &ArrayKind,
    bytes: Vec<u8>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let backend = &store.backend;
    let memory = Arc::new(MemoryStore::new());
    let array = layout::build_array(
        memory.clone(),
        &layout::null_array_path(name),
        kind,
        1,
        1,
        &store.options,
    )
    .map_err(|e| StoreError::ArrayCreate {
        location: backend.location.to_string(),
        part: NULL_DIR.to_string(),
        array: name.to_string(),
        source: Box::new(e),
    })?;
    let array_err = |e: zarrs::array::ArrayError| StoreError::Array {
        location: backend.location.to_string(),
        part: NULL_DIR.to_string(),
        array: name.to_string(),
        source: Box::new(e),
    };
    let indices = vec![0u64; array.dimensionality()];
    // An all-zero embedding must still be stored: `verify` expects the shard.
    let options = CodecOptions::default().with_store_empty_chunks(true);
    array
        .store_chunk_opt(&indices, ArrayBytes::new_flen(bytes), &options)
        .map_err(array_err)?;
    array.store_metadata().map_err(|e| StoreError::Storage {
        location: backend.location.to_string(),
        op: "write",
        key: null_meta_key(name),
        source: Box::new(e),
    })?;
    let mem_err = |e: zarrs::storage::StorageError| StoreError::Storage {
        location: "memory".into(),
        op: "read",
        key: layout::null_array_path(name),
        source: Box::new(e),
    };
    let mut keys = Vec::new();
    let mut meta = None;
    for key in memory.list().map_err(mem_err)? {
        let value = memory
            .get(&key)
            .map_err(mem_err)?
            .map(|b| b.to_vec())
            .unwrap_or_default();
        if key.as_str().ends_with("/zarr.json") {
            meta = Some((key.as_str().to_string(), value));
        } else {
            keys.push((key.as_str().to_string(), value));
        }
    }
    let meta =
        meta.ok_or_else(|| null_err(backend, name, "encoding produced no zarr.json".to_string()))?;
    keys.push(meta);
    Ok(keys)
}

impl Store {
    /// Records the embeddings of the null input (the empty caption of a text feature,
    /// the black image of an image feature): `arrays` maps feature array names to
    /// tensors of the feature's per-sample shape (no batch axis), e.g. the output of
    /// `tensorbake_encode::null_embedding`. Float tensors are cast to the feature's
    /// dtype, `uint16`/`uint32` features take `U8`/`U32` tensors, as in
    /// [`crate::PartWriter::push`].
    ///
    /// Every array is checked before anything is written. An array already recorded
    /// with the same bytes is left alone (re-recording is a no-op); one recorded with
    /// different bytes is an error, since the spec pins the weights and a difference
    /// means a bug or a changed tokenizer. Safe to call from several processes at once.
    ///
    /// # Errors
    /// [`StoreError::NullEmbedding`] naming the array (not a feature, wrong shape or
    /// dtype, a different embedding already recorded, an empty map); storage and
    /// encoding errors.
    pub fn record_null_embedding(&self, arrays: &BTreeMap<String, Tensor>) -> Result<()> {
        let backend = &self.backend;
        if arrays.is_empty() {
            return Err(null_err(
                backend,
                "(none)",
                "no arrays given to record".into(),
            ));
        }
        let mut encoded = Vec::with_capacity(arrays.len());
        for (name, tensor) in arrays {
            let kind = null_kind(backend, &self.spec, name)?;
            let ArrayKind::Fixed { dtype, shape } = &kind else {
                return Err(null_err(backend, name, "not a numeric array".into()));
            };
            let dims: Vec<u64> = tensor.dims().iter().map(|&d| d as u64).collect();
            if &dims != shape {
                return Err(null_err(
                    backend,
                    name,
                    format!(
                        "tensor has shape {dims:?}, the feature has per-sample shape {shape:?} \
                         (give the embedding without a batch axis)"
                    ),
                ));
            }
            let bytes = tensor_to_le_bytes(tensor, *dtype)
                .map_err(|r| null_err(backend, name, format!("tensor {r}")))?
                .to_vec();
            encoded.push((name.clone(), kind, bytes));
        }
        let mut to_write = Vec::new();
        for (name, kind, bytes) in encoded {
            match read_null_bytes(backend, &name, &kind)? {
                Some(existing) if existing == bytes => {
                    tracing::debug!(array = %name, "null embedding already recorded");
                }
                Some(existing) => {
                    let first = existing
                        .iter()
                        .zip(&bytes)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    return Err(null_err(
                        backend,
                        &name,
                        format!(
                            "a different embedding of the {} is already recorded \
                             (first differing byte {first} of {}); the store spec pins the \
                             weights, so this means a changed tokenizer or preprocessing, \
                             or a bug",
                            null_input_label(&name),
                            bytes.len()
                        ),
                    ));
                }
                None => to_write.push((name, kind, bytes)),
            }
        }
        for (name, kind, bytes) in &to_write {
            for (key, value) in encode_null_array(self, name, kind, bytes.clone())? {
                backend.put_atomic(&key, value)?;
            }
            tracing::info!(array = %name, "recorded null embedding");
        }
        // The group marker lists every array recorded so far (this call's included).
        let group_key = format!("{NULL_DIR}/zarr.json");
        let listed: BTreeSet<String> = match backend.get_json(&group_key) {
            Ok(Some(doc)) => doc["attributes"][NULL_ATTR]["arrays"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            Ok(None) | Err(StoreError::Metadata { .. }) => BTreeSet::new(),
            Err(e) => return Err(e),
        };
        let mut all: BTreeSet<String> = recorded_arrays_on_storage(backend, &self.spec)?;
        all.extend(arrays.keys().cloned());
        if to_write.is_empty() && all.is_subset(&listed) {
            return Ok(());
        }
        all.extend(listed);
        let inputs: serde_json::Map<String, serde_json::Value> = all
            .iter()
            .map(|a| (a.clone(), null_input_label(a).into()))
            .collect();
        let value = serde_json::json!({
            "caption": NULL_CAPTION,
            "image": "black",
            "inputs": inputs,
            "arrays": all.into_iter().collect::<Vec<_>>(),
        });
        backend.put_atomic(&group_key, group_json(NULL_ATTR, value))
    }
}

/// Null arrays whose `zarr.json` exists, whether or not the group marker does yet.
fn recorded_arrays_on_storage(backend: &Backend, spec: &StoreSpec) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for name in backend.list_dirs(NULL_DIR)? {
        if spec.features.contains_key(&name) && backend.get(&null_meta_key(&name))?.is_some() {
            names.insert(name);
        }
    }
    Ok(names)
}

impl StoreReader {
    /// The recorded null embedding (empty caption, black image) of feature array `name`, with the
    /// feature's per-sample shape (no batch axis) and candle dtype (`uint16` as `U32`),
    /// on `device`; `None` when it was not recorded.
    ///
    /// # Errors
    /// [`StoreError::NullEmbedding`] when `name` is not a feature of the store; decode
    /// errors (a damaged array fails its checksum); storage errors.
    pub fn null_embedding(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let backend = self.backend();
        let kind = null_kind(backend, self.spec(), name)?;
        if backend.get(&format!("{NULL_DIR}/zarr.json"))?.is_none() {
            return Ok(None);
        }
        let Some(bytes) = read_null_bytes(backend, name, &kind)? else {
            return Ok(None);
        };
        let ArrayKind::Fixed { dtype, shape } = kind else {
            return Ok(None);
        };
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        tensor_from_le_bytes(&bytes, dtype, &shape, device)
            .map(Some)
            .map_err(|source| StoreError::Candle {
                name: format!("{NULL_DIR}/{name}"),
                source,
            })
    }

    /// The recorded null embedding (empty caption, black image) of feature array `name`
    /// as decoded little-endian bytes of the feature's stored dtype (`uint16` stays
    /// `uint16`), per-sample shape; `None` when it was not recorded. For language
    /// bindings; see [`StoreReader::null_embedding`] for a tensor.
    ///
    /// # Errors
    /// As [`StoreReader::null_embedding`].
    pub fn null_embedding_bytes(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let backend = self.backend();
        let kind = null_kind(backend, self.spec(), name)?;
        if backend.get(&format!("{NULL_DIR}/zarr.json"))?.is_none() {
            return Ok(None);
        }
        read_null_bytes(backend, name, &kind)
    }

    /// Names of the feature arrays whose null embedding is recorded.
    ///
    /// # Errors
    /// Storage errors while listing.
    pub fn null_embeddings(&self) -> Result<Vec<String>> {
        recorded_null_arrays(self.backend(), self.spec())
    }
}
