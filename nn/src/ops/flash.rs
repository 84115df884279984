//! Attention fused whole for inference on CUDA in bf16 (flash attention, forward):
//! `softmax(scale · q kᵀ + bias + mask) v` in one kernel, the logits never in memory.
//!
//! The unfused path writes the `[B, H, Tq, Tk]` logits, reads them for the softmax
//! (one kernel, [`super::softmax`]), writes the probabilities and reads them again
//! for `· v`: for SigLIP at 384 px (729 tokens, 16 heads, 27 layers) ~1.8 GB of
//! memory traffic per image, a quarter of the 1.7 ms per image that beating compiled
//! PyTorch on an H200 leaves. Here a block of four warps takes 64 query rows of one
//! (sample, head), keeps them in registers and walks the keys in tiles of 64 through
//! shared memory: `q kᵀ` and `p v` on the tensor cores (`mma.sync` m16n8k16, bf16
//! in, f32 accumulation), the softmax online in f32 (the running maximum and sum of
//! each row rescale what was accumulated, as in FlashAttention-2), the
//! probabilities rounded to bf16 for `· v` (as the composite casts them back before
//! its product), one rounding of the output. Memory traffic is one read of q, k and
//! v per query tile and one write of the output.
//!
//! - q, k, v are read through their strides (the last axis contiguous), so a head
//!   view of a stacked q/k/v projection would need no copy (the models still make
//!   them contiguous, as the unfused path's products want); the output is written
//!   `[B, Tq, H, D]` and handed back as its `[B, H, Tq, D]` view, so the model's
//!   `transpose(1, 2)` and reshape to `[B, Tq, H·D]` copy nothing.
//! - Head dims up to 128 (padded with zeros to 32, 64, 80, 96 or 128 in shared
//!   memory; SigLIP's 72 runs as 80): every encoder's attention but the VAE's
//!   mid-block (one head of 512 channels), which keeps the unfused path.
//! - Up to two f32 biases (T5's position bias `[1, H, T, T]` and padding mask
//!   `[B, 1, 1, T]`, CLIP text's causal mask), each read in place through its
//!   strides as the scores are made; keys past the end are masked in the kernel.
//!
//! [`FlashAttention`]'s `cpu_fwd` is the definition the kernel is held to (f32
//! scores and softmax, probabilities rounded to bf16, one rounding of the output);
//! the kernel's own CUDA source also runs on the CPU in a test, each CUDA thread a
//! thread and the tensor-core product emulated from the PTX ISA's fragment layouts
//! (`flash_emu.cpp`), so the index arithmetic is checked without a GPU.
//! [`super::attention`] takes this path on CUDA for bf16 without a gradient unless
//! `TENSORBAKE_ATTENTION=unfused` (to time the unfused path beside it).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

/// The padded head dims the kernel is instantiated for.
const PADDED_DIMS: [usize; 5] = [32, 64, 80, 96, 128];

/// The padded head dim of `d` (the smallest instance that holds it), or `None` above
/// 128.
#[must_use]
pub fn padded_head_dim(d: usize) -> Option<usize> {
    PADDED_DIMS.into_iter().find(|&p| d > 0 && p >= d)
}

/// Whether [`super::attention`] takes the fused kernel on CUDA: unless
/// `TENSORBAKE_ATTENTION=unfused`.
#[must_use]
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TENSORBAKE_ATTENTION").map_or(true, |v| v != "unfused"))
}

/// The kernel's arguments beside the pointers, `struct TbFlashArgs` of [`KERNEL`]
/// field for field: strides in elements (the last axis has stride 1), the biases'
/// strides over `(b, h, i, j)` (0 on a broadcast axis).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FlashArgs {
    q: [i64; 3],
    k: [i64; 3],
    v: [i64; 3],
    o: [i64; 3],
    bias: [i64; 4],
    mask: [i64; 4],
    heads: i32,
    tq: i32,
    tk: i32,
    d: i32,
    has_bias: i32,
    has_mask: i32,
    scale: f32,
    vec8: i32,
}

impl FlashArgs {
    /// The struct's bytes, as the kernel reads them (the CPU run of the kernel takes
    /// them from a file).
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(std::mem::size_of::<Self>());
        for s in [self.q, self.k, self.v, self.o].iter().flatten() {
            out.extend_from_slice(&s.to_ne_bytes());
        }
        for s in [self.bias, self.mask].iter().flatten() {
            out.extend_from_slice(&s.to_ne_bytes());
        }
        for i in [
            self.heads,
            self.tq,
            self.tk,
            self.d,
            self.has_bias,
            self.has_mask,
        ] {
            out.extend_from_slice(&i.to_ne_bytes());
        }
        out.extend_from_slice(&self.scale.to_ne_bytes());
        out.extend_from_slice(&self.vec8.to_ne_bytes());
        out
    }
}

// SAFETY: a `#[repr(C)]` struct of plain integers and a float, the layout of the
// kernel's `TbFlashArgs` (192 bytes, 8-aligned)
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for FlashArgs {}

/// The attention's sizes: batch, heads, queries, keys, head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Batch.
    pub b: usize,
    /// Heads.
    pub h: usize,
    /// Queries.
    pub tq: usize,
    /// Keys (and values).
    pub tk: usize,
    /// Head dim.
    pub d: usize,
}

/// The sizes and the kernel's arguments for q `[B, H, Tq, D]`, k and v
/// `[B, H, Tk, D]` (each with its last axis contiguous) and the output written
/// `[B, Tq, H, D]`; errors name the operand.
///
/// # Errors
/// Shapes that do not agree, a last axis that is not contiguous, dims past `i32`.
pub fn geometry(lq: &Layout, lk: &Layout, lv: &Layout) -> Result<(Dims, FlashArgs)> {
    let shapes = || format!("q {:?}, k {:?}, v {:?}", lq.shape(), lk.shape(), lv.shape());
    let (b, h, tq, d, tk) = match (lq.shape().dims(), lk.shape().dims(), lv.shape().dims()) {
        (&[b, h, tq, d], &[bk, hk, tk, dk], vs)
            if vs == [bk, hk, tk, dk] && [bk, hk, dk] == [b, h, d] =>
        {
            (b, h, tq, d, tk)
        }
        _ => candle_core::bail!(
            "flash attention: {} (q [B, H, Tq, D], k and v [B, H, Tk, D])",
            shapes()
        ),
    };
    if tq == 0 || tk == 0 || padded_head_dim(d).is_none() {
        candle_core::bail!(
            "flash attention: {} (1 to 128 head dims, a query and a key)",
            shapes()
        );
    }
    let strides = |l: &Layout, what: &str| -> Result<[i64; 3]> {
        let s = l.stride();
        if s[3] != 1 && d > 1 {
            candle_core::bail!(
                "flash attention: {what}'s last axis has stride {} (1)",
                s[3]
            );
        }
        let i = |x: usize| {
            i64::try_from(x)
                .map_err(|_| candle_core::Error::Msg(format!("flash attention: {what} stride {x}")))
        };
        Ok([i(s[0])?, i(s[1])?, i(s[2])?])
    };
    let int = |x: usize| {
        i32::try_from(x).map_err(|_| {
            candle_core::Error::Msg(format!("flash attention: {} is too large", shapes()))
        })
    };
    // 16-byte loads where every row of every operand starts 16-byte aligned (the
    // allocations are)
    let vec8 = d % 8 == 0
        && [lq, lk, lv]
            .iter()
            .all(|l| l.start_offset() % 8 == 0 && l.stride()[..3].iter().all(|s| s % 8 == 0));
    let args = FlashArgs {
        q: strides(lq, "q")?,
        k: strides(lk, "k")?,
        v: strides(lv, "v")?,
        // [B, Tq, H, D]
        o: [(tq * h * d) as i64, d as i64, (h * d) as i64],
        heads: int(h)?,
        tq: int(tq)?,
        tk: int(tk)?,
        d: int(d)?,
        vec8: i32::from(vec8),
        ..FlashArgs::default()
    };
    Ok((Dims { b, h, tq, tk, d }, args))
}

/// The fused op over `(q, k, v)` (bf16): `[B, Tq, H, D]` bf16. The biases, f32 views
/// of `[B, H, Tq, Tk]` (broadcast axes stride 0), are read through their storage.
pub(crate) struct FlashAttention {
    pub(crate) scale: f32,
    pub(crate) bias: Option<Tensor>,
    pub(crate) mask: Option<Tensor>,
}

impl FlashAttention {
    /// The biases present, checked against the scores' shape `[B, H, Tq, Tk]`.
    fn biases(&self, scores: [usize; 4]) -> Result<Vec<&Tensor>> {
        let biases: Vec<&Tensor> = [&self.bias, &self.mask].into_iter().flatten().collect();
        for t in &biases {
            if t.dims() != scores || t.dtype() != DType::F32 {
                candle_core::bail!(
                    "flash attention: a bias {:?} {:?} (f32 [B, H, Tq, Tk] = {scores:?})",
                    t.dtype(),
                    t.dims()
                );
            }
        }
        Ok(biases)
    }

    /// `args` with the biases' strides and flags.
    fn with_biases(&self, mut args: FlashArgs) -> Result<FlashArgs> {
        let strides = |t: &Tensor| -> [i64; 4] {
            let s = t.layout().stride();
            [s[0] as i64, s[1] as i64, s[2] as i64, s[3] as i64]
        };
        if let Some(t) = &self.bias {
            args.bias = strides(t);
            args.has_bias = 1;
        }
        if let Some(t) = &self.mask {
            args.mask = strides(t);
            args.has_mask = 1;
        }
        args.scale = self.scale;
        Ok(args)
    }
}

/// The f32 value at `i` of CPU storage (f32 or bf16).
fn cpu_at(s: &CpuStorage, i: usize) -> f32 {
    match s {
        CpuStorage::F32(v) => v[i],
        CpuStorage::BF16(v) => v[i].to_f32(),
        _ => f32::NAN,
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    /// The definition: f32 scores `scale · q·k + bias + mask`, their softmax in f32
    /// with the probabilities rounded to bf16 for `· v`, the sum over the unrounded
    /// ones, one rounding of the output.
    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        for (s, what) in [(sq, "q"), (sk, "k"), (sv, "v")] {
            if s.dtype() != DType::BF16 {
                candle_core::bail!("flash attention: {what} is {:?} (bf16)", s.dtype());
            }
        }
        let (Dims { b, h, tq, tk, d }, args) = geometry(lq, lk, lv)?;
        let args = self.with_biases(args)?;
        let guards: Vec<_> = self
            .biases([b, h, tq, tk])?
            .into_iter()
            .map(Tensor::storage_and_layout)
            .collect();
        let mut biases = Vec::new();
        for (s, l) in &guards {
            let Storage::Cpu(s) = &**s else {
                candle_core::bail!(
                    "flash attention: a bias on {:?}, the op on the CPU",
                    s.device().location()
                )
            };
            biases.push((s, l.start_offset(), l.stride()));
        }
        let at = |s: &CpuStorage,
                  l: &Layout,
                  st: &[i64; 3],
                  bi: usize,
                  hi: usize,
                  t: usize,
                  c: usize| {
            cpu_at(
                s,
                l.start_offset()
                    + bi * st[0] as usize
                    + hi * st[1] as usize
                    + t * st[2] as usize
                    + c,
            )
        };
        let mut out = vec![0f32; b * tq * h * d];
        let mut scores = vec![0f32; tk];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..tq {
                    for (j, s) in scores.iter_mut().enumerate() {
                        let dot: f32 = (0..d)
                            .map(|c| {
                                at(sq, lq, &args.q, bi, hi, i, c)
                                    * at(sk, lk, &args.k, bi, hi, j, c)
                            })
                            .sum();
                        *s = dot * self.scale
                            + biases
                                .iter()
                                .map(|(st, off, sd)| {
                                    cpu_at(
                                        st,
                                        off + bi * sd[0] + hi * sd[1] + i * sd[2] + j * sd[3],
                                    )
                                })
                                .sum::<f32>();
                    }
                    let m = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let m = if m == f32::NEG_INFINITY { 0.0 } else { m };
                    let mut sum = 0f32;
                    let row = &mut out[((bi * tq + i) * h + hi) * d..][..d];
                    for (j, &s) in scores.iter().enumerate() {
                        let p = (s - m).exp();
                        sum += p;
                        let p = half::bf16::from_f32(p).to_f32();
                        for (c, o) in row.iter_mut().enumerate() {
                            *o += p * at(sv, lv, &args.v, bi, hi, j, c);
                        }
                    }
                    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                    row.iter_mut().for_each(|o| *o *= inv);
                }
            }
        }
        Ok((
            super::cpu_storage(out, DType::BF16),
            Shape::from((b, tq, h, d)),
        ))
    }

    // the unsafe code of this op: allocating the output and launching the kernel
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn cuda_fwd(
        &self,
        sq: &candle_core::CudaStorage,
        lq: &Layout,
        sk: &candle_core::CudaStorage,
        lk: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use half::bf16;
        let (Dims { b, h, tq, tk, d }, args) = geometry(lq, lk, lv)?;
        let args = self.with_biases(args)?;
        let dp = padded_head_dim(d).unwrap_or(128);
        let guards: Vec<_> = self
            .biases([b, h, tq, tk])?
            .into_iter()
            .map(Tensor::storage_and_layout)
            .collect();
        let dev = sq.device().clone();
        let view = |s: &candle_core::CudaStorage, l: &Layout| -> Result<_> {
            Ok(s.as_cuda_slice::<bf16>()?.slice(l.start_offset()..))
        };
        let (q, k, v) = (view(sq, lq)?, view(sk, lk)?, view(sv, lv)?);
        let mut biases = Vec::new();
        for (s, l) in &guards {
            let Storage::Cuda(s) = &**s else {
                candle_core::bail!("flash attention: a bias off the GPU, the op on it")
            };
            biases.push(s.as_cuda_slice::<f32>()?.slice(l.start_offset()..));
        }
        let ptx = ptx()?;
        let name = format!("tb_flash_bf16_d{dp}");
        let func = dev.get_or_load_custom_func(&name, "tensorbake_flash", ptx)?;
        // SAFETY: every (row < Tq, column < D) of every (sample, head) is written once
        let o = unsafe { dev.alloc::<bf16>(b * tq * h * d)? };
        let bh = u32::try_from(b * h)
            .map_err(|_| candle_core::Error::Msg(format!("flash attention: {b}·{h} heads")))?;
        let cfg = LaunchConfig {
            grid_dim: (bh, tq.div_ceil(64) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&q).arg(&k).arg(&v).arg(&o);
        // an absent bias is never read (its flag is 0): q stands in for the pointer
        let (mut bias, mut mask) = (None, None);
        let mut rest = biases.iter();
        if self.bias.is_some() {
            bias = rest.next();
        }
        if self.mask.is_some() {
            mask = rest.next();
        }
        match bias {
            Some(p) => builder.arg(p),
            None => builder.arg(&q),
        };
        match mask {
            Some(p) => builder.arg(p),
            None => builder.arg(&q),
        };
        builder.arg(&args);
        // SAFETY: the kernel reads q, k, v and the biases at the offsets their
        // layouts give (inside each view) and writes o's b·tq·h·d values
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(o, dev),
            Shape::from((b, tq, h, d)),
        ))
    }
}

/// The kernel's PTX, compiled once per process for compute capability 8.0 (the
/// tensor-core product needs it; the driver compiles it on for the GPU at hand).
#[cfg(feature = "cuda")]
fn ptx() -> Result<&'static str> {
    use candle_core::cuda_backend::cudarc::nvrtc;
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        let opts = nvrtc::CompileOptions {
            arch: Some("compute_80"),
            ..Default::default()
        };
        nvrtc::compile_ptx_with_opts(super::kernel_source(KERNEL), opts)
            .map(|p| p.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("kernel tensorbake_flash: {e}")))
}

/// [`super::attention`]'s fused path: `[B, H, Tq, D]` (a view of the `[B, Tq, H, D]`
/// output), or `None` where it does not apply (not CUDA, not bf16, a gradient to
/// record, a head dim above 128, switched off).
///
/// # Errors
/// The biases' broadcast and cast, the kernel.
pub(crate) fn try_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &super::AttentionOpts<'_>,
) -> Result<Option<Tensor>> {
    let biases: Vec<&Tensor> = [opts.bias, opts.mask].into_iter().flatten().collect();
    if !q.device().is_cuda()
        || !enabled()
        || [q, k, v]
            .iter()
            .any(|t| t.dtype() != DType::BF16 || t.rank() != 4)
        || padded_head_dim(q.dim(3)?).is_none()
        || super::needs_grad(&[q, k, v])
        || super::needs_grad(&biases)
    {
        return Ok(None);
    }
    let (b, h, tq, _) = q.dims4()?;
    let tk = k.dim(2)?;
    let last_contiguous = |t: &Tensor| -> Result<Tensor> {
        if t.stride()[3] == 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let spread = |t: Option<&Tensor>| -> Result<Option<Tensor>> {
        t.map(|t| t.to_dtype(DType::F32)?.broadcast_as((b, h, tq, tk)))
            .transpose()
    };
    let op = FlashAttention {
        scale: opts.scale.unwrap_or(1.0) as f32,
        bias: spread(opts.bias)?,
        mask: spread(opts.mask)?,
    };
    let o =
        last_contiguous(q)?.apply_op3_no_bwd(&last_contiguous(k)?, &last_contiguous(v)?, &op)?;
    Ok(Some(o.transpose(1, 2)?))
}

/// The CUDA source (after the seam's shared element access, [`super::kernel_source`]).
pub const KERNEL: &str = r#"
// flash attention forward, bf16 in and out, f32 scores and accumulation.
// A block of 4 warps takes 64 query rows (16 a warp) of one (sample, head):
// blockIdx.x = b * heads + h, blockIdx.y = the query tile; keys in tiles of 64.
struct TbFlashArgs {
  long long q_s[3], k_s[3], v_s[3], o_s[3];  // strides of (b, h, t); the dim axis is 1
  long long bias_s[4], mask_s[4];            // strides of (b, h, i, j)
  int heads, tq, tk, d;
  int has_bias, has_mask;
  float scale;
  int vec8;  // d, every stride and start a multiple of 8 elements: 16-byte loads
};

__device__ __forceinline__ unsigned int tb_ld32(const unsigned short* p) {
  return *reinterpret_cast<const unsigned int*>(p);
}

__device__ __forceinline__ unsigned int tb_pack_bf16x2(float lo, float hi) {
  unsigned short l, h;
  tb_store(&l, 0, lo);
  tb_store(&h, 0, hi);
  return (unsigned int)l | ((unsigned int)h << 16);
}

#ifndef TB_EMULATE
// D (16x8, f32) += A (16x16, bf16, row) * B (16x8, bf16, col), one warp
__device__ __forceinline__ void tb_mma_16816(float* c, const unsigned int* a,
                                             const unsigned int* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// the same with B's fragment read from shared memory, the 16 values of column
// (n * 8 + g) stored contiguously from `col` (this thread's pair at 2 * t and 2 * t + 8)
__device__ __forceinline__ void tb_mma_smem(float* c, const unsigned int* a,
                                            const unsigned short* col) {
  const unsigned int b[2] = {tb_ld32(col), tb_ld32(col + 8)};
  tb_mma_16816(c, a, b);
}

// 64 rows of a [rows][d] operand (row r at src + r * stride) into shared memory, zero
// past `valid` rows and the head dim: dst[r * ld + c], or dst[c * ld + r] when
// `transposed`. With `vec8` (d, the strides and the start a multiple of 8 elements)
// 16 bytes a load.
template <int DP>
__device__ __forceinline__ void tb_flash_tile(unsigned short* dst, int ld, bool transposed,
                                              const unsigned short* src, long long stride,
                                              int valid, int d, int vec8) {
  if (vec8) {
    for (int i = threadIdx.x; i < 64 * (DP / 8); i += blockDim.x) {
      const int r = i / (DP / 8), c = (i % (DP / 8)) * 8;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);
      if (r < valid && c < d) x = *reinterpret_cast<const uint4*>(src + r * stride + c);
      if (transposed) {
        const unsigned short* e = reinterpret_cast<const unsigned short*>(&x);
#pragma unroll
        for (int j = 0; j < 8; ++j) dst[(c + j) * ld + r] = e[j];
      } else {
        *reinterpret_cast<uint4*>(dst + r * ld + c) = x;
      }
    }
  } else {
    for (int i = threadIdx.x; i < 64 * DP; i += blockDim.x) {
      const int r = i / DP, c = i % DP;
      const unsigned short x = (r < valid && c < d) ? src[r * stride + c] : (unsigned short)0;
      if (transposed) dst[c * ld + r] = x;
      else dst[r * ld + c] = x;
    }
  }
}

template <int DP>
__device__ void tb_flash(const unsigned short* q, const unsigned short* k,
                         const unsigned short* v, unsigned short* o, const float* bias,
                         const float* mask, const TbFlashArgs& a) {
  const int BR = 64, BC = 64, LDK = DP + 8, LDV = BC + 8;  // the pads spread the banks
  __shared__ __align__(16) unsigned short sk[BC * LDK];   // the K tile [key][dim] (first Q's)
  __shared__ __align__(16) unsigned short svt[DP * LDV];  // the V tile transposed [dim][key]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // the mma fragments' groupID, thread in group
  const long long bi = blockIdx.x / a.heads, hi = blockIdx.x % a.heads;
  const int q0 = blockIdx.y * BR;
  const unsigned short* qb = q + bi * a.q_s[0] + hi * a.q_s[1];
  const unsigned short* kb = k + bi * a.k_s[0] + hi * a.k_s[1];
  const unsigned short* vb = v + bi * a.v_s[0] + hi * a.v_s[1];
  const float NEG_INF = __int_as_float(0xff800000);

  // the Q tile, zero past the rows and the head dim, into A fragments
  tb_flash_tile<DP>(sk, LDK, false, qb + (long long)q0 * a.q_s[2], a.q_s[2], a.tq - q0, a.d,
                    a.vec8);
  __syncthreads();
  const int r0 = warp * 16 + g;  // this thread's rows of the tile: r0 and r0 + 8
  unsigned int qa[DP / 16][4];
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    const int c = kk * 16 + 2 * t;
    qa[kk][0] = tb_ld32(&sk[r0 * LDK + c]);
    qa[kk][1] = tb_ld32(&sk[(r0 + 8) * LDK + c]);
    qa[kk][2] = tb_ld32(&sk[r0 * LDK + c + 8]);
    qa[kk][3] = tb_ld32(&sk[(r0 + 8) * LDK + c + 8]);
  }
  float acc[DP / 8][4];
#pragma unroll
  for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
  const long long rows[2] = {q0 + r0, q0 + r0 + 8};

  for (int k0 = 0; k0 < a.tk; k0 += BC) {
    __syncthreads();  // nothing reads the previous tile (or the Q tile) any more
    tb_flash_tile<DP>(sk, LDK, false, kb + (long long)k0 * a.k_s[2], a.k_s[2], a.tk - k0, a.d,
                      a.vec8);
    tb_flash_tile<DP>(svt, LDV, true, vb + (long long)k0 * a.v_s[2], a.v_s[2], a.tk - k0, a.d,
                      a.vec8);
    __syncthreads();

    // s = q k^T for the warp's 16 rows and the tile's 64 keys (8 column tiles of 8)
    float s[BC / 8][4];
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
#pragma unroll
      for (int n = 0; n < BC / 8; ++n) {
        tb_mma_smem(s[n], qa[kk], &sk[(n * 8 + g) * LDK + kk * 16 + 2 * t]);
      }
    }
    // scale and biases; keys past the end get -inf. Element e of column tile n is
    // row rows[e >> 1], key k0 + 8n + 2t + (e & 1).
    float mt[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long row = rows[e >> 1], col = k0 + n * 8 + 2 * t + (e & 1);
        float x = s[n][e] * a.scale;
        if (col >= a.tk) {
          x = NEG_INF;
        } else if (row < a.tq) {
          if (a.has_bias)
            x += bias[bi * a.bias_s[0] + hi * a.bias_s[1] + row * a.bias_s[2] + col * a.bias_s[3]];
          if (a.has_mask)
            x += mask[bi * a.mask_s[0] + hi * a.mask_s[1] + row * a.mask_s[2] + col * a.mask_s[3]];
        }
        s[n][e] = x;
        mt[e >> 1] = fmaxf(mt[e >> 1], x);
      }
    }
    // the online softmax: a row's 64 scores are spread over the 4 threads of a group
    float corr[2], mu[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 1));
      mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));
      const float mn = fmaxf(m[r], mt[r]);
      mu[r] = mn == NEG_INF ? 0.0f : mn;  // a row with no key yet: no NaN from -inf - -inf
      corr[r] = expf(m[r] - mu[r]);
      m[r] = mn;
    }
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = expf(s[n][e] - mu[e >> 1]);
        s[n][e] = p;
        rs[e >> 1] += p;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 1);
      rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 2);
      l[r] = l[r] * corr[r] + rs[r];
    }
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
      acc[n][0] *= corr[0];
      acc[n][1] *= corr[0];
      acc[n][2] *= corr[1];
      acc[n][3] *= corr[1];
    }
    // o += p v: the scores' accumulator layout of two column tiles is the A
    // fragment of one 16-key step
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      unsigned int pa[4];
      pa[0] = tb_pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = tb_pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = tb_pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = tb_pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) {
        tb_mma_smem(acc[n], pa, &svt[(n * 8 + g) * LDV + kk * 16 + 2 * t]);
      }
    }
  }

  // o = acc / l, rows < Tq and dims < D
  unsigned short* ob = o + bi * a.o_s[0] + hi * a.o_s[1];
#pragma unroll
  for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const long long row = rows[e >> 1];
      const int col = n * 8 + 2 * t + (e & 1);
      const float lr = l[e >> 1];
      if (row < a.tq && col < a.d)
        tb_store(ob, row * a.o_s[2] + col, lr > 0.0f ? acc[n][e] / lr : 0.0f);
    }
  }
}

#define TB_FLASH_ENTRY(DP)                                                              \
  extern "C" __global__ void tb_flash_bf16_d##DP(                                       \
      const unsigned short* q, const unsigned short* k, const unsigned short* v,        \
      unsigned short* o, const float* bias, const float* mask, TbFlashArgs a) {         \
    tb_flash<DP>(q, k, v, o, bias, mask, a);                                            \
  }
TB_FLASH_ENTRY(32)
TB_FLASH_ENTRY(64)
TB_FLASH_ENTRY(80)
TB_FLASH_ENTRY(96)
TB_FLASH_ENTRY(128)
"#;

#[cfg(test)]
mod tests;
