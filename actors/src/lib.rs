//! tapledger's ledger: pairs the two halves of each payment, decides its one
//! outcome and moves the money atomically and durably.
//!
//! * [`core`] holds the rules and state machines with no IO at all.
//! * [`store`] is the redb file, the source of truth: the Raft state machine,
//!   written only by applying committed log entries.
//! * [`raft`] is replication on openraft: the log store, the state machine,
//!   snapshots; [`committer`] turns group commits into log entries.
//! * [`account`], [`matcher`] and [`expiry`] are the ractor actors, run only
//!   by the leader (`leader`).
//! * [`Ledger`] is the API the node (and tests, and the benchmark) call: one
//!   replica of a cluster, a cluster of one by default.
//!
//! This crate opens no sockets and knows nothing of QUIC or TLS: the network
//! between replicas is passed in.

/// The pure decision logic, its own crate (`actors/core/`).
pub use tapledger_core as core;

pub mod account;
pub mod clock;
pub mod committer;
pub mod error;
pub mod expiry;
pub mod finding;
mod key_index;
mod leader;
mod ledger;
pub mod matcher;
mod overlay;
pub mod raft;
mod seal;
pub mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use core::matching::Resolution;
pub use error::{LeaderHint, LedgerError, Refusal, StoreError, Unpayable};
pub use finding::{Finding, accounts_named};
pub use ledger::{
    ACCOUNT_IDLE_DEFAULT, BatchHalf, FollowerStatus, HALF_TTL_DEFAULT, LIVE_ACCOUNTS_MAX_DEFAULT,
    Ledger, LedgerConfig, LedgerStats, MAX_AMOUNT_DEFAULT, PENDING_HALVES_PER_ACCOUNT_MAX_DEFAULT,
    ReplicaSetup, ReplicaStatus, ReplicationConfig, Submission, Ticket, open_files,
};
pub use matcher::{Heard, MatcherStats, Report, ReportSender};
pub use raft::{LogStore, ReplicaId, ReplicaInfo, StorageIo};
pub use store::{
    AccountRecord, AuditReport, Counters, Funding, FundingKind, JournalEntry, NewAccount, Store,
};
