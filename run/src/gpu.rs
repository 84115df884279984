//! The GPU side of a run's report: how busy the encoders' GPU was, sampled through
//! NVML while the run ran, and how many feature bytes came back from it.
//!
//! The busy fraction is NVML's utilisation rate (the share of the last sample period
//! in which a kernel ran on the GPU), read by `nvidia-smi --query-gpu=utilization.gpu
//! --loop-ms=N`, NVML's own command-line client, which is on every machine with the
//! NVIDIA driver. Going through it keeps the binary free of a link to the driver's
//! NVML library (a CPU-only build runs the same code) and lets the tests stand a
//! script in for it (`TENSORBAKE_NVIDIA_SMI`). The mean of the samples over the run
//! is the busy fraction; samples NVML could not take (`[N/A]`) are counted apart.
//!
//! Which GPU: the encoders' device, `cuda:N` or `cuda` ([`tensorbake_nn::device::local_gpu`]),
//! is an index among the CUDA-visible devices; NVML numbers every GPU of the node. A
//! `CUDA_VISIBLE_DEVICES` list maps the one to the other (its N-th entry, an index or
//! a `GPU-…` UUID, both of which nvidia-smi's `--id` takes); without one they agree
//! when CUDA enumerates in PCI order (`CUDA_DEVICE_ORDER=PCI_BUS_ID`, what schedulers
//! set; on a node of identical GPUs the default order is the same).

use std::ffi::OsString;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

/// The GPU figures of a run whose encoders ran on CUDA.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GpuReport {
    /// The GPU as NVML names it (an index or a UUID).
    pub nvml_device: String,
    /// Mean NVML utilisation over the run, 0..1; `None` when no sample was taken.
    pub busy_fraction: Option<f64>,
    /// Samples taken.
    pub busy_samples: u64,
    /// Samples NVML answered without a number (`[N/A]`, ...).
    pub busy_samples_unreadable: u64,
    /// Sampling period, milliseconds.
    pub sample_ms: u64,
    /// Why the busy fraction could not be sampled, if it could not.
    pub sampler_error: Option<String>,
    /// Feature bytes the writers copied from the GPU to the host.
    pub device_to_host_bytes: u64,
    /// Model input bytes uploaded from the host to the GPU (pinned staging buffers).
    pub host_to_device_bytes: u64,
}

/// The NVML name of CUDA device `cuda_index` under `visible` (`CUDA_VISIBLE_DEVICES`).
#[must_use]
pub fn nvml_device(cuda_index: usize, visible: Option<&str>) -> String {
    match visible.map(str::trim).filter(|v| !v.is_empty()) {
        Some(list) => list
            .split(',')
            .nth(cuda_index)
            .map_or_else(|| cuda_index.to_string(), |s| s.trim().to_string()),
        None => cuda_index.to_string(),
    }
}

/// The CUDA index a device spec names (`cuda`, `cuda:N`); `None` for the CPU.
#[must_use]
pub fn cuda_index(spec: &str) -> Option<usize> {
    match spec {
        "cuda" => Some(tensorbake_nn::device::local_gpu(|k| std::env::var(k).ok())),
        s => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
    }
}

/// A running `nvidia-smi` sampling one GPU.
pub struct BusySampler {
    child: Child,
    reader: JoinHandle<(u64, u64, u64)>,
    program: OsString,
    device: String,
    sample_ms: u64,
}

/// The program to sample with: `$TENSORBAKE_NVIDIA_SMI`, else `nvidia-smi`.
fn program() -> OsString {
    std::env::var_os("TENSORBAKE_NVIDIA_SMI").unwrap_or_else(|| "nvidia-smi".into())
}

impl BusySampler {
    /// Starts sampling `device` (an NVML index or UUID) every `every`.
    ///
    /// # Errors
    /// The program cannot be started (no driver on this machine), naming it.
    pub fn start(device: &str, every: Duration) -> Result<Self, String> {
        Self::start_with(program(), device, every)
    }

    /// [`BusySampler::start`] with another program in nvidia-smi's place.
    ///
    /// # Errors
    /// The program cannot be started, naming it.
    pub fn start_with(prog: OsString, device: &str, every: Duration) -> Result<Self, String> {
        let sample_ms = every.as_millis().clamp(50, 60_000) as u64;
        let mut child = Command::new(&prog)
            .arg("--query-gpu=utilization.gpu")
            .arg("--format=csv,noheader,nounits")
            .arg(format!("--id={device}"))
            .arg(format!("--loop-ms={sample_ms}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", prog.to_string_lossy()))?;
        let stdout = child.stdout.take();
        let reader = std::thread::spawn(move || {
            let (mut n, mut sum, mut bad) = (0u64, 0u64, 0u64);
            if let Some(out) = stdout {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    match line.trim().parse::<u64>() {
                        Ok(v) if v <= 100 => {
                            n += 1;
                            sum += v;
                        }
                        _ => bad += 1,
                    }
                }
            }
            (n, sum, bad)
        });
        Ok(Self {
            child,
            reader,
            program: prog,
            device: device.to_string(),
            sample_ms,
        })
    }

    /// Stops sampling and returns the figures (`device_to_host_bytes` left at 0).
    pub fn finish(mut self) -> GpuReport {
        // nvidia-smi --loop-ms runs until stopped; a program that already ended (an
        // unknown --id, a driver that went away) has said why on its exit status
        let early = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (n, sum, bad) = self.reader.join().unwrap_or_default();
        let sampler_error = match early {
            Some(status) if n == 0 => Some(format!(
                "{} --id={} ended with {status} before giving a sample",
                self.program.to_string_lossy(),
                self.device
            )),
            _ if n == 0 => Some("no sample was taken (a run shorter than one period)".into()),
            _ => None,
        };
        GpuReport {
            nvml_device: self.device,
            busy_fraction: (n > 0).then(|| sum as f64 / n as f64 / 100.0),
            busy_samples: n,
            busy_samples_unreadable: bad,
            sample_ms: self.sample_ms,
            sampler_error,
            device_to_host_bytes: 0,
            host_to_device_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_devices_map_to_nvml_names() {
        assert_eq!(nvml_device(1, None), "1");
        assert_eq!(nvml_device(0, Some("3")), "3");
        assert_eq!(nvml_device(1, Some("4, 6")), "6");
        assert_eq!(nvml_device(0, Some("GPU-8f2e")), "GPU-8f2e");
        assert_eq!(nvml_device(2, Some("")), "2");
        assert_eq!(cuda_index("cuda:3"), Some(3));
        assert_eq!(cuda_index("cpu"), None);
        assert_eq!(cuda_index("cuda:x"), None);
    }

    /// A fake nvidia-smi, written by a child shell rather than by this process: a
    /// write descriptor held here, even for a moment, is inherited by whatever another
    /// test thread forks meanwhile, and exec-ing the file then fails with "Text file
    /// busy" (ETXTBSY) until that child has exec-ed in turn.
    fn script(dir: &std::path::Path, body: &str) -> OsString {
        let path = dir.join("fake-nvidia-smi");
        let status = Command::new("sh")
            .arg("-c")
            .arg("printf '#!/bin/sh\\n%s\\n' \"$1\" > \"$0\" && chmod 755 \"$0\"")
            .arg(&path)
            .arg(body)
            .status()
            .unwrap();
        assert!(status.success(), "writing {}: {status}", path.display());
        path.into_os_string()
    }

    /// The mean of the numeric samples, the others counted apart; the GPU and the
    /// period reach the program's arguments.
    #[test]
    fn samples_average_into_the_busy_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let args = dir.path().join("args");
        let prog = script(
            dir.path(),
            &format!(
                "echo \"$@\" > {}\nfor v in 40 60 '[N/A]' 80; do echo \"$v\"; done\nexec sleep 30",
                args.display()
            ),
        );
        let s = BusySampler::start_with(prog, "GPU-ab12", Duration::from_millis(100)).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        let r = s.finish();
        assert_eq!((r.busy_samples, r.busy_samples_unreadable), (3, 1), "{r:?}");
        assert!((r.busy_fraction.unwrap() - 0.6).abs() < 1e-12);
        assert!(r.sampler_error.is_none());
        assert_eq!((r.nvml_device.as_str(), r.sample_ms), ("GPU-ab12", 100));
        let a = std::fs::read_to_string(&args).unwrap();
        assert!(
            a.contains("--query-gpu=utilization.gpu")
                && a.contains("--id=GPU-ab12")
                && a.contains("--loop-ms=100"),
            "{a}"
        );
    }

    /// No driver: the start fails naming the program; a program that ends at once
    /// without a sample is reported with its status.
    #[test]
    fn a_missing_or_failing_sampler_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-nvidia-smi").into_os_string();
        let e = BusySampler::start_with(missing, "0", Duration::from_millis(100))
            .err()
            .unwrap();
        assert!(e.contains("no-nvidia-smi"), "{e}");
        let prog = script(dir.path(), "echo 'No devices were found' >&2\nexit 6");
        let s = BusySampler::start_with(prog, "7", Duration::from_millis(100)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let r = s.finish();
        assert!(r.busy_fraction.is_none());
        let e = r.sampler_error.unwrap();
        assert!(e.contains("--id=7") && e.contains("6"), "{e}");
    }
}
