//! redb persistence: the source of truth for accounts, balances, pending
//! halves, outcomes and the journal every balance is audited against.
//!
//! Writes happen only in [`Store::commit_batch`], which applies a whole group
//! of intents in one write transaction at `Durability::Immediate`: one fsync
//! for many settlements. It re-checks, inside the transaction, that a key has
//! no outcome yet, so storage has the last word on "a `tx_key` never settles
//! twice" whatever the actors believed. Reads use snapshots and never block
//! the writer.
//!
//! This module knows nothing of actors or channels; `committer` drives it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use serde::{Deserialize, Serialize};
use tapledger_protocol::{
    AccountId, ISSUER_ACCOUNT_ID, Outcome, Rejection, Settlement, Timestamp, TxKey,
};

use crate::core::matching::{Committed, Decision, PendingHalf};
use crate::error::StoreError;

/// Version of the table layout below. Opening a file of another version fails.
pub const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Account id -> [`AccountRecord`] (MessagePack). Never changes after opening.
const ACCOUNTS: TableDefinition<u64, &[u8]> = TableDefinition::new("accounts");
/// Account id -> (committed balance in minor units, journal sequence of the
/// newest entry that moved it). The issuer is not here: its balance is
/// `-issued`. The sequence heads the account's history: every journal entry
/// links to the previous entry of each account it moves, so history costs no
/// index writes per settlement.
const BALANCES: TableDefinition<u64, (u64, u64)> = TableDefinition::new("balances");
/// Journal sequence -> [`StoredEntry`] (MessagePack), in commit order.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// `tx_key` -> journal sequence of its one final outcome.
const TX_KEYS: TableDefinition<u128, u64> = TableDefinition::new("tx_keys");
/// `tx_key` -> the lone [`PendingHalf`] waiting for its partner (MessagePack).
const PENDING: TableDefinition<u128, &[u8]> = TableDefinition::new("pending");

const META_SCHEMA_VERSION: &str = "schema_version";
/// Number of write transactions committed so far.
const META_COMMIT_SEQ: &str = "commit_seq";
const META_JOURNAL_NEXT: &str = "journal_next";
const META_ACCOUNT_NEXT: &str = "account_next";
/// Total the issuer has paid out: sum of all user balances.
const META_ISSUED: &str = "issued";

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
#[derive(Clone, Debug, PartialEq, Eq)]
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
        match self {
            JournalEntry::Funding(funding) => vec![funding.account],
            JournalEntry::Outcome(Outcome::Settled(settlement)) => {
                vec![settlement.sender(), settlement.receiver()]
            }
            JournalEntry::Outcome(Outcome::Rejected(_)) => Vec::new(),
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
    entry: &'a JournalEntry,
    previous: &'a [Option<u64>],
}

/// One thing to make durable in the next commit.
#[derive(Clone, Debug)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Matched(Committed),
    AccountOpened(AccountId),
    ToppedUp {
        balance: u64,
    },
    /// Refused without changing anything (e.g. a top-up that would overflow).
    Invalid(String),
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
    pub problems: Vec<String>,
}

impl AuditReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The ledger's redb file.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(rmp_serde::to_vec(value)?)
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

impl Store {
    /// Opens the ledger at `path`, creating the file and its tables if needed.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::builder().create(path)?;
        Store::init(db)
    }

    /// Opens a ledger on a custom storage backend (tests inject faults this way).
    pub fn open_with_backend(backend: impl redb::StorageBackend) -> Result<Store, StoreError> {
        let db = Database::builder().create_with_backend(backend)?;
        Store::init(db)
    }

    fn init(db: Database) -> Result<Store, StoreError> {
        {
            let read = db.begin_read()?;
            let tables: Vec<String> = read
                .list_tables()?
                .map(|handle| handle.name().to_string())
                .collect();
            if !tables.is_empty() {
                if !tables.iter().any(|name| name == "meta") {
                    return Err(StoreError::NotALedger);
                }
                let meta = read.open_table(META)?;
                let found = meta
                    .get(META_SCHEMA_VERSION)?
                    .map(|guard| guard.value())
                    .ok_or(StoreError::NotALedger)?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::SchemaVersion {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
                return Ok(Store { db });
            }
        }
        let write = db.begin_write()?;
        {
            let mut meta = write.open_table(META)?;
            meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION)?;
            meta.insert(META_COMMIT_SEQ, 0)?;
            meta.insert(META_JOURNAL_NEXT, 0)?;
            meta.insert(META_ACCOUNT_NEXT, 1)?;
            meta.insert(META_ISSUED, 0)?;
            write.open_table(ACCOUNTS)?;
            write.open_table(BALANCES)?;
            write.open_table(JOURNAL)?;
            write.open_table(TX_KEYS)?;
            write.open_table(PENDING)?;
        }
        write.commit()?;
        Ok(Store { db })
    }

    /// Applies `intents` in order in one durable write transaction and returns
    /// the commit's sequence number with one result per intent. If the commit
    /// fails nothing of it is visible and the caller must fail every intent.
    pub fn commit_batch(
        &self,
        now: Timestamp,
        intents: &[Intent],
    ) -> Result<(u64, Vec<Applied>), StoreError> {
        let mut write = self.db.begin_write()?;
        write.set_durability(redb::Durability::Immediate)?;
        let mut applied = Vec::with_capacity(intents.len());
        let commit_seq;
        {
            let mut batch = Batch {
                now,
                meta: write.open_table(META)?,
                accounts: write.open_table(ACCOUNTS)?,
                balances: write.open_table(BALANCES)?,
                journal: write.open_table(JOURNAL)?,
                tx_keys: write.open_table(TX_KEYS)?,
                pending: write.open_table(PENDING)?,
                touched: HashMap::new(),
                decided_in_batch: HashSet::new(),
                skipped_pending: HashSet::new(),
                journal_next: 0,
                account_next: 0,
                issued: 0,
            };
            batch.journal_next = batch.meta_value(META_JOURNAL_NEXT)?;
            batch.account_next = batch.meta_value(META_ACCOUNT_NEXT)?;
            batch.issued = batch.meta_value(META_ISSUED)?;
            commit_seq = batch.meta_value(META_COMMIT_SEQ)? + 1;
            // Halves that meet their partner inside this batch need never be
            // written as pending.
            for intent in intents {
                if let Intent::Decide(decision) = intent {
                    batch.decided_in_batch.insert(decision.tx_key());
                }
            }
            for intent in intents {
                applied.push(batch.apply(intent)?);
            }
            batch.finish(commit_seq)?;
        }
        write.commit()?;
        Ok((commit_seq, applied))
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
        let read = self.db.begin_read()?;
        let tx_keys = read.open_table(TX_KEYS)?;
        let journal = read.open_table(JOURNAL)?;
        let Some(seq) = tx_keys.get(tx_key.as_u128())?.map(|guard| guard.value()) else {
            return Ok(None);
        };
        Ok(Some(outcome_at(&journal, seq)?))
    }

    /// The lone half waiting under `tx_key`, if any.
    pub fn pending(&self, tx_key: TxKey) -> Result<Option<PendingHalf>, StoreError> {
        let read = self.db.begin_read()?;
        let pending = read.open_table(PENDING)?;
        pending
            .get(tx_key.as_u128())?
            .map(|guard| decode(guard.value()))
            .transpose()
    }

    /// Every lone half waiting for its partner.
    pub fn all_pending(&self) -> Result<Vec<PendingHalf>, StoreError> {
        let read = self.db.begin_read()?;
        let pending = read.open_table(PENDING)?;
        pending.iter()?.map(|row| decode(row?.1.value())).collect()
    }

    /// The committed balance of `account` and the commit sequence of the
    /// snapshot it was read from. The issuer (id 0) has no balance here.
    pub fn balance_at_commit(&self, account: AccountId) -> Result<Option<(u64, u64)>, StoreError> {
        let read = self.db.begin_read()?;
        let meta = read.open_table(META)?;
        let balances = read.open_table(BALANCES)?;
        let Some((balance, _)) = balances.get(account)?.map(|guard| guard.value()) else {
            return Ok(None);
        };
        Ok(Some((balance, meta_get(&meta, META_COMMIT_SEQ)?)))
    }

    pub fn balance(&self, account: AccountId) -> Result<Option<u64>, StoreError> {
        Ok(self.balance_at_commit(account)?.map(|(balance, _)| balance))
    }

    pub fn account(&self, account: AccountId) -> Result<Option<AccountRecord>, StoreError> {
        let read = self.db.begin_read()?;
        let accounts = read.open_table(ACCOUNTS)?;
        accounts
            .get(account)?
            .map(|guard| decode(guard.value()))
            .transpose()
    }

    /// Every account with its balance, in id order.
    pub fn accounts(&self) -> Result<Vec<(AccountRecord, u64)>, StoreError> {
        let read = self.db.begin_read()?;
        let accounts = read.open_table(ACCOUNTS)?;
        let balances = read.open_table(BALANCES)?;
        accounts
            .iter()?
            .map(|row| {
                let (id, record) = row?;
                let balance = balances
                    .get(id.value())?
                    .map(|guard| guard.value().0)
                    .unwrap_or(0);
                Ok((decode(record.value())?, balance))
            })
            .collect()
    }

    /// Every journal entry that moved `account`'s money, oldest first.
    pub fn history(&self, account: AccountId) -> Result<Vec<(u64, JournalEntry)>, StoreError> {
        let read = self.db.begin_read()?;
        let balances = read.open_table(BALANCES)?;
        let journal = read.open_table(JOURNAL)?;
        let mut entries = Vec::new();
        let mut next = balances.get(account)?.map(|guard| guard.value().1);
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
        journal
            .range(from..)?
            .take(limit)
            .map(|row| {
                let (seq, bytes) = row?;
                Ok((seq.value(), decode::<StoredEntry>(bytes.value())?.entry))
            })
            .collect()
    }

    /// Checks the books on one consistent snapshot: every balance equals its
    /// funding plus credits minus debits in journal order and never went below
    /// zero; balances sum to what the issuer paid out; every `tx_key` has
    /// exactly one outcome and no pending half shadows one.
    pub fn audit(&self) -> Result<AuditReport, StoreError> {
        let read = self.db.begin_read()?;
        let meta = read.open_table(META)?;
        let accounts = read.open_table(ACCOUNTS)?;
        let balances = read.open_table(BALANCES)?;
        let journal = read.open_table(JOURNAL)?;
        let tx_keys = read.open_table(TX_KEYS)?;
        let pending = read.open_table(PENDING)?;

        let mut report = AuditReport {
            issued: meta_get(&meta, META_ISSUED)?,
            ..AuditReport::default()
        };
        let account_next: u64 = meta_get(&meta, META_ACCOUNT_NEXT)?;
        let mut running: HashMap<AccountId, u64> = HashMap::new();
        let mut funded_total: u128 = 0;
        let mut outcome_keys: HashSet<u128> = HashSet::new();
        // Each account's newest entry so far, to check the history links.
        let mut last_seq: HashMap<AccountId, u64> = HashMap::new();

        for row in journal.iter()? {
            let (seq, bytes) = row?;
            let seq = seq.value();
            report.journal_entries += 1;
            let StoredEntry { entry, previous } = decode(bytes.value())?;
            let moved = entry.moved_accounts();
            if previous.len() != moved.len() {
                report.problems.push(format!(
                    "journal {seq}: {} history links for {} accounts",
                    previous.len(),
                    moved.len()
                ));
            }
            for (account, link) in moved.iter().zip(&previous) {
                let expected = last_seq.insert(*account, seq);
                if *link != expected {
                    report.problems.push(format!(
                        "journal {seq}: history of account {account} links to {link:?}, expected {expected:?}"
                    ));
                }
            }
            match entry {
                JournalEntry::Funding(funding) => {
                    report.fundings += 1;
                    funded_total += u128::from(funding.amount);
                    let balance = running.entry(funding.account).or_insert(0);
                    if *balance != funding.balance_before {
                        report.problems.push(format!(
                            "journal {seq}: funding of account {} records balance before {} but history gives {}",
                            funding.account, funding.balance_before, balance
                        ));
                    }
                    match balance.checked_add(funding.amount) {
                        Some(next) => *balance = next,
                        None => report.problems.push(format!(
                            "journal {seq}: account {} overflows",
                            funding.account
                        )),
                    }
                }
                JournalEntry::Outcome(outcome) => {
                    let key = outcome.tx_key().as_u128();
                    if !outcome_keys.insert(key) {
                        report.problems.push(format!(
                            "journal {seq}: tx_key {} has a second outcome",
                            outcome.tx_key()
                        ));
                    }
                    match tx_keys.get(key)?.map(|guard| guard.value()) {
                        Some(indexed) if indexed == seq => {}
                        other => report.problems.push(format!(
                            "journal {seq}: tx_key {} indexed at {other:?}",
                            outcome.tx_key()
                        )),
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

        for row in accounts.iter()? {
            let (id, _) = row?;
            let id = id.value();
            report.accounts += 1;
            if id == ISSUER_ACCOUNT_ID || id >= account_next {
                report.problems.push(format!(
                    "account {id} is outside the assigned range 1..{account_next}"
                ));
            }
            let stored = balances.get(id)?.map(|guard| guard.value());
            if let Some((_, head)) = stored
                && last_seq.get(&id) != Some(&head)
            {
                report.problems.push(format!(
                    "account {id}: history starts at journal {head} but its newest entry is {:?}",
                    last_seq.get(&id)
                ));
            }
            let expected = running.get(&id).copied().unwrap_or(0);
            match stored.map(|(balance, _)| balance) {
                None => report.problems.push(format!("account {id} has no balance")),
                Some(stored) if stored != expected => report.problems.push(format!(
                    "account {id}: balance {stored} but its history gives {expected}"
                )),
                Some(stored) => report.user_balances_total += u128::from(stored),
            }
        }
        if balances.len()? != report.accounts {
            report.problems.push(format!(
                "{} balances for {} accounts",
                balances.len()?,
                report.accounts
            ));
        }
        if report.accounts + 1 != account_next {
            report.problems.push(format!(
                "{} accounts but ids run to {}",
                report.accounts,
                account_next - 1
            ));
        }
        if report.user_balances_total != u128::from(report.issued) {
            report.problems.push(format!(
                "user balances sum to {} but the issuer paid out {} (books do not sum to zero)",
                report.user_balances_total, report.issued
            ));
        }
        if funded_total != u128::from(report.issued) {
            report.problems.push(format!(
                "fundings total {funded_total} but issued is {}",
                report.issued
            ));
        }
        if tx_keys.len()? != outcome_keys.len() as u64 {
            report.problems.push(format!(
                "{} tx_keys indexed for {} outcomes",
                tx_keys.len()?,
                outcome_keys.len()
            ));
        }
        for row in pending.iter()? {
            let (key, _) = row?;
            report.pending_halves += 1;
            if outcome_keys.contains(&key.value()) {
                report.problems.push(format!(
                    "tx_key {} is pending and final",
                    TxKey::from_u128(key.value())
                ));
            }
        }
        Ok(report)
    }

    /// Writes a consistent copy of the ledger, from one read snapshot, to a new
    /// file at `to`. An existing file is never overwritten.
    pub fn backup(&self, to: &Path) -> Result<(), StoreError> {
        if to.exists() {
            return Err(StoreError::TargetExists(to.display().to_string()));
        }
        let read = self.db.begin_read()?;
        let copy = Database::builder().create(to)?;
        let write = copy.begin_write()?;
        {
            copy_table(&read, &write, META)?;
            copy_table(&read, &write, ACCOUNTS)?;
            copy_table(&read, &write, BALANCES)?;
            copy_table(&read, &write, JOURNAL)?;
            copy_table(&read, &write, TX_KEYS)?;
            copy_table(&read, &write, PENDING)?;
        }
        write.commit()?;
        Ok(())
    }
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

fn audit_settlement(
    seq: u64,
    settlement: &Settlement,
    running: &mut HashMap<AccountId, u64>,
    problems: &mut Vec<String>,
) {
    let (sender, receiver, amount) = (
        settlement.sender(),
        settlement.receiver(),
        settlement.amount(),
    );
    if sender == receiver {
        problems.push(format!("journal {seq}: account {sender} paid itself"));
    }
    if amount == 0 {
        problems.push(format!("journal {seq}: settlement of zero"));
    }
    let sender_balance = running.entry(sender).or_insert(0);
    if *sender_balance != settlement.sender_balance_before {
        problems.push(format!(
            "journal {seq}: sender {sender} balance before recorded {} but history gives {}",
            settlement.sender_balance_before, sender_balance
        ));
    }
    match sender_balance.checked_sub(amount) {
        Some(next) => *sender_balance = next,
        None => problems.push(format!(
            "journal {seq}: account {sender} overdrawn by paying {amount} from {sender_balance}"
        )),
    }
    let receiver_balance = running.entry(receiver).or_insert(0);
    if *receiver_balance != settlement.receiver_balance_before {
        problems.push(format!(
            "journal {seq}: receiver {receiver} balance before recorded {} but history gives {}",
            settlement.receiver_balance_before, receiver_balance
        ));
    }
    match receiver_balance.checked_add(amount) {
        Some(next) => *receiver_balance = next,
        None => problems.push(format!("journal {seq}: account {receiver} overflows")),
    }
}

fn corrupted(message: String) -> StoreError {
    StoreError::Redb(redb::Error::Corrupted(message))
}

fn meta_get(meta: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, StoreError> {
    meta.get(key)?
        .map(|guard| guard.value())
        .ok_or_else(|| corrupted(format!("meta value {key} missing")))
}

fn stored_at(
    journal: &impl ReadableTable<u64, &'static [u8]>,
    seq: u64,
) -> Result<StoredEntry, StoreError> {
    let bytes = journal
        .get(seq)?
        .ok_or_else(|| corrupted(format!("missing journal entry {seq}")))?;
    decode(bytes.value())
}

fn outcome_at(
    journal: &impl ReadableTable<u64, &'static [u8]>,
    seq: u64,
) -> Result<Outcome, StoreError> {
    match stored_at(journal, seq)?.entry {
        JournalEntry::Outcome(outcome) => Ok(outcome),
        JournalEntry::Funding(_) => {
            Err(corrupted(format!("tx_key index names funding entry {seq}")))
        }
    }
}

/// An account's balance and history head as a batch sees them.
#[derive(Clone, Copy)]
struct Touched {
    balance: u64,
    /// Balance when the batch first read it (0 for an account opened in it).
    balance_before_batch: u64,
    /// Newest journal entry that moved it; `None` only while it is being opened.
    last_seq: Option<u64>,
}

/// The open tables and running counters of one write transaction.
struct Batch<'txn> {
    now: Timestamp,
    meta: redb::Table<'txn, &'static str, u64>,
    accounts: redb::Table<'txn, u64, &'static [u8]>,
    balances: redb::Table<'txn, u64, (u64, u64)>,
    journal: redb::Table<'txn, u64, &'static [u8]>,
    tx_keys: redb::Table<'txn, u128, u64>,
    pending: redb::Table<'txn, u128, &'static [u8]>,
    /// Balances read or changed in this batch, with each account's newest
    /// journal entry; written back once at the end.
    touched: HashMap<AccountId, Touched>,
    /// Keys that reach a decision somewhere in this batch.
    decided_in_batch: HashSet<TxKey>,
    /// Lone halves of this batch not written because their key is decided in it.
    skipped_pending: HashSet<TxKey>,
    journal_next: u64,
    account_next: AccountId,
    issued: u64,
}

impl Batch<'_> {
    fn meta_value(&self, key: &str) -> Result<u64, StoreError> {
        meta_get(&self.meta, key)
    }

    fn balance(&mut self, account: AccountId) -> Result<Option<u64>, StoreError> {
        if let Some(touched) = self.touched.get(&account) {
            return Ok(Some(touched.balance));
        }
        let Some((balance, last_seq)) = self.balances.get(account)?.map(|guard| guard.value())
        else {
            return Ok(None);
        };
        self.touched.insert(
            account,
            Touched {
                balance,
                balance_before_batch: balance,
                last_seq: Some(last_seq),
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
    fn append(&mut self, entry: &JournalEntry) -> Result<u64, StoreError> {
        let seq = self.journal_next;
        self.journal_next += 1;
        let mut previous = Vec::with_capacity(2);
        for account in entry.moved_accounts() {
            let touched = self
                .touched
                .get_mut(&account)
                .expect("moved accounts were read first");
            previous.push(touched.last_seq.replace(seq));
        }
        let stored = StoredEntryRef {
            entry,
            previous: &previous,
        };
        self.journal.insert(seq, encode(&stored)?.as_slice())?;
        Ok(seq)
    }

    fn apply(&mut self, intent: &Intent) -> Result<Applied, StoreError> {
        match intent {
            Intent::StorePending(half) => self.store_pending(half).map(Applied::Matched),
            Intent::Decide(decision) => self.decide(decision).map(Applied::Matched),
            Intent::OpenAccount(new_account) => self.open_account(new_account),
            Intent::TopUp { account, amount } => self.top_up(*account, *amount),
            Intent::Barrier => Ok(Applied::Barrier),
        }
    }

    fn store_pending(&mut self, half: &PendingHalf) -> Result<Committed, StoreError> {
        let tx_key = half.tx_key();
        if self.decided_in_batch.contains(&tx_key) {
            self.skipped_pending.insert(tx_key);
            return Ok(Committed::PendingSkipped);
        }
        if let Some(seq) = self
            .tx_keys
            .get(tx_key.as_u128())?
            .map(|guard| guard.value())
        {
            return Ok(Committed::AlreadyFinal(Arc::new(outcome_at(
                &self.journal,
                seq,
            )?)));
        }
        let previous = self
            .pending
            .insert(tx_key.as_u128(), encode(half)?.as_slice())?;
        assert!(
            previous.is_none(),
            "tx_key {tx_key} stored as pending twice"
        );
        Ok(Committed::PendingStored)
    }

    fn decide(&mut self, decision: &Decision) -> Result<Committed, StoreError> {
        let tx_key = decision.tx_key();
        // Claim the key for the journal entry about to be appended; one B-tree
        // descent both checks and claims. An older outcome is put back.
        let seq = self.journal_next;
        let older = self
            .tx_keys
            .insert(tx_key.as_u128(), seq)?
            .map(|guard| guard.value());
        if let Some(older) = older {
            self.tx_keys.insert(tx_key.as_u128(), older)?;
            return Ok(Committed::AlreadyFinal(Arc::new(outcome_at(
                &self.journal,
                older,
            )?)));
        }
        let outcome = match decision {
            Decision::Settle { send, receive } => {
                let (sender, receiver, amount) = (
                    send.half.sender_id,
                    receive.half.receiver_id,
                    send.half.amount,
                );
                assert_ne!(
                    sender, receiver,
                    "settlement {tx_key}: account {sender} pays itself"
                );
                assert!(amount > 0, "settlement {tx_key}: zero amount");
                let sender_before = self
                    .balance(sender)?
                    .unwrap_or_else(|| panic!("settlement {tx_key}: unknown sender {sender}"));
                let receiver_before = self
                    .balance(receiver)?
                    .unwrap_or_else(|| panic!("settlement {tx_key}: unknown receiver {receiver}"));
                // The sender's account actor reserved the amount before this
                // decision was made, so storage must agree that it is there.
                let sender_after = sender_before.checked_sub(amount).unwrap_or_else(|| {
                    panic!("settlement {tx_key}: account {sender} reserved {amount} but has {sender_before}")
                });
                let receiver_after = receiver_before
                    .checked_add(amount)
                    .unwrap_or_else(|| panic!("settlement {tx_key}: account {receiver} overflows"));
                self.set_balance(sender, sender_after);
                self.set_balance(receiver, receiver_after);
                let settlement = Settlement {
                    send: send.clone(),
                    receive: receive.clone(),
                    sender_balance_before: sender_before,
                    receiver_balance_before: receiver_before,
                    settled_at: self.now,
                };
                Outcome::Settled(settlement)
            }
            Decision::Reject {
                tx_key,
                code,
                send,
                receive,
                sender_balance,
            } => {
                assert!(
                    code.is_payment_outcome(),
                    "rejection {tx_key} with half-only code {code}"
                );
                let rejection = Rejection {
                    tx_key: *tx_key,
                    code: *code,
                    send: send.clone(),
                    receive: receive.clone(),
                    sender_balance: *sender_balance,
                    decided_at: self.now,
                };
                Outcome::Rejected(rejection)
            }
        };
        let outcome = Arc::new(outcome);
        let appended = self.append(&JournalEntry::Outcome((*outcome).clone()))?;
        assert_eq!(
            appended, seq,
            "tx_key {tx_key} claimed the journal entry it got"
        );
        // A lone half skipped in this batch was never written: nothing to delete.
        if !self.skipped_pending.contains(&tx_key) {
            self.pending.remove(tx_key.as_u128())?;
        }
        Ok(Committed::Decided(outcome))
    }

    fn open_account(&mut self, new_account: &NewAccount) -> Result<Applied, StoreError> {
        let Some(issued) = self.issued.checked_add(new_account.opening_balance) else {
            return Ok(Applied::Invalid(
                "opening balance would overflow the issuer's total".into(),
            ));
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
        self.accounts.insert(id, encode(&record)?.as_slice())?;
        self.touched.insert(
            id,
            Touched {
                balance: new_account.opening_balance,
                balance_before_batch: 0,
                last_seq: None,
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
        self.append(&JournalEntry::Funding(funding))?;
        Ok(Applied::AccountOpened(id))
    }

    fn top_up(&mut self, account: AccountId, amount: u64) -> Result<Applied, StoreError> {
        if amount == 0 {
            return Ok(Applied::Invalid("a top-up must be at least 1".into()));
        }
        let Some(before) = self.balance(account)? else {
            return Ok(Applied::Invalid(format!(
                "account {account} does not exist"
            )));
        };
        let (Some(after), Some(issued)) =
            (before.checked_add(amount), self.issued.checked_add(amount))
        else {
            return Ok(Applied::Invalid("top-up would overflow".into()));
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
        self.append(&JournalEntry::Funding(funding))?;
        Ok(Applied::ToppedUp { balance: after })
    }

    fn finish(mut self, commit_seq: u64) -> Result<(), StoreError> {
        let mut total_touched_before: u128 = 0;
        let mut total_touched_after: u128 = 0;
        for (&account, touched) in &self.touched {
            let last_seq = touched.last_seq.unwrap_or_else(|| {
                panic!("commit {commit_seq}: account {account} has no journal entry")
            });
            self.balances.insert(account, (touched.balance, last_seq))?;
            total_touched_before += u128::from(touched.balance_before_batch);
            total_touched_after += u128::from(touched.balance);
        }
        // Conservation: balances changed only by what the issuer paid out.
        let issued_before = self.meta_value(META_ISSUED)?;
        assert_eq!(
            total_touched_after as i128 - total_touched_before as i128, // both below 2^64 * accounts
            i128::from(self.issued) - i128::from(issued_before),
            "commit {commit_seq}: balances moved by a different amount than the issuer paid out"
        );
        self.meta.insert(META_COMMIT_SEQ, commit_seq)?;
        self.meta.insert(META_JOURNAL_NEXT, self.journal_next)?;
        self.meta.insert(META_ACCOUNT_NEXT, self.account_next)?;
        self.meta.insert(META_ISSUED, self.issued)?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
