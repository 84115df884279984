//! Integration tests of tensorbake-store (one test binary, ripgrep's habit): writer,
//! faults, reader / loader, the empty-caption embedding, S3 against moto, interop with
//! zarr-python and tensorstore.

mod common;
mod faults;
mod interop;
mod null;
mod reader;
mod s3;
mod writer;
