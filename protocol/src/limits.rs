//! Every bound on what crosses the wire, in one place, units last.
//!
//! The codec and [`crate::validate`] enforce the message-level limits here;
//! the connection-level ones (`*_DEFAULT`) are the values the node starts with
//! and a client can rely on unless its operator changed them. This file holds
//! numbers only: it does not enforce anything itself.

/// The ALPN protocol name a client offers and the node requires. The trailing
/// number is the protocol version: an incompatible change gets a new name.
pub const ALPN: &[u8] = b"tapledger/1";

/// The protocol version carried in [`ALPN`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Size of a frame's length prefix: a big-endian `u32`.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Largest frame body (the MessagePack bytes after the length prefix).
///
/// Every client request fits in well under 1 KiB; the largest node answer is a
/// full history page (see [`HISTORY_PAGE_ENTRIES_MAX`]), which stays under 8
/// KiB. A declared length above this is refused before its bytes arrive.
pub const FRAME_BYTES_MAX: usize = 16 * 1024;

/// Deepest nesting of MessagePack arrays and maps in one body. The deepest
/// message (an outcome report carrying a stamped half whose `tx_key` a client
/// sent as an array) nests five levels; the slack admits no attack that
/// matters, while the bound keeps decoding free of deep recursion.
pub const MESSAGE_DEPTH_MAX: usize = 8;

/// Longest short text a client sends: `device_os`, `account_type`,
/// `bank_name`. Counted in UTF-8 bytes.
pub const STRING_BYTES_MAX: usize = 64;

/// Longest explanation or error message the node sends, in UTF-8 bytes.
pub const EXPLANATION_BYTES_MAX: usize = 256;

/// Length of a `tx_key`: a UUID's 16 bytes.
pub const TX_KEY_BYTES: usize = 16;

/// Shortest API key a client may register or present. 32 random bytes make
/// guessing hopeless; shorter keys are refused rather than hashed.
pub const API_KEY_BYTES_MIN: usize = 32;

/// Longest API key; bounds the hashing work an unauthenticated peer can cause.
pub const API_KEY_BYTES_MAX: usize = 128;

/// Shortest salt registered with an API key hash.
pub const SALT_BYTES_MIN: usize = 16;

/// Longest salt registered with an API key hash.
pub const SALT_BYTES_MAX: usize = 64;

/// Length of a key hash: SHA3-512's output.
pub const KEY_HASH_BYTES: usize = 64;

/// Shortest admin credential the node accepts on the wire (`init` makes 32
/// random bytes).
pub const ADMIN_CREDENTIAL_BYTES_MIN: usize = 32;

/// Longest admin credential the node accepts on the wire.
pub const ADMIN_CREDENTIAL_BYTES_MAX: usize = 128;

/// Most entries in one history page, and the largest `limit` a `history`
/// request may ask for.
pub const HISTORY_PAGE_ENTRIES_MAX: u16 = 50;

/// Requests on one connection that may await their final answer at once
/// (a half accepted and waiting for its partner counts until its outcome is
/// pushed). One more gets error 1014 `throttled` and is not carried out.
pub const REQUESTS_IN_FLIGHT_MAX_DEFAULT: u32 = 256;

/// Bidirectional streams a client may have open at once on one connection.
/// One is enough; the spare ones let a client replace a stream it reset.
pub const STREAMS_PER_CONNECTION_MAX_DEFAULT: u32 = 4;

/// Failed `authenticate` attempts after which the node closes the connection.
pub const AUTH_FAILURES_PER_CONNECTION_MAX_DEFAULT: u32 = 3;

/// The node closes a connection that has been silent this long.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// How often a client should send QUIC keep-alives (well under the idle
/// timeouts), so that a phone waiting for an outcome keeps its connection.
pub const KEEP_ALIVE_INTERVAL_MS_DEFAULT: u64 = 1_000;

/// The idle timeout a client should ask for (QUIC takes the smaller of the
/// two peers'): a replica that died without a word (power, SIGKILL) sends no
/// close, and its phones notice only when nothing has come back for this
/// long; then they reconnect to the new leader.
pub const CLIENT_IDLE_TIMEOUT_MS_DEFAULT: u64 = 3_000;
