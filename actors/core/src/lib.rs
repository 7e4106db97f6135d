//! tapledger's decisions without IO: the settlement rules, live account books
//! and the matcher state machine. Nothing here awaits, reads a clock or
//! touches storage (this crate depends on `tapledger-protocol` and serde's
//! derives alone, so the compiler keeps it that way), and all of it runs
//! under unit and property tests without a runtime.
//!
//! * [`rules`]: what one half, and two halves together, decide.
//! * [`book`]: one account's balance and reservations.
//! * [`matching`]: [`Matcher`](matching::Matcher), halves in and effects out.
//!
//! Every answer leaves as a returned value: refusals are
//! [`RejectCode`](tapledger_protocol::RejectCode)s, and a failure of the
//! storage that carries the effects out is the caller's own error type,
//! passed through to the waiters it concerns ([`matching::Waiter::Error`]).

pub mod book;
pub mod matching;
pub mod rules;
