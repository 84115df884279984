//! `tensorbake bench encode`: the frozen encoders' forward passes at full size,
//! items/s and the fraction of the FLOP ceiling, beside the same models in PyTorch
//! (diffusers' `AutoencoderKL`, transformers' SigLIP, CLIP and T5, eager and
//! `torch.compile`) in one run; optionally checked against the CPU in f32.
//!
//! Each encoder is built with random weights made on the device
//! ([`tensorbake_nn::random`]): the real configs (the upstream `config.json` values,
//! written into the work directory so that both sides build from the same file), no
//! multi-GB weight files. What is timed is the model's forward pass on a batch already
//! on the device: pixel values `[B, 3, S, S]` for the image encoders (the VAE's
//! posterior moments, SigLIP's and CLIP's outputs as the encoders store them), token
//! ids `[B, T]` with every position a real token for the text encoders (T5 masked, as
//! PixArt calls it; CLIP causal, 77 tokens). Preprocessing and tokenizing are CPU
//! work that the pipeline overlaps with the GPU and are left out on both sides.
//!
//! Per encoder: `warmup` untimed forwards (kernel selection, the PTX JIT on a fresh
//! GPU, allocator growth), then `rounds` rounds of `iters` forwards, each round ended
//! by a device synchronisation; the rate is the median round's. FLOPs are counted by
//! the ops seam during the first warm-up forward ([`tensorbake_nn::ops::flops`]:
//! every matrix product, 2·m·n·k). The ceiling is the device's dense bf16/f16 tensor
//! rate (989.4 TFLOP/s on an H100/H200 SXM; `peak_tflops` overrides it).
//!
//! The check ([`EncodeBenchConfig::check`]) runs a batch of at most two through the
//! device model and through the same weights on the CPU in f32, and reports
//! `max|a - b| / max|b|` against the dtype's tolerance. The text batch pads the last
//! third of its second row, so the check covers T5's mask.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tensorbake_kit::measure::median;

use candle_core::{DType as CDType, Device, Tensor};
use serde::Serialize;
use serde_json::{Value, json};
use tensorbake_kit::dtype::DType;
use tensorbake_kit::rng::SplitMix64;
use tensorbake_kit::schema::Feature;
use tensorbake_nn::clip_text::{ClipTextConfig, ClipTextModel};
use tensorbake_nn::clip_vision::{self, ClipVisionWithProjection};
use tensorbake_nn::ops::flops;
use tensorbake_nn::random::{RandomWeights, random_var_builder};
use tensorbake_nn::siglip::{self, SiglipVision};
use tensorbake_nn::t5::{T5Config, T5EncoderModel};
use tensorbake_nn::tiny::{TinyModel, write_tiny_model};
use tensorbake_nn::vae::{self, VaeEncoder};

use crate::EncodeError;

/// The peer script, as committed (written into the work directory and run there).
pub const TORCH_SCRIPT: &str = include_str!("../../scripts/bench/encoders.py");

/// Dense bf16/f16 tensor-core peak of an H100/H200 SXM, TFLOP/s (NVIDIA's data sheet,
/// without sparsity): the default ceiling on CUDA.
pub const H200_BF16_TFLOPS: f64 = 989.4;

/// One bench row's encoder: a model and, for T5, its token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchEncoder {
    /// The model, by the feature it makes.
    pub kind: Feature,
    /// Tokens per caption (text encoders); ignored for images.
    pub tokens: usize,
}

const KNOWN: &str = "sd_vae, flux_vae, siglip, clip_vision, t5, t5@N, clip_text";

impl BenchEncoder {
    /// Parses a name: `sd_vae`, `flux_vae`, `siglip`, `clip_vision`, `clip_text`,
    /// `t5` (two rows: 120 and 512 tokens) or `t5@N`.
    ///
    /// # Errors
    /// [`EncodeError::UnknownEncoder`] listing the names.
    pub fn parse(name: &str) -> Result<Vec<Self>, EncodeError> {
        let one = |kind, tokens| vec![Self { kind, tokens }];
        let unknown = || EncodeError::UnknownEncoder {
            name: name.to_string(),
            known: KNOWN.into(),
        };
        Ok(match name {
            "sd_vae" => one(Feature::SdVae, 0),
            "flux_vae" => one(Feature::FluxVae, 0),
            "siglip" => one(Feature::Siglip, 0),
            "clip_vision" => one(Feature::ClipVision, 0),
            "clip_text" => one(Feature::ClipText, 77),
            "t5" => [120, 512]
                .map(|tokens| Self {
                    kind: Feature::T5,
                    tokens,
                })
                .to_vec(),
            s => match s.strip_prefix("t5@").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => one(Feature::T5, n),
                _ => return Err(unknown()),
            },
        })
    }

    /// Every encoder at its reference input.
    #[must_use]
    pub fn all() -> Vec<Self> {
        [
            "sd_vae",
            "flux_vae",
            "siglip",
            "clip_vision",
            "t5",
            "clip_text",
        ]
        .iter()
        .flat_map(|n| Self::parse(n).unwrap_or_default())
        .collect()
    }

    /// The row's name: the model's, `@tokens` for T5.
    #[must_use]
    pub fn name(self) -> String {
        match self.kind {
            Feature::T5 => format!("t5@{}", self.tokens),
            k => k.name().to_string(),
        }
    }

    fn is_text(self) -> bool {
        matches!(self.kind, Feature::T5 | Feature::ClipText)
    }

    /// The default batch on a device: 1 on the CPU; on a GPU, batches that fill an
    /// H200 as the encoders' `batch_size` would.
    #[must_use]
    pub fn default_batch(self, cuda: bool) -> usize {
        if !cuda {
            return 1;
        }
        match self.kind {
            Feature::SdVae | Feature::FluxVae => 32,
            Feature::Siglip => 64,
            Feature::ClipVision | Feature::ClipText => 256,
            Feature::T5 if self.tokens > 256 => 32,
            Feature::T5 => 128,
        }
    }
}

/// The model sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The real configs (what the targets are about).
    Full,
    /// The tests' tiny fixtures ([`tensorbake_nn::tiny`]): seconds anywhere.
    Tiny,
}

impl Preset {
    /// Parses `full` or `tiny`.
    ///
    /// # Errors
    /// Another name.
    pub fn parse(s: &str) -> Result<Self, EncodeError> {
        match s {
            "full" => Ok(Self::Full),
            "tiny" => Ok(Self::Tiny),
            _ => Err(bad("bench", format!("unknown preset `{s}` (full | tiny)"))),
        }
    }
}

/// What `tensorbake bench encode` runs.
#[derive(Debug, Clone)]
pub struct EncodeBenchConfig {
    /// The rows, in order.
    pub encoders: Vec<BenchEncoder>,
    /// Model sizes.
    pub preset: Preset,
    /// Items per forward (else [`BenchEncoder::default_batch`]).
    pub batch: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Compute dtype (else bf16 on CUDA, f32 on the CPU).
    pub dtype: Option<DType>,
    /// Untimed forwards first.
    pub warmup: usize,
    /// Forwards per timed round.
    pub iters: usize,
    /// Timed rounds.
    pub rounds: usize,
    /// Check each encoder against the CPU in f32 first.
    pub check: bool,
    /// The FLOP ceiling, TFLOP/s (else [`H200_BF16_TFLOPS`] for half types on CUDA).
    pub peak_tflops: Option<f64>,
    /// Python with torch, diffusers and transformers; `None` skips the peer.
    pub python: Option<PathBuf>,
    /// The peer's runs: `eager`, `compile`.
    pub torch_modes: Vec<String>,
    /// `torch.compile`'s mode (else `max-autotune` for the VAEs, as the reference
    /// figures were measured, and the default mode for the transformers).
    pub compile_mode: Option<String>,
}

impl Default for EncodeBenchConfig {
    fn default() -> Self {
        Self {
            encoders: BenchEncoder::all(),
            preset: Preset::Full,
            batch: None,
            device: "cpu".into(),
            dtype: None,
            warmup: 2,
            iters: 5,
            rounds: 3,
            check: false,
            peak_tflops: None,
            python: None,
            torch_modes: vec!["eager".into(), "compile".into()],
            compile_mode: None,
        }
    }
}

/// The device check of one encoder.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `max|device - cpu f32| / max|cpu f32|` over the output.
    pub rel_err: f32,
    /// The bound for the compute dtype.
    pub tolerance: f32,
    /// Items checked.
    pub batch: usize,
    /// Whether `rel_err <= tolerance` (and the output is finite).
    pub pass: bool,
}

/// PyTorch's side of one row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerRow {
    /// Eager items/s (median round).
    pub eager: Option<f64>,
    /// `torch.compile` items/s (median round).
    pub compile: Option<f64>,
    /// The compile mode used.
    pub compile_mode: Option<String>,
    /// Seconds `torch.compile`'s first call took (compilation and autotuning).
    pub compile_s: Option<f64>,
    /// torch, diffusers, transformers versions.
    pub versions: String,
    /// Why the peer gave no figures.
    pub error: Option<String>,
}

/// One encoder's figures.
#[derive(Debug, Clone, Serialize)]
pub struct EncodeRow {
    /// The encoder (`t5@120`, ...).
    pub encoder: String,
    /// `512 px`, `120 tokens`, ...
    pub input: String,
    /// Items per forward.
    pub batch: usize,
    /// Parameters of the model as built.
    pub params: usize,
    /// GFLOP per item (the seam's count).
    pub gflop_per_item: f64,
    /// Items/s of each timed round.
    pub items_per_s_rounds: Vec<f64>,
    /// The median round's items/s.
    pub items_per_s: f64,
    /// Achieved TFLOP/s at that rate.
    pub tflops: f64,
    /// `tflops / ceiling`, where a ceiling is known.
    pub ceiling_fraction: Option<f64>,
    /// The device check, when asked for.
    pub check: Option<Check>,
    /// PyTorch's figures, when the peer ran.
    pub torch: Option<PeerRow>,
    /// Why this row has no figures of ours (the other rows still run).
    pub error: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct EncodeBenchReport {
    /// The device as asked for.
    pub device: String,
    /// The compute dtype.
    pub dtype: String,
    /// Model sizes.
    pub preset: Preset,
    /// Forwards: untimed, per round, rounds.
    pub warmup: usize,
    /// Forwards per timed round.
    pub iters: usize,
    /// Timed rounds.
    pub rounds: usize,
    /// The FLOP ceiling used, TFLOP/s.
    pub peak_tflops: Option<f64>,
    /// The rows.
    pub rows: Vec<EncodeRow>,
}

impl EncodeBenchReport {
    /// Whether any row failed (an error of ours or a failed check; a peer that did
    /// not run is reported, not a failure).
    #[must_use]
    pub fn failed(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.error.is_some() || r.check.as_ref().is_some_and(|c| !c.pass))
    }

    /// The table `tensorbake bench encode` prints.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = format!(
            "bench encode: {} preset, device {}, {}, {} warm-up + {} rounds x {} forwards{}\n",
            match self.preset {
                Preset::Full => "full",
                Preset::Tiny => "tiny",
            },
            self.device,
            self.dtype,
            self.warmup,
            self.rounds,
            self.iters,
            self.peak_tflops
                .map(|p| format!(", ceiling {p:.1} TFLOP/s"))
                .unwrap_or_default()
        );
        out += &format!(
            "{:<12} {:>10} {:>5} {:>8} {:>9} {:>10} {:>8} {:>7} {:>10} {:>10} {:>7} {:>7}  {}\n",
            "encoder",
            "input",
            "batch",
            "params",
            "GFLOP/it",
            "items/s",
            "TFLOP/s",
            "ceil",
            "torch",
            "compiled",
            "x eager",
            "x comp",
            "check"
        );
        let opt = |v: Option<f64>, prec: usize| {
            v.map_or_else(|| "-".to_string(), |v| format!("{v:.prec$}"))
        };
        let mut notes = Vec::new();
        for r in &self.rows {
            let torch = r.torch.clone().unwrap_or_default();
            let ratio = |p: Option<f64>| p.filter(|p| *p > 0.0).map(|p| r.items_per_s / p);
            let check = r.check.as_ref().map_or_else(
                || "-".to_string(),
                |c| {
                    format!(
                        "{} {:.1e} <= {:.0e}",
                        if c.pass { "ok" } else { "FAIL" },
                        c.rel_err,
                        c.tolerance
                    )
                },
            );
            out += &format!(
                "{:<12} {:>10} {:>5} {:>8} {:>9} {:>10.2} {:>8} {:>7} {:>10} {:>10} {:>7} {:>7}  {}\n",
                r.encoder,
                r.input,
                r.batch,
                if r.params >= 1_000_000 {
                    format!("{:.1}M", r.params as f64 / 1e6)
                } else {
                    format!("{:.1}K", r.params as f64 / 1e3)
                },
                if r.gflop_per_item >= 1.0 {
                    format!("{:.1}", r.gflop_per_item)
                } else {
                    format!("{:.2e}", r.gflop_per_item)
                },
                r.items_per_s,
                if r.tflops >= 10.0 {
                    format!("{:.1}", r.tflops)
                } else {
                    format!("{:.3}", r.tflops)
                },
                r.ceiling_fraction
                    .map_or_else(|| "-".to_string(), |f| format!("{:.1}%", 100.0 * f)),
                opt(torch.eager, 2),
                opt(torch.compile, 2),
                opt(ratio(torch.eager), 2),
                opt(ratio(torch.compile), 2),
                check
            );
            if let Some(e) = &r.error {
                notes.push(format!("{}: FAILED: {e}", r.encoder));
            }
            if let Some(e) = &torch.error {
                notes.push(format!("{}: torch: {e}", r.encoder));
            }
        }
        if let Some(p) = self.rows.iter().find_map(|r| r.torch.as_ref()) {
            if !p.versions.is_empty() {
                notes.push(format!("peer: {}", p.versions));
            }
            let compiled: Vec<String> = self
                .rows
                .iter()
                .filter_map(|r| {
                    let t = r.torch.as_ref()?;
                    Some(format!(
                        "{} {} ({:.0} s)",
                        r.encoder,
                        t.compile_mode.as_deref()?,
                        t.compile_s?
                    ))
                })
                .collect();
            if !compiled.is_empty() {
                notes.push(format!(
                    "torch.compile mode (first call): {}",
                    compiled.join(", ")
                ));
            }
        }
        for n in notes {
            out += &n;
            out.push('\n');
        }
        out
    }
}

fn bad(encoder: &str, why: String) -> EncodeError {
    EncodeError::BadInput {
        encoder: encoder.to_string(),
        why,
    }
}

/// The upstream `config.json` of `enc` at full size (the published values).
#[must_use]
pub fn full_config(kind: Feature) -> Value {
    match kind {
        Feature::SdVae | Feature::FluxVae => {
            let flux = kind == Feature::FluxVae;
            json!({
                "_class_name": "AutoencoderKL",
                "act_fn": "silu",
                "block_out_channels": [128, 256, 512, 512],
                "down_block_types": vec!["DownEncoderBlock2D"; 4],
                "force_upcast": true,
                "in_channels": 3,
                "latent_channels": if flux { 16 } else { 4 },
                "layers_per_block": 2,
                "mid_block_add_attention": true,
                "norm_num_groups": 32,
                "out_channels": 3,
                "sample_size": if flux { 1024 } else { 256 },
                "scaling_factor": if flux { 0.3611 } else { 0.18215 },
                "shift_factor": if flux { json!(0.1159) } else { Value::Null },
                "up_block_types": vec!["UpDecoderBlock2D"; 4],
                "use_post_quant_conv": !flux,
                "use_quant_conv": !flux,
            })
        }
        Feature::Siglip => json!({
            "model_type": "siglip_vision_model",
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1152,
            "image_size": 384,
            "intermediate_size": 4304,
            "layer_norm_eps": 1e-6,
            "num_attention_heads": 16,
            "num_channels": 3,
            "num_hidden_layers": 27,
            "patch_size": 14,
        }),
        Feature::ClipVision => json!({
            "model_type": "clip_vision_model",
            "hidden_act": "quick_gelu",
            "hidden_size": 1024,
            "image_size": 224,
            "intermediate_size": 4096,
            "layer_norm_eps": 1e-5,
            "num_attention_heads": 16,
            "num_channels": 3,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
        }),
        Feature::T5 => json!({
            "model_type": "t5",
            "d_ff": 10240,
            "d_kv": 64,
            "d_model": 4096,
            "dense_act_fn": "gelu_new",
            "feed_forward_proj": "gated-gelu",
            "is_gated_act": true,
            "layer_norm_epsilon": 1e-6,
            "num_heads": 64,
            "num_layers": 24,
            "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": 32,
            "tie_word_embeddings": false,
            "vocab_size": 32128,
        }),
        Feature::ClipText => json!({
            "model_type": "clip_text_model",
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": 77,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "projection_dim": 768,
            "vocab_size": 49408,
        }),
    }
}

/// The config of `kind` in `preset`: [`full_config`], or the tiny fixture's own
/// `config.json` (written into `dir` by [`tensorbake_nn::tiny`]; CLIP text, which
/// has no fixture, a two-layer width-32 tower).
fn config(kind: Feature, preset: Preset, dir: &Path) -> Result<Value, EncodeError> {
    if preset == Preset::Full {
        return Ok(full_config(kind));
    }
    let tiny = match kind {
        Feature::SdVae => TinyModel::SdVae,
        Feature::FluxVae => TinyModel::FluxVae,
        Feature::Siglip => TinyModel::Siglip,
        Feature::ClipVision => TinyModel::ClipVision,
        Feature::T5 => TinyModel::T5,
        Feature::ClipText => {
            let mut v = full_config(kind);
            for (k, n) in [
                ("hidden_size", 32),
                ("intermediate_size", 64),
                ("num_attention_heads", 2),
                ("num_hidden_layers", 2),
                ("projection_dim", 16),
                ("vocab_size", 1000),
            ] {
                v[k] = json!(n);
            }
            return Ok(v);
        }
    };
    let model_dir = dir.join(format!("tiny-{}", tiny.feature()));
    if !model_dir.join("config.json").exists() {
        write_tiny_model(tiny, &model_dir, 0)?;
    }
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        EncodeError::Model(tensorbake_nn::Error::Io {
            path: path.clone(),
            source: e,
        })
    })?;
    serde_json::from_str(&text).map_err(|e| bad("bench", format!("{}: {e}", path.display())))
}

/// Writes `kind` at full size with random weights into `dir`, in the Hugging Face
/// layout the encoders load (what `tensorbake bench run` runs the pipeline on): the
/// tiny fixture's directory for the files around the weights (tokenizer,
/// `preprocessor_config.json`, its input size set to the full model's), then the
/// published `config.json` and the weights, made on `device` ([`random_var_builder`])
/// and saved in `dtype`. Returns the parameter count.
///
/// # Errors
/// `clip_text` (no fixture to take the tokenizer from), I/O errors naming the file, a
/// model that does not build (a bug).
pub fn write_full_model(
    kind: Feature,
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<usize, EncodeError> {
    let (tiny, weights) = match kind {
        Feature::SdVae => (TinyModel::SdVae, "diffusion_pytorch_model.safetensors"),
        Feature::FluxVae => (TinyModel::FluxVae, "diffusion_pytorch_model.safetensors"),
        Feature::Siglip => (TinyModel::Siglip, "model.safetensors"),
        Feature::ClipVision => (TinyModel::ClipVision, "model.safetensors"),
        Feature::T5 => (TinyModel::T5, "model.safetensors"),
        Feature::ClipText => {
            return Err(bad(
                "clip_text",
                "no full-size clip_text model directory is written (no tokenizer fixture)".into(),
            ));
        }
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EncodeError::Model(tensorbake_nn::Error::Io { path, source })
    };
    write_tiny_model(tiny, dir, 0)?;
    let cfg = full_config(kind);
    let config_path = dir.join("config.json");
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(&cfg).unwrap_or_default(),
    )
    .map_err(io(&config_path))?;
    let pre = dir.join("preprocessor_config.json");
    if pre.exists() {
        let side = cfg["image_size"].as_u64().unwrap_or(0);
        let text = std::fs::read_to_string(&pre).map_err(io(&pre))?;
        let mut v: Value = serde_json::from_str(&text)
            .map_err(|e| bad("bench", format!("{}: {e}", pre.display())))?;
        if v["size"].get("shortest_edge").is_some() {
            v["size"]["shortest_edge"] = json!(side);
            v["crop_size"] = json!({"height": side, "width": side});
        } else {
            v["size"] = json!({"height": side, "width": side});
        }
        std::fs::write(&pre, serde_json::to_string_pretty(&v).unwrap_or_default())
            .map_err(io(&pre))?;
    }
    let what = format!("full-size {}", BenchEncoder { kind, tokens: 0 }.name());
    let candle_err = |source| {
        EncodeError::Model(tensorbake_nn::Error::Candle {
            model: what.clone(),
            source,
        })
    };
    let (vb, made) = random_var_builder(dtype.candle(), device);
    Model::build(kind, &cfg, vb).map_err(candle_err)?;
    let params = made.params();
    let path = dir.join(weights);
    candle_core::safetensors::save(&made.tensors(), &path).map_err(candle_err)?;
    Ok(params)
}

/// A built model and what it takes.
enum Model {
    Vae(Box<VaeEncoder>),
    Siglip(SiglipVision),
    ClipVision(ClipVisionWithProjection),
    T5(T5EncoderModel),
    ClipText(ClipTextModel),
}

/// The input of one forward: pixels, or ids with T5's mask.
struct Batch {
    x: Tensor,
    mask: Option<Tensor>,
}

impl Model {
    fn build(kind: Feature, cfg: &Value, vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
        let msg = |e: String| candle_core::Error::Msg(format!("config: {e}"));
        Ok(match kind {
            Feature::SdVae | Feature::FluxVae => {
                let c: vae::Config =
                    serde_json::from_value(cfg.clone()).map_err(|e| msg(e.to_string()))?;
                Self::Vae(Box::new(VaeEncoder::new(vb, &c)?))
            }
            Feature::Siglip => {
                let c = siglip::Config::from_json(cfg).map_err(msg)?;
                Self::Siglip(SiglipVision::new(vb.pp("vision_model"), &c.vision)?)
            }
            Feature::ClipVision => {
                let c = clip_vision::Config::from_json(cfg).map_err(msg)?;
                Self::ClipVision(ClipVisionWithProjection::new(vb, &c)?)
            }
            Feature::T5 => {
                let c: T5Config =
                    serde_json::from_value(cfg.clone()).map_err(|e| msg(e.to_string()))?;
                Self::T5(T5EncoderModel::new(vb, &c)?)
            }
            Feature::ClipText => {
                let c = ClipTextConfig::from_json(cfg).map_err(|e| msg(e.to_string()))?;
                Self::ClipText(ClipTextModel::new(vb, &c)?)
            }
        })
    }

    fn forward(&self, b: &Batch) -> candle_core::Result<Tensor> {
        match self {
            Self::Vae(m) => m.moments(&b.x),
            Self::Siglip(m) => m.forward(&b.x),
            Self::ClipVision(m) => m.forward(&b.x),
            Self::T5(m) => m.forward(&b.x, b.mask.as_ref()),
            Self::ClipText(m) => m.forward(&b.x),
        }
    }
}

/// The input side (pixels) or length (tokens), the vocabulary, and the input's
/// description, for `enc` under `cfg`.
fn input_shape(enc: BenchEncoder, cfg: &Value, preset: Preset) -> (usize, usize, String) {
    let get = |k: &str| cfg.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    match enc.kind {
        // the VAEs take any multiple of 8: 512 px at full size, 64 for the fixtures
        Feature::SdVae | Feature::FluxVae => {
            let side = if preset == Preset::Full { 512 } else { 64 };
            (side, 0, format!("{side} px"))
        }
        Feature::Siglip | Feature::ClipVision => {
            let side = get("image_size");
            (side, 0, format!("{side} px"))
        }
        Feature::T5 | Feature::ClipText => (
            enc.tokens,
            get("vocab_size"),
            format!("{} tokens", enc.tokens),
        ),
    }
}

/// A batch on the CPU in f32 (ids as u32), seeded: pixels uniform in [-1, 1), ids
/// uniform over the vocabulary; with `padded`, the last third of row 1 is padding
/// (T5's mask 0).
fn make_batch(
    enc: BenchEncoder,
    side_or_tokens: usize,
    vocab: usize,
    batch: usize,
    padded: bool,
) -> candle_core::Result<Batch> {
    let mut rng = SplitMix64::new(7);
    if !enc.is_text() {
        let n = batch * 3 * side_or_tokens * side_or_tokens;
        let v: Vec<f32> = (0..n).map(|_| (2.0 * rng.unit() - 1.0) as f32).collect();
        let x = Tensor::from_vec(v, (batch, 3, side_or_tokens, side_or_tokens), &Device::Cpu)?;
        return Ok(Batch { x, mask: None });
    }
    let t = side_or_tokens;
    let ids: Vec<u32> = (0..batch * t)
        .map(|_| ((rng.unit() * vocab as f64) as usize).min(vocab.saturating_sub(1)) as u32)
        .collect();
    let x = Tensor::from_vec(ids, (batch, t), &Device::Cpu)?;
    let mask = (enc.kind == Feature::T5)
        .then(|| {
            let m: Vec<f32> = (0..batch * t)
                .map(|i| {
                    let (row, pos) = (i / t, i % t);
                    if padded && row == 1 && pos >= t - t / 3 {
                        0.0
                    } else {
                        1.0
                    }
                })
                .collect();
            Tensor::from_vec(m, (batch, t), &Device::Cpu)
        })
        .transpose()?;
    Ok(Batch { x, mask })
}

impl Batch {
    /// On `device`, pixels in `dtype` (ids and the mask keep theirs).
    fn to(&self, device: &Device, dtype: CDType) -> candle_core::Result<Self> {
        let x = if self.x.dtype() == CDType::U32 {
            self.x.to_device(device)?
        } else {
            self.x.to_dtype(dtype)?.to_device(device)?
        };
        Ok(Self {
            x,
            mask: self
                .mask
                .as_ref()
                .map(|m| m.to_device(device))
                .transpose()?,
        })
    }
}

/// The check's bound: bf16 keeps 8 bits of mantissa, f16 11; a deep random-weight
/// model accumulates a few ulps of either. f32 on a GPU may take TF32 paths.
fn tolerance(dtype: CDType, device: &Device) -> f32 {
    match dtype {
        CDType::BF16 => 5e-2,
        CDType::F16 => 1e-2,
        _ if device.is_cpu() => 1e-5,
        _ => 5e-3,
    }
}

/// Runs the device model and the CPU f32 reference on the same weights and batch.
#[allow(clippy::too_many_arguments)]
fn check(
    enc: BenchEncoder,
    preset: Preset,
    cfg: &Value,
    model: &Model,
    weights: &RandomWeights,
    device: &Device,
    dtype: CDType,
    batch: usize,
) -> candle_core::Result<Check> {
    let (s, vocab, _) = input_shape(enc, cfg, preset);
    let n = batch.clamp(1, 2);
    let host = make_batch(enc, s, vocab, n, true)?;
    let got = model.forward(&host.to(device, dtype)?)?;
    let reference = Model::build(
        enc.kind,
        cfg,
        weights.var_builder(CDType::F32, &Device::Cpu),
    )?;
    let want = reference.forward(&host)?;
    let rel_err = tensorbake_nn::testing::rel_err(&got, &want)?;
    let tolerance = tolerance(dtype, device);
    Ok(Check {
        rel_err,
        tolerance,
        batch: n,
        pass: rel_err.is_finite() && rel_err <= tolerance,
    })
}

/// Ours: build, check, warm up (counting FLOPs), time.
fn run_ours(
    cfg: &EncodeBenchConfig,
    enc: BenchEncoder,
    model_cfg: &Value,
    device: &Device,
    dtype: CDType,
    batch: usize,
    peak: Option<f64>,
) -> Result<EncodeRow, String> {
    let name = enc.name();
    let (s, vocab, input) = input_shape(enc, model_cfg, cfg.preset);
    let (vb, weights) = random_var_builder(dtype, device);
    let model = Model::build(enc.kind, model_cfg, vb).map_err(|e| format!("building: {e}"))?;
    let params = weights.params();
    eprintln!("{name}: built, {:.1} M parameters", params as f64 / 1e6);
    let checked = if cfg.check {
        let c = check(
            enc, cfg.preset, model_cfg, &model, &weights, device, dtype, batch,
        )
        .map_err(|e| format!("check against the CPU: {e}"))?;
        eprintln!(
            "{name}: check {} (rel err {:.2e}, tolerance {:.0e})",
            if c.pass { "ok" } else { "FAILED" },
            c.rel_err,
            c.tolerance
        );
        Some(c)
    } else {
        None
    };
    drop(weights);
    let x = make_batch(enc, s, vocab, batch, false)
        .and_then(|b| b.to(device, dtype))
        .map_err(|e| format!("input: {e}"))?;
    let sync = || {
        device
            .synchronize()
            .map_err(|e| format!("synchronize: {e}"))
    };
    let fwd = || model.forward(&x).map_err(|e| format!("forward: {e}"));
    let (first, flop) = flops::count(fwd);
    first?;
    for _ in 1..cfg.warmup {
        fwd()?;
    }
    sync()?;
    let mut rates = Vec::with_capacity(cfg.rounds);
    for round in 0..cfg.rounds {
        let t0 = Instant::now();
        for _ in 0..cfg.iters {
            fwd()?;
        }
        sync()?;
        let rate = (batch * cfg.iters) as f64 / t0.elapsed().as_secs_f64();
        eprintln!("{name}: round {}: {rate:.2} items/s", round + 1);
        rates.push(rate);
    }
    let items_per_s = median(&rates);
    let per_item = flop as f64 / batch as f64;
    let tflops = per_item * items_per_s / 1e12;
    Ok(EncodeRow {
        encoder: name,
        input,
        batch,
        params,
        gflop_per_item: per_item / 1e9,
        items_per_s_rounds: rates,
        items_per_s,
        tflops,
        ceiling_fraction: peak.map(|p| tflops / p),
        check: checked,
        torch: None,
        error: None,
    })
}

/// The peer for one row: `scripts/bench/encoders.py`, JSON on stdout.
#[allow(clippy::too_many_arguments)]
fn run_peer(
    cfg: &EncodeBenchConfig,
    python: &Path,
    script: &Path,
    enc: BenchEncoder,
    model_cfg: &Value,
    config_path: &Path,
    dtype: DType,
    batch: usize,
) -> PeerRow {
    let compile_mode = cfg.compile_mode.clone().unwrap_or_else(|| {
        if matches!(enc.kind, Feature::SdVae | Feature::FluxVae) {
            "max-autotune".into()
        } else {
            "default".into()
        }
    });
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg("--encoder")
        .arg(enc.name())
        .arg("--config")
        .arg(config_path)
        .arg("--batch")
        .arg(batch.to_string())
        .arg("--dtype")
        .arg(dtype.short_name())
        .arg("--device")
        .arg(&cfg.device)
        .arg("--warmup")
        .arg(cfg.warmup.max(1).to_string())
        .arg("--iters")
        .arg(cfg.iters.to_string())
        .arg("--rounds")
        .arg(cfg.rounds.to_string())
        .arg("--modes")
        .arg(cfg.torch_modes.join(","))
        .arg("--compile-mode")
        .arg(&compile_mode);
    let (side_or_tokens, _, _) = input_shape(enc, model_cfg, cfg.preset);
    cmd.arg(if enc.is_text() { "--tokens" } else { "--side" })
        .arg(side_or_tokens.to_string());
    let fail = |why: String| PeerRow {
        error: Some(format!("{} {}: {why}", python.display(), script.display())),
        ..PeerRow::default()
    };
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => return fail(e.to_string()),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return fail(format!("{}: {}", out.status, tail.join(" | ")));
    }
    let v: Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => return fail(format!("no JSON on stdout ({e})")),
    };
    let versions = v["versions"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    PeerRow {
        eager: v["eager"].as_f64(),
        compile: v["compile"].as_f64(),
        compile_mode: v["compile"].as_f64().map(|_| compile_mode),
        compile_s: v["compile_s"].as_f64(),
        versions,
        error: v["error"].as_str().map(String::from),
    }
}

/// Runs the bench: every row, ours then the peer's, in `workdir` (configs and the
/// peer script are written there). A row that fails keeps its error and the others
/// still run.
///
/// # Errors
/// A device that does not open, a dtype it cannot run, zero rounds or forwards, a
/// work directory that cannot be written.
pub fn run_encode_bench(
    cfg: &EncodeBenchConfig,
    workdir: &Path,
) -> Result<EncodeBenchReport, EncodeError> {
    if cfg.rounds == 0 || cfg.iters == 0 {
        return Err(bad("bench", "rounds and iters must be at least 1".into()));
    }
    if cfg.batch == Some(0) {
        return Err(bad("bench", "batch must be at least 1".into()));
    }
    if cfg.encoders.is_empty() {
        return Err(bad("bench", "no encoders to run".into()));
    }
    let device = tensorbake_nn::parse_device(&cfg.device)?;
    let cuda = !device.is_cpu();
    let dtype = cfg
        .dtype
        .unwrap_or(if cuda { DType::Bf16 } else { DType::F32 });
    // candle's CPU backend runs no bf16 (neither convolution nor matmul)
    let cdtype = tensorbake_nn::device::conv_compute_dtype(dtype, &device)?;
    if cdtype == CDType::F16 && cfg.encoders.iter().any(|e| e.kind == Feature::T5) {
        return Err(bad(
            "t5",
            "T5-v1.1 overflows in f16 (transformers keeps it in f32 or bf16): use bf16 or f32"
                .into(),
        ));
    }
    let peak = cfg.peak_tflops.or_else(|| {
        (cuda && matches!(cdtype, CDType::BF16 | CDType::F16)).then_some(H200_BF16_TFLOPS)
    });
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EncodeError::Model(tensorbake_nn::Error::Io { path, source })
    };
    std::fs::create_dir_all(workdir).map_err(io(workdir))?;
    let script = workdir.join("encoders.py");
    if cfg.python.is_some() {
        std::fs::write(&script, TORCH_SCRIPT).map_err(io(&script))?;
    }
    let mut rows = Vec::new();
    for &enc in &cfg.encoders {
        let name = enc.name();
        let batch = cfg.batch.unwrap_or_else(|| enc.default_batch(cuda));
        let model_cfg = config(enc.kind, cfg.preset, workdir)?;
        let config_path = workdir.join(format!("{name}.json").replace('@', "-"));
        std::fs::write(
            &config_path,
            serde_json::to_string_pretty(&model_cfg).unwrap_or_default(),
        )
        .map_err(io(&config_path))?;
        let mut row =
            run_ours(cfg, enc, &model_cfg, &device, cdtype, batch, peak).unwrap_or_else(|e| {
                eprintln!("{name}: FAILED: {e}");
                let (_, _, input) = input_shape(enc, &model_cfg, cfg.preset);
                EncodeRow {
                    encoder: name.clone(),
                    input,
                    batch,
                    params: 0,
                    gflop_per_item: 0.0,
                    items_per_s_rounds: Vec::new(),
                    items_per_s: 0.0,
                    tflops: 0.0,
                    ceiling_fraction: None,
                    check: None,
                    torch: None,
                    error: Some(e),
                }
            });
        if let Some(python) = &cfg.python {
            eprintln!("{name}: PyTorch ({})", cfg.torch_modes.join(", "));
            let peer = run_peer(
                cfg,
                python,
                &script,
                enc,
                &model_cfg,
                &config_path,
                dtype,
                batch,
            );
            if let Some(e) = &peer.error {
                eprintln!("{name}: torch: {e}");
            }
            row.torch = Some(peer);
        }
        rows.push(row);
    }
    Ok(EncodeBenchReport {
        device: cfg.device.clone(),
        dtype: dtype.short_name().to_string(),
        preset: cfg.preset,
        warmup: cfg.warmup,
        iters: cfg.iters,
        rounds: cfg.rounds,
        peak_tflops: peak,
        rows,
    })
}

#[cfg(test)]
mod tests;
