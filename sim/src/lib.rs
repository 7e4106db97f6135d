//! tapledger's load generator and benchmarks, as a library so that tests can
//! run them in process.
//!
//! * [`bench::core`] drives the ledger API directly (no network) and measures
//!   durable settlements against this machine's raw fsync and redb commit rates.
//!
//! The phone swarm, which talks to a node over QUIC, comes later; it will
//! live beside `bench` and become the binary's default run.

pub mod bench;
