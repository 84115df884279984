//! tensorbake-kit: small pieces shared by more than one stage.
//!
//! - [`http`]: a loopback HTTP file server with Range support and fault injection
//!   (the demo serves its shards with it; the ingest tests break it on purpose).
//! - [`rank`]: rank and world size from flags, Slurm, Kubernetes or torchrun.
//! - [`synth`]: seeded synthetic datasets in the real layouts: WebDataset tars,
//!   SA-1B-style gzip shards with a caption tar and a links file.

pub mod http;
pub mod rank;
pub mod synth;
pub mod synth_image;
