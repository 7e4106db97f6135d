//! `tapledger-node export`: settled transfers and rejected payments as CSV
//! or Parquet for analysts, with the prototype's data-science columns first
//! and the node's own timestamps after them. Both formats are written from
//! the same [`Cell`]s, so they hold the same columns and values.
//!
//! It reads a ledger file (a stopped node's, or a backup of a running one)
//! through `Store`'s snapshot reads; it never writes to the ledger.
//! Half refusals (codes 400, 600..=800) are answers to one submission, not
//! outcomes of a payment, so they are not in the journal and not exported.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tapledger_actors::{JournalEntry, Store, StoreError};
use tapledger_protocol::{
    AccountId, Outcome, ReceiveHalf, Rejection, SendHalf, Settlement, Timestamp,
};

/// Journal entries read per snapshot while exporting.
const JOURNAL_CHUNK_ENTRIES: usize = 4096;

/// The CSV header, in column order. README.md describes each column.
pub const COLUMNS: [&str; 21] = [
    "transaction_key",
    "account_number_sender",
    "account_number_receiver",
    "transaction_timestamp",
    "transfer_amount",
    "beginning_balance_sender",
    "bank_sender",
    "os_sender",
    "os_receiver",
    "unanimous_agreement",
    "transaction_error",
    "error_code",
    "error_explanation",
    "outcome",
    "bank_receiver",
    "send_received_at",
    "receive_received_at",
    "settled_at",
    "send_client_time",
    "receive_client_time",
    "journal_seq",
];

/// What each column holds, in column order (the Parquet types; CSV writes
/// the same values as text, an absent value as an empty field).
pub const KINDS: [Kind; COLUMNS.len()] = [
    Kind::Text { optional: false },
    Kind::U64 { optional: true },
    Kind::U64 { optional: true },
    Kind::Micros { optional: false },
    Kind::U64 { optional: true },
    Kind::U64 { optional: true },
    Kind::Text { optional: true },
    Kind::Text { optional: true },
    Kind::Text { optional: true },
    Kind::Bool,
    Kind::Bool,
    Kind::U16,
    Kind::Text { optional: true },
    Kind::Text { optional: false },
    Kind::Text { optional: true },
    Kind::Micros { optional: true },
    Kind::Micros { optional: true },
    Kind::Micros { optional: false },
    Kind::Millis,
    Kind::Millis,
    Kind::U64 { optional: false },
];

/// A column's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// UTF-8 text.
    Text {
        optional: bool,
    },
    /// An unsigned 64-bit integer.
    U64 {
        optional: bool,
    },
    /// An unsigned 16-bit code, absent for settlements.
    U16,
    Bool,
    /// A node timestamp, microseconds since the epoch (UTC).
    Micros {
        optional: bool,
    },
    /// A phone's clock, milliseconds since the epoch; absent with its half
    /// (and, in Parquet, when beyond what a timestamp can hold).
    Millis,
}

/// One value of a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cell {
    Text(Option<String>),
    U64(Option<u64>),
    U16(Option<u16>),
    Bool(bool),
    Micros(Option<Timestamp>),
    Millis(Option<u64>),
}

impl Cell {
    /// The CSV field.
    fn csv(&self) -> String {
        match self {
            Cell::Text(text) => text.clone().unwrap_or_default(),
            Cell::U64(value) => value.map(|value| value.to_string()).unwrap_or_default(),
            Cell::U16(value) => value.map(|value| value.to_string()).unwrap_or_default(),
            Cell::Bool(value) => value.to_string(),
            Cell::Micros(at) => at.map(format_time).unwrap_or_default(),
            Cell::Millis(millis) => millis.map(format_client_time).unwrap_or_default(),
        }
    }
}

/// Which file format `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Parquet,
}

/// Which outcomes to export: decided at or after `from`, before `to`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeRange {
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
}

impl TimeRange {
    pub fn contains(&self, at: Timestamp) -> bool {
        self.from.is_none_or(|from| at >= from) && self.to.is_none_or(|to| at < to)
    }
}

/// What an export wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub settlements: u64,
    pub rejections: u64,
    /// Outcomes outside the time range.
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("writing CSV: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
}

/// Writes every outcome of `store` within `range` as CSV to `out`.
pub fn export_csv(
    store: &Store,
    out: impl Write,
    range: TimeRange,
) -> Result<ExportSummary, ExportError> {
    let mut writer = csv::Writer::from_writer(out);
    writer.write_record(COLUMNS)?;
    let summary = for_each_row(store, range, |cells| {
        writer.write_record(cells.iter().map(Cell::csv))?;
        Ok(())
    })?;
    writer.flush()?;
    Ok(summary)
}

/// Writes every outcome of `store` within `range` as a Parquet file to
/// `out` (columns and types: [`COLUMNS`], [`KINDS`]).
pub fn export_parquet(
    store: &Store,
    out: impl Write + Send,
    range: TimeRange,
) -> Result<ExportSummary, ExportError> {
    let mut writer = parquet_file::Writer::new(out)?;
    let summary = for_each_row(store, range, |cells| writer.push(cells))?;
    writer.finish()?;
    Ok(summary)
}

/// Calls `each` with every outcome's cells, in journal order, within
/// `range`.
fn for_each_row(
    store: &Store,
    range: TimeRange,
    mut each: impl FnMut(&[Cell; COLUMNS.len()]) -> Result<(), ExportError>,
) -> Result<ExportSummary, ExportError> {
    let banks: HashMap<AccountId, String> = store
        .accounts()?
        .into_iter()
        .map(|(record, _)| (record.id, record.bank_name))
        .collect();
    let mut summary = ExportSummary::default();
    let mut next = 0;
    loop {
        let entries = store.journal(next, JOURNAL_CHUNK_ENTRIES)?;
        let Some((last, _)) = entries.last() else {
            break;
        };
        next = last + 1;
        for (seq, entry) in &entries {
            let JournalEntry::Outcome(outcome) = entry else {
                continue;
            };
            let row = Row::of(*seq, outcome, &banks);
            if !range.contains(row.decided_at) {
                summary.skipped += 1;
                continue;
            }
            match outcome {
                Outcome::Settled(_) => summary.settlements += 1,
                Outcome::Rejected(_) => summary.rejections += 1,
            }
            each(&row.cells())?;
        }
        if entries.len() < JOURNAL_CHUNK_ENTRIES {
            break;
        }
    }
    Ok(summary)
}

/// One exported outcome, before formatting.
struct Row<'a> {
    seq: u64,
    tx_key: String,
    sender: Option<AccountId>,
    receiver: Option<AccountId>,
    amount: Option<u64>,
    sender_balance_before: Option<u64>,
    send: Option<(&'a SendHalf, Timestamp)>,
    receive: Option<(&'a ReceiveHalf, Timestamp)>,
    unanimous: bool,
    code: Option<u16>,
    explanation: &'static str,
    settled: bool,
    decided_at: Timestamp,
    banks: &'a HashMap<AccountId, String>,
}

impl<'a> Row<'a> {
    fn of(seq: u64, outcome: &'a Outcome, banks: &'a HashMap<AccountId, String>) -> Row<'a> {
        match outcome {
            Outcome::Settled(settlement) => Row::settled(seq, settlement, banks),
            Outcome::Rejected(rejection) => Row::rejected(seq, rejection, banks),
        }
    }

    fn settled(
        seq: u64,
        settlement: &'a Settlement,
        banks: &'a HashMap<AccountId, String>,
    ) -> Row<'a> {
        Row {
            seq,
            tx_key: settlement.tx_key().to_string(),
            sender: Some(settlement.sender()),
            receiver: Some(settlement.receiver()),
            amount: Some(settlement.amount()),
            sender_balance_before: Some(settlement.sender_balance_before),
            send: Some((&settlement.send.half, settlement.send.received_at)),
            receive: Some((&settlement.receive.half, settlement.receive.received_at)),
            unanimous: true,
            code: None,
            explanation: "",
            settled: true,
            decided_at: settlement.settled_at,
            banks,
        }
    }

    fn rejected(
        seq: u64,
        rejection: &'a Rejection,
        banks: &'a HashMap<AccountId, String>,
    ) -> Row<'a> {
        let send = rejection
            .send
            .as_ref()
            .map(|stamped| (&stamped.half, stamped.received_at));
        let receive = rejection
            .receive
            .as_ref()
            .map(|stamped| (&stamped.half, stamped.received_at));
        // A lone receive half still names its sender and amount: the sender is
        // the one it expected (the prototype swapped them here).
        let sender = send
            .map(|(half, _)| half.sender_id)
            .or(receive.map(|(half, _)| half.expected_sender_id));
        let amount = send
            .map(|(half, _)| half.amount)
            .or(receive.map(|(half, _)| half.expected_amount));
        let unanimous = match (send, receive) {
            (Some((send, _)), Some((receive, _))) => {
                send.sender_id == receive.expected_sender_id
                    && send.amount == receive.expected_amount
            }
            _ => false,
        };
        Row {
            seq,
            tx_key: rejection.tx_key.to_string(),
            sender,
            receiver: receive.map(|(half, _)| half.receiver_id),
            amount,
            sender_balance_before: rejection.sender_balance,
            send,
            receive,
            unanimous,
            code: Some(rejection.code.code()),
            explanation: rejection.code.explanation(),
            settled: false,
            decided_at: rejection.decided_at,
            banks,
        }
    }

    fn bank(&self, account: Option<AccountId>) -> Cell {
        Cell::Text(account.and_then(|account| self.banks.get(&account).cloned()))
    }

    /// The row's values, in [`COLUMNS`] order.
    fn cells(&self) -> [Cell; COLUMNS.len()] {
        [
            Cell::Text(Some(self.tx_key.clone())),
            Cell::U64(self.sender),
            Cell::U64(self.receiver),
            Cell::Micros(Some(self.decided_at)),
            Cell::U64(self.amount),
            Cell::U64(self.sender_balance_before),
            self.bank(self.sender),
            Cell::Text(self.send.map(|(half, _)| half.device_os.to_string())),
            Cell::Text(self.receive.map(|(half, _)| half.device_os.to_string())),
            Cell::Bool(self.unanimous),
            Cell::Bool(!self.settled),
            Cell::U16(self.code),
            Cell::Text((!self.explanation.is_empty()).then(|| self.explanation.to_string())),
            Cell::Text(Some(
                if self.settled { "settled" } else { "rejected" }.to_string(),
            )),
            self.bank(self.receiver),
            Cell::Micros(self.send.map(|(_, at)| at)),
            Cell::Micros(self.receive.map(|(_, at)| at)),
            Cell::Micros(Some(self.decided_at)),
            Cell::Millis(self.send.map(|(half, _)| half.client_time)),
            Cell::Millis(self.receive.map(|(half, _)| half.client_time)),
            Cell::U64(Some(self.seq)),
        ]
    }
}

/// A node timestamp as RFC 3339 in UTC with microseconds.
pub fn format_time(at: Timestamp) -> String {
    let time = UNIX_EPOCH + Duration::from_micros(at.as_micros());
    humantime::format_rfc3339_micros(time).to_string()
}

/// A phone's clock (milliseconds since the epoch) as RFC 3339, or the raw
/// number when it is beyond what a date can say.
fn format_client_time(millis: u64) -> String {
    match UNIX_EPOCH.checked_add(Duration::from_millis(millis)) {
        Some(time) if millis < 253_402_300_800_000 => {
            humantime::format_rfc3339_millis(time).to_string()
        }
        _ => millis.to_string(),
    }
}

/// Parses `--from`/`--to`: RFC 3339 (`2025-01-31T12:00:00Z`, or a date and
/// time in UTC such as `2025-01-31 12:00:00`), a date (`2025-01-31`,
/// midnight UTC), or seconds since the Unix epoch.
pub fn parse_time(text: &str) -> Result<Timestamp, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        if (0.0..1e13).contains(&seconds) {
            return Ok(Timestamp::from_micros((seconds * 1e6) as u64));
        }
        return Err(format!("`{text}`: seconds out of range"));
    }
    let with_time = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    let time: SystemTime = humantime::parse_rfc3339_weak(&with_time).map_err(|error| {
        format!("`{text}`: {error} (expected RFC 3339, YYYY-MM-DD or Unix seconds)")
    })?;
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("`{text}` is before 1970"))?;
    Ok(Timestamp::from_micros(
        u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX),
    ))
}

#[path = "export_parquet.rs"]
mod parquet_file;

#[cfg(test)]
#[path = "export_tests.rs"]
pub(crate) mod tests;
