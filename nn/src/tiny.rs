//! Tiny random-weight models in the real Hugging Face layouts, for the demo and tests.
//!
//! [`write_tiny_model`] writes a model directory that the loaders of this crate (and
//! transformers / diffusers, for the architectures they share) read exactly as they
//! read the real checkpoint: the upstream `config.json` keys, the weight file name
//! (`diffusion_pytorch_model.safetensors` for diffusers VAEs, `model.safetensors` for
//! transformers models), the real tensor names, a `preprocessor_config.json` for the
//! image towers and, for T5, a SentencePiece `spiece.model` with `tokenizer_config.json`
//! as google/t5-v1_1-xxl ships them. Only the sizes are small (a few hundred kB).
//! [`write_tiny_pixart`], [`write_tiny_flux`] and [`write_tiny_redux`] do the same for
//! the models the trainer trains (PixArt-α's and Flux's transformers, the Redux
//! adapter), in the diffusers layout.
//!
//! The tensor names are not listed by hand: the model is built once through a
//! `VarBuilder` whose backend records every tensor the model asks for and makes it up
//! from a seeded generator, so the file holds exactly what the loader reads, under the
//! names it reads. Values are scaled like an initialised network (weights `N(0,
//! 1/fan_in)`, norm scales near 1, small biases) so activations stay finite through
//! every layer. The same `(name, seed)` writes the same bytes on every machine and
//! version (SplitMix64 + Box-Muller, not `rand`).
//!
//! ```no_run
//! use tensorbake_nn::tiny::{write_tiny_model, TinyModel};
//! let dir = std::env::temp_dir().join("tiny-t5");
//! write_tiny_model(TinyModel::T5, &dir, 7).unwrap();
//! assert!(dir.join("spiece.model").is_file());
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde_json::{Value, json};

use tensorbake_kit::rng::SplitMix64;
use tensorbake_kit::schema::Feature;

use crate::{Error, Result};

/// The architectures [`write_tiny_model`] writes, by the feature they serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyModel {
    /// diffusers `AutoencoderKL` (encoder and decoder), 4 latent channels, with
    /// `quant_conv` / `post_quant_conv` (sd-vae-ft-ema).
    SdVae,
    /// diffusers `AutoencoderKL` (encoder and decoder), 16 latent channels, no
    /// `quant_conv` / `post_quant_conv` (FLUX.1 `vae/`).
    FluxVae,
    /// transformers `SiglipVisionModel` (`vision_model.*`).
    Siglip,
    /// transformers `CLIPVisionModelWithProjection`.
    ClipVision,
    /// transformers `T5EncoderModel` (v1.1: gated GELU) with a SentencePiece model.
    T5,
}

impl TinyModel {
    /// The model serving a feature, `None` for the features without one (`clip_text`).
    #[must_use]
    pub fn for_feature(feature: Feature) -> Option<Self> {
        Some(match feature {
            Feature::SdVae => Self::SdVae,
            Feature::FluxVae => Self::FluxVae,
            Feature::Siglip => Self::Siglip,
            Feature::ClipVision => Self::ClipVision,
            Feature::T5 => Self::T5,
            Feature::ClipText => return None,
        })
    }

    /// The feature this model serves.
    #[must_use]
    pub fn feature(self) -> Feature {
        match self {
            Self::SdVae => Feature::SdVae,
            Self::FluxVae => Feature::FluxVae,
            Self::Siglip => Feature::Siglip,
            Self::ClipVision => Feature::ClipVision,
            Self::T5 => Feature::T5,
        }
    }
}

/// Values for one tensor, seeded by its name, drawn as [`value_scale`] says.
fn values(seed: u64, name: &str, dims: &[usize]) -> Vec<f32> {
    let mut rng = SplitMix64::for_name(seed, name);
    let n: usize = dims.iter().product();
    let (mean, std) = value_scale(name, dims);
    (0..n).map(|_| (mean + std * rng.normal()) as f32).collect()
}

/// The (mean, standard deviation) [`values`] draws a tensor from: norm scales near 1,
/// small biases, embeddings of unit scale, other weights `N(0, 1/fan_in)`. Also the
/// rule of [`crate::random`]'s device-side weights.
pub(crate) fn value_scale(name: &str, dims: &[usize]) -> (f64, f64) {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let embedding = name.contains("embed") || name.starts_with("shared");
    if name.contains("relative_attention_bias") {
        (0.0, 0.1)
    } else if leaf == "bias" {
        (0.0, 0.02)
    } else if dims.len() == 1 && !embedding {
        (1.0, 0.05)
    } else if embedding {
        (0.0, if dims.len() == 1 { 0.02 } else { 1.0 })
    } else {
        let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
        (0.0, 1.0 / (fan_in as f64).sqrt())
    }
}

/// Values for the diffusion transformers and adapters ([`write_tiny_pixart`], [`write_tiny_flux`],
/// [`write_tiny_redux`]): as [`values`], but every weight of rank 2 or more is
/// `N(0, 1/fan_in)` whatever its name (their `*_embedder` layers are linear layers,
/// not embedding tables), so the adaLN modulation stays of order one.
fn fan_in_values(seed: u64, name: &str, dims: &[usize]) -> Vec<f32> {
    let mut rng = SplitMix64::for_name(seed, name);
    let n: usize = dims.iter().product();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let (mean, std) = if leaf == "bias" {
        (0.0, 0.02)
    } else if dims.len() == 1 {
        (1.0, 0.05)
    } else {
        let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
        (0.0, 1.0 / (fan_in as f64).sqrt())
    };
    (0..n).map(|_| (mean + std * rng.normal()) as f32).collect()
}

/// How a [`Recorder`] makes up a tensor's values from the seed, name and shape.
type ValuesFn = fn(u64, &str, &[usize]) -> Vec<f32>;

/// A `VarBuilder` backend that makes up every tensor asked for and remembers it.
struct Recorder {
    seed: u64,
    made: Arc<Mutex<BTreeMap<String, Tensor>>>,
    values: ValuesFn,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = made.get(name) {
            return crate::random::made_before(t, name, &s, dtype, dev);
        }
        let t = Tensor::from_vec(
            (self.values)(self.seed, name, s.dims()),
            s.dims(),
            &Device::Cpu,
        )?;
        made.insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tensor `{name}` asked for without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Builds a model through a recording `VarBuilder` and returns the tensors it read.
fn record(
    seed: u64,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> candle_core::Result<BTreeMap<String, Tensor>> {
    record_with(seed, values, build)
}

/// [`record`] with another rule for the values.
fn record_with(
    seed: u64,
    values: ValuesFn,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> candle_core::Result<BTreeMap<String, Tensor>> {
    let made = Arc::new(Mutex::new(BTreeMap::new()));
    let vb = VarBuilder::from_backend(
        Box::new(Recorder {
            seed,
            made: made.clone(),
            values,
        }),
        DType::F32,
        Device::Cpu,
    );
    build(vb)?;
    let out = std::mem::take(&mut *made.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(out)
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    std::fs::write(path, text).map_err(io_err(path))
}

fn save(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    // safetensors orders the file by dtype and name, so the bytes do not depend on
    // the map's order.
    let map: std::collections::HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        why: format!("writing safetensors: {e}"),
    })
}

fn candle(model: TinyModel) -> impl Fn(candle_core::Error) -> Error {
    move |source| Error::Candle {
        model: format!("tiny {}", model.feature()),
        source,
    }
}

/// Writes a tiny random-weight `model` into `dir` (created if need be) in the real
/// Hugging Face layout, its weights drawn from `seed`.
///
/// # Errors
/// I/O errors naming the file; a model that does not build from its own config
/// (a bug).
pub fn write_tiny_model(model: TinyModel, dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    match model {
        TinyModel::SdVae | TinyModel::FluxVae => write_vae(model, dir, seed),
        TinyModel::Siglip => write_siglip(dir, seed),
        TinyModel::ClipVision => write_clip_vision(dir, seed),
        TinyModel::T5 => write_t5(dir, seed),
    }
}

fn write_vae(model: TinyModel, dir: &Path, seed: u64) -> Result<()> {
    let flux = model == TinyModel::FluxVae;
    // Four down blocks as in the real VAEs (8x downscale), tiny widths.
    let config = json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.32.2",
        "act_fn": "silu",
        "block_out_channels": [8, 8, 16, 16],
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "force_upcast": true,
        "in_channels": 3,
        "latent_channels": if flux { 16 } else { 4 },
        "layers_per_block": 1,
        "mid_block_add_attention": true,
        "norm_num_groups": 4,
        "out_channels": 3,
        "sample_size": 256,
        "scaling_factor": if flux { 0.3611 } else { 0.18215 },
        "shift_factor": if flux { json!(0.1159) } else { Value::Null },
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "use_post_quant_conv": !flux,
        "use_quant_conv": !flux,
    });
    write_vae_with(dir, seed, &config).map_err(|e| match e {
        Error::Candle { source, .. } => candle(model)(source),
        e => e,
    })
}

/// Writes a random-weight `AutoencoderKL` of any diffusers `config` (the real
/// SD-VAE's included: what the sampling benchmark decodes with) into `dir`, encoder
/// and decoder, with the tiny VAEs' weights.
///
/// # Errors
/// A config that is not an `AutoencoderKL` config; I/O errors naming the file.
pub fn write_vae_with(dir: &Path, seed: u64, config: &Value) -> Result<()> {
    let cfg: crate::vae::Config =
        serde_json::from_value(config.clone()).map_err(|e| Error::BadFile {
            path: dir.join("config.json"),
            why: e.to_string(),
        })?;
    // Encoder and decoder, as the real files hold both; each tensor's values depend on
    // its name and the seed only, so the encoder's are those of an encoder-only file.
    let tensors = record(seed, |vb| {
        crate::vae::VaeEncoder::new(vb.clone(), &cfg)?;
        crate::vae::VaeDecoder::new(vb, &cfg).map(|_| ())
    })
    .map_err(|source| Error::Candle {
        model: "random vae".into(),
        source,
    })?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_json(&dir.join("config.json"), config)?;
    save(&tensors, &dir.join("diffusion_pytorch_model.safetensors"))
}

fn image_preprocessor(kind: &str, side: u32, mean: [f64; 3], std: [f64; 3]) -> Value {
    let mut v = json!({
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": mean,
        "image_std": std,
        "image_processor_type": kind,
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
    });
    if kind == "SiglipImageProcessor" {
        v["size"] = json!({"height": side, "width": side});
    } else {
        v["size"] = json!({"shortest_edge": side});
        v["do_center_crop"] = json!(true);
        v["crop_size"] = json!({"height": side, "width": side});
        v["do_convert_rgb"] = json!(true);
    }
    v
}

fn write_siglip(dir: &Path, seed: u64) -> Result<()> {
    let side = 64;
    let config = json!({
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32,
        "image_size": side,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-6,
        "num_attention_heads": 2,
        "num_channels": 3,
        "num_hidden_layers": 2,
        "patch_size": 16,
        "torch_dtype": "float32",
    });
    let cfg = crate::siglip::Config::from_json(&config).map_err(|why| Error::BadFile {
        path: dir.join("config.json"),
        why,
    })?;
    let tensors = record(seed, |vb| {
        crate::siglip::SiglipVision::new(vb.pp("vision_model"), &cfg.vision).map(|_| ())
    })
    .map_err(candle(TinyModel::Siglip))?;
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &image_preprocessor("SiglipImageProcessor", side, [0.5; 3], [0.5; 3]),
    )?;
    save(&tensors, &dir.join("model.safetensors"))
}

fn write_clip_vision(dir: &Path, seed: u64) -> Result<()> {
    let side = 32;
    let config = json!({
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "attention_dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": 32,
        "image_size": side,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-5,
        "num_attention_heads": 2,
        "num_channels": 3,
        "num_hidden_layers": 2,
        "patch_size": 8,
        "projection_dim": 16,
        "torch_dtype": "float32",
    });
    let cfg = crate::clip_vision::Config::from_json(&config).map_err(|why| Error::BadFile {
        path: dir.join("config.json"),
        why,
    })?;
    let tensors = record(seed, |vb| {
        crate::clip_vision::ClipVisionWithProjection::new(vb, &cfg).map(|_| ())
    })
    .map_err(candle(TinyModel::ClipVision))?;
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &image_preprocessor(
            "CLIPImageProcessor",
            side,
            crate::clip_vision::CLIP_MEAN,
            crate::clip_vision::CLIP_STD,
        ),
    )?;
    save(&tensors, &dir.join("model.safetensors"))
}

/// Words of the tiny T5 vocabulary (whole-word pieces `▁word`); anything else is
/// spelled from the letter, digit and punctuation pieces.
const T5_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "and",
    "or",
    "to",
    "from",
    "by",
    "for",
    "is",
    "are",
    "was",
    "it",
    "its",
    "this",
    "that",
    "there",
    "two",
    "three",
    "some",
    "many",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "yellow",
    "old",
    "new",
    "small",
    "large",
    "bright",
    "dark",
    "people",
    "person",
    "man",
    "woman",
    "child",
    "dog",
    "cat",
    "car",
    "bicycle",
    "bike",
    "street",
    "road",
    "town",
    "city",
    "square",
    "market",
    "building",
    "house",
    "wall",
    "brick",
    "window",
    "door",
    "tree",
    "trees",
    "sky",
    "sun",
    "cloud",
    "water",
    "river",
    "sea",
    "beach",
    "mountain",
    "field",
    "grass",
    "flower",
    "table",
    "chair",
    "room",
    "light",
    "shadow",
    "afternoon",
    "morning",
    "evening",
    "night",
    "day",
    "walking",
    "leaning",
    "against",
    "standing",
    "sitting",
    "past",
    "near",
    "behind",
    "front",
    "background",
    "foreground",
    "image",
    "photo",
    "picture",
    "view",
    "scene",
    "shows",
    "features",
    "can",
    "see",
    "we",
];

/// A SentencePiece `ModelProto` (unigram) with T5's special pieces, as bytes.
fn t5_spiece_model() -> (Vec<u8>, usize) {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn bytes_field(out: &mut Vec<u8>, field: u64, payload: &[u8]) {
        varint(out, field << 3 | 2);
        varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }
    // (piece, score, type): 1 normal, 2 unknown, 3 control.
    let mut pieces: Vec<(String, f32, u64)> = vec![
        ("<pad>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
        ("<unk>".into(), 0.0, 2),
        ("▁".into(), -3.0, 1),
    ];
    for w in T5_WORDS {
        // longer words score higher, so whole words beat their spelling
        pieces.push((format!("▁{w}"), -10.0 + w.len() as f32 * 0.5, 1));
    }
    for s in ["s", "ing", "ed", "er", "ly", "es"] {
        pieces.push((s.to_string(), -9.0, 1));
    }
    for c in ('a'..='z').chain('0'..='9').chain(",.!?'\"-:;()/&".chars()) {
        pieces.push((c.to_string(), -12.0, 1));
        pieces.push((format!("▁{c}"), -12.5, 1));
    }
    let n = pieces.len();
    let mut out = Vec::new();
    for (piece, score, kind) in &pieces {
        let mut p = Vec::new();
        bytes_field(&mut p, 1, piece.as_bytes());
        varint(&mut p, 2 << 3 | 5);
        p.extend_from_slice(&score.to_le_bytes());
        varint(&mut p, 3 << 3);
        varint(&mut p, *kind);
        bytes_field(&mut out, 1, &p);
    }
    // trainer_spec { model_type: UNIGRAM (1) }
    let mut trainer = Vec::new();
    varint(&mut trainer, 3 << 3);
    varint(&mut trainer, 1);
    bytes_field(&mut out, 2, &trainer);
    (out, n)
}

fn write_t5(dir: &Path, seed: u64) -> Result<()> {
    let (spiece, pieces) = t5_spiece_model();
    let extra_ids = 100;
    // Like T5's 32128 = 32000 pieces + 100 sentinels + padding to a multiple of 128.
    let vocab_size = (pieces + extra_ids).div_ceil(128) * 128;
    let config = json!({
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_ff": 64,
        "d_kv": 8,
        "d_model": 32,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": true,
        "is_gated_act": true,
        "layer_norm_epsilon": 1e-6,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "num_layers": 2,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
    });
    let cfg: crate::t5::T5Config =
        serde_json::from_value(config.clone()).map_err(|e| Error::BadFile {
            path: dir.join("config.json"),
            why: e.to_string(),
        })?;
    let tensors = record(seed, |vb| {
        crate::t5::T5EncoderModel::new(vb, &cfg).map(|_| ())
    })
    .map_err(candle(TinyModel::T5))?;
    write_json(&dir.join("config.json"), &config)?;
    let sp = dir.join("spiece.model");
    std::fs::write(&sp, spiece).map_err(io_err(&sp))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": extra_ids,
            "model_max_length": 512,
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        }),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}),
    )?;
    save(&tensors, &dir.join("model.safetensors"))
}

/// The PixArt-α layouts [`write_tiny_pixart`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyPixart {
    /// PixArt-XL-2-512x512 style: no resolution / aspect-ratio embedders; hidden 32 =
    /// 2 heads x 16.
    Xl512,
    /// PixArt-XL-2-1024-MS style: with the size embedders (`use_additional_conditions`),
    /// hidden 48 = 2 heads x 24 (the embedders need a multiple of 3).
    Xl1024Ms,
}

/// The config of a tiny PixArt: depth 2, patch 2, 4 latent channels in, 8 out (learned
/// sigma), cross-attention over `caption_channels`-wide caption tokens projected to the
/// hidden width, position embeddings based at `sample_size` latent pixels (the
/// demo's latent side; any latent size runs).
#[must_use]
pub fn tiny_pixart_config(
    variant: TinyPixart,
    caption_channels: usize,
    sample_size: usize,
) -> crate::pixart::Config {
    let ms = variant == TinyPixart::Xl1024Ms;
    let head_dim = if ms { 24 } else { 16 };
    let hidden = 2 * head_dim;
    // written as diffusers would derive it, explicit only where the rule disagrees
    let additional = match (ms, sample_size == 128) {
        (true, true) | (false, false) => None,
        (true, false) => Some(true),
        (false, true) => Some(false),
    };
    crate::pixart::Config {
        num_attention_heads: 2,
        attention_head_dim: head_dim,
        in_channels: 4,
        out_channels: Some(8),
        num_layers: 2,
        cross_attention_dim: Some(hidden),
        sample_size,
        use_additional_conditions: additional,
        caption_channels: Some(caption_channels),
        ..crate::pixart::Config::xl_2_512()
    }
}

/// Writes a tiny random-weight PixArt-α transformer ([`tiny_pixart_config`]) into
/// `dir` in the diffusers layout (`config.json`, `diffusion_pytorch_model.safetensors`;
/// `PixArtTransformer2DModel.from_pretrained` loads it), weights drawn from `seed`
/// (`N(0, 1/fan_in)`, small biases: finite, order-one activations). For the demo store,
/// `caption_channels` is the tiny T5's width (32) and `sample_size` the latent side.
///
/// # Errors
/// I/O errors naming the file.
pub fn write_tiny_pixart(
    dir: &Path,
    seed: u64,
    variant: TinyPixart,
    caption_channels: usize,
    sample_size: usize,
) -> Result<crate::pixart::Config> {
    let cfg = tiny_pixart_config(variant, caption_channels, sample_size);
    write_pixart(dir, seed, &cfg)?;
    Ok(cfg)
}

/// Writes a random-weight PixArt-α transformer of any `cfg` (the full PixArt-XL-2
/// presets included: what the training benchmark runs) into `dir` in the diffusers
/// layout, with the weights of [`write_tiny_pixart`] (`N(0, 1/fan_in)`, small biases).
///
/// # Errors
/// I/O errors naming the file.
pub fn write_pixart(dir: &Path, seed: u64, cfg: &crate::pixart::Config) -> Result<()> {
    let tensors = record_with(seed, fan_in_values, |vb| {
        crate::pixart::PixArt::new(vb, cfg).map(|_| ())
    })
    .map_err(|source| Error::Candle {
        model: "random pixart".into(),
        source,
    })?;
    crate::pixart::save_diffusers(dir, cfg, &tensors)
}

/// Writes a tiny random-weight Redux adapter (`redux_dim` -> `3 txt_in_features` ->
/// `txt_in_features`) into `dir` as diffusers' `ReduxImageEncoder` (`config.json`,
/// `diffusion_pytorch_model.safetensors`: FLUX.1-Redux-dev's `image_embedder/`). For the
/// demo store, `redux_dim` is the tiny SigLIP's width (32) and `txt_in_features` the
/// tiny T5's (32).
///
/// # Errors
/// I/O errors naming the file.
pub fn write_tiny_redux(
    dir: &Path,
    seed: u64,
    redux_dim: usize,
    txt_in_features: usize,
) -> Result<crate::redux::Config> {
    let cfg = crate::redux::Config {
        redux_dim,
        txt_in_features,
    };
    let tensors = record_with(seed, fan_in_values, |vb| {
        crate::redux::Redux::new(vb, &cfg).map(|_| ())
    })
    .map_err(|source| Error::Candle {
        model: "tiny redux".into(),
        source,
    })?;
    crate::redux::save_diffusers(dir, &cfg, &tensors)?;
    Ok(cfg)
}

/// The config of a tiny Flux transformer: hidden 32 = 2 heads x 16, RoPE axes
/// (4, 6, 6), 2 double + 2 single blocks, 64 channels in and out (a 16-channel Flux VAE's
/// latents packed 2x2), text tokens `joint_attention_dim` wide, a pooled vector
/// `pooled_projection_dim` wide, the guidance embedder when `guidance` (FLUX.1-dev
/// style) or not (schnell / OpenFLUX style).
#[must_use]
pub fn tiny_flux_config(
    guidance: bool,
    joint_attention_dim: usize,
    pooled_projection_dim: usize,
) -> crate::flux::Config {
    crate::flux::Config {
        num_layers: 2,
        num_single_layers: 2,
        attention_head_dim: 16,
        num_attention_heads: 2,
        joint_attention_dim,
        pooled_projection_dim,
        guidance_embeds: guidance,
        axes_dims_rope: vec![4, 6, 6],
        ..crate::flux::Config::flux1_schnell()
    }
}

/// Writes a tiny random-weight Flux transformer ([`tiny_flux_config`]) into `dir` in the
/// diffusers layout (`config.json`, `diffusion_pytorch_model.safetensors`;
/// `FluxTransformer2DModel.from_pretrained` loads it), weights drawn from `seed`
/// (`N(0, 1/fan_in)`, small biases, norm scales near 1). For the demo's `--flux` store,
/// `joint_attention_dim` is the tiny T5's width (32) and `pooled_projection_dim` the
/// tiny CLIP image embedding's (16).
///
/// # Errors
/// I/O errors naming the file.
pub fn write_tiny_flux(
    dir: &Path,
    seed: u64,
    guidance: bool,
    joint_attention_dim: usize,
    pooled_projection_dim: usize,
) -> Result<crate::flux::Config> {
    let cfg = tiny_flux_config(guidance, joint_attention_dim, pooled_projection_dim);
    write_flux(dir, seed, &cfg)?;
    Ok(cfg)
}

/// Writes a random-weight Flux transformer of any `cfg` into `dir` in the diffusers
/// layout, with the weights of [`write_tiny_flux`].
///
/// # Errors
/// I/O errors naming the file.
pub fn write_flux(dir: &Path, seed: u64, cfg: &crate::flux::Config) -> Result<()> {
    let tensors = record_with(seed, fan_in_values, |vb| {
        crate::flux::Flux::new(vb, cfg).map(|_| ())
    })
    .map_err(|source| Error::Candle {
        model: "random flux".into(),
        source,
    })?;
    crate::flux::save_diffusers(dir, cfg, &tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_other_seed_other_weights() {
        let root = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            root.path().join("a"),
            root.path().join("b"),
            root.path().join("c"),
        );
        write_tiny_model(TinyModel::SdVae, &a, 11).unwrap();
        write_tiny_model(TinyModel::SdVae, &b, 11).unwrap();
        write_tiny_model(TinyModel::SdVae, &c, 12).unwrap();
        let read = |d: &Path| std::fs::read(d.join("diffusion_pytorch_model.safetensors")).unwrap();
        assert_eq!(read(&a), read(&b));
        assert_ne!(read(&a), read(&c));
        // the real SD VAE layout: quant_conv present, diffusers encoder names
        let st = candle_core::safetensors::load(
            a.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        for name in [
            "encoder.conv_in.weight",
            "encoder.down_blocks.0.resnets.0.norm1.weight",
            "encoder.mid_block.attentions.0.to_q.weight",
            "encoder.conv_norm_out.bias",
            "quant_conv.weight",
            "post_quant_conv.weight",
            "decoder.conv_in.weight",
            "decoder.up_blocks.3.resnets.1.conv2.weight",
            "decoder.up_blocks.0.upsamplers.0.conv.weight",
            "decoder.mid_block.attentions.0.to_out.0.weight",
            "decoder.conv_out.bias",
        ] {
            assert!(st.contains_key(name), "{name} missing: {:?}", st.keys());
        }
        // an encoder tensor has the values it had before the decoder was written too
        let w = &st["encoder.conv_in.weight"];
        let want = values(11, "encoder.conv_in.weight", w.dims());
        assert_eq!(w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }

    #[test]
    fn tiny_vaes_decode() {
        let root = tempfile::tempdir().unwrap();
        for (model, lat) in [(TinyModel::SdVae, 4), (TinyModel::FluxVae, 16)] {
            let dir = root.path().join(model.feature().name());
            write_tiny_model(model, &dir, 5).unwrap();
            let cfg: crate::vae::Config =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            let weights = std::sync::Arc::new(
                crate::WeightFiles::open(&[dir.join("diffusion_pytorch_model.safetensors")])
                    .unwrap(),
            );
            let dec = weights
                .build(
                    "tiny vae decoder",
                    crate::vae::weight_names(&cfg, false),
                    DType::F32,
                    &Device::Cpu,
                    |vb| crate::vae::VaeDecoder::new(vb, &cfg),
                )
                .unwrap();
            let z = Tensor::zeros((1, lat, 4, 4), DType::F32, &Device::Cpu).unwrap();
            let img = dec.decode(&z).unwrap();
            assert_eq!(img.dims(), &[1, 3, 32, 32]);
            let m = img
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(m.is_finite() && m > 0.0, "{m}");
        }
    }
}
