//! The JPEG pipelines that were measured before choosing libjpeg-turbo with
//! 1/2^k DCT scaling: kept so that `tensorbake bench decode --candidates` can
//! reproduce the comparison in docs/ingest.md on any machine. Not for production
//! use: [`super::preprocess`] is the pipeline.
//!
//! Every candidate does the same job as `preprocess` on an 8-bit RGB JPEG without
//! EXIF orientation: decode, resize the shortest side to `resolution`, crop the
//! centre square, using the same resizer (fast_image_resize, bicubic), so the
//! differences are the decoders'.

use std::fmt;
use std::str::FromStr;

use turbojpeg::ScalingFactor;

use super::{Decoded, ImageError, ImageFormat, PreprocessConfig, Resample, jpeg, resize};

/// A decode + resize + crop pipeline for JPEG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidate {
    /// [`super::preprocess`] with the default config (libjpeg-turbo at the
    /// 1/2^k scale that keeps the shortest side >= resolution, as Pillow's `draft`).
    Tensorbake,
    /// libjpeg-turbo, full-size decode.
    TurboFull,
    /// libjpeg-turbo at the smallest M/8 scale that keeps the shortest side >=
    /// resolution (3/8 for SA-1B at 512).
    TurboEighths,
    /// zune-jpeg (the `image` crate's JPEG decoder), full-size decode.
    Zune,
    /// jpeg-decoder with its power-of-two IDCT scaling.
    JpegDecoder,
}

impl Candidate {
    /// All candidates, in table order.
    pub const ALL: [Candidate; 5] = [
        Candidate::Tensorbake,
        Candidate::TurboFull,
        Candidate::TurboEighths,
        Candidate::Zune,
        Candidate::JpegDecoder,
    ];

    /// Short name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Candidate::Tensorbake => "tensorbake",
            Candidate::TurboFull => "turbo-full",
            Candidate::TurboEighths => "turbo-eighths",
            Candidate::Zune => "zune-jpeg",
            Candidate::JpegDecoder => "jpeg-decoder",
        }
    }

    /// One line saying what the candidate does.
    pub fn description(self) -> &'static str {
        match self {
            Candidate::Tensorbake => {
                "libjpeg-turbo, DCT scale 1/2^k (>= target) + fast_image_resize"
            }
            Candidate::TurboFull => "libjpeg-turbo, full-size decode + fast_image_resize",
            Candidate::TurboEighths => {
                "libjpeg-turbo, DCT scale M/8 (>= target) + fast_image_resize"
            }
            Candidate::Zune => "zune-jpeg (image crate), full-size decode + fast_image_resize",
            Candidate::JpegDecoder => "jpeg-decoder, DCT scale 1/2^k + fast_image_resize",
        }
    }

    /// Runs the pipeline; the output is `resolution x resolution` RGB.
    pub fn run(self, bytes: &[u8], resolution: u32) -> Result<Vec<u8>, ImageError> {
        let cfg = PreprocessConfig {
            resolution,
            ..PreprocessConfig::default()
        };
        let decoded = match self {
            Candidate::Tensorbake => return super::preprocess(bytes, &cfg).map(|p| p.rgb),
            Candidate::TurboFull => {
                let header = jpeg::read_header(bytes)?;
                jpeg::decode_at(bytes, &header, ScalingFactor::ONE)?
            }
            Candidate::TurboEighths => {
                let header = jpeg::read_header(bytes)?;
                let short = header.width.min(header.height);
                jpeg::decode_at(bytes, &header, jpeg::eighths_scale(short, resolution))?
            }
            Candidate::Zune => {
                let image = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
                    .map_err(|e| corrupt(e.to_string()))?
                    .into_rgb8();
                let (width, height) = image.dimensions();
                Decoded {
                    rgb: image.into_raw(),
                    width,
                    height,
                    full_width: width,
                    full_height: height,
                    scale: 1.0,
                }
            }
            Candidate::JpegDecoder => {
                let mut decoder = jpeg_decoder::Decoder::new(bytes);
                decoder.read_info().map_err(|e| corrupt(e.to_string()))?;
                let info = decoder.info().ok_or_else(|| corrupt("no header".into()))?;
                let (fw, fh) = (u32::from(info.width), u32::from(info.height));
                let short = f64::from(fw.min(fh));
                let want = |d: u32| (f64::from(d) * f64::from(resolution) / short).ceil() as u16;
                let (width, height) = decoder
                    .scale(want(fw), want(fh))
                    .map_err(|e| corrupt(e.to_string()))?;
                let rgb = decoder.decode().map_err(|e| corrupt(e.to_string()))?;
                if rgb.len() != usize::from(width) * usize::from(height) * 3 {
                    return Err(corrupt("not a 3-channel JPEG".into()));
                }
                Decoded {
                    rgb,
                    width: u32::from(width),
                    height: u32::from(height),
                    full_width: fw,
                    full_height: fh,
                    scale: f64::from(width) / f64::from(fw),
                }
            }
        };
        resize::center_crop(&decoded, resolution, Resample::Bicubic).map_err(|detail| {
            ImageError::DecoderFailure {
                format: ImageFormat::Jpeg,
                detail,
            }
        })
    }
}

fn corrupt(detail: String) -> ImageError {
    ImageError::Corrupt {
        format: ImageFormat::Jpeg,
        detail,
    }
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Candidate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Candidate::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Candidate::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown candidate {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All candidates see the same picture: their outputs are close to each other.
    #[test]
    fn candidates_agree() {
        let jpeg = tensorbake_kit::synth_image::photo_jpeg(300, 200, 11, 92).unwrap();
        let reference = Candidate::TurboFull.run(&jpeg, 64).unwrap();
        for c in Candidate::ALL {
            let out = c.run(&jpeg, 64).unwrap();
            assert_eq!(out.len(), 64 * 64 * 3, "{c}");
            let mad = out
                .iter()
                .zip(&reference)
                .map(|(&a, &b)| f64::from(a.abs_diff(b)))
                .sum::<f64>()
                / out.len() as f64;
            assert!(mad < 3.0, "{c}: mean abs diff {mad} to the full decode");
        }
        assert_eq!("zune-jpeg".parse::<Candidate>().unwrap(), Candidate::Zune);
        assert!("nope".parse::<Candidate>().is_err());
    }
}
