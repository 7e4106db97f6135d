//! `history`: one page of the authenticated account's journal, newest
//! first: openings, top-ups and settlements (rejections move no money and
//! are left out).

use tapledger_actors::{FundingKind, JournalEntry};
use tapledger_protocol::{AccountId, HistoryEntry, HistoryKind, NodeMessage, Outcome, RequestId};

use super::RequestContext;

pub(super) async fn handle(
    context: &RequestContext,
    request_id: RequestId,
    account: AccountId,
    before_seq: Option<u64>,
    limit: u16,
) {
    let entries = match context.shared.ledger.history(account) {
        Ok(entries) => entries,
        Err(error) => return context.internal(request_id, &error).await,
    };
    let before = before_seq.unwrap_or(u64::MAX);
    let mut page: Vec<HistoryEntry> = Vec::new();
    let mut more = false;
    for (seq, entry) in entries.iter().rev().filter(|(seq, _)| *seq < before) {
        if page.len() == usize::from(limit) {
            more = true;
            break;
        }
        page.extend(history_entry(*seq, entry, account));
    }
    context
        .answer(NodeMessage::HistoryAnswer {
            request_id,
            entries: page,
            more,
        })
        .await;
}

/// How `account` sees journal entry `seq`, if it shows in its history.
fn history_entry(seq: u64, entry: &JournalEntry, account: AccountId) -> Option<HistoryEntry> {
    match entry {
        JournalEntry::Funding(funding) => Some(HistoryEntry {
            seq,
            kind: match funding.kind {
                FundingKind::Opening => HistoryKind::Opening,
                FundingKind::TopUp => HistoryKind::TopUp,
            },
            tx_key: None,
            counterparty_id: None,
            amount: funding.amount,
            balance_after: funding.balance_before.saturating_add(funding.amount),
            at: funding.at,
        }),
        JournalEntry::Outcome(Outcome::Settled(settlement)) => {
            HistoryEntry::from_settlement(seq, settlement, account)
        }
        JournalEntry::Outcome(_) => None,
    }
}
