//! PixArt-α: the diffusion transformer with adaLN-single and T5 cross-attention.
//!
//! Paper: Chen et al., "PixArt-α: Fast Training of Diffusion Transformer for
//! Photorealistic Text-to-Image Synthesis" (<https://arxiv.org/abs/2310.00426>).
//! Reference code: diffusers' `PixArtTransformer2DModel`
//! (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/transformers/pixart_transformer_2d.py>,
//! its `BasicTransformerBlock` with `norm_type="ada_norm_single"` in `models/attention.py`,
//! `AdaLayerNormSingle` in `models/normalization.py`, `PatchEmbed`,
//! `get_2d_sincos_pos_embed`, `PixArtAlphaCombinedTimestepSizeEmbeddings` and
//! `PixArtAlphaTextProjection` in `models/embeddings.py`), whose weight names this module
//! reads; the original: <https://github.com/PixArt-alpha/PixArt-alpha>.
//!
//! The model, for latents `[B, C, H, W]`:
//!
//! 1. **Patch embedding** (`pos_embed.proj`, a `p x p` stride-`p` convolution, computed
//!    here as a linear layer over flattened patches: the same numbers, and a frozen
//!    weight then takes the input-gradient-only matmul) plus the fixed 2-D sin-cos
//!    position embedding for the actual `H/p x W/p` grid, with base size
//!    `sample_size / p` and interpolation scale `interpolation_scale` (default
//!    `max(sample_size / 64, 1)`), exactly as diffusers computes it.
//! 2. **adaLN-single**: the sinusoidal timestep embedding (256 channels, cos first) through
//!    `adaln_single.emb.timestep_embedder` (Linear, SiLU, Linear), plus for the
//!    multi-scale models (`use_additional_conditions`, derived as `sample_size == 128`
//!    when unset) the resolution and aspect-ratio embedders (`D/3` each, the resolution
//!    one applied to height and width); `adaln_single.linear` maps `silu(emb)` to the
//!    `6 D` modulation shared by every block.
//! 3. **Caption projection** `caption_channels -> D -> D` with tanh-GELU; the encoder
//!    attention mask (1 keep, 0 pad) becomes the additive bias `(1 - mask) * -10000`
//!    on the cross-attention logits, as diffusers' processor adds it.
//! 4. **Blocks**: self-attention on `LN(x) * (1 + scale) + shift` gated by `gate`,
//!    cross-attention on the raw hidden states (PixArt applies no norm there), feed-forward
//!    on the modulated `LN(x)` gated; the six vectors are the block's `scale_shift_table`
//!    plus the shared `6 D` projection.
//! 5. **Output**: `LN(x) * (1 + scale) + shift` with the model's `scale_shift_table` plus
//!    the timestep embedding, `proj_out`, unpatchify to `[B, out_channels, H, W]`.
//!
//! For training with per-block recomputation the forward is exposed in three parts:
//! [`PixArt::prepare`] (steps 1-3), [`Block::forward`] per block (at most three inputs
//! that carry a gradient: hidden states, caption tokens, timestep projection) and
//! [`PixArt::finish`] (step 5); [`PixArt::forward`] is exactly those in sequence. Every
//! op goes through [`crate::ops`] (LayerNorm without affine, attention with the mask as a
//! bias, adaLN modulation) and [`crate::layers::Linear`], so gradients flow on every path
//! and frozen weights cost no weight gradient. Softmax runs in f32 whatever the
//! activation dtype (as the fused SDPA kernels do); with f32 activations the model
//! matches diffusers to float rounding.
//!
//! Loading and saving (file I/O, kept out of the model) are in [`io`]:
//! [`load_pixart`], [`save_diffusers`].

pub mod io;

use std::sync::Mutex;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::layers::{LayerNorm, Linear};
use crate::ops;

pub use io::{expected_tensors, load_pixart, save_diffusers};

/// Channels of the sinusoidal timestep (and size) projection (`Timesteps(256, ...)`).
pub const TIME_PROJ_CHANNELS: usize = 256;

/// The additive bias diffusers gives a padded caption token (`(1 - mask) * -10000`).
pub const MASK_BIAS: f64 = -10000.0;

/// The diffusers `config.json` of a `PixArtTransformer2DModel` (every key the model
/// reads; unknown keys are ignored, missing ones take diffusers' defaults).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Config {
    /// Attention heads (16).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Width of one head (72); the hidden width is heads x this.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    /// Latent channels in (4).
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Channels out (8: the noise and the learned variance); `null` means `in_channels`.
    #[serde(default = "d_out")]
    pub out_channels: Option<usize>,
    /// Transformer blocks (28).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Dropout probability; PixArt uses 0, and only 0 is supported.
    #[serde(default)]
    pub dropout: f64,
    /// Unused by PixArt (kept so the config round-trips).
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// Width of the cross-attention context (the projected caption: the hidden width);
    /// `null`: no cross-attention.
    #[serde(default = "d_cross")]
    pub cross_attention_dim: Option<usize>,
    /// Whether q, k, v have biases (true).
    #[serde(default = "d_true")]
    pub attention_bias: bool,
    /// Latent side the model was trained at (64 for 512 px, 128 for 1024 px).
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    /// Patch side (2).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Feed-forward activation: `gelu-approximate` (tanh) or `gelu`.
    #[serde(default = "d_act")]
    pub activation_fn: String,
    /// Diffusion steps of the adaLN embedding (1000); must be set, as diffusers demands.
    #[serde(default = "d_ada")]
    pub num_embeds_ada_norm: Option<usize>,
    /// Ignored by diffusers' SDPA processor; softmax runs in f32 here anyway.
    #[serde(default)]
    pub upcast_attention: bool,
    /// Must be `ada_norm_single`.
    #[serde(default = "d_norm")]
    pub norm_type: String,
    /// Whether the blocks' LayerNorms have affine parameters (`norm1`, `norm2`); false.
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    /// LayerNorm epsilon of the blocks (1e-6).
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    /// Position-embedding interpolation scale; `null`: `max(sample_size / 64, 1)`.
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    /// Resolution and aspect-ratio embedders; `null`: `sample_size == 128`.
    #[serde(default)]
    pub use_additional_conditions: Option<bool>,
    /// Width of the caption embeddings (4096 for T5-XXL); `null`: no caption projection.
    #[serde(default)]
    pub caption_channels: Option<usize>,
    /// Must be `default`.
    #[serde(default = "d_attention_type")]
    pub attention_type: Option<String>,
}

const fn d_heads() -> usize {
    16
}
const fn d_head_dim() -> usize {
    72
}
const fn d_in() -> usize {
    4
}
const fn d_out() -> Option<usize> {
    Some(8)
}
const fn d_layers() -> usize {
    28
}
const fn d_groups() -> usize {
    32
}
const fn d_cross() -> Option<usize> {
    Some(1152)
}
const fn d_true() -> bool {
    true
}
const fn d_sample() -> usize {
    128
}
const fn d_patch() -> usize {
    2
}
fn d_act() -> String {
    "gelu-approximate".into()
}
const fn d_ada() -> Option<usize> {
    Some(1000)
}
fn d_norm() -> String {
    "ada_norm_single".into()
}
const fn d_eps() -> f64 {
    1e-6
}
fn d_attention_type() -> Option<String> {
    Some("default".into())
}

impl Config {
    /// `PixArt-alpha/PixArt-XL-2-512x512`: depth 28, hidden 1152 = 16 heads x 72, patch
    /// 2, 4 -> 8 channels, T5-XXL captions (4096), sample size 64, no size embedders.
    #[must_use]
    pub fn xl_2_512() -> Self {
        Self {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: Some(8),
            num_layers: 28,
            dropout: 0.0,
            norm_num_groups: 32,
            cross_attention_dim: Some(1152),
            attention_bias: true,
            sample_size: 64,
            patch_size: 2,
            activation_fn: d_act(),
            num_embeds_ada_norm: Some(1000),
            upcast_attention: false,
            norm_type: d_norm(),
            norm_elementwise_affine: false,
            norm_eps: 1e-6,
            interpolation_scale: None,
            use_additional_conditions: None,
            caption_channels: Some(4096),
            attention_type: d_attention_type(),
        }
    }

    /// `PixArt-alpha/PixArt-XL-2-1024-MS`: as [`Config::xl_2_512`] with sample size 128
    /// (interpolation scale 2) and the resolution / aspect-ratio embedders.
    #[must_use]
    pub fn xl_2_1024_ms() -> Self {
        Self {
            sample_size: 128,
            ..Self::xl_2_512()
        }
    }

    /// The hidden width (heads x head width).
    #[must_use]
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels (`out_channels`, else `in_channels`).
    #[must_use]
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Whether the resolution and aspect-ratio embedders exist (diffusers' rule: the
    /// config's value, else `sample_size == 128`).
    #[must_use]
    pub fn uses_additional_conditions(&self) -> bool {
        self.use_additional_conditions
            .unwrap_or(self.sample_size == 128)
    }

    /// The position embedding's interpolation scale (the config's, else
    /// `max(sample_size / 64, 1)`).
    #[must_use]
    pub fn pos_interpolation_scale(&self) -> f64 {
        self.interpolation_scale
            .unwrap_or((self.sample_size / 64).max(1) as f64)
    }

    /// The position embedding's base size in patches (`sample_size / patch_size`).
    #[must_use]
    pub fn pos_base_size(&self) -> usize {
        self.sample_size / self.patch_size.max(1)
    }

    /// Width of the caption tokens `forward` takes (`caption_channels`, else the
    /// cross-attention width).
    #[must_use]
    pub fn caption_width(&self) -> Option<usize> {
        self.caption_channels.or(self.cross_attention_dim)
    }

    /// The feed-forward activation.
    ///
    /// # Errors
    /// An activation diffusers' PixArt does not use.
    pub fn activation(&self) -> std::result::Result<Activation, String> {
        match self.activation_fn.as_str() {
            "gelu-approximate" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::Gelu),
            other => Err(format!(
                "activation_fn `{other}` is not supported (gelu-approximate, gelu)"
            )),
        }
    }

    /// Checks that this code can run the configuration.
    ///
    /// # Errors
    /// What is wrong, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.norm_type != "ada_norm_single" {
            return Err(format!(
                "norm_type `{}`: PixArtTransformer2DModel requires `ada_norm_single`",
                self.norm_type
            ));
        }
        if self.num_embeds_ada_norm.is_none() {
            return Err("num_embeds_ada_norm must be set with norm_type ada_norm_single".into());
        }
        if let Some(t) = &self.attention_type
            && t != "default"
        {
            return Err(format!(
                "attention_type `{t}` is not supported (default only)"
            ));
        }
        if self.dropout != 0.0 {
            return Err(format!(
                "dropout {} is not supported (PixArt uses 0)",
                self.dropout
            ));
        }
        self.activation()?;
        let d = self.inner_dim();
        if d == 0 || self.patch_size == 0 || self.in_channels == 0 || self.num_layers == 0 {
            return Err("num_attention_heads, attention_head_dim, patch_size, in_channels and num_layers must be positive".into());
        }
        if !d.is_multiple_of(4) {
            return Err(format!(
                "hidden width {d} (heads x attention_head_dim) must be a multiple of 4 for the 2-D sin-cos position embedding"
            ));
        }
        if self.uses_additional_conditions() && !d.is_multiple_of(3) {
            return Err(format!(
                "hidden width {d} must be a multiple of 3 with use_additional_conditions \
                 (resolution and aspect-ratio embeddings of width {d}/3 are concatenated)"
            ));
        }
        if self.caption_channels.is_some()
            && let Some(c) = self.cross_attention_dim
            && c != d
        {
            return Err(format!(
                "cross_attention_dim {c} must equal the hidden width {d} when captions are projected (caption_channels is set)"
            ));
        }
        if self.caption_channels.is_some() && self.cross_attention_dim.is_none() {
            return Err("caption_channels is set but cross_attention_dim is null (no cross-attention to use the captions)".into());
        }
        Ok(())
    }
}

/// `Linear -> act -> Linear`: diffusers' `TimestepEmbedding` (SiLU, `linear_2` square)
/// and `PixArtAlphaTextProjection` (tanh-GELU).
#[derive(Debug, Clone)]
struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(vb: VarBuilder, d_in: usize, hidden: usize, act: Activation) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(d_in, hidden, vb.pp("linear_1"))?,
            linear_2: Linear::new(hidden, hidden, vb.pp("linear_2"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(x)?)?)
    }

    fn tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        push_linear(out, &format!("{prefix}.linear_1"), &self.linear_1);
        push_linear(out, &format!("{prefix}.linear_2"), &self.linear_2);
    }
}

fn push_linear(out: &mut Vec<(String, Tensor)>, prefix: &str, l: &Linear) {
    out.push((format!("{prefix}.weight"), l.weight().clone()));
    if let Some(b) = l.bias() {
        out.push((format!("{prefix}.bias"), b.clone()));
    }
}

fn push_norm(out: &mut Vec<(String, Tensor)>, prefix: &str, n: &Norm) {
    if let (Some(w), Some(b)) = (&n.weight, &n.bias) {
        out.push((format!("{prefix}.weight"), w.clone()));
        out.push((format!("{prefix}.bias"), b.clone()));
    }
}

/// A block LayerNorm: without affine parameters (PixArt), or with them
/// (`norm_elementwise_affine`).
#[derive(Debug, Clone)]
struct Norm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    fn new(vb: VarBuilder, dim: usize, eps: f64, affine: bool) -> Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(vb.get_with_hints(dim, "weight", Init::Const(1.0))?),
                Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(Self { weight, bias, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

/// Multi-head attention with diffusers' names (`to_q`, `to_k`, `to_v`, `to_out.0`).
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, ctx_dim: usize, cfg: &Config) -> Result<Self> {
        let inner = cfg.inner_dim();
        let lin = |name: &str, d_in: usize| {
            if cfg.attention_bias {
                Linear::new(d_in, inner, vb.pp(name))
            } else {
                Linear::no_bias(d_in, inner, vb.pp(name))
            }
        };
        Ok(Self {
            to_q: lin("to_q", dim)?,
            to_k: lin("to_k", ctx_dim)?,
            to_v: lin("to_v", ctx_dim)?,
            to_out: Linear::new(inner, dim, vb.pp("to_out.0"))?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.attention_head_dim,
        })
    }

    /// `x` `[B, N, dim]` attending to `ctx` `[B, T, ctx_dim]` (itself when `None`),
    /// `bias` broadcast to `[B, heads, N, T]`.
    fn forward(&self, x: &Tensor, ctx: Option<&Tensor>, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let ctx = ctx.unwrap_or(x);
        let t = ctx.dim(1)?;
        let split = |y: Tensor, len: usize| -> Result<Tensor> {
            y.reshape((b, len, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.to_q.forward(x)?, n)?;
        let k = split(self.to_k.forward(ctx)?, t)?;
        let v = split(self.to_v.forward(ctx)?, t)?;
        let opts = ops::AttentionOpts {
            scale: Some(1.0 / (self.head_dim as f64).sqrt()),
            bias,
            mask: None,
            softmax_f32: true,
        };
        let o = ops::attention(&q, &k, &v, &opts)?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?;
        self.to_out.forward(&o)
    }

    fn tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        push_linear(out, &format!("{prefix}.to_q"), &self.to_q);
        push_linear(out, &format!("{prefix}.to_k"), &self.to_k);
        push_linear(out, &format!("{prefix}.to_v"), &self.to_v);
        push_linear(out, &format!("{prefix}.to_out.0"), &self.to_out);
    }
}

/// One transformer block (`transformer_blocks.N`): diffusers' `BasicTransformerBlock`
/// with `norm_type="ada_norm_single"`.
#[derive(Debug, Clone)]
pub struct Block {
    norm1: Norm,
    attn1: Attention,
    norm2: Norm,
    attn2: Option<Attention>,
    ff_in: Linear,
    ff_out: Linear,
    act: Activation,
    scale_shift_table: Tensor,
    dim: usize,
}

impl Block {
    /// The block under `vb` (`transformer_blocks.N`).
    ///
    /// # Errors
    /// A missing or misshapen tensor; an unsupported configuration.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let dim = cfg.inner_dim();
        let act = cfg.activation().map_err(candle_core::Error::Msg)?;
        let affine = cfg.norm_elementwise_affine;
        let attn2 = match cfg.cross_attention_dim {
            Some(ctx) => Some(Attention::new(vb.pp("attn2"), dim, ctx, cfg)?),
            None => None,
        };
        let ff = vb.pp("ff.net");
        Ok(Self {
            norm1: Norm::new(vb.pp("norm1"), dim, cfg.norm_eps, affine)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, cfg)?,
            norm2: Norm::new(vb.pp("norm2"), dim, cfg.norm_eps, affine)?,
            attn2,
            ff_in: Linear::new(dim, 4 * dim, ff.pp("0.proj"))?,
            ff_out: Linear::new(4 * dim, dim, ff.pp("2"))?,
            act,
            scale_shift_table: vb.get_with_hints(
                (6, dim),
                "scale_shift_table",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / (dim as f64).sqrt(),
                },
            )?,
            dim,
        })
    }

    /// The block on hidden states `x` `[B, N, D]` with caption tokens `y` `[B, T, D]`
    /// (projected), the shared timestep projection `temb6` `[B, 6 D]` and the caption
    /// mask bias `[B, 1, 1, T]` (`None`: every token attends). The three tensors that may
    /// carry a gradient are `x`, `y` and `temb6`; `mask_bias` is a constant.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward(
        &self,
        x: &Tensor,
        y: &Tensor,
        temb6: &Tensor,
        mask_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        if d != self.dim {
            candle_core::bail!(
                "PixArt block: hidden states of width {d}, the block has {}",
                self.dim
            );
        }
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each [B, 1, D]
        let mods = self
            .scale_shift_table
            .to_dtype(temb6.dtype())?
            .unsqueeze(0)?
            .broadcast_add(&temb6.reshape((b, 6, d))?)?;
        let m = |i: usize| mods.narrow(1, i, 1);
        let h = ops::modulate(&self.norm1.forward(x)?, &m(0)?, &m(1)?)?;
        let a = self.attn1.forward(&h, None, None)?;
        let mut x = (m(2)?.broadcast_mul(&a)? + x)?;
        if let Some(attn2) = &self.attn2 {
            // PixArt applies no norm before the cross-attention.
            let a = attn2.forward(&x, Some(y), mask_bias)?;
            x = (a + x)?;
        }
        let h = ops::modulate(&self.norm2.forward(&x)?, &m(3)?, &m(4)?)?;
        let f = self
            .ff_out
            .forward(&self.act.forward(&self.ff_in.forward(&h)?)?)?;
        m(5)?.broadcast_mul(&f)? + x
    }

    /// [`Block::forward`] with the inputs of a [`Prepared`].
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward_prepared(&self, x: &Tensor, s: &Prepared) -> Result<Tensor> {
        self.forward(x, &s.caption, &s.temb6, s.mask_bias.as_ref())
    }

    fn tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        push_norm(out, &format!("{prefix}.norm1"), &self.norm1);
        self.attn1.tensors(&format!("{prefix}.attn1"), out);
        push_norm(out, &format!("{prefix}.norm2"), &self.norm2);
        if let Some(a) = &self.attn2 {
            a.tensors(&format!("{prefix}.attn2"), out);
        }
        push_linear(out, &format!("{prefix}.ff.net.0.proj"), &self.ff_in);
        push_linear(out, &format!("{prefix}.ff.net.2"), &self.ff_out);
        out.push((
            format!("{prefix}.scale_shift_table"),
            self.scale_shift_table.clone(),
        ));
    }
}

/// What [`PixArt::prepare`] computes once per forward and every block reads.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Patch embeddings plus position embedding `[B, N, D]`: the first block's input.
    pub hidden: Tensor,
    /// Caption tokens after the caption projection `[B, T, D]`.
    pub caption: Tensor,
    /// The adaLN-single projection shared by the blocks `[B, 6 D]`.
    pub temb6: Tensor,
    /// The timestep (+ size) embedding before the projection `[B, D]` (the final
    /// layer's modulation).
    pub embedded_timestep: Tensor,
    /// The caption mask as an additive bias `[B, 1, 1, T]` (0 keep, -10000 pad), in the
    /// activation dtype; `None` without a mask.
    pub mask_bias: Option<Tensor>,
    /// The patch grid `(H / p, W / p)`.
    pub grid: (usize, usize),
}

/// The 2-D sin-cos position embedding of diffusers' `get_2d_sincos_pos_embed` for a
/// `grid` of `(rows, cols)` patches: `[rows * cols, dim]` (f32), row-major tokens, the
/// first half of the channels encoding the column, the second the row.
///
/// Coordinates are `i / (n / base_size) / interpolation_scale` in f32, the sines and
/// cosines in f64, as diffusers computes them.
///
/// # Errors
/// `dim` not a multiple of 4.
pub fn sincos_pos_embed_2d(
    dim: usize,
    grid: (usize, usize),
    base_size: usize,
    interpolation_scale: f64,
    device: &Device,
) -> Result<Tensor> {
    if !dim.is_multiple_of(4) {
        candle_core::bail!("2-D sin-cos position embedding: width {dim} is not a multiple of 4");
    }
    let (rows, cols) = grid;
    let coords = |n: usize| -> Vec<f64> {
        let step = (n as f64 / base_size as f64) as f32;
        let scale = interpolation_scale as f32;
        (0..n).map(|i| f64::from(i as f32 / step / scale)).collect()
    };
    let (ys, xs) = (coords(rows), coords(cols));
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut v = Vec::with_capacity(rows * cols * dim);
    for y in &ys {
        for x in &xs {
            for pos in [x, y] {
                v.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                v.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    Tensor::from_vec(v, (rows * cols, dim), device)
}

/// diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True,
/// downscale_freq_shift=0)` for `t` `[N]` (f32): `[N, dim]` f32, cosines first.
///
/// # Errors
/// `t` not 1-D, `dim` odd.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    if !dim.is_multiple_of(2) {
        candle_core::bail!("timestep embedding: odd width {dim}");
    }
    let half = dim / 2;
    let t = t.to_dtype(DType::F32)?;
    let n = t.dims1()?;
    let c = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (c * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.reshape((n, 1))?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

/// The adaLN-single size embedders of the multi-scale models.
#[derive(Debug, Clone)]
struct SizeEmbedders {
    resolution: Mlp,
    aspect_ratio: Mlp,
}

/// diffusers' `PixArtTransformer2DModel`.
pub struct PixArt {
    patch_weight: Linear,
    timestep_embedder: Mlp,
    size: Option<SizeEmbedders>,
    adaln_linear: Linear,
    caption_projection: Option<Mlp>,
    blocks: Vec<Block>,
    norm_out: LayerNorm,
    scale_shift_table: Tensor,
    proj_out: Linear,
    cfg: Config,
    pos_cache: Mutex<Vec<((usize, usize), Tensor)>>,
}

impl std::fmt::Debug for PixArt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PixArt")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl PixArt {
    /// Builds the model from weights named as diffusers saves them, `vb` rooted at the
    /// transformer's top level. Frozen or trainable is the `VarBuilder`'s business
    /// ([`crate::loader::WeightFiles::build`] / `build_trainable`, or
    /// [`crate::init::fresh_var_builder`]).
    ///
    /// # Errors
    /// An invalid configuration ([`Config::validate`]); a missing or misshapen tensor.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("PixArt config: {e}")))?;
        let d = cfg.inner_dim();
        let p = cfg.patch_size;
        let c = cfg.in_channels;
        let fan_in = c * p * p;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let uniform = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let pe = vb.pp("pos_embed.proj");
        let w = pe.get_with_hints((d, c, p, p), "weight", uniform)?;
        let b = pe.get_with_hints(d, "bias", uniform)?;
        let patch_weight = Linear::from_weights(w.reshape((d, fan_in))?, Some(b));
        let emb = vb.pp("adaln_single.emb");
        let timestep_embedder = Mlp::new(
            emb.pp("timestep_embedder"),
            TIME_PROJ_CHANNELS,
            d,
            Activation::Silu,
        )?;
        let size = if cfg.uses_additional_conditions() {
            Some(SizeEmbedders {
                resolution: Mlp::new(
                    emb.pp("resolution_embedder"),
                    TIME_PROJ_CHANNELS,
                    d / 3,
                    Activation::Silu,
                )?,
                aspect_ratio: Mlp::new(
                    emb.pp("aspect_ratio_embedder"),
                    TIME_PROJ_CHANNELS,
                    d / 3,
                    Activation::Silu,
                )?,
            })
        } else {
            None
        };
        let adaln_linear = Linear::new(d, 6 * d, vb.pp("adaln_single.linear"))?;
        let caption_projection = match cfg.caption_channels {
            Some(cc) => Some(Mlp::new(
                vb.pp("caption_projection"),
                cc,
                d,
                Activation::GeluTanh,
            )?),
            None => None,
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(vb.pp(format!("transformer_blocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let scale_shift_table = vb.get_with_hints(
            (2, d),
            "scale_shift_table",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0 / (d as f64).sqrt(),
            },
        )?;
        let proj_out = Linear::new(d, p * p * cfg.out_channels(), vb.pp("proj_out"))?;
        Ok(Self {
            patch_weight,
            timestep_embedder,
            size,
            adaln_linear,
            caption_projection,
            blocks,
            norm_out: LayerNorm::plain(1e-6),
            scale_shift_table,
            proj_out,
            cfg: cfg.clone(),
            pos_cache: Mutex::new(Vec::new()),
        })
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The transformer blocks, in order.
    #[must_use]
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The position embedding for a patch grid, `[1, N, D]` f32 on `device` (cached:
    /// training runs one grid).
    fn pos_embed(&self, grid: (usize, usize), device: &Device) -> Result<Tensor> {
        let mut cache = self
            .pos_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, t)) = cache
            .iter()
            .find(|(g, t)| *g == grid && t.device().same_device(device))
        {
            return Ok(t.clone());
        }
        let t = sincos_pos_embed_2d(
            self.cfg.inner_dim(),
            grid,
            self.cfg.pos_base_size(),
            self.cfg.pos_interpolation_scale(),
            device,
        )?
        .unsqueeze(0)?;
        if cache.len() >= 8 {
            cache.remove(0);
        }
        cache.push((grid, t.clone()));
        Ok(t)
    }

    /// Everything before the blocks: patch + position embedding, the adaLN-single
    /// timestep (+ size) embedding and its `6 D` projection, the caption projection,
    /// the mask bias.
    ///
    /// - `latents` `[B, in_channels, H, W]`, H and W multiples of the patch size; their
    ///   dtype is the activation dtype (weights are cast to it).
    /// - `timestep` `[B]` (or `[1]`, broadcast), any numeric dtype (f32 or u32).
    /// - `encoder_hidden_states` `[B, T, caption_channels]`, cast to the activation dtype.
    /// - `encoder_attention_mask` `[B, T]`, 1 keep / 0 pad (any dtype).
    /// - `added`: `(resolution [B, 2] (height, width), aspect_ratio [B, 1])`, required by
    ///   the multi-scale models and ignored by the others (as diffusers does).
    ///
    /// # Errors
    /// Shapes that do not fit the config, a multi-scale model without `added`.
    pub fn prepare(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_attention_mask: Option<&Tensor>,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Prepared> {
        let cfg = &self.cfg;
        let (b, c, h, w) = latents.dims4()?;
        let p = cfg.patch_size;
        if c != cfg.in_channels {
            candle_core::bail!(
                "PixArt: latents have {c} channels, the model takes {}",
                cfg.in_channels
            );
        }
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) || h == 0 || w == 0 {
            candle_core::bail!("PixArt: latents {h}x{w} are not a multiple of the patch size {p}");
        }
        let dtype = latents.dtype();
        let (gh, gw) = (h / p, w / p);
        // patchify: [B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p] -> [B, N, C p p]
        let patches = latents
            .reshape(vec![b, c, gh, p, gw, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .reshape((b, gh * gw, c * p * p))?;
        let x = self.patch_weight.forward(&patches)?;
        let pos = self.pos_embed((gh, gw), latents.device())?;
        let hidden = x
            .to_dtype(DType::F32)?
            .broadcast_add(&pos)?
            .to_dtype(dtype)?;

        let t = timestep.flatten_all()?.to_dtype(DType::F32)?;
        let t = match t.dims1()? {
            n if n == b => t,
            1 => t.broadcast_as(b)?.contiguous()?,
            n => candle_core::bail!("PixArt: {n} timesteps for a batch of {b}"),
        };
        let t_proj = timestep_embedding(&t, TIME_PROJ_CHANNELS)?.to_dtype(dtype)?;
        let mut emb = self.timestep_embedder.forward(&t_proj)?;
        if let Some(size) = &self.size {
            let Some((resolution, aspect_ratio)) = added else {
                candle_core::bail!(
                    "PixArt: this model uses additional conditions (sample_size {} / \
                     use_additional_conditions): pass resolution [B, 2] and aspect_ratio [B, 1]",
                    cfg.sample_size
                )
            };
            let res = resolution.flatten_all()?;
            let ar = aspect_ratio.flatten_all()?;
            if res.dims1()? != 2 * b || ar.dims1()? != b {
                candle_core::bail!(
                    "PixArt: resolution {:?} / aspect_ratio {:?} for a batch of {b} (want [B, 2] and [B, 1])",
                    resolution.dims(),
                    aspect_ratio.dims()
                );
            }
            let res = timestep_embedding(&res, TIME_PROJ_CHANNELS)?.to_dtype(dtype)?;
            let res = size.resolution.forward(&res)?.reshape((b, ()))?;
            let ar = timestep_embedding(&ar, TIME_PROJ_CHANNELS)?.to_dtype(dtype)?;
            let ar = size.aspect_ratio.forward(&ar)?.reshape((b, ()))?;
            emb = emb.broadcast_add(&Tensor::cat(&[res, ar], 1)?)?;
        }
        let temb6 = self.adaln_linear.forward(&emb.silu()?)?;

        let (yb, t_len, yc) = encoder_hidden_states.dims3()?;
        if yb != b {
            candle_core::bail!("PixArt: {yb} captions for a batch of {b}");
        }
        if let Some(want) = cfg.caption_width()
            && yc != want
        {
            candle_core::bail!(
                "PixArt: caption tokens of width {yc}, the model takes {want} (caption_channels)"
            );
        }
        let y = encoder_hidden_states.to_dtype(dtype)?;
        let caption = match &self.caption_projection {
            Some(proj) => proj.forward(&y)?,
            None => y,
        };
        let mask_bias = match encoder_attention_mask {
            None => None,
            Some(m) => {
                let (mb, mt) = m.dims2()?;
                if (mb, mt) != (b, t_len) {
                    candle_core::bail!(
                        "PixArt: encoder_attention_mask {:?} for captions [{b}, {t_len}, _]",
                        m.dims()
                    );
                }
                let keep = m.to_dtype(dtype)?.detach();
                Some(((1.0 - keep)? * MASK_BIAS)?.reshape((b, 1, 1, t_len))?)
            }
        };
        Ok(Prepared {
            hidden,
            caption,
            temb6,
            embedded_timestep: emb,
            mask_bias,
            grid: (gh, gw),
        })
    }

    /// Everything after the blocks: final modulated LayerNorm, `proj_out`, unpatchify:
    /// `[B, out_channels, H, W]`.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn finish(&self, x: &Tensor, s: &Prepared) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (gh, gw) = s.grid;
        if n != gh * gw {
            candle_core::bail!("PixArt: {n} tokens for a {gh}x{gw} patch grid");
        }
        let mods = self
            .scale_shift_table
            .to_dtype(s.embedded_timestep.dtype())?
            .unsqueeze(0)?
            .broadcast_add(&s.embedded_timestep.reshape((b, 1, d))?)?;
        let (shift, scale) = (mods.narrow(1, 0, 1)?, mods.narrow(1, 1, 1)?);
        let h = ops::modulate(&self.norm_out.forward(x)?, &shift, &scale)?;
        let h = self.proj_out.forward(&h)?;
        let p = self.cfg.patch_size;
        let c = self.cfg.out_channels();
        // [B, gh, gw, p, q, C] -> "nhwpqc->nchpwq" -> [B, C, H, W]
        h.reshape(vec![b, gh, gw, p, p, c])?
            .permute(vec![0, 5, 1, 3, 2, 4])?
            .reshape((b, c, gh * p, gw * p))
    }

    /// The whole model: [`PixArt::prepare`], every [`Block::forward`], [`PixArt::finish`].
    /// Arguments as [`PixArt::prepare`] takes them; returns `[B, out_channels, H, W]`.
    ///
    /// # Errors
    /// As [`PixArt::prepare`].
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_attention_mask: Option<&Tensor>,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let s = self.prepare(
            latents,
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
            added,
        )?;
        let mut x = s.hidden.clone();
        for block in &self.blocks {
            x = block.forward_prepared(&x, &s)?;
        }
        self.finish(&x, &s)
    }

    /// Every weight of the model under its diffusers name, as the model holds it
    /// (frozen constants in the compute dtype, trainable variables in f32): what
    /// [`save_diffusers`] writes.
    ///
    /// # Errors
    /// A failed reshape (a bug).
    pub fn tensors(&self) -> Result<std::collections::BTreeMap<String, Tensor>> {
        let cfg = &self.cfg;
        let (d, c, p) = (cfg.inner_dim(), cfg.in_channels, cfg.patch_size);
        let mut out = Vec::new();
        out.push((
            "pos_embed.proj.weight".to_string(),
            self.patch_weight.weight().reshape((d, c, p, p))?,
        ));
        if let Some(bias) = self.patch_weight.bias() {
            out.push(("pos_embed.proj.bias".to_string(), bias.clone()));
        }
        self.timestep_embedder
            .tensors("adaln_single.emb.timestep_embedder", &mut out);
        if let Some(size) = &self.size {
            size.resolution
                .tensors("adaln_single.emb.resolution_embedder", &mut out);
            size.aspect_ratio
                .tensors("adaln_single.emb.aspect_ratio_embedder", &mut out);
        }
        push_linear(&mut out, "adaln_single.linear", &self.adaln_linear);
        if let Some(cp) = &self.caption_projection {
            cp.tensors("caption_projection", &mut out);
        }
        for (i, b) in self.blocks.iter().enumerate() {
            b.tensors(&format!("transformer_blocks.{i}"), &mut out);
        }
        out.push((
            "scale_shift_table".to_string(),
            self.scale_shift_table.clone(),
        ));
        push_linear(&mut out, "proj_out", &self.proj_out);
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_as_diffusers_reads_them() {
        // The hub's PixArt-XL-2-512x512 transformer config, as diffusers writes it.
        let text = r#"{
          "_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.22.0.dev0",
          "activation_fn": "gelu-approximate", "attention_bias": true,
          "attention_head_dim": 72, "attention_type": "default", "caption_channels": 4096,
          "cross_attention_dim": 1152, "double_self_attention": false, "dropout": 0.0,
          "in_channels": 4, "norm_elementwise_affine": false, "norm_eps": 1e-06,
          "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": 16,
          "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": null,
          "only_cross_attention": false, "out_channels": 8, "patch_size": 2,
          "sample_size": 64, "upcast_attention": false, "use_linear_projection": false
        }"#;
        let c: Config = serde_json::from_str(text).unwrap();
        assert_eq!(c, Config::xl_2_512());
        assert!(!c.uses_additional_conditions());
        assert_eq!(c.pos_interpolation_scale(), 1.0);
        assert_eq!(c.pos_base_size(), 32);
        let ms = Config::xl_2_1024_ms();
        assert!(ms.uses_additional_conditions());
        assert_eq!(ms.pos_interpolation_scale(), 2.0);
        assert_eq!(ms.pos_base_size(), 64);
        let explicit = Config {
            use_additional_conditions: Some(false),
            ..Config::xl_2_1024_ms()
        };
        assert!(!explicit.uses_additional_conditions());
        // out_channels null means in_channels; defaults fill missing keys
        let c: Config = serde_json::from_str(r#"{"out_channels": null}"#).unwrap();
        assert_eq!(c.out_channels(), 4);
        assert_eq!(c.sample_size, 128);
        c.validate().unwrap();
    }

    #[test]
    fn bad_configs_are_named() {
        let mut c = Config::xl_2_512();
        c.norm_type = "ada_norm_zero".into();
        assert!(c.validate().unwrap_err().contains("norm_type"));
        let mut c = Config::xl_2_1024_ms();
        c.attention_head_dim = 16; // 256 is not a multiple of 3
        assert!(c.validate().unwrap_err().contains("multiple of 3"));
        let mut c = Config::xl_2_512();
        c.activation_fn = "geglu".into();
        assert!(c.validate().unwrap_err().contains("geglu"));
    }

    #[test]
    fn timestep_embedding_puts_cosines_first() -> Result<()> {
        let t = Tensor::new(&[0f32, 10.0], &Device::Cpu)?;
        let e = timestep_embedding(&t, 8)?.to_vec2::<f32>()?;
        assert_eq!(e[0], vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // frequency 0 is 1: cos(10), sin(10)
        assert!((e[1][0] - 10f32.cos()).abs() < 1e-6);
        assert!((e[1][4] - 10f32.sin()).abs() < 1e-6);
        Ok(())
    }
}
