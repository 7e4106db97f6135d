//! One handler per request kind, in the shape of mini-redis's `cmd/`: each
//! file takes one [`ClientMessage`] variant's fields, calls the ledger and
//! answers on the stream's outbox. [`RequestContext::dispatch`] only checks
//! what every request needs (this replica serves, the connection is
//! authenticated when the kind requires it, a place among the requests in
//! flight) and routes.
//!
//! Quick requests are answered inline, before the stream's next frame is
//! handled (so `authenticate` takes effect before what is pipelined behind
//! it); `submit_half` comes back as a queued half the stream submits with
//! the others of its read (see `submit_half`), and the operator requests
//! that wait on a commit (`open_account`, `top_up`) as a [`RequestTask`]
//! the stream runs beside the others. Frames, streams and connections are
//! `session`'s business.

mod authenticate;
mod balance;
mod history;
mod open_account;
mod query_outcome;
pub(crate) mod submit_half;
mod top_up;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tapledger_actors::{LedgerError, NewAccount};
use tapledger_protocol::{AccountId, ClientMessage, ErrorCode, LeaderRef, NodeMessage, RequestId};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::server::Shared;
use crate::session::{CLOSE_AUTH_FAILURES, ConnectionState};

/// A request still running after its stream moved on: it holds its place
/// among the connection's requests in flight until it answers.
pub(crate) type RequestTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What one request may use: the node, its connection, and the outbox of
/// the stream it arrived on. One per stream; tasks take a clone.
#[derive(Clone)]
pub(crate) struct RequestContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) state: Arc<ConnectionState>,
    pub(crate) connection: quinn::Connection,
    pub(crate) outbox: mpsc::Sender<NodeMessage>,
}

/// A request `dispatch` did not finish inline.
pub(crate) enum Dispatched {
    /// An operator request waiting on its commit.
    Task(RequestTask),
    /// A half, to be submitted with the rest of its read.
    Half(submit_half::Queued),
}

impl RequestContext {
    /// Handles quick requests inline; returns the half to submit, or a task
    /// for a request that waits on a commit.
    pub(crate) async fn dispatch(&self, message: ClientMessage) -> Option<Dispatched> {
        let request_id = message.request_id();
        if !self.shared.ledger.is_serving() {
            // A follower (or a leader still catching up) takes no requests,
            // reads included: its store may lag the leader's.
            self.not_leader(request_id).await;
            return None;
        }
        let account = self.state.account();
        if message.needs_authentication() && account.is_none() {
            self.not_authenticated(request_id).await;
            return None;
        }
        let Ok(permit) = self.state.in_flight.clone().try_acquire_owned() else {
            self.fail(
                request_id,
                ErrorCode::Throttled,
                "too many requests in flight on this connection",
            )
            .await;
            return None;
        };
        self.route(message, account, permit).await
    }

    async fn route(
        &self,
        message: ClientMessage,
        account: Option<AccountId>,
        permit: OwnedSemaphorePermit,
    ) -> Option<Dispatched> {
        match (message, account) {
            (
                ClientMessage::Authenticate {
                    request_id,
                    account_id,
                    api_key,
                },
                _,
            ) => {
                authenticate::handle(self, request_id, account_id, &api_key).await;
                None
            }
            (ClientMessage::SubmitHalf { request_id, half }, Some(account)) => Some(
                Dispatched::Half(submit_half::queue(request_id, account, half, permit)),
            ),
            (ClientMessage::QueryOutcome { request_id, tx_key }, Some(account)) => {
                query_outcome::handle(self, request_id, account, tx_key).await;
                None
            }
            (ClientMessage::Balance { request_id }, Some(account)) => {
                balance::handle(self, request_id, account).await;
                None
            }
            (
                ClientMessage::History {
                    request_id,
                    before_seq,
                    limit,
                },
                Some(account),
            ) => {
                history::handle(self, request_id, account, before_seq, limit).await;
                None
            }
            (
                ClientMessage::OpenAccount {
                    request_id,
                    admin_credential,
                    account_type,
                    bank_name,
                    salt,
                    key_hash,
                    opening_balance,
                },
                _,
            ) => {
                let new_account = NewAccount {
                    account_type,
                    bank_name,
                    salt,
                    key_hash,
                    opening_balance,
                };
                open_account::start(
                    self.clone(),
                    request_id,
                    &admin_credential,
                    new_account,
                    permit,
                )
                .await
                .map(Dispatched::Task)
            }
            (
                ClientMessage::TopUp {
                    request_id,
                    admin_credential,
                    account_id,
                    amount,
                },
                _,
            ) => top_up::start(
                self.clone(),
                request_id,
                &admin_credential,
                account_id,
                amount,
                permit,
            )
            .await
            .map(Dispatched::Task),
            // Only a kind `needs_authentication` forgot gets here: answer
            // as the check above would have.
            (message, None) => {
                self.not_authenticated(message.request_id()).await;
                None
            }
        }
    }

    pub(crate) async fn answer(&self, message: NodeMessage) {
        // A closed outbox means the stream is gone; the client can query later.
        let _ = self.outbox.send(message).await;
    }

    pub(crate) async fn fail(&self, request_id: RequestId, code: ErrorCode, detail: &str) {
        self.answer(NodeMessage::error(Some(request_id), code, detail))
            .await;
    }

    async fn not_leader(&self, request_id: RequestId) {
        self.answer(NodeMessage::not_leader(
            Some(request_id),
            leader_ref(self.shared.ledger.leader_hint()),
        ))
        .await;
    }

    async fn not_authenticated(&self, request_id: RequestId) {
        self.fail(
            request_id,
            ErrorCode::NotAuthenticated,
            "authenticate first",
        )
        .await;
    }

    /// Answers a request the ledger could not serve (see
    /// [`internal_answer`]).
    pub(crate) async fn internal(&self, request_id: RequestId, error: &LedgerError) {
        self.answer(internal_answer(&self.shared, request_id, error))
            .await;
    }

    /// Counts a failed credential (API key or admin) and answers it; after
    /// `auth_failures_max` on one connection, answers 1014 and closes it.
    pub(crate) async fn credential_failed(&self, request_id: RequestId, code: ErrorCode) {
        let failures = self.state.auth_failures.fetch_add(1, Ordering::AcqRel) + 1;
        self.shared
            .counters
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        if failures >= self.shared.limits.auth_failures_max {
            tracing::warn!(
                failures,
                "too many failed credentials; closing the connection"
            );
            self.fail(request_id, ErrorCode::Throttled, "closing the connection")
                .await;
            self.close_soon(CLOSE_AUTH_FAILURES, b"too many failed authentications")
                .await;
        } else {
            self.fail(request_id, code, "").await;
        }
    }

    /// Whether `credential` is the operator's; a wrong one is a failed
    /// credential ([`RequestContext::credential_failed`]). The right one
    /// makes the connection active (no authentication deadline).
    pub(crate) async fn admin_allowed(&self, request_id: RequestId, credential: &[u8]) -> bool {
        if tapledger_protocol::bytes_equal(credential, self.shared.admin_credential.expose()) {
            self.state.active.store(true, Ordering::Release);
            return true;
        }
        tracing::warn!("admin credential rejected");
        self.credential_failed(request_id, ErrorCode::BadAdminCredential)
            .await;
        false
    }

    /// Closes the connection after giving the writer a moment to send the
    /// answers already queued.
    pub(crate) async fn close_soon(&self, code: quinn::VarInt, reason: &[u8]) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        self.connection.close(code, reason);
    }
}

/// The answer to a request the ledger could not serve: 1102 when
/// leadership moved, 1101 at shutdown, 1100 otherwise (logged, repeats
/// counted).
pub(crate) fn internal_answer(
    shared: &Shared,
    request_id: RequestId,
    error: &LedgerError,
) -> NodeMessage {
    let code = match error {
        LedgerError::NotLeader(hint) => {
            tracing::info!(%error, request_id, "request ended by a change of leader");
            return NodeMessage::not_leader(Some(request_id), leader_ref(hint.clone()));
        }
        LedgerError::Closed => ErrorCode::ShuttingDown,
        _ => ErrorCode::Internal,
    };
    let message = error.to_string();
    if let Some(repeated) = shared
        .request_errors
        .check(&message, std::time::Instant::now())
    {
        // `not_logged_since`: requests that failed the same way since
        // this error was last logged.
        tracing::error!(%error, request_id, not_logged_since = repeated, "request failed");
    }
    NodeMessage::error(Some(request_id), code, &message)
}

/// Resolves once the node starts shutting down.
pub(crate) async fn stopping(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            // The node is gone without a shutdown: nothing left to wait for.
            return std::future::pending().await;
        }
    }
}

/// The leader as the wire names it.
fn leader_ref(hint: Option<tapledger_actors::LeaderHint>) -> Option<LeaderRef> {
    hint.map(|hint| LeaderRef {
        id: hint.id,
        addr: hint.client_addr,
    })
}
