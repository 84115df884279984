//! The layers model files are built from: weights fetched through a `VarBuilder`
//! (checked against the weight files, or made trainable, see [`crate::loader`]) and a
//! `forward` that calls the [`crate::ops`] seam. Fresh weights (`Init` hints) follow
//! PyTorch's defaults: linear and convolution `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`,
//! norm scales 1 and shifts 0.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Init, VarBuilder};

use crate::ops;

/// PyTorch's default init for a weight or bias whose layer has `fan_in` inputs.
fn torch_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `y = x · wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` `[out, in]` and `bias` `[out]` under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", torch_uniform(in_dim))?,
            bias: Some(vb.get_with_hints(out_dim, "bias", torch_uniform(in_dim))?),
        })
    }

    /// Without a bias.
    pub fn no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", torch_uniform(in_dim))?,
            bias: None,
        })
    }

    /// Several layers of one input as one: the layers under `vb.pp(name)` for each of
    /// `names` (each read, checked and named as its own tensors), their weights
    /// and biases stacked along the output axis, so one product computes all their
    /// outputs side by side (`[.., names.len()·out_dim]`). For frozen models: the
    /// stacked copy is not a variable.
    pub fn stacked(
        vb: &VarBuilder,
        names: &[&str],
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let layers = names
            .iter()
            .map(|n| {
                if bias {
                    Self::new(in_dim, out_dim, vb.pp(*n))
                } else {
                    Self::no_bias(in_dim, out_dim, vb.pp(*n))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = layers.iter().map(|l| l.bias.as_ref()).collect();
        Ok(Self {
            weight: Tensor::cat(&weights, 0)?,
            bias: biases.map(|b| Tensor::cat(&b, 0)).transpose()?,
        })
    }

    /// From tensors already at hand.
    #[must_use]
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight `[out, in]`.
    #[must_use]
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    #[must_use]
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// A 2-D convolution with optional bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

impl Conv2d {
    /// `weight` `[out, in/groups, k, k]` and `bias` `[out]` under `vb`.
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut c = Self::no_bias(in_ch, out_ch, kernel, cfg, vb.clone())?;
        let fan_in = in_ch / cfg.groups.max(1) * kernel * kernel;
        c.bias = Some(vb.get_with_hints(out_ch, "bias", torch_uniform(fan_in))?);
        Ok(c)
    }

    /// Without a bias.
    pub fn no_bias(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let groups = cfg.groups.max(1);
        let fan_in = in_ch / groups * kernel * kernel;
        let weight = vb.get_with_hints(
            (out_ch, in_ch / groups, kernel, kernel),
            "weight",
            torch_uniform(fan_in),
        )?;
        Ok(Self {
            weight,
            bias: None,
            cfg,
        })
    }

    /// The kernel.
    #[must_use]
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    #[must_use]
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The convolution without its bias, for a consumer that adds the bias itself
    /// ([`GroupNorm::forward_silu_after_bias`]).
    pub fn forward_unbiased(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(x, &self.weight, None, &self.cfg)
    }

    /// `forward(x) + residual` (a skip connection), in one pass on the GPU
    /// ([`ops::conv2d_add`]).
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_add_with_bias(x, self.bias.as_ref(), residual)
    }

    /// [`Self::forward_add`] with `bias` `[out]` in place of the layer's own: a bias
    /// the caller folded (its own plus those that reach the output through
    /// `residual`); `None` adds none.
    pub fn forward_add_with_bias(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        ops::conv2d_add(x, &self.weight, bias, residual, &self.cfg)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(x, &self.weight, self.bias.as_ref(), &self.cfg)
    }
}

/// LayerNorm over the last axis, affine or not.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// `weight` and `bias` `[dim]` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: Some(vb.get_with_hints(dim, "weight", Init::Const(1.0))?),
            bias: Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?),
            eps,
        })
    }

    /// Without affine parameters (`elementwise_affine=False`).
    #[must_use]
    pub fn plain(eps: f64) -> Self {
        Self {
            weight: None,
            bias: None,
            eps,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

/// GroupNorm with per-channel affine parameters.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `weight` and `bias` `[channels]` under `vb`.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {channels} channels in {groups} groups");
        }
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            groups,
            eps,
        })
    }

    /// Normalises, then SiLU (one kernel where a fast path exists).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, true)
    }

    /// [`Self::forward_silu`] of `x + in_bias` (per channel): the bias of the
    /// convolution before it ([`Conv2d::forward_unbiased`]), added as the norm reads
    /// `x` ([`ops::group_norm_after_bias`]); `None` adds nothing.
    pub fn forward_silu_after_bias(&self, x: &Tensor, in_bias: Option<&Tensor>) -> Result<Tensor> {
        ops::group_norm_after_bias(
            x,
            in_bias,
            self.groups,
            &self.weight,
            &self.bias,
            self.eps,
            true,
        )
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, false)
    }
}

/// T5's RMS norm (no bias, no mean subtraction, f32 statistics).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `weight` `[dim]` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}
