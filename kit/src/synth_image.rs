//! Seeded synthetic images that look like photographs to an image codec.
//!
//! A JPEG encoder's cost and output size depend on what it is fed: a flat colour
//! compresses to almost nothing, white noise to something far larger than any photo.
//! Benchmarks and synthetic shards need images with the statistics of a camera
//! picture instead: smooth illumination gradients, soft-edged objects, texture at
//! several scales and a little sensor noise. [`photo_rgb`] draws such an image from a
//! seed; [`photo_jpeg`] encodes it the way cameras and web pipelines do (libjpeg-turbo,
//! 4:2:0 chroma subsampling). At 2250x1500 and quality 90 the JPEG is about 1.2 MB,
//! close to an SA-1B image.
//!
//! Everything is a pure function of `(width, height, seed)`: the noise comes from an
//! integer hash, not from a random number generator whose stream could change with a
//! dependency upgrade, so fixtures are identical on every machine and version.
//!
//! ```
//! let rgb = tensorbake_kit::synth_image::photo_rgb(64, 48, 7);
//! assert_eq!(rgb.len(), 64 * 48 * 3);
//! assert_eq!(rgb, tensorbake_kit::synth_image::photo_rgb(64, 48, 7));
//! ```

use thiserror::Error;

use crate::rng::SplitMix64;

/// Failure to encode a synthetic image.
#[derive(Debug, Error)]
pub enum SynthImageError {
    /// libjpeg-turbo refused the image or the parameters.
    #[error("encoding a {width}x{height} synthetic JPEG at quality {quality}: {message}")]
    Jpeg {
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// JPEG quality (1..=100).
        quality: u8,
        /// libjpeg-turbo's message.
        message: String,
    },
}

/// Hash of a lattice point to a value in [-1, 1).
fn lattice(seed: u64, x: i64, y: i64) -> f32 {
    let h = SplitMix64::mix(
        seed ^ SplitMix64::mix((x as u64).wrapping_mul(0x1656_67B1) ^ (y as u64).rotate_left(32)),
    );
    ((h >> 40) as f32 / (1u64 << 23) as f32) - 1.0
}

/// Uniform value in [0, 1) drawn from `seed` and a stream index.
fn unit(seed: u64, i: u64) -> f32 {
    (SplitMix64::mix(seed ^ SplitMix64::mix(i)) >> 40) as f32 / (1u64 << 24) as f32
}

fn smooth(t: f32) -> f32 {
    t * t * (3.0 - 2.0 * t)
}

/// Value noise with smoothstep interpolation, lattice period `period` pixels.
fn value_noise(seed: u64, x: f32, y: f32, period: f32) -> f32 {
    let fx = x / period;
    let fy = y / period;
    let x0 = fx.floor();
    let y0 = fy.floor();
    let tx = smooth(fx - x0);
    let ty = smooth(fy - y0);
    let (xi, yi) = (x0 as i64, y0 as i64);
    let a = lattice(seed, xi, yi);
    let b = lattice(seed, xi + 1, yi);
    let c = lattice(seed, xi, yi + 1);
    let d = lattice(seed, xi + 1, yi + 1);
    let top = a + (b - a) * tx;
    let bottom = c + (d - c) * tx;
    top + (bottom - top) * ty
}

/// One soft-edged ellipse ("object") with its own colour and texture strength.
struct Blob {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    cos: f32,
    sin: f32,
    edge: f32,
    colour: [f32; 3],
}

/// The RGB pixels (row-major, HWC, 8 bits) of a photo-like image.
///
/// Deterministic in `(width, height, seed)`. Content scales with the image, so a
/// small image is a faithful thumbnail of a large one with the same seed (useful for
/// tests that want the same picture at several sizes).
pub fn photo_rgb(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let scale = width.min(height).max(1) as f32 / 1500.0;
    let mut stream = 0u64;
    let mut next = || {
        stream += 1;
        unit(seed, stream)
    };
    let colour = |next: &mut dyn FnMut() -> f32| -> [f32; 3] {
        [
            30.0 + 200.0 * next(),
            30.0 + 200.0 * next(),
            30.0 + 200.0 * next(),
        ]
    };
    // Illumination: a linear gradient between two colours along a random direction.
    let c0 = colour(&mut next);
    let c1 = colour(&mut next);
    let angle = next() * std::f32::consts::TAU;
    let (gx, gy) = (angle.cos(), angle.sin());
    let diag = ((w * w + h * h) as f32).sqrt().max(1.0);
    let blobs: Vec<Blob> = (0..7)
        .map(|_| {
            let rot = next() * std::f32::consts::PI;
            Blob {
                cx: next() * w as f32,
                cy: next() * h as f32,
                rx: (0.08 + 0.25 * next()) * diag,
                ry: (0.05 + 0.2 * next()) * diag,
                cos: rot.cos(),
                sin: rot.sin(),
                edge: 0.02 + 0.2 * next(),
                colour: colour(&mut next),
            }
        })
        .collect();
    let noise_seed = SplitMix64::mix(seed ^ 0xA5A5_5A5A_0F0F_F0F0);
    // Texture octaves: (period in pixels at 1500 px, luminance amplitude, chroma amplitude).
    const OCTAVES: [(f32, f32, f32); 5] = [
        (96.0, 22.0, 8.0),
        (32.0, 14.0, 4.0),
        (11.0, 9.0, 2.0),
        (4.0, 10.0, 2.0),
        (1.7, 16.0, 2.0),
    ];
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        let row = &mut out[y * w * 3..(y + 1) * w * 3];
        for x in 0..w {
            let (xf, yf) = (x as f32, y as f32);
            let t = ((xf * gx + yf * gy) / diag + 1.0) * 0.5;
            let mut px = [
                c0[0] + (c1[0] - c0[0]) * t,
                c0[1] + (c1[1] - c0[1]) * t,
                c0[2] + (c1[2] - c0[2]) * t,
            ];
            for b in &blobs {
                let (dx, dy) = (xf - b.cx, yf - b.cy);
                let u = (dx * b.cos + dy * b.sin) / b.rx;
                let v = (-dx * b.sin + dy * b.cos) / b.ry;
                let r = (u * u + v * v).sqrt();
                // 1 inside, 0 outside, a soft ramp of relative width `edge` between.
                let inside = ((1.0 - r) / b.edge + 0.5).clamp(0.0, 1.0);
                if inside > 0.0 {
                    for (p, c) in px.iter_mut().zip(b.colour) {
                        *p += (c - *p) * inside;
                    }
                }
            }
            let (sx, sy) = (xf / scale, yf / scale);
            let mut lum = 0.0;
            let mut chroma = [0.0f32; 2];
            for (i, &(period, amp, camp)) in OCTAVES.iter().enumerate() {
                let s = noise_seed.wrapping_add(i as u64 * 3);
                lum += amp * value_noise(s, sx, sy, period);
                chroma[0] += camp * value_noise(s + 1, sx, sy, period);
                chroma[1] += camp * value_noise(s + 2, sx, sy, period);
            }
            // Sensor noise: independent per pixel, mostly luminance.
            let grain = 10.0 * lattice(noise_seed ^ 0x5EED, x as i64, y as i64);
            let lum = lum + grain;
            let deltas = [
                lum + chroma[0],
                lum - 0.5 * chroma[0] - 0.5 * chroma[1],
                lum + chroma[1],
            ];
            for c in 0..3 {
                row[x * 3 + c] = (px[c] + deltas[c]).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// A photo-like baseline JPEG: [`photo_rgb`] encoded by libjpeg-turbo with 4:2:0
/// chroma subsampling at `quality` (1..=100).
pub fn photo_jpeg(
    width: u32,
    height: u32,
    seed: u64,
    quality: u8,
) -> Result<Vec<u8>, SynthImageError> {
    let rgb = photo_rgb(width, height, seed);
    encode_jpeg(&rgb, width, height, quality)
}

/// Encodes RGB pixels (HWC, 8 bits) as a baseline 4:2:0 JPEG with libjpeg-turbo.
pub fn encode_jpeg(
    rgb: &[u8],
    width: u32,
    height: u32,
    quality: u8,
) -> Result<Vec<u8>, SynthImageError> {
    let err = |message: String| SynthImageError::Jpeg {
        width,
        height,
        quality,
        message,
    };
    let image = turbojpeg::Image {
        pixels: rgb,
        width: width as usize,
        pitch: width as usize * 3,
        height: height as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    let mut compressor = turbojpeg::Compressor::new().map_err(|e| err(e.to_string()))?;
    compressor
        .set_quality(i32::from(quality))
        .map_err(|e| err(e.to_string()))?;
    compressor
        .set_subsamp(turbojpeg::Subsamp::Sub2x2)
        .map_err(|e| err(e.to_string()))?;
    compressor
        .compress_to_vec(image)
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = photo_rgb(40, 30, 1);
        assert_eq!(a, photo_rgb(40, 30, 1));
        assert_ne!(a, photo_rgb(40, 30, 2));
    }

    #[test]
    fn has_smooth_structure_and_texture() {
        let (w, h) = (120usize, 90usize);
        let rgb = photo_rgb(w as u32, h as u32, 3);
        // Neighbouring pixels are close (smooth), but not identical (texture).
        let mut diff_sum = 0u64;
        let mut equal = 0usize;
        let mut n = 0u64;
        for y in 0..h {
            for x in 0..w - 1 {
                let a = i32::from(rgb[(y * w + x) * 3 + 1]);
                let b = i32::from(rgb[(y * w + x + 1) * 3 + 1]);
                diff_sum += a.abs_diff(b) as u64;
                equal += usize::from(a == b);
                n += 1;
            }
        }
        let mean = diff_sum as f64 / n as f64;
        assert!(mean > 1.0 && mean < 20.0, "mean neighbour diff {mean}");
        assert!(equal < (n as usize) / 2, "{equal} of {n} neighbours equal");
        // Not a flat image: the range of values is wide.
        let (lo, hi) = rgb
            .iter()
            .fold((255u8, 0u8), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(hi - lo > 60, "range {lo}..{hi}");
    }

    #[test]
    fn jpeg_is_a_420_baseline_jpeg_of_the_right_size() {
        let jpeg = photo_jpeg(64, 48, 5, 90).unwrap();
        assert_eq!(&jpeg[..3], &[0xFF, 0xD8, 0xFF]);
        let header = turbojpeg::read_header(&jpeg).unwrap();
        assert_eq!((header.width, header.height), (64, 48));
        assert_eq!(header.subsamp, turbojpeg::Subsamp::Sub2x2);
        assert!(!header.is_progressive);
    }
}
