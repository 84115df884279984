//! From stored posterior moments to the latents a diffusion model trains on.
//!
//! A VAE encoder gives a diagonal Gaussian posterior per image; diffusers'
//! `DiagonalGaussianDistribution.sample()` draws `mean + std * eps`. The model then
//! works on `(z - shift) * scale`: Stable Diffusion's VAE (PixArt-α) uses scale
//! 0.18215 and no shift; the Flux autoencoder uses shift 0.1159 and scale 0.3611
//! (`scaling_factor` / `shift_factor` in its diffusers `config.json`).

use candle_core::{Result, Tensor};

/// The affine map from a raw VAE latent to the model's latent space.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentScaling {
    /// Subtracted before scaling (diffusers `shift_factor`, 0 when absent).
    pub shift: f64,
    /// Multiplied after the shift (diffusers `scaling_factor`).
    pub scale: f64,
}

impl LatentScaling {
    /// sd-vae-ft-ema, the VAE of PixArt-α and Stable Diffusion 1.x/2.x.
    pub const SD: Self = Self {
        shift: 0.0,
        scale: 0.18215,
    };
    /// The 16-channel Flux autoencoder.
    pub const FLUX: Self = Self {
        shift: 0.1159,
        scale: 0.3611,
    };

    /// Raw latent -> model latent: `(z - shift) * scale`.
    pub fn apply(&self, z: &Tensor) -> Result<Tensor> {
        z.affine(self.scale, -self.shift * self.scale)
    }

    /// Model latent -> raw latent, the inverse of [`LatentScaling::apply`] (before decoding).
    pub fn invert(&self, z: &Tensor) -> Result<Tensor> {
        z.affine(1.0 / self.scale, self.shift)
    }
}

/// Draws `mean + std * eps` with `eps ~ N(0, 1)` on the tensors' device and applies
/// `scaling`. `mean` and `std` must have the same shape; the result has their dtype.
pub fn sample_latents(mean: &Tensor, std: &Tensor, scaling: LatentScaling) -> Result<Tensor> {
    let eps = mean.randn_like(0.0, 1.0)?;
    let z = (mean + (std * eps)?)?;
    scaling.apply(&z)
}

/// Draws `mean + std * eps` with `eps` from the run's resumable [`Noise`] stream, in
/// f32, and applies `scaling`: the latents of one training step.
///
/// # Errors
/// candle errors (shapes).
pub fn draw_latents(
    mean: &Tensor,
    std: &Tensor,
    scaling: LatentScaling,
    noise: &mut crate::noise::Noise,
) -> Result<Tensor> {
    let mean = mean.to_dtype(candle_core::DType::F32)?;
    let std = std.to_dtype(candle_core::DType::F32)?;
    let eps = noise.randn(mean.dims(), mean.device())?;
    scaling.apply(&(&mean + (&std * eps)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn apply_then_invert_is_identity_and_matches_formula() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[-1.5f32, 0.0, 0.1159, 2.0]], &dev)?;
        for s in [LatentScaling::SD, LatentScaling::FLUX] {
            let y = s.apply(&z)?;
            let want: Vec<f32> = [-1.5f32, 0.0, 0.1159, 2.0]
                .iter()
                .map(|v| ((f64::from(*v) - s.shift) * s.scale) as f32)
                .collect();
            let got = y.flatten_all()?.to_vec1::<f32>()?;
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "{g} vs {w}");
            }
            let back = s.invert(&y)?.flatten_all()?.to_vec1::<f32>()?;
            for (b, o) in back.iter().zip([-1.5f32, 0.0, 0.1159, 2.0]) {
                assert!((b - o).abs() < 1e-5, "{b} vs {o}");
            }
        }
        // Flux's shift maps the shift value itself to exactly zero.
        let zero = LatentScaling::FLUX.apply(&Tensor::new(&[0.1159f32], &dev)?)?;
        assert!(zero.to_vec1::<f32>()?[0].abs() < 1e-7);
        Ok(())
    }

    #[test]
    fn samples_have_the_posterior_moments() -> Result<()> {
        let dev = Device::Cpu;
        let n = 200_000;
        let mean = Tensor::full(0.7f32, n, &dev)?;
        let std = Tensor::full(0.3f32, n, &dev)?;
        let unit = LatentScaling {
            shift: 0.0,
            scale: 1.0,
        };
        let z = sample_latents(&mean, &std, unit)?;
        let m = z.mean_all()?.to_scalar::<f32>()?;
        let var = z
            .affine(1.0, -f64::from(m))?
            .sqr()?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!((m - 0.7).abs() < 0.005, "mean {m}");
        assert!((var.sqrt() - 0.3).abs() < 0.005, "std {}", var.sqrt());
        // zero std gives back the mean exactly
        let z0 = sample_latents(&mean, &mean.zeros_like()?, unit)?;
        assert_eq!(z0.to_dtype(DType::F32)?.max_all()?.to_scalar::<f32>()?, 0.7);
        Ok(())
    }
}
