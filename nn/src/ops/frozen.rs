//! `x · wᵀ` for a constant `w` whose backward computes only the input gradient.
//!
//! candle's matmul backward always computes both operands' gradients, so a frozen
//! layer on the gradient path would pay a second matmul per layer and hold a
//! weight-sized gradient nobody reads. [`frozen_matmul`] is a custom op over `x` alone:
//! the forward runs the backend's own matmul against the captured weight, the backward
//! returns `grad · w` and nothing else.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// `[n, k]`, contiguous, the dtype and device of the input.
    w: Tensor,
}

impl FrozenMatmul {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, Layout)> {
        let (m, k) = l.shape().dims2()?;
        let (n, kw) = self.w.dims2()?;
        if k != kw {
            candle_core::bail!("frozen matmul: input [{m}, {k}] against weight [{n}, {kw}]");
        }
        let (_, wl) = self.w.storage_and_layout();
        Ok((m, n, k, wl.transpose(0, 1)?))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k, wt) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen matmul: the weight is not on the CPU")
        };
        Ok((s.matmul(ws, (1, m, n, k), l, &wt)?, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k, wt) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("frozen matmul: the weight is not on the GPU")
        };
        Ok((s.matmul(ws, (1, m, n, k), l, &wt)?, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// `x · wᵀ` with `x` `[m, k]` and a constant `w` `[n, k]` of `x`'s dtype and device:
/// `[m, n]`, differentiable in `x` only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op1(FrozenMatmul { w: w.contiguous()? })
}
