//! The element types tensorbake computes in and stores, under one vocabulary.
//!
//! One [`DType`] serves manifests and flags (`dtype = "bf16"`, `store_dtype = "f16"`),
//! the store (its Zarr v3 `data_type` names: `bfloat16`, `float16`, ...) and, with
//! the `candle` feature, candle (`DType::candle`). Both spellings are accepted
//! wherever a dtype is read; a dtype is written under its Zarr name in store metadata
//! and under its short name ([`DType::short_name`]) where people read it.
//!
//! ```
//! use tensorbake_kit::dtype::DType;
//! assert_eq!("bf16".parse::<DType>().unwrap(), DType::Bf16);
//! assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::Bf16);
//! assert_eq!(DType::Bf16.zarr_name(), "bfloat16");
//! assert!(DType::Bf16.is_float() && !DType::U32.is_float());
//! ```

use serde::{Deserialize, Serialize};

/// An element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit float (reference precision; the CPU default; VAE latent moments).
    #[default]
    #[serde(rename = "float32", alias = "f32")]
    F32,
    /// bfloat16 (the GPU compute default; embeddings in the store, as the
    /// zarr-extensions `bfloat16` data type).
    #[serde(rename = "bfloat16", alias = "bf16")]
    Bf16,
    /// IEEE half (halves the latents in the store).
    #[serde(rename = "float16", alias = "f16", alias = "half")]
    F16,
    /// Unsigned 16-bit integers (read back as candle `U32`: candle has no u16).
    #[serde(rename = "uint16", alias = "u16")]
    U16,
    /// Unsigned 32-bit integers (token counts, sizes).
    #[serde(rename = "uint32", alias = "u32")]
    U32,
}

impl DType {
    /// Every dtype.
    pub const ALL: [Self; 5] = [Self::F32, Self::Bf16, Self::F16, Self::U16, Self::U32];

    /// Bytes per element.
    #[must_use]
    pub const fn size(self) -> usize {
        match self {
            Self::Bf16 | Self::F16 | Self::U16 => 2,
            Self::F32 | Self::U32 => 4,
        }
    }

    /// The Zarr v3 `data_type` name (`bfloat16`, `float16`, `float32`, `uint16`, `uint32`).
    #[must_use]
    pub const fn zarr_name(self) -> &'static str {
        match self {
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
            Self::F32 => "float32",
            Self::U16 => "uint16",
            Self::U32 => "uint32",
        }
    }

    /// The short name manifests and flags use (`bf16`, `f16`, `f32`, `u16`, `u32`).
    #[must_use]
    pub const fn short_name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::F32 => "f32",
            Self::U16 => "u16",
            Self::U32 => "u32",
        }
    }

    /// The dtype of a Zarr v3 `data_type` name, if tensorbake writes it.
    #[must_use]
    pub fn from_zarr_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.zarr_name() == name)
    }

    /// Whether this is a floating-point type.
    #[must_use]
    pub const fn is_float(self) -> bool {
        matches!(self, Self::Bf16 | Self::F16 | Self::F32)
    }

    /// The candle dtype tensors of this type have. `U16` maps to `U32` (widened on
    /// read) because candle has no 16-bit unsigned type.
    #[cfg(feature = "candle")]
    #[must_use]
    pub const fn candle(self) -> candle_core::DType {
        match self {
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
            Self::F32 => candle_core::DType::F32,
            Self::U16 | Self::U32 => candle_core::DType::U32,
        }
    }

    /// The dtype of a candle dtype, if tensorbake has one for it.
    #[cfg(feature = "candle")]
    #[must_use]
    pub const fn from_candle(d: candle_core::DType) -> Option<Self> {
        Some(match d {
            candle_core::DType::BF16 => Self::Bf16,
            candle_core::DType::F16 => Self::F16,
            candle_core::DType::F32 => Self::F32,
            candle_core::DType::U32 => Self::U32,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.zarr_name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        let alias = match lower.as_str() {
            "half" => Some(Self::F16),
            _ => None,
        };
        alias
            .or_else(|| {
                Self::ALL
                    .into_iter()
                    .find(|d| d.short_name() == lower || d.zarr_name() == lower)
            })
            .ok_or_else(|| {
                format!("unknown dtype `{s}` (f32, bf16 or f16; u16, u32 for integer arrays)")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_parse_and_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.short_name().parse::<DType>().unwrap(), d);
            assert_eq!(d.zarr_name().parse::<DType>().unwrap(), d);
            assert_eq!(DType::from_zarr_name(d.zarr_name()), Some(d));
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.zarr_name()));
            let short: DType = serde_json::from_str(&format!("\"{}\"", d.short_name())).unwrap();
            assert_eq!(short, d);
        }
        assert_eq!("BF16".parse::<DType>().unwrap(), DType::Bf16);
        assert_eq!("half".parse::<DType>().unwrap(), DType::F16);
        assert!("int8".parse::<DType>().unwrap_err().contains("int8"));
        assert!(serde_json::from_str::<DType>("\"int8\"").is_err());
    }
}
