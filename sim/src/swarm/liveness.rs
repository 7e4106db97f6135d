//! Whether the target still answers, and the watchdog that ends a run whose
//! target stopped.
//!
//! Every request a phone makes counts as waiting until it ends, and every
//! answer from the node (an outcome, `accepted`, a refusal, an error code, a
//! reconnection that completed) is noted as it arrives. [`watch`] ends the
//! run once nothing has been answered for its limit while requests waited
//! *and* no replica of the target completes a QUIC handshake either. A change
//! of leader is not mistaken for a dead target: the phones reach the new
//! leader within a few seconds, and meanwhile the surviving replicas answer
//! the handshake.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tapledger_node::ClientError;
use tokio::time::Instant;

use super::phones::Swarm;
use crate::text::thousands;

/// How long the watchdog gives each replica to complete a handshake.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the watchdog looks.
const WATCH_TICK: Duration = Duration::from_millis(200);

/// When the target last answered, and how many requests wait for it.
#[derive(Debug)]
pub struct Liveness {
    base: Instant,
    /// Microseconds after `base` of the last answer.
    last_answer_us: AtomicU64,
    waiting: AtomicUsize,
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness {
            base: Instant::now(),
            last_answer_us: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        }
    }
}

impl Liveness {
    /// Notes that the node answered something just now.
    pub fn answered(&self) {
        let now = Instant::now()
            .saturating_duration_since(self.base)
            .as_micros();
        self.last_answer_us
            .fetch_max(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Notes `result` as an answer when it came from the node: anything but
    /// a timeout or a lost or failed connection.
    pub fn heard<T>(&self, result: &Result<T, ClientError>) {
        match result {
            Ok(_)
            | Err(ClientError::Node { .. })
            | Err(ClientError::NotLeader { .. })
            | Err(ClientError::Unexpected(_)) => self.answered(),
            Err(ClientError::Connect(_) | ClientError::Disconnected | ClientError::Timeout(_)) => {}
        }
    }

    /// Counts one request as waiting for the node until the guard is dropped.
    pub fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self)
    }

    /// Requests waiting for the node now.
    pub fn unanswered(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// When the node last answered (the swarm's creation if never).
    pub fn last_answer(&self) -> Instant {
        self.base + Duration::from_micros(self.last_answer_us.load(Ordering::Relaxed))
    }
}

/// One request waiting for the node (see [`Liveness::waiting`]).
pub struct Waiting<'a>(&'a Liveness);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a run stopped before the end of its plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Stop {
    /// Nothing answered for the limit while requests waited, and no replica
    /// completed a handshake.
    TargetDead {
        /// The last answer, in seconds after the first planned tap.
        last_answer_seconds: f64,
        /// Requests waiting when the run stopped.
        unanswered: u64,
        /// Why the handshakes failed, replica by replica.
        error: String,
    },
    /// Payments stopped finishing for the stall timeout (the backstop when
    /// the target still completes handshakes but answers nothing else).
    Stalled(String),
}

impl Stop {
    /// The sentence for people; `target` is the report's target label
    /// ("node at 127.0.0.1:7443").
    pub fn describe(&self, target: &str) -> String {
        match self {
            Stop::TargetDead {
                last_answer_seconds,
                unanswered,
                error,
            } => format!(
                "the {target} stopped answering at {last_answer_seconds:.1} s ({} requests \
                 unanswered; reconnecting failed: {error})",
                thousands(*unanswered)
            ),
            Stop::Stalled(why) => why.clone(),
        }
    }

    pub fn to_json(&self, target: &str) -> serde_json::Value {
        match self {
            Stop::TargetDead {
                last_answer_seconds,
                unanswered,
                error,
            } => json!({
                "reason": "target_dead",
                "message": self.describe(target),
                "last_answer_seconds": last_answer_seconds,
                "unanswered": unanswered,
                "error": error,
            }),
            Stop::Stalled(_) => json!({
                "reason": "stalled",
                "message": self.describe(target),
            }),
        }
    }
}

/// Resolves once the swarm's target is dead: no answer for `limit` (counted
/// from the later of the last answer and the start of the watch, or of the
/// last probe that got a handshake) while requests wait, and no replica
/// completes a handshake within [`PROBE_TIMEOUT`]. `started` is the first
/// planned tap, for the report. Never resolves while the target answers.
pub async fn watch(swarm: &Swarm, limit: Duration, started: Instant) -> Stop {
    let liveness = &swarm.liveness;
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(WATCH_TICK).await;
        let silent_since = liveness.last_answer().max(quiet_since);
        if liveness.unanswered() == 0 || silent_since.elapsed() < limit {
            continue;
        }
        match swarm.connector.probe(PROBE_TIMEOUT).await {
            // Some replica is up: a leader change, or a slow node; the stall
            // timeout still bounds a node that handshakes but never answers.
            Ok(_) => quiet_since = Instant::now(),
            Err(error) => {
                return Stop::TargetDead {
                    last_answer_seconds: liveness
                        .last_answer()
                        .saturating_duration_since(started)
                        .as_secs_f64(),
                    unanswered: liveness.unanswered() as u64,
                    error,
                };
            }
        }
    }
}
