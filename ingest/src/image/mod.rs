//! Image preprocessing: encoded bytes in, a `resolution x resolution` RGB training
//! image out.
//!
//! [`preprocess`] sniffs the format from the leading bytes (never from a file
//! name), reads the header, rejects decompression bombs and too-small images before
//! decoding, decodes, converts to RGB, resizes the shortest side to `resolution` and
//! crops the centre square, then applies the EXIF orientation. The output is what
//! `Image.open(f)`, `ImageOps.exif_transpose`, `.convert("RGB")` and
//! `ImageOps.fit(im, (r, r), BICUBIC)` give in Pillow, to within rounding (the
//! tests compare against Pillow's output on the same files).
//!
//! - JPEG: libjpeg-turbo (built from vendored source). When the target is at
//!   most half the source, the JPEG is decoded at a reduced DCT scale, the
//!   smallest of 1/2, 1/4, 1/8 that keeps the shortest side >= `resolution` (a
//!   1500x2250 SA-1B photo decodes at 1/2, 750x1125, for a 512 target), as
//!   Pillow's `Image.draft` does. (M/8 scales were measured and are slower: see
//!   docs/ingest.md.) CMYK and
//!   YCCK JPEGs are converted to RGB (inverted CMYK when an Adobe marker says so,
//!   as Photoshop writes them); grayscale is replicated to three channels.
//! - PNG and WebP: the `image` crate. 16-bit samples are scaled to 8 bits; an alpha
//!   channel is composited onto white (transparent pixels become white, not the
//!   arbitrary colour stored under them); grayscale is replicated.
//! - Resize: `fast_image_resize` (SIMD convolution, Pillow's filters), reading only
//!   the centre crop box of the decoded image: resize and crop in one pass, with the
//!   box in sub-pixel coordinates like `ImageOps.fit`.
//! - EXIF orientation (JPEG APP1, PNG eXIf, WebP EXIF) is applied to the
//!   `resolution`-sized output: the centre square is the same region of the picture
//!   whichever way it is displayed, so rotating the small output instead of the large
//!   decoded image gives the same pixels for less work.
//!
//! Every failure is an [`ImageError`] with a stable [`ImageError::reason`]; none
//! panics, and everything here is pure and thread-safe (decoder and resizer state are
//! per thread), so a rayon pool can call [`preprocess`] on many images at once.
//!
//! ```
//! use tensorbake_ingest::image::{preprocess, PreprocessConfig, ImageFormat};
//! let (w, h) = (96, 64);
//! let jpeg = tensorbake_kit::synth_image::photo_jpeg(w, h, 1, 90).unwrap();
//! let cfg = PreprocessConfig { resolution: 32, ..PreprocessConfig::default() };
//! let out = preprocess(&jpeg, &cfg).unwrap();
//! assert_eq!(out.rgb.len(), 32 * 32 * 3);
//! assert_eq!((out.orig_width, out.orig_height, out.format), (96, 64, ImageFormat::Jpeg));
//! ```

pub mod bench;
pub mod candidates;
mod error;
mod exif;
mod jpeg;
mod orientation;
mod other;
mod resize;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use error::ImageError;
pub use orientation::Orientation;

/// Pillow's `Image.MAX_IMAGE_PIXELS * 2`: the size at which Pillow raises
/// `DecompressionBombError`. 179 megapixels is larger than any photo in the
/// datasets we target (SA-1B is ~3.4 MP, PD12M is capped at a few tens of MP) and
/// bounds the decoder's memory to ~540 MB of RGB per image.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// The `[preprocess]` table of a manifest: how encoded images become training
/// images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    /// Side of the square output, in pixels.
    pub resolution: u32,
    /// Skip images whose shortest side (as displayed) is below this; 0 keeps all,
    /// upscaling small images.
    pub min_size: u32,
    /// Decompression-bomb limit: images whose header claims more pixels are
    /// rejected before decoding.
    pub max_pixels: u64,
    /// Resampling filter.
    pub resample: Resample,
    /// Which square of the resized image is kept.
    pub crop: Crop,
    /// Decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) when the result still
    /// covers `resolution`. Several times faster on large photos, at a small cost
    /// in sharpness (the DCT-domain downscale is a box-like filter instead of the
    /// chosen one); Pillow's `draft` does the same.
    pub jpeg_dct_scaling: bool,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            resolution: 512,
            min_size: 0,
            max_pixels: DEFAULT_MAX_PIXELS,
            resample: Resample::Bicubic,
            crop: Crop::Center,
            jpeg_dct_scaling: true,
        }
    }
}

/// A [`PreprocessConfig`] that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid [preprocess] config: {0}")]
pub struct InvalidPreprocessConfig(String);

impl PreprocessConfig {
    /// Largest accepted `resolution`.
    pub const MAX_RESOLUTION: u32 = 16_384;

    /// Checks the values; call once when the manifest is loaded.
    pub fn validate(&self) -> Result<(), InvalidPreprocessConfig> {
        if self.resolution == 0 || self.resolution > Self::MAX_RESOLUTION {
            return Err(InvalidPreprocessConfig(format!(
                "resolution = {} must be in 1..={}",
                self.resolution,
                Self::MAX_RESOLUTION
            )));
        }
        if self.max_pixels < u64::from(self.resolution).pow(2) {
            return Err(InvalidPreprocessConfig(format!(
                "max_pixels = {} is below resolution^2 = {}: every image would be rejected",
                self.max_pixels,
                u64::from(self.resolution).pow(2)
            )));
        }
        Ok(())
    }
}

/// Resampling filter of the resize (Pillow's names and kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    /// Cubic convolution with a = -0.5 (Catmull-Rom), Pillow's `BICUBIC`.
    #[default]
    Bicubic,
    /// Triangle filter, Pillow's `BILINEAR` (antialiased when downscaling).
    Bilinear,
    /// Lanczos with 3 lobes, Pillow's `LANCZOS`.
    Lanczos,
}

/// Which square of the resized image is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Crop {
    /// The centre square (torchvision `CenterCrop`, Pillow `ImageOps.fit`).
    #[default]
    Center,
}

/// Encoded image formats that tensorbake decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// JPEG (baseline, progressive, lossless, arithmetic; 8-bit).
    Jpeg,
    /// PNG (any bit depth, palette, alpha).
    Png,
    /// WebP (lossy, lossless, alpha; the first frame of an animation).
    WebP,
}

impl ImageFormat {
    /// Lower-case name, e.g. for run reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::WebP => "webp",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            ImageFormat::WebP => "WebP",
        })
    }
}

/// What [`probe`] reads from a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Container format.
    pub format: ImageFormat,
    /// Width as displayed (after EXIF orientation).
    pub width: u32,
    /// Height as displayed (after EXIF orientation).
    pub height: u32,
    /// EXIF orientation (identity when absent).
    pub orientation: Orientation,
}

/// A training image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preprocessed {
    /// `resolution x resolution x 3` bytes, row-major RGB (HWC).
    pub rgb: Vec<u8>,
    /// Side of the square, `resolution` of the config.
    pub size: u32,
    /// Width of the source image as displayed (after EXIF orientation).
    pub orig_width: u32,
    /// Height of the source image as displayed (after EXIF orientation).
    pub orig_height: u32,
    /// Container format of the source.
    pub format: ImageFormat,
}

/// Identifies the format from the leading bytes; other image formats and garbage
/// are errors that say which.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(ImageFormat::Jpeg);
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(ImageFormat::Png);
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Ok(ImageFormat::WebP);
    }
    let other = |name: &str| {
        Err(ImageError::UnsupportedFormat {
            format: name.to_string(),
        })
    };
    let ftyp_brand = (bytes.len() >= 12 && &bytes[4..8] == b"ftyp").then(|| &bytes[8..12]);
    match bytes {
        [b'G', b'I', b'F', b'8', ..] => other("GIF"),
        [b'I', b'I', 0x2A, 0x00, ..] | [b'M', b'M', 0x00, 0x2A, ..] => other("TIFF"),
        [b'I', b'I', 0x2B, 0x00, ..] | [b'M', b'M', 0x00, 0x2B, ..] => other("BigTIFF"),
        [b'B', b'M', ..] if bytes.len() >= 26 => other("BMP"),
        [0x00, 0x00, 0x01, 0x00, ..] => other("ICO"),
        [0xFF, 0x0A, ..] | [0x00, 0x00, 0x00, 0x0C, b'J', b'X', b'L', b' ', ..] => other("JPEG XL"),
        [0x00, 0x00, 0x00, 0x0C, b'j', b'P', b' ', b' ', ..] | [0xFF, 0x4F, 0xFF, 0x51, ..] => {
            other("JPEG 2000")
        }
        [b'8', b'B', b'P', b'S', ..] => other("PSD"),
        [b'%', b'P', b'D', b'F', ..] => other("PDF"),
        [b'R', b'I', b'F', b'F', ..] => other("RIFF (not WebP)"),
        _ => match ftyp_brand {
            Some(b"avif" | b"avis") => other("AVIF"),
            Some(b"heic" | b"heix" | b"heim" | b"heis" | b"mif1" | b"msf1") => other("HEIF"),
            Some(_) => other("ISO media (video)"),
            None if looks_like_text(bytes) => {
                let head = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
                Err(ImageError::UnrecognizedFormat {
                    magic: format!("{head:?} (text, e.g. an HTML error page)"),
                })
            }
            None => Err(ImageError::UnrecognizedFormat {
                magic: bytes
                    .iter()
                    .take(12)
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            }),
        },
    }
}

fn looks_like_text(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(64)];
    head.iter()
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace())
}

/// Reads the header only: format, displayed size and orientation. Cheap (no pixel
/// decoding); use it to filter by size before paying for [`preprocess`].
pub fn probe(bytes: &[u8]) -> Result<ImageInfo, ImageError> {
    let format = sniff(bytes)?;
    let (width, height, orientation) = match format {
        ImageFormat::Jpeg => {
            let h = jpeg::read_header(bytes)?;
            (h.width, h.height, h.orientation)
        }
        ImageFormat::Png | ImageFormat::WebP => other::read_header(bytes, format)?,
    };
    let (width, height) = orientation.displayed(width, height);
    Ok(ImageInfo {
        format,
        width,
        height,
        orientation,
    })
}

/// Checks the stored size against the limits, before decoding.
fn check_size(
    format: ImageFormat,
    width: u32,
    height: u32,
    cfg: &PreprocessConfig,
) -> Result<(), ImageError> {
    if u64::from(width) * u64::from(height) > cfg.max_pixels {
        return Err(ImageError::DecompressionBomb {
            format,
            width,
            height,
            max_pixels: cfg.max_pixels,
        });
    }
    if width.min(height) < cfg.min_size {
        // Shortest side is the same in either orientation; report displayed size
        // only where it matters (the caller swaps for 90-degree orientations).
        return Err(ImageError::TooSmall {
            width,
            height,
            min_size: cfg.min_size,
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt {
            format,
            detail: format!("header claims an empty {width}x{height} image"),
        });
    }
    Ok(())
}

/// Decodes, converts to RGB, resizes the shortest side to `cfg.resolution`, crops
/// the centre square and applies the EXIF orientation. See the module docs.
pub fn preprocess(bytes: &[u8], cfg: &PreprocessConfig) -> Result<Preprocessed, ImageError> {
    let format = sniff(bytes)?;
    let res = cfg.resolution;
    let (decoded, orientation) = match format {
        ImageFormat::Jpeg => {
            let header = jpeg::read_header(bytes)?;
            check_size_displayed(format, header.width, header.height, header.orientation, cfg)?;
            let decoded = jpeg::decode(bytes, &header, cfg)?;
            (decoded, header.orientation)
        }
        ImageFormat::Png | ImageFormat::WebP => {
            let mut decoder = other::open(bytes, format, cfg)?;
            let (w, h, orientation) = other::header_of(&mut decoder, format)?;
            check_size_displayed(format, w, h, orientation, cfg)?;
            (other::decode(decoder, format, bytes)?, orientation)
        }
    };
    let square = resize::center_crop(&decoded, res, cfg.resample)
        .map_err(|detail| ImageError::DecoderFailure { format, detail })?;
    let rgb = orientation.apply_square(square, res as usize);
    let (orig_width, orig_height) = orientation.displayed(decoded.full_width, decoded.full_height);
    Ok(Preprocessed {
        rgb,
        size: res,
        orig_width,
        orig_height,
        format,
    })
}

fn check_size_displayed(
    format: ImageFormat,
    width: u32,
    height: u32,
    orientation: Orientation,
    cfg: &PreprocessConfig,
) -> Result<(), ImageError> {
    check_size(format, width, height, cfg).map_err(|err| match err {
        ImageError::TooSmall { min_size, .. } => {
            let (width, height) = orientation.displayed(width, height);
            ImageError::TooSmall {
                width,
                height,
                min_size,
            }
        }
        other => other,
    })
}

/// A decoded image in its stored orientation, possibly at a reduced DCT scale.
#[derive(Debug)]
pub(crate) struct Decoded {
    /// RGB, `width x height x 3`.
    pub rgb: Vec<u8>,
    /// Decoded width.
    pub width: u32,
    /// Decoded height.
    pub height: u32,
    /// Width of the full-size image (before DCT scaling).
    pub full_width: u32,
    /// Height of the full-size image (before DCT scaling).
    pub full_height: u32,
    /// Decoded pixels per full-size pixel (M/8 for DCT scaling, else 1).
    pub scale: f64,
}

#[cfg(test)]
mod tests;
