//! The journal's physical layout: consecutive entries stored in blocks, one
//! redb value per block, keyed by the sequence of the block's first entry.
//!
//! A ledger commit writes its entries in blocks of at most
//! [`BLOCK_ENTRIES_MAX`], so a commit of thousands of settlements costs a
//! few dozen B-tree inserts instead of one per entry (redb rebuilds a leaf
//! for each). A block never spans two commits: blocks depend on the log
//! alone, so every replica writes the same ones and digests agree.
//!
//! A block is sealed as one record ([`seal`]: checksum over table, first
//! sequence and payload). Its payload is the entry count (u32 LE), the end
//! offset of each record within the records area (u32 LE each), then the
//! records; a record is its chain link (u128 LE, [`seal::chain_link`]) and
//! the encoded [`super::StoredEntry`]. Everything above this module speaks
//! of entries by sequence; only here are they grouped.

use redb::{ReadableTable, TableDefinition, TableHandle};

use super::{Sealed, corrupted};
use crate::error::StoreError;
use crate::seal;

/// First sequence of a block -> the sealed block.
pub(super) const JOURNAL: TableDefinition<u64, Sealed> = TableDefinition::new("journal");

/// Entries per block at most. A block is read whole to give one of its
/// entries (a replayed key's outcome, a step of an account's history), so
/// this bounds that read (some 25 KiB of settlements) as well as the
/// inserts per commit.
#[cfg(not(test))]
pub(super) const BLOCK_ENTRIES_MAX: usize = 64;
// Small in unit tests, so that commits span several blocks.
#[cfg(test)]
pub(super) const BLOCK_ENTRIES_MAX: usize = 3;

const LINK_LEN: usize = 16;

/// One journal entry as stored: its sequence, chain link and encoded entry.
#[derive(Clone, Copy, Debug)]
pub(super) struct Record<'a> {
    pub(super) seq: u64,
    pub(super) link: u128,
    pub(super) encoded: &'a [u8],
}

/// A block read back, its checksum and layout checked.
pub(super) struct Block<'a> {
    first: u64,
    ends: &'a [u8],
    records: &'a [u8],
}

impl<'a> Block<'a> {
    /// Checks and opens the block stored under `first`.
    pub(super) fn open(first: u64, sealed: &'a [u8]) -> Result<Block<'a>, StoreError> {
        let payload = seal::unseal(JOURNAL.name(), first, sealed)?;
        let damaged = |what: String| StoreError::Damaged {
            table: JOURNAL.name().to_string(),
            key: first.to_string(),
            what,
        };
        let (count, rest) = payload
            .split_first_chunk::<4>()
            .ok_or_else(|| damaged("too short for its entry count".into()))?;
        let count = u32::from_le_bytes(*count) as usize;
        if count == 0 {
            return Err(damaged("holds no entries".into()));
        }
        let Some((ends, records)) = count
            .checked_mul(4)
            .and_then(|length| rest.split_at_checked(length))
        else {
            return Err(damaged(format!("too short for {count} entries")));
        };
        let block = Block {
            first,
            ends,
            records,
        };
        let mut start = 0;
        for index in 0..count {
            let end = block.end_of(index);
            if end < start + LINK_LEN || end > records.len() {
                return Err(damaged(format!("entry {index} overruns the block")));
            }
            start = end;
        }
        if start != records.len() {
            return Err(damaged("bytes after the last entry".into()));
        }
        Ok(block)
    }

    fn end_of(&self, index: usize) -> usize {
        let at = 4 * index;
        u32::from_le_bytes(self.ends[at..at + 4].try_into().expect("four bytes")) as usize
    }

    pub(super) fn len(&self) -> usize {
        self.ends.len() / 4
    }

    /// The sequence after its last entry.
    pub(super) fn end(&self) -> u64 {
        self.first + self.len() as u64
    }

    /// Entry `seq`, if this block holds it.
    pub(super) fn get(&self, seq: u64) -> Option<Record<'a>> {
        let index = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        (index < self.len()).then(|| self.record(index))
    }

    /// The last entry.
    pub(super) fn last(&self) -> Record<'a> {
        self.record(self.len() - 1)
    }

    fn record(&self, index: usize) -> Record<'a> {
        let start = match index {
            0 => 0,
            _ => self.end_of(index - 1),
        };
        let bytes = &self.records[start..self.end_of(index)];
        let (link, encoded) = bytes
            .split_first_chunk::<LINK_LEN>()
            .expect("checked at open");
        Record {
            seq: self.first + index as u64,
            link: u128::from_le_bytes(*link),
            encoded,
        }
    }

    /// Its entries in order.
    pub(super) fn records(&self) -> impl Iterator<Item = Record<'a>> + '_ {
        (0..self.len()).map(|index| self.record(index))
    }
}

/// Entry `seq` read from `journal`, handed to `read`; `None` if no block
/// holds it.
pub(super) fn with_entry<T>(
    journal: &impl ReadableTable<u64, Sealed>,
    seq: u64,
    read: impl FnOnce(Record<'_>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let Some(row) = journal.range(..=seq)?.next_back() else {
        return Ok(None);
    };
    let (first, sealed) = row?;
    let block = Block::open(first.value(), sealed.value())?;
    match block.get(seq) {
        Some(record) => read(record).map(Some),
        None => Ok(None),
    }
}

/// Every entry with sequence in `from..to`, in order, handed to `read`
/// until it returns false.
pub(super) fn for_each_entry(
    journal: &impl ReadableTable<u64, Sealed>,
    from: u64,
    to: u64,
    mut read: impl FnMut(Record<'_>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    if from >= to {
        return Ok(());
    }
    // The block holding `from` may start before it.
    let start = match journal.range(..=from)?.next_back() {
        Some(row) => row?.0.value(),
        None => from,
    };
    for row in journal.range(start..to)? {
        let (first, sealed) = row?;
        let block = Block::open(first.value(), sealed.value())?;
        for record in block.records() {
            if record.seq >= to {
                return Ok(());
            }
            if record.seq >= from && !read(record)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The entries of one ledger commit on their way to the journal, grouped
/// into blocks. Encoding happens in place; a full block is written at once,
/// the rest when the commit ends ([`BlockWriter::flush`]).
#[derive(Default)]
pub(super) struct BlockWriter {
    first: u64,
    /// End offset of each record in `records`.
    ends: Vec<u32>,
    records: Vec<u8>,
    /// The sealed block being inserted: one allocation per transaction.
    sealed: Vec<u8>,
}

impl BlockWriter {
    /// Appends entry `seq` (the next one), which `encode` writes; returns
    /// its chain link, which follows `previous` (the link before it).
    pub(super) fn append(
        &mut self,
        seq: u64,
        previous: u128,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<u128, StoreError> {
        if self.ends.is_empty() {
            self.first = seq;
        }
        assert_eq!(
            seq,
            self.first + self.ends.len() as u64,
            "journal entries are appended in sequence"
        );
        let start = self.records.len();
        self.records.extend_from_slice(&[0; LINK_LEN]);
        encode(&mut self.records)?;
        let link = seal::chain_link(previous, seq, &self.records[start + LINK_LEN..]);
        self.records[start..start + LINK_LEN].copy_from_slice(&link.to_le_bytes());
        let end = u32::try_from(self.records.len())
            .map_err(|_| corrupted(format!("journal entry {seq} is too large")))?;
        self.ends.push(end);
        Ok(link)
    }

    pub(super) fn is_full(&self) -> bool {
        self.ends.len() >= BLOCK_ENTRIES_MAX
    }

    /// The encoded entry `seq` if it is here, not yet written.
    pub(super) fn get(&self, seq: u64) -> Option<&[u8]> {
        let index = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        let end = *self.ends.get(index)? as usize;
        let start = match index {
            0 => 0,
            _ => self.ends[index - 1] as usize,
        };
        Some(&self.records[start + LINK_LEN..end])
    }

    /// Writes the entries held (if any) as one block.
    pub(super) fn flush(
        &mut self,
        journal: &mut redb::Table<'_, u64, Sealed>,
    ) -> Result<(), StoreError> {
        if self.ends.is_empty() {
            return Ok(());
        }
        let sealed = &mut self.sealed;
        sealed.clear();
        sealed.resize(seal::CHECKSUM_LEN, 0);
        sealed.extend_from_slice(&(self.ends.len() as u32).to_le_bytes());
        for end in &self.ends {
            sealed.extend_from_slice(&end.to_le_bytes());
        }
        sealed.extend_from_slice(&self.records);
        seal::seal_in_place(JOURNAL.name(), self.first, sealed);
        journal.insert(self.first, sealed.as_slice())?;
        self.ends.clear();
        self.records.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block as [`BlockWriter::flush`] seals it, of entries `first..`.
    fn sealed_block(first: u64, entries: &[&[u8]]) -> Vec<u8> {
        let mut writer = BlockWriter::default();
        let mut link = 0;
        for (index, entry) in entries.iter().enumerate() {
            link = writer
                .append(first + index as u64, link, |buffer| {
                    buffer.extend_from_slice(entry);
                    Ok(())
                })
                .unwrap();
        }
        let mut payload = (entries.len() as u32).to_le_bytes().to_vec();
        payload.extend(writer.ends.iter().flat_map(|end| end.to_le_bytes()));
        payload.extend_from_slice(&writer.records);
        seal::seal(JOURNAL.name(), first, &payload)
    }

    #[test]
    fn a_block_gives_back_each_entry_with_its_link() {
        let entries: [&[u8]; 3] = [b"one", b"", b"three"];
        let sealed = sealed_block(10, &entries);
        let block = Block::open(10, &sealed).unwrap();
        assert_eq!((block.len(), block.end()), (3, 13));
        let mut link = 0;
        for (record, entry) in block.records().zip(entries) {
            assert_eq!(record.encoded, entry);
            link = seal::chain_link(link, record.seq, entry);
            assert_eq!(record.link, link);
            assert_eq!(block.get(record.seq).unwrap().encoded, entry);
        }
        assert_eq!(block.last().seq, 12);
        assert!(block.get(9).is_none() && block.get(13).is_none());
        // Under another key it is not this block.
        assert!(Block::open(11, &sealed).is_err());
    }

    #[test]
    fn a_block_whose_layout_lies_is_damaged_not_a_panic() {
        let lies: [(&str, Vec<u8>); 5] = [
            ("no count", vec![]),
            ("no entries", 0u32.to_le_bytes().to_vec()),
            (
                "offsets missing",
                [2u32.to_le_bytes(), 20u32.to_le_bytes()].concat(),
            ),
            (
                "offset past the end",
                [
                    1u32.to_le_bytes().to_vec(),
                    40u32.to_le_bytes().to_vec(),
                    vec![0; 20],
                ]
                .concat(),
            ),
            (
                "bytes after the last entry",
                [
                    1u32.to_le_bytes().to_vec(),
                    16u32.to_le_bytes().to_vec(),
                    vec![0; 20],
                ]
                .concat(),
            ),
        ];
        for (what, payload) in lies {
            let sealed = seal::seal(JOURNAL.name(), 0u64, &payload);
            assert!(
                matches!(Block::open(0, &sealed), Err(StoreError::Damaged { .. })),
                "{what}"
            );
        }
    }
}
