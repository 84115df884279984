//! A `VarBuilder` over memory-mapped safetensors that remembers which tensor failed.
//!
//! candle's own errors for a missing tensor or a wrong shape are strings; the
//! encoders want [`EncodeError::BadTensor`] naming the tensor and the files searched.
//! [`CheckedWeights`] wraps the mmapped files, records the first failing lookup, and
//! turns a failed model construction into that error.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::EncodeError;

/// What went wrong with one tensor: its full name and why.
type Failure = Arc<Mutex<Option<(String, String)>>>;

/// Memory-mapped safetensors files that report missing or misshapen tensors by name.
pub(crate) struct CheckedWeights {
    files: Vec<PathBuf>,
    failure: Failure,
    st: Arc<MmapedSafetensors>,
}

struct Backend {
    st: Arc<MmapedSafetensors>,
    failure: Failure,
}

impl Backend {
    fn fail(&self, name: &str, why: String) -> candle_core::Error {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some((name.to_string(), why.clone()));
        }
        candle_core::Error::Msg(format!("tensor `{name}`: {why}"))
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let view = self
            .st
            .get(name)
            .map_err(|_| self.fail(name, "missing".into()))?;
        if view.shape() != s.dims() {
            return Err(self.fail(
                name,
                format!("expected shape {:?}, found {:?}", s.dims(), view.shape()),
            ));
        }
        self.st.load(name, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.st
            .load(name, dev)
            .map_err(|_| self.fail(name, "missing".into()))?
            .to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
}

impl CheckedWeights {
    /// Memory-maps the files (a missing or corrupt file is named in the error).
    pub(crate) fn open(files: &[PathBuf]) -> Result<Self, EncodeError> {
        for f in files {
            // Each file alone first, so that the error names the broken one.
            // SAFETY: MmapedSafetensors maps read-only; the files are not modified
            // while mapped (weights are immutable inputs).
            #[allow(unsafe_code)]
            let one = unsafe { MmapedSafetensors::new(f) };
            one.map_err(|e| EncodeError::BadFile {
                path: f.clone(),
                why: format!("not a readable safetensors file: {e}"),
            })?;
        }
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| EncodeError::BadFile {
            path: files.first().cloned().unwrap_or_default(),
            why: format!("not a readable safetensors file: {e}"),
        })?;
        Ok(Self {
            files: files.to_vec(),
            failure: Arc::default(),
            st: Arc::new(st),
        })
    }

    /// A `VarBuilder` loading tensors in `dtype` onto `device`.
    pub(crate) fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = Backend {
            st: self.st.clone(),
            failure: self.failure.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Turns a model-construction error into [`EncodeError::BadTensor`] when a tensor
    /// lookup failed, else into [`EncodeError::Candle`].
    pub(crate) fn error(&self, encoder: &str, e: candle_core::Error) -> EncodeError {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match failure {
            Some((tensor, why)) => EncodeError::BadTensor {
                tensor,
                path: self.files_list(),
                why,
            },
            None => EncodeError::Candle {
                encoder: encoder.to_string(),
                source: e,
            },
        }
    }

    /// The files, comma-separated, for messages.
    pub(crate) fn files_list(&self) -> String {
        self.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}
