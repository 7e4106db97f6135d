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
use std::time::Duration;

use tapledger_actors::{
    AuditReport, FundingKind, JournalEntry, Ledger, LedgerConfig, LedgerError, LogStore, ReplicaId,
    ReplicaInfo, ReplicaStatus, StorageIo, Store, StoreError,
};
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

/// Opens the ledger `restore` or `reset` is about to replace: for writing,
/// or read-only when it fails its integrity check (a damaged ledger is
/// exactly what these commands are for).
pub fn open_to_replace(path: &Path) -> Result<Store, OpenError> {
    match open_existing(path) {
        Err(OpenError::Store { source, .. }) if tapledger_actors::store::is_damage(&source) => {
            open_read_only(path)
        }
        other => other,
    }
}

/// Opens an existing tapledger ledger read-only: nothing is ever written to
/// the file, not even the marks an open for writing leaves, so a backup
/// hashes the same before and after it is read (audit, export, accounts,
/// status).
pub fn open_read_only(path: &Path) -> Result<Store, OpenError> {
    check_redb_file(path)?;
    let shown = path.display().to_string();
    match Store::open_read_only(path) {
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
        let accounts = tapledger_actors::accounts_named(&report.problems);
        if !accounts.is_empty() {
            let list: Vec<String> = accounts.iter().map(u64::to_string).collect();
            let _ = writeln!(text, "accounts involved: {}", list.join(", "));
        }
    }
    text
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
    #[error(
        "{0} is one replica of a cluster of several; restore and reset work on a cluster of one. Remove it from the cluster (`tapledger-node cluster remove`) and initialise it again, or restore every replica from one backup by re-initialising them as a new cluster"
    )]
    Clustered(String),
}

/// The Raft side of the ledger at `ledger`: its log (opened), the snapshot
/// directory, and this replica's recorded id and info. Refuses a replica
/// whose cluster has other members.
fn single_replica_log(
    ledger: &Path,
    store: &Store,
) -> Result<(LogStore, PathBuf, ReplicaId, ReplicaInfo), RestoreError> {
    let config = LedgerConfig::new(ledger);
    let log = LogStore::open(&config.log_path, StorageIo::Blocking)?;
    let (id, info) = log.identity()?.unwrap_or((1, ReplicaInfo::default()));
    let (_, membership) = store.raft_state()?;
    let others = membership
        .membership()
        .nodes()
        .map(|(node, _)| *node)
        .chain(log.known()?.into_keys())
        .chain(log.bootstrap()?.unwrap_or_default().into_keys())
        .any(|node| node != id);
    if others {
        return Err(RestoreError::Clustered(ledger.display().to_string()));
    }
    Ok((log, config.snapshot_dir, id, info))
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Moves `path` (a file or directory) aside to `<path>.before-<what>-<secs>`.
fn move_aside(path: &Path, what: &str) -> Result<Option<PathBuf>, RestoreError> {
    if !path.exists() {
        return Ok(None);
    }
    let aside = PathBuf::from(format!(
        "{}.before-{what}-{}",
        path.display(),
        unix_seconds()
    ));
    std::fs::rename(path, &aside).map_err(|source| RestoreError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Some(aside))
}

/// Puts a backup in place as the ledger at `ledger`: audits the backup,
/// moves the current ledger (if any) aside to `<ledger>.before-restore-<unix
/// seconds>` (and its snapshots), writes a fresh consistent copy of the
/// backup in its place and audits that. The Raft history starts again from
/// the backup's state, as a cluster of this one replica. Refuses while a
/// node holds the current ledger, and on a replica of a larger cluster.
pub fn restore(backup: &Path, ledger: &Path) -> Result<Restored, RestoreError> {
    let source = open_existing(backup).map_err(RestoreError::Backup)?;
    let report = source.audit()?;
    if !report.is_ok() {
        return Err(RestoreError::BackupFailsAudit(audit_text(&report)));
    }
    let previous = match open_to_replace(ledger) {
        Ok(current) => {
            let (log, snapshots, _, _) = single_replica_log(ledger, &current)?;
            drop((current, log));
            move_aside(&snapshots, "restore")?;
            move_aside(ledger, "restore")?
        }
        Err(OpenError::Missing(_)) => None,
        Err(error) => return Err(RestoreError::Current(error)),
    };
    source.backup(ledger)?;
    drop(source);
    let restored = open_existing(ledger).map_err(RestoreError::Current)?;
    let (log, _, id, info) =
        single_replica_log(ledger, &restored).or_else(|error| match error {
            // The backup came from a larger cluster: this replica goes on alone.
            RestoreError::Clustered(_) => {
                let log = LogStore::open(&LedgerConfig::new(ledger).log_path, StorageIo::Blocking)?;
                let (id, info) = log.identity()?.unwrap_or((1, ReplicaInfo::default()));
                Ok((log, PathBuf::new(), id, info))
            }
            error => Err(error),
        })?;
    restored.set_membership(tapledger_actors::raft::Membership::new(
        vec![[id].into()],
        std::collections::BTreeMap::from([(id, info)]),
    ))?;
    match restored.raft_state()?.0 {
        Some(applied) => log.begin_after(applied, id)?,
        None => log.forget_history()?,
    }
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

/// Replaces the ledger at `path` with an empty one and forgets its Raft
/// history and snapshots (keeping what `init` recorded). The caller has
/// checked with [`open_existing`] that it is an unlocked tapledger ledger
/// (and asked for confirmation); the check is repeated here just before
/// deleting. Refuses a replica of a larger cluster: it would forget its
/// votes, which Raft's safety rests on.
pub fn reset(path: &Path) -> Result<(), RestoreError> {
    let store = open_to_replace(path).map_err(RestoreError::Current)?;
    let (log, snapshots, _, _) = single_replica_log(path, &store)?;
    drop(store);
    std::fs::remove_file(path).map_err(|source| RestoreError::Io {
        path: path.display().to_string(),
        source,
    })?;
    log.forget_history()?;
    if snapshots.exists() {
        std::fs::remove_dir_all(&snapshots).map_err(|source| RestoreError::Io {
            path: snapshots.display().to_string(),
            source,
        })?;
    }
    drop(Store::open(path)?);
    Ok(())
}

/// `tapledger-node status`: where this replica stands in its cluster.
pub fn status_text(status: &ReplicaStatus) -> String {
    let index = |index: Option<u64>| index.map_or("-".to_string(), |index| index.to_string());
    let mut text = String::new();
    let serving = if status.serving {
        "takes writes"
    } else {
        "takes no writes"
    };
    let _ = writeln!(
        text,
        "replica     {}\nrole        {} ({serving})\nterm        {}\nleader      {}",
        status.id,
        status.role,
        status.term,
        status
            .leader
            .map_or("none known".to_string(), |leader| leader.to_string())
    );
    let _ = writeln!(
        text,
        "last log    {}\ncommitted   {}\napplied     {}\nsnapshot    {}\npurged      {}",
        index(status.last_log_index),
        index(status.committed_index),
        index(status.applied_index),
        index(status.snapshot_index),
        index(status.purged_index),
    );
    let ids = |ids: &[ReplicaId]| {
        if ids.is_empty() {
            "none".to_string()
        } else {
            ids.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let _ = writeln!(
        text,
        "voters      {}\nlearners    {}",
        ids(&status.voters),
        ids(&status.learners)
    );
    for follower in &status.followers {
        let _ = writeln!(
            text,
            "follower {:<3} replicated to {}, {} behind",
            follower.id,
            index(follower.matched_index),
            follower.lag
        );
    }
    if let Some(failure) = &status.failure {
        let _ = writeln!(text, "FAILED: replication stopped: {failure}");
    }
    text
}

/// How long `cluster add` waits for the new replica to catch up with the
/// leader before making it a voter. Past this it stays a learner (it goes
/// on receiving the log), and `cluster add` can be run again.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// `tapledger-node cluster add|remove`, run by the leader's HTTP server:
/// `add` takes `ID CLIENT_ADDR PEER_ADDR FINGERPRINT`, adds the replica as
/// a learner, waits (at most [`CATCH_UP_WAIT`]) until it has replicated
/// everything the leader's log held once it was added, then makes it a
/// voter; `remove` takes `ID` and removes it, voter or learner, from the
/// cluster.
pub async fn change_cluster(
    ledger: &Ledger,
    path: &str,
    body: &str,
) -> Result<String, (hyper::StatusCode, String)> {
    use hyper::StatusCode;
    let bad = |why: String| (StatusCode::BAD_REQUEST, format!("{why}\n"));
    let refused = |error: LedgerError| match error {
        LedgerError::NotLeader(_) => (StatusCode::CONFLICT, format!("{error}\n")),
        LedgerError::Membership(_) => (StatusCode::BAD_REQUEST, format!("{error}\n")),
        error => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
    };
    let words: Vec<&str> = body.split_whitespace().collect();
    let status = ledger.status();
    let mut voters: std::collections::BTreeSet<ReplicaId> = status.voters.iter().copied().collect();
    if path.ends_with("/add") {
        let [id, client_addr, peer_addr, fingerprint] = words[..] else {
            return Err(bad("expected: ID CLIENT_ADDR PEER_ADDR FINGERPRINT".into()));
        };
        let id: ReplicaId = id
            .parse()
            .map_err(|_| bad(format!("{id:?} is not a replica id")))?;
        let fingerprint = tapledger_certs::Fingerprint::parse(fingerprint)
            .map_err(|error| bad(error.to_string()))?;
        let info = ReplicaInfo {
            client_addr: client_addr.to_string(),
            peer_addr: peer_addr.to_string(),
            fingerprint: fingerprint.to_string(),
        };
        // openraft's own wait for the learner counts it caught up while it is
        // within `replication_lag_threshold` (5000) entries of the leader,
        // even if it has received nothing, and otherwise waits without
        // limit: bound it, then wait for the learner's real progress.
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        match tokio::time::timeout_at(deadline, ledger.add_learner(id, info)).await {
            Ok(added) => added.map_err(refused)?,
            Err(_) => return Err(not_caught_up(id, None, ledger.status().last_log_index)),
        }
        wait_caught_up(ledger, id, deadline).await?;
        voters.insert(id);
        ledger
            .change_voters(voters.clone(), true)
            .await
            .map_err(refused)?;
        Ok(format!(
            "replica {id} added; voters now {}\n",
            voters
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    } else {
        let [id] = words[..] else {
            return Err(bad("expected: ID".into()));
        };
        let id: ReplicaId = id
            .parse()
            .map_err(|_| bad(format!("{id:?} is not a replica id")))?;
        let voter = voters.remove(&id);
        if !voter && !status.learners.contains(&id) {
            return Err(bad(format!("replica {id} is not in the cluster")));
        }
        if voters.is_empty() {
            return Err(bad("the last voter cannot be removed".into()));
        }
        if voter {
            ledger
                .change_voters(voters.clone(), false)
                .await
                .map_err(refused)?;
        } else {
            // A learner (say, one added that never caught up): changing the
            // voters would keep it, since only removed voters are dropped.
            remove_learner(ledger, id).await.map_err(refused)?;
        }
        Ok(format!(
            "replica {id} removed; voters now {}\n",
            voters
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// Waits until learner `id` has replicated everything this leader's log
/// holds now, until `deadline` at most.
async fn wait_caught_up(
    ledger: &Ledger,
    id: ReplicaId,
    deadline: tokio::time::Instant,
) -> Result<(), (hyper::StatusCode, String)> {
    use hyper::StatusCode;
    let mut metrics = ledger.raft().metrics();
    let target = ledger.status().last_log_index;
    loop {
        metrics.borrow_and_update();
        let status = ledger.status();
        if status.role != "leader" {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "this replica stopped leading while replica {id} caught up; it is a learner: run `cluster add` again against the leader\n"
                ),
            ));
        }
        if !status.voters.contains(&id) && !status.learners.contains(&id) {
            return Err((
                StatusCode::CONFLICT,
                format!("replica {id} was removed from the cluster while it caught up\n"),
            ));
        }
        let matched = status
            .followers
            .iter()
            .find(|follower| follower.id == id)
            .and_then(|follower| follower.matched_index);
        if matched >= target {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "replication stopped on this replica\n".into(),
                ));
            }
            Err(_) => return Err(not_caught_up(id, matched, target)),
        }
    }
}

fn not_caught_up(
    id: ReplicaId,
    matched: Option<u64>,
    target: Option<u64>,
) -> (hyper::StatusCode, String) {
    let index = |index: Option<u64>| index.map_or("-".to_string(), |index| index.to_string());
    (
        hyper::StatusCode::GATEWAY_TIMEOUT,
        format!(
            "replica {id} did not catch up within {}s (replicated to {}, the leader's log was at {}), so it was not made a voter; a replica that was not one stays a learner, receiving the log. Check that it runs, that the leader reaches it at its peer address, that --cert is its certificate and that it was initialised with --peer for every replica; then run `cluster add` again, or take it out with `cluster remove --id {id}`\n",
            CATCH_UP_WAIT.as_secs(),
            index(matched),
            index(target)
        ),
    )
}

/// Removes learner `id` from the cluster.
async fn remove_learner(ledger: &Ledger, id: ReplicaId) -> Result<(), LedgerError> {
    use openraft::error::{ClientWriteError, RaftError};
    ledger
        .raft()
        .change_membership(
            openraft::ChangeMembers::RemoveNodes([id].into_iter().collect()),
            false,
        )
        .await
        .map(|_| ())
        .map_err(|error| match error {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                LedgerError::NotLeader(ledger.leader_hint())
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
                LedgerError::Membership(error.to_string())
            }
            RaftError::Fatal(fatal) => LedgerError::Replication(fatal.to_string()),
        })
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
