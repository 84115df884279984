//! Loading safetensors weights into candle models with errors that name the tensor
//! and the file.
//!
//! candle's own `VarBuilder` backends report a missing tensor or a shape mismatch
//! without saying which file was read, and silently convert integer tensors to float.
//! [`WeightFiles`] indexes the safetensors headers of a model (one file or a sharded
//! set), and [`WeightFiles::build`] hands a model constructor a `VarBuilder` whose every
//! `get` is checked against that header: the tensor must exist (under its own name or
//! one of the aliases a [`NameMap`] gives, e.g. BFL names for diffusers ones), hold a
//! floating-point dtype, and have the shape the model asks for. The first failure is
//! kept as a typed [`Error::BadTensor`] and returned instead of candle's message.
//!
//! The only relaxation: a stored `[o, i, 1, 1]` 1x1-convolution kernel is accepted where
//! the model asks for an `[o, i]` linear weight (LDM / BFL checkpoints store attention
//! projections as 1x1 convolutions).
//!
//! For training, [`WeightFiles::build_trainable`] makes the tensors a predicate selects
//! into candle [`Var`]s in f32 (master weights), collected in a [`VarSet`] under the
//! names the model asks for; everything else is loaded as a constant in the compute
//! dtype, which the [`crate::ops`] seam treats as frozen (input gradients only).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// Maps the tensor name a model asks for to the names to look up in the files, in order
/// of preference (the first present wins).
pub type NameMap = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// The identity [`NameMap`].
pub fn same_names() -> NameMap {
    Arc::new(|n: &str| vec![n.to_string()])
}

/// Header facts of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Index of the file holding it in [`WeightFiles::files`].
    pub file: usize,
    /// Stored shape.
    pub shape: Vec<usize>,
    /// Stored dtype as the safetensors header names it (`F32`, `BF16`, `I64`, ...).
    pub dtype: String,
}

/// The safetensors files of one model, memory-mapped, with a name index.
pub struct WeightFiles {
    files: Vec<PathBuf>,
    maps: Vec<MmapedSafetensors>,
    index: HashMap<String, TensorMeta>,
}

impl std::fmt::Debug for WeightFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFiles")
            .field("files", &self.files)
            .field("tensors", &self.index.len())
            .finish()
    }
}

#[allow(unsafe_code)]
fn mmap(path: &Path) -> candle_core::Result<MmapedSafetensors> {
    // SAFETY: the mapping is read-only; like every safetensors loader (candle's
    // `from_mmaped_safetensors`, the Python `safe_open`) this assumes the weight file is
    // not truncated or rewritten by another process while the model is being built.
    unsafe { MmapedSafetensors::new(path) }
}

impl WeightFiles {
    /// Opens and indexes the given safetensors files.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            if let Err(source) = std::fs::metadata(path) {
                return Err(Error::Io {
                    path: path.clone(),
                    source,
                });
            }
            let m = mmap(path).map_err(|e| Error::BadFile {
                path: path.clone(),
                why: format!("not a readable safetensors file: {e}"),
            })?;
            for (name, view) in m.tensors() {
                index.insert(
                    name,
                    TensorMeta {
                        file: i,
                        shape: view.shape().to_vec(),
                        dtype: format!("{:?}", view.dtype()),
                    },
                );
            }
            maps.push(m);
        }
        Ok(Self {
            files: files.to_vec(),
            maps,
            index,
        })
    }

    /// The files, in the order given.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Header facts of a stored tensor, by its stored name.
    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.index.get(name)
    }

    /// Whether a tensor of that stored name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stored names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    fn files_label(&self) -> String {
        self.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Loads one tensor the model asks for as `name` (resolved through `map`), checked
    /// against `expected` (if given), converted to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        expected: Option<&[usize]>,
        map: &NameMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let candidates = map(name);
        let Some((stored, meta)) = candidates
            .iter()
            .find_map(|c| self.index.get(c).map(|m| (c.as_str(), m)))
        else {
            let shown = candidates.first().map_or(name, String::as_str);
            let also = if candidates.len() > 1 {
                format!(" (also looked for {})", candidates[1..].join(", "))
            } else {
                String::new()
            };
            return Err(Error::BadTensor {
                tensor: shown.to_string(),
                path: self.files_label(),
                why: format!("missing{also}"),
            });
        };
        let path = self.files[meta.file].display().to_string();
        let bad = |why: String| Error::BadTensor {
            tensor: stored.to_string(),
            path: path.clone(),
            why,
        };
        let float = matches!(meta.dtype.as_str(), "F16" | "BF16" | "F32" | "F64");
        if !float {
            return Err(bad(format!(
                "dtype {} where a floating-point tensor (F32, F16, BF16) is expected",
                meta.dtype
            )));
        }
        let mut reshape_to = None;
        if let Some(exp) = expected
            && meta.shape != exp
        {
            let conv1x1 = meta.shape.len() == exp.len() + 2
                && meta.shape[..exp.len()] == *exp
                && meta.shape[exp.len()..] == [1, 1];
            if !conv1x1 {
                return Err(bad(format!(
                    "expected shape {:?}, found {:?}",
                    exp, meta.shape
                )));
            }
            reshape_to = Some(exp.to_vec());
        }
        let t = self.maps[meta.file]
            .load(stored, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| bad(format!("cannot be read: {e}")))?;
        match reshape_to {
            Some(s) => t.reshape(s).map_err(|e| bad(e.to_string())),
            None => Ok(t),
        }
    }

    /// Builds a model: `build` gets a `VarBuilder` over these files whose lookups go
    /// through `map` and are checked as [`WeightFiles::load`] does; every tensor is a
    /// constant in `dtype` (frozen). A failed lookup is returned as its
    /// [`Error::BadTensor`]; any other candle error is wrapped with `what` (the model).
    pub fn build<M>(
        self: &Arc<Self>,
        what: &str,
        map: NameMap,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
    ) -> Result<M> {
        self.build_inner(what, map, dtype, device, None, build)
    }

    /// As [`WeightFiles::build`], but the tensors `train` selects become f32 variables
    /// in `train.vars` (under the name the model asks for); the rest stay constants in
    /// `dtype`.
    pub fn build_trainable<M>(
        self: &Arc<Self>,
        what: &str,
        map: NameMap,
        dtype: DType,
        device: &Device,
        train: &Trainable,
        build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
    ) -> Result<M> {
        self.build_inner(what, map, dtype, device, Some(train.clone()), build)
    }

    fn build_inner<M>(
        self: &Arc<Self>,
        what: &str,
        map: NameMap,
        dtype: DType,
        device: &Device,
        train: Option<Trainable>,
        build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
    ) -> Result<M> {
        let first_error = Arc::new(Mutex::new(None));
        let backend = CheckedBackend {
            weights: Arc::clone(self),
            map,
            first_error: Arc::clone(&first_error),
            train,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        match build(vb) {
            Ok(m) => Ok(m),
            Err(source) => {
                let kept = first_error.lock().ok().and_then(|mut g| g.take());
                Err(kept.unwrap_or(Error::Candle {
                    model: what.to_string(),
                    source,
                }))
            }
        }
    }
}

/// The trainable variables of a model, by the name the model asks for them (the
/// diffusers / BFL name it is saved under), in the master dtype (f32 unless
/// [`VarSet::with_dtype`] says bf16). Cloning shares the set.
#[derive(Debug, Clone)]
pub struct VarSet(Arc<Mutex<BTreeMap<String, Var>>>, DType);

impl Default for VarSet {
    fn default() -> Self {
        Self(Arc::default(), DType::F32)
    }
}

impl VarSet {
    /// An empty set of f32 master weights.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set whose variables are made in `dtype` (bf16 master weights, which an
    /// optimizer rounds stochastically).
    #[must_use]
    pub fn with_dtype(dtype: DType) -> Self {
        Self(Arc::default(), dtype)
    }

    /// The dtype variables are made in.
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Var>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The variable of `name`, made by `make` the first time (a tensor asked for twice
    /// is one variable).
    ///
    /// # Errors
    /// `make`'s error.
    pub fn get_or_insert(
        &self,
        name: &str,
        make: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Var> {
        let mut vars = self.lock();
        if let Some(v) = vars.get(name) {
            return Ok(v.clone());
        }
        let v = Var::from_tensor(&make()?.to_dtype(self.1)?)?;
        vars.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// Every variable, by name, in name order.
    #[must_use]
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The variable of `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Var> {
        self.lock().get(name).cloned()
    }

    /// Number of variables.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total number of trainable elements.
    #[must_use]
    pub fn elem_count(&self) -> usize {
        self.lock().values().map(|v| v.elem_count()).sum()
    }
}

/// Which tensors of a model build train, and where their variables go.
#[derive(Clone)]
pub struct Trainable {
    /// Selects trainable tensors by the name the model asks for.
    pub select: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    /// Receives the variables.
    pub vars: VarSet,
}

impl std::fmt::Debug for Trainable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainable")
            .field("vars", &self.vars.len())
            .finish_non_exhaustive()
    }
}

impl Trainable {
    /// Every tensor trains.
    #[must_use]
    pub fn all(vars: &VarSet) -> Self {
        Self {
            select: Arc::new(|_| true),
            vars: vars.clone(),
        }
    }

    /// The tensors whose name `select` accepts train.
    pub fn when(vars: &VarSet, select: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self {
            select: Arc::new(select),
            vars: vars.clone(),
        }
    }
}

struct CheckedBackend {
    weights: Arc<WeightFiles>,
    map: NameMap,
    first_error: Arc<Mutex<Option<Error>>>,
    train: Option<Trainable>,
}

impl CheckedBackend {
    fn fetch(
        &self,
        name: &str,
        expected: Option<&[usize]>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let load = |dtype| {
            self.weights
                .load(name, expected, &self.map, dtype, dev)
                .map_err(|e| {
                    let msg = e.to_string();
                    if let Ok(mut slot) = self.first_error.lock()
                        && slot.is_none()
                    {
                        *slot = Some(e);
                    }
                    candle_core::Error::Msg(msg)
                })
        };
        match &self.train {
            Some(t) if (t.select)(name) => Ok(t
                .vars
                .get_or_insert(name, || load(DType::F32))?
                .as_tensor()
                .clone()),
            _ => load(dtype),
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for CheckedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(s.dims()), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        (self.map)(name).iter().any(|c| self.weights.contains(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join("model.safetensors");
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    #[test]
    fn checks_names_shapes_and_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let path = write(
            dir.path(),
            &[
                ("a.weight", Tensor::ones((2, 3), DType::F32, &dev).unwrap()),
                (
                    "conv.weight",
                    Tensor::ones((4, 2, 1, 1), DType::F16, &dev).unwrap(),
                ),
                ("ids", Tensor::ones(3, DType::I64, &dev).unwrap()),
            ],
        );
        let w = Arc::new(WeightFiles::open(std::slice::from_ref(&path)).unwrap());
        let ident = same_names();
        let t = w
            .load("a.weight", Some(&[2, 3]), &ident, DType::BF16, &dev)
            .unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        // a 1x1 conv kernel read as a linear weight
        let t = w
            .load("conv.weight", Some(&[4, 2]), &ident, DType::F32, &dev)
            .unwrap();
        assert_eq!(t.dims(), &[4, 2]);
        let file = path.display().to_string();
        let e = w
            .load("a.weight", Some(&[3, 2]), &ident, DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`a.weight`") && e.contains(&file) && e.contains("[2, 3]"),
            "{e}"
        );
        let e = w
            .load("ids", None, &ident, DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`ids`") && e.contains("I64") && e.contains(&file),
            "{e}"
        );
        let alias: NameMap = Arc::new(|n: &str| vec![n.to_string(), format!("old.{n}")]);
        let e = w
            .load("b", None, &alias, DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`b`") && e.contains("missing") && e.contains("old.b"),
            "{e}"
        );
        // through a VarBuilder: the typed error comes back, not candle's message
        let err = w
            .build("test", same_names(), DType::F32, &dev, |vb| {
                candle_nn::linear(3, 2, vb.pp("a"))
            })
            .unwrap_err();
        match err {
            Error::BadTensor { tensor, .. } => assert_eq!(tensor, "a.bias"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn unreadable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.safetensors");
        std::fs::write(&p, b"not safetensors").unwrap();
        let e = WeightFiles::open(std::slice::from_ref(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("broken.safetensors"), "{e}");
    }
}
