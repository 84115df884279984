//! The trainer's randomness, all from one SplitMix64 stream whose state is a single
//! `u64` saved in every checkpoint: latent samples `mean + std * eps`, diffusion noise,
//! timesteps, conditioning dropout. candle's own `randn` is not used: its generator
//! cannot be saved, so a resumed run could not draw what the uninterrupted one drew.
//! Values are made on the host and uploaded (a few MB per step at full size).

use candle_core::{Device, Result, Shape, Tensor};
use tensorbake_kit::rng::SplitMix64;

/// A resumable source of the trainer's random numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Noise {
    rng: SplitMix64,
}

impl Noise {
    /// The stream of a run's `seed` (independent of the data-order stream).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::for_name(seed, "tensorbake-train noise"),
        }
    }

    /// Resumes from a saved [`Noise::state`].
    #[must_use]
    pub fn from_state(state: u64) -> Self {
        Self {
            rng: SplitMix64::new(state),
        }
    }

    /// The state to save.
    #[must_use]
    pub fn state(&self) -> u64 {
        self.rng.state()
    }

    /// A tensor of standard normal values (f32) on `device`.
    ///
    /// # Errors
    /// candle errors.
    pub fn randn(&mut self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| self.rng.normal() as f32)
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    /// `n` timesteps uniform in `0..num_timesteps`.
    pub fn timesteps(&mut self, n: usize, num_timesteps: u64) -> Vec<u32> {
        (0..n)
            .map(|_| self.rng.below(num_timesteps) as u32)
            .collect()
    }

    /// `n` values uniform in `(0, 1]`.
    pub fn uniform(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| 1.0 - self.rng.unit()).collect()
    }

    /// `n` standard normal values (f64).
    pub fn normals(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.rng.normal()).collect()
    }

    /// `n` coin flips that come up `true` with probability `p`.
    pub fn bernoulli(&mut self, n: usize, p: f64) -> Vec<bool> {
        (0..n).map(|_| 1.0 - self.rng.unit() < p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_stream_draws_what_the_uninterrupted_one_draws() -> Result<()> {
        let mut a = Noise::new(3);
        let _ = a.randn((2, 3), &Device::Cpu)?;
        let mut b = Noise::from_state(a.state());
        let x = a.randn(5, &Device::Cpu)?.to_vec1::<f32>()?;
        let y = b.randn(5, &Device::Cpu)?.to_vec1::<f32>()?;
        assert_eq!(x, y);
        assert_eq!(a.timesteps(4, 1000), b.timesteps(4, 1000));
        let flips = Noise::new(1).bernoulli(10_000, 0.1);
        let k = flips.iter().filter(|&&f| f).count();
        assert!((800..1200).contains(&k), "{k}");
        assert!(Noise::new(1).bernoulli(100, 0.0).iter().all(|&f| !f));
        Ok(())
    }
}
