//! tapledger's ledger: pairs the two halves of each payment, decides its one
//! outcome and moves the money atomically and durably.
//!
//! * [`core`] holds the rules and state machines with no IO at all.
//! * [`store`] is the redb file, the source of truth, written only by group
//!   commits in [`committer`].
//! * [`account`], [`matcher`] and [`expiry`] are the ractor actors.
//! * [`Ledger`] is the API the node (and tests, and the benchmark) call.
//!
//! This crate opens no sockets and knows nothing of QUIC or TLS.

pub mod account;
pub mod clock;
pub mod committer;
pub mod core;
pub mod error;
pub mod expiry;
mod ledger;
pub mod matcher;
pub mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use core::matching::Resolution;
pub use error::{LedgerError, StoreError};
pub use ledger::{
    ACCOUNT_IDLE_DEFAULT, HALF_TTL_DEFAULT, Ledger, LedgerConfig, LedgerStats, MAX_AMOUNT_DEFAULT,
    PENDING_HALVES_PER_ACCOUNT_MAX_DEFAULT, Submission, Ticket,
};
pub use store::{
    AccountRecord, AuditReport, Counters, Funding, FundingKind, JournalEntry, NewAccount, Store,
};
