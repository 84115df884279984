//! Image preprocessing that reproduces the reference processors bit for bit where it
//! can: Pillow's resampling filters (the convolution `Image.resize` runs, with its 8-bit
//! fixed-point arithmetic and horizontal-then-vertical passes), transformers' resize
//! rules (`shortest_edge` with the long side truncated, or an exact `height x width`
//! squash), centre crop with floor offsets, rescale and normalise.
//!
//! The filter is the one Pillow's `Image.resize` applies: a separable convolution whose
//! kernel is widened by the downscale factor (antialiasing), normalised per output
//! pixel, its weights rounded to 22-bit fixed point, each pass rounded and clipped to
//! 8 bits. Bicubic uses Keys' kernel with a = -0.5.
//!
//! [`ImageProcessor`] reads a transformers `preprocessor_config.json`
//! (`CLIPImageProcessor`, `SiglipImageProcessor`, ...) and turns an RGB8 image into the
//! `pixel_values` the model takes (CHW float32).
//!
//! ```
//! use tensorbake_encode::image_ops::{resize, Filter, RgbImage};
//! let img = RgbImage::new(4, 2, vec![200; 4 * 2 * 3]);
//! let out = resize(&img.view(), 2, 1, Filter::Bicubic);
//! assert_eq!((out.width, out.height), (2, 1));
//! assert!(out.pixels.iter().all(|&p| p == 200)); // a flat image stays flat
//! ```

use serde::{Deserialize, Serialize};

use crate::Rgb8;

/// An owned RGB8 image (HWC, rows top to bottom).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved RGB bytes, `width * height * 3`.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Wraps pixels; panics if the length is not `width * height * 3`.
    pub fn new(width: u32, height: u32, pixels: Vec<u8>) -> Self {
        assert_eq!(
            pixels.len(),
            width as usize * height as usize * 3,
            "RGB8 buffer of the wrong length"
        );
        Self {
            width,
            height,
            pixels,
        }
    }

    /// A borrowed view for [`crate::Input::Images`].
    pub fn view(&self) -> Rgb8<'_> {
        Rgb8 {
            width: self.width,
            height: self.height,
            pixels: &self.pixels,
        }
    }

    fn from_view(img: &Rgb8<'_>) -> Self {
        Self {
            width: img.width,
            height: img.height,
            pixels: img.pixels.to_vec(),
        }
    }
}

/// Pillow's resampling filters, numbered as `PIL.Image.Resampling` (and the `resample`
/// field of `preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// 0: nearest neighbour.
    Nearest,
    /// 1: Lanczos (a = 3).
    Lanczos,
    /// 2: bilinear (triangle).
    Bilinear,
    /// 3: bicubic (Keys, a = -0.5).
    Bicubic,
    /// 4: box.
    Box,
    /// 5: Hamming-windowed sinc.
    Hamming,
}

impl Filter {
    /// The filter of a PIL resample code.
    pub fn from_pil(code: i64) -> Option<Self> {
        Some(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Self::Nearest | Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let px = x * std::f64::consts::PI;
                px.sin() / px
            }
        }
        match self {
            Self::Nearest | Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats (0.54f, 0.46f).
                    px.sin() / px * (f64::from(0.54f32) + f64::from(0.46f32) * px.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index and integer weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) truncates towards zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n)
            .map(|x| filter.weight(((x + xmin) as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = k.iter().sum();
        if total != 0.0 {
            for w in &mut k {
                *w /= total;
            }
        }
        let one = f64::from(1u32 << PRECISION_BITS);
        let ki = k
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        bounds.push((xmin, n));
        weights.push(ki);
    }
    Coeffs { bounds, weights }
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn resample_horizontal(img: &RgbImage, out_w: usize, filter: Filter) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let c = coefficients(w, out_w, filter);
    let mut out = vec![0u8; out_w * h * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for y in 0..h {
        let row = &img.pixels[y * w * 3..(y + 1) * w * 3];
        for (xx, ((xmin, n), k)) in c.bounds.iter().zip(&c.weights).enumerate() {
            let mut acc = [half; 3];
            for (i, &kw) in k.iter().enumerate().take(*n) {
                let p = &row[(xmin + i) * 3..(xmin + i) * 3 + 3];
                for ch in 0..3 {
                    acc[ch] += i64::from(p[ch]) * i64::from(kw);
                }
            }
            let o = &mut out[(y * out_w + xx) * 3..(y * out_w + xx) * 3 + 3];
            for ch in 0..3 {
                o[ch] = clip8(acc[ch]);
            }
        }
    }
    RgbImage::new(out_w as u32, h as u32, out)
}

fn resample_vertical(img: &RgbImage, out_h: usize, filter: Filter) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let c = coefficients(h, out_h, filter);
    let mut out = vec![0u8; w * out_h * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for (yy, ((ymin, n), k)) in c.bounds.iter().zip(&c.weights).enumerate() {
        let orow = &mut out[yy * w * 3..(yy + 1) * w * 3];
        for (x, o) in orow.iter_mut().enumerate() {
            let mut acc = half;
            for (i, &kw) in k.iter().enumerate().take(*n) {
                acc += i64::from(img.pixels[(ymin + i) * w * 3 + x]) * i64::from(kw);
            }
            *o = clip8(acc);
        }
    }
    RgbImage::new(w as u32, out_h as u32, out)
}

fn resize_nearest(img: &Rgb8<'_>, out_w: usize, out_h: usize) -> RgbImage {
    // Pillow runs an affine transform that starts at the first output pixel's centre
    // and accumulates the step (floating-point sums, not products), then truncates.
    let (w, h) = (img.width as usize, img.height as usize);
    let sx = w as f64 / out_w as f64;
    let sy = h as f64 / out_h as f64;
    let mut out = vec![0u8; out_w * out_h * 3];
    let mut yy = sy * 0.5;
    for y in 0..out_h {
        let iy = (yy as usize).min(h - 1);
        let mut xx = sx * 0.5;
        for x in 0..out_w {
            let ix = (xx as usize).min(w - 1);
            let s = (iy * w + ix) * 3;
            out[(y * out_w + x) * 3..(y * out_w + x) * 3 + 3]
                .copy_from_slice(&img.pixels[s..s + 3]);
            xx += sx;
        }
        yy += sy;
    }
    RgbImage::new(out_w as u32, out_h as u32, out)
}

/// Resizes like Pillow's `Image.resize((width, height), filter)` on an RGB image.
pub fn resize(img: &Rgb8<'_>, width: u32, height: u32, filter: Filter) -> RgbImage {
    assert!(
        width > 0 && height > 0 && img.width > 0 && img.height > 0,
        "resize of or to an empty image"
    );
    if (img.width, img.height) == (width, height) {
        return RgbImage::from_view(img);
    }
    if filter == Filter::Nearest {
        return resize_nearest(img, width as usize, height as usize);
    }
    let mut cur = RgbImage::from_view(img);
    if width != img.width {
        cur = resample_horizontal(&cur, width as usize, filter);
    }
    if height != img.height {
        cur = resample_vertical(&cur, height as usize, filter);
    }
    cur
}

/// The `(width, height)` transformers' `shortest_edge` resize gives: the short side
/// becomes `size`, the long side `int(size * long / short)`.
pub fn shortest_edge_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let long_of =
        |short: u32, long: u32| (f64::from(size) * f64::from(long) / f64::from(short)) as u32;
    if width <= height {
        (size, long_of(width, height))
    } else {
        (long_of(height, width), size)
    }
}

/// Centre crop to `width x height` with floor offsets, as transformers' `center_crop`
/// and torchvision's `CenterCrop` on a larger image. The image must be at least that big.
pub fn center_crop(img: &Rgb8<'_>, width: u32, height: u32) -> RgbImage {
    assert!(
        img.width >= width && img.height >= height,
        "centre crop larger than the image"
    );
    let left = ((img.width - width) / 2) as usize;
    let top = ((img.height - height) / 2) as usize;
    let (w, cw) = (img.width as usize, width as usize);
    let mut out = Vec::with_capacity(cw * height as usize * 3);
    for y in top..top + height as usize {
        out.extend_from_slice(&img.pixels[(y * w + left) * 3..(y * w + left + cw) * 3]);
    }
    RgbImage::new(width, height, out)
}

/// Shortest side to `size` (Pillow `filter`), then centre crop to `size x size`: the
/// pipeline's (and `tensorbake encode`'s) VAE input.
pub fn resize_shortest_side_crop(img: &Rgb8<'_>, size: u32, filter: Filter) -> RgbImage {
    let (w, h) = shortest_edge_size(img.width, img.height, size);
    let r = resize(img, w, h, filter);
    center_crop(&r.view(), size, size)
}

/// How the image is resized before the crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeRule {
    /// Squash to exactly this size (SigLIP: `size: {height, width}`).
    Exact {
        /// Output height.
        height: u32,
        /// Output width.
        width: u32,
    },
    /// Shortest side to this size, aspect kept (CLIP: `size: {shortest_edge}` or an int).
    ShortestEdge(u32),
}

/// A transformers image processor as tensorbake runs it: resize, optional centre crop,
/// rescale, normalise. Serialises into the store's `preprocess` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageProcessor {
    /// The resize, or none.
    pub resize: Option<ResizeRule>,
    /// Pillow filter used to resize.
    pub resample: Filter,
    /// Centre crop `(height, width)`, or none.
    pub crop: Option<(u32, u32)>,
    /// Multiplier applied to the 0..255 values (1/255), or none.
    pub rescale: Option<f64>,
    /// Per-channel mean and std, or none.
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

/// The fields of a `preprocessor_config.json` that matter here. Upstream files carry
/// many more keys (processor class names, versions), so unknown ones are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PreprocessorConfig {
    /// `do_resize`.
    pub do_resize: Option<bool>,
    /// `size`: an int (shortest edge, old CLIP configs), `{shortest_edge}` or
    /// `{height, width}`.
    pub size: Option<serde_json::Value>,
    /// `resample`: PIL filter code.
    pub resample: Option<i64>,
    /// `do_center_crop`.
    pub do_center_crop: Option<bool>,
    /// `crop_size`: an int or `{height, width}`.
    pub crop_size: Option<serde_json::Value>,
    /// `do_rescale`.
    pub do_rescale: Option<bool>,
    /// `rescale_factor`.
    pub rescale_factor: Option<f64>,
    /// `do_normalize`.
    pub do_normalize: Option<bool>,
    /// `image_mean`.
    pub image_mean: Option<Vec<f64>>,
    /// `image_std`.
    pub image_std: Option<Vec<f64>>,
}

fn size_of(v: &serde_json::Value, what: &str) -> Result<SizeSpec, String> {
    if let Some(n) = v.as_u64() {
        return Ok(SizeSpec::Int(n as u32));
    }
    let get = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as u32)
    };
    match (get("height"), get("width"), get("shortest_edge")) {
        (Some(h), Some(w), _) => Ok(SizeSpec::Hw(h, w)),
        (_, _, Some(s)) => Ok(SizeSpec::Int(s)),
        _ => Err(format!(
            "`{what}` must be an integer, {{\"shortest_edge\": N}} or {{\"height\": H, \"width\": W}}, got {v}"
        )),
    }
}

enum SizeSpec {
    Int(u32),
    Hw(u32, u32),
}

fn triple(v: &[f64], what: &str) -> Result<[f64; 3], String> {
    match v {
        [a] => Ok([*a; 3]),
        [a, b, c] => Ok([*a, *b, *c]),
        _ => Err(format!("`{what}` must have 1 or 3 values, got {}", v.len())),
    }
}

impl ImageProcessor {
    /// Applies a `preprocessor_config.json` over model defaults (`base`): fields the file
    /// sets win. Errors say which field is malformed.
    pub fn with_config(mut self, cfg: &PreprocessorConfig) -> Result<Self, String> {
        let size = cfg.size.as_ref().map(|v| size_of(v, "size")).transpose()?;
        let do_resize = cfg
            .do_resize
            .unwrap_or(self.resize.is_some() || size.is_some());
        if !do_resize {
            self.resize = None;
        } else if let Some(size) = size {
            self.resize = Some(match size {
                SizeSpec::Int(n) => ResizeRule::ShortestEdge(n),
                SizeSpec::Hw(height, width) => ResizeRule::Exact { height, width },
            });
        }
        if let Some(code) = cfg.resample {
            self.resample =
                Filter::from_pil(code).ok_or_else(|| format!("unknown `resample` code {code}"))?;
        }
        let crop = cfg
            .crop_size
            .as_ref()
            .map(|v| size_of(v, "crop_size"))
            .transpose()?;
        match (cfg.do_center_crop, crop) {
            (Some(false), _) => self.crop = None,
            (_, Some(SizeSpec::Int(n))) => self.crop = Some((n, n)),
            (_, Some(SizeSpec::Hw(h, w))) => self.crop = Some((h, w)),
            (Some(true), None) if self.crop.is_none() => {
                return Err("`do_center_crop` is true but there is no `crop_size`".into());
            }
            _ => {}
        }
        if cfg.do_rescale == Some(false) {
            self.rescale = None;
        } else if let Some(f) = cfg.rescale_factor {
            self.rescale = Some(f);
        }
        if cfg.do_normalize == Some(false) {
            self.normalize = None;
        } else if cfg.image_mean.is_some() || cfg.image_std.is_some() {
            let (m0, s0) = self.normalize.unwrap_or(([0.0; 3], [1.0; 3]));
            let mean = cfg
                .image_mean
                .as_deref()
                .map(|v| triple(v, "image_mean"))
                .transpose()?
                .unwrap_or(m0);
            let std = cfg
                .image_std
                .as_deref()
                .map(|v| triple(v, "image_std"))
                .transpose()?
                .unwrap_or(s0);
            if std.contains(&0.0) {
                return Err("`image_std` has a zero".into());
            }
            self.normalize = Some((mean, std));
        }
        Ok(self)
    }

    /// The `(height, width)` of the output.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        let (w, h) = match self.resize {
            None => (width, height),
            Some(ResizeRule::Exact { height, width }) => (width, height),
            Some(ResizeRule::ShortestEdge(n)) => shortest_edge_size(width, height, n),
        };
        self.crop.unwrap_or((h, w))
    }

    /// The resized and cropped RGB8 image (before rescale and normalise).
    pub fn resize_crop(&self, img: &Rgb8<'_>) -> RgbImage {
        let resized = match self.resize {
            None => RgbImage::from_view(img),
            Some(ResizeRule::Exact { height, width }) => resize(img, width, height, self.resample),
            Some(ResizeRule::ShortestEdge(n)) => {
                let (w, h) = shortest_edge_size(img.width, img.height, n);
                resize(img, w, h, self.resample)
            }
        };
        match self.crop {
            Some((h, w)) if (resized.width, resized.height) != (w, h) => {
                if resized.width >= w && resized.height >= h {
                    center_crop(&resized.view(), w, h)
                } else {
                    pad_crop(&resized, w, h)
                }
            }
            _ => resized,
        }
    }

    /// `pixel_values` of one image: CHW float32 after resize, crop, rescale, normalise.
    pub fn pixel_values(&self, img: &Rgb8<'_>) -> Vec<f32> {
        let r = self.resize_crop(img);
        let n = r.width as usize * r.height as usize;
        let mut out = vec![0f32; 3 * n];
        let scale = self.rescale.unwrap_or(1.0);
        for (i, px) in r.pixels.chunks_exact(3).enumerate() {
            for ch in 0..3 {
                // transformers rescales in float32, then normalises in float32.
                let v = (f64::from(px[ch]) * scale) as f32;
                out[ch * n + i] = match self.normalize {
                    Some((m, s)) => (v - m[ch] as f32) / s[ch] as f32,
                    None => v,
                };
            }
        }
        out
    }
}

/// transformers' centre crop of an image smaller than the crop: zero padding, centred
/// with ceil offsets, then the crop window.
fn pad_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (cw, ch) = (width as i64, height as i64);
    let (w, h) = (i64::from(img.width), i64::from(img.height));
    let nw = w.max(cw);
    let nh = h.max(ch);
    let top_pad = (nh - h + 1) / 2;
    let left_pad = (nw - w + 1) / 2;
    let top = (nh - ch) / 2;
    let left = (nw - cw) / 2;
    let mut out = vec![0u8; (cw * ch * 3) as usize];
    for y in 0..ch {
        let sy = y + top - top_pad;
        if !(0..h).contains(&sy) {
            continue;
        }
        for x in 0..cw {
            let sx = x + left - left_pad;
            if !(0..w).contains(&sx) {
                continue;
            }
            let s = ((sy * w + sx) * 3) as usize;
            let d = ((y * cw + x) * 3) as usize;
            out[d..d + 3].copy_from_slice(&img.pixels[s..s + 3]);
        }
    }
    RgbImage::new(width, height, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_normalised_and_symmetric() {
        for f in [
            Filter::Box,
            Filter::Bilinear,
            Filter::Hamming,
            Filter::Bicubic,
            Filter::Lanczos,
        ] {
            for (i, o) in [(10usize, 3usize), (3, 10), (7, 7), (100, 17)] {
                let c = coefficients(i, o, f);
                for k in &c.weights {
                    let s: i64 = k.iter().map(|&w| i64::from(w)).sum();
                    // each weight rounded on its own: the sum is one within a few ulps
                    assert!(
                        (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                        "{f:?} {s}"
                    );
                }
                // mirror symmetry of the first and last output pixel's weights
                let trim = |k: &[i32]| -> Vec<i32> {
                    let a = k.iter().position(|&w| w != 0).unwrap_or(0);
                    let b = k.iter().rposition(|&w| w != 0).map_or(0, |b| b + 1);
                    k[a..b].to_vec()
                };
                let first = trim(&c.weights[0]);
                let mut last = trim(&c.weights[o - 1]);
                last.reverse();
                assert_eq!(first, last, "{f:?} {i}->{o}");
            }
        }
    }

    #[test]
    fn shortest_edge_truncates_the_long_side() {
        assert_eq!(shortest_edge_size(80, 48, 32), (53, 32));
        assert_eq!(shortest_edge_size(37, 61, 32), (32, 52));
        assert_eq!(shortest_edge_size(20, 28, 32), (32, 44));
        assert_eq!(shortest_edge_size(2250, 1500, 512), (768, 512));
    }

    #[test]
    fn crop_takes_floor_offsets() {
        let px: Vec<u8> = (0..5 * 2 * 3).map(|i| i as u8).collect();
        let img = RgbImage::new(5, 2, px);
        let c = center_crop(&img.view(), 2, 2);
        // (5 - 2) / 2 = 1: columns 1 and 2
        assert_eq!(&c.pixels[..6], &[3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn processor_config_forms() {
        let clip_old: PreprocessorConfig = serde_json::from_str(
            r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#,
        )
        .unwrap();
        let base = ImageProcessor {
            resize: None,
            resample: Filter::Bilinear,
            crop: None,
            rescale: Some(1.0 / 255.0),
            normalize: None,
        };
        let p = base.clone().with_config(&clip_old).unwrap();
        assert_eq!(p.resize, Some(ResizeRule::ShortestEdge(224)));
        assert_eq!(p.crop, Some((224, 224)));
        assert_eq!(p.resample, Filter::Bicubic);
        assert_eq!(p.output_size(640, 480), (224, 224));
        let siglip: PreprocessorConfig = serde_json::from_str(
            r#"{"size": {"height": 384, "width": 384}, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5], "resample": 3}"#,
        )
        .unwrap();
        let p = base.clone().with_config(&siglip).unwrap();
        assert_eq!(
            p.resize,
            Some(ResizeRule::Exact {
                height: 384,
                width: 384
            })
        );
        assert_eq!(p.output_size(640, 480), (384, 384));
        let bad: PreprocessorConfig = serde_json::from_str(r#"{"size": "big"}"#).unwrap();
        let e = base.clone().with_config(&bad).unwrap_err();
        assert!(e.contains("`size`"), "{e}");
        let bad: PreprocessorConfig = serde_json::from_str(r#"{"resample": 9}"#).unwrap();
        assert!(base.with_config(&bad).unwrap_err().contains("resample"));
    }

    #[test]
    fn pixel_values_rescale_and_normalise_per_channel() {
        let img = RgbImage::new(1, 1, vec![0, 255, 51]);
        let p = ImageProcessor {
            resize: None,
            resample: Filter::Bicubic,
            crop: None,
            rescale: Some(1.0 / 255.0),
            normalize: Some(([0.5; 3], [0.5; 3])),
        };
        let v = p.pixel_values(&img.view());
        assert_eq!(v.len(), 3);
        assert!((v[0] + 1.0).abs() < 1e-6 && (v[1] - 1.0).abs() < 1e-6);
        assert!((v[2] - (0.2 - 0.5) / 0.5).abs() < 1e-6);
    }
}
