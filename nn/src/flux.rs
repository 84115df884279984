//! Flux: the rectified-flow transformer of Black Forest Labs (double-stream MMDiT blocks,
//! then single-stream parallel blocks, 3-axis RoPE).
//!
//! Paper: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
//! Synthesis" (<https://arxiv.org/abs/2403.03206>, the MMDiT); Flux itself:
//! <https://blackforestlabs.ai/announcing-black-forest-labs/> and the reference code
//! <https://github.com/black-forest-labs/flux> (`src/flux/model.py`,
//! `src/flux/modules/layers.py`). This module follows diffusers'
//! `FluxTransformer2DModel`
//! (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/transformers/transformer_flux.py>:
//! `FluxTransformerBlock`, `FluxSingleTransformerBlock`, `FluxAttnProcessor`,
//! `FluxPosEmbed`; `models/embeddings.py`: `get_1d_rotary_pos_embed`,
//! `apply_rotary_emb`, `CombinedTimestep[Guidance]TextProjEmbeddings`;
//! `models/normalization.py`: `AdaLayerNormZero[Single]`, `AdaLayerNormContinuous`),
//! whose weight names it reads; BFL's single-file names load too ([`bfl`]).
//!
//! The model, for packed latents `[B, N, in_channels]` ([`pack_latents`]) and T5
//! tokens `[B, T, joint_attention_dim]`:
//!
//! 1. **Embeddings**: `x_embedder` and `context_embedder` (linear) give the image and
//!    text streams of width `D = heads x head_dim`. The conditioning vector `temb [B, D]`
//!    is `timestep_embedder(sinus(1000 t)) [+ guidance_embedder(sinus(1000 g))] +
//!    text_embedder(pooled)` (256-channel sinusoids, cosines first; Linear-SiLU-Linear).
//! 2. **RoPE** over the position ids of `cat(txt_ids, img_ids)` (`[T + N, 3]`): per axis
//!    `i` of width `axes_dims_rope[i]`, frequencies `1 / 10000^(2j / dim_i)`, angles in
//!    f64, cos / sin rounded to f32; applied to interleaved pairs of q and k in f32.
//! 3. **Double blocks** (`transformer_blocks.N`, 19): adaLN-Zero on each stream
//!    (`norm1`, `norm1_context`: `SiLU(temb) -> 6 D`), q / k / v per stream with an RMS
//!    qk-norm (torch's `RMSNorm`, eps 1e-6), one joint attention over `[txt; img]`,
//!    gated residuals, a tanh-GELU MLP per stream.
//! 4. **Single blocks** (`single_transformer_blocks.N`, 38) on the joint sequence:
//!    adaLN-Zero-single (`3 D`), attention and a `4 D` MLP side by side from the same
//!    modulated input, `proj_out` over their concatenation, gated residual.
//! 5. **Output**: the image tokens through `AdaLayerNormContinuous` (`scale, shift` from
//!    `SiLU(temb)`, LayerNorm without affine, eps 1e-6) and `proj_out`.
//!
//! **Timesteps** are what diffusers' `FluxTransformer2DModel.forward` takes: the sigma
//! `t ∈ [0, 1]` (`FluxPipeline` passes `timestep / 1000`); the model multiplies by
//! 1000 in the activation dtype before the sinusoids. **Guidance** (guidance-distilled
//! models, `guidance_embeds`) is the plain guidance scale (3.5), multiplied by 1000 the
//! same way. A guidance model without guidance, or guidance for a model without the
//! embedder, is an error (as in diffusers).
//!
//! For training with per-block recomputation the forward is exposed in parts:
//! [`Flux::prepare`] (steps 1-2), [`DoubleBlock::forward`] (at most three inputs that
//! carry a gradient: the image stream, the text stream, `temb`), [`join`], then
//! [`SingleBlock::forward`] (two: the joint stream and `temb`), [`Flux::finish`];
//! [`Flux::forward`] is exactly those in sequence. [`Flux::tensor_groups`] lists each
//! part's tensor names (block-by-block optimizer updates), [`Flux::lora_targets`] the
//! attention and MLP linears by diffusers module path, and [`Flux::set_adapter`] adds a
//! module's output to any linear layer (how a LoRA plugs in). Every op goes through
//! [`crate::ops`] and [`crate::layers::Linear`]: gradients flow on every path and frozen
//! weights cost no weight gradient. Softmax runs in f32 whatever the activation dtype.
//!
//! Loading and saving (file I/O, kept out of the model) are in [`io`] ([`load_flux`],
//! [`save_diffusers`]) and [`bfl`] (BFL single files).

pub mod bfl;
pub mod io;

use std::sync::Arc;

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::layers::Linear;
use crate::ops;

pub use io::{expected_tensors, load_flux, load_flux_file, save_diffusers, tensor_groups};

/// Channels of the sinusoidal timestep / guidance projection (`Timesteps(256, ...)`).
pub const TIME_PROJ_CHANNELS: usize = 256;
/// The RoPE base (`FluxPosEmbed(theta=10000)`).
pub const ROPE_THETA: f64 = 10000.0;
/// What the model multiplies timesteps and guidance by before the sinusoids.
pub const TIMESTEP_SCALE: f64 = 1000.0;
/// Epsilon of every LayerNorm and RMS norm of the model.
pub const NORM_EPS: f64 = 1e-6;
/// MLP width over the hidden width (`mlp_ratio`, fixed in diffusers).
pub const MLP_RATIO: usize = 4;

/// The diffusers `config.json` of a `FluxTransformer2DModel` (every `__init__` key;
/// unknown keys are ignored, missing ones take diffusers' defaults, which are
/// FLUX.1-schnell's).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Config {
    /// Patch side (1): only the output width `patch_size² x out_channels` depends on it.
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Channels of the packed latents in (64 = 16 latent channels x 2 x 2).
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Channels out; `null` means `in_channels`.
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream blocks (19).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Single-stream blocks (38).
    #[serde(default = "d_single")]
    pub num_single_layers: usize,
    /// Width of one head (128).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    /// Attention heads (24); the hidden width is heads x head width (3072).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Width of the text tokens (4096, T5-XXL).
    #[serde(default = "d_joint")]
    pub joint_attention_dim: usize,
    /// Width of the pooled vector (768, CLIP-L's pooled text or projected image embedding).
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: usize,
    /// Whether the guidance embedder exists (guidance-distilled models: FLUX.1-dev).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// RoPE widths per position axis (16, 56, 56); they sum to the head width.
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<usize>,
}

const fn d_patch() -> usize {
    1
}
const fn d_in() -> usize {
    64
}
const fn d_layers() -> usize {
    19
}
const fn d_single() -> usize {
    38
}
const fn d_head_dim() -> usize {
    128
}
const fn d_heads() -> usize {
    24
}
const fn d_joint() -> usize {
    4096
}
const fn d_pooled() -> usize {
    768
}
fn d_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl Config {
    /// `black-forest-labs/FLUX.1-dev` `transformer/`: 19 double + 38 single blocks, 24
    /// heads x 128, T5 4096, pooled 768, with the guidance embedder.
    #[must_use]
    pub fn flux1_dev() -> Self {
        Self {
            guidance_embeds: true,
            ..Self::flux1_schnell()
        }
    }

    /// `black-forest-labs/FLUX.1-schnell` `transformer/` (also the shape of the
    /// de-distilled OpenFLUX.1): as [`Config::flux1_dev`] without the guidance embedder.
    #[must_use]
    pub fn flux1_schnell() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: false,
            axes_dims_rope: d_axes(),
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

    /// Width of the output tokens (`patch_size² x out_channels`).
    #[must_use]
    pub fn out_width(&self) -> usize {
        self.patch_size * self.patch_size * self.out_channels()
    }

    /// Width of the MLPs (`4 D`).
    #[must_use]
    pub fn mlp_hidden_dim(&self) -> usize {
        MLP_RATIO * self.inner_dim()
    }

    /// Checks that this code can run the configuration.
    ///
    /// # Errors
    /// What is wrong, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || self.attention_head_dim == 0
            || self.in_channels == 0
            || self.patch_size == 0
            || self.joint_attention_dim == 0
            || self.pooled_projection_dim == 0
        {
            return Err(
                "num_attention_heads, attention_head_dim, in_channels, patch_size, \
                 joint_attention_dim and pooled_projection_dim must be positive"
                    .into(),
            );
        }
        if self.out_channels == Some(0) {
            return Err("out_channels must be positive (or null)".into());
        }
        if self.axes_dims_rope.is_empty() || self.axes_dims_rope.iter().any(|d| d % 2 == 1) {
            return Err(format!(
                "axes_dims_rope {:?}: every axis width must be even (RoPE rotates pairs)",
                self.axes_dims_rope
            ));
        }
        let sum: usize = self.axes_dims_rope.iter().sum();
        if sum != self.attention_head_dim {
            return Err(format!(
                "axes_dims_rope {:?} sums to {sum}, not attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        Ok(())
    }
}

/// An adapter added to a linear layer's output (`y = W x + b + adapter(x)`): a LoRA
/// `B(A x) · alpha / r`, or anything else with the layer's input and output widths.
pub type Adapter = Arc<dyn Module + Send + Sync>;

/// A linear layer of the model, with its diffusers module path and an optional
/// [`Adapter`].
#[derive(Clone)]
pub struct FluxLinear {
    path: String,
    base: Linear,
    in_dim: usize,
    out_dim: usize,
    adapter: Option<Adapter>,
}

impl std::fmt::Debug for FluxLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxLinear")
            .field("path", &self.path)
            .field("in_dim", &self.in_dim)
            .field("out_dim", &self.out_dim)
            .field("adapter", &self.adapter.is_some())
            .finish()
    }
}

impl FluxLinear {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            path: vb.prefix(),
            base: Linear::new(in_dim, out_dim, vb)?,
            in_dim,
            out_dim,
            adapter: None,
        })
    }

    /// The diffusers module path (`transformer_blocks.0.attn.to_q`); its tensors are
    /// `<path>.weight` and `<path>.bias`.
    #[must_use]
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Input width.
    #[must_use]
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output width.
    #[must_use]
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The weight `[out, in]` (a constant when frozen, an f32 variable when trained).
    #[must_use]
    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }

    /// The bias `[out]`.
    #[must_use]
    pub fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }

    /// The adapter, if one is set.
    #[must_use]
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    fn push_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{}.weight", self.path), self.weight().clone()));
        if let Some(b) = self.bias() {
            out.push((format!("{}.bias", self.path), b.clone()));
        }
    }
}

impl Module for FluxLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.adapter {
            None => Ok(y),
            Some(a) => {
                let delta = a.forward(x)?.to_dtype(y.dtype())?;
                y + delta
            }
        }
    }
}

/// `Linear -> SiLU -> Linear` (`TimestepEmbedding`, `PixArtAlphaTextProjection(act_fn="silu")`).
#[derive(Debug, Clone)]
struct Mlp {
    linear_1: FluxLinear,
    linear_2: FluxLinear,
}

impl Mlp {
    fn new(vb: VarBuilder, d_in: usize, d: usize) -> Result<Self> {
        Ok(Self {
            linear_1: FluxLinear::new(d_in, d, vb.pp("linear_1"))?,
            linear_2: FluxLinear::new(d, d, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }

    fn linears(&self) -> [&FluxLinear; 2] {
        [&self.linear_1, &self.linear_2]
    }

    fn linears_mut(&mut self) -> [&mut FluxLinear; 2] {
        [&mut self.linear_1, &mut self.linear_2]
    }
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")`: `net.0.proj` (`D -> 4D`),
/// tanh-GELU, `net.2` (`4D -> D`).
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: FluxLinear,
    proj_out: FluxLinear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            proj_in: FluxLinear::new(dim, hidden, vb.pp("net.0.proj"))?,
            proj_out: FluxLinear::new(hidden, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&self.proj_in.forward(x)?.gelu()?)
    }
}

/// The qk norm: `torch.nn.RMSNorm(head_dim, eps=1e-6)` over each head.
#[derive(Debug, Clone)]
struct QkNorm {
    name: String,
    weight: Tensor,
}

impl QkNorm {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            name: format!("{}.weight", vb.prefix()),
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm_upcast(x, &self.weight, NORM_EPS)
    }
}

/// The rotary position embedding of one sequence (`[txt; img]`): per token and rotated
/// pair, cos and sin (f32, constants).
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[1, 1, S, head_dim / 2, 1]`.
    cos: Tensor,
    /// `[1, 1, S, head_dim / 2, 1]`.
    sin: Tensor,
}

impl Rope {
    /// diffusers' `FluxPosEmbed(theta=10000, axes_dim)` for position ids `[S, n_axes]`
    /// (any dtype, read as f32 as `ids.float()` does): per axis `i`, frequencies
    /// `1 / 10000^(2j / axes[i])` and angles `pos · freq` in f64, cos and sin rounded to
    /// f32; the axes' pairs concatenated in order. Built on `device`.
    ///
    /// # Errors
    /// `ids` not `[S, axes.len()]`, an odd axis width.
    pub fn new(ids: &Tensor, axes: &[usize], device: &Device) -> Result<Self> {
        let (s, n_axes) = ids.dims2()?;
        if n_axes != axes.len() {
            candle_core::bail!(
                "Flux RoPE: position ids have {n_axes} axes, axes_dims_rope {axes:?} has {}",
                axes.len()
            );
        }
        if axes.iter().any(|d| d % 2 == 1) {
            candle_core::bail!("Flux RoPE: odd axis width in {axes:?}");
        }
        let ids = ids
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        let freqs: Vec<Vec<f64>> = axes
            .iter()
            .map(|&dim| {
                (0..dim / 2)
                    .map(|j| 1.0 / ROPE_THETA.powf((2 * j) as f64 / dim as f64))
                    .collect()
            })
            .collect();
        let half: usize = axes.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(s * half);
        let mut sin = Vec::with_capacity(s * half);
        for row in &ids {
            for (pos, fs) in row.iter().zip(&freqs) {
                for f in fs {
                    let a = f64::from(*pos) * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (1, 1, s, half, 1), device)?,
            sin: Tensor::from_vec(sin, (1, 1, s, half, 1), device)?,
        })
    }

    /// Tokens covered.
    #[must_use]
    pub fn len(&self) -> usize {
        self.cos.dims()[2]
    }

    /// Whether no token is covered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(cos, sin)` as diffusers returns them: `[S, head_dim]` f32, each value repeated
    /// for the two channels of its pair.
    ///
    /// # Errors
    /// None in practice.
    pub fn cos_sin(&self) -> Result<(Tensor, Tensor)> {
        let s = self.len();
        let half = self.cos.dims()[3];
        let full = |t: &Tensor| {
            t.reshape((s, half, 1))?
                .repeat((1, 1, 2))?
                .reshape((s, 2 * half))
        };
        Ok((full(&self.cos)?, full(&self.sin)?))
    }

    /// `apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=-1)` for `x` `[B, H, S, hd]`:
    /// pairs `(x[2i], x[2i+1])` rotated by their angle, in f32, cast back.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, s, hd) = x.dims4()?;
        if s != self.len() || hd != 2 * self.cos.dims()[3] {
            candle_core::bail!(
                "Flux RoPE: {s} tokens of head width {hd}, the embedding covers {} of {}",
                self.len(),
                2 * self.cos.dims()[3]
            );
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?.reshape((b, h, s, hd / 2, 2))?;
        let re = xf.narrow(4, 0, 1)?;
        let im = xf.narrow(4, 1, 1)?;
        let out_re = (re.broadcast_mul(&self.cos)? - im.broadcast_mul(&self.sin)?)?;
        let out_im = (im.broadcast_mul(&self.cos)? + re.broadcast_mul(&self.sin)?)?;
        Tensor::cat(&[out_re, out_im], 4)?
            .reshape((b, h, s, hd))?
            .to_dtype(dtype)
    }
}

/// The attention options of every Flux attention: `1/sqrt(head_dim)`, no mask, softmax
/// in f32.
fn attention_opts(head_dim: usize) -> ops::AttentionOpts<'static> {
    ops::AttentionOpts {
        scale: Some(1.0 / (head_dim as f64).sqrt()),
        bias: None,
        mask: None,
        softmax_f32: true,
    }
}

/// `[B, L, H·hd]` -> qk-normed (when given) `[B, H, L, hd]`.
fn split_heads(y: &Tensor, heads: usize, head_dim: usize, norm: Option<&QkNorm>) -> Result<Tensor> {
    let (b, l, _) = y.dims3()?;
    let y = y.reshape((b, l, heads, head_dim))?;
    let y = match norm {
        Some(n) => n.forward(&y)?,
        None => y,
    };
    y.transpose(1, 2)
}

/// `softmax(q kᵀ / sqrt(hd)) v` over `[B, H, S, hd]` with RoPE on q and k: `[B, S, H·hd]`.
fn rope_attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    let (b, h, s, hd) = q.dims4()?;
    let q = rope.apply(&q.contiguous()?)?.contiguous()?;
    let k = rope.apply(&k.contiguous()?)?.contiguous()?;
    let o = ops::attention(&q, &k, &v.contiguous()?, &attention_opts(hd))?;
    o.transpose(1, 2)?.reshape((b, s, h * hd))
}

/// diffusers clips half-precision residual streams to the f16 range.
fn clip_f16(x: Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F16 {
        x.clamp(-65504f32, 65504f32)
    } else {
        Ok(x)
    }
}

/// LayerNorm without affine, eps 1e-6.
fn layer_norm(x: &Tensor) -> Result<Tensor> {
    ops::layer_norm(x, None, None, NORM_EPS)
}

/// Chunk `i` of a `[B, k, D]` modulation: `[B, 1, D]`.
fn chunk(m: &Tensor, i: usize) -> Result<Tensor> {
    m.narrow(1, i, 1)
}

/// One double-stream block (`transformer_blocks.N`): diffusers' `FluxTransformerBlock`.
#[derive(Debug, Clone)]
pub struct DoubleBlock {
    prefix: String,
    norm1: FluxLinear,
    norm1_context: FluxLinear,
    to_q: FluxLinear,
    to_k: FluxLinear,
    to_v: FluxLinear,
    to_out: FluxLinear,
    add_q_proj: FluxLinear,
    add_k_proj: FluxLinear,
    add_v_proj: FluxLinear,
    to_add_out: FluxLinear,
    norm_q: QkNorm,
    norm_k: QkNorm,
    norm_added_q: QkNorm,
    norm_added_k: QkNorm,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
    head_dim: usize,
}

impl DoubleBlock {
    /// The block under `vb` (`transformer_blocks.N`).
    ///
    /// # Errors
    /// A missing or misshapen tensor.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let a = vb.pp("attn");
        let lin = |vb: VarBuilder, i: usize, o: usize| FluxLinear::new(i, o, vb);
        Ok(Self {
            prefix: vb.prefix(),
            norm1: lin(vb.pp("norm1.linear"), d, 6 * d)?,
            norm1_context: lin(vb.pp("norm1_context.linear"), d, 6 * d)?,
            to_q: lin(a.pp("to_q"), d, d)?,
            to_k: lin(a.pp("to_k"), d, d)?,
            to_v: lin(a.pp("to_v"), d, d)?,
            to_out: lin(a.pp("to_out.0"), d, d)?,
            add_q_proj: lin(a.pp("add_q_proj"), d, d)?,
            add_k_proj: lin(a.pp("add_k_proj"), d, d)?,
            add_v_proj: lin(a.pp("add_v_proj"), d, d)?,
            to_add_out: lin(a.pp("to_add_out"), d, d)?,
            norm_q: QkNorm::new(a.pp("norm_q"), hd)?,
            norm_k: QkNorm::new(a.pp("norm_k"), hd)?,
            norm_added_q: QkNorm::new(a.pp("norm_added_q"), hd)?,
            norm_added_k: QkNorm::new(a.pp("norm_added_k"), hd)?,
            ff: FeedForward::new(vb.pp("ff"), d, cfg.mlp_hidden_dim())?,
            ff_context: FeedForward::new(vb.pp("ff_context"), d, cfg.mlp_hidden_dim())?,
            heads: cfg.num_attention_heads,
            head_dim: hd,
        })
    }

    /// The block's module path (`transformer_blocks.N`).
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The block on the image stream `img` `[B, N, D]` and the text stream `txt`
    /// `[B, T, D]` with the conditioning `temb` `[B, D]` and the RoPE of `[txt; img]`:
    /// the new `(img, txt)`. The three tensors that may carry a gradient are `img`,
    /// `txt` and `temb`; `rope` is a constant.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        let (b, n, d) = img.dims3()?;
        let t = txt.dim(1)?;
        let (h, hd) = (self.heads, self.head_dim);
        if d != h * hd || txt.dim(2)? != d {
            candle_core::bail!(
                "Flux double block: streams of width {d} / {}, the block has {}",
                txt.dim(2)?,
                h * hd
            );
        }
        let e = temb.silu()?;
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp: [B, 1, D] each
        let m = self.norm1.forward(&e)?.reshape((b, 6, d))?;
        let c = self.norm1_context.forward(&e)?.reshape((b, 6, d))?;
        let img_n = ops::modulate(&layer_norm(img)?, &chunk(&m, 0)?, &chunk(&m, 1)?)?;
        let txt_n = ops::modulate(&layer_norm(txt)?, &chunk(&c, 0)?, &chunk(&c, 1)?)?;

        let q = split_heads(&self.to_q.forward(&img_n)?, h, hd, Some(&self.norm_q))?;
        let k = split_heads(&self.to_k.forward(&img_n)?, h, hd, Some(&self.norm_k))?;
        let v = split_heads(&self.to_v.forward(&img_n)?, h, hd, None)?;
        let tq = split_heads(
            &self.add_q_proj.forward(&txt_n)?,
            h,
            hd,
            Some(&self.norm_added_q),
        )?;
        let tk = split_heads(
            &self.add_k_proj.forward(&txt_n)?,
            h,
            hd,
            Some(&self.norm_added_k),
        )?;
        let tv = split_heads(&self.add_v_proj.forward(&txt_n)?, h, hd, None)?;
        let q = Tensor::cat(&[tq, q], 2)?;
        let k = Tensor::cat(&[tk, k], 2)?;
        let v = Tensor::cat(&[tv, v], 2)?;
        let o = rope_attention(&q, &k, &v, rope)?;
        let txt_a = self.to_add_out.forward(&o.narrow(1, 0, t)?.contiguous()?)?;
        let img_a = self.to_out.forward(&o.narrow(1, t, n)?.contiguous()?)?;

        let img = (img + chunk(&m, 2)?.broadcast_mul(&img_a)?)?;
        let f = self.ff.forward(&ops::modulate(
            &layer_norm(&img)?,
            &chunk(&m, 3)?,
            &chunk(&m, 4)?,
        )?)?;
        let img = (&img + chunk(&m, 5)?.broadcast_mul(&f)?)?;

        let txt = (txt + chunk(&c, 2)?.broadcast_mul(&txt_a)?)?;
        let f = self.ff_context.forward(&ops::modulate(
            &layer_norm(&txt)?,
            &chunk(&c, 3)?,
            &chunk(&c, 4)?,
        )?)?;
        let txt = clip_f16((&txt + chunk(&c, 5)?.broadcast_mul(&f)?)?)?;
        Ok((img, txt))
    }

    /// [`DoubleBlock::forward`] with the conditioning and RoPE of a [`Prepared`].
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward_prepared(
        &self,
        img: &Tensor,
        txt: &Tensor,
        s: &Prepared,
    ) -> Result<(Tensor, Tensor)> {
        self.forward(img, txt, &s.temb, &s.rope)
    }

    fn linears(&self) -> Vec<&FluxLinear> {
        vec![
            &self.norm1,
            &self.norm1_context,
            &self.to_q,
            &self.to_k,
            &self.to_v,
            &self.to_out,
            &self.add_q_proj,
            &self.add_k_proj,
            &self.add_v_proj,
            &self.to_add_out,
            &self.ff.proj_in,
            &self.ff.proj_out,
            &self.ff_context.proj_in,
            &self.ff_context.proj_out,
        ]
    }

    fn linears_mut(&mut self) -> Vec<&mut FluxLinear> {
        vec![
            &mut self.norm1,
            &mut self.norm1_context,
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
            &mut self.add_q_proj,
            &mut self.add_k_proj,
            &mut self.add_v_proj,
            &mut self.to_add_out,
            &mut self.ff.proj_in,
            &mut self.ff.proj_out,
            &mut self.ff_context.proj_in,
            &mut self.ff_context.proj_out,
        ]
    }

    fn norms(&self) -> [&QkNorm; 4] {
        [
            &self.norm_q,
            &self.norm_k,
            &self.norm_added_q,
            &self.norm_added_k,
        ]
    }

    /// Every tensor of the block by its diffusers name, as the block holds it.
    #[must_use]
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        collect_tensors(self.linears(), self.norms())
    }
}

/// One single-stream block (`single_transformer_blocks.N`): diffusers'
/// `FluxSingleTransformerBlock`.
#[derive(Debug, Clone)]
pub struct SingleBlock {
    prefix: String,
    norm: FluxLinear,
    to_q: FluxLinear,
    to_k: FluxLinear,
    to_v: FluxLinear,
    norm_q: QkNorm,
    norm_k: QkNorm,
    proj_mlp: FluxLinear,
    proj_out: FluxLinear,
    heads: usize,
    head_dim: usize,
}

impl SingleBlock {
    /// The block under `vb` (`single_transformer_blocks.N`).
    ///
    /// # Errors
    /// A missing or misshapen tensor.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let mlp = cfg.mlp_hidden_dim();
        let a = vb.pp("attn");
        Ok(Self {
            prefix: vb.prefix(),
            norm: FluxLinear::new(d, 3 * d, vb.pp("norm.linear"))?,
            to_q: FluxLinear::new(d, d, a.pp("to_q"))?,
            to_k: FluxLinear::new(d, d, a.pp("to_k"))?,
            to_v: FluxLinear::new(d, d, a.pp("to_v"))?,
            norm_q: QkNorm::new(a.pp("norm_q"), hd)?,
            norm_k: QkNorm::new(a.pp("norm_k"), hd)?,
            proj_mlp: FluxLinear::new(d, mlp, vb.pp("proj_mlp"))?,
            proj_out: FluxLinear::new(d + mlp, d, vb.pp("proj_out"))?,
            heads: cfg.num_attention_heads,
            head_dim: hd,
        })
    }

    /// The block's module path (`single_transformer_blocks.N`).
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The block on the joint stream `x` `[B, T + N, D]` (text tokens first, [`join`])
    /// with the conditioning `temb` `[B, D]` and the RoPE of the sequence. The two
    /// tensors that may carry a gradient are `x` and `temb`; `rope` is a constant.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let (h, hd) = (self.heads, self.head_dim);
        if d != h * hd {
            candle_core::bail!(
                "Flux single block: stream of width {d}, the block has {}",
                h * hd
            );
        }
        // shift, scale, gate: [B, 1, D] each
        let m = self.norm.forward(&temb.silu()?)?.reshape((b, 3, d))?;
        let xn = ops::modulate(&layer_norm(x)?, &chunk(&m, 0)?, &chunk(&m, 1)?)?;
        let mlp = self.proj_mlp.forward(&xn)?.gelu()?;
        let q = split_heads(&self.to_q.forward(&xn)?, h, hd, Some(&self.norm_q))?;
        let k = split_heads(&self.to_k.forward(&xn)?, h, hd, Some(&self.norm_k))?;
        let v = split_heads(&self.to_v.forward(&xn)?, h, hd, None)?;
        let a = rope_attention(&q, &k, &v, rope)?;
        let y = self.proj_out.forward(&Tensor::cat(&[a, mlp], D::Minus1)?)?;
        clip_f16((x + chunk(&m, 2)?.broadcast_mul(&y)?)?)
    }

    /// [`SingleBlock::forward`] with the conditioning and RoPE of a [`Prepared`].
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward_prepared(&self, x: &Tensor, s: &Prepared) -> Result<Tensor> {
        self.forward(x, &s.temb, &s.rope)
    }

    fn linears(&self) -> Vec<&FluxLinear> {
        vec![
            &self.norm,
            &self.to_q,
            &self.to_k,
            &self.to_v,
            &self.proj_mlp,
            &self.proj_out,
        ]
    }

    fn linears_mut(&mut self) -> Vec<&mut FluxLinear> {
        vec![
            &mut self.norm,
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.proj_mlp,
            &mut self.proj_out,
        ]
    }

    /// Every tensor of the block by its diffusers name, as the block holds it.
    #[must_use]
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        collect_tensors(self.linears(), [&self.norm_q, &self.norm_k])
    }
}

fn collect_tensors<'a>(
    linears: impl IntoIterator<Item = &'a FluxLinear>,
    norms: impl IntoIterator<Item = &'a QkNorm>,
) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for l in linears {
        l.push_tensors(&mut out);
    }
    for n in norms {
        out.push((n.name.clone(), n.weight.clone()));
    }
    out
}

/// The joint stream the single blocks run on: `cat([txt, img], 1)`, text tokens first
/// (as diffusers concatenates them).
///
/// # Errors
/// Shape mismatches.
pub fn join(img: &Tensor, txt: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[txt, img], 1)
}

/// The inputs of a forward, named as diffusers' `FluxTransformer2DModel.forward` names
/// them.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Packed latents `[B, N, in_channels]` ([`pack_latents`]); their dtype is the
    /// activation dtype (weights are cast to it).
    pub hidden_states: &'a Tensor,
    /// Text tokens `[B, T, joint_attention_dim]` (T5), cast to the activation dtype.
    pub encoder_hidden_states: &'a Tensor,
    /// The pooled vector `[B, pooled_projection_dim]` (CLIP), cast to the activation dtype.
    pub pooled_projections: &'a Tensor,
    /// The sigma in `[0, 1]`, `[B]` (or `[1]`, broadcast), any numeric dtype; the model
    /// multiplies it by 1000.
    pub timestep: &'a Tensor,
    /// Image position ids `[N, 3]` ([`latent_image_ids`]); `[B, N, 3]` reads row 0, as
    /// diffusers does.
    pub img_ids: &'a Tensor,
    /// Text position ids `[T, 3]` ([`text_ids`]: zeros).
    pub txt_ids: &'a Tensor,
    /// The guidance scale `[B]` (or `[1]`) for guidance-distilled models
    /// (`guidance_embeds`), `None` for the others; multiplied by 1000 inside.
    pub guidance: Option<&'a Tensor>,
}

/// What [`Flux::prepare`] computes once per forward and the blocks read.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The image stream `[B, N, D]` (`x_embedder` of the packed latents): the first
    /// double block's input.
    pub img: Tensor,
    /// The text stream `[B, T, D]` (`context_embedder` of the T5 tokens).
    pub txt: Tensor,
    /// The conditioning `[B, D]` (timestep [+ guidance] + pooled embeddings) every block
    /// and the output norm read.
    pub temb: Tensor,
    /// The RoPE of `cat(txt_ids, img_ids)`.
    pub rope: Rope,
}

impl Prepared {
    /// Text tokens `T`.
    ///
    /// # Errors
    /// None in practice.
    pub fn txt_len(&self) -> Result<usize> {
        self.txt.dim(1)
    }

    /// Image tokens `N`.
    ///
    /// # Errors
    /// None in practice.
    pub fn img_len(&self) -> Result<usize> {
        self.img.dim(1)
    }
}

/// diffusers' `FluxTransformer2DModel`.
#[derive(Debug, Clone)]
pub struct Flux {
    x_embedder: FluxLinear,
    context_embedder: FluxLinear,
    timestep_embedder: Mlp,
    guidance_embedder: Option<Mlp>,
    text_embedder: Mlp,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: FluxLinear,
    proj_out: FluxLinear,
    cfg: Config,
}

/// `[B]` from `[B]` or `[1]` (broadcast), flattened.
fn per_sample(t: &Tensor, b: usize, what: &str) -> Result<Tensor> {
    let t = t.flatten_all()?;
    match t.dims1()? {
        n if n == b => Ok(t),
        1 => t.broadcast_as(b)?.contiguous(),
        n => candle_core::bail!("Flux: {n} {what} values for a batch of {b}"),
    }
}

/// Position ids as `[L, axes]` (a 3-D `[B, L, axes]` reads row 0, as diffusers does).
fn ids_2d(ids: &Tensor) -> Result<Tensor> {
    match ids.rank() {
        2 => Ok(ids.clone()),
        3 => ids.get(0),
        r => candle_core::bail!("Flux: position ids of rank {r} (want [L, 3])"),
    }
}

impl Flux {
    /// Builds the model from weights named as diffusers saves them, `vb` rooted at the
    /// transformer's top level. Frozen or trainable is the `VarBuilder`'s business
    /// ([`crate::loader::WeightFiles::build`] / `build_trainable`, [`bfl`] for BFL
    /// files, or [`crate::init::fresh_var_builder`]).
    ///
    /// # Errors
    /// An invalid configuration ([`Config::validate`]); a missing or misshapen tensor.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("Flux config: {e}")))?;
        let d = cfg.inner_dim();
        let te = vb.pp("time_text_embed");
        Ok(Self {
            x_embedder: FluxLinear::new(cfg.in_channels, d, vb.pp("x_embedder"))?,
            context_embedder: FluxLinear::new(
                cfg.joint_attention_dim,
                d,
                vb.pp("context_embedder"),
            )?,
            timestep_embedder: Mlp::new(te.pp("timestep_embedder"), TIME_PROJ_CHANNELS, d)?,
            guidance_embedder: if cfg.guidance_embeds {
                Some(Mlp::new(te.pp("guidance_embedder"), TIME_PROJ_CHANNELS, d)?)
            } else {
                None
            },
            text_embedder: Mlp::new(te.pp("text_embedder"), cfg.pooled_projection_dim, d)?,
            double: (0..cfg.num_layers)
                .map(|i| DoubleBlock::new(vb.pp(format!("transformer_blocks.{i}")), cfg))
                .collect::<Result<_>>()?,
            single: (0..cfg.num_single_layers)
                .map(|i| SingleBlock::new(vb.pp(format!("single_transformer_blocks.{i}")), cfg))
                .collect::<Result<_>>()?,
            norm_out: FluxLinear::new(d, 2 * d, vb.pp("norm_out.linear"))?,
            proj_out: FluxLinear::new(d, cfg.out_width(), vb.pp("proj_out"))?,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The double-stream blocks, in order.
    #[must_use]
    pub fn double_blocks(&self) -> &[DoubleBlock] {
        &self.double
    }

    /// The single-stream blocks, in order.
    #[must_use]
    pub fn single_blocks(&self) -> &[SingleBlock] {
        &self.single
    }

    /// Everything before the blocks: both streams, the conditioning `temb`, the RoPE.
    ///
    /// # Errors
    /// Shapes that do not fit the config; guidance given to a model without the
    /// guidance embedder, or missing for one with it.
    pub fn prepare(&self, inp: &Inputs<'_>) -> Result<Prepared> {
        let cfg = &self.cfg;
        let (b, n, c) = inp.hidden_states.dims3()?;
        if c != cfg.in_channels {
            candle_core::bail!(
                "Flux: hidden_states of width {c}, the model takes {} (packed latents: 4 x latent channels)",
                cfg.in_channels
            );
        }
        let dtype = inp.hidden_states.dtype();
        let img = self.x_embedder.forward(inp.hidden_states)?;

        let (eb, t, ec) = inp.encoder_hidden_states.dims3()?;
        if eb != b || ec != cfg.joint_attention_dim {
            candle_core::bail!(
                "Flux: encoder_hidden_states [{eb}, {t}, {ec}] for a batch of {b} (want width {})",
                cfg.joint_attention_dim
            );
        }
        let (pb, pc) = inp.pooled_projections.dims2()?;
        if pb != b || pc != cfg.pooled_projection_dim {
            candle_core::bail!(
                "Flux: pooled_projections [{pb}, {pc}] for a batch of {b} (want width {})",
                cfg.pooled_projection_dim
            );
        }

        // timestep.to(dtype) * 1000, then the sinusoids in f32, cast to the pooled dtype
        let sinus = |v: &Tensor, what: &str| -> Result<Tensor> {
            let v = (per_sample(v, b, what)?.to_dtype(dtype)? * TIMESTEP_SCALE)?;
            crate::pixart::timestep_embedding(&v, TIME_PROJ_CHANNELS)?.to_dtype(dtype)
        };
        let mut temb = self
            .timestep_embedder
            .forward(&sinus(inp.timestep, "timestep")?)?;
        match (&self.guidance_embedder, inp.guidance) {
            (Some(g), Some(gv)) => temb = (temb + g.forward(&sinus(gv, "guidance")?)?)?,
            (None, None) => {}
            (Some(_), None) => candle_core::bail!(
                "Flux: this model embeds guidance (guidance_embeds, a guidance-distilled \
                 model such as FLUX.1-dev): pass the guidance scale"
            ),
            (None, Some(_)) => candle_core::bail!(
                "Flux: guidance given, but this model has no guidance embedder \
                 (guidance_embeds false: schnell / de-distilled); use true CFG instead"
            ),
        }
        let pooled = inp.pooled_projections.to_dtype(dtype)?;
        let temb = (temb + self.text_embedder.forward(&pooled)?)?;
        let txt = self
            .context_embedder
            .forward(&inp.encoder_hidden_states.to_dtype(dtype)?)?;

        let img_ids = ids_2d(inp.img_ids)?;
        let txt_ids = ids_2d(inp.txt_ids)?;
        if img_ids.dim(0)? != n || txt_ids.dim(0)? != t {
            candle_core::bail!(
                "Flux: img_ids {:?} / txt_ids {:?} for {n} image and {t} text tokens",
                img_ids.dims(),
                txt_ids.dims()
            );
        }
        let ids = Tensor::cat(
            &[txt_ids.to_dtype(DType::F32)?, img_ids.to_dtype(DType::F32)?],
            0,
        )?;
        let rope = Rope::new(&ids, &cfg.axes_dims_rope, inp.hidden_states.device())?;
        Ok(Prepared {
            img,
            txt,
            temb,
            rope,
        })
    }

    /// Everything after the blocks: the image tokens of `x` (the joint stream
    /// `[B, T + N, D]` after the single blocks, or the image stream `[B, N, D]`) through
    /// the output norm and `proj_out`: `[B, N, patch_size² x out_channels]`.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn finish(&self, x: &Tensor, s: &Prepared) -> Result<Tensor> {
        let (b, len, d) = x.dims3()?;
        let (t, n) = (s.txt_len()?, s.img_len()?);
        let img = if len == n {
            x.clone()
        } else if len == t + n {
            x.narrow(1, t, n)?
        } else {
            candle_core::bail!("Flux: {len} tokens after the blocks, want {t} + {n} (or {n})")
        };
        // AdaLayerNormContinuous: scale first, then shift
        let m = self.norm_out.forward(&s.temb.silu()?)?.reshape((b, 2, d))?;
        let h = ops::modulate(&layer_norm(&img)?, &chunk(&m, 1)?, &chunk(&m, 0)?)?;
        self.proj_out.forward(&h)
    }

    /// The whole model: [`Flux::prepare`], every [`DoubleBlock::forward`], [`join`],
    /// every [`SingleBlock::forward`], [`Flux::finish`]: `[B, N, patch_size² x
    /// out_channels]`.
    ///
    /// # Errors
    /// As [`Flux::prepare`].
    pub fn forward(&self, inp: &Inputs<'_>) -> Result<Tensor> {
        let s = self.prepare(inp)?;
        let (mut img, mut txt) = (s.img.clone(), s.txt.clone());
        for block in &self.double {
            (img, txt) = block.forward_prepared(&img, &txt, &s)?;
        }
        let mut x = join(&img, &txt)?;
        for block in &self.single {
            x = block.forward_prepared(&x, &s)?;
        }
        self.finish(&x, &s)
    }

    fn outer_linears(&self) -> Vec<&FluxLinear> {
        let mut v = vec![&self.x_embedder, &self.context_embedder];
        v.extend(self.timestep_embedder.linears());
        if let Some(g) = &self.guidance_embedder {
            v.extend(g.linears());
        }
        v.extend(self.text_embedder.linears());
        v
    }

    /// Every linear layer of the model, in forward order.
    #[must_use]
    pub fn linears(&self) -> Vec<&FluxLinear> {
        let mut v = self.outer_linears();
        for b in &self.double {
            v.extend(b.linears());
        }
        for b in &self.single {
            v.extend(b.linears());
        }
        v.push(&self.norm_out);
        v.push(&self.proj_out);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut FluxLinear> {
        let mut v = vec![&mut self.x_embedder, &mut self.context_embedder];
        v.extend(self.timestep_embedder.linears_mut());
        if let Some(g) = &mut self.guidance_embedder {
            v.extend(g.linears_mut());
        }
        v.extend(self.text_embedder.linears_mut());
        for b in &mut self.double {
            v.extend(b.linears_mut());
        }
        for b in &mut self.single {
            v.extend(b.linears_mut());
        }
        v.push(&mut self.norm_out);
        v.push(&mut self.proj_out);
        v
    }

    /// The linear layer at a diffusers module path (`transformer_blocks.0.attn.to_q`).
    #[must_use]
    pub fn linear(&self, path: &str) -> Option<&FluxLinear> {
        self.linears().into_iter().find(|l| l.path == path)
    }

    /// The diffusers module paths of the blocks' attention and MLP linears, the usual
    /// LoRA targets (diffusers' Flux LoRA scripts): per double block `attn.{to_q, to_k,
    /// to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out}`,
    /// `ff.net.{0.proj, 2}`, `ff_context.net.{0.proj, 2}`; per single block
    /// `attn.{to_q, to_k, to_v}`, `proj_mlp`, `proj_out`. The modulation linears
    /// (`norm1.linear`, ...) and the embedders are not listed but take adapters too
    /// ([`Flux::linears`]).
    #[must_use]
    pub fn lora_targets(&self) -> Vec<String> {
        self.linears()
            .into_iter()
            .map(FluxLinear::path)
            .filter(|p| {
                (p.starts_with("transformer_blocks.")
                    || p.starts_with("single_transformer_blocks."))
                    && !p.contains(".norm")
            })
            .map(str::to_string)
            .collect()
    }

    /// Sets (`Some`) or removes (`None`) the adapter of the linear layer at `path`: its
    /// output becomes `W x + b + adapter(x)`. The adapter takes the layer's input
    /// (`[..., in_dim]`, the activation dtype) and must give `[..., out_dim]`.
    ///
    /// # Errors
    /// No linear layer at `path` (the message lists the LoRA targets' form).
    pub fn set_adapter(&mut self, path: &str, adapter: Option<Adapter>) -> Result<()> {
        match self.linears_mut().into_iter().find(|l| l.path == path) {
            Some(l) => {
                l.adapter = adapter;
                Ok(())
            }
            None => candle_core::bail!(
                "Flux: no linear layer `{path}` (module paths look like \
                 transformer_blocks.0.attn.to_q, single_transformer_blocks.3.proj_mlp)"
            ),
        }
    }

    /// The names of the model's tensors in groups, in forward order: `embed` (the
    /// embedders), each `transformer_blocks.N`, each `single_transformer_blocks.N`,
    /// `out` (`norm_out`, `proj_out`). Every tensor is in exactly one group: a trainer
    /// updates group by group as the backward reaches them.
    #[must_use]
    pub fn tensor_groups(&self) -> Vec<(String, Vec<String>)> {
        let names = |v: Vec<(String, Tensor)>| v.into_iter().map(|(n, _)| n).collect();
        let mut g = vec![(
            "embed".to_string(),
            names(collect_tensors(self.outer_linears(), [])),
        )];
        for b in &self.double {
            g.push((b.prefix.clone(), names(b.tensors())));
        }
        for b in &self.single {
            g.push((b.prefix.clone(), names(b.tensors())));
        }
        g.push((
            "out".to_string(),
            names(collect_tensors([&self.norm_out, &self.proj_out], [])),
        ));
        g
    }

    /// Every weight of the model under its diffusers name, as the model holds it
    /// (frozen constants in the compute dtype, trainable variables in f32): what
    /// [`save_diffusers`] writes. Adapters are not included.
    #[must_use]
    pub fn tensors(&self) -> std::collections::BTreeMap<String, Tensor> {
        let mut out = collect_tensors(self.outer_linears(), []);
        for b in &self.double {
            out.extend(b.tensors());
        }
        for b in &self.single {
            out.extend(b.tensors());
        }
        out.extend(collect_tensors([&self.norm_out, &self.proj_out], []));
        out.into_iter().collect()
    }
}

/// `FluxPipeline._pack_latents`: latents `[B, C, H, W]` (H, W even) as `[B, (H/2)(W/2),
/// 4C]`, each token a 2x2 patch, channels outermost (`c, dy, dx`), tokens row-major.
///
/// # Errors
/// Odd H or W.
pub fn pack_latents(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    if h % 2 == 1 || w % 2 == 1 {
        candle_core::bail!("Flux: latents {h}x{w} are not even (packing takes 2x2 patches)");
    }
    latents
        .reshape(vec![b, c, h / 2, 2, w / 2, 2])?
        .permute(vec![0, 2, 4, 1, 3, 5])?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// `FluxPipeline._unpack_latents` for latents of `height x width` (the latent grid, not
/// pixels): `[B, (H/2)(W/2), 4C]` -> `[B, C, H, W]`.
///
/// # Errors
/// A token count or width that does not fit.
pub fn unpack_latents(packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (b, n, c4) = packed.dims3()?;
    if height % 2 == 1 || width % 2 == 1 || n != (height / 2) * (width / 2) || c4 % 4 != 0 {
        candle_core::bail!(
            "Flux: {n} packed tokens of width {c4} do not make {height}x{width} latents"
        );
    }
    packed
        .reshape(vec![b, height / 2, width / 2, c4 / 4, 2, 2])?
        .permute(vec![0, 3, 1, 4, 2, 5])?
        .reshape((b, c4 / 4, height, width))
}

/// `FluxPipeline._prepare_latent_image_ids(_, rows, cols, ...)` for the packed grid
/// (`rows = H/2`, `cols = W/2` of the latents): `[rows · cols, 3]` f32 with
/// `(0, row, col)` per token, row-major.
///
/// # Errors
/// None in practice.
pub fn latent_image_ids(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(rows * cols * 3);
    for r in 0..rows {
        for c in 0..cols {
            v.extend([0.0, r as f32, c as f32]);
        }
    }
    Tensor::from_vec(v, (rows * cols, 3), device)
}

/// The text position ids `FluxPipeline` passes: zeros `[tokens, 3]`.
///
/// # Errors
/// None in practice.
pub fn text_ids(tokens: usize, device: &Device) -> Result<Tensor> {
    Tensor::zeros((tokens, 3), DType::F32, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_as_the_hub_writes_them() {
        // black-forest-labs/FLUX.1-dev transformer/config.json (no axes_dims_rope, no
        // out_channels: diffusers' defaults)
        let text = r#"{
          "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
          "attention_head_dim": 128, "guidance_embeds": true, "in_channels": 64,
          "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
          "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768
        }"#;
        let c: Config = serde_json::from_str(text).unwrap();
        assert_eq!(c, Config::flux1_dev());
        assert_eq!(c.inner_dim(), 3072);
        assert_eq!(c.out_width(), 64);
        let s: Config = serde_json::from_str(r#"{"axes_dims_rope": [16, 56, 56]}"#).unwrap();
        assert_eq!(s, Config::flux1_schnell());
        s.validate().unwrap();
    }

    #[test]
    fn bad_configs_are_named() {
        let mut c = Config::flux1_dev();
        c.axes_dims_rope = vec![16, 56, 48];
        assert!(c.validate().unwrap_err().contains("axes_dims_rope"));
        c.axes_dims_rope = vec![15, 57, 56];
        assert!(c.validate().unwrap_err().contains("even"));
        let mut c = Config::flux1_dev();
        c.num_attention_heads = 0;
        assert!(c.validate().unwrap_err().contains("num_attention_heads"));
    }

    #[test]
    fn packing_round_trips_and_ids_are_row_major() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &dev)?.reshape((2, 3, 4, 6))?;
        let p = pack_latents(&x)?;
        assert_eq!(p.dims(), &[2, 6, 12]);
        // token 1 = patch (row 0, cols 2..4); channel 0, dy 0, dx 0 first
        assert_eq!(p.get(0)?.get(1)?.get(0)?.to_scalar::<f32>()?, 2.0);
        let u = unpack_latents(&p, 4, 6)?;
        assert_eq!((u - &x)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let ids = latent_image_ids(2, 3, &dev)?.to_vec2::<f32>()?;
        assert_eq!(ids[4], vec![0.0, 1.0, 1.0]);
        assert!(pack_latents(&x.narrow(2, 0, 3)?).is_err());
        Ok(())
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norms() -> Result<()> {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[0f32, 0., 0.], [1., 2., 3.]], &dev)?;
        let rope = Rope::new(&ids, &[2, 2, 4], &dev)?;
        let x = Tensor::new(&[1f32, 0., 0., 1., 1., 1., 2., 0.], &dev)?
            .reshape((1, 1, 1, 8))?
            .repeat((1, 1, 2, 1))?;
        let y = rope.apply(&x)?;
        // position 0: identity
        let y0 = y.get(0)?.get(0)?.get(0)?.to_vec1::<f32>()?;
        assert_eq!(y0, vec![1., 0., 0., 1., 1., 1., 2., 0.]);
        // position 1, axis 0 (pos 1, freq 1): (1, 0) -> (cos 1, sin 1)
        let y1 = y.get(0)?.get(0)?.get(1)?.to_vec1::<f32>()?;
        assert!((y1[0] - 1f32.cos()).abs() < 1e-6 && (y1[1] - 1f32.sin()).abs() < 1e-6);
        let n = |t: &Tensor| -> Result<f32> { t.sqr()?.sum_all()?.to_scalar::<f32>() };
        assert!((n(&y)? - n(&x)?).abs() < 1e-5);
        let (c, _) = rope.cos_sin()?;
        assert_eq!(c.dims(), &[2, 8]);
        Ok(())
    }
}
