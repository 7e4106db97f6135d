//! `top_up` (operator): moves money from the issuer to an account. Needs
//! the admin credential; answers with the new balance once committed.

use tapledger_actors::{LedgerError, Refusal};
use tapledger_protocol::{AccountId, ErrorCode, NodeMessage, RequestId, Secret};
use tokio::sync::OwnedSemaphorePermit;

use super::{RequestContext, RequestTask};

pub(super) async fn start(
    context: RequestContext,
    request_id: RequestId,
    admin_credential: &Secret,
    account_id: AccountId,
    amount: u64,
    permit: OwnedSemaphorePermit,
) -> Option<RequestTask> {
    if !context
        .admin_allowed(request_id, admin_credential.expose())
        .await
    {
        return None;
    }
    Some(Box::pin(async move {
        top_up(&context, request_id, account_id, amount).await;
        drop(permit);
    }))
}

async fn top_up(
    context: &RequestContext,
    request_id: RequestId,
    account_id: AccountId,
    amount: u64,
) {
    match context.shared.ledger.top_up(account_id, amount).await {
        Ok(balance) => {
            tracing::info!(account_id, amount, "top-up");
            context
                .answer(NodeMessage::ToppedUp {
                    request_id,
                    account_id,
                    balance,
                })
                .await;
        }
        Err(LedgerError::UnknownAccount(_) | LedgerError::Refused(Refusal::NoSuchAccount(_))) => {
            context
                .fail(request_id, ErrorCode::UnknownAccount, "no such account")
                .await
        }
        Err(LedgerError::Refused(refusal @ (Refusal::ZeroTopUp | Refusal::TopUpOverflow))) => {
            context
                .fail(request_id, ErrorCode::InvalidAmount, &refusal.to_string())
                .await
        }
        Err(error) => context.internal(request_id, &error).await,
    }
}
