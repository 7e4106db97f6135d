//! `authenticate`: proves the connection is an account's, once. An unknown
//! account and a wrong key get the same answer after the same work; the
//! account's connection cap (1015) and the failed-attempt limit (1014)
//! close the connection.

use std::sync::atomic::Ordering;

use tapledger_protocol::{AccountId, ErrorCode, NodeMessage, RequestId, Secret, key_matches};

use super::RequestContext;
use crate::session::CLOSE_TOO_MANY_CONNECTIONS;

pub(super) async fn handle(
    context: &RequestContext,
    request_id: RequestId,
    account_id: AccountId,
    api_key: &Secret,
) {
    if context.state.account().is_some() {
        return already_authenticated(context, request_id).await;
    }
    // An unknown account and a wrong key get the same answer and the same work.
    let record = context.shared.ledger.account(account_id).ok().flatten();
    let (salt, expected) = match &record {
        Some(record) => (record.salt.as_slice(), record.key_hash.as_slice()),
        None => (&[0u8; 16][..], &[0u8; 64][..]),
    };
    if record.is_some() && key_matches(api_key.expose(), salt, expected) {
        return authenticated(context, request_id, account_id).await;
    }
    // Never log the attempted key.
    tracing::warn!(account_id, "authentication failed");
    context
        .credential_failed(request_id, ErrorCode::BadCredentials)
        .await;
}

/// The key matched: takes the account's place and tells the phone the
/// node's parameters.
async fn authenticated(context: &RequestContext, request_id: RequestId, account_id: AccountId) {
    let Some(slot) = context.shared.accounts.hold(account_id) else {
        return too_many_connections(context, request_id, account_id).await;
    };
    // Two streams of one connection may race to authenticate: one wins.
    if context
        .state
        .account
        .compare_exchange(0, account_id, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        drop(slot);
        return already_authenticated(context, request_id).await;
    }
    if let Ok(mut held) = context.state.slot.lock() {
        *held = Some(slot);
    }
    context.state.active.store(true, Ordering::Release);
    tracing::Span::current().record("account", account_id);
    tracing::info!(account_id, "authenticated");
    let ledger = context.shared.ledger.config();
    let half_ttl_ms = u64::try_from(ledger.half_ttl.as_millis()).unwrap_or(u64::MAX);
    context
        .answer(NodeMessage::Authenticated {
            request_id,
            account_id,
            max_amount: ledger.max_amount,
            half_ttl_ms,
        })
        .await;
}

async fn already_authenticated(context: &RequestContext, request_id: RequestId) {
    context
        .fail(
            request_id,
            ErrorCode::AlreadyAuthenticated,
            "this connection is already authenticated",
        )
        .await;
}

/// Answers 1015 to an authentication over the account's connection cap
/// and closes the connection: it would only hold a place otherwise.
async fn too_many_connections(
    context: &RequestContext,
    request_id: RequestId,
    account_id: AccountId,
) {
    context
        .shared
        .counters
        .account_connections_refused
        .fetch_add(1, Ordering::Relaxed);
    let max = context.shared.limits.connections_per_account_max;
    tracing::warn!(
        account_id,
        max,
        "the account has too many connections; closing this one"
    );
    let detail = format!("at most {max} per account; close one first");
    context
        .fail(request_id, ErrorCode::TooManyConnections, &detail)
        .await;
    context
        .close_soon(
            CLOSE_TOO_MANY_CONNECTIONS,
            b"too many connections for this account",
        )
        .await;
}
