//! Activation functions as transformers and diffusers name them (`ACT2FN`), each a
//! candle op with a backward.

use candle_core::{Result, Tensor};

/// An activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `relu`.
    Relu,
    /// `gelu` (exact, erf).
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast` (tanh approximation).
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (CLIP).
    QuickGelu,
}

impl Activation {
    /// Parses a transformers activation name.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "relu" => Self::Relu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "silu" | "swish" => Self::Silu,
            "quick_gelu" => Self::QuickGelu,
            _ => return None,
        })
    }

    /// Applies the activation.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Silu => x.silu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Activation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown activation `{name}` (relu, gelu, gelu_new, gelu_pytorch_tanh, silu, quick_gelu)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_are_named() {
        assert_eq!(
            Activation::parse("gelu_pytorch_tanh"),
            Some(Activation::GeluTanh)
        );
        assert_eq!(Activation::parse("swish"), Some(Activation::Silu));
        let e = serde_json::from_str::<Activation>("\"mish\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mish"), "{e}");
    }
}
