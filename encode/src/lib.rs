//! tensorbake-encode: the frozen encoders of a diffusion model, in candle.
//!
//! An [`Encoder`] turns a batch of inputs (RGB images at the pipeline's resolution,
//! or cleaned captions) into the feature arrays the store keeps, under the names that
//! DESIGN.md fixes (`sd_vae_mean`, `siglip_hidden`, `t5_hidden`, ...), each with a
//! leading batch axis. Encoders are built from an [`EncoderConfig`] (a manifest's
//! `[[encoders]]` table) whose `weights` is a local Hugging Face layout directory or a
//! hub id resolved offline in the Hugging Face cache ([`weights`]).
//!
//! This crate knows nothing of tar or Zarr: it loads weights and runs models.
//!
//! ```
//! use tensorbake_encode::{parse_device, DTypeName};
//! let dev = parse_device("cpu").unwrap();
//! assert!(dev.is_cpu());
//! assert_eq!(DTypeName::Bf16.dtype(), candle_core::DType::BF16);
//! ```

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub mod clip_vision;
pub mod image_ops;
pub mod loader;
pub mod siglip;
pub mod vae;
pub mod vision;
pub mod weights;

// Text encoders (t5, clip_text).
mod checked;
pub mod clip_text;
pub mod spm;
pub mod t5;
pub mod text;
pub mod tiny;
pub mod tokenize;
pub use text::{ClipTextEncoder, T5TextEncoder, null_embedding};

/// Errors of the encoders. Variants name the file, tensor or encoder concerned.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The `name` of an encoder config is not one of the known features.
    #[error("unknown encoder `{name}`; known encoders: {known}")]
    UnknownEncoder {
        /// The name asked for.
        name: String,
        /// Comma-separated list of the known names.
        known: String,
    },
    /// A weights location could not be resolved to a model directory.
    #[error("weights `{spec}` not found: {why}")]
    WeightsNotFound {
        /// The path or hub id asked for.
        spec: String,
        /// What was tried and how to get the weights.
        why: String,
    },
    /// A file of the model directory could not be read or parsed.
    #[error("{path}: {why}")]
    BadFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A tensor is missing from, or has the wrong shape or dtype in, the weights.
    #[error("tensor `{tensor}` in {path}: {why}")]
    BadTensor {
        /// Full tensor name as stored (e.g. `encoder.conv_in.weight`).
        tensor: String,
        /// The safetensors file(s) searched.
        path: String,
        /// Missing, or expected vs found shape / dtype.
        why: String,
    },
    /// The input given to an encoder is not what it takes (text to an image encoder,
    /// an image of the wrong size, ...).
    #[error("encoder `{encoder}`: {why}")]
    BadInput {
        /// The encoder's feature name.
        encoder: String,
        /// What was wrong.
        why: String,
    },
    /// `--device` / `device =` could not be parsed or the device is not available.
    #[error("device `{spec}`: {why}")]
    Device {
        /// The device string.
        spec: String,
        /// Why it is not usable.
        why: String,
    },
    /// An error inside candle while running a model.
    #[error("encoder `{encoder}`: {source}")]
    Candle {
        /// The encoder's feature name.
        encoder: String,
        /// The candle error.
        #[source]
        source: candle_core::Error,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T, E = EncodeError> = std::result::Result<T, E>;

/// A borrowed RGB8 image, rows top to bottom, `width * height * 3` bytes (HWC).
#[derive(Debug, Clone, Copy)]
pub struct Rgb8<'a> {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved RGB bytes.
    pub pixels: &'a [u8],
}

/// One batch of inputs for an encoder.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// Images (image encoders and VAEs).
    Images(&'a [Rgb8<'a>]),
    /// Cleaned captions (text encoders).
    Texts(&'a [&'a str]),
}

/// One array an encoder writes per sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArraySpec {
    /// Array name in the store, e.g. `siglip_hidden`.
    pub name: String,
    /// Per-sample shape (without the batch axis).
    pub shape: Vec<usize>,
}

/// What the store records about an encoder (DESIGN.md: `features.<name>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderInfo {
    /// Feature name (`sd_vae`, `siglip`, `t5`, ...).
    pub feature: String,
    /// The model, as given (path or hub id), and its architecture.
    pub model: String,
    /// Fingerprint of the weights ([`weights::fingerprint`]).
    pub weights_sha256: String,
    /// Preprocessing parameters (sizes, filter, mean/std, max length ...).
    pub preprocess: serde_json::Value,
    /// The arrays written per sample.
    pub arrays: Vec<ArraySpec>,
}

/// A frozen encoder: a batch in, named arrays (leading batch axis) out.
pub trait Encoder: Send {
    /// Encodes one batch. Each returned tensor has the batch as axis 0, in input order,
    /// and is named as in [`EncoderInfo::arrays`].
    fn encode(&self, input: Input<'_>) -> Result<Vec<(String, Tensor)>>;

    /// What the store records about this encoder.
    fn info(&self) -> EncoderInfo;

    /// Whether the encoder takes text (`true`) or images (`false`).
    fn takes_text(&self) -> bool {
        false
    }
}

/// Floating-point dtype names as they appear in manifests and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeName {
    /// 32-bit float (reference precision; the CPU default).
    #[default]
    F32,
    /// bfloat16 (the GPU default).
    Bf16,
    /// IEEE half.
    F16,
}

impl DTypeName {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for DTypeName {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            other => Err(format!("unknown dtype `{other}` (f32, bf16 or f16)")),
        }
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device.
pub fn parse_device(spec: &str) -> Result<Device> {
    let err = |why: String| EncodeError::Device {
        spec: spec.to_string(),
        why,
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| err(e.to_string())),
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..]
                .parse()
                .map_err(|_| err("expected cuda:N with N a GPU index".into()))?;
            Device::new_cuda(n).map_err(|e| err(e.to_string()))
        }
        _ => Err(err("expected cpu, cuda or cuda:N".into())),
    }
}

/// One `[[encoders]]` table of a manifest, or the flags of `tensorbake encode`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    /// Feature name: `sd_vae`, `flux_vae`, `siglip`, `clip_vision`, `t5`, `clip_text`.
    pub name: String,
    /// Local HF-layout directory, or a hub id (`org/name[@revision]`) in the HF cache.
    pub weights: String,
    /// Compute and output dtype.
    #[serde(default)]
    pub dtype: DTypeName,
    /// Batch size.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Text encoders: maximum token length (T5: 120 for PixArt, 512 Flux-dev, 256 schnell).
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Dtype the float arrays are stored in (`tensorbake run`): by default bf16 for
    /// embeddings and f32 for VAE latent moments; f16 halves the latents.
    #[serde(default)]
    pub store_dtype: Option<DTypeName>,
}

const fn default_batch() -> usize {
    16
}

fn default_device() -> String {
    "cpu".to_string()
}

/// The feature names [`build_encoder`] knows.
pub const KNOWN_ENCODERS: &[&str] = &[
    "sd_vae",
    "flux_vae",
    "siglip",
    "clip_vision",
    "t5",
    "clip_text",
];

/// Builds the encoder a config names. `resolution` is the pipeline's image size (the
/// VAE input size); text encoders ignore it.
pub fn build_encoder(cfg: &EncoderConfig, resolution: u32) -> Result<Box<dyn Encoder>> {
    match cfg.name.as_str() {
        // Image features (vision.rs).
        "sd_vae" | "flux_vae" => Ok(Box::new(vision::build_vae(cfg, resolution)?)),
        "siglip" => Ok(Box::new(vision::build_siglip(cfg)?)),
        "clip_vision" => Ok(Box::new(vision::build_clip_vision(cfg)?)),
        // Text encoders.
        "t5" => Ok(Box::new(T5TextEncoder::load(cfg)?)),
        "clip_text" => Ok(Box::new(ClipTextEncoder::load(cfg)?)),
        _ => Err(EncodeError::UnknownEncoder {
            name: cfg.name.clone(),
            known: KNOWN_ENCODERS.join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_and_device_parsing() {
        assert_eq!("BF16".parse::<DTypeName>().unwrap(), DTypeName::Bf16);
        assert_eq!("float32".parse::<DTypeName>().unwrap(), DTypeName::F32);
        assert!("int8".parse::<DTypeName>().unwrap_err().contains("int8"));
        assert!(parse_device("cpu").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("cuda:N"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("GPU index"), "{e}");
    }

    #[test]
    fn config_rejects_unknown_keys_and_fills_defaults() {
        let cfg: EncoderConfig = toml_like(r#"{"name":"t5","weights":"/m"}"#);
        assert_eq!(
            (cfg.batch, cfg.device.as_str(), cfg.dtype),
            (16, "cpu", DTypeName::F32)
        );
        let err =
            serde_json::from_str::<EncoderConfig>(r#"{"name":"t5","weights":"/m","batchsize":3}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("batchsize"), "{err}");
    }

    fn toml_like(s: &str) -> EncoderConfig {
        serde_json::from_str(s).unwrap()
    }
}
