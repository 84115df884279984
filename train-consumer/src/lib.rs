//! tensorbake-train: the lean trainer that reads cached tensors instead of running
//! the frozen encoders in the loop.
//!
//! The store keeps VAE latents as *unscaled posterior moments* (mean, std), so that
//! every epoch can draw a fresh latent, as training with the encoder in the loop does.
//! [`latents`] turns those moments into the scaled latents a diffusion transformer
//! trains on. PixArt-α, the Flux conditioning and the Redux adapter build on it.
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

pub mod latents;
