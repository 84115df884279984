//! Devices and compute dtypes, as manifests and flags name them.
//!
//! Dtypes are [`tensorbake_kit::dtype::DType`] everywhere (one vocabulary for
//! manifests, the store and candle); this module adds the device side: parsing
//! `cpu` / `cuda` / `cuda:N`, and refusing compute dtypes a device cannot run.

use candle_core::Device;
use tensorbake_kit::dtype::DType;

use crate::{Error, Result};

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device; `cuda` is this process's GPU
/// ([`local_gpu`]).
///
/// # Errors
/// [`Error::Device`] for another spelling, or when the GPU cannot be opened (no
/// CUDA device, or a binary built without the `cuda` feature).
pub fn parse_device(spec: &str) -> Result<Device> {
    let err = |why: String| Error::Device {
        spec: spec.to_string(),
        why,
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            Device::new_cuda(local_gpu(|k| std::env::var(k).ok())).map_err(|e| err(e.to_string()))
        }
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..]
                .parse()
                .map_err(|_| err("expected cuda:N with N a GPU index".into()))?;
            Device::new_cuda(n).map_err(|e| err(e.to_string()))
        }
        _ => Err(err("expected cpu, cuda or cuda:N".into())),
    }
}

/// The GPU `cuda` (no index) means in this process: the one process-per-GPU
/// launchers assign. `CUDA_VISIBLE_DEVICES` naming a single device makes it this
/// process's only GPU, index 0 (Slurm's `--gpus-per-task=1`, Kubernetes' device
/// plugin, `tensorbake run --devices`); otherwise `LOCAL_RANK` (torchrun, `srun`
/// with one task per GPU) picks among those visible; otherwise the first.
/// `env` looks a variable up.
pub fn local_gpu(env: impl Fn(&str) -> Option<String>) -> usize {
    let single =
        env("CUDA_VISIBLE_DEVICES").is_some_and(|v| !v.trim().is_empty() && !v.contains(','));
    if single {
        return 0;
    }
    env("LOCAL_RANK")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The candle dtype to compute in, if `dtype` is a float type.
///
/// # Errors
/// [`Error::Device`] for an integer dtype.
pub fn compute_dtype(dtype: DType, device: &Device) -> Result<candle_core::DType> {
    if !dtype.is_float() {
        return Err(Error::Device {
            spec: device_name(device).into(),
            why: format!(
                "cannot compute in {}: use f32, bf16 or f16",
                dtype.short_name()
            ),
        });
    }
    Ok(dtype.candle())
}

/// As [`compute_dtype`], for models with convolutions: candle's CPU backend has no
/// bf16 convolution, so bf16 on the CPU is refused up front rather than on the first
/// batch.
///
/// # Errors
/// [`Error::Device`] naming the device and what to use instead.
pub fn conv_compute_dtype(dtype: DType, device: &Device) -> Result<candle_core::DType> {
    if device.is_cpu() && dtype == DType::Bf16 {
        return Err(Error::Device {
            spec: "cpu".into(),
            why: "bf16 is not supported on the CPU (candle has no CPU bf16 matmul); \
                  use f32 or f16 on the CPU, bf16 on CUDA"
                .into(),
        });
    }
    compute_dtype(dtype, device)
}

fn device_name(device: &Device) -> &'static str {
    if device.is_cpu() { "cpu" } else { "cuda" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_is_the_gpu_the_launcher_gave_this_process() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        assert_eq!(local_gpu(env(&[])), 0);
        assert_eq!(local_gpu(env(&[("LOCAL_RANK", "3")])), 3);
        // one visible device is index 0 whatever the local rank
        assert_eq!(
            local_gpu(env(&[("LOCAL_RANK", "3"), ("CUDA_VISIBLE_DEVICES", "5")])),
            0
        );
        // several visible: the local rank picks among them
        assert_eq!(
            local_gpu(env(&[("LOCAL_RANK", "1"), ("CUDA_VISIBLE_DEVICES", "4,5")])),
            1
        );
        assert_eq!(local_gpu(env(&[("LOCAL_RANK", "x")])), 0);
    }

    #[test]
    fn device_and_dtype_parsing() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("cuda:N"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("GPU index"), "{e}");
        assert_eq!(
            compute_dtype(DType::F32, &Device::Cpu).unwrap(),
            candle_core::DType::F32
        );
        let e = conv_compute_dtype(DType::Bf16, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bf16") && e.contains("CPU"), "{e}");
        assert!(compute_dtype(DType::Bf16, &Device::Cpu).is_ok());
        assert!(compute_dtype(DType::U32, &Device::Cpu).is_err());
    }
}
