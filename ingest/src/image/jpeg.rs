//! JPEG through libjpeg-turbo (TurboJPEG 3 API), with DCT-domain downscaling.

use turbojpeg::{Colorspace, Decompressor, PixelFormat, ScalingFactor};

use super::{Decoded, ImageError, ImageFormat, Orientation, PreprocessConfig, exif};

const FORMAT: ImageFormat = ImageFormat::Jpeg;

/// A fresh TurboJPEG handle for each image. libjpeg keeps Huffman and
/// quantisation tables in the handle across images (for abbreviated datastreams),
/// so a reused handle would decode a JPEG that lacks its own tables (Motion-JPEG
/// frames rely on the standard ones) with whatever the thread decoded before: the
/// output would depend on history. Creating a handle costs microseconds against the
/// milliseconds of a decode.
fn with_decompressor<T>(
    f: impl FnOnce(&mut Decompressor) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let mut d = Decompressor::new().map_err(|e| ImageError::DecoderFailure {
        format: FORMAT,
        detail: format!("cannot create a TurboJPEG decompressor: {e}"),
    })?;
    f(&mut d)
}

/// What the header says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JpegHeader {
    /// Stored width.
    pub width: u32,
    /// Stored height.
    pub height: u32,
    /// EXIF orientation from APP1.
    pub orientation: Orientation,
    colorspace: Colorspace,
    lossless: bool,
}

/// Reads the markers up to the first scan: size, colour space, EXIF orientation.
pub(crate) fn read_header(bytes: &[u8]) -> Result<JpegHeader, ImageError> {
    let header = with_decompressor(|d| d.read_header(bytes).map_err(|e| classify(e, bytes)))?;
    let dim = |v: usize| {
        u32::try_from(v).map_err(|_| ImageError::Corrupt {
            format: FORMAT,
            detail: format!("dimension {v} out of range"),
        })
    };
    Ok(JpegHeader {
        width: dim(header.width)?,
        height: dim(header.height)?,
        orientation: exif_segment(bytes)
            .map(exif::orientation_from_tiff)
            .unwrap_or_default(),
        colorspace: header.colorspace,
        lossless: header.is_lossless,
    })
}

/// The TIFF payload of the first APP1 `Exif` segment before the first scan.
fn exif_segment(bytes: &[u8]) -> Option<&[u8]> {
    let mut pos = 2; // after SOI
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        while bytes.get(pos) == Some(&0xFF) && bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        if bytes.get(pos) != Some(&0xFF) {
            return None;
        }
        let marker = *bytes.get(pos + 1)?;
        match marker {
            // Standalone markers: TEM, RST0-7.
            0x01 | 0xD0..=0xD7 => {
                pos += 2;
                continue;
            }
            // SOS or EOI: no more metadata before the image data.
            0xDA | 0xD9 => return None,
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([
            *bytes.get(pos + 2)?,
            *bytes.get(pos + 3)?,
        ]));
        if len < 2 {
            return None;
        }
        let body = bytes.get(pos + 4..pos + 2 + len)?;
        if marker == 0xE1 && body.starts_with(b"Exif\0\0") {
            return Some(&body[6..]);
        }
        pos += 2 + len;
    }
}

/// Whether the data holds a complete image: an EOI marker after the last SOS
/// marker (trailing junk after EOI is allowed, and common). EOI and SOS cannot
/// occur inside entropy-coded data, where 0xFF is always followed by 0x00 or RSTn.
fn ends_with_eoi(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    match (last(0xD9), last(0xDA)) {
        (Some(eoi), Some(sos)) => eoi > sos,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// libjpeg warnings after which the pixels are still the image: decoders in
/// browsers and Pillow show these files, and so do we.
const BENIGN_WARNINGS: &[&str] = &[
    "extraneous bytes before marker",
    "unknown JFIF revision",
    "Unknown Adobe color transform",
    "Inconsistent progression sequence",
    "Invalid SOS parameters for sequential JPEG",
    "Application transferred too many scanlines",
];

fn is_benign_warning(message: &str) -> bool {
    BENIGN_WARNINGS.iter().any(|w| message.contains(w))
}

/// Turns a libjpeg message into a counted outcome. TurboJPEG reports errors and
/// warnings alike through its message string. A failure on data that does not
/// end its image (no EOI after the last scan) is a truncation, whatever libjpeg
/// tripped over first: a cut inside the headers reads as a malformed header.
fn classify(err: turbojpeg::Error, bytes: &[u8]) -> ImageError {
    let detail = match err {
        turbojpeg::Error::TurboJpegError(message) => message,
        // TurboJPEG reports a frame size of -1 for a stream without a frame header.
        turbojpeg::Error::IntegerOverflow(_) => "no frame header (SOF) before the data ends".into(),
        other => other.to_string(),
    };
    if detail.contains("Unsupported JPEG data precision") {
        ImageError::UnsupportedFormat {
            format: format!("JPEG ({detail})"),
        }
    } else if detail.contains("Premature end of JPEG file") || !ends_with_eoi(bytes) {
        ImageError::Truncated {
            format: FORMAT,
            detail,
        }
    } else {
        ImageError::Corrupt {
            format: FORMAT,
            detail,
        }
    }
}

/// The DCT scale used to decode a `short`-pixel shortest side for a `resolution`
/// target: the smallest of 1/8, 1/4, 1/2 and 1 whose output still covers the
/// target, so the resize always downsamples (Pillow's `draft` rule).
///
/// libjpeg-turbo also offers every M/8 (3/8 would take a 1500 px side to 563
/// instead of 750 for a 512 target), but only the 1/2^k scales have SIMD inverse
/// DCTs: measured on SA-1B-sized photos, 3/8 decodes slower than 1/2 (entropy
/// decoding dominates either way), and the larger 1/2 output leaves more of the
/// downscale to the proper filter. See docs/ingest.md, "Image decoding".
pub(crate) fn dct_scale(short: u32, resolution: u32) -> ScalingFactor {
    pow2_scale(short, resolution)
}

/// Smallest 1/2^k (k <= 3) keeping `short` >= `resolution`.
pub(crate) fn pow2_scale(short: u32, resolution: u32) -> ScalingFactor {
    let mut denom = 1;
    while denom < 8 && u64::from(short) >= 2 * denom as u64 * u64::from(resolution) {
        denom *= 2;
    }
    ScalingFactor::new(1, denom)
}

/// Smallest M/8 keeping `short` >= `resolution` (measured, not used; see
/// [`dct_scale`]).
pub(crate) fn eighths_scale(short: u32, resolution: u32) -> ScalingFactor {
    let m = (1..=8usize)
        .find(|&m| short as usize * m >= 8 * resolution as usize)
        .unwrap_or(8);
    let g = gcd(m, 8);
    ScalingFactor::new(m / g, 8 / g)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Decodes to RGB at the DCT scale the config allows.
pub(crate) fn decode(
    bytes: &[u8],
    header: &JpegHeader,
    cfg: &PreprocessConfig,
) -> Result<Decoded, ImageError> {
    let factor = if cfg.jpeg_dct_scaling && !header.lossless {
        dct_scale(header.width.min(header.height), cfg.resolution)
    } else {
        ScalingFactor::ONE
    };
    decode_at(bytes, header, factor)
}

/// Decodes to RGB at a given DCT scale.
pub(crate) fn decode_at(
    bytes: &[u8],
    header: &JpegHeader,
    factor: ScalingFactor,
) -> Result<Decoded, ImageError> {
    let width = factor.scale(header.width as usize);
    let height = factor.scale(header.height as usize);
    let cmyk = matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let format = if cmyk {
        PixelFormat::CMYK
    } else {
        PixelFormat::RGB
    };
    let channels = format.size();
    let mut pixels = vec![0u8; width * height * channels];
    with_decompressor(|d| {
        d.set_scaling_factor(factor)
            .map_err(|e| ImageError::DecoderFailure {
                format: FORMAT,
                detail: format!("scaling factor {}/{}: {e}", factor.num(), factor.denom()),
            })?;
        let image = turbojpeg::Image {
            pixels: pixels.as_mut_slice(),
            width,
            pitch: width * channels,
            height,
            format,
        };
        match d.decompress(bytes, image) {
            Ok(()) => Ok(()),
            Err(turbojpeg::Error::TurboJpegError(message)) if is_benign_warning(&message) => {
                tracing::debug!(%message, "JPEG decoded with a harmless libjpeg warning");
                Ok(())
            }
            Err(e) => Err(classify(e, bytes)),
        }
    })?;
    let rgb = if cmyk {
        inverted_cmyk_to_rgb(&pixels)
    } else {
        pixels
    };
    Ok(Decoded {
        rgb,
        width: width as u32,
        height: height as u32,
        full_width: header.width,
        full_height: header.height,
        scale: factor.num() as f64 / factor.denom() as f64,
    })
}

/// Adobe-style (inverted) CMYK to RGB, as Pillow converts CMYK JPEGs: Photoshop,
/// the source of nearly all CMYK JPEGs, stores the channels inverted, and Pillow
/// reads every CMYK JPEG that way. No colour management: like Pillow without
/// ImageCms, `R = (255 - C) (255 - K) / 255` on the un-inverted values.
fn inverted_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        // Stored inverted: p = 255 - C, so (255 - C) = p and (255 - K) = p[3].
        let k = u32::from(p[3]);
        for &c in &p[..3] {
            rgb.push(((u32::from(c) * k + 127) / 255) as u8);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dct_scale_keeps_the_target_covered() {
        // SA-1B: 1500 px shortest side for a 512 target decodes at 1/2 = 750 px.
        assert_eq!(dct_scale(1500, 512), ScalingFactor::ONE_HALF);
        assert_eq!(dct_scale(2048, 512), ScalingFactor::ONE_QUARTER);
        assert_eq!(dct_scale(2047, 512), ScalingFactor::ONE_HALF);
        assert_eq!(dct_scale(1024, 512), ScalingFactor::ONE_HALF);
        assert_eq!(dct_scale(1023, 512), ScalingFactor::ONE);
        assert_eq!(dct_scale(4096, 512), ScalingFactor::ONE_EIGHTH);
        assert_eq!(dct_scale(100_000, 512), ScalingFactor::ONE_EIGHTH);
        assert_eq!(dct_scale(100, 512), ScalingFactor::ONE);
        // The M/8 rule the benchmark compares against.
        assert_eq!(eighths_scale(1500, 512), ScalingFactor::new(3, 8));
        assert_eq!(eighths_scale(600, 512), ScalingFactor::new(7, 8));
        assert_eq!(eighths_scale(520, 512), ScalingFactor::ONE);
        for short in [513u32, 700, 1000, 1499, 1500, 3000, 8000] {
            for f in [dct_scale(short, 512), eighths_scale(short, 512)] {
                assert!(short as usize * f.num() >= 512 * f.denom(), "{short}");
            }
        }
    }

    #[test]
    fn finds_exif_behind_other_segments() {
        let tiff = exif::tiff_with_orientation(8);
        let mut jpeg = vec![0xFF, 0xD8];
        // APP0 JFIF, then fill bytes, then APP1 Exif.
        jpeg.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x07, b'J', b'F', b'I', b'F', 0]);
        jpeg.extend_from_slice(&[0xFF, 0xFF]);
        jpeg.extend_from_slice(&[0xFF, 0xE1]);
        jpeg.extend_from_slice(&((tiff.len() + 8) as u16).to_be_bytes());
        jpeg.extend_from_slice(b"Exif\0\0");
        jpeg.extend_from_slice(&tiff);
        jpeg.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x02]);
        assert_eq!(exif_segment(&jpeg), Some(tiff.as_slice()));
        // A segment length running past the end: no EXIF, no panic.
        assert_eq!(exif_segment(&jpeg[..20]), None);
    }

    #[test]
    fn cmyk_conversion_matches_pillow_formula() {
        // Inverted storage: white paper (C=M=Y=K=0) is stored as 255s.
        assert_eq!(inverted_cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        // Full black ink: stored K byte 0.
        assert_eq!(inverted_cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        // Pure cyan: stored C byte 0 -> no red.
        assert_eq!(inverted_cmyk_to_rgb(&[0, 255, 255, 255]), [0, 255, 255]);
        // Half cyan, half black: (255-128)(255-128)/255.
        assert_eq!(inverted_cmyk_to_rgb(&[127, 255, 255, 127]), [63, 127, 127]);
    }
}
