//! tapledger's wire vocabulary: the domain types every other crate shares
//! (accounts, halves, outcomes, rejection codes), the messages phones and the
//! node exchange, and the length-prefixed frame codec with its named limits.
//!
//! This crate deliberately does no IO: no sockets, no async, no clocks, no
//! storage. Encoders write into buffers and decoders read byte slices, so the
//! same code serves the node, the Rust client and the fuzzers.

pub mod domain;

pub use domain::*;
