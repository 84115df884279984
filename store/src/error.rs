//! The error type of the store crate.

use thiserror::Error;

/// Everything that can go wrong while creating, writing, reading or checking a store.
/// Every variant names the store location and the part / array / key / sample concerned.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The location string is not a path or an `s3://bucket/prefix` URL.
    #[error("invalid store location {location:?}: {reason}")]
    Location {
        /// The location as given.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Building the S3 client failed (missing bucket, bad endpoint, bad credentials config).
    #[error("S3 store {location}: {source}")]
    ObjectStore {
        /// The store location.
        location: String,
        /// The object_store error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// Reading, writing, listing or deleting a key failed.
    #[error("store {location}: {op} {key}: {source}")]
    Storage {
        /// The store location.
        location: String,
        /// What was being done (`read`, `write`, `list`, `delete`).
        op: &'static str,
        /// The key or prefix concerned.
        key: String,
        /// The storage error.
        #[source]
        source: Box<zarrs::storage::StorageError>,
    },
    /// A local filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// There is no tensorbake store at the location (no root `zarr.json` with
    /// `attributes.tensorbake`).
    #[error("no tensorbake store at {location}: {reason}")]
    NotAStore {
        /// The store location.
        location: String,
        /// What was missing.
        reason: String,
    },
    /// A metadata document (`zarr.json`) is not what tensorbake writes.
    #[error("store {location}: invalid metadata {key}: {reason}")]
    Metadata {
        /// The store location.
        location: String,
        /// The metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The store was created with a different spec than this write asks for.
    #[error(
        "store {location} was written with {field} = {stored}, but this run has {requested}; \
         write to a new store or use the same configuration"
    )]
    SpecMismatch {
        /// The store location.
        location: String,
        /// The dotted path of the differing field, e.g. `features.siglip_hidden.weights_sha256`.
        field: String,
        /// The value recorded in the store (JSON).
        stored: String,
        /// The value of this run (JSON).
        requested: String,
    },
    /// The spec itself is unusable (bad feature name, empty shape, ...).
    #[error("invalid store spec: {0}")]
    InvalidSpec(String),
    /// A writer layout setting ([`crate::StoreOptions`], a manifest's `[layout]`) is
    /// out of range: the message names the key.
    #[error("invalid store layout: {0}")]
    InvalidLayout(String),
    /// The part is committed; committed parts are never rewritten.
    #[error(
        "part {part} of store {location} is already committed (source {source_url}); committed parts are never rewritten"
    )]
    PartCommitted {
        /// The store location.
        location: String,
        /// The part name.
        part: String,
        /// The source recorded in the committed part.
        source_url: String,
    },
    /// A part name that is not a safe single path component.
    #[error("invalid part name {part:?}: {reason}")]
    InvalidPartName {
        /// The part name.
        part: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A sample given to a [`crate::PartWriter`] does not fit the spec.
    #[error("part {part}, sample {key:?}: {reason}")]
    BadSample {
        /// The part name.
        part: String,
        /// The sample key.
        key: String,
        /// What is wrong (names the feature / tensor).
        reason: String,
    },
    /// Encoding, decoding, storing or retrieving a Zarr array failed.
    #[error("store {location}, part {part}, array {array}: {source}")]
    Array {
        /// The store location.
        location: String,
        /// The part name.
        part: String,
        /// The array name.
        array: String,
        /// The zarrs error.
        #[source]
        source: Box<zarrs::array::ArrayError>,
    },
    /// Building or opening a Zarr array failed.
    #[error("store {location}, part {part}, array {array}: {source}")]
    ArrayCreate {
        /// The store location.
        location: String,
        /// The part name.
        part: String,
        /// The array name.
        array: String,
        /// The zarrs error.
        #[source]
        source: Box<zarrs::array::ArrayCreateError>,
    },
    /// A sample index beyond the committed samples.
    #[error("sample {index} is out of range: store {location} has {len} committed samples")]
    IndexOutOfRange {
        /// The store location.
        location: String,
        /// The requested index.
        index: u64,
        /// The number of committed samples.
        len: u64,
    },
    /// An array name the store does not have.
    #[error("store {location} has no array {name:?} (arrays: {available})")]
    UnknownArray {
        /// The store location.
        location: String,
        /// The requested name.
        name: String,
        /// The arrays the store has, comma separated.
        available: String,
    },
    /// A candle operation on a named tensor failed.
    #[error("tensor {name}: {source}")]
    Candle {
        /// The tensor / array name.
        name: String,
        /// The candle error.
        #[source]
        source: candle_core::Error,
    },
    /// Recording or reading the embedding of the empty caption failed for an array.
    #[error("store {location}, null embedding {array}: {reason}")]
    NullEmbedding {
        /// The store location.
        location: String,
        /// The array name.
        array: String,
        /// What is wrong.
        reason: String,
    },
    /// A loader configuration that cannot work (batch size 0, ...).
    #[error("invalid loader config: {0}")]
    InvalidLoader(String),
    /// The benchmark could not run (including its Python peers).
    #[error("store benchmark: {0}")]
    Bench(String),
}
