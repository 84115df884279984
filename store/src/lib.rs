//! tensorbake-store: the Zarr v3 store that holds the baked tensors.
//!
//! One part per input shard, committed last; readers see only committed parts.
