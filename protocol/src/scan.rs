//! A single pass over a frame body that proves it is one well-formed
//! MessagePack value within the protocol's structural limits, before serde
//! sees it.
//!
//! Why: serde pre-allocates collections from the element counts a peer
//! declares (up to about 1 MiB each) and recurses once per nesting level.
//! After this pass every declared count is at most the bytes left in the
//! frame, nesting is at most `MESSAGE_DEPTH_MAX`, extension types (unused by
//! the protocol) are refused and nothing trails the value. This does not
//! check that the value is a valid message; serde does that next.

use rmp::Marker;

use crate::limits::MESSAGE_DEPTH_MAX;

/// Why a body is not an acceptable MessagePack value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("the value ends early at byte {at}")]
    Truncated { at: usize },
    #[error("{count} bytes follow the value")]
    TrailingBytes { count: usize },
    #[error("nesting deeper than {MESSAGE_DEPTH_MAX} at byte {at}")]
    TooDeep { at: usize },
    #[error("a container at byte {at} declares {declared} elements but only {left} bytes follow")]
    CountExceedsBytes {
        at: usize,
        declared: u64,
        left: usize,
    },
    #[error("byte {byte:#04x} at {at} is not a MessagePack type this protocol uses")]
    Unsupported { at: usize, byte: u8 },
}

/// Checks that `body` holds exactly one MessagePack value within the limits.
pub fn check_structure(body: &[u8]) -> Result<(), ScanError> {
    // `open[level]` counts the values still expected at that nesting level;
    // level 0 is the single top-level value. Fixed size: depth is bounded.
    let mut open = [0u64; MESSAGE_DEPTH_MAX + 1];
    let mut depth = 0usize;
    open[0] = 1;
    let mut at = 0usize;
    loop {
        while open[depth] == 0 {
            if depth == 0 {
                if at < body.len() {
                    return Err(ScanError::TrailingBytes {
                        count: body.len() - at,
                    });
                }
                return Ok(());
            }
            depth -= 1;
        }
        open[depth] -= 1;
        let start = at;
        let marker_byte = *body.get(at).ok_or(ScanError::Truncated { at })?;
        at += 1;
        let (skip, elements): (usize, u64) = match Marker::from_u8(marker_byte) {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                (0, 0)
            }
            Marker::U8 | Marker::I8 => (1, 0),
            Marker::U16 | Marker::I16 => (2, 0),
            Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
            Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
            Marker::FixStr(len) => (usize::from(len), 0),
            Marker::Str8 | Marker::Bin8 => (read_len(body, &mut at, 1)?, 0),
            Marker::Str16 | Marker::Bin16 => (read_len(body, &mut at, 2)?, 0),
            Marker::Str32 | Marker::Bin32 => (read_len(body, &mut at, 4)?, 0),
            Marker::FixArray(count) => (0, u64::from(count)),
            Marker::Array16 => (0, read_len(body, &mut at, 2)? as u64),
            Marker::Array32 => (0, read_len(body, &mut at, 4)? as u64),
            // A map of n entries is 2n values.
            Marker::FixMap(count) => (0, 2 * u64::from(count)),
            Marker::Map16 => (0, 2 * read_len(body, &mut at, 2)? as u64),
            Marker::Map32 => (0, 2 * read_len(body, &mut at, 4)? as u64),
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32
            | Marker::Reserved => {
                return Err(ScanError::Unsupported {
                    at: start,
                    byte: marker_byte,
                });
            }
        };
        let left = body.len() - at;
        if skip > left {
            return Err(ScanError::Truncated { at: body.len() });
        }
        at += skip;
        if elements > 0 {
            // Every element takes at least one byte, so a count above the
            // bytes left is a lie; refusing it bounds every allocation serde
            // makes from a declared count.
            if elements > (body.len() - at) as u64 {
                return Err(ScanError::CountExceedsBytes {
                    at: start,
                    declared: elements,
                    left: body.len() - at,
                });
            }
            if depth + 1 > MESSAGE_DEPTH_MAX {
                return Err(ScanError::TooDeep { at: start });
            }
            depth += 1;
            open[depth] = elements;
        }
    }
}

/// Reads a big-endian length of `width` bytes at `at` and moves past it.
fn read_len(body: &[u8], at: &mut usize, width: usize) -> Result<usize, ScanError> {
    let end = at
        .checked_add(width)
        .filter(|end| *end <= body.len())
        .ok_or(ScanError::Truncated { at: body.len() })?;
    let value = body[*at..end]
        .iter()
        .fold(0u64, |value, byte| (value << 8) | u64::from(*byte));
    *at = end;
    // Saturate rather than fail on 32-bit targets: the caller compares the
    // length with the bytes left, which a saturated value always exceeds.
    Ok(usize::try_from(value).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_one_complete_value() {
        // {"a": [1, "xy", nil]}
        let body = [0x81, 0xa1, b'a', 0x93, 0x01, 0xa2, b'x', b'y', 0xc0];
        assert_eq!(check_structure(&body), Ok(()));
    }

    #[test]
    fn refuses_empty_truncated_and_trailing_input() {
        assert_eq!(check_structure(&[]), Err(ScanError::Truncated { at: 0 }));
        // fixstr of 3 with 2 bytes.
        assert!(matches!(
            check_structure(&[0xa3, b'a', b'b']),
            Err(ScanError::Truncated { .. })
        ));
        // u32 marker with 3 bytes.
        assert!(matches!(
            check_structure(&[0xce, 0, 0, 1]),
            Err(ScanError::Truncated { .. })
        ));
        assert_eq!(
            check_structure(&[0x01, 0x02]),
            Err(ScanError::TrailingBytes { count: 1 })
        );
    }

    #[test]
    fn refuses_counts_larger_than_the_bytes_left() {
        // array32 declaring 4 billion elements in a 7-byte body.
        let body = [0xdd, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02];
        assert!(matches!(
            check_structure(&body),
            Err(ScanError::CountExceedsBytes {
                declared: 0xffff_ffff,
                ..
            })
        ));
        // map16 of 2 entries = 4 values, with only 3 bytes after.
        let body = [0xde, 0x00, 0x02, 0x01, 0x02, 0x03];
        assert!(matches!(
            check_structure(&body),
            Err(ScanError::CountExceedsBytes { declared: 4, .. })
        ));
    }

    #[test]
    fn refuses_nesting_beyond_the_limit() {
        let mut body = vec![0x91; MESSAGE_DEPTH_MAX];
        body.push(0x01);
        assert_eq!(check_structure(&body), Ok(()));
        let mut body = vec![0x91; MESSAGE_DEPTH_MAX + 1];
        body.push(0x01);
        assert!(matches!(
            check_structure(&body),
            Err(ScanError::TooDeep { .. })
        ));
    }

    #[test]
    fn refuses_extension_types_and_the_reserved_byte() {
        assert!(matches!(
            check_structure(&[0xd4, 0x01, 0x02]),
            Err(ScanError::Unsupported { byte: 0xd4, .. })
        ));
        assert!(matches!(
            check_structure(&[0xc1]),
            Err(ScanError::Unsupported { byte: 0xc1, .. })
        ));
    }

    #[test]
    fn empty_containers_close_without_consuming_bytes() {
        // [[], {}, []]
        assert_eq!(check_structure(&[0x93, 0x90, 0x80, 0x90]), Ok(()));
    }
}
