//! `query_outcome`: what the node knows of a `tx_key`, as one of its
//! parties may see it: decided (with the report), pending (this account's
//! half waits), or unknown (never heard of, or another account's).

use tapledger_protocol::{AccountId, NodeMessage, OutcomeReport, QueryStatus, RequestId, TxKey};

use super::RequestContext;

pub(super) async fn handle(
    context: &RequestContext,
    request_id: RequestId,
    account: AccountId,
    tx_key: TxKey,
) {
    let ledger = &context.shared.ledger;
    let (status, report) = match ledger.outcome(tx_key) {
        Ok(Some(outcome)) if outcome.parties().contains(&account) => (
            QueryStatus::Decided,
            Some(OutcomeReport::for_party(&outcome, account)),
        ),
        Ok(_) => match ledger.pending(tx_key) {
            Ok(Some(pending)) if pending.party() == account => (QueryStatus::Pending, None),
            Ok(_) => (QueryStatus::Unknown, None),
            Err(error) => return context.internal(request_id, &error).await,
        },
        Err(error) => return context.internal(request_id, &error).await,
    };
    context
        .answer(NodeMessage::OutcomeAnswer {
            request_id,
            tx_key,
            status,
            report,
        })
        .await;
}
