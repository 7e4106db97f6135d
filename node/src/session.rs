//! One connection: authentication state shared by its streams, and per stream
//! a reader that decodes frames into requests and a writer that sends the
//! answers back on the same stream, as many as are ready in one write: the
//! outbox's (inline answers, operator requests) and those it makes itself
//! from the ledger's reports on the stream's halves (accepted, pushed
//! outcomes), with no task in between.
//!
//! Requests are pipelined: each decoded request goes to
//! `handlers`, which answers quick ones inline; the halves of one
//! read go to the ledger as one batch with one report channel per stream
//! (no task per half), and the operator requests that wait on a commit run
//! as tasks. All of them are bounded by `requests_in_flight_max` per
//! connection, so a half waiting minutes for its partner never blocks the
//! stream. Every bad input gets an `error` frame with a code; only an
//! unreadable frame length ends the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use quinn::VarInt;
use tapledger_actors::ReportSender;
use tapledger_protocol::{
    AccountId, ClientMessage, DecodeError, ErrorCode, FrameReader, NodeMessage, encode_frame,
};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::admission::AccountSlot;
use crate::config::Limits;
use crate::handlers::submit_half::{self, Answerer, HalvesInFlight};
use crate::handlers::{Dispatched, RequestContext};
use crate::server::{NodeCounters, Shared};

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
/// A write gathers ready answers up to about this many bytes.
const WRITE_BYTES_MAX: usize = 64 * 1024;
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
pub(crate) struct ConnectionState {
    /// The authenticated account, or 0 (the issuer never authenticates).
    pub(crate) account: AtomicU64,
    pub(crate) auth_failures: AtomicU32,
    /// Frames that could not be used, over all streams.
    pub(crate) bad_frames: AtomicU32,
    /// Set by a successful `authenticate` or admin request; connections that
    /// make neither are closed after `first_request_timeout`, whatever else
    /// they send.
    pub(crate) active: AtomicBool,
    /// Requests awaiting their final answer, over all streams.
    pub(crate) in_flight: Arc<Semaphore>,
    /// The authenticated account's place in its per-account count; set
    /// with `account`, given back when the connection ends.
    pub(crate) slot: std::sync::Mutex<Option<AccountSlot>>,
}

impl ConnectionState {
    pub(crate) fn account(&self) -> Option<AccountId> {
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
    // Every half of this stream reports on one channel, which the writer
    // turns into answers: no task, channel or span per half.
    let halves = Arc::new(HalvesInFlight::default());
    let (sink, reports) = mpsc::unbounded_channel();
    let (reader_done, reader_done_receiver) = oneshot::channel::<()>();
    let (answered, answered_receiver) = oneshot::channel::<()>();
    let answerer = Answerer::new(
        shared.clone(),
        halves.clone(),
        reports,
        reader_done_receiver,
    );
    let mut writer = AbortOnDrop(tokio::spawn(
        write_loop(send, outbox_receiver, answerer, answered).in_current_span(),
    ));
    let context = RequestContext {
        shared,
        state,
        connection: connection.clone(),
        outbox,
    };
    let mut requests = JoinSet::new();
    read_requests(&mut recv, &context, &halves, &sink, &mut requests).await;
    drop(sink);
    drop(reader_done);
    // The client finished sending, or the node is shutting down: let requests
    // in flight answer (pending halves answer at once on shutdown), then finish.
    let _ = recv.stop(VarInt::from_u32(0));
    let answered = drain(requests, answered_receiver, &connection).await;
    // The writer ends once every handle to the outbox is gone.
    drop(context);
    if !answered {
        // Nobody can hear the rest: stop it, and wait until it is gone so
        // that it does not outlive its connection holding the node's state.
        writer.0.abort();
    }
    let _ = (&mut writer.0).await;
}

/// Reads and handles requests until the client finishes sending, the stream
/// breaks or the node shuts down. The halves of each read go to the ledger
/// as one batch once every frame of the read is handled.
async fn read_requests(
    recv: &mut quinn::RecvStream,
    context: &RequestContext,
    halves: &HalvesInFlight,
    sink: &ReportSender,
    requests: &mut JoinSet<()>,
) {
    let mut shutdown = context.shared.shutdown.clone();
    let mut reader = FrameReader::<ClientMessage>::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut queued = Vec::new();
    loop {
        let read = tokio::select! {
            read = recv.read(&mut chunk) => read,
            _ = shutdown.changed() => return,
            Some(_) = requests.join_next(), if !requests.is_empty() => continue,
        };
        match read {
            Ok(Some(bytes)) => reader.extend(&chunk[..bytes]),
            Ok(None) | Err(_) => return,
        }
        let started = std::time::Instant::now();
        let go_on = handle_frames(&mut reader, recv, context, requests, &mut queued).await;
        submit_half::submit(context, halves, std::mem::take(&mut queued), sink, started);
        if !go_on {
            return;
        }
    }
}

/// Handles every whole frame `reader` holds, queueing halves into `queued`;
/// false when the stream must stop reading.
async fn handle_frames(
    reader: &mut FrameReader<ClientMessage>,
    recv: &mut quinn::RecvStream,
    context: &RequestContext,
    requests: &mut JoinSet<()>,
    queued: &mut Vec<submit_half::Queued>,
) -> bool {
    for decoded in reader.frames() {
        match decoded {
            Ok(message) => match context.dispatch(message).await {
                Some(Dispatched::Half(half)) => queued.push(half),
                Some(Dispatched::Task(task)) => {
                    requests.spawn(task.in_current_span());
                }
                None => {}
            },
            Err(error) => {
                if bad_frame(&error, context).await {
                    return false;
                }
                if error.frame_bytes().is_none() {
                    // The length prefix itself is unusable: the stream cannot resynchronise.
                    let _ = recv.stop(STOP_FRAME_TOO_LARGE);
                    return false;
                }
            }
        }
    }
    true
}

/// Waits until every request and half in flight is answered (true). Once
/// the connection itself is gone nobody can hear those answers: stop
/// waiting (false) rather than hold the connection's slot until a lone
/// half's partner arrives or it expires. The halves stay durable; the phone
/// reconnects and asks.
async fn drain(
    mut requests: JoinSet<()>,
    mut answered: oneshot::Receiver<()>,
    connection: &quinn::Connection,
) -> bool {
    let closed = connection.closed();
    tokio::pin!(closed);
    // A writer that is gone (it panicked) drops its sender: it answers
    // nothing more either way.
    let mut halves_answered = false;
    loop {
        if halves_answered && requests.is_empty() {
            return true;
        }
        tokio::select! {
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
            _ = &mut answered, if !halves_answered => halves_answered = true,
            _ = &mut closed => break,
        }
    }
    requests.abort_all();
    // Aborting is asynchronous: wait until the tasks are gone, so none
    // outlives its connection holding the node's state.
    while requests.join_next().await.is_some() {}
    false
}

/// Answers an unusable frame and counts it against the connection; true
/// when that was one too many and the connection is now closed.
async fn bad_frame(error: &DecodeError, context: &RequestContext) -> bool {
    let (state, shared, outbox) = (&context.state, &context.shared, &context.outbox);
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
    context
        .connection
        .close(CLOSE_AUTH_FAILURES, b"too many unusable frames");
    true
}

/// The stream's one writer: answers from the outbox (inline answers,
/// operator requests) and from the stream's halves' reports, as many as are
/// ready in one write. Tells `answered` once no half is owed an answer, and
/// ends once the outbox is closed too.
async fn write_loop(
    mut send: quinn::SendStream,
    mut outbox: mpsc::Receiver<NodeMessage>,
    mut answerer: Answerer,
    answered: oneshot::Sender<()>,
) {
    let mut frames = Vec::with_capacity(4096);
    let mut answered = Some(answered);
    let mut outbox_open = true;
    let mut writable = true;
    while outbox_open || answered.is_some() {
        tokio::select! {
            message = outbox.recv(), if outbox_open => match message {
                Some(message) => push_frame(&message, &mut frames),
                None => outbox_open = false,
            },
            more = answerer.next(), if answered.is_some() => {
                if !more && let Some(answered) = answered.take() {
                    let _ = answered.send(());
                }
            }
        }
        // Write whatever else is ready in the same write.
        if answered.is_some() {
            answerer.ready();
        }
        for answer in answerer.answers.drain(..) {
            push_frame(&answer, &mut frames);
        }
        while outbox_open && frames.len() < WRITE_BYTES_MAX {
            match outbox.try_recv() {
                Ok(message) => push_frame(&message, &mut frames),
                Err(_) => break,
            }
        }
        if frames.is_empty() {
            continue;
        }
        // A stream the client stopped or reset takes nothing more, but its
        // halves are still answered (into nothing), so that each gives back
        // its place among the connection's requests in flight.
        if writable && send.write_all(&frames).await.is_err() {
            writable = false;
        }
        frames.clear();
    }
    if !writable {
        return;
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
