//! tensorbake-ingest: from shard URLs to clean samples.

pub mod caption;
pub mod image;
pub mod pipeline;
pub mod shards;
pub mod source;
pub mod wds;
