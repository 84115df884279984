//! Loading and saving the Redux adapter (file I/O kept out of the model file).
//!
//! [`load_redux`] takes
//!
//! - a bare safetensors file (BFL's `flux1-redux-dev.safetensors`: `redux_up.*`,
//!   `redux_down.*`); the shapes give the config;
//! - a diffusers directory (`config.json` + `diffusion_pytorch_model.safetensors`, FLUX.1-
//!   Redux-dev's `image_embedder/`);
//! - a pipeline root holding `image_embedder/`, or a directory holding only the BFL
//!   file; a hub id in the HF cache (`black-forest-labs/FLUX.1-Redux-dev`) by the same
//!   rules, the diffusers folder preferred.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use super::{Config, Redux};
use crate::loader::{Trainable, WeightFiles, same_names};
use crate::pixart::io::{check_tensor_set, record_shapes, write_json, write_safetensors};
use crate::weights::ModelDir;
use crate::{Error, Result};

/// The diffusers class of the adapter.
pub const CLASS_NAME: &str = "ReduxImageEncoder";
/// The name of BFL's single file.
pub const BFL_FILE: &str = "flux1-redux-dev.safetensors";

/// Every tensor of an adapter of `cfg`, with its shape.
///
/// # Errors
/// None in practice (a bug).
pub fn expected_tensors(cfg: &Config) -> Result<BTreeMap<String, Vec<usize>>> {
    record_shapes(|vb| Redux::new(vb, cfg).map(|_| ())).map_err(Error::candle("redux"))
}

/// The config of a bare safetensors file, from its tensor shapes.
fn config_from_file(weights: &WeightFiles, path: &Path) -> Result<Config> {
    let shape = |n: &str| weights.meta(n).map(|m| m.shape.clone());
    match (shape("redux_up.weight"), shape("redux_down.weight")) {
        (Some(up), Some(down)) => Config::from_shapes(&up, &down).ok_or_else(|| Error::BadFile {
            path: path.to_path_buf(),
            why: format!(
                "redux_up.weight {up:?} and redux_down.weight {down:?} do not fit together \
                 (want [3t, r] and [t, 3t])"
            ),
        }),
        _ => Err(Error::BadFile {
            path: path.to_path_buf(),
            why: "not a Redux adapter: no redux_up.weight / redux_down.weight tensors".into(),
        }),
    }
}

/// Where the adapter's weights and config come from.
enum Source {
    /// A diffusers directory.
    Diffusers(ModelDir),
    /// A BFL single file.
    File(PathBuf),
}

fn locate(spec: &str) -> Result<Source> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(Source::File(path.to_path_buf()));
    }
    let root = ModelDir::resolve(spec)?;
    if let Some(sub) = root.sub("image_embedder")
        && sub.file("config.json").is_some()
    {
        return Ok(Source::Diffusers(sub));
    }
    if root.file("config.json").is_some() && root.file("model_index.json").is_none() {
        return Ok(Source::Diffusers(root));
    }
    if let Some(f) = root.file(BFL_FILE) {
        return Ok(Source::File(f));
    }
    Err(Error::WeightsNotFound {
        spec: spec.to_string(),
        why: format!(
            "{} holds no Redux adapter: no image_embedder/ folder with a config.json, \
             no config.json, no {BFL_FILE}",
            root.root.display()
        ),
    })
}

/// Loads the Redux adapter (module docs for the locations). `dtype` is the compute
/// dtype of frozen weights; `trainable` selects tensors to train (`None`: frozen).
/// Returns the adapter, its config and the weight files.
///
/// # Errors
/// [`Error::WeightsNotFound`], [`Error::BadFile`] (config or file),
/// [`Error::BadTensor`] naming the tensor and the file.
pub fn load_redux(
    spec: &str,
    dtype: DType,
    device: &Device,
    trainable: Option<&Trainable>,
) -> Result<(Redux, Config, Vec<PathBuf>)> {
    let (files, cfg_from) = match locate(spec)? {
        Source::File(f) => (vec![f], None),
        Source::Diffusers(dir) => {
            let path = dir.root.join("config.json");
            let v: Value = dir.json("config.json")?;
            if let Some(class) = v.get("_class_name").and_then(Value::as_str)
                && class != CLASS_NAME
            {
                return Err(Error::BadFile {
                    path,
                    why: format!("`_class_name` is `{class}`, not {CLASS_NAME}"),
                });
            }
            let cfg: Config = serde_json::from_value(v).map_err(|e| Error::BadFile {
                path,
                why: e.to_string(),
            })?;
            (
                dir.safetensors(&["diffusion_pytorch_model", "model"])?,
                Some(cfg),
            )
        }
    };
    let weights = Arc::new(WeightFiles::open(&files)?);
    let cfg = match cfg_from {
        Some(c) => c,
        None => config_from_file(&weights, &files[0])?,
    };
    let what = format!("redux ({spec})");
    let model = match trainable {
        Some(t) => weights.build_trainable(&what, same_names(), dtype, device, t, |vb| {
            Redux::new(vb, &cfg)
        })?,
        None => weights.build(&what, same_names(), dtype, device, |vb| {
            Redux::new(vb, &cfg)
        })?,
    };
    Ok((model, cfg, files))
}

fn config_of(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<Config> {
    let dims = |n: &str| {
        tensors
            .get(n)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| Error::BadTensor {
                tensor: n.to_string(),
                path: path.display().to_string(),
                why: "missing from the tensors to save".into(),
            })
    };
    let (up, down) = (dims("redux_up.weight")?, dims("redux_down.weight")?);
    Config::from_shapes(&up, &down).ok_or_else(|| Error::BadTensor {
        tensor: "redux_down.weight".into(),
        path: path.display().to_string(),
        why: format!("shape {down:?} does not fit redux_up.weight {up:?}"),
    })
}

/// Writes the adapter as one safetensors file in BFL's names (`redux_up.*`,
/// `redux_down.*`; `redux.safetensors` in a checkpoint). The tensors must be exactly the
/// adapter's, their shapes consistent.
///
/// # Errors
/// [`Error::BadTensor`] (nothing is written then), I/O errors naming the file.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let cfg = config_of(tensors, path)?;
    check_tensor_set(tensors, &expected_tensors(&cfg)?, path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| Error::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    write_safetensors(tensors, path)
}

/// Writes the adapter as a diffusers `ReduxImageEncoder` directory (`config.json` +
/// `diffusion_pytorch_model.safetensors`).
///
/// # Errors
/// As [`save_safetensors`]; a `cfg` that disagrees with the tensors.
pub fn save_diffusers(dir: &Path, cfg: &Config, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let weights = dir.join(crate::pixart::io::WEIGHTS_FILE);
    check_tensor_set(tensors, &expected_tensors(cfg)?, &weights)?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_json(
        &dir.join("config.json"),
        &json!({
            "_class_name": CLASS_NAME,
            "_diffusers_version": crate::pixart::io::DIFFUSERS_VERSION,
            "redux_dim": cfg.redux_dim,
            "txt_in_features": cfg.txt_in_features,
        }),
    )?;
    write_safetensors(tensors, &weights)
}
