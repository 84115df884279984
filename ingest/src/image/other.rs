//! PNG and WebP through the `image` crate.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::{Decoded, ImageError, ImageFormat, Orientation, PreprocessConfig, exif};

fn image_format(format: ImageFormat) -> image::ImageFormat {
    match format {
        ImageFormat::Png => image::ImageFormat::Png,
        ImageFormat::WebP => image::ImageFormat::WebP,
        ImageFormat::Jpeg => image::ImageFormat::Jpeg,
    }
}

/// Maps an `image` crate error to a counted outcome.
fn classify(err: image::ImageError, format: ImageFormat, bytes: &[u8]) -> ImageError {
    use image::ImageError as E;
    let detail = err.to_string();
    let eof = |e: &std::io::Error| e.kind() == std::io::ErrorKind::UnexpectedEof;
    if format == ImageFormat::WebP && webp_is_cut(bytes) {
        // image-webp reports a cut bitstream as corrupt; the RIFF header knows better.
        return ImageError::Truncated {
            format,
            detail: format!(
                "{detail} ({} of {} bytes)",
                bytes.len(),
                webp_riff_len(bytes)
            ),
        };
    }
    match &err {
        E::IoError(e) if eof(e) => ImageError::Truncated { format, detail },
        // The decoders wrap the reader's EOF in their own error types.
        E::Decoding(_) if mentions_eof(&detail) => ImageError::Truncated { format, detail },
        E::Unsupported(_) => ImageError::UnsupportedFormat {
            format: format!("{format} ({detail})"),
        },
        E::Limits(_) => ImageError::DecoderFailure { format, detail },
        _ => ImageError::Corrupt { format, detail },
    }
}

/// Length of the file according to its RIFF header.
fn webp_riff_len(bytes: &[u8]) -> u64 {
    bytes.get(4..8).map_or(0, |b| {
        u64::from(u32::from_le_bytes(b.try_into().expect("4 bytes"))) + 8
    })
}

fn webp_is_cut(bytes: &[u8]) -> bool {
    (bytes.len() as u64) < webp_riff_len(bytes)
}

fn mentions_eof(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    d.contains("eof") || d.contains("end of file") || d.contains("unexpected end")
}

/// Width and height from a PNG's IHDR, read by hand so that the size is checked
/// before the `image` crate sees the file.
fn png_ihdr(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    let truncated = || ImageError::Truncated {
        format: ImageFormat::Png,
        detail: format!("{} bytes end inside the IHDR chunk", bytes.len()),
    };
    let ihdr = bytes.get(8..24).ok_or_else(truncated)?;
    if &ihdr[4..8] != b"IHDR" {
        return Err(ImageError::Corrupt {
            format: ImageFormat::Png,
            detail: "first chunk is not IHDR".into(),
        });
    }
    let w = u32::from_be_bytes(ihdr[8..12].try_into().expect("4 bytes"));
    let h = u32::from_be_bytes(ihdr[12..16].try_into().expect("4 bytes"));
    Ok((w, h))
}

/// Opens a decoder on a PNG or WebP after checking the PNG header size.
pub(crate) fn open<'a>(
    bytes: &'a [u8],
    format: ImageFormat,
    cfg: &PreprocessConfig,
) -> Result<impl ImageDecoder + 'a, ImageError> {
    if format == ImageFormat::Png {
        // Bomb check from the raw header: nothing decoded, nothing allocated.
        let (w, h) = png_ihdr(bytes)?;
        super::check_size(format, w, h, cfg).or_else(|err| match err {
            // min_size is checked after the orientation is known.
            ImageError::TooSmall { .. } => Ok(()),
            other => Err(other),
        })?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), image_format(format));
    let mut limits = Limits::no_limits();
    // Our own pixel limit is the policy; this only bounds the decoders' internal
    // buffers (16-bit RGBA plus slack) so that nothing can allocate unboundedly.
    limits.max_alloc = Some(cfg.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    reader
        .into_decoder()
        .map_err(|e| classify(e, format, bytes))
}

/// Stored size and EXIF orientation of an opened decoder.
pub(crate) fn header_of(
    decoder: &mut impl ImageDecoder,
    format: ImageFormat,
) -> Result<(u32, u32, Orientation), ImageError> {
    let (w, h) = decoder.dimensions();
    let orientation = match decoder.exif_metadata() {
        Ok(Some(exif)) => {
            let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(&exif);
            exif::orientation_from_tiff(tiff)
        }
        Ok(None) => Orientation::Identity,
        // Broken metadata does not cost a good image.
        Err(err) => {
            tracing::debug!(%format, %err, "ignoring unreadable EXIF metadata");
            Orientation::Identity
        }
    };
    Ok((w, h, orientation))
}

/// Reads the header of a PNG or WebP: stored size and orientation.
pub(crate) fn read_header(
    bytes: &[u8],
    format: ImageFormat,
) -> Result<(u32, u32, Orientation), ImageError> {
    let cfg = PreprocessConfig {
        max_pixels: u64::MAX,
        ..PreprocessConfig::default()
    };
    let mut decoder = open(bytes, format, &cfg)?;
    header_of(&mut decoder, format)
}

/// Decodes to 8-bit RGB: 16-bit samples scaled, grey replicated, alpha composited
/// onto white.
pub(crate) fn decode(
    decoder: impl ImageDecoder,
    format: ImageFormat,
    bytes: &[u8],
) -> Result<Decoded, ImageError> {
    let image = DynamicImage::from_decoder(decoder).map_err(|e| classify(e, format, bytes))?;
    let (width, height) = (image.width(), image.height());
    let rgb = if image.color().has_alpha() {
        over_white(&image.into_rgba8().into_raw())
    } else {
        image.into_rgb8().into_raw()
    };
    Ok(Decoded {
        rgb,
        width,
        height,
        full_width: width,
        full_height: height,
        scale: 1.0,
    })
}

/// Composites RGBA (straight alpha) onto an opaque white background.
pub(crate) fn over_white(rgba: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(rgba.len() / 4 * 3);
    for p in rgba.chunks_exact(4) {
        let a = u32::from(p[3]);
        for &c in &p[..3] {
            rgb.push(((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_goes_onto_white() {
        let rgba = [
            10, 20, 30, 255, 10, 20, 30, 0, 0, 0, 0, 128, 200, 100, 0, 64,
        ];
        let rgb = over_white(&rgba);
        assert_eq!(&rgb[0..3], &[10, 20, 30]); // opaque: unchanged
        assert_eq!(&rgb[3..6], &[255, 255, 255]); // transparent: white
        assert_eq!(&rgb[6..9], &[127, 127, 127]); // half black over white
        // 25% orange over white: 255 - 0.749 * (255 - c).
        assert_eq!(&rgb[9..12], &[241, 216, 191]);
    }
}
