//! BFL's single-file layout (`flux1-dev.safetensors`, `flux1-schnell.safetensors`, the
//! checkpoints of `black-forest-labs/flux` and ComfyUI) served under diffusers' names.
//!
//! The model asks for diffusers names; [`bfl_source`] says where each comes from. The
//! rules (the inverse is diffusers' `convert_flux_transformer_checkpoint_to_diffusers`):
//!
//! | diffusers | BFL |
//! |---|---|
//! | `x_embedder`, `context_embedder` | `img_in`, `txt_in` |
//! | `time_text_embed.{timestep,text,guidance}_embedder.linear_{1,2}` | `{time,vector,guidance}_in.{in,out}_layer` |
//! | `transformer_blocks.N.norm1.linear`, `.norm1_context.linear` | `double_blocks.N.img_mod.lin`, `.txt_mod.lin` |
//! | `….attn.to_{q,k,v}` | rows `[0, D)`, `[D, 2D)`, `[2D, 3D)` of `….img_attn.qkv` |
//! | `….attn.add_{q,k,v}_proj` | the same rows of `….txt_attn.qkv` |
//! | `….attn.norm_{q,k}.weight`, `.norm_added_{q,k}.weight` | `….{img,txt}_attn.norm.{query,key}_norm.scale` |
//! | `….attn.to_out.0`, `.to_add_out` | `….img_attn.proj`, `.txt_attn.proj` |
//! | `….ff.net.{0.proj,2}`, `.ff_context.net.{0.proj,2}` | `….img_mlp.{0,2}`, `.txt_mlp.{0,2}` |
//! | `single_transformer_blocks.N.norm.linear` | `single_blocks.N.modulation.lin` |
//! | `….attn.to_{q,k,v}`, `.proj_mlp` | rows `[0, D)`, `[D, 2D)`, `[2D, 3D)`, `[3D, 7D)` of `….linear1` |
//! | `….attn.norm_{q,k}.weight` | `….norm.{query,key}_norm.scale` |
//! | `….proj_out` | `….linear2` |
//! | `proj_out` | `final_layer.linear` |
//! | `norm_out.linear` (`scale, shift`) | `final_layer.adaLN_modulation.1` (`shift, scale`: halves swapped) |
//!
//! Names may carry ComfyUI's `model.diffusion_model.` prefix. A fused tensor is read
//! once (checked against its full shape: an error names the BFL tensor and the file) and
//! its parts are row views of it, so loading costs no copy. The config of a bare file
//! comes from its shapes ([`config_from_bfl`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use super::Config;
use crate::loader::{NameMap, Trainable, WeightFiles};
use crate::{Error, Result};

/// The prefix ComfyUI-style checkpoints put before every transformer tensor.
pub const PREFIX: &str = "model.diffusion_model.";

/// Which part of a BFL tensor a diffusers tensor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// All of it.
    Whole,
    /// Rows `start .. start + len` (axis 0) of a tensor with `total` rows (fused q, k, v
    /// and MLP input projections).
    Rows {
        /// First row.
        start: usize,
        /// Rows taken.
        len: usize,
        /// Rows of the stored tensor.
        total: usize,
    },
    /// The two halves of axis 0 swapped (the final modulation: BFL stores shift first,
    /// diffusers scale first).
    SwapHalves,
}

/// Where a diffusers tensor lives in a BFL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BflSource {
    /// The BFL tensor name (without [`PREFIX`]).
    pub tensor: String,
    /// The part of it.
    pub part: Part,
}

fn whole(tensor: String) -> BflSource {
    BflSource {
        tensor,
        part: Part::Whole,
    }
}

/// The BFL source of the diffusers tensor `name` in a model of `cfg`, `None` for a name
/// that is not a Flux transformer tensor.
#[must_use]
pub fn bfl_source(name: &str, cfg: &Config) -> Option<BflSource> {
    let (module, leaf) = name.rsplit_once('.')?;
    if leaf != "weight" && leaf != "bias" {
        return None;
    }
    let d = cfg.inner_dim();
    let rows = |tensor: String, i: usize, len: usize, total: usize| BflSource {
        tensor: format!("{tensor}.{leaf}"),
        part: Part::Rows {
            start: i * d,
            len,
            total,
        },
    };
    let lin = |bfl: &str| Some(whole(format!("{bfl}.{leaf}")));
    let norm = |bfl: &str| (leaf == "weight").then(|| whole(format!("{bfl}.scale")));
    let top = match module {
        "x_embedder" => lin("img_in"),
        "context_embedder" => lin("txt_in"),
        "time_text_embed.timestep_embedder.linear_1" => lin("time_in.in_layer"),
        "time_text_embed.timestep_embedder.linear_2" => lin("time_in.out_layer"),
        "time_text_embed.text_embedder.linear_1" => lin("vector_in.in_layer"),
        "time_text_embed.text_embedder.linear_2" => lin("vector_in.out_layer"),
        "time_text_embed.guidance_embedder.linear_1" if cfg.guidance_embeds => {
            lin("guidance_in.in_layer")
        }
        "time_text_embed.guidance_embedder.linear_2" if cfg.guidance_embeds => {
            lin("guidance_in.out_layer")
        }
        "proj_out" => lin("final_layer.linear"),
        "norm_out.linear" => Some(BflSource {
            tensor: format!("final_layer.adaLN_modulation.1.{leaf}"),
            part: Part::SwapHalves,
        }),
        _ => None,
    };
    if top.is_some() {
        return top;
    }
    let block = |prefix: &str, count: usize| -> Option<(usize, String)> {
        let rest = module.strip_prefix(prefix)?;
        let (i, rest) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        (i < count).then(|| (i, rest.to_string()))
    };
    if let Some((i, rest)) = block("transformer_blocks.", cfg.num_layers) {
        let b = format!("double_blocks.{i}");
        let qkv =
            |stream: &str, j: usize| Some(rows(format!("{b}.{stream}_attn.qkv"), j, d, 3 * d));
        return match rest.as_str() {
            "norm1.linear" => lin(&format!("{b}.img_mod.lin")),
            "norm1_context.linear" => lin(&format!("{b}.txt_mod.lin")),
            "attn.to_q" => qkv("img", 0),
            "attn.to_k" => qkv("img", 1),
            "attn.to_v" => qkv("img", 2),
            "attn.add_q_proj" => qkv("txt", 0),
            "attn.add_k_proj" => qkv("txt", 1),
            "attn.add_v_proj" => qkv("txt", 2),
            "attn.norm_q" => norm(&format!("{b}.img_attn.norm.query_norm")),
            "attn.norm_k" => norm(&format!("{b}.img_attn.norm.key_norm")),
            "attn.norm_added_q" => norm(&format!("{b}.txt_attn.norm.query_norm")),
            "attn.norm_added_k" => norm(&format!("{b}.txt_attn.norm.key_norm")),
            "attn.to_out.0" => lin(&format!("{b}.img_attn.proj")),
            "attn.to_add_out" => lin(&format!("{b}.txt_attn.proj")),
            "ff.net.0.proj" => lin(&format!("{b}.img_mlp.0")),
            "ff.net.2" => lin(&format!("{b}.img_mlp.2")),
            "ff_context.net.0.proj" => lin(&format!("{b}.txt_mlp.0")),
            "ff_context.net.2" => lin(&format!("{b}.txt_mlp.2")),
            _ => None,
        };
    }
    if let Some((i, rest)) = block("single_transformer_blocks.", cfg.num_single_layers) {
        let b = format!("single_blocks.{i}");
        let mlp = cfg.mlp_hidden_dim();
        let total = 3 * d + mlp;
        let l1 = |j: usize, len: usize| Some(rows(format!("{b}.linear1"), j, len, total));
        return match rest.as_str() {
            "norm.linear" => lin(&format!("{b}.modulation.lin")),
            "attn.to_q" => l1(0, d),
            "attn.to_k" => l1(1, d),
            "attn.to_v" => l1(2, d),
            "proj_mlp" => l1(3, mlp),
            "attn.norm_q" => norm(&format!("{b}.norm.query_norm")),
            "attn.norm_k" => norm(&format!("{b}.norm.key_norm")),
            "proj_out" => lin(&format!("{b}.linear2")),
            _ => None,
        };
    }
    None
}

/// The lookup names of a BFL tensor: plain, then under [`PREFIX`].
fn bfl_names() -> NameMap {
    Arc::new(|n: &str| vec![n.to_string(), format!("{PREFIX}{n}")])
}

/// Whether the files hold a Flux transformer in BFL's names.
#[must_use]
pub fn is_bfl(weights: &WeightFiles) -> bool {
    bfl_names()("img_in.weight")
        .iter()
        .any(|n| weights.contains(n))
}

/// The config of a BFL file from its tensor shapes: widths from `img_in`, `txt_in`,
/// `vector_in`, `final_layer.linear`; the head width from the first block's
/// `query_norm.scale`; block counts from the names; `guidance_embeds` from `guidance_in`;
/// patch size 1; RoPE axes (16, 56, 56), the only ones Flux uses, so a head width other
/// than 128 is refused (give the config to [`super::load_flux_file`]).
///
/// # Errors
/// [`Error::BadFile`] naming the file and what does not fit.
pub fn config_from_bfl(weights: &WeightFiles, path: &Path) -> Result<Config> {
    let bad = |why: String| Error::BadFile {
        path: path.to_path_buf(),
        why,
    };
    let names = bfl_names();
    let shape = |n: &str| -> Option<Vec<usize>> {
        names(n)
            .iter()
            .find_map(|c| weights.meta(c).map(|m| m.shape.clone()))
    };
    let need = |n: &str| -> Result<Vec<usize>> {
        match shape(n) {
            Some(s) if s.len() == 2 => Ok(s),
            Some(s) => Err(bad(format!("`{n}` has shape {s:?}, want a matrix"))),
            None => Err(bad(format!(
                "no `{n}`: not a Flux transformer in BFL names"
            ))),
        }
    };
    let img_in = need("img_in.weight")?;
    let (d, in_channels) = (img_in[0], img_in[1]);
    let joint = need("txt_in.weight")?[1];
    let pooled = need("vector_in.in_layer.weight")?[1];
    let out = need("final_layer.linear.weight")?[0];
    let count = |prefix: &str| -> usize {
        weights
            .names()
            .iter()
            .filter_map(|n| {
                let n = n.strip_prefix(PREFIX).unwrap_or(n);
                n.strip_prefix(prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    };
    let (num_layers, num_single_layers) = (count("double_blocks."), count("single_blocks."));
    let hd = shape("double_blocks.0.img_attn.norm.query_norm.scale")
        .or_else(|| shape("single_blocks.0.norm.query_norm.scale"))
        .and_then(|s| s.first().copied())
        .ok_or_else(|| bad("no block's query_norm.scale: cannot tell the head width".into()))?;
    if hd == 0 || d % hd != 0 {
        return Err(bad(format!(
            "hidden width {d} is not a multiple of the head width {hd}"
        )));
    }
    if hd != 128 {
        return Err(bad(format!(
            "head width {hd}: Flux's RoPE axes (16, 56, 56) need 128; pass the config \
             (load_flux_file) for another width"
        )));
    }
    let cfg = Config {
        patch_size: 1,
        in_channels,
        out_channels: (out != in_channels).then_some(out),
        num_layers,
        num_single_layers,
        attention_head_dim: hd,
        num_attention_heads: d / hd,
        joint_attention_dim: joint,
        pooled_projection_dim: pooled,
        guidance_embeds: shape("guidance_in.in_layer.weight").is_some(),
        axes_dims_rope: vec![16, 56, 56],
    };
    cfg.validate().map_err(bad)?;
    Ok(cfg)
}

/// A `VarBuilder` backend serving diffusers names from a BFL file.
struct BflBackend {
    weights: Arc<WeightFiles>,
    cfg: Config,
    first_error: Arc<Mutex<Option<Error>>>,
    train: Option<Trainable>,
    /// The fused tensors read last (q, k, v and their biases are asked for in turn).
    fused: Mutex<Vec<((String, DType), Tensor)>>,
}

impl BflBackend {
    fn keep(&self, e: Error) -> candle_core::Error {
        let msg = e.to_string();
        if let Ok(mut slot) = self.first_error.lock()
            && slot.is_none()
        {
            *slot = Some(e);
        }
        candle_core::Error::Msg(msg)
    }

    fn load(
        &self,
        name: &str,
        expected: Option<&[usize]>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(src) = bfl_source(name, &self.cfg) else {
            return Err(self.keep(Error::BadTensor {
                tensor: name.to_string(),
                path: files_label(&self.weights),
                why: "asked for by the model, but it has no BFL counterpart".into(),
            }));
        };
        let names = bfl_names();
        let read = |shape: Option<Vec<usize>>| {
            self.weights
                .load(&src.tensor, shape.as_deref(), &names, dtype, dev)
                .map_err(|e| self.keep(e))
        };
        match src.part {
            Part::Whole => read(expected.map(<[usize]>::to_vec)),
            Part::SwapHalves => {
                let t = read(expected.map(<[usize]>::to_vec))?;
                let h = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, h, h)?, t.narrow(0, 0, h)?], 0)
            }
            Part::Rows { start, len, total } => {
                let key = (src.tensor.clone(), dtype);
                let cached = self
                    .fused
                    .lock()
                    .ok()
                    .and_then(|c| c.iter().find(|(k, _)| *k == key).map(|(_, t)| t.clone()));
                let t = match cached {
                    Some(t) => t,
                    None => {
                        let shape = expected.map(|e| {
                            let mut s = e.to_vec();
                            if let Some(first) = s.first_mut() {
                                *first = total;
                            }
                            s
                        });
                        let t = read(shape)?;
                        if let Ok(mut c) = self.fused.lock() {
                            if c.len() >= 4 {
                                c.remove(0);
                            }
                            c.push((key, t.clone()));
                        }
                        t
                    }
                };
                t.narrow(0, start, len)
            }
        }
    }

    fn fetch(
        &self,
        name: &str,
        expected: Option<&[usize]>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match &self.train {
            Some(t) if (t.select)(name) => Ok(t
                .vars
                .get_or_insert(name, || self.load(name, expected, DType::F32, dev))?
                .as_tensor()
                .clone()),
            _ => self.load(name, expected, dtype, dev),
        }
    }
}

fn files_label(w: &WeightFiles) -> String {
    w.files()
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl candle_nn::var_builder::SimpleBackend for BflBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(s.dims()), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        bfl_source(name, &self.cfg).is_some_and(|s| {
            bfl_names()(&s.tensor)
                .iter()
                .any(|n| self.weights.contains(n))
        })
    }
}

/// Builds a model from a BFL file as [`WeightFiles::build`] / `build_trainable` do from
/// a diffusers one: `build` asks for diffusers names, served by [`bfl_source`]; the
/// tensors `trainable` selects (by diffusers name) become f32 variables under that name.
pub(crate) fn build<M>(
    weights: &Arc<WeightFiles>,
    cfg: &Config,
    what: &str,
    dtype: DType,
    device: &Device,
    trainable: Option<&Trainable>,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<M> {
    let first_error = Arc::new(Mutex::new(None));
    let backend = BflBackend {
        weights: Arc::clone(weights),
        cfg: cfg.clone(),
        first_error: Arc::clone(&first_error),
        train: trainable.cloned(),
        fused: Mutex::new(Vec::new()),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    match build(vb) {
        Ok(m) => Ok(m),
        Err(source) => {
            let kept = first_error.lock().ok().and_then(|mut g| g.take());
            Err(kept.unwrap_or(Error::Candle {
                model: what.to_string(),
                source,
            }))
        }
    }
}

/// A model's tensors (diffusers names, e.g. [`super::Flux::tensors`]) in BFL's names:
/// q, k, v (and the single blocks' MLP input) concatenated, the final modulation's
/// halves swapped back. What `black-forest-labs/flux` and ComfyUI load.
///
/// # Errors
/// [`Error::BadTensor`]: a tensor missing, or not one of a Flux of `cfg`.
pub fn to_bfl(
    tensors: &BTreeMap<String, Tensor>,
    cfg: &Config,
) -> Result<BTreeMap<String, Tensor>> {
    let bad = |tensor: &str, why: String| Error::BadTensor {
        tensor: tensor.to_string(),
        path: "(tensors to convert to BFL names)".into(),
        why,
    };
    let c = |e: candle_core::Error| Error::Candle {
        model: "flux (to BFL names)".into(),
        source: e,
    };
    let expected = super::expected_tensors(cfg)?;
    if let Some(extra) = tensors.keys().find(|k| !expected.contains_key(*k)) {
        return Err(bad(extra, "not a tensor of this model".into()));
    }
    let mut out = BTreeMap::new();
    let mut fused: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    for name in expected.keys() {
        let t = tensors
            .get(name)
            .ok_or_else(|| bad(name, "missing".into()))?;
        let src = bfl_source(name, cfg).ok_or_else(|| bad(name, "no BFL counterpart".into()))?;
        match src.part {
            Part::Whole => {
                out.insert(src.tensor, t.clone());
            }
            Part::SwapHalves => {
                let h = t.dim(0).map_err(c)? / 2;
                let swapped = Tensor::cat(
                    &[t.narrow(0, h, h).map_err(c)?, t.narrow(0, 0, h).map_err(c)?],
                    0,
                )
                .map_err(c)?;
                out.insert(src.tensor, swapped);
            }
            Part::Rows { start, .. } => fused
                .entry(src.tensor)
                .or_default()
                .push((start, t.clone())),
        }
    }
    for (name, mut parts) in fused {
        parts.sort_by_key(|(s, _)| *s);
        let ts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
        out.insert(name, Tensor::cat(&ts, 0).map_err(c)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tensor_of_the_presets_has_one_bfl_source() {
        for cfg in [Config::flux1_dev(), Config::flux1_schnell()] {
            let expected = super::super::expected_tensors(&cfg).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for (name, shape) in &expected {
                let src = bfl_source(name, &cfg).unwrap_or_else(|| panic!("{name}"));
                if let Part::Rows { start, len, total } = src.part {
                    assert_eq!(shape[0], len, "{name}");
                    assert!(start + len <= total, "{name}");
                    assert!(seen.insert((src.tensor.clone(), start)), "{name}");
                } else {
                    assert!(seen.insert((src.tensor.clone(), 0)), "{name}");
                }
            }
            // flux1-dev.safetensors holds 780 tensors; schnell 776 (no guidance_in)
            let bfl: std::collections::BTreeSet<&String> = seen.iter().map(|(n, _)| n).collect();
            assert_eq!(bfl.len(), if cfg.guidance_embeds { 780 } else { 776 });
        }
        let cfg = Config::flux1_dev();
        assert_eq!(
            bfl_source("single_transformer_blocks.37.proj_mlp.bias", &cfg),
            Some(BflSource {
                tensor: "single_blocks.37.linear1.bias".into(),
                part: Part::Rows {
                    start: 9216,
                    len: 12288,
                    total: 21504
                }
            })
        );
        assert_eq!(
            bfl_source("transformer_blocks.3.attn.norm_added_k.weight", &cfg)
                .unwrap()
                .tensor,
            "double_blocks.3.txt_attn.norm.key_norm.scale"
        );
        assert!(bfl_source("transformer_blocks.19.attn.to_q.weight", &cfg).is_none());
        assert!(
            bfl_source(
                "time_text_embed.guidance_embedder.linear_1.weight",
                &Config::flux1_schnell()
            )
            .is_none()
        );
    }
}
