//! tensorbake-nn: the model code of tensorbake, in candle, and everything about weights.
//!
//! - Model files, each laid out like candle's (`Config` from the upstream
//!   `config.json`, named presets, `new(vb, &cfg)`, `forward`): [`vae`] (the KL
//!   autoencoder of SD and Flux), [`t5`], [`clip_text`], [`clip_vision`], [`siglip`],
//!   [`pixart`] (PixArt-α's transformer, with a per-block API for recomputation),
//!   [`flux`] (the Flux transformer: diffusers and BFL names, per-block API, adapters
//!   for LoRA) and [`redux`] (the Flux Redux image adapter).
//! - The ops seam ([`ops`]): attention, layer / group / RMS norm, convolution, linear
//!   layers and adaLN modulation. Model files call only these (through [`layers`]);
//!   each has a plain candle reference implementation that is also the gradient path,
//!   and the GPU fast paths live behind it.
//! - Weights: [`weights`] finds a model offline (local Hugging Face layout or a hub id
//!   in the HF cache) and fingerprints it; [`loader`] builds a model from safetensors
//!   with every tensor checked (name, aliases, shape, dtype) and errors that name the
//!   tensor and the file, frozen or with chosen tensors as f32 trainable variables;
//!   [`init`] makes seeded fresh weights; [`tiny`] writes tiny random-weight models in
//!   the real layouts for tests and the demo.
//! - [`device`]: `cpu` / `cuda[:N]` and the compute dtypes a device can run; dtypes are
//!   [`tensorbake_kit::dtype::DType`], the workspace's one vocabulary.
//!
//! Nothing here knows features, tokenizers, images or stores: that is tensorbake-encode
//! (features over these models) and tensorbake-train (objectives, optimizers, loop).
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::{DType, Device, Module, Tensor};
//! use tensorbake_nn::layers::Linear;
//! use tensorbake_nn::loader::VarSet;
//!
//! // A trainable layer from seeded fresh weights: its weight is a variable, so the
//! // gradient reaches it.
//! let vars = VarSet::new();
//! let vb = tensorbake_nn::init::fresh_var_builder(1, &vars, DType::F32, &Device::Cpu);
//! let lin = Linear::new(4, 2, vb.pp("proj"))?;
//! let y = lin.forward(&Tensor::ones((3, 4), DType::F32, &Device::Cpu)?)?;
//! let grads = y.sum_all()?.backward()?;
//! assert!(grads.get(vars.get("proj.weight").unwrap().as_tensor()).is_some());
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod activation;
pub mod clip_text;
pub mod clip_vision;
pub mod device;
mod error;
pub mod flux;
pub mod init;
pub mod layers;
pub mod loader;
pub mod lora;
pub mod ops;
pub mod pixart;
pub mod random;
pub mod redux;
pub mod siglip;
pub mod t5;
pub mod testing;
pub mod tiny;
pub mod vae;
pub mod vit;
pub mod weights;

pub use device::{compute_dtype, conv_compute_dtype, parse_device};
pub use error::{Error, Result};
pub use loader::{NameMap, Trainable, VarSet, WeightFiles, same_names};
pub use tensorbake_kit::dtype::DType;
pub use weights::{ModelDir, fingerprint};
