//! What a store holds: its features (model, weights fingerprint, preprocessing, dtype,
//! shape per array), the caption configuration and the resolution. Recorded once in
//! the root `zarr.json`; every later write must present the same spec.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use tensorbake_kit::schema::Array;

use crate::StoreError;
use crate::layout::BUILTIN_ARRAYS;

/// Version of the on-disk layout described in `docs/store.md`.
pub const FORMAT_VERSION: u32 = 1;

/// Element type of a feature array: the workspace's one dtype vocabulary (Zarr names
/// `bfloat16`, `float16`, `float32`, `uint16`, `uint32` in the metadata).
pub use tensorbake_kit::dtype::DType;

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

    /// The spec of a schema array, if the store has it.
    #[must_use]
    pub fn array(&self, array: Array) -> Option<&FeatureSpec> {
        self.features.get(array.name())
    }

    /// Checks names and shapes: feature names are safe path components and do not
    /// collide with the built-in arrays; an array the feature schema knows has the
    /// shape its rule gives and an element type of the right kind (floats for
    /// embeddings and latents, integers for counts). Other names are the caller's.
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
            if let Some(array) = Array::from_name(name) {
                array
                    .shape_rule()
                    .check(&feature.shape)
                    .map_err(|why| StoreError::InvalidSpec(format!("features.{name}: {why}")))?;
                if array.is_float() != feature.dtype.is_float() {
                    return Err(StoreError::InvalidSpec(format!(
                        "features.{name}.dtype {} is not {}",
                        feature.dtype,
                        if array.is_float() {
                            "a float type"
                        } else {
                            "an integer type"
                        }
                    )));
                }
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

    #[test]
    fn validate_holds_schema_arrays_to_their_shape_and_kind() {
        assert!(spec().validate().is_ok());
        assert_eq!(
            spec().array(Array::SiglipHidden).unwrap().shape,
            [729, 1152]
        );
        assert!(spec().array(Array::T5Hidden).is_none());
        let mut s = spec();
        s.features.get_mut("siglip_hidden").unwrap().shape = vec![1152];
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("siglip_hidden") && e.contains("[tokens, width]"),
            "{e}"
        );
        let mut s = spec();
        let mut latent = s.features["siglip_hidden"].clone();
        latent.shape = vec![16, 64, 64];
        s.features.insert("sd_vae_mean".into(), latent.clone());
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("sd_vae_mean") && e.contains("[4, h, w]"), "{e}");
        let mut s = spec();
        latent.shape = vec![];
        latent.dtype = DType::Bf16;
        s.features.insert("t5_len".into(), latent.clone());
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("t5_len") && e.contains("integer"), "{e}");
        // names outside the schema are the caller's business
        let mut s = spec();
        s.features.insert("my_feature".into(), latent);
        assert!(s.validate().is_ok());
    }
}
