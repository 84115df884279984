//! One module per subcommand.

pub mod bench;
pub mod bench_run;
pub mod captions;
pub mod demo;
pub mod encode;
pub mod ingest;
pub mod inspect;
pub mod progress;
pub mod run;
pub mod sample;
pub mod train;
