//! The pre-norm transformer encoder layer that CLIP (text and vision) and SigLIP share:
//! `x + attn(ln1(x))`, then `x + fc2(act(fc1(ln2(x))))`, with transformers' weight
//! names (`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc{1,2}`).
//! The models differ only in where the attention scale goes and in which precision the
//! softmax runs, both kept exactly as each reference computes them.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::activation::Activation;
use crate::layers::{LayerNorm, Linear};
use crate::ops;

/// Where the `1/sqrt(head_dim)` scale is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaling {
    /// To the queries before the logits (transformers' CLIP).
    Query,
    /// To the logits (transformers' SigLIP).
    Logits,
}

/// The shape of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerConfig {
    /// Token width.
    pub dim: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Attention heads.
    pub heads: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// MLP activation.
    pub act: Activation,
    /// Where the attention scale goes.
    pub scaling: Scaling,
    /// Logits and softmax in f32 whatever the dtype.
    pub softmax_f32: bool,
}

/// Multi-head self-attention (`q_proj`, `k_proj`, `v_proj`, `out_proj`), q, k and v
/// as one product (the encoders never train: [`Linear::stacked`] at load) and one
/// head-major copy.
#[derive(Debug, Clone)]
struct SelfAttention {
    qkv: Linear,
    out: Linear,
    cfg: LayerConfig,
}

impl SelfAttention {
    fn new(cfg: &LayerConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            qkv: Linear::stacked(&vb, &["q_proj", "k_proj", "v_proj"], d, d, true)?,
            out: Linear::new(d, d, vb.pp("out_proj"))?,
            cfg: *cfg,
        })
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let head_dim = d / self.cfg.heads;
        // [B, T, 3·D] -> [3, B, H, T, hd]: q, k, v are its contiguous thirds
        let qkv = x
            .apply(&self.qkv)?
            .reshape((b, t, 3, self.cfg.heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let s = (head_dim as f64).powf(-0.5);
        let q = match self.cfg.scaling {
            Scaling::Query => (qkv.get(0)? * s)?,
            Scaling::Logits => qkv.get(0)?,
        };
        let (k, v) = (qkv.get(1)?, qkv.get(2)?);
        let opts = ops::AttentionOpts {
            scale: (self.cfg.scaling == Scaling::Logits).then_some(s),
            bias,
            mask: None,
            softmax_f32: self.cfg.softmax_f32,
        };
        ops::attention(&q, &k, &v, &opts)?
            .transpose(1, 2)?
            .reshape((b, t, d))?
            .apply(&self.out)
    }
}

/// One pre-norm encoder layer.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    norm1: LayerNorm,
    attn: SelfAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    /// The layer under `vb` (`encoder.layers.N`).
    pub fn new(cfg: &LayerConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            norm1: LayerNorm::new(d, cfg.eps, vb.pp("layer_norm1"))?,
            attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            norm2: LayerNorm::new(d, cfg.eps, vb.pp("layer_norm2"))?,
            fc1: Linear::new(d, cfg.intermediate, vb.pp("mlp.fc1"))?,
            fc2: Linear::new(cfg.intermediate, d, vb.pp("mlp.fc2"))?,
            act: cfg.act,
        })
    }

    /// The layer on `x` `[B, T, D]`; `bias` (e.g. a causal mask) is added to the logits.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&x.apply(&self.norm1)?, bias)?)?;
        let h = self.act.forward(&x.apply(&self.norm2)?.apply(&self.fc1)?)?;
        &x + h.apply(&self.fc2)?
    }
}
