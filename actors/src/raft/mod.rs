//! Replication on openraft: the types Raft carries, the log store, the state
//! machine (the ledger's redb store) and its snapshots.
//!
//! Every group commit the leader makes is one Raft log entry, a
//! [`LedgerEntry`]: the batch of intents its matcher and account actors
//! decided, with the leader's clock for the batch. Applying an entry is
//! deterministic: every replica that applies the same log prefix holds the
//! same ledger ([`crate::Store::digest`] proves it). Nothing is decided while
//! applying that could differ between replicas.
//!
//! This module opens no sockets: the network between replicas is a
//! [`openraft::RaftNetworkFactory`] the caller passes in (QUIC in the node, a
//! simulated network in the tests, none for a cluster of one).

pub mod log_store;
pub mod network;
pub mod state_machine;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tapledger_protocol::Timestamp;

use crate::store::{Applied, Intent};

pub use log_store::LogStore;
pub use network::NoNetwork;
pub use state_machine::StateMachine;

/// A replica's id in the cluster: unique, never reused.
pub type ReplicaId = u64;

/// What the cluster knows of each replica (carried in the membership, so a
/// follower can tell a phone where the leader is).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// Where phones reach it (QUIC, the phone ALPN).
    pub client_addr: String,
    /// Where the other replicas reach it (QUIC, the replication ALPN).
    pub peer_addr: String,
    /// SHA-256 fingerprint of its certificate (hex), pinned by its peers.
    pub fingerprint: String,
}

impl fmt::Display for ReplicaInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "phones {} peers {}", self.client_addr, self.peer_addr)
    }
}

/// One group commit, as the leader decided it: the log carries decisions,
/// never clock reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The term the proposing leader's actors were built in. An entry that
    /// ends up in the log under another term was proposed by actors whose
    /// view of the ledger may be stale; applying refuses it (every replica
    /// alike).
    pub term: u64,
    /// The leader's clock for the whole batch.
    pub at: Timestamp,
    /// Shared: the log keeps recent entries in memory for applying and
    /// replicating them, and a clone must not copy every intent.
    pub intents: Arc<[Intent]>,
}

/// What applying one log entry did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryResult {
    /// The ledger commit this entry became; `None` for entries that are
    /// not ledger batches (blank, membership) or that were refused whole.
    pub commit: Option<u64>,
    /// One result per intent of a [`LedgerEntry`], in order.
    pub applied: Vec<Applied>,
}

/// A snapshot: a redb file holding the whole ledger. See
/// [`state_machine::SnapshotFile`].
pub type SnapshotData = state_machine::SnapshotFile;

openraft::declare_raft_types!(
    /// tapledger's Raft types.
    pub TypeConfig:
        D = LedgerEntry,
        R = EntryResult,
        NodeId = ReplicaId,
        Node = ReplicaInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotData,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<ReplicaId>;
pub type Vote = openraft::Vote<ReplicaId>;
pub type Membership = openraft::Membership<ReplicaId, ReplicaInfo>;
pub type StoredMembership = openraft::StoredMembership<ReplicaId, ReplicaInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<ReplicaId, ReplicaInfo>;
pub type StorageError = openraft::StorageError<ReplicaId>;
pub type RaftMetrics = openraft::RaftMetrics<ReplicaId, ReplicaInfo>;

/// Encodes a Raft record (entry, vote, log id, membership) for storage.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec(value)
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// Where storage work runs. A real disk blocks for an fsync, so its work goes
/// to tokio's blocking pool; an in-memory disk (the deterministic cluster
/// tests, whose clock is paused) runs it inline on the calling task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StorageIo {
    #[default]
    Blocking,
    Inline,
}

impl StorageIo {
    /// Runs `work`; a panic inside it comes back as `Err` with its message,
    /// so a broken invariant stops this replica's Raft instead of unwinding
    /// through openraft's tasks.
    pub(crate) async fn run<T: Send + 'static>(
        self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        match self {
            StorageIo::Blocking => tokio::task::spawn_blocking(work).await.map_err(|error| {
                match error.try_into_panic() {
                    Ok(panic) => panic_message(&panic),
                    Err(error) => error.to_string(),
                }
            }),
            StorageIo::Inline => std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .map_err(|panic| panic_message(&panic)),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        format!("panicked: {message}")
    } else if let Some(message) = panic.downcast_ref::<String>() {
        format!("panicked: {message}")
    } else {
        "panicked".to_string()
    }
}

#[cfg(test)]
mod tests;
