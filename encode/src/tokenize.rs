//! Tokenizers for the text encoders, as diffusers calls them.
//!
//! A [`TextTokenizer`] reads a fast tokenizer (`tokenizer.json`, the
//! [tokenizers](https://github.com/huggingface/tokenizers) format) and encodes a batch
//! the way PixArt's and Flux's pipelines call their tokenizers:
//! `padding="max_length", max_length=L, truncation=True, add_special_tokens=True`.
//! Truncation keeps room for the special tokens the post-processor adds (T5's `</s>`,
//! CLIP's `<|startoftext|>` / `<|endoftext|>`), so they survive truncation exactly as
//! with the Python tokenizer; padding uses the tokenizer's pad token.
//!
//! The tokenizer is looked for in the model directory and, for diffusers pipelines, in
//! the sibling `tokenizer/` or `tokenizer_2/` directory ([`find_tokenizer`]). A
//! directory with only a SentencePiece `spiece.model` (google/t5-v1_1-xxl, PixArt's
//! `tokenizer/`) works for T5, converted as transformers converts it
//! ([`crate::spm`]); for other encoders the error gives the one-line command that
//! writes the `tokenizer.json`.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationParams};

use tensorbake_nn::Error as NnError;

use crate::{EncodeError, Result};

/// A batch of token ids padded to one length, with the number of real tokens per row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// Row-major `[batch, max_length]` token ids, padded with the pad id.
    pub ids: Vec<u32>,
    /// Real tokens per row (the attention mask's sum), special tokens included.
    pub lengths: Vec<usize>,
    /// Padded row length.
    pub max_length: usize,
}

impl TokenBatch {
    /// The ids of row `i` (padding included).
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.max_length..(i + 1) * self.max_length]
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }
}

/// A fast tokenizer with its pad id, encoding batches as diffusers does.
#[derive(Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    pad_id: u32,
    n_special: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

/// Reads the pad token's text from `tokenizer_config.json` or `special_tokens_map.json`
/// in `dir` (a plain string or an `{"content": ...}` object).
fn configured_token(dir: &Path, key: &str) -> Option<String> {
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match v.get(key) {
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(serde_json::Value::Object(o)) => {
                if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                    return Some(s.to_string());
                }
            }
            _ => {}
        }
    }
    None
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `path`. The pad token is the one named in the
    /// directory's `tokenizer_config.json` / `special_tokens_map.json`, else the first
    /// of `default_pads` that the vocabulary has (T5: `<pad>`; CLIP: `<|endoftext|>`).
    pub fn from_file(path: &Path, default_pads: &[&str]) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| NnError::BadFile {
            path: path.to_path_buf(),
            why: format!("not a tokenizer.json: {e}"),
        })?;
        Self::new(tokenizer, path, default_pads)
    }

    /// Builds T5's fast tokenizer from a SentencePiece `spiece.model` as transformers'
    /// `T5Tokenizer` does ([`crate::spm`]), with the `extra_ids` of the directory's
    /// `tokenizer_config.json` (default 100) as `<extra_id_N>` sentinels.
    pub fn from_t5_spiece(path: &Path) -> Result<Self> {
        let bad = |why: String| NnError::BadFile {
            path: path.to_path_buf(),
            why,
        };
        let bytes = std::fs::read(path).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let extra_ids = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("extra_ids").and_then(serde_json::Value::as_u64))
            .map_or(100, |n| n as usize);
        let doc = crate::spm::t5_tokenizer_json(&bytes, extra_ids)
            .map_err(|e| bad(format!("not a T5 SentencePiece model: {}", e.0)))?;
        let tokenizer: Tokenizer = doc
            .to_string()
            .parse()
            .map_err(|e| bad(format!("converted tokenizer does not load: {e}")))?;
        Self::new(tokenizer, path, &["<pad>"])
    }

    fn new(mut tokenizer: Tokenizer, path: &Path, default_pads: &[&str]) -> Result<Self> {
        let bad = |why: String| NnError::BadFile {
            path: path.to_path_buf(),
            why,
        };
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| bad(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let configured = configured_token(dir, "pad_token");
        let candidates: Vec<&str> = configured
            .as_deref()
            .into_iter()
            .chain(default_pads.iter().copied())
            .collect();
        let pad_id = candidates
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .ok_or_else(|| {
                bad(format!(
                    "no pad token: none of {candidates:?} is in the vocabulary"
                ))
            })?;
        let n_special = tokenizer
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        Ok(Self {
            tokenizer,
            path: path.to_path_buf(),
            pad_id,
            n_special,
        })
    }

    /// The file this was read from (`tokenizer.json` or `spiece.model`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id rows are padded with.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of a token, if in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Special tokens the post-processor adds to one sequence (T5: 1, CLIP: 2).
    pub fn special_tokens_added(&self) -> usize {
        self.n_special
    }

    /// Tokenizes `texts` with special tokens, truncated to `max_length` (special tokens
    /// kept) and padded to `max_length` with the pad id.
    pub fn encode_batch(&self, texts: &[&str], max_length: usize) -> Result<TokenBatch> {
        if max_length <= self.n_special {
            return Err(NnError::BadFile {
                path: self.path.clone(),
                why: format!(
                    "max_length {max_length} leaves no room for text beside the {} special \
                     token(s) this tokenizer adds",
                    self.n_special
                ),
            }
            .into());
        }
        let mut tok = self.tokenizer.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| NnError::BadFile {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        let encodings = tok
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| NnError::BadFile {
                path: self.path.clone(),
                why: format!("tokenizing failed: {e}"),
            })?;
        let mut ids = vec![self.pad_id; texts.len() * max_length];
        let mut lengths = Vec::with_capacity(texts.len());
        for (i, enc) in encodings.iter().enumerate() {
            let row = enc.get_ids();
            let n = row.len().min(max_length);
            ids[i * max_length..i * max_length + n].copy_from_slice(&row[..n]);
            lengths.push(n);
        }
        Ok(TokenBatch {
            ids,
            lengths,
            max_length,
        })
    }
}

/// Where to look for a tokenizer: the model directory itself, then the pipeline's
/// tokenizer directory that pairs with it (`text_encoder` -> `tokenizer`,
/// `text_encoder_2` -> `tokenizer_2`, ...), then any `extra` directories.
pub fn tokenizer_dirs(model_dir: &Path, extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = vec![model_dir.to_path_buf()];
    if let (Some(name), Some(parent)) = (
        model_dir.file_name().and_then(|n| n.to_str()),
        model_dir.parent(),
    ) && let Some(suffix) = name.strip_prefix("text_encoder")
    {
        dirs.push(parent.join(format!("tokenizer{suffix}")));
    }
    for e in extra {
        if !dirs.contains(e) {
            dirs.push(e.clone());
        }
    }
    dirs
}

/// A tokenizer file found for a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerFile {
    /// A fast tokenizer, `tokenizer.json`.
    Json(PathBuf),
    /// Only a SentencePiece model (`spiece.model`), as google/t5-v1_1-xxl and
    /// PixArt's `tokenizer/` ship it.
    SentencePiece(PathBuf),
}

impl TokenizerFile {
    /// Loads it: `tokenizer.json` as is; a `spiece.model` converted as T5's when
    /// `t5` is set, else an error that says how to write a `tokenizer.json`.
    pub fn load(&self, model: &str, t5: bool, default_pads: &[&str]) -> Result<TextTokenizer> {
        match self {
            Self::Json(p) => TextTokenizer::from_file(p, default_pads),
            Self::SentencePiece(p) if t5 => TextTokenizer::from_t5_spiece(p),
            Self::SentencePiece(p) => Err(spiece_error(p, model)),
        }
    }
}

fn spiece_error(sp: &Path, model: &str) -> EncodeError {
    let dir = sp.parent().unwrap_or(Path::new(".")).display().to_string();
    EncodeError::Model(NnError::WeightsNotFound {
        spec: model.to_string(),
        why: format!(
            "the tokenizer in {dir} is a SentencePiece model ({}) without tokenizer.json, \
             which only the t5 encoder converts itself; write the fast tokenizer once with \
             `python -c \"from transformers import AutoTokenizer; \
             AutoTokenizer.from_pretrained('{dir}').save_pretrained('{dir}')\"` \
             (needs transformers, sentencepiece and protobuf)",
            sp.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("spiece.model"),
        ),
    })
}

/// The first tokenizer among `dirs`: a directory's `tokenizer.json` is preferred to
/// its `spiece.model` / `tokenizer.model`, and earlier directories to later ones.
/// None at all is an error listing the directories searched.
pub fn find_tokenizer(dirs: &[PathBuf], model: &str) -> Result<TokenizerFile> {
    for d in dirs {
        let json = d.join("tokenizer.json");
        if json.is_file() {
            return Ok(TokenizerFile::Json(json));
        }
        for sp in ["spiece.model", "tokenizer.model"] {
            if d.join(sp).is_file() {
                return Ok(TokenizerFile::SentencePiece(d.join(sp)));
            }
        }
    }
    Err(NnError::WeightsNotFound {
        spec: model.to_string(),
        why: format!(
            "no tokenizer.json or spiece.model in {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_tokenizer_dirs_pair_with_text_encoders() {
        let d = tokenizer_dirs(Path::new("/p/text_encoder_2"), &[]);
        assert_eq!(
            d,
            vec![
                PathBuf::from("/p/text_encoder_2"),
                PathBuf::from("/p/tokenizer_2")
            ]
        );
        let d = tokenizer_dirs(Path::new("/p/text_encoder"), &[PathBuf::from("/x")]);
        assert_eq!(
            d,
            vec![
                PathBuf::from("/p/text_encoder"),
                PathBuf::from("/p/tokenizer"),
                PathBuf::from("/x")
            ]
        );
        assert_eq!(
            tokenizer_dirs(Path::new("/m"), &[]),
            vec![PathBuf::from("/m")]
        );
    }
}
