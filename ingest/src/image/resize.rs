//! Resize the shortest side and crop the centre square in one convolution pass.

use std::cell::RefCell;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::{Decoded, Resample};

thread_local! {
    /// The resizer keeps its scratch buffers between images; one per thread.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

fn filter(resample: Resample) -> FilterType {
    match resample {
        // Pillow's BICUBIC is the a = -0.5 cubic, i.e. Catmull-Rom.
        Resample::Bicubic => FilterType::CatmullRom,
        Resample::Bilinear => FilterType::Bilinear,
        Resample::Lanczos => FilterType::Lanczos3,
    }
}

/// The centre square of a `width x height` image, in its own pixel coordinates:
/// `(left, top, side)`. Fractional, like Pillow's `ImageOps.fit`.
pub(crate) fn center_square(width: f64, height: f64) -> (f64, f64, f64) {
    let side = width.min(height);
    ((width - side) / 2.0, (height - side) / 2.0, side)
}

/// Resizes the centre square of `decoded` to `side x side` RGB.
///
/// The square is computed on the full-size image and scaled into the decoded one,
/// so a DCT-scaled decode (whose last row and column may cover only part of a
/// source block) samples the same region of the picture as a full decode.
pub(crate) fn center_crop(
    decoded: &Decoded,
    side: u32,
    resample: Resample,
) -> Result<Vec<u8>, String> {
    let (left, top, full_side) = center_square(
        f64::from(decoded.full_width),
        f64::from(decoded.full_height),
    );
    let s = decoded.scale;
    let (w, h) = (f64::from(decoded.width), f64::from(decoded.height));
    let left = (left * s).min(w);
    let top = (top * s).min(h);
    let crop_w = (full_side * s).min(w - left);
    let crop_h = (full_side * s).min(h - top);
    let src = ImageRef::new(decoded.width, decoded.height, &decoded.rgb, PixelType::U8x3)
        .map_err(|e| format!("decoded buffer does not hold {w}x{h} RGB: {e}"))?;
    let mut dst = Image::new(side, side, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(filter(resample)))
        .crop(left, top, crop_w, crop_h);
    RESIZER
        .with(|r| r.borrow_mut().resize(&src, &mut dst, &options))
        .map_err(|e| format!("resizing {w}x{h} to {side}x{side}: {e}"))?;
    Ok(dst.into_vec())
}
