//! CLIP's projected image embedding (openai/clip-vit-large-patch14): transformers'
//! `CLIPVisionModelWithProjection.image_embeds`, i.e. `visual_projection` of the
//! post-LayerNorm class token. Flux reconditioning puts it in the pooled slot.
//!
//! - Paper: [Learning Transferable Visual Models From Natural Language Supervision](https://arxiv.org/abs/2103.00020)
//! - Reference code: transformers `CLIPVisionModelWithProjection`
//!   (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py>)
//!
//! Pre-norm ViT: class token plus patch convolution (no bias) plus learned positions,
//! `pre_layrnorm` (sic, the checkpoints' name), `num_hidden_layers` blocks, the class
//! token through `post_layernorm`, then `visual_projection`. [`Config`] reads both
//! upstream layouts: a full `CLIPModel` (`vision_config` nested, `projection_dim` at
//! the top) and a vision-only `CLIPVisionModelWithProjection` (fields at the top
//! level). Only QuickGELU and LayerNorm eps 1e-5 (what the OpenAI checkpoints use)
//! are accepted; a config asking for anything else is refused rather than run
//! differently from the model it names.

use candle_core::{D, IndexOp, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;

use crate::activation::Activation;
use crate::layers::{Conv2d, LayerNorm, Linear};
use crate::vit::{EncoderLayer, LayerConfig, Scaling};

/// OpenAI CLIP's normalisation (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// See [`CLIP_MEAN`].
pub const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

fn d_hidden() -> usize {
    768
}
fn d_intermediate() -> usize {
    3072
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}

/// transformers' `CLIPVisionConfig`, with its defaults. Other keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    /// Token width (1024 for ViT-L/14).
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    /// Transformer layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Image channels.
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    /// Input side in pixels.
    #[serde(default = "d_image")]
    pub image_size: usize,
    /// Patch side in pixels.
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// MLP activation (`quick_gelu` only).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon (1e-5 only).
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Projection width (a vision-only config carries it here).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

/// A CLIP `config.json`, either layout, reduced to what the image embedding needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The vision tower.
    pub vision: VisionConfig,
    /// Width of `image_embeds` (768 for ViT-L/14).
    pub projection_dim: usize,
    /// Whether the file described a full `CLIPModel`.
    pub full_model: bool,
}

impl Config {
    /// openai/clip-vit-large-patch14.
    pub fn vit_large_patch14() -> Self {
        Self {
            vision: VisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                num_channels: 3,
                image_size: 224,
                patch_size: 14,
                hidden_act: "quick_gelu".into(),
                layer_norm_eps: 1e-5,
                projection_dim: Some(768),
            },
            projection_dim: 768,
            full_model: true,
        }
    }

    /// Parses either layout from the JSON value of `config.json`.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if !model_type.is_empty() && !model_type.starts_with("clip") {
            return Err(format!(
                "`model_type` is `{model_type}`, not a CLIP model (clip, clip_vision_model)"
            ));
        }
        let (vision, full_model) = match v.get("vision_config") {
            Some(vc) => (vc.clone(), true),
            None => (v.clone(), false),
        };
        let vision: VisionConfig =
            serde_json::from_value(vision).map_err(|e| format!("vision config: {e}"))?;
        let projection_dim = v
            .get("projection_dim")
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as usize)
            .or(vision.projection_dim)
            .unwrap_or(512);
        if vision.hidden_act != "quick_gelu" {
            return Err(format!(
                "`hidden_act` `{}` is not supported (the OpenAI CLIP models use quick_gelu)",
                vision.hidden_act
            ));
        }
        if (vision.layer_norm_eps - 1e-5).abs() > 1e-12 {
            return Err(format!(
                "`layer_norm_eps` {} is not supported (1e-5 only)",
                vision.layer_norm_eps
            ));
        }
        // image_size need not be a multiple of patch_size: so400m's 384 / 14 gives
        // 27 patches a side, the stride-14 convolution dropping the last 6 pixels.
        if vision.patch_size == 0
            || vision.patch_size > vision.image_size
            || vision.num_attention_heads == 0
            || !vision
                .hidden_size
                .is_multiple_of(vision.num_attention_heads)
        {
            return Err(format!(
                "inconsistent vision config: image_size {} / patch_size {}, hidden_size {} / heads {}",
                vision.image_size,
                vision.patch_size,
                vision.hidden_size,
                vision.num_attention_heads
            ));
        }
        Ok(Self {
            vision,
            projection_dim,
            full_model,
        })
    }
}

/// `CLIPVisionModelWithProjection`: pixel values to `image_embeds`.
#[derive(Debug, Clone)]
pub struct ClipVisionWithProjection {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    /// `[patches + 1, hidden]`.
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    projection: Linear,
}

impl ClipVisionWithProjection {
    /// Builds the model from a `vb` at the checkpoint root (`vision_model.*` and
    /// `visual_projection.weight`).
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let c = &cfg.vision;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let class_embedding = emb.get_with_hints(
            d,
            "class_embedding",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let patch_embedding = Conv2d::no_bias(
            c.num_channels,
            d,
            c.patch_size,
            Conv2dConfig {
                stride: c.patch_size,
                ..Default::default()
            },
            emb.pp("patch_embedding"),
        )?;
        let positions = (c.image_size / c.patch_size).pow(2) + 1;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (positions, d),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let layer = LayerConfig {
            dim: d,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps,
            act: Activation::QuickGelu,
            scaling: Scaling::Query,
            softmax_f32: true,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(&layer, vm.pp("encoder.layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            class_embedding,
            patch_embedding,
            position_embedding,
            pre_norm: LayerNorm::new(d, eps, vm.pp("pre_layrnorm"))?,
            layers,
            post_norm: LayerNorm::new(d, eps, vm.pp("post_layernorm"))?,
            projection: Linear::no_bias(d, cfg.projection_dim, vb.pp("visual_projection"))?,
        })
    }

    /// `image_embeds` `[B, projection_dim]` of `pixel_values` `[B, 3, S, S]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let b = pixel_values.dim(0)?;
        let patches = pixel_values
            .apply(&self.patch_embedding)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = self.class_embedding.dim(D::Minus1)?;
        let class = self.class_embedding.expand((b, 1, d))?;
        let x = Tensor::cat(&[class, patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = x.apply(&self.pre_norm)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        x.i((.., 0, ..))?
            .apply(&self.post_norm)?
            .apply(&self.projection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_layouts_and_refuses_what_candle_cannot_run() {
        let full = serde_json::json!({"model_type": "clip", "projection_dim": 768,
            "text_config": {}, "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
            "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
            "projection_dim": 768, "dropout": 0.0}});
        let c = Config::from_json(&full).unwrap();
        assert_eq!(c, Config::vit_large_patch14());
        let vision_only = serde_json::json!({"model_type": "clip_vision_model", "hidden_size": 1024,
            "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
            "patch_size": 14, "projection_dim": 768});
        let c = Config::from_json(&vision_only).unwrap();
        assert!(!c.full_model);
        assert_eq!(c.projection_dim, 768);
        let gelu = serde_json::json!({"hidden_act": "gelu"});
        assert!(Config::from_json(&gelu).unwrap_err().contains("gelu"));
        let sig = serde_json::json!({"model_type": "siglip"});
        assert!(Config::from_json(&sig).unwrap_err().contains("siglip"));
    }
}
