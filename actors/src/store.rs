//! redb persistence: the source of truth for accounts, balances, pending
//! halves, outcomes and the journal every balance is audited against.
//!
//! It is the Raft state machine's storage: writes happen only in
//! [`Store::apply_entries`], which applies committed log entries (each a
//! group of intents the leader decided) in one write transaction at
//! `Durability::Immediate`, recording the applied log id and membership in
//! the same transaction. Applying is deterministic: the same log prefix gives
//! the same ledger on every replica ([`Store::digest`]). It re-checks, inside
//! the transaction, that a key has no outcome yet and that every settlement
//! can be paid, so storage has the last word whatever the actors believed; an
//! intent that breaks a rule is refused ([`Applied::Refused`]) the same way
//! on every replica, never a panic that would crash-loop them all. Reads use
//! snapshots and never block the writer. Balances are written behind, at
//! checkpoints, with the journal tail holding the rest (`store_balances.rs`).
//!
//! This module knows nothing of actors or channels; `raft::state_machine`
//! drives it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use openraft::EntryPayload;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};
use tapledger_protocol::{
    AccountId, ISSUER_ACCOUNT_ID, Outcome, Rejection, Settlement, Timestamp, TxKey,
};

use crate::error::{Refusal, StoreError, Unpayable};
use crate::finding::{Finding, Party};
use crate::key_index;
use crate::overlay::Overlay;
use crate::raft::{self, EntryResult, LedgerEntry, LogId, SnapshotMeta, StoredMembership};
use crate::seal;
use tapledger_core::matching::{Committed, Decision, KeyMap, KeySet, PendingHalf};

#[path = "store_balances.rs"]
mod balances;
use balances::{BalanceCache, BalancesView, CachedBalance};
#[path = "store_journal.rs"]
mod journal;
use journal::{Block, BlockWriter, JOURNAL};

/// Version of the table layout below. Opening a file of another version fails.
/// Version 2 added the `raft` table (a replicated ledger); a version 1 file
/// has no Raft history to join a cluster with. Version 3 sealed every record
/// with a checksum and chained the journal (`seal.rs`). Version 4 replaced
/// the `tx_keys` B-tree by the sorted runs of `key_index`. Version 5 wrote
/// balances behind (`store_balances.rs`). Version 6 stores the journal in
/// blocks of entries (`store_journal.rs`).
pub const SCHEMA_VERSION: u64 = 6;

/// Every value below is sealed: a checksum over table, key and payload, then
/// the payload ([`seal`]). Payloads are little-endian integers or MessagePack.
type Sealed = &'static [u8];

/// Named counters (u64), and `journal_head` (u128, the journal chain's link
/// of its newest entry).
const META: TableDefinition<&str, Sealed> = TableDefinition::new("meta");

/// Page cache of a ledger file open for writing. redb's default is 1 GiB per
/// file; the hot pages of a ledger (balances, the `tx_key` index's fences
/// and newest runs, the journal's tail) fit in far less, and a ledger with
/// millions of accounts must not grow to the default in memory.
pub const LEDGER_CACHE_BYTES: usize = 256 << 20;
/// Page cache of a copy being written (a backup or a Raft snapshot).
const COPY_CACHE_BYTES: usize = 32 << 20;
/// Account id -> [`AccountRecord`] (MessagePack). Never changes after opening.
const ACCOUNTS: TableDefinition<u64, Sealed> = TableDefinition::new("accounts");
/// Account id -> (committed balance in minor units, journal sequence of the
/// newest entry that moved it), two u64. The issuer is not here: its balance
/// is `-issued`. The sequence heads the account's history: every journal
/// entry links to the previous entry of each account it moves, so history
/// costs no index writes per settlement.
const BALANCES: TableDefinition<u64, Sealed> = TableDefinition::new("balances");
// `journal`: blocks of consecutive entries, each its chain link (u128,
// [`seal::chain_link`]) then the [`StoredEntry`] (MessagePack), in commit
// order ([`journal`]).
/// `tx_key` -> journal sequence of its one final outcome: the tables
/// `tx_key_runs` and `tx_key_chunks` of [`crate::key_index`].
use crate::key_index::{CHUNKS as TX_KEY_CHUNKS, IndexTables, KeyIndex, RUNS as TX_KEY_RUNS};
/// `tx_key` -> the lone [`PendingHalf`] waiting for its partner (MessagePack).
const PENDING: TableDefinition<u128, Sealed> = TableDefinition::new("pending");
/// Raft's view of this state machine, written in the same transaction as the
/// entries it describes: `applied` (the last applied log id) and `membership`
/// (the last applied membership), MessagePack. A snapshot file also holds
/// `snapshot` (its [`SnapshotMeta`]).
const RAFT: TableDefinition<&str, Sealed> = TableDefinition::new("raft");
const RAFT_APPLIED: &str = "applied";
const RAFT_MEMBERSHIP: &str = "membership";
const RAFT_SNAPSHOT: &str = "snapshot";

const META_SCHEMA_VERSION: &str = "schema_version";
/// Number of write transactions committed so far.
const META_COMMIT_SEQ: &str = "commit_seq";
const META_JOURNAL_NEXT: &str = "journal_next";
const META_ACCOUNT_NEXT: &str = "account_next";
/// Total the issuer has paid out: sum of all user balances.
const META_ISSUED: &str = "issued";
/// The journal chain's link of its newest entry (0 while it is empty).
const META_JOURNAL_HEAD: &str = "journal_head";
/// The id the `tx_key` index gives its next run.
const META_TX_KEY_RUN_NEXT: &str = "tx_key_run_next";
/// Journal entries before this one are in `balances`; the entries from it
/// on hold the balances not yet written there (see [`balances`]).
const META_BALANCES_AT: &str = "balances_at";

/// Static facts about an account, fixed when it is opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub id: AccountId,
    pub account_type: String,
    pub bank_name: String,
    pub created_at: Timestamp,
    /// Salt the client chose for its API key.
    pub salt: Vec<u8>,
    /// SHA3-512(key ‖ salt). The key itself is never stored.
    pub key_hash: Vec<u8>,
}

/// A request to open an account, funded by the issuer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAccount {
    pub account_type: String,
    pub bank_name: String,
    pub salt: Vec<u8>,
    pub key_hash: Vec<u8>,
    pub opening_balance: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FundingKind {
    Opening,
    TopUp,
}

/// Money from the issuer into an account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Funding {
    pub account: AccountId,
    pub amount: u64,
    pub kind: FundingKind,
    pub balance_before: u64,
    pub at: Timestamp,
}

/// One record of the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalEntry {
    Funding(Funding),
    Outcome(Outcome),
}

impl JournalEntry {
    /// The accounts whose money this entry moved, in a fixed order (funding:
    /// the account; settlement: sender, receiver; rejection: none).
    pub fn moved_accounts(&self) -> Vec<AccountId> {
        let entry = match self {
            JournalEntry::Funding(funding) => JournalEntryRef::Funding(funding),
            JournalEntry::Outcome(outcome) => JournalEntryRef::Outcome(outcome),
        };
        let (accounts, count) = entry.moved_accounts();
        accounts[..count].to_vec()
    }
}

/// The borrowed form of [`JournalEntry`] for encoding (same MessagePack
/// shape), so that appending an outcome copies nothing.
#[derive(Clone, Copy, Serialize)]
#[serde(rename = "JournalEntry")]
enum JournalEntryRef<'a> {
    Funding(&'a Funding),
    Outcome(&'a Outcome),
}

impl JournalEntryRef<'_> {
    /// [`JournalEntry::moved_accounts`]: the first `count` of the array.
    fn moved_accounts(self) -> ([AccountId; 2], usize) {
        match self {
            JournalEntryRef::Funding(funding) => ([funding.account, 0], 1),
            JournalEntryRef::Outcome(Outcome::Settled(settlement)) => {
                ([settlement.sender(), settlement.receiver()], 2)
            }
            JournalEntryRef::Outcome(Outcome::Rejected(_)) => ([0, 0], 0),
        }
    }
}

/// A journal record as stored: the entry, and for each of its
/// [`JournalEntry::moved_accounts`] the sequence of that account's previous
/// entry (`None` for its first). Following these links from the head in
/// `balances` walks an account's history newest first.
#[derive(Deserialize)]
struct StoredEntry {
    entry: JournalEntry,
    previous: Vec<Option<u64>>,
}

/// The borrowed form of [`StoredEntry`] for encoding (same MessagePack shape).
#[derive(Serialize)]
struct StoredEntryRef<'a> {
    entry: JournalEntryRef<'a>,
    previous: &'a [Option<u64>],
}

/// One thing to make durable in the next commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    StorePending(PendingHalf),
    Decide(Decision),
    OpenAccount(NewAccount),
    TopUp {
        account: AccountId,
        amount: u64,
    },
    /// Writes nothing; answered once everything queued before it is durable.
    Barrier,
}

/// What a commit did with one intent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    Matched(Committed),
    AccountOpened(AccountId),
    ToppedUp {
        balance: u64,
    },
    /// Refused without changing anything (a top-up that would overflow, or
    /// an intent that breaks a ledger rule: a settlement its sender cannot
    /// pay, a second pending half for a key). Every replica refuses it alike.
    Refused(Refusal),
    Barrier,
}

/// Counters of the ledger as of one snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub commit_seq: u64,
    pub journal_entries: u64,
    /// Accounts `1 .. account_next` exist.
    pub account_next: AccountId,
    pub issued: u64,
}

/// Result of checking the books on one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    pub accounts: u64,
    pub journal_entries: u64,
    pub fundings: u64,
    pub settlements: u64,
    pub rejections: u64,
    pub pending_halves: u64,
    /// What the issuer has paid out (its balance is the negative of this).
    pub issued: u64,
    /// Sum of all user balances; must equal `issued`.
    pub user_balances_total: u128,
    /// Every broken rule found, naming the accounts or keys involved.
    pub problems: Vec<Finding>,
}

impl AuditReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The ledger's redb file.
#[derive(Debug)]
pub struct Store {
    db: Handle<Db>,
    /// The `tx_key` index as of the newest commit, and as of the one
    /// before: a reader picks the one of its read transaction's commit
    /// ([`Store::read_with_index`]), so the lock is never held across a
    /// commit.
    index: std::sync::Mutex<Indexes>,
    /// The balances the newest commit left, as far as the table does not
    /// hold them yet ([`balances`]); the writer's cache too.
    balances: std::sync::Mutex<BalanceCache>,
    /// Held by every write that changes balances, from its transaction's
    /// start until its balances are published, so that a checkpoint never
    /// writes a cache older than the journal it records as written.
    writer: std::sync::Mutex<()>,
}

/// A redb handle that is leaked rather than closed once a panic went
/// through redb: its locks are poisoned then, and closing it would panic in
/// turn (on whatever thread drops it). The process is about to stop.
#[derive(Debug)]
pub(crate) struct Handle<T> {
    inner: Option<T>,
    broken: std::sync::atomic::AtomicBool,
}

impl<T> Handle<T> {
    pub(crate) fn new(inner: T) -> Handle<T> {
        Handle {
            inner: Some(inner),
            broken: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A panic went through this handle: never close it.
    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl<T> std::ops::Deref for Handle<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.inner.as_ref().expect("open until dropped")
    }
}

impl<T> Drop for Handle<T> {
    fn drop(&mut self) {
        if *self.broken.get_mut() {
            std::mem::forget(self.inner.take());
        }
    }
}

/// The file, open for writing (a node, tests) or read-only (the operator's
/// audit, export and accounts commands, which must not change a byte).
enum Db {
    Writable(Database),
    /// Over an [`Overlay`] of the file; `lock` is a read-only handle on the
    /// file itself, held so that no node opens it for writing meanwhile
    /// (`None` when the file was not closed cleanly: its recovery ran in
    /// the overlay).
    ReadOnly {
        db: Database,
        lock: Option<redb::ReadOnlyDatabase>,
    },
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Writable(db) => db.fmt(f),
            Db::ReadOnly { db, lock } => f
                .debug_struct("ReadOnly")
                .field("db", db)
                .field("locked", &lock.is_some())
                .finish(),
        }
    }
}

impl Db {
    fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Db::Writable(db) | Db::ReadOnly { db, .. } => db.begin_read(),
        }
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        match self {
            Db::Writable(db) => Ok(db.begin_write()?),
            Db::ReadOnly { .. } => Err(StoreError::ReadOnly),
        }
    }
}

/// `Some(())` when the file holds a ledger of this schema, `None` when it
/// holds no tables at all (a new file), an error otherwise.
fn check_schema(read: &redb::ReadTransaction) -> Result<Option<()>, StoreError> {
    let tables: Vec<String> = read
        .list_tables()?
        .map(|handle| handle.name().to_string())
        .collect();
    if tables.is_empty() {
        return Ok(None);
    }
    if !tables.iter().any(|name| name == "meta") {
        return Err(StoreError::NotALedger);
    }
    let meta = match read.open_table(META) {
        Ok(meta) => meta,
        // Versions 1 and 2 stored their counters as plain u64.
        Err(redb::TableError::TableTypeMismatch { .. }) => {
            let legacy: TableDefinition<&str, u64> = TableDefinition::new("meta");
            let found = read
                .open_table(legacy)?
                .get(META_SCHEMA_VERSION)?
                .map(|guard| guard.value())
                .ok_or(StoreError::NotALedger)?;
            return Err(StoreError::SchemaVersion {
                found,
                expected: SCHEMA_VERSION,
            });
        }
        Err(error) => return Err(error.into()),
    };
    if meta.get(META_SCHEMA_VERSION)?.is_none() {
        return Err(StoreError::NotALedger);
    }
    let found = meta_get(&meta, META_SCHEMA_VERSION)?;
    if found != SCHEMA_VERSION {
        return Err(StoreError::SchemaVersion {
            found,
            expected: SCHEMA_VERSION,
        });
    }
    Ok(Some(()))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(rmp_serde::to_vec(value)?)
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

impl Store {
    /// Opens the ledger at `path`, creating the file and its tables if
    /// needed. A file that fails its integrity check is refused (an error
    /// for which [`is_damage`] holds) before anything is written to it, so
    /// the damage stays as it was found: redb verifies the checksum of
    /// every page of its trees (reading the whole file once, over an
    /// `Overlay`), and [`Store::verify_at_open`] checks the live state.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let existing = std::fs::metadata(path).is_ok_and(|metadata| metadata.len() > 0);
        // The index the check loaded (every chunk read) serves the writable
        // store too: the file is the same, and nothing wrote to it since.
        let mut checked_index = None;
        if existing {
            let (db, lock) = open_overlay(path)?;
            if check_schema(&db.begin_read()?)?.is_some() {
                let checked = Store::on(Db::ReadOnly { db, lock }, None)?;
                checked.verify_at_open()?;
                checked_index = Some(checked.indexes().current.clone());
            }
        }
        let db = refuse_damage(|| {
            Ok(Database::builder()
                .set_cache_size(LEDGER_CACHE_BYTES)
                .create(path)?)
        })?;
        Store::init(db, false, checked_index)
    }

    /// Opens a ledger on a custom storage backend (tests inject faults this
    /// way), checked as [`Store::open`] checks it.
    pub fn open_with_backend(backend: impl redb::StorageBackend) -> Result<Store, StoreError> {
        let db = refuse_damage(|| {
            Ok(Database::builder()
                .set_check_integrity_on_open(true)
                .create_with_backend(backend)?)
        })?;
        Store::init(db, true, None)
    }

    /// Opens an existing ledger without writing to it, ever: every write
    /// is refused with [`StoreError::ReadOnly`], and the file is opened
    /// read-only. redb still verifies every page's checksum, and recovers a
    /// file that was not closed cleanly, both in memory (`Overlay`). A
    /// file a node holds open is refused (`DatabaseAlreadyOpen`).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let (db, lock) = open_overlay(path)?;
        check_schema(&db.begin_read()?)?.ok_or(StoreError::NotALedger)?;
        Store::on(Db::ReadOnly { db, lock }, None)
    }

    /// A store on `db`, its tables created if it has none; `verify` runs
    /// [`Store::verify_at_open`] on an existing ledger.
    fn init(db: Database, verify: bool, index: Option<KeyIndex>) -> Result<Store, StoreError> {
        if check_schema(&db.begin_read()?)?.is_some() {
            let store = Store::on(Db::Writable(db), index)?;
            if verify {
                store.verify_at_open()?;
            }
            return Ok(store);
        }
        let write = db.begin_write()?;
        {
            let mut meta = write.open_table(META)?;
            meta_put(&mut meta, META_SCHEMA_VERSION, SCHEMA_VERSION)?;
            meta_put(&mut meta, META_COMMIT_SEQ, 0)?;
            meta_put(&mut meta, META_JOURNAL_NEXT, 0)?;
            meta_put(&mut meta, META_ACCOUNT_NEXT, 1)?;
            meta_put(&mut meta, META_ISSUED, 0)?;
            set_journal_head(&mut meta, 0)?;
            meta_put(&mut meta, META_TX_KEY_RUN_NEXT, 0)?;
            meta_put(&mut meta, META_BALANCES_AT, 0)?;
            write.open_table(ACCOUNTS)?;
            write.open_table(BALANCES)?;
            write.open_table(JOURNAL)?;
            write.open_table(TX_KEY_RUNS)?;
            write.open_table(TX_KEY_CHUNKS)?;
            write.open_table(PENDING)?;
            write.open_table(RAFT)?;
        }
        write.commit()?;
        Store::on(Db::Writable(db), None)
    }

    /// A store on a ledger's database, its `tx_key` index loaded (every
    /// chunk read and checked).
    /// A damaged index refuses a writable store; a read-only one (opened
    /// to be inspected, audited or replaced) opens with an index that
    /// answers every lookup with the damage, and the audit names it.
    /// `loaded` is the index of this very file, already loaded and checked.
    fn on(db: Db, loaded: Option<KeyIndex>) -> Result<Store, StoreError> {
        let read_only = matches!(db, Db::ReadOnly { .. });
        let loaded = match loaded {
            Some(index) => Ok(index),
            None => refuse_damage(|| load_index(&db.begin_read()?)),
        };
        let index = match loaded {
            Ok(index) => index,
            Err(error) if read_only && is_damage(&error) => {
                let commit = db
                    .begin_read()
                    .ok()
                    .and_then(|read| commit_seq_of(&read).ok())
                    .unwrap_or(0);
                KeyIndex::damaged(&error, commit)
            }
            Err(error) => return Err(error),
        };
        // The journal tail's balances (see `balances`): a damaged tail
        // refuses a writable store; a read-only one answers every balance
        // read with the damage, and its audit names it.
        let cache = match refuse_damage(|| {
            let read = db.begin_read()?;
            BalanceCache::load(&read, commit_seq_of(&read)?)
        }) {
            Ok(cache) => cache,
            Err(error) if read_only && is_damage(&error) => {
                BalanceCache::damaged(&error, index.commit)
            }
            Err(error) => return Err(error),
        };
        Ok(Store {
            db: Handle::new(db),
            index: std::sync::Mutex::new(Indexes {
                current: index,
                previous: None,
            }),
            balances: std::sync::Mutex::new(cache),
            writer: std::sync::Mutex::new(()),
        })
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn balance_cache(&self) -> std::sync::MutexGuard<'_, BalanceCache> {
        // Held only to look up or merge balances: nothing panics inside.
        self.balances
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the balances a commit changed visible to
    /// [`Store::balance_at_commit`] once that commit is.
    fn publish_balances(&self, changed: BalanceChanges, commit: u64) {
        self.balance_cache()
            .publish(changed.changed, changed.checkpointed, commit);
    }

    fn indexes(&self) -> std::sync::MutexGuard<'_, Indexes> {
        // Held only to clone or swap an index: nothing panics inside.
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A read transaction and the `tx_key` index as of the same commit.
    fn read_with_index(&self) -> Result<(redb::ReadTransaction, KeyIndex), StoreError> {
        for _attempt in 0..10_000 {
            let read = self.db.begin_read()?;
            let commit = commit_seq_of(&read)?;
            let indexes = self.indexes();
            let found = [Some(&indexes.current), indexes.previous.as_ref()]
                .into_iter()
                .flatten()
                .find(|index| index.commit == commit)
                .cloned();
            drop(indexes);
            match found {
                Some(index) => return Ok((read, index)),
                // Committed, not yet swapped in (or two commits went by):
                // a moment later a new transaction matches.
                None => std::thread::yield_now(),
            }
        }
        Err(corrupted(
            "the tx_key index never matched the committed state".into(),
        ))
    }

    /// The integrity check a node runs before it serves, beyond redb's page
    /// checksums: every counter, Raft record, balance and pending half
    /// passes its checksum, the journal's last block ends where as many
    /// entries as were written end and its newest entry is the one the
    /// chain's head names, and there is one balance per account. (A block
    /// missing from the middle of the journal is for the audit to find:
    /// its gap check walks every block.) It reads the live state, not the
    /// journal's history: [`Store::audit`] checks everything.
    pub fn verify_at_open(&self) -> Result<(), StoreError> {
        if let Some(damage) = self.indexes().current.damage() {
            return Err(damage);
        }
        let read = self.db.begin_read()?;
        refuse_damage(|| verify_tail(&read))
    }

    /// Records that a panic went through this store's redb handle (see
    /// [`Handle`]): it is leaked, not closed, when dropped.
    pub(crate) fn mark_broken(&self) {
        self.db.mark_broken();
    }

    /// Applies committed Raft entries, in order, in one durable write
    /// transaction, and records the last one's log id (and any membership
    /// among them) in it. Returns one result per entry. If the commit fails
    /// nothing of it is visible and this replica must stop applying.
    pub fn apply_entries(&self, entries: &[raft::Entry]) -> Result<Vec<EntryResult>, StoreError> {
        let Some(last) = entries.last() else {
            return Ok(Vec::new());
        };
        let _writer = self.writer();
        let mut write = self.db.begin_write()?;
        write.set_durability(redb::Durability::Immediate)?;
        let mut results = Vec::with_capacity(entries.len());
        let (index, balances) = {
            let mut tables = Tables::open(&write, self.indexes().current.clone(), &self.balances)?;
            for entry in entries {
                let result = match &entry.payload {
                    EntryPayload::Blank => EntryResult::default(),
                    EntryPayload::Membership(membership) => {
                        let stored = StoredMembership::new(Some(entry.log_id), membership.clone());
                        raft_put(&mut tables.raft, RAFT_MEMBERSHIP, &stored)?;
                        EntryResult::default()
                    }
                    EntryPayload::Normal(ledger_entry) => {
                        tables.apply_ledger_entry(entry.log_id, ledger_entry)?
                    }
                };
                results.push(result);
            }
            raft_put(&mut tables.raft, RAFT_APPLIED, &last.log_id)?;
            (tables.key_index, tables.balance_changes)
        };
        let commit = index.commit;
        self.commit_with_index(write, index)?;
        self.publish_balances(balances, commit);
        Ok(results)
    }

    /// Commits `write`, then makes `index` (as that transaction left it)
    /// the current one.
    fn commit_with_index(
        &self,
        write: redb::WriteTransaction,
        index: KeyIndex,
    ) -> Result<(), StoreError> {
        write.commit()?;
        let mut indexes = self.indexes();
        let previous = std::mem::replace(&mut indexes.current, index);
        indexes.previous = Some(previous);
        Ok(())
    }

    /// Applies `intents` as one commit outside Raft (store unit tests only:
    /// a replica's store changes only through [`Store::apply_entries`]).
    #[cfg(test)]
    pub(crate) fn commit_batch(
        &self,
        now: Timestamp,
        intents: &[Intent],
    ) -> Result<(u64, Vec<Applied>), StoreError> {
        let _writer = self.writer();
        let mut write = self.db.begin_write()?;
        write.set_durability(redb::Durability::Immediate)?;
        let (result, index, balances) = {
            let mut tables = Tables::open(&write, self.indexes().current.clone(), &self.balances)?;
            let result = tables.apply_intents(now, intents)?;
            (result, tables.key_index, tables.balance_changes)
        };
        self.commit_with_index(write, index)?;
        let commit = result.commit.expect("applied intents make a commit");
        self.publish_balances(balances, commit);
        Ok((commit, result.applied))
    }

    /// Writes every balance the journal tail holds to the table now (store
    /// unit tests only: a replica checkpoints only where its log says, so
    /// that every replica writes the same tables).
    #[cfg(test)]
    pub(crate) fn checkpoint(&self) -> Result<(), StoreError> {
        let _writer = self.writer();
        if self.balance_cache().dirty.is_empty() {
            return Ok(());
        }
        let mut write = self.db.begin_write()?;
        write.set_durability(redb::Durability::Immediate)?;
        let (index, balances) = {
            let mut tables = Tables::open(&write, self.indexes().current.clone(), &self.balances)?;
            tables.checkpoint()?;
            let journal_next = meta_get(&tables.meta, META_JOURNAL_NEXT)?;
            meta_put(&mut tables.meta, META_BALANCES_AT, journal_next)?;
            (tables.key_index, tables.balance_changes)
        };
        let commit = index.commit;
        self.commit_with_index(write, index)?;
        self.publish_balances(balances, commit);
        Ok(())
    }

    /// The last applied log id and membership, as Raft's state machine
    /// reports them.
    pub fn raft_state(&self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        let read = self.db.begin_read()?;
        let table = read.open_table(RAFT)?;
        raft_state_of(&table)
    }

    pub fn counters(&self) -> Result<Counters, StoreError> {
        let read = self.db.begin_read()?;
        let meta = read.open_table(META)?;
        Ok(Counters {
            commit_seq: meta_get(&meta, META_COMMIT_SEQ)?,
            journal_entries: meta_get(&meta, META_JOURNAL_NEXT)?,
            account_next: meta_get(&meta, META_ACCOUNT_NEXT)?,
            issued: meta_get(&meta, META_ISSUED)?,
        })
    }

    /// The final outcome of `tx_key`, if it has one.
    pub fn outcome(&self, tx_key: TxKey) -> Result<Option<Outcome>, StoreError> {
        self.outcome_view()?.outcome(tx_key)
    }

    /// A view of every outcome committed so far, for many lookups without a
    /// read transaction each. It does not see later commits: take a new one
    /// after each commit.
    pub fn outcome_view(&self) -> Result<OutcomeView, StoreError> {
        let (read, index) = self.read_with_index()?;
        Ok(OutcomeView {
            index,
            chunks: read.open_table(TX_KEY_CHUNKS)?,
            journal: read.open_table(JOURNAL)?,
        })
    }

    /// The lone half waiting under `tx_key`, if any.
    pub fn pending(&self, tx_key: TxKey) -> Result<Option<PendingHalf>, StoreError> {
        let read = self.db.begin_read()?;
        let pending = read.open_table(PENDING)?;
        pending_get(&pending, tx_key.as_u128())
    }

    /// Every lone half waiting for its partner.
    pub fn all_pending(&self) -> Result<Vec<PendingHalf>, StoreError> {
        let read = self.db.begin_read()?;
        let pending = read.open_table(PENDING)?;
        pending
            .iter()?
            .map(|row| {
                let (key, value) = row?;
                decode(seal::unseal(PENDING.name(), key.value(), value.value())?)
            })
            .collect()
    }

    /// The committed balance of `account` and the commit sequence of the
    /// snapshot it was read from. The issuer (id 0) has no balance here.
    pub fn balance_at_commit(&self, account: AccountId) -> Result<Option<(u64, u64)>, StoreError> {
        let (read, stored) = self.read_with_balance(account)?;
        let commit = commit_seq_of(&read)?;
        Ok(stored.map(|(balance, _)| (balance, commit)))
    }

    /// A read transaction, and `account`'s (balance, newest journal entry)
    /// as of the same commit: from the balance cache, or (not changed since
    /// the last checkpoint) from that transaction's table. No journal tail
    /// is replayed.
    fn read_with_balance(
        &self,
        account: AccountId,
    ) -> Result<(redb::ReadTransaction, Option<(u64, u64)>), StoreError> {
        for _attempt in 0..100_000 {
            let read = self.db.begin_read()?;
            let commit = commit_seq_of(&read)?;
            let cached = {
                let cache = self.balance_cache();
                if let Some(damage) = &cache.damage {
                    return Err(damage.error());
                }
                (cache.commit == Some(commit)).then(|| cache.entries.get(&account).copied())
            };
            match cached {
                Some(Some(stored)) => return Ok((read, Some(stored))),
                Some(None) => {
                    let stored = balance_get(&read.open_table(BALANCES)?, account)?;
                    return Ok((read, stored));
                }
                // Committed, not yet published (or a snapshot being
                // installed): a moment later they match.
                None => std::thread::yield_now(),
            }
        }
        Err(corrupted(
            "the balance cache never matched the committed state".into(),
        ))
    }

    pub fn balance(&self, account: AccountId) -> Result<Option<u64>, StoreError> {
        Ok(self.balance_at_commit(account)?.map(|(balance, _)| balance))
    }

    pub fn account(&self, account: AccountId) -> Result<Option<AccountRecord>, StoreError> {
        let read = self.db.begin_read()?;
        let accounts = read.open_table(ACCOUNTS)?;
        match accounts.get(account)? {
            Some(guard) => Ok(Some(decode(seal::unseal(
                ACCOUNTS.name(),
                account,
                guard.value(),
            )?)?)),
            None => Ok(None),
        }
    }

    /// Every account with its balance, in id order.
    pub fn accounts(&self) -> Result<Vec<(AccountRecord, u64)>, StoreError> {
        let read = self.db.begin_read()?;
        let accounts = read.open_table(ACCOUNTS)?;
        let balances = BalancesView::open(&read)?;
        accounts
            .iter()?
            .map(|row| {
                let (id, record) = row?;
                let id = id.value();
                let balance = balances.get(id)?.map_or(0, |(balance, _)| balance);
                Ok((
                    decode(seal::unseal(ACCOUNTS.name(), id, record.value())?)?,
                    balance,
                ))
            })
            .collect()
    }

    /// Every journal entry that moved `account`'s money, oldest first.
    pub fn history(&self, account: AccountId) -> Result<Vec<(u64, JournalEntry)>, StoreError> {
        let (read, stored) = self.read_with_balance(account)?;
        let journal = read.open_table(JOURNAL)?;
        let mut entries = Vec::new();
        let mut next = stored.map(|(_, head)| head);
        while let Some(seq) = next {
            let stored = stored_at(&journal, seq)?;
            let position = stored
                .entry
                .moved_accounts()
                .iter()
                .position(|moved| *moved == account)
                .ok_or_else(|| {
                    corrupted(format!(
                        "history of account {account} links to journal entry {seq}, which does not move it"
                    ))
                })?;
            next = stored.previous.get(position).copied().flatten();
            if next.is_some_and(|previous| previous >= seq) {
                return Err(corrupted(format!(
                    "history of account {account} links journal entry {seq} to a later one"
                )));
            }
            entries.push((seq, stored.entry));
        }
        entries.reverse();
        Ok(entries)
    }

    /// Journal entries with sequence in `from..`, at most `limit` of them.
    pub fn journal(&self, from: u64, limit: usize) -> Result<Vec<(u64, JournalEntry)>, StoreError> {
        let read = self.db.begin_read()?;
        let journal = read.open_table(JOURNAL)?;
        let mut entries = Vec::new();
        if limit > 0 {
            journal::for_each_entry(&journal, from, u64::MAX, |record| {
                entries.push((record.seq, decode::<StoredEntry>(record.encoded)?.entry));
                Ok(entries.len() < limit)
            })?;
        }
        Ok(entries)
    }

    /// Checks the books on one consistent snapshot: every record's checksum
    /// and the journal's hash chain (any changed byte is named as damage);
    /// every balance equals its funding plus credits minus debits in journal
    /// order and never went below zero; balances sum to what the issuer paid
    /// out; every `tx_key` has exactly one outcome and no pending half
    /// shadows one. A file too damaged for redb to walk (it may even panic
    /// inside) is reported as one problem, not an error or a panic.
    pub fn audit(&self) -> Result<AuditReport, StoreError> {
        let read = self.db.begin_read()?;
        guard_damage(|| audit_books(&read), AuditReport::damaged)
    }

    /// Writes a consistent copy of the ledger, from one read snapshot, to a new
    /// file at `to`. An existing file is never overwritten.
    pub fn backup(&self, to: &Path) -> Result<(), StoreError> {
        if to.exists() {
            return Err(StoreError::TargetExists(to.display().to_string()));
        }
        let read = self.db.begin_read()?;
        write_copy(&read, to, None)
    }

    /// Writes the ledger as a Raft snapshot to the new file `to`: a copy
    /// from one read snapshot, which also records the snapshot's metadata.
    /// Its last log id and membership are those of the copied state, read in
    /// the same transaction. The file is durable when this returns.
    pub fn write_snapshot(
        &self,
        to: &Path,
        snapshot_id: String,
    ) -> Result<SnapshotMeta, StoreError> {
        if to.exists() {
            return Err(StoreError::TargetExists(to.display().to_string()));
        }
        let read = self.db.begin_read()?;
        let (last_log_id, last_membership) = raft_state_of(&read.open_table(RAFT)?)?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        write_copy(&read, to, Some(&meta))?;
        Ok(meta)
    }

    /// The metadata recorded in a snapshot file, checking that it is a
    /// ledger of this schema.
    pub fn snapshot_meta(path: &Path) -> Result<SnapshotMeta, StoreError> {
        let source = redb::ReadOnlyDatabase::open(path)?;
        let read = source.begin_read()?;
        snapshot_meta_in(&read)
    }

    /// Replaces the whole ledger by the snapshot file `from`, in one durable
    /// write transaction: a replica that crashes while installing keeps its
    /// old state. The file must record `meta` (what the leader announced).
    pub fn install_snapshot(&self, from: &Path, meta: &SnapshotMeta) -> Result<(), StoreError> {
        let source = redb::ReadOnlyDatabase::open(from)?;
        let read = source.begin_read()?;
        let recorded = snapshot_meta_in(&read)?;
        if recorded.last_log_id != meta.last_log_id
            || recorded.last_membership != meta.last_membership
        {
            return Err(corrupted(format!(
                "snapshot {} records last log {:?}, the leader announced {:?}",
                meta.snapshot_id, recorded.last_log_id, meta.last_log_id
            )));
        }
        // A snapshot that does not audit clean (a damaged transfer or file)
        // is refused before it replaces anything.
        let report = guard_damage(|| audit_books(&read), AuditReport::damaged)?;
        if let Some(problem) = report.problems.first() {
            return Err(corrupted(format!(
                "snapshot {} fails its audit: {problem}",
                meta.snapshot_id
            )));
        }
        let index = load_index(&read)?;
        // The snapshot's balance cache, built before anything is replaced:
        // readers wait for it only from the commit to the swap below.
        let cache = BalanceCache::load(&read, commit_seq_of(&read)?)?;
        let _writer = self.writer();
        let mut write = self.db.begin_write()?;
        write.set_durability(redb::Durability::Immediate)?;
        {
            replace_table(&read, &write, META)?;
            replace_table(&read, &write, ACCOUNTS)?;
            replace_table(&read, &write, BALANCES)?;
            replace_table(&read, &write, JOURNAL)?;
            replace_table(&read, &write, TX_KEY_RUNS)?;
            replace_table(&read, &write, TX_KEY_CHUNKS)?;
            replace_table(&read, &write, PENDING)?;
            write.delete_table(RAFT)?;
            let source = read.open_table(RAFT)?;
            let mut target = write.open_table(RAFT)?;
            for row in source.iter()? {
                let (key, value) = row?;
                if key.value() != RAFT_SNAPSHOT {
                    target.insert(key.value(), value.value())?;
                }
            }
        }
        // No reader may match the old cache against the new state (the two
        // may share a commit number): it matches nothing until the swap.
        let old = std::mem::replace(
            &mut *self.balance_cache(),
            BalanceCache {
                commit: None,
                ..BalanceCache::default()
            },
        );
        match self.commit_with_index(write, index) {
            Ok(()) => {
                *self.balance_cache() = cache;
                Ok(())
            }
            Err(error) => {
                *self.balance_cache() = old;
                Err(error)
            }
        }
    }

    /// Makes `members` this ledger's Raft membership, recorded at its applied
    /// log id: the start of a new history from this state (`restore`). Never
    /// used on a replica that is part of a running cluster.
    pub fn set_membership(&self, members: raft::Membership) -> Result<(), StoreError> {
        let mut write = self.db.begin_write()?;
        write.set_durability(redb::Durability::Immediate)?;
        {
            let mut table = write.open_table(RAFT)?;
            let (applied, _) = raft_state_of(&table)?;
            let stored = StoredMembership::new(applied, members);
            raft_put(&mut table, RAFT_MEMBERSHIP, &stored)?;
        }
        write.commit()?;
        Ok(())
    }

    /// A SHA3-256 digest of everything the ledger holds, Raft's applied log
    /// id and membership included. Two replicas that applied the same log
    /// prefix have the same digest.
    /// Balances are hashed as they are, not as far as a checkpoint wrote
    /// them: the digest speaks of the books, not of when they were written.
    pub fn digest(&self) -> Result<[u8; 32], StoreError> {
        let read = self.db.begin_read()?;
        let mut hasher = Sha3_256::new();
        digest_meta(&read, &mut hasher)?;
        digest_table(&read, ACCOUNTS, &mut hasher)?;
        digest_balances(&read, &mut hasher)?;
        digest_table(&read, JOURNAL, &mut hasher)?;
        digest_table(&read, TX_KEY_RUNS, &mut hasher)?;
        digest_table(&read, TX_KEY_CHUNKS, &mut hasher)?;
        digest_table(&read, PENDING, &mut hasher)?;
        digest_table(&read, RAFT, &mut hasher)?;
        Ok(hasher.finalize().into())
    }
}

/// Writes every table of `read` to the new durable file `to`, plus the
/// snapshot metadata when given.
fn write_copy(
    read: &redb::ReadTransaction,
    to: &Path,
    snapshot: Option<&SnapshotMeta>,
) -> Result<(), StoreError> {
    // A small cache: redb keeps a write's dirty pages in it until they spill,
    // and at its 1 GiB default a copy of a large ledger (every snapshot)
    // held a gigabyte in memory.
    let copy = Database::builder()
        .set_cache_size(COPY_CACHE_BYTES)
        .create(to)?;
    let mut write = copy.begin_write()?;
    write.set_durability(redb::Durability::Immediate)?;
    {
        copy_table(read, &write, META)?;
        copy_table(read, &write, ACCOUNTS)?;
        copy_table(read, &write, BALANCES)?;
        copy_table(read, &write, JOURNAL)?;
        copy_table(read, &write, TX_KEY_RUNS)?;
        copy_table(read, &write, TX_KEY_CHUNKS)?;
        copy_table(read, &write, PENDING)?;
        copy_table(read, &write, RAFT)?;
        if let Some(meta) = snapshot {
            raft_put(&mut write.open_table(RAFT)?, RAFT_SNAPSHOT, meta)?;
        }
    }
    write.commit()?;
    Ok(())
}

fn replace_table<K, V>(
    read: &redb::ReadTransaction,
    write: &redb::WriteTransaction,
    definition: TableDefinition<K, V>,
) -> Result<(), StoreError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
    for<'a> K::SelfType<'a>: std::borrow::Borrow<K::SelfType<'a>>,
    for<'a> V::SelfType<'a>: std::borrow::Borrow<V::SelfType<'a>>,
{
    write.delete_table(definition)?;
    copy_table(read, write, definition)
}

fn snapshot_meta_in(read: &redb::ReadTransaction) -> Result<SnapshotMeta, StoreError> {
    check_schema(read)?.ok_or(StoreError::NotALedger)?;
    let table = read.open_table(RAFT)?;
    raft_get(&table, RAFT_SNAPSHOT)?
        .ok_or_else(|| corrupted("the file records no snapshot metadata".into()))
}

/// [`digest_table`] of `meta`, but for where the balances checkpoint is.
fn digest_meta(read: &redb::ReadTransaction, hasher: &mut Sha3_256) -> Result<(), StoreError> {
    let table = read.open_table(META)?;
    hasher.update(META.name().as_bytes());
    for row in table.iter()? {
        let (key, value) = row?;
        if key.value() == META_BALANCES_AT {
            continue;
        }
        hasher.update((key.value().len() as u64).to_be_bytes());
        hasher.update(key.value().as_bytes());
        hasher.update((value.value().len() as u64).to_be_bytes());
        hasher.update(value.value());
    }
    Ok(())
}

/// Every account's balance and history head, in id order.
fn digest_balances(read: &redb::ReadTransaction, hasher: &mut Sha3_256) -> Result<(), StoreError> {
    let balances = BalancesView::open(read)?;
    hasher.update(BALANCES.name().as_bytes());
    for row in read.open_table(ACCOUNTS)?.iter()? {
        let id = row?.0.value();
        let (balance, head) = balances
            .get(id)?
            .ok_or_else(|| corrupted(format!("account {id} has no balance")))?;
        hasher.update(id.to_be_bytes());
        hasher.update(balance.to_be_bytes());
        hasher.update(head.to_be_bytes());
    }
    Ok(())
}

fn digest_table<K, V>(
    read: &redb::ReadTransaction,
    definition: TableDefinition<K, V>,
    hasher: &mut Sha3_256,
) -> Result<(), StoreError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let table = read.open_table(definition)?;
    hasher.update(definition.name().as_bytes());
    hasher.update(table.len()?.to_be_bytes());
    for row in table.iter()? {
        let (key, value) = row?;
        let key = key.value();
        let value = value.value();
        let key = K::as_bytes(&key);
        let value = V::as_bytes(&value);
        hasher.update((key.as_ref().len() as u64).to_be_bytes());
        hasher.update(key.as_ref());
        hasher.update((value.as_ref().len() as u64).to_be_bytes());
        hasher.update(value.as_ref());
    }
    Ok(())
}

fn copy_table<K, V>(
    read: &redb::ReadTransaction,
    write: &redb::WriteTransaction,
    definition: TableDefinition<K, V>,
) -> Result<(), StoreError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
    for<'a> K::SelfType<'a>: std::borrow::Borrow<K::SelfType<'a>>,
    for<'a> V::SelfType<'a>: std::borrow::Borrow<V::SelfType<'a>>,
{
    let source = read.open_table(definition)?;
    let mut target = write.open_table(definition)?;
    for row in source.iter()? {
        let (key, value) = row?;
        target.insert(key.value(), value.value())?;
    }
    Ok(())
}

/// Opens the redb file at `path` without ever writing it: over an
/// [`Overlay`], with every page's checksum verified and any crash recovery
/// done in memory. The second value is a read-only handle on the file that
/// keeps a node from opening it for writing meanwhile (`None` for a file
/// that was not closed cleanly). A file a node holds is refused
/// (`DatabaseAlreadyOpen`).
pub(crate) fn open_overlay(
    path: &Path,
) -> Result<(Database, Option<redb::ReadOnlyDatabase>), StoreError> {
    let lock = match refuse_damage(|| Ok(redb::ReadOnlyDatabase::open(path)?)) {
        Ok(lock) => Some(lock),
        Err(StoreError::Redb(redb::Error::DatabaseAlreadyOpen)) => {
            return Err(StoreError::Redb(redb::Error::DatabaseAlreadyOpen));
        }
        // Not closed cleanly, or damaged: the overlay's open decides.
        Err(_) => None,
    };
    let overlay = Overlay::open(path).map_err(|error| StoreError::Redb(error.into()))?;
    let db = refuse_damage(|| {
        Ok(Database::builder()
            .set_check_integrity_on_open(true)
            .create_with_backend(overlay)?)
    })?;
    Ok((db, lock))
}

/// See [`Store::verify_at_open`].
fn verify_tail(read: &redb::ReadTransaction) -> Result<(), StoreError> {
    let meta = read.open_table(META)?;
    for row in meta.iter()? {
        let (key, value) = row?;
        seal::unseal(META.name(), key.value(), value.value())?;
    }
    raft_state_of(&read.open_table(RAFT)?)?;
    let journal = read.open_table(JOURNAL)?;
    let journal_next = meta_get(&meta, META_JOURNAL_NEXT)?;
    let head = journal_head(&meta)?;
    match journal.last()? {
        Some((first, sealed)) => {
            let block = Block::open(first.value(), sealed.value())?;
            if block.end() != journal_next {
                return Err(corrupted(format!(
                    "the journal ends before entry {} but {journal_next} were written",
                    block.end()
                )));
            }
            let newest = block.last();
            let previous = match newest.seq.checked_sub(1) {
                Some(before) => match block.get(before) {
                    Some(record) => record.link,
                    None => journal::with_entry(&journal, before, |record| Ok(record.link))?
                        .ok_or_else(|| corrupted(format!("missing journal entry {before}")))?,
                },
                None => 0,
            };
            if newest.link != head || seal::chain_link(previous, newest.seq, newest.encoded) != head
            {
                return Err(corrupted(format!(
                    "journal {}: the hash chain does not end at the recorded head",
                    newest.seq
                )));
            }
        }
        None if journal_next != 0 => {
            return Err(corrupted(format!(
                "the journal is empty but {journal_next} entries were written"
            )));
        }
        None if head != 0 => {
            return Err(corrupted(
                "the journal is empty but its chain has a head".into(),
            ));
        }
        None => {}
    }
    // The live state a leader is built from: every account (its key hash
    // authenticates phones), balance and lone half.
    for row in read.open_table(ACCOUNTS)?.iter()? {
        let (id, value) = row?;
        seal::unseal(ACCOUNTS.name(), id.value(), value.value())?;
    }
    let balance_table = read.open_table(BALANCES)?;
    for row in balance_table.iter()? {
        let (account, value) = row?;
        balance_from(account.value(), value.value())?;
    }
    for row in read.open_table(PENDING)?.iter()? {
        let (key, value) = row?;
        seal::unseal(PENDING.name(), key.value(), value.value())?;
    }
    let accounts = read.open_table(ACCOUNTS)?.len()?;
    // Every journal entry since the checkpoint decodes, and gives the
    // balances the table does not hold yet.
    let balances = BalancesView::open(read)?.len()?;
    let account_next = meta_get(&meta, META_ACCOUNT_NEXT)?;
    if accounts != balances || accounts.checked_add(1) != Some(account_next) {
        return Err(corrupted(format!(
            "{accounts} accounts, {balances} balances and ids up to {}",
            account_next.wrapping_sub(1)
        )));
    }
    Ok(())
}

/// Runs `check` on a file that may be damaged: a damage error, or a panic
/// inside redb on a tree it cannot walk, becomes `damaged(description)`.
/// Other errors (I/O, a closed file) pass through.
fn guard_damage<T>(
    check: impl FnOnce() -> Result<T, StoreError>,
    damaged: impl FnOnce(Finding) -> T,
) -> Result<T, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) if is_damage(&error) => Ok(damaged(damage_problem(&error))),
        Ok(Err(error)) => Err(error),
        Err(panic) => Ok(damaged(Finding::FileDamaged(structure_damaged(&*panic)))),
    }
}

/// Runs `check` on a file that may be damaged, turning a panic inside redb
/// into a damage error.
pub(crate) fn refuse_damage<T>(
    check: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(check))
        .unwrap_or_else(|panic| Err(corrupted(structure_damaged(&*panic))))
}

fn structure_damaged(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("the file's structure is damaged: redb failed while reading it ({text})")
}

/// Whether `error` says the file's content is damaged (rather than that it
/// could not be read at all).
pub fn is_damage(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Damaged { .. }
            | StoreError::Decode(_)
            | StoreError::Redb(redb::Error::Corrupted(_))
    )
}

/// The audit finding of what `error` found damaged.
fn damage_problem(error: &StoreError) -> Finding {
    match error {
        StoreError::Damaged { table, key, what }
            if table == ACCOUNTS.name() || table == BALANCES.name() =>
        {
            match key.parse() {
                Ok(account) => Finding::AccountDamaged {
                    account,
                    table: table.clone(),
                    what: what.clone(),
                },
                Err(_) => Finding::RecordDamaged {
                    table: table.clone(),
                    key: key.clone(),
                    what: what.clone(),
                },
            }
        }
        StoreError::Damaged { table, key, what } if table == JOURNAL.name() => match key.parse() {
            Ok(seq) => Finding::JournalDamaged {
                seq,
                what: what.clone(),
            },
            Err(_) => Finding::RecordDamaged {
                table: table.clone(),
                key: key.clone(),
                what: what.clone(),
            },
        },
        StoreError::Damaged { table, key, what } => Finding::RecordDamaged {
            table: table.clone(),
            key: key.clone(),
            what: what.clone(),
        },
        other => Finding::FileDamaged(format!("the file is damaged: {other}")),
    }
}

impl AuditReport {
    /// The report on a file whose damage stopped the audit.
    fn damaged(problem: Finding) -> AuditReport {
        AuditReport {
            problems: vec![problem],
            ..AuditReport::default()
        }
    }
}

/// The audit of one read snapshot (see [`Store::audit`]). A damaged record
/// is a problem and the audit goes on; damage redb itself trips over is an
/// error ([`guard_damage`] reports it).
fn audit_books(read: &redb::ReadTransaction) -> Result<AuditReport, StoreError> {
    let meta = read.open_table(META)?;
    let accounts = read.open_table(ACCOUNTS)?;
    let balances = read.open_table(BALANCES)?;
    let journal = read.open_table(JOURNAL)?;
    let pending = read.open_table(PENDING)?;

    let mut report = AuditReport::default();
    for row in meta.iter()? {
        let (key, value) = row?;
        if let Err(error) = seal::unseal(META.name(), key.value(), value.value()) {
            report.problems.push(damage_problem(&error));
        }
    }
    if !report.problems.is_empty() {
        // The counters every check below compares against are not to be trusted.
        return Ok(report);
    }
    report.issued = meta_get(&meta, META_ISSUED)?;
    let account_next: u64 = meta_get(&meta, META_ACCOUNT_NEXT)?;
    let journal_next: u64 = meta_get(&meta, META_JOURNAL_NEXT)?;
    let balances_at: u64 = meta_get(&meta, META_BALANCES_AT)?;
    let indexed = key_index::audit_entries(
        &read.open_table(TX_KEY_RUNS)?,
        &read.open_table(TX_KEY_CHUNKS)?,
        meta_get(&meta, META_TX_KEY_RUN_NEXT)?,
    )?;
    report
        .problems
        .extend(indexed.problems.into_iter().map(Finding::Index));
    let mut index: HashMap<u128, u64> = HashMap::with_capacity(indexed.entries.len());
    for (key, seq) in indexed.entries {
        if index.insert(key, seq).is_some() {
            report
                .problems
                .push(Finding::IndexedTwice(TxKey::from_u128(key)));
        }
    }
    if let Err(error) = raft_state_of(&read.open_table(RAFT)?) {
        report.problems.push(damage_problem(&error));
    }
    let mut running: HashMap<AccountId, u64> = HashMap::new();
    let mut funded_total: u128 = 0;
    let mut outcome_keys: HashSet<u128> = HashSet::new();
    // Each account's newest entry so far, to check the history links.
    let mut last_seq: HashMap<AccountId, u64> = HashMap::new();
    // Accounts the journal moved after the balances checkpoint, with their
    // balance and newest entry at the checkpoint: what the table must hold.
    let mut before_tail: HashMap<AccountId, (Option<u64>, Option<u64>)> = HashMap::new();
    // The chain link of the entry before, `None` after a damaged one.
    let mut link: Option<u128> = Some(0);

    // `None` after a damaged block: how many entries it held is unknown.
    let mut expected_seq = Some(0u64);
    let mut entries = Vec::new();
    for row in journal.iter()? {
        let (first, sealed) = row?;
        let first = first.value();
        if let Some(expected) = expected_seq
            && first != expected
        {
            report.problems.push(Finding::JournalGap {
                seq: first,
                after: i128::from(expected) - 1,
            });
            link = None;
        }
        let block = match Block::open(first, sealed.value()) {
            Ok(block) => block,
            Err(error) => {
                report.problems.push(damage_problem(&error));
                link = None;
                expected_seq = None;
                continue;
            }
        };
        expected_seq = Some(block.end());
        entries.clear();
        for record in block.records() {
            report.journal_entries += 1;
            if let Some(previous) = link
                && seal::chain_link(previous, record.seq, record.encoded) != record.link
            {
                report
                    .problems
                    .push(Finding::ChainBroken { seq: record.seq });
            }
            link = Some(record.link);
            match decode::<StoredEntry>(record.encoded) {
                Ok(stored) => entries.push((record.seq, stored)),
                Err(error) => report.problems.push(Finding::Undecodable {
                    seq: record.seq,
                    error: error.to_string(),
                }),
            }
        }
        for (seq, StoredEntry { entry, previous }) in entries.drain(..) {
            let moved = entry.moved_accounts();
            if previous.len() != moved.len() {
                report.problems.push(Finding::LinkCount {
                    seq,
                    links: previous.len(),
                    accounts: moved.len(),
                });
            }
            if seq >= balances_at {
                for account in &moved {
                    before_tail.entry(*account).or_insert_with(|| {
                        (
                            running.get(account).copied(),
                            last_seq.get(account).copied(),
                        )
                    });
                }
            }
            for (account, link) in moved.iter().zip(&previous) {
                let expected = last_seq.insert(*account, seq);
                if *link != expected {
                    report.problems.push(Finding::HistoryLink {
                        seq,
                        account: *account,
                        link: *link,
                        expected,
                    });
                }
            }
            match entry {
                JournalEntry::Funding(funding) => {
                    report.fundings += 1;
                    funded_total += u128::from(funding.amount);
                    let balance = running.entry(funding.account).or_insert(0);
                    if *balance != funding.balance_before {
                        report.problems.push(Finding::FundingBalance {
                            seq,
                            account: funding.account,
                            recorded: funding.balance_before,
                            history: *balance,
                        });
                    }
                    match balance.checked_add(funding.amount) {
                        Some(next) => *balance = next,
                        None => report.problems.push(Finding::Overflow {
                            seq,
                            account: funding.account,
                        }),
                    }
                }
                JournalEntry::Outcome(outcome) => {
                    let key = outcome.tx_key().as_u128();
                    if !outcome_keys.insert(key) {
                        report.problems.push(Finding::SecondOutcome {
                            seq,
                            tx_key: outcome.tx_key(),
                        });
                    }
                    match index.get(&key) {
                        Some(indexed) if *indexed == seq => {}
                        other => report.problems.push(Finding::IndexedElsewhere {
                            seq,
                            tx_key: outcome.tx_key(),
                            indexed: other.copied(),
                        }),
                    }
                    match outcome {
                        Outcome::Settled(settlement) => {
                            report.settlements += 1;
                            audit_settlement(seq, &settlement, &mut running, &mut report.problems);
                        }
                        Outcome::Rejected(_) => report.rejections += 1,
                    }
                }
            }
        }
    }
    if journal_next != report.journal_entries {
        report.problems.push(Finding::JournalLength {
            held: report.journal_entries,
            written: journal_next,
        });
    }
    if let Some(link) = link
        && link != journal_head(&meta)?
    {
        report.problems.push(Finding::JournalHead);
    }

    let mut opened_since_checkpoint = 0u64;
    for row in accounts.iter()? {
        let (id, record) = row?;
        let id = id.value();
        report.accounts += 1;
        if let Err(error) =
            seal::unseal(ACCOUNTS.name(), id, record.value()).and_then(decode::<AccountRecord>)
        {
            report.problems.push(damage_problem(&error));
        }
        if id == ISSUER_ACCOUNT_ID || id >= account_next {
            report.problems.push(Finding::OutOfRange {
                account: id,
                next: account_next,
            });
        }
        let stored = match balance_get(&balances, id) {
            Ok(stored) => stored,
            Err(error) if is_damage(&error) => {
                report.problems.push(damage_problem(&error));
                continue;
            }
            Err(error) => return Err(error),
        };
        // The table holds each balance as the checkpoint left it; the
        // journal after it moved those in `before_tail`.
        let in_tail = before_tail.get(&id).copied();
        let (expected, expected_head) =
            in_tail.unwrap_or((running.get(&id).copied(), last_seq.get(&id).copied()));
        if let Some((_, head)) = stored
            && expected_head != Some(head)
        {
            report.problems.push(Finding::HistoryHead {
                account: id,
                head,
                newest: expected_head,
            });
        }
        let held = match (stored.map(|(balance, _)| balance), expected) {
            // Opened after the checkpoint: no balance written yet.
            (None, None) if in_tail.is_some() => {
                opened_since_checkpoint += 1;
                true
            }
            (None, _) => {
                report.problems.push(Finding::NoBalance(id));
                false
            }
            (Some(stored), expected) if stored != expected.unwrap_or(0) => {
                report.problems.push(Finding::Balance {
                    account: id,
                    stored,
                    history: expected.unwrap_or(0),
                });
                false
            }
            (Some(_), _) => true,
        };
        if held {
            // The balance as of the newest entry (the table's, or the tail's).
            let balance = match in_tail {
                Some(_) => running.get(&id).copied(),
                None => stored.map(|(balance, _)| balance),
            };
            report.user_balances_total += u128::from(balance.unwrap_or(0));
        }
    }
    let balances_held = balances.len()? + opened_since_checkpoint;
    if balances_held != report.accounts {
        report.problems.push(Finding::BalanceCount {
            balances: balances_held,
            accounts: report.accounts,
        });
    }
    if report.accounts + 1 != account_next {
        report.problems.push(Finding::AccountCount {
            accounts: report.accounts,
            last: account_next.wrapping_sub(1),
        });
    }
    if report.user_balances_total != u128::from(report.issued) {
        report.problems.push(Finding::NotZeroSum {
            total: report.user_balances_total,
            issued: report.issued,
        });
    }
    if funded_total != u128::from(report.issued) {
        report.problems.push(Finding::Funded {
            funded: funded_total,
            issued: report.issued,
        });
    }
    for &key in index.keys() {
        if !outcome_keys.contains(&key) {
            report
                .problems
                .push(Finding::IndexedWithoutOutcome(TxKey::from_u128(key)));
        }
    }
    for row in pending.iter()? {
        let (key, value) = row?;
        let key = key.value();
        report.pending_halves += 1;
        let half = seal::unseal(PENDING.name(), key, value.value()).and_then(decode::<PendingHalf>);
        match half {
            Ok(half) if half.tx_key().as_u128() != key => {
                report.problems.push(Finding::PendingMisfiled {
                    key: TxKey::from_u128(key),
                    half: half.tx_key(),
                })
            }
            Ok(_) => {}
            Err(error) => report.problems.push(damage_problem(&error)),
        }
        if outcome_keys.contains(&key) {
            report
                .problems
                .push(Finding::PendingAndFinal(TxKey::from_u128(key)));
        }
    }
    Ok(report)
}

fn audit_settlement(
    seq: u64,
    settlement: &Settlement,
    running: &mut HashMap<AccountId, u64>,
    problems: &mut Vec<Finding>,
) {
    let (sender, receiver, amount) = (
        settlement.sender(),
        settlement.receiver(),
        settlement.amount(),
    );
    if sender == receiver {
        problems.push(Finding::PaidItself {
            seq,
            account: sender,
        });
    }
    if amount == 0 {
        problems.push(Finding::ZeroSettlement { seq });
    }
    let sender_balance = running.entry(sender).or_insert(0);
    if *sender_balance != settlement.sender_balance_before {
        problems.push(Finding::SettlementBalance {
            seq,
            party: Party::Sender,
            account: sender,
            recorded: settlement.sender_balance_before,
            history: *sender_balance,
        });
    }
    match sender_balance.checked_sub(amount) {
        Some(next) => *sender_balance = next,
        None => problems.push(Finding::Overdrawn {
            seq,
            account: sender,
            amount,
            balance: *sender_balance,
        }),
    }
    let receiver_balance = running.entry(receiver).or_insert(0);
    if *receiver_balance != settlement.receiver_balance_before {
        problems.push(Finding::SettlementBalance {
            seq,
            party: Party::Receiver,
            account: receiver,
            recorded: settlement.receiver_balance_before,
            history: *receiver_balance,
        });
    }
    match receiver_balance.checked_add(amount) {
        Some(next) => *receiver_balance = next,
        None => problems.push(Finding::Overflow {
            seq,
            account: receiver,
        }),
    }
}

fn corrupted(message: String) -> StoreError {
    StoreError::Redb(redb::Error::Corrupted(message))
}

// Sealed records, one pair of functions per kind. Every read checks the
// record's checksum.

fn meta_get(meta: &impl ReadableTable<&'static str, Sealed>, key: &str) -> Result<u64, StoreError> {
    Ok(u64::from_le_bytes(meta_bytes(meta, key)?))
}

/// The fixed-size payload of the meta record `key`.
fn meta_bytes<const N: usize>(
    meta: &impl ReadableTable<&'static str, Sealed>,
    key: &str,
) -> Result<[u8; N], StoreError> {
    let guard = meta
        .get(key)?
        .ok_or_else(|| corrupted(format!("meta value {key} missing")))?;
    seal::unseal_array(META.name(), key, guard.value())
}

fn meta_put(
    meta: &mut redb::Table<&'static str, Sealed>,
    key: &str,
    value: u64,
) -> Result<(), StoreError> {
    meta.insert(
        key,
        seal::seal(META.name(), key, &value.to_le_bytes()).as_slice(),
    )?;
    Ok(())
}

fn journal_head(meta: &impl ReadableTable<&'static str, Sealed>) -> Result<u128, StoreError> {
    Ok(u128::from_le_bytes(meta_bytes(meta, META_JOURNAL_HEAD)?))
}

fn set_journal_head(
    meta: &mut redb::Table<&'static str, Sealed>,
    head: u128,
) -> Result<(), StoreError> {
    let sealed = seal::seal(META.name(), META_JOURNAL_HEAD, &head.to_le_bytes());
    meta.insert(META_JOURNAL_HEAD, sealed.as_slice())?;
    Ok(())
}

/// An account's (balance, newest journal entry).
fn balance_get(
    balances: &impl ReadableTable<u64, Sealed>,
    account: AccountId,
) -> Result<Option<(u64, u64)>, StoreError> {
    match balances.get(account)? {
        Some(guard) => Ok(Some(balance_from(account, guard.value())?)),
        None => Ok(None),
    }
}

fn balance_from(account: AccountId, sealed: &[u8]) -> Result<(u64, u64), StoreError> {
    let bytes: [u8; 16] = seal::unseal_array(BALANCES.name(), account, sealed)?;
    let (balance, head) = bytes.split_at(8);
    Ok((
        u64::from_le_bytes(balance.try_into().expect("8 bytes")),
        u64::from_le_bytes(head.try_into().expect("8 bytes")),
    ))
}

fn balance_put(
    balances: &mut redb::Table<u64, Sealed>,
    account: AccountId,
    (balance, head): (u64, u64),
) -> Result<(), StoreError> {
    let mut payload = [0u8; 16];
    payload[..8].copy_from_slice(&balance.to_le_bytes());
    payload[8..].copy_from_slice(&head.to_le_bytes());
    balances.insert(
        account,
        seal::seal(BALANCES.name(), account, &payload).as_slice(),
    )?;
    Ok(())
}

/// Outcomes as of one commit ([`Store::outcome_view`]).
pub struct OutcomeView {
    index: KeyIndex,
    chunks: redb::ReadOnlyTable<u128, Sealed>,
    journal: redb::ReadOnlyTable<u64, Sealed>,
}

impl OutcomeView {
    /// The final outcome of `tx_key`, if it had one when the view was taken.
    pub fn outcome(&self, tx_key: TxKey) -> Result<Option<Outcome>, StoreError> {
        match self.index.get(&self.chunks, tx_key.as_u128())? {
            Some(seq) => Ok(Some(outcome_at(&self.journal, seq)?)),
            None => Ok(None),
        }
    }
}

/// The `tx_key` index stored in `read`.
fn load_index(read: &redb::ReadTransaction) -> Result<KeyIndex, StoreError> {
    KeyIndex::load(
        &read.open_table(TX_KEY_RUNS)?,
        &read.open_table(TX_KEY_CHUNKS)?,
        filter_secret(),
        commit_seq_of(read)?,
    )
}

/// The ledger commit `read` sees.
fn commit_seq_of(read: &redb::ReadTransaction) -> Result<u64, StoreError> {
    meta_get(&read.open_table(META)?, META_COMMIT_SEQ)
}

/// The `tx_key` index readers may need: the newest commit's, and the one
/// before (for a read transaction begun just before the newest commit).
#[derive(Debug)]
struct Indexes {
    current: KeyIndex,
    previous: Option<KeyIndex>,
}

/// A fresh random seed for the index's filters, from the standard
/// library's per-process random hasher keys.
fn filter_secret() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0x7a9_1ed6e5);
    hasher.finish()
}

fn pending_get(
    pending: &impl ReadableTable<u128, Sealed>,
    tx_key: u128,
) -> Result<Option<PendingHalf>, StoreError> {
    match pending.get(tx_key)? {
        Some(guard) => Ok(Some(decode(seal::unseal(
            PENDING.name(),
            tx_key,
            guard.value(),
        )?)?)),
        None => Ok(None),
    }
}

fn raft_get<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, Sealed>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match table.get(key)? {
        Some(guard) => Ok(Some(raft::decode(seal::unseal(
            RAFT.name(),
            key,
            guard.value(),
        )?)?)),
        None => Ok(None),
    }
}

fn raft_put<T: Serialize>(
    table: &mut redb::Table<&'static str, Sealed>,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    let sealed = seal::seal(RAFT.name(), key, &raft::encode(value)?);
    table.insert(key, sealed.as_slice())?;
    Ok(())
}

/// Journal entry `seq`.
fn stored_at(
    journal: &impl ReadableTable<u64, Sealed>,
    seq: u64,
) -> Result<StoredEntry, StoreError> {
    journal::with_entry(journal, seq, |record| decode(record.encoded))?
        .ok_or_else(|| corrupted(format!("missing journal entry {seq}")))
}

fn outcome_at(journal: &impl ReadableTable<u64, Sealed>, seq: u64) -> Result<Outcome, StoreError> {
    outcome_of(seq, stored_at(journal, seq)?)
}

fn outcome_of(seq: u64, stored: StoredEntry) -> Result<Outcome, StoreError> {
    match stored.entry {
        JournalEntry::Outcome(outcome) => Ok(outcome),
        JournalEntry::Funding(_) => {
            Err(corrupted(format!("tx_key index names funding entry {seq}")))
        }
    }
}

/// An empty map for `capacity` entries, hashed with foldhash's fast hasher:
/// for keys the ledger assigns (account ids); see [`KeyMap`] for the others.
fn new_map<K, V>(capacity: usize) -> foldhash::HashMap<K, V> {
    foldhash::HashMap::with_capacity_and_hasher(capacity, Default::default())
}

/// An account's balance and history head as a batch sees them.
#[derive(Clone, Copy)]
struct Touched {
    balance: u64,
    /// Balance when the batch first read it (0 for an account opened in it).
    balance_before_batch: u64,
    /// Newest journal entry that moved it; `None` only while it is being opened.
    last_seq: Option<u64>,
    last_seq_before_batch: Option<u64>,
}

/// The open tables of one write transaction.
struct Tables<'txn> {
    meta: redb::Table<'txn, &'static str, Sealed>,
    accounts: redb::Table<'txn, u64, Sealed>,
    balances: redb::Table<'txn, u64, Sealed>,
    journal: redb::Table<'txn, u64, Sealed>,
    index: IndexTables<'txn>,
    /// The `tx_key` index as the transaction has left it so far.
    key_index: KeyIndex,
    pending: redb::Table<'txn, u128, Sealed>,
    raft: redb::Table<'txn, &'static str, Sealed>,
    /// The balances as the last commit left them (read only here).
    cache: &'txn std::sync::Mutex<BalanceCache>,
    /// What this transaction changed in them, published after it commits.
    balance_changes: BalanceChanges,
    /// The journal entries of the commit being applied, on their way into
    /// blocks: buffers allocated once per transaction, not per entry.
    journal_writer: BlockWriter,
}

/// The balances one write transaction changed or read, for the cache.
#[derive(Default)]
struct BalanceChanges {
    changed: foldhash::HashMap<AccountId, CachedBalance>,
    /// A checkpoint in this transaction wrote every balance dirty before
    /// it: only those still marked dirty in `changed` are dirty now.
    checkpointed: bool,
}

impl<'txn> Tables<'txn> {
    fn open(
        write: &'txn redb::WriteTransaction,
        key_index: KeyIndex,
        cache: &'txn std::sync::Mutex<BalanceCache>,
    ) -> Result<Tables<'txn>, StoreError> {
        let meta = write.open_table(META)?;
        // The cache must be of the state this transaction writes on: a
        // stale one would apply on stale balances.
        let commit = meta_get(&meta, META_COMMIT_SEQ)?;
        {
            let cache = cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(damage) = &cache.damage {
                return Err(damage.error());
            }
            if cache.commit != Some(commit) {
                return Err(corrupted(format!(
                    "the balance cache is of commit {:?}, the ledger of commit {commit}",
                    cache.commit
                )));
            }
        }
        Ok(Tables {
            meta,
            accounts: write.open_table(ACCOUNTS)?,
            balances: write.open_table(BALANCES)?,
            journal: write.open_table(JOURNAL)?,
            index: IndexTables {
                runs: write.open_table(TX_KEY_RUNS)?,
                chunks: write.open_table(TX_KEY_CHUNKS)?,
            },
            key_index,
            pending: write.open_table(PENDING)?,
            raft: write.open_table(RAFT)?,
            cache,
            balance_changes: BalanceChanges::default(),
            journal_writer: BlockWriter::default(),
        })
    }

    /// The outcome recorded in journal entry `seq`, which this transaction
    /// may not have written into a block yet.
    fn outcome_at(&self, seq: u64) -> Result<Outcome, StoreError> {
        match self.journal_writer.get(seq) {
            Some(encoded) => outcome_of(seq, decode(encoded)?),
            None => outcome_at(&self.journal, seq),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BalanceCache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An account's (balance, newest journal entry) as of the commits
    /// before this batch: this transaction's, the cache's, the table's.
    fn stored_balance(&mut self, account: AccountId) -> Result<Option<(u64, u64)>, StoreError> {
        if let Some(changed) = self.balance_changes.changed.get(&account) {
            return Ok(Some((changed.balance, changed.last_seq)));
        }
        let cached = {
            let cache = self.cache();
            cache.entries.get(&account).map(|&stored| {
                // Dirty unless a checkpoint in this transaction wrote it.
                let dirty = !self.balance_changes.checkpointed && cache.dirty.contains(&account);
                (stored, dirty)
            })
        };
        let (stored, dirty) = match cached {
            Some((stored, dirty)) => (Some(stored), dirty),
            None => (balance_get(&self.balances, account)?, false),
        };
        if let Some((balance, last_seq)) = stored {
            // Remembered, so that the next commits need not read it again.
            self.balance_changes.changed.insert(
                account,
                CachedBalance {
                    balance,
                    last_seq,
                    dirty,
                },
            );
        }
        Ok(stored)
    }

    /// How many accounts have a balance the table does not hold yet.
    fn dirty_accounts(&self) -> usize {
        let cache = self.cache();
        let checkpointed = self.balance_changes.checkpointed;
        let before = if checkpointed { 0 } else { cache.dirty.len() };
        before
            + self
                .balance_changes
                .changed
                .iter()
                .filter(|(account, changed)| {
                    changed.dirty && (checkpointed || !cache.dirty.contains(*account))
                })
                .count()
    }

    /// Writes every balance not in the table yet: the checkpoint. The
    /// balances go in in account order, so the table's B-tree is walked
    /// once, leaf after leaf, instead of a random page per account.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        let mut writes: Vec<(AccountId, (u64, u64))> = Vec::new();
        if !self.balance_changes.checkpointed {
            // Copied out first: readers need the cache while the table is
            // written.
            let cache = self.cache();
            writes.extend(
                cache
                    .dirty
                    .iter()
                    .filter(|account| !self.balance_changes.changed.contains_key(account))
                    .map(|account| (*account, cache.entries[account])),
            );
        }
        for (account, changed) in &mut self.balance_changes.changed {
            if changed.dirty {
                writes.push((*account, (changed.balance, changed.last_seq)));
                changed.dirty = false;
            }
        }
        writes.sort_unstable_by_key(|(account, _)| *account);
        for (account, stored) in writes {
            balance_put(&mut self.balances, account, stored)?;
        }
        self.balance_changes.checkpointed = true;
        Ok(())
    }

    /// Applies one committed ledger batch. An entry proposed by actors of an
    /// earlier term than the one it was committed in is refused whole: those
    /// actors may have decided on a stale view of the ledger.
    fn apply_ledger_entry(
        &mut self,
        log_id: LogId,
        entry: &LedgerEntry,
    ) -> Result<EntryResult, StoreError> {
        let committed_term = log_id.leader_id.term;
        if entry.term != committed_term {
            let refusal = Refusal::StaleTerm {
                proposed: entry.term,
                committed: committed_term,
            };
            return Ok(EntryResult {
                commit: None,
                applied: vec![Applied::Refused(refusal); entry.intents.len()],
            });
        }
        self.apply_intents(entry.at, &entry.intents)
    }

    /// Applies `intents` in order as the next ledger commit, at node time `now`.
    fn apply_intents(
        &mut self,
        now: Timestamp,
        intents: &[Intent],
    ) -> Result<EntryResult, StoreError> {
        let mut batch = Batch {
            now,
            journal_next: meta_get(&self.meta, META_JOURNAL_NEXT)?,
            journal_head: journal_head(&self.meta)?,
            account_next: meta_get(&self.meta, META_ACCOUNT_NEXT)?,
            issued: meta_get(&self.meta, META_ISSUED)?,
            tables: self,
            touched: new_map(2 * intents.len()),
            decided_in_batch: KeySet::with_capacity_and_hasher(intents.len(), Default::default()),
            skipped_pending: KeySet::default(),
            decided: KeyMap::with_capacity_and_hasher(intents.len(), Default::default()),
        };
        let commit = meta_get(&batch.tables.meta, META_COMMIT_SEQ)? + 1;
        // Halves that meet their partner inside this batch need never be
        // written as pending.
        for intent in intents {
            if let Intent::Decide(decision) = intent {
                batch.decided_in_batch.insert(decision.tx_key());
            }
        }
        let mut applied = Vec::with_capacity(intents.len());
        for intent in intents {
            applied.push(batch.apply(intent)?);
        }
        batch.finish(commit)?;
        Ok(EntryResult {
            commit: Some(commit),
            applied,
        })
    }
}

/// One ledger commit in progress: its tables and running counters.
struct Batch<'a, 'txn> {
    now: Timestamp,
    tables: &'a mut Tables<'txn>,
    /// Balances read or changed in this batch, with each account's newest
    /// journal entry; written back once at the end.
    touched: foldhash::HashMap<AccountId, Touched>,
    /// Keys that reach a decision somewhere in this batch.
    decided_in_batch: KeySet<TxKey>,
    /// Lone halves of this batch not written because their key is decided in it.
    skipped_pending: KeySet<TxKey>,
    /// Keys this batch decided, with their journal entries: the index's
    /// next run.
    decided: KeyMap<u128, u64>,
    journal_next: u64,
    /// The chain link of the newest journal entry.
    journal_head: u128,
    account_next: AccountId,
    issued: u64,
}

impl Batch<'_, '_> {
    fn balance(&mut self, account: AccountId) -> Result<Option<u64>, StoreError> {
        if let Some(touched) = self.touched.get(&account) {
            return Ok(Some(touched.balance));
        }
        let Some((balance, last_seq)) = self.tables.stored_balance(account)? else {
            return Ok(None);
        };
        self.touched.insert(
            account,
            Touched {
                balance,
                balance_before_batch: balance,
                last_seq: Some(last_seq),
                last_seq_before_batch: Some(last_seq),
            },
        );
        Ok(Some(balance))
    }

    /// Sets the balance of an account this batch has read (or opened).
    fn set_balance(&mut self, account: AccountId, balance: u64) {
        self.touched
            .get_mut(&account)
            .expect("balance read before it is set")
            .balance = balance;
    }

    /// Appends `entry`, linking it into the history of each account it moves.
    fn append(&mut self, entry: JournalEntryRef<'_>) -> Result<u64, StoreError> {
        let seq = self.journal_next;
        self.journal_next += 1;
        let mut previous = [None; 2];
        let (accounts, moved) = entry.moved_accounts();
        for (account, previous) in accounts[..moved].iter().zip(&mut previous) {
            let touched = self
                .touched
                .get_mut(account)
                .expect("moved accounts were read first");
            *previous = touched.last_seq.replace(seq);
        }
        let stored = StoredEntryRef {
            entry,
            previous: &previous[..moved],
        };
        let tables = &mut *self.tables;
        self.journal_head = tables
            .journal_writer
            .append(seq, self.journal_head, |buffer| {
                Ok(rmp_serde::encode::write(buffer, &stored)?)
            })?;
        if tables.journal_writer.is_full() {
            tables.journal_writer.flush(&mut tables.journal)?;
        }
        Ok(seq)
    }

    fn apply(&mut self, intent: &Intent) -> Result<Applied, StoreError> {
        match intent {
            Intent::StorePending(half) => self.store_pending(half),
            Intent::Decide(decision) => self.decide(decision),
            Intent::OpenAccount(new_account) => self.open_account(new_account),
            Intent::TopUp { account, amount } => self.top_up(*account, *amount),
            Intent::Barrier => Ok(Applied::Barrier),
        }
    }

    fn final_outcome(&self, tx_key: TxKey) -> Result<Option<Arc<Outcome>>, StoreError> {
        let key = tx_key.as_u128();
        let seq = match self.decided.get(&key) {
            Some(seq) => Some(*seq),
            None => self.tables.key_index.get(&self.tables.index.chunks, key)?,
        };
        match seq {
            Some(seq) => Ok(Some(Arc::new(self.tables.outcome_at(seq)?))),
            None => Ok(None),
        }
    }

    fn store_pending(&mut self, half: &PendingHalf) -> Result<Applied, StoreError> {
        let tx_key = half.tx_key();
        if self.decided_in_batch.contains(&tx_key) {
            self.skipped_pending.insert(tx_key);
            return Ok(Applied::Matched(Committed::PendingSkipped));
        }
        if let Some(outcome) = self.final_outcome(tx_key)? {
            return Ok(Applied::Matched(Committed::AlreadyFinal(outcome)));
        }
        if self.tables.pending.get(tx_key.as_u128())?.is_some() {
            return Ok(Applied::Refused(Refusal::PendingExists(tx_key)));
        }
        let key = tx_key.as_u128();
        let sealed = seal::seal(PENDING.name(), key, &encode(half)?);
        self.tables.pending.insert(key, sealed.as_slice())?;
        Ok(Applied::Matched(Committed::PendingStored))
    }

    fn decide(&mut self, decision: &Decision) -> Result<Applied, StoreError> {
        let tx_key = decision.tx_key();
        if let Some(outcome) = self.final_outcome(tx_key)? {
            return Ok(Applied::Matched(Committed::AlreadyFinal(outcome)));
        }
        let outcome = match decision {
            Decision::Settle { send, receive } => {
                let (sender, receiver, amount) = (
                    send.half.sender_id,
                    receive.half.receiver_id,
                    send.half.amount,
                );
                if let Some(why) = self.unpayable(sender, receiver, amount)? {
                    return Ok(Applied::Refused(Refusal::Unpayable { tx_key, why }));
                }
                let (Some(sender_before), Some(receiver_before)) =
                    (self.balance(sender)?, self.balance(receiver)?)
                else {
                    unreachable!("unpayable checked both accounts exist")
                };
                self.set_balance(sender, sender_before - amount);
                self.set_balance(receiver, receiver_before + amount);
                Outcome::Settled(Settlement {
                    send: send.clone(),
                    receive: receive.clone(),
                    sender_balance_before: sender_before,
                    receiver_balance_before: receiver_before,
                    settled_at: self.now,
                })
            }
            Decision::Reject {
                tx_key,
                code,
                send,
                receive,
                sender_balance,
            } => {
                if !code.is_payment_outcome() {
                    return Ok(Applied::Refused(Refusal::HalfOnlyCode {
                        tx_key: *tx_key,
                        code: *code,
                    }));
                }
                Outcome::Rejected(Rejection {
                    tx_key: *tx_key,
                    code: *code,
                    send: send.clone(),
                    receive: receive.clone(),
                    sender_balance: *sender_balance,
                    decided_at: self.now,
                })
            }
        };
        let outcome = Arc::new(outcome);
        let seq = self.append(JournalEntryRef::Outcome(&outcome))?;
        let key = tx_key.as_u128();
        let older = self.decided.insert(key, seq);
        assert!(
            older.is_none(),
            "tx_key {tx_key} checked to have no outcome"
        );
        // A lone half skipped in this batch was never written: nothing to delete.
        if !self.skipped_pending.contains(&tx_key) {
            self.tables.pending.remove(tx_key.as_u128())?;
        }
        Ok(Applied::Matched(Committed::Decided(outcome)))
    }

    /// Why a settlement cannot be applied, if it cannot. The sender's account
    /// actor reserved the amount before the leader decided, so storage must
    /// agree that it is there; if it does not, the decision is refused rather
    /// than the money created.
    fn unpayable(
        &mut self,
        sender: AccountId,
        receiver: AccountId,
        amount: u64,
    ) -> Result<Option<Unpayable>, StoreError> {
        if sender == receiver {
            return Ok(Some(Unpayable::SelfPayment(sender)));
        }
        if amount == 0 {
            return Ok(Some(Unpayable::ZeroAmount));
        }
        let Some(sender_before) = self.balance(sender)? else {
            return Ok(Some(Unpayable::UnknownSender(sender)));
        };
        let Some(receiver_before) = self.balance(receiver)? else {
            return Ok(Some(Unpayable::UnknownReceiver(receiver)));
        };
        if sender_before < amount {
            return Ok(Some(Unpayable::Underfunded {
                sender,
                amount,
                balance: sender_before,
            }));
        }
        if receiver_before.checked_add(amount).is_none() {
            return Ok(Some(Unpayable::Overflow(receiver)));
        }
        Ok(None)
    }

    fn open_account(&mut self, new_account: &NewAccount) -> Result<Applied, StoreError> {
        let Some(issued) = self.issued.checked_add(new_account.opening_balance) else {
            return Ok(Applied::Refused(Refusal::IssuedOverflow));
        };
        let id = self.account_next;
        self.account_next += 1;
        let record = AccountRecord {
            id,
            account_type: new_account.account_type.clone(),
            bank_name: new_account.bank_name.clone(),
            created_at: self.now,
            salt: new_account.salt.clone(),
            key_hash: new_account.key_hash.clone(),
        };
        let sealed = seal::seal(ACCOUNTS.name(), id, &encode(&record)?);
        self.tables.accounts.insert(id, sealed.as_slice())?;
        self.touched.insert(
            id,
            Touched {
                balance: new_account.opening_balance,
                balance_before_batch: 0,
                last_seq: None,
                last_seq_before_batch: None,
            },
        );
        self.issued = issued;
        let funding = Funding {
            account: id,
            amount: new_account.opening_balance,
            kind: FundingKind::Opening,
            balance_before: 0,
            at: self.now,
        };
        self.append(JournalEntryRef::Funding(&funding))?;
        Ok(Applied::AccountOpened(id))
    }

    fn top_up(&mut self, account: AccountId, amount: u64) -> Result<Applied, StoreError> {
        if amount == 0 {
            return Ok(Applied::Refused(Refusal::ZeroTopUp));
        }
        let Some(before) = self.balance(account)? else {
            return Ok(Applied::Refused(Refusal::NoSuchAccount(account)));
        };
        let (Some(after), Some(issued)) =
            (before.checked_add(amount), self.issued.checked_add(amount))
        else {
            return Ok(Applied::Refused(Refusal::TopUpOverflow));
        };
        self.set_balance(account, after);
        self.issued = issued;
        let funding = Funding {
            account,
            amount,
            kind: FundingKind::TopUp,
            balance_before: before,
            at: self.now,
        };
        self.append(JournalEntryRef::Funding(&funding))?;
        Ok(Applied::ToppedUp { balance: after })
    }

    fn finish(self, commit_seq: u64) -> Result<(), StoreError> {
        let mut total_touched_before: u128 = 0;
        let mut total_touched_after: u128 = 0;
        for (&account, touched) in &self.touched {
            let last_seq = touched.last_seq.unwrap_or_else(|| {
                panic!("commit {commit_seq}: account {account} has no journal entry")
            });
            // Written behind (see `balances`): only the journal entry that
            // moved it is written now.
            let moved = touched.last_seq != touched.last_seq_before_batch;
            let changed = self
                .tables
                .balance_changes
                .changed
                .entry(account)
                .or_insert(CachedBalance {
                    balance: touched.balance,
                    last_seq,
                    dirty: false,
                });
            changed.balance = touched.balance;
            changed.last_seq = last_seq;
            changed.dirty |= moved;
            total_touched_before += u128::from(touched.balance_before_batch);
            total_touched_after += u128::from(touched.balance);
        }
        // Conservation: balances changed only by what the issuer paid out.
        let issued_before = meta_get(&self.tables.meta, META_ISSUED)?;
        assert_eq!(
            total_touched_after as i128 - total_touched_before as i128, // both below 2^64 * accounts
            i128::from(self.issued) - i128::from(issued_before),
            "commit {commit_seq}: balances moved by a different amount than the issuer paid out"
        );
        let mut run_next = meta_get(&self.tables.meta, META_TX_KEY_RUN_NEXT)?;
        let decided = self.decided.into_iter().collect();
        self.tables.key_index = self.tables.key_index.add(
            &mut self.tables.index,
            &mut run_next,
            commit_seq,
            decided,
        )?;
        // A block never spans two commits (see `journal`).
        self.tables.journal_writer.flush(&mut self.tables.journal)?;
        let balances_at = meta_get(&self.tables.meta, META_BALANCES_AT)?;
        if self.journal_next - balances_at >= balances::TAIL_ENTRIES_MAX
            || self.tables.dirty_accounts() >= balances::DIRTY_ACCOUNTS_MAX
        {
            self.tables.checkpoint()?;
            meta_put(&mut self.tables.meta, META_BALANCES_AT, self.journal_next)?;
        }
        let meta = &mut self.tables.meta;
        meta_put(meta, META_TX_KEY_RUN_NEXT, run_next)?;
        meta_put(meta, META_COMMIT_SEQ, commit_seq)?;
        meta_put(meta, META_JOURNAL_NEXT, self.journal_next)?;
        meta_put(meta, META_ACCOUNT_NEXT, self.account_next)?;
        meta_put(meta, META_ISSUED, self.issued)?;
        set_journal_head(meta, self.journal_head)?;
        Ok(())
    }
}

fn raft_state_of(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<(Option<LogId>, StoredMembership), StoreError> {
    let applied = raft_get(table, RAFT_APPLIED)?;
    let membership = raft_get(table, RAFT_MEMBERSHIP)?.unwrap_or_default();
    Ok((applied, membership))
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
