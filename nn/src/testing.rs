//! Running a test on every device, in candle's habit ([`crate::test_device!`]).
//!
//! ```text
//! fn softmax_matches(dev: &Device) -> candle_core::Result<()> { ... }
//! tensorbake_nn::test_device!(softmax_matches, softmax_matches_cpu, softmax_matches_cuda);
//! ```
//!
//! The CPU test always runs. The CUDA test runs where the crate is built with the
//! `cuda` feature and a GPU answers; elsewhere it passes after printing why it was
//! skipped, so a CPU-only CI shows the skip instead of hiding the test.

use candle_core::{Device, Result};

/// Runs `f` on the CPU.
///
/// # Errors
/// Whatever `f` returns.
pub fn on_cpu(f: impl FnOnce(&Device) -> Result<()>) -> Result<()> {
    f(&Device::Cpu)
}

/// Runs `f` on the first CUDA device, or prints why not and returns `Ok`.
///
/// # Errors
/// Whatever `f` returns on the GPU.
pub fn on_cuda(name: &str, f: impl FnOnce(&Device) -> Result<()>) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(dev) => f(&dev),
            Err(e) => {
                eprintln!("{name}: skipped: no CUDA device ({e})");
                Ok(())
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = f;
        eprintln!("{name}: skipped: built without the `cuda` feature");
        Ok(())
    }
}

/// Relative error `max|a - b| / max|b|` of two tensors of the same shape, in f32.
///
/// # Errors
/// Shape mismatch or a failed conversion.
pub fn rel_err(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<f32> {
    let a = a
        .to_dtype(candle_core::DType::F32)?
        .to_device(&Device::Cpu)?;
    let b = b
        .to_dtype(candle_core::DType::F32)?
        .to_device(&Device::Cpu)?;
    if a.dims() != b.dims() {
        candle_core::bail!("rel_err: shapes {:?} and {:?}", a.dims(), b.dims());
    }
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1e-30))
}

/// Defines `$cpu` and `$cuda` tests that run `$f(&Device)` on each device
/// ([`on_cpu`], [`on_cuda`]).
#[macro_export]
macro_rules! test_device {
    ($f:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() -> candle_core::Result<()> {
            $crate::testing::on_cpu($f)
        }
        #[test]
        fn $cuda() -> candle_core::Result<()> {
            $crate::testing::on_cuda(stringify!($cuda), $f)
        }
    };
}

/// `x` `[B, C, H, W]` as a channels-last tensor: the same shape and values, NHWC
/// memory ([`crate::ops::channels_last`]).
///
/// # Errors
/// A rank other than 4.
pub fn to_channels_last(x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    x.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))
}

/// Whether `t` is channels-last and not also contiguous NCHW (a layout-keeping op's
/// result, where candle's op would have written NCHW).
#[must_use]
pub fn is_strictly_channels_last(t: &candle_core::Tensor) -> bool {
    !t.is_contiguous() && crate::ops::channels_last(t).is_some()
}
