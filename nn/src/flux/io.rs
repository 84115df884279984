//! Loading a Flux transformer from disk and saving one in the diffusers layout (the file
//! I/O kept out of the model file).
//!
//! A weights location ([`load_flux`]'s `spec`) is
//!
//! - a diffusers model directory: `config.json` (`FluxTransformer2DModel`) +
//!   `diffusion_pytorch_model.safetensors` or a sharded
//!   `diffusion_pytorch_model.safetensors.index.json` set (FLUX.1-dev's `transformer/`
//!   is sharded in three);
//! - a pipeline root (`model_index.json`, or no `config.json`): its `transformer/`;
//!   failing that, the one BFL single file it holds (`flux1-dev.safetensors`);
//! - a single `.safetensors` file with BFL's names (`double_blocks.N...`, optionally under
//!   `model.diffusion_model.`), whose config comes from its tensor shapes ([`super::bfl`]);
//! - a hub id `org/name[@revision]` in the local Hugging Face cache, read by the same
//!   rules (`black-forest-labs/FLUX.1-dev`, `ostris/OpenFLUX.1`).
//!
//! [`save_diffusers`] always writes the diffusers layout: `config.json` and
//! `diffusion_pytorch_model.safetensors`, which `FluxTransformer2DModel.from_pretrained`
//! loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{Config, Flux, bfl};
use crate::loader::{Trainable, WeightFiles, same_names};
use crate::pixart::io::{
    DIFFUSERS_VERSION, WEIGHTS_FILE, check_tensor_set, record_shapes, write_json, write_safetensors,
};
use crate::weights::ModelDir;
use crate::{Error, Result};

/// The diffusers class this layout is for.
pub const CLASS_NAME: &str = "FluxTransformer2DModel";

/// Reads and checks the `config.json` of a Flux model directory.
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
    {
        return Err(bad(format!(
            "`_class_name` is `{class}`, not a Flux transformer ({CLASS_NAME})"
        )));
    }
    let cfg: Config = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
    cfg.validate().map_err(bad)?;
    Ok(cfg)
}

/// Where a model's weights and config come from.
enum Source {
    /// A diffusers directory.
    Diffusers(ModelDir),
    /// A BFL single file.
    Bfl(PathBuf),
}

/// The BFL single file of a directory: `flux1-*.safetensors`, else the only
/// `*.safetensors` there.
fn bfl_file_in(root: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let flux: Vec<&PathBuf> = files
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("flux1"))
        })
        .collect();
    match (flux.as_slice(), files.as_slice()) {
        ([one], _) => Some((*one).clone()),
        ([], [one]) => Some(one.clone()),
        _ => None,
    }
}

fn locate(spec: &str) -> Result<Source> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(Source::Bfl(path.to_path_buf()));
    }
    let root = ModelDir::resolve(spec)?;
    let index = root.file("model_index.json").is_some();
    if !index && root.file("config.json").is_some() {
        return Ok(Source::Diffusers(root));
    }
    if let Some(sub) = root.sub("transformer") {
        return Ok(Source::Diffusers(sub));
    }
    if let Some(f) = bfl_file_in(&root.root) {
        return Ok(Source::Bfl(f));
    }
    Err(Error::WeightsNotFound {
        spec: spec.to_string(),
        why: format!(
            "{} has {}, no `transformer/` folder and no single BFL file (flux1-*.safetensors)",
            root.root.display(),
            if index {
                "model_index.json (a pipeline root)"
            } else {
                "no config.json"
            }
        ),
    })
}

/// The config of the Flux transformer at `spec` (as [`load_flux`] finds it) without
/// loading its weights: a diffusers `config.json`, or a BFL file's shapes.
///
/// # Errors
/// As [`load_flux`].
pub fn config_of(spec: &str) -> Result<Config> {
    match locate(spec)? {
        Source::Diffusers(dir) => read_config(&dir),
        Source::Bfl(path) => {
            let weights = WeightFiles::open(std::slice::from_ref(&path))?;
            bfl::config_from_bfl(&weights, &path)
        }
    }
}

/// Loads a Flux transformer (module docs for the locations). `dtype` is the compute
/// dtype of frozen weights; `trainable` selects the tensors, by diffusers name, that
/// become f32 variables (e.g. [`Trainable::all`], or `transformer_blocks.{i}.`
/// prefixes); `None` loads everything frozen. A BFL file's config comes from its shapes,
/// with RoPE axes (16, 56, 56): for another head width use [`load_flux_file`] with the
/// config. Returns the model, its config and the weight files (for the fingerprint).
///
/// # Errors
/// [`Error::WeightsNotFound`], [`Error::BadFile`] (config, a file that is not Flux),
/// [`Error::BadTensor`] naming the tensor (BFL's name for a BFL file) and the file.
pub fn load_flux(
    spec: &str,
    dtype: DType,
    device: &Device,
    trainable: Option<&Trainable>,
) -> Result<(Flux, Config, Vec<PathBuf>)> {
    match locate(spec)? {
        Source::Bfl(path) => load_flux_file(&path, None, dtype, device, trainable),
        Source::Diffusers(dir) => {
            let cfg = read_config(&dir)?;
            let files = dir.safetensors(&["diffusion_pytorch_model", "model"])?;
            let weights = Arc::new(WeightFiles::open(&files)?);
            if bfl::is_bfl(&weights) {
                return Err(Error::BadFile {
                    path: files[0].clone(),
                    why: "holds BFL names (double_blocks.N...) in a diffusers directory: \
                          give the file itself"
                        .into(),
                });
            }
            let what = format!("flux ({spec})");
            let model = match trainable {
                Some(t) => {
                    weights.build_trainable(&what, same_names(), dtype, device, t, |vb| {
                        Flux::new(vb, &cfg)
                    })?
                }
                None => {
                    weights.build(&what, same_names(), dtype, device, |vb| Flux::new(vb, &cfg))?
                }
            };
            Ok((model, cfg, files))
        }
    }
}

/// Loads a BFL single file (`flux1-dev.safetensors`, optionally with the
/// `model.diffusion_model.` prefix) as [`load_flux`] does, with `cfg` instead of the
/// config inferred from the shapes when given (a head width other than 128 has no
/// standard RoPE axes). The model's tensors keep their diffusers names (the variables
/// of `trainable` too); q, k, v (and the single blocks' MLP input) are narrowed out of
/// the fused BFL tensors, the final modulation's halves swapped.
///
/// # Errors
/// [`Error::BadFile`] (not a Flux file, a config the shapes contradict),
/// [`Error::BadTensor`] naming the BFL tensor and the file.
pub fn load_flux_file(
    path: &Path,
    cfg: Option<&Config>,
    dtype: DType,
    device: &Device,
    trainable: Option<&Trainable>,
) -> Result<(Flux, Config, Vec<PathBuf>)> {
    let files = vec![path.to_path_buf()];
    let weights = Arc::new(WeightFiles::open(&files)?);
    if !bfl::is_bfl(&weights) {
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            why: if weights.contains("x_embedder.weight") {
                "holds diffusers names: give its directory, with the config.json".into()
            } else {
                "not a Flux transformer: no img_in.weight / double_blocks.N tensors".into()
            },
        });
    }
    let cfg = match cfg {
        Some(c) => {
            c.validate().map_err(|why| Error::BadFile {
                path: path.to_path_buf(),
                why: format!("the config given: {why}"),
            })?;
            c.clone()
        }
        None => bfl::config_from_bfl(&weights, path)?,
    };
    let what = format!("flux ({})", path.display());
    let model = bfl::build(&weights, &cfg, &what, dtype, device, trainable, |vb| {
        Flux::new(vb, &cfg)
    })?;
    Ok((model, cfg, files))
}

/// Every tensor a Flux of `cfg` has, by diffusers name, with its shape (without
/// allocating).
///
/// # Errors
/// An invalid configuration.
pub fn expected_tensors(cfg: &Config) -> Result<BTreeMap<String, Vec<usize>>> {
    record_shapes(|vb| Flux::new(vb, cfg).map(|_| ())).map_err(Error::candle("flux"))
}

/// [`Flux::tensor_groups`] for a config, without allocating weights.
///
/// # Errors
/// An invalid configuration.
pub fn tensor_groups(cfg: &Config) -> Result<Vec<(String, Vec<String>)>> {
    let mut groups = None;
    record_shapes(|vb| {
        groups = Some(Flux::new(vb, cfg)?.tensor_groups());
        Ok(())
    })
    .map_err(Error::candle("flux"))?;
    Ok(groups.unwrap_or_default())
}

impl Config {
    /// The config as diffusers writes it in `config.json`: `_class_name`,
    /// `_diffusers_version`, then every init argument.
    #[must_use]
    pub fn to_diffusers_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("_class_name".into(), Value::from(CLASS_NAME));
            obj.insert("_diffusers_version".into(), Value::from(DIFFUSERS_VERSION));
        }
        v
    }
}

/// Saves a Flux transformer in the diffusers layout: `dir/config.json` and
/// `dir/diffusion_pytorch_model.safetensors` (`dir` created if need be), whatever layout
/// it was loaded from. `tensors` must be exactly the model's, by diffusers name (e.g.
/// [`Flux::tensors`], with trained variables in place of the loaded values), each in the
/// dtype it is to be stored in.
///
/// # Errors
/// [`Error::BadTensor`] for a missing, extra or misshapen tensor (nothing is written
/// then); I/O errors naming the file.
pub fn save_diffusers(dir: &Path, cfg: &Config, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let weights = dir.join(WEIGHTS_FILE);
    check_tensor_set(tensors, &expected_tensors(cfg)?, &weights)?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_json(&dir.join("config.json"), &cfg.to_diffusers_json())?;
    write_safetensors(tensors, &weights)
}
