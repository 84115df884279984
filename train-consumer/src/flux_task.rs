//! The Flux modes as a [`Task`]: `flux_clip_image` (Flux reconditioned on the CLIP
//! image embedding in its pooled slot; a LoRA, some blocks or all of it trained) and
//! `flux_redux_adapter` (Flux frozen, a fresh Redux adapter on SigLIP trained).
//!
//! One step, as diffusers' Flux training scripts do it ([`crate::flow`]):
//! latents `x0 = (mean + std * eps - 0.1159) * 0.3611` from the stored Flux-VAE moments;
//! sigmas by the weighting scheme and shift; `x_t = (1 - t) x0 + t n`; packed 2x2 into
//! `[B, N, 64]` with the image position ids; the condition:
//!
//! - `flux_clip_image`: pooled input = the stored `clip_image_embeds` (during the blend
//!   warm-up `(1 - w) clip_text_pooled + w clip_image_embeds`); T5 tokens = the store's
//!   recorded empty-caption `t5_hidden` for every sample; a dropped sample's pooled input
//!   is the recorded black-image CLIP embedding.
//! - `flux_redux_adapter`: T5 tokens = the empty caption's, then the adapter's tokens of
//!   every stored SigLIP token (`FluxPriorReduxPipeline`: `cat([t5, redux(siglip)])`);
//!   pooled = the empty caption's `clip_text_pooled`; a dropped sample's SigLIP input is
//!   the black image's.
//!
//! Guidance-distilled models (`guidance_embeds`) get `guidance` as their guidance input.
//! The loss is the flow-matching MSE against `n - x0`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, Var};
use tensorbake_kit::schema::Array;
use tensorbake_nn::flux::{self, Flux, Inputs};
use tensorbake_nn::loader::{Trainable, VarSet};
use tensorbake_nn::lora::{self, LoraConfig};
use tensorbake_nn::redux::{self, Redux};
use tensorbake_nn::weights::fingerprint;
use tensorbake_store::{Batch, StoreReader};

use crate::TrainError;
use crate::config::{Mode, TrainConfig};
use crate::flow::{self, Shift, SigmaSampler};
use crate::flux_sample::FluxCond;
use crate::latents::{LatentScaling, draw_latents};
use crate::noise::Noise;
use crate::pixart_task::{PromptInput, null_of, shape_of, store_err};
use crate::recompute::{BlockFn, SideGrads, gather, recompute};
use crate::trainer::{Losses, Ramp, Task, replace_dropped, resolve_spec};

/// Flux's latent channels (the 16-channel autoencoder).
pub const LATENT_CHANNELS: usize = 16;
/// The guidance value of guidance-distilled models when the config gives none
/// (diffusers' Flux training scripts).
pub const DEFAULT_GUIDANCE: f64 = 3.5;

/// What trains.
#[derive(Debug, Clone)]
enum Training {
    /// A LoRA on a frozen Flux.
    Lora(LoraConfig),
    /// Flux's own weights (all, or some blocks).
    Weights,
    /// A fresh Redux adapter (Flux frozen).
    Adapter,
}

/// The condition's inputs.
enum Condition {
    /// CLIP image embedding in the pooled slot.
    ClipImage {
        /// The black image's `clip_image_embeds` `[W]` (compute dtype).
        null_pooled: Tensor,
        /// The blend warm-up: the image embedding's weight by step.
        blend: Option<Ramp>,
    },
    /// Redux tokens after the T5 tokens.
    Redux {
        redux: Redux,
        /// The black image's `siglip_hidden` `[729, W]` (compute dtype).
        null_siglip: Tensor,
        /// The empty caption's `clip_text_pooled` `[768]` (compute dtype).
        pooled: Tensor,
    },
}

/// A Flux mode ready to train.
pub struct FluxTask {
    mode: Mode,
    flux: Flux,
    flux_cfg: flux::Config,
    vars: VarSet,
    training: Training,
    condition: Condition,
    /// The empty caption's `t5_hidden` `[L, 4096]` (compute dtype).
    t5_null: Tensor,
    sigmas: SigmaSampler,
    guidance: Option<f64>,
    dropout: Ramp,
    /// Recompute each block in the backward ([`crate::recompute`]).
    checkpointing: bool,
    /// Whether each double / single block holds trained tensors.
    block_trains: (Vec<bool>, Vec<bool>),
    /// `[N, 3]` image and `[T, 3]` text position ids.
    img_ids: Tensor,
    txt_ids: Tensor,
    latent_shape: (usize, usize, usize),
    device: Device,
    dtype: DType,
    describe: serde_json::Value,
}

/// The module paths a LoRA of `settings` adapts: each entry a path of the model or the
/// ending of some (`attn.to_q`), as peft matches `target_modules`.
fn lora_targets(flux: &Flux, entries: Option<&[String]>) -> Result<Vec<String>, TrainError> {
    let default = flux.lora_targets();
    let Some(entries) = entries else {
        return Ok(default);
    };
    let all: Vec<String> = flux
        .linears()
        .iter()
        .map(|l| l.path().to_string())
        .collect();
    let mut out = Vec::new();
    for e in entries {
        let hits: Vec<&String> = all
            .iter()
            .filter(|p| *p == e || p.ends_with(&format!(".{e}")))
            .collect();
        if hits.is_empty() {
            return Err(TrainError::Config(format!(
                "`lora.targets`: `{e}` names no linear layer of this Flux (give module paths such \
                 as transformer_blocks.0.attn.to_q or endings such as attn.to_q, proj_mlp)"
            )));
        }
        out.extend(hits.into_iter().cloned());
    }
    // model order, each once
    Ok(all.into_iter().filter(|p| out.contains(p)).collect())
}

/// The tensor-name prefixes of `train_blocks` indices: `0..num_layers` are the double
/// blocks, the next `num_single_layers` the single blocks.
fn block_prefixes(
    cfg: &flux::Config,
    blocks: &[usize],
    spec: &str,
) -> Result<Vec<String>, TrainError> {
    let (d, s) = (cfg.num_layers, cfg.num_single_layers);
    blocks
        .iter()
        .map(|&b| {
            if b < d {
                Ok(format!("transformer_blocks.{b}."))
            } else if b < d + s {
                Ok(format!("single_transformer_blocks.{}.", b - d))
            } else {
                Err(TrainError::Config(format!(
                    "`train_blocks` names block {b}; Flux ({spec}) has blocks 0..{}: 0..{d} are \
                     transformer_blocks, {d}..{} single_transformer_blocks 0..{s}",
                    d + s,
                    d + s
                )))
            }
        })
        .collect()
}

impl FluxTask {
    /// Loads Flux (and a fresh adapter) for `cfg.mode` (paths relative to `base`) and
    /// checks them against the store: 16 latent channels, the pooled width, the null
    /// embeddings and their lengths.
    ///
    /// # Errors
    /// [`TrainError::Store`] naming what the store lacks or what does not fit;
    /// [`TrainError::Model`] for weights not found or not loadable;
    /// [`TrainError::Config`] for settings the model contradicts.
    #[allow(clippy::too_many_lines)]
    pub fn build(
        cfg: &TrainConfig,
        base: &Path,
        reader: &StoreReader,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mode = cfg.mode;
        let Some(spec) = cfg.flux.as_deref().filter(|_| mode.is_flux()) else {
            return Err(TrainError::Config(format!(
                "mode `{mode}` is not a Flux mode with a `flux` model"
            )));
        };
        let dtype = tensorbake_nn::compute_dtype(cfg.dtype, device)?;
        let spec_path = resolve_spec(base, spec);
        // The store first: what is missing is found before multi-GB weights load.
        let how = "add the encoder to the store's manifest and `tensorbake run` it";
        let latent = shape_of(reader, Array::FluxVaeMean, mode, how)?;
        shape_of(reader, Array::FluxVaeStd, mode, how)?;
        if latent[0] != LATENT_CHANNELS {
            return Err(store_err(
                reader,
                format!(
                    "flux_vae latents have {} channels ({:?}); Flux's autoencoder has {LATENT_CHANNELS}",
                    latent[0], latent
                ),
            ));
        }
        if latent[1] % 2 == 1 || latent[2] % 2 == 1 {
            return Err(store_err(
                reader,
                format!(
                    "flux_vae latents are {}x{}; Flux packs 2x2 patches and needs even sides \
                     (a resolution that is a multiple of 16)",
                    latent[1], latent[2]
                ),
            ));
        }
        let t5 = shape_of(reader, Array::T5Hidden, mode, how)?;
        let c = |what: &'static str| tensorbake_nn::Error::candle(what);
        let t5_null = null_of(reader, Array::T5Hidden, device)?
            .to_dtype(dtype)
            .map_err(c("t5 null embedding"))?;
        let pooled_width;
        let condition_store = if mode == Mode::FluxClipImage {
            let clip = shape_of(reader, Array::ClipImageEmbeds, mode, how)?;
            pooled_width = clip[0];
            let null_pooled = null_of(reader, Array::ClipImageEmbeds, device)?
                .to_dtype(dtype)
                .map_err(c("clip image null embedding"))?;
            if cfg.pooled_blend_steps > 0 {
                let text = shape_of(
                    reader,
                    Array::ClipTextPooled,
                    mode,
                    "`pooled_blend_steps` blends from the caption's CLIP embedding: add clip_text \
                     to the store's manifest and `tensorbake run` it",
                )?;
                if text[0] != clip[0] {
                    return Err(store_err(
                        reader,
                        format!(
                            "clip_text_pooled is {} wide, clip_image_embeds {}: they cannot be \
                             blended",
                            text[0], clip[0]
                        ),
                    ));
                }
            }
            (Some(null_pooled), None)
        } else {
            shape_of(reader, Array::SiglipHidden, mode, how)?;
            let text = shape_of(reader, Array::ClipTextPooled, mode, how)?;
            pooled_width = text[0];
            let null_siglip = null_of(reader, Array::SiglipHidden, device)?
                .to_dtype(dtype)
                .map_err(c("siglip null embedding"))?;
            let pooled = null_of(reader, Array::ClipTextPooled, device)?
                .to_dtype(dtype)
                .map_err(c("clip text null embedding"))?;
            (None, Some((null_siglip, pooled)))
        };
        let vars = VarSet::with_dtype(cfg.master_dtype());
        // The trainable tensors of Flux itself (none for a LoRA or the adapter).
        let trainable = match (mode, &cfg.lora, &cfg.train_blocks) {
            (Mode::FluxReduxAdapter, _, _) | (_, Some(_), _) => None,
            (_, None, None) => Some(Trainable::all(&vars)),
            (_, None, Some(blocks)) => {
                let prefixes = block_prefixes(&flux::io::config_of(&spec_path)?, blocks, spec)?;
                Some(Trainable::when(&vars, move |n| {
                    prefixes.iter().any(|p| n.starts_with(p))
                }))
            }
        };
        let (mut model, flux_cfg, files) =
            flux::load_flux(&spec_path, dtype, device, trainable.as_ref())?;
        // The store against the model.
        if flux_cfg.in_channels != 4 * LATENT_CHANNELS {
            return Err(TrainError::Config(format!(
                "Flux ({spec}) takes {} input channels; packed Flux-VAE latents have {}",
                flux_cfg.in_channels,
                4 * LATENT_CHANNELS
            )));
        }
        if pooled_width != flux_cfg.pooled_projection_dim {
            let what = if mode == Mode::FluxClipImage {
                "clip_image_embeds"
            } else {
                "clip_text_pooled"
            };
            return Err(store_err(
                reader,
                format!(
                    "{what} is {pooled_width} wide; Flux ({spec}) takes a pooled vector of \
                     pooled_projection_dim {} (CLIP ViT-L/14: 768)",
                    flux_cfg.pooled_projection_dim
                ),
            ));
        }
        if t5[1] != flux_cfg.joint_attention_dim {
            return Err(store_err(
                reader,
                format!(
                    "t5_hidden is {} wide ({t5:?}); Flux ({spec}) takes T5 tokens of \
                     joint_attention_dim {}",
                    t5[1], flux_cfg.joint_attention_dim
                ),
            ));
        }
        let want_len = if flux_cfg.guidance_embeds { 512 } else { 256 };
        if t5[0] < want_len {
            return Err(store_err(
                reader,
                format!(
                    "the null T5 embedding (t5_hidden of the empty caption) has {} tokens; Flux \
                     ({spec}) was trained with {want_len} ({}): encode T5 with max_length \
                     {want_len} in the store's manifest and `tensorbake run` it",
                    t5[0],
                    if flux_cfg.guidance_embeds {
                        "FLUX.1-dev"
                    } else {
                        "FLUX.1-schnell and its de-distillations"
                    }
                ),
            ));
        }
        let t5_null = t5_null
            .narrow(0, 0, want_len)
            .map_err(c("t5 null embedding"))?;
        let guidance = match (flux_cfg.guidance_embeds, cfg.guidance) {
            (true, g) => Some(g.unwrap_or(DEFAULT_GUIDANCE)),
            (false, None) => None,
            (false, Some(_)) => {
                return Err(TrainError::Config(format!(
                    "`guidance` is given, but Flux ({spec}) has no guidance embedder \
                     (guidance_embeds false: OpenFLUX.1, schnell); remove it"
                )));
            }
        };
        let training = match (mode, &cfg.lora) {
            (Mode::FluxReduxAdapter, _) => Training::Adapter,
            (_, Some(l)) => {
                let lc = LoraConfig {
                    rank: l.rank,
                    alpha: l.alpha.unwrap_or(l.rank as f64),
                    targets: lora_targets(&model, l.targets.as_deref())?,
                };
                lora::attach(&mut model, &lc, &vars, cfg.seed, device)?;
                Training::Lora(lc)
            }
            (_, None) => Training::Weights,
        };
        let condition = match condition_store {
            (Some(null_pooled), _) => Condition::ClipImage {
                null_pooled,
                blend: (cfg.pooled_blend_steps > 0).then_some(Ramp {
                    start: cfg.pooled_blend_start,
                    end: 1.0,
                    steps: cfg.pooled_blend_steps,
                }),
            },
            (None, Some((null_siglip, pooled))) => {
                let rcfg = redux::Config {
                    redux_dim: null_siglip.dim(1).map_err(c("siglip null embedding"))?,
                    txt_in_features: flux_cfg.joint_attention_dim,
                };
                let vb = tensorbake_nn::init::fresh_var_builder(cfg.seed, &vars, dtype, device);
                let redux = Redux::new(vb, &rcfg).map_err(c("redux"))?;
                Condition::Redux {
                    redux,
                    null_siglip,
                    pooled,
                }
            }
            (None, None) => unreachable!("one condition per mode"),
        };
        let (h, w) = (latent[1], latent[2]);
        let tokens = (h / 2) * (w / 2);
        let shift = cfg
            .shift
            .map_or_else(|| Shift::for_tokens(tokens), Shift::Fixed);
        let sigmas = SigmaSampler {
            scheme: cfg.weighting_scheme,
            logit_mean: cfg.logit_mean,
            logit_std: cfg.logit_std,
            mode_scale: cfg.mode_scale,
            shift,
        };
        let txt_len = want_len
            + match &condition {
                Condition::Redux { null_siglip, .. } => {
                    null_siglip.dim(0).map_err(c("siglip null embedding"))?
                }
                Condition::ClipImage { .. } => 0,
            };
        // Which blocks hold trained tensors (their own, or a LoRA's: `transformer.` names).
        let names: Vec<String> = vars.vars().into_iter().map(|(n, _)| n).collect();
        let trains_under = |prefix: String| {
            let lora = format!("{}.{prefix}", lora::PREFIX);
            names
                .iter()
                .any(|n| n.starts_with(&prefix) || n.starts_with(&lora))
        };
        let block_trains = (
            (0..flux_cfg.num_layers)
                .map(|i| trains_under(format!("transformer_blocks.{i}.")))
                .collect(),
            (0..flux_cfg.num_single_layers)
                .map(|i| trains_under(format!("single_transformer_blocks.{i}.")))
                .collect(),
        );
        let ids = c("flux position ids");
        let img_ids = flux::latent_image_ids(h / 2, w / 2, device).map_err(&ids)?;
        let txt_ids = flux::text_ids(txt_len, device).map_err(&ids)?;
        let describe = serde_json::json!({
            "flux": {
                "spec": spec,
                "weights_sha256": fingerprint(&files)?,
                "config": flux_cfg.to_diffusers_json(),
            },
            "training": match &training {
                Training::Lora(l) => serde_json::json!({"lora": l}),
                Training::Weights => serde_json::json!({"weights": vars.len()}),
                Training::Adapter => serde_json::json!({"redux_adapter_fresh_from_seed": cfg.seed}),
            },
            "objective": "flow_matching",
            "sigma_shift": match shift {
                Shift::Fixed(s) => serde_json::json!({"fixed": s}),
                Shift::Mu(mu) => serde_json::json!({"mu": mu, "image_tokens": tokens}),
            },
            "guidance": guidance,
            "t5_tokens": want_len,
            "latent_scaling": {"shift": LatentScaling::FLUX.shift, "scale": LatentScaling::FLUX.scale},
        });
        Ok(Self {
            mode,
            flux: model,
            flux_cfg,
            vars,
            training,
            condition,
            t5_null,
            sigmas,
            guidance,
            dropout: Ramp::dropout(cfg),
            checkpointing: cfg.gradient_checkpointing,
            block_trains,
            img_ids,
            txt_ids,
            latent_shape: (latent[0], h, w),
            device: device.clone(),
            dtype,
            describe,
        })
    }

    /// The Flux model (with its LoRA, if any).
    #[must_use]
    pub fn flux(&self) -> &Flux {
        &self.flux
    }

    /// The mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The store's per-sample latent shape `(16, h, w)`.
    #[must_use]
    pub fn latent_shape(&self) -> (usize, usize, usize) {
        self.latent_shape
    }

    /// The guidance input of a guidance-distilled model.
    #[must_use]
    pub fn guidance(&self) -> Option<f64> {
        self.guidance
    }

    /// The LoRA trained, if that is what trains.
    #[must_use]
    pub fn lora(&self) -> Option<&LoraConfig> {
        match &self.training {
            Training::Lora(l) => Some(l),
            _ => None,
        }
    }

    /// The T5 tokens `[B, T, 4096]` and pooled vectors `[B, 768]` of `batch` at
    /// optimizer step `step`, with the samples in `dropped` given the condition of
    /// nothing.
    ///
    /// # Errors
    /// candle errors; a batch without the condition arrays.
    pub fn condition(
        &self,
        batch: &Batch,
        dropped: &[bool],
        step: u64,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let pick = |name: Array| {
            batch
                .tensors
                .get(name.name())
                .ok_or_else(|| candle_core::Error::Msg(format!("batch has no `{name}`")))
        };
        let image = match &self.condition {
            Condition::ClipImage { null_pooled, blend } => {
                let mut pooled = pick(Array::ClipImageEmbeds)?.to_dtype(self.dtype)?;
                if let Some(ramp) = blend {
                    let w = ramp.at(step);
                    if w < 1.0 {
                        let text = pick(Array::ClipTextPooled)?.to_dtype(self.dtype)?;
                        pooled = ((pooled * w)? + (text * (1.0 - w))?)?;
                    }
                }
                replace_dropped(&pooled, null_pooled, dropped)?
            }
            Condition::Redux { null_siglip, .. } => {
                let s = pick(Array::SiglipHidden)?.to_dtype(self.dtype)?;
                replace_dropped(&s, null_siglip, dropped)?
            }
        };
        self.assemble(&image)
    }

    /// The Flux inputs `(T5 tokens [B, T, 4096], pooled [B, 768])` of image conditions
    /// `[B, ...]` (compute dtype): CLIP image embeddings `[B, 768]` in the pooled slot
    /// beside the null T5, or SigLIP tokens `[B, 729, W]` through the adapter after it.
    fn assemble(&self, image: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let b = image.dim(0)?;
        let t5 = self.t5_null.unsqueeze(0)?.repeat((b, 1, 1))?;
        match &self.condition {
            Condition::ClipImage { .. } => Ok((t5, image.clone())),
            Condition::Redux { redux, pooled, .. } => {
                let image_tokens = redux.forward(&image.contiguous()?)?;
                let txt = Tensor::cat(&[&t5, &image_tokens], 1)?;
                Ok((txt, pooled.unsqueeze(0)?.repeat((b, 1))?))
            }
        }
    }

    /// The condition of one prompt: a CLIP image embedding `[768]` (`flux_clip_image`)
    /// or SigLIP hidden states `[729, W]` (`flux_redux_adapter`), as Flux's inputs
    /// `(txt [T, 4096], pooled [768])`.
    ///
    /// # Errors
    /// candle errors; an input of the other mode.
    pub fn cond_of(&self, input: &PromptInput) -> candle_core::Result<FluxCond> {
        let image = match (&self.condition, input) {
            (Condition::ClipImage { .. }, PromptInput::ClipImage(e))
            | (Condition::Redux { .. }, PromptInput::Siglip(e)) => e,
            (Condition::ClipImage { .. }, _) => candle_core::bail!(
                "mode `{}` conditions on a CLIP image embedding (clip_image_embeds)",
                self.mode
            ),
            (Condition::Redux { .. }, _) => candle_core::bail!(
                "mode `{}` conditions on SigLIP hidden states (siglip_hidden)",
                self.mode
            ),
        };
        let image = image
            .to_device(&self.device)?
            .to_dtype(self.dtype)?
            .unsqueeze(0)?;
        let (txt, pooled) = self.assemble(&image)?;
        Ok(FluxCond {
            txt: txt.squeeze(0)?,
            pooled: pooled.squeeze(0)?,
        })
    }

    /// The condition of nothing (true CFG's negative): the black image's CLIP embedding
    /// or SigLIP tokens, as the dropout of training puts it.
    ///
    /// # Errors
    /// candle errors.
    pub fn null_cond(&self) -> candle_core::Result<FluxCond> {
        match &self.condition {
            Condition::ClipImage { null_pooled, .. } => {
                self.cond_of(&PromptInput::ClipImage(null_pooled.clone()))
            }
            Condition::Redux { null_siglip, .. } => {
                self.cond_of(&PromptInput::Siglip(null_siglip.clone()))
            }
        }
    }

    /// The compute dtype.
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    #[must_use]
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The flow-matching loss (the batch mean, f32 scalar) and the packed velocity for
    /// latents `x0` `[B, 16, h, w]`, noise `n` and sigmas `t` `[B]` under the condition
    /// `(txt, pooled)`: what a step computes after its draws. With
    /// `gradient_checkpointing` the blocks' parameter gradients of the backward land in
    /// `side` ([`crate::recompute::gather`]).
    ///
    /// # Errors
    /// candle errors.
    pub fn loss_of(
        &self,
        x0: &Tensor,
        n: &Tensor,
        t: &Tensor,
        txt: &Tensor,
        pooled: &Tensor,
        side: &SideGrads,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let x_t = flow::interpolate(x0, n, t)?;
        let inputs = self.inputs(&flux::pack_latents(&x_t)?, t, txt, pooled)?;
        let v = if self.checkpointing {
            self.forward_recomputed(&inputs.as_inputs(), side)?
        } else {
            self.flux.forward(&inputs.as_inputs())?
        };
        let per = flow::loss_per_sample(&v, &flux::pack_latents(x0)?, &flux::pack_latents(n)?)?;
        Ok((per.mean_all()?, v))
    }

    /// The image position ids `[N, 3]` and text position ids `[T, 3]` of a step.
    #[must_use]
    pub fn position_ids(&self) -> (&Tensor, &Tensor) {
        (&self.img_ids, &self.txt_ids)
    }

    /// The inputs of a forward on packed `x_t` at sigmas `t` (the guidance input
    /// filled in).
    fn inputs(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        txt: &Tensor,
        pooled: &Tensor,
    ) -> candle_core::Result<OwnedInputs> {
        let b = x_t.dim(0)?;
        let guidance = self
            .guidance
            .map(|g| Tensor::from_vec(vec![g as f32; b], b, &self.device))
            .transpose()?;
        Ok(OwnedInputs {
            hidden: x_t.to_dtype(self.dtype)?,
            txt: txt.clone(),
            pooled: pooled.clone(),
            t: t.clone(),
            img_ids: self.img_ids.clone(),
            txt_ids: self.txt_ids.clone(),
            guidance,
        })
    }

    /// Flux's velocity for packed `x_t` `[B, N, 64]` at sigmas `t` `[B]`.
    ///
    /// # Errors
    /// candle errors.
    pub fn velocity(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        txt: &Tensor,
        pooled: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.flux
            .forward(&self.inputs(x_t, t, txt, pooled)?.as_inputs())
    }

    /// [`Flux::forward`] with every block recomputed in the backward: only the blocks'
    /// inputs and outputs are held between forward and backward.
    fn forward_recomputed(
        &self,
        inp: &Inputs<'_>,
        side: &SideGrads,
    ) -> candle_core::Result<Tensor> {
        let s = self.flux.prepare(inp)?;
        let grads = (self.vars.clone(), side.clone());
        let t_len = s.txt_len()?;
        let n_len = s.img_len()?;
        let (mut img, mut txt) = (s.img.clone(), s.txt.clone());
        for (block, &trains) in self.flux.double_blocks().iter().zip(&self.block_trains.0) {
            let (block, rope) = (block.clone(), s.rope.clone());
            let f: BlockFn = Arc::new(move |xs: &[Tensor]| {
                let (img, txt) = block.forward(&xs[0], &xs[1], &xs[2], &rope)?;
                flux::join(&img, &txt)
            });
            let joint = recompute(
                "checkpointed-flux-double-block",
                f,
                &[&img, &txt, &s.temb],
                trains,
                &grads,
            )?;
            txt = joint.narrow(1, 0, t_len)?;
            img = joint.narrow(1, t_len, n_len)?;
        }
        let mut x = flux::join(&img, &txt)?;
        for (block, &trains) in self.flux.single_blocks().iter().zip(&self.block_trains.1) {
            let (block, rope) = (block.clone(), s.rope.clone());
            let f: BlockFn = Arc::new(move |xs: &[Tensor]| block.forward(&xs[0], &xs[1], &rope));
            x = recompute(
                "checkpointed-flux-single-block",
                f,
                &[&x, &s.temb],
                trains,
                &grads,
            )?;
        }
        self.flux.finish(&x, &s)
    }
}

/// [`Inputs`] with owned tensors.
struct OwnedInputs {
    hidden: Tensor,
    txt: Tensor,
    pooled: Tensor,
    t: Tensor,
    img_ids: Tensor,
    txt_ids: Tensor,
    guidance: Option<Tensor>,
}

impl OwnedInputs {
    fn as_inputs(&self) -> Inputs<'_> {
        Inputs {
            hidden_states: &self.hidden,
            encoder_hidden_states: &self.txt,
            pooled_projections: &self.pooled,
            timestep: &self.t,
            img_ids: &self.img_ids,
            txt_ids: &self.txt_ids,
            guidance: self.guidance.as_ref(),
        }
    }
}

impl Task for FluxTask {
    fn arrays(&self) -> Vec<String> {
        let mut a = vec![Array::FluxVaeMean, Array::FluxVaeStd];
        match &self.condition {
            Condition::ClipImage { blend, .. } => {
                a.push(Array::ClipImageEmbeds);
                if blend.is_some() {
                    a.push(Array::ClipTextPooled);
                }
            }
            Condition::Redux { .. } => a.push(Array::SiglipHidden),
        }
        a.iter().map(|a| a.name().to_string()).collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        // Flux's own tensors, the LoRA's or the adapter's: whatever was made trainable
        self.vars.vars()
    }

    fn step_with(
        &self,
        batch: &Batch,
        noise: &mut Noise,
        scale: f64,
        step: u64,
        side: &SideGrads,
    ) -> candle_core::Result<(Losses, Vec<Option<Tensor>>)> {
        let x0 = draw_latents(
            &batch.tensors[Array::FluxVaeMean.name()],
            &batch.tensors[Array::FluxVaeStd.name()],
            LatentScaling::FLUX,
            noise,
        )?;
        let b = x0.dim(0)?;
        let sigmas: Vec<f32> = self
            .sigmas
            .sample(noise, b)
            .into_iter()
            .map(|s| s as f32)
            .collect();
        let t = Tensor::from_vec(sigmas, b, &self.device)?;
        let n = noise.randn(x0.dims(), &self.device)?;
        let dropped = noise.bernoulli(b, self.dropout.at(step));
        let (txt, pooled) = self.condition(batch, &dropped, step)?;
        let (loss, _) = self.loss_of(&x0, &n, &t, &txt, &pooled, side)?;
        let grads = (&loss * scale)?.backward()?;
        let out_grads = gather(&self.vars(), &grads, side)?;
        let l = f64::from(loss.to_scalar::<f32>()?);
        Ok((
            Losses {
                loss: l,
                mse: l,
                vb: 0.0,
            },
            out_grads,
        ))
    }

    fn save(&self, dir: &Path, weights: &BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        match &self.training {
            Training::Lora(l) => lora::save_diffusers_lora(dir, l, weights)?,
            Training::Adapter => {
                let Condition::Redux { redux, .. } = &self.condition else {
                    unreachable!("the adapter mode conditions through Redux")
                };
                redux::save_diffusers(&dir.join("image_embedder"), redux.config(), weights)?;
            }
            Training::Weights => {
                // The trained tensors as f32 masters, the frozen rest as the model holds
                // them (the compute dtype).
                let mut all = self.flux.tensors();
                for (k, v) in weights {
                    all.insert(k.clone(), v.clone());
                }
                flux::save_diffusers(&dir.join("transformer"), &self.flux_cfg, &all)?;
            }
        }
        Ok(())
    }

    fn saved_files(&self, dir: &Path) -> Vec<PathBuf> {
        match &self.training {
            Training::Lora(_) => vec![dir.join(lora::LORA_FILE)],
            Training::Adapter => {
                vec![dir.join("image_embedder/diffusion_pytorch_model.safetensors")]
            }
            Training::Weights => vec![dir.join("transformer/diffusion_pytorch_model.safetensors")],
        }
    }

    fn describe(&self) -> serde_json::Value {
        self.describe.clone()
    }
}
