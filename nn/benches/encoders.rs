//! Throughput of the image encoders at full size, with random weights built in memory:
//! sd-vae-ft-ema and the Flux VAE at 512x512, SigLIP so400m-patch14-384, CLIP
//! ViT-L/14 at 224. Prints images/s per encoder.
//!
//! ```text
//! cargo bench -p tensorbake-nn --bench encoders                      # all, CPU, f32
//! cargo bench -p tensorbake-nn --bench encoders -- siglip clip       # a subset
//! TENSORBAKE_BENCH_DEVICE=cuda TENSORBAKE_BENCH_DTYPE=bf16 TENSORBAKE_BENCH_BATCH=32 \
//!     cargo bench -p tensorbake-nn --features cuda --bench encoders
//! ```
//!
//! Environment: `TENSORBAKE_BENCH_DEVICE` (`cpu` default, `cuda`, `cuda:N`),
//! `TENSORBAKE_BENCH_DTYPE` (`f32` default on CPU, `bf16` on CUDA),
//! `TENSORBAKE_BENCH_BATCH` (images per forward, default 1 on CPU, 16 on CUDA),
//! `TENSORBAKE_BENCH_ITERS` (timed forwards after one warm-up, default 2).
//!
//! A plain timing loop rather than criterion: criterion takes at least 10 samples,
//! and one full-size VAE forward takes tens of seconds on a small CPU.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tensorbake_nn::clip_vision::{self, ClipVisionWithProjection};
use tensorbake_nn::siglip::{SiglipVision, VisionConfig};
use tensorbake_nn::vae::{self, VaeEncoder};
use tensorbake_nn::{DType as Precision, parse_device};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

type Forward = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;

fn build(name: &str, vb: VarBuilder) -> candle_core::Result<(Forward, usize)> {
    Ok(match name {
        "sd_vae" | "flux_vae" => {
            let cfg = if name == "sd_vae" {
                vae::Config::sd_vae_ft_ema()
            } else {
                vae::Config::flux()
            };
            let m = VaeEncoder::new(vb, &cfg)?;
            (Box::new(move |x| m.forward(x).map(|(mean, _)| mean)), 512)
        }
        "siglip" => {
            let cfg = VisionConfig::so400m_patch14_384();
            let m = SiglipVision::new(vb.pp("vision_model"), &cfg)?;
            (Box::new(move |x| m.forward(x)), 384)
        }
        "clip_vision" => {
            let cfg = clip_vision::Config::vit_large_patch14();
            let m = ClipVisionWithProjection::new(vb, &cfg)?;
            (Box::new(move |x| m.forward(x)), 224)
        }
        other => panic!("unknown encoder {other} (sd_vae, flux_vae, siglip, clip_vision)"),
    })
}

fn main() -> candle_core::Result<()> {
    let dev_spec = env("TENSORBAKE_BENCH_DEVICE").unwrap_or_else(|| "cpu".into());
    let device: Device = parse_device(&dev_spec).expect("TENSORBAKE_BENCH_DEVICE");
    let dtype: DType = env("TENSORBAKE_BENCH_DTYPE")
        .map(|s| {
            s.parse::<Precision>()
                .expect("TENSORBAKE_BENCH_DTYPE")
                .candle()
        })
        .unwrap_or(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        });
    let batch: usize = env("TENSORBAKE_BENCH_BATCH")
        .map(|s| s.parse().expect("TENSORBAKE_BENCH_BATCH"))
        .unwrap_or(if device.is_cpu() { 1 } else { 16 });
    let iters: usize = env("TENSORBAKE_BENCH_ITERS")
        .map(|s| s.parse().expect("TENSORBAKE_BENCH_ITERS"))
        .unwrap_or(2);
    // cargo bench passes `--bench`; every other argument names an encoder.
    let mut names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if names.is_empty() {
        names = ["sd_vae", "flux_vae", "siglip", "clip_vision"]
            .map(String::from)
            .to_vec();
    }
    println!(
        "device {dev_spec}, dtype {dtype:?}, batch {batch}, {iters} timed forwards after 1 warm-up"
    );
    println!(
        "{:<12} {:>6} {:>12} {:>10}",
        "encoder", "size", "s/forward", "images/s"
    );
    for name in &names {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &device);
        let (fwd, size) = build(name, vb)?;
        let x = Tensor::rand(-1f32, 1f32, (batch, 3, size, size), &device)?.to_dtype(dtype)?;
        // warm-up (kernel selection, allocations), then timed forwards
        fwd(&x)?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            fwd(&x)?
                .sum_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
        }
        device.synchronize()?;
        let per = t0.elapsed().as_secs_f64() / iters as f64;
        println!(
            "{:<12} {:>6} {:>12.3} {:>10.3}",
            name,
            size,
            per,
            batch as f64 / per
        );
    }
    Ok(())
}
