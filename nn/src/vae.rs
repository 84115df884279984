//! A KL autoencoder (AutoencoderKL): SD's VAE (sd-vae-ft-ema, used by PixArt-α) and the
//! Flux autoencoder. [`VaeEncoder`] returns the posterior's mean and std (what the store
//! caches); [`VaeDecoder`] turns a latent back into an image (the sampler's last step).
//!
//! - Paper: [High-Resolution Image Synthesis with Latent Diffusion Models](https://arxiv.org/abs/2112.10752)
//! - Reference code: diffusers `AutoencoderKL` / `Encoder` / `DiagonalGaussianDistribution`
//!   (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py>),
//!   BFL's Flux autoencoder (<https://github.com/black-forest-labs/flux/blob/main/src/flux/modules/autoencoder.py>).
//!
//! Weight names are diffusers' (`encoder.down_blocks.0.resnets.0.conv1.weight`,
//! `decoder.up_blocks.0.upsamplers.0.conv.weight`, ...). Checkpoints in the original
//! LDM / BFL layout (`ae.safetensors`: `encoder.down.0.block.0`, `decoder.up.3.block.0`,
//! `*.mid.attn_1.q` as 1x1 convolutions, `nin_shortcut`, ...) load through
//! [`Config::ldm_name`] (LDM numbers the decoder's up blocks from the highest
//! resolution, diffusers in execution order: diffusers' `up_blocks.i` is LDM's
//! `up.{n-1-i}`), and [`Config::from_ldm_shapes`] recovers the architecture of such a
//! file, which ships without a `config.json`. Older diffusers files (sd-vae-ft-ema) name
//! the mid-block attention `query`/`key`/`value`/`proj_attn`: [`legacy_attention_name`];
//! [`weight_names`] gives the loader's name map for either layout.
//!
//! Posterior: `mean, logvar = chunk(moments, 2)`, `std = exp(0.5 * clamp(logvar, -30,
//! 20))`, as diffusers computes it. Decoding takes the raw latent (the sampler undoes
//! the latent scaling first: `z / scaling_factor + shift_factor`) and returns the image
//! unclamped, roughly in [-1, 1], as diffusers' `decode(z).sample`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::layers::{Conv2d, GroupNorm, Linear};
use crate::ops;
use serde::Deserialize;

pub mod io;
pub use io::{VaeFiles, locate};

fn default_in_channels() -> usize {
    3
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
const fn default_true() -> bool {
    true
}

/// diffusers' `AutoencoderKL` config (`config.json` of a VAE directory). The
/// bookkeeping keys are ignored (upstream configs gain keys across diffusers versions).
/// Defaults are diffusers'.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    /// Image channels.
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Channels of each down block.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Block kinds; only `DownEncoderBlock2D` exists for this encoder.
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// Resnets per down block.
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// Latent channels (4 for SD, 16 for Flux).
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Groups of every GroupNorm.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Activation; only `silu`.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Whether the 1x1 `quant_conv` follows the encoder (SD: yes, Flux: no).
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether the mid block has its self-attention.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// Latent scale (for the record: the trainer applies it).
    #[serde(default)]
    pub scaling_factor: Option<f64>,
    /// Latent shift (Flux), for the record.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Channels of the decoded image.
    #[serde(default = "default_in_channels")]
    pub out_channels: usize,
    /// Decoder block kinds; only `UpDecoderBlock2D` exists for this decoder.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Whether the 1x1 `post_quant_conv` precedes the decoder (SD: yes, Flux: no).
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// diffusers' pipelines run this VAE in f32 whatever their dtype (SD's and Flux's
    /// overflow in f16); for the sampler to honour.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
}

impl Config {
    /// stabilityai/sd-vae-ft-ema (the VAE of PixArt-α and SD 1.x/2.x).
    pub fn sd_vae_ft_ema() -> Self {
        Self {
            in_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            act_fn: "silu".into(),
            use_quant_conv: true,
            mid_block_add_attention: true,
            scaling_factor: Some(0.18215),
            shift_factor: None,
            out_channels: 3,
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            use_post_quant_conv: true,
            force_upcast: true,
        }
    }

    /// The Flux autoencoder (FLUX.1-dev / schnell `vae/`, BFL `ae.safetensors`).
    pub fn flux() -> Self {
        Self {
            latent_channels: 16,
            use_quant_conv: false,
            use_post_quant_conv: false,
            scaling_factor: Some(0.3611),
            shift_factor: Some(0.1159),
            ..Self::sd_vae_ft_ema()
        }
    }

    /// Checks what this implementation supports; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("`block_out_channels` is empty".into());
        }
        if self.down_block_types.len() != self.block_out_channels.len() {
            return Err(format!(
                "`down_block_types` has {} entries but `block_out_channels` {}",
                self.down_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| t.as_str() != "DownEncoderBlock2D")
        {
            return Err(format!(
                "`down_block_types` entry `{t}` is not supported (only DownEncoderBlock2D)"
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "`act_fn` `{}` is not supported (only silu)",
                self.act_fn
            ));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "`norm_num_groups` {} does not divide block channels {c}",
                self.norm_num_groups
            ));
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 {
            return Err("`layers_per_block` and `latent_channels` must be positive".into());
        }
        Ok(())
    }

    /// Checks what [`VaeDecoder`] supports on top of [`Config::validate`]; the message
    /// names the field.
    pub fn validate_decoder(&self) -> std::result::Result<(), String> {
        self.validate()?;
        if self.up_block_types.len() != self.block_out_channels.len() {
            return Err(format!(
                "`up_block_types` has {} entries but `block_out_channels` {}",
                self.up_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| t.as_str() != "UpDecoderBlock2D")
        {
            return Err(format!(
                "`up_block_types` entry `{t}` is not supported (only UpDecoderBlock2D)"
            ));
        }
        if self.out_channels == 0 {
            return Err("`out_channels` must be positive".into());
        }
        Ok(())
    }

    /// Spatial downscale factor (8 for SD and Flux).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The architecture of an LDM / BFL-layout checkpoint (no `config.json`), from the
    /// stored shapes: `shape_of` returns a stored tensor's shape by its LDM name.
    /// Norm groups are 32, as in BFL's and LDM's code. The decoder mirrors the encoder
    /// (as in every AutoencoderKL); its output channels and `post_quant_conv` come from
    /// the file's decoder tensors where it has them, else from the encoder's. `None` if
    /// the file is not an LDM autoencoder encoder.
    pub fn from_ldm_shapes(shape_of: impl Fn(&str) -> Option<Vec<usize>>) -> Option<Self> {
        let conv_in = shape_of("encoder.conv_in.weight")?;
        let mut block_out_channels = Vec::new();
        while let Some(s) = shape_of(&format!(
            "encoder.down.{}.block.0.conv1.weight",
            block_out_channels.len()
        )) {
            block_out_channels.push(s[0]);
        }
        if block_out_channels.is_empty() {
            return None;
        }
        let mut layers_per_block = 0;
        while shape_of(&format!(
            "encoder.down.0.block.{layers_per_block}.conv1.weight"
        ))
        .is_some()
        {
            layers_per_block += 1;
        }
        let conv_out = shape_of("encoder.conv_out.weight")?;
        let n = block_out_channels.len();
        let in_channels = *conv_in.get(1)?;
        let latent_channels = conv_out[0] / 2;
        let use_quant_conv = shape_of("quant_conv.weight").is_some();
        // The decoder mirrors the encoder in AutoencoderKL; a file whose decoder does
        // not is reported by the loader, tensor by tensor, when the decoder is built.
        let (out_channels, use_post_quant_conv) = match shape_of("decoder.conv_out.weight") {
            Some(out) if shape_of("decoder.conv_in.weight").is_some() => {
                (out[0], shape_of("post_quant_conv.weight").is_some())
            }
            _ => (in_channels, use_quant_conv),
        };
        Some(Self {
            in_channels,
            down_block_types: vec!["DownEncoderBlock2D".into(); n],
            block_out_channels,
            layers_per_block,
            latent_channels,
            norm_num_groups: 32,
            act_fn: "silu".into(),
            use_quant_conv,
            mid_block_add_attention: shape_of("encoder.mid.attn_1.q.weight").is_some(),
            scaling_factor: None,
            shift_factor: None,
            out_channels,
            up_block_types: vec!["UpDecoderBlock2D".into(); n],
            use_post_quant_conv,
            force_upcast: true,
        })
    }

    /// The LDM / BFL name of a diffusers AutoencoderKL tensor of this architecture,
    /// encoder or decoder ([`ldm_names`], plus the decoder's up blocks, which LDM
    /// numbers in reverse).
    pub fn ldm_name(&self, diffusers: &str) -> Option<String> {
        if let Some(rest) = diffusers.strip_prefix("decoder.up_blocks.") {
            let (block, rest) = rest.split_once('.')?;
            let n = self.block_out_channels.len();
            let i = n
                .checked_sub(1)?
                .checked_sub(block.parse::<usize>().ok()?)?;
            if let Some(rest) = rest.strip_prefix("resnets.") {
                let (layer, rest) = rest.split_once('.')?;
                let rest = rest.replace("conv_shortcut", "nin_shortcut");
                return Some(format!("decoder.up.{i}.block.{layer}.{rest}"));
            }
            let rest = rest.strip_prefix("upsamplers.0.conv.")?;
            return Some(format!("decoder.up.{i}.upsample.conv.{rest}"));
        }
        ldm_names(diffusers)
    }
}

/// The names to look a diffusers-named tensor up under, for [`crate::WeightFiles`]: in
/// an LDM / BFL file ([`Config::ldm_name`]), or in a diffusers file, the name itself and
/// then its pre-0.14 attention alias ([`legacy_attention_name`]).
pub fn weight_names(cfg: &Config, ldm: bool) -> crate::NameMap {
    if ldm {
        let cfg = cfg.clone();
        std::sync::Arc::new(move |n: &str| vec![cfg.ldm_name(n).unwrap_or_else(|| n.to_string())])
    } else {
        std::sync::Arc::new(|n: &str| {
            let mut c = vec![n.to_string()];
            c.extend(legacy_attention_name(n));
            c
        })
    }
}

/// Whether stored tensor names are in the LDM / BFL layout (`encoder.down.*` or
/// `decoder.up.*`) rather than diffusers'.
pub fn is_ldm_layout<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n.starts_with("encoder.down.") || n.starts_with("decoder.up."))
}

/// The LDM / BFL names of a diffusers AutoencoderKL tensor (`None` for names that have
/// no counterpart, and for the decoder's up blocks, whose LDM index depends on the block
/// count: [`Config::ldm_name`]).
pub fn ldm_names(diffusers: &str) -> Option<String> {
    if diffusers.starts_with("decoder.up_blocks.") {
        return None;
    }
    for half in ["encoder", "decoder"] {
        if let Some(rest) = diffusers
            .strip_prefix(half)
            .and_then(|r| r.strip_prefix(".mid_block."))
        {
            return ldm_mid_name(half, rest);
        }
        if let Some(rest) = diffusers
            .strip_prefix(half)
            .and_then(|r| r.strip_prefix(".conv_norm_out."))
        {
            return Some(format!("{half}.norm_out.{rest}"));
        }
    }
    if let Some(rest) = diffusers.strip_prefix("encoder.down_blocks.") {
        let (block, rest) = rest.split_once('.')?;
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (layer, rest) = rest.split_once('.')?;
            let rest = rest.replace("conv_shortcut", "nin_shortcut");
            return Some(format!("encoder.down.{block}.block.{layer}.{rest}"));
        }
        let rest = rest.strip_prefix("downsamplers.0.conv.")?;
        return Some(format!("encoder.down.{block}.downsample.conv.{rest}"));
    }
    Some(diffusers.to_string())
}

/// `{half}.mid_block.{rest}` in LDM names.
fn ldm_mid_name(half: &str, rest: &str) -> Option<String> {
    if let Some(rest) = rest.strip_prefix("resnets.") {
        let (i, rest) = rest.split_once('.')?;
        let n = i.parse::<usize>().ok()? + 1;
        let rest = rest.replace("conv_shortcut", "nin_shortcut");
        return Some(format!("{half}.mid.block_{n}.{rest}"));
    }
    let rest = rest.strip_prefix("attentions.0.")?;
    let (module, param) = rest.rsplit_once('.')?;
    let m = match module {
        "group_norm" => "norm",
        "to_q" => "q",
        "to_k" => "k",
        "to_v" => "v",
        "to_out.0" => "proj_out",
        _ => return None,
    };
    Some(format!("{half}.mid.attn_1.{m}.{param}"))
}

/// The names older diffusers checkpoints (sd-vae-ft-ema among them) use for the
/// mid-block attention: `query`, `key`, `value`, `proj_attn`.
pub fn legacy_attention_name(diffusers: &str) -> Option<String> {
    let (head, param) = diffusers.rsplit_once('.')?;
    let (attn, module) = if let Some(a) = head.strip_suffix(".to_out.0") {
        (a, "proj_attn")
    } else {
        let (a, m) = head.rsplit_once('.')?;
        let m = match m {
            "to_q" => "query",
            "to_k" => "key",
            "to_v" => "value",
            _ => return None,
        };
        (a, m)
    };
    attn.contains(".attentions.")
        .then(|| format!("{attn}.{module}.{param}"))
}

const NORM_EPS: f64 = 1e-6;

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Conv2d::new(
        cin,
        cout,
        k,
        Conv2dConfig {
            padding: pad,
            stride,
            ..Default::default()
        },
        vb,
    )
}

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, cin, NORM_EPS, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            norm2: GroupNorm::new(groups, cout, NORM_EPS, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            shortcut: (cin != cout)
                .then(|| conv(cin, cout, 1, 1, 0, vb.pp("conv_shortcut")))
                .transpose()?,
        })
    }
}

impl ResnetBlock {
    /// The block of `x + pending` (per channel), where `pending` is the bias of the
    /// convolution before it, not yet added (`None`: the block of `x`). The biased input
    /// is never written: norm1 adds `pending` as it reads `x`, and on the skip path it
    /// becomes part of conv2's bias (through the 1x1 shortcut as `W · pending`: the
    /// shortcut is linear and unpadded), as do the shortcut's own bias and conv2's, so
    /// the accumulator conv2 writes onto is made in the one pass it takes anyway.
    fn forward_after_bias(&self, x: &Tensor, pending: Option<&Tensor>) -> Result<Tensor> {
        let h = self
            .conv1
            .forward_unbiased(&self.norm1.forward_silu_after_bias(x, pending)?)?;
        // conv1's bias is added by norm2 as it reads `h`
        let h = self.norm2.forward_silu_after_bias(&h, self.conv1.bias())?;
        let mut biases: Vec<Tensor> = self.conv2.bias().into_iter().cloned().collect();
        let skip = match &self.shortcut {
            Some(s) => {
                biases.extend(s.bias().cloned());
                if let Some(p) = pending {
                    biases.push(shortcut_of_bias(s, p)?);
                }
                s.forward_unbiased(x)?
            }
            None => {
                biases.extend(pending.cloned());
                x.clone()
            }
        };
        let bias = sum_biases(&biases, h.dtype())?;
        self.conv2.forward_add_with_bias(&h, bias.as_ref(), &skip)
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_after_bias(x, None)
    }
}

/// The resnets in turn on `x + pending` (the first adds `pending`:
/// [`ResnetBlock::forward_after_bias`]; a block has at least one, `Config::validate`).
fn resnets_after_bias(
    resnets: &[ResnetBlock],
    x: &Tensor,
    mut pending: Option<&Tensor>,
) -> Result<Tensor> {
    let mut x = x.clone();
    for r in resnets {
        x = r.forward_after_bias(&x, pending.take())?;
    }
    Ok(x)
}

/// What a 1x1 convolution `s` (no padding, stride 1) adds to each output channel of an
/// input offset by `bias` per channel: `W · bias`, `[out]`, in f32.
fn shortcut_of_bias(s: &Conv2d, bias: &Tensor) -> Result<Tensor> {
    let (cout, cin, _, _) = s.weight().dims4()?;
    s.weight()
        .to_dtype(DType::F32)?
        .reshape((cout, cin))?
        .matmul(&bias.to_dtype(DType::F32)?.reshape((cin, 1))?)?
        .reshape(cout)
}

/// The sum of per-channel biases (summed in f32, rounded once to `dtype`); `None`
/// when there are none.
fn sum_biases(biases: &[Tensor], dtype: DType) -> Result<Option<Tensor>> {
    match biases {
        [] => Ok(None),
        [b] => Ok(Some(b.to_dtype(dtype)?)),
        [first, rest @ ..] => {
            let mut sum = first.to_dtype(DType::F32)?;
            for b in rest {
                sum = (sum + b.to_dtype(DType::F32)?)?;
            }
            Ok(Some(sum.to_dtype(dtype)?))
        }
    }
}

/// Single-head self-attention over the spatial positions, with its GroupNorm and the
/// residual connection (diffusers `Attention` as the VAE mid block builds it).
#[derive(Debug, Clone)]
struct SpatialAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialAttention {
    fn new(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(groups, ch, NORM_EPS, vb.pp("group_norm"))?,
            q: Linear::new(ch, ch, vb.pp("to_q"))?,
            k: Linear::new(ch, ch, vb.pp("to_k"))?,
            v: Linear::new(ch, ch, vb.pp("to_v"))?,
            out: Linear::new(ch, ch, vb.pp("to_out").pp("0"))?,
        })
    }
}

impl Module for SpatialAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // tokens [B, HW, C]: no copy when the activation is channels-last
        let t = x
            .apply(&self.norm)?
            .permute((0, 2, 3, 1))?
            .reshape((b, h * w, c))?;
        let q = t.apply(&self.q)?;
        let k = t.apply(&self.k)?;
        let v = t.apply(&self.v)?;
        // softmax in f32 (diffusers' upcast_softmax) whatever the compute dtype
        let opts = ops::AttentionOpts {
            scale: Some(1.0 / (c as f64).sqrt()),
            bias: None,
            mask: None,
            softmax_f32: true,
        };
        let o = ops::attention(&q, &k, &v, &opts)?.apply(&self.out)?;
        // back to [B, C, H, W] as a channels-last view
        let o = o.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        ops::add(x, &o)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    /// The block of `x + pending` ([`ResnetBlock::forward_after_bias`]; a block has at
    /// least one resnet, `Config::validate`), and the downsampler's bias, left for the
    /// next block to add (`None` without a downsampler).
    fn forward_after_bias(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let x = resnets_after_bias(&self.resnets, x, pending)?;
        match &self.downsample {
            // asymmetric zero padding (right and bottom) then a stride-2 conv
            Some(d) => Ok((
                d.forward_unbiased(&ops::zero_pad2d(&x, [0, 1, 0, 1])?)?,
                d.bias().cloned(),
            )),
            None => Ok((x, None)),
        }
    }
}

/// The encoder and, if configured, `quant_conv`: image in [-1, 1] to posterior moments.
#[derive(Debug, Clone)]
pub struct VaeEncoder {
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid_res1: ResnetBlock,
    mid_attn: Option<SpatialAttention>,
    mid_res2: ResnetBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent_channels: usize,
}

impl VaeEncoder {
    /// Builds the encoder from diffusers-named weights (`vb` at the model root).
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let g = cfg.norm_num_groups;
        let venc = vb.pp("encoder");
        let ch0 = cfg.block_out_channels[0];
        let conv_in = conv(cfg.in_channels, ch0, 3, 1, 1, venc.pp("conv_in"))?;
        let mut down = Vec::new();
        let mut cin = ch0;
        let n = cfg.block_out_channels.len();
        for (i, &cout) in cfg.block_out_channels.iter().enumerate() {
            let vbb = venc.pp("down_blocks").pp(i);
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(c, cout, g, vbb.pp("resnets").pp(j))?);
            }
            let downsample = (i + 1 < n)
                .then(|| conv(cout, cout, 3, 2, 0, vbb.pp("downsamplers").pp(0).pp("conv")))
                .transpose()?;
            down.push(DownBlock {
                resnets,
                downsample,
            });
            cin = cout;
        }
        let vm = venc.pp("mid_block");
        let mid_res1 = ResnetBlock::new(cin, cin, g, vm.pp("resnets").pp(0))?;
        let mid_attn = cfg
            .mid_block_add_attention
            .then(|| SpatialAttention::new(cin, g, vm.pp("attentions").pp(0)))
            .transpose()?;
        let mid_res2 = ResnetBlock::new(cin, cin, g, vm.pp("resnets").pp(1))?;
        let norm_out = GroupNorm::new(g, cin, NORM_EPS, venc.pp("conv_norm_out"))?;
        let moments = 2 * cfg.latent_channels;
        let conv_out = conv(cin, moments, 3, 1, 1, venc.pp("conv_out"))?;
        let quant_conv = cfg
            .use_quant_conv
            .then(|| conv(moments, moments, 1, 1, 0, vb.pp("quant_conv")))
            .transpose()?;
        Ok(Self {
            conv_in,
            down,
            mid_res1,
            mid_attn,
            mid_res2,
            norm_out,
            conv_out,
            quant_conv,
            latent_channels: cfg.latent_channels,
        })
    }

    /// Posterior moments `[B, 2C, H/f, W/f]` of images `[B, 3, H, W]` in [-1, 1].
    pub fn moments(&self, x: &Tensor) -> Result<Tensor> {
        // each convolution whose output a ResNet block reads leaves its bias to that
        // block ([`ResnetBlock::forward_after_bias`]): a pass over the activation less
        let mut h = self.conv_in.forward_unbiased(x)?;
        let mut pending = self.conv_in.bias().cloned();
        for d in &self.down {
            (h, pending) = d.forward_after_bias(&h, pending.as_ref())?;
        }
        h = self.mid_res1.forward_after_bias(&h, pending.as_ref())?;
        if let Some(a) = &self.mid_attn {
            h = h.apply(a)?;
        }
        h = h.apply(&self.mid_res2)?;
        h = self.norm_out.forward_silu(&h)?.apply(&self.conv_out)?;
        match &self.quant_conv {
            Some(q) => h.apply(q)?.contiguous(),
            None => h.contiguous(),
        }
    }

    /// Posterior `(mean, std)`, each `[B, C, H/f, W/f]`:
    /// `std = exp(0.5 * clamp(logvar, -30, 20))`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let m = self.moments(x)?;
        let c = self.latent_channels;
        let mean = m.narrow(1, 0, c)?;
        let logvar = m.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean.contiguous()?, std))
    }
}

/// A decoder up block: `layers_per_block + 1` resnets, then (all but the last block)
/// nearest 2x upsampling and a 3x3 convolution.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    /// The block of `x + pending` ([`ResnetBlock::forward_after_bias`]; a block has at
    /// least two resnets), and the upsampler's bias, left for the next block to add
    /// (`None` without an upsampler).
    fn forward_after_bias(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let x = resnets_after_bias(&self.resnets, x, pending)?;
        match &self.upsample {
            Some(conv) => {
                let (_, _, h, w) = x.dims4()?;
                let up = x.upsample_nearest2d(2 * h, 2 * w)?;
                Ok((conv.forward_unbiased(&up)?, conv.bias().cloned()))
            }
            None => Ok((x, None)),
        }
    }
}

/// `post_quant_conv` (if configured) and the decoder: a raw latent to an image.
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_res1: ResnetBlock,
    mid_attn: Option<SpatialAttention>,
    mid_res2: ResnetBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    latent_channels: usize,
    upscale: usize,
}

impl VaeDecoder {
    /// Builds the decoder from diffusers-named weights (`vb` at the model root:
    /// `post_quant_conv.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate_decoder().map_err(candle_core::Error::Msg)?;
        let g = cfg.norm_num_groups;
        let lat = cfg.latent_channels;
        let post_quant_conv = cfg
            .use_post_quant_conv
            .then(|| conv(lat, lat, 1, 1, 0, vb.pp("post_quant_conv")))
            .transpose()?;
        let vd = vb.pp("decoder");
        let widths: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = widths[0];
        let conv_in = conv(lat, top, 3, 1, 1, vd.pp("conv_in"))?;
        let vm = vd.pp("mid_block");
        let mid_res1 = ResnetBlock::new(top, top, g, vm.pp("resnets").pp(0))?;
        let mid_attn = cfg
            .mid_block_add_attention
            .then(|| SpatialAttention::new(top, g, vm.pp("attentions").pp(0)))
            .transpose()?;
        let mid_res2 = ResnetBlock::new(top, top, g, vm.pp("resnets").pp(1))?;
        let mut up = Vec::with_capacity(widths.len());
        let mut cin = top;
        for (i, &cout) in widths.iter().enumerate() {
            let vbb = vd.pp("up_blocks").pp(i);
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    ResnetBlock::new(c, cout, g, vbb.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = (i + 1 < widths.len())
                .then(|| conv(cout, cout, 3, 1, 1, vbb.pp("upsamplers").pp(0).pp("conv")))
                .transpose()?;
            up.push(UpBlock { resnets, upsample });
            cin = cout;
        }
        let norm_out = GroupNorm::new(g, cin, NORM_EPS, vd.pp("conv_norm_out"))?;
        let conv_out = conv(cin, cfg.out_channels, 3, 1, 1, vd.pp("conv_out"))?;
        Ok(Self {
            post_quant_conv,
            conv_in,
            mid_res1,
            mid_attn,
            mid_res2,
            up,
            norm_out,
            conv_out,
            latent_channels: lat,
            upscale: cfg.downscale(),
        })
    }

    /// The spatial upscale factor (8 for SD and Flux).
    pub fn upscale(&self) -> usize {
        self.upscale
    }

    /// Images `[B, out_channels, f*h, f*w]`, unclamped and roughly in [-1, 1], of raw
    /// (unscaled) latents `[B, C, h, w]`: diffusers' `AutoencoderKL.decode(z).sample`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = z.dims4()?;
        if c != self.latent_channels {
            candle_core::bail!(
                "VaeDecoder::decode: latents have {c} channels, the decoder takes {}",
                self.latent_channels
            );
        }
        let mut h = match &self.post_quant_conv {
            Some(p) => z.apply(p)?,
            None => z.clone(),
        };
        // as in the encoder, a bias a ResNet block (or the last norm) can add is left to it
        h = self
            .mid_res1
            .forward_after_bias(&self.conv_in.forward_unbiased(&h)?, self.conv_in.bias())?;
        if let Some(a) = &self.mid_attn {
            h = h.apply(a)?;
        }
        h = h.apply(&self.mid_res2)?;
        let mut pending = None;
        for u in &self.up {
            (h, pending) = u.forward_after_bias(&h, pending.as_ref())?;
        }
        self.norm_out
            .forward_silu_after_bias(&h, pending.as_ref())?
            .apply(&self.conv_out)?
            .contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout the GPU path runs the VAE in, checked on the CPU: a channels-last
    /// image keeps every activation channels-last (the seam's layout-keeping paths:
    /// the NHWC GroupNorm, convolutions, the residual, the padding, the attention's
    /// tokens), and the moments are those of the NCHW run. Widths of 32 and 64 in 8
    /// groups, so that every GroupNorm takes the channels-last kernels' path.
    /// A ResNet block handed a pending bias is the block of the biased input, with
    /// an identity skip and with a 1x1 shortcut (where the bias reaches the output as
    /// `W · bias`), and the bias matters (without it the output differs).
    #[test]
    fn a_pending_bias_gives_the_block_of_the_biased_input() -> Result<()> {
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        let (vb, _) = crate::random::random_var_builder(DType::F32, &dev);
        for (i, (cin, cout)) in [(16, 16), (16, 32)].into_iter().enumerate() {
            let r = ResnetBlock::new(cin, cout, 8, vb.pp(i))?;
            assert_eq!(r.shortcut.is_some(), cin != cout);
            let x = Tensor::randn(0f32, 1.0, (2, cin, 6, 5), &dev)?;
            let b = Tensor::randn(0f32, 1.0, cin, &dev)?;
            let want = r.forward(&x.broadcast_add(&b.reshape((1, cin, 1, 1))?)?)?;
            let got = r.forward_after_bias(&x, Some(&b))?;
            let e = crate::testing::rel_err(&got, &want)?;
            assert!(
                e < 1e-5,
                "{cin} -> {cout}: pending bias vs biased input: {e}"
            );
            let e = crate::testing::rel_err(&r.forward(&x)?, &want)?;
            assert!(
                e > 1e-2,
                "{cin} -> {cout}: the bias changes the output ({e})"
            );
        }
        Ok(())
    }

    #[test]
    fn a_channels_last_image_stays_channels_last_and_encodes_the_same() -> Result<()> {
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        let cfg = Config {
            block_out_channels: vec![32, 64],
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            layers_per_block: 1,
            norm_num_groups: 8,
            ..Config::sd_vae_ft_ema()
        };
        let (vb, _) = crate::random::random_var_builder(DType::F32, &dev);
        let enc = VaeEncoder::new(vb.clone(), &cfg)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 16, 12), &dev)?;
        use crate::testing::{is_strictly_channels_last as is_nhwc, to_channels_last as nhwc};
        let xl = nhwc(&x)?;
        // block by block, as `moments` runs them
        let mut h = enc.conv_in.forward_unbiased(&xl)?;
        assert!(is_nhwc(&h), "conv_in");
        let mut pending = enc.conv_in.bias().cloned();
        for (i, d) in enc.down.iter().enumerate() {
            (h, pending) = d.forward_after_bias(&h, pending.as_ref())?;
            assert!(is_nhwc(&h), "down block {i}");
        }
        h = enc.mid_res1.forward_after_bias(&h, pending.as_ref())?;
        assert!(is_nhwc(&h), "mid resnet");
        h = h.apply(enc.mid_attn.as_ref().expect("configured"))?;
        assert!(is_nhwc(&h), "mid attention");
        let want = enc.moments(&x)?;
        let got = enc.moments(&xl)?;
        assert!(got.is_contiguous(), "the moments come out NCHW");
        let e = crate::testing::rel_err(&got, &want)?;
        assert!(e < 1e-5, "channels-last vs NCHW moments: {e}");
        // the decoder the same way
        let dec = VaeDecoder::new(vb, &cfg)?;
        let z = Tensor::randn(0f32, 1.0, (1, 4, 4, 3), &dev)?;
        let e = crate::testing::rel_err(&dec.decode(&nhwc(&z)?)?, &dec.decode(&z)?)?;
        assert!(e < 1e-5, "channels-last vs NCHW decode: {e}");
        Ok(())
    }

    #[test]
    fn ldm_names_map_every_encoder_part() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
                "encoder.down.1.block.0.nin_shortcut.bias",
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.weight",
                "encoder.down.0.downsample.conv.weight",
            ),
            (
                "encoder.mid_block.resnets.1.norm2.weight",
                "encoder.mid.block_2.norm2.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.bias",
                "encoder.mid.attn_1.norm.bias",
            ),
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            ("quant_conv.weight", "quant_conv.weight"),
        ];
        for (d, l) in cases {
            assert_eq!(ldm_names(d).as_deref(), Some(l), "{d}");
        }
        assert_eq!(
            legacy_attention_name("encoder.mid_block.attentions.0.to_out.0.bias").as_deref(),
            Some("encoder.mid_block.attentions.0.proj_attn.bias")
        );
        assert_eq!(
            legacy_attention_name("encoder.mid_block.attentions.0.to_k.weight").as_deref(),
            Some("encoder.mid_block.attentions.0.key.weight")
        );
        assert_eq!(legacy_attention_name("encoder.conv_in.weight"), None);
    }

    #[test]
    fn ldm_names_of_the_decoder_reverse_its_up_blocks() {
        let cfg = Config::flux();
        let cases = [
            ("decoder.conv_in.weight", "decoder.conv_in.weight"),
            (
                "decoder.mid_block.resnets.0.conv1.weight",
                "decoder.mid.block_1.conv1.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_v.bias",
                "decoder.mid.attn_1.v.bias",
            ),
            (
                "decoder.up_blocks.0.resnets.2.norm1.weight",
                "decoder.up.3.block.2.norm1.weight",
            ),
            (
                "decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
                "decoder.up.1.block.0.nin_shortcut.weight",
            ),
            (
                "decoder.up_blocks.1.upsamplers.0.conv.bias",
                "decoder.up.2.upsample.conv.bias",
            ),
            ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
            ("decoder.conv_out.weight", "decoder.conv_out.weight"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
                "encoder.down.1.block.0.nin_shortcut.bias",
            ),
        ];
        for (d, l) in cases {
            assert_eq!(cfg.ldm_name(d).as_deref(), Some(l), "{d}");
        }
        // the up-block index needs the block count
        assert_eq!(
            ldm_names("decoder.up_blocks.0.resnets.0.conv1.weight"),
            None
        );
        assert_eq!(
            cfg.ldm_name("decoder.up_blocks.4.resnets.0.conv1.weight"),
            None
        );
        assert_eq!(
            legacy_attention_name("decoder.mid_block.attentions.0.to_q.weight").as_deref(),
            Some("decoder.mid_block.attentions.0.query.weight")
        );
        let map = weight_names(&cfg, true);
        assert_eq!(
            map("decoder.up_blocks.3.resnets.1.conv2.weight"),
            vec!["decoder.up.0.block.1.conv2.weight".to_string()]
        );
        assert!(is_ldm_layout(
            ["decoder.up.0.block.0.conv1.weight"].into_iter()
        ));
        assert!(!is_ldm_layout(
            ["decoder.up_blocks.0.resnets.0.conv1.weight"].into_iter()
        ));
    }

    #[test]
    fn decoder_config_checks() {
        let mut c = Config::sd_vae_ft_ema();
        assert!(c.validate_decoder().is_ok());
        c.up_block_types.pop();
        assert!(c.validate_decoder().unwrap_err().contains("up_block_types"));
        // the encoder does not look at the decoder's fields
        assert!(c.validate().is_ok());
        c = Config::sd_vae_ft_ema();
        c.up_block_types[0] = "AttnUpDecoderBlock2D".into();
        assert!(
            c.validate_decoder()
                .unwrap_err()
                .contains("AttnUpDecoderBlock2D")
        );
    }

    #[test]
    fn configs_parse_and_validate() {
        let sd: Config = serde_json::from_str(
            r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
                "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
                "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                "out_channels": 3, "sample_size": 256,
                "up_block_types": ["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"]}"#,
        )
        .unwrap();
        assert_eq!(
            Config {
                scaling_factor: Some(0.18215),
                ..sd.clone()
            },
            Config::sd_vae_ft_ema()
        );
        assert_eq!(sd.downscale(), 8);
        let mut bad = sd.clone();
        bad.norm_num_groups = 48;
        assert!(bad.validate().unwrap_err().contains("norm_num_groups"));
        bad = sd;
        bad.down_block_types[2] = "AttnDownEncoderBlock2D".into();
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("AttnDownEncoderBlock2D")
        );
    }
}
