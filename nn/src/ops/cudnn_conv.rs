//! 2-D convolution through cuDNN, channels-last: the image encoders' CUDA fast path
//! (inference only: no gradient is recorded).
//!
//! candle's cuDNN convolution (candle-core 0.11 `cuda_backend/cudnn.rs`) describes
//! every tensor as NCHW, builds its descriptors and asks cuDNN's heuristic for an
//! algorithm on every call without setting the math type, allocates and zeroes a
//! workspace per call, and adds the bias with a separate broadcast. Here:
//!
//! - input and output are NHWC (channels-last, the layout the tensor-core kernels
//!   read), the filter KRSC ([`conv2d_nhwc`]);
//! - the algorithm of each shape is chosen once, by timing every candidate on the
//!   device (`cudnnFindConvolutionForwardAlgorithm`), and kept with the shape's
//!   descriptors, per thread (a cuDNN handle is not shared across threads);
//! - the math type is set: tensor cores for bf16 and f16 (f32 accumulation, as
//!   PyTorch), plain FMA for f32 (no TF32: an f32 encoder keeps f32 accuracy);
//! - one workspace per thread and device, grown to the largest need, is reused.
//!
//! [`try_conv2d`] is what [`super::conv2d`] calls: it takes the input as NHWC (a
//! copy for an NCHW input, none for a channels-last one, [`super::channels_last`]),
//! convolves, and hands back the NHWC output as a channels-last NCHW view, to which
//! the caller adds the bias in that layout: a VAE's activations stay NHWC from one
//! convolution to the next. [`try_conv2d_onto`] ([`super::conv2d_add`]) accumulates
//! the convolution onto an NHWC buffer holding `residual + bias` (`beta = 1`, the
//! sum taken in f32 and rounded once), in place of a separate residual add. A shape
//! or dtype this cuDNN refuses falls back to candle's convolution, logged once per
//! shape.

use candle_core::{Result, Tensor};
#[cfg(feature = "cudnn")]
use cuda::CudnnConv;

/// Padding, stride and dilation (height, width) of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Zero padding on each side.
    pub pad: [usize; 2],
    /// Stride.
    pub stride: [usize; 2],
    /// Dilation.
    pub dilation: [usize; 2],
}

impl Geometry {
    /// The output size along one axis.
    fn out(&self, axis: usize, input: usize, kernel: usize) -> Option<usize> {
        let span = self.dilation[axis] * (kernel - 1) + 1;
        (input + 2 * self.pad[axis])
            .checked_sub(span)
            .map(|d| d / self.stride[axis] + 1)
    }
}

/// `x` `[N, H, W, C]` convolved with `w` `[K, R, S, C]` (KRSC), `[N, P, Q, K]`; no
/// bias, no groups. On CUDA through cuDNN; on the CPU the same arithmetic through
/// candle's NCHW convolution (the reference the CUDA path is tested against).
///
/// # Errors
/// Shapes that do not agree or give no output; cuDNN's errors.
pub fn conv2d_nhwc(x: &Tensor, w: &Tensor, g: Geometry) -> Result<Tensor> {
    let (_, h, wd, c) = x.dims4()?;
    let (_, r, s, cw) = w.dims4()?;
    if c != cw || g.out(0, h, r).is_none() || g.out(1, wd, s).is_none() {
        return Err(candle_core::Error::Msg(format!(
            "conv2d_nhwc: input {:?} and KRSC filter {:?} do not convolve with {g:?}",
            x.dims(),
            w.dims()
        )));
    }
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda() {
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        return x.apply_op2_no_bwd(&w, &CudnnConv(g));
    }
    let square = |v: [usize; 2], what: &str| {
        if v[0] == v[1] {
            Ok(v[0])
        } else {
            Err(candle_core::Error::Msg(format!(
                "conv2d_nhwc on the CPU takes the same {what} on both axes, not {v:?}"
            )))
        }
    };
    let y = x.permute((0, 3, 1, 2))?.conv2d(
        &w.permute((0, 3, 1, 2))?,
        square(g.pad, "padding")?,
        square(g.stride, "stride")?,
        square(g.dilation, "dilation")?,
        1,
    )?;
    y.permute((0, 2, 3, 1))?.contiguous()
}

/// Whether [`super::conv2d`] takes the cuDNN NHWC path on CUDA: unless
/// `TENSORBAKE_CONV=candle` (to measure candle's own convolution beside it).
#[must_use]
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TENSORBAKE_CONV").map_or(true, |v| v != "candle"))
}

#[cfg(feature = "cudnn")]
pub(crate) use cuda::{try_conv2d, try_conv2d_onto};

/// The cuDNN side (built with the `cudnn` feature).
#[cfg(feature = "cudnn")]
mod cuda {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cudnn::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr,
    };
    use candle_core::cuda_backend::{CudaDType, DeviceId};
    use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Tensor, WithDType};

    use super::Geometry;

    /// The most workspace an algorithm may ask for (bytes); faster ones that need
    /// more are passed over.
    const WORKSPACE_LIMIT: usize = 4 << 30;

    /// Shapes (with their device and dtype) cuDNN refused: they go to candle from then on.
    static REFUSED: crate::ops::Refusals = crate::ops::Refusals::new();

    /// [`super::conv2d`]'s CUDA path for NCHW `x` `[N, C, H, W]` and `w` `[K, C, R, S]`:
    /// the convolution (no bias) as an NCHW view of an NHWC result, or `None` when cuDNN
    /// refuses this shape (logged once; candle's convolution then does it).
    ///
    /// # Errors
    /// Errors other than cuDNN's refusal (copies, shapes).
    pub(crate) fn try_conv2d(x: &Tensor, w: &Tensor, g: Geometry) -> Result<Option<Tensor>> {
        refusable(x, w, g, |x_nhwc, w_krsc| {
            x_nhwc.apply_op2_no_bwd(w_krsc, &CudnnConv(g))
        })
    }

    /// [`super::super::conv2d_add`]'s CUDA path: the convolution of NCHW `x` by `w`
    /// accumulated onto `acc`, a contiguous NHWC tensor of the output's shape that the
    /// caller made for it (`residual + bias`), returned as its channels-last view; or
    /// `None` when cuDNN refuses this shape or the accumulator does not fit it (an
    /// `acc` not contiguous or not of the output's shape; logged once, and the caller's
    /// composite then names the shapes).
    ///
    /// # Errors
    /// Copies.
    pub(crate) fn try_conv2d_onto(
        x: &Tensor,
        w: &Tensor,
        g: Geometry,
        acc: &Tensor,
    ) -> Result<Option<Tensor>> {
        refusable(x, w, g, |x_nhwc, w_krsc| {
            acc.inplace_op3(x_nhwc, w_krsc, &CudnnConvOnto(g))?;
            Ok(acc.clone())
        })
    }

    /// Runs `conv` on `x` as NHWC and `w` as KRSC, the result as a channels-last NCHW
    /// view; `None` (and the shape remembered) when cuDNN refuses the shape.
    fn refusable(
        x: &Tensor,
        w: &Tensor,
        g: Geometry,
        conv: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        let key = format!("{:?} {:?} {:?} {g:?}", x.dtype(), x.dims(), w.dims());
        if REFUSED.contains(&key) {
            return Ok(None);
        }
        // free for a channels-last `x`
        let x_nhwc = x.permute((0, 2, 3, 1))?.contiguous()?;
        let w_krsc = w.permute((0, 2, 3, 1))?.contiguous()?;
        match conv(&x_nhwc, &w_krsc) {
            Ok(y) => Ok(Some(y.permute((0, 3, 1, 2))?)),
            Err(e) => {
                REFUSED.refuse(key, "cuDNN NHWC convolution", &e, "candle's convolution");
                Ok(None)
            }
        }
    }

    /// How many algorithm searches this thread has run (one per new shape).
    #[cfg(test)]
    pub fn searches_on_this_thread() -> usize {
        STATE.with(|s| s.borrow().values().map(|t| t.searches).sum())
    }

    pub(super) struct CudnnConv(pub(super) Geometry);

    impl candle_core::CustomOp2 for CudnnConv {
        fn name(&self) -> &'static str {
            "cudnn-conv2d-nhwc"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            Err(candle_core::Error::Msg(
                "cudnn-conv2d-nhwc runs on CUDA only (conv2d_nhwc takes the CPU path itself)"
                    .into(),
            ))
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            match x.dtype() {
                DType::BF16 => launch::<half::bf16>(self.0, x, xl, w, wl),
                DType::F16 => launch::<half::f16>(self.0, x, xl, w, wl),
                DType::F32 => launch::<f32>(self.0, x, xl, w, wl),
                d => Err(candle_core::Error::Msg(format!(
                    "cudnn-conv2d-nhwc takes bf16, f16 or f32, not {d:?}"
                ))),
            }
        }
    }

    /// The convolution accumulated onto the tensor it is applied to (`beta = 1`).
    pub(super) struct CudnnConvOnto(pub(super) Geometry);

    impl candle_core::InplaceOp3 for CudnnConvOnto {
        fn name(&self) -> &'static str {
            "cudnn-conv2d-nhwc-onto"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            Err(candle_core::Error::Msg(
                "cudnn-conv2d-nhwc-onto runs on CUDA only".into(),
            ))
        }

        fn cuda_fwd(
            &self,
            y: &mut CudaStorage,
            yl: &Layout,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> Result<()> {
            fn onto<T: CudnnType>(
                g: Geometry,
                y: &mut CudaStorage,
                yl: &Layout,
                (x, xl, w, wl): (&CudaStorage, &Layout, &CudaStorage, &Layout),
            ) -> Result<()> {
                let out = output_shape(g, xl, wl)?;
                let Some((a, z)) = yl.contiguous_offsets() else {
                    return Err(candle_core::Error::Msg(
                        "cudnn-conv2d-nhwc-onto: the accumulator is not contiguous".into(),
                    ));
                };
                if yl.shape() != &out {
                    return Err(candle_core::Error::Msg(format!(
                        "cudnn-conv2d-nhwc-onto: the accumulator is {:?}, the output {:?}",
                        yl.shape().dims(),
                        out.dims()
                    )));
                }
                let dev = x.device().clone();
                let mut ys = y.as_cuda_slice_mut::<T>()?.slice_mut(a..z);
                convolve::<T, _>(g, &dev, (x, xl, w, wl), &mut ys, 1.0)
            }
            let inputs = (x, xl, w, wl);
            match x.dtype() {
                DType::BF16 => onto::<half::bf16>(self.0, y, yl, inputs),
                DType::F16 => onto::<half::f16>(self.0, y, yl, inputs),
                DType::F32 => onto::<f32>(self.0, y, yl, inputs),
                d => Err(candle_core::Error::Msg(format!(
                    "cudnn-conv2d-nhwc-onto takes bf16, f16 or f32, not {d:?}"
                ))),
            }
        }
    }

    /// The NHWC output shape `[N, P, Q, K]` of NHWC `x` by KRSC `w`.
    fn output_shape(g: Geometry, xl: &Layout, wl: &Layout) -> Result<Shape> {
        let (n, h, wd, _) = xl.shape().dims4()?;
        let (k, r, s, _) = wl.shape().dims4()?;
        let (Some(p), Some(q)) = (g.out(0, h, r), g.out(1, wd, s)) else {
            return Err(candle_core::Error::Msg(
                "cudnn-conv2d-nhwc: no output".into(),
            ));
        };
        Ok(Shape::from((n, p, q, k)))
    }

    /// cuDNN's name of a dtype.
    trait CudnnType: CudaDType + DeviceRepr + WithDType {
        const DATA: sys::cudnnDataType_t;
        const MATH: sys::cudnnMathType_t;
    }

    impl CudnnType for half::bf16 {
        const DATA: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16;
        const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH;
    }

    impl CudnnType for half::f16 {
        const DATA: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_HALF;
        const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH;
    }

    impl CudnnType for f32 {
        const DATA: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_FMA_MATH;
    }

    /// One shape's descriptors and the algorithm found for it.
    struct Plan {
        x: sys::cudnnTensorDescriptor_t,
        w: sys::cudnnFilterDescriptor_t,
        conv: sys::cudnnConvolutionDescriptor_t,
        y: sys::cudnnTensorDescriptor_t,
        algo: sys::cudnnConvolutionFwdAlgo_t,
        workspace: usize,
    }

    // the unsafe calls of this module: cuDNN's C API on descriptors this module owns
    #[allow(unsafe_code)]
    impl Drop for Plan {
        fn drop(&mut self) {
            // SAFETY: the descriptors were created by `Plan::new` and are destroyed once
            unsafe {
                let _ = result::destroy_tensor_descriptor(self.x);
                let _ = result::destroy_filter_descriptor(self.w);
                let _ = result::destroy_convolution_descriptor(self.conv);
                let _ = result::destroy_tensor_descriptor(self.y);
            }
        }
    }

    /// One thread's cuDNN state on one device.
    struct ThreadState {
        handle: sys::cudnnHandle_t,
        plans: HashMap<(DType, [usize; 8], Geometry), Plan>,
        workspace: Option<CudaSlice<u8>>,
        searches: usize,
    }

    #[allow(unsafe_code)]
    impl Drop for ThreadState {
        fn drop(&mut self) {
            self.plans.clear();
            // SAFETY: the handle was created by `launch` for this state alone
            unsafe {
                let _ = result::destroy_handle(self.handle);
            }
        }
    }

    thread_local! {
        static STATE: RefCell<HashMap<DeviceId, ThreadState>> =
            RefCell::new(HashMap::new());
    }

    /// The convolution into a fresh NHWC buffer.
    #[allow(unsafe_code)]
    fn launch<T: CudnnType>(
        g: Geometry,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let shape = output_shape(g, xl, wl)?;
        // SAFETY: cuDNN writes every output element (beta = 0: none is read)
        let mut out = unsafe { dev.alloc::<T>(shape.elem_count()) }?;
        convolve::<T, _>(g, &dev, (x, xl, w, wl), &mut out, 0.0)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }

    /// `y = conv(x, w) + beta · y` for NHWC `x`, KRSC `w` and NHWC `y` of the output's
    /// shape, through this thread's plan of the shape (found on first use).
    #[allow(unsafe_code)]
    fn convolve<T: CudnnType, Y: DevicePtrMut<T>>(
        g: Geometry,
        dev: &candle_core::CudaDevice,
        (x, xl, w, wl): (&CudaStorage, &Layout, &CudaStorage, &Layout),
        out: &mut Y,
        beta: f32,
    ) -> Result<()> {
        let (Some((xa, xz)), Some((wa, wz))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            return Err(candle_core::Error::Msg(
                "cudnn-conv2d-nhwc takes contiguous tensors".into(),
            ));
        };
        let (n, h, wd, c) = xl.shape().dims4()?;
        let (k, r, s, _) = wl.shape().dims4()?;
        let (_, p, q, _) = output_shape(g, xl, wl)?.dims4()?;
        if out.len() != n * p * q * k {
            return Err(candle_core::Error::Msg(format!(
                "cudnn-conv2d-nhwc: an output of {} values for {:?}",
                out.len(),
                [n, p, q, k]
            )));
        }
        let int = |v: usize| {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("{v} exceeds cuDNN's int")))
        };
        let stream = dev.cuda_stream();
        let xs = x.as_cuda_slice::<T>()?.slice(xa..xz);
        let ws = w.as_cuda_slice::<T>()?.slice(wa..wz);
        STATE.with(|state| -> Result<()> {
            let mut state = state.borrow_mut();
            let st = match state.entry(dev.id()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let handle = result::create_handle()?;
                    // SAFETY: a fresh handle; the stream is candle's (the calling thread's)
                    unsafe { result::set_stream(handle, stream.cu_stream() as sys::cudaStream_t) }?;
                    v.insert(ThreadState {
                        handle,
                        plans: HashMap::new(),
                        workspace: None,
                        searches: 0,
                    })
                }
            };
            let key = (T::DTYPE, [n, h, wd, c, k, r, s, 0], g);
            if !st.plans.contains_key(&key) {
                let plan = Plan::new::<T>(
                    st.handle,
                    [n, c, h, wd],
                    [k, c, r, s],
                    [n, k, p, q],
                    g,
                    &int,
                )?;
                st.searches += 1;
                st.plans.insert(key, plan);
            }
            let plan = &st.plans[&key];
            if st
                .workspace
                .as_ref()
                .is_none_or(|b| b.len() < plan.workspace)
            {
                st.workspace = None;
                // SAFETY: a workspace is scratch memory cuDNN writes before it reads
                st.workspace = Some(unsafe { dev.alloc::<u8>(plan.workspace.max(1)) }?);
            }
            let workspace = st.workspace.as_mut().expect("allocated above");
            let alpha = 1f32;
            let (xp, _gx) = xs.device_ptr(&stream);
            let (wp, _gw) = ws.device_ptr(&stream);
            let (yp, _gy) = out.device_ptr_mut(&stream);
            let (bp, _gb) = workspace.device_ptr_mut(&stream);
            // SAFETY: the descriptors describe these buffers (NHWC x and y, KRSC w) in
            // `T`; the scaling factors are f32 for every dtype here (cuDNN's rule for
            // half and bfloat16 data); the workspace holds at least the plan's need;
            // with beta 1 `y` holds the values to accumulate onto
            unsafe {
                result::convolution_forward(
                    st.handle,
                    std::ptr::from_ref(&alpha).cast(),
                    plan.x,
                    xp as *const std::ffi::c_void,
                    plan.w,
                    wp as *const std::ffi::c_void,
                    plan.conv,
                    plan.algo,
                    bp as *mut std::ffi::c_void,
                    plan.workspace,
                    std::ptr::from_ref(&beta).cast(),
                    plan.y,
                    yp as *mut std::ffi::c_void,
                )
            }?;
            Ok(())
        })
    }

    #[allow(unsafe_code)]
    impl Plan {
        /// The descriptors of one shape, and the fastest algorithm cuDNN finds for it
        /// within [`WORKSPACE_LIMIT`] (every candidate run and timed on the device).
        fn new<T: CudnnType>(
            handle: sys::cudnnHandle_t,
            [n, c, h, w]: [usize; 4],
            [k, _, r, s]: [usize; 4],
            [_, _, p, q]: [usize; 4],
            g: Geometry,
            int: &dyn Fn(usize) -> Result<i32>,
        ) -> Result<Self> {
            use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC as NHWC;
            let mut plan = Self {
                x: result::create_tensor_descriptor()?,
                w: result::create_filter_descriptor()?,
                conv: result::create_convolution_descriptor()?,
                y: result::create_tensor_descriptor()?,
                algo:
                    sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                workspace: 0,
            };
            // SAFETY: descriptors created just above, owned by `plan`; `perf` has room
            // for the COUNT results cuDNN may write
            unsafe {
                result::set_tensor4d_descriptor(
                    plan.x,
                    NHWC,
                    T::DATA,
                    [int(n)?, int(c)?, int(h)?, int(w)?],
                )?;
                result::set_filter4d_descriptor(
                    plan.w,
                    T::DATA,
                    NHWC,
                    [int(k)?, int(c)?, int(r)?, int(s)?],
                )?;
                result::set_convolution2d_descriptor(
                    plan.conv,
                    int(g.pad[0])?,
                    int(g.pad[1])?,
                    int(g.stride[0])?,
                    int(g.stride[1])?,
                    int(g.dilation[0])?,
                    int(g.dilation[1])?,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                )?;
                result::set_convolution_math_type(plan.conv, T::MATH)?;
                result::set_tensor4d_descriptor(
                    plan.y,
                    NHWC,
                    T::DATA,
                    [int(n)?, int(k)?, int(p)?, int(q)?],
                )?;
                const COUNT: usize =
                    sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
                let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; COUNT] = std::mem::zeroed();
                let mut found = 0;
                sys::cudnnFindConvolutionForwardAlgorithm(
                    handle,
                    plan.x,
                    plan.w,
                    plan.conv,
                    plan.y,
                    COUNT as i32,
                    &mut found,
                    perf.as_mut_ptr(),
                )
                .result()?;
                // results come fastest first
                let best = perf
                    .iter()
                    .take(usize::try_from(found).unwrap_or(0))
                    .find(|a| {
                        a.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                            && a.memory <= WORKSPACE_LIMIT
                    })
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "cuDNN has no NHWC algorithm for {:?} x {:?}",
                            [n, h, w, c],
                            [k, r, s, c]
                        ))
                    })?;
                plan.algo = best.algo;
                plan.workspace = best.memory;
                // the math type the timing was taken with (cuDNN may have chosen another)
                result::set_convolution_math_type(plan.conv, best.mathType)?;
            }
            Ok(plan)
        }
    }
}

/// The geometry of a candle convolution config (same on both axes).
#[must_use]
pub fn geometry(cfg: &candle_nn::Conv2dConfig) -> Geometry {
    Geometry {
        pad: [cfg.padding; 2],
        stride: [cfg.stride; 2],
        dilation: [cfg.dilation; 2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// `((N, C, H, W), (K, R), geometry)`: R x R filters.
    type Case = ((usize, usize, usize, usize), (usize, usize), Geometry);

    fn conv_cases() -> Vec<Case> {
        let g = |p, st| Geometry {
            pad: [p; 2],
            stride: [st; 2],
            dilation: [1; 2],
        };
        vec![
            // the VAE's 3x3 convolutions, its 1x1 shortcuts, its stride-2 downsample
            ((2, 6, 7, 5), (4, 3), g(1, 1)),
            ((1, 8, 8, 6), (3, 1), g(0, 1)),
            ((2, 9, 9, 4), (6, 3), g(0, 2)),
        ]
    }

    fn random(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, dev)
    }

    /// The layout arithmetic the CUDA path relies on: NHWC input and KRSC filter give
    /// the NHWC form of candle's NCHW convolution.
    #[test]
    fn nhwc_convolution_is_the_nchw_one_transposed() -> Result<()> {
        for ((n, c, h, w), (k, r), g) in conv_cases() {
            let x = random(&[n, c, h, w], 1, &Device::Cpu)?;
            let f = random(&[k, c, r, r], 2, &Device::Cpu)?;
            let want = x.conv2d(&f, g.pad[0], g.stride[0], 1, 1)?;
            let got = conv2d_nhwc(
                &x.permute((0, 2, 3, 1))?.contiguous()?,
                &f.permute((0, 2, 3, 1))?.contiguous()?,
                g,
            )?;
            assert_eq!(got.dims()[3], k);
            let got = got.permute((0, 3, 1, 2))?;
            let e = crate::testing::rel_err(&got, &want)?;
            assert!(e < 1e-6, "{:?} {g:?}: {e}", (n, c, h, w));
        }
        let e = conv2d_nhwc(
            &Tensor::zeros((1, 4, 4, 3), DType::F32, &Device::Cpu)?,
            &Tensor::zeros((2, 3, 3, 5), DType::F32, &Device::Cpu)?,
            Geometry {
                pad: [0; 2],
                stride: [1; 2],
                dilation: [1; 2],
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("[1, 4, 4, 3]") && e.contains("[2, 3, 3, 5]"),
            "{e}"
        );
        Ok(())
    }

    /// On a GPU: cuDNN's NHWC convolution equals candle's for each case and dtype,
    /// and a second call of a shape searches no algorithm again.
    #[test]
    fn cudnn_nhwc_matches_candle_and_searches_each_shape_once_on_cuda() -> Result<()> {
        const NAME: &str = "cudnn_nhwc_matches_candle_and_searches_each_shape_once_on_cuda";
        #[cfg(feature = "cudnn")]
        return crate::testing::on_cuda(NAME, cudnn_matches_candle);
        #[cfg(not(feature = "cudnn"))]
        {
            eprintln!("{NAME}: skipped: built without the `cudnn` feature");
            Ok(())
        }
    }

    #[cfg(feature = "cudnn")]
    fn cudnn_matches_candle(dev: &Device) -> Result<()> {
        use super::cuda::{searches_on_this_thread, try_conv2d};
        {
            {
                for dtype in [DType::F32, DType::BF16] {
                    for ((n, c, h, w), (k, r), g) in conv_cases() {
                        let x = random(&[n, c, h, w], 1, dev)?.to_dtype(dtype)?;
                        let f = random(&[k, c, r, r], 2, dev)?.to_dtype(dtype)?;
                        let want = x.conv2d(&f, g.pad[0], g.stride[0], 1, 1)?;
                        let before = searches_on_this_thread();
                        let got = try_conv2d(&x, &f, g)?.expect("cuDNN takes the shape");
                        let again = try_conv2d(&x, &f, g)?.expect("cuDNN takes the shape");
                        assert_eq!(
                            searches_on_this_thread(),
                            before + 1,
                            "one search per shape"
                        );
                        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                        // accumulated onto a buffer: conv + acc, the buffer returned
                        let acc =
                            random(&[n, want.dim(2)?, want.dim(3)?, k], 3, dev)?.to_dtype(dtype)?;
                        let sum = (&want + acc.permute((0, 3, 1, 2))?)?;
                        let onto = super::cuda::try_conv2d_onto(&x, &f, g, &acc)?
                            .expect("cuDNN takes the shape");
                        let e = crate::testing::rel_err(
                            &onto.to_dtype(DType::F32)?,
                            &sum.to_dtype(DType::F32)?,
                        )?;
                        assert!(e < tol, "onto {dtype:?} {:?} {g:?}: {e}", (n, c, h, w));
                        // a channels-last input is taken as is
                        let xl = x
                            .permute((0, 2, 3, 1))?
                            .contiguous()?
                            .permute((0, 3, 1, 2))?;
                        let from_nhwc = try_conv2d(&xl, &f, g)?.expect("cuDNN takes the shape");
                        assert!(!from_nhwc.is_contiguous());
                        for y in [got, again, from_nhwc] {
                            let e = crate::testing::rel_err(
                                &y.to_dtype(DType::F32)?,
                                &want.to_dtype(DType::F32)?,
                            )?;
                            assert!(e < tol, "{dtype:?} {:?} {g:?}: {e}", (n, c, h, w));
                        }
                    }
                }
                Ok(())
            }
        }
    }
}
