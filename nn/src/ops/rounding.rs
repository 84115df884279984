//! Stochastic rounding of f32 to bf16: what keeps bf16 master weights trainable.
//!
//! A bf16 weight keeps 8 significant bits; an optimizer update smaller than half its
//! last place vanishes under round-to-nearest, so at small learning rates a bf16 master
//! stops learning. Rounding up with probability equal to the remainder's fraction of
//! the last place makes the rounded value unbiased (`E[round(x)] = x`), so small
//! updates survive on average ([Gupta et al. 2015], as Flux fine-tuners on one GPU
//! use with Adafactor).
//!
//! The bit form: the f32's low 16 bits plus a uniform random 16-bit integer, carried
//! into the high 16 bits, then truncated: the magnitude rounds up exactly when the
//! random integer is at least `65536 - low`, i.e. with probability `low / 65536`. The
//! random integers come from a counter-based hash of `(seed, element index)`, so the
//! result depends only on the values, the seed and the layout: the CPU and CUDA paths
//! give the same bits, and an update made block by block rounds as one made at once.
//! NaN and infinities convert as `to_dtype` does; a finite value never rounds to
//! infinity.
//!
//! [Gupta et al. 2015]: https://arxiv.org/abs/1502.02551

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::bf16;

/// SplitMix64's finaliser: a 64-bit mix of the seed and the element's index.
#[inline]
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One value: `x` rounded to bf16 with the random 16 bits `r`.
#[inline]
fn round_one(x: f32, r: u32) -> bf16 {
    if !x.is_finite() {
        return bf16::from_f32(x);
    }
    let bits = x.to_bits();
    let up = bits.wrapping_add(r & 0xFFFF) & 0xFFFF_0000;
    let y = f32::from_bits(up);
    if y.is_finite() {
        bf16::from_bits((up >> 16) as u16)
    } else {
        // the largest finite magnitude: truncate instead
        bf16::from_bits((bits >> 16) as u16)
    }
}

struct StochasticRound {
    seed: u64,
}

#[cfg(feature = "cuda")]
const KERNEL: &str = r#"
extern "C" __global__ void tensorbake_sr_bf16(
    const float* x, unsigned short* out, unsigned long long seed, unsigned long long n) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z = z ^ (z >> 31);
  float v = x[i];
  unsigned int bits = __float_as_uint(v);
  if (isnan(v) || isinf(v)) {
    // round to nearest even, as a plain conversion does
    unsigned int lsb = (bits >> 16) & 1u;
    out[i] = isnan(v) ? (unsigned short)((bits >> 16) | 0x40u)
                      : (unsigned short)((bits + 0x7FFFu + lsb) >> 16);
    return;
  }
  unsigned int up = (bits + ((unsigned int)z & 0xFFFFu)) & 0xFFFF0000u;
  if (isinf(__uint_as_float(up))) up = bits & 0xFFFF0000u;
  out[i] = (unsigned short)(up >> 16);
}
"#;

impl CustomOp1 for StochasticRound {
    fn name(&self) -> &'static str {
        "stochastic-round-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("stochastic rounding takes f32, got {:?}", s.dtype())
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("stochastic rounding: the input is not contiguous")
        };
        let out: Vec<bf16> = v[a..b]
            .iter()
            .enumerate()
            .map(|(i, &x)| round_one(x, mix(self.seed, i as u64) as u32))
            .collect();
        Ok((CpuStorage::BF16(out), l.shape().clone()))
    }

    // the one unsafe block of this op: allocating the output and launching the kernel
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
            std::sync::OnceLock::new();
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("stochastic rounding: the input is not contiguous")
        };
        let dev = s.device().clone();
        let x = s.as_cuda_slice::<f32>()?.slice(a..b);
        let n = b - a;
        let ptx = super::nvrtc_ptx(&PTX, KERNEL, "tensorbake_rounding")?;
        let func = dev.get_or_load_custom_func("tensorbake_sr_bf16", "tensorbake_rounding", ptx)?;
        // SAFETY: every element of `out` is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let (seed, count) = (self.seed, n as u64);
        let mut launch = func.builder();
        launch.arg(&x);
        // the kernel writes the bf16 bits as unsigned shorts (same size and layout)
        launch.arg(&out);
        launch.arg(&seed);
        launch.arg(&count);
        // SAFETY: the kernel reads `n` f32 and writes `n` 16-bit values, the sizes given.
        unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            l.shape().clone(),
        ))
    }
}

/// `x` (any float dtype; computed from its f32 value) rounded to bf16 stochastically,
/// the random bits drawn from `seed` and each element's index.
///
/// # Errors
/// candle errors.
pub fn stochastic_round_bf16(x: &Tensor, seed: u64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    x.apply_op1_no_bwd(&StochasticRound { seed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn neighbours(x: f32) -> (f32, f32) {
        // the bf16 values just below and above |x|, signed as x
        let lo = f32::from_bits(x.to_bits() & 0xFFFF_0000);
        let hi = f32::from_bits((x.to_bits() & 0xFFFF_0000) + 0x1_0000);
        (lo, hi)
    }

    #[test]
    fn rounds_to_a_neighbour_with_the_remainder_as_probability() -> Result<()> {
        let dev = Device::Cpu;
        for &x in &[1.0f32 + 3.0 / 1024.0, -0.3171, 1234.567, 3.0e-5] {
            let n = 20_000;
            let t = Tensor::full(x, n, &dev)?;
            let r: Vec<f32> = stochastic_round_bf16(&t, 7)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let (lo, hi) = neighbours(x);
            assert!(r.iter().all(|&v| v == lo || v == hi), "{x}: {lo} {hi}");
            let p_hi = r.iter().filter(|&&v| v == hi).count() as f64 / n as f64;
            let want = f64::from((x - lo) / (hi - lo));
            assert!((p_hi - want).abs() < 0.015, "{x}: P(up) {p_hi} want {want}");
            let mean = r.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let ulp = f64::from((hi - lo).abs());
            assert!(
                (mean - f64::from(x)).abs() < 0.02 * ulp,
                "{x}: mean {mean} (ulp {ulp})"
            );
            // round to nearest would always give the same one
            assert!(p_hi > 0.0 && p_hi < 1.0, "{x}");
        }
        Ok(())
    }

    #[test]
    fn exact_values_special_values_and_determinism() -> Result<()> {
        let dev = Device::Cpu;
        let xs = [
            0.0f32,
            -0.0,
            1.5,
            -2.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::NAN,
        ];
        let t = Tensor::new(&xs, &dev)?;
        let a: Vec<f32> = stochastic_round_bf16(&t, 1)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        for (x, y) in xs.iter().zip(&a).take(4) {
            assert_eq!(x.to_bits(), y.to_bits(), "{x} is a bf16 value");
        }
        assert_eq!(a[4], f32::INFINITY);
        assert_eq!(a[5], f32::NEG_INFINITY);
        assert!(a[6].is_finite(), "f32::MAX must not round to infinity");
        assert!(a[7].is_nan());
        // same seed, same bits; another seed, other bits
        let x = Tensor::randn(0f32, 1.0, 4096, &dev)?;
        let r1 = stochastic_round_bf16(&x, 3)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let r2 = stochastic_round_bf16(&x, 3)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let r3 = stochastic_round_bf16(&x, 4)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        assert_eq!(r1, r2);
        assert_ne!(r1, r3);
        Ok(())
    }
}

#[cfg(all(test, feature = "cuda"))]
mod kernel_tests {
    /// The kernel's source compiles with NVRTC (no GPU needed).
    #[test]
    fn rounding_kernel_compiles() {
        let ptx = candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(super::KERNEL).unwrap();
        assert!(ptx.to_src().contains("tensorbake_sr_bf16"));
    }
}
