//! tensorbake-train: the lean trainer that reads cached tensors instead of running
//! the frozen encoders in the loop.
//!
//! The store keeps VAE latents as *unscaled posterior moments* (mean, std), so that
//! every epoch can draw a fresh latent, as training with the encoder in the loop does.
//! [`latents`] turns those moments into the scaled latents a diffusion transformer
//! trains on. [`config`] is the `tensorbake train` configuration; [`lr`], [`optim`]
//! (AdamW on f32 master weights, clipping, EMA) and [`noise`] (resumable randomness)
//! the pieces of the loop; [`plot`] and [`draw`] make `loss.png` and image grids.
//! [`diffusion`] is PixArt-α's training objective (IDDPM: epsilon and a learned-range
//! variance); [`schedulers`] are the samplers' schedulers (DPM-Solver++, DDIM,
//! flow-match Euler) as diffusers runs them.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use tensorbake_train::latents::{LatentScaling, sample_latents};
//!
//! let dev = Device::Cpu;
//! let mean = Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &dev)?;
//! let std = Tensor::ones((1, 4, 8, 8), candle_core::DType::F32, &dev)?;
//! let z = sample_latents(&mean, &std, LatentScaling::SD)?;
//! assert_eq!(z.dims(), &[1, 4, 8, 8]);
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod diffusion;
pub mod draw;
pub mod flow;
pub mod flux_sample;
pub mod flux_task;
pub mod grid;
pub mod latents;
pub mod lr;
pub mod noise;
pub mod optim;
pub mod pixart_task;
pub mod plot;
pub mod recompute;
pub mod sample;
pub mod schedulers;
pub mod trainer;

/// Errors of the trainer; each names the file, key, array or tensor concerned.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration is invalid (the message names the file, line and key).
    #[error("{0}")]
    Config(String),
    /// The store cannot feed this mode (missing feature, shape mismatch, no null
    /// embedding), with what to do about it.
    #[error("store {store}: {why}")]
    Store {
        /// The store's location.
        store: String,
        /// What is wrong.
        why: String,
    },
    /// The store could not be read.
    #[error(transparent)]
    StoreRead(Box<tensorbake_store::StoreError>),
    /// A model could not be found or loaded.
    #[error(transparent)]
    Model(Box<tensorbake_nn::Error>),
    /// A checkpoint could not be read or is not of this run's kind.
    #[error("checkpoint {path}: {why}")]
    Checkpoint {
        /// The checkpoint directory.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An error inside candle during a step.
    #[error("step {step}: {source}")]
    Step {
        /// The optimizer step.
        step: u64,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl From<tensorbake_store::StoreError> for TrainError {
    fn from(e: tensorbake_store::StoreError) -> Self {
        Self::StoreRead(Box::new(e))
    }
}

impl From<tensorbake_nn::Error> for TrainError {
    fn from(e: tensorbake_nn::Error) -> Self {
        Self::Model(Box::new(e))
    }
}
