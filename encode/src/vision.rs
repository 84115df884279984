//! The image features (`sd_vae`, `flux_vae`, `siglip`, `clip_vision`) as [`Encoder`]s:
//! finding the model in its directory, loading checked weights, preprocessing as the
//! reference processors do, batching, and naming the output arrays.
//!
//! Directory layouts understood (local path or hub id in the HF cache):
//!
//! | feature | directories |
//! |---|---|
//! | `sd_vae` | a diffusers VAE (`config.json` + `diffusion_pytorch_model.safetensors`, e.g. stabilityai/sd-vae-ft-ema), or a pipeline with `vae/` (PixArt-alpha/PixArt-XL-2-512x512) |
//! | `flux_vae` | the same, 16 latent channels (FLUX.1-dev `vae/`), or BFL's `ae.safetensors` without a config (architecture read from the tensor shapes) |
//! | `siglip` | a full `SiglipModel` (google/siglip-so400m-patch14-384) or a vision-only `SiglipVisionModel`; a Flux Redux pipeline's `image_encoder/` with `feature_extractor/` |
//! | `clip_vision` | a full `CLIPModel` (openai/clip-vit-large-patch14) or a `CLIPVisionModelWithProjection`, also as a pipeline's `image_encoder/` |
//!
//! Preprocessing: the VAEs take the image resized (shortest side, Pillow bicubic) and
//! centre-cropped to the pipeline resolution (images already at that size pass
//! unchanged), scaled to [-1, 1]. SigLIP and CLIP run their `preprocessor_config.json`
//! (the model's, or the pipeline's `feature_extractor/`; the checkpoint's defaults when
//! there is none) through [`ImageProcessor`].

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde_json::json;

use tensorbake_kit::schema::{Array, Feature};
use tensorbake_nn::clip_vision::{self, CLIP_MEAN, CLIP_STD, ClipVisionWithProjection};
use tensorbake_nn::loader::{NameMap, WeightFiles, same_names};
use tensorbake_nn::ops::transfer::Staging;
use tensorbake_nn::siglip::{self, SiglipVision};
use tensorbake_nn::vae::{self, VaeEncoder};
use tensorbake_nn::weights::{ModelDir, fingerprint};
use tensorbake_nn::{Error as NnError, conv_compute_dtype, parse_device};

use crate::image_ops::{Filter, ImageProcessor, PreprocessorConfig, ResizeRule, RgbImage};
use crate::{
    ArraySpec, EncodeError, Encoder, EncoderConfig, EncoderInfo, Input, Prepared, Result, Rgb8,
    concat_outputs, device_bytes,
};

fn candle_err(encoder: &str) -> impl Fn(candle_core::Error) -> EncodeError + '_ {
    EncodeError::candle(encoder)
}

fn images<'a>(encoder: &str, input: Input<'a>) -> Result<&'a [Rgb8<'a>]> {
    match input {
        Input::Images(i) => {
            if let Some((k, bad)) = i.iter().enumerate().find(|(_, im)| {
                im.width == 0
                    || im.height == 0
                    || im.pixels.len() != im.width as usize * im.height as usize * 3
            }) {
                return Err(EncodeError::BadInput {
                    encoder: encoder.to_string(),
                    why: format!(
                        "image {k} is {}x{} with {} bytes (expected RGB8, {} bytes)",
                        bad.width,
                        bad.height,
                        bad.pixels.len(),
                        bad.width as usize * bad.height as usize * 3
                    ),
                });
            }
            Ok(i)
        }
        Input::Texts(_) => Err(EncodeError::BadInput {
            encoder: encoder.to_string(),
            why: "this is an image encoder; it was given texts".into(),
        }),
    }
}

/// A model directory's config read as JSON, with the error naming the file.
fn read_config(dir: &ModelDir) -> Result<serde_json::Value> {
    Ok(dir.json("config.json")?)
}

fn bad_config(dir: &ModelDir, why: String) -> EncodeError {
    tensorbake_nn::Error::BadFile {
        path: dir.root.join("config.json"),
        why,
    }
    .into()
}

/// Where a model's `preprocessor_config.json` is: in its directory, else in the
/// pipeline's `feature_extractor/` beside it.
fn find_preprocessor(dir: &ModelDir) -> Option<PathBuf> {
    if let Some(p) = dir.file("preprocessor_config.json") {
        return Some(p);
    }
    let sibling = dir
        .root
        .parent()?
        .join("feature_extractor/preprocessor_config.json");
    sibling.is_file().then_some(sibling)
}

fn apply_preprocessor(base: ImageProcessor, dir: &ModelDir) -> Result<(ImageProcessor, String)> {
    let Some(path) = find_preprocessor(dir) else {
        return Ok((base, "model defaults (no preprocessor_config.json)".into()));
    };
    let text = std::fs::read_to_string(&path).map_err(|source| tensorbake_nn::Error::Io {
        path: path.clone(),
        source,
    })?;
    let cfg: PreprocessorConfig =
        serde_json::from_str(&text).map_err(|e| tensorbake_nn::Error::BadFile {
            path: path.clone(),
            why: format!("invalid preprocessor config: {e}"),
        })?;
    let p = base
        .with_config(&cfg)
        .map_err(|why| tensorbake_nn::Error::BadFile {
            path: path.clone(),
            why,
        })?;
    Ok((p, path.display().to_string()))
}

/// A model dir that holds `config.json`, or the sub-directory `sub` of a pipeline.
fn model_or_sub(dir: ModelDir, sub: &str) -> ModelDir {
    if dir.file("config.json").is_none()
        && let Some(s) = dir.sub(sub)
    {
        return s;
    }
    dir
}

/// CHW f32 images as a `[B, 3, h, w]` batch in `dtype` on the staging device, cast on
/// the host (with the device's rounding, to nearest even) so that a half-precision
/// batch uploads half the bytes.
fn upload_pixels(
    staging: &Staging,
    pix: Vec<Vec<f32>>,
    h: usize,
    w: usize,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let shape = (pix.len(), 3, h, w);
    let values = pix.iter().flatten().copied();
    match dtype {
        DType::BF16 => {
            let v: Vec<half::bf16> = values.map(half::bf16::from_f32).collect();
            staging.upload(&v, shape)
        }
        DType::F16 => {
            let v: Vec<half::f16> = values.map(half::f16::from_f32).collect();
            staging.upload(&v, shape)
        }
        DType::F32 => staging.upload(&values.collect::<Vec<f32>>(), shape),
        // a cast on the device would run on the preparing thread's stream, unordered
        // with the model's
        other => Err(candle_core::Error::Msg(format!(
            "image batches are uploaded in f32, bf16 or f16, not {other:?}"
        ))),
    }
}

fn empty_outputs(
    arrays: &[ArraySpec],
    dtype: DType,
    dev: &Device,
    encoder: &str,
) -> Result<Vec<(Array, Tensor)>> {
    arrays
        .iter()
        .map(|a| {
            let mut shape = vec![0];
            shape.extend(&a.shape);
            Tensor::zeros(shape, dtype, dev)
                .map(|t| (a.array, t))
                .map_err(candle_err(encoder))
        })
        .collect()
}

// ---------------------------------------------------------------- VAEs

/// `sd_vae` / `flux_vae`: posterior mean and std of the VAE encoder.
pub struct VaeFeature {
    feature: String,
    model: VaeEncoder,
    resolution: u32,
    staging: Staging,
    dtype: DType,
    batch: usize,
    info: EncoderInfo,
}

/// Loads a VAE feature (`sd_vae` or `flux_vae`) for images of `resolution` pixels (a
/// multiple of the VAE's downscale factor).
pub fn build_vae(cfg: &EncoderConfig, feature: Feature, resolution: u32) -> Result<VaeFeature> {
    let Some(expected_latents) = feature.latent_channels() else {
        return Err(EncodeError::UnknownEncoder {
            name: feature.name().to_string(),
            known: "sd_vae, flux_vae".into(),
        });
    };
    let device = parse_device(&cfg.device)?;
    let dtype = conv_compute_dtype(cfg.dtype, &device)?;
    let located = vae::locate(&cfg.weights)?;
    let (dir, files, vcfg, layout, ldm) = (
        &located.dir,
        &located.files,
        &located.cfg,
        located.layout,
        located.ldm,
    );
    if vcfg.latent_channels != expected_latents {
        return Err(bad_config(
            dir,
            format!(
                "`{feature}` takes a VAE with {expected_latents} latent channels; this one has {} \
                 (is it the {} VAE?)",
                vcfg.latent_channels,
                if feature == Feature::SdVae {
                    "Flux"
                } else {
                    "SD"
                }
            ),
        ));
    }
    let f = vcfg.downscale() as u32;
    if resolution == 0 || !resolution.is_multiple_of(f) {
        return Err(EncodeError::BadInput {
            encoder: feature.to_string(),
            why: format!(
                "resolution {resolution} is not a positive multiple of the VAE's downscale factor {f}"
            ),
        });
    }
    let model = located.encoder(feature.name(), dtype, &device)?;
    let lat = (resolution / f) as usize;
    let c = vcfg.latent_channels;
    let info = EncoderInfo {
        feature,
        model: format!(
            "{} (AutoencoderKL encoder; {} names; {layout})",
            cfg.weights,
            if ldm { "BFL/LDM" } else { "diffusers" }
        ),
        weights_sha256: fingerprint(files)?,
        preprocess: json!({
            "resolution": resolution,
            "resize": "shortest_side",
            "resample": "bicubic (Pillow)",
            "crop": "center",
            "range": [-1.0, 1.0],
            "posterior": "mean, std = exp(0.5 * clamp(logvar, -30, 20))",
            "scaling_factor": vcfg.scaling_factor,
            "shift_factor": vcfg.shift_factor,
            "dtype": cfg.dtype.short_name(),
        }),
        arrays: feature
            .arrays()
            .iter()
            .map(|&array| ArraySpec {
                array,
                shape: vec![c, lat, lat],
            })
            .collect(),
    };
    Ok(VaeFeature {
        feature: feature.name().to_string(),
        model,
        resolution,
        staging: Staging::new(&device),
        dtype,
        batch: cfg.batch,
        info,
    })
}

impl VaeFeature {
    /// The VAE input of one image: shortest side to the resolution and centre crop
    /// (unchanged if already at the resolution).
    pub fn prepare_image(&self, img: &Rgb8<'_>) -> RgbImage {
        crate::image_ops::resize_shortest_side_crop(img, self.resolution, Filter::Bicubic)
    }
}

impl Encoder for VaeFeature {
    fn prepare(&self, input: Input<'_>) -> Result<Prepared> {
        let imgs = images(&self.feature, input)?;
        let n = self.resolution as usize;
        let chunks = imgs
            .chunks(self.batch.max(1))
            .map(|chunk| {
                let pix: Vec<Vec<f32>> = chunk
                    .par_iter()
                    .map(|im| {
                        let r = self.prepare_image(im);
                        // HWC u8 -> CHW in [-1, 1]
                        let mut v = vec![0f32; 3 * n * n];
                        for (i, px) in r.pixels.chunks_exact(3).enumerate() {
                            for ch in 0..3 {
                                v[ch * n * n + i] = f32::from(px[ch]) / 127.5 - 1.0;
                            }
                        }
                        v
                    })
                    .collect();
                upload_pixels(&self.staging, pix, n, n, self.dtype)
                    .map_err(candle_err(&self.feature))
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let bytes = device_bytes(&chunks.iter().collect::<Vec<_>>());
        Ok(Prepared::new(self.info.feature, chunks, imgs.len(), bytes))
    }

    fn run(&self, prepared: Prepared) -> Result<Vec<(Array, Tensor)>> {
        let names: Vec<Array> = self.info.arrays.iter().map(|a| a.array).collect();
        if prepared.is_empty() {
            return empty_outputs(
                &self.info.arrays,
                self.dtype,
                self.staging.device(),
                &self.feature,
            );
        }
        let chunks: Vec<Tensor> = prepared.take(self.info.feature)?;
        let parts = chunks
            .iter()
            .map(|x| {
                let (mean, std) = self.model.forward(x).map_err(candle_err(&self.feature))?;
                Ok(vec![mean, std])
            })
            .collect::<Result<Vec<_>>>()?;
        let outs = concat_outputs(&parts, &self.feature)?;
        Ok(names.into_iter().zip(outs).collect())
    }

    fn device(&self) -> &Device {
        self.staging.device()
    }

    fn info(&self) -> EncoderInfo {
        self.info.clone()
    }
}

// ---------------------------------------------------------------- SigLIP

/// `siglip`: the vision tower's `last_hidden_state`.
pub struct SiglipFeature {
    model: SiglipVision,
    processor: ImageProcessor,
    staging: Staging,
    dtype: DType,
    batch: usize,
    info: EncoderInfo,
}

/// Loads the `siglip` feature.
pub fn build_siglip(cfg: &EncoderConfig) -> Result<SiglipFeature> {
    let device = parse_device(&cfg.device)?;
    let dtype = conv_compute_dtype(cfg.dtype, &device)?;
    let dir = model_or_sub(ModelDir::resolve(&cfg.weights)?, "image_encoder");
    let raw = read_config(&dir)?;
    let scfg = siglip::Config::from_json(&raw).map_err(|why| bad_config(&dir, why))?;
    let v = &scfg.vision;
    let side = v.image_size as u32;
    let base = ImageProcessor {
        resize: Some(ResizeRule::Exact {
            height: side,
            width: side,
        }),
        resample: Filter::Bicubic,
        crop: None,
        rescale: Some(1.0 / 255.0),
        normalize: Some(([0.5; 3], [0.5; 3])),
    };
    let (processor, pp_source) = apply_preprocessor(base, &dir)?;
    check_processor_output(&processor, side, "siglip", &dir)?;
    let files = dir.safetensors(&["model"])?;
    let weights = Arc::new(WeightFiles::open(&files)?);
    // Hub checkpoints keep the tower under `vision_model.`; transformers 5 writes a
    // vision-only model without it.
    let map: NameMap = Arc::new(|n: &str| {
        let mut c = vec![n.to_string()];
        if let Some(s) = n.strip_prefix("vision_model.") {
            c.push(s.to_string());
        }
        c
    });
    let model = weights.build("siglip", map, dtype, &device, |vb| {
        SiglipVision::new(vb.pp("vision_model"), v)
    })?;
    let info = EncoderInfo {
        feature: Feature::Siglip,
        model: format!(
            "{} ({}; vision last_hidden_state)",
            cfg.weights,
            if scfg.full_model {
                "SiglipModel"
            } else {
                "SiglipVisionModel"
            }
        ),
        weights_sha256: fingerprint(&files)?,
        preprocess: json!({
            "processor": processor,
            "source": pp_source,
            "dtype": cfg.dtype.short_name(),
        }),
        arrays: vec![ArraySpec {
            array: Array::SiglipHidden,
            shape: vec![v.num_patches(), v.hidden_size],
        }],
    };
    Ok(SiglipFeature {
        model,
        processor,
        staging: Staging::new(&device),
        dtype,
        batch: cfg.batch,
        info,
    })
}

fn check_processor_output(
    p: &ImageProcessor,
    side: u32,
    feature: &str,
    dir: &ModelDir,
) -> Result<()> {
    // The output size of a shortest-edge resize without crop depends on the image.
    let fixed = p.crop.is_some() || matches!(p.resize, Some(ResizeRule::Exact { .. }));
    let out = p.output_size(side + 7, side + 3);
    if !fixed || out != (side, side) {
        return Err(NnError::BadFile {
            path: find_preprocessor(dir)
                .unwrap_or_else(|| dir.root.join("preprocessor_config.json")),
            why: format!(
                "`{feature}` needs {side}x{side} pixel values (the model's image_size), \
                 but this preprocessor config does not produce a fixed {side}x{side} image"
            ),
        }
        .into());
    }
    Ok(())
}

fn processed_batch(
    p: &ImageProcessor,
    chunk: &[Rgb8<'_>],
    side: usize,
    staging: &Staging,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    // Preprocessing is CPU work: spread it over the rayon pool (a SigLIP 512 -> 384
    // resize takes ~6 ms per image on one core, three times the model's time per
    // image on an H200); a pipeline runs it ahead of the model ([`Encoder::prepare`]).
    let pix: Vec<Vec<f32>> = chunk.par_iter().map(|im| p.pixel_values(im)).collect();
    upload_pixels(staging, pix, side, side, dtype)
}

impl SiglipFeature {
    /// `last_hidden_state` of already-processed pixel values `[B, 3, S, S]`.
    pub fn forward_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.model
            .forward(
                &pixel_values
                    .to_dtype(self.dtype)
                    .map_err(candle_err("siglip"))?,
            )
            .map_err(candle_err("siglip"))
    }

    /// The image processor in use.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }
}

// ---------------------------------------------------------------- CLIP

/// `clip_vision`: CLIP's projected image embedding.
pub struct ClipVisionFeature {
    model: ClipVisionWithProjection,
    processor: ImageProcessor,
    staging: Staging,
    dtype: DType,
    batch: usize,
    info: EncoderInfo,
}

/// Loads the `clip_vision` feature.
pub fn build_clip_vision(cfg: &EncoderConfig) -> Result<ClipVisionFeature> {
    let device = parse_device(&cfg.device)?;
    let dtype = conv_compute_dtype(cfg.dtype, &device)?;
    let dir = model_or_sub(ModelDir::resolve(&cfg.weights)?, "image_encoder");
    let raw = read_config(&dir)?;
    let ccfg = clip_vision::Config::from_json(&raw).map_err(|why| bad_config(&dir, why))?;
    let side = ccfg.vision.image_size as u32;
    let base = ImageProcessor {
        resize: Some(ResizeRule::ShortestEdge(side)),
        resample: Filter::Bicubic,
        crop: Some((side, side)),
        rescale: Some(1.0 / 255.0),
        normalize: Some((CLIP_MEAN, CLIP_STD)),
    };
    let (processor, pp_source) = apply_preprocessor(base, &dir)?;
    check_processor_output(&processor, side, "clip_vision", &dir)?;
    let files = dir.safetensors(&["model"])?;
    let weights = Arc::new(WeightFiles::open(&files)?);
    let model = weights.build("clip_vision", same_names(), dtype, &device, |vb| {
        ClipVisionWithProjection::new(vb, &ccfg)
    })?;
    let info = EncoderInfo {
        feature: Feature::ClipVision,
        model: format!(
            "{} ({}; image_embeds)",
            cfg.weights,
            if ccfg.full_model {
                "CLIPModel"
            } else {
                "CLIPVisionModelWithProjection"
            }
        ),
        weights_sha256: fingerprint(&files)?,
        preprocess: json!({
            "processor": processor,
            "source": pp_source,
            "dtype": cfg.dtype.short_name(),
        }),
        arrays: vec![ArraySpec {
            array: Array::ClipImageEmbeds,
            shape: vec![ccfg.projection_dim],
        }],
    };
    Ok(ClipVisionFeature {
        model,
        processor,
        staging: Staging::new(&device),
        dtype,
        batch: cfg.batch,
        info,
    })
}

impl ClipVisionFeature {
    /// `image_embeds` of already-processed pixel values `[B, 3, S, S]`.
    pub fn forward_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.model
            .forward(
                &pixel_values
                    .to_dtype(self.dtype)
                    .map_err(candle_err("clip_vision"))?,
            )
            .map_err(candle_err("clip_vision"))
    }

    /// The image processor in use.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }
}

/// SigLIP and CLIP are encoders through [`ProcessedImageFeature`].
impl<F: ProcessedImageFeature + Send + Sync> Encoder for F {
    fn prepare(&self, input: Input<'_>) -> Result<Prepared> {
        self.prepare_images(input)
    }

    fn run(&self, prepared: Prepared) -> Result<Vec<(Array, Tensor)>> {
        self.run_images(prepared)
    }

    fn device(&self) -> &Device {
        self.parts().1.device()
    }

    fn info(&self) -> EncoderInfo {
        self.parts().4.clone()
    }
}

/// The image features that run the model's own image processor on every image
/// (SigLIP, CLIP): one shared `prepare` and `run`, the parts differ.
trait ProcessedImageFeature {
    /// Feature name (errors, empty outputs).
    const FEATURE: &'static str;
    /// The store array the model output becomes.
    const ARRAY: Array;
    /// Processor, staging (the device), dtype, batch size and info.
    fn parts(&self) -> (&ImageProcessor, &Staging, DType, usize, &EncoderInfo);
    /// The model on processed pixel values `[B, 3, S, S]`.
    fn model_on(&self, pixel_values: &Tensor) -> Result<Tensor>;

    fn prepare_images(&self, input: Input<'_>) -> Result<Prepared> {
        let (processor, staging, dtype, batch, info) = self.parts();
        let imgs = images(Self::FEATURE, input)?;
        let (side, _) = processor.output_size(1, 1);
        let chunks = imgs
            .chunks(batch.max(1))
            .map(|chunk| {
                processed_batch(processor, chunk, side as usize, staging, dtype)
                    .map_err(candle_err(Self::FEATURE))
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let bytes = device_bytes(&chunks.iter().collect::<Vec<_>>());
        Ok(Prepared::new(info.feature, chunks, imgs.len(), bytes))
    }

    fn run_images(&self, prepared: Prepared) -> Result<Vec<(Array, Tensor)>> {
        let (_, staging, dtype, _, info) = self.parts();
        if prepared.is_empty() {
            return empty_outputs(&info.arrays, dtype, staging.device(), Self::FEATURE);
        }
        let chunks: Vec<Tensor> = prepared.take(info.feature)?;
        let parts = chunks
            .iter()
            .map(|x| Ok(vec![self.model_on(x)?]))
            .collect::<Result<Vec<_>>>()?;
        let mut outs = concat_outputs(&parts, Self::FEATURE)?;
        Ok(vec![(Self::ARRAY, outs.remove(0))])
    }
}

impl ProcessedImageFeature for SiglipFeature {
    const FEATURE: &'static str = "siglip";
    const ARRAY: Array = Array::SiglipHidden;
    fn parts(&self) -> (&ImageProcessor, &Staging, DType, usize, &EncoderInfo) {
        (
            &self.processor,
            &self.staging,
            self.dtype,
            self.batch,
            &self.info,
        )
    }
    fn model_on(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward_pixels(pixel_values)
    }
}

impl ProcessedImageFeature for ClipVisionFeature {
    const FEATURE: &'static str = "clip_vision";
    const ARRAY: Array = Array::ClipImageEmbeds;
    fn parts(&self) -> (&ImageProcessor, &Staging, DType, usize, &EncoderInfo) {
        (
            &self.processor,
            &self.staging,
            self.dtype,
            self.batch,
            &self.info,
        )
    }
    fn model_on(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward_pixels(pixel_values)
    }
}
