//! Integration tests of tensorbake-store (one test binary, ripgrep's habit): writer,
//! faults, reader / loader, S3 against moto, interop with zarr-python and tensorstore.

mod common;
mod faults;
mod interop;
mod reader;
mod s3;
mod writer;
