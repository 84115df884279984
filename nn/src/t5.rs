//! The T5 encoder (T5 v1.1 as PixArt-α and Flux use it), with an attention mask.
//!
//! Paper: Raffel et al., "Exploring the Limits of Transfer Learning with a Unified
//! Text-to-Text Transformer" (<https://arxiv.org/abs/1910.10683>); v1.1 changes:
//! <https://github.com/google-research/text-to-text-transfer-transformer/blob/main/released_checkpoints.md#t511>.
//! Reference code: transformers' `T5EncoderModel`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/t5/modeling_t5.py>),
//! whose weight names this module reads.
//!
//! T5 v1.1: gated-GELU feed-forward (`wi_0` through tanh-GELU times `wi_1`, then `wo`),
//! RMS layer norm without bias or mean subtraction, no scaling of attention logits,
//! and a bucketed relative position bias computed in the first block and shared by
//! all. Padded keys get an additive bias of the dtype's most negative value, exactly as
//! transformers builds its extended attention mask, so a padded batch gives each
//! caption's real rows as if it were encoded alone.
//!
//! f16 is not supported: T5 v1.1 activations exceed f16's range (transformers clamps
//! them, which changes the result); bf16 and f32 are.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::activation::Activation;
use crate::layers::{Linear, RmsNorm};
use crate::ops;

/// The upstream `config.json` of a T5 model (the fields the encoder uses).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    /// Vocabulary size (rows of `shared`).
    pub vocab_size: usize,
    /// Hidden width (4096 for XXL).
    pub d_model: usize,
    /// Width of one attention head (64).
    pub d_kv: usize,
    /// Feed-forward inner width (10240 for XXL).
    pub d_ff: usize,
    /// Encoder blocks (24 for XXL).
    pub num_layers: usize,
    /// Attention heads (64 for XXL).
    pub num_heads: usize,
    /// Relative position buckets (32).
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which positions share the last bucket (128).
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMS norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (v1.1), `relu` (original T5), `gated-silu`, ...
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

const fn default_buckets() -> usize {
    32
}
const fn default_max_distance() -> usize {
    128
}
const fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

impl T5Config {
    /// google/t5-v1_1-xxl (PixArt-α's and Flux's text encoder).
    pub fn v1_1_xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }

    /// google/t5-v1_1-base.
    pub fn v1_1_base() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 768,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 12,
            num_heads: 12,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }

    /// Whether the feed-forward is gated, and its activation, as transformers reads
    /// `feed_forward_proj` (`gated-gelu` means the tanh approximation, `gelu_new`).
    pub fn feed_forward(&self) -> candle_core::Result<(bool, Activation)> {
        let (gated, act) = match self.feed_forward_proj.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, self.feed_forward_proj.as_str()),
        };
        let act = match (gated, act) {
            (true, "gelu") => Activation::GeluTanh,
            (_, a) => Activation::parse(a).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "feed_forward_proj `{}`: unknown activation",
                    self.feed_forward_proj
                ))
            })?,
        };
        Ok((gated, act))
    }
}

/// The relative position bucket of `memory - query` for a bidirectional encoder,
/// as Mesh TensorFlow and transformers compute it (f32 logarithm, truncation).
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let scaled = ((n as f32 / max_exact as f32).ln()
            / (max_distance as f64 / max_exact as f64).ln() as f32
            * (half - max_exact) as f32) as i64;
        bucket += (max_exact + scaled).min(half - 1);
    }
    bucket as u32
}

fn linear(vb: VarBuilder, d_in: usize, d_out: usize) -> candle_core::Result<Linear> {
    Linear::no_bias(d_in, d_out, vb)
}

/// Self-attention with q, k and v as one product: their weights, read under their
/// own names, are stacked once at load (T5 never trains), so a block runs one
/// `[3·inner, d_model]` GEMM and one head-major copy instead of three of each.
struct Attention {
    qkv: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &T5Config) -> candle_core::Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            qkv: Linear::stacked(&vb, &["q", "k", "v"], cfg.d_model, inner, false)?,
            o: linear(vb.pp("o"), inner, cfg.d_model)?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `bias`: the position bias `[1, heads, T, T]`, `mask` the padding mask
    /// `[B, 1, 1, T]`, both f32 (added to each other first, as transformers does).
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // [B, T, 3·H·D] -> [3, B, H, T, D], one copy; q, k, v are its contiguous thirds
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, t, 3, self.heads, self.d_kv))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        // T5 does not scale the logits by 1/sqrt(d_kv).
        let opts = ops::AttentionOpts {
            scale: None,
            bias: Some(bias),
            mask,
            softmax_f32: true,
        };
        let out = ops::attention(&q, &k, &v, &opts)?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

enum FeedForward {
    /// v1.1: `act(x·wi_0ᵀ) * (x·wi_1ᵀ)`, the two weights stacked into one product
    /// whose halves are the two inputs of the product.
    Gated {
        wi: Linear,
        wo: Linear,
        act: Activation,
        d_ff: usize,
    },
    Plain {
        wi: Linear,
        wo: Linear,
        act: Activation,
    },
}

impl FeedForward {
    fn new(vb: VarBuilder, cfg: &T5Config) -> candle_core::Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        let wo = linear(vb.pp("wo"), cfg.d_ff, cfg.d_model)?;
        Ok(if gated {
            Self::Gated {
                wi: Linear::stacked(&vb, &["wi_0", "wi_1"], cfg.d_model, cfg.d_ff, false)?,
                wo,
                act,
                d_ff: cfg.d_ff,
            }
        } else {
            Self::Plain {
                wi: linear(vb.pp("wi"), cfg.d_model, cfg.d_ff)?,
                wo,
                act,
            }
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Gated { wi, wo, act, d_ff } => {
                let h = wi.forward(x)?;
                let gated = if *act == Activation::GeluTanh {
                    ops::gated_gelu_tanh(&h)?
                } else {
                    (act.forward(&h.narrow(D::Minus1, 0, *d_ff)?)?
                        * h.narrow(D::Minus1, *d_ff, *d_ff)?)?
                };
                wo.forward(&gated)
            }
            Self::Plain { wi, wo, act } => wo.forward(&act.forward(&wi.forward(x)?)?),
        }
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &T5Config) -> candle_core::Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            attn_norm: RmsNorm::new(cfg.d_model, eps, vb.pp("layer.0.layer_norm"))?,
            attn: Attention::new(vb.pp("layer.0.SelfAttention"), cfg)?,
            ff_norm: RmsNorm::new(cfg.d_model, eps, vb.pp("layer.1.layer_norm"))?,
            ff: FeedForward::new(vb.pp("layer.1.DenseReluDense"), cfg)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.attn_norm.forward(x)?, bias, mask)?)?;
        &x + self.ff.forward(&self.ff_norm.forward(&x)?)?
    }
}

/// transformers' `T5EncoderModel`: embeddings, blocks, final RMS norm.
pub struct T5EncoderModel {
    embed: Embedding,
    relative_bias: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    cfg: T5Config,
    device: Device,
}

impl T5EncoderModel {
    /// Builds the encoder from weights named as transformers saves them (`shared.weight`
    /// or `encoder.embed_tokens.weight`, `encoder.block.N...`, `encoder.final_layer_norm`).
    /// `vb` is rooted at the checkpoint's top level; a full T5 (encoder and decoder)
    /// checkpoint works too, its decoder is not read.
    pub fn new(vb: VarBuilder, cfg: &T5Config) -> candle_core::Result<Self> {
        cfg.feed_forward()?;
        let embed_name = if vb.contains_tensor("shared.weight")
            || !vb.contains_tensor("encoder.embed_tokens.weight")
        {
            "shared"
        } else {
            "encoder.embed_tokens"
        };
        let embed = candle_nn::embedding(cfg.vocab_size, cfg.d_model, vb.pp(embed_name))?;
        let enc = vb.pp("encoder");
        let relative_bias = candle_nn::embedding(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            enc.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
        )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(enc.pp(format!("block.{i}")), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_norm = RmsNorm::new(
            cfg.d_model,
            cfg.layer_norm_epsilon,
            enc.pp("final_layer_norm"),
        )?;
        Ok(Self {
            embed,
            relative_bias,
            blocks,
            final_norm,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The shared position bias, `[1, heads, t, t]` in f32.
    fn position_bias(&self, t: usize) -> candle_core::Result<Tensor> {
        let mut buckets = Vec::with_capacity(t * t);
        for q in 0..t as i64 {
            for k in 0..t as i64 {
                buckets.push(relative_position_bucket(
                    k - q,
                    self.cfg.relative_attention_num_buckets,
                    self.cfg.relative_attention_max_distance,
                ));
            }
        }
        let buckets = Tensor::from_vec(buckets, (t, t), &self.device)?;
        self.relative_bias
            .forward(&buckets)? // [t, t, heads]
            .to_dtype(DType::F32)?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// `last_hidden_state` for `input_ids` `[B, T]` (u32). `mask` `[B, T]` (any dtype,
    /// 1 for real tokens, 0 for padding) hides padded keys; `None` attends to every
    /// position, as FluxPipeline calls T5.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let bias = self.position_bias(t)?;
        // (1 - mask) * finfo(f32).min on every padded key, as transformers does; kept
        // apart from the position bias, which the whole batch shares
        let mask = mask
            .map(|mask| {
                let keep = mask.to_dtype(DType::F32)?;
                ((1.0 - keep)? * f64::from(f32::MIN))?
                    .unsqueeze(1)?
                    .unsqueeze(1)
            })
            .transpose()?;
        let mut x = self.embed.forward(input_ids)?;
        for block in &self.blocks {
            x = block.forward(&x, &bias, mask.as_ref())?;
        }
        self.final_norm.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_the_mesh_tensorflow_rule() {
        // 32 buckets, bidirectional: 0..7 exact for |d| < 8 (negative side), +16 for
        // positive distances, log-spaced up to bucket 15 / 31 at max_distance.
        assert_eq!(relative_position_bucket(0, 32, 128), 0);
        assert_eq!(relative_position_bucket(-3, 32, 128), 3);
        assert_eq!(relative_position_bucket(3, 32, 128), 19);
        assert_eq!(relative_position_bucket(-1000, 32, 128), 15);
        assert_eq!(relative_position_bucket(1000, 32, 128), 31);
        // 8 * (16/8)^(k/8) boundaries: 12 -> bucket 8 + floor(log(1.5)/log(16)*8) = 9
        assert_eq!(relative_position_bucket(-12, 32, 128), 9);
    }

    #[test]
    fn feed_forward_names_parse_as_transformers() {
        let mut c = T5Config::v1_1_base();
        assert_eq!(c.feed_forward().unwrap(), (true, Activation::GeluTanh));
        c.feed_forward_proj = "relu".into();
        assert_eq!(c.feed_forward().unwrap(), (false, Activation::Relu));
        c.feed_forward_proj = "gated-silu".into();
        assert_eq!(c.feed_forward().unwrap(), (true, Activation::Silu));
        c.feed_forward_proj = "gated-swiglu9".into();
        assert!(
            c.feed_forward()
                .unwrap_err()
                .to_string()
                .contains("gated-swiglu9")
        );
    }
}
