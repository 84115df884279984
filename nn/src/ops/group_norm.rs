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
        let x = super::cpu_f32s(s1, l1, "fused group_norm: the input")?;
        let w = super::cpu_f32s(s2, l2, "fused group_norm: the weight")?;
        let b = super::cpu_f32s(s3, l3, "fused group_norm: the bias")?;
        if w.len() != dims.1 || b.len() != dims.1 {
            candle_core::bail!(
                "fused group_norm: weight and bias must have {} values, got {} and {}",
                dims.1,
                w.len(),
                b.len()
            );
        }
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
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
            std::sync::OnceLock::new();
        let (n, c, hw) = self.dims(l1)?;
        let offsets = |l: &Layout, what: &str| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg(format!("fused group_norm: {what} is not contiguous"))
            })
        };
        let (a, z) = offsets(l1, "input")?;
        let (wa, wz) = offsets(l2, "weight")?;
        let (ba, bz) = offsets(l3, "bias")?;
        if wz - wa != c || bz - ba != c {
            candle_core::bail!("fused group_norm: weight and bias must have {c} values");
        }
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
