//! Host-to-device uploads, and the order of work across host threads on a GPU.
//!
//! candle gives every host thread its own CUDA stream (it launches on
//! `CU_STREAM_PER_THREAD`): the kernels one thread launches run in order, but not in
//! order with another thread's, and candle records nothing that would order them.
//! A pipeline that prepares batches on one thread, runs the models on a second and
//! copies results back on a third orders them itself, with this module:
//!
//! - [`Staging`] uploads a host buffer through page-locked (pinned) memory with an
//!   asynchronous copy on the calling thread's stream, and returns when the copy is
//!   done, so the tensor is ready for any thread; the thread that runs the models
//!   meanwhile keeps the GPU busy with the batch before.
//! - [`Fence`] marks the work the calling thread has queued so far; any thread can
//!   wait for it (before the results are copied back, say).
//! - [`GpuSpan`] measures the device time of the work the calling thread queues
//!   between two points, with CUDA events: launches return before the work runs, so
//!   host clocks measure launching, not computing.
//!
//! On the CPU (and in a build without `cuda`) work is done when a call returns:
//! uploads are plain tensors, fences are already passed, and there is no span.

use candle_core::{Device, Result, Shape, Tensor, WithDType};

/// The element types [`Staging::upload`] takes: plain numbers, whose bytes are
/// their value.
#[cfg(feature = "cuda")]
pub trait Upload:
    WithDType
    + candle_core::cuda_backend::CudaDType
    + candle_core::cuda_backend::cudarc::driver::DeviceRepr
{
}
/// The element types [`Staging::upload`] takes: plain numbers, whose bytes are
/// their value.
#[cfg(not(feature = "cuda"))]
pub trait Upload: WithDType {}

impl Upload for u8 {}
impl Upload for u32 {}
impl Upload for f32 {}
impl Upload for half::bf16 {}
impl Upload for half::f16 {}

/// Uploads to one device through a pinned host buffer that it keeps (grown to the
/// largest upload so far), one upload at a time.
pub struct Staging {
    device: Device,
    #[cfg(feature = "cuda")]
    pinned:
        std::sync::Mutex<Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u8>>>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("device", &self.device.location())
            .finish_non_exhaustive()
    }
}

impl Staging {
    /// Staging for `device` (the pinned buffer is allocated by the first upload).
    #[must_use]
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            #[cfg(feature = "cuda")]
            pinned: std::sync::Mutex::new(None),
        }
    }

    /// The device uploads go to.
    #[must_use]
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `data` as a contiguous tensor of `shape` on the device, complete when this
    /// returns (usable from any thread). On CUDA: copied into the pinned buffer, then
    /// to a fresh device allocation with an asynchronous copy on the calling thread's
    /// stream, which this waits for.
    ///
    /// # Errors
    /// A `shape` that does not hold `data.len()` elements; CUDA's errors.
    pub fn upload<T: Upload>(&self, data: &[T], shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            return Err(candle_core::Error::Msg(format!(
                "upload: {} elements do not make shape {shape:?}",
                data.len()
            )));
        }
        match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) if !data.is_empty() => self.upload_cuda(dev, data, shape),
            d => Tensor::from_slice(data, shape, d),
        }
    }

    // the one unsafe block of uploads: pinned memory, a raw async copy, the storage wrap
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    fn upload_cuda<T: Upload>(
        &self,
        dev: &candle_core::CudaDevice,
        data: &[T],
        shape: Shape,
    ) -> Result<Tensor> {
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{DevicePtrMut, result};
        let bytes = std::mem::size_of_val(data);
        let stream = dev.cuda_stream();
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if pinned.as_ref().is_none_or(|p| p.len() < bytes) {
            // the old buffer's drop waits for the copies out of it
            *pinned = None;
            let len = bytes.next_multiple_of(1 << 20);
            // SAFETY: the bytes are written below before any copy reads them
            *pinned = Some(unsafe { stream.context().alloc_pinned::<u8>(len) }.w()?);
        }
        let buf = pinned.as_mut().expect("allocated above");
        // waits for the previous copy out of the buffer
        let host = &mut buf.as_mut_slice().w()?[..bytes];
        // SAFETY: `T` is a plain number type (`Upload`): its bytes are its value
        let src = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), bytes) };
        host.copy_from_slice(src);
        // SAFETY: the allocation is written whole by the copy before anyone reads it
        let mut dst = unsafe { dev.alloc::<T>(data.len()) }?;
        {
            let (ptr, _record) = dst.device_ptr_mut(&stream);
            // SAFETY: `host` is pinned and outlives the copy, which is waited for below;
            // `dst` holds exactly `bytes`
            unsafe { result::memcpy_htod_async(ptr, &*host, stream.cu_stream()) }.w()?;
        }
        stream.synchronize().w()?;
        let storage = candle_core::CudaStorage::wrap_cuda_slice(dst, dev.clone());
        Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

/// The work the thread that made it had queued on some devices; passed once it is
/// done.
#[derive(Default)]
pub struct Fence {
    #[cfg(feature = "cuda")]
    events: Vec<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence").finish_non_exhaustive()
    }
}

impl Fence {
    /// Marks the work the calling thread has queued so far on each of `devices`
    /// (nothing to mark on the CPU).
    ///
    /// # Errors
    /// CUDA's (creating or recording an event).
    pub fn now(devices: &[&Device]) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::WrapErr;
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let mut events = Vec::new();
            for d in devices {
                if let Device::Cuda(dev) = d {
                    let stream = dev.cuda_stream();
                    let e = stream
                        .context()
                        .new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                        .w()?;
                    e.record(&stream).w()?;
                    events.push(e);
                }
            }
            Ok(Self { events })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = devices;
            Ok(Self {})
        }
    }

    /// Blocks until the marked work is done (sleeping, not spinning).
    ///
    /// # Errors
    /// CUDA's: an error of any kernel in the marked work surfaces here.
    pub fn wait(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::WrapErr;
            for e in &self.events {
                e.synchronize().w()?;
            }
        }
        Ok(())
    }
}

/// Device time of the work one thread queued on one CUDA device between
/// [`GpuSpan::start`] and [`GpuSpan::stop`].
pub struct GpuSpan {
    #[cfg(feature = "cuda")]
    start: candle_core::cuda_backend::cudarc::driver::CudaEvent,
    #[cfg(feature = "cuda")]
    end: candle_core::cuda_backend::cudarc::driver::CudaEvent,
    #[cfg(feature = "cuda")]
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
}

impl std::fmt::Debug for GpuSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuSpan").finish_non_exhaustive()
    }
}

impl GpuSpan {
    /// Starts timing the calling thread's work on `device`; `None` off CUDA (there
    /// the host's clock is the device's).
    ///
    /// # Errors
    /// CUDA's (creating or recording an event).
    pub fn start(device: &Device) -> Result<Option<Self>> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                use candle_core::cuda_backend::WrapErr;
                use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
                let stream = dev.cuda_stream();
                let ctx = stream.context();
                let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
                let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
                start.record(&stream).w()?;
                Ok(Some(Self { start, end, stream }))
            }
            _ => Ok(None),
        }
    }

    /// Ends the span at the work queued so far (by the thread that started it).
    ///
    /// # Errors
    /// CUDA's (recording an event).
    pub fn stop(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::WrapErr;
            self.end.record(&self.stream).w()
        }
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }

    /// The device time of the span, waiting for its work to finish if it has not
    /// (after a [`Fence`] past it has been waited for, this does not wait).
    ///
    /// # Errors
    /// CUDA's (an error of the spanned work surfaces here).
    pub fn elapsed(&self) -> Result<std::time::Duration> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::WrapErr;
            let ms = self.start.elapsed_ms(&self.end).w()?;
            Ok(std::time::Duration::from_secs_f64(
                f64::from(ms.max(0.0)) / 1e3,
            ))
        }
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_on_the_cpu_are_the_data_in_the_shape() {
        let s = Staging::new(&Device::Cpu);
        let t = s.upload(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3)).unwrap();
        assert_eq!(t.dims(), [2, 3]);
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
        );
        let ids = s.upload(&[7u32, 8], 2).unwrap();
        assert_eq!(ids.to_vec1::<u32>().unwrap(), [7, 8]);
        let e = s.upload(&[1f32, 2.0, 3.0], (2, 2)).unwrap_err().to_string();
        assert!(e.contains("3 elements") && e.contains("[2, 2]"), "{e}");
    }

    #[test]
    fn the_cpu_has_no_device_time_and_its_fences_are_passed() {
        assert!(GpuSpan::start(&Device::Cpu).unwrap().is_none());
        Fence::now(&[&Device::Cpu]).unwrap().wait().unwrap();
    }

    /// On a GPU: uploads from several threads at once, each read back by another
    /// thread after the uploader returned, hold exactly their data (the copies were
    /// complete, and the pinned buffer was not overwritten under one); a fence past a
    /// kernel makes its result visible to a thread that waited for it; a span around
    /// work of known size measures a positive device time.
    #[test]
    fn uploads_fences_and_spans_order_work_across_threads_on_cuda() -> Result<()> {
        #[cfg(feature = "cuda")]
        let f = cross_thread_order;
        // built without CUDA there is no span to measure: `on_cuda` says it skipped
        #[cfg(not(feature = "cuda"))]
        let f = |_: &Device| Ok(());
        crate::testing::on_cuda(
            "uploads_fences_and_spans_order_work_across_threads_on_cuda",
            f,
        )
    }

    #[cfg(feature = "cuda")]
    fn cross_thread_order(dev: &Device) -> Result<()> {
        let dev = dev.clone();
        let staging = std::sync::Arc::new(Staging::new(&dev));
        let uploaded: Vec<(Vec<f32>, Tensor)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|k| {
                    let staging = staging.clone();
                    s.spawn(move || {
                        (0..8)
                            .map(|i| {
                                let n = 1 << (12 + i % 4);
                                let data: Vec<f32> = (0..n)
                                    .map(|j| (k * 1000 + i * 10) as f32 + j as f32)
                                    .collect();
                                let t = staging.upload(&data, n).unwrap();
                                (data, t)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        for (data, t) in &uploaded {
            assert_eq!(&t.to_vec1::<f32>().unwrap(), data);
        }
        let x = Tensor::ones((2048, 2048), candle_core::DType::F32, &dev).unwrap();
        let span = GpuSpan::start(&dev)
            .unwrap()
            .expect("a CUDA device has spans");
        let y = x.matmul(&x).unwrap().sum_all().unwrap();
        span.stop().unwrap();
        let fence = Fence::now(&[&dev]).unwrap();
        let got = std::thread::scope(|s| {
            s.spawn(|| {
                fence.wait().unwrap();
                y.to_vec0::<f32>().unwrap()
            })
            .join()
            .unwrap()
        });
        assert_eq!(got, 2048f32 * 2048.0 * 2048.0);
        assert!(span.elapsed()? > std::time::Duration::ZERO);
        Ok(())
    }
}
