//! One connection: authentication state shared by its streams, and per stream
//! a reader that decodes frames into requests and a writer that sends answers
//! and pushed outcomes back on the same stream.
//!
//! Requests are pipelined: each runs as its own task, bounded by
//! `requests_in_flight_max` per stream, so a half waiting minutes for its
//! partner never blocks the stream. Every bad input gets an `error` frame with
//! a code; only an unreadable frame length ends the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use quinn::VarInt;
use tapledger_actors::{LedgerError, NewAccount, Resolution, Submission};
use tapledger_protocol::{
    AccountId, ClientMessage, DecodeError, ErrorCode, FrameReader, HistoryEntry, HistoryKind,
    LeaderRef, NodeMessage, OutcomeReport, QueryStatus, RequestId, TxKey, bytes_equal,
    encode_frame, key_matches,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::admission::AccountSlot;
use crate::config::Limits;
use crate::server::{NodeCounters, Shared};
use crate::telemetry::{HalfFate, record_half};

/// QUIC application close codes: the protocol error numbers (PROTOCOL.md).
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(ErrorCode::ShuttingDown.code() as u32);
pub const CLOSE_AUTH_FAILURES: VarInt = VarInt::from_u32(ErrorCode::Throttled.code() as u32);
pub const CLOSE_NO_REQUEST: VarInt = VarInt::from_u32(ErrorCode::NotAuthenticated.code() as u32);
pub const CLOSE_TOO_MANY_CONNECTIONS: VarInt =
    VarInt::from_u32(ErrorCode::TooManyConnections.code() as u32);
const STOP_FRAME_TOO_LARGE: VarInt = VarInt::from_u32(ErrorCode::FrameTooLarge.code() as u32);

/// Answers queued for one stream's writer before request tasks wait.
const OUTBOX_MESSAGES_MAX: usize = 1024;
/// How long a finished stream waits for the client to acknowledge its last
/// answers before the stream task ends.
const STREAM_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Bytes read from a stream at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a connection has proved.
struct ConnectionState {
    /// The authenticated account, or 0 (the issuer never authenticates).
    account: AtomicU64,
    auth_failures: AtomicU32,
    /// Frames that could not be used, over all streams.
    bad_frames: AtomicU32,
    /// Set by a successful `authenticate` or admin request; connections that
    /// make neither are closed after `first_request_timeout`, whatever else
    /// they send.
    active: AtomicBool,
    /// Requests awaiting their final answer, over all streams.
    in_flight: Arc<Semaphore>,
    /// The authenticated account's place in its per-account count; set
    /// with `account`, given back when the connection ends.
    slot: std::sync::Mutex<Option<AccountSlot>>,
}

impl ConnectionState {
    fn account(&self) -> Option<AccountId> {
        match self.account.load(Ordering::Acquire) {
            0 => None,
            account => Some(account),
        }
    }
}

pub async fn serve_connection(connecting: quinn::Connecting, shared: Arc<Shared>) {
    let connected_at = tokio::time::Instant::now();
    // The handshake counts against the authentication deadline (the busy
    // one included): a client that starts one and goes silent would
    // otherwise hold its place until the idle timeout.
    let counters = &shared.counters;
    let connection = tokio::select! {
        handshake = connecting => match handshake {
            Ok(connection) => {
                counters
                    .connections_accepted
                    .fetch_add(1, Ordering::Relaxed);
                connection
            }
            Err(error) => {
                counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "handshake failed");
                return;
            }
        },
        _ = first_request_deadline(&shared.limits, shared.table.watch_busy(), connected_at) => {
            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("handshake not completed before the authentication deadline");
            return;
        }
    };
    // The caller runs this inside the connection's span (remote address);
    // tasks spawned below carry it along, and authentication records the account.
    let state = Arc::new(ConnectionState {
        account: AtomicU64::new(0),
        auth_failures: AtomicU32::new(0),
        bad_frames: AtomicU32::new(0),
        active: AtomicBool::new(false),
        in_flight: Arc::new(Semaphore::new(
            shared.limits.requests_in_flight_max as usize,
        )),
        slot: std::sync::Mutex::new(None),
    });

    // Aborted when this function returns or its task is aborted (a kill):
    // it must not outlive the connection.
    let watchdog = AbortOnDrop(tokio::spawn(
        first_request_watchdog(
            connection.clone(),
            state.clone(),
            shared.limits.clone(),
            shared.table.watch_busy(),
            shared.counters.clone(),
            connected_at,
        )
        .in_current_span(),
    ));

    let mut streams = JoinSet::new();
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(send, recv, connection.clone(), state.clone(), shared.clone()).in_current_span());
                }
                Err(error) => {
                    tracing::debug!(%error, "connection ended");
                    break;
                }
            },
            _ = shutdown.changed() => break,
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    // Streams finish what is in flight: they watch the shutdown flag too.
    while streams.join_next().await.is_some() {}
    drop(watchdog);
    // The account's place comes back now, not when the last handle to the
    // state goes.
    let slot = state.slot.lock().ok().and_then(|mut slot| slot.take());
    drop(slot);
    if *shared.shutdown.borrow() {
        connection.close(CLOSE_SHUTDOWN, b"node shutting down");
    }
}

/// Resolves when a connection made at `connected_at` is past its deadline
/// to authenticate: `first_request_timeout` after connecting (false), or
/// `busy_first_request_timeout` after connecting while the node is busy
/// (true).
async fn first_request_deadline(
    limits: &Limits,
    mut busy: watch::Receiver<bool>,
    connected_at: tokio::time::Instant,
) -> bool {
    let deadline = connected_at + limits.first_request_timeout;
    let busy_deadline = connected_at
        + limits
            .busy_first_request_timeout
            .min(limits.first_request_timeout);
    let busy_and_past_its_deadline = async {
        loop {
            if busy.wait_for(|busy| *busy).await.is_err() {
                // The table is gone: only the normal deadline is left.
                return std::future::pending().await;
            }
            tokio::time::sleep_until(busy_deadline).await;
            if *busy.borrow_and_update() {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::time::sleep_until(deadline) => false,
        _ = busy_and_past_its_deadline => true,
    }
}

/// Closes `connection` with 1010 unless it has authenticated (or made an
/// admin request) by its deadline: `first_request_timeout` after
/// connecting, or `busy_first_request_timeout` after connecting while the
/// node is busy (its table nearly full), so that connections holding a
/// place without using it make way for phones that would.
async fn first_request_watchdog(
    connection: quinn::Connection,
    state: Arc<ConnectionState>,
    limits: Limits,
    busy: watch::Receiver<bool>,
    counters: Arc<NodeCounters>,
    connected_at: tokio::time::Instant,
) {
    let was_busy = first_request_deadline(&limits, busy, connected_at).await;
    if state.active.load(Ordering::Acquire) {
        return;
    }
    if was_busy {
        counters
            .auth_deadline_closes_busy
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!("no request in time while the node is busy; closing");
        connection.close(CLOSE_NO_REQUEST, b"no request in time (node busy)");
    } else {
        counters
            .auth_deadline_closes
            .fetch_add(1, Ordering::Relaxed);
        connection.close(CLOSE_NO_REQUEST, b"no request in time");
    }
}

async fn serve_stream(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    connection: quinn::Connection,
    state: Arc<ConnectionState>,
    shared: Arc<Shared>,
) {
    let (outbox, outbox_receiver) = mpsc::channel(OUTBOX_MESSAGES_MAX);
    let writer = tokio::spawn(write_loop(send, outbox_receiver).in_current_span());
    let mut requests = JoinSet::new();
    let mut shutdown = shared.shutdown.clone();
    let mut reader = FrameReader::<ClientMessage>::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];

    'reading: loop {
        let read = tokio::select! {
            read = recv.read(&mut chunk) => read,
            _ = shutdown.changed() => break 'reading,
            Some(_) = requests.join_next(), if !requests.is_empty() => continue 'reading,
        };
        match read {
            Ok(Some(bytes)) => reader.extend(&chunk[..bytes]),
            Ok(None) | Err(_) => break 'reading,
        }
        for decoded in reader.frames() {
            match decoded {
                Ok(message) => {
                    let context = RequestContext {
                        shared: shared.clone(),
                        state: state.clone(),
                        connection: connection.clone(),
                        outbox: outbox.clone(),
                    };
                    if let Some(task) = context.dispatch(message).await {
                        requests.spawn(task.in_current_span());
                    }
                }
                Err(error) => {
                    if bad_frame(&error, &state, &shared, &outbox, &connection).await {
                        break 'reading;
                    }
                    if error.frame_bytes().is_none() {
                        // The length prefix itself is unusable: the stream cannot resynchronise.
                        let _ = recv.stop(STOP_FRAME_TOO_LARGE);
                        break 'reading;
                    }
                }
            }
        }
    }
    // The client finished sending, or the node is shutting down: let requests
    // in flight answer (pending halves answer at once on shutdown), then finish.
    let _ = recv.stop(VarInt::from_u32(0));
    // Once the connection itself is gone nobody can hear those answers: stop
    // waiting rather than hold the connection's slot until a lone half's
    // partner arrives or it expires. The half stays durable; the phone
    // reconnects and asks.
    let closed = connection.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            joined = requests.join_next() => if joined.is_none() { break },
            _ = &mut closed => {
                requests.abort_all();
                // Aborting is asynchronous: wait until the tasks are gone, so
                // none outlives its connection holding the node's state.
                while requests.join_next().await.is_some() {}
                break;
            }
        }
    }
    drop(outbox);
    let _ = writer.await;
}

/// Answers an unusable frame and counts it against the connection; true
/// when that was one too many and the connection is now closed.
async fn bad_frame(
    error: &DecodeError,
    state: &ConnectionState,
    shared: &Shared,
    outbox: &mpsc::Sender<NodeMessage>,
    connection: &quinn::Connection,
) -> bool {
    shared
        .counters
        .protocol_errors
        .fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%error, "bad frame");
    let answer = NodeMessage::error(error.request_id(), error.code(), &error.to_string());
    let _ = outbox.send(answer).await;
    let bad_frames = state.bad_frames.fetch_add(1, Ordering::AcqRel) + 1;
    if bad_frames < shared.limits.bad_frames_max {
        return false;
    }
    tracing::warn!(
        bad_frames,
        "too many unusable frames; closing the connection"
    );
    let closing = NodeMessage::error(
        None,
        ErrorCode::Throttled,
        "too many unusable frames; closing the connection",
    );
    let _ = outbox.send(closing).await;
    // Give the writer a moment to send the answers before the close.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    connection.close(CLOSE_AUTH_FAILURES, b"too many unusable frames");
    true
}

async fn write_loop(mut send: quinn::SendStream, mut outbox: mpsc::Receiver<NodeMessage>) {
    let mut frames = Vec::with_capacity(4096);
    while let Some(message) = outbox.recv().await {
        frames.clear();
        push_frame(&message, &mut frames);
        // Send whatever else is ready in the same write.
        while frames.len() < 64 * 1024 {
            match outbox.try_recv() {
                Ok(message) => push_frame(&message, &mut frames),
                Err(_) => break,
            }
        }
        if send.write_all(&frames).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
    // Closing a connection discards stream data not yet delivered, and at
    // shutdown the connection is closed right after its streams end: wait
    // (briefly) until the client has the last answers, such as the 1101 to
    // its waiting halves.
    let _ = tokio::time::timeout(STREAM_FLUSH_TIMEOUT, send.stopped()).await;
}

fn push_frame(message: &NodeMessage, frames: &mut Vec<u8>) {
    if let Err(error) = encode_frame(message, frames) {
        // Only a bug makes an answer too large; say so rather than send half a frame.
        tracing::error!(%error, kind = message.type_name(), "answer could not be encoded");
        let fallback = NodeMessage::error(
            message.request_id(),
            ErrorCode::Internal,
            "answer could not be encoded",
        );
        encode_frame(&fallback, frames).expect("a short error always encodes");
    }
}

type RequestTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

struct RequestContext {
    shared: Arc<Shared>,
    state: Arc<ConnectionState>,
    connection: quinn::Connection,
    outbox: mpsc::Sender<NodeMessage>,
}

impl RequestContext {
    async fn answer(&self, message: NodeMessage) {
        // A closed outbox means the stream is gone; the client can query later.
        let _ = self.outbox.send(message).await;
    }

    async fn fail(&self, request_id: RequestId, code: ErrorCode, detail: &str) {
        self.answer(NodeMessage::error(Some(request_id), code, detail))
            .await;
    }

    /// Handles quick requests inline; returns a task for those that wait on
    /// a commit.
    async fn dispatch(self, message: ClientMessage) -> Option<RequestTask> {
        let request_id = message.request_id();
        let account = self.state.account();
        if !self.shared.ledger.is_serving() {
            // A follower (or a leader still catching up) takes no requests,
            // reads included: its store may lag the leader's.
            self.answer(NodeMessage::not_leader(
                Some(request_id),
                leader_ref(self.shared.ledger.leader_hint()),
            ))
            .await;
            return None;
        }
        if message.needs_authentication() && account.is_none() {
            self.fail(
                request_id,
                ErrorCode::NotAuthenticated,
                "authenticate first",
            )
            .await;
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
        match message {
            ClientMessage::Authenticate {
                request_id,
                account_id,
                api_key,
            } => {
                self.authenticate(request_id, account_id, api_key.expose())
                    .await;
                None
            }
            ClientMessage::SubmitHalf { request_id, half } => {
                let account = account.expect("checked above");
                self.shared
                    .counters
                    .halves_received
                    .fetch_add(1, Ordering::Relaxed);
                Some(Box::pin(async move {
                    self.submit(request_id, account, half).await;
                    drop(permit);
                }))
            }
            ClientMessage::QueryOutcome { request_id, tx_key } => {
                self.query_outcome(request_id, account.expect("checked above"), tx_key)
                    .await;
                None
            }
            ClientMessage::Balance { request_id } => {
                let account = account.expect("checked above");
                match self.shared.ledger.balance(account) {
                    Ok(Some(balance)) => {
                        self.answer(NodeMessage::BalanceAnswer {
                            request_id,
                            account_id: account,
                            balance,
                        })
                        .await
                    }
                    Ok(None) => {
                        self.fail(request_id, ErrorCode::Internal, "account vanished")
                            .await
                    }
                    Err(error) => self.internal(request_id, &error).await,
                }
                None
            }
            ClientMessage::History {
                request_id,
                before_seq,
                limit,
            } => {
                self.history(
                    request_id,
                    account.expect("checked above"),
                    before_seq,
                    limit,
                )
                .await;
                None
            }
            ClientMessage::OpenAccount {
                request_id,
                admin_credential,
                account_type,
                bank_name,
                salt,
                key_hash,
                opening_balance,
            } => {
                if !self
                    .admin_allowed(request_id, admin_credential.expose())
                    .await
                {
                    return None;
                }
                Some(Box::pin(async move {
                    let new_account = NewAccount {
                        account_type,
                        bank_name,
                        salt,
                        key_hash,
                        opening_balance,
                    };
                    match self.shared.ledger.open_account(new_account).await {
                        Ok(account_id) => {
                            tracing::info!(account_id, opening_balance, "account opened");
                            self.answer(NodeMessage::AccountOpened {
                                request_id,
                                account_id,
                                balance: opening_balance,
                            })
                            .await;
                        }
                        Err(LedgerError::Invalid(reason)) => {
                            self.fail(request_id, ErrorCode::InvalidAmount, &reason)
                                .await
                        }
                        Err(error) => self.internal(request_id, &error).await,
                    }
                    drop(permit);
                }))
            }
            ClientMessage::TopUp {
                request_id,
                admin_credential,
                account_id,
                amount,
            } => {
                if !self
                    .admin_allowed(request_id, admin_credential.expose())
                    .await
                {
                    return None;
                }
                Some(Box::pin(async move {
                    match self.shared.ledger.top_up(account_id, amount).await {
                        Ok(balance) => {
                            tracing::info!(account_id, amount, "top-up");
                            self.answer(NodeMessage::ToppedUp {
                                request_id,
                                account_id,
                                balance,
                            })
                            .await;
                        }
                        Err(LedgerError::UnknownAccount(_)) => {
                            self.fail(request_id, ErrorCode::UnknownAccount, "no such account")
                                .await
                        }
                        Err(LedgerError::Invalid(reason)) => {
                            self.fail(request_id, ErrorCode::InvalidAmount, &reason)
                                .await
                        }
                        Err(error) => self.internal(request_id, &error).await,
                    }
                    drop(permit);
                }))
            }
        }
    }

    async fn internal(&self, request_id: RequestId, error: &LedgerError) {
        let code = match error {
            LedgerError::NotLeader(hint) => {
                tracing::info!(%error, request_id, "request ended by a change of leader");
                return self
                    .answer(NodeMessage::not_leader(
                        Some(request_id),
                        leader_ref(hint.clone()),
                    ))
                    .await;
            }
            LedgerError::Closed => ErrorCode::ShuttingDown,
            _ => ErrorCode::Internal,
        };
        let message = error.to_string();
        if let Some(repeated) = self
            .shared
            .request_errors
            .check(&message, std::time::Instant::now())
        {
            // `not_logged_since`: requests that failed the same way since
            // this error was last logged.
            tracing::error!(%error, request_id, not_logged_since = repeated, "request failed");
        }
        self.fail(request_id, code, &message).await;
    }

    async fn already_authenticated(&self, request_id: RequestId) {
        self.fail(
            request_id,
            ErrorCode::AlreadyAuthenticated,
            "this connection is already authenticated",
        )
        .await;
    }

    async fn authenticate(&self, request_id: RequestId, account_id: AccountId, api_key: &[u8]) {
        if self.state.account().is_some() {
            return self.already_authenticated(request_id).await;
        }
        // An unknown account and a wrong key get the same answer and the same work.
        let record = self.shared.ledger.account(account_id).ok().flatten();
        let (salt, expected) = match &record {
            Some(record) => (record.salt.as_slice(), record.key_hash.as_slice()),
            None => (&[0u8; 16][..], &[0u8; 64][..]),
        };
        if record.is_some() && key_matches(api_key, salt, expected) {
            let Some(slot) = self.shared.accounts.hold(account_id) else {
                return self.too_many_connections(request_id, account_id).await;
            };
            // Two streams of one connection may race to authenticate: one wins.
            if self
                .state
                .account
                .compare_exchange(0, account_id, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                drop(slot);
                return self.already_authenticated(request_id).await;
            }
            if let Ok(mut held) = self.state.slot.lock() {
                *held = Some(slot);
            }
            self.state.active.store(true, Ordering::Release);
            tracing::Span::current().record("account", account_id);
            tracing::info!(account_id, "authenticated");
            let ledger = self.shared.ledger.config();
            let half_ttl_ms = u64::try_from(ledger.half_ttl.as_millis()).unwrap_or(u64::MAX);
            self.answer(NodeMessage::Authenticated {
                request_id,
                account_id,
                max_amount: ledger.max_amount,
                half_ttl_ms,
            })
            .await;
            return;
        }
        // Never log the attempted key.
        tracing::warn!(account_id, "authentication failed");
        self.credential_failed(request_id, ErrorCode::BadCredentials)
            .await;
    }

    /// Answers 1015 to an authentication over the account's connection cap
    /// and closes the connection: it would only hold a place otherwise.
    async fn too_many_connections(&self, request_id: RequestId, account_id: AccountId) {
        self.shared
            .counters
            .account_connections_refused
            .fetch_add(1, Ordering::Relaxed);
        let max = self.shared.limits.connections_per_account_max;
        tracing::warn!(
            account_id,
            max,
            "the account has too many connections; closing this one"
        );
        let detail = format!("at most {max} per account; close one first");
        self.fail(request_id, ErrorCode::TooManyConnections, &detail)
            .await;
        // Give the writer a moment to send the answer before the close.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        self.connection.close(
            CLOSE_TOO_MANY_CONNECTIONS,
            b"too many connections for this account",
        );
    }

    /// Counts a failed credential (API key or admin) and answers it; after
    /// `auth_failures_max` on one connection, answers 1014 and closes it.
    async fn credential_failed(&self, request_id: RequestId, code: ErrorCode) {
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
            // Give the writer a moment to send the answer before the close.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            self.connection
                .close(CLOSE_AUTH_FAILURES, b"too many failed authentications");
        } else {
            self.fail(request_id, code, "").await;
        }
    }

    async fn admin_allowed(&self, request_id: RequestId, credential: &[u8]) -> bool {
        if bytes_equal(credential, self.shared.admin_credential.expose()) {
            self.state.active.store(true, Ordering::Release);
            return true;
        }
        tracing::warn!("admin credential rejected");
        self.credential_failed(request_id, ErrorCode::BadAdminCredential)
            .await;
        false
    }

    async fn submit(
        &self,
        request_id: RequestId,
        account: AccountId,
        half: tapledger_protocol::Half,
    ) {
        // One span per half, named by its tx_key: every event of this
        // submission, down to its outcome, carries the key.
        let span = tracing::info_span!("half", tx_key = %half.tx_key(), side = ?half.side());
        self.submit_in_span(request_id, account, half)
            .instrument(span)
            .await
    }

    async fn submit_in_span(
        &self,
        request_id: RequestId,
        account: AccountId,
        half: tapledger_protocol::Half,
    ) {
        let tx_key = half.tx_key();
        let started = std::time::Instant::now();
        let resolution = match self.shared.ledger.submit(account, half).await {
            Err(error) => return self.internal(request_id, &error).await,
            Ok(Submission::Done(resolution)) => {
                record_half(started, fate_of(&resolution));
                resolution
            }
            Ok(Submission::Pending(ticket)) => {
                record_half(started, HalfFate::Pending);
                tracing::debug!("half pending");
                self.answer(NodeMessage::Accepted { request_id, tx_key })
                    .await;
                tokio::select! {
                    resolution = ticket.resolution() => match resolution {
                        Ok(resolution) => resolution,
                        Err(error) => return self.internal(request_id, &error).await,
                    },
                    _ = stopping(self.shared.shutdown.clone()) => {
                        let message = "node shutting down; the half is durable and pending: reconnect and query the outcome";
                        return self.fail(request_id, ErrorCode::ShuttingDown, message).await;
                    }
                }
            }
        };
        match &resolution {
            Resolution::Final(outcome) => tracing::debug!(
                settled = outcome.is_settled(),
                code = outcome.code().map(|code| code.code()),
                "half resolved"
            ),
            Resolution::Refused(code) => tracing::debug!(code = code.code(), "half refused"),
        }
        self.answer(resolution_message(request_id, tx_key, account, &resolution))
            .await;
    }

    async fn query_outcome(&self, request_id: RequestId, account: AccountId, tx_key: TxKey) {
        let ledger = &self.shared.ledger;
        let answer = match ledger.outcome(tx_key) {
            Ok(Some(outcome)) if outcome.parties().contains(&account) => {
                NodeMessage::OutcomeAnswer {
                    request_id,
                    tx_key,
                    status: QueryStatus::Decided,
                    report: Some(OutcomeReport::for_party(&outcome, account)),
                }
            }
            Ok(_) => match ledger.pending(tx_key) {
                Ok(Some(pending)) if pending.party() == account => NodeMessage::OutcomeAnswer {
                    request_id,
                    tx_key,
                    status: QueryStatus::Pending,
                    report: None,
                },
                Ok(_) => NodeMessage::OutcomeAnswer {
                    request_id,
                    tx_key,
                    status: QueryStatus::Unknown,
                    report: None,
                },
                Err(error) => return self.internal(request_id, &error).await,
            },
            Err(error) => return self.internal(request_id, &error).await,
        };
        self.answer(answer).await;
    }

    async fn history(
        &self,
        request_id: RequestId,
        account: AccountId,
        before_seq: Option<u64>,
        limit: u16,
    ) {
        let entries = match self.shared.ledger.history(account) {
            Ok(entries) => entries,
            Err(error) => return self.internal(request_id, &error).await,
        };
        let before = before_seq.unwrap_or(u64::MAX);
        let mut page: Vec<HistoryEntry> = Vec::new();
        let mut more = false;
        for (seq, entry) in entries.iter().rev().filter(|(seq, _)| *seq < before) {
            if page.len() == usize::from(limit) {
                more = true;
                break;
            }
            let item = match entry {
                tapledger_actors::JournalEntry::Funding(funding) => Some(HistoryEntry {
                    seq: *seq,
                    kind: match funding.kind {
                        tapledger_actors::FundingKind::Opening => HistoryKind::Opening,
                        tapledger_actors::FundingKind::TopUp => HistoryKind::TopUp,
                    },
                    tx_key: None,
                    counterparty_id: None,
                    amount: funding.amount,
                    balance_after: funding.balance_before.saturating_add(funding.amount),
                    at: funding.at,
                }),
                tapledger_actors::JournalEntry::Outcome(tapledger_protocol::Outcome::Settled(
                    settlement,
                )) => HistoryEntry::from_settlement(*seq, settlement, account),
                tapledger_actors::JournalEntry::Outcome(_) => None,
            };
            page.extend(item);
        }
        self.answer(NodeMessage::HistoryAnswer {
            request_id,
            entries: page,
            more,
        })
        .await;
    }
}

/// Resolves once the node starts shutting down.
async fn stopping(mut shutdown: tokio::sync::watch::Receiver<bool>) {
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

/// How a half's first answer counts in the metrics.
fn fate_of(resolution: &Resolution) -> HalfFate {
    match resolution {
        Resolution::Final(_) => HalfFate::Decided,
        Resolution::Refused(code) => HalfFate::Refused(*code),
    }
}

/// The answer a phone gets once its half is resolved.
fn resolution_message(
    request_id: RequestId,
    tx_key: TxKey,
    account: AccountId,
    resolution: &Resolution,
) -> NodeMessage {
    match resolution {
        Resolution::Final(outcome) => NodeMessage::Outcome {
            request_id,
            report: OutcomeReport::for_party(outcome, account),
        },
        Resolution::Refused(code) => NodeMessage::refused(request_id, tx_key, *code),
    }
}
