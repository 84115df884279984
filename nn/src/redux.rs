//! The Flux Redux image adapter: SigLIP image tokens to T5-width text tokens.
//!
//! Reference: Black Forest Labs' FLUX.1 Redux
//! (<https://huggingface.co/black-forest-labs/FLUX.1-Redux-dev>, code in
//! <https://github.com/black-forest-labs/flux/blob/main/src/flux/modules/image_embedders.py>)
//! and diffusers' `ReduxImageEncoder`
//! (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/flux/modeling_flux.py>).
//!
//! `redux_down(silu(redux_up(x)))`: `redux_up` is `Linear(redux_dim, 3 * txt_in_features)`
//! and `redux_down` `Linear(3 * txt_in_features, txt_in_features)`, both with bias. For
//! FLUX.1-Redux-dev `redux_dim = 1152` (SigLIP so400m's `last_hidden_state` width) and
//! `txt_in_features = 4096` (T5-XXL's width, which is also PixArt-α's
//! `caption_channels`). BFL's single file and diffusers' `image_embedder/` use the same
//! tensor names. Loading and saving are in [`io`].

pub mod io;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::layers::Linear;
use crate::{Error, Result as NnResult};

pub use io::{load_redux, save_diffusers, save_safetensors};

/// The `config.json` of diffusers' `ReduxImageEncoder` (defaults: FLUX.1-Redux-dev).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Config {
    /// Width of the image tokens in (SigLIP so400m: 1152).
    #[serde(default = "d_redux_dim")]
    pub redux_dim: usize,
    /// Width of the text tokens out (T5-XXL: 4096).
    #[serde(default = "d_txt")]
    pub txt_in_features: usize,
}

const fn d_redux_dim() -> usize {
    1152
}
const fn d_txt() -> usize {
    4096
}

impl Default for Config {
    fn default() -> Self {
        Self::flux_redux_dev()
    }
}

impl Config {
    /// FLUX.1-Redux-dev: 1152 -> 12288 -> 4096.
    #[must_use]
    pub const fn flux_redux_dev() -> Self {
        Self {
            redux_dim: 1152,
            txt_in_features: 4096,
        }
    }

    /// The config implied by the shapes of `redux_up.weight` (`[3 t, r]`) and
    /// `redux_down.weight` (`[t, 3 t]`), `None` when they do not fit together.
    #[must_use]
    pub fn from_shapes(up: &[usize], down: &[usize]) -> Option<Self> {
        match (up, down) {
            ([h, r], [t, h2]) if h == h2 && *h == 3 * t && *t > 0 && *r > 0 => Some(Self {
                redux_dim: *r,
                txt_in_features: *t,
            }),
            _ => None,
        }
    }

    /// Checks that the adapter sits between image tokens of width `image_width` (the
    /// store's `siglip_hidden`) and a model taking text tokens of width `text_width`
    /// (PixArt's `caption_channels`, Flux's `joint_attention_dim`).
    ///
    /// # Errors
    /// [`Error::Incompatible`] naming both widths and what they come from.
    pub fn check_widths(&self, image_width: usize, text_width: usize, model: &str) -> NnResult<()> {
        let what = format!("redux adapter -> {model}");
        if self.redux_dim != image_width {
            return Err(Error::Incompatible {
                what,
                why: format!(
                    "the adapter takes image tokens of width {} (redux_dim), the store's SigLIP \
                     tokens have width {image_width}",
                    self.redux_dim
                ),
            });
        }
        if self.txt_in_features != text_width {
            return Err(Error::Incompatible {
                what,
                why: format!(
                    "the adapter makes tokens of width {} (txt_in_features), {model} takes caption \
                     tokens of width {text_width}",
                    self.txt_in_features
                ),
            });
        }
        Ok(())
    }
}

/// The Redux adapter (`redux_up`, `redux_down`).
#[derive(Debug, Clone)]
pub struct Redux {
    up: Linear,
    down: Linear,
    cfg: Config,
}

impl Redux {
    /// Builds the adapter from `redux_up.*` / `redux_down.*` under `vb` (frozen,
    /// trainable or fresh: the `VarBuilder` decides).
    ///
    /// # Errors
    /// A missing or misshapen tensor.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let hidden = 3 * cfg.txt_in_features;
        Ok(Self {
            up: Linear::new(cfg.redux_dim, hidden, vb.pp("redux_up"))?,
            down: Linear::new(hidden, cfg.txt_in_features, vb.pp("redux_down"))?,
            cfg: *cfg,
        })
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Every weight under its (BFL = diffusers) name.
    #[must_use]
    pub fn tensors(&self) -> std::collections::BTreeMap<String, Tensor> {
        let mut out = std::collections::BTreeMap::new();
        for (name, l) in [("redux_up", &self.up), ("redux_down", &self.down)] {
            out.insert(format!("{name}.weight"), l.weight().clone());
            if let Some(b) = l.bias() {
                out.insert(format!("{name}.bias"), b.clone());
            }
        }
        out
    }
}

impl Module for Redux {
    /// `x` `[..., redux_dim]` to `[..., txt_in_features]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.up.forward(x)?.silu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_shapes_and_width_checks() {
        let c: Config = serde_json::from_str(
            r#"{"_class_name": "ReduxImageEncoder", "_diffusers_version": "0.32.0.dev0"}"#,
        )
        .unwrap();
        assert_eq!(c, Config::flux_redux_dev());
        assert_eq!(
            Config::from_shapes(&[12288, 1152], &[4096, 12288]),
            Some(Config::flux_redux_dev())
        );
        assert_eq!(Config::from_shapes(&[100, 1152], &[4096, 100]), None);
        c.check_widths(1152, 4096, "pixart").unwrap();
        let e = c.check_widths(768, 4096, "pixart").unwrap_err().to_string();
        assert!(e.contains("768") && e.contains("1152"), "{e}");
        let e = c
            .check_widths(1152, 2048, "pixart")
            .unwrap_err()
            .to_string();
        assert!(e.contains("2048") && e.contains("txt_in_features"), "{e}");
    }
}
