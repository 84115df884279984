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
    // Sampling needs no graph: a condition computed from trainable variables (a live
    // run's validation, an adapter being trained) or a PixArt with trainable weights
    // would otherwise chain every step's activations to the next through the latents,
    // and the memory of a sampling run would grow with its steps.
    let (tokens, mask) = stack(&all)?;
    let tokens = tokens.detach();
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
        x = scheduler.step(&eps.contiguous()?.detach(), t, &x)?.detach();
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

/// Which scheduler samples: a diffusers `scheduler_config.json` and the class to run it
/// as (its own `_class_name` unless overridden, as `Scheduler.from_config` does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerChoice {
    /// The config JSON.
    pub json: String,
    /// The class to build.
    pub class: String,
}

impl SchedulerChoice {
    /// PixArt-α's own: DPM-Solver++ 2M, as PixArt-XL-2-512x512 ships it.
    #[must_use]
    pub fn pixart_dpm() -> Self {
        let cfg = crate::schedulers::DpmSolverMultistepConfig::pixart();
        Self {
            json: serde_json::to_string(&cfg).unwrap_or_default(),
            class: "DPMSolverMultistepScheduler".into(),
        }
    }

    /// DDIM on PixArt's schedule (`DDIMScheduler.from_config` of PixArt's config).
    #[must_use]
    pub fn pixart_ddim() -> Self {
        Self {
            class: "DDIMScheduler".into(),
            ..Self::pixart_dpm()
        }
    }

    /// A `scheduler_config.json`, run as the class it names.
    ///
    /// # Errors
    /// The file cannot be read or has no `_class_name`.
    pub fn from_file(path: &std::path::Path) -> std::result::Result<Self, String> {
        let json = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&crate::schedulers::python_json(&json))
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let class = v["_class_name"]
            .as_str()
            .ok_or_else(|| format!("{}: no `_class_name`", path.display()))?
            .to_string();
        Ok(Self { json, class })
    }

    /// The scheduler, with `steps` timesteps set.
    ///
    /// # Errors
    /// An unsupported class or value.
    pub fn build(
        &self,
        steps: usize,
    ) -> std::result::Result<AnyScheduler, crate::schedulers::SchedulerError> {
        let mut s = AnyScheduler::from_class_and_json(&self.class, &self.json)?;
        s.set_timesteps(steps, None)?;
        Ok(s)
    }
}

/// Samples from a PixArt mode: its task (models, conditions), the store's VAE decoder,
/// a scheduler.
pub struct Sampler<'a> {
    /// The mode and its models (a checkpoint's, or the live run's).
    pub task: &'a crate::pixart_task::PixArtTask,
    /// The decoder of the VAE that encoded the store.
    pub vae: &'a VaeDecoder,
    /// The scheduler.
    pub scheduler: &'a SchedulerChoice,
    /// Steps, guidance, seed.
    pub settings: SampleSettings,
}

impl std::fmt::Debug for Sampler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("scheduler", &self.scheduler.class)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn sched_err(e: crate::schedulers::SchedulerError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// What a sample grid needs of a mode's sampler (PixArt's [`Sampler`], Flux's
/// [`crate::flux_sample::FluxSampler`]).
pub trait GridSampler {
    /// The training mode sampled (which stored arrays make a prompt).
    fn mode(&self) -> crate::config::Mode;

    /// `n` images of prompt number `p` (its noise seeds are `(seed, p, 0..n)`).
    ///
    /// # Errors
    /// candle errors; an input of the wrong mode.
    fn images(
        &self,
        p: usize,
        input: &crate::pixart_task::PromptInput,
        n: usize,
    ) -> Result<Vec<crate::grid::Image>>;

    /// The decoder of the VAE that encoded the store.
    fn vae(&self) -> &VaeDecoder;

    /// The device and compute dtype the models run in.
    fn placement(&self) -> (&Device, DType);

    /// The image a stored latent mean `[C, h, w]` (raw, unscaled) decodes to (the
    /// prompt cell of a stored sample: the store keeps no pixels).
    ///
    /// # Errors
    /// candle errors.
    fn reconstruct(&self, mean: &Tensor) -> Result<crate::grid::Image> {
        let (device, dtype) = self.placement();
        let raw = mean.to_device(device)?.to_dtype(dtype)?.unsqueeze(0)?;
        let img = self.vae().decode(&raw)?.to_dtype(DType::F32)?;
        crate::grid::to_image(&img.get(0)?)
    }

    /// The grid of `prompts`: one row each, `n` variations, `cell`-pixel cells.
    ///
    /// # Errors
    /// As [`GridSampler::images`].
    fn grid(
        &self,
        prompts: &[(crate::grid::Prompt, crate::pixart_task::PromptInput)],
        n: usize,
        cell: u32,
    ) -> Result<crate::draw::Canvas> {
        let mut rows = Vec::with_capacity(prompts.len());
        for (p, (shown, input)) in prompts.iter().enumerate() {
            rows.push((shown.clone(), self.images(p, input, n)?));
        }
        Ok(crate::grid::grid(&rows, cell, 2))
    }
}

impl GridSampler for Sampler<'_> {
    fn mode(&self) -> crate::config::Mode {
        self.task.mode()
    }

    fn images(
        &self,
        p: usize,
        input: &crate::pixart_task::PromptInput,
        n: usize,
    ) -> Result<Vec<crate::grid::Image>> {
        let task = self.task;
        let cond = task.cond_of(input)?;
        let uncond = task.null_cond()?;
        let mut scheduler = self
            .scheduler
            .build(self.settings.steps)
            .map_err(sched_err)?;
        let shape = task.latent_shape();
        let noise = (0..n)
            .map(|k| initial_noise(self.settings.seed, p, k, shape, task.device()))
            .collect::<Result<Vec<_>>>()?;
        let latents = (Tensor::stack(&noise, 0)? * scheduler.init_noise_sigma())?;
        let conds = vec![cond; n];
        let added = task.size_added(n)?;
        let z = denoise(
            task.pixart(),
            &mut scheduler,
            latents,
            &conds,
            &uncond,
            self.settings.guidance,
            added.as_ref().map(|(r, a)| (r, a)),
        )?;
        let img = decode(self.vae, &z, LatentScaling::SD, task.dtype())?;
        (0..n)
            .map(|i| crate::grid::to_image(&img.get(i)?))
            .collect()
    }

    fn vae(&self) -> &VaeDecoder {
        self.vae
    }

    fn placement(&self) -> (&Device, DType) {
        (self.task.device(), self.task.dtype())
    }
}

/// The first `n` samples of the store's shuffled order (epoch 0 of `seed`) as prompts:
/// their stored condition (SigLIP tokens, a CLIP image embedding, or T5 tokens, as the
/// mode conditions), shown as the decoded stored latent (image modes) or their caption
/// (text mode).
///
/// # Errors
/// Store read errors; candle errors decoding the latents.
pub fn prompts_from_store(
    reader: &tensorbake_store::StoreReader,
    sampler: &dyn GridSampler,
    n: usize,
    seed: u64,
) -> std::result::Result<
    Vec<(crate::grid::Prompt, crate::pixart_task::PromptInput)>,
    crate::TrainError,
> {
    use tensorbake_kit::schema::Array;
    let order = tensorbake_store::epoch_order(reader.len(), seed, 0);
    use crate::config::Mode;
    let mode = sampler.mode();
    let c = tensorbake_nn::Error::candle("sampling from the store");
    let mut out = Vec::new();
    for &i in order.iter().take(n) {
        let s = reader.get(i)?;
        let f = |a: Array| {
            s.features
                .get(a.name())
                .cloned()
                .ok_or_else(|| crate::TrainError::Store {
                    store: reader.location().to_string(),
                    why: format!("sample {} has no `{a}`", s.key),
                })
        };
        if mode == Mode::PixartText {
            let len = f(Array::T5Len)?
                .to_dtype(DType::U32)
                .and_then(|t| t.to_scalar::<u32>())
                .map_err(&c)?;
            out.push((
                crate::grid::Prompt::Caption(s.caption.clone()),
                crate::pixart_task::PromptInput::T5 {
                    hidden: f(Array::T5Hidden)?,
                    len,
                },
            ));
        } else {
            let latent = if mode.is_flux() {
                Array::FluxVaeMean
            } else {
                Array::SdVaeMean
            };
            let shown = sampler.reconstruct(&f(latent)?).map_err(&c)?;
            let input = if mode == Mode::FluxClipImage {
                crate::pixart_task::PromptInput::ClipImage(f(Array::ClipImageEmbeds)?)
            } else {
                crate::pixart_task::PromptInput::Siglip(f(Array::SiglipHidden)?)
            };
            out.push((crate::grid::Prompt::Image(shown), input));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;

    /// Denoising keeps no graph: with the condition computed from a variable (a live
    /// run's adapter) and a PixArt whose weights are variables (a fine-tune's), the
    /// sampled latents carry no gradient back to either, so no step's activations are
    /// held past the step.
    #[test]
    fn denoise_keeps_no_graph() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        tensorbake_nn::tiny::write_tiny_pixart(
            dir.path(),
            3,
            tensorbake_nn::tiny::TinyPixart::Xl512,
            32,
            8,
        )
        .map_err(candle_core::Error::wrap)?;
        let vars = tensorbake_nn::VarSet::new();
        let trainable = tensorbake_nn::Trainable::all(&vars);
        let (pixart, _, _) = tensorbake_nn::pixart::load_pixart(
            &dir.path().to_string_lossy(),
            DType::F32,
            &dev,
            Some(&trainable),
        )
        .map_err(candle_core::Error::wrap)?;
        let w = Var::from_tensor(&Tensor::ones((5, 32), DType::F32, &dev)?)?;
        let cond = Cond {
            tokens: (w.as_tensor() * 0.5)?,
            mask: None,
        };
        let uncond = Cond {
            tokens: Tensor::zeros((5, 32), DType::F32, &dev)?,
            mask: None,
        };
        let mut scheduler = SchedulerChoice::pixart_dpm()
            .build(3)
            .map_err(candle_core::Error::wrap)?;
        let latents = Tensor::randn(0f32, 1f32, (1, 4, 8, 8), &dev)?;
        let z = denoise(
            &pixart,
            &mut scheduler,
            latents,
            &[cond],
            &uncond,
            4.5,
            None,
        )?;
        let grads = z.sum_all()?.backward()?;
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "the condition's variable"
        );
        for (name, v) in vars.vars() {
            assert!(grads.get(v.as_tensor()).is_none(), "{name}");
        }
        assert!(!vars.vars().is_empty());
        Ok(())
    }
}
