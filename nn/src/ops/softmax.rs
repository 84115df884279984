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
//! [`ScaledSoftmax::cpu_fwd`] is the kernel's transcription, the reference the tests
//! hold the composite against; [`super::attention`] takes the kernel only on CUDA
//! for attention without a bias when no gradient is needed. It differs from the
//! composite by rounding: the scaled logits are not rounded to the input dtype
//! before the softmax.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
#[cfg(feature = "cuda")]
use {candle_core::DType, half::bf16};

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

/// The kernel in Rust over one row.
fn softmax_row(x: &[f32], scale: f32, y: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
    let s: f32 = x.iter().map(|&v| (v * scale - m).exp()).sum();
    let inv = 1.0 / s;
    for (o, &v) in y.iter_mut().zip(x) {
        *o = (v * scale - m).exp() * inv;
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
            softmax_row(xr, self.scale, yr);
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
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
            std::sync::OnceLock::new();
        const WARPS: usize = 8;
        let (rows, cols) = rows_cols(l)?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("scaled softmax: the input is not contiguous")
        };
        let cols_i = i32::try_from(cols)
            .map_err(|_| candle_core::Error::Msg(format!("scaled softmax: {cols} columns")))?;
        let blocks = u32::try_from(rows.div_ceil(WARPS))
            .map_err(|_| candle_core::Error::Msg(format!("scaled softmax: {rows} rows")))?;
        let ptx = super::nvrtc_ptx(&PTX, KERNEL, "tensorbake_softmax")?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
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
        assert!(src.contains("tb_softmax_f32") && src.contains("tb_softmax_bf16"));
    }
}
