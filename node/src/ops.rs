//! The operator's offline commands on a ledger file: open it safely, audit
//! it, list accounts and history, back it up, restore a backup, reset it.
//!
//! redb locks the file while a node serves it, so these work on a stopped
//! node's file or a backup; `main` turns [`OpenError::Locked`] into a request
//! to the running node where one exists (backup, audit, top-up). Nothing here
//! deletes or replaces a file that is not a tapledger ledger.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use tapledger_actors::{AuditReport, FundingKind, JournalEntry, Store, StoreError};
use tapledger_protocol::{AccountId, Outcome};

use crate::export::format_time;

/// The first bytes of every redb file.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}: no ledger here (create one with `tapledger-node init`)")]
    Missing(String),
    #[error("{0}: not a redb file, so not a tapledger ledger; left untouched")]
    NotRedb(String),
    #[error("{0}: a redb file but not a tapledger ledger; left untouched")]
    NotALedger(String),
    #[error("{0}: locked by a running node (stop it, or use the commands that ask the node)")]
    Locked(String),
    #[error("{path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Checks that `path` starts like a redb file without opening it.
pub fn check_redb_file(path: &Path) -> Result<(), OpenError> {
    let shown = path.display().to_string();
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(OpenError::Missing(shown));
        }
        Err(source) => {
            return Err(OpenError::Io {
                path: shown,
                source,
            });
        }
    };
    if !file.metadata().map(|meta| meta.is_file()).unwrap_or(false) {
        return Err(OpenError::NotRedb(shown));
    }
    let mut head = [0u8; REDB_MAGIC.len()];
    match file.read_exact(&mut head) {
        Ok(()) if head == REDB_MAGIC => Ok(()),
        Ok(()) => Err(OpenError::NotRedb(shown)),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(OpenError::NotRedb(shown))
        }
        Err(source) => Err(OpenError::Io {
            path: shown,
            source,
        }),
    }
}

/// Checks, through a read-only open that writes nothing, that a redb file
/// holds tapledger's `meta` table. (Opening for writing marks the file even
/// when nothing is written, so this must come first.) A file that needs
/// crash recovery cannot be opened read-only; it passes here and
/// `Store::open` recovers it and checks its schema.
fn check_ledger_tables(path: &Path) -> Result<(), OpenError> {
    use redb::{ReadableDatabase, TableHandle};
    let shown = path.display().to_string();
    let database = match redb::ReadOnlyDatabase::open(path) {
        Ok(database) => database,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(OpenError::Locked(shown)),
        Err(_) => return Ok(()),
    };
    let has_meta = database
        .begin_read()
        .map_err(|error| OpenError::Store {
            path: shown.clone(),
            source: error.into(),
        })?
        .list_tables()
        .map_err(|error| OpenError::Store {
            path: shown.clone(),
            source: StoreError::Redb(error.into()),
        })?
        .any(|table| table.name() == "meta");
    if has_meta {
        Ok(())
    } else {
        Err(OpenError::NotALedger(shown))
    }
}

/// Opens an existing tapledger ledger. Never creates a file, and never
/// writes to a file that is not a tapledger ledger.
pub fn open_existing(path: &Path) -> Result<Store, OpenError> {
    check_redb_file(path)?;
    check_ledger_tables(path)?;
    let shown = path.display().to_string();
    match Store::open(path) {
        Ok(store) => Ok(store),
        Err(StoreError::NotALedger) => Err(OpenError::NotALedger(shown)),
        Err(StoreError::Redb(redb::Error::DatabaseAlreadyOpen)) => Err(OpenError::Locked(shown)),
        Err(source) => Err(OpenError::Store {
            path: shown,
            source,
        }),
    }
}

/// The audit report for people: totals, then every problem.
pub fn audit_text(report: &AuditReport) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "accounts          {}\njournal entries   {}\n  fundings        {}\n  settlements     {}\n  rejections      {}\npending halves    {}\nissued            {}\nuser balances     {}",
        report.accounts,
        report.journal_entries,
        report.fundings,
        report.settlements,
        report.rejections,
        report.pending_halves,
        report.issued,
        report.user_balances_total,
    );
    if report.is_ok() {
        let _ = writeln!(
            text,
            "OK: every balance matches its history, no balance is negative, and the books sum to zero"
        );
    } else {
        let _ = writeln!(text, "FAILED: {} problem(s)", report.problems.len());
        for problem in &report.problems {
            let _ = writeln!(text, "  - {problem}");
        }
        let accounts = accounts_named(&report.problems);
        if !accounts.is_empty() {
            let list: Vec<String> = accounts.iter().map(u64::to_string).collect();
            let _ = writeln!(text, "accounts involved: {}", list.join(", "));
        }
    }
    text
}

/// Account ids that audit problems name ("account 7", "sender 7", ...).
pub fn accounts_named(problems: &[String]) -> Vec<AccountId> {
    let mut accounts = std::collections::BTreeSet::new();
    for problem in problems {
        let words: Vec<&str> = problem.split_whitespace().collect();
        for pair in words.windows(2) {
            if matches!(pair[0], "account" | "sender" | "receiver")
                && let Ok(id) = pair[1].trim_end_matches([':', ',']).parse::<u64>()
            {
                accounts.insert(id);
            }
        }
    }
    accounts.into_iter().collect()
}

/// Every account as a table: id, type, bank, balance, opened.
pub fn accounts_text(store: &Store) -> Result<String, StoreError> {
    let mut text = format!(
        "{:>10}  {:<10}  {:<20}  {:>16}  {}\n",
        "id", "type", "bank", "balance", "opened"
    );
    for (record, balance) in store.accounts()? {
        let _ = writeln!(
            text,
            "{:>10}  {:<10}  {:<20}  {:>16}  {}",
            record.id,
            record.account_type,
            record.bank_name,
            balance,
            format_time(record.created_at)
        );
    }
    Ok(text)
}

/// One account's facts (not its key hash, which is nobody's business).
pub fn account_text(store: &Store, account: AccountId) -> Result<Option<String>, StoreError> {
    let Some(record) = store.account(account)? else {
        return Ok(None);
    };
    let balance = store.balance(account)?.unwrap_or(0);
    let history = store.history(account)?;
    Ok(Some(format!(
        "account   {}\ntype      {}\nbank      {}\nbalance   {}\nopened    {}\nentries   {}\napi key   registered (salt {} bytes, SHA3-512 hash)\n",
        record.id,
        record.account_type,
        record.bank_name,
        balance,
        format_time(record.created_at),
        history.len(),
        record.salt.len(),
    )))
}

/// Every entry that moved an account's money, oldest first, with the
/// running balance.
pub fn history_text(store: &Store, account: AccountId) -> Result<Option<String>, StoreError> {
    if store.account(account)?.is_none() {
        return Ok(None);
    }
    let mut text = format!(
        "{:>8}  {:<27}  {:<9}  {:>14}  {:>14}  {:<36}  {}\n",
        "seq", "at", "kind", "amount", "balance after", "tx_key", "counterparty"
    );
    for (seq, entry) in store.history(account)? {
        let (at, kind, signed, after, tx_key, counterparty) = match &entry {
            JournalEntry::Funding(funding) => (
                funding.at,
                match funding.kind {
                    FundingKind::Opening => "opening",
                    FundingKind::TopUp => "top-up",
                },
                format!("+{}", funding.amount),
                funding.balance_before.saturating_add(funding.amount),
                String::new(),
                "issuer".to_string(),
            ),
            JournalEntry::Outcome(Outcome::Settled(settlement))
                if settlement.sender() == account =>
            {
                (
                    settlement.settled_at,
                    "paid",
                    format!("-{}", settlement.amount()),
                    settlement
                        .sender_balance_before
                        .saturating_sub(settlement.amount()),
                    settlement.tx_key().to_string(),
                    settlement.receiver().to_string(),
                )
            }
            JournalEntry::Outcome(Outcome::Settled(settlement)) => (
                settlement.settled_at,
                "received",
                format!("+{}", settlement.amount()),
                settlement
                    .receiver_balance_before
                    .saturating_add(settlement.amount()),
                settlement.tx_key().to_string(),
                settlement.sender().to_string(),
            ),
            // Rejections move no money and are not in an account's history.
            JournalEntry::Outcome(Outcome::Rejected(_)) => continue,
        };
        let _ = writeln!(
            text,
            "{seq:>8}  {:<27}  {kind:<9}  {signed:>14}  {after:>14}  {tx_key:<36}  {counterparty}",
            format_time(at)
        );
    }
    Ok(Some(text))
}

/// `path` made absolute against the current directory, for requests to a
/// node whose working directory may differ.
pub fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    std::path::absolute(path)
}

/// What [`restore`] did.
#[derive(Debug)]
pub struct Restored {
    pub report: AuditReport,
    /// Where the ledger that was in place went, if there was one.
    pub previous: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("backup: {0}")]
    Backup(OpenError),
    #[error("the backup fails its audit; not restoring it:\n{0}")]
    BackupFailsAudit(String),
    #[error("current ledger: {0}")]
    Current(OpenError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Puts a backup in place as the ledger at `ledger`: audits the backup,
/// moves the current ledger (if any) aside to `<ledger>.before-restore-<unix
/// seconds>`, writes a fresh consistent copy of the backup in its place and
/// audits that. Refuses while a node holds the current ledger.
pub fn restore(backup: &Path, ledger: &Path) -> Result<Restored, RestoreError> {
    let source = open_existing(backup).map_err(RestoreError::Backup)?;
    let report = source.audit()?;
    if !report.is_ok() {
        return Err(RestoreError::BackupFailsAudit(audit_text(&report)));
    }
    let previous = match open_existing(ledger) {
        Ok(current) => {
            drop(current);
            let seconds = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or(0);
            let aside = PathBuf::from(format!("{}.before-restore-{seconds}", ledger.display()));
            std::fs::rename(ledger, &aside).map_err(|source| RestoreError::Io {
                path: ledger.display().to_string(),
                source,
            })?;
            Some(aside)
        }
        Err(OpenError::Missing(_)) => None,
        Err(error) => return Err(RestoreError::Current(error)),
    };
    source.backup(ledger)?;
    drop(source);
    let restored = open_existing(ledger).map_err(RestoreError::Current)?;
    let report = restored.audit()?;
    Ok(Restored { report, previous })
}

/// What a reset would remove, for the confirmation prompt.
pub fn describe_for_reset(store: &Store) -> Result<String, StoreError> {
    let counters = store.counters()?;
    let pending = store.all_pending()?.len();
    Ok(format!(
        "{} account(s), {} journal entries, {} pending half(s), {} issued",
        counters.account_next.saturating_sub(1),
        counters.journal_entries,
        pending,
        counters.issued
    ))
}

/// Replaces the ledger at `path` with an empty one. The caller has checked
/// with [`open_existing`] that it is an unlocked tapledger ledger (and
/// asked for confirmation); the check is repeated here just before deleting.
pub fn reset(path: &Path) -> Result<(), RestoreError> {
    drop(open_existing(path).map_err(RestoreError::Current)?);
    std::fs::remove_file(path).map_err(|source| RestoreError::Io {
        path: path.display().to_string(),
        source,
    })?;
    drop(Store::open(path)?);
    Ok(())
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
