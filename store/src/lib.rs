//! tensorbake-store: the Zarr v3 store that holds the baked tensors.
//!
//! A store is a Zarr v3 hierarchy (see `docs/store.md` for the byte-level layout):
//!
//! ```text
//! STORE/zarr.json                 group; attributes.tensorbake = the StoreSpec
//! STORE/parts/zarr.json           group
//! STORE/parts/<part>/zarr.json    group; attributes.tensorbake_part = {source, samples,
//!                                 committed: true, ...}, written LAST
//! STORE/parts/<part>/<array>      one array per feature + key, caption, caption_raw,
//!                                 orig_size; axis 0 = sample within the part
//! STORE/null/zarr.json            group; attributes.tensorbake_null = {caption: "",
//!                                 arrays: [...]}, written after the arrays
//! STORE/null/<array>              the embedding of the empty caption for a feature
//!                                 array, shape [1, ...feature shape] (see [`null`])
//! ```
//!
//! One part per input shard, written by exactly one [`PartWriter`] and committed last;
//! readers see only committed parts. Arrays are sharded (`sharding_indexed`), one sample
//! per inner chunk, `bytes`/`vlen-utf8` + `zstd` + `crc32c` inside, a `crc32c`-checked
//! shard index, so [`verify()`] finds damaged bytes and a reader never returns them.
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use tensorbake_store::{DType, FeatureSpec, FeatureValue, Location, Record, Store, StoreReader, StoreSpec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let location: Location = "/data/pd12m-512.zarr".parse()?;
//! let mut features = BTreeMap::new();
//! features.insert("clip_image_embeds".to_string(), FeatureSpec {
//!     model: "openai/clip-vit-large-patch14".into(),
//!     weights_sha256: "ab12...".into(),
//!     preprocess: serde_json::json!({"resize": 224, "crop": "center"}),
//!     dtype: DType::Bf16,
//!     shape: vec![768],
//! });
//! let store = Store::create_or_open(&location, StoreSpec::new(features))?;
//! let part = tensorbake_store::part_name_for_source("https://host/pd12m/00042.tar");
//! let mut writer = store.part_writer(&part, "https://host/pd12m/00042.tar")?;
//! let embedding = vec![0u8; 768 * 2]; // little-endian bfloat16
//! writer.push(Record {
//!     key: "00042_0001".into(),
//!     caption: "a red bicycle".into(),
//!     caption_raw: "A red bicycle.".into(),
//!     orig_size: [640, 480],
//!     features: BTreeMap::from([("clip_image_embeds".to_string(), FeatureValue::Bytes(embedding))]),
//! })?;
//! writer.commit()?;
//!
//! let reader = StoreReader::open(&location)?;
//! let sample = reader.get(0)?;
//! assert_eq!(sample.key, "00042_0001");
//! # Ok(())
//! # }
//! ```

pub mod bench;
mod direct;
mod error;
pub mod layout;
pub mod loader;
pub mod location;
pub mod null;
pub mod reader;
pub mod spec;
pub mod verify;
pub mod writer;

pub use error::StoreError;
pub use layout::{BUILTIN_ARRAYS, StoreOptions, part_name_for_source};
pub use loader::{Batch, Loader, LoaderConfig, epoch_order};
pub use location::Location;
pub use reader::{ArrayInfo, Sample, StoreInfo, StoreReader, inspect};
pub use spec::{DType, FeatureSpec, StoreSpec};
pub use verify::{DamagedPart, VerifyReport, verify};
pub use writer::{FeatureValue, PartMeta, PartWriter, Record, Store};

/// Result alias of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    /// The pipeline moves a writer to its own thread and shares readers between
    /// loader threads: these bounds are part of the API.
    #[test]
    fn thread_bounds() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send::<crate::PartWriter>();
        send_sync::<crate::Store>();
        send_sync::<crate::StoreReader>();
        send::<crate::Loader>();
        send::<crate::Batch>();
    }
}
