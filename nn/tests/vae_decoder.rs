//! Parity of the VAE decoder with diffusers' `AutoencoderKL.decode`, on the tiny
//! random-weight models and golden images that
//! `fixtures/vae_decoder/make_vae_decoder_golden.py` wrote: SD-style (diffusers names
//! with the legacy attention names), Flux-style (diffusers names, f16 weights) and the
//! same Flux weights under BFL's `ae.safetensors` names without a config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use tensorbake_nn::testing::rel_err;
use tensorbake_nn::vae::{self, VaeDecoder, VaeEncoder};
use tensorbake_nn::{WeightFiles, test_device};

/// Parity bound: max |ours - reference| / max |reference|, f32.
const REL_TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae_decoder")
}

fn golden(dev: &Device) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden.safetensors"), dev).unwrap()
}

/// The weights and config of a fixture directory: `config.json` if present, else the
/// architecture read from the BFL tensor shapes.
fn open(dir: &str, file: &str) -> (Arc<WeightFiles>, vae::Config, bool) {
    let d = fixtures().join(dir);
    let weights = Arc::new(WeightFiles::open(&[d.join(file)]).unwrap());
    let ldm = vae::is_ldm_layout(weights.names().into_iter());
    let cfg = match std::fs::read_to_string(d.join("config.json")) {
        Ok(text) => serde_json::from_str(&text).unwrap(),
        Err(_) => {
            vae::Config::from_ldm_shapes(|n| weights.meta(n).map(|m| m.shape.clone())).unwrap()
        }
    };
    (weights, cfg, ldm)
}

fn decoder(dir: &str, file: &str, dev: &Device) -> VaeDecoder {
    let (weights, cfg, ldm) = open(dir, file);
    weights
        .build(
            "vae decoder",
            vae::weight_names(&cfg, ldm),
            DType::F32,
            dev,
            |vb| VaeDecoder::new(vb, &cfg),
        )
        .unwrap()
}

fn check(label: &str, ours: &Tensor, reference: &Tensor) -> Result<()> {
    let e = rel_err(ours, reference)?;
    eprintln!("{label}: rel err {e:.3e}");
    assert!(e <= REL_TOL, "{label}: rel err {e:e} > {REL_TOL:e}");
    Ok(())
}

fn sd_decodes(dev: &Device) -> Result<()> {
    let g = golden(dev);
    let d = decoder("sd_vae", "diffusion_pytorch_model.safetensors", dev);
    assert_eq!(d.upscale(), 4);
    let img = d.decode(&g["sd_latents"])?;
    assert_eq!(img.dims(), &[2, 3, 24, 32]);
    check("sd decode", &img, &g["sd_images"])?;
    // the encoder reads the same full file (legacy attention names) unchanged
    let (weights, cfg, ldm) = open("sd_vae", "diffusion_pytorch_model.safetensors");
    let enc = weights
        .build(
            "vae encoder",
            vae::weight_names(&cfg, ldm),
            DType::F32,
            dev,
            |vb| VaeEncoder::new(vb, &cfg),
        )
        .unwrap();
    let (mean, _) = enc.forward(&g["sd_images"])?;
    check("sd encode (full file)", &mean, &g["sd_encoded_mean"])
}
test_device!(
    sd_decodes,
    sd_vae_decodes_as_diffusers_cpu,
    sd_vae_decodes_as_diffusers_cuda
);

fn flux_decodes(dev: &Device) -> Result<()> {
    let g = golden(dev);
    let d = decoder("flux_vae", "diffusion_pytorch_model.safetensors", dev);
    let img = d.decode(&g["flux_latents"])?;
    assert_eq!(img.dims(), &[2, 3, 16, 12]);
    check(
        "flux decode (diffusers names, f16 weights)",
        &img,
        &g["flux_images"],
    )
}
test_device!(
    flux_decodes,
    flux_vae_decodes_as_diffusers_cpu,
    flux_vae_decodes_as_diffusers_cuda
);

fn flux_bfl_decodes(dev: &Device) -> Result<()> {
    let g = golden(dev);
    let d = decoder("flux_vae_bfl", "ae.safetensors", dev);
    let img = d.decode(&g["flux_latents"])?;
    check("flux decode (BFL names)", &img, &g["flux_images"])
}
test_device!(
    flux_bfl_decodes,
    flux_bfl_ae_decodes_as_diffusers_cpu,
    flux_bfl_ae_decodes_as_diffusers_cuda
);

#[test]
fn bfl_shapes_give_the_diffusers_config() {
    let (_, from_shapes, ldm) = open("flux_vae_bfl", "ae.safetensors");
    assert!(ldm);
    let (_, diffusers, ldm) = open("flux_vae", "diffusion_pytorch_model.safetensors");
    assert!(!ldm);
    // a BFL file records neither the latent scaling nor the upcast advice
    assert_eq!(
        from_shapes,
        vae::Config {
            scaling_factor: None,
            shift_factor: None,
            force_upcast: true,
            ..diffusers
        }
    );
    assert!(!from_shapes.use_post_quant_conv);
    assert_eq!(from_shapes.up_block_types.len(), 2);
}

#[test]
fn wrong_latent_channels_are_refused() {
    let d = decoder(
        "sd_vae",
        "diffusion_pytorch_model.safetensors",
        &Device::Cpu,
    );
    let z = Tensor::zeros((1, 16, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let err = d.decode(&z).unwrap_err().to_string();
    assert!(err.contains("16 channels"), "{err}");
}
