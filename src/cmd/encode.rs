//! `tensorbake encode`: run one encoder over image files (or captions) and write the
//! feature arrays to a safetensors file, named as in the store, one row per input in
//! order, with the encoder's record (feature, model, weights_sha256, preprocess) in the
//! file's metadata.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use candle_core::{DType, Tensor};
use tensorbake_encode::image_ops::RgbImage;
use tensorbake_encode::{EncoderConfig, Input, build_encoder};
use tensorbake_kit::dtype::DType as Precision;
use tensorbake_kit::schema::Array;

/// Flags of `tensorbake encode`.
#[derive(Debug, clap::Args)]
pub struct EncodeArgs {
    /// Encoder (feature) name: sd_vae, flux_vae, siglip, clip_vision, t5, clip_text.
    #[arg(long)]
    pub encoder: String,
    /// Model directory (HF layout) or hub id `org/name[@revision]` in the local HF cache.
    #[arg(long)]
    pub weights: String,
    /// VAE input size: shortest side resized to it, then centre-cropped.
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute and output dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Inputs per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Text encoders: captions, one JSON string per line.
    #[arg(long)]
    pub text_file: Option<PathBuf>,
    /// Text encoders: maximum token length.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Image files (image encoders).
    pub images: Vec<PathBuf>,
}

/// Runs `tensorbake encode`.
pub fn run(args: EncodeArgs) -> anyhow::Result<ExitCode> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let cfg = EncoderConfig {
        name: args.encoder.clone(),
        weights: args.weights.clone(),
        dtype: args.dtype,
        batch: args.batch,
        device: args.device.clone(),
        max_length: args.max_length,
        store_dtype: None,
    };
    let encoder = build_encoder(&cfg, args.resolution)
        .with_context(|| format!("loading encoder `{}` from {}", args.encoder, args.weights))?;
    let info = encoder.info();
    let mut parts: BTreeMap<Array, Vec<Tensor>> = BTreeMap::new();
    let mut push = |outs: Vec<(Array, Tensor)>| {
        for (name, t) in outs {
            parts.entry(name).or_default().push(t);
        }
    };
    let inputs: Vec<String> = if encoder.takes_text() {
        if !args.images.is_empty() {
            bail!(
                "`{}` is a text encoder: give --text-file, not image files",
                args.encoder
            );
        }
        let path = args.text_file.as_deref().with_context(|| {
            format!(
                "`{}` is a text encoder: --text-file is required",
                args.encoder
            )
        })?;
        let texts = read_captions(path)?;
        for chunk in texts.chunks(args.batch) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            push(encoder.encode(Input::Texts(&refs))?);
        }
        vec![path.display().to_string()]
    } else {
        if args.text_file.is_some() {
            bail!(
                "`{}` is an image encoder: give image files, not --text-file",
                args.encoder
            );
        }
        if args.images.is_empty() {
            bail!("no image files given");
        }
        for chunk in args.images.chunks(args.batch) {
            let imgs = chunk
                .iter()
                .map(|p| decode(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let views: Vec<_> = imgs.iter().map(RgbImage::view).collect();
            push(encoder.encode(Input::Images(&views))?);
        }
        args.images
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    };
    let mut arrays = Vec::new();
    for spec in &info.arrays {
        let ts = parts
            .remove(&spec.array)
            .with_context(|| format!("encoder produced no `{}` array", spec.array))?;
        arrays.push((spec.array.name().to_string(), Tensor::cat(&ts, 0)?));
    }
    let mut meta = BTreeMap::new();
    meta.insert("feature".to_string(), info.feature.name().to_string());
    meta.insert("model".to_string(), info.model.clone());
    meta.insert("weights_sha256".to_string(), info.weights_sha256.clone());
    meta.insert("preprocess".to_string(), info.preprocess.to_string());
    meta.insert("arrays".to_string(), serde_json::to_string(&info.arrays)?);
    meta.insert("inputs".to_string(), serde_json::to_string(&inputs)?);
    write_safetensors(&args.out, &arrays, &meta)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let rows = arrays.first().map_or(0, |(_, t)| t.dim(0).unwrap_or(0));
    eprintln!(
        "{}: {rows} rows of {} -> {}",
        info.feature,
        arrays
            .iter()
            .map(|(n, t)| format!("{n} {:?}", &t.dims()[1..]))
            .collect::<Vec<_>>()
            .join(", "),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn decode(path: &Path) -> anyhow::Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?
        .decode()
        .with_context(|| format!("decoding {}", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    Ok(RgbImage::new(w, h, img.into_raw()))
}

/// Captions file: one JSON string per line; blank lines are skipped.
fn read_captions(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<String>(l).with_context(|| {
                format!(
                    "{}:{}: expected one JSON string per line",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Writes tensors and string metadata in the safetensors format (8-byte little-endian
/// header length, JSON header with `__metadata__`, padded to 8 bytes, then the data).
fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    let mut blobs = Vec::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        let (dtype, bytes) = tensor_bytes(t)?;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": t.dims(),
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
        blobs.push(bytes);
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let tmp = path.with_extension("safetensors.partial");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    f.write_all(&(json.len() as u64).to_le_bytes())?;
    f.write_all(&json)?;
    for b in blobs {
        f.write_all(&b)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn tensor_bytes(t: &Tensor) -> anyhow::Result<(&'static str, Vec<u8>)> {
    let t = t.to_device(&candle_core::Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            "F32",
            t.to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            "BF16",
            t.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            "F16",
            t.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            "I64",
            t.to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            "U32",
            t.to_vec1::<u32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        other => bail!("cannot write dtype {other:?}"),
    })
}
