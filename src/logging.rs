//! Logging: `tracing` with `RUST_LOG` honoured, and pingora's `log`
//! records bridged into it (otherwise nothing pingora says is seen). The
//! lines go to stderr, as text or (`log.format: json`) one JSON object a
//! line for a log shipper.

use std::io::IsTerminal;

use crate::config::LogFormat;

/// The filter when `RUST_LOG` is unset: our decisions at info, pingora's
/// per-connection chatter only when it is a warning.
const DEFAULT_FILTER: &str =
    "info,pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=warn";

/// Installs the global subscriber once; later calls are no-ops.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init also installs the log -> tracing bridge; a second call
    // (tests, embedding) fails harmlessly.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        // Fields at the top level, as log shippers index them.
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
