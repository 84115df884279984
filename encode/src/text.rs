//! The text encoders `t5` and `clip_text`: tokenizer + model + the arrays the store keeps.
//!
//! [`T5TextEncoder`] writes `t5_hidden` `[B, L, d_model]` (rows at and beyond
//! `t5_len` are zero) and `t5_len` `[B]` (u32, real tokens including `</s>`);
//! [`ClipTextEncoder`] writes `clip_text_pooled` `[B, hidden]` (`pooler_output`, not
//! projected). Both take cleaned captions and tokenize them as diffusers' PixArt and
//! Flux pipelines do ([`crate::tokenize`]).
//!
//! `weights` may name the text encoder's own directory (`config.json` +
//! `model.safetensors`, tokenizer beside it or in the pipeline's paired `tokenizer*/`
//! directory) or a diffusers pipeline root, where the first `text_encoder*/` of the
//! right architecture is taken (T5: `text_encoder_3`, `text_encoder_2`,
//! `text_encoder`; CLIP: `text_encoder`, `text_encoder_2`).
//!
//! T5 runs each batch at the length of its longest caption (not the padded `L`) with
//! the attention mask, then pads with zeros: the real rows equal what transformers
//! gives for the batch padded to `L` (the mask makes padding invisible), and the
//! work is proportional to the real tokens. CLIP is causal, so it runs up to the
//! furthest pooled position, which gives the same pooled vectors as 77 tokens.
//!
//! The empty caption's embedding ([`null_embedding`], [`T5TextEncoder::null_embedding`])
//! is what Flux reconditioning and conditioning dropout need. FluxPipeline itself
//! runs T5 without a mask over the padded ids; [`T5TextEncoder::encode_unmasked`]
//! reproduces that for callers that must match it.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use std::sync::Arc;

use tensorbake_kit::dtype::DType as Precision;
use tensorbake_kit::schema::{Array, Feature, NullInput};
use tensorbake_nn::Error as NnError;
use tensorbake_nn::clip_text::{ClipTextConfig, ClipTextModel};
use tensorbake_nn::loader::{WeightFiles, same_names};
use tensorbake_nn::ops::transfer::Staging;
use tensorbake_nn::t5::{T5Config, T5EncoderModel};
use tensorbake_nn::weights::{ModelDir, file_sha256, fingerprint};
use tensorbake_nn::{compute_dtype, parse_device};

use crate::tokenize::{TextTokenizer, TokenBatch, find_tokenizer, tokenizer_dirs};
use crate::{
    ArraySpec, EncodeError, Encoder, EncoderConfig, EncoderInfo, Input, Prepared, Result, Rgb8,
    chunked, concat_outputs, device_bytes,
};

/// T5's default maximum length: PixArt-α's 120 tokens.
pub const T5_DEFAULT_MAX_LENGTH: usize = 120;

fn architecture(v: &serde_json::Value) -> String {
    let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
    let arch = v
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .unwrap_or("");
    format!("{model_type} {arch}")
}

/// Finds the text encoder directory: `m` itself if its `config.json` is accepted,
/// else the first accepted `subdirs` entry of a pipeline root.
fn locate(
    m: &ModelDir,
    subdirs: &[&str],
    accept: impl Fn(&serde_json::Value) -> bool,
    what: &str,
) -> Result<(ModelDir, serde_json::Value)> {
    let mut seen = Vec::new();
    if m.file("config.json").is_some() {
        let v: serde_json::Value = m.json("config.json")?;
        if accept(&v) {
            return Ok((m.clone(), v));
        }
        seen.push(format!("config.json is `{}`", architecture(&v).trim()));
    }
    for s in subdirs {
        if let Some(sub) = m.sub(s)
            && sub.file("config.json").is_some()
        {
            let v: serde_json::Value = sub.json("config.json")?;
            if accept(&v) {
                return Ok((sub, v));
            }
            seen.push(format!("{s}/config.json is `{}`", architecture(&v).trim()));
        }
    }
    Err(NnError::WeightsNotFound {
        spec: m.spec.clone(),
        why: format!(
            "no {what} config.json in {} or its {} ({})",
            m.root.display(),
            subdirs.join(", "),
            if seen.is_empty() {
                "no config.json found".to_string()
            } else {
                seen.join("; ")
            }
        ),
    }
    .into())
}

fn candle(encoder: &str) -> impl Fn(candle_core::Error) -> EncodeError + '_ {
    EncodeError::candle(encoder)
}

/// Common state of the two text encoders.
struct Loaded {
    dir: ModelDir,
    config: serde_json::Value,
    weights: Arc<WeightFiles>,
    files: Vec<PathBuf>,
    tokenizer: TextTokenizer,
    device: Device,
    dtype: DType,
}

fn load(
    cfg: &EncoderConfig,
    subdirs: &[&str],
    accept: impl Fn(&serde_json::Value) -> bool,
    what: &str,
    default_pads: &[&str],
    t5: bool,
) -> Result<Loaded> {
    let root = ModelDir::resolve(&cfg.weights)?;
    let (dir, config) = locate(&root, subdirs, accept, what)?;
    let files = dir.safetensors(&["model"])?;
    let weights = Arc::new(WeightFiles::open(&files)?);
    let tokenizer = find_tokenizer(
        &tokenizer_dirs(&dir.root, std::slice::from_ref(&root.root)),
        &cfg.weights,
    )?
    .load(&cfg.weights, t5, default_pads)?;
    let device = parse_device(&cfg.device)?;
    let dtype = compute_dtype(cfg.dtype, &device)?;
    Ok(Loaded {
        dir,
        config,
        weights,
        files,
        tokenizer,
        device,
        dtype,
    })
}

fn bad_config(dir: &ModelDir, e: serde_json::Error) -> EncodeError {
    NnError::BadFile {
        path: dir.root.join("config.json"),
        why: format!("not a usable config: {e}"),
    }
    .into()
}

fn empty_batch(encoder: &str) -> EncodeError {
    EncodeError::BadInput {
        encoder: encoder.into(),
        why: "empty batch".into(),
    }
}

fn texts<'a>(input: Input<'a>, encoder: &str) -> Result<&'a [&'a str]> {
    match input {
        Input::Texts(t) if !t.is_empty() => Ok(t),
        Input::Texts(_) => Err(empty_batch(encoder)),
        Input::Images(_) => Err(EncodeError::BadInput {
            encoder: encoder.into(),
            why: "takes captions, was given images".into(),
        }),
    }
}

/// The `t5` feature: T5 encoder `last_hidden_state` with the attention mask.
pub struct T5TextEncoder {
    model: T5EncoderModel,
    tokenizer: TextTokenizer,
    max_length: usize,
    batch: usize,
    staging: Staging,
    dtype: DType,
    info: EncoderInfo,
}

impl T5TextEncoder {
    /// Loads the encoder a `[[encoders]]` table with `name = "t5"` describes.
    /// `max_length` defaults to [`T5_DEFAULT_MAX_LENGTH`]; `dtype = "f16"` is refused
    /// (T5 v1.1 overflows in f16: use bf16 or f32).
    pub fn load(cfg: &EncoderConfig) -> Result<Self> {
        if cfg.dtype == Precision::F16 {
            return Err(EncodeError::BadInput {
                encoder: "t5".into(),
                why: "f16 is not supported: T5 v1.1 activations overflow float16 (inf/NaN); \
                      use dtype bf16 (GPU) or f32"
                    .into(),
            });
        }
        let l = load(
            cfg,
            &["text_encoder_3", "text_encoder_2", "text_encoder"],
            |v| {
                v.get("model_type").and_then(|m| m.as_str()) == Some("t5")
                    || architecture(v).contains("T5")
            },
            "T5",
            &["<pad>"],
            true,
        )?;
        let t5cfg: T5Config =
            serde_json::from_value(l.config.clone()).map_err(|e| bad_config(&l.dir, e))?;
        let model = l
            .weights
            .build("t5", same_names(), l.dtype, &l.device, |vb| {
                T5EncoderModel::new(vb, &t5cfg)
            })?;
        let max_length = cfg.max_length.unwrap_or(T5_DEFAULT_MAX_LENGTH);
        if max_length <= l.tokenizer.special_tokens_added() {
            return Err(EncodeError::BadInput {
                encoder: "t5".into(),
                why: format!("max_length {max_length} leaves no room for text beside `</s>`"),
            });
        }
        let info = EncoderInfo {
            feature: Feature::T5,
            model: format!(
                "{} (T5EncoderModel, d_model {}, {} layers)",
                l.dir.spec, t5cfg.d_model, t5cfg.num_layers
            ),
            weights_sha256: fingerprint(&l.files)?,
            preprocess: json!({
                "max_length": max_length,
                "tokenizer": l.tokenizer.path().display().to_string(),
                "tokenizer_sha256": file_sha256(l.tokenizer.path())?,
                "padding": "max_length",
                "truncation": true,
                "add_special_tokens": true,
                "attention_mask": true,
                "rows_beyond_len": "zero",
                "dtype": format!("{:?}", l.dtype).to_lowercase(),
            }),
            arrays: vec![
                ArraySpec {
                    array: Array::T5Hidden,
                    shape: vec![max_length, t5cfg.d_model],
                },
                ArraySpec {
                    array: Array::T5Len,
                    shape: vec![],
                },
            ],
        };
        Ok(Self {
            model,
            tokenizer: l.tokenizer,
            max_length,
            batch: cfg.batch,
            staging: Staging::new(&l.device),
            dtype: l.dtype,
            info,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The padded length `L`.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenizes as diffusers does (padded to `L`, truncated keeping `</s>`).
    pub fn tokenize(&self, texts: &[&str]) -> Result<TokenBatch> {
        self.tokenizer.encode_batch(texts, self.max_length)
    }

    /// The model inputs of one chunk of captions, uploaded: ids and mask `[b, t]` at
    /// the chunk's longest caption, lengths `[b]`.
    fn prepare_chunk(&self, texts: &[&str]) -> Result<T5Chunk> {
        let err = candle("t5");
        let tb = self.tokenize(texts)?;
        let b = tb.len();
        let t = tb.lengths.iter().copied().max().unwrap_or(1).max(1);
        let ids: Vec<u32> = (0..b).flat_map(|i| tb.row(i)[..t].to_vec()).collect();
        let mask: Vec<f32> = tb
            .lengths
            .iter()
            .flat_map(|&n| (0..t).map(move |j| if j < n { 1.0 } else { 0.0 }))
            .collect();
        let lens: Vec<u32> = tb.lengths.iter().map(|&n| n as u32).collect();
        Ok(T5Chunk {
            ids: self.staging.upload(&ids, (b, t)).map_err(&err)?,
            mask: self.staging.upload(&mask, (b, t)).map_err(&err)?,
            lens: self.staging.upload(&lens, b).map_err(&err)?,
        })
    }

    /// `[hidden, lens]` of one prepared chunk, hidden padded with zeros to `L`.
    fn run_chunk(&self, c: &T5Chunk) -> Result<Vec<Tensor>> {
        let err = candle("t5");
        let (b, t) = c.ids.dims2().map_err(&err)?;
        let _span = tracing::debug_span!("t5", batch = b, tokens = t).entered();
        let hidden = self.model.forward(&c.ids, Some(&c.mask)).map_err(&err)?;
        let keep = c
            .mask
            .to_dtype(self.dtype)
            .map_err(&err)?
            .unsqueeze(2)
            .map_err(&err)?;
        let mut hidden = hidden.broadcast_mul(&keep).map_err(&err)?;
        if t < self.max_length {
            let d = self.model.config().d_model;
            let pad = Tensor::zeros(
                (b, self.max_length - t, d),
                self.dtype,
                self.staging.device(),
            )
            .map_err(&err)?;
            hidden = Tensor::cat(&[&hidden, &pad], 1).map_err(&err)?;
        }
        Ok(vec![hidden, c.lens.clone()])
    }

    /// `t5_hidden` `[B, L, d_model]` (zero beyond each length) and `t5_len` `[B]` (u32).
    pub fn encode_texts(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        let mut out = self.encode(Input::Texts(texts))?;
        let (_, lens) = out.pop().expect("two outputs");
        let (_, hidden) = out.pop().expect("two outputs");
        Ok((hidden, lens))
    }

    /// The empty caption's `t5_hidden` `[L, d_model]` and its `t5_len` (1: `</s>`).
    pub fn null_embedding(&self) -> Result<(Tensor, usize)> {
        let (h, _) = self.encode_texts(&[""])?;
        let n = self.tokenize(&[""])?.lengths[0];
        Ok((h.squeeze(0).map_err(candle("t5"))?, n))
    }

    /// T5 as FluxPipeline runs it: ids padded to `L`, no attention mask, every row
    /// kept (padding rows are not zero and captions influence each other's padding).
    /// `[B, L, d_model]`.
    pub fn encode_unmasked(&self, texts: &[&str]) -> Result<Tensor> {
        let err = candle("t5");
        let mut out = chunked(texts, self.batch, "t5", |c| {
            let tb = self.tokenize(c)?;
            let ids = self
                .staging
                .upload(&tb.ids, (c.len(), self.max_length))
                .map_err(&err)?;
            Ok(vec![self.model.forward(&ids, None).map_err(&err)?])
        })?;
        Ok(out.pop().expect("one output"))
    }
}

/// T5's inputs of one chunk, on its device.
struct T5Chunk {
    ids: Tensor,
    mask: Tensor,
    lens: Tensor,
}

impl Encoder for T5TextEncoder {
    fn prepare(&self, input: Input<'_>) -> Result<Prepared> {
        let texts = texts(input, "t5")?;
        let chunks = texts
            .chunks(self.batch.max(1))
            .map(|c| self.prepare_chunk(c))
            .collect::<Result<Vec<_>>>()?;
        let all: Vec<&Tensor> = chunks
            .iter()
            .flat_map(|c| [&c.ids, &c.mask, &c.lens])
            .collect();
        let bytes = device_bytes(&all);
        Ok(Prepared::new(Feature::T5, chunks, texts.len(), bytes))
    }

    fn run(&self, prepared: Prepared) -> Result<Vec<(Array, Tensor)>> {
        let chunks: Vec<T5Chunk> = prepared.take(Feature::T5)?;
        let parts = chunks
            .iter()
            .map(|c| self.run_chunk(c))
            .collect::<Result<Vec<_>>>()?;
        let mut out = concat_outputs(&parts, "t5")?;
        let (Some(lens), Some(hidden)) = (out.pop(), out.pop()) else {
            return Err(empty_batch("t5"));
        };
        Ok(vec![(Array::T5Hidden, hidden), (Array::T5Len, lens)])
    }

    fn device(&self) -> &Device {
        self.staging.device()
    }

    fn info(&self) -> EncoderInfo {
        self.info.clone()
    }

    fn takes_text(&self) -> bool {
        true
    }
}

/// The `clip_text` feature: CLIP text `pooler_output` (not projected).
pub struct ClipTextEncoder {
    model: ClipTextModel,
    tokenizer: TextTokenizer,
    max_length: usize,
    batch: usize,
    staging: Staging,
    info: EncoderInfo,
}

impl ClipTextEncoder {
    /// Loads the encoder a `[[encoders]]` table with `name = "clip_text"` describes.
    /// `max_length` defaults to the model's `max_position_embeddings` (77) and may not
    /// exceed it.
    pub fn load(cfg: &EncoderConfig) -> Result<Self> {
        let l = load(
            cfg,
            &["text_encoder", "text_encoder_2"],
            |v| {
                let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
                mt == "clip_text_model" || (mt == "clip" && v.get("text_config").is_some())
            },
            "CLIP text",
            &["<|endoftext|>"],
            false,
        )?;
        let ccfg = ClipTextConfig::from_json(&l.config).map_err(|e| bad_config(&l.dir, e))?;
        let model = l
            .weights
            .build("clip_text", same_names(), l.dtype, &l.device, |vb| {
                ClipTextModel::new(vb, &ccfg)
            })?;
        let max_length = cfg.max_length.unwrap_or(ccfg.max_position_embeddings);
        if max_length > ccfg.max_position_embeddings
            || max_length <= l.tokenizer.special_tokens_added()
        {
            return Err(EncodeError::BadInput {
                encoder: "clip_text".into(),
                why: format!(
                    "max_length {max_length} must be in {}..={} (max_position_embeddings)",
                    l.tokenizer.special_tokens_added() + 1,
                    ccfg.max_position_embeddings
                ),
            });
        }
        let info = EncoderInfo {
            feature: Feature::ClipText,
            model: format!(
                "{} (CLIPTextModel pooler_output, hidden {}, {} layers)",
                l.dir.spec, ccfg.hidden_size, ccfg.num_hidden_layers
            ),
            weights_sha256: fingerprint(&l.files)?,
            preprocess: json!({
                "max_length": max_length,
                "tokenizer": l.tokenizer.path().display().to_string(),
                "tokenizer_sha256": file_sha256(l.tokenizer.path())?,
                "padding": "max_length",
                "truncation": true,
                "add_special_tokens": true,
                "pooled": if ccfg.eos_token_id == 2 { "argmax(input_ids)" } else { "first eos_token_id" },
                "dtype": format!("{:?}", l.dtype).to_lowercase(),
            }),
            arrays: vec![ArraySpec {
                array: Array::ClipTextPooled,
                shape: vec![ccfg.hidden_size],
            }],
        };
        Ok(Self {
            model,
            tokenizer: l.tokenizer,
            max_length,
            batch: cfg.batch,
            staging: Staging::new(&l.device),
            info,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Tokenizes as diffusers does (padded to 77, truncated keeping the end token).
    pub fn tokenize(&self, texts: &[&str]) -> Result<TokenBatch> {
        self.tokenizer.encode_batch(texts, self.max_length)
    }

    /// The model inputs of one chunk of captions: ids `[b, t]` up to the furthest
    /// pooled position, uploaded, and each caption's pooled position.
    fn prepare_chunk(&self, texts: &[&str]) -> Result<ClipChunk> {
        let tb = self.tokenize(texts)?;
        let cfg = self.model.config();
        let pos: Vec<usize> = (0..tb.len())
            .map(|i| cfg.pooled_position(tb.row(i)))
            .collect();
        let t = pos.iter().copied().max().unwrap_or(0) + 1;
        let ids: Vec<u32> = (0..tb.len())
            .flat_map(|i| tb.row(i)[..t].to_vec())
            .collect();
        let ids = self
            .staging
            .upload(&ids, (texts.len(), t))
            .map_err(candle("clip_text"))?;
        Ok(ClipChunk { ids, pos })
    }

    /// `clip_text_pooled` `[B, hidden]`.
    pub fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let mut out = self.encode(Input::Texts(texts))?;
        Ok(out.pop().expect("one output").1)
    }

    /// The empty caption's `clip_text_pooled` `[hidden]`.
    pub fn null_embedding(&self) -> Result<Tensor> {
        self.encode_texts(&[""])?
            .squeeze(0)
            .map_err(candle("clip_text"))
    }
}

/// CLIP text's inputs of one chunk: ids on its device, pooled positions on the host.
struct ClipChunk {
    ids: Tensor,
    pos: Vec<usize>,
}

impl Encoder for ClipTextEncoder {
    fn prepare(&self, input: Input<'_>) -> Result<Prepared> {
        let texts = texts(input, "clip_text")?;
        let chunks = texts
            .chunks(self.batch.max(1))
            .map(|c| self.prepare_chunk(c))
            .collect::<Result<Vec<_>>>()?;
        let bytes = device_bytes(&chunks.iter().map(|c| &c.ids).collect::<Vec<_>>());
        Ok(Prepared::new(Feature::ClipText, chunks, texts.len(), bytes))
    }

    fn run(&self, prepared: Prepared) -> Result<Vec<(Array, Tensor)>> {
        let err = candle("clip_text");
        let chunks: Vec<ClipChunk> = prepared.take(Feature::ClipText)?;
        let parts = chunks
            .iter()
            .map(|c| {
                let (b, t) = c.ids.dims2().map_err(&err)?;
                let _span = tracing::debug_span!("clip_text", batch = b, tokens = t).entered();
                Ok(vec![self.model.pooled(&c.ids, &c.pos).map_err(&err)?])
            })
            .collect::<Result<Vec<_>>>()?;
        let pooled = concat_outputs(&parts, "clip_text")?
            .pop()
            .ok_or_else(|| empty_batch("clip_text"))?;
        Ok(vec![(Array::ClipTextPooled, pooled)])
    }

    fn device(&self) -> &Device {
        self.staging.device()
    }

    fn info(&self) -> EncoderInfo {
        self.info.clone()
    }

    fn takes_text(&self) -> bool {
        true
    }
}

/// The arrays an encoder writes for its feature's "nothing" input
/// ([`tensorbake_kit::schema::NullInput`]), without the batch axis (per-sample shapes
/// as in [`EncoderInfo::arrays`]): the empty caption `""` for text encoders, a black
/// `resolution` x `resolution` image (the pipeline's sample size, so it goes through
/// the same preprocessing as every sample) for SigLIP and CLIP. Conditioning dropout
/// and classifier-free guidance use them; `run` records them in the store.
///
/// # Errors
/// [`EncodeError::BadInput`] for a feature without a null input (the VAEs) or a zero
/// resolution for an image feature; the encoder's own errors.
pub fn null_embedding(encoder: &dyn Encoder, resolution: u32) -> Result<Vec<(Array, Tensor)>> {
    let info = encoder.info();
    let feature = info.feature;
    let bad = |why: String| EncodeError::BadInput {
        encoder: feature.name().to_string(),
        why,
    };
    let out = match feature.null_input() {
        Some(NullInput::EmptyCaption) => encoder.encode(Input::Texts(&[""]))?,
        Some(NullInput::BlackImage) => {
            if resolution == 0 {
                return Err(bad("a black image needs the pipeline resolution".into()));
            }
            let black = vec![0u8; resolution as usize * resolution as usize * 3];
            let img = [Rgb8 {
                width: resolution,
                height: resolution,
                pixels: &black,
            }];
            encoder.encode(Input::Images(&img))?
        }
        None => {
            return Err(bad(
                "has no null embedding: its feature records none (only SigLIP, CLIP and the text encoders do)"
                    .into(),
            ));
        }
    };
    out.into_iter()
        .map(|(name, t)| {
            let t = t.squeeze(0).map_err(EncodeError::candle(feature.name()))?;
            Ok((name, t))
        })
        .collect()
}
