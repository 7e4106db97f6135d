//! The Raft log in its own redb file (`raft-log.redb`), apart from the
//! ledger: entries by index, and the vote, the last purged log id and the
//! committed log id.
//!
//! An append is one write transaction at `Durability::Immediate`: openraft
//! hears that entries are flushed only after the fsync returned, so an entry
//! counts toward a majority only once it is on this disk. The vote is written
//! the same way (a replica must never forget whom it voted for). The
//! committed log id is only a hint for re-applying after a restart, so it
//! gets no transaction of its own: the next append writes it with its
//! entries.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Entry, LogId, ReplicaId, ReplicaInfo, StorageError, StorageIo, TypeConfig, Vote};
use crate::error::StoreError;
use crate::seal;

/// Log index -> [`Entry`] (MessagePack). Every value is sealed with its
/// checksum (`seal.rs`), as in the ledger.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Named records (MessagePack): see the `STATE_*` keys.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const STATE_VOTE: &str = "vote";
const STATE_COMMITTED: &str = "committed";
const STATE_PURGED: &str = "purged";
/// The voters this replica starts a new cluster with, written by `init`.
const STATE_BOOTSTRAP: &str = "bootstrap";
/// This replica's id and what it advertises, written by `init`.
const STATE_IDENTITY: &str = "identity";
/// Replicas this one trusts before any membership reaches it (its peers as
/// `init` was told them), written by `init`.
const STATE_KNOWN: &str = "known";

/// The log store. Clones share the file (openraft reads through a clone
/// while it appends through another).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<crate::store::Handle<Database>>,
    io: StorageIo,
    /// The committed log id openraft last reported, for status reports and
    /// for the next append to write.
    committed: Arc<std::sync::Mutex<Option<LogId>>>,
    /// `committed` changed since an append last wrote it.
    committed_unsaved: Arc<std::sync::atomic::AtomicBool>,
    /// The newest entries appended by this process, exactly as stored: the
    /// state machine and replication read them back from here instead of
    /// decoding them again.
    recent: Arc<std::sync::Mutex<BTreeMap<u64, Entry>>>,
}

/// Entries [`LogStore`] keeps in memory (a few seconds of commits)...
const RECENT_ENTRIES: usize = 256;
/// ... and intents in them at most (a few full group commits).
const RECENT_INTENTS: usize = 65_536;

/// Intents an entry carries (its weight in the cache).
fn intents_in(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(ledger_entry) => ledger_entry.intents.len(),
        _ => 0,
    }
}

/// A record of the `state` table, sealed with its checksum.
fn sealed_state<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(seal::seal(STATE.name(), key, &super::encode(value)?))
}

fn read_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(AnyError::error(error)).into()
}

fn write_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(AnyError::error(error)).into()
}

fn vote_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_vote(AnyError::error(error)).into()
}

/// Page cache of the log file. The log is appended at its tail and read
/// there (its newest entries are kept decoded in memory as well), then
/// purged behind snapshots: it needs little cache, not redb's 1 GiB default.
pub const LOG_CACHE_BYTES: usize = 32 << 20;

impl LogStore {
    /// Opens the log file at `path`, creating it if needed.
    pub fn open(path: &Path, io: StorageIo) -> Result<LogStore, StoreError> {
        // Checked before anything is written to it (see `Store::open`).
        if std::fs::metadata(path).is_ok_and(|metadata| metadata.len() > 0) {
            drop(crate::store::open_overlay(path)?);
        }
        let db = crate::store::refuse_damage(|| {
            Ok(Database::builder()
                .set_cache_size(LOG_CACHE_BYTES)
                .create(path)?)
        })?;
        LogStore::init(db, io)
    }

    /// Opens the log on a custom storage backend (tests inject faults and
    /// in-memory disks this way).
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        io: StorageIo,
    ) -> Result<LogStore, StoreError> {
        let db = crate::store::refuse_damage(|| {
            Ok(Database::builder()
                .set_check_integrity_on_open(true)
                .create_with_backend(backend)?)
        })?;
        LogStore::init(db, io)
    }

    fn init(db: Database, io: StorageIo) -> Result<LogStore, StoreError> {
        let write = db.begin_write()?;
        {
            write.open_table(LOG)?;
            write.open_table(STATE)?;
        }
        write.commit()?;
        Ok(LogStore {
            db: Arc::new(crate::store::Handle::new(db)),
            io,
            committed: Arc::default(),
            committed_unsaved: Arc::default(),
            recent: Arc::default(),
        })
    }

    /// The newest committed log id this replica knows of (since it opened).
    pub fn committed(&self) -> Option<LogId> {
        *self.committed.lock().expect("committed lock")
    }

    /// How many handles on the file are open (it closes with the last).
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.db)
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let read = self.db.begin_read()?;
        let table = read.open_table(STATE)?;
        match table.get(key)? {
            Some(bytes) => Ok(Some(super::decode(seal::unseal(
                STATE.name(),
                key,
                bytes.value(),
            )?)?)),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        durability: redb::Durability,
    ) -> Result<(), StoreError> {
        let mut write = self.db.begin_write()?;
        write.set_durability(durability)?;
        write
            .open_table(STATE)?
            .insert(key, sealed_state(key, value)?.as_slice())?;
        write.commit()?;
        Ok(())
    }

    /// Records the voters a fresh cluster starts with (done once, by `init`).
    pub fn set_bootstrap(
        &self,
        members: &BTreeMap<ReplicaId, ReplicaInfo>,
    ) -> Result<(), StoreError> {
        self.put(STATE_BOOTSTRAP, members, redb::Durability::Immediate)
    }

    /// Forgets the voters recorded by [`LogStore::set_bootstrap`]: this
    /// replica will join an existing cluster instead.
    pub fn clear_bootstrap(&self) -> Result<(), StoreError> {
        let write = self.db.begin_write()?;
        write.open_table(STATE)?.remove(STATE_BOOTSTRAP)?;
        write.commit()?;
        Ok(())
    }

    /// The voters recorded by [`LogStore::set_bootstrap`], if any.
    pub fn bootstrap(&self) -> Result<Option<BTreeMap<ReplicaId, ReplicaInfo>>, StoreError> {
        self.get(STATE_BOOTSTRAP)
    }

    /// Records this replica's id and advertised addresses (done by `init`).
    pub fn set_identity(&self, id: ReplicaId, info: &ReplicaInfo) -> Result<(), StoreError> {
        self.put(STATE_IDENTITY, &(id, info), redb::Durability::Immediate)
    }

    /// The identity recorded by [`LogStore::set_identity`], if any.
    pub fn identity(&self) -> Result<Option<(ReplicaId, ReplicaInfo)>, StoreError> {
        self.get(STATE_IDENTITY)
    }

    /// Records the replicas to trust before a membership arrives.
    pub fn set_known(&self, known: &BTreeMap<ReplicaId, ReplicaInfo>) -> Result<(), StoreError> {
        self.put(STATE_KNOWN, known, redb::Durability::Immediate)
    }

    /// The replicas recorded by [`LogStore::set_known`] (empty if none).
    pub fn known(&self) -> Result<BTreeMap<ReplicaId, ReplicaInfo>, StoreError> {
        Ok(self.get(STATE_KNOWN)?.unwrap_or_default())
    }

    /// Forgets the whole Raft history (entries, vote, committed and purged
    /// log ids) and keeps what `init` recorded: the replica starts over as
    /// if just initialised. For `reset`, with the ledger emptied alongside.
    pub fn forget_history(&self) -> Result<(), StoreError> {
        self.rewrite_history(None)
    }

    /// Replaces the Raft history by one that ends at `last` (entries up to it
    /// count as purged, `last` as committed) with a vote for `id` in `last`'s
    /// term: a new history continuing from a ledger whose applied log id is
    /// `last`. For `restore`, with the ledger replaced by a backup.
    pub fn begin_after(&self, last: LogId, id: ReplicaId) -> Result<(), StoreError> {
        self.rewrite_history(Some((last, id)))
    }

    fn rewrite_history(&self, after: Option<(LogId, ReplicaId)>) -> Result<(), StoreError> {
        let mut write = self.db.begin_write()?;
        write.set_durability(redb::Durability::Immediate)?;
        {
            let mut log = write.open_table(LOG)?;
            log.retain(|_, _| false)?;
            let mut state = write.open_table(STATE)?;
            for key in [STATE_VOTE, STATE_COMMITTED, STATE_PURGED] {
                state.remove(key)?;
            }
            if let Some((last, id)) = after {
                let vote = Vote::new(last.leader_id.term, id);
                state.insert(STATE_PURGED, sealed_state(STATE_PURGED, &last)?.as_slice())?;
                let committed = sealed_state(STATE_COMMITTED, &Some(last))?;
                state.insert(STATE_COMMITTED, committed.as_slice())?;
                state.insert(STATE_VOTE, sealed_state(STATE_VOTE, &vote)?.as_slice())?;
            }
        }
        write.commit()?;
        // What this handle was told of the old history is void.
        *self.committed.lock().expect("committed lock") = after.map(|(last, _)| last);
        self.committed_unsaved.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// True when this log has never held a vote or an entry: a replica that
    /// has not yet been part of any cluster.
    pub fn is_pristine(&self) -> Result<bool, StoreError> {
        let read = self.db.begin_read()?;
        let state = read.open_table(STATE)?;
        let log = read.open_table(LOG)?;
        Ok(state.get(STATE_VOTE)?.is_none()
            && state.get(STATE_PURGED)?.is_none()
            && log.first()?.is_none())
    }

    fn entries(&self, range: (Bound<u64>, Bound<u64>)) -> Result<Vec<Entry>, StoreError> {
        {
            // The cache holds a contiguous tail of the log: it answers any
            // range that starts inside it.
            let recent = self.recent.lock().expect("log cache lock");
            let start = match range.0 {
                Bound::Included(start) => Some(start),
                Bound::Excluded(start) => start.checked_add(1),
                Bound::Unbounded => Some(0),
            };
            let end = match range.1 {
                Bound::Included(end) => Some(end),
                Bound::Excluded(end) => end.checked_sub(1),
                Bound::Unbounded => Some(u64::MAX),
            };
            if let (Some(start), Some((&first, _))) = (start, recent.first_key_value())
                && first <= start
            {
                return Ok(match end {
                    Some(end) if start <= end => recent
                        .range(start..=end)
                        .map(|(_, entry)| entry.clone())
                        .collect(),
                    _ => Vec::new(),
                });
            }
        }
        let read = self.db.begin_read()?;
        let log = read.open_table(LOG)?;
        let mut entries = Vec::new();
        for row in log.range::<u64>(range)? {
            let (index, bytes) = row?;
            let index = index.value();
            let entry: Entry = super::decode(seal::unseal(LOG.name(), index, bytes.value())?)?;
            if entry.log_id.index != index {
                return Err(StoreError::Redb(redb::Error::Corrupted(format!(
                    "raft log entry at index {index} records index {}",
                    entry.log_id.index
                ))));
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn last_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let read = self.db.begin_read()?;
        let log = read.open_table(LOG)?;
        match log.last()? {
            Some((index, bytes)) => {
                let payload = seal::unseal(LOG.name(), index.value(), bytes.value())?;
                Ok(Some(super::decode::<Entry>(payload)?.log_id))
            }
            None => Ok(None),
        }
    }

    pub(super) fn append_now(&self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let write_committed = self.committed_unsaved.swap(false, Ordering::SeqCst);
        let appended = self.append_in_one_transaction(&entries, write_committed);
        if appended.is_err() && write_committed {
            // Not written after all: the next append tries again.
            self.committed_unsaved.store(true, Ordering::SeqCst);
        }
        appended?;
        self.remember(entries);
        Ok(())
    }

    /// Writes `entries` (and the committed log id, if `write_committed`) in
    /// one durable write transaction.
    fn append_in_one_transaction(
        &self,
        entries: &[Entry],
        write_committed: bool,
    ) -> Result<(), StoreError> {
        let mut write = self.db.begin_write()?;
        write.set_durability(redb::Durability::Immediate)?;
        {
            let mut log = write.open_table(LOG)?;
            // Encoded straight after room for the checksum, in one buffer
            // (an entry is up to a few MiB): no copy to seal it. Sized for
            // the largest entry (a decision encodes to about 200 bytes), so
            // that it is not regrown, and copied, as it fills.
            let largest = entries.iter().map(intents_in).max().unwrap_or(0);
            let mut sealed = Vec::with_capacity(seal::CHECKSUM_LEN + 64 + largest * 256);
            for entry in entries {
                let index = entry.log_id.index;
                sealed.clear();
                sealed.resize(seal::CHECKSUM_LEN, 0);
                rmp_serde::encode::write(&mut sealed, entry)?;
                seal::seal_in_place(LOG.name(), index, &mut sealed);
                log.insert(index, sealed.as_slice())?;
            }
            if write_committed {
                let committed = *self.committed.lock().expect("committed lock");
                write.open_table(STATE)?.insert(
                    STATE_COMMITTED,
                    sealed_state(STATE_COMMITTED, &committed)?.as_slice(),
                )?;
            }
        }
        write.commit()?;
        Ok(())
    }

    /// Keeps appended entries in the in-memory tail (`recent`).
    fn remember(&self, entries: Vec<Entry>) {
        let mut recent = self.recent.lock().expect("log cache lock");
        for entry in entries {
            let index = entry.log_id.index;
            // An entry rewritten in place replaced everything after it on
            // disk only if openraft truncated first; drop what the cache
            // holds from there on, in case.
            drop(recent.split_off(&index));
            if recent
                .last_key_value()
                .is_some_and(|(&last, _)| last + 1 != index)
            {
                // Appending after a gap: the cache must stay a contiguous
                // tail of the log, so it starts afresh here.
                recent.clear();
            }
            recent.insert(index, entry);
        }
        let mut intents: usize = recent.values().map(intents_in).sum();
        while recent.len() > 1 && (recent.len() > RECENT_ENTRIES || intents > RECENT_INTENTS) {
            if let Some((_, oldest)) = recent.pop_first() {
                intents -= intents_in(&oldest);
            }
        }
    }

    /// Deletes entries with index in `range`, and records `purged` if given,
    /// in one durable transaction.
    fn delete(
        &self,
        from: u64,
        to_inclusive: u64,
        purged: Option<&LogId>,
    ) -> Result<(), StoreError> {
        let mut write = self.db.begin_write()?;
        write.set_durability(redb::Durability::Immediate)?;
        {
            let mut log = write.open_table(LOG)?;
            log.retain_in(from..=to_inclusive, |_, _| false)?;
            if let Some(purged) = purged {
                write
                    .open_table(STATE)?
                    .insert(STATE_PURGED, sealed_state(STATE_PURGED, purged)?.as_slice())?;
            }
        }
        write.commit()?;
        self.recent
            .lock()
            .expect("log cache lock")
            .retain(|&index, _| index < from || index > to_inclusive);
        Ok(())
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(LogStore) -> Result<T, StoreError> + Send + 'static,
        error: fn(String) -> StorageError,
    ) -> Result<T, StorageError> {
        let store = self.clone();
        match self.io.run(move || work(store)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(store_error)) => Err(error(store_error.to_string())),
            Err(panic) => {
                self.db.mark_broken();
                Err(error(panic))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        self.run(move |store| store.entries(range), read_error)
            .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.run(
            |store| {
                let last_purged_log_id: Option<LogId> = store.get(STATE_PURGED)?;
                let last_log_id = store.last_log_id()?.or(last_purged_log_id);
                Ok(LogState {
                    last_purged_log_id,
                    last_log_id,
                })
            },
            read_error,
        )
        .await
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.run(
            move |store| store.put(STATE_VOTE, &vote, redb::Durability::Immediate),
            vote_error,
        )
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.run(|store| store.get(STATE_VOTE), vote_error).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Written by the next append (see the module's notes): a
        // transaction of its own per commit cost more than the rest of
        // this call.
        *self.committed.lock().expect("committed lock") = committed;
        self.committed_unsaved.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let saved = self
            .run(
                |store| Ok(store.get::<Option<LogId>>(STATE_COMMITTED)?.flatten()),
                read_error,
            )
            .await?;
        // What this process was told and has not written yet is newer.
        Ok(saved.max(self.committed()))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.run(move |store| store.append_now(entries), write_error)
            .await?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.run(
            move |store| store.delete(log_id.index, u64::MAX, None),
            write_error,
        )
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.run(
            move |store| store.delete(0, log_id.index, Some(&log_id)),
            write_error,
        )
        .await
    }
}
