//! tensorbake-train: the lean trainer that reads cached tensors instead of running
//! the frozen encoders in the loop.
//!
//! The store keeps VAE latents as *unscaled posterior moments* (mean, std), so that
//! every epoch can draw a fresh latent, as training with the encoder in the loop does.
//! [`latents`] turns those moments into the scaled latents a diffusion transformer
//! trains on. PixArt-α, the Flux conditioning and the Redux adapter build on it.
//! [`diffusion`] is PixArt-α's training objective (IDDPM: epsilon and a learned-range
//! variance); [`schedulers`] are the samplers' schedulers (DPM-Solver++, DDIM, flow-match
//! Euler) as diffusers runs them.
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

pub mod diffusion;
pub mod latents;
pub mod schedulers;
