//! Finding a KL autoencoder's files and building its halves from them: a diffusers VAE
//! directory (`config.json` + `diffusion_pytorch_model.safetensors`), a pipeline root
//! (its `vae/`), or BFL's `ae.safetensors` without a config (the architecture read from
//! the tensor shapes); local paths or hub ids in the HF cache. Shared by the encoder
//! feature and the sampler's decoder, so both read a VAE the same way.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};

use super::{Config, VaeDecoder, VaeEncoder, is_ldm_layout, weight_names};
use crate::loader::WeightFiles;
use crate::weights::{ModelDir, fingerprint};
use crate::{Error, Result};

/// A located VAE: its directory, weight files (indexed), config and naming.
#[derive(Debug, Clone)]
pub struct VaeFiles {
    /// The directory holding the weights.
    pub dir: ModelDir,
    /// The safetensors files.
    pub files: Vec<PathBuf>,
    /// The indexed files.
    pub weights: Arc<WeightFiles>,
    /// The architecture.
    pub cfg: Config,
    /// Whether the files use the LDM / BFL names.
    pub ldm: bool,
    /// Where the architecture came from (`config.json`, or the shapes).
    pub layout: &'static str,
}

impl VaeFiles {
    /// The sha256 fingerprint of the weights (as the store records it).
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn fingerprint(&self) -> Result<String> {
        fingerprint(&self.files)
    }

    /// Builds the encoder half (frozen, in `dtype` on `device`).
    ///
    /// # Errors
    /// A tensor missing or misshapen, named with the file.
    pub fn encoder(&self, what: &str, dtype: DType, device: &Device) -> Result<VaeEncoder> {
        self.weights.build(
            what,
            weight_names(&self.cfg, self.ldm),
            dtype,
            device,
            |vb| VaeEncoder::new(vb, &self.cfg),
        )
    }

    /// Builds the decoder half (frozen, in `dtype` on `device`).
    ///
    /// # Errors
    /// A tensor missing or misshapen (a VAE file holding only the encoder), named.
    pub fn decoder(&self, what: &str, dtype: DType, device: &Device) -> Result<VaeDecoder> {
        self.cfg.validate_decoder().map_err(|why| Error::BadFile {
            path: self.dir.root.join("config.json"),
            why,
        })?;
        self.weights.build(
            what,
            weight_names(&self.cfg, self.ldm),
            dtype,
            device,
            |vb| VaeDecoder::new(vb, &self.cfg),
        )
    }
}

/// Locates the VAE `spec` names (module docs).
///
/// # Errors
/// [`Error::WeightsNotFound`] when nothing is there; [`Error::BadFile`] for a config
/// that does not parse or validate, or a config-less file that is not BFL's layout.
pub fn locate(spec: &str) -> Result<VaeFiles> {
    let mut dir = ModelDir::resolve(spec)?;
    if dir.file("model_index.json").is_some()
        && let Some(v) = dir.sub("vae")
    {
        dir = v;
    }
    if dir.file("config.json").is_none()
        && dir.file("ae.safetensors").is_none()
        && dir.file("diffusion_pytorch_model.safetensors").is_none()
        && let Some(v) = dir.sub("vae")
    {
        dir = v;
    }
    let files = dir.safetensors(&["diffusion_pytorch_model", "ae", "model"])?;
    let weights = Arc::new(WeightFiles::open(&files)?);
    let bad = |why: String| Error::BadFile {
        path: dir.root.join("config.json"),
        why,
    };
    let (cfg, layout) = if dir.file("config.json").is_some() {
        let v: serde_json::Value = dir.json("config.json")?;
        let c: Config = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        (c, "config.json")
    } else {
        let c = Config::from_ldm_shapes(|n| weights.meta(n).map(|m| m.shape.clone())).ok_or_else(
            || {
                bad(format!(
                    "missing, and {} is not in the BFL/LDM autoencoder layout \
                     (no encoder.conv_in / encoder.down.0.block.0 / encoder.conv_out tensors) \
                     from which the architecture could be read",
                    files[0].display()
                ))
            },
        )?;
        (c, "architecture from the tensor shapes")
    };
    cfg.validate().map_err(bad)?;
    // diffusers names (and their pre-0.14 attention aliases), or the LDM / BFL layout:
    // one naming per file, so that a missing tensor is reported under the file's own name.
    let ldm = is_ldm_layout(weights.names().into_iter());
    Ok(VaeFiles {
        dir,
        files,
        weights,
        cfg,
        ldm,
        layout,
    })
}
