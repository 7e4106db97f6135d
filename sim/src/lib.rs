//! tapledger's load generator and benchmarks, as a library so that tests can
//! run them in process.
//!
//! * [`bench::core`] drives the ledger API directly (no network) and measures
//!   durable settlements against this machine's raw fsync and redb commit rates.
//! * [`swarm`] is the phone swarm that talks to a node over QUIC: the binary's
//!   default run, single actions, fault scenarios and `bench e2e`.
//! * [`text`] formats the figures every report prints.

pub mod bench;
pub mod swarm;
pub mod text;
