//! The CLIP text transformer and its pooled output.
//!
//! Paper: Radford et al., "Learning Transferable Visual Models From Natural Language
//! Supervision" (<https://arxiv.org/abs/2103.00020>). Reference code: transformers'
//! `CLIPTextModel`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py>),
//! whose weight names this module reads, with or without the `text_model.` prefix (a
//! full `CLIPModel` checkpoint such as openai/clip-vit-large-patch14 works too).
//!
//! Pre-norm transformer with a causal mask and learned positions; the pooled output
//! (`pooler_output`, not projected) is the final layer norm's output at the
//! end-of-text token: with the legacy `eos_token_id == 2` of the openai configs, the
//! position of the largest token id (`argmax(input_ids)`); otherwise the first
//! position holding `eos_token_id`. Flux and SDXL take this vector.

use candle_core::{Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::activation::Activation;
use crate::layers::LayerNorm;
use crate::vit::{EncoderLayer, LayerConfig, Scaling};

/// The upstream text config: `config.json` of a `CLIPTextModel`, or its `text_config`
/// in a `CLIPModel`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size (49408).
    pub vocab_size: usize,
    /// Width (768 for ViT-L/14).
    pub hidden_size: usize,
    /// MLP width (3072).
    pub intermediate_size: usize,
    /// Layers (12).
    pub num_hidden_layers: usize,
    /// Heads (12).
    pub num_attention_heads: usize,
    /// Positions (77).
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (openai) or `gelu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Layer norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// End-of-text id; `2` selects the legacy argmax rule.
    #[serde(default = "default_eos", deserialize_with = "int_or_first")]
    pub eos_token_id: u32,
}

const fn default_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
const fn default_eps() -> f64 {
    1e-5
}
const fn default_eos() -> u32 {
    49407
}

fn int_or_first<'de, De: serde::Deserializer<'de>>(d: De) -> Result<u32, De::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrList {
        Int(u32),
        List(Vec<u32>),
    }
    match IntOrList::deserialize(d)? {
        IntOrList::Int(i) => Ok(i),
        IntOrList::List(l) => l
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("empty eos_token_id list")),
    }
}

impl ClipTextConfig {
    /// The text tower of openai/clip-vit-large-patch14 (Flux's and SD's CLIP-L).
    pub fn vit_l_14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }

    /// Reads the text config from a parsed `config.json`: the `text_config` object of
    /// a `CLIPModel`, else the whole file.
    pub fn from_json(v: &serde_json::Value) -> serde_json::Result<Self> {
        let text = v.get("text_config").unwrap_or(v);
        Self::deserialize(text)
    }

    /// The position the pooled output is taken from, for one row of ids (padding
    /// included), by transformers' rule.
    pub fn pooled_position(&self, ids: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            // torch.argmax returns the first maximal index.
            let mut best = 0;
            for (i, &id) in ids.iter().enumerate() {
                if id > ids[best] {
                    best = i;
                }
            }
            best
        } else {
            ids.iter()
                .position(|&id| id == self.eos_token_id)
                .unwrap_or(0)
        }
    }
}

/// transformers' `CLIPTextModel` (the `text_model` of a `CLIPModel`).
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    cfg: ClipTextConfig,
    device: Device,
}

impl ClipTextModel {
    /// Builds the model; `vb` is rooted at the checkpoint's top level, and the tensors
    /// are read under `text_model.` when the checkpoint has that prefix.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let act = Activation::parse(&cfg.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!("hidden_act `{}` is not supported", cfg.hidden_act))
        })?;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(candle_core::Error::Msg(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let d = cfg.hidden_size;
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, d, vb.pp("embeddings.token_embedding"))?;
        let position_embedding = candle_nn::embedding(
            cfg.max_position_embeddings,
            d,
            vb.pp("embeddings.position_embedding"),
        )?;
        let layer = LayerConfig {
            dim: d,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act,
            scaling: Scaling::Query,
            softmax_f32: true,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&layer, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_norm = LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// `last_hidden_state` (after the final layer norm) for `input_ids` `[B, T]` (u32),
    /// causal attention, no padding mask (as diffusers calls it).
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(candle_core::Error::Msg(format!(
                "{t} tokens exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let positions = Tensor::arange(0u32, t as u32, &self.device)?;
        let x = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let causal: Vec<f32> = (0..t)
            .flat_map(|q| (0..t).map(move |k| if k > q { f32::MIN } else { 0.0 }))
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, t, t), &self.device)?;
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&causal))?;
        }
        self.final_norm.forward(&x)
    }

    /// `pooler_output` `[B, hidden]`: the final-norm output at `positions[i]` of row i.
    pub fn pooled(&self, input_ids: &Tensor, positions: &[usize]) -> candle_core::Result<Tensor> {
        let hidden = self.forward(input_ids)?;
        let rows = positions
            .iter()
            .enumerate()
            .map(|(i, &p)| hidden.i((i, p)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_position_follows_transformers_rules() {
        let mut c = ClipTextConfig::vit_l_14();
        // legacy: argmax of ids, the first maximum (pad == eos == 49407)
        let ids = [49406, 320, 1125, 49407, 49407, 49407];
        assert_eq!(c.pooled_position(&ids), 3);
        // pad "!" (id 0) after eos
        assert_eq!(c.pooled_position(&[49406, 320, 49407, 0, 0]), 2);
        // new rule: first eos, even when a larger id precedes it
        c.eos_token_id = 7;
        assert_eq!(c.pooled_position(&[1, 9, 7, 7]), 2);
        assert_eq!(c.pooled_position(&[1, 9, 3]), 0);
    }

    #[test]
    fn config_reads_clip_model_and_text_model_files() {
        let text = serde_json::json!({"vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "eos_token_id": [5, 6]});
        let c = ClipTextConfig::from_json(&text).unwrap();
        assert_eq!((c.eos_token_id, c.max_position_embeddings), (5, 77));
        let full = serde_json::json!({"text_config": text, "vision_config": {}});
        assert_eq!(ClipTextConfig::from_json(&full).unwrap(), c);
    }
}
