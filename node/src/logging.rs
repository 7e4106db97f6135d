//! Log output: tracing events to stderr, as readable lines or as JSON objects
//! (one per line, with the fields of the spans they happened in, so every
//! event of a connection carries its `remote` and every event of a half its
//! `tx_key`).
//!
//! Secrets never reach a log: API keys and the admin credential are
//! `tapledger_protocol::Secret`, whose `Debug` prints only its length, and no
//! event records them.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("cannot install the logger: {error}"))
}
