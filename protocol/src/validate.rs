//! Field limits on decoded messages: lengths of strings and byte strings,
//! printable text, the history page size.
//!
//! These are structural checks a message fails on its own, answered with
//! protocol error 1003 `invalid_field`. Ledger rules (an amount of zero,
//! paying yourself, an unknown account) are deliberately not here: they are
//! the ledger's to decide, with their own reject codes, so a client sees the
//! same code whether it sent bytes or called a library.

use std::fmt;

use crate::domain::Half;
use crate::limits::{
    ADMIN_CREDENTIAL_BYTES_MAX, ADMIN_CREDENTIAL_BYTES_MIN, API_KEY_BYTES_MAX, API_KEY_BYTES_MIN,
    EXPLANATION_BYTES_MAX, HISTORY_PAGE_ENTRIES_MAX, KEY_HASH_BYTES, SALT_BYTES_MAX,
    SALT_BYTES_MIN, STRING_BYTES_MAX,
};
use crate::messages::{ClientMessage, NodeMessage, OutcomeReport};

/// A field of a decoded message breaks a limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct ValidationError {
    /// The field's wire name.
    pub field: &'static str,
    pub problem: Problem,
}

/// How a field breaks its limit. Lengths are in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    TooLong {
        len: usize,
        max: usize,
    },
    TooShort {
        len: usize,
        min: usize,
    },
    Empty,
    /// Text with control characters would corrupt logs and exports.
    ControlCharacter,
    OutOfRange {
        value: u64,
        min: u64,
        max: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::TooLong { len, max } => write!(f, "is {len} bytes; at most {max} allowed"),
            Problem::TooShort { len, min } => write!(f, "is {len} bytes; at least {min} needed"),
            Problem::Empty => f.write_str("must not be empty"),
            Problem::ControlCharacter => f.write_str("must not contain control characters"),
            Problem::OutOfRange { value, min, max } => {
                write!(f, "is {value}; must be {min}..={max}")
            }
        }
    }
}

impl ClientMessage {
    /// Checks every field limit of a request. The node calls this (through
    /// `decode_frame`) before acting on anything.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            ClientMessage::Authenticate { api_key, .. } => bytes_within(
                "api_key",
                api_key.len(),
                API_KEY_BYTES_MIN,
                API_KEY_BYTES_MAX,
            ),
            ClientMessage::SubmitHalf { half, .. } => half_text("half.device_os", half),
            ClientMessage::QueryOutcome { .. } | ClientMessage::Balance { .. } => Ok(()),
            ClientMessage::History { limit, .. } => {
                if (1..=HISTORY_PAGE_ENTRIES_MAX).contains(limit) {
                    Ok(())
                } else {
                    Err(ValidationError {
                        field: "limit",
                        problem: Problem::OutOfRange {
                            value: u64::from(*limit),
                            min: 1,
                            max: u64::from(HISTORY_PAGE_ENTRIES_MAX),
                        },
                    })
                }
            }
            ClientMessage::OpenAccount {
                admin_credential,
                account_type,
                bank_name,
                salt,
                key_hash,
                ..
            } => {
                admin_credential_within(admin_credential.len())?;
                name_text("account_type", account_type)?;
                name_text("bank_name", bank_name)?;
                bytes_within("salt", salt.len(), SALT_BYTES_MIN, SALT_BYTES_MAX)?;
                bytes_within("key_hash", key_hash.len(), KEY_HASH_BYTES, KEY_HASH_BYTES)
            }
            ClientMessage::TopUp {
                admin_credential, ..
            } => admin_credential_within(admin_credential.len()),
        }
    }
}

impl NodeMessage {
    /// Checks every field limit of an answer. Clients call this (through
    /// `decode_frame`) so a faulty or hostile node cannot hand them unbounded
    /// text; the node's own tests use it to prove it never sends such a thing.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            NodeMessage::Authenticated { .. }
            | NodeMessage::Accepted { .. }
            | NodeMessage::BalanceAnswer { .. }
            | NodeMessage::AccountOpened { .. }
            | NodeMessage::ToppedUp { .. } => Ok(()),
            NodeMessage::Outcome { report, .. } => report_within(report),
            NodeMessage::OutcomeAnswer { report, .. } => match report {
                Some(report) => report_within(report),
                None => Ok(()),
            },
            NodeMessage::Refused { explanation, .. } => {
                bytes_within("explanation", explanation.len(), 0, EXPLANATION_BYTES_MAX)
            }
            NodeMessage::HistoryAnswer { entries, .. } => bytes_within(
                "entries",
                entries.len(),
                0,
                usize::from(HISTORY_PAGE_ENTRIES_MAX),
            ),
            NodeMessage::Error { message, .. } => {
                bytes_within("message", message.len(), 0, EXPLANATION_BYTES_MAX)
            }
        }
    }
}

fn report_within(report: &OutcomeReport) -> Result<(), ValidationError> {
    bytes_within(
        "report.explanation",
        report.explanation.len(),
        0,
        EXPLANATION_BYTES_MAX,
    )?;
    if let Some(send) = &report.send {
        bytes_within(
            "report.send.half.device_os",
            send.half.device_os.len(),
            0,
            STRING_BYTES_MAX,
        )?;
    }
    if let Some(receive) = &report.receive {
        bytes_within(
            "report.receive.half.device_os",
            receive.half.device_os.len(),
            0,
            STRING_BYTES_MAX,
        )?;
    }
    Ok(())
}

/// `device_os` may be empty (a phone that does not know its OS) but is
/// bounded and printable.
fn half_text(field: &'static str, half: &Half) -> Result<(), ValidationError> {
    let text = half.device_os();
    bytes_within(field, text.len(), 0, STRING_BYTES_MAX)?;
    printable(field, text)
}

/// Names an operator types must say something, briefly and printably.
fn name_text(field: &'static str, text: &str) -> Result<(), ValidationError> {
    if text.is_empty() {
        return Err(ValidationError {
            field,
            problem: Problem::Empty,
        });
    }
    bytes_within(field, text.len(), 1, STRING_BYTES_MAX)?;
    printable(field, text)
}

fn printable(field: &'static str, text: &str) -> Result<(), ValidationError> {
    if text.chars().any(char::is_control) {
        return Err(ValidationError {
            field,
            problem: Problem::ControlCharacter,
        });
    }
    Ok(())
}

fn admin_credential_within(len: usize) -> Result<(), ValidationError> {
    bytes_within(
        "admin_credential",
        len,
        ADMIN_CREDENTIAL_BYTES_MIN,
        ADMIN_CREDENTIAL_BYTES_MAX,
    )
}

fn bytes_within(
    field: &'static str,
    len: usize,
    min: usize,
    max: usize,
) -> Result<(), ValidationError> {
    if len < min {
        return Err(ValidationError {
            field,
            problem: Problem::TooShort { len, min },
        });
    }
    if len > max {
        return Err(ValidationError {
            field,
            problem: Problem::TooLong { len, max },
        });
    }
    Ok(())
}
