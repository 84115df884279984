//! The training configuration: one TOML file (`tensorbake train CONFIG.toml`).
//!
//! Every key is documented on [`TrainConfig`]; unknown keys are errors naming the key,
//! the file and the line ([`TrainConfig::parse`]). Defaults are PixArt-α's own 512 px
//! configs (AdamW, lr 2e-5, weight decay 0.03, eps 1e-10, gradient clip 0.01, class
//! dropout 0.1) and the seed's Redux settings (scale 0.04, first 120 tokens). Every
//! value a run actually uses, defaults included, is written to `OUT/config.json`.

use serde::{Deserialize, Serialize};
use tensorbake_kit::dtype::DType;

use crate::TrainError;
pub use crate::flow::WeightingScheme;

/// What is trained, on which condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// PixArt frozen; a fresh Redux-style adapter on the stored SigLIP hidden states is
    /// trained (the seed's run 3).
    PixartReduxAdapter,
    /// A given Redux adapter frozen; PixArt (all of it, or `train_blocks`) is trained
    /// to take its output (the seed's run 2).
    PixartFinetune,
    /// Plain text-to-image fine-tuning on the stored T5 embeddings with their mask.
    PixartText,
    /// Flux reconditioned on the projected CLIP image embedding in its pooled slot, T5
    /// fixed to the recorded empty-caption embedding, flow matching (the seed's
    /// Flux-1..5 runs); `lora`, `train_blocks` or all of Flux trains.
    FluxClipImage,
    /// Flux frozen; a fresh Redux adapter on the stored SigLIP hidden states is trained,
    /// its tokens appended to the T5 tokens as `FluxPriorReduxPipeline` does.
    FluxReduxAdapter,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Self; 5] = [
        Self::PixartReduxAdapter,
        Self::PixartFinetune,
        Self::PixartText,
        Self::FluxClipImage,
        Self::FluxReduxAdapter,
    ];

    /// The name in configs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::PixartReduxAdapter => "pixart_redux_adapter",
            Self::PixartFinetune => "pixart_finetune",
            Self::PixartText => "pixart_text",
            Self::FluxClipImage => "flux_clip_image",
            Self::FluxReduxAdapter => "flux_redux_adapter",
        }
    }

    /// Whether the model is Flux (`flux = ...`) rather than PixArt (`pixart = ...`).
    #[must_use]
    pub const fn is_flux(self) -> bool {
        matches!(self, Self::FluxClipImage | Self::FluxReduxAdapter)
    }

    /// Whether the condition is SigLIP through a Redux adapter.
    #[must_use]
    pub const fn uses_adapter(self) -> bool {
        matches!(
            self,
            Self::PixartReduxAdapter | Self::PixartFinetune | Self::FluxReduxAdapter
        )
    }

    /// Whether the condition is an image (validation prompts are images).
    #[must_use]
    pub const fn conditions_on_images(self) -> bool {
        !matches!(self, Self::PixartText)
    }

    /// Whether (some of) PixArt's weights train.
    #[must_use]
    pub const fn trains_pixart(self) -> bool {
        matches!(self, Self::PixartFinetune | Self::PixartText)
    }

    /// Whether the adapter's weights train.
    #[must_use]
    pub const fn trains_adapter(self) -> bool {
        matches!(self, Self::PixartReduxAdapter | Self::FluxReduxAdapter)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` throughout.
    #[default]
    Constant,
    /// Half a cosine from `lr` to `min_lr` over the steps after warm-up.
    Cosine,
    /// Piecewise constant: `lr`, then each `lr_milestones` `[step, lr]` from its step on.
    Steps,
}

/// The optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW, f32 masters and moments (12 bytes of state per trained parameter beside
    /// the gradient).
    #[default]
    Adamw,
    /// Adafactor without a first moment (transformers' `Adafactor(relative_step=False,
    /// scale_parameter=False)`): factored f32 second moments, `R + C` numbers per
    /// `R x C` matrix; f32 or bf16 masters.
    Adafactor,
}

impl OptimizerKind {
    fn is_default(&self) -> bool {
        *self == Self::Adamw
    }
}

fn is_f32(d: &DType) -> bool {
    *d == DType::F32
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// As PixArt trains: epsilon MSE plus the IDDPM variational-bound term for the
    /// learned variance (the model's second half of output channels).
    #[default]
    EpsVb,
    /// Epsilon MSE only, the variance half ignored (as diffusers-based trainers do).
    Eps,
}

/// A `tensorbake train` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The store to read (a directory, relative to the config file, or s3://...).
    pub store: String,
    /// `pixart_redux_adapter`, `pixart_finetune`, `pixart_text`, `flux_clip_image` or
    /// `flux_redux_adapter`.
    pub mode: Mode,
    /// PixArt (the `pixart_*` modes): a diffusers model directory, a pipeline root (its
    /// `transformer/` is used), or a hub id in the Hugging Face cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixart: Option<String>,
    /// Flux (the `flux_*` modes): a diffusers `FluxTransformer2DModel` directory, a
    /// pipeline root (OpenFLUX.1, FLUX.1-dev: its `transformer/`), a hub id in the
    /// Hugging Face cache, or a BFL single file (`flux1-dev.safetensors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flux: Option<String>,
    /// `flux_clip_image`: train a LoRA instead of Flux's weights (`{ rank = 16 }`; see
    /// [`LoraSettings`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSettings>,
    /// Flux with the guidance embedder (FLUX.1-dev): the guidance value it is given in
    /// training (default 3.5, diffusers' Flux training scripts'); an error for models
    /// without the embedder (OpenFLUX.1, schnell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// Flux: how the flow-matching sigmas are drawn (`logit_normal`, `uniform`, `mode`;
    /// diffusers' `weighting_scheme`).
    #[serde(default)]
    pub weighting_scheme: WeightingScheme,
    /// Flux `logit_normal`: the mean.
    #[serde(default)]
    pub logit_mean: f64,
    /// Flux `logit_normal`: the standard deviation.
    #[serde(default = "d_logit_std")]
    pub logit_std: f64,
    /// Flux `mode`: the scale.
    #[serde(default = "d_mode_scale")]
    pub mode_scale: f64,
    /// Flux: a fixed sigma shift `s` (`s t / (1 + (s - 1) t)`); absent, the shift follows
    /// the image size as Flux's sampler does (`mu` 0.5 at 256 tokens to 1.15 at 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<f64>,
    /// `flux_clip_image` warm-up: over this many steps the pooled input moves from a
    /// blend of the caption's `clip_text_pooled` and the image embedding to the image
    /// embedding alone (0: no blend).
    #[serde(default)]
    pub pooled_blend_steps: u64,
    /// The image embedding's weight in that blend at step 0 (the seed's Flux-1: 0.5).
    #[serde(default = "d_half")]
    pub pooled_blend_start: f64,
    /// Conditioning-dropout warm-up: the probability starts here and moves linearly to
    /// `cond_dropout` over `cond_dropout_ramp_steps` (the seed: 0.2 to 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cond_dropout_start: Option<f64>,
    /// The steps of that ramp.
    #[serde(default)]
    pub cond_dropout_ramp_steps: u64,
    /// The Redux adapter (a diffusers `image_embedder/` directory, a pipeline root, or a
    /// bare safetensors file). Required in `pixart_finetune` (frozen there); not
    /// allowed in `pixart_redux_adapter` (which trains a fresh one from `seed`) nor in
    /// `pixart_text`.
    #[serde(default)]
    pub redux: Option<String>,
    /// Output directory: `log.jsonl`, `loss.png`, `config.json`, `checkpoint-<step>/`.
    pub out: String,
    /// Optimizer steps.
    pub steps: u64,
    /// Samples per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (the effective batch is `batch_size * grad_accum`).
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// `constant`, `cosine` or `steps`.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// `steps` schedule: `[[step, lr], ...]`, e.g. `[[35000, 1e-5]]` for the seed's
    /// "2e-5 for 35k steps, then 1e-5".
    #[serde(default)]
    pub lr_milestones: Vec<(u64, f64)>,
    /// `cosine` schedule: the final learning rate.
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warm-up from 0 over this many steps.
    #[serde(default)]
    pub warmup: u64,
    /// AdamW decoupled weight decay.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// AdamW epsilon.
    #[serde(default = "d_eps")]
    pub adam_eps: f64,
    /// AdamW betas.
    #[serde(default = "d_betas")]
    pub adam_betas: (f64, f64),
    /// Clip the gradient's global norm to this (`0` disables).
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// Probability that a sample's condition is replaced by the condition of nothing
    /// (the recorded black-image / empty-caption embedding).
    #[serde(default = "d_dropout")]
    pub cond_dropout: f64,
    /// Redux adapter output scale.
    #[serde(default = "d_scale")]
    pub redux_scale: f64,
    /// Redux tokens kept (the first N of SigLIP's 729).
    #[serde(default = "d_tokens")]
    pub redux_tokens: usize,
    /// `pixart_finetune` / `pixart_text`: the transformer blocks that train (default
    /// all of PixArt).
    #[serde(default)]
    pub train_blocks: Option<Vec<usize>>,
    /// EMA decay of the trained weights (off when absent).
    #[serde(default)]
    pub ema: Option<f64>,
    /// Checkpoint every N steps (and at the end).
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: u64,
    /// Checkpoints kept (oldest deleted first; 0 keeps all).
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    /// Seeds the data order, noise, timesteps, dropout and fresh weights.
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "d_device")]
    pub device: String,
    /// Compute dtype (`f32`, `bf16`); master weights and optimizer moments are f32.
    #[serde(default)]
    pub dtype: DType,
    /// `eps_vb` (PixArt: learned variance) or `eps`.
    #[serde(default)]
    pub objective: Objective,
    /// Recompute each transformer block's activations in the backward instead of
    /// keeping them (memory for compute).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// `adamw` (default) or `adafactor` (docs/train.md, "Memory").
    #[serde(default, skip_serializing_if = "OptimizerKind::is_default")]
    pub optimizer: OptimizerKind,
    /// The dtype the trained tensors are kept in: `f32` (default) or `bf16` (Adafactor
    /// only; each update is rounded stochastically).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub master_weights: DType,
    /// Update each recomputed block's tensors inside the backward, as soon as their
    /// gradients exist, so that no whole-model gradient is ever held (Adafactor with
    /// `gradient_checkpointing`, `grad_accum = 1`, `grad_clip = 0`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub update_in_backward: bool,
    /// Loader threads reading batches ahead.
    #[serde(default = "d_prefetch")]
    pub prefetch: usize,
    /// Write a validation grid every N steps (and at the end):
    /// `OUT/samples/step-<step>.png`, the same prompts and seeds each time.
    #[serde(default)]
    pub validation_every: Option<u64>,
    /// The grids' prompts in the image modes: image files (relative to the config), or
    /// `{ from_store = N }` (the first N samples of the store's shuffled order).
    #[serde(default)]
    pub validation_images: Option<ValidationImages>,
    /// The grids' prompts in `pixart_text` (captions; `validation_images = { from_store
    /// = N }` takes stored captions instead).
    #[serde(default)]
    pub validation_prompts: Vec<String>,
    /// Variations per prompt in a validation grid.
    #[serde(default = "d_val_n")]
    pub validation_n: usize,
    /// Sampling steps of the validation grids (default: PixArt 20, Flux 28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_steps: Option<usize>,
    /// Guidance scale of the validation grids (default: PixArt 4.5; Flux's true CFG
    /// 2.5 without a guidance embedder, 1 with one, whose embedded guidance is
    /// `guidance`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_guidance: Option<f64>,
}

/// The LoRA of `flux_clip_image` (`lora = { rank = 16, alpha = 16, targets = [...] }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    /// The rank.
    pub rank: usize,
    /// Alpha (the update is scaled by `alpha / rank`); default the rank (scale 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// The linear layers adapted: diffusers module paths
    /// (`transformer_blocks.0.attn.to_q`) or their endings (`attn.to_q`, `proj_mlp`),
    /// matched as peft matches `target_modules`. Default: every attention and MLP linear
    /// of the blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<String>>,
}

/// The validation prompts of the image modes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum ValidationImages {
    /// Image files.
    Paths(Vec<String>),
    /// The first N samples of the store's shuffled order.
    FromStore {
        /// How many.
        from_store: usize,
    },
}

const fn d_logit_std() -> f64 {
    1.0
}
const fn d_mode_scale() -> f64 {
    1.29
}
const fn d_half() -> f64 {
    0.5
}
const fn d_batch() -> usize {
    32
}
const fn d_one() -> usize {
    1
}
const fn d_lr() -> f64 {
    2e-5
}
const fn d_wd() -> f64 {
    0.03
}
const fn d_eps() -> f64 {
    1e-10
}
const fn d_betas() -> (f64, f64) {
    (0.9, 0.999)
}
const fn d_clip() -> f64 {
    0.01
}
const fn d_dropout() -> f64 {
    0.1
}
const fn d_scale() -> f64 {
    0.04
}
const fn d_tokens() -> usize {
    120
}
const fn d_ckpt() -> u64 {
    1000
}
const fn d_keep() -> usize {
    3
}
fn d_device() -> String {
    "cpu".into()
}
const fn d_prefetch() -> usize {
    4
}
const fn d_val_n() -> usize {
    4
}

impl TrainConfig {
    /// Parses config text; `origin` names the file in errors (`file:line:col: ...`).
    ///
    /// # Errors
    /// [`TrainError::Config`] with the position of the offending key or value.
    pub fn parse(text: &str, origin: &str) -> Result<Self, TrainError> {
        let cfg: Self = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| {
                let line = text[..s.start].matches('\n').count() + 1;
                let col = s.start - text[..s.start].rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{col}")
            });
            TrainError::Config(format!(
                "config {origin}{}: {}",
                at.unwrap_or_default(),
                e.message().trim()
            ))
        })?;
        cfg.validate()
            .map_err(|why| TrainError::Config(format!("config {origin}: {why}")))?;
        Ok(cfg)
    }

    /// Reads and parses a config file.
    ///
    /// # Errors
    /// [`TrainError::Io`] when it cannot be read; parse errors as [`TrainConfig::parse`].
    pub fn load(path: &std::path::Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The checks that need no file: values in range, keys that go together.
    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("steps", self.steps as f64),
            ("batch_size", self.batch_size as f64),
            ("grad_accum", self.grad_accum as f64),
            ("checkpoint_every", self.checkpoint_every as f64),
            ("redux_tokens", self.redux_tokens as f64),
            ("prefetch", self.prefetch as f64),
        ];
        for (key, v) in positive {
            if v < 1.0 {
                return Err(format!("`{key}` must be at least 1"));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("`lr` {} must be a positive number", self.lr));
        }
        if !(0.0..1.0).contains(&self.cond_dropout) {
            return Err(format!(
                "`cond_dropout` {} must be a probability in [0, 1)",
                self.cond_dropout
            ));
        }
        if let Some(d) = self.ema
            && !(0.0..1.0).contains(&d)
        {
            return Err(format!("`ema` {d} must be a decay in [0, 1)"));
        }
        if self.grad_clip < 0.0 || self.weight_decay < 0.0 || self.adam_eps <= 0.0 {
            return Err("`grad_clip` and `weight_decay` must be >= 0, `adam_eps` > 0".into());
        }
        self.validate_optimizer()?;
        let (b1, b2) = self.adam_betas;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            return Err(format!("`adam_betas` ({b1}, {b2}) must be in [0, 1)"));
        }
        if !self.dtype.is_float() {
            return Err(format!(
                "`dtype` {} is not a float type (f32, bf16)",
                self.dtype.short_name()
            ));
        }
        match self.lr_schedule {
            LrSchedule::Steps if self.lr_milestones.is_empty() => {
                return Err(
                    "`lr_schedule = \"steps\"` needs `lr_milestones = [[step, lr], ...]`".into(),
                );
            }
            LrSchedule::Steps if self.lr_milestones.windows(2).any(|w| w[0].0 >= w[1].0) => {
                return Err("`lr_milestones` steps must increase".into());
            }
            LrSchedule::Steps => {}
            _ if !self.lr_milestones.is_empty() => {
                return Err("`lr_milestones` is used only with `lr_schedule = \"steps\"`".into());
            }
            _ => {}
        }
        self.validate_models()?;
        match (self.mode, &self.redux) {
            (Mode::PixartReduxAdapter | Mode::FluxReduxAdapter, Some(_)) => {
                return Err(format!(
                    "`redux` is given, but mode `{}` trains a fresh adapter from `seed`; remove \
                     `redux` (`--resume` continues a run)",
                    self.mode
                ));
            }
            (Mode::PixartFinetune, None) => {
                return Err(format!(
                    "mode `{}` trains PixArt to a frozen Redux adapter: set `redux = \"...\"` \
                     (FLUX.1-Redux-dev's image_embedder/, or a safetensors file)",
                    self.mode
                ));
            }
            (Mode::PixartText | Mode::FluxClipImage, Some(_)) => {
                return Err(format!(
                    "`redux` is given, but mode `{}` uses no adapter",
                    self.mode
                ));
            }
            _ => {}
        }
        match (
            &self.validation_images,
            self.validation_prompts.is_empty(),
            self.mode,
        ) {
            (Some(ValidationImages::Paths(_)), _, Mode::PixartText) => {
                return Err(
                    "`validation_images` paths are for the image modes; `pixart_text` takes \
                     `validation_prompts` (captions) or `validation_images = { from_store = N }`"
                        .into(),
                );
            }
            (_, false, m) if m.conditions_on_images() => {
                return Err(format!(
                    "`validation_prompts` are captions, for `pixart_text`; mode `{m}` takes \
                     `validation_images`"
                ));
            }
            (Some(_), false, _) => {
                return Err("give `validation_images` or `validation_prompts`, not both".into());
            }
            (None, true, _) if self.validation_every.is_some() => {
                return Err(
                    "`validation_every` needs prompts: `validation_images = [...]`, \
                     `validation_images = { from_store = N }` or `validation_prompts = [...]`"
                        .into(),
                );
            }
            _ => {}
        }
        if self.validation_every == Some(0)
            || self.validation_n == 0
            || self.validation_steps == Some(0)
        {
            return Err(
                "`validation_every`, `validation_n` and `validation_steps` must be at least 1"
                    .into(),
            );
        }
        if self.train_blocks.is_some()
            && !matches!(
                self.mode,
                Mode::PixartFinetune | Mode::PixartText | Mode::FluxClipImage
            )
        {
            return Err(format!(
                "`train_blocks` is for the modes that train the transformer; mode `{}` keeps it \
                 frozen",
                self.mode
            ));
        }
        Ok(())
    }

    /// The candle dtype of the trained tensors (`master_weights`).
    #[must_use]
    pub fn master_dtype(&self) -> candle_core::DType {
        match self.master_weights {
            DType::Bf16 => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        }
    }

    /// The optimizer keys together.
    fn validate_optimizer(&self) -> Result<(), String> {
        match (self.master_weights, self.optimizer) {
            (DType::F32, _) | (DType::Bf16, OptimizerKind::Adafactor) => {}
            (DType::Bf16, OptimizerKind::Adamw) => {
                return Err(
                    "`master_weights = \"bf16\"` needs `optimizer = \"adafactor\"` (its update \
                     rounds stochastically; AdamW keeps f32 masters)"
                        .into(),
                );
            }
            (d, _) => {
                return Err(format!(
                    "`master_weights` {d:?}: the trained tensors are kept in f32 or bf16"
                ));
            }
        }
        if self.update_in_backward {
            let why = if self.optimizer != OptimizerKind::Adafactor {
                Some("`optimizer = \"adafactor\"` (AdamW's state is as large as the weights)")
            } else if !self.gradient_checkpointing {
                Some(
                    "`gradient_checkpointing = true` (each block's update runs in its recomputed backward)",
                )
            } else if self.grad_accum != 1 {
                Some("`grad_accum = 1` (an update cannot wait for more micro-batches)")
            } else if self.grad_clip != 0.0 {
                Some(
                    "`grad_clip = 0` (a global norm needs every gradient first; Adafactor clips \
                     each update's RMS at 1 instead)",
                )
            } else {
                None
            };
            if let Some(why) = why {
                return Err(format!("`update_in_backward` needs {why}"));
            }
        }
        Ok(())
    }

    /// The model keys against the mode: `pixart` or `flux`, and the Flux-only keys.
    fn validate_models(&self) -> Result<(), String> {
        let m = self.mode;
        match (m.is_flux(), &self.pixart, &self.flux) {
            (false, None, _) => {
                return Err(format!(
                    "mode `{m}` trains with PixArt: set `pixart = \"...\"` (a diffusers directory, \
                     a pipeline root or a hub id)"
                ));
            }
            (true, _, None) => {
                return Err(format!(
                    "mode `{m}` trains with Flux: set `flux = \"...\"` (a diffusers directory, a \
                     pipeline root, a hub id or a BFL .safetensors file)"
                ));
            }
            (false, Some(_), Some(_)) | (true, Some(_), Some(_)) => {
                return Err(format!(
                    "both `pixart` and `flux` are given; mode `{m}` uses {}",
                    if m.is_flux() { "`flux`" } else { "`pixart`" }
                ));
            }
            _ => {}
        }
        let flux_only = [
            ("lora", self.lora.is_some()),
            ("guidance", self.guidance.is_some()),
            ("shift", self.shift.is_some()),
            ("pooled_blend_steps", self.pooled_blend_steps > 0),
            (
                "weighting_scheme",
                self.weighting_scheme != WeightingScheme::default(),
            ),
        ];
        if !m.is_flux()
            && let Some((key, _)) = flux_only.iter().find(|(_, set)| *set)
        {
            return Err(format!(
                "`{key}` is a Flux setting; mode `{m}` trains PixArt"
            ));
        }
        if let Some(lora) = &self.lora {
            if m != Mode::FluxClipImage {
                return Err(format!(
                    "`lora` trains Flux in `flux_clip_image`; mode `{m}` keeps Flux frozen"
                ));
            }
            if lora.rank == 0 {
                return Err("`lora.rank` must be at least 1".into());
            }
            if lora.alpha.is_some_and(|a| !(a > 0.0 && a.is_finite())) {
                return Err("`lora.alpha` must be a positive number".into());
            }
            if self.train_blocks.is_some() {
                return Err(
                    "give `lora` (a LoRA trains) or `train_blocks` (those blocks train), not both"
                        .into(),
                );
            }
        }
        if self.pooled_blend_steps > 0 && m != Mode::FluxClipImage {
            return Err(format!(
                "`pooled_blend_steps` blends into the CLIP image embedding of `flux_clip_image`; \
                 mode `{m}` has no such input"
            ));
        }
        if !(0.0..=1.0).contains(&self.pooled_blend_start) {
            return Err(format!(
                "`pooled_blend_start` {} must be a weight in [0, 1]",
                self.pooled_blend_start
            ));
        }
        if let Some(s) = self.shift
            && !(s > 0.0 && s.is_finite())
        {
            return Err(format!("`shift` {s} must be a positive number"));
        }
        if !(self.logit_std > 0.0 && self.logit_std.is_finite()) {
            return Err(format!("`logit_std` {} must be positive", self.logit_std));
        }
        match (self.cond_dropout_start, self.cond_dropout_ramp_steps) {
            (Some(p), _) if !(0.0..1.0).contains(&p) => {
                return Err(format!(
                    "`cond_dropout_start` {p} must be a probability in [0, 1)"
                ));
            }
            (Some(_), 0) => {
                return Err(
                    "`cond_dropout_start` needs `cond_dropout_ramp_steps` (the steps to reach \
                     `cond_dropout`)"
                        .into(),
                );
            }
            (None, n) if n > 0 => {
                return Err(
                    "`cond_dropout_ramp_steps` needs `cond_dropout_start` (where the ramp starts)"
                        .into(),
                );
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "store = \"s\"\nmode = \"pixart_redux_adapter\"\npixart = \"p\"\nout = \"o\"\nsteps = 10\n";

    #[test]
    fn defaults_are_pixarts_and_the_config_round_trips() {
        let c = TrainConfig::parse(MIN, "t.toml").unwrap();
        assert_eq!((c.lr, c.weight_decay, c.adam_eps), (2e-5, 0.03, 1e-10));
        assert_eq!((c.grad_clip, c.cond_dropout), (0.01, 0.1));
        assert_eq!((c.redux_scale, c.redux_tokens), (0.04, 120));
        assert_eq!(c.objective, Objective::EpsVb);
        let again = TrainConfig::parse(&toml::to_string(&c).unwrap(), "again").unwrap();
        assert_eq!(c, again);
        let json: TrainConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, json);
        let seed = format!("{MIN}lr_schedule = \"steps\"\nlr_milestones = [[35000, 1e-5]]\n");
        let c = TrainConfig::parse(&seed, "t.toml").unwrap();
        assert_eq!(c.lr_milestones, [(35000, 1e-5)]);
    }

    #[test]
    fn the_shipped_training_configs_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("train-") && name.ends_with(".toml") {
                let c = TrainConfig::load(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(c.steps > 0, "{name}");
                n += 1;
            }
        }
        assert_eq!(n, 4);
    }

    #[test]
    fn bad_configs_name_the_key_file_and_line() {
        let e = TrainConfig::parse(&format!("{MIN}learning_rate = 1e-4\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config t.toml:6:1:") && e.contains("learning_rate"),
            "{e}"
        );
        let e = TrainConfig::parse(
            &MIN.replace("pixart_redux_adapter", "pixart_lora"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("t.toml:2") && e.contains("pixart_lora"), "{e}");
        let cases = [
            ("redux = \"r\"\n", "trains a fresh adapter"),
            ("cond_dropout = 1.5\n", "cond_dropout"),
            ("lr_schedule = \"steps\"\n", "lr_milestones"),
            ("train_blocks = [1]\n", "train_blocks"),
            ("dtype = \"u32\"\n", "dtype"),
            (
                "master_weights = \"bf16\"\n",
                "needs `optimizer = \"adafactor\"`",
            ),
            ("master_weights = \"f16\"\n", "f32 or bf16"),
            (
                "update_in_backward = true\n",
                "`update_in_backward` needs `optimizer",
            ),
            (
                "optimizer = \"adafactor\"\nupdate_in_backward = true\n",
                "needs `gradient_checkpointing = true`",
            ),
            (
                "optimizer = \"adafactor\"\nupdate_in_backward = true\n\
                 gradient_checkpointing = true\ngrad_accum = 2\n",
                "needs `grad_accum = 1`",
            ),
            (
                "optimizer = \"adafactor\"\nupdate_in_backward = true\n\
                 gradient_checkpointing = true\n",
                "needs `grad_clip = 0`",
            ),
            ("optimizer = \"lion\"\n", "expected `adamw` or `adafactor`"),
        ];
        for (extra, needle) in cases {
            let e = TrainConfig::parse(&format!("{MIN}{extra}"), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        for (extra, needle) in [
            ("validation_every = 10\n", "needs prompts"),
            ("validation_prompts = [\"a cat\"]\n", "for `pixart_text`"),
        ] {
            let e = TrainConfig::parse(&format!("{MIN}{extra}"), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let v = TrainConfig::parse(
            &format!("{MIN}validation_every = 5\nvalidation_images = {{ from_store = 3 }}\n"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            v.validation_images,
            Some(ValidationImages::FromStore { from_store: 3 })
        );
        let v = TrainConfig::parse(&format!("{MIN}validation_images = [\"a.jpg\"]\n"), "t.toml")
            .unwrap();
        assert_eq!(
            v.validation_images,
            Some(ValidationImages::Paths(vec!["a.jpg".into()]))
        );
        let finetune = MIN.replace("pixart_redux_adapter", "pixart_finetune");
        let e = TrainConfig::parse(&finetune, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("set `redux"), "{e}");
        let text = MIN.replace("pixart_redux_adapter", "pixart_text");
        let e = TrainConfig::parse(&format!("{text}redux = \"r\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("uses no adapter"), "{e}");
        let lean = TrainConfig::parse(
            &format!(
                "{MIN}optimizer = \"adafactor\"\nmaster_weights = \"bf16\"\n\
                 update_in_backward = true\ngradient_checkpointing = true\ngrad_clip = 0\n"
            ),
            "t.toml",
        )
        .unwrap();
        assert_eq!(lean.master_dtype(), candle_core::DType::BF16);
        assert_eq!(lean.optimizer, OptimizerKind::Adafactor);
    }
}
