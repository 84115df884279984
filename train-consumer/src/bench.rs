//! `tensorbake bench train` and `bench sample`: samples/s of one training step and
//! seconds per sampled image, tensorbake beside diffusers (`PixArtTransformer2DModel`
//! training in PyTorch; `PixArtAlphaPipeline` sampling) in one run.
//!
//! ## Training
//! Both sides train the same random-weight PixArt (one diffusers directory, written
//! here by [`tensorbake_nn::tiny::write_pixart`] for the chosen [`Preset`]) in the
//! same mode, at the same batch size, dtype and device:
//!
//! - `adapter` (`pixart_redux_adapter`): PixArt frozen, a fresh Redux adapter trained
//!   on the SigLIP hidden states (the seed's run 3);
//! - `finetune` (`pixart_finetune`): every PixArt tensor trained through a frozen
//!   adapter (run 2).
//!
//! A step is what `tensorbake train` does: a batch from the store's shuffled loader,
//! latents drawn from the stored moments, noise and timesteps, conditioning dropout,
//! PixArt forward, the IDDPM loss (epsilon + variational bound), backward, clipping by
//! global norm, AdamW on f32 masters. tensorbake runs it through [`Trainer`]
//! ([`Trainer::bench_steps`]) on a synthetic store written here; the peer
//! (`scripts/bench/pixart_train_step.py`) builds its batches in memory from the same
//! shapes and uses the IDDPM transcription the objective's goldens are made with.
//! Rates are medians over the timed steps, after `warmup` untimed ones. Peak memory:
//! the process's peak resident set during the steps on the CPU (both reset it before
//! the first step), device memory in use on CUDA.
//!
//! ## Sampling
//!
//! [`run_sample_bench`]: the `adapter` mode's model (PixArt, a Redux adapter, an
//! SD-VAE-shaped decoder at full size: block widths 128..512) samples `images`
//! variations of one stored SigLIP condition with PixArt's DPM-Solver++ (20 steps,
//! guidance 4.5: two transformer passes a step) and decodes them; the peer gives
//! `PixArtAlphaPipeline` the same adapter output as `prompt_embeds` (and the black
//! image's as the negative), `output_type="np"`. Seconds per image, median of
//! `rounds` after one untimed round. The `small` preset samples at 64x64 latents
//! (512 px images).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tensorbake_kit::measure::median;

use candle_core::{Device, Tensor};
use serde::Serialize;
use tensorbake_kit::rng::SplitMix64;
use tensorbake_nn::pixart;
use tensorbake_store::{
    FeatureSpec, FeatureValue, Location, Record, Store, StoreReader, StoreSpec,
};

use crate::TrainError;
use crate::config::TrainConfig;
use crate::pixart_task::PixArtTask;
use crate::trainer::{Resume, Trainer};

/// The peer script, as committed (written into the work directory and run there).
pub const TORCH_SCRIPT: &str = include_str!("../../scripts/bench/pixart_train_step.py");
/// The IDDPM transcription the script imports (the diffusion goldens' own).
pub const IDDPM_SCRIPT: &str = include_str!("../tests/fixtures/diffusion/make_diffusion_golden.py");
/// The sampling peer script, as committed.
pub const PIPELINE_SCRIPT: &str = include_str!("../../scripts/bench/pixart_sample.py");
/// The Flux training peer script, as committed.
pub const FLUX_TORCH_SCRIPT: &str = include_str!("../../scripts/bench/flux_train_step.py");
/// The timing both training peers import (written beside them).
pub const TIMING_SCRIPT: &str = include_str!("../../scripts/bench/train_step_timing.py");

/// Writes a training peer script and the timing module it imports into `dir`.
fn write_peer(dir: &Path, name: &str, text: &str) -> Result<PathBuf, TrainError> {
    let timing = dir.join("train_step_timing.py");
    std::fs::write(&timing, TIMING_SCRIPT).map_err(io(&timing))?;
    let script = dir.join(name);
    std::fs::write(&script, text).map_err(io(&script))?;
    Ok(script)
}

/// The model sizes the bench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The tests' PixArt (depth 2, hidden 32): seconds on any machine.
    Tiny,
    /// A CPU-sized PixArt-XL-2 (depth 4, hidden 256 = 4 heads x 64, 32x32 latents =
    /// 256 px images, 4 x 64 = 256 tokens) with a 512-wide caption and 256 SigLIP
    /// tokens of width 384.
    Small,
    /// PixArt-XL-2-512x512 itself (depth 28, hidden 1152, 64x64 latents, T5-XXL width
    /// 4096) with SigLIP so400m at 384 px (729 tokens x 1152): the H200 figure.
    Xl512,
}

impl Preset {
    /// Parses `tiny`, `small` or `xl-512`.
    ///
    /// # Errors
    /// Another name.
    pub fn parse(s: &str) -> Result<Self, TrainError> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "small" => Ok(Self::Small),
            "xl-512" => Ok(Self::Xl512),
            _ => Err(TrainError::Config(format!(
                "unknown bench preset `{s}` (tiny | small | xl-512)"
            ))),
        }
    }

    /// PixArt's config.
    #[must_use]
    pub fn pixart(self) -> pixart::Config {
        match self {
            Self::Tiny => tensorbake_nn::tiny::tiny_pixart_config(
                tensorbake_nn::tiny::TinyPixart::Xl512,
                32,
                8,
            ),
            Self::Small => pixart::Config {
                num_attention_heads: 4,
                attention_head_dim: 64,
                num_layers: 4,
                cross_attention_dim: Some(256),
                sample_size: 32,
                caption_channels: Some(512),
                ..pixart::Config::xl_2_512()
            },
            Self::Xl512 => pixart::Config::xl_2_512(),
        }
    }

    /// The SigLIP hidden state's (tokens, width) in the store.
    #[must_use]
    pub fn siglip(self) -> (usize, usize) {
        match self {
            Self::Tiny => (16, 32),
            Self::Small => (256, 384),
            Self::Xl512 => (729, 1152),
        }
    }

    /// Adapter tokens kept (PixArt's caption length).
    #[must_use]
    pub fn redux_tokens(self) -> usize {
        match self {
            Self::Tiny => 8,
            Self::Small | Self::Xl512 => 120,
        }
    }
}

/// What the bench trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchMode {
    /// `pixart_redux_adapter`: the adapter trains, PixArt is frozen.
    Adapter,
    /// `pixart_finetune`: PixArt trains through a frozen adapter.
    Finetune,
    /// `flux_clip_image` with a rank-16 LoRA on Flux's default targets (Flux frozen).
    FluxLora,
    /// `flux_clip_image` training every Flux tensor.
    FluxFull,
}

/// The rank of the bench's Flux LoRA.
pub const FLUX_LORA_RANK: usize = 16;

impl BenchMode {
    /// Parses `adapter`, `finetune`, `flux-lora` or `flux-full`.
    ///
    /// # Errors
    /// Another name.
    pub fn parse(s: &str) -> Result<Self, TrainError> {
        match s {
            "adapter" => Ok(Self::Adapter),
            "finetune" => Ok(Self::Finetune),
            "flux-lora" => Ok(Self::FluxLora),
            "flux-full" => Ok(Self::FluxFull),
            _ => Err(TrainError::Config(format!(
                "unknown bench mode `{s}` (adapter | finetune | flux-lora | flux-full)"
            ))),
        }
    }

    /// The bench's name of the mode.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Adapter => "adapter",
            Self::Finetune => "finetune",
            Self::FluxLora => "flux-lora",
            Self::FluxFull => "flux-full",
        }
    }

    /// Whether it trains Flux (the PixArt modes otherwise).
    #[must_use]
    pub fn is_flux(self) -> bool {
        matches!(self, Self::FluxLora | Self::FluxFull)
    }

    fn train_mode(self) -> &'static str {
        match self {
            Self::Adapter => "pixart_redux_adapter",
            Self::Finetune => "pixart_finetune",
            Self::FluxLora | Self::FluxFull => "flux_clip_image",
        }
    }
}

impl Preset {
    /// Flux's config: the tests' tiny one, a CPU-sized Flux (2 double + 4 single blocks,
    /// hidden 256 = 4 heads x 64, T5 width 512, CLIP 768), or a full-size de-distilled
    /// Flux (FLUX.1-schnell's shapes: 19 + 38 blocks, 24 heads x 128, no guidance
    /// embedder) for the GPU.
    #[must_use]
    pub fn flux(self) -> tensorbake_nn::flux::Config {
        use tensorbake_nn::flux::Config;
        match self {
            Self::Tiny => tensorbake_nn::tiny::tiny_flux_config(false, 32, 16),
            Self::Small => Config {
                num_layers: 2,
                num_single_layers: 4,
                attention_head_dim: 64,
                num_attention_heads: 4,
                joint_attention_dim: 512,
                axes_dims_rope: vec![8, 28, 28],
                ..Config::flux1_schnell()
            },
            Self::Xl512 => Config::flux1_schnell(),
        }
    }

    /// The Flux-VAE latent side (8x the image's): 64 px, 256 px, 512 px images.
    #[must_use]
    pub fn flux_latent_side(self) -> usize {
        match self {
            Self::Tiny => 8,
            Self::Small => 32,
            Self::Xl512 => 64,
        }
    }
}

/// Flux's T5 tokens without a guidance embedder (FLUX.1-schnell's length).
const FLUX_T5_TOKENS: usize = 256;

/// The bench's settings.
#[derive(Debug, Clone)]
pub struct TrainBenchConfig {
    /// Model sizes.
    pub preset: Preset,
    /// Modes, each timed on both sides.
    pub modes: Vec<BenchMode>,
    /// Samples per step.
    pub batch_size: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first (allocations, CUDA kernels' first launch).
    pub warmup: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Compute dtype (`f32`; `bf16` on CUDA: PyTorch runs AMP autocast then).
    pub dtype: tensorbake_kit::dtype::DType,
    /// Recompute each block in the backward, on both sides.
    pub gradient_checkpointing: bool,
    /// Python with torch and diffusers for the peer; `None` runs ours only.
    pub python: Option<PathBuf>,
}

/// One side of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchRow {
    /// `tensorbake` or `pytorch`.
    pub engine: String,
    /// The mode.
    pub mode: BenchMode,
    /// Tensors trained.
    pub trainable_tensors: usize,
    /// Parameters trained.
    pub trainable_params: u64,
    /// Samples/s of each timed step.
    pub samples_per_s_steps: Vec<f64>,
    /// Their median.
    pub samples_per_s_median: f64,
    /// Peak memory during the steps, bytes (see the module doc for which).
    pub peak_memory_bytes: Option<u64>,
    /// The loss of the last step (both sides train the same model on equally drawn
    /// data: the same order of magnitude).
    pub last_loss: f64,
}

/// The bench's results.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchReport {
    /// Model sizes.
    pub preset: Preset,
    /// PixArt's config as diffusers writes it.
    pub pixart_config: serde_json::Value,
    /// Flux's config as diffusers writes it (when a Flux mode ran).
    pub flux_config: Option<serde_json::Value>,
    /// The Flux-VAE latent side of the Flux modes.
    pub flux_latent_side: usize,
    /// SigLIP (tokens, width).
    pub siglip: (usize, usize),
    /// Samples per step.
    pub batch_size: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps.
    pub warmup: usize,
    /// The device.
    pub device: String,
    /// Compute dtype.
    pub dtype: String,
    /// Gradient checkpointing on both sides.
    pub gradient_checkpointing: bool,
    /// The peer's versions (torch, diffusers), when it ran.
    pub peer_versions: Option<String>,
    /// Per mode: ours, then the peer.
    pub rows: Vec<TrainBenchRow>,
}

impl TrainBenchReport {
    /// The table `tensorbake bench train` prints.
    #[must_use]
    pub fn table(&self) -> String {
        let p = &self.pixart_config;
        let mut out = format!(
            "one training step (AdamW, f32 masters, clip): preset {preset}{pixart}\n\
             batch {b}, {dtype} on {device}{gc}; samples/s, median of {steps} steps after {warmup} warm-up{peer}\n\n",
            pixart = if self.rows.iter().any(|r| !r.mode.is_flux()) {
                format!(
                    "\nPixArt modes (IDDPM eps + vb): PixArt depth {}, hidden {}, {side}x{side} latents, \
                     SigLIP {}x{}",
                    p["num_layers"],
                    p["num_attention_heads"].as_u64().unwrap_or(0)
                        * p["attention_head_dim"].as_u64().unwrap_or(0),
                    self.siglip.0,
                    self.siglip.1,
                    side = p["sample_size"],
                )
            } else {
                String::new()
            },
            preset = serde_json::to_value(self.preset)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            b = self.batch_size,
            dtype = self.dtype,
            device = self.device,
            gc = if self.gradient_checkpointing {
                ", gradient checkpointing"
            } else {
                ""
            },
            steps = self.steps,
            warmup = self.warmup,
            peer = self
                .peer_versions
                .as_ref()
                .map(|v| format!("; peer {v}"))
                .unwrap_or_default(),
        );
        if let Some(f) = &self.flux_config {
            let side = self.flux_latent_side;
            let at = out.find("\nbatch ").unwrap_or(0);
            out.insert_str(
                at,
                &format!(
                    "\nFlux modes (flow matching, flux_clip_image; a rank-{FLUX_LORA_RANK} LoRA or all of Flux): \
                     {} double + {} single blocks, hidden {}, {side}x{side} latents ({} tokens), \
                     T5 {FLUX_T5_TOKENS} x {}, pooled {}",
                    f["num_layers"],
                    f["num_single_layers"],
                    f["num_attention_heads"].as_u64().unwrap_or(0)
                        * f["attention_head_dim"].as_u64().unwrap_or(0),
                    (side / 2) * (side / 2),
                    f["joint_attention_dim"],
                    f["pooled_projection_dim"],
                ),
            );
        }
        out += &format!(
            "{:<9} {:<11} {:>13} {:>10} {:>9} {:>12} {:>10}\n",
            "mode", "engine", "trained", "samples/s", "vs torch", "peak memory", "last loss"
        );
        for row in &self.rows {
            let torch = self
                .rows
                .iter()
                .find(|r| r.mode == row.mode && r.engine == "pytorch")
                .map(|r| r.samples_per_s_median);
            let ratio = torch.map_or("-".into(), |t| {
                format!("{:.2}x", row.samples_per_s_median / t)
            });
            let mem = row.peak_memory_bytes.map_or("-".into(), |b| {
                format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30))
            });
            out += &format!(
                "{:<9} {:<11} {:>13} {:>10.2} {:>9} {:>12} {:>10.4}\n",
                row.mode.name(),
                row.engine,
                format!("{:.1}M", row.trainable_params as f64 / 1e6),
                row.samples_per_s_median,
                ratio,
                mem,
                row.last_loss
            );
        }
        out
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The values of one synthetic feature.
#[derive(Clone, Copy)]
enum Fill {
    /// Standard normal draws.
    Normal,
    /// One value everywhere.
    Const(f32),
}

/// Writes a synthetic store of `n` samples (keys `b00000`...): each feature's values
/// drawn or filled per sample, in the given order, from one seeded stream; the null
/// embeddings `nulls` under null/; the resolution `8 * side`.
fn synthetic_store(
    dir: &Path,
    features: &[(&str, tensorbake_store::DType, Vec<usize>, Fill)],
    nulls: &BTreeMap<String, Tensor>,
    side: usize,
    n: usize,
    seed: u64,
) -> Result<Arc<StoreReader>, TrainError> {
    let loc = Location::from(dir.to_path_buf());
    let specs = features
        .iter()
        .map(|(name, dtype, shape, _)| {
            let spec = FeatureSpec {
                model: "synthetic".into(),
                weights_sha256: "0".into(),
                preprocess: serde_json::json!({}),
                dtype: *dtype,
                shape: shape.iter().map(|&d| d as u64).collect(),
            };
            ((*name).to_string(), spec)
        })
        .collect();
    let mut spec = StoreSpec::new(specs);
    spec.resolution = Some(8 * side as u32);
    let store = Store::create_or_open(&loc, spec)?;
    let mut rng = SplitMix64::new(seed);
    let mut w = store.part_writer("p0", "bench")?;
    let candle = tensorbake_nn::Error::candle("bench store");
    for i in 0..n {
        let mut values = BTreeMap::new();
        for (name, _, shape, fill) in features {
            let k: usize = shape.iter().product();
            let v: Vec<f32> = match fill {
                Fill::Normal => (0..k).map(|_| rng.normal() as f32).collect(),
                Fill::Const(c) => vec![*c; k],
            };
            let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).map_err(&candle)?;
            values.insert((*name).to_string(), FeatureValue::Tensor(t));
        }
        w.push(Record {
            key: format!("b{i:05}"),
            caption: String::new(),
            caption_raw: String::new(),
            orig_size: [8 * side as u32; 2],
            features: values,
        })?;
    }
    w.commit()?;
    store.record_null_embedding(nulls)?;
    Ok(Arc::new(StoreReader::open(&loc)?))
}

/// Writes the synthetic store: `n` samples of SD-VAE moments and SigLIP hidden
/// states of the preset's shapes, and the black image's SigLIP embedding under null/.
fn write_store(
    dir: &Path,
    preset: Preset,
    cfg: &pixart::Config,
    n: usize,
) -> Result<Arc<StoreReader>, TrainError> {
    use tensorbake_store::DType as S;
    let (c, side) = (cfg.in_channels, cfg.sample_size);
    let (st, sw) = preset.siglip();
    let black = Tensor::zeros((st, sw), candle_core::DType::F32, &Device::Cpu)
        .map_err(tensorbake_nn::Error::candle("bench store"))?;
    synthetic_store(
        dir,
        &[
            ("sd_vae_mean", S::F32, vec![c, side, side], Fill::Normal),
            ("sd_vae_std", S::F32, vec![c, side, side], Fill::Const(0.05)),
            ("siglip_hidden", S::Bf16, vec![st, sw], Fill::Normal),
        ],
        &BTreeMap::from([("siglip_hidden".to_string(), black)]),
        side,
        n,
        7,
    )
}

/// Writes `pixart/` (of `pcfg`), `redux/` and a store of `n` samples into `workdir`.
fn write_models_and_store(
    workdir: &Path,
    preset: Preset,
    pcfg: &pixart::Config,
    n: usize,
) -> Result<Arc<StoreReader>, TrainError> {
    let caption = pcfg.caption_width().unwrap_or(0);
    let (_, sw) = preset.siglip();
    tensorbake_nn::tiny::write_pixart(&workdir.join("pixart"), 0, pcfg)?;
    tensorbake_nn::tiny::write_tiny_redux(&workdir.join("redux"), 1, sw, caption)?;
    write_store(&workdir.join("store"), preset, pcfg, n)
}

/// Resets the peak resident set of this process (Linux: `clear_refs` 5); false where
/// it cannot be reset (the peak is then not reported).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident set since the last reset, bytes (`VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Device memory in use on `device` (CUDA), bytes.
#[cfg(feature = "cuda")]
fn device_memory_in_use(device: &Device) -> Option<u64> {
    let Device::Cuda(d) = device else {
        return None;
    };
    let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
    Some((total - free) as u64)
}

#[cfg(not(feature = "cuda"))]
fn device_memory_in_use(_: &Device) -> Option<u64> {
    None
}

/// Writes the synthetic Flux store: `n` samples of Flux-VAE moments and CLIP image
/// embeddings of the preset's shapes, the T5 feature, and the null T5 / black-image CLIP
/// embeddings under null/.
fn write_flux_store(
    dir: &Path,
    cfg: &tensorbake_nn::flux::Config,
    side: usize,
    n: usize,
) -> Result<Arc<StoreReader>, TrainError> {
    use tensorbake_store::DType as S;
    let (pooled, t5w) = (cfg.pooled_projection_dim, cfg.joint_attention_dim);
    let c = crate::flux_task::LATENT_CHANNELS;
    let candle = tensorbake_nn::Error::candle("bench store");
    let nulls = BTreeMap::from([
        ("t5_hidden".to_string(), {
            let mut rng = SplitMix64::new(9);
            let v = (0..FLUX_T5_TOKENS * t5w)
                .map(|_| rng.normal() as f32)
                .collect();
            Tensor::from_vec(v, (FLUX_T5_TOKENS, t5w), &Device::Cpu).map_err(&candle)?
        }),
        (
            "clip_image_embeds".to_string(),
            Tensor::zeros(pooled, candle_core::DType::F32, &Device::Cpu).map_err(&candle)?,
        ),
    ]);
    synthetic_store(
        dir,
        &[
            ("flux_vae_mean", S::F32, vec![c, side, side], Fill::Normal),
            (
                "flux_vae_std",
                S::F32,
                vec![c, side, side],
                Fill::Const(0.05),
            ),
            ("clip_image_embeds", S::Bf16, vec![pooled], Fill::Normal),
            (
                "t5_hidden",
                S::Bf16,
                vec![FLUX_T5_TOKENS, t5w],
                Fill::Const(0.0),
            ),
        ],
        &nulls,
        side,
        n,
        8,
    )
}

/// Times `cfg.steps` steps of a trainer after `cfg.warmup` untimed ones: the rates, the
/// last loss, the peak memory.
fn time_steps<T: crate::trainer::Task>(
    cfg: &TrainBenchConfig,
    trainer: &mut Trainer<T>,
    device: &Device,
) -> Result<(Vec<f64>, f64, Option<u64>), TrainError> {
    let mut rates = Vec::new();
    let mut last_loss = f64::NAN;
    trainer.bench_steps(cfg.warmup as u64, &mut |_| {})?;
    let reset = reset_peak_rss();
    let mut device_peak: Option<u64> = None;
    trainer.bench_steps(cfg.steps as u64, &mut |log| {
        rates.push(log.samples_per_s);
        last_loss = log.loss;
        if let Some(m) = device_memory_in_use(device) {
            device_peak = Some(device_peak.map_or(m, |p| p.max(m)));
        }
    })?;
    let peak = if device.is_cpu() {
        reset.then(peak_rss).flatten()
    } else {
        device_peak
    };
    Ok((rates, last_loss, peak))
}

/// The config lines both model families share.
fn common_lines(cfg: &TrainBenchConfig, mode: BenchMode) -> String {
    format!(
        "store = \"{}\"\nmode = \"{}\"\nout = \"out-{}\"\nsteps = {}\nbatch_size = {}\n\
         device = \"{}\"\ndtype = \"{}\"\ngradient_checkpointing = {}\nlr = 1e-5\n",
        if mode.is_flux() {
            "flux-store"
        } else {
            "store"
        },
        mode.train_mode(),
        mode.name(),
        cfg.steps + cfg.warmup,
        cfg.batch_size,
        cfg.device,
        cfg.dtype.short_name(),
        cfg.gradient_checkpointing,
    )
}

/// Times our side of one mode.
fn run_ours(
    cfg: &TrainBenchConfig,
    mode: BenchMode,
    dir: &Path,
    reader: &Arc<StoreReader>,
    device: &Device,
) -> Result<TrainBenchRow, TrainError> {
    let out = dir.join(format!("out-{}", mode.name()));
    let (vars, (rates, last_loss, peak)) = if mode.is_flux() {
        let lora = match mode {
            BenchMode::FluxLora => format!("lora = {{ rank = {FLUX_LORA_RANK} }}\n"),
            _ => String::new(),
        };
        let text = format!("{}flux = \"flux\"\n{lora}", common_lines(cfg, mode));
        let tcfg = TrainConfig::parse(&text, "bench train")?;
        let task = crate::flux_task::FluxTask::build(&tcfg, dir, reader, device)?;
        if let Some(l) = task.lora() {
            // the peer adapts the same modules
            let path = dir.join("lora_targets.json");
            let json = serde_json::to_string(&l.targets).unwrap_or_default();
            std::fs::write(&path, json).map_err(io(&path))?;
        }
        let mut trainer =
            Trainer::new(tcfg, task, reader.clone(), device.clone(), out, Resume::No)?;
        let vars = crate::trainer::Task::vars(trainer.task());
        (vars, time_steps(cfg, &mut trainer, device)?)
    } else {
        let redux = match mode {
            BenchMode::Finetune => "redux = \"redux\"\n",
            _ => "",
        };
        let text = format!(
            "{}pixart = \"pixart\"\n{redux}redux_tokens = {}\n",
            common_lines(cfg, mode),
            cfg.preset.redux_tokens(),
        );
        let tcfg = TrainConfig::parse(&text, "bench train")?;
        let task = PixArtTask::build(&tcfg, dir, reader, device)?;
        let mut trainer =
            Trainer::new(tcfg, task, reader.clone(), device.clone(), out, Resume::No)?;
        let vars = crate::trainer::Task::vars(trainer.task());
        (vars, time_steps(cfg, &mut trainer, device)?)
    };
    Ok(TrainBenchRow {
        engine: "tensorbake".into(),
        mode,
        trainable_tensors: vars.len(),
        trainable_params: vars.iter().map(|(_, v)| v.elem_count() as u64).sum(),
        samples_per_s_median: median(&rates),
        samples_per_s_steps: rates,
        peak_memory_bytes: peak,
        last_loss,
    })
}

/// The peer's failure.
fn peer_fail(python: &Path, script: &str, why: String) -> TrainError {
    TrainError::Config(format!(
        "bench: the peer ({} {script}) failed: {why}",
        python.display()
    ))
}

/// Runs a peer script; its stdout's one JSON object.
fn run_json(
    mut cmd: Command,
    python: &Path,
    script: &str,
) -> Result<serde_json::Value, TrainError> {
    let fail = |why: String| peer_fail(python, script, why);
    let output = cmd
        .output()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.trim().lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(fail(format!("{}: {}", output.status, tail.join(" | "))));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim())
        .map_err(|e| fail(format!("unreadable output {stdout:?}: {e}")))
}

/// The peer's torch and diffusers versions.
fn versions(v: &serde_json::Value) -> String {
    format!(
        "torch {}, diffusers {}",
        v["torch"].as_str().unwrap_or("?"),
        v["diffusers"].as_str().unwrap_or("?")
    )
}

/// The peer's command for a Flux mode (`scripts/bench/flux_train_step.py`).
fn flux_peer(
    cfg: &TrainBenchConfig,
    python: &Path,
    mode: BenchMode,
    dir: &Path,
) -> Result<Command, TrainError> {
    let script = write_peer(dir, "flux_train_step.py", FLUX_TORCH_SCRIPT)?;
    let fcfg = cfg.preset.flux();
    let side = cfg.preset.flux_latent_side();
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg("--transformer")
        .arg(dir.join("flux"))
        .args([
            "--mode",
            if mode == BenchMode::FluxLora {
                "lora"
            } else {
                "full"
            },
        ])
        .arg("--lora-targets")
        .arg(dir.join("lora_targets.json"))
        .args(["--lora-rank", &FLUX_LORA_RANK.to_string()])
        .args(["--batch", &cfg.batch_size.to_string()])
        .args(["--steps", &cfg.steps.to_string()])
        .args(["--warmup", &cfg.warmup.to_string()])
        .args(["--device", &cfg.device])
        .args(["--dtype", cfg.dtype.short_name()])
        .args([
            "--latent",
            &format!("{},{side},{side}", crate::flux_task::LATENT_CHANNELS),
        ])
        .args([
            "--t5",
            &format!("{FLUX_T5_TOKENS},{}", fcfg.joint_attention_dim),
        ])
        .args(["--pooled", &fcfg.pooled_projection_dim.to_string()]);
    if cfg.gradient_checkpointing {
        cmd.arg("--gradient-checkpointing");
    }
    Ok(cmd)
}

/// Times the peer on one mode; returns its row and versions.
fn run_peer(
    cfg: &TrainBenchConfig,
    python: &Path,
    mode: BenchMode,
    dir: &Path,
) -> Result<(TrainBenchRow, String), TrainError> {
    if mode.is_flux() {
        let v = run_json(
            flux_peer(cfg, python, mode, dir)?,
            python,
            "flux_train_step.py",
        )?;
        return peer_row(python, "flux_train_step.py", mode, &v);
    }
    let script = write_peer(dir, "pixart_train_step.py", TORCH_SCRIPT)?;
    let iddpm = dir.join("iddpm_objective.py");
    std::fs::write(&iddpm, IDDPM_SCRIPT).map_err(io(&iddpm))?;
    let pcfg = cfg.preset.pixart();
    let (st, sw) = cfg.preset.siglip();
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg("--transformer")
        .arg(dir.join("pixart"))
        .arg("--redux")
        .arg(dir.join("redux"))
        .arg("--objective")
        .arg(&iddpm)
        .args(["--mode", mode.name()])
        .args(["--batch", &cfg.batch_size.to_string()])
        .args(["--steps", &cfg.steps.to_string()])
        .args(["--warmup", &cfg.warmup.to_string()])
        .args(["--device", &cfg.device])
        .args(["--dtype", cfg.dtype.short_name()])
        .args(["--siglip", &format!("{st},{sw}")])
        .args([
            "--latent",
            &format!("{0},{1},{1}", pcfg.in_channels, pcfg.sample_size),
        ])
        .args(["--redux-tokens", &cfg.preset.redux_tokens().to_string()]);
    if cfg.gradient_checkpointing {
        cmd.arg("--gradient-checkpointing");
    }
    let v = run_json(cmd, python, "pixart_train_step.py")?;
    peer_row(python, "pixart_train_step.py", mode, &v)
}

/// The row of a peer's JSON.
fn peer_row(
    python: &Path,
    script: &str,
    mode: BenchMode,
    v: &serde_json::Value,
) -> Result<(TrainBenchRow, String), TrainError> {
    let fail = |why: String| peer_fail(python, script, why);
    let rates: Vec<f64> = serde_json::from_value(v["samples_per_s_steps"].clone())
        .map_err(|e| fail(format!("samples_per_s_steps: {e}: {v}")))?;
    let row = TrainBenchRow {
        engine: "pytorch".into(),
        mode,
        trainable_tensors: v["trainable_tensors"].as_u64().unwrap_or(0) as usize,
        trainable_params: v["trainable_params"].as_u64().unwrap_or(0),
        samples_per_s_median: median(&rates),
        samples_per_s_steps: rates,
        peak_memory_bytes: v["peak_memory_bytes"].as_u64(),
        last_loss: v["last_loss"].as_f64().unwrap_or(f64::NAN),
    };
    Ok((row, versions(v)))
}

/// Runs the bench in `workdir` (models, store and outputs are written there).
///
/// # Errors
/// A setting that cannot work, I/O errors, candle errors of a step, the peer's
/// failure with the end of its stderr.
pub fn run_train_bench(
    cfg: &TrainBenchConfig,
    workdir: &Path,
) -> Result<TrainBenchReport, TrainError> {
    if cfg.steps == 0 || cfg.batch_size == 0 || cfg.modes.is_empty() {
        return Err(TrainError::Config(
            "bench train: steps, batch size and modes must be non-zero".into(),
        ));
    }
    let device = tensorbake_nn::parse_device(&cfg.device)?;
    let pcfg = cfg.preset.pixart();
    let fcfg = cfg.preset.flux();
    // two batches per epoch, so the loader's epoch turnover is part of the timing
    let n = 2 * cfg.batch_size;
    let pixart_reader = if cfg.modes.iter().any(|m| !m.is_flux()) {
        Some(write_models_and_store(workdir, cfg.preset, &pcfg, n)?)
    } else {
        None
    };
    let flux_reader = if cfg.modes.iter().any(|m| m.is_flux()) {
        tensorbake_nn::tiny::write_flux(&workdir.join("flux"), 2, &fcfg)?;
        let side = cfg.preset.flux_latent_side();
        Some(write_flux_store(
            &workdir.join("flux-store"),
            &fcfg,
            side,
            n,
        )?)
    } else {
        None
    };
    let mut rows = Vec::new();
    let mut peer_versions = None;
    for &mode in &cfg.modes {
        tracing::info!(mode = mode.name(), "bench train: tensorbake");
        let reader = match (mode.is_flux(), &flux_reader, &pixart_reader) {
            (true, Some(r), _) | (false, _, Some(r)) => r,
            _ => unreachable!("a store per model family asked for"),
        };
        rows.push(run_ours(cfg, mode, workdir, reader, &device)?);
        if let Some(python) = &cfg.python {
            tracing::info!(mode = mode.name(), "bench train: pytorch");
            let (row, versions) = run_peer(cfg, python, mode, workdir)?;
            rows.push(row);
            peer_versions = Some(versions);
        }
    }
    Ok(TrainBenchReport {
        preset: cfg.preset,
        flux_config: flux_reader.map(|_| fcfg.to_diffusers_json()),
        flux_latent_side: cfg.preset.flux_latent_side(),
        pixart_config: pcfg.to_diffusers_json(),
        siglip: cfg.preset.siglip(),
        batch_size: cfg.batch_size,
        steps: cfg.steps,
        warmup: cfg.warmup,
        device: cfg.device.clone(),
        dtype: cfg.dtype.short_name().to_string(),
        gradient_checkpointing: cfg.gradient_checkpointing,
        peer_versions,
        rows,
    })
}

impl Preset {
    /// PixArt's config for sampling: the training one, the `small` preset at 64x64
    /// latents (512 px images).
    #[must_use]
    pub fn pixart_for_sampling(self) -> pixart::Config {
        let cfg = self.pixart();
        match self {
            Self::Small => pixart::Config {
                sample_size: 64,
                ..cfg
            },
            Self::Tiny | Self::Xl512 => cfg,
        }
    }

    /// The VAE's diffusers config: the tiny test VAE's widths, or SD-VAE's own
    /// (`stabilityai/sd-vae-ft-ema`: blocks 128, 256, 512, 512, two layers each, 32
    /// norm groups).
    #[must_use]
    pub fn vae_config(self) -> serde_json::Value {
        let (widths, layers, groups) = match self {
            Self::Tiny => (vec![8, 8, 16, 16], 1, 4),
            Self::Small | Self::Xl512 => (vec![128, 256, 512, 512], 2, 32),
        };
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": widths,
            "down_block_types": vec!["DownEncoderBlock2D"; 4],
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": layers,
            "norm_num_groups": groups,
            "out_channels": 3,
            "sample_size": 512,
            "scaling_factor": 0.18215,
            "up_block_types": vec!["UpDecoderBlock2D"; 4],
        })
    }
}

/// The sampling bench's settings.
#[derive(Debug, Clone)]
pub struct SampleBenchConfig {
    /// Model sizes.
    pub preset: Preset,
    /// Images per round (one prompt, this many variations: one batch).
    pub images: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale (above 1: two transformer passes per step).
    pub guidance: f64,
    /// Timed rounds (after one untimed).
    pub rounds: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Compute dtype.
    pub dtype: tensorbake_kit::dtype::DType,
    /// Python with torch and diffusers for the peer; `None` runs ours only.
    pub python: Option<PathBuf>,
}

/// One side's sampling time.
#[derive(Debug, Clone, Serialize)]
pub struct SampleBenchRow {
    /// `tensorbake` or `diffusers`.
    pub engine: String,
    /// Seconds per image in each timed round.
    pub seconds_per_image_rounds: Vec<f64>,
    /// Their median.
    pub seconds_per_image_median: f64,
    /// Mean pixel value of the last round's images in [0, 1] (the same models and
    /// conditions on both sides: close, not equal, as the noise differs).
    pub mean_pixel: f64,
}

/// The sampling bench's results.
#[derive(Debug, Clone, Serialize)]
pub struct SampleBenchReport {
    /// Model sizes.
    pub preset: Preset,
    /// PixArt's config as diffusers writes it.
    pub pixart_config: serde_json::Value,
    /// Image side, pixels.
    pub image_side: usize,
    /// Images per round.
    pub images: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Timed rounds.
    pub rounds: usize,
    /// The device.
    pub device: String,
    /// Compute dtype.
    pub dtype: String,
    /// The peer's versions, when it ran.
    pub peer_versions: Option<String>,
    /// Ours, then the peer.
    pub rows: Vec<SampleBenchRow>,
}

impl SampleBenchReport {
    /// The table `tensorbake bench sample` prints.
    #[must_use]
    pub fn table(&self) -> String {
        let p = &self.pixart_config;
        let mut out = format!(
            "sampling {n} image(s) of {side} px per round: DPM-Solver++ {steps} steps, guidance {g}, VAE decode; \
             PixArt depth {depth}, hidden {hidden}\n{dtype} on {device}; seconds per image, median of {rounds} rounds \
             after one warm-up{peer}\n\n",
            n = self.images,
            side = self.image_side,
            steps = self.steps,
            g = self.guidance,
            depth = p["num_layers"],
            hidden = p["num_attention_heads"].as_u64().unwrap_or(0)
                * p["attention_head_dim"].as_u64().unwrap_or(0),
            dtype = self.dtype,
            device = self.device,
            rounds = self.rounds,
            peer = self
                .peer_versions
                .as_ref()
                .map(|v| format!("; peer {v}"))
                .unwrap_or_default(),
        );
        let peer = self
            .rows
            .iter()
            .find(|r| r.engine == "diffusers")
            .map(|r| r.seconds_per_image_median);
        out += &format!(
            "{:<11} {:>11} {:>13} {:>11}\n",
            "engine", "s / image", "vs diffusers", "mean pixel"
        );
        for row in &self.rows {
            // faster is better: the ratio is the peer's time over ours
            let ratio = peer.map_or("-".into(), |t| {
                format!("{:.2}x", t / row.seconds_per_image_median)
            });
            out += &format!(
                "{:<11} {:>11.3} {:>13} {:>11.4}\n",
                row.engine, row.seconds_per_image_median, ratio, row.mean_pixel
            );
        }
        out
    }
}

/// Runs the sampling bench in `workdir`.
///
/// # Errors
/// As [`run_train_bench`].
pub fn run_sample_bench(
    cfg: &SampleBenchConfig,
    workdir: &Path,
) -> Result<SampleBenchReport, TrainError> {
    use crate::pixart_task::PromptInput;
    use crate::sample::{GridSampler, SampleSettings, Sampler, SchedulerChoice};
    if cfg.steps == 0 || cfg.images == 0 || cfg.rounds == 0 {
        return Err(TrainError::Config(
            "bench sample: steps, images and rounds must be non-zero".into(),
        ));
    }
    let device = tensorbake_nn::parse_device(&cfg.device)?;
    let pcfg = cfg.preset.pixart_for_sampling();
    let reader = write_models_and_store(workdir, cfg.preset, &pcfg, 1)?;
    let vae_dir = workdir.join("vae");
    tensorbake_nn::tiny::write_vae_with(&vae_dir, 2, &cfg.preset.vae_config())?;
    let text = format!(
        "store = \"store\"\nmode = \"pixart_redux_adapter\"\npixart = \"pixart\"\nout = \"out-sample\"\n\
         steps = 1\nbatch_size = 1\nredux_tokens = {}\ndevice = \"{}\"\ndtype = \"{}\"\n",
        cfg.preset.redux_tokens(),
        cfg.device,
        cfg.dtype.short_name(),
    );
    let tcfg = TrainConfig::parse(&text, "bench sample")?;
    let task = PixArtTask::build(&tcfg, workdir, &reader, &device)?;
    let vae = tensorbake_nn::vae::locate(&vae_dir.to_string_lossy())?.decoder(
        "vae",
        task.dtype(),
        &device,
    )?;
    let siglip = reader.get(0)?.features["siglip_hidden"].clone();
    let siglip_file = workdir.join("siglip.safetensors");
    siglip
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| {
            candle_core::safetensors::save(&HashMap::from([("siglip_hidden", t)]), &siglip_file)
        })
        .map_err(tensorbake_nn::Error::candle(
            "bench: writing siglip.safetensors",
        ))?;
    let scheduler = SchedulerChoice::pixart_dpm();
    let sched_file = workdir.join("scheduler_config.json");
    std::fs::write(&sched_file, &scheduler.json).map_err(io(&sched_file))?;
    let sampler = Sampler {
        task: &task,
        vae: &vae,
        scheduler: &scheduler,
        settings: SampleSettings {
            steps: cfg.steps,
            guidance: cfg.guidance,
            seed: 0,
        },
    };
    let input = PromptInput::Siglip(siglip);
    let step = |source| TrainError::Step { step: 0, source };
    let mut times = Vec::new();
    let mut mean_pixel = 0.0;
    for round in 0..=cfg.rounds {
        let t0 = std::time::Instant::now();
        let images = sampler.images(0, &input, cfg.images).map_err(step)?;
        let secs = t0.elapsed().as_secs_f64() / cfg.images as f64;
        if round > 0 {
            times.push(secs);
        }
        let (sum, count) = images.iter().fold((0u64, 0u64), |(s, c), im| {
            (
                s + im.pixels.iter().map(|&v| u64::from(v)).sum::<u64>(),
                c + im.pixels.len() as u64,
            )
        });
        mean_pixel = sum as f64 / count.max(1) as f64 / 255.0;
    }
    let mut rows = vec![SampleBenchRow {
        engine: "tensorbake".into(),
        seconds_per_image_median: median(&times),
        seconds_per_image_rounds: times,
        mean_pixel,
    }];
    let mut peer_versions = None;
    if let Some(python) = &cfg.python {
        let (row, versions) = run_sample_peer(cfg, python, workdir)?;
        rows.push(row);
        peer_versions = Some(versions);
    }
    Ok(SampleBenchReport {
        preset: cfg.preset,
        pixart_config: pcfg.to_diffusers_json(),
        image_side: 8 * pcfg.sample_size,
        images: cfg.images,
        steps: cfg.steps,
        guidance: cfg.guidance,
        rounds: cfg.rounds,
        device: cfg.device.clone(),
        dtype: cfg.dtype.short_name().to_string(),
        peer_versions,
        rows,
    })
}

fn run_sample_peer(
    cfg: &SampleBenchConfig,
    python: &Path,
    dir: &Path,
) -> Result<(SampleBenchRow, String), TrainError> {
    let script = dir.join("pixart_sample.py");
    std::fs::write(&script, PIPELINE_SCRIPT).map_err(io(&script))?;
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg("--transformer")
        .arg(dir.join("pixart"))
        .arg("--redux")
        .arg(dir.join("redux"))
        .arg("--vae")
        .arg(dir.join("vae"))
        .arg("--scheduler")
        .arg(dir.join("scheduler_config.json"))
        .arg("--siglip")
        .arg(dir.join("siglip.safetensors"))
        .args(["--images", &cfg.images.to_string()])
        .args(["--steps", &cfg.steps.to_string()])
        .args(["--guidance", &cfg.guidance.to_string()])
        .args(["--rounds", &cfg.rounds.to_string()])
        .args(["--redux-tokens", &cfg.preset.redux_tokens().to_string()])
        .args(["--device", &cfg.device])
        .args(["--dtype", cfg.dtype.short_name()]);
    let v = run_json(cmd, python, "pixart_sample.py")?;
    let fail = |why: String| peer_fail(python, "pixart_sample.py", why);
    let times: Vec<f64> = serde_json::from_value(v["seconds_per_image_rounds"].clone())
        .map_err(|e| fail(format!("seconds_per_image_rounds: {e}: {v}")))?;
    let row = SampleBenchRow {
        engine: "diffusers".into(),
        seconds_per_image_median: median(&times),
        seconds_per_image_rounds: times,
        mean_pixel: v["mean_pixel"].as_f64().unwrap_or(f64::NAN),
    };
    Ok((row, versions(&v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(modes: Vec<BenchMode>, python: Option<PathBuf>) -> TrainBenchConfig {
        TrainBenchConfig {
            preset: Preset::Tiny,
            modes,
            batch_size: 2,
            steps: 3,
            warmup: 1,
            device: "cpu".into(),
            dtype: tensorbake_kit::dtype::DType::F32,
            gradient_checkpointing: false,
            python,
        }
    }

    /// Ours only, both modes on the tiny preset: one row per mode, a rate per timed
    /// step, the trained sets of each mode (the adapter's two linears; all of PixArt).
    #[test]
    fn times_both_modes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(vec![BenchMode::Adapter, BenchMode::Finetune], None);
        let report = run_train_bench(&cfg, dir.path()).unwrap();
        assert_eq!(report.rows.len(), 2);
        for row in &report.rows {
            assert_eq!(row.engine, "tensorbake");
            assert_eq!(row.samples_per_s_steps.len(), 3);
            assert!(row.samples_per_s_median > 0.0);
            assert!(row.last_loss.is_finite());
        }
        assert_eq!(report.rows[0].trainable_tensors, 4);
        let all = tensorbake_nn::pixart::expected_tensors(&Preset::Tiny.pixart())
            .unwrap()
            .len();
        assert_eq!(report.rows[1].trainable_tensors, all);
        assert!(report.rows[1].trainable_params > report.rows[0].trainable_params);
        // nothing is checkpointed by the bench
        assert!(!dir.path().join("out-adapter").join("checkpoint-4").exists());
        let table = report.table();
        assert!(
            table.contains("adapter") && table.contains("finetune"),
            "{table}"
        );
    }

    /// Ours only, the tiny preset: one row, a time per round, images that are not
    /// blank (a decoder that produced nothing would give a constant 0 or 1).
    #[test]
    fn samples_and_times_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SampleBenchConfig {
            preset: Preset::Tiny,
            images: 2,
            steps: 3,
            guidance: 4.5,
            rounds: 2,
            device: "cpu".into(),
            dtype: tensorbake_kit::dtype::DType::F32,
            python: None,
        };
        let report = run_sample_bench(&cfg, dir.path()).unwrap();
        assert_eq!(report.rows.len(), 1);
        assert_eq!(report.image_side, 64);
        let row = &report.rows[0];
        assert_eq!(row.seconds_per_image_rounds.len(), 2);
        assert!(row.seconds_per_image_median > 0.0);
        assert!(
            row.mean_pixel > 0.01 && row.mean_pixel < 0.99,
            "{}",
            row.mean_pixel
        );
        assert!(dir.path().join("scheduler_config.json").exists());
        assert!(report.table().contains("tensorbake"));
    }

    #[test]
    fn rejects_zero_steps_and_unknown_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny(vec![BenchMode::Adapter], None);
        cfg.steps = 0;
        assert!(run_train_bench(&cfg, dir.path()).is_err());
        assert!(
            Preset::parse("huge")
                .unwrap_err()
                .to_string()
                .contains("huge")
        );
        assert!(
            BenchMode::parse("text")
                .unwrap_err()
                .to_string()
                .contains("text")
        );
        assert_eq!(Preset::parse("xl-512").unwrap(), Preset::Xl512);
    }

    /// The peak resident set is read back after a reset, and grows with a big
    /// allocation touched after it.
    #[test]
    fn peak_rss_follows_allocations() {
        if !reset_peak_rss() {
            eprintln!("skipping: /proc/self/clear_refs cannot be written here");
            return;
        }
        let before = peak_rss().unwrap();
        let v = vec![1u8; 256 << 20];
        let after = peak_rss().unwrap();
        assert!(after >= before + (200 << 20), "{before} -> {after}");
        drop(v);
    }
}
