//! The sampler against diffusers' `PixArtAlphaPipeline` (goldens from
//! `fixtures/pipeline/make_pipeline_golden.py`): a tiny random PixArt and VAE, the same
//! initial latents and caption embeddings, classifier-free guidance, DPM-Solver++ and
//! DDIM; the decoded images within 1e-3.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use tensorbake_train::latents::LatentScaling;
use tensorbake_train::sample::{Cond, decode, denoise};
use tensorbake_train::schedulers::{AnyScheduler, Scheduler};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline")
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn run(scheduler_file: &str, steps: usize, guidance: f64, want: &str) -> f32 {
    let g = golden();
    let dev = Device::Cpu;
    let (pixart, _, _) = tensorbake_nn::pixart::load_pixart(
        fixtures().join("transformer").to_str().unwrap(),
        DType::F32,
        &dev,
        None,
    )
    .unwrap();
    let vae = tensorbake_nn::vae::locate(fixtures().join("vae").to_str().unwrap())
        .unwrap()
        .decoder("vae", DType::F32, &dev)
        .unwrap();
    let json = std::fs::read_to_string(fixtures().join(scheduler_file)).unwrap();
    let mut scheduler = AnyScheduler::from_config_json(&json).unwrap();
    scheduler.set_timesteps(steps, None).unwrap();
    let cond: Vec<Cond> = (0..2)
        .map(|i| Cond {
            tokens: g["prompt_embeds"].i(i).unwrap(),
            mask: Some(g["prompt_attention_mask"].i(i).unwrap()),
        })
        .collect();
    let uncond = Cond {
        tokens: g["negative_embeds"].i(0).unwrap(),
        mask: Some(g["negative_mask"].i(0).unwrap()),
    };
    let latents = (g["latents"].clone() * scheduler.init_noise_sigma()).unwrap();
    let z = denoise(
        &pixart,
        &mut scheduler,
        latents,
        &cond,
        &uncond,
        guidance,
        None,
    )
    .unwrap();
    let img = decode(&vae, &z, LatentScaling::SD, DType::F32).unwrap();
    let diff = common::max_diff_np(&img, &g[want]);
    eprintln!("{want}: max |ours - diffusers| = {diff:.2e}");
    diff
}

#[test]
fn dpm_solver_with_guidance_matches_the_pipeline() {
    assert!(run("scheduler_dpm.json", 20, 4.5, "image_dpm") < 1e-3);
}

#[test]
fn ddim_matches_the_pipeline() {
    assert!(run("scheduler_ddim.json", 12, 3.0, "image_ddim") < 1e-3);
}

#[test]
fn guidance_one_runs_the_conditional_pass_only_as_the_pipeline_does() {
    assert!(run("scheduler_dpm.json", 8, 1.0, "image_noguide") < 1e-3);
}
