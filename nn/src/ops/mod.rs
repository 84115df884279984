//! The ops seam: the operations that get GPU fast paths, behind one set of functions
//! that every model file calls.
//!
//! | op | what | gradient path |
//! |---|---|---|
//! | [`linear`] | `x · wᵀ + b` | a constant `w` gives only the input gradient ([`frozen`]); on CUDA in bf16 without a gradient one cuBLASLt call, the bias in its epilogue ([`bias_linear`](mod@bias_linear)) |
//! | [`conv2d`] | 2-D convolution + bias | candle's; on CUDA without a gradient cuDNN channels-last, the algorithm found once per shape ([`cudnn_conv`]) |
//! | [`conv2d_add`] | 2-D convolution + bias + a residual | composite; on CUDA without a gradient the residual accumulated by cuDNN (`beta = 1`) |
//! | [`add`], [`zero_pad2d`] | residual add, zero padding | candle's; a channels-last (first) operand keeps its layout |
//! | [`layer_norm`] | LayerNorm, affine optional | composite (candle's fused op has no backward) |
//! | [`rms_norm`] | T5's RMS norm (f32 variance) | composite; on CUDA without a gradient candle's fused kernel |
//! | [`rms_norm_upcast`] | `torch.nn.RMSNorm` (all in f32, weight before the cast back) | composite |
//! | [`group_norm()`], [`group_norm_after_bias`] | GroupNorm (of `x + bias` per channel), optional SiLU after | composite; on CUDA without a gradient one kernel ([`group_norm`](mod@group_norm)), channels-last two that add the bias as they read |
//! | [`softmax_last_dim`] | softmax over the last axis | composite (the fused op has no backward) |
//! | [`attention`] | `softmax(q kᵀ · s + bias + mask) v` | composite; on CUDA without a gradient the softmax (scale, biases, f32, cast back) as one kernel ([`softmax`](mod@softmax)) |
//! | [`gated_gelu_tanh`] | T5's `gelu_tanh(a) · g` on the stacked `[a, g]` | composite; on CUDA without a gradient one kernel |
//! | [`modulate`] | adaLN: `x · (1 + scale) + shift` | candle's |
//! | [`flops::count`] | FLOPs performed by `linear`, `conv2d` and `attention` (benchmarks) | - |
//! | [`transfer`] | uploads through pinned memory; fences and device-time spans across threads | - |
//! | [`stochastic_round_bf16`] | f32 to bf16, rounding up with the remainder's probability (bf16 master weights) | none (an optimizer op) |
//!
//! Each function has a plain candle implementation that is the reference: the CPU
//! path, and the path whenever a gradient is needed. candle's fused kernels
//! (`candle_nn::ops::{softmax_last_dim, layer_norm, rms_norm}`) are used only when no
//! input needs a gradient ([`needs_grad`]): they record no backward at all, so on a
//! trainable path they would silently cut the gradient. CUDA fast paths (cuDNN
//! convolutions, fused norms and attention) plug in here, behind `cfg(feature =
//! "cuda")` and a device check, in one module that alone may use `unsafe`
//! (`docs/architecture.md`); model files never change for them.
//!
//! **Channels-last.** A channels-last tensor is an NCHW tensor whose memory is NHWC
//! (strides `[H·W·C, 1, W·C, C]`: [`channels_last`]). Without a gradient, [`conv2d`],
//! [`conv2d_add`], [`group_norm()`], [`add`] and [`zero_pad2d`] give a channels-last
//! result for a channels-last input, on every device, and the cuDNN convolution makes
//! one from any input: so a VAE's activations stay NHWC from its first convolution to
//! its last, where the NCHW kernels would transpose around every convolution. The
//! model code does not see it (shapes are NCHW either way); ops that want another
//! layout copy, as candle does for any strided tensor.
//!
//! Parameters may be f32 master weights while activations are bf16: every op casts
//! its weights to the input's dtype (a no-op when they agree), so the cast is part of
//! the graph and the gradient reaches the f32 variable.

pub mod bias_linear;
pub mod cudnn_conv;
pub mod flash;
pub mod flops;
pub mod frozen;
mod gated;
pub mod group_norm;
pub mod rounding;
mod softmax;
pub mod transfer;

pub use rounding::stochastic_round_bf16;

use candle_core::{D, DType, Result, Tensor};

/// The element access every kernel of the seam shares: `tb_load` reads f32 or bf16
/// (as its bits, an unsigned short) into f32, `tb_store` rounds f32 to nearest even
/// into either (NaN kept a quiet NaN), as candle's casts do. Prepended to each
/// kernel's source ([`kernel_source`]).
const BF16_IO: &str = r#"
__device__ __forceinline__ float tb_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float tb_load(const unsigned short* p, long long i) {
  return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void tb_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void tb_store(unsigned short* p, long long i, float v) {
  unsigned int bits = __float_as_uint(v);
  if (isnan(v)) { p[i] = (unsigned short)((bits >> 16) | 0x40u); return; }
  unsigned int lsb = (bits >> 16) & 1u;
  p[i] = (unsigned short)((bits + 0x7FFFu + lsb) >> 16);
}
"#;

/// The whole CUDA source of a seam kernel: the shared element access, then `kernel`
/// (also what the CPU run of a kernel's source compiles, `flash_emu.cpp`).
#[must_use]
pub fn kernel_source(kernel: &str) -> String {
    [BF16_IO, kernel].concat()
}

/// The PTX of an NVRTC kernel `source` (module `module`, named in the error; the
/// shared element access prepended), compiled once per process: `cache` keeps it, or
/// the compiler's error.
#[cfg(feature = "cuda")]
pub(crate) fn nvrtc_ptx(
    cache: &'static std::sync::OnceLock<std::result::Result<String, String>>,
    source: &str,
    module: &str,
) -> Result<&'static str> {
    cache
        .get_or_init(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(kernel_source(source))
                .map(|p| p.to_src())
                .map_err(|e| e.to_string())
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("kernel {module}: {e}")))
}

/// The f32 values of a contiguous f32 or bf16 CPU tensor (the kernels'
/// transcriptions read their inputs so); errors name `what` (`"gated gelu: the
/// input"`).
pub(crate) fn cpu_f32s(
    s: &candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> Result<Vec<f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} is not contiguous")
    };
    Ok(match s {
        candle_core::CpuStorage::F32(v) => v[a..b].to_vec(),
        candle_core::CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!(
            "{what} is {:?} (f32 or bf16)",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    })
}

/// `y` as CPU storage of `dtype` (bf16 rounded to nearest even, as the kernels
/// store; else f32).
pub(crate) fn cpu_storage(y: Vec<f32>, dtype: DType) -> candle_core::CpuStorage {
    match dtype {
        DType::BF16 => {
            candle_core::CpuStorage::BF16(y.into_iter().map(half::bf16::from_f32).collect())
        }
        _ => candle_core::CpuStorage::F32(y),
    }
}

/// The shapes a library fast path (cuDNN, cuBLASLt) refused, by key: they go to
/// candle's path from then on, the refusal logged once.
#[cfg(feature = "cuda")]
pub(crate) struct Refusals(std::sync::Mutex<Option<std::collections::HashSet<String>>>);

#[cfg(feature = "cuda")]
impl Refusals {
    pub(crate) const fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    fn set(&self) -> std::sync::MutexGuard<'_, Option<std::collections::HashSet<String>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `key` was refused before.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.set().as_ref().is_some_and(|s| s.contains(key))
    }

    /// Remembers `key`, warning once that `what` refused it (`why`) and `fallback`
    /// takes it.
    pub(crate) fn refuse(
        &self,
        key: String,
        what: &str,
        why: &dyn std::fmt::Display,
        fallback: &str,
    ) {
        tracing::warn!("{what} refused {key} ({why}); {fallback} takes this shape");
        self.set().get_or_insert_with(Default::default).insert(key);
    }
}

/// Whether any of `xs` is a variable or depends on one, i.e. whether an op on them
/// must record its backward.
#[must_use]
pub fn needs_grad(xs: &[&Tensor]) -> bool {
    xs.iter().any(|t| t.track_op())
}

/// `t` in the dtype of `like` (a clone when they agree).
fn cast_like(t: &Tensor, like: &Tensor) -> Result<Tensor> {
    t.to_dtype(like.dtype())
}

/// `x · wᵀ + b` for `x` `[..., k]`, `w` `[n, k]`, `b` `[n]`.
///
/// A constant (frozen) `w` on a gradient path goes through [`frozen::frozen_matmul`],
/// which computes the input gradient only; a variable `w` through candle's matmul
/// (both gradients). With no gradient needed this is `candle_nn::Linear`, except on
/// CUDA in bf16 with a bias: one cuBLASLt call ([`bias_linear`](mod@bias_linear)).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let w = cast_like(w, x)?;
    let (n, k) = w.dims2()?;
    flops::add(flops::matmul(x.elem_count() / k.max(1), n, k));
    if let Some(b) = b
        && x.device().is_cuda()
        && x.dtype() == DType::BF16
        && bias_linear::enabled()
        && !needs_grad(&[x, &w, b])
        && let Some(y) = bias_linear::try_linear(x, &w, b)?
    {
        return Ok(y);
    }
    let y = if x.track_op() && !w.track_op() {
        let dims = x.dims();
        let k = *dims.last().unwrap_or(&0);
        let m = x.elem_count() / k.max(1);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.dim(0)?;
        }
        frozen::frozen_matmul(&x.reshape((m, k))?, &w)?.reshape(out_dims)?
    } else {
        let wt = match *x.dims() {
            [b1, b2, _, _] => w.broadcast_left((b1, b2))?.t()?,
            [bsize, _, _] => w.broadcast_left(bsize)?.t()?,
            _ => w.t()?,
        };
        x.matmul(&wt)?
    };
    match b {
        None => Ok(y),
        Some(b) => y.broadcast_add(&cast_like(b, &y)?),
    }
}

/// The NHWC tensor `[B, H, W, C]` whose memory a rank-4 `x` `[B, C, H, W]` is, when
/// `x` is channels-last (its NHWC permutation contiguous); `None` otherwise. A
/// contiguous NCHW tensor with one channel or one pixel is both.
#[must_use]
pub fn channels_last(x: &Tensor) -> Option<Tensor> {
    if x.rank() != 4 {
        return None;
    }
    let t = x.permute((0, 2, 3, 1)).ok()?;
    t.is_contiguous().then_some(t)
}

/// [`channels_last`] for an `x` that is not also contiguous NCHW: the case where the
/// layout-keeping paths differ from candle's.
fn nhwc_memory(x: &Tensor) -> Option<Tensor> {
    if x.is_contiguous() {
        return None;
    }
    channels_last(x)
}

/// The NCHW view `[B, C, H, W]` of an NHWC tensor `[B, H, W, C]` (no copy).
fn nchw_view(nhwc: &Tensor) -> Result<Tensor> {
    nhwc.permute((0, 3, 1, 2))
}

/// `a + b` of equal shapes, in `a`'s layout: channels-last when `a` is (candle's add
/// writes NCHW whatever its inputs).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match nhwc_memory(a) {
        Some(an) => nchw_view(&(an + b.permute((0, 2, 3, 1))?)?),
        None => a + b,
    }
}

/// Zero padding of `x` `[B, C, H, W]`: `[top, bottom, left, right]` rows and
/// columns; a channels-last `x` gives a channels-last result.
pub fn zero_pad2d(x: &Tensor, [top, bottom, left, right]: [usize; 4]) -> Result<Tensor> {
    if let Some(t) = nhwc_memory(x) {
        let t = t
            .pad_with_zeros(1, top, bottom)?
            .pad_with_zeros(2, left, right)?;
        return nchw_view(&t);
    }
    x.pad_with_zeros(D::Minus2, top, bottom)?
        .pad_with_zeros(D::Minus1, left, right)
}

/// 2-D convolution of `x` `[B, C, H, W]` with `w` `[O, C/groups, kh, kw]`, plus `b` `[O]`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    cfg: &candle_nn::Conv2dConfig,
) -> Result<Tensor> {
    let w = cast_like(w, x)?;
    let y = convolve(x, &w, cfg)?;
    match b {
        None => Ok(y),
        Some(b) => add_channel_bias(&y, &cast_like(b, &y)?),
    }
}

/// `conv2d(x, w, b) + residual`, `residual` of the output's shape (a ResNet block's
/// second convolution and its skip connection). On CUDA without a gradient cuDNN
/// adds the convolution onto `residual + b` in place of a separate residual add
/// (one pass over the output fewer, the sum rounded once); else the composite.
pub fn conv2d_add(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: &Tensor,
    cfg: &candle_nn::Conv2dConfig,
) -> Result<Tensor> {
    let w = cast_like(w, x)?;
    if let Some(y) = fast_conv2d_add(x, &w, b, residual, cfg)? {
        count_conv_flops(&y, &w)?;
        return Ok(y);
    }
    add(&conv2d(x, &w, b, cfg)?, residual)
}

/// `y + b` with `b` `[C]` per channel of `y` `[B, C, H, W]`, written in `y`'s layout
/// when it is channels-last (candle's broadcast add would write NCHW).
fn add_channel_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = b.dims1()?;
    match nhwc_memory(y) {
        Some(t) => nchw_view(&t.broadcast_add(&b.reshape((1, 1, 1, n))?)?),
        None => y.broadcast_add(&b.reshape((1, n, 1, 1))?),
    }
}

/// The convolution of [`conv2d`] without its bias, its FLOPs counted: cuDNN
/// channels-last on CUDA ([`fast_conv2d`]); without a gradient a channels-last input
/// keeps its layout on the CPU too ([`cudnn_conv::conv2d_nhwc`]'s CPU reference);
/// else candle's.
fn convolve(x: &Tensor, w: &Tensor, cfg: &candle_nn::Conv2dConfig) -> Result<Tensor> {
    let y = if let Some(y) = fast_conv2d(x, w, cfg)? {
        y
    } else if let Some(xn) = layout_keeping(x, w, cfg) {
        let wn = w.permute((0, 2, 3, 1))?;
        nchw_view(&cudnn_conv::conv2d_nhwc(
            &xn,
            &wn,
            cudnn_conv::geometry(cfg),
        )?)?
    } else {
        x.conv2d_with_algo(
            w,
            cfg.padding,
            cfg.stride,
            cfg.dilation,
            cfg.groups,
            cfg.cudnn_fwd_algo,
        )?
    };
    count_conv_flops(&y, w)?;
    Ok(y)
}

/// Counts the FLOPs of a convolution by `w` that gave `y`: each output value takes
/// `C/groups · kh · kw` multiply-adds.
fn count_conv_flops(y: &Tensor, w: &Tensor) -> Result<()> {
    let (_, c_per_group, kh, kw) = w.dims4()?;
    flops::add(flops::matmul(y.elem_count(), c_per_group * kh, kw));
    Ok(())
}

/// The NHWC input when [`convolve`] keeps a channels-last `x` channels-last itself
/// (not on CUDA, whose fast path decides): no gradient, no groups, no forced algorithm.
fn layout_keeping(x: &Tensor, w: &Tensor, cfg: &candle_nn::Conv2dConfig) -> Option<Tensor> {
    if x.device().is_cuda()
        || cfg.groups != 1
        || cfg.cudnn_fwd_algo.is_some()
        || needs_grad(&[x, w])
    {
        return None;
    }
    nhwc_memory(x)
}

/// Whether a convolution may take the cuDNN path: on CUDA, no gradient, no groups,
/// no forced algorithm, not switched off.
#[cfg(feature = "cudnn")]
fn cudnn_eligible(x: &Tensor, w: &Tensor, cfg: &candle_nn::Conv2dConfig) -> bool {
    x.device().is_cuda()
        && cfg.groups == 1
        && cfg.cudnn_fwd_algo.is_none()
        && !needs_grad(&[x, w])
        && cudnn_conv::enabled()
}

/// The CUDA fast path of [`conv2d`]: cuDNN channels-last ([`cudnn_conv`]) when
/// [`cudnn_eligible`]; `None` for candle's convolution.
#[cfg(feature = "cudnn")]
fn fast_conv2d(x: &Tensor, w: &Tensor, cfg: &candle_nn::Conv2dConfig) -> Result<Option<Tensor>> {
    if cudnn_eligible(x, w, cfg) {
        return cudnn_conv::try_conv2d(x, w, cudnn_conv::geometry(cfg));
    }
    Ok(None)
}

/// The CUDA fast path of [`conv2d_add`]: `residual + b` made NHWC, the convolution
/// accumulated onto it by cuDNN; `None` for the composite.
#[cfg(feature = "cudnn")]
fn fast_conv2d_add(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: &Tensor,
    cfg: &candle_nn::Conv2dConfig,
) -> Result<Option<Tensor>> {
    if !cudnn_eligible(x, w, cfg) || needs_grad(&[residual]) || residual.dtype() != x.dtype() {
        return Ok(None);
    }
    let r = residual.permute((0, 2, 3, 1))?;
    // a fresh NHWC buffer the convolution may write into: the bias added on the way
    let acc = match b {
        Some(b) => r.broadcast_add(&cast_like(b, x)?.reshape((1, 1, 1, b.dims1()?))?)?,
        None if r.is_contiguous() => r.copy()?,
        None => r.contiguous()?,
    };
    cudnn_conv::try_conv2d_onto(x, w, cudnn_conv::geometry(cfg), &acc)
}

#[cfg(not(feature = "cudnn"))]
#[allow(clippy::unnecessary_wraps)]
fn fast_conv2d(_: &Tensor, _: &Tensor, _: &candle_nn::Conv2dConfig) -> Result<Option<Tensor>> {
    Ok(None)
}

#[cfg(not(feature = "cudnn"))]
#[allow(clippy::unnecessary_wraps)]
fn fast_conv2d_add(
    _: &Tensor,
    _: &Tensor,
    _: Option<&Tensor>,
    _: &Tensor,
    _: &candle_nn::Conv2dConfig,
) -> Result<Option<Tensor>> {
    Ok(None)
}

/// The dtype norms take their statistics in: f32 for half types, else the input's.
fn internal_dtype(d: DType) -> DType {
    match d {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Normalises over the last axis with statistics in f32 for half types.
fn layer_norm_composite(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x_dtype = x.dtype();
    let internal = internal_dtype(x_dtype);
    let hidden = x.dim(D::Minus1)?;
    let x = x.to_dtype(internal)?;
    let mean = (x.sum_keepdim(D::Minus1)? / hidden as f64)?;
    let x = x.broadcast_sub(&mean)?;
    let var = (x.sqr()?.sum_keepdim(D::Minus1)? / hidden as f64)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(x_dtype)
}

/// LayerNorm over the last axis, `weight` and `bias` optional (PixArt's blocks have
/// none). The fused kernel when nothing needs a gradient and both are present; the
/// composite (candle's `LayerNorm` slow path) otherwise.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    if let (Some(w), Some(b)) = (weight, bias)
        && x.is_contiguous()
        && x.dtype() != DType::F64
        && !needs_grad(&[x, w, b])
    {
        return candle_nn::ops::layer_norm(x, &cast_like(w, x)?, &cast_like(b, x)?, eps as f32);
    }
    let mut y = layer_norm_composite(x, eps)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&cast_like(w, &y)?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&cast_like(b, &y)?)?;
    }
    Ok(y)
}

/// T5's RMS norm (`T5LayerNorm`): `x / sqrt(mean(x²) + eps) · weight`, the mean taken
/// in f32 for half types, the result cast back before the weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    // on a GPU without a gradient, candle's one-kernel norm (f32 statistics; the
    // weight applied before the one rounding, so within the dtype's rounding of this)
    if !x.device().is_cpu()
        && x.is_contiguous()
        && x.dtype() != DType::F64
        && !needs_grad(&[x, weight])
    {
        return candle_nn::ops::rms_norm(x, &cast_like(weight, x)?, eps as f32);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(internal_dtype(dtype))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(&cast_like(weight, x)?)
}

/// `torch.nn.RMSNorm` (`F.rms_norm`, the qk norm of Flux and SD3):
/// `x / sqrt(mean(x²) + eps) · weight` computed wholly in f32 for half types (the
/// weight applied before the one cast back), where [`rms_norm`] (T5's) casts back
/// before the weight. With f32 inputs the two agree.
pub fn rms_norm_upcast(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(internal_dtype(dtype))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    xf.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&weight.to_dtype(xf.dtype())?)?
        .to_dtype(dtype)
}

/// GroupNorm of `x` `[B, C, ...]` over `groups` groups with per-channel affine
/// `weight`, `bias` `[C]`, statistics in f32 for half types; `silu` applies SiLU to the
/// result (the VAE's `norm -> silu` pairs, one kernel on the GPU).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    group_norm_after_bias(x, None, groups, weight, bias, eps, silu)
}

/// [`group_norm`] of `x + in_bias` (`in_bias` `[C]` per channel, `None` for none):
/// the bias of the convolution before the norm, which the channels-last kernels add
/// as they read (no pass of its own, the sum never rounded to `x`'s dtype); elsewhere
/// it is added first.
pub fn group_norm_after_bias(
    x: &Tensor,
    in_bias: Option<&Tensor>,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() <= 2 {
        candle_core::bail!("group_norm: input rank must be at least 3, got {dims:?}");
    }
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || !c.is_multiple_of(groups) {
        candle_core::bail!("group_norm: {c} channels are not divisible into {groups} groups");
    }
    let mut inputs = vec![x, weight, bias];
    inputs.extend(in_bias);
    let fusable = matches!(x.dtype(), DType::F32 | DType::BF16) && !needs_grad(&inputs);
    // channels-last stays channels-last (on the CPU through the kernel's
    // transcription, so the layout is the same on every device)
    if fusable && nhwc_memory(x).is_some() && group_norm::nhwc_takes(c, groups) {
        return group_norm::fused_group_norm_nhwc(x, in_bias, groups, weight, bias, eps, silu);
    }
    let x = &match in_bias {
        Some(cb) => {
            let n = cb.dims1()?;
            if n != c {
                candle_core::bail!("group_norm: an input bias of {n} values for {c} channels");
            }
            let mut cb_dims = vec![1; dims.len()];
            cb_dims[1] = c;
            x.broadcast_add(&cast_like(cb, x)?.reshape(cb_dims)?)?
        }
        None => x.clone(),
    };
    if fusable && !x.device().is_cpu() {
        return group_norm::fused_group_norm(x, groups, weight, bias, eps, silu);
    }
    let hidden = dims[2..].iter().product::<usize>() * c / groups;
    let x_dtype = x.dtype();
    let internal = internal_dtype(x_dtype);
    let xg = x.reshape((b, groups, hidden))?.to_dtype(internal)?;
    let mean = (xg.sum_keepdim(2)? / hidden as f64)?;
    let xg = xg.broadcast_sub(&mean)?;
    let var = (xg.sqr()?.sum_keepdim(2)? / hidden as f64)?;
    let normed = xg.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut w_dims = vec![1; dims.len()];
    w_dims[1] = c;
    let y = normed
        .to_dtype(x_dtype)?
        .reshape(dims)?
        .broadcast_mul(&cast_like(weight, x)?.reshape(w_dims.clone())?)?
        .broadcast_add(&cast_like(bias, x)?.reshape(w_dims)?)?;
    if silu { y.silu() } else { Ok(y) }
}

/// Softmax over the last axis: candle's fused kernel when no gradient is needed,
/// else `exp(x - max) / sum` (the max is a constant shift: detached, the gradient is
/// exact and one reduction cheaper).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// How [`attention`] scores.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionOpts<'a> {
    /// Multiplies the logits (`1/sqrt(head_dim)`); `None` when the model scales `q`
    /// itself (CLIP) or not at all (T5).
    pub scale: Option<f64>,
    /// Added to the logits after scaling: a mask of `0` / large negative values, a
    /// position bias, broadcast to `[B, heads, q, k]`.
    pub bias: Option<&'a Tensor>,
    /// A second bias, added to `bias` first (as transformers adds T5's padding mask to
    /// its position bias) and broadcast the same way: a padding mask `[B, 1, 1, k]`
    /// kept apart from a position bias `[1, heads, q, k]` shared by the batch, so that
    /// on CUDA neither is expanded to `[B, heads, q, k]` in memory.
    pub mask: Option<&'a Tensor>,
    /// Logits and softmax in f32 whatever the input dtype (transformers'
    /// `upcast_softmax`); the probabilities are cast back before `· v`.
    pub softmax_f32: bool,
}

/// Multi-head attention `softmax(q kᵀ · scale + bias) v` for `q` `[B, H, Tq, D]`,
/// `k`, `v` `[B, H, Tk, D]` (contiguous): `[B, H, Tq, D]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOpts<'_>) -> Result<Tensor> {
    // q·kᵀ and probs·v: B·H·Tq·Tk·D multiply-adds each
    let tk = k.dim(D::Minus2)?;
    flops::add(
        2 * flops::matmul(
            q.elem_count() / q.dim(D::Minus1)?.max(1),
            tk,
            q.dim(D::Minus1)?,
        ),
    );
    // on CUDA in bf16 without a gradient: one kernel, the logits never in memory
    if let Some(o) = flash::try_attention(q, k, v, opts)? {
        return Ok(o);
    }
    let mut logits = q.matmul(&k.t()?)?;
    let biases: Vec<&Tensor> = [opts.bias, opts.mask].into_iter().flatten().collect();
    // on CUDA without a gradient: scale, softmax (in f32) and the cast back as one
    // kernel that reads the logits once
    if biases.is_empty()
        && !logits.device().is_cpu()
        && matches!(logits.dtype(), DType::F32 | DType::BF16)
        && !needs_grad(&[q, k, v])
    {
        let op = softmax::ScaledSoftmax {
            scale: opts.scale.unwrap_or(1.0) as f32,
        };
        let probs = logits.contiguous()?.apply_op1_no_bwd(&op)?;
        return probs.to_dtype(v.dtype())?.matmul(v);
    }
    // with biases (T5's position bias and mask, CLIP text's masks): the same pass,
    // each bias read in place through its strides
    if let Some(first) = biases.first()
        && !logits.device().is_cpu()
        && logits.rank() == 4
        && biases.iter().all(|b| b.dtype() == first.dtype())
        && matches!(
            (logits.dtype(), first.dtype()),
            (DType::F32, DType::F32) | (DType::BF16, DType::F32 | DType::BF16)
        )
        && !needs_grad(&[q, k, v])
        && !needs_grad(&biases)
    {
        let op = softmax::ScaledBiasSoftmax {
            scale: opts.scale.unwrap_or(1.0) as f32,
        };
        let logits = logits.contiguous()?;
        let spread = |b: &Tensor| b.broadcast_as(logits.shape());
        let probs = match biases[..] {
            [bias] => logits.apply_op2_no_bwd(&spread(bias)?, &op)?,
            [bias, mask] => logits.apply_op3_no_bwd(&spread(bias)?, &spread(mask)?, &op)?,
            _ => unreachable!("at most two biases"),
        };
        return probs.to_dtype(v.dtype())?.matmul(v);
    }
    if let Some(s) = opts.scale {
        logits = (logits * s)?;
    }
    if opts.softmax_f32 {
        logits = logits.to_dtype(DType::F32)?;
    }
    let bias = match (opts.bias, opts.mask) {
        (Some(b), Some(m)) => Some(b.broadcast_add(m)?),
        (b, m) => b.or(m).cloned(),
    };
    if let Some(bias) = bias {
        logits = logits.broadcast_add(&bias.to_dtype(logits.dtype())?)?;
    }
    let probs = softmax_last_dim(&logits)?.to_dtype(v.dtype())?;
    probs.matmul(v)
}

/// T5 v1.1's gated GELU on a stacked product `h` `[.., 2·d]`:
/// `gelu_tanh(h[.., :d]) · h[.., d:]` (`[.., d]`). On CUDA without a gradient one
/// kernel ([`gated`](mod@gated)); else the composite.
pub fn gated_gelu_tanh(h: &Tensor) -> Result<Tensor> {
    if !h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::BF16) && !needs_grad(&[h]) {
        return h.contiguous()?.apply_op1_no_bwd(&gated::GatedGelu);
    }
    let two_d = h.dim(D::Minus1)?;
    if two_d % 2 != 0 {
        candle_core::bail!("gated gelu: the last axis ({two_d}) is not two halves");
    }
    let d = two_d / 2;
    h.narrow(D::Minus1, 0, d)?.gelu()? * h.narrow(D::Minus1, d, d)?
}

/// adaLN modulation: `x · (1 + scale) + shift`, `shift` and `scale` broadcast to `x`.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(cast_like(scale, x)? + 1.0)?)?
        .broadcast_add(&cast_like(shift, x)?)
}

#[cfg(test)]
mod tests;
