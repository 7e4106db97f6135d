//! Balances written behind: a commit keeps the balances it changed in
//! memory, and only a checkpoint writes them to the `balances` table.
//!
//! The journal is what makes this safe. Every entry that moves money records
//! each moved account's balance before it, so `balances` (exact as of journal
//! entry [`META_BALANCES_AT`]) plus the entries after it give every balance
//! exactly ([`balance_tail`]). A crash between checkpoints loses nothing: the
//! journal tail is in the same durable commits as everything else, and an
//! open replays it. Checkpoints are decided per ledger commit from the log
//! alone (how long the tail is, how many accounts it moved), so every
//! replica writes the same tables at the same commit and digests agree.
//!
//! Readers see balances through a [`BalancesView`] of their read
//! transaction (table under tail), or, for one account at a time (an
//! account actor starting), through the [`BalanceCache`] the writer
//! publishes after each commit.

use std::collections::HashMap;

use tapledger_protocol::{AccountId, Outcome};

use super::{
    BALANCES, JOURNAL, META, META_BALANCES_AT, META_JOURNAL_NEXT, Sealed, StoredEntry, balance_get,
    corrupted, decode, journal, meta_get,
};
use crate::error::{Damage, StoreError};
use crate::store::JournalEntry;
use redb::{ReadableTableMetadata, TableHandle};

/// A checkpoint is due once the journal tail holds this many entries...
#[cfg(not(test))]
pub(super) const TAIL_ENTRIES_MAX: u64 = 65_536;
/// ...or once this many accounts have balances not yet written: each is a
/// leaf page a checkpoint rewrites, held in memory until it commits (16,384
/// random accounts among 10 million dirty about 64 MiB).
#[cfg(not(test))]
pub(super) const DIRTY_ACCOUNTS_MAX: usize = 16_384;
// Small in unit tests, so that they checkpoint often.
#[cfg(test)]
pub(super) const TAIL_ENTRIES_MAX: u64 = 12;
#[cfg(test)]
pub(super) const DIRTY_ACCOUNTS_MAX: usize = 5;
/// Balances the cache keeps at most after a checkpoint (all of them clean
/// then, so it may drop them): about 12 MiB.
#[cfg(not(test))]
const CACHED_ACCOUNTS_MAX: usize = 1 << 18;
#[cfg(test)]
const CACHED_ACCOUNTS_MAX: usize = 3;

/// An account's balance and newest journal entry, as a commit left them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CachedBalance {
    pub(super) balance: u64,
    pub(super) last_seq: u64,
    /// Not yet written to the `balances` table.
    pub(super) dirty: bool,
}

/// The writer's balances as of commit `commit`: every balance changed since
/// the last checkpoint (`dirty`), and clean ones it has read, so that a
/// commit rarely reads the table.
#[derive(Debug, Default)]
pub(super) struct BalanceCache {
    /// `None` while a snapshot replaces the ledger: no reader matches it.
    pub(super) commit: Option<u64>,
    pub(super) entries: foldhash::HashMap<AccountId, (u64, u64)>,
    /// Accounts whose balance in `entries` is newer than the table's. Every
    /// one of them is in `entries`.
    pub(super) dirty: foldhash::HashSet<AccountId>,
    /// Why the journal tail could not be read, on a read-only store opened
    /// despite damage: every balance read fails with it (the table alone
    /// would give stale balances).
    pub(super) damage: Option<Damage>,
}

impl BalanceCache {
    /// The cache of a store as `read` sees it: the journal tail's balances,
    /// all dirty.
    pub(super) fn load(
        read: &redb::ReadTransaction,
        commit: u64,
    ) -> Result<BalanceCache, StoreError> {
        let entries: foldhash::HashMap<_, _> = balance_tail(read)?.into_iter().collect();
        let dirty = entries.keys().copied().collect();
        Ok(BalanceCache {
            commit: Some(commit),
            entries,
            dirty,
            damage: None,
        })
    }

    /// The cache of a read-only store whose journal tail is damaged.
    pub(super) fn damaged(error: &StoreError, commit: u64) -> BalanceCache {
        BalanceCache {
            commit: Some(commit),
            damage: Some(Damage::of(error, JOURNAL.name())),
            ..BalanceCache::default()
        }
    }

    /// Takes in what a commit changed; `checkpointed` when it wrote every
    /// dirty balance before those still marked dirty in `changed`.
    pub(super) fn publish(
        &mut self,
        changed: foldhash::HashMap<AccountId, CachedBalance>,
        checkpointed: bool,
        commit: u64,
    ) {
        if checkpointed {
            self.dirty.clear();
            // Trimmed only when the commit moves on: a reader of the commit
            // before the checkpoint must still find what its table lacks.
            if Some(commit) != self.commit && self.entries.len() > CACHED_ACCOUNTS_MAX {
                self.entries.clear();
            }
        }
        for (account, cached) in changed {
            self.entries
                .insert(account, (cached.balance, cached.last_seq));
            if cached.dirty {
                self.dirty.insert(account);
            }
        }
        self.commit = Some(commit);
    }
}

/// Every balance the journal moved after the last checkpoint, with its
/// newest entry: account → (balance, last_seq). Each entry records the
/// balances before it, so the tail alone gives them.
pub(super) fn balance_tail(
    read: &redb::ReadTransaction,
) -> Result<HashMap<AccountId, (u64, u64)>, StoreError> {
    let meta = read.open_table(META)?;
    let from = meta_get(&meta, META_BALANCES_AT)?;
    let to = meta_get(&meta, META_JOURNAL_NEXT)?;
    let journal = read.open_table(JOURNAL)?;
    let mut tail = HashMap::new();
    journal::for_each_entry(&journal, from, to, |record| {
        let seq = record.seq;
        let stored: StoredEntry = decode(record.encoded)?;
        let overflow = || corrupted(format!("journal {seq}: a balance after it overflows"));
        match stored.entry {
            JournalEntry::Funding(funding) => {
                let after = funding
                    .balance_before
                    .checked_add(funding.amount)
                    .ok_or_else(overflow)?;
                tail.insert(funding.account, (after, seq));
            }
            JournalEntry::Outcome(Outcome::Settled(settlement)) => {
                let amount = settlement.amount();
                let sender = settlement
                    .sender_balance_before
                    .checked_sub(amount)
                    .ok_or_else(overflow)?;
                let receiver = settlement
                    .receiver_balance_before
                    .checked_add(amount)
                    .ok_or_else(overflow)?;
                tail.insert(settlement.sender(), (sender, seq));
                tail.insert(settlement.receiver(), (receiver, seq));
            }
            JournalEntry::Outcome(Outcome::Rejected(_)) => {}
        }
        Ok(true)
    })?;
    Ok(tail)
}

/// Balances as one read transaction sees them: the table as the last
/// checkpoint wrote it, under the journal tail after it.
pub(super) struct BalancesView {
    pub(super) table: redb::ReadOnlyTable<u64, Sealed>,
    pub(super) tail: HashMap<AccountId, (u64, u64)>,
}

impl BalancesView {
    pub(super) fn open(read: &redb::ReadTransaction) -> Result<BalancesView, StoreError> {
        Ok(BalancesView {
            table: read.open_table(BALANCES)?,
            tail: balance_tail(read)?,
        })
    }

    /// An account's (balance, newest journal entry).
    pub(super) fn get(&self, account: AccountId) -> Result<Option<(u64, u64)>, StoreError> {
        match self.tail.get(&account) {
            Some(balance) => Ok(Some(*balance)),
            None => balance_get(&self.table, account),
        }
    }

    /// How many accounts have a balance: the table's, plus those opened
    /// since the checkpoint.
    pub(super) fn len(&self) -> Result<u64, StoreError> {
        let mut len = self.table.len()?;
        for account in self.tail.keys() {
            if self.table.get(*account)?.is_none() {
                len += 1;
            }
        }
        Ok(len)
    }
}
