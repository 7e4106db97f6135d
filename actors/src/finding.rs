//! What an audit finds ([`crate::Store::audit`]): one broken rule each,
//! naming the accounts, journal entries and keys it concerns as typed
//! fields, so an operator's tools list the accounts involved without reading
//! English.

use tapledger_protocol::{AccountId, TxKey};

/// Which party of a settlement a balance belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party {
    Sender,
    Receiver,
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Party::Sender => "sender",
            Party::Receiver => "receiver",
        })
    }
}

/// One broken rule of the books or of the file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Finding {
    // Damage: a record failed its checksum or could not be read.
    #[error("account {account}: its {table} record is damaged ({what})")]
    AccountDamaged {
        account: AccountId,
        table: String,
        what: String,
    },
    /// A block of the journal: `seq` is its first entry.
    #[error("journal {seq}: the block of entries from here is damaged ({what})")]
    JournalDamaged { seq: u64, what: String },
    #[error("{table} record {key} is damaged ({what})")]
    RecordDamaged {
        table: String,
        key: String,
        what: String,
    },
    /// The file itself (redb's structure, or a read that failed as a
    /// whole): the audit could not go on.
    #[error("{0}")]
    FileDamaged(String),
    /// The `tx_key` index's own structure (runs, chunks, fences).
    #[error("{0}")]
    Index(String),

    // The journal.
    #[error("journal {seq}: follows entry {after} (entries missing or renumbered)")]
    JournalGap { seq: u64, after: i128 },
    #[error(
        "journal {seq}: the hash chain breaks here (an entry before it was lost, replaced or reordered)"
    )]
    ChainBroken { seq: u64 },
    #[error("journal {seq}: the record cannot be decoded ({error})")]
    Undecodable { seq: u64, error: String },
    #[error("journal {seq}: {links} history links for {accounts} accounts")]
    LinkCount {
        seq: u64,
        links: usize,
        accounts: usize,
    },
    #[error("journal {seq}: history of account {account} links to {link:?}, expected {expected:?}")]
    HistoryLink {
        seq: u64,
        account: AccountId,
        link: Option<u64>,
        expected: Option<u64>,
    },
    #[error(
        "journal {seq}: funding of account {account} records balance before {recorded} but history gives {history}"
    )]
    FundingBalance {
        seq: u64,
        account: AccountId,
        recorded: u64,
        history: u64,
    },
    #[error("journal {seq}: account {account} overflows")]
    Overflow { seq: u64, account: AccountId },
    #[error("journal {seq}: tx_key {tx_key} has a second outcome")]
    SecondOutcome { seq: u64, tx_key: TxKey },
    #[error("journal {seq}: tx_key {tx_key} indexed at {indexed:?}")]
    IndexedElsewhere {
        seq: u64,
        tx_key: TxKey,
        indexed: Option<u64>,
    },
    #[error("journal {seq}: account {account} paid itself")]
    PaidItself { seq: u64, account: AccountId },
    #[error("journal {seq}: settlement of zero")]
    ZeroSettlement { seq: u64 },
    #[error(
        "journal {seq}: {party} {account} balance before recorded {recorded} but history gives {history}"
    )]
    SettlementBalance {
        seq: u64,
        party: Party,
        account: AccountId,
        recorded: u64,
        history: u64,
    },
    #[error("journal {seq}: account {account} overdrawn by paying {amount} from {balance}")]
    Overdrawn {
        seq: u64,
        account: AccountId,
        amount: u64,
        balance: u64,
    },
    #[error("the journal holds {held} entries but {written} were written")]
    JournalLength { held: u64, written: u64 },
    #[error(
        "journal: its newest entry is not the one last written (the newest entries were lost or replaced)"
    )]
    JournalHead,

    // Accounts and balances.
    #[error("account {account} is outside the assigned range 1..{next}")]
    OutOfRange { account: AccountId, next: AccountId },
    #[error(
        "account {account}: history starts at journal {head} but its newest entry is {newest:?}"
    )]
    HistoryHead {
        account: AccountId,
        head: u64,
        newest: Option<u64>,
    },
    #[error("account {0} has no balance")]
    NoBalance(AccountId),
    #[error("account {account}: balance {stored} but its history gives {history}")]
    Balance {
        account: AccountId,
        stored: u64,
        history: u64,
    },
    #[error("{balances} balances for {accounts} accounts")]
    BalanceCount { balances: u64, accounts: u64 },
    #[error("{accounts} accounts but ids run to {last}")]
    AccountCount { accounts: u64, last: u64 },
    #[error(
        "user balances sum to {total} but the issuer paid out {issued} (books do not sum to zero)"
    )]
    NotZeroSum { total: u128, issued: u64 },
    #[error("fundings total {funded} but issued is {issued}")]
    Funded { funded: u128, issued: u64 },

    // Keys.
    #[error("tx_key {0} is indexed twice")]
    IndexedTwice(TxKey),
    #[error("tx_key {0} is indexed but has no outcome in the journal")]
    IndexedWithoutOutcome(TxKey),
    #[error("tx_key {key}: the pending half stored under it is for {half}")]
    PendingMisfiled { key: TxKey, half: TxKey },
    #[error("tx_key {0} is pending and final")]
    PendingAndFinal(TxKey),
}

impl Finding {
    /// The account this finding is about, if it names one.
    pub fn account(&self) -> Option<AccountId> {
        match self {
            Finding::AccountDamaged { account, .. }
            | Finding::HistoryLink { account, .. }
            | Finding::FundingBalance { account, .. }
            | Finding::Overflow { account, .. }
            | Finding::PaidItself { account, .. }
            | Finding::SettlementBalance { account, .. }
            | Finding::Overdrawn { account, .. }
            | Finding::OutOfRange { account, .. }
            | Finding::HistoryHead { account, .. }
            | Finding::NoBalance(account)
            | Finding::Balance { account, .. } => Some(*account),
            _ => None,
        }
    }
}

/// The accounts `findings` name, in order, each once.
pub fn accounts_named(findings: &[Finding]) -> Vec<AccountId> {
    let accounts: std::collections::BTreeSet<AccountId> =
        findings.iter().filter_map(Finding::account).collect();
    accounts.into_iter().collect()
}
