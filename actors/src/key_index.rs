//! The `tx_key` index: for every key with an outcome, the journal entry that
//! holds it. Keys are random (UUID v4), so a B-tree keyed by them dirties a
//! page of its own for nearly every new key, however many a commit brings.
//! This index is written LSM-style instead, as immutable sorted *runs*:
//!
//! - each commit writes the keys it decided as one new run of level 0, in
//!   chunks of [`CHUNK_KEYS`] entries: a few sequential pages per commit;
//! - when a level holds [`FAN_IN`] runs they are merged into one run of the
//!   next level in the same commit. Every replica merges the same runs at
//!   the same commit, so replicas stay byte-identical; each key is rewritten
//!   once per level, and a level never holds more than `FAN_IN - 1` runs
//!   after a commit;
//! - memory holds, per run, the first key of each chunk and a Bloom filter,
//!   so a lookup reads at most one chunk of a run, and only of a run whose
//!   filter says the key may be there. Filters hash with a secret chosen at
//!   every open, so nobody can pick keys that pass them all.
//!
//! A key is in at most one run (an outcome is written once), so lookups
//! need no order between runs. Every run record and chunk is sealed like
//! any other record, and opening reads every chunk (to build the filters),
//! so a damaged chunk stops the open.

use std::sync::Arc;

use redb::{ReadableTable, TableDefinition, TableHandle};
use twox_hash::XxHash3_128;

use crate::error::{Damage, StoreError};
use crate::seal::{self, RecordKey};

type Sealed = &'static [u8];

/// Run id → the run's level and key count.
pub(crate) const RUNS: TableDefinition<u64, Sealed> = TableDefinition::new("tx_key_runs");
/// [`ChunkId`] → up to [`CHUNK_KEYS`] sorted `(key, journal seq)` entries.
pub(crate) const CHUNKS: TableDefinition<u128, Sealed> = TableDefinition::new("tx_key_chunks");

/// Entries per chunk: 3 KiB of entries, so a chunk and its checksum fill
/// most of one 4 KiB page.
pub(crate) const CHUNK_KEYS: usize = 128;
/// Runs of one level that are merged into one of the next.
pub(crate) const FAN_IN: usize = 4;
/// A key (16 bytes) and its journal sequence (8), little-endian.
const ENTRY_LEN: usize = 24;
/// Filter bits per key (about 1 % false positives with 7 probes).
const FILTER_BITS_PER_KEY: u64 = 10;

/// Where a chunk is stored: its run in the high 64 bits, its number within
/// the run in the low ones, so a run's chunks are contiguous and in order.
#[derive(Clone, Copy)]
struct ChunkId {
    run: u64,
    chunk: u64,
}

impl ChunkId {
    fn key(self) -> u128 {
        (u128::from(self.run) << 64) | u128::from(self.chunk)
    }
}

impl RecordKey for ChunkId {
    fn write_to(self, hasher: &mut crate::seal::Hashing) {
        self.key().write_to(hasher);
    }
    fn describe(self) -> String {
        format!("run {} chunk {}", self.run, self.chunk)
    }
}

/// One run as memory holds it.
struct Run {
    id: u64,
    level: u8,
    keys: u64,
    /// The first key of each chunk.
    fences: Vec<u128>,
    filter: Filter,
}

impl Run {
    fn chunks(&self) -> u64 {
        self.keys.div_ceil(CHUNK_KEYS as u64)
    }
}

/// The index as of one commit. Cheap to clone (runs are shared).
#[derive(Clone)]
pub(crate) struct KeyIndex {
    /// Newest first.
    runs: Vec<Arc<Run>>,
    secret: u64,
    /// The ledger commit (`commit_seq`) this is the index of.
    pub(crate) commit: u64,
    /// Why the stored index could not be loaded, on a ledger opened to be
    /// inspected, audited or replaced despite damage: every lookup fails
    /// with it.
    damage: Option<Damage>,
}

impl std::fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIndex")
            .field("keys", &self.len())
            .field("runs", &self.runs.len())
            .field("commit", &self.commit)
            .field("damaged", &self.damage.is_some())
            .finish()
    }
}

impl KeyIndex {
    /// The index stored in `runs` and `chunks`, every chunk read and
    /// checked. `secret` seeds the filters.
    pub(crate) fn load(
        runs: &impl ReadableTable<u64, Sealed>,
        chunks: &impl ReadableTable<u128, Sealed>,
        secret: u64,
        commit: u64,
    ) -> Result<KeyIndex, StoreError> {
        let mut loaded = Vec::new();
        let stored_chunks = chunks.len()?;
        for row in runs.iter()? {
            let (id, value) = row?;
            let id = id.value();
            let (level, keys) = run_info(id, value.value())?;
            if keys.div_ceil(CHUNK_KEYS as u64) > stored_chunks {
                return Err(damaged(
                    ChunkId { run: id, chunk: 0 },
                    "more keys than chunks hold",
                ));
            }
            let mut filter = Filter::new(keys);
            let mut fences = Vec::new();
            let mut previous: Option<u128> = None;
            let chunk_count = keys.div_ceil(CHUNK_KEYS as u64);
            for chunk in 0..chunk_count {
                let id = ChunkId { run: id, chunk };
                let expected = (keys - chunk * CHUNK_KEYS as u64).min(CHUNK_KEYS as u64);
                let bytes = chunks
                    .get(id.key())?
                    .ok_or_else(|| damaged(id, "missing"))?;
                let entries = unseal_chunk(id, bytes.value())?;
                if entries.len() as u64 != expected * ENTRY_LEN as u64 {
                    return Err(damaged(id, "holds the wrong number of keys"));
                }
                fences.push(entry(entries, 0).0);
                for position in 0..expected as usize {
                    let key = entry(entries, position).0;
                    if previous.is_some_and(|previous| previous >= key) {
                        return Err(damaged(id, "keys out of order"));
                    }
                    previous = Some(key);
                    filter.insert(filter_hash(secret, key));
                }
            }
            loaded.push(Arc::new(Run {
                id,
                level,
                keys,
                fences,
                filter,
            }));
        }
        loaded.reverse();
        Ok(KeyIndex {
            runs: loaded,
            secret,
            commit,
            damage: None,
        })
    }

    /// An index that answers every lookup with `error` (a damage error).
    pub(crate) fn damaged(error: &StoreError, commit: u64) -> KeyIndex {
        KeyIndex {
            runs: Vec::new(),
            secret: 0,
            commit,
            damage: Some(Damage::of(error, CHUNKS.name())),
        }
    }

    /// The damage found loading it, if any.
    pub(crate) fn damage(&self) -> Option<StoreError> {
        self.damage.as_ref().map(Damage::error)
    }

    /// The journal entry of `key`'s outcome, if it has one.
    pub(crate) fn get(
        &self,
        chunks: &impl ReadableTable<u128, Sealed>,
        key: u128,
    ) -> Result<Option<u64>, StoreError> {
        if let Some(damage) = self.damage() {
            return Err(damage);
        }
        let hash = filter_hash(self.secret, key);
        for run in &self.runs {
            if !run.filter.may_contain(hash) {
                continue;
            }
            let Some(chunk) = run
                .fences
                .partition_point(|fence| *fence <= key)
                .checked_sub(1)
            else {
                continue;
            };
            let id = ChunkId {
                run: run.id,
                chunk: chunk as u64,
            };
            let bytes = chunks
                .get(id.key())?
                .ok_or_else(|| damaged(id, "missing"))?;
            let entries = unseal_chunk(id, bytes.value())?;
            let count = entries.len() / ENTRY_LEN;
            let (mut low, mut high) = (0, count);
            while low < high {
                let middle = (low + high) / 2;
                let (found, seq) = entry(entries, middle);
                match found.cmp(&key) {
                    std::cmp::Ordering::Less => low = middle + 1,
                    std::cmp::Ordering::Greater => high = middle,
                    std::cmp::Ordering::Equal => return Ok(Some(seq)),
                }
            }
        }
        Ok(None)
    }

    /// Keys indexed.
    pub(crate) fn len(&self) -> u64 {
        self.runs.iter().map(|run| run.keys).sum()
    }

    /// Runs to look in, at most `FAN_IN - 1` per level.
    #[cfg(test)]
    pub(crate) fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Adds `new`, the keys one commit decided (none indexed yet), as a run,
    /// then merges as the policy says; writes through `tables`. `next_run`
    /// is the run id counter kept with the ledger's counters. Returns the
    /// index as it stands once the commit is durable.
    pub(crate) fn add(
        &self,
        tables: &mut IndexTables<'_>,
        next_run: &mut u64,
        commit: u64,
        mut new: Vec<(u128, u64)>,
    ) -> Result<KeyIndex, StoreError> {
        if let Some(damage) = self.damage() {
            return Err(damage);
        }
        let mut runs = self.runs.clone();
        if new.is_empty() {
            return Ok(KeyIndex {
                commit,
                ..self.clone()
            });
        }
        new.sort_unstable_by_key(|(key, _)| *key);
        runs.insert(0, self.write_run(tables, next_run, 0, &new)?);
        while let Some(level) = full_level(&runs) {
            let (merging, kept): (Vec<_>, Vec<_>) =
                runs.into_iter().partition(|run| run.level == level);
            let mut sorted = Vec::with_capacity(merging.len());
            for run in &merging {
                let mut entries = Vec::with_capacity(run.keys as usize);
                read_run(&tables.chunks, run, &mut entries)?;
                tables.runs.remove(run.id)?;
                for chunk in 0..run.chunks() {
                    tables.chunks.remove(ChunkId { run: run.id, chunk }.key())?;
                }
                sorted.push(entries);
            }
            let entries = merge_runs(sorted).map_err(|key| {
                // Storage checks a key has no outcome before adding it, so
                // only a damaged index gets here.
                StoreError::Damaged {
                    table: CHUNKS.name().into(),
                    key: tapledger_protocol::TxKey::from_u128(key).to_string(),
                    what: "indexed twice".into(),
                }
            })?;
            runs = kept;
            runs.push(self.write_run(tables, next_run, level + 1, &entries)?);
            runs.sort_by_key(|run| std::cmp::Reverse(run.id));
        }
        Ok(KeyIndex {
            runs,
            secret: self.secret,
            commit,
            damage: None,
        })
    }

    /// Writes `entries` (sorted) as a new run of `level`.
    fn write_run(
        &self,
        tables: &mut IndexTables<'_>,
        next_run: &mut u64,
        level: u8,
        entries: &[(u128, u64)],
    ) -> Result<Arc<Run>, StoreError> {
        let id = *next_run;
        *next_run += 1;
        let keys = entries.len() as u64;
        let mut info = [0u8; 9];
        info[0] = level;
        info[1..].copy_from_slice(&keys.to_le_bytes());
        let replaced = tables
            .runs
            .insert(id, seal::seal(RUNS.name(), id, &info).as_slice())?
            .is_some();
        if replaced {
            // The run counter went backwards: the ledger's counters are damaged.
            return Err(StoreError::Damaged {
                table: RUNS.name().into(),
                key: id.describe(),
                what: "the next run id is already taken".into(),
            });
        }
        let mut filter = Filter::new(keys);
        let mut fences = Vec::with_capacity(entries.len().div_ceil(CHUNK_KEYS));
        let mut payload = Vec::with_capacity(CHUNK_KEYS * ENTRY_LEN);
        for (chunk, part) in entries.chunks(CHUNK_KEYS).enumerate() {
            let chunk = ChunkId {
                run: id,
                chunk: chunk as u64,
            };
            fences.push(part[0].0);
            payload.clear();
            for (key, seq) in part {
                payload.extend_from_slice(&key.to_le_bytes());
                payload.extend_from_slice(&seq.to_le_bytes());
                filter.insert(filter_hash(self.secret, *key));
            }
            let sealed = seal::seal(CHUNKS.name(), chunk, &payload);
            tables.chunks.insert(chunk.key(), sealed.as_slice())?;
        }
        Ok(Arc::new(Run {
            id,
            level,
            keys,
            fences,
            filter,
        }))
    }
}

/// The index's tables in one write transaction.
pub(crate) struct IndexTables<'txn> {
    pub(crate) runs: redb::Table<'txn, u64, Sealed>,
    pub(crate) chunks: redb::Table<'txn, u128, Sealed>,
}

/// The lowest level holding [`FAN_IN`] runs or more.
fn full_level(runs: &[Arc<Run>]) -> Option<u8> {
    let mut per_level = std::collections::BTreeMap::<u8, usize>::new();
    for run in runs {
        *per_level.entry(run.level).or_default() += 1;
    }
    per_level
        .into_iter()
        .find(|(_, count)| *count >= FAN_IN)
        .map(|(level, _)| level)
}

/// Appends `run`'s entries to `into`, checking they come in strictly
/// increasing key order (the merge relies on it).
fn read_run(
    chunks: &impl ReadableTable<u128, Sealed>,
    run: &Run,
    into: &mut Vec<(u128, u64)>,
) -> Result<(), StoreError> {
    let mut previous: Option<u128> = None;
    for chunk in 0..run.chunks() {
        let id = ChunkId { run: run.id, chunk };
        let bytes = chunks
            .get(id.key())?
            .ok_or_else(|| damaged(id, "missing"))?;
        let entries = unseal_chunk(id, bytes.value())?;
        for position in 0..entries.len() / ENTRY_LEN {
            let (key, seq) = entry(entries, position);
            if previous.is_some_and(|previous| previous >= key) {
                return Err(damaged(id, "keys out of order"));
            }
            previous = Some(key);
            into.push((key, seq));
        }
    }
    Ok(())
}

/// Merges runs whose entries are each in strictly increasing key order into
/// one such run, pairwise (one comparison per entry per round, two rounds
/// for [`FAN_IN`] runs, where sorting them together cost a full sort); the
/// key found in two runs, if any.
fn merge_runs(mut runs: Vec<Vec<(u128, u64)>>) -> Result<Vec<(u128, u64)>, u128> {
    while runs.len() > 1 {
        let mut merged = Vec::with_capacity(runs.len().div_ceil(2));
        let mut pairs = runs.into_iter();
        while let Some(left) = pairs.next() {
            merged.push(match pairs.next() {
                Some(right) => merge_two(&left, &right)?,
                None => left,
            });
        }
        runs = merged;
    }
    Ok(runs.pop().unwrap_or_default())
}

fn merge_two(left: &[(u128, u64)], right: &[(u128, u64)]) -> Result<Vec<(u128, u64)>, u128> {
    let mut merged = Vec::with_capacity(left.len() + right.len());
    let (mut l, mut r) = (0, 0);
    while l < left.len() && r < right.len() {
        match left[l].0.cmp(&right[r].0) {
            std::cmp::Ordering::Less => {
                merged.push(left[l]);
                l += 1;
            }
            std::cmp::Ordering::Greater => {
                merged.push(right[r]);
                r += 1;
            }
            std::cmp::Ordering::Equal => return Err(left[l].0),
        }
    }
    merged.extend_from_slice(&left[l..]);
    merged.extend_from_slice(&right[r..]);
    Ok(merged)
}

/// What the audit reads of the stored index.
pub(crate) struct IndexAudit {
    /// Every `(key, journal seq)` found.
    pub(crate) entries: Vec<(u128, u64)>,
    /// A damaged run or chunk, a chunk no run owns.
    pub(crate) problems: Vec<String>,
}

/// Every entry the stored index holds, for the audit, with the problems
/// found reading it. Reads the tables, not a loaded index.
pub(crate) fn audit_entries(
    runs: &impl ReadableTable<u64, Sealed>,
    chunks: &impl ReadableTable<u128, Sealed>,
    next_run: u64,
) -> Result<IndexAudit, StoreError> {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    // Run id -> (its keys, keys found in its chunks).
    let mut owned: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
    for row in runs.iter()? {
        let (id, value) = row?;
        let id = id.value();
        if id >= next_run {
            problems.push(format!(
                "tx_key index: run {id} is not below the next run id {next_run}"
            ));
        }
        match run_info(id, value.value()) {
            Ok((_, keys)) => {
                owned.insert(id, (keys, 0));
            }
            Err(error) => problems.push(error.to_string()),
        }
    }
    // Chunks come in key order: by run, then by chunk number.
    let mut previous: Option<(u64, u128)> = None;
    for row in chunks.iter()? {
        let (key, value) = row?;
        let key = key.value();
        let id = ChunkId {
            run: (key >> 64) as u64,
            chunk: key as u64,
        };
        let Some((keys, found)) = owned
            .get_mut(&id.run)
            .filter(|(keys, _)| id.chunk < keys.div_ceil(CHUNK_KEYS as u64))
        else {
            problems.push(format!("tx_key index: {} belongs to no run", id.describe()));
            continue;
        };
        let expected = (*keys - id.chunk * CHUNK_KEYS as u64).min(CHUNK_KEYS as u64);
        match unseal_chunk(id, value.value()) {
            Ok(bytes) => {
                let count = bytes.len() / ENTRY_LEN;
                if count as u64 != expected {
                    problems.push(format!(
                        "tx_key index: {} holds {count} keys where {expected} belong",
                        id.describe()
                    ));
                }
                *found += count as u64;
                for position in 0..count {
                    let (key, seq) = entry(bytes, position);
                    if previous.is_some_and(|(run, before)| run == id.run && before >= key) {
                        problems.push(format!("tx_key index: {} keys out of order", id.describe()));
                    }
                    previous = Some((id.run, key));
                    entries.push((key, seq));
                }
            }
            Err(error) => {
                // Counted as whole: the damage is the one problem to name.
                *found += expected;
                problems.push(error.to_string());
            }
        }
    }
    for (run, (keys, found)) in owned {
        if keys != found {
            problems.push(format!(
                "tx_key index: run {run} has {keys} keys but its chunks hold {found}"
            ));
        }
    }
    Ok(IndexAudit { entries, problems })
}

fn run_info(id: u64, sealed: &[u8]) -> Result<(u8, u64), StoreError> {
    let info = seal::unseal_array::<9>(RUNS.name(), id, sealed)?;
    let keys = u64::from_le_bytes(info[1..].try_into().expect("8 bytes"));
    if keys == 0 {
        return Err(StoreError::Damaged {
            table: RUNS.name().into(),
            key: id.describe(),
            what: "an empty run".into(),
        });
    }
    Ok((info[0], keys))
}

fn unseal_chunk(id: ChunkId, sealed: &[u8]) -> Result<&[u8], StoreError> {
    let entries = seal::unseal(CHUNKS.name(), id, sealed)?;
    if entries.is_empty()
        || entries.len() % ENTRY_LEN != 0
        || entries.len() > CHUNK_KEYS * ENTRY_LEN
    {
        return Err(damaged(id, "not a whole number of entries"));
    }
    Ok(entries)
}

fn entry(entries: &[u8], position: usize) -> (u128, u64) {
    let bytes = &entries[position * ENTRY_LEN..(position + 1) * ENTRY_LEN];
    let key = u128::from_le_bytes(bytes[..16].try_into().expect("16 bytes"));
    let seq = u64::from_le_bytes(bytes[16..].try_into().expect("8 bytes"));
    (key, seq)
}

fn damaged(id: ChunkId, what: &str) -> StoreError {
    StoreError::Damaged {
        table: CHUNKS.name().into(),
        key: id.describe(),
        what: what.into(),
    }
}

fn filter_hash(secret: u64, key: u128) -> u128 {
    XxHash3_128::oneshot_with_seed(secret, &key.to_le_bytes())
}

/// A blocked Bloom filter: each key sets 7 bits within one 512-bit block
/// (one cache line), so a lookup costs one memory access per run.
struct Filter {
    blocks: Vec<[u64; 8]>,
}

impl Filter {
    fn new(keys: u64) -> Filter {
        let blocks = (keys * FILTER_BITS_PER_KEY).div_ceil(512).max(1);
        Filter {
            blocks: vec![[0; 8]; blocks as usize],
        }
    }

    /// The block and the 7 bit positions within it for `hash`. The block is
    /// the low half of the hash scaled to the block count (a multiply and a
    /// shift: a 64-bit division per run checked cost more than the probes).
    fn probes(&self, hash: u128) -> (usize, impl Iterator<Item = usize> + use<>) {
        let block = ((u128::from(hash as u64) * self.blocks.len() as u128) >> 64) as usize;
        let bits = (hash >> 64) as u64;
        (
            block,
            (0..7).map(move |probe| ((bits >> (probe * 9)) & 511) as usize),
        )
    }

    fn insert(&mut self, hash: u128) {
        let (block, bits) = self.probes(hash);
        let block = &mut self.blocks[block];
        for bit in bits {
            block[bit / 64] |= 1 << (bit % 64);
        }
    }

    fn may_contain(&self, hash: u128) -> bool {
        let (block, mut bits) = self.probes(hash);
        let block = &self.blocks[block];
        bits.all(|bit| block[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

#[cfg(test)]
#[path = "key_index_tests.rs"]
mod tests;
