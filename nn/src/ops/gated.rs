//! T5 v1.1's gated GELU, `gelu_tanh(a) · g` for `[a | g] = x · [wi_0 | wi_1]ᵀ`, as one
//! kernel for inference on CUDA: it reads the stacked product's two halves and writes
//! the product, where the composite runs a strided GELU and a multiply (two kernels,
//! an intermediate the size of the output).
//!
//! `gelu_tanh(a) = a/2 · (1 + tanh(√(2/π) · (a + 0.044715 a³)))` (candle's `gelu`,
//! transformers' `gelu_new`), in f32 and rounded once to the input's dtype (f32 or
//! bf16). [`GatedGelu::cpu_fwd`] is the kernel's transcription, the reference the
//! tests hold the composite against; [`super::gated_gelu_tanh`] takes the kernel only
//! on CUDA when no gradient is needed.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
#[cfg(feature = "cuda")]
use {candle_core::DType, half::bf16};

/// The op on `[.., 2·d]`, giving `[.., d]`.
pub(crate) struct GatedGelu;

#[inline]
fn gelu_tanh(a: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * a * (1.0 + (K * (a + 0.044_715 * a * a * a)).tanh())
}

/// The output shape and `d`.
fn out_shape(l: &Layout) -> Result<(Shape, usize)> {
    let mut dims = l.shape().dims().to_vec();
    let last = dims
        .last_mut()
        .ok_or_else(|| candle_core::Error::Msg("gated gelu: a scalar has no last axis".into()))?;
    if *last % 2 != 0 {
        candle_core::bail!("gated gelu: the last axis ({}) is not two halves", *last);
    }
    *last /= 2;
    let d = *last;
    Ok((Shape::from(dims), d))
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"

template <typename T>
__device__ void tb_gated_gelu(const T* h, T* y, long long d, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  long long row = i / d, col = i % d;
  float a = tb_load(h, row * 2 * d + col);
  float g = tb_load(h, row * 2 * d + d + col);
  float u = 0.7978845608f * (a + 0.044715f * a * a * a);
  tb_store(y, i, 0.5f * a * (1.0f + tanhf(u)) * g);
}

extern "C" __global__ void tb_gated_gelu_f32(const float* h, float* y, long long d, long long n) {
  tb_gated_gelu<float>(h, y, d, n);
}
extern "C" __global__ void tb_gated_gelu_bf16(const unsigned short* h, unsigned short* y,
                                              long long d, long long n) {
  tb_gated_gelu<unsigned short>(h, y, d, n);
}
"#;

impl CustomOp1 for GatedGelu {
    fn name(&self) -> &'static str {
        "gated-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (shape, d) = out_shape(l)?;
        let h = super::cpu_f32s(s, l, "gated gelu: the input")?;
        let y: Vec<f32> = h
            .chunks_exact(2 * d.max(1))
            .flat_map(|row| {
                let (a, g) = row.split_at(d);
                a.iter().zip(g).map(|(&a, &g)| gelu_tanh(a) * g)
            })
            .collect();
        Ok((super::cpu_storage(y, s.dtype()), shape))
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
        let (shape, d) = out_shape(l)?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gated gelu: the input is not contiguous")
        };
        let n = (b - a) / 2;
        let ptx = super::nvrtc_ptx(&PTX, KERNEL, "tensorbake_gated_gelu")?;
        let cfg = LaunchConfig::for_num_elems(n as u32);
        // one launch for either dtype: the kernel `tb_gated_gelu_{f32,bf16}`
        fn launch<T: CudaDType + DeviceRepr>(
            s: &candle_core::CudaStorage,
            (a, b): (usize, usize),
            (d, n): (usize, usize),
            name: &str,
            ptx: &str,
            cfg: LaunchConfig,
        ) -> Result<candle_core::CudaStorage> {
            let dev = s.device().clone();
            let h = s.as_cuda_slice::<T>()?.slice(a..b);
            let func = dev.get_or_load_custom_func(name, "tensorbake_gated_gelu", ptx)?;
            // SAFETY: the kernel writes every one of the `n` outputs before any read.
            let y = unsafe { dev.alloc::<T>(n)? };
            let (dd, nn) = (d as i64, n as i64);
            let mut args = func.builder();
            // bf16 is read and written as its bits (unsigned shorts)
            args.arg(&h).arg(&y).arg(&dd).arg(&nn);
            // SAFETY: thread i < n reads h[row·2d + col], h[row·2d + d + col] < 2n
            // and writes y[i].
            unsafe { args.launch(cfg) }.w()?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev))
        }
        let out = match s.dtype() {
            DType::F32 => launch::<f32>(s, (a, b), (d, n), "tb_gated_gelu_f32", ptx, cfg)?,
            DType::BF16 => launch::<bf16>(s, (a, b), (d, n), "tb_gated_gelu_bf16", ptx, cfg)?,
            other => candle_core::bail!("gated gelu: {other:?} input (f32 or bf16)"),
        };
        Ok((out, shape))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    /// The kernel's source compiles with NVRTC (no GPU needed).
    #[test]
    fn gated_gelu_kernel_compiles() {
        let ptx = candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(crate::ops::kernel_source(
            super::KERNEL,
        ))
        .unwrap();
        let src = ptx.to_src();
        assert!(src.contains("tb_gated_gelu_f32") && src.contains("tb_gated_gelu_bf16"));
    }
}
