//! `open_account` (operator): registers an account's salt and key hash and
//! funds it from the issuer. Needs the admin credential, not an
//! authenticated connection; answers once the opening is committed.

use tapledger_actors::{LedgerError, NewAccount, Refusal};
use tapledger_protocol::{ErrorCode, NodeMessage, RequestId, Secret};
use tokio::sync::OwnedSemaphorePermit;

use super::{RequestContext, RequestTask};

pub(super) async fn start(
    context: RequestContext,
    request_id: RequestId,
    admin_credential: &Secret,
    new_account: NewAccount,
    permit: OwnedSemaphorePermit,
) -> Option<RequestTask> {
    if !context
        .admin_allowed(request_id, admin_credential.expose())
        .await
    {
        return None;
    }
    Some(Box::pin(async move {
        open(&context, request_id, new_account).await;
        drop(permit);
    }))
}

async fn open(context: &RequestContext, request_id: RequestId, new_account: NewAccount) {
    let opening_balance = new_account.opening_balance;
    match context.shared.ledger.open_account(new_account).await {
        Ok(account_id) => {
            tracing::info!(account_id, opening_balance, "account opened");
            context
                .answer(NodeMessage::AccountOpened {
                    request_id,
                    account_id,
                    balance: opening_balance,
                })
                .await;
        }
        Err(LedgerError::Refused(refusal @ Refusal::IssuedOverflow)) => {
            context
                .fail(request_id, ErrorCode::InvalidAmount, &refusal.to_string())
                .await
        }
        Err(error) => context.internal(request_id, &error).await,
    }
}
