//! One module per subcommand.

pub mod captions;
pub mod inspect;
