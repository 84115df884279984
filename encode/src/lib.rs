//! tensorbake-encode: the features, i.e. the frozen encoders of a diffusion model run
//! over a pipeline's images and captions.
//!
//! An [`Encoder`] turns a batch of inputs (RGB images at the pipeline's resolution,
//! or cleaned captions) into the feature arrays the store keeps, under the names the
//! feature schema fixes ([`tensorbake_kit::schema`]: `sd_vae_mean`, `siglip_hidden`,
//! `t5_hidden`, ...), each with a leading batch axis. Encoders are built from an
//! [`EncoderConfig`] (a manifest's `[[encoders]]` table) whose `weights` is a local
//! Hugging Face layout directory or a hub id resolved offline in the Hugging Face
//! cache ([`tensorbake_nn::weights`]).
//!
//! The models themselves live in tensorbake-nn; this crate adds what makes them
//! features: finding the model in a pipeline directory, preprocessing as the reference
//! processors do ([`image_ops`]), tokenizing as diffusers does ([`tokenize`]),
//! batching, and naming the output arrays. It knows nothing of tar or Zarr.
//!
//! ```
//! use tensorbake_encode::EncoderConfig;
//! use tensorbake_kit::dtype::DType;
//! let cfg: EncoderConfig = serde_json::from_str(r#"{"name": "t5", "weights": "/m", "dtype": "bf16"}"#).unwrap();
//! assert_eq!(cfg.dtype, DType::Bf16);
//! ```

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use tensorbake_kit::dtype::DType;
use tensorbake_kit::schema::{Array, Feature};

pub mod bench;
pub mod image_ops;
pub mod spm;
pub mod text;
pub mod tokenize;
pub mod vision;
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
    /// The model could not be found, read, checked or built ([`tensorbake_nn::Error`]
    /// names the file, the tensor, the weights location or the device).
    #[error(transparent)]
    Model(#[from] tensorbake_nn::Error),
    /// The input given to an encoder is not what it takes (text to an image encoder,
    /// an image of the wrong size, ...), or a setting it cannot honour.
    #[error("encoder `{encoder}`: {why}")]
    BadInput {
        /// The encoder's feature name.
        encoder: String,
        /// What was wrong.
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
}

impl EncodeError {
    /// A closure wrapping candle errors of `encoder` (for `map_err`).
    pub fn candle(encoder: &str) -> impl Fn(candle_core::Error) -> Self + '_ {
        move |source| Self::Candle {
            encoder: encoder.to_string(),
            source,
        }
    }
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
#[derive(Debug, Clone, PartialEq)]
pub struct ArraySpec {
    /// The array (its store name is `array.name()`).
    pub array: Array,
    /// Per-sample shape (without the batch axis).
    pub shape: Vec<usize>,
}

/// Serialized as `{"name": "siglip_hidden", "shape": [729, 1152]}` (the metadata of
/// `tensorbake encode` outputs).
impl Serialize for ArraySpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("ArraySpec", 2)?;
        st.serialize_field("name", self.array.name())?;
        st.serialize_field("shape", &self.shape)?;
        st.end()
    }
}

/// What the store records about an encoder (`docs/store.md`: `features.<name>`).
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderInfo {
    /// The feature.
    pub feature: Feature,
    /// The model, as given (path or hub id), and its architecture.
    pub model: String,
    /// Fingerprint of the weights ([`tensorbake_nn::weights::fingerprint`]).
    pub weights_sha256: String,
    /// Preprocessing parameters (sizes, filter, mean/std, max length ...).
    pub preprocess: serde_json::Value,
    /// The arrays written per sample.
    pub arrays: Vec<ArraySpec>,
}

/// One batch made ready for an encoder's model by [`Encoder::prepare`]: preprocessed
/// or tokenized on the host and uploaded to the encoder's device. Only an encoder of
/// the feature that prepared it can [`Encoder::run`] it.
pub struct Prepared {
    feature: Feature,
    inputs: Box<dyn std::any::Any + Send>,
    len: usize,
    uploaded_bytes: u64,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("feature", &self.feature)
            .field("len", &self.len)
            .field("uploaded_bytes", &self.uploaded_bytes)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// `len` inputs made into the model inputs `inputs` (the encoder's own type) for
    /// `feature`, `uploaded_bytes` of which were copied to the device.
    pub fn new<T: std::any::Any + Send>(
        feature: Feature,
        inputs: T,
        len: usize,
        uploaded_bytes: u64,
    ) -> Self {
        Self {
            feature,
            inputs: Box::new(inputs),
            len,
            uploaded_bytes,
        }
    }

    /// The feature whose encoder prepared the batch.
    #[must_use]
    pub fn feature(&self) -> Feature {
        self.feature
    }

    /// Inputs (images or captions) in the batch.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of model input copied from the host to the device (0 on the CPU).
    #[must_use]
    pub fn uploaded_bytes(&self) -> u64 {
        self.uploaded_bytes
    }

    /// The model inputs, if an encoder of `feature` made them as a `T`.
    ///
    /// # Errors
    /// [`EncodeError::BadInput`] naming `feature` for a batch another feature's
    /// encoder prepared.
    pub fn take<T: std::any::Any>(self, feature: Feature) -> Result<T> {
        let refused = |why: String| EncodeError::BadInput {
            encoder: feature.name().to_string(),
            why,
        };
        if self.feature != feature {
            return Err(refused(format!(
                "this batch was prepared by another kind of encoder (`{}`)",
                self.feature
            )));
        }
        self.inputs
            .downcast::<T>()
            .map(|b| *b)
            .map_err(|_| refused("this batch holds inputs of another type".into()))
    }
}

/// A frozen encoder: a batch in, named arrays (leading batch axis) out, in two
/// halves so that a pipeline can overlap them: [`Encoder::prepare`] (host work and
/// the upload) for the next batch on one thread while [`Encoder::run`] (the model)
/// runs the current one on another.
pub trait Encoder: Send + Sync {
    /// The host half of a batch: preprocessing or tokenizing, and the upload of the
    /// model inputs to the device, complete when this returns.
    fn prepare(&self, input: Input<'_>) -> Result<Prepared>;

    /// The device half: the model on a batch this encoder prepared. Each returned
    /// tensor has the batch as axis 0, in input order, one per
    /// [`EncoderInfo::arrays`] entry, in that order. On a GPU the work may still be
    /// queued when this returns ([`tensorbake_nn::ops::transfer::Fence`]).
    fn run(&self, prepared: Prepared) -> Result<Vec<(Array, Tensor)>>;

    /// Encodes one batch: [`Encoder::prepare`], then [`Encoder::run`].
    fn encode(&self, input: Input<'_>) -> Result<Vec<(Array, Tensor)>> {
        self.run(self.prepare(input)?)
    }

    /// The device the model runs on.
    fn device(&self) -> &candle_core::Device;

    /// What the store records about this encoder.
    fn info(&self) -> EncoderInfo;

    /// Whether the encoder takes text (`true`) or images (`false`).
    fn takes_text(&self) -> bool {
        self.info().feature.input() == tensorbake_kit::schema::Input::Text
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
    /// Compute and output dtype (`f32`, `bf16`, `f16`).
    #[serde(default)]
    pub dtype: DType,
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
    pub store_dtype: Option<DType>,
}

const fn default_batch() -> usize {
    16
}

fn default_device() -> String {
    "cpu".to_string()
}

/// Builds the encoder a config names. `resolution` is the pipeline's image size (the
/// VAE input size); text encoders ignore it.
///
/// # Errors
/// [`EncodeError::UnknownEncoder`] for a name the schema does not know; the
/// feature's own loading errors otherwise.
pub fn build_encoder(cfg: &EncoderConfig, resolution: u32) -> Result<Box<dyn Encoder>> {
    let feature = Feature::from_name(&cfg.name).ok_or_else(|| EncodeError::UnknownEncoder {
        name: cfg.name.clone(),
        known: Feature::known_names(),
    })?;
    Ok(match feature {
        Feature::SdVae | Feature::FluxVae => Box::new(vision::build_vae(cfg, feature, resolution)?),
        Feature::Siglip => Box::new(vision::build_siglip(cfg)?),
        Feature::ClipVision => Box::new(vision::build_clip_vision(cfg)?),
        Feature::T5 => Box::new(T5TextEncoder::load(cfg)?),
        Feature::ClipText => Box::new(ClipTextEncoder::load(cfg)?),
    })
}

/// Bytes the tensors hold on a device other than the CPU (what an upload copied).
pub(crate) fn device_bytes(tensors: &[&Tensor]) -> u64 {
    tensors
        .iter()
        .filter(|t| !t.device().is_cpu())
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum()
}

/// Runs `f` over `items` in chunks of at most `batch` and concatenates each of its
/// outputs on axis 0 (the batching every encoder does).
pub(crate) fn chunked<T>(
    items: &[T],
    batch: usize,
    encoder: &str,
    mut f: impl FnMut(&[T]) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    for chunk in items.chunks(batch.max(1)) {
        parts.push(f(chunk)?);
    }
    concat_outputs(&parts, encoder)
}

/// Each output of the chunks' `parts` (one `Vec` per chunk, the outputs in the same
/// order in each) concatenated on axis 0.
pub(crate) fn concat_outputs(parts: &[Vec<Tensor>], encoder: &str) -> Result<Vec<Tensor>> {
    let n = parts.first().map_or(0, Vec::len);
    (0..n)
        .map(|k| {
            let col: Vec<&Tensor> = parts.iter().map(|p| &p[k]).collect();
            Tensor::cat(&col, 0).map_err(EncodeError::candle(encoder))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_parsing() {
        assert_eq!("BF16".parse::<DType>().unwrap(), DType::Bf16);
        assert_eq!("float32".parse::<DType>().unwrap(), DType::F32);
        assert!("int8".parse::<DType>().unwrap_err().contains("int8"));
    }

    #[test]
    fn config_rejects_unknown_keys_and_fills_defaults() {
        let cfg: EncoderConfig = toml_like(r#"{"name":"t5","weights":"/m"}"#);
        assert_eq!(
            (cfg.batch, cfg.device.as_str(), cfg.dtype),
            (16, "cpu", DType::F32)
        );
        let err =
            serde_json::from_str::<EncoderConfig>(r#"{"name":"t5","weights":"/m","batchsize":3}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("batchsize"), "{err}");
    }

    #[test]
    fn unknown_encoders_are_named_with_the_known_ones() {
        let cfg: EncoderConfig = toml_like(r#"{"name":"resnet","weights":"/m"}"#);
        let e = build_encoder(&cfg, 64).err().unwrap().to_string();
        assert!(e.contains("resnet") && e.contains("clip_vision"), "{e}");
    }

    #[test]
    fn chunked_concatenates_every_output_in_order() {
        let items: Vec<f32> = (0..5).map(|i| i as f32).collect();
        let out = chunked(&items, 2, "test", |c| {
            let t = Tensor::new(c, &candle_core::Device::Cpu).map_err(EncodeError::candle("t"))?;
            Ok(vec![
                t.clone(),
                (t * 2.0).map_err(EncodeError::candle("t"))?,
            ])
        })
        .unwrap();
        assert_eq!(out[0].to_vec1::<f32>().unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(out[1].to_vec1::<f32>().unwrap(), [0.0, 2.0, 4.0, 6.0, 8.0]);
    }

    fn toml_like(s: &str) -> EncoderConfig {
        serde_json::from_str(s).unwrap()
    }
}
