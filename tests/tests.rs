//! End-to-end tests of the `tensorbake` binary. All of them compile into this one
//! test binary (ripgrep's habit); each test works in a fresh temporary directory.

mod bench;
mod captions;
mod demo;
mod encode;
mod ingest;
mod k8s;
mod metrics;
mod null_embedding;
mod ray;
mod run;
mod sample;
mod slurm;
mod store;
mod train;
mod util;
