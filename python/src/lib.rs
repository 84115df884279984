//! `tensorbake._native`: the native half of the `tensorbake` Python package.
//!
//! A thin PyO3 layer over [`tensorbake_store::StoreReader`] (no second implementation
//! of the store layout): the reader opens the store, indexes the committed parts and
//! decodes samples; this module moves the decoded bytes into NumPy without copying
//! them and runs the reads of one call on several threads with the GIL released. The
//! pure-Python half (`python/tensorbake/`) gives the bytes their dtype and shape
//! (`ml_dtypes.bfloat16` for bfloat16), builds torch tensors and the datasets.
//!
//! ```python
//! from tensorbake import _native
//! r = _native.Reader("demo/store")
//! out = r.read([3, 1], ["key", "siglip_hidden"], 0)  # {"key": [..], "siglip_hidden": uint8 array}
//! ```

mod errors;
mod read;
mod synth;

use std::sync::Arc;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tensorbake_store::layout::ArrayKind;
use tensorbake_store::{Loader, LoaderConfig, Location, StoreReader};

use crate::errors::store_err;
use crate::read::{Out, read_many};

/// A read-only view of the committed parts of a store, taken when it is opened
/// (tensorbake-store's `StoreReader`). Safe to share between threads; open a new one
/// in each process (the Python `Store` does that after a fork).
#[pyclass(frozen, module = "tensorbake._native")]
struct Reader {
    inner: Arc<StoreReader>,
}

fn kind_tuple(kind: &ArrayKind) -> (String, Vec<u64>) {
    match kind {
        ArrayKind::Fixed { dtype, shape } => (dtype.zarr_name().to_string(), shape.clone()),
        ArrayKind::Str => ("string".to_string(), Vec::new()),
    }
}

#[pymethods]
impl Reader {
    /// Opens the store at `location` (a directory, `file://...` or `s3://bucket/prefix`)
    /// and indexes its committed parts. The GIL is released while it lists the parts.
    #[new]
    fn new(py: Python<'_>, location: &str) -> PyResult<Self> {
        let loc: Location = location.parse().map_err(|e| store_err(py, e))?;
        let reader = py
            .detach(|| StoreReader::open(&loc))
            .map_err(|e| store_err(py, e))?;
        Ok(Self {
            inner: Arc::new(reader),
        })
    }

    /// The store location as tensorbake writes it in messages.
    #[getter]
    fn location(&self) -> String {
        self.inner.location().to_string()
    }

    /// The spec recorded in the root `zarr.json` (features, captions, resolution,
    /// metadata), as JSON text.
    fn spec_json(&self) -> PyResult<String> {
        serde_json::to_string(self.inner.spec()).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Number of committed samples.
    fn __len__(&self) -> usize {
        usize::try_from(self.inner.len()).unwrap_or(usize::MAX)
    }

    /// The committed parts in index order: `(name, samples, source)`.
    fn parts(&self) -> Vec<(String, u64, String)> {
        self.inner
            .parts()
            .into_iter()
            .map(|(name, samples)| {
                let source = self
                    .inner
                    .committed_part(&name)
                    .map(|m| m.source.clone())
                    .unwrap_or_default();
                (name, samples, source)
            })
            .collect()
    }

    /// Part directories without a commit marker (invisible to reads).
    fn uncommitted_parts(&self) -> Vec<String> {
        self.inner.uncommitted_parts().to_vec()
    }

    /// Every array of a part: `(name, dtype, per-sample shape)`; dtype is the Zarr
    /// data type name (`bfloat16`, `float32`, `uint32`, ...) or `string`.
    fn arrays(&self, py: Python<'_>) -> PyResult<Vec<(String, String, Vec<u64>)>> {
        let mut out = Vec::new();
        for name in self.inner.array_names() {
            let kind = self.inner.array_kind(&name).map_err(|e| store_err(py, e))?;
            let (dtype, shape) = kind_tuple(&kind);
            out.push((name, dtype, shape));
        }
        Ok(out)
    }

    /// Reads `arrays` of the samples `indices` (global indices, uint64, C-contiguous)
    /// on up to `threads` threads (0: choose from the amount of work) with the GIL
    /// released. Returns `{array: value}`: a flat uint8 NumPy array of the samples'
    /// little-endian bytes, one after another, for numeric arrays (the decoded buffer
    /// itself when there is one sample: no copy), a list of str for string arrays.
    /// `into`, when given, holds one entry per array: `None`, or a writable
    /// C-contiguous uint8 array of exactly the samples' bytes that the array is
    /// decoded into (shared memory for a DataLoader worker, a reused buffer); such
    /// arrays are left out of the result.
    #[pyo3(signature = (indices, arrays, threads=0, into=None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        indices: PyReadonlyArray1<'py, u64>,
        arrays: Vec<String>,
        threads: usize,
        into: Option<Vec<Option<Bound<'py, PyArray1<u8>>>>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let indices = indices.as_slice()?.to_vec();
        let mut named = Vec::with_capacity(arrays.len());
        for name in arrays {
            let kind = self.inner.array_kind(&name).map_err(|e| store_err(py, e))?;
            named.push((name, kind));
        }
        let into = into.unwrap_or_default();
        if into.len() > named.len() {
            return Err(PyValueError::new_err(format!(
                "into has {} entries for {} arrays",
                into.len(),
                named.len()
            )));
        }
        let mut guards = Vec::with_capacity(into.len());
        for (dst, (name, kind)) in into.iter().zip(&named) {
            let Some(dst) = dst else {
                guards.push(None);
                continue;
            };
            let want = match kind {
                ArrayKind::Fixed { .. } => kind.sample_bytes() * indices.len() as u64,
                ArrayKind::Str => {
                    return Err(PyValueError::new_err(format!(
                        "{name} is a string array: it cannot be read into a buffer"
                    )));
                }
            };
            let guard = dst.try_readwrite()?;
            if guard.len() as u64 != want || !guard.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "the buffer for {name} must be C-contiguous uint8 of {want} bytes \
                     ({} samples), not {} bytes",
                    indices.len(),
                    guard.len()
                )));
            }
            guards.push(Some(guard));
        }
        let mut slices = Vec::with_capacity(guards.len());
        for g in &mut guards {
            slices.push(match g {
                Some(g) => Some(g.as_slice_mut()?),
                None => None,
            });
        }
        let reader = &self.inner;
        let outs = py
            .detach(|| read_many(reader, &indices, &named, slices, threads))
            .map_err(|e| store_err(py, e))?;
        drop(guards);
        let dict = PyDict::new(py);
        for ((name, _), out) in named.iter().zip(outs) {
            match out {
                Out::Bytes(bytes) => dict.set_item(name, PyArray1::from_vec(py, bytes))?,
                Out::Strings(strings) => dict.set_item(name, PyList::new(py, strings)?)?,
                Out::Written => {}
            }
        }
        Ok(dict)
    }

    /// Feature arrays whose null embedding (empty caption, black image) is recorded
    /// under `null/`.
    fn null_embeddings(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let reader = &self.inner;
        py.detach(|| reader.null_embeddings())
            .map_err(|e| store_err(py, e))
    }

    /// The null embedding of feature array `name` as uint8 little-endian bytes of its
    /// dtype, per-sample shape; `None` when it is not recorded.
    fn null_embedding<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<Option<Bound<'py, PyArray1<u8>>>> {
        let reader = &self.inner;
        let bytes = py
            .detach(|| reader.null_embedding_bytes(name))
            .map_err(|e| store_err(py, e))?;
        Ok(bytes.map(|b| PyArray1::from_vec(py, b)))
    }

    /// The global indices of the batches that tensorbake-store's own Rust `Loader`
    /// yields for `(seed, epoch, batch_size)`, in order: the reference the Python
    /// datasets are tested against.
    #[pyo3(signature = (seed, epoch, batch_size, shuffle=true, drop_last=false))]
    fn loader_indices(
        &self,
        py: Python<'_>,
        seed: u64,
        epoch: u64,
        batch_size: usize,
        shuffle: bool,
        drop_last: bool,
    ) -> PyResult<Vec<Vec<u64>>> {
        let reader = self.inner.clone();
        py.detach(move || {
            let mut cfg = LoaderConfig::new(seed, epoch, batch_size, Vec::new());
            cfg.shuffle = shuffle;
            cfg.drop_last = drop_last;
            cfg.prefetch_threads = 2;
            Loader::new(reader, &cfg)?
                .map(|b| b.map(|b| b.indices))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| store_err(py, e))
    }
}

/// The order of epoch `epoch` for `len` samples: tensorbake-store's seeded
/// Fisher-Yates permutation (SplitMix64), the order of the Rust loader. uint64 array.
#[pyfunction]
fn epoch_order(py: Python<'_>, len: u64, seed: u64, epoch: u64) -> Bound<'_, PyArray1<u64>> {
    let order = py.detach(|| tensorbake_store::epoch_order(len, seed, epoch));
    PyArray1::from_vec(py, order)
}

/// Writes a store of seeded synthetic samples with tensorbake-store's writer (the
/// benchmark's and the tests' stores; `tensorbake._testing` wraps it). `spec_json`:
/// a store spec; `parts` / `uncommitted`: `(name, samples)` committed / left without
/// a commit marker; `null_arrays`: features whose null embedding to record.
#[pyfunction]
// Python keyword arguments, one Rust parameter each.
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (location, spec_json, parts, uncommitted=Vec::new(), null_arrays=Vec::new(), seed=0, shard_bytes=None))]
fn write_synthetic(
    py: Python<'_>,
    location: &str,
    spec_json: &str,
    parts: Vec<(String, u64)>,
    uncommitted: Vec<(String, u64)>,
    null_arrays: Vec<String>,
    seed: u64,
    shard_bytes: Option<u64>,
) -> PyResult<()> {
    let spec: tensorbake_store::StoreSpec = serde_json::from_str(spec_json)
        .map_err(|e| PyValueError::new_err(format!("store spec: {e}")))?;
    py.detach(|| {
        synth::write(
            location,
            spec,
            &parts,
            &uncommitted,
            &null_arrays,
            seed,
            shard_bytes,
        )
    })
    .map_err(|e| store_err(py, e))
}

/// The native module: `Reader`, `epoch_order`, `write_synthetic`, the crate version.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Reader>()?;
    m.add_function(wrap_pyfunction!(epoch_order, m)?)?;
    m.add_function(wrap_pyfunction!(write_synthetic, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
