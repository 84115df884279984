//! What a store holds: its features (model, weights fingerprint, preprocessing, dtype,
//! shape per array), the caption configuration and the resolution. Recorded once in
//! the root `zarr.json`; every later write must present the same spec.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::layout::BUILTIN_ARRAYS;

/// Version of the on-disk layout described in `docs/store.md`.
pub const FORMAT_VERSION: u32 = 1;

/// Element type of a feature array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// bfloat16 (the zarr-extensions `bfloat16` data type). Embeddings.
    #[serde(rename = "bfloat16")]
    Bf16,
    /// IEEE half precision. Latents, when configured.
    #[serde(rename = "float16")]
    F16,
    /// IEEE single precision. Latents, when configured.
    #[serde(rename = "float32")]
    F32,
    /// Unsigned 16-bit integers (read back as candle `U32`: candle has no u16).
    #[serde(rename = "uint16")]
    U16,
    /// Unsigned 32-bit integers (token counts, sizes).
    #[serde(rename = "uint32")]
    U32,
}

impl DType {
    /// Bytes per element.
    #[must_use]
    pub const fn size(self) -> usize {
        match self {
            Self::Bf16 | Self::F16 | Self::U16 => 2,
            Self::F32 | Self::U32 => 4,
        }
    }

    /// The Zarr v3 `data_type` name.
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

    /// The dtype of a Zarr v3 `data_type` name, if tensorbake writes it.
    #[must_use]
    pub fn from_zarr_name(name: &str) -> Option<Self> {
        Some(match name {
            "bfloat16" => Self::Bf16,
            "float16" => Self::F16,
            "float32" => Self::F32,
            "uint16" => Self::U16,
            "uint32" => Self::U32,
            _ => return None,
        })
    }

    /// The candle dtype tensors of this feature have. `U16` maps to `U32` (widened on
    /// read) because candle has no 16-bit unsigned type.
    #[must_use]
    pub const fn candle(self) -> candle_core::DType {
        match self {
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
            Self::F32 => candle_core::DType::F32,
            Self::U16 | Self::U32 => candle_core::DType::U32,
        }
    }

    /// Whether this is a floating point type.
    #[must_use]
    pub const fn is_float(self) -> bool {
        matches!(self, Self::Bf16 | Self::F16 | Self::F32)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.zarr_name())
    }
}

/// One feature array: which model made it, from which weights, how its input was
/// prepared, and the dtype and per-sample shape it is stored with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Model id or path (e.g. `google/siglip-so400m-patch14-384`).
    pub model: String,
    /// sha256 of the model's safetensors (hex); a mismatch with the store is refused.
    pub weights_sha256: String,
    /// Preprocessing that produced the model input (resize, crop, mean/std, max_length...).
    pub preprocess: serde_json::Value,
    /// Storage dtype.
    pub dtype: DType,
    /// Per-sample shape (without the sample axis). `[]` is a scalar per sample.
    pub shape: Vec<u64>,
}

impl FeatureSpec {
    /// Elements per sample.
    #[must_use]
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Uncompressed bytes per sample.
    #[must_use]
    pub fn sample_bytes(&self) -> u64 {
        self.elements() * self.dtype.size() as u64
    }
}

/// Everything that defines a store's contents. Two runs may write the same store only
/// if their specs agree (`format_version`, every feature field, `captions`,
/// `resolution`); `metadata` is informational and not compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// Layout version ([`FORMAT_VERSION`]).
    #[serde(default = "default_format_version")]
    pub format_version: u32,
    /// Feature arrays by name (`sd_vae_mean`, `siglip_hidden`, `t5_hidden`, ...).
    pub features: BTreeMap<String, FeatureSpec>,
    /// Caption cleaning configuration the `caption` array was made with.
    #[serde(default)]
    pub captions: serde_json::Value,
    /// Target resolution in pixels (shortest side / square crop), when images were encoded.
    #[serde(default)]
    pub resolution: Option<u32>,
    /// Free-form information (dataset name, tensorbake version, ...); recorded by the
    /// creator of the store, not compared.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

const fn default_format_version() -> u32 {
    FORMAT_VERSION
}

impl StoreSpec {
    /// A spec with these features, no caption config, no resolution.
    #[must_use]
    pub fn new(features: BTreeMap<String, FeatureSpec>) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            features,
            captions: serde_json::Value::Null,
            resolution: None,
            metadata: serde_json::Value::Null,
        }
    }

    /// Checks names and shapes: feature names are safe path components and do not
    /// collide with the built-in arrays.
    ///
    /// # Errors
    /// [`StoreError::InvalidSpec`] naming the feature.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.format_version != FORMAT_VERSION {
            return Err(StoreError::InvalidSpec(format!(
                "format_version {} is not supported (this tensorbake writes {FORMAT_VERSION})",
                self.format_version
            )));
        }
        for (name, feature) in &self.features {
            crate::layout::check_component(name).map_err(|reason| {
                StoreError::InvalidSpec(format!("feature name {name:?}: {reason}"))
            })?;
            if BUILTIN_ARRAYS.contains(&name.as_str()) {
                return Err(StoreError::InvalidSpec(format!(
                    "feature name {name:?} is reserved for the built-in array of that name"
                )));
            }
            if feature.shape.contains(&0) {
                return Err(StoreError::InvalidSpec(format!(
                    "features.{name}.shape {:?} has a zero dimension",
                    feature.shape
                )));
            }
        }
        Ok(())
    }

    /// The first field (dotted path) where `requested` differs from `self` (the stored
    /// spec), with both values as JSON. `metadata` is not compared.
    #[must_use]
    pub fn first_difference(&self, requested: &Self) -> Option<(String, String, String)> {
        let show = |v: Option<&serde_json::Value>| {
            v.map_or_else(|| "(absent)".to_string(), std::string::ToString::to_string)
        };
        let mut stored = serde_json::to_value(self).unwrap_or_default();
        let mut asked = serde_json::to_value(requested).unwrap_or_default();
        for v in [&mut stored, &mut asked] {
            if let Some(map) = v.as_object_mut() {
                map.remove("metadata");
            }
        }
        diff_json("", &stored, &asked).map(|path| {
            let s = pointer(&stored, &path);
            let r = pointer(&asked, &path);
            (path, show(s), show(r))
        })
    }
}

fn pointer<'a>(value: &'a serde_json::Value, dotted: &str) -> Option<&'a serde_json::Value> {
    let mut cur = value;
    for seg in dotted.split('.').filter(|s| !s.is_empty()) {
        cur = match cur {
            serde_json::Value::Object(map) => map.get(seg)?,
            serde_json::Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// The dotted path of the first (deepest) difference between two JSON values.
fn diff_json(path: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => {
                        if let Some(p) = diff_json(&join(k), va, vb) {
                            return Some(p);
                        }
                    }
                    _ => return Some(join(k)),
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| diff_json(&join(&i.to_string()), va, vb)),
        _ if a == b => None,
        _ => Some(path.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> StoreSpec {
        let mut features = BTreeMap::new();
        features.insert(
            "siglip_hidden".to_string(),
            FeatureSpec {
                model: "google/siglip-so400m-patch14-384".into(),
                weights_sha256: "aa".into(),
                preprocess: serde_json::json!({"size": 384, "mean": [0.5, 0.5, 0.5]}),
                dtype: DType::Bf16,
                shape: vec![729, 1152],
            },
        );
        let mut s = StoreSpec::new(features);
        s.resolution = Some(512);
        s
    }

    #[test]
    fn identical_specs_have_no_difference_and_metadata_is_ignored() {
        let a = spec();
        let mut b = spec();
        b.metadata = serde_json::json!({"dataset": "other"});
        assert_eq!(a.first_difference(&b), None);
    }

    #[test]
    fn difference_names_the_deepest_field() {
        let a = spec();
        let mut b = spec();
        b.features.get_mut("siglip_hidden").unwrap().weights_sha256 = "bb".into();
        let (field, stored, requested) = a.first_difference(&b).unwrap();
        assert_eq!(field, "features.siglip_hidden.weights_sha256");
        assert_eq!(stored, "\"aa\"");
        assert_eq!(requested, "\"bb\"");

        let mut c = spec();
        c.features.get_mut("siglip_hidden").unwrap().preprocess["mean"][1] = 0.4.into();
        assert_eq!(
            a.first_difference(&c).unwrap().0,
            "features.siglip_hidden.preprocess.mean.1"
        );

        let mut d = spec();
        d.features.get_mut("siglip_hidden").unwrap().dtype = DType::F16;
        let (field, stored, requested) = a.first_difference(&d).unwrap();
        assert_eq!(
            (field.as_str(), stored.as_str(), requested.as_str()),
            (
                "features.siglip_hidden.dtype",
                "\"bfloat16\"",
                "\"float16\""
            )
        );

        let mut e = spec();
        e.features.clear();
        let (field, _, requested) = a.first_difference(&e).unwrap();
        assert_eq!(
            (field.as_str(), requested.as_str()),
            ("features.siglip_hidden", "(absent)")
        );

        let mut f = spec();
        f.resolution = Some(1024);
        assert_eq!(a.first_difference(&f).unwrap().0, "resolution");
    }

    #[test]
    fn spec_round_trips_through_json_and_rejects_unknown_keys() {
        let s = spec();
        let text = serde_json::to_string(&s).unwrap();
        let back: StoreSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["features"]["siglip_hidden"]["weight_sha"] = "x".into();
        let err = serde_json::from_value::<StoreSpec>(v)
            .unwrap_err()
            .to_string();
        assert!(err.contains("weight_sha"), "{err}");
    }

    #[test]
    fn validate_rejects_reserved_and_unsafe_names() {
        let mut s = spec();
        let f = s.features["siglip_hidden"].clone();
        s.features.insert("caption".into(), f.clone());
        assert!(s.validate().unwrap_err().to_string().contains("reserved"));
        let mut s = spec();
        s.features.insert("../x".into(), f);
        assert!(s.validate().unwrap_err().to_string().contains("../x"));
    }
}
