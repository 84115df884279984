//! LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
//! <https://arxiv.org/abs/2106.09685>) for the linear layers of a Flux transformer, in
//! the form peft gives diffusers: `y = W x + b + (alpha / r) · B (A x)` with `A`
//! `[r, in]` drawn as peft's default (`kaiming_uniform_(a=sqrt(5))`:
//! `U(-1/sqrt(in), 1/sqrt(in))`) and `B` `[out, r]` zero, so training starts from the
//! model itself.
//!
//! Files are what `FluxPipeline.save_lora_weights` writes and `load_lora_weights` /
//! `FluxTransformer2DModel.load_lora_adapter` read: `pytorch_lora_weights.safetensors`
//! with `transformer.<module path>.lora_A.weight` / `.lora_B.weight` and, in the
//! safetensors metadata under `lora_adapter_metadata`, the peft `LoraConfig` keys
//! (`transformer.r`, `transformer.lora_alpha`, `transformer.target_modules`), so the
//! scale `alpha / r` survives the trip. The variables are named by those keys.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor};
use serde::{Deserialize, Serialize};
use tensorbake_kit::rng::SplitMix64;

use crate::flux::Flux;
use crate::loader::VarSet;
use crate::{Error, Result, ops};

/// The file `FluxPipeline.save_lora_weights` writes.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
/// The prefix of the transformer's keys in that file.
pub const PREFIX: &str = "transformer";
/// The safetensors metadata key diffusers reads the adapter config from.
pub const METADATA_KEY: &str = "lora_adapter_metadata";

/// A LoRA's shape: rank, alpha and the module paths it adapts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// The rank `r`.
    pub rank: usize,
    /// `alpha` (the update is scaled by `alpha / r`).
    pub alpha: f64,
    /// Module paths (`transformer_blocks.0.attn.to_q`), in model order.
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// `alpha / r`.
    #[must_use]
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The variable (and file key) names of the LoRA of `path`: `(A, B)`.
    #[must_use]
    pub fn names(path: &str) -> (String, String) {
        (
            format!("{PREFIX}.{path}.lora_A.weight"),
            format!("{PREFIX}.{path}.lora_B.weight"),
        )
    }

    /// The metadata diffusers builds its peft `LoraConfig` from.
    #[must_use]
    pub fn diffusers_metadata(&self) -> serde_json::Value {
        serde_json::json!({
            format!("{PREFIX}.r"): self.rank,
            format!("{PREFIX}.lora_alpha"): self.alpha,
            format!("{PREFIX}.target_modules"): self.targets,
        })
    }
}

/// One LoRA: `scale · B (A x)` (an [`crate::flux::Adapter`]). `A` and `B` are f32
/// variables, cast to the activation dtype on the way (a differentiable cast).
#[derive(Debug, Clone)]
pub struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Module for Lora {
    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        let h = ops::linear(x, &self.a, None)?;
        ops::linear(&h, &self.b, None)? * self.scale
    }
}

/// Adds a fresh LoRA of `cfg` to each target of `flux`, its variables in `vars`
/// (seeded per tensor name by `seed`: the same seed gives the same `A` whatever the
/// order). Frozen base weights stay constants.
///
/// # Errors
/// A target that is not a linear layer of the model (named).
pub fn attach(
    flux: &mut Flux,
    cfg: &LoraConfig,
    vars: &VarSet,
    seed: u64,
    device: &Device,
) -> Result<()> {
    let candle = |e: candle_core::Error| Error::Candle {
        model: "flux lora".into(),
        source: e,
    };
    if cfg.rank == 0 {
        return Err(Error::Incompatible {
            what: "lora".into(),
            why: "rank must be at least 1".into(),
        });
    }
    for path in &cfg.targets {
        let (din, dout) = match flux.linear(path) {
            Some(l) => (l.in_dim(), l.out_dim()),
            None => {
                return Err(Error::Incompatible {
                    what: "lora".into(),
                    why: format!(
                        "target `{path}` is not a linear layer of this Flux (targets look like \
                         transformer_blocks.0.attn.to_q, single_transformer_blocks.3.proj_mlp)"
                    ),
                });
            }
        };
        let (na, nb) = LoraConfig::names(path);
        let a = vars
            .get_or_insert(&na, || {
                let bound = 1.0 / (din as f64).sqrt();
                let mut rng = SplitMix64::for_name(seed, &na);
                let v: Vec<f32> = (0..cfg.rank * din)
                    .map(|_| (bound * (1.0 - 2.0 * rng.unit())) as f32)
                    .collect();
                Tensor::from_vec(v, (cfg.rank, din), device)
            })
            .map_err(candle)?;
        let b = vars
            .get_or_insert(&nb, || Tensor::zeros((dout, cfg.rank), DType::F32, device))
            .map_err(candle)?;
        let lora = Lora {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: cfg.scale(),
        };
        flux.set_adapter(path, Some(Arc::new(lora)))
            .map_err(candle)?;
    }
    Ok(())
}

/// Writes `dir/pytorch_lora_weights.safetensors` (f32) with the diffusers metadata:
/// `FluxPipeline.load_lora_weights(dir)` loads it.
///
/// # Errors
/// I/O and encoding errors naming the file.
pub fn save_diffusers_lora(
    dir: &Path,
    cfg: &LoraConfig,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let path = dir.join(LORA_FILE);
    let bad = |why: String| Error::BadFile {
        path: path.clone(),
        why,
    };
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut cpu = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        let t = t
            .to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.contiguous())
            .map_err(|e| bad(format!("tensor `{k}`: {e}")))?;
        cpu.push((k.clone(), t.detach()));
    }
    let meta: HashMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        (
            METADATA_KEY.to_string(),
            serde_json::to_string_pretty(&cfg.diffusers_metadata()).unwrap_or_default(),
        ),
    ]
    .into();
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(cpu, Some(meta), &tmp)
        .map_err(|e| bad(format!("writing safetensors: {e}")))?;
    std::fs::rename(&tmp, &path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })
}
