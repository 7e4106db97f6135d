//! `balance`: the authenticated account's balance.

use tapledger_protocol::{AccountId, ErrorCode, NodeMessage, RequestId};

use super::RequestContext;

pub(super) async fn handle(context: &RequestContext, request_id: RequestId, account: AccountId) {
    match context.shared.ledger.balance(account) {
        Ok(Some(balance)) => {
            context
                .answer(NodeMessage::BalanceAnswer {
                    request_id,
                    account_id: account,
                    balance,
                })
                .await
        }
        Ok(None) => {
            context
                .fail(request_id, ErrorCode::Internal, "account vanished")
                .await
        }
        Err(error) => context.internal(request_id, &error).await,
    }
}
