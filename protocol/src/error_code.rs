//! Numeric codes for protocol-level errors: the `error` message's `code`.
//!
//! These are failures of a request or of the stream itself (malformed bytes,
//! missing authentication, bad credentials, limits), as opposed to
//! [`crate::RejectCode`]s, which are the ledger's answers about a payment or a
//! half. The two number ranges never overlap: reject codes stay below 1000,
//! protocol errors use 1000 and up (1000..=1099 caused by the client,
//! 1100..=1199 by the node). This file does not decide when each error is sent;
//! the node does, as `PROTOCOL.md` describes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// QUIC application error code of a normal connection close or stream reset.
/// Any other close or reset carries the [`ErrorCode`] number that caused it
/// (for example 1014 after repeated failed authentication, 1101 at shutdown).
pub const CLOSE_CODE_NORMAL: u32 = 0;

/// A protocol-level error, with a fixed wire number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
pub enum ErrorCode {
    /// 1000: the frame body is not MessagePack, or not a valid message of a
    /// known type (a field is missing or has the wrong type, trailing bytes,
    /// nesting too deep, an empty body). The stream continues.
    Malformed,
    /// 1001: the frame's declared length is above `FRAME_BYTES_MAX`. The node
    /// sends this error, then finishes the stream: it cannot find the next frame.
    FrameTooLarge,
    /// 1002: the `type` names no message the node accepts. The stream continues.
    UnknownMessage,
    /// 1003: a field breaks a limit (a string or byte string too long or too
    /// short, a history `limit` out of range). The stream continues.
    InvalidField,
    /// 1010: the request needs an authenticated connection; send
    /// `authenticate` first.
    NotAuthenticated,
    /// 1011: the connection is already authenticated; authentication happens
    /// once per connection.
    AlreadyAuthenticated,
    /// 1012: the account id and API key do not match an account. Deliberately
    /// the same answer for an unknown account and for a wrong key.
    BadCredentials,
    /// 1013: the admin credential is wrong.
    BadAdminCredential,
    /// 1014: a limit on the connection was hit (too many requests in flight,
    /// too many failed authentications). After repeated authentication
    /// failures the node closes the connection.
    Throttled,
    /// 1015: the account already holds as many authenticated connections as
    /// the node allows (`connections_per_account_max`). The node answers the
    /// `authenticate` with this error and closes the connection with code
    /// 1015; close another connection of the account first.
    TooManyConnections,
    /// 1020: an admin request names an account the node does not have.
    UnknownAccount,
    /// 1021: an admin amount is unusable: a top-up of zero, or a balance that
    /// would overflow.
    InvalidAmount,
    /// 1100: the node failed internally (for example storage). Nothing was
    /// changed by this request; retrying it is safe because halves are
    /// idempotent.
    Internal,
    /// 1101: the node is shutting down and takes no new requests.
    ShuttingDown,
    /// 1102: this replica does not lead the cluster, so it takes no
    /// requests; the error names the leader when the replica knows it.
    /// Reconnect to the leader and resubmit (identical halves are
    /// idempotent) or query the outcome there.
    NotLeader,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::Malformed,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnknownMessage,
        ErrorCode::InvalidField,
        ErrorCode::NotAuthenticated,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::BadCredentials,
        ErrorCode::BadAdminCredential,
        ErrorCode::Throttled,
        ErrorCode::TooManyConnections,
        ErrorCode::UnknownAccount,
        ErrorCode::InvalidAmount,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::NotLeader,
    ];

    pub const fn code(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1000,
            ErrorCode::FrameTooLarge => 1001,
            ErrorCode::UnknownMessage => 1002,
            ErrorCode::InvalidField => 1003,
            ErrorCode::NotAuthenticated => 1010,
            ErrorCode::AlreadyAuthenticated => 1011,
            ErrorCode::BadCredentials => 1012,
            ErrorCode::BadAdminCredential => 1013,
            ErrorCode::Throttled => 1014,
            ErrorCode::TooManyConnections => 1015,
            ErrorCode::UnknownAccount => 1020,
            ErrorCode::InvalidAmount => 1021,
            ErrorCode::Internal => 1100,
            ErrorCode::ShuttingDown => 1101,
            ErrorCode::NotLeader => 1102,
        }
    }

    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|candidate| candidate.code() == code)
    }

    /// A sentence for people; the node may append detail after it.
    pub const fn explanation(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "the frame is not a valid message",
            ErrorCode::FrameTooLarge => "the frame is larger than the node accepts",
            ErrorCode::UnknownMessage => "the message type is not one the node accepts",
            ErrorCode::InvalidField => "a field is outside its limits",
            ErrorCode::NotAuthenticated => "authenticate before this request",
            ErrorCode::AlreadyAuthenticated => "this connection is already authenticated",
            ErrorCode::BadCredentials => "the account id and API key do not match",
            ErrorCode::BadAdminCredential => "the admin credential is wrong",
            ErrorCode::Throttled => "a limit on this connection was reached",
            ErrorCode::TooManyConnections => "this account has too many connections open",
            ErrorCode::UnknownAccount => "no account has this id",
            ErrorCode::InvalidAmount => "the amount is zero or would overflow a balance",
            ErrorCode::Internal => "the node failed internally; nothing was changed",
            ErrorCode::ShuttingDown => "the node is shutting down",
            ErrorCode::NotLeader => "this replica is not the leader",
        }
    }

    /// True when the client caused the error (1000..=1099); false when the
    /// node did (1100 and up).
    pub const fn is_client_error(self) -> bool {
        self.code() < 1100
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        code.code()
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = String;
    fn try_from(code: u16) -> Result<ErrorCode, String> {
        ErrorCode::from_code(code).ok_or_else(|| format!("unknown error code {code}"))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.explanation())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RejectCode;

    #[test]
    fn error_codes_round_trip_and_are_unique() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(code.code()), Some(code));
        }
        let mut numbers: Vec<u16> = ErrorCode::ALL.iter().map(|code| code.code()).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn error_codes_never_collide_with_reject_codes() {
        for error in ErrorCode::ALL {
            assert!(error.code() >= 1000, "{error} is in the reject-code range");
            assert_eq!(RejectCode::from_code(error.code()), None);
        }
        for reject in RejectCode::ALL {
            assert!(reject.code() < 1000, "{reject} is in the error-code range");
        }
    }

    #[test]
    fn protocol_md_lists_every_error_code() {
        // PROTOCOL.md section 11's table has one row per code, by number.
        let document =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md"))
                .expect("PROTOCOL.md at the repository root");
        let section = document
            .split("## 11. Protocol error codes")
            .nth(1)
            .and_then(|rest| rest.split("\n## 12.").next())
            .expect("section 11");
        for code in ErrorCode::ALL {
            let row = format!("\n| {} |", code.code());
            assert!(
                section.contains(&row),
                "PROTOCOL.md section 11 lacks {code}"
            );
        }
        let rows = section
            .lines()
            .filter(|line| line.starts_with("| 1"))
            .count();
        assert_eq!(
            rows,
            ErrorCode::ALL.len(),
            "rows for codes the node does not send"
        );
    }

    #[test]
    fn error_code_is_a_plain_integer_on_the_wire() {
        let bytes = rmp_serde::to_vec(&ErrorCode::BadCredentials).unwrap();
        // uint16 1012 = 0x03f4.
        assert_eq!(bytes, [0xcd, 0x03, 0xf4]);
        let unknown = rmp_serde::to_vec(&999u16).unwrap();
        assert!(rmp_serde::from_slice::<ErrorCode>(&unknown).is_err());
    }
}
