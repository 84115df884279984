//! GroupNorm (+ SiLU) as one kernel per call, for inference on CUDA: the VAE
//! encoders' `norm -> silu` pairs, which the composite runs as about ten kernels with
//! an f32 copy of the activation in between.
//!
//! One thread block per (image, group) of an NCHW tensor: it reads the group once for
//! the mean, once for the variance about that mean (two passes, as the composite
//! takes them: no `E[x²] - E[x]²` cancellation), and once more to write
//! `(x - mean) / sqrt(var + eps) · weight[c] + bias[c]`, SiLU'd when asked, all in f32
//! and rounded once to the input's dtype (f32 or bf16; f16 keeps the composite). The
//! composite rounds after the normalisation and again after the affine, so the two
//! agree within the dtype's rounding.
//!
//! [`FusedGroupNorm::cpu_fwd`] is the kernel's transcription in Rust: the reference
//! the tests hold the composite against, and the definition of what the kernel
//! computes. [`super::group_norm`] takes this path only on CUDA when no input needs a
//! gradient (the op records no backward).
//!
//! **Channels-last** ([`FusedGroupNormNhwc`]): a group is then `C/groups` adjacent
//! channels of every pixel, scattered through the image, so a block per group would
//! read a few bytes of each row. Instead one thread per channel walks a chunk of rows
//! (the warp reads whole rows, coalesced), in two kernels:
//!
//! 1. statistics: a block per (image, chunk of rows) takes each channel's moments over
//!    its rows (sums shifted by the channel's first value, so no cancellation),
//!    merges the channels of each group (Chan's parallel formula, a butterfly over the
//!    group's adjacent lanes) and writes the chunk's moments; the last block of an
//!    image to finish (an atomic count) merges the chunks into the group's mean and
//!    `1/sqrt(var + eps)`;
//! 2. apply: the same grid, each thread normalising its channel down its rows.
//!
//! The channels-last op also takes a per-channel bias of its input, `x + cb[c]` being
//! what it normalises: the bias of the convolution before it, which then need not
//! be added by a pass of its own (the VAE's ResNet blocks, `conv1 -> norm2`). Its
//! channel's mean is shifted by `cb[c]` (the variance about it is the same) and the
//! apply kernel adds it as it reads, so the sum is never written, nor rounded to the
//! activation's dtype.
//!
//! Two reads and one write of the activation, where the NCHW kernel makes three
//! reads: one launch more, the price of a grid-wide reduction without a cooperative
//! launch. It takes `C` a multiple of 32 up to 1024 with a power-of-two `C/groups` up
//! to 32 (the VAEs: 128-512 channels in 32 groups); [`nhwc_takes`] says which.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
#[cfg(feature = "cuda")]
use half::bf16;

/// The op: groups, epsilon, SiLU after.
pub(crate) struct FusedGroupNorm {
    pub(crate) groups: usize,
    pub(crate) eps: f32,
    pub(crate) silu: bool,
}

impl FusedGroupNorm {
    /// `(images, channels, spatial size)` of a contiguous `[B, C, ...]` input.
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let dims = l.shape().dims();
        if dims.len() < 3 {
            candle_core::bail!("fused group_norm: input rank must be at least 3, got {dims:?}");
        }
        let (b, c) = (dims[0], dims[1]);
        if self.groups == 0 || !c.is_multiple_of(self.groups) {
            candle_core::bail!(
                "fused group_norm: {c} channels are not divisible into {} groups",
                self.groups
            );
        }
        Ok((b, c, dims[2..].iter().product()))
    }
}

#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// The kernel in Rust over `f32` values: `x` `[B, C, HW]`, `w`, `b` `[C]`.
fn reference(
    op: &FusedGroupNorm,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    (n, c, hw): (usize, usize, usize),
) -> Vec<f32> {
    let cpg = c / op.groups;
    let m = cpg * hw;
    let mut y = vec![0f32; x.len()];
    for img in 0..n {
        for g in 0..op.groups {
            let base = (img * c + g * cpg) * hw;
            let xs = &x[base..base + m];
            let mean = xs.iter().sum::<f32>() / m as f32;
            let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / m as f32;
            let rstd = 1.0 / (var + op.eps).sqrt();
            for (k, &v) in xs.iter().enumerate() {
                let ch = g * cpg + k / hw;
                let out = (v - mean) * rstd * w[ch] + bias[ch];
                y[base + k] = if op.silu { silu(out) } else { out };
            }
        }
    }
    y
}

/// The most chunks of rows an image is split into by the channels-last kernels, and
/// the fewest rows a chunk has.
const NHWC_MAX_CHUNKS: usize = 64;
const NHWC_MIN_ROWS: usize = 256;

/// `(chunks, rows per chunk)` of an image of `hw` pixels (rows) for the channels-last
/// kernels.
fn nhwc_chunking(hw: usize) -> (usize, usize) {
    let rows = hw
        .div_ceil(NHWC_MAX_CHUNKS)
        .max(NHWC_MIN_ROWS)
        .min(hw)
        .max(1);
    (hw.div_ceil(rows).max(1), rows)
}

/// Whether the channels-last kernels take `c` channels in `groups` groups.
#[must_use]
pub(crate) fn nhwc_takes(c: usize, groups: usize) -> bool {
    groups > 0
        && c.is_multiple_of(32)
        && c <= 1024
        && c.is_multiple_of(groups)
        && (c / groups).is_power_of_two()
        && c / groups <= 32
}

/// Count, mean and sum of squared deviations of some values (f32, as the kernel).
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    n: f32,
    mean: f32,
    m2: f32,
}

impl Moments {
    /// The moments of `values`, from sums shifted by the first value.
    fn of(values: impl Iterator<Item = f32>) -> Self {
        let mut values = values.peekable();
        let Some(&k) = values.peek() else {
            return Self::default();
        };
        let (mut n, mut s1, mut s2) = (0f32, 0f32, 0f32);
        for v in values {
            let d = v - k;
            n += 1.0;
            s1 += d;
            s2 += d * d;
        }
        Self {
            n,
            mean: k + s1 / n,
            m2: (s2 - s1 * s1 / n).max(0.0),
        }
    }

    /// Chan's merge of `other` into `self`.
    fn merge(&mut self, o: Self) {
        let n = self.n + o.n;
        if n == 0.0 {
            return;
        }
        let d = o.mean - self.mean;
        let f = o.n / n;
        self.mean += d * f;
        self.m2 += o.m2 + d * d * self.n * f;
        self.n = n;
    }
}

/// The channels-last kernels in Rust over `f32` values: `x` `[B, HW, C]`, `w`, `b`
/// and the input's bias `cb` `[C]`.
fn reference_nhwc(
    op: &FusedGroupNormNhwc,
    x: &[f32],
    [w, bias, cb]: [&[f32]; 3],
    (n, hw, c): (usize, usize, usize),
) -> Vec<f32> {
    let groups = op.norm.groups;
    let cpg = c / groups;
    let (chunks, rows) = nhwc_chunking(hw);
    let mut y = vec![0f32; x.len()];
    for img in 0..n {
        let xs = &x[img * hw * c..(img + 1) * hw * c];
        let mut stats = vec![Moments::default(); groups];
        for chunk in 0..chunks {
            let (r0, r1) = (chunk * rows, ((chunk + 1) * rows).min(hw));
            for (g, s) in stats.iter_mut().enumerate() {
                let mut m = Moments::default();
                for ch in g * cpg..(g + 1) * cpg {
                    let mut mc = Moments::of((r0..r1).map(|r| xs[r * c + ch]));
                    mc.mean += cb[ch];
                    m.merge(mc);
                }
                s.merge(m);
            }
        }
        for (k, &v) in xs.iter().enumerate() {
            let ch = k % c;
            let s = stats[ch / cpg];
            let rstd = 1.0 / (s.m2 / s.n + op.norm.eps).sqrt();
            let out = (v + (cb[ch] - s.mean)) * rstd * w[ch] + bias[ch];
            y[img * hw * c + k] = if op.norm.silu { silu(out) } else { out };
        }
    }
    y
}

/// The PTX of [`KERNEL`] (both layouts' kernels), compiled once.
#[cfg(feature = "cuda")]
static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"

// the block's sum of `v` (every thread gets it); blockDim.x a multiple of 32, <= 1024
__device__ float tb_block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  int warps = blockDim.x >> 5;
  v = lane < warps ? shared[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ void tb_group_norm(const T* x, const float* w, const float* b, T* y, int c,
                              long long hw, int groups, float eps, int silu) {
  __shared__ float shared[32];
  int img = blockIdx.x / groups, g = blockIdx.x % groups;
  int cpg = c / groups;
  long long m = (long long)cpg * hw;
  long long base = ((long long)img * c + (long long)g * cpg) * hw;
  float s = 0.0f;
  for (long long k = threadIdx.x; k < m; k += blockDim.x) s += tb_load(x, base + k);
  float mean = tb_block_sum(s, shared) / (float)m;
  float q = 0.0f;
  for (long long k = threadIdx.x; k < m; k += blockDim.x) {
    float d = tb_load(x, base + k) - mean;
    q += d * d;
  }
  float rstd = rsqrtf(tb_block_sum(q, shared) / (float)m + eps);
  for (long long k = threadIdx.x; k < m; k += blockDim.x) {
    int ch = g * cpg + (int)(k / hw);
    float v = (tb_load(x, base + k) - mean) * rstd * w[ch] + b[ch];
    if (silu) v = v / (1.0f + __expf(-v));
    tb_store(y, base + k, v);
  }
}

// Chan's merge of the moments (nb, mb, qb) into (n, mean, m2)
__device__ __forceinline__ void tb_moments_merge(float& n, float& mean, float& m2,
                                                 float nb, float mb, float qb) {
  float t = n + nb;
  if (t == 0.0f) return;
  float d = mb - mean, f = nb / t;
  mean += d * f;
  m2 += qb + d * d * n * f;
  n = t;
}

// channels-last pass 1: block (image, chunk of rows), thread = channel (blockDim.x = C)
template <typename T>
__device__ void tb_gn_nhwc_stats(const T* x, const float* cb, int has_cb, float* part,
                                 float* stats, unsigned int* done, long long hw, int groups,
                                 int chunks, long long rows, float eps) {
  int c = blockDim.x, ch = threadIdx.x;
  int img = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  int cpg = c / groups;
  long long r0 = (long long)chunk * rows, r1 = min(r0 + rows, hw);
  long long base = (long long)img * hw * c + ch;
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  if (r0 < r1) {
    float k = tb_load(x, base + r0 * c), s1 = 0.0f, s2 = 0.0f;
    for (long long r = r0; r < r1; ++r) {
      float d = tb_load(x, base + r * c) - k;
      s1 += d;
      s2 += d * d;
    }
    n = (float)(r1 - r0);
    mean = k + s1 / n;
    if (has_cb) mean += cb[ch];  // the input's bias shifts the mean, not the spread
    m2 = fmaxf(s2 - s1 * s1 / n, 0.0f);
  }
  // the group's cpg adjacent lanes (a power of two <= 32: inside one warp)
  for (int o = 1; o < cpg; o <<= 1) {
    float nb = __shfl_xor_sync(0xffffffffu, n, o);
    float mb = __shfl_xor_sync(0xffffffffu, mean, o);
    float qb = __shfl_xor_sync(0xffffffffu, m2, o);
    tb_moments_merge(n, mean, m2, nb, mb, qb);
  }
  if (ch % cpg == 0) {
    float* p = part + (((long long)img * chunks + chunk) * groups + ch / cpg) * 3;
    p[0] = n; p[1] = mean; p[2] = m2;
  }
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(done + img, 1u) == (unsigned int)(chunks - 1);
  __syncthreads();
  if (!last) return;
  // the image's last block: a warp per group merges the chunks
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int g = warp; g < groups; g += warps) {
    float tn = 0.0f, tm = 0.0f, tq = 0.0f;
    for (int k = lane; k < chunks; k += 32) {
      const volatile float* p = part + (((long long)img * chunks + k) * groups + g) * 3;
      tb_moments_merge(tn, tm, tq, p[0], p[1], p[2]);
    }
    for (int o = 16; o > 0; o >>= 1) {
      float nb = __shfl_xor_sync(0xffffffffu, tn, o);
      float mb = __shfl_xor_sync(0xffffffffu, tm, o);
      float qb = __shfl_xor_sync(0xffffffffu, tq, o);
      tb_moments_merge(tn, tm, tq, nb, mb, qb);
    }
    if (lane == 0) {
      stats[((long long)img * groups + g) * 2] = tm;
      stats[((long long)img * groups + g) * 2 + 1] = rsqrtf(tq / tn + eps);
    }
  }
}

// channels-last pass 2: the same grid; each thread normalises its channel down its rows
template <typename T>
__device__ void tb_gn_nhwc_apply(const T* x, const float* w, const float* b, const float* cb,
                                 int has_cb, const float* stats, T* y, long long hw,
                                 int groups, int chunks, long long rows, int silu) {
  int c = blockDim.x, ch = threadIdx.x;
  int img = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  int g = ch / (c / groups);
  float mean = stats[((long long)img * groups + g) * 2];
  float rstd = stats[((long long)img * groups + g) * 2 + 1];
  float wc = w[ch], bc = b[ch], shift = (has_cb ? cb[ch] : 0.0f) - mean;
  long long r0 = (long long)chunk * rows, r1 = min(r0 + rows, hw);
  long long base = (long long)img * hw * c + ch;
  for (long long r = r0; r < r1; ++r) {
    float v = (tb_load(x, base + r * c) + shift) * rstd * wc + bc;
    if (silu) v = v / (1.0f + __expf(-v));
    tb_store(y, base + r * c, v);
  }
}

extern "C" __global__ void tb_gn_nhwc_stats_f32(const float* x, const float* cb, int has_cb,
    float* part, float* stats, unsigned int* done, long long hw, int groups, int chunks,
    long long rows, float eps) {
  tb_gn_nhwc_stats<float>(x, cb, has_cb, part, stats, done, hw, groups, chunks, rows, eps);
}
extern "C" __global__ void tb_gn_nhwc_stats_bf16(const unsigned short* x, const float* cb,
    int has_cb, float* part, float* stats, unsigned int* done, long long hw, int groups,
    int chunks, long long rows, float eps) {
  tb_gn_nhwc_stats<unsigned short>(x, cb, has_cb, part, stats, done, hw, groups, chunks, rows,
                                   eps);
}
extern "C" __global__ void tb_gn_nhwc_apply_f32(const float* x, const float* w,
    const float* b, const float* cb, int has_cb, const float* stats, float* y, long long hw,
    int groups, int chunks, long long rows, int silu) {
  tb_gn_nhwc_apply<float>(x, w, b, cb, has_cb, stats, y, hw, groups, chunks, rows, silu);
}
extern "C" __global__ void tb_gn_nhwc_apply_bf16(const unsigned short* x, const float* w,
    const float* b, const float* cb, int has_cb, const float* stats, unsigned short* y,
    long long hw, int groups, int chunks, long long rows, int silu) {
  tb_gn_nhwc_apply<unsigned short>(x, w, b, cb, has_cb, stats, y, hw, groups, chunks, rows,
                                   silu);
}

extern "C" __global__ void tb_group_norm_f32(const float* x, const float* w, const float* b,
    float* y, int c, long long hw, int groups, float eps, int silu) {
  tb_group_norm<float>(x, w, b, y, c, hw, groups, eps, silu);
}
extern "C" __global__ void tb_group_norm_bf16(const unsigned short* x, const float* w,
    const float* b, unsigned short* y, int c, long long hw, int groups, float eps, int silu) {
  tb_group_norm<unsigned short>(x, w, b, y, c, hw, groups, eps, silu);
}
"#;

/// The kernel source, for compiling it without a GPU (`nvrtc` alone).
#[cfg(feature = "cuda")]
pub fn kernel_source() -> String {
    super::kernel_source(KERNEL)
}

/// One input of a group-norm op: its storage and layout, what it is (for errors) and,
/// for parameters, how many values it must have.
type Input<'a, S> = (&'a S, &'a Layout, &'a str, Option<usize>);

/// The inputs of a group-norm op on the CPU as f32 values, each parameter checked to
/// have its number of values; errors are prefixed by `op`.
fn cpu_inputs<const N: usize>(
    op: &str,
    inputs: [Input<'_, CpuStorage>; N],
) -> Result<[Vec<f32>; N]> {
    let mut out: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
    for (v, (s, l, what, len)) in out.iter_mut().zip(inputs) {
        *v = super::cpu_f32s(s, l, &format!("{op}: the {what}"))?;
        if let Some(len) = len
            && v.len() != len
        {
            candle_core::bail!("{op}: the {what} must have {len} values, not {}", v.len());
        }
    }
    Ok(out)
}

/// The element spans of a group-norm op's inputs on CUDA (all contiguous), each
/// parameter checked to have its number of values.
#[cfg(feature = "cuda")]
fn cuda_spans<const N: usize>(
    op: &str,
    inputs: [(&Layout, &str, Option<usize>); N],
) -> Result<[(usize, usize); N]> {
    let mut spans = [(0, 0); N];
    for (span, (l, what, len)) in spans.iter_mut().zip(inputs) {
        *span = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!("{op}: the {what} is not contiguous"))
        })?;
        if let Some(len) = len
            && span.1 - span.0 != len
        {
            candle_core::bail!(
                "{op}: the {what} must have {len} values, not {}",
                span.1 - span.0
            );
        }
    }
    Ok(spans)
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1)?;
        let c = Some(dims.1);
        let [x, w, b] = cpu_inputs(
            "fused group_norm",
            [
                (s1, l1, "input", None),
                (s2, l2, "weight", c),
                (s3, l3, "bias", c),
            ],
        )?;
        let y = reference(self, &x, &w, &b, dims);
        Ok((super::cpu_storage(y, s1.dtype()), l1.shape().clone()))
    }

    // the one unsafe block of this op: allocating the output and launching the kernel
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{
            CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
        };
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        let (n, c, hw) = self.dims(l1)?;
        let [(a, z), (wa, wz), (ba, bz)] = cuda_spans(
            "fused group_norm",
            [
                (l1, "input", None),
                (l2, "weight", Some(c)),
                (l3, "bias", Some(c)),
            ],
        )?;
        let ptx = super::nvrtc_ptx(&PTX, KERNEL, "tensorbake_group_norm")?;
        let w = s2.as_cuda_slice::<f32>()?.slice(wa..wz);
        let b = s3.as_cuda_slice::<f32>()?.slice(ba..bz);
        let cfg = LaunchConfig {
            grid_dim: ((n * self.groups) as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        // one launch for either dtype: the kernel `tb_group_norm_{f32,bf16}`
        #[allow(clippy::too_many_arguments)]
        fn typed<T: CudaDType + DeviceRepr>(
            op: &FusedGroupNorm,
            s1: &candle_core::CudaStorage,
            (a, z): (usize, usize),
            (w, b): (&CudaView<'_, f32>, &CudaView<'_, f32>),
            (c, hw): (usize, usize),
            name: &str,
            ptx: &str,
            cfg: LaunchConfig,
        ) -> Result<candle_core::CudaStorage> {
            let dev = s1.device().clone();
            let x = s1.as_cuda_slice::<T>()?.slice(a..z);
            let func = dev.get_or_load_custom_func(name, "tensorbake_group_norm", ptx)?;
            // SAFETY: the kernel writes every element of `y` (each group's block
            // covers its m values) before anything reads it.
            let y = unsafe { dev.alloc::<T>(z - a)? };
            let (ci, hwi, gi, si) = (c as i32, hw as i64, op.groups as i32, i32::from(op.silu));
            let mut args = func.builder();
            // bf16 is read and written as its bits (unsigned shorts)
            args.arg(&x).arg(w).arg(b).arg(&y);
            args.arg(&ci).arg(&hwi).arg(&gi).arg(&op.eps).arg(&si);
            // SAFETY: n·groups blocks, each reading and writing its group's
            // cpg·hw values inside the n·c·hw of `x` and `y`, and c of `w`, `b`.
            unsafe { args.launch(cfg) }.w()?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev))
        }
        let (x, wb, dims) = ((a, z), (&w, &b), (c, hw));
        let out = match s1.dtype() {
            DType::F32 => typed::<f32>(self, s1, x, wb, dims, "tb_group_norm_f32", ptx, cfg)?,
            DType::BF16 => typed::<bf16>(self, s1, x, wb, dims, "tb_group_norm_bf16", ptx, cfg)?,
            d => candle_core::bail!("fused group_norm: {d:?} input (f32 or bf16 only)"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// The channels-last op over `(x, w, b)`: the input is the NHWC tensor `[B, H, W, C]`
/// (or any `[B, ..., C]`), contiguous; `w` `[C]` and `b` in f32, `b` the bias `[C]`
/// or, with `in_bias`, the bias and then the input's own per-channel bias `[2, C]`.
/// The output has the input's shape.
pub(crate) struct FusedGroupNormNhwc {
    pub(crate) norm: FusedGroupNorm,
    pub(crate) in_bias: bool,
}

impl FusedGroupNormNhwc {
    /// `(images, pixels, channels)` of a contiguous `[B, ..., C]` input the kernels take.
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let dims = l.shape().dims();
        if dims.len() < 3 {
            candle_core::bail!(
                "fused group_norm (NHWC): input rank must be at least 3, got {dims:?}"
            );
        }
        let c = dims[dims.len() - 1];
        if !nhwc_takes(c, self.norm.groups) {
            candle_core::bail!(
                "fused group_norm (NHWC): {c} channels in {} groups (a multiple of 32 up to 1024, \
                 in groups of a power of two up to 32)",
                self.norm.groups
            );
        }
        Ok((dims[0], dims[1..dims.len() - 1].iter().product(), c))
    }

    /// What `b` holds and how many values, for `c` channels.
    fn b_rows(&self, c: usize) -> (&'static str, usize) {
        if self.in_bias {
            ("bias and input bias", 2 * c)
        } else {
            ("bias", c)
        }
    }
}

impl CustomOp3 for FusedGroupNormNhwc {
    fn name(&self) -> &'static str {
        "fused-group-norm-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1)?;
        let c = dims.2;
        let (what, nb) = self.b_rows(c);
        let [x, w, b] = cpu_inputs(
            "fused group_norm (NHWC)",
            [
                (s1, l1, "input", None),
                (s2, l2, "weight", Some(c)),
                (s3, l3, what, Some(nb)),
            ],
        )?;
        let zeros = vec![0f32; c];
        let cb = if self.in_bias { &b[c..] } else { &zeros[..] };
        let y = reference_nhwc(self, &x, [&w, &b[..c], cb], dims);
        Ok((super::cpu_storage(y, s1.dtype()), l1.shape().clone()))
    }

    // the unsafe blocks of this op: allocating scratch and output, the two launches
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        let (n, hw, c) = self.dims(l1)?;
        let (what, nb) = self.b_rows(c);
        let spans = cuda_spans(
            "fused group_norm (NHWC)",
            [
                (l1, "input", None),
                (l2, "weight", Some(c)),
                (l3, what, Some(nb)),
            ],
        )?;
        let ptx = super::nvrtc_ptx(&PTX, KERNEL, "tensorbake_group_norm")?;
        let (chunks, rows) = nhwc_chunking(hw);
        let cfg = LaunchConfig {
            grid_dim: ((n * chunks) as u32, 1, 1),
            block_dim: (c as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        fn typed<T: CudaDType + DeviceRepr>(
            op: &FusedGroupNormNhwc,
            [s1, s2, s3]: [&candle_core::CudaStorage; 3],
            [(a, z), (wa, wz), (ba, _)]: [(usize, usize); 3],
            (n, hw, c, chunks, rows): (usize, usize, usize, usize, usize),
            (suffix, ptx, cfg): (&str, &str, LaunchConfig),
        ) -> Result<candle_core::CudaStorage> {
            let dev = s1.device().clone();
            let groups = op.norm.groups;
            let x = s1.as_cuda_slice::<T>()?.slice(a..z);
            let w = s2.as_cuda_slice::<f32>()?.slice(wa..wz);
            let b = s3.as_cuda_slice::<f32>()?.slice(ba..ba + c);
            // without an input bias the kernels get a flag of 0 and, never read, the bias
            let cb = s3
                .as_cuda_slice::<f32>()?
                .slice(if op.in_bias { ba + c } else { ba }..);
            let has_cb = i32::from(op.in_bias);
            let stats_fn = dev.get_or_load_custom_func(
                &format!("tb_gn_nhwc_stats_{suffix}"),
                "tensorbake_group_norm",
                ptx,
            )?;
            let apply_fn = dev.get_or_load_custom_func(
                &format!("tb_gn_nhwc_apply_{suffix}"),
                "tensorbake_group_norm",
                ptx,
            )?;
            // SAFETY: scratch the first kernel writes whole before reading it: every
            // (image, chunk, group) of `part` by the group's first lane, every (image,
            // group) of `stats` by the image's last block
            let part = unsafe { dev.alloc::<f32>(n * chunks * groups * 3)? };
            let stats = unsafe { dev.alloc::<f32>(n * groups * 2)? };
            let done = dev.alloc_zeros::<u32>(n)?;
            // SAFETY: the second kernel writes every element of `y` (each block its
            // chunk's rows of every channel) before anything reads it
            let y = unsafe { dev.alloc::<T>(z - a)? };
            let (hwi, gi, ci, ri) = (hw as i64, groups as i32, chunks as i32, rows as i64);
            let si = i32::from(op.norm.silu);
            let mut args = stats_fn.builder();
            args.arg(&x)
                .arg(&cb)
                .arg(&has_cb)
                .arg(&part)
                .arg(&stats)
                .arg(&done);
            args.arg(&hwi).arg(&gi).arg(&ci).arg(&ri).arg(&op.norm.eps);
            // SAFETY: n·chunks blocks of C threads, each reading its rows' C values of
            // one image inside `x` and (with the flag) C of `cb`, writing its groups'
            // moments inside `part`; the last block of an image writes its `stats`
            unsafe { args.launch(cfg) }.w()?;
            let mut args = apply_fn.builder();
            args.arg(&x)
                .arg(&w)
                .arg(&b)
                .arg(&cb)
                .arg(&has_cb)
                .arg(&stats)
                .arg(&y);
            args.arg(&hwi).arg(&gi).arg(&ci).arg(&ri).arg(&si);
            // SAFETY: the same grid, reading what the first kernel wrote (same stream)
            // and C values of each parameter, writing each block's rows of `y`
            unsafe { args.launch(cfg) }.w()?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev))
        }
        let storages = [s1, s2, s3];
        let grid = (n, hw, c, chunks, rows);
        let out = match s1.dtype() {
            DType::F32 => typed::<f32>(self, storages, spans, grid, ("f32", ptx, cfg))?,
            DType::BF16 => typed::<bf16>(self, storages, spans, grid, ("bf16", ptx, cfg))?,
            d => candle_core::bail!("fused group_norm (NHWC): {d:?} input (f32 or bf16 only)"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// GroupNorm (+ SiLU) of `x + in_bias[c]` for a channels-last `x` `[B, C, H, W]` (f32
/// or bf16; see [`super::channels_last`]; `in_bias` `[C]`, none for zero),
/// channels-last out: the two channels-last kernels ([`FusedGroupNormNhwc`]). No
/// backward.
///
/// # Errors
/// `x` not channels-last, channels the kernels do not take ([`nhwc_takes`]), another
/// dtype, parameters of the wrong length.
pub(crate) fn fused_group_norm_nhwc(
    x: &Tensor,
    in_bias: Option<&Tensor>,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let Some(t) = super::channels_last(x) else {
        candle_core::bail!(
            "fused group_norm (NHWC): the input {:?} is not channels-last",
            x.dims()
        );
    };
    let f32s = |p: &Tensor| p.to_dtype(DType::F32)?.contiguous();
    let w = f32s(weight)?;
    // the input bias rides as a second row of the bias: one small copy, only when given
    let b = match in_bias {
        Some(cb) => {
            let c = t.dim(3)?;
            if cb.elem_count() != c {
                candle_core::bail!(
                    "fused group_norm (NHWC): the input bias must have {c} values, not {}",
                    cb.elem_count()
                );
            }
            Tensor::cat(&[f32s(bias)?.flatten_all()?, f32s(cb)?.flatten_all()?], 0)?
        }
        None => f32s(bias)?,
    };
    let op = FusedGroupNormNhwc {
        norm: FusedGroupNorm {
            groups,
            eps: eps as f32,
            silu,
        },
        in_bias: in_bias.is_some(),
    };
    super::nchw_view(&t.apply_op3_no_bwd(&w, &b, &op)?)
}

/// GroupNorm (+ SiLU) of a contiguous `x` (f32 or bf16) in one pass per group:
/// `weight`, `bias` `[C]` are taken in f32. No backward.
///
/// # Errors
/// A rank below 3, channels not divisible into `groups`, another dtype, affine
/// parameters of the wrong length.
pub(crate) fn fused_group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let w = weight.to_dtype(DType::F32)?.contiguous()?;
    let b = bias.to_dtype(DType::F32)?.contiguous()?;
    x.contiguous()?.apply_op3_no_bwd(
        &w,
        &b,
        &FusedGroupNorm {
            groups,
            eps: eps as f32,
            silu,
        },
    )
}
