//! tensorbake-encode: the frozen encoders of a diffusion model, in candle.
//!
//! Each encoder turns a batch of preprocessed inputs into the feature arrays that the
//! store keeps (names fixed by DESIGN.md: `sd_vae_mean`, `siglip_hidden`, `t5_hidden`,
//! ...). This crate knows nothing of tar or Zarr: it loads HF-layout weights and runs
//! models.
