//! The feature schema: every feature tensorbake computes, the arrays it writes, their
//! element types and shape rules, and the "nothing" input whose embedding the store
//! records for it. One definition, used by the encoders (array names), `run` (store
//! dtypes, null embeddings), the store spec (shape checks) and the trainer (which
//! arrays a mode reads). Adding a feature is one edit here (the compiler then points
//! at every `match` that must learn it); a misspelt array name does not compile.
//!
//! | feature | arrays | null input |
//! |---|---|---|
//! | `sd_vae` | `sd_vae_mean`, `sd_vae_std` `[4, h, w]` | - |
//! | `flux_vae` | `flux_vae_mean`, `flux_vae_std` `[16, h, w]` | - |
//! | `siglip` | `siglip_hidden` `[patches, width]` | black image |
//! | `clip_vision` | `clip_image_embeds` `[width]` | black image |
//! | `t5` | `t5_hidden` `[max_length, width]`, `t5_len` `[]` (u32) | empty caption |
//! | `clip_text` | `clip_text_pooled` `[width]` | empty caption |
//!
//! ```
//! use tensorbake_kit::schema::{Array, Feature};
//! assert_eq!(Feature::from_name("siglip"), Some(Feature::Siglip));
//! assert_eq!(Feature::T5.arrays(), &[Array::T5Hidden, Array::T5Len]);
//! assert_eq!(Array::T5Len.name(), "t5_len");
//! assert!(!Array::T5Len.is_float());
//! ```

use crate::dtype::DType;

/// A feature: one frozen encoder's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// SD's VAE (sd-vae-ft-ema, PixArt-α): posterior moments, 4 channels.
    SdVae,
    /// The Flux autoencoder: posterior moments, 16 channels.
    FluxVae,
    /// SigLIP so400m vision tower `last_hidden_state` (the Redux adapter's input).
    Siglip,
    /// CLIP ViT-L/14 projected image embedding (Flux's pooled slot when reconditioned).
    ClipVision,
    /// T5 v1.1 encoder `last_hidden_state` with its length.
    T5,
    /// CLIP ViT-L/14 text `pooler_output`.
    ClipText,
}

/// What a feature's encoder takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// RGB images at the pipeline resolution.
    Image,
    /// Cleaned captions.
    Text,
}

/// The input standing for "no condition", whose embedding conditioning dropout and
/// classifier-free guidance use; the store records it under `null/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullInput {
    /// The empty caption `""`.
    EmptyCaption,
    /// A black image at the pipeline resolution, preprocessed as every sample.
    BlackImage,
}

impl NullInput {
    /// How the store names it (`null/` attributes, `inspect`).
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::EmptyCaption => "empty caption",
            Self::BlackImage => "black image",
        }
    }
}

impl Feature {
    /// Every feature, in the order the docs list them.
    pub const ALL: [Self; 6] = [
        Self::SdVae,
        Self::FluxVae,
        Self::Siglip,
        Self::ClipVision,
        Self::T5,
        Self::ClipText,
    ];

    /// The name manifests and the store use.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SdVae => "sd_vae",
            Self::FluxVae => "flux_vae",
            Self::Siglip => "siglip",
            Self::ClipVision => "clip_vision",
            Self::T5 => "t5",
            Self::ClipText => "clip_text",
        }
    }

    /// The feature of a name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The known names, comma-separated (for messages).
    #[must_use]
    pub fn known_names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// The closest known name to a misspelt one (edit distance at most 3).
    #[must_use]
    pub fn suggest(name: &str) -> Option<Self> {
        let name = name.to_lowercase();
        Self::ALL
            .into_iter()
            .map(|f| (edit_distance(&name, f.name()), f))
            .min_by_key(|(d, f)| (*d, f.name()))
            .filter(|(d, _)| *d <= 3)
            .map(|(_, f)| f)
    }

    /// What the encoder takes.
    #[must_use]
    pub const fn input(self) -> Input {
        match self {
            Self::T5 | Self::ClipText => Input::Text,
            _ => Input::Image,
        }
    }

    /// The arrays it writes per sample, in output order.
    #[must_use]
    pub const fn arrays(self) -> &'static [Array] {
        match self {
            Self::SdVae => &[Array::SdVaeMean, Array::SdVaeStd],
            Self::FluxVae => &[Array::FluxVaeMean, Array::FluxVaeStd],
            Self::Siglip => &[Array::SiglipHidden],
            Self::ClipVision => &[Array::ClipImageEmbeds],
            Self::T5 => &[Array::T5Hidden, Array::T5Len],
            Self::ClipText => &[Array::ClipTextPooled],
        }
    }

    /// The "nothing" input whose embedding the store records, if any (VAE latents of
    /// nothing are never needed).
    #[must_use]
    pub const fn null_input(self) -> Option<NullInput> {
        match self {
            Self::SdVae | Self::FluxVae => None,
            Self::Siglip | Self::ClipVision => Some(NullInput::BlackImage),
            Self::T5 | Self::ClipText => Some(NullInput::EmptyCaption),
        }
    }

    /// The dtype float arrays are stored in unless the manifest says otherwise:
    /// f32 for latent moments (they are small and sampled from), bf16 for embeddings.
    #[must_use]
    pub const fn default_store_dtype(self) -> DType {
        match self {
            Self::SdVae | Self::FluxVae => DType::F32,
            _ => DType::Bf16,
        }
    }

    /// Latent channels of a VAE feature.
    #[must_use]
    pub const fn latent_channels(self) -> Option<usize> {
        match self {
            Self::SdVae => Some(4),
            Self::FluxVae => Some(16),
            _ => None,
        }
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The shape rule of an array, per sample (without the sample axis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeRule {
    /// `[channels, resolution / 8, resolution / 8]`: VAE posterior moments.
    Latent {
        /// Latent channels.
        channels: usize,
    },
    /// `[tokens, width]`: a token sequence (SigLIP patches; T5 padded to max_length).
    Tokens,
    /// `[width]`: one vector.
    Vector,
    /// `[]`: one scalar.
    Scalar,
}

impl ShapeRule {
    /// Checks a per-sample shape against the rule; the error says what was expected.
    ///
    /// # Errors
    /// A sentence naming the expected form.
    pub fn check(self, shape: &[u64]) -> Result<(), String> {
        let ok = match self {
            Self::Latent { channels } => shape.len() == 3 && shape[0] == channels as u64,
            Self::Tokens => shape.len() == 2,
            Self::Vector => shape.len() == 1,
            Self::Scalar => shape.is_empty(),
        };
        if ok {
            return Ok(());
        }
        let want = match self {
            Self::Latent { channels } => format!("[{channels}, h, w]"),
            Self::Tokens => "[tokens, width]".into(),
            Self::Vector => "[width]".into(),
            Self::Scalar => "[] (one scalar)".into(),
        };
        Err(format!("shape {shape:?}, expected {want}"))
    }
}

/// A feature array, as named in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Array {
    /// `sd_vae_mean` `[4, h, w]`.
    SdVaeMean,
    /// `sd_vae_std` `[4, h, w]`.
    SdVaeStd,
    /// `flux_vae_mean` `[16, h, w]`.
    FluxVaeMean,
    /// `flux_vae_std` `[16, h, w]`.
    FluxVaeStd,
    /// `siglip_hidden` `[729, 1152]` for so400m at 384.
    SiglipHidden,
    /// `clip_image_embeds` `[768]` for ViT-L/14.
    ClipImageEmbeds,
    /// `t5_hidden` `[max_length, 4096]`, zero beyond `t5_len`.
    T5Hidden,
    /// `t5_len` `[]` u32: real tokens, `</s>` included.
    T5Len,
    /// `clip_text_pooled` `[768]`.
    ClipTextPooled,
}

impl Array {
    /// Every feature array.
    pub const ALL: [Self; 9] = [
        Self::SdVaeMean,
        Self::SdVaeStd,
        Self::FluxVaeMean,
        Self::FluxVaeStd,
        Self::SiglipHidden,
        Self::ClipImageEmbeds,
        Self::T5Hidden,
        Self::T5Len,
        Self::ClipTextPooled,
    ];

    /// The name in the store.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SdVaeMean => "sd_vae_mean",
            Self::SdVaeStd => "sd_vae_std",
            Self::FluxVaeMean => "flux_vae_mean",
            Self::FluxVaeStd => "flux_vae_std",
            Self::SiglipHidden => "siglip_hidden",
            Self::ClipImageEmbeds => "clip_image_embeds",
            Self::T5Hidden => "t5_hidden",
            Self::T5Len => "t5_len",
            Self::ClipTextPooled => "clip_text_pooled",
        }
    }

    /// The array of a store name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The feature that writes it.
    #[must_use]
    pub const fn feature(self) -> Feature {
        match self {
            Self::SdVaeMean | Self::SdVaeStd => Feature::SdVae,
            Self::FluxVaeMean | Self::FluxVaeStd => Feature::FluxVae,
            Self::SiglipHidden => Feature::Siglip,
            Self::ClipImageEmbeds => Feature::ClipVision,
            Self::T5Hidden | Self::T5Len => Feature::T5,
            Self::ClipTextPooled => Feature::ClipText,
        }
    }

    /// Whether its elements are floats (stored in the feature's store dtype) rather
    /// than counts (always `uint32`).
    #[must_use]
    pub const fn is_float(self) -> bool {
        !matches!(self, Self::T5Len)
    }

    /// The dtype it is stored in, given the feature's float store dtype.
    #[must_use]
    pub const fn store_dtype(self, float: DType) -> DType {
        if self.is_float() { float } else { DType::U32 }
    }

    /// Its shape rule.
    #[must_use]
    pub const fn shape_rule(self) -> ShapeRule {
        match self {
            Self::SdVaeMean | Self::SdVaeStd => ShapeRule::Latent { channels: 4 },
            Self::FluxVaeMean | Self::FluxVaeStd => ShapeRule::Latent { channels: 16 },
            Self::SiglipHidden | Self::T5Hidden => ShapeRule::Tokens,
            Self::ClipImageEmbeds | Self::ClipTextPooled => ShapeRule::Vector,
            Self::T5Len => ShapeRule::Scalar,
        }
    }
}

impl std::fmt::Display for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A feature or array compares equal to its store name (`Array::T5Len == "t5_len"`).
macro_rules! eq_name {
    ($t:ty) => {
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.name() == *other
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.name() == other
            }
        }
    };
}
eq_name!(Feature);
eq_name!(Array);

/// Levenshtein distance (for "did you mean").
#[must_use]
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_arrays_belong_to_their_feature() {
        for f in Feature::ALL {
            assert_eq!(Feature::from_name(f.name()), Some(f));
            for a in f.arrays() {
                assert_eq!(a.feature(), f);
            }
        }
        for a in Array::ALL {
            assert_eq!(Array::from_name(a.name()), Some(a));
            assert!(a.feature().arrays().contains(&a));
        }
        assert_eq!(Feature::from_name("siglib"), None);
    }

    #[test]
    fn suggestions_use_edit_distance() {
        assert_eq!(edit_distance("siglib", "siglip"), 1);
        assert_eq!(edit_distance("t5", "t5"), 0);
        assert_eq!(edit_distance("clip_visoin", "clip_vision"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(Feature::suggest("SIGLIB"), Some(Feature::Siglip));
        assert_eq!(Feature::suggest("clip_visoin"), Some(Feature::ClipVision));
        assert_eq!(Feature::suggest("resnet50"), None);
    }

    #[test]
    fn shape_rules_and_dtypes() {
        assert!(Array::SdVaeMean.shape_rule().check(&[4, 32, 32]).is_ok());
        let e = Array::SdVaeMean
            .shape_rule()
            .check(&[16, 32, 32])
            .unwrap_err();
        assert!(e.contains("[4, h, w]"), "{e}");
        assert!(Array::T5Len.shape_rule().check(&[]).is_ok());
        assert!(Array::ClipImageEmbeds.shape_rule().check(&[2, 3]).is_err());
        assert_eq!(Array::T5Len.store_dtype(DType::Bf16), DType::U32);
        assert_eq!(Array::T5Hidden.store_dtype(DType::Bf16), DType::Bf16);
        assert_eq!(Feature::SdVae.default_store_dtype(), DType::F32);
        assert_eq!(Feature::Siglip.null_input(), Some(NullInput::BlackImage));
        assert_eq!(Feature::SdVae.null_input(), None);
    }
}
