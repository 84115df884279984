//! tensorbake-ingest: from shard URLs to clean samples.
pub mod image;
