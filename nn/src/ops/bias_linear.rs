//! `x · wᵀ + b` as one cuBLASLt call, for inference on CUDA in bf16: the bias is added
//! in the GEMM's epilogue (in f32, rounded once with the product), where the
//! composite writes the product, reads it back for a broadcast add and writes it again.
//!
//! For SigLIP so400m at 384 px (729 tokens, 27 layers; per token q/k/v stacked,
//! the output projection and the two MLP products make 10 064 output features) the
//! bias passes are ~0.8 GB of memory traffic per image, a tenth of the 1.7 ms per
//! image that beating compiled PyTorch on an H200 leaves; CLIP's layers likewise. T5
//! has no biases.
//!
//! [`BiasLinear`]'s `cpu_fwd` is the definition (f32 sums, one rounding), the
//! reference its GPU test holds the CUDA path to. [`super::linear`] takes the CUDA
//! path for bf16 without a gradient unless `TENSORBAKE_LINEAR=candle` (to measure
//! candle's matmul and add beside it). Operands that are not 256-byte aligned (what
//! cuBLASLt's heuristic assumes by default) go to candle's matmul and broadcast add
//! for that call; a shape cuBLASLt refuses goes there from then on, logged once.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The op over `(x [m, k], w [n, k], b [n])`, all contiguous and of one dtype:
/// `[m, n]`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU side is the tests' reference
pub(crate) struct BiasLinear;

/// `(m, k, n)` of the op's operands.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn dims(lx: &Layout, lw: &Layout, lb: &Layout) -> Result<(usize, usize, usize)> {
    let shapes = || format!("x {:?}, w {:?}, b {:?}", lx.shape(), lw.shape(), lb.shape());
    match (lx.shape().dims(), lw.shape().dims(), lb.shape().dims()) {
        (&[m, k], &[n, kw], &[nb]) if kw == k && nb == n => Ok((m, k, n)),
        _ => candle_core::bail!("bias linear: {} (x [m, k], w [n, k], b [n])", shapes()),
    }
}

impl CustomOp3 for BiasLinear {
    fn name(&self) -> &'static str {
        "bias-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = dims(lx, lw, lb)?;
        if sw.dtype() != sx.dtype() || sb.dtype() != sx.dtype() {
            candle_core::bail!(
                "bias linear: x {:?}, w {:?}, b {:?} (one dtype)",
                sx.dtype(),
                sw.dtype(),
                sb.dtype()
            );
        }
        let x = super::cpu_f32s(sx, lx, "bias linear: x")?;
        let w = super::cpu_f32s(sw, lw, "bias linear: w")?;
        let b = super::cpu_f32s(sb, lb, "bias linear: b")?;
        let mut y = vec![0f32; m * n];
        for (xr, yr) in x.chunks_exact(k.max(1)).zip(y.chunks_exact_mut(n.max(1))) {
            for ((o, wr), bj) in yr.iter_mut().zip(w.chunks_exact(k.max(1))).zip(&b) {
                *o = xr.iter().zip(wr).map(|(a, c)| a * c).sum::<f32>() + bj;
            }
        }
        Ok((super::cpu_storage(y, sx.dtype()), Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::launch((sx, lx), (sw, lw), (sb, lb))
    }
}

/// Whether [`super::linear`] takes the cuBLASLt path on CUDA: unless
/// `TENSORBAKE_LINEAR=candle`.
#[must_use]
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TENSORBAKE_LINEAR").map_or(true, |v| v != "candle"))
}

/// [`super::linear`]'s CUDA path for bf16 `x` `[..., k]`, `w` `[n, k]`, `b` `[n]`:
/// `[..., n]`, or `None` where cuBLASLt does not take the operands (logged once per
/// shape; the caller's composite then does it).
///
/// # Errors
/// Copies and reshapes.
pub(crate) fn try_linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        cuda::try_linear(x, w, b)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, b);
        Ok(None)
    }
}

/// The cuBLASLt side (built with the `cuda` feature).
#[cfg(feature = "cuda")]
mod cuda {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::DeviceId;
    use candle_core::cuda_backend::cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};
    use half::bf16;

    /// The alignment cuBLASLt's heuristic assumes of every operand by default (bytes):
    /// checked of each view's offset before the op (allocations are aligned), and of
    /// the pointers inside it.
    const ALIGN: u64 = 256;

    /// Shapes cuBLASLt refused: they go to candle from then on.
    static REFUSED: crate::ops::Refusals = crate::ops::Refusals::new();

    thread_local! {
        /// A cuBLASLt handle (and its workspace) per device, on candle's stream.
        static HANDLES: RefCell<HashMap<DeviceId, CudaBlasLT>> = RefCell::new(HashMap::new());
    }

    pub(super) fn try_linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = w.dims2()?;
        let key = format!("{:?} {:?} {:?}", x.dtype(), x.dims(), w.dims());
        if REFUSED.contains(&key) {
            return Ok(None);
        }
        let m = x.elem_count() / k.max(1);
        let x2 = x.reshape((m, k))?.contiguous()?;
        let (w, b) = (w.contiguous()?, b.to_dtype(x.dtype())?.contiguous()?);
        // alignment is the call's, not the shape's: a view into its storage goes to
        // candle this once, and the shape is not marked refused
        let aligned = |t: &Tensor| {
            ((t.layout().start_offset() * t.dtype().size_in_bytes()) as u64).is_multiple_of(ALIGN)
        };
        if ![&x2, &w, &b].into_iter().all(aligned) {
            return Ok(None);
        }
        match x2.apply_op3_no_bwd(&w, &b, &super::BiasLinear) {
            Ok(y) => {
                let mut dims = x.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = n;
                }
                Ok(Some(y.reshape(dims)?))
            }
            Err(e) => {
                REFUSED.refuse(key, "cuBLASLt linear", &e, "candle's matmul");
                Ok(None)
            }
        }
    }

    /// `y = x · wᵀ + b` in bf16 through cuBLASLt with the bias epilogue.
    #[allow(unsafe_code)]
    pub(super) fn launch(
        (sx, lx): (&CudaStorage, &Layout),
        (sw, lw): (&CudaStorage, &Layout),
        (sb, lb): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (m, k, n) = super::dims(lx, lw, lb)?;
        if [sx.dtype(), sw.dtype(), sb.dtype()] != [DType::BF16; 3] {
            candle_core::bail!(
                "bias linear on CUDA takes bf16 operands (x {:?}, w {:?}, b {:?})",
                sx.dtype(),
                sw.dtype(),
                sb.dtype()
            );
        }
        let span = |l: &Layout, what: &str| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg(format!("bias linear: {what} is not contiguous"))
            })
        };
        let ((xa, xz), (wa, wz), (ba, bz)) = (span(lx, "x")?, span(lw, "w")?, span(lb, "b")?);
        let dev = sx.device().clone();
        let stream = dev.cuda_stream();
        let xs = sx.as_cuda_slice::<bf16>()?.slice(xa..xz);
        let ws = sw.as_cuda_slice::<bf16>()?.slice(wa..wz);
        let bs = sb.as_cuda_slice::<bf16>()?.slice(ba..bz);
        for (view, what) in [(&xs, "x"), (&ws, "w"), (&bs, "b")] {
            let (ptr, _sync) = view.device_ptr(&stream);
            if ptr % ALIGN != 0 {
                candle_core::bail!("bias linear: {what} is not {ALIGN}-byte aligned");
            }
        }
        // column-major, as cuBLASLt reads: w [n, k] row-major is k x n with ld k, taken
        // transposed; x [m, k] is k x m with ld k; y [m, n] is the n x m product with
        // ld n, the bias one value per row of it (per output feature)
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: cuBLASLt writes every element of `y` (beta = 0: none is read)
        let mut y = unsafe { dev.alloc::<bf16>(m * n)? };
        HANDLES.with(|handles| -> Result<()> {
            let mut handles = handles.borrow_mut();
            let lt = match handles.entry(dev.id()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(
                    CudaBlasLT::new(stream.clone())
                        .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt handle: {e:?}")))?,
                ),
            };
            // SAFETY: the three operands are read inside their slices as the layouts
            // above describe (k·n of w, k·m of x, n of b), m·n values of `y` written;
            // all on candle's stream, which the handle was made on
            unsafe { lt.matmul(cfg, &ws, &xs, &mut y, Some(&bs), None) }
                .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt matmul: {e:?}")))
        })?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Deterministic values in [-1, 1) of `shape`.
    fn values(shape: &[usize], seed: usize, dev: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, dev)
    }

    /// The op's definition is the composite `x · wᵀ + b`: to f32 rounding, and for
    /// bf16 operands within the output's rounding of the same sums in f32 (the
    /// composite rounds the product and then the sum); operands that do not fit
    /// are refused by shape and dtype.
    #[test]
    fn the_definition_is_the_composite_linear() -> Result<()> {
        let dev = Device::Cpu;
        let (x, w, b) = (
            values(&[37, 72], 1, &dev)?,
            values(&[100, 72], 2, &dev)?,
            values(&[100], 3, &dev)?,
        );
        let composite = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        let got = x.apply_op3_no_bwd(&w, &b, &BiasLinear)?;
        assert_eq!(got.dims(), &[37, 100]);
        let e = crate::testing::rel_err(&got, &composite)?;
        assert!(e < 1e-5, "f32: {e}");
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let got = bf(&x)?.apply_op3_no_bwd(&bf(&w)?, &bf(&b)?, &BiasLinear)?;
        assert_eq!(got.dtype(), DType::BF16);
        let f = |t: &Tensor| bf(t)?.to_dtype(DType::F32);
        let want = f(&x)?.matmul(&f(&w)?.t()?)?.broadcast_add(&f(&b)?)?;
        let e = crate::testing::rel_err(&got, &want)?;
        assert!(e < 8e-3, "bf16: {e}");
        // k of x and w differ; b of the wrong length; mixed dtypes
        let e = x
            .apply_op3_no_bwd(&values(&[100, 71], 2, &dev)?, &b, &BiasLinear)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[100, 71]") && e.contains("[37, 72]"), "{e}");
        let e = x
            .apply_op3_no_bwd(&w, &values(&[99], 3, &dev)?, &BiasLinear)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[99]"), "{e}");
        let e = x
            .apply_op3_no_bwd(&bf(&w)?, &b, &BiasLinear)
            .unwrap_err()
            .to_string();
        assert!(e.contains("BF16") && e.contains("one dtype"), "{e}");
        Ok(())
    }

    /// On a GPU, cuBLASLt's product with the bias epilogue gives the definition's
    /// values (the op applied directly, so a refusal fails the test), and the seam's
    /// `linear` gives them for rank-3 activations and for an `x` whose storage
    /// offset is not aligned (which it hands to candle's matmul).
    #[test]
    fn bias_linear_matches_the_cpu_on_cuda() -> Result<()> {
        crate::testing::on_cuda("bias_linear_matches_the_cpu_on_cuda", |dev| {
            let bf = |t: &Tensor| t.to_dtype(DType::BF16);
            for (m, k, n) in [(37, 72, 100), (729, 1152, 192), (8, 64, 8)] {
                let cpu = Device::Cpu;
                let (x, w, b) = (
                    bf(&values(&[m, k], 4, &cpu)?)?,
                    bf(&values(&[n, k], 5, &cpu)?)?,
                    bf(&values(&[n], 6, &cpu)?)?,
                );
                let want = x.apply_op3_no_bwd(&w, &b, &BiasLinear)?;
                let (xg, wg, bg) = (x.to_device(dev)?, w.to_device(dev)?, b.to_device(dev)?);
                let got = xg.apply_op3_no_bwd(&wg, &bg, &BiasLinear)?;
                let e = crate::testing::rel_err(&got.to_device(&cpu)?, &want)?;
                assert!(e < 8e-3, "[{m}, {k}] x [{n}, {k}]: {e}");
                let seam = super::super::linear(&xg.reshape((1, m, k))?, &wg, Some(&bg))?;
                assert_eq!(seam.dims(), &[1, m, n]);
                let e = crate::testing::rel_err(&seam.to_device(&cpu)?.squeeze(0)?, &want)?;
                assert!(e < 8e-3, "the seam, [{m}, {k}] x [{n}, {k}]: {e}");
            }
            // one row in: 72 bf16 values, 144 bytes, not 256-byte aligned
            let cpu = Device::Cpu;
            let x = bf(&values(&[9, 72], 7, &cpu)?)?;
            let (w, b) = (
                bf(&values(&[40, 72], 8, &cpu)?)?,
                bf(&values(&[40], 9, &cpu)?)?,
            );
            let want = x.narrow(0, 1, 8)?.apply_op3_no_bwd(&w, &b, &BiasLinear)?;
            let xg = x.to_device(dev)?.narrow(0, 1, 8)?;
            let (wg, bg) = (w.to_device(dev)?, b.to_device(dev)?);
            let e = xg
                .apply_op3_no_bwd(&wg, &bg, &BiasLinear)
                .unwrap_err()
                .to_string();
            assert!(e.contains("aligned"), "{e}");
            let seam = super::super::linear(&xg, &wg, Some(&bg))?;
            let e = crate::testing::rel_err(&seam.to_device(&cpu)?, &want)?;
            assert!(e < 2e-2, "unaligned x through the seam: {e}");
            Ok(())
        })
    }
}
