//! SigLIP's vision tower (google/siglip-so400m-patch14-384, the image encoder of Flux
//! Redux): `last_hidden_state`, the patch tokens after `post_layernorm`.
//!
//! - Paper: [Sigmoid Loss for Language Image Pre-Training](https://arxiv.org/abs/2303.15343)
//! - Reference code: transformers `SiglipVisionModel`
//!   (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/siglip/modeling_siglip.py>)
//!
//! Pre-norm ViT: patch convolution plus learned positions, `num_hidden_layers` blocks
//! of LayerNorm -> attention -> residual, LayerNorm -> MLP -> residual, then
//! `post_layernorm`; no pooling head. [`Config`] reads both upstream layouts — a
//! full `SiglipModel` (`vision_config` nested beside `text_config`) and a vision-only
//! `SiglipVisionModel` (fields at the top level, as Flux Redux's `image_encoder`) — and
//! finds the weights' prefix (`vision_model.` in hub checkpoints; none in what
//! transformers 5 writes for a vision-only model).

use candle_core::{Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;

use crate::activation::Activation;
use crate::layers::{Conv2d, LayerNorm};
use crate::vit::{EncoderLayer, LayerConfig, Scaling};

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
    16
}
fn d_act() -> Activation {
    Activation::GeluTanh
}
fn d_eps() -> f64 {
    1e-6
}

/// transformers' `SiglipVisionConfig`, with its defaults. Other keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    /// Token width (1152 for so400m).
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
    /// MLP activation.
    #[serde(default = "d_act")]
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    /// google/siglip-so400m-patch14-384.
    pub fn so400m_patch14_384() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 384,
            patch_size: 14,
            hidden_act: Activation::GeluTanh,
            layer_norm_eps: 1e-6,
        }
    }

    /// Tokens per image (`(image_size / patch_size)^2`: 729 for so400m@384).
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// A SigLIP `config.json`: either a full `SiglipModel` or a vision-only model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The vision tower's config.
    pub vision: VisionConfig,
    /// Whether the file described a full model (`vision_config` nested).
    pub full_model: bool,
}

impl Config {
    /// Parses either layout from the JSON value of `config.json`.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let (vision, full_model) = match v.get("vision_config") {
            Some(vc) => (vc.clone(), true),
            None => (v.clone(), false),
        };
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if !model_type.is_empty() && !model_type.starts_with("siglip") {
            return Err(format!(
                "`model_type` is `{model_type}`, not a SigLIP model (siglip, siglip_vision_model)"
            ));
        }
        let vision: VisionConfig =
            serde_json::from_value(vision).map_err(|e| format!("vision config: {e}"))?;
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
        Ok(Self { vision, full_model })
    }
}

/// SigLIP's vision transformer without the pooling head.
#[derive(Debug, Clone)]
pub struct SiglipVision {
    patch_embedding: Conv2d,
    /// `[1, hidden, side, side]`: the learned positions as a feature map.
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    patches_per_side: usize,
    patch_size: usize,
}

impl SiglipVision {
    /// Builds the tower; `vb` points at the tower's root (`vision_model` in hub
    /// checkpoints), under which `embeddings`, `encoder` and `post_layernorm` live.
    pub fn new(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let patch_embedding = Conv2d::new(
            cfg.num_channels,
            cfg.hidden_size,
            cfg.patch_size,
            Conv2dConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
            emb.pp("patch_embedding"),
        )?;
        let side = cfg.image_size / cfg.patch_size;
        let position_embedding = emb
            .pp("position_embedding")
            .get_with_hints(
                (side * side, cfg.hidden_size),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?
            .reshape((1, side, side, cfg.hidden_size))?
            .permute((0, 3, 1, 2))?;
        let layer = LayerConfig {
            dim: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
            scaling: Scaling::Logits,
            softmax_f32: false,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&layer, vb.pp("encoder.layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm =
            LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?;
        Ok(Self {
            patch_embedding,
            position_embedding,
            layers,
            post_layernorm,
            patches_per_side: side,
            patch_size: cfg.patch_size,
        })
    }

    /// `last_hidden_state` `[B, patches, hidden]` of `pixel_values` `[B, 3, S, S]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = pixel_values.dims4()?;
        let (ph, pw) = (h / self.patch_size, w / self.patch_size);
        if (ph, pw) != (self.patches_per_side, self.patches_per_side) {
            candle_core::bail!(
                "SigLIP takes {0}x{0} patches ({1} px), got {h}x{w} px",
                self.patches_per_side,
                self.patches_per_side * self.patch_size
            );
        }
        let mut x = pixel_values
            .apply(&self.patch_embedding)?
            .broadcast_add(&self.position_embedding)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        x.apply(&self.post_layernorm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_full_and_vision_only_configs() {
        let full = serde_json::json!({
            "model_type": "siglip",
            "text_config": {"hidden_size": 1152},
            "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                "model_type": "siglip_vision_model", "num_attention_heads": 16,
                "num_hidden_layers": 27, "patch_size": 14}
        });
        let c = Config::from_json(&full).unwrap();
        assert!(c.full_model);
        assert_eq!(c.vision, VisionConfig::so400m_patch14_384());
        assert_eq!(c.vision.num_patches(), 729);
        let redux = serde_json::json!({"architectures": ["SiglipVisionModel"],
            "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
            "model_type": "siglip_vision_model", "num_attention_heads": 16,
            "num_hidden_layers": 27, "patch_size": 14, "torch_dtype": "bfloat16"});
        let c = Config::from_json(&redux).unwrap();
        assert!(!c.full_model);
        assert_eq!(c.vision, VisionConfig::so400m_patch14_384());
        let clip = serde_json::json!({"model_type": "clip", "vision_config": {}});
        assert!(Config::from_json(&clip).unwrap_err().contains("clip"));
        let bad = serde_json::json!({"image_size": 10, "patch_size": 14});
        assert!(Config::from_json(&bad).unwrap_err().contains("patch_size"));
    }
}
