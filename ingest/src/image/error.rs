//! Why an image was not turned into a training sample.

use thiserror::Error;

use super::ImageFormat;

/// One image's failure. Every variant is a distinct, counted outcome of the run
/// report (see [`ImageError::reason`]); none of them stops the shard. The messages
/// describe the image only: the caller adds the shard URL and sample key.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Zero bytes: typically a failed download written as an empty tar member.
    #[error("empty image: 0 bytes")]
    Empty,
    /// The leading bytes match no image format known to tensorbake.
    #[error("not an image: unrecognised leading bytes {magic}")]
    UnrecognizedFormat {
        /// Hex dump of the first (up to 12) bytes.
        magic: String,
    },
    /// A real image format that tensorbake does not decode (GIF, TIFF, BMP, AVIF,
    /// ...), or a variant of a supported one that the decoder cannot handle
    /// (12-bit JPEG).
    #[error("unsupported image format: {format} (tensorbake decodes 8-bit JPEG, PNG and WebP)")]
    UnsupportedFormat {
        /// What the bytes are, e.g. `GIF` or `12-bit JPEG`.
        format: String,
    },
    /// The data ends before the image does.
    #[error("truncated {format} image: {detail}")]
    Truncated {
        /// Container format.
        format: ImageFormat,
        /// The decoder's words.
        detail: String,
    },
    /// Damaged data: bad headers, undefined tables, invalid entropy-coded data.
    #[error("corrupt {format} image: {detail}")]
    Corrupt {
        /// Container format.
        format: ImageFormat,
        /// The decoder's words.
        detail: String,
    },
    /// The header claims more pixels than `max_pixels`; rejected from the header,
    /// before any pixel buffer is allocated.
    #[error(
        "decompression bomb: {format} header claims {width}x{height} = {} pixels, over the limit max_pixels = {max_pixels}",
        u64::from(*width) * u64::from(*height)
    )]
    DecompressionBomb {
        /// Container format.
        format: ImageFormat,
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The configured limit.
        max_pixels: u64,
    },
    /// The shortest side is below the configured `min_size`.
    #[error("image too small: {width}x{height}, shortest side {} < min_size {min_size}", (*width).min(*height))]
    TooSmall {
        /// Displayed width (after EXIF orientation).
        width: u32,
        /// Displayed height (after EXIF orientation).
        height: u32,
        /// The configured minimum.
        min_size: u32,
    },
    /// The decoder or resizer failed for a reason that is not the image's fault
    /// (could not allocate its state, an impossible resize).
    #[error("{format} decoder failure: {detail}")]
    DecoderFailure {
        /// Container format.
        format: ImageFormat,
        /// What failed.
        detail: String,
    },
}

impl ImageError {
    /// Every value [`ImageError::reason`] can return, for run reports that list
    /// all counters, zeros included.
    pub const REASONS: &'static [&'static str] = &[
        "empty_image",
        "unrecognized_format",
        "unsupported_format",
        "truncated_image",
        "corrupt_image",
        "decompression_bomb",
        "too_small",
        "decoder_failure",
    ];

    /// The counter this failure is reported under (snake_case, stable).
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::Empty => "empty_image",
            ImageError::UnrecognizedFormat { .. } => "unrecognized_format",
            ImageError::UnsupportedFormat { .. } => "unsupported_format",
            ImageError::Truncated { .. } => "truncated_image",
            ImageError::Corrupt { .. } => "corrupt_image",
            ImageError::DecompressionBomb { .. } => "decompression_bomb",
            ImageError::TooSmall { .. } => "too_small",
            ImageError::DecoderFailure { .. } => "decoder_failure",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_listed_and_distinct() {
        let errors = [
            ImageError::Empty,
            ImageError::UnrecognizedFormat { magic: "00".into() },
            ImageError::UnsupportedFormat {
                format: "GIF".into(),
            },
            ImageError::Truncated {
                format: ImageFormat::Jpeg,
                detail: String::new(),
            },
            ImageError::Corrupt {
                format: ImageFormat::Png,
                detail: String::new(),
            },
            ImageError::DecompressionBomb {
                format: ImageFormat::Png,
                width: 100_000,
                height: 100_000,
                max_pixels: 10,
            },
            ImageError::TooSmall {
                width: 10,
                height: 20,
                min_size: 256,
            },
            ImageError::DecoderFailure {
                format: ImageFormat::WebP,
                detail: String::new(),
            },
        ];
        let reasons: Vec<_> = errors.iter().map(ImageError::reason).collect();
        assert_eq!(reasons, ImageError::REASONS);
        let bomb = errors[5].to_string();
        assert!(
            bomb.contains("100000x100000 = 10000000000 pixels"),
            "{bomb}"
        );
        let small = errors[6].to_string();
        assert!(small.contains("shortest side 10 < min_size 256"), "{small}");
    }
}
