//! Logging: `tracing` with `RUST_LOG` honoured, and pingora's `log`
//! records bridged into it (otherwise nothing pingora says is seen).

use std::io::IsTerminal;

/// The filter when `RUST_LOG` is unset: our decisions at info, pingora's
/// per-connection chatter only when it is a warning.
const DEFAULT_FILTER: &str =
    "info,pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=warn";

/// Installs the global subscriber once; later calls are no-ops.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    // try_init also installs the log -> tracing bridge; a second call
    // (tests, embedding) fails harmlessly.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
