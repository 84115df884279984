//! tensorbake-ingest: from shard URLs to clean samples.

pub mod shards;
pub mod source;
pub mod wds;
