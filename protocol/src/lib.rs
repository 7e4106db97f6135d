//! tapledger's wire vocabulary: the domain types every other crate shares
//! (accounts, halves, outcomes, rejection codes), the messages phones and the
//! node exchange, the length-prefixed frame codec with its named limits, and
//! [`FrameReader`], which turns a byte stream into those messages.
//!
//! This crate deliberately does no IO: no sockets, no async, no clocks, no
//! storage. Encoders write into buffers and decoders read byte slices, so the
//! same code serves the node, the Rust client and the fuzzers. `PROTOCOL.md`
//! at the repository root describes the same format for other languages.

pub mod auth;
pub mod domain;
pub mod error_code;
pub mod examples;
pub mod frame;
pub mod limits;
pub mod messages;
pub mod reader;
pub mod scan;
pub mod validate;

pub use auth::{Secret, bytes_equal, key_hash, key_matches};
pub use domain::*;
pub use error_code::{CLOSE_CODE_NORMAL, ErrorCode};
pub use frame::{
    DecodeError, EncodeError, WireMessage, decode_body, decode_frame, encode_frame,
    encode_frame_to_vec, split_frame,
};
pub use limits::*;
pub use messages::{
    ClientMessage, HistoryEntry, HistoryKind, LeaderRef, NodeMessage, OutcomeReport, OutcomeStatus,
    QueryStatus, RequestId,
};
pub use reader::{FrameReader, Frames};
pub use validate::{Problem, ValidationError};
