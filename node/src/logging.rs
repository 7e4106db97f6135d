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

/// Tells whether to log an error that may repeat many times a second (a
/// failing disk refuses every request alike): the first time a message is
/// seen, and then at most once per `window`, with how many times it
/// repeated meanwhile. A node that refuses 8,000 requests in 8 s logs a
/// handful of lines, not 8,000.
pub struct Repeats {
    window: std::time::Duration,
    seen: std::sync::Mutex<std::collections::HashMap<String, Seen>>,
}

struct Seen {
    logged_at: std::time::Instant,
    suppressed: u64,
}

/// Distinct messages remembered at once; beyond this the memory starts over.
const REPEATS_KEYS_MAX: usize = 1024;

impl Repeats {
    pub fn new(window: std::time::Duration) -> Repeats {
        Repeats {
            window,
            seen: std::sync::Mutex::default(),
        }
    }

    /// `Some(n)` when `message` should be logged now, `n` being how many
    /// times it was held back since it was last logged; `None` to hold it.
    pub fn check(&self, message: &str, now: std::time::Instant) -> Option<u64> {
        let mut seen = self.seen.lock().expect("repeats lock");
        if let Some(entry) = seen.get_mut(message) {
            if now.duration_since(entry.logged_at) < self.window {
                entry.suppressed += 1;
                return None;
            }
            let suppressed = entry.suppressed;
            *entry = Seen {
                logged_at: now,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        if seen.len() >= REPEATS_KEYS_MAX {
            seen.clear();
        }
        seen.insert(
            message.to_string(),
            Seen {
                logged_at: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Repeats;

    #[test]
    fn a_repeated_error_is_logged_once_per_window_with_its_count() {
        let repeats = Repeats::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(repeats.check("disk full", start), Some(0));
        for second in 1..=8 {
            assert_eq!(
                repeats.check("disk full", start + Duration::from_secs(second)),
                None
            );
        }
        // Another message is not held back by the first.
        assert_eq!(repeats.check("other", start), Some(0));
        assert_eq!(
            repeats.check("disk full", start + Duration::from_secs(10)),
            Some(8)
        );
        assert_eq!(
            repeats.check("disk full", start + Duration::from_secs(11)),
            None
        );
        assert_eq!(
            repeats.check("disk full", start + Duration::from_secs(25)),
            Some(1)
        );
    }
}
