//! The ledger's decisions without IO: rules, live account books and the
//! matcher state machine. Nothing here awaits, reads a clock or touches redb,
//! so all of it runs under unit and property tests without a runtime.

pub mod book;
pub mod matching;
pub mod rules;
