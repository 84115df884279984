//! Sampling Flux: the denoising loop of diffusers' `FluxPipeline` (0.42.1), with true
//! classifier-free guidance for de-distilled models, the guidance embedding for
//! guidance-distilled ones, and the Flux VAE decoder.
//!
//! - The initial noise `[B, 16, h, w]` is packed 2x2 into `[B, N, 64]` with the image
//!   position ids (`N = h/2 * w/2`).
//! - The flow-match Euler scheduler takes FluxPipeline's sigmas `linspace(1, 1/n, n)`,
//!   shifted by `mu = calculate_shift(N)` when the scheduler shifts dynamically
//!   (FLUX.1-dev's config) or statically otherwise.
//! - Per step: Flux's velocity at `sigma = t / 1000` under the condition, and when the
//!   true-CFG scale `g > 1` again under the negative (the condition of nothing, as the
//!   training's dropout puts it), `v = v_neg + g (v - v_neg)`; the embedded guidance
//!   (distilled models) is the same value on both passes. Then `x += (s' - s) v`.
//! - At the end the latents are unpacked and decoded: `vae.decode(z / 0.3611 + 0.1159)`.
//!
//! The noise of variation `k` of prompt `p` is drawn from `(seed, p, k)` as for PixArt
//! ([`crate::sample::initial_noise`]), so a seed gives the same images whatever the
//! batch.

use candle_core::{DType, Result, Tensor};
use tensorbake_nn::flux::{self, Flux, Inputs};
use tensorbake_nn::vae::VaeDecoder;

use crate::flux_task::FluxTask;
use crate::grid::Image;
use crate::latents::LatentScaling;
use crate::pixart_task::PromptInput;
use crate::sample::{GridSampler, decode, initial_noise};
use crate::schedulers::{FlowMatchEulerDiscrete, FlowMatchEulerDiscreteConfig};
use crate::schedulers::{Scheduler, SchedulerError};

/// One condition of Flux: T5 tokens `[T, joint_attention_dim]` and the pooled vector
/// `[pooled_projection_dim]`.
#[derive(Debug, Clone)]
pub struct FluxCond {
    /// `encoder_hidden_states` of one sample.
    pub txt: Tensor,
    /// `pooled_projections` of one sample.
    pub pooled: Tensor,
}

/// How to sample Flux.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FluxSampleSettings {
    /// Denoising steps (FluxPipeline: 28).
    pub steps: usize,
    /// The true-CFG scale (`true_cfg_scale`; 1 runs the conditional pass only).
    pub true_cfg: f64,
    /// The embedded guidance of a guidance-distilled model (`guidance_scale`); `None`
    /// for the others.
    pub guidance: Option<f64>,
    /// Seeds the initial noise.
    pub seed: u64,
}

/// The true-CFG scale a Flux is sampled with by default: 2.5 for models without a
/// guidance embedder (de-distilled: the seed samples OpenFLUX.1 at 2 to 3), 1 (off) for
/// guidance-distilled ones, whose guidance is embedded.
#[must_use]
pub fn default_true_cfg(guidance_embeds: bool) -> f64 {
    if guidance_embeds { 1.0 } else { 2.5 }
}

/// Stacks conditions into `[B, T, D]` tokens and `[B, P]` pooled vectors.
fn stack(conds: &[&FluxCond]) -> Result<(Tensor, Tensor)> {
    let txt: Vec<&Tensor> = conds.iter().map(|c| &c.txt).collect();
    let pooled: Vec<&Tensor> = conds.iter().map(|c| &c.pooled).collect();
    Ok((
        Tensor::stack(&txt, 0)?.detach(),
        Tensor::stack(&pooled, 0)?.detach(),
    ))
}

/// Denoises packed `latents` `[B, N, 64]` (the initial noise, f32) under `cond` (one per
/// sample) with `uncond` as true CFG's negative; returns the final packed latents
/// (model space). `img_ids` are the image position ids `[N, 3]`; `dtype` the compute
/// dtype of `flux`.
///
/// # Errors
/// candle errors; a scheduler without timesteps; a condition count that is not `B`.
#[allow(clippy::too_many_arguments)]
pub fn denoise_flux(
    flux: &Flux,
    scheduler: &mut FlowMatchEulerDiscrete,
    latents: Tensor,
    cond: &[FluxCond],
    uncond: &FluxCond,
    true_cfg: f64,
    guidance: Option<f64>,
    img_ids: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let b = latents.dim(0)?;
    if cond.len() != b {
        candle_core::bail!("denoise_flux: {} conditions for {b} latents", cond.len());
    }
    let device = latents.device().clone();
    let (txt, pooled) = stack(&cond.iter().collect::<Vec<_>>())?;
    // FluxPipeline: `do_true_cfg = true_cfg_scale > 1` (with a negative)
    let negative = if true_cfg > 1.0 {
        let (t, p) = stack(&vec![uncond; b])?;
        Some((flux::text_ids(t.dim(1)?, &device)?, t, p))
    } else {
        None
    };
    let txt_ids = flux::text_ids(txt.dim(1)?, &device)?;
    let g = guidance
        .map(|g| Tensor::from_vec(vec![g as f32; b], b, &device))
        .transpose()?;
    let timesteps: Vec<f64> = scheduler.timesteps().to_vec();
    if timesteps.is_empty() {
        candle_core::bail!("denoise_flux: the scheduler has no timesteps (set_timesteps first)");
    }
    let mut x = latents;
    for t in timesteps {
        // diffusers: `timestep = t.expand(B) / 1000` (float32)
        let sigma = Tensor::full((t as f32) / 1000.0, b, &device)?;
        let hidden = x.to_dtype(dtype)?;
        let velocity = |txt: &Tensor, pooled: &Tensor, ids: &Tensor| {
            flux.forward(&Inputs {
                hidden_states: &hidden,
                encoder_hidden_states: txt,
                pooled_projections: pooled,
                timestep: &sigma,
                img_ids,
                txt_ids: ids,
                guidance: g.as_ref(),
            })?
            .to_dtype(DType::F32)
        };
        let v = velocity(&txt, &pooled, &txt_ids)?;
        let v = match &negative {
            Some((ids, t_neg, p_neg)) => {
                let u = velocity(t_neg, p_neg, ids)?;
                (&u + ((v - &u)? * true_cfg)?)?
            }
            None => v,
        };
        x = scheduler.step(&v.detach(), t, &x)?.detach();
    }
    Ok(x)
}

/// The flow-match scheduler of a Flux run: a diffusers `scheduler_config.json`
/// (`FlowMatchEulerDiscreteScheduler`).
#[derive(Debug, Clone, PartialEq)]
pub struct FluxSchedulerChoice {
    /// The config.
    pub config: FlowMatchEulerDiscreteConfig,
    /// Where it came from (shown in the log).
    pub source: String,
}

impl FluxSchedulerChoice {
    /// FLUX.1-dev's (dynamic shift from `mu` 0.5 at 256 tokens to 1.15 at 4096): the
    /// shift the Flux modes train with unless a fixed `shift` is set.
    #[must_use]
    pub fn flux_dev() -> Self {
        Self {
            config: FlowMatchEulerDiscreteConfig::flux_dev(),
            source: "FLUX.1-dev's FlowMatchEulerDiscreteScheduler".into(),
        }
    }

    /// A `scheduler_config.json` of `FlowMatchEulerDiscreteScheduler`.
    ///
    /// # Errors
    /// The file cannot be read, is another scheduler's, or sets an unsupported value.
    pub fn from_file(path: &std::path::Path) -> std::result::Result<Self, String> {
        let json = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&crate::schedulers::python_json(&json))
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        match v["_class_name"].as_str() {
            None | Some("FlowMatchEulerDiscreteScheduler") => {}
            Some(other) => {
                return Err(format!(
                    "{}: `_class_name` is {other}; Flux samples with FlowMatchEulerDiscreteScheduler",
                    path.display()
                ));
            }
        }
        let config = FlowMatchEulerDiscreteConfig::from_json(&json)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        config
            .build()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            config,
            source: path.display().to_string(),
        })
    }

    /// The scheduler of the model at `spec` (a diffusers pipeline's `transformer/`
    /// directory has `../scheduler/scheduler_config.json`), else FLUX.1-dev's.
    ///
    /// # Errors
    /// A scheduler config that is there but unreadable.
    pub fn for_model(spec: &std::path::Path) -> std::result::Result<Self, String> {
        let beside = spec
            .parent()
            .map(|p| p.join("scheduler").join("scheduler_config.json"));
        match beside {
            Some(p) if spec.is_dir() && p.is_file() => Self::from_file(&p),
            _ => Ok(Self::flux_dev()),
        }
    }

    /// The scheduler with FluxPipeline's timesteps for `steps` steps at `tokens` packed
    /// image tokens.
    ///
    /// # Errors
    /// `steps == 0`; an unsupported config value.
    pub fn build(
        &self,
        steps: usize,
        tokens: usize,
    ) -> std::result::Result<FlowMatchEulerDiscrete, SchedulerError> {
        let mut s = self.config.build()?;
        s.set_timesteps_flux(steps, tokens)?;
        Ok(s)
    }
}

/// Samples from a Flux mode: its task (Flux with its trained weights, the conditions),
/// the store's Flux VAE decoder, a scheduler.
pub struct FluxSampler<'a> {
    /// The mode and its models (a checkpoint's, or the live run's).
    pub task: &'a FluxTask,
    /// The decoder of the Flux VAE that encoded the store.
    pub vae: &'a VaeDecoder,
    /// The scheduler.
    pub scheduler: &'a FluxSchedulerChoice,
    /// Steps, guidance, seed.
    pub settings: FluxSampleSettings,
}

impl std::fmt::Debug for FluxSampler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxSampler")
            .field("scheduler", &self.scheduler.source)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl GridSampler for FluxSampler<'_> {
    fn mode(&self) -> crate::config::Mode {
        self.task.mode()
    }

    fn images(&self, p: usize, input: &PromptInput, n: usize) -> Result<Vec<Image>> {
        let task = self.task;
        let cond = task.cond_of(input)?;
        let uncond = task.null_cond()?;
        let (c, h, w) = task.latent_shape();
        let tokens = (h / 2) * (w / 2);
        let mut scheduler = self
            .scheduler
            .build(self.settings.steps, tokens)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let noise = (0..n)
            .map(|k| initial_noise(self.settings.seed, p, k, (c, h, w), task.device()))
            .collect::<Result<Vec<_>>>()?;
        let latents = flux::pack_latents(&Tensor::stack(&noise, 0)?)?;
        let (img_ids, _) = task.position_ids();
        let z = denoise_flux(
            task.flux(),
            &mut scheduler,
            latents,
            &vec![cond; n],
            &uncond,
            self.settings.true_cfg,
            self.settings.guidance,
            img_ids,
            task.dtype(),
        )?;
        let z = flux::unpack_latents(&z, h, w)?;
        let img = decode(self.vae, &z, LatentScaling::FLUX, task.dtype())?;
        (0..n)
            .map(|i| crate::grid::to_image(&img.get(i)?))
            .collect()
    }

    fn vae(&self) -> &VaeDecoder {
        self.vae
    }

    fn placement(&self) -> (&candle_core::Device, DType) {
        (self.task.device(), self.task.dtype())
    }
}
