//! Helpers shared by tapledger's tests, so that each test file states what
//! it checks rather than how to build a half, open an account or start a
//! node process. Dev-only: every user lists it under `[dev-dependencies]`.
//!
//! Two layers, because a crate's own unit tests get duplicate types from a
//! helper crate that depends on that crate:
//!
//! * Always built: [`halves`], [`accounts`], [`time`] and [`process`]. They
//!   name only `tapledger-protocol`, `tapledger-actors` and
//!   `tapledger-certs` types, so the node's unit tests (which are the
//!   `tapledger-node` crate itself) can use them: those types are the same
//!   crates there as in the kit.
//! * Feature `node`: `wire`, the helpers that use the node's phone client
//!   and credential file (opening funded accounts over QUIC, authenticated
//!   phones, a client endpoint pinned to a node process). Only integration
//!   tests (`node/tests`, `tests/it`, the sim's tests) may call them: in the
//!   node's unit tests `tapledger_node::Phone` would be another type than
//!   `crate::Phone`.
//!
//! It does not hold what only one test file needs.

pub mod accounts;
pub mod halves;
pub mod process;
pub mod time;
#[cfg(feature = "node")]
pub mod wire;

pub use accounts::{new_account, new_account_at, open_accounts};
pub use halves::{receive, receive_half, send, send_half};
pub use time::{WAIT, within, within_for};
