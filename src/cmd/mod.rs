//! One module per subcommand.

pub mod captions;
