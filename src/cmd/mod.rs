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

/// An error and its causes as one line, outermost first ("what failed: because:
/// because"), each cause left out when the message before already says it (an error
/// that prints its source and also reports it as its source would otherwise say it
/// twice).
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_line;

    /// Prints its source and reports it as its source too.
    #[derive(Debug)]
    struct Says {
        source: std::io::Error,
    }

    impl std::fmt::Display for Says {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "[[encoders]] #1 (t5): {}", self.source)
        }
    }

    impl std::error::Error for Says {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    /// A cause the message already spells is said once; others are chained.
    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::other("f16 is not supported");
        let e = anyhow::Error::new(Says { source: io() }).context("manifest m.toml");
        assert_eq!(
            error_line(&e),
            "manifest m.toml: [[encoders]] #1 (t5): f16 is not supported"
        );
        let e = anyhow::Error::new(io()).context("reading x");
        assert_eq!(error_line(&e), "reading x: f16 is not supported");
    }
}
