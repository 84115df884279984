//! Loading a PixArt-α transformer from disk and saving one in the diffusers layout (the
//! file I/O kept out of the model file).
//!
//! A weights location ([`load_pixart`]'s `spec`) is
//!
//! - a diffusers model directory: `config.json` + `diffusion_pytorch_model.safetensors`
//!   (or a sharded `diffusion_pytorch_model.safetensors.index.json` set);
//! - a pipeline root (`model_index.json`, or no `config.json`): its `transformer/`;
//! - a hub id `org/name[@revision]` in the local Hugging Face cache, read by the same
//!   two rules (`PixArt-alpha/PixArt-XL-2-512x512` is a pipeline).
//!
//! [`save_diffusers`] writes `config.json` (`_class_name: PixArtTransformer2DModel` and
//! the config keys as diffusers writes them) and `diffusion_pytorch_model.safetensors`,
//! which `PixArtTransformer2DModel.from_pretrained(dir)` loads. The tensors are checked
//! against the names and shapes the config implies before anything is written.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::{Config, PixArt};
use crate::loader::{Trainable, WeightFiles, same_names};
use crate::weights::ModelDir;
use crate::{Error, Result};

/// The diffusers class this layout is for.
pub const CLASS_NAME: &str = "PixArtTransformer2DModel";
/// The diffusers version whose layout [`save_diffusers`] writes (and the goldens were
/// made with).
pub const DIFFUSERS_VERSION: &str = "0.42.1";
/// The weight file of a diffusers model directory.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// The diffusers model directory a `spec` names: the directory itself, or the
/// `transformer/` of a pipeline root (one with `model_index.json`, or without a
/// `config.json`).
///
/// # Errors
/// [`Error::WeightsNotFound`] when the location does not resolve or a pipeline root has
/// no `transformer/`.
pub fn transformer_dir(spec: &str) -> Result<ModelDir> {
    model_subdir(spec, "transformer")
}

/// `spec` resolved, descending into `sub` for a pipeline root.
pub(crate) fn model_subdir(spec: &str, sub: &str) -> Result<ModelDir> {
    let root = ModelDir::resolve(spec)?;
    let index = root.file("model_index.json").is_some();
    if !index && root.file("config.json").is_some() {
        return Ok(root);
    }
    root.sub(sub).ok_or_else(|| Error::WeightsNotFound {
        spec: spec.to_string(),
        why: format!(
            "{} has {}, and no `{sub}/` folder",
            root.root.display(),
            if index {
                "model_index.json (a pipeline root)"
            } else {
                "no config.json"
            }
        ),
    })
}

/// Reads and checks the `config.json` of a PixArt model directory.
///
/// # Errors
/// [`Error::BadFile`] naming `config.json`: unreadable, another model class, or a
/// configuration this code cannot run.
pub fn read_config(dir: &ModelDir) -> Result<Config> {
    let path = dir.root.join("config.json");
    let v: Value = dir.json("config.json")?;
    let bad = |why: String| Error::BadFile {
        path: path.clone(),
        why,
    };
    if let Some(class) = v.get("_class_name").and_then(Value::as_str)
        && class != CLASS_NAME
        // the original PixArt-α repos were saved before the class had its own name
        && class != "Transformer2DModel"
    {
        return Err(bad(format!(
            "`_class_name` is `{class}`, not a PixArt transformer ({CLASS_NAME})"
        )));
    }
    // keys of diffusers' generic Transformer2DModel that would change the architecture;
    // PixArt checkpoints carry them with these values, if at all
    for (key, fine) in [
        ("only_cross_attention", Value::Bool(false)),
        ("double_self_attention", Value::Bool(false)),
        ("num_vector_embeds", Value::Null),
    ] {
        if let Some(x) = v.get(key)
            && *x != fine
        {
            return Err(bad(format!(
                "`{key}` is {x}: not the PixArt-α architecture (expected {fine})"
            )));
        }
    }
    let cfg: Config = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
    cfg.validate().map_err(bad)?;
    Ok(cfg)
}

/// Loads a PixArt transformer from a diffusers directory, a pipeline root or a hub id in
/// the HF cache (module docs). `dtype` is the compute dtype of frozen weights;
/// `trainable` selects the tensors that become f32 variables (e.g. [`Trainable::all`],
/// or `transformer_blocks.{i}.` prefixes), `None` loads everything frozen. Returns the
/// model, its config and the weight files (for the fingerprint).
///
/// # Errors
/// [`Error::WeightsNotFound`], [`Error::BadFile`] (config), [`Error::BadTensor`] naming
/// the tensor and the file.
pub fn load_pixart(
    spec: &str,
    dtype: DType,
    device: &Device,
    trainable: Option<&Trainable>,
) -> Result<(PixArt, Config, Vec<PathBuf>)> {
    let dir = transformer_dir(spec)?;
    let cfg = read_config(&dir)?;
    let files = dir.safetensors(&["diffusion_pytorch_model", "model"])?;
    let weights = Arc::new(WeightFiles::open(&files)?);
    let what = format!("pixart ({spec})");
    let model = match trainable {
        Some(t) => weights.build_trainable(&what, same_names(), dtype, device, t, |vb| {
            PixArt::new(vb, &cfg)
        })?,
        None => weights.build(&what, same_names(), dtype, device, |vb| {
            PixArt::new(vb, &cfg)
        })?,
    };
    Ok((model, cfg, files))
}

/// A `VarBuilder` backend that answers every request with a zero-cost broadcast zero
/// and records the name and shape.
struct ShapeRecorder(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tensor `{name}` asked for without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// The names and shapes a model constructor asks for, without allocating weights.
pub(crate) fn record_shapes(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> candle_core::Result<BTreeMap<String, Vec<usize>>> {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let vb = VarBuilder::from_backend(
        Box::new(ShapeRecorder(Arc::clone(&seen))),
        DType::F32,
        Device::Cpu,
    );
    build(vb)?;
    let out = std::mem::take(
        &mut *seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok(out)
}

/// Every tensor a PixArt of `cfg` has, by diffusers name, with its shape.
///
/// # Errors
/// An invalid configuration.
pub fn expected_tensors(cfg: &Config) -> Result<BTreeMap<String, Vec<usize>>> {
    record_shapes(|vb| PixArt::new(vb, cfg).map(|_| ())).map_err(Error::candle("pixart"))
}

/// Checks `tensors` against `expected` (every name present with its shape, nothing
/// else), naming the first offender and the file it was to go to.
pub(crate) fn check_tensor_set(
    tensors: &BTreeMap<String, Tensor>,
    expected: &BTreeMap<String, Vec<usize>>,
    path: &Path,
) -> Result<()> {
    let bad = |tensor: &str, why: String| Error::BadTensor {
        tensor: tensor.to_string(),
        path: path.display().to_string(),
        why,
    };
    for (name, shape) in expected {
        match tensors.get(name) {
            None => return Err(bad(name, "missing from the tensors to save".into())),
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(bad(
                    name,
                    format!("expected shape {shape:?}, given {:?}", t.dims()),
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !expected.contains_key(*k)) {
        return Err(bad(extra, "not a tensor of this model".into()));
    }
    Ok(())
}

/// Writes `tensors` (on any device, in any float dtype) as one safetensors file.
pub(crate) fn write_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let bad = |why: String| Error::BadFile {
        path: path.to_path_buf(),
        why,
    };
    let mut map = HashMap::with_capacity(tensors.len());
    for (k, t) in tensors {
        let t = t
            .to_device(&Device::Cpu)
            .and_then(|t| t.contiguous())
            .map_err(|e| bad(format!("tensor `{k}`: {e}")))?;
        map.insert(k.clone(), t.detach());
    }
    candle_core::safetensors::save(&map, path).map_err(|e| bad(format!("writing safetensors: {e}")))
}

/// Writes a JSON value, pretty, with a final newline.
pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Config {
    /// The config as diffusers writes it in `config.json`: `_class_name`,
    /// `_diffusers_version`, then every init argument (sorted; an integral
    /// `interpolation_scale` as an integer).
    #[must_use]
    pub fn to_diffusers_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(obj) = v.as_object_mut() {
            if let Some(f) = obj.get("interpolation_scale").and_then(Value::as_f64)
                && f.fract() == 0.0
            {
                obj.insert("interpolation_scale".into(), Value::from(f as i64));
            }
            obj.insert("_class_name".into(), Value::from(CLASS_NAME));
            obj.insert("_diffusers_version".into(), Value::from(DIFFUSERS_VERSION));
        }
        v
    }
}

/// Saves a PixArt transformer in the diffusers layout: `dir/config.json` and
/// `dir/diffusion_pytorch_model.safetensors` (`dir` created if need be). `tensors` must
/// be exactly the model's (e.g. [`PixArt::tensors`], with trained variables in place of
/// the loaded values), each in the dtype it is to be stored in.
///
/// # Errors
/// [`Error::BadTensor`] for a missing, extra or misshapen tensor (nothing is written
/// then); I/O errors naming the file.
pub fn save_diffusers(dir: &Path, cfg: &Config, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let weights = dir.join(WEIGHTS_FILE);
    let expected = expected_tensors(cfg)?;
    check_tensor_set(tensors, &expected, &weights)?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_json(&dir.join("config.json"), &cfg.to_diffusers_json())?;
    write_safetensors(tensors, &weights)
}
