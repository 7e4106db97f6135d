//! The frame codec: a 4-byte big-endian body length, then that many bytes of
//! MessagePack holding one message.
//!
//! Decoding works on byte slices and reports "need more bytes" (`Ok(None)`)
//! apart from every kind of bad input (`Err`), so a caller can feed it
//! whatever its socket delivered so far. It never panics, never reads past a
//! frame, and never allocates from a declared length above `FRAME_BYTES_MAX`.
//! This file does no IO and keeps no state between calls; buffering a stream
//! is [`crate::FrameReader`]'s (`reader.rs`).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::limits::{FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use crate::messages::{CLIENT_TYPE_NAMES, ClientMessage, NODE_TYPE_NAMES, NodeMessage, RequestId};
use crate::scan::check_structure;
use crate::validate::ValidationError;
use crate::{ErrorCode, messages::truncate_to_char_boundary};

/// A message type that travels in frames: one direction's enum.
pub trait WireMessage: Serialize + DeserializeOwned {
    /// The `type` names this direction accepts.
    const TYPE_NAMES: &'static [&'static str];

    /// Checks the field limits (see `validate.rs`).
    fn validate(&self) -> Result<(), ValidationError>;

    /// The request id the message carries, if any.
    fn request_id(&self) -> Option<RequestId>;
}

impl WireMessage for ClientMessage {
    const TYPE_NAMES: &'static [&'static str] = &CLIENT_TYPE_NAMES;

    fn validate(&self) -> Result<(), ValidationError> {
        ClientMessage::validate(self)
    }

    fn request_id(&self) -> Option<RequestId> {
        Some(ClientMessage::request_id(self))
    }
}

impl WireMessage for NodeMessage {
    const TYPE_NAMES: &'static [&'static str] = &NODE_TYPE_NAMES;

    fn validate(&self) -> Result<(), ValidationError> {
        NodeMessage::validate(self)
    }

    fn request_id(&self) -> Option<RequestId> {
        NodeMessage::request_id(self)
    }
}

/// Why bytes could not be decoded into a message.
///
/// [`DecodeError::frame_bytes`] tells whether the stream can go on: every
/// error after a readable length prefix names the bytes to skip, so one bad
/// message costs one `error` answer, not the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The prefix declares more than `FRAME_BYTES_MAX` bytes. Refused as soon
    /// as the prefix arrives; the stream cannot be resynchronised.
    #[error("frame declares {declared} bytes; at most {FRAME_BYTES_MAX} allowed")]
    FrameTooLarge { declared: u32 },
    /// The prefix declares an empty body.
    #[error("frame declares an empty body")]
    EmptyFrame,
    /// The body is not one MessagePack value within limits, or not a valid
    /// message of a known type. `request_id` is the body's, when it is a
    /// map within the structural limits whose `request_id` is a u64.
    #[error("malformed message: {reason}")]
    Malformed {
        reason: String,
        request_id: Option<RequestId>,
        frame_bytes: usize,
    },
    /// The body's `type` is not a message this side accepts.
    #[error("unknown message type {type_name:?}")]
    UnknownMessage {
        type_name: String,
        request_id: Option<RequestId>,
        frame_bytes: usize,
    },
    /// A well-formed message breaks a field limit.
    #[error("invalid field: {error}")]
    Invalid {
        error: ValidationError,
        request_id: Option<RequestId>,
        frame_bytes: usize,
    },
}

impl DecodeError {
    /// The protocol error code a node answers this with.
    pub const fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::EmptyFrame | DecodeError::Malformed { .. } => ErrorCode::Malformed,
            DecodeError::UnknownMessage { .. } => ErrorCode::UnknownMessage,
            DecodeError::Invalid { .. } => ErrorCode::InvalidField,
        }
    }

    /// Bytes (prefix included) to drop before the next frame; `None` when the
    /// stream cannot continue.
    pub const fn frame_bytes(&self) -> Option<usize> {
        match self {
            DecodeError::FrameTooLarge { .. } => None,
            DecodeError::EmptyFrame => Some(FRAME_HEADER_BYTES),
            DecodeError::Malformed { frame_bytes, .. }
            | DecodeError::UnknownMessage { frame_bytes, .. }
            | DecodeError::Invalid { frame_bytes, .. } => Some(*frame_bytes),
        }
    }

    /// The request id, when the message was readable enough to have one.
    pub const fn request_id(&self) -> Option<RequestId> {
        match self {
            DecodeError::Invalid { request_id, .. }
            | DecodeError::Malformed { request_id, .. }
            | DecodeError::UnknownMessage { request_id, .. } => *request_id,
            DecodeError::FrameTooLarge { .. } | DecodeError::EmptyFrame => None,
        }
    }
}

/// Why a message could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("message encodes to {bytes} bytes; a frame holds at most {FRAME_BYTES_MAX}")]
    TooLarge { bytes: usize },
    #[error("message could not be serialized: {0}")]
    Serialize(String),
}

/// Finds the first complete frame in `buffer`.
///
/// `Ok(None)`: the frame is not complete yet; read more and call again.
/// `Ok(Some((body, consumed)))`: `body` is the MessagePack bytes and
/// `consumed` the frame's total length (prefix included).
pub fn split_frame(buffer: &[u8]) -> Result<Option<(&[u8], usize)>, DecodeError> {
    let Some(prefix) = buffer.first_chunk::<FRAME_HEADER_BYTES>() else {
        return Ok(None);
    };
    let declared = u32::from_be_bytes(*prefix);
    // Compare as u64 so the check holds on any pointer width.
    if u64::from(declared) > FRAME_BYTES_MAX as u64 {
        return Err(DecodeError::FrameTooLarge { declared });
    }
    if declared == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    let body_len = declared as usize;
    let consumed = FRAME_HEADER_BYTES + body_len;
    match buffer.get(FRAME_HEADER_BYTES..consumed) {
        Some(body) => Ok(Some((body, consumed))),
        None => Ok(None),
    }
}

/// Decodes the first frame in `buffer` into a validated message.
///
/// `Ok(None)` means more bytes are needed; `Ok(Some((message, consumed)))`
/// hands back the message and the bytes its frame took. Errors say whether
/// and how far to skip ([`DecodeError::frame_bytes`]).
pub fn decode_frame<M: WireMessage>(buffer: &[u8]) -> Result<Option<(M, usize)>, DecodeError> {
    let Some((body, consumed)) = split_frame(buffer)? else {
        return Ok(None);
    };
    decode_body(body, consumed).map(|message| Some((message, consumed)))
}

/// Decodes one frame body (without its prefix) into a validated message.
/// `frame_bytes` is reported back in errors so the caller can skip the frame.
pub fn decode_body<M: WireMessage>(body: &[u8], frame_bytes: usize) -> Result<M, DecodeError> {
    if let Err(error) = check_structure(body) {
        // Not parsed any further: the body breaks the structural limits.
        return Err(DecodeError::Malformed {
            reason: error.to_string(),
            request_id: None,
            frame_bytes,
        });
    }
    let message: M = match rmp_serde::from_slice(body) {
        Ok(message) => message,
        Err(error) => return Err(classify_failure::<M>(body, error, frame_bytes)),
    };
    if let Err(error) = message.validate() {
        return Err(DecodeError::Invalid {
            error,
            request_id: message.request_id(),
            frame_bytes,
        });
    }
    Ok(message)
}

/// Tells an unknown `type` apart from a broken message of a known type, and
/// finds the body's `request_id` if it has a readable one, so that the
/// error names its request. Runs only on the failure path (on a body that
/// passed the structural scan), so the extra parses cost nothing normally.
fn classify_failure<M: WireMessage>(
    body: &[u8],
    error: rmp_serde::decode::Error,
    frame_bytes: usize,
) -> DecodeError {
    #[derive(serde::Deserialize)]
    struct TypeProbe {
        #[serde(rename = "type")]
        type_name: String,
    }
    #[derive(serde::Deserialize)]
    struct RequestIdProbe {
        request_id: RequestId,
    }
    // Only a map has named fields (an array would hand its first element
    // to the probe's only field).
    let is_map = matches!(body.first(), Some(0x80..=0x8f | 0xde | 0xdf));
    let request_id = is_map
        .then(|| rmp_serde::from_slice::<RequestIdProbe>(body).ok())
        .flatten()
        .map(|probe| probe.request_id);
    if let Ok(TypeProbe { mut type_name }) = rmp_serde::from_slice::<TypeProbe>(body)
        && !M::TYPE_NAMES.contains(&type_name.as_str())
    {
        // The name is the peer's text: keep it short in logs and answers.
        truncate_to_char_boundary(&mut type_name, crate::limits::STRING_BYTES_MAX);
        return DecodeError::UnknownMessage {
            type_name,
            request_id,
            frame_bytes,
        };
    }
    let mut reason = error.to_string();
    truncate_to_char_boundary(&mut reason, crate::limits::STRING_BYTES_MAX * 2);
    DecodeError::Malformed {
        reason,
        request_id,
        frame_bytes,
    }
}

/// Appends `message` as one frame to `out` and returns the frame's length.
///
/// Fields are encoded as named maps. The message is not validated (tests use
/// this to send invalid messages on purpose); only the frame size is checked.
/// On error `out` is left exactly as it was: never a partial frame.
pub fn encode_frame<M: Serialize>(message: &M, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    if let Err(error) = rmp_serde::encode::write_named(out, message) {
        out.truncate(start);
        return Err(EncodeError::Serialize(error.to_string()));
    }
    let body_len = out.len() - start - FRAME_HEADER_BYTES;
    if body_len > FRAME_BYTES_MAX {
        out.truncate(start);
        return Err(EncodeError::TooLarge { bytes: body_len });
    }
    // Fits: FRAME_BYTES_MAX is far below u32::MAX.
    let prefix = (body_len as u32).to_be_bytes();
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&prefix);
    Ok(FRAME_HEADER_BYTES + body_len)
}

/// `encode_frame` into a fresh buffer.
pub fn encode_frame_to_vec<M: Serialize>(message: &M) -> Result<Vec<u8>, EncodeError> {
    // Room for a typical request or answer, so that one allocation holds it.
    let mut out = Vec::with_capacity(256);
    encode_frame(message, &mut out)?;
    Ok(out)
}

#[cfg(test)]
#[path = "frame_tests.rs"]
pub(crate) mod tests;
