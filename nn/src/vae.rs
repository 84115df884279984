//! The encoder half of a KL autoencoder (AutoencoderKL): SD's VAE (sd-vae-ft-ema, used
//! by PixArt-α) and the Flux autoencoder, returning the posterior's mean and std.
//!
//! - Paper: [High-Resolution Image Synthesis with Latent Diffusion Models](https://arxiv.org/abs/2112.10752)
//! - Reference code: diffusers `AutoencoderKL` / `Encoder` / `DiagonalGaussianDistribution`
//!   (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py>),
//!   BFL's Flux autoencoder (<https://github.com/black-forest-labs/flux/blob/main/src/flux/modules/autoencoder.py>).
//!
//! Weight names are diffusers' (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...).
//! Checkpoints in the original LDM / BFL layout (`ae.safetensors`: `encoder.down.0.block.0`,
//! `encoder.mid.attn_1.q` as 1x1 convolutions, ...) load through [`ldm_names`], and
//! [`Config::from_ldm_shapes`] recovers the architecture of such a file, which ships
//! without a `config.json`. Posterior: `mean, logvar = chunk(moments, 2)`,
//! `std = exp(0.5 * clamp(logvar, -30, 20))`, as diffusers computes it.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::layers::{Conv2d, GroupNorm, Linear};
use crate::ops;
use serde::Deserialize;

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
const fn default_true() -> bool {
    true
}

/// diffusers' `AutoencoderKL` config (`config.json` of a VAE directory). Only the
/// encoder's fields are read; the decoder's and the bookkeeping keys are ignored
/// (upstream configs gain keys across diffusers versions). Defaults are diffusers'.
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
        }
    }

    /// The Flux autoencoder (FLUX.1-dev / schnell `vae/`, BFL `ae.safetensors`).
    pub fn flux() -> Self {
        Self {
            latent_channels: 16,
            use_quant_conv: false,
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

    /// Spatial downscale factor (8 for SD and Flux).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The architecture of an LDM / BFL-layout checkpoint (no `config.json`), from the
    /// stored shapes: `shape_of` returns a stored tensor's shape by its LDM name.
    /// Norm groups are 32, as in BFL's and LDM's code. `None` if the file is not an LDM
    /// autoencoder encoder.
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
        Some(Self {
            in_channels: *conv_in.get(1)?,
            down_block_types: vec!["DownEncoderBlock2D".into(); block_out_channels.len()],
            block_out_channels,
            layers_per_block,
            latent_channels: conv_out[0] / 2,
            norm_num_groups: 32,
            act_fn: "silu".into(),
            use_quant_conv: shape_of("quant_conv.weight").is_some(),
            mid_block_add_attention: shape_of("encoder.mid.attn_1.q.weight").is_some(),
            scaling_factor: None,
            shift_factor: None,
        })
    }
}

/// The LDM / BFL names of a diffusers AutoencoderKL encoder tensor (`None` for names
/// that have no counterpart).
pub fn ldm_names(diffusers: &str) -> Option<String> {
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
    if let Some(rest) = diffusers.strip_prefix("encoder.mid_block.resnets.") {
        let (i, rest) = rest.split_once('.')?;
        let n = i.parse::<usize>().ok()? + 1;
        let rest = rest.replace("conv_shortcut", "nin_shortcut");
        return Some(format!("encoder.mid.block_{n}.{rest}"));
    }
    if let Some(rest) = diffusers.strip_prefix("encoder.mid_block.attentions.0.") {
        let (module, param) = rest.rsplit_once('.')?;
        let m = match module {
            "group_norm" => "norm",
            "to_q" => "q",
            "to_k" => "k",
            "to_v" => "v",
            "to_out.0" => "proj_out",
            _ => return None,
        };
        return Some(format!("encoder.mid.attn_1.{m}.{param}"));
    }
    if let Some(rest) = diffusers.strip_prefix("encoder.conv_norm_out.") {
        return Some(format!("encoder.norm_out.{rest}"));
    }
    Some(diffusers.to_string())
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

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?.apply(&self.conv1)?;
        let h = self.norm2.forward_silu(&h)?.apply(&self.conv2)?;
        match &self.shortcut {
            Some(s) => x.apply(s)? + h,
            None => x + h,
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
        let t = x
            .apply(&self.norm)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = t.apply(&self.q)?;
        let k = t.apply(&self.k)?;
        let v = t.apply(&self.v)?;
        // softmax in f32 (diffusers' upcast_softmax) whatever the compute dtype
        let opts = ops::AttentionOpts {
            scale: Some(1.0 / (c as f64).sqrt()),
            bias: None,
            softmax_f32: true,
        };
        let o = ops::attention(&q, &k, &v, &opts)?.apply(&self.out)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + o
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl Module for DownBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = x.apply(r)?;
        }
        if let Some(d) = &self.downsample {
            // asymmetric zero padding (right and bottom) then a stride-2 conv
            x = x
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            x = x.apply(d)?;
        }
        Ok(x)
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
        let mut h = x.apply(&self.conv_in)?;
        for d in &self.down {
            h = h.apply(d)?;
        }
        h = h.apply(&self.mid_res1)?;
        if let Some(a) = &self.mid_attn {
            h = h.apply(a)?;
        }
        h = h.apply(&self.mid_res2)?;
        h = self.norm_out.forward_silu(&h)?.apply(&self.conv_out)?;
        match &self.quant_conv {
            Some(q) => h.apply(q),
            None => Ok(h),
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

#[cfg(test)]
mod tests {
    use super::*;

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
