//! Sampling PixArt-α: the denoising loop of diffusers' `PixArtAlphaPipeline`, with
//! classifier-free guidance and the VAE decoder.
//!
//! Per step: the latents twice (`[uncond; cond]`), PixArt's output on both, guidance
//! `eps = eps_u + g (eps_c - eps_u)` on all output channels, then the learned-variance
//! half dropped (the pipeline keeps the first `C` channels), the scheduler's step. At
//! the end `decode(latents / 0.18215)` through the VAE decoder. The negative condition
//! is the condition of nothing the store recorded: the black image's SigLIP embedding
//! through the adapter (image modes), the empty caption's T5 embedding (text mode).
//!
//! Initial noise is drawn per image from `(seed, prompt, variation)`, so the same seed
//! gives the same images whatever the batch.

use candle_core::{DType, Device, Result, Tensor};
use tensorbake_kit::rng::SplitMix64;
use tensorbake_nn::pixart::PixArt;
use tensorbake_nn::vae::VaeDecoder;

use crate::latents::LatentScaling;
use crate::schedulers::{AnyScheduler, Scheduler};

/// How to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSettings {
    /// Denoising steps (PixArt: 20).
    pub steps: usize,
    /// Classifier-free guidance scale (PixArt: 4.5; 1 disables the unconditional pass).
    pub guidance: f64,
    /// Seeds the initial noise.
    pub seed: u64,
}

impl Default for SampleSettings {
    fn default() -> Self {
        Self {
            steps: 20,
            guidance: 4.5,
            seed: 0,
        }
    }
}

/// A condition for PixArt: caption tokens `[T, D]` and an optional mask `[T]`.
#[derive(Debug, Clone)]
pub struct Cond {
    /// Caption tokens (after the adapter for image conditions).
    pub tokens: Tensor,
    /// 1 keep / 0 pad (text conditions).
    pub mask: Option<Tensor>,
}

/// The initial noise of variation `k` of prompt `p`: `[C, h, w]` standard normal.
///
/// # Errors
/// candle errors.
pub fn initial_noise(
    seed: u64,
    prompt: usize,
    k: usize,
    shape: (usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let mut rng = SplitMix64::for_name(seed, &format!("sample {prompt} {k}"));
    let n = shape.0 * shape.1 * shape.2;
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, device)
}

/// Stacks conditions `[T, D]` into `[B, T, D]` (and their masks into `[B, T]`).
fn stack(conds: &[&Cond]) -> Result<(Tensor, Option<Tensor>)> {
    let tokens: Vec<&Tensor> = conds.iter().map(|c| &c.tokens).collect();
    let tokens = Tensor::stack(&tokens, 0)?;
    let mask = if conds.iter().any(|c| c.mask.is_some()) {
        let t = tokens.dim(1)?;
        let ones = Tensor::ones(t, DType::F32, tokens.device())?;
        let masks: Vec<Tensor> = conds
            .iter()
            .map(|c| {
                c.mask
                    .clone()
                    .unwrap_or_else(|| ones.clone())
                    .to_dtype(DType::F32)
            })
            .collect::<Result<_>>()?;
        Some(Tensor::stack(&masks, 0)?)
    } else {
        None
    };
    Ok((tokens, mask))
}

/// Denoises `latents` `[B, C, h, w]` (the initial noise, already scaled by the
/// scheduler's `init_noise_sigma`) under `cond` (one per sample) with `uncond` as the
/// negative; returns the final latents (model space, before `/ 0.18215`).
///
/// `added`: the 1024-MS models' resolution `[B, 2]` and aspect ratio `[B, 1]`.
///
/// # Errors
/// candle errors; a scheduler without timesteps.
pub fn denoise(
    pixart: &PixArt,
    scheduler: &mut AnyScheduler,
    latents: Tensor,
    cond: &[Cond],
    uncond: &Cond,
    guidance: f64,
    added: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let b = latents.dim(0)?;
    let c = latents.dim(1)?;
    if cond.len() != b {
        candle_core::bail!("denoise: {} conditions for {b} latents", cond.len());
    }
    let dtype = cond[0].tokens.dtype();
    // diffusers: guidance only above 1 (`do_classifier_free_guidance`)
    let cfg = guidance > 1.0;
    let mut all: Vec<&Cond> = Vec::with_capacity(2 * b);
    if cfg {
        all.extend(std::iter::repeat_n(uncond, b));
    }
    all.extend(cond.iter());
    let (tokens, mask) = stack(&all)?;
    let added = match added {
        Some((r, a)) if cfg => Some((Tensor::cat(&[r, r], 0)?, Tensor::cat(&[a, a], 0)?)),
        Some((r, a)) => Some((r.clone(), a.clone())),
        None => None,
    };
    let timesteps: Vec<f64> = scheduler.timesteps().to_vec();
    if timesteps.is_empty() {
        candle_core::bail!("denoise: the scheduler has no timesteps (set_timesteps first)");
    }
    let mut x = latents;
    for t in timesteps {
        let input = scheduler.scale_model_input(&x, t)?;
        let input = if cfg {
            Tensor::cat(&[&input, &input], 0)?
        } else {
            input
        };
        let n = input.dim(0)?;
        let ts = Tensor::full(t as f32, n, input.device())?;
        let out = pixart
            .forward(
                &input.to_dtype(dtype)?,
                &ts,
                &tokens,
                mask.as_ref(),
                added.as_ref().map(|(r, a)| (r, a)),
            )?
            .to_dtype(DType::F32)?;
        let guided = if cfg {
            let u = out.narrow(0, 0, b)?;
            let k = out.narrow(0, b, b)?;
            (&u + ((k - &u)? * guidance)?)?
        } else {
            out
        };
        // the learned-variance half is not the scheduler's business
        let eps = if guided.dim(1)? == 2 * c {
            guided.narrow(1, 0, c)?
        } else {
            guided
        };
        x = scheduler.step(&eps.contiguous()?, t, &x)?;
    }
    Ok(x)
}

/// Decodes model-space latents to images `[B, 3, H, W]` in about [-1, 1].
///
/// # Errors
/// candle errors.
pub fn decode(
    vae: &VaeDecoder,
    latents: &Tensor,
    scaling: LatentScaling,
    dtype: DType,
) -> Result<Tensor> {
    let raw = scaling.invert(latents)?;
    vae.decode(&raw.to_dtype(dtype)?)?.to_dtype(DType::F32)
}
