//! Captions: PixArt-α's caption cleaning reproduced exactly, captioner-boilerplate
//! stripping, and the SA-1B caption index.
//!
//! [`CleanConfig`] is the manifest's `[captions]` table; [`CleanConfig::build`] gives
//! a [`Cleaner`] whose [`Cleaner::clean`] returns a [`CaptionOutcome`]: the cleaned
//! text, or a counted reason ([`CaptionOutcome::reason`]) why there is none.
//!
//! ```
//! use tensorbake_ingest::caption::{CaptionOutcome, CleanConfig};
//!
//! let cleaner = CleanConfig { strip_boilerplate: true, ..CleanConfig::default() }.build();
//! let out = cleaner.clean("The image shows a <b>red</b> bike &amp; a dog. Free shipping!");
//! assert_eq!(out, CaptionOutcome::Clean("a red bike a dog. !".into()));
//! assert_eq!(cleaner.clean_bytes(b"caf\xe9").reason(), "caption_invalid_utf8");
//! ```
//!
//! What "exactly" means, what of ftfy is reproduced, and the measured parity are in
//! `docs/captions.md`.

pub mod boilerplate;
mod ftfy;
mod html;
pub mod index;
mod pixart;
mod pyre;
#[rustfmt::skip]
mod tables;

use serde::{Deserialize, Serialize};

pub use boilerplate::strip_boilerplate;

/// Identifies the cleaning implementation, for recording beside cleaned captions.
pub const CLEANER_VERSION: &str =
    "tensorbake-pixart-clean-1 (diffusers 0.42 _clean_caption x2, ftfy 6.3.1, bs4 4.15.0)";

/// Caption handling settings: the manifest's `[captions]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanConfig {
    /// Apply PixArt-α's caption cleaning (diffusers' `_clean_caption`, twice), the
    /// preprocessing PixArt runs before T5. Off: the caption is only trimmed.
    pub clean: bool,
    /// Remove captioner lead-ins ("The image shows", "In this image, we can see",
    /// ...) before cleaning, and capitalise what follows when the caption was
    /// capitalised.
    pub strip_boilerplate: bool,
    /// Longest raw caption accepted, in bytes; longer ones are skipped as
    /// `caption_too_long` (real captions are a few hundred bytes; a megabyte of
    /// "caption" is a broken file, and cleaning is superlinear on some inputs).
    pub max_bytes: usize,
}

const fn default_max_bytes() -> usize {
    64 * 1024
}

impl Default for CleanConfig {
    fn default() -> Self {
        Self {
            clean: true,
            strip_boilerplate: false,
            max_bytes: default_max_bytes(),
        }
    }
}

impl CleanConfig {
    /// Builds the runtime cleaner. The patterns are compiled once per process and
    /// shared, so building is cheap after the first time.
    #[must_use]
    pub fn build(&self) -> Cleaner {
        Cleaner {
            config: self.clone(),
            pixart: self.clean.then(pixart::PixArt::get),
        }
    }
}

/// What cleaning one caption gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionOutcome {
    /// The caption to use.
    Clean(String),
    /// The raw caption is empty or only whitespace.
    Empty,
    /// Cleaning left nothing (e.g. a caption that was only a URL or a file name).
    EmptyAfterClean,
    /// The raw caption is longer than [`CleanConfig::max_bytes`].
    TooLong {
        /// Its length in bytes.
        bytes: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The raw caption is not UTF-8.
    InvalidUtf8 {
        /// Length of the valid prefix, in bytes.
        valid_up_to: usize,
    },
    /// The raw caption contains a NUL byte: a binary or corrupted file, not text.
    ContainsNul {
        /// Byte offset of the first NUL.
        offset: usize,
    },
    /// A pattern exceeded its backtracking budget on this (pathological) caption.
    RegexLimit,
}

impl CaptionOutcome {
    /// The snake_case reason counted in run reports (`"ok"` for a clean caption).
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Clean(_) => "ok",
            Self::Empty => "caption_empty",
            Self::EmptyAfterClean => "caption_empty_after_clean",
            Self::TooLong { .. } => "caption_too_long",
            Self::InvalidUtf8 { .. } => "caption_invalid_utf8",
            Self::ContainsNul { .. } => "caption_nul",
            Self::RegexLimit => "caption_regex_limit",
        }
    }

    /// The cleaned caption, if there is one.
    #[must_use]
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Clean(s) => Some(s),
            _ => None,
        }
    }

    /// Consumes the outcome, returning the cleaned caption if there is one.
    #[must_use]
    pub fn into_text(self) -> Option<String> {
        match self {
            Self::Clean(s) => Some(s),
            _ => None,
        }
    }
}

/// Cleans captions as configured. Cheap to clone; safe to share across threads.
#[derive(Debug, Clone)]
pub struct Cleaner {
    config: CleanConfig,
    pixart: Option<&'static pixart::PixArt>,
}

impl std::fmt::Debug for pixart::PixArt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PixArt")
    }
}

impl Cleaner {
    /// The configuration this cleaner was built from.
    #[must_use]
    pub fn config(&self) -> &CleanConfig {
        &self.config
    }

    /// Cleans a caption that arrives as bytes (a `.txt` member): invalid UTF-8 is a
    /// counted outcome, not an error.
    #[must_use]
    pub fn clean_bytes(&self, raw: &[u8]) -> CaptionOutcome {
        if raw.len() > self.config.max_bytes {
            return CaptionOutcome::TooLong {
                bytes: raw.len(),
                limit: self.config.max_bytes,
            };
        }
        match std::str::from_utf8(raw) {
            Ok(s) => self.clean(s),
            Err(e) => CaptionOutcome::InvalidUtf8 {
                valid_up_to: e.valid_up_to(),
            },
        }
    }

    /// Cleans one caption.
    #[must_use]
    pub fn clean(&self, raw: &str) -> CaptionOutcome {
        if raw.len() > self.config.max_bytes {
            return CaptionOutcome::TooLong {
                bytes: raw.len(),
                limit: self.config.max_bytes,
            };
        }
        if let Some(offset) = raw.find('\0') {
            return CaptionOutcome::ContainsNul { offset };
        }
        if pyre::py_strip(raw).is_empty() {
            return CaptionOutcome::Empty;
        }
        let stripped = if self.config.strip_boilerplate {
            strip_boilerplate(raw)
        } else {
            std::borrow::Cow::Borrowed(raw)
        };
        let cleaned = match self.pixart {
            Some(p) => match p.clean_twice(&stripped) {
                Ok(s) => s,
                Err(pyre::RegexLimit) => return CaptionOutcome::RegexLimit,
            },
            None => pyre::py_strip(&stripped).to_string(),
        };
        if cleaned.is_empty() {
            CaptionOutcome::EmptyAfterClean
        } else {
            CaptionOutcome::Clean(cleaned)
        }
    }

    /// PixArt's cleaning alone, exactly as the reference: no length, NUL or
    /// emptiness policy, no boilerplate stripping (the parity tests use this).
    /// `None` only when a pattern ran past its backtracking budget.
    #[must_use]
    pub fn pixart_reference(raw: &str) -> Option<String> {
        pixart::PixArt::get().clean_twice(raw).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_rejects_unknown_keys() {
        let cfg = CleanConfig {
            clean: false,
            strip_boilerplate: true,
            max_bytes: 100,
        };
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(toml::from_str::<CleanConfig>(&text).unwrap(), cfg);
        assert_eq!(
            toml::from_str::<CleanConfig>("").unwrap(),
            CleanConfig::default()
        );
        let err = toml::from_str::<CleanConfig>("strip_boilerplat = true").unwrap_err();
        assert!(err.to_string().contains("strip_boilerplat"), "{err}");
    }

    #[test]
    fn invalid_utf8_is_counted() {
        let c = CleanConfig::default().build();
        let out = c.clean_bytes(b"a caf\xe9 au lait");
        assert_eq!(out, CaptionOutcome::InvalidUtf8 { valid_up_to: 5 });
        assert_eq!(out.reason(), "caption_invalid_utf8");
        assert_eq!(out.text(), None);
    }

    #[test]
    fn empty_caption_is_counted() {
        let c = CleanConfig::default().build();
        assert_eq!(c.clean(""), CaptionOutcome::Empty);
        assert_eq!(c.clean(" \n\t\u{3000}"), CaptionOutcome::Empty);
        assert_eq!(c.clean_bytes(b""), CaptionOutcome::Empty);
        assert_eq!(c.clean("").reason(), "caption_empty");
        // Only a domain or a file name: the reference cleans it away.
        assert_eq!(c.clean("IMG_1234.JPG"), CaptionOutcome::EmptyAfterClean);
        let out = c.clean("www.shop.com");
        assert_eq!(out, CaptionOutcome::EmptyAfterClean);
        assert_eq!(out.reason(), "caption_empty_after_clean");
    }

    #[test]
    fn one_megabyte_caption_is_too_long() {
        let c = CleanConfig::default().build();
        let big = "a dog on a beach. ".repeat(1 << 20).into_bytes();
        let big = &big[..1 << 20];
        let out = c.clean_bytes(big);
        assert_eq!(
            out,
            CaptionOutcome::TooLong {
                bytes: 1 << 20,
                limit: 64 * 1024
            }
        );
        assert_eq!(out.reason(), "caption_too_long");
        // Raising the limit cleans it (and the result is the repeated sentence).
        let c = CleanConfig {
            max_bytes: 2 << 20,
            ..CleanConfig::default()
        }
        .build();
        let text = c.clean_bytes(big).into_text().unwrap();
        assert!(
            text.starts_with("a dog on a beach. a dog on a beach."),
            "{}",
            &text[..40]
        );
    }

    #[test]
    fn nul_bytes_are_counted() {
        let c = CleanConfig::default().build();
        let out = c.clean_bytes(b"a cat\0\0 on a mat");
        assert_eq!(out, CaptionOutcome::ContainsNul { offset: 5 });
        assert_eq!(out.reason(), "caption_nul");
    }

    #[test]
    fn clean_false_only_trims() {
        let c = CleanConfig {
            clean: false,
            ..CleanConfig::default()
        }
        .build();
        assert_eq!(
            c.clean("  A <b>Cat</b>  "),
            CaptionOutcome::Clean("A <b>Cat</b>".into())
        );
    }
}
