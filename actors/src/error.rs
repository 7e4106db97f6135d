//! Operational failures of the ledger. Rejections are not errors: they are
//! outcomes (`tapledger_protocol::Outcome`) or refusals (`Resolution::Refused`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tapledger_protocol::{AccountId, RejectCode, TxKey};

use crate::raft::ReplicaId;

/// A failure of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("the file has schema version {found}, this build reads version {expected}")]
    SchemaVersion { found: u64, expected: u64 },
    #[error("the file is not a tapledger ledger (no schema version)")]
    NotALedger,
    #[error("stored record could not be decoded: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("record could not be encoded: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("{0} already exists; refusing to overwrite it")]
    TargetExists(String),
    #[error("an earlier commit failed; the ledger refuses writes until it is reopened")]
    Poisoned,
    #[error("the ledger was opened read-only")]
    ReadOnly,
    /// A record failed its checksum or the journal's hash chain: the file
    /// changed under the ledger. Nothing read from it is trusted.
    #[error("ledger record damaged: {table} {key}: {what}")]
    Damaged {
        table: String,
        key: String,
        what: String,
    },
}

/// Damage found once and reported by every later read that depends on it
/// (a read-only store opened despite it). Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Damage(Arc<(String, String, String)>);

impl Damage {
    /// The damage `error` describes; `table` names where, when `error`
    /// does not.
    pub(crate) fn of(error: &StoreError, table: &str) -> Damage {
        Damage(Arc::new(match error {
            StoreError::Damaged { table, key, what } => (table.clone(), key.clone(), what.clone()),
            other => (table.into(), "?".into(), other.to_string()),
        }))
    }

    pub(crate) fn error(&self) -> StoreError {
        let (table, key, what) = &*self.0;
        StoreError::Damaged {
            table: table.clone(),
            key: key.clone(),
            what: what.clone(),
        }
    }
}

macro_rules! redb_error_from {
    ($($source:ty),*) => {$(
        impl From<$source> for StoreError {
            fn from(error: $source) -> StoreError {
                StoreError::Redb(error.into())
            }
        }
    )*};
}
redb_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Why applying an intent changed nothing. Decided from the log entry and
/// the ledger alone, so every replica refuses the same intents alike.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    #[error("a top-up must be at least 1")]
    ZeroTopUp,
    #[error("account {0} does not exist")]
    NoSuchAccount(AccountId),
    #[error("top-up would overflow")]
    TopUpOverflow,
    #[error("opening balance would overflow the issuer's total")]
    IssuedOverflow,
    #[error("tx_key {0} already has a pending half")]
    PendingExists(TxKey),
    #[error("rejection of {tx_key} with half-only code {code}")]
    HalfOnlyCode { tx_key: TxKey, code: RejectCode },
    /// The leader's actors decided a settlement storage cannot apply: a
    /// broken invariant somewhere, refused rather than money created.
    #[error("settlement {tx_key}: {why}")]
    Unpayable { tx_key: TxKey, why: Unpayable },
    /// Proposed by a leader's actors built in an older term than the one
    /// that committed it: their view may have been stale.
    #[error("proposed by the leader of term {proposed} but committed in term {committed}")]
    StaleTerm { proposed: u64, committed: u64 },
}

/// Why storage cannot apply a settlement.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Unpayable {
    #[error("account {0} pays itself")]
    SelfPayment(AccountId),
    #[error("zero amount")]
    ZeroAmount,
    #[error("unknown sender {0}")]
    UnknownSender(AccountId),
    #[error("unknown receiver {0}")]
    UnknownReceiver(AccountId),
    #[error("account {sender} was reserved {amount} but has {balance}")]
    Underfunded {
        sender: AccountId,
        amount: u64,
        balance: u64,
    },
    #[error("account {0} would overflow")]
    Overflow(AccountId),
}

/// Where the leader is, as far as this replica knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderHint {
    pub id: ReplicaId,
    /// Where phones reach it.
    pub client_addr: String,
}

/// Why a ledger request failed. Cheap to clone: one failed commit fails every
/// request it held.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Store(Arc<StoreError>),
    #[error("the ledger is shut down")]
    Closed,
    #[error("account {0} does not exist")]
    UnknownAccount(u64),
    /// The request was applied and changed nothing, for this reason.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The ledger's settings cannot work (checked when it starts).
    #[error("invalid settings: {0}")]
    Settings(String),
    /// This replica's files say it belongs to a cluster of several voters:
    /// started alone, it could never be elected.
    #[error("replica {id} belongs to a cluster with voters {voters:?}: it needs its peers to run")]
    NeedsPeers {
        id: ReplicaId,
        voters: Vec<ReplicaId>,
    },
    /// A membership change openraft refused (for instance, removing the
    /// last voter, or adding a replica that is not a learner yet).
    #[error("membership change refused: {0}")]
    Membership(String),
    /// An actor could not be started or reached: the runtime is shutting
    /// down or an actor died of a broken invariant.
    #[error("actor failed: {0}")]
    Actor(String),
    /// This replica does not lead the cluster (or stopped leading while the
    /// request was in flight: it may still take effect). Ask the leader.
    #[error("{}", not_leader_text(.0))]
    NotLeader(Option<LeaderHint>),
    /// Replication stopped on this replica (its log or state machine failed);
    /// it refuses writes until restarted.
    #[error("replication stopped: {0}")]
    Replication(String),
    /// A file failed its integrity check at open: the replica will not
    /// serve from it.
    #[error("{file} failed its integrity check: {reason}")]
    Damaged { file: String, reason: String },
}

fn not_leader_text(hint: &Option<LeaderHint>) -> String {
    match hint {
        Some(hint) => format!(
            "not the leader; the leader is replica {} at {}",
            hint.id, hint.client_addr
        ),
        None => "not the leader; no leader is known yet".to_string(),
    }
}

impl From<StoreError> for LedgerError {
    fn from(error: StoreError) -> LedgerError {
        LedgerError::Store(Arc::new(error))
    }
}
