//! The PixArt-α modes as a [`Task`]: `pixart_redux_adapter` (PixArt frozen, a fresh
//! Redux adapter on SigLIP trained), `pixart_finetune` (a given adapter frozen, PixArt
//! or `train_blocks` trained), `pixart_text` (PixArt on the stored T5 embeddings).
//!
//! One step, as PixArt trains (its `IDDPM` with learned sigma):
//! latents `z = (mean + std * eps) * 0.18215` from the stored SD-VAE moments; uniform
//! timesteps; `x_t = q_sample(z, t, noise)`; the condition (SigLIP hidden states through
//! the adapter, `* redux_scale`, the first `redux_tokens` tokens; or T5 hidden states
//! with their length as the attention mask), replaced per sample with probability
//! `cond_dropout` by the condition of nothing the store recorded (the black image's
//! SigLIP embedding through the adapter; the empty caption's T5 embedding); PixArt's
//! output `[B, 8, h, w]` into the epsilon-MSE + VB loss.
//!
//! With `gradient_checkpointing`, each transformer block runs as one custom op: its
//! forward keeps only the block's inputs and output, its backward recomputes the block
//! with the graph on and returns the inputs' gradients, the block parameters' going to
//! a side store merged after the backward ([`checkpoint_block`], [`crate::recompute`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, Var};
use tensorbake_kit::schema::Array;
use tensorbake_nn::loader::{Trainable, VarSet};
use tensorbake_nn::pixart::{self, Block, PixArt, Prepared};
use tensorbake_nn::redux::{self, Redux};
use tensorbake_nn::weights::fingerprint;
use tensorbake_store::{Batch, StoreReader};

use crate::TrainError;
use crate::config::{Mode, Objective as ObjectiveKind, TrainConfig};
use crate::diffusion::{NoiseSchedule, Objective};
use crate::latents::{LatentScaling, draw_latents};
use crate::noise::Noise;
use crate::recompute::{BlockFn, SideGrads, gather, recompute};
use crate::sample::Cond;
use crate::trainer::{Losses, Ramp, Task, replace_dropped, resolve_spec};

/// One prompt's raw input, before the (possibly training) adapter.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// SigLIP hidden states `[T, W]` (a stored sample's, or an image encoded now).
    Siglip(Tensor),
    /// T5 hidden states `[L, D]` and the caption's token count.
    T5 {
        /// `t5_hidden`.
        hidden: Tensor,
        /// `t5_len`.
        len: u32,
    },
    /// A CLIP image embedding `[W]` (`clip_image_embeds`; `flux_clip_image`).
    ClipImage(Tensor),
}

/// What the condition is made of.
enum Condition {
    /// SigLIP hidden states through the adapter.
    Adapter {
        redux: Redux,
        /// The black image's `siglip_hidden` `[tokens, width]` (compute dtype).
        null: Tensor,
    },
    /// T5 hidden states with their lengths.
    Text {
        /// The empty caption's `t5_hidden` `[L, width]` (compute dtype).
        null: Tensor,
        /// Its `t5_len`.
        null_len: u32,
    },
}

/// A PixArt mode ready to train.
pub struct PixArtTask {
    mode: Mode,
    pixart: PixArt,
    pixart_cfg: pixart::Config,
    pixart_files: Vec<PathBuf>,
    condition: Condition,
    vars: VarSet,
    objective: Objective,
    device: Device,
    dtype: DType,
    /// The run's config (the conditioning-dropout schedule).
    dropout: Ramp,
    redux_scale: f64,
    redux_tokens: usize,
    checkpointing: bool,
    /// Whether each transformer block has trainable parameters.
    block_trains: Vec<bool>,
    /// Resolution and aspect-ratio conditions of the 1024-MS model (the store's square
    /// crops): `[B, 2]` and `[B, 1]` are built per batch from these.
    size_condition: Option<(f32, f32)>,
    /// Per-sample latent shape `[C, h, w]` of the store.
    latent_shape: (usize, usize, usize),
    describe: serde_json::Value,
}

pub(crate) fn store_err(reader: &StoreReader, why: String) -> TrainError {
    TrainError::Store {
        store: reader.location().to_string(),
        why,
    }
}

/// The per-sample shape of `array` in the store, or an error saying what is missing.
pub(crate) fn shape_of(
    reader: &StoreReader,
    array: Array,
    mode: Mode,
    how: &str,
) -> Result<Vec<usize>, TrainError> {
    let f = reader.spec().array(array).ok_or_else(|| {
        store_err(
            reader,
            format!(
                "mode `{mode}` needs the `{array}` array, which this store does not have (features: {}); {how}",
                reader.spec().features.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    Ok(f.shape.iter().map(|&d| d as usize).collect())
}

/// A null embedding the mode needs, or an error saying how to record it.
pub(crate) fn null_of(
    reader: &StoreReader,
    array: Array,
    device: &Device,
) -> Result<Tensor, TrainError> {
    let input = array
        .feature()
        .null_input()
        .map_or("null input", |n| n.label());
    reader.null_embedding(array.name(), device)?.ok_or_else(|| {
        store_err(
            reader,
            format!(
                "no embedding of the {input} for `{array}` under null/ (conditioning dropout replaces \
                 conditions with it); record it by running `tensorbake run` on this store's manifest \
                 again with this version of tensorbake: committed parts are kept, only null/ is added"
            ),
        )
    })
}

impl PixArtTask {
    /// Loads the models of `cfg.mode` (paths relative to `base`) and checks them
    /// against the store: latent channels, SigLIP / T5 widths, null embeddings.
    ///
    /// # Errors
    /// [`TrainError::Store`] naming what the store lacks or what does not fit;
    /// [`TrainError::Model`] for weights not found or not loadable.
    pub fn build(
        cfg: &TrainConfig,
        base: &Path,
        reader: &StoreReader,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mode = cfg.mode;
        let Some(pixart_spec) = cfg.pixart.as_deref().filter(|_| !mode.is_flux()) else {
            return Err(TrainError::Config(format!(
                "mode `{mode}` is not a PixArt mode with a `pixart` model"
            )));
        };
        let dtype = tensorbake_nn::compute_dtype(cfg.dtype, device)?;
        let resolve = |p: &str| resolve_spec(base, p);
        // The store first: a missing array is found before multi-GB weights load.
        let how = "add the encoder to the store's manifest and `tensorbake run` it";
        let latent = shape_of(reader, Array::SdVaeMean, mode, how)?;
        shape_of(reader, Array::SdVaeStd, mode, how)?;
        let cond_shape = if mode.uses_adapter() {
            shape_of(reader, Array::SiglipHidden, mode, how)?
        } else {
            shape_of(reader, Array::T5Len, mode, how)?;
            shape_of(reader, Array::T5Hidden, mode, how)?
        };
        let pixart_cfg_dir = pixart::io::transformer_dir(&resolve(pixart_spec))?;
        let pixart_cfg = pixart::io::read_config(&pixart_cfg_dir)?;
        if latent[0] != pixart_cfg.in_channels {
            return Err(store_err(
                reader,
                format!(
                    "latents have {} channels (sd_vae_mean {:?}), PixArt ({}) takes {}",
                    latent[0], latent, pixart_spec, pixart_cfg.in_channels
                ),
            ));
        }
        let caption_width = pixart_cfg.caption_width().ok_or_else(|| {
            TrainError::Config(format!(
                "PixArt ({}) takes no caption tokens (no caption_channels / cross_attention_dim): \
                 nothing to condition on",
                pixart_spec
            ))
        })?;
        let vars = VarSet::with_dtype(cfg.master_dtype());
        let trainable = match (mode, &cfg.train_blocks) {
            (Mode::PixartReduxAdapter, _) => None,
            (_, None) => Some(Trainable::all(&vars)),
            (_, Some(blocks)) => {
                let depth = pixart_cfg.num_layers;
                if let Some(b) = blocks.iter().find(|&&b| b >= depth) {
                    return Err(TrainError::Config(format!(
                        "`train_blocks` names block {b}, PixArt ({}) has blocks 0..{depth}",
                        pixart_spec
                    )));
                }
                let prefixes: Vec<String> = blocks
                    .iter()
                    .map(|b| format!("transformer_blocks.{b}."))
                    .collect();
                Some(Trainable::when(&vars, move |n| {
                    prefixes.iter().any(|p| n.starts_with(p))
                }))
            }
        };
        let condition = if mode.uses_adapter() {
            let width = cond_shape[1];
            if cfg.redux_tokens > cond_shape[0] {
                return Err(TrainError::Config(format!(
                    "`redux_tokens` {} is more than the {} SigLIP tokens the store holds",
                    cfg.redux_tokens, cond_shape[0]
                )));
            }
            let null = null_of(reader, Array::SiglipHidden, device)?
                .to_dtype(dtype)
                .map_err(tensorbake_nn::Error::candle("siglip null embedding"))?;
            let redux = match &cfg.redux {
                Some(spec) => {
                    let (r, rcfg, _) = redux::load_redux(&resolve(spec), dtype, device, None)?;
                    rcfg.check_widths(width, caption_width, "PixArt")?;
                    r
                }
                None => {
                    let rcfg = redux::Config {
                        redux_dim: width,
                        txt_in_features: caption_width,
                    };
                    let vb = tensorbake_nn::init::fresh_var_builder(cfg.seed, &vars, dtype, device);
                    Redux::new(vb, &rcfg).map_err(tensorbake_nn::Error::candle("redux"))?
                }
            };
            Condition::Adapter { redux, null }
        } else {
            if cond_shape[1] != caption_width {
                return Err(store_err(
                    reader,
                    format!(
                        "t5_hidden has width {} ({:?}), PixArt ({}) takes caption_channels {caption_width}",
                        cond_shape[1], cond_shape, pixart_spec
                    ),
                ));
            }
            let c = tensorbake_nn::Error::candle("t5 null embedding");
            let null = null_of(reader, Array::T5Hidden, device)?
                .to_dtype(dtype)
                .map_err(&c)?;
            let null_len = null_of(reader, Array::T5Len, device)?
                .to_dtype(DType::U32)
                .and_then(|t| t.to_scalar::<u32>())
                .map_err(&c)?;
            Condition::Text { null, null_len }
        };
        let (pixart, pixart_cfg, pixart_files) =
            pixart::load_pixart(&resolve(pixart_spec), dtype, device, trainable.as_ref())?;
        let mut objective = Objective::pixart();
        if cfg.objective == ObjectiveKind::Eps {
            objective = Objective::epsilon_only(NoiseSchedule::pixart());
        }
        // eps_vb needs the learned-variance half; eps takes the first half of an 8-channel
        // model (its variance channels get no gradient) or a 4-channel one.
        let (c, out) = (pixart_cfg.in_channels, pixart_cfg.out_channels());
        let fits = match cfg.objective {
            ObjectiveKind::EpsVb => out == 2 * c,
            ObjectiveKind::Eps => out == c || out == 2 * c,
        };
        if !fits {
            return Err(TrainError::Config(format!(
                "objective `{:?}` does not fit PixArt ({}) with {out} output channels for {c} latent \
                 channels (`eps_vb` needs {}: epsilon and the learned variance; `objective = \"eps\"` \
                 trains epsilon alone)",
                cfg.objective,
                pixart_spec,
                2 * c
            )));
        }
        let names: Vec<String> = vars.vars().into_iter().map(|(n, _)| n).collect();
        let block_trains = (0..pixart.blocks().len())
            .map(|i| {
                let p = format!("transformer_blocks.{i}.");
                names.iter().any(|n| n.starts_with(&p))
            })
            .collect();
        let size_condition = pixart_cfg.uses_additional_conditions().then(|| {
            let r = reader.spec().resolution.unwrap_or(8 * latent[1] as u32) as f32;
            (r, 1.0)
        });
        let describe = serde_json::json!({
            "pixart": {
                "spec": pixart_spec,
                "weights_sha256": fingerprint(&pixart_files)?,
                "config": pixart_cfg.to_diffusers_json(),
            },
            "redux": match (&condition, &cfg.redux) {
                (Condition::Adapter { redux, .. }, Some(spec)) =>
                    serde_json::json!({"spec": spec, "config": redux.config(), "trained": false}),
                (Condition::Adapter { redux, .. }, None) =>
                    serde_json::json!({"fresh_from_seed": cfg.seed, "config": redux.config(), "trained": true}),
                _ => serde_json::Value::Null,
            },
            "objective": format!("{:?}", objective.variance),
            "latent_scaling": LatentScaling::SD.scale,
        });
        Ok(Self {
            mode,
            pixart,
            pixart_cfg,
            pixart_files,
            condition,
            vars,
            objective,
            device: device.clone(),
            dtype,
            dropout: Ramp::dropout(cfg),
            redux_scale: cfg.redux_scale,
            redux_tokens: cfg.redux_tokens,
            checkpointing: cfg.gradient_checkpointing,
            block_trains,
            size_condition,
            latent_shape: (latent[0], latent[1], latent[2]),
            describe,
        })
    }

    /// The PixArt model.
    #[must_use]
    pub fn pixart(&self) -> &PixArt {
        &self.pixart
    }

    /// The caption tokens and mask PixArt takes for `batch`, with the samples in
    /// `dropped` given the condition of nothing.
    ///
    /// # Errors
    /// candle errors; a batch without the condition arrays.
    pub fn condition(
        &self,
        batch: &Batch,
        dropped: &[bool],
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let pick = |name: Array| {
            batch
                .tensors
                .get(name.name())
                .ok_or_else(|| candle_core::Error::Msg(format!("batch has no `{name}`")))
        };
        let b = dropped.len();
        let replace = |x: &Tensor, null: &Tensor| replace_dropped(x, null, dropped);
        match &self.condition {
            Condition::Adapter { redux, null } => {
                // The adapter works token by token: only the tokens kept go through it.
                let n = self.redux_tokens;
                let s = pick(Array::SiglipHidden)?.narrow(1, 0, n)?;
                let s = replace(&s.to_dtype(self.dtype)?, &null.narrow(0, 0, n)?)?;
                let y = (redux.forward(&s.contiguous()?)? * self.redux_scale)?;
                Ok((y, None))
            }
            Condition::Text { null, null_len } => {
                let h = pick(Array::T5Hidden)?.to_dtype(self.dtype)?;
                let h = replace(&h, null)?;
                let lens: Vec<u32> = pick(Array::T5Len)?.to_dtype(DType::U32)?.to_vec1()?;
                let l = h.dim(1)?;
                let mask: Vec<f32> = lens
                    .iter()
                    .zip(dropped)
                    .flat_map(|(&n, &d)| {
                        let n = if d { *null_len } else { n } as usize;
                        (0..l).map(move |j| if j < n { 1.0 } else { 0.0 })
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (b, l), &self.device)?;
                Ok((h, Some(mask)))
            }
        }
    }

    /// The mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
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

    /// The store's per-sample latent shape `(C, h, w)`.
    #[must_use]
    pub fn latent_shape(&self) -> (usize, usize, usize) {
        self.latent_shape
    }

    /// The size conditions of the 1024-MS models for a batch of `b`.
    ///
    /// # Errors
    /// candle errors.
    pub fn size_added(&self, b: usize) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        match self.size_condition {
            Some((res, ar)) => Ok(Some((
                Tensor::from_vec(vec![res; 2 * b], (b, 2), &self.device)?.to_dtype(self.dtype)?,
                Tensor::from_vec(vec![ar; b], (b, 1), &self.device)?.to_dtype(self.dtype)?,
            ))),
            None => Ok(None),
        }
    }

    /// The condition of one input: SigLIP hidden states `[T, W]` (image modes: through
    /// the adapter, scaled, the first tokens) or T5 hidden states `[L, D]` with their
    /// length (text mode).
    ///
    /// # Errors
    /// An input of the other mode's kind; candle errors.
    pub fn cond_of(&self, input: &PromptInput) -> candle_core::Result<Cond> {
        match (&self.condition, input) {
            (Condition::Adapter { redux, .. }, PromptInput::Siglip(s)) => {
                let s = s
                    .narrow(0, 0, self.redux_tokens)?
                    .to_device(&self.device)?
                    .to_dtype(self.dtype)?
                    .contiguous()?;
                let y = (redux.forward(&s)? * self.redux_scale)?;
                Ok(Cond {
                    tokens: y,
                    mask: None,
                })
            }
            (Condition::Text { .. }, PromptInput::T5 { hidden, len }) => {
                let l = hidden.dim(0)?;
                let mask: Vec<f32> = (0..l)
                    .map(|j| if j < *len as usize { 1.0 } else { 0.0 })
                    .collect();
                Ok(Cond {
                    tokens: hidden.to_device(&self.device)?.to_dtype(self.dtype)?,
                    mask: Some(Tensor::from_vec(mask, l, &self.device)?),
                })
            }
            (Condition::Adapter { .. }, _) => {
                candle_core::bail!(
                    "mode `{}` conditions on images through SigLIP, not on text or CLIP",
                    self.mode
                )
            }
            (Condition::Text { .. }, _) => {
                candle_core::bail!(
                    "mode `{}` conditions on text (T5), not on images",
                    self.mode
                )
            }
        }
    }

    /// The condition of nothing (the negative of guidance): the black image through the
    /// adapter, or the empty caption.
    ///
    /// # Errors
    /// candle errors.
    pub fn null_cond(&self) -> candle_core::Result<Cond> {
        match &self.condition {
            Condition::Adapter { null, .. } => self.cond_of(&PromptInput::Siglip(null.clone())),
            Condition::Text { null, null_len } => self.cond_of(&PromptInput::T5 {
                hidden: null.clone(),
                len: *null_len,
            }),
        }
    }

    /// PixArt's output for `x_t` at timesteps `t` with caption tokens `y`: straight,
    /// or block by block through [`checkpoint_block`].
    fn forward(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        y: &Tensor,
        mask: Option<&Tensor>,
        side: &SideGrads,
    ) -> candle_core::Result<Tensor> {
        let b = x_t.dim(0)?;
        let added = self.size_added(b)?;
        let added = added.as_ref().map(|(r, a)| (r, a));
        if !self.checkpointing {
            return self.pixart.forward(x_t, t, y, mask, added);
        }
        let s = self.pixart.prepare(x_t, t, y, mask, added)?;
        let recompute = (self.vars.clone(), side.clone());
        let mut x = s.hidden.clone();
        for (block, &trains) in self.pixart.blocks().iter().zip(&self.block_trains) {
            x = checkpoint_block(block, trains, &x, &s, &recompute)?;
        }
        self.pixart.finish(&x, &s)
    }
}

/// Runs `block` so that only its inputs and output stay alive until the backward,
/// which recomputes it ([`recompute`]); the gradients of the block's trainable
/// parameters (`trains`: it has some) land in `grads.1`. Gives the same output and
/// gradients as `block.forward`.
///
/// # Errors
/// candle errors.
pub fn checkpoint_block(
    block: &Block,
    trains: bool,
    x: &Tensor,
    s: &Prepared,
    grads: &(VarSet, SideGrads),
) -> candle_core::Result<Tensor> {
    let block = block.clone();
    let mask_bias = s.mask_bias.clone();
    let f: BlockFn =
        Arc::new(move |xs: &[Tensor]| block.forward(&xs[0], &xs[1], &xs[2], mask_bias.as_ref()));
    recompute(
        "checkpointed-pixart-block",
        f,
        &[x, &s.caption, &s.temb6],
        trains,
        grads,
    )
}

impl Task for PixArtTask {
    fn arrays(&self) -> Vec<String> {
        let mut a = vec![Array::SdVaeMean, Array::SdVaeStd];
        match self.condition {
            Condition::Adapter { .. } => a.push(Array::SiglipHidden),
            Condition::Text { .. } => a.extend([Array::T5Hidden, Array::T5Len]),
        }
        a.iter().map(|a| a.name().to_string()).collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
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
        let z = draw_latents(
            &batch.tensors[Array::SdVaeMean.name()],
            &batch.tensors[Array::SdVaeStd.name()],
            LatentScaling::SD,
            noise,
        )?;
        let b = z.dim(0)?;
        let steps = self.objective.schedule.num_timesteps() as u64;
        let t: Vec<u32> = noise.timesteps(b, steps);
        let t = Tensor::from_vec(t, b, &self.device)?;
        let n = noise.randn(z.dims(), &self.device)?;
        let x_t = self.objective.schedule.q_sample(&z, &t, &n)?;
        let dropped = noise.bernoulli(b, self.dropout.at(step));
        let (y, mask) = self.condition(batch, &dropped)?;
        let out = self.forward(
            &x_t.to_dtype(self.dtype)?,
            &t.to_dtype(DType::F32)?,
            &y,
            mask.as_ref(),
            side,
        )?;
        let mut out = out.to_dtype(DType::F32)?;
        let want = self.objective.output_channels(z.dim(1)?);
        if out.dim(1)? != want {
            // eps only on a learned-sigma model: its variance half is not trained
            out = out.narrow(1, 0, want)?;
        }
        let l = self.objective.training_losses(&out, &z, &x_t, &t, &n)?;
        let loss = l.loss.mean_all()?;
        let grads = (&loss * scale)?.backward()?;
        let out_grads = gather(&self.vars.vars(), &grads, side)?;
        let scalar = |t: &Tensor| -> candle_core::Result<f64> {
            Ok(f64::from(t.mean_all()?.to_scalar::<f32>()?))
        };
        let losses = Losses {
            loss: scalar(&l.loss)?,
            mse: scalar(&l.mse)?,
            vb: l.vb.as_ref().map(scalar).transpose()?.unwrap_or(0.0),
        };
        Ok((losses, out_grads))
    }

    fn save(&self, dir: &Path, weights: &BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        if self.mode.trains_adapter() {
            redux::save_safetensors(&dir.join("redux.safetensors"), weights)?;
        }
        if self.mode.trains_pixart() {
            // Trained tensors as f32 masters; the frozen rest exactly as read from the
            // model's own files (not the compute-dtype copies).
            let mut all = BTreeMap::new();
            for f in &self.pixart_files {
                let t = candle_core::safetensors::load(f, &Device::Cpu)
                    .map_err(tensorbake_nn::Error::candle("pixart"))?;
                all.extend(t);
            }
            for (k, v) in weights {
                all.insert(k.clone(), v.clone());
            }
            pixart::save_diffusers(&dir.join("transformer"), &self.pixart_cfg, &all)?;
        }
        Ok(())
    }

    fn saved_files(&self, dir: &Path) -> Vec<PathBuf> {
        let mut v = Vec::new();
        if self.mode.trains_adapter() {
            v.push(dir.join("redux.safetensors"));
        }
        if self.mode.trains_pixart() {
            v.push(dir.join("transformer/diffusion_pytorch_model.safetensors"));
        }
        v
    }

    fn describe(&self) -> serde_json::Value {
        self.describe.clone()
    }
}
