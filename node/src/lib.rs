//! The tapledger node: serves the ledger to phones over QUIC (quinn, rustls
//! TLS 1.3, ring). The Rust phone client that talks to it is its own crate,
//! `tapledger-client`, re-exported here as [`client`].
//!
//! * [`server`] — endpoint, accept loop, limits, shutdown.
//! * [`admission`] — the attempt rate above which clients are validated,
//!   the connection table (and when it is nearly full), connections per account.
//! * [`peer`] — replication between replicas: Raft over QUIC, mutual TLS.
//! * [`session`] — per connection and stream: frames in, answers out.
//! * `handlers` — one handler per request kind; `dispatch` only routes.
//! * [`client`] — the phone client, `tapledger-client` re-exported:
//!   `ClientEndpoint` and `Phone`, used by `tapledger-sim` and tests.
//! * [`init`], [`config`], [`tls`] — data directory, settings, TLS configs.
//! * [`settings`], [`logging`], [`telemetry`], [`ops`], [`export`] — the
//!   operator's side: configuration layers, logs, metrics and health, offline
//!   ledger commands, CSV export.
//!
//! Business rules live in `tapledger-actors`; this crate only translates.

pub mod admission;
pub mod config;
pub mod export;
mod handlers;
pub mod init;
pub mod logging;
pub mod ops;
pub mod peer;
pub mod server;
pub mod session;
pub mod settings;
pub mod telemetry;
pub mod tls;

pub use client::{
    ApiCredentials, ClientEndpoint, ClientError, HalfAnswer, Phone, ReplicaAddress, Submitted,
};
pub use config::{DataDir, Limits, NodeConfig};
pub use server::{NodeError, RunningNode};
/// The Rust phone client, its own crate so that a phone app depends on it
/// without the ledger.
pub use tapledger_client as client;
