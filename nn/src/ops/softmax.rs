//! Attention's softmax as one kernel for inference on CUDA: `softmax(s · x)` over the
//! last axis of the logits, in f32, rounded once to the logits' dtype.
//!
//! The composite runs it as up to five passes over the `[B, H, Tq, Tk]` logits (the
//! scale, the upcast to f32 that transformers' SigLIP and CLIP take, the softmax, the
//! cast back), each reading and writing the whole matrix, the f32 ones twice its
//! size: for SigLIP at 384 px (729 tokens, 16 heads, 27 layers) ~6 GB of memory
//! traffic per image, about what an H200 moves in the 1.7 ms per image the target
//! leaves. The kernel reads the logits once and writes the probabilities once: one
//! warp per row, the row's maximum and sum of exponentials in f32 (two passes over a
//! row the cache holds), then the normalised values.
//!
//! [`ScaledBiasSoftmax`] adds one or two biases to the scaled logits in the same pass:
//! T5's position bias (`[1, H, T, T]`, f32, shared by the batch) and its padding mask
//! (`[B, 1, 1, T]`), CLIP text's causal mask (`[1, 1, T, T]`), each read in place
//! through its strides (a broadcast axis costs nothing), where the composite adds
//! them as one more pass over the logits after the f32 upcast. For T5-XXL at 120
//! tokens that is ~710 MB of memory traffic per caption over its 24 layers; with the
//! mask added to the position bias beforehand (a `[B, H, T, T]` f32 tensor, read by
//! every layer) ~180 MB; with the two apart ~90 MB (one read of the bf16 logits, one
//! write; the position bias, 3.7 MB for all 64 heads, is read by every caption of the
//! batch from the cache), and no `[B, 64, 512, 512]` f32 bias (67 MB per caption) is
//! held at 512 tokens.
//!
//! [`ScaledSoftmax::cpu_fwd`] and [`ScaledBiasSoftmax::cpu_fwd`] are the kernels'
//! transcriptions, the references the tests hold the composite against;
//! [`super::attention`] takes the kernels only on CUDA when no gradient is needed.
//! They differ from the composite by rounding: the scaled (and biased) logits are not
//! rounded to the input dtype before the softmax.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape};
#[cfg(feature = "cuda")]
use half::bf16;

/// `softmax(scale · x)` over the last axis.
pub(crate) struct ScaledSoftmax {
    pub(crate) scale: f32,
}

/// `(rows, cols)` of a contiguous input.
fn rows_cols(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.shape().dims();
    let Some(&cols) = dims.last() else {
        candle_core::bail!("scaled softmax: a scalar has no last axis")
    };
    if cols == 0 {
        candle_core::bail!("scaled softmax: the last axis is empty");
    }
    Ok((l.shape().elem_count() / cols, cols))
}

/// The module's PTX (compiled once per process for both ops) and the launch of
/// `rows` rows, one warp each, 8 warps a block; errors name `op`.
#[cfg(feature = "cuda")]
fn warp_per_row(
    rows: usize,
    op: &str,
) -> Result<(
    &'static str,
    candle_core::cuda_backend::cudarc::driver::LaunchConfig,
)> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    const WARPS: usize = 8;
    let blocks = u32::try_from(rows.div_ceil(WARPS))
        .map_err(|_| candle_core::Error::Msg(format!("{op}: {rows} rows")))?;
    let ptx = super::nvrtc_ptx(&PTX, KERNEL, "tensorbake_softmax")?;
    let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((ptx, cfg))
}

/// The kernels in Rust over one row: `softmax(scale · x + bias(j))`.
fn softmax_row(x: &[f32], scale: f32, bias: impl Fn(usize) -> f32, y: &mut [f32]) {
    let z = |j: usize| x[j] * scale + bias(j);
    let m = (0..x.len()).fold(f32::NEG_INFINITY, |m, j| m.max(z(j)));
    let s: f32 = (0..x.len()).map(|j| (z(j) - m).exp()).sum();
    let inv = 1.0 / s;
    for (j, o) in y.iter_mut().enumerate() {
        *o = (z(j) - m).exp() * inv;
    }
}

/// `softmax(scale · x + bias [+ mask])` over the last axis of logits `x`
/// `[B, H, Tq, Tk]` (contiguous). Each bias has the logits' shape as a strided view
/// (broadcast with `broadcast_as`: stride 0 on its broadcast axes), f32 or in the
/// logits' dtype, both of one dtype: as a [`CustomOp2`] one bias, as a [`CustomOp3`]
/// two, summed in f32 before they meet the logits (as the composite adds a mask to a
/// position bias first).
pub(crate) struct ScaledBiasSoftmax {
    pub(crate) scale: f32,
}

/// Where row `r` of `[B, H, Tq, Tk]` logits starts in a bias of layout `l`:
/// `offset + b·s0 + h·s1 + q·s2`; the row's element `j` is `j·s3` further.
fn bias_row_start(r: usize, heads: usize, tq: usize, l: &Layout) -> usize {
    let st = l.stride();
    let (q, hb) = (r % tq, r / tq);
    let (h, b) = (hb % heads, hb / heads);
    l.start_offset() + b * st[0] + h * st[1] + q * st[2]
}

/// `(heads, tq, bias dtype)` of 4-d logits and their biases: each of the logits' shape,
/// all of one dtype (the kernels read both biases as one type).
fn check_biases<S: BackendStorage>(
    lx: &Layout,
    biases: &[(&S, &Layout)],
) -> Result<(usize, usize, DType)> {
    let dims = lx.shape().dims();
    for (_, lb) in biases {
        if dims.len() != 4 || lb.shape().dims() != dims {
            candle_core::bail!(
                "scaled bias softmax: logits {:?} and bias {:?} (both [B, H, Tq, Tk])",
                lx.shape(),
                lb.shape()
            );
        }
    }
    let first = biases[0].0.dtype();
    if let Some((other, _)) = biases.iter().find(|(s, _)| s.dtype() != first) {
        candle_core::bail!(
            "scaled bias softmax: a {first:?} and a {:?} bias (one dtype)",
            other.dtype()
        );
    }
    Ok((dims[1], dims[2], first))
}

impl ScaledBiasSoftmax {
    /// The kernels in Rust: every row's softmax with the sum of `biases` added.
    fn cpu(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        biases: &[(&CpuStorage, &Layout)],
    ) -> Result<(CpuStorage, Shape)> {
        let (heads, tq, _) = check_biases(lx, biases)?;
        let (_, cols) = rows_cols(lx)?;
        let x = super::cpu_f32s(sx, lx, "scaled bias softmax: the logits")?;
        let values = biases
            .iter()
            .map(|(s, _)| match s {
                CpuStorage::F32(v) => Ok(v.clone()),
                CpuStorage::BF16(v) => Ok(v.iter().map(|b| b.to_f32()).collect()),
                other => candle_core::bail!(
                    "scaled bias softmax: the bias is {:?} (f32 or bf16)",
                    other.dtype()
                ),
            })
            .collect::<Result<Vec<Vec<f32>>>>()?;
        let mut y = vec![0f32; x.len()];
        for (r, (xr, yr)) in x
            .chunks_exact(cols)
            .zip(y.chunks_exact_mut(cols))
            .enumerate()
        {
            let starts: Vec<(usize, usize)> = biases
                .iter()
                .map(|(_, l)| (bias_row_start(r, heads, tq, l), l.stride()[3]))
                .collect();
            let bias = |j: usize| -> f32 {
                values
                    .iter()
                    .zip(&starts)
                    .map(|(v, (start, sk))| v[start + j * sk])
                    .sum()
            };
            softmax_row(xr, self.scale, bias, yr);
        }
        Ok((super::cpu_storage(y, sx.dtype()), lx.shape().clone()))
    }

    /// The kernel `tb_bias{n}_softmax_{x}_{bias}` for `n` biases of one dtype.
    // the one unsafe block of this op: allocating the output and launching the kernel
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn cuda(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        biases: &[(&candle_core::CudaStorage, &Layout)],
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        let (heads, tq, bias_dtype) = check_biases(lx, biases)?;
        let (rows, cols) = rows_cols(lx)?;
        let Some(span) = lx.contiguous_offsets() else {
            candle_core::bail!("scaled bias softmax: the logits are not contiguous")
        };
        let int = |v: usize, what: &str| {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("scaled bias softmax: {v} {what}")))
        };
        let shape = (
            int(cols, "columns")?,
            int(heads, "heads")?,
            int(tq, "query rows")?,
        );
        let (ptx, cfg) = warp_per_row(rows, "scaled bias softmax")?;
        struct Args<'a> {
            span: (usize, usize),
            rows: usize,
            shape: (i32, i32, i32),
            scale: f32,
            name: String,
            ptx: &'a str,
            cfg: LaunchConfig,
        }
        // one launch for each pair of dtypes
        fn launch<T: CudaDType + DeviceRepr, B: CudaDType + DeviceRepr>(
            sx: &candle_core::CudaStorage,
            biases: &[(&candle_core::CudaStorage, &Layout)],
            a: &Args<'_>,
        ) -> Result<candle_core::CudaStorage> {
            let dev = sx.device().clone();
            let (lo, hi) = a.span;
            let x = sx.as_cuda_slice::<T>()?.slice(lo..hi);
            let views = biases
                .iter()
                .map(|(s, l)| Ok(s.as_cuda_slice::<B>()?.slice(l.start_offset()..)))
                .collect::<Result<Vec<_>>>()?;
            let strides: Vec<i64> = biases
                .iter()
                .flat_map(|(_, l)| l.stride()[..4].to_vec())
                .map(|v| v as i64)
                .collect();
            let func = dev.get_or_load_custom_func(&a.name, "tensorbake_softmax", a.ptx)?;
            // SAFETY: each row's warp writes all of its row before anything reads it
            let y = unsafe { dev.alloc::<T>(hi - lo)? };
            let rows = a.rows as i64;
            let (cols, heads, tq) = a.shape;
            let mut args = func.builder();
            // bf16 is read and written as its bits (unsigned shorts)
            args.arg(&x);
            for v in &views {
                args.arg(v);
            }
            args.arg(&y).arg(&rows).arg(&cols).arg(&a.scale);
            args.arg(&heads).arg(&tq);
            for s in &strides {
                args.arg(s);
            }
            // SAFETY: warp r < rows reads and writes x[r·cols ..][..cols], y likewise,
            // and reads each bias at its layout's offsets of row r, all inside the
            // bias's storage from its start offset (the layout is the tensor's own)
            unsafe { args.launch(a.cfg) }.w()?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev))
        }
        let n = if biases.len() == 1 {
            String::new()
        } else {
            biases.len().to_string()
        };
        let mut a = Args {
            span,
            rows,
            shape,
            scale: self.scale,
            name: String::new(),
            ptx,
            cfg,
        };
        let out = match (sx.dtype(), bias_dtype) {
            (DType::F32, DType::F32) => {
                a.name = format!("tb_bias{n}_softmax_f32_f32");
                launch::<f32, f32>(sx, biases, &a)?
            }
            (DType::BF16, DType::F32) => {
                a.name = format!("tb_bias{n}_softmax_bf16_f32");
                launch::<bf16, f32>(sx, biases, &a)?
            }
            (DType::BF16, DType::BF16) => {
                a.name = format!("tb_bias{n}_softmax_bf16_bf16");
                launch::<bf16, bf16>(sx, biases, &a)?
            }
            (x, b) => candle_core::bail!(
                "scaled bias softmax: {x:?} logits with a {b:?} bias (f32/f32, bf16/f32, bf16/bf16)"
            ),
        };
        Ok((out, lx.shape().clone()))
    }
}

impl CustomOp2 for ScaledBiasSoftmax {
    fn name(&self) -> &'static str {
        "scaled-bias-softmax"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(sx, lx, &[(sb, lb)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(sx, lx, &[(sb, lb)])
    }
}

impl CustomOp3 for ScaledBiasSoftmax {
    fn name(&self) -> &'static str {
        "scaled-bias2-softmax"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
        sm: &CpuStorage,
        lm: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(sx, lx, &[(sb, lb), (sm, lm)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
        sm: &candle_core::CudaStorage,
        lm: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(sx, lx, &[(sb, lb), (sm, lm)])
    }
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
// one warp per row of `cols` values; blockDim.x a multiple of 32
template <typename T>
__device__ void tb_softmax(const T* x, T* y, long long rows, int cols, float scale) {
  long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  int lane = threadIdx.x & 31;
  if (row >= rows) return;  // the whole warp: `row` is the warp's
  long long base = row * cols;
  float m = __int_as_float(0xff800000);  // -inf (NVRTC has no INFINITY)
  for (int j = lane; j < cols; j += 32) m = fmaxf(m, tb_load(x, base + j) * scale);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float s = 0.0f;
  for (int j = lane; j < cols; j += 32) s += expf(tb_load(x, base + j) * scale - m);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  float inv = 1.0f / s;
  for (int j = lane; j < cols; j += 32)
    tb_store(y, base + j, expf(tb_load(x, base + j) * scale - m) * inv);
}

extern "C" __global__ void tb_softmax_f32(const float* x, float* y, long long rows, int cols,
                                          float scale) {
  tb_softmax<float>(x, y, rows, cols, scale);
}
extern "C" __global__ void tb_softmax_bf16(const unsigned short* x, unsigned short* y,
                                           long long rows, int cols, float scale) {
  tb_softmax<unsigned short>(x, y, rows, cols, scale);
}

// softmax(scale * x + bias): row r of [B, H, Tq, Tk] is (b, h, q); its bias starts at
// b*s0 + h*s1 + q*s2 and steps s3 (a broadcast axis has stride 0). With two biases
// (a position bias and a padding mask) their sum, in f32, is the bias.
struct TbBiasRow {
  long long start;
  long long step;
};

__device__ TbBiasRow tb_bias_row(long long hb, long long q, int heads, long long s0,
                                 long long s1, long long s2, long long s3) {
  TbBiasRow r;
  r.start = (hb / heads) * s0 + (hb % heads) * s1 + q * s2;
  r.step = s3;
  return r;
}

template <typename B>
__device__ float tb_bias_at(const B* b1, TbBiasRow r1, const B* b2, TbBiasRow r2, int j) {
  float v = tb_load(b1, r1.start + j * r1.step);
  if (b2 != nullptr) v += tb_load(b2, r2.start + j * r2.step);
  return v;
}

template <typename T, typename B>
__device__ void tb_bias_softmax(const T* x, const B* b1, TbBiasRow r1, const B* b2,
                                TbBiasRow r2, T* y, long long row, int cols, float scale) {
  int lane = threadIdx.x & 31;
  long long base = row * cols;
  float m = __int_as_float(0xff800000);  // -inf (NVRTC has no INFINITY)
  for (int j = lane; j < cols; j += 32)
    m = fmaxf(m, tb_load(x, base + j) * scale + tb_bias_at(b1, r1, b2, r2, j));
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float s = 0.0f;
  for (int j = lane; j < cols; j += 32)
    s += expf(tb_load(x, base + j) * scale + tb_bias_at(b1, r1, b2, r2, j) - m);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  float inv = 1.0f / s;
  for (int j = lane; j < cols; j += 32)
    tb_store(y, base + j,
             expf(tb_load(x, base + j) * scale + tb_bias_at(b1, r1, b2, r2, j) - m) * inv);
}

// the warp's row, or -1 past the last (the whole warp returns: `row` is the warp's)
__device__ long long tb_warp_row(long long rows) {
  long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  return row < rows ? row : -1;
}

#define TB_BIAS_SOFTMAX(NAME, T, B)                                                         \
  extern "C" __global__ void NAME(const T* x, const B* bias, T* y, long long rows, int cols, \
                                  float scale, int heads, int tq, long long s0, long long s1, \
                                  long long s2, long long s3) {                              \
    long long row = tb_warp_row(rows);                                                      \
    if (row < 0) return;                                                                    \
    TbBiasRow r = tb_bias_row(row / tq, row % tq, heads, s0, s1, s2, s3);                   \
    tb_bias_softmax<T, B>(x, bias, r, (const B*)nullptr, r, y, row, cols, scale);           \
  }
TB_BIAS_SOFTMAX(tb_bias_softmax_f32_f32, float, float)
TB_BIAS_SOFTMAX(tb_bias_softmax_bf16_f32, unsigned short, float)
TB_BIAS_SOFTMAX(tb_bias_softmax_bf16_bf16, unsigned short, unsigned short)

#define TB_BIAS2_SOFTMAX(NAME, T, B)                                                           \
  extern "C" __global__ void NAME(const T* x, const B* bias, const B* mask, T* y,              \
                                  long long rows, int cols, float scale, int heads, int tq,    \
                                  long long s0, long long s1, long long s2, long long s3,      \
                                  long long t0, long long t1, long long t2, long long t3) {    \
    long long row = tb_warp_row(rows);                                                         \
    if (row < 0) return;                                                                       \
    long long hb = row / tq, q = row % tq;                                                     \
    TbBiasRow r1 = tb_bias_row(hb, q, heads, s0, s1, s2, s3);                                  \
    TbBiasRow r2 = tb_bias_row(hb, q, heads, t0, t1, t2, t3);                                  \
    tb_bias_softmax<T, B>(x, bias, r1, mask, r2, y, row, cols, scale);                         \
  }
TB_BIAS2_SOFTMAX(tb_bias2_softmax_f32_f32, float, float)
TB_BIAS2_SOFTMAX(tb_bias2_softmax_bf16_f32, unsigned short, float)
TB_BIAS2_SOFTMAX(tb_bias2_softmax_bf16_bf16, unsigned short, unsigned short)
"#;

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(l)?;
        let x = super::cpu_f32s(s, l, "scaled softmax: the input")?;
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
            softmax_row(xr, self.scale, |_| 0.0, yr);
        }
        Ok((super::cpu_storage(y, s.dtype()), l.shape().clone()))
    }

    // the one unsafe block of this op: allocating the output and launching the kernel
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        let (rows, cols) = rows_cols(l)?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("scaled softmax: the input is not contiguous")
        };
        let cols_i = i32::try_from(cols)
            .map_err(|_| candle_core::Error::Msg(format!("scaled softmax: {cols} columns")))?;
        let (ptx, cfg) = warp_per_row(rows, "scaled softmax")?;
        // one launch for either dtype: the kernel `tb_softmax_{f32,bf16}`
        fn launch<T: CudaDType + DeviceRepr>(
            s: &candle_core::CudaStorage,
            (a, b): (usize, usize),
            (rows, cols, scale): (usize, i32, f32),
            name: &str,
            ptx: &str,
            cfg: LaunchConfig,
        ) -> Result<candle_core::CudaStorage> {
            let dev = s.device().clone();
            let x = s.as_cuda_slice::<T>()?.slice(a..b);
            let func = dev.get_or_load_custom_func(name, "tensorbake_softmax", ptx)?;
            // SAFETY: each row's warp writes all of its row before anything reads it
            let y = unsafe { dev.alloc::<T>(b - a)? };
            let rows = rows as i64;
            let mut args = func.builder();
            // bf16 is read and written as its bits (unsigned shorts)
            args.arg(&x).arg(&y).arg(&rows).arg(&cols).arg(&scale);
            // SAFETY: warp r < rows reads and writes x[r·cols ..][..cols], y likewise,
            // inside the rows·cols = b - a values of each
            unsafe { args.launch(cfg) }.w()?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev))
        }
        let dims = (rows, cols_i, self.scale);
        let out = match s.dtype() {
            DType::F32 => launch::<f32>(s, (a, b), dims, "tb_softmax_f32", ptx, cfg)?,
            DType::BF16 => launch::<bf16>(s, (a, b), dims, "tb_softmax_bf16", ptx, cfg)?,
            other => candle_core::bail!("scaled softmax: {other:?} input (f32 or bf16)"),
        };
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, DType, Device, Tensor};

    fn logits(dev: &Device) -> Result<Tensor> {
        // [2, 3, 5, 37] rows wider than a warp, values of either sign and some spread
        let n = 2 * 3 * 5 * 37;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5) * 12.0)
            .collect();
        Tensor::from_vec(v, (2, 3, 5, 37), dev)
    }

    /// The transcription is the composite's `softmax(s · x)`, in f32 and in bf16
    /// (where the composite rounds the scaled logits first: within bf16's rounding).
    #[test]
    fn the_kernel_transcription_is_the_composite_softmax() -> Result<()> {
        let x = logits(&Device::Cpu)?;
        let op = ScaledSoftmax { scale: 0.125 };
        let composite = crate::ops::softmax_last_dim(&(&x * 0.125)?)?;
        let fused = x.apply_op1_no_bwd(&op)?;
        let e = crate::testing::rel_err(&fused, &composite)?;
        assert!(e < 1e-6, "f32: {e}");
        let sums = fused.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        let xb = x.to_dtype(DType::BF16)?;
        let composite = crate::ops::softmax_last_dim(&(&xb * 0.125)?.to_dtype(DType::F32)?)?;
        let fused = xb.apply_op1_no_bwd(&op)?;
        assert_eq!(fused.dtype(), DType::BF16);
        let e = crate::testing::rel_err(&fused.to_dtype(DType::F32)?, &composite)?;
        assert!(e < 1e-2, "bf16: {e}");
        Ok(())
    }

    /// Biases as the models give them, each a view of `[2, 3, 5, 37]` logits: a
    /// position bias `[1, H, Tq, Tk]` (transposed in memory: strided), a padding mask
    /// `[B, 1, 1, Tk]` of f32::MIN on padded keys (broadcast: stride 0), and both added.
    fn biases(dev: &Device) -> Result<Vec<Tensor>> {
        let pos: Vec<f32> = (0..3 * 5 * 37)
            .map(|i| ((i * 31 % 101) as f32 / 101.0 - 0.5) * 4.0)
            .collect();
        let pos = Tensor::from_vec(pos, (1, 3, 37, 5), dev)?.transpose(2, 3)?;
        let mask: Vec<f32> = (0..2 * 37)
            .map(|i| {
                if i % 37 >= 30 - 7 * (i / 37) {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (2, 1, 1, 37), dev)?;
        let both = pos.broadcast_add(&mask)?;
        Ok(vec![pos, mask, both])
    }

    /// The bias transcription is the composite's `softmax(s · x + bias)` for every
    /// bias, in f32, and for bf16 logits with an f32 or a bf16 bias within bf16's
    /// rounding; masked keys get exactly 0.
    #[test]
    fn the_bias_kernel_transcription_is_the_composite_softmax() -> Result<()> {
        let x = logits(&Device::Cpu)?;
        let op = ScaledBiasSoftmax { scale: 0.5 };
        for (i, bias) in biases(&Device::Cpu)?.iter().enumerate() {
            let composite = crate::ops::softmax_last_dim(&(&x * 0.5)?.broadcast_add(bias)?)?;
            let b = bias.broadcast_as(x.shape())?;
            let fused = x.apply_op2_no_bwd(&b, &op)?;
            let e = crate::testing::rel_err(&fused, &composite)?;
            assert!(e < 1e-6, "bias {i}, f32: {e}");
            if i > 0 {
                // sample 1 pads its last 14 keys
                let padded = fused.get(1)?.narrow(D::Minus1, 23, 14)?;
                assert_eq!(
                    padded.abs()?.max_all()?.to_scalar::<f32>()?,
                    0.0,
                    "bias {i}"
                );
            }
            let xb = x.to_dtype(DType::BF16)?;
            for bias_dtype in [DType::F32, DType::BF16] {
                let bb = bias.to_dtype(bias_dtype)?;
                let composite = crate::ops::softmax_last_dim(
                    &(&xb * 0.5)?
                        .to_dtype(DType::F32)?
                        .broadcast_add(&bb.to_dtype(DType::F32)?)?,
                )?;
                let fused = xb.apply_op2_no_bwd(&bb.broadcast_as(x.shape())?, &op)?;
                assert_eq!(fused.dtype(), DType::BF16);
                let e = crate::testing::rel_err(&fused.to_dtype(DType::F32)?, &composite)?;
                assert!(e < 1e-2, "bias {i}, bf16 logits, {bias_dtype:?} bias: {e}");
            }
        }
        let bad = Tensor::zeros((2, 3, 5, 36), DType::F32, &Device::Cpu)?;
        let e = x.apply_op2_no_bwd(&bad, &op).unwrap_err().to_string();
        assert!(e.contains("[2, 3, 5, 36]"), "{e}");
        Ok(())
    }

    /// Two biases apart (a position bias and a padding mask, each broadcast) give
    /// what one bias of their sum gives, to the bit in f32 (the sum is taken first, as
    /// the composite takes it), and within bf16's rounding of the composite for bf16
    /// logits; mixed bias dtypes and a mask of the wrong shape are refused by name.
    #[test]
    fn two_biases_apart_are_one_bias_of_their_sum() -> Result<()> {
        let x = logits(&Device::Cpu)?;
        let op = ScaledBiasSoftmax { scale: 0.5 };
        let [pos, mask, both] = <[Tensor; 3]>::try_from(biases(&Device::Cpu)?).unwrap();
        let spread = |b: &Tensor| b.broadcast_as(x.shape());
        let apart = x.apply_op3_no_bwd(&spread(&pos)?, &spread(&mask)?, &op)?;
        let summed = x.apply_op2_no_bwd(&spread(&both)?, &op)?;
        let d = (&apart - &summed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "apart vs summed");
        // the mask still masks: sample 0 pads its last 7 keys, sample 1 its last 14
        for (b, padded) in [(0, 7), (1, 14)] {
            let p = apart.get(b)?.narrow(D::Minus1, 37 - padded, padded)?;
            assert_eq!(p.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "sample {b}");
        }
        let xb = x.to_dtype(DType::BF16)?;
        let composite = crate::ops::softmax_last_dim(
            &(&xb * 0.5)?.to_dtype(DType::F32)?.broadcast_add(&both)?,
        )?;
        let fused = xb.apply_op3_no_bwd(&spread(&pos)?, &spread(&mask)?, &op)?;
        assert_eq!(fused.dtype(), DType::BF16);
        let e = crate::testing::rel_err(&fused.to_dtype(DType::F32)?, &composite)?;
        assert!(e < 1e-2, "bf16 logits: {e}");
        let half = spread(&mask.to_dtype(DType::BF16)?)?;
        let e = x
            .apply_op3_no_bwd(&spread(&pos)?, &half, &op)
            .unwrap_err()
            .to_string();
        assert!(e.contains("F32") && e.contains("BF16"), "{e}");
        let short =
            Tensor::zeros((2, 1, 1, 36), DType::F32, &Device::Cpu)?.broadcast_as((2, 3, 5, 36))?;
        let e = x
            .apply_op3_no_bwd(&spread(&pos)?, &short, &op)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 3, 5, 36]"), "{e}");
        Ok(())
    }

    /// On a GPU the bias kernels give their transcription's values for every bias (and
    /// the two apart) and pair of dtypes they take.
    #[test]
    fn bias_softmax_kernel_matches_the_cpu_on_cuda() -> Result<()> {
        crate::testing::on_cuda("bias_softmax_kernel_matches_the_cpu_on_cuda", |dev| {
            let op = ScaledBiasSoftmax { scale: 0.5 };
            let pairs = [
                (DType::F32, DType::F32),
                (DType::BF16, DType::F32),
                (DType::BF16, DType::BF16),
            ];
            for (i, bias) in biases(&Device::Cpu)?.iter().enumerate() {
                for (xd, bd) in pairs {
                    let x = logits(&Device::Cpu)?.to_dtype(xd)?;
                    let b = bias.to_dtype(bd)?;
                    let want = x
                        .apply_op2_no_bwd(&b.broadcast_as(x.shape())?, &op)?
                        .to_dtype(DType::F32)?;
                    let (xg, bg) = (x.to_device(dev)?, biases(dev)?[i].to_dtype(bd)?);
                    let got = xg
                        .apply_op2_no_bwd(&bg.broadcast_as(xg.shape())?, &op)?
                        .to_device(&Device::Cpu)?
                        .to_dtype(DType::F32)?;
                    let e = crate::testing::rel_err(&got, &want)?;
                    let tol = if xd == DType::F32 { 1e-5 } else { 8e-3 };
                    assert!(e < tol, "bias {i}, {xd:?}/{bd:?}: {e}");
                }
            }
            // the position bias and the mask apart
            for (xd, bd) in pairs {
                let x = logits(&Device::Cpu)?.to_dtype(xd)?;
                let (cpu, gpu) = (biases(&Device::Cpu)?, biases(dev)?);
                let spread = |b: &Tensor| b.to_dtype(bd)?.broadcast_as(x.shape());
                let want = x
                    .apply_op3_no_bwd(&spread(&cpu[0])?, &spread(&cpu[1])?, &op)?
                    .to_dtype(DType::F32)?;
                let got = x
                    .to_device(dev)?
                    .apply_op3_no_bwd(&spread(&gpu[0])?, &spread(&gpu[1])?, &op)?
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?;
                let e = crate::testing::rel_err(&got, &want)?;
                let tol = if xd == DType::F32 { 1e-5 } else { 8e-3 };
                assert!(e < tol, "two biases, {xd:?}/{bd:?}: {e}");
            }
            Ok(())
        })
    }

    /// On a GPU the kernel gives its transcription's values, in f32 and bf16.
    #[test]
    fn softmax_kernel_matches_the_cpu_on_cuda() -> Result<()> {
        crate::testing::on_cuda("softmax_kernel_matches_the_cpu_on_cuda", |dev| {
            let op = ScaledSoftmax { scale: 0.125 };
            for dtype in [DType::F32, DType::BF16] {
                let cpu = logits(&Device::Cpu)?.to_dtype(dtype)?;
                let want = cpu.apply_op1_no_bwd(&op)?.to_dtype(DType::F32)?;
                let got = cpu
                    .to_device(dev)?
                    .apply_op1_no_bwd(&op)?
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?;
                let e = crate::testing::rel_err(&got, &want)?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
                assert!(e < tol, "{dtype:?}: {e}");
            }
            Ok(())
        })
    }

    /// The kernel's source compiles with NVRTC (no GPU needed).
    #[cfg(feature = "cuda")]
    #[test]
    fn softmax_kernel_compiles() {
        let ptx = candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(crate::ops::kernel_source(
            KERNEL,
        ))
        .unwrap();
        let src = ptx.to_src();
        for entry in [
            "tb_softmax_f32",
            "tb_softmax_bf16",
            "tb_bias_softmax_f32_f32",
            "tb_bias_softmax_bf16_f32",
            "tb_bias_softmax_bf16_bf16",
            "tb_bias2_softmax_f32_f32",
            "tb_bias2_softmax_bf16_f32",
            "tb_bias2_softmax_bf16_bf16",
        ] {
            assert!(src.contains(entry), "{entry}");
        }
    }
}
