//! tensorbake-kit: small pieces shared by more than one stage.
//!
//! Always there (no heavy dependencies; `docs/architecture.md` says who uses what):
//! - [`schema`]: the feature schema (features, their arrays, dtypes, shape rules,
//!   null inputs): the names that are a contract between encode, run, store and train.
//! - [`dtype`]: the one dtype vocabulary (manifests, store, candle with `candle`).
//! - [`rng`]: SplitMix64, the generator whose output never changes.
//! - [`rank`]: rank and world size from flags, Slurm, Kubernetes or torchrun.
//!
//! With the `synth` feature, the test kit:
//! - `http`: a loopback HTTP file server with Range support and fault injection
//!   (the demo serves its shards with it; the ingest tests break it on purpose).
//! - `synth`, `synth_image`: seeded synthetic datasets in the real layouts
//!   (WebDataset tars, SA-1B-style gzip shards with a caption tar and a links file)
//!   and photo-like JPEGs.

pub mod dtype;
pub mod measure;
pub mod rank;
pub mod rng;
pub mod schema;

#[cfg(feature = "synth")]
pub mod http;
#[cfg(feature = "synth")]
pub mod synth;
#[cfg(feature = "synth")]
pub mod synth_image;
