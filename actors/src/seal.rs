//! Checksums on every record the ledger and the Raft log keep.
//!
//! A stored value is `checksum ‖ payload`, where the checksum is XXH3-128
//! over the table's name, the record's key and the payload: a changed byte
//! anywhere in the value, a record written under another key or moved to
//! another table, all fail [`unseal`]. Every read checks it, so a damaged
//! record is an error ([`StoreError::Damaged`]), never a wrong answer.
//! redb's own page checksums cover the tree structure (verified at open
//! when the caller asks, see `Store::open_checked`); these cover the records
//! the ledger reads through it, on every read, read-only opens included.
//!
//! The checksum is for damage (bit rot, misdirected or torn writes, a
//! zeroed page), not for forgery: whoever can write the file can recompute
//! it. The journal additionally chains its entries (`store.rs`), so a lost,
//! reordered or replayed entry is found by an audit.

use twox_hash::XxHash3_128;

use crate::error::StoreError;

/// Bytes of checksum in front of every stored payload.
pub(crate) const CHECKSUM_LEN: usize = 16;

/// A record key as its checksum covers it: integers little-endian, names as
/// their UTF-8 bytes.
pub(crate) trait RecordKey: Copy {
    fn write_to(self, hasher: &mut Hashing);
    /// How the key is named in an error.
    fn describe(self) -> String;
}

impl RecordKey for u64 {
    fn write_to(self, hasher: &mut Hashing) {
        hasher.write(&self.to_le_bytes());
    }
    fn describe(self) -> String {
        self.to_string()
    }
}

impl RecordKey for u128 {
    fn write_to(self, hasher: &mut Hashing) {
        hasher.write(&self.to_le_bytes());
    }
    fn describe(self) -> String {
        tapledger_protocol::TxKey::from_u128(self).to_string()
    }
}

impl RecordKey for &str {
    fn write_to(self, hasher: &mut Hashing) {
        hasher.write(&(self.len() as u64).to_le_bytes());
        hasher.write(self.as_bytes());
    }
    fn describe(self) -> String {
        format!("{self:?}")
    }
}

/// XXH3-128 over everything written to it, as if written in one piece.
///
/// Up to [`Hashing::INLINE`] bytes are gathered on the stack and hashed in
/// one call: `XxHash3_128::new()` allocates its buffer and secret, which
/// cost more than hashing a journal entry. Longer inputs go through the
/// streaming hasher; XXH3 gives a stream the hash of its concatenation, so
/// the two ways agree (tested below) and records written either way check.
pub(crate) struct Hashing {
    inline: [u8; Hashing::INLINE],
    len: usize,
    streaming: Option<XxHash3_128>,
}

impl Hashing {
    const INLINE: usize = 1024;

    pub(crate) fn new() -> Hashing {
        Hashing {
            inline: [0; Hashing::INLINE],
            len: 0,
            streaming: None,
        }
    }

    pub(crate) fn write(&mut self, input: &[u8]) {
        if let Some(hasher) = &mut self.streaming {
            hasher.write(input);
        } else if let Some(room) = self.inline.get_mut(self.len..self.len + input.len()) {
            room.copy_from_slice(input);
            self.len += input.len();
        } else {
            let mut hasher = XxHash3_128::new();
            hasher.write(&self.inline[..self.len]);
            hasher.write(input);
            self.streaming = Some(hasher);
        }
    }

    pub(crate) fn finish_128(&self) -> u128 {
        match &self.streaming {
            Some(hasher) => hasher.finish_128(),
            None => XxHash3_128::oneshot(&self.inline[..self.len]),
        }
    }
}

/// The checksum of `payload` stored under `key` in `table`.
pub(crate) fn checksum(table: &str, key: impl RecordKey, payload: &[u8]) -> u128 {
    let mut hasher = Hashing::new();
    hasher.write(&(table.len() as u64).to_le_bytes());
    hasher.write(table.as_bytes());
    key.write_to(&mut hasher);
    hasher.write(payload);
    hasher.finish_128()
}

/// The journal's hash chain: the link of entry `seq` with encoded bytes
/// `entry`, following the link `previous` of entry `seq - 1` (0 before the
/// first entry). Each link covers every entry before it.
pub(crate) fn chain_link(previous: u128, seq: u64, entry: &[u8]) -> u128 {
    let mut hasher = Hashing::new();
    hasher.write(b"tapledger journal chain");
    hasher.write(&previous.to_le_bytes());
    hasher.write(&seq.to_le_bytes());
    hasher.write(entry);
    hasher.finish_128()
}

/// `payload` with its checksum in front, as stored.
pub(crate) fn seal(table: &str, key: impl RecordKey, payload: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(CHECKSUM_LEN + payload.len());
    sealed.extend_from_slice(&checksum(table, key, payload).to_le_bytes());
    sealed.extend_from_slice(payload);
    sealed
}

/// Seals a value built in place: `buffer` holds [`CHECKSUM_LEN`] bytes of
/// room, then the payload; the room gets the payload's checksum. The same
/// bytes as [`seal`], without a copy of the payload.
pub(crate) fn seal_in_place(table: &str, key: impl RecordKey, buffer: &mut [u8]) {
    let (room, payload) = buffer
        .split_first_chunk_mut::<CHECKSUM_LEN>()
        .expect("a sealed buffer starts with room for its checksum");
    *room = checksum(table, key, payload).to_le_bytes();
}

/// The payload of a stored value, once its checksum matches.
pub(crate) fn unseal<'a>(
    table: &str,
    key: impl RecordKey,
    sealed: &'a [u8],
) -> Result<&'a [u8], StoreError> {
    let damaged = |what: &str| StoreError::Damaged {
        table: table.to_string(),
        key: key.describe(),
        what: what.to_string(),
    };
    let (stored, payload) = sealed
        .split_first_chunk::<CHECKSUM_LEN>()
        .ok_or_else(|| damaged("shorter than its checksum"))?;
    if u128::from_le_bytes(*stored) != checksum(table, key, payload) {
        return Err(damaged("checksum mismatch"));
    }
    Ok(payload)
}

/// A sealed fixed-size payload (integers), checked for its length too.
pub(crate) fn unseal_array<const N: usize>(
    table: &str,
    key: impl RecordKey,
    sealed: &[u8],
) -> Result<[u8; N], StoreError> {
    let payload = unseal(table, key, sealed)?;
    payload.try_into().map_err(|_| StoreError::Damaged {
        table: table.to_string(),
        key: key.describe(),
        what: format!("{} bytes where {N} belong", payload.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_changed_byte_and_a_moved_record_fail_the_check() {
        let sealed = seal("journal", 7u64, b"a settlement");
        assert_eq!(
            unseal("journal", 7u64, &sealed).unwrap(),
            b"a settlement".as_slice()
        );
        for index in 0..sealed.len() {
            for bit in 0..8 {
                let mut flipped = sealed.clone();
                flipped[index] ^= 1 << bit;
                assert!(
                    matches!(
                        unseal("journal", 7u64, &flipped),
                        Err(StoreError::Damaged { .. })
                    ),
                    "flip of bit {bit} in byte {index} went unnoticed"
                );
            }
        }
        assert!(unseal("journal", 8u64, &sealed).is_err(), "another key");
        assert!(unseal("pending", 7u64, &sealed).is_err(), "another table");
        assert!(unseal("journal", 7u64, &sealed[..10]).is_err(), "truncated");
        let error = unseal("journal", 8u64, &sealed).unwrap_err().to_string();
        assert!(
            error.contains("journal 8") && error.contains("checksum"),
            "{error}"
        );
    }

    #[test]
    fn gathered_and_streamed_hashing_agree_at_every_length() {
        let bytes: Vec<u8> = (0..3 * Hashing::INLINE)
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        for len in [
            0usize, 1, 16, 17, 128, 129, 240, 241, 1000, 1023, 1024, 1025, 2048, 3072,
        ] {
            for split in [0, len / 3, len.saturating_sub(1)] {
                let mut gathered = Hashing::new();
                gathered.write(&bytes[..split]);
                gathered.write(&bytes[split..len]);
                let mut streamed = XxHash3_128::new();
                streamed.write(&bytes[..len]);
                assert_eq!(
                    gathered.finish_128(),
                    streamed.finish_128(),
                    "{len} bytes split at {split}"
                );
                assert_eq!(gathered.streaming.is_some(), len > Hashing::INLINE, "{len}");
            }
        }
    }

    #[test]
    fn sealing_in_place_gives_the_same_bytes() {
        let mut buffer = vec![0u8; CHECKSUM_LEN];
        buffer.extend_from_slice(b"a settlement");
        seal_in_place("journal", 7u64, &mut buffer);
        assert_eq!(buffer, seal("journal", 7u64, b"a settlement"));
    }

    #[test]
    fn fixed_size_payloads_check_their_length() {
        let sealed = seal("balances", 3u64, &[1u8; 15]);
        assert!(unseal_array::<16>("balances", 3u64, &sealed).is_err());
        let sealed = seal("balances", 3u64, &[1u8; 16]);
        assert_eq!(
            unseal_array::<16>("balances", 3u64, &sealed).unwrap(),
            [1u8; 16]
        );
    }
}
