//! The Rust phone client: connects to a node with a pinned certificate, keeps
//! one long-lived stream, pipelines requests over it and routes each answer
//! (and each pushed outcome) back to the request that caused it.
//!
//! It never accepts an unpinned certificate. This crate is what a phone app
//! depends on: the wire protocol, certificate pins and QUIC, and nothing of
//! the ledger (no redb, no actors). `tapledger-sim` and the tests use it
//! too (`tapledger_node` re-exports it as `tapledger_node::client`); it is
//! also a reference for clients in other languages.
//!
//! A cluster is a list of replicas, each with its own address and
//! certificate ([`ReplicaAddress`]). Only the leader takes requests; the
//! others answer 1102 naming it ([`ClientError::NotLeader`]).
//! [`ClientEndpoint::connect_leader`] finds it: it tries the replica it was
//! told, follows "not the leader" answers, and tries the others in turn.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tapledger_certs::Fingerprint;
use tapledger_protocol::{
    API_KEY_BYTES_MIN, AccountId, CLIENT_IDLE_TIMEOUT_MS_DEFAULT, ClientMessage, ErrorCode,
    FrameReader, Half, HistoryEntry, KEEP_ALIVE_INTERVAL_MS_DEFAULT, LeaderRef, NodeMessage,
    OutcomeReport, QueryStatus, RejectCode, RequestId, SALT_BYTES_MIN, Secret, TxKey,
    encode_frame_to_vec, key_hash,
};
use tokio::sync::{mpsc, oneshot};

pub mod tls;

/// Interval at which clients send QUIC keep-alives (below the idle timeout).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(KEEP_ALIVE_INTERVAL_MS_DEFAULT);

/// The idle timeout the client asks for: how soon it gives up on a replica
/// that went silent.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_millis(CLIENT_IDLE_TIMEOUT_MS_DEFAULT);

/// How long [`ClientEndpoint::connect_leader`] gives one replica to
/// complete the handshake (and authentication) before trying the next.
pub const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("the node answered error {code}: {message}")]
    Node { code: ErrorCode, message: String },
    /// 1102: this replica does not lead the cluster; `leader` says which
    /// does, when it knows. Reconnect there and resubmit (halves are
    /// idempotent) or query the outcome.
    #[error("{message}")]
    NotLeader {
        leader: Option<LeaderRef>,
        message: String,
    },
    #[error("the connection closed before the answer arrived")]
    Disconnected,
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl ClientError {
    /// The node's error code, when the node answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Node { code, .. } => Some(*code),
            ClientError::NotLeader { .. } => Some(ErrorCode::NotLeader),
            _ => None,
        }
    }

    /// True when retrying elsewhere may help: this replica does not lead,
    /// or the connection is gone (the replica may have died).
    pub fn is_failover(&self) -> bool {
        matches!(
            self,
            ClientError::NotLeader { .. }
                | ClientError::Disconnected
                | ClientError::Connect(_)
                | ClientError::Node {
                    code: ErrorCode::ShuttingDown,
                    ..
                }
        )
    }
}

/// What an `error` message becomes for the caller.
fn node_error(message: NodeMessage) -> ClientError {
    match message {
        NodeMessage::Error {
            code: ErrorCode::NotLeader,
            message,
            leader,
            ..
        } => ClientError::NotLeader { leader, message },
        NodeMessage::Error { code, message, .. } => ClientError::Node { code, message },
        other => unexpected(&other),
    }
}

/// One replica of a cluster as phones reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaAddress {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
}

/// A freshly generated API key with the salt and hash the node registers.
#[derive(Clone, Debug)]
pub struct ApiCredentials {
    pub key: Secret,
    pub salt: Vec<u8>,
    pub key_hash: [u8; 64],
}

impl ApiCredentials {
    /// A random 32-byte key and 16-byte salt. Only `salt` and `key_hash` ever
    /// leave the phone at account opening.
    pub fn generate() -> ApiCredentials {
        let mut key = vec![0u8; API_KEY_BYTES_MIN];
        let mut salt = vec![0u8; SALT_BYTES_MIN];
        rand::fill(&mut key[..]);
        rand::fill(&mut salt[..]);
        let key_hash = key_hash(&key, &salt);
        ApiCredentials {
            key: Secret::new(key),
            salt,
            key_hash,
        }
    }
}

/// A QUIC client endpoint pinned to one node certificate. One endpoint can
/// carry many phone connections.
#[derive(Clone)]
pub struct ClientEndpoint {
    endpoint: quinn::Endpoint,
}

impl ClientEndpoint {
    /// Binds a local UDP socket of the same address family as `node`.
    pub fn new(pinned: Fingerprint, node: SocketAddr) -> Result<ClientEndpoint, ClientError> {
        let bind: SocketAddr = if node.is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let config = pinned_config(pinned)?;
        let mut endpoint = quinn::Endpoint::client(bind)
            .map_err(|error| ClientError::Connect(error.to_string()))?;
        endpoint.set_default_client_config(config);
        Ok(ClientEndpoint { endpoint })
    }

    /// Connects to the node and opens the long-lived request stream.
    pub async fn connect(&self, node: SocketAddr, server_name: &str) -> Result<Phone, ClientError> {
        let connecting = self
            .endpoint
            .connect(node, server_name)
            .map_err(|error| ClientError::Connect(error.to_string()))?;
        let connection = connecting
            .await
            .map_err(|error| ClientError::Connect(error.to_string()))?;
        Phone::over(connection).await
    }

    /// Connects to one replica of a cluster, pinning its own certificate,
    /// and opens the long-lived request stream.
    pub async fn connect_to(&self, replica: &ReplicaAddress) -> Result<Phone, ClientError> {
        let config = pinned_config(replica.fingerprint)?;
        let connecting = self
            .endpoint
            .connect_with(config, replica.addr, "localhost")
            .map_err(|error| ClientError::Connect(error.to_string()))?;
        let connection = connecting
            .await
            .map_err(|error| ClientError::Connect(error.to_string()))?;
        Phone::over(connection).await
    }

    /// Connects to the cluster's leader, authenticated as `account` when
    /// given, within `limit`. Starts with `replicas[first]`, follows every
    /// "not the leader" answer that names a replica of the list, and tries
    /// the others in turn, backing off a little between rounds. Returns the
    /// phone, its session, and the index of the replica it reached. Without
    /// an account the connection cannot tell whether it reached the leader:
    /// the first request will (1102).
    pub async fn connect_leader(
        &self,
        replicas: &[ReplicaAddress],
        first: usize,
        account: Option<(AccountId, &Secret)>,
        limit: Duration,
    ) -> Result<(Phone, Option<Session>, usize), ClientError> {
        if replicas.is_empty() {
            return Err(ClientError::Connect("no replica to connect to".into()));
        }
        let deadline = tokio::time::Instant::now() + limit;
        let mut next = first % replicas.len();
        let mut last_error = ClientError::Timeout(limit);
        for attempt in 0u32.. {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(last_error);
            }
            let trying = next;
            let step = async {
                let mut phone = self.connect_to(&replicas[trying]).await?;
                match account {
                    None => Ok((phone, None)),
                    Some((account_id, key)) => match phone.authenticate(account_id, key).await {
                        Ok(session) => Ok((phone, Some(session))),
                        Err(error) => {
                            phone.close().await;
                            Err(error)
                        }
                    },
                }
            };
            // A dead replica never answers the handshake (UDP gives no
            // refusal): try the next one after a short while.
            match tokio::time::timeout(remaining.min(CONNECT_ATTEMPT_TIMEOUT), step).await {
                Ok(Ok((phone, session))) => return Ok((phone, session, trying)),
                Ok(Err(ClientError::NotLeader { leader, message })) => {
                    next = leader
                        .as_ref()
                        .and_then(|leader| leader.addr.parse::<SocketAddr>().ok())
                        .and_then(|addr| replicas.iter().position(|replica| replica.addr == addr))
                        .filter(|&index| index != trying)
                        .unwrap_or((trying + 1) % replicas.len());
                    last_error = ClientError::NotLeader { leader, message };
                }
                Ok(Err(error)) if error.is_failover() => {
                    next = (trying + 1) % replicas.len();
                    last_error = error;
                }
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    next = (trying + 1) % replicas.len();
                    last_error = ClientError::Timeout(CONNECT_ATTEMPT_TIMEOUT);
                }
            }
            if next == first % replicas.len() || next == trying {
                // A whole round without a leader (an election, most likely).
                let pause = Duration::from_millis(20 * u64::from(attempt.min(10) + 1));
                tokio::time::sleep(pause.min(remaining)).await;
            }
        }
        unreachable!("the loop returns")
    }

    /// Waits until every connection of this endpoint has closed.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

fn pinned_config(pinned: Fingerprint) -> Result<quinn::ClientConfig, ClientError> {
    let crypto =
        tls::client_crypto(pinned).map_err(|error| ClientError::Connect(error.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(
            CLIENT_IDLE_TIMEOUT
                .try_into()
                .expect("idle timeout fits QUIC's range"),
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A connection's UDP datagram counts ([`Phone::datagrams`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Datagrams {
    pub sent: u64,
    pub received: u64,
}

impl std::ops::Add for Datagrams {
    type Output = Datagrams;
    fn add(self, other: Datagrams) -> Datagrams {
        Datagrams {
            sent: self.sent + other.sent,
            received: self.received + other.received,
        }
    }
}

/// Where each request's next answer goes: one oneshot per answer, not a
/// channel per request (an unbounded channel allocates room for 32 messages
/// up front, and a request gets one answer, or two after `accepted`).
type Routes = Arc<Mutex<HashMap<RequestId, oneshot::Sender<Answer>>>>;

/// An answer to a request. `accepted` is followed by the outcome: the reader
/// hands it over with the receiver that outcome will arrive on.
#[derive(Debug)]
struct Answer {
    message: NodeMessage,
    then: Option<oneshot::Receiver<Answer>>,
}

/// One phone's connection to a node.
pub struct Phone {
    connection: quinn::Connection,
    send: tokio::sync::Mutex<quinn::SendStream>,
    routes: Routes,
    next_request: AtomicU64,
    /// Errors the node could not tie to a request (unreadable frames).
    unrouted: tokio::sync::Mutex<mpsc::UnboundedReceiver<NodeMessage>>,
    reader: tokio::task::JoinHandle<()>,
    account: Option<AccountId>,
}

/// What the node said about a half, finally.
// One answer per submitted half, moved once: boxing the report would cost an
// allocation and buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HalfAnswer {
    /// The key's final outcome.
    Decided(OutcomeReport),
    /// This half was refused; the key is untouched.
    Refused {
        code: RejectCode,
        explanation: String,
    },
}

/// The first answer to a submitted half.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Submitted {
    Answered(HalfAnswer),
    /// Durable and waiting for its partner: the outcome will be pushed.
    Accepted(PendingHalf),
}

impl Submitted {
    /// Waits for the final answer however the submission started.
    pub async fn answer(self) -> Result<HalfAnswer, ClientError> {
        match self {
            Submitted::Answered(answer) => Ok(answer),
            Submitted::Accepted(pending) => pending.answer().await,
        }
    }
}

/// A half the node holds durably; its outcome arrives on the same stream.
#[derive(Debug)]
pub struct PendingHalf {
    pub tx_key: TxKey,
    outcome: oneshot::Receiver<Answer>,
}

impl PendingHalf {
    pub async fn answer(self) -> Result<HalfAnswer, ClientError> {
        let answer = self.outcome.await.map_err(|_| ClientError::Disconnected)?;
        half_answer(answer.message)
    }
}

/// The node's parameters, learned at authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub account_id: AccountId,
    pub max_amount: u64,
    pub half_ttl_ms: u64,
}

impl Phone {
    async fn over(connection: quinn::Connection) -> Result<Phone, ClientError> {
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|error| ClientError::Connect(error.to_string()))?;
        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let (unrouted_sender, unrouted) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(recv, routes.clone(), unrouted_sender));
        Ok(Phone {
            connection,
            send: tokio::sync::Mutex::new(send),
            routes,
            next_request: AtomicU64::new(1),
            unrouted: tokio::sync::Mutex::new(unrouted),
            reader,
            account: None,
        })
    }

    /// The account this connection authenticated as.
    pub fn account(&self) -> Option<AccountId> {
        self.account
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// UDP datagrams this connection has sent and received so far.
    pub fn datagrams(&self) -> Datagrams {
        let stats = self.connection.stats();
        Datagrams {
            sent: stats.udp_tx.datagrams,
            received: stats.udp_rx.datagrams,
        }
    }

    /// The reason the connection closed, once it has.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.connection.close_reason()
    }

    fn next_request_id(&self) -> RequestId {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `message` (with its request id already set) and returns where
    /// its first answer arrives.
    async fn request(
        &self,
        message: ClientMessage,
    ) -> Result<oneshot::Receiver<Answer>, ClientError> {
        let frame = encode_frame_to_vec(&message)
            .map_err(|error| ClientError::Unexpected(error.to_string()))?;
        let (sender, receiver) = oneshot::channel();
        self.routes
            .lock()
            .expect("routes lock")
            .insert(message.request_id(), sender);
        let written = self.send.lock().await.write_all(&frame).await;
        if written.is_err() {
            self.routes
                .lock()
                .expect("routes lock")
                .remove(&message.request_id());
            return Err(ClientError::Disconnected);
        }
        Ok(receiver)
    }

    async fn single_answer(&self, message: ClientMessage) -> Result<NodeMessage, ClientError> {
        let answer = first_answer(self.request(message).await?).await?;
        match answer {
            NodeMessage::Error { .. } => Err(node_error(answer)),
            answer => Ok(answer),
        }
    }

    /// Writes raw bytes on the request stream (for tests of hostile input).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send
            .lock()
            .await
            .write_all(bytes)
            .await
            .map_err(|_| ClientError::Disconnected)
    }

    /// Sends an arbitrary message under a fresh request id and returns the
    /// first answer (for tests of requests the typed methods never make).
    pub async fn send_message(
        &self,
        mut message: ClientMessage,
    ) -> Result<NodeMessage, ClientError> {
        set_request_id(&mut message, self.next_request_id());
        first_answer(self.request(message).await?).await
    }

    /// The next node message that answered no request (an `error` about an
    /// unreadable frame), waiting at most `timeout`.
    pub async fn next_unrouted(&self, timeout: Duration) -> Result<NodeMessage, ClientError> {
        let mut unrouted = self.unrouted.lock().await;
        match tokio::time::timeout(timeout, unrouted.recv()).await {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(ClientError::Disconnected),
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }

    pub async fn authenticate(
        &mut self,
        account_id: AccountId,
        api_key: &Secret,
    ) -> Result<Session, ClientError> {
        let request_id = self.next_request_id();
        match self
            .single_answer(ClientMessage::Authenticate {
                request_id,
                account_id,
                api_key: api_key.clone(),
            })
            .await?
        {
            NodeMessage::Authenticated {
                account_id,
                max_amount,
                half_ttl_ms,
                ..
            } => {
                self.account = Some(account_id);
                Ok(Session {
                    account_id,
                    max_amount,
                    half_ttl_ms,
                })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Submits a half; resolves once the node refused it, decided its key, or
    /// holds it durably (then the outcome follows on [`PendingHalf::answer`]).
    pub async fn submit(&self, half: Half) -> Result<Submitted, ClientError> {
        let request_id = self.next_request_id();
        let tx_key = half.tx_key();
        let receiver = self
            .request(ClientMessage::SubmitHalf { request_id, half })
            .await?;
        let answer = receiver.await.map_err(|_| ClientError::Disconnected)?;
        match (answer.message, answer.then) {
            (NodeMessage::Accepted { .. }, Some(outcome)) => {
                Ok(Submitted::Accepted(PendingHalf { tx_key, outcome }))
            }
            (other, _) => half_answer(other).map(Submitted::Answered),
        }
    }

    /// What the node knows of `tx_key` for this account.
    pub async fn query_outcome(
        &self,
        tx_key: TxKey,
    ) -> Result<(QueryStatus, Option<OutcomeReport>), ClientError> {
        let request_id = self.next_request_id();
        match self
            .single_answer(ClientMessage::QueryOutcome { request_id, tx_key })
            .await?
        {
            NodeMessage::OutcomeAnswer { status, report, .. } => Ok((status, report)),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn balance(&self) -> Result<u64, ClientError> {
        let request_id = self.next_request_id();
        match self
            .single_answer(ClientMessage::Balance { request_id })
            .await?
        {
            NodeMessage::BalanceAnswer { balance, .. } => Ok(balance),
            other => Err(unexpected(&other)),
        }
    }

    /// One page of history, newest first, and whether older entries exist.
    pub async fn history(
        &self,
        before_seq: Option<u64>,
        limit: u16,
    ) -> Result<(Vec<HistoryEntry>, bool), ClientError> {
        let request_id = self.next_request_id();
        match self
            .single_answer(ClientMessage::History {
                request_id,
                before_seq,
                limit,
            })
            .await?
        {
            NodeMessage::HistoryAnswer { entries, more, .. } => Ok((entries, more)),
            other => Err(unexpected(&other)),
        }
    }

    /// Operator: opens an account for the holder of `credentials`.
    pub async fn open_account(
        &self,
        admin_credential: &Secret,
        account_type: &str,
        bank_name: &str,
        credentials: &ApiCredentials,
        opening_balance: u64,
    ) -> Result<AccountId, ClientError> {
        let request_id = self.next_request_id();
        let message = ClientMessage::OpenAccount {
            request_id,
            admin_credential: admin_credential.clone(),
            account_type: account_type.to_owned(),
            bank_name: bank_name.to_owned(),
            salt: credentials.salt.clone(),
            key_hash: credentials.key_hash.to_vec(),
            opening_balance,
        };
        match self.single_answer(message).await? {
            NodeMessage::AccountOpened { account_id, .. } => Ok(account_id),
            other => Err(unexpected(&other)),
        }
    }

    /// Operator: moves `amount` from the issuer to `account_id`.
    pub async fn top_up(
        &self,
        admin_credential: &Secret,
        account_id: AccountId,
        amount: u64,
    ) -> Result<u64, ClientError> {
        let request_id = self.next_request_id();
        let message = ClientMessage::TopUp {
            request_id,
            admin_credential: admin_credential.clone(),
            account_id,
            amount,
        };
        match self.single_answer(message).await? {
            NodeMessage::ToppedUp { balance, .. } => Ok(balance),
            other => Err(unexpected(&other)),
        }
    }

    /// Finishes the stream and closes the connection.
    pub async fn close(self) {
        let _ = self.send.lock().await.finish();
        self.connection.close(0u32.into(), b"bye");
        self.reader.abort();
    }
}

fn set_request_id(message: &mut ClientMessage, id: RequestId) {
    match message {
        ClientMessage::Authenticate { request_id, .. }
        | ClientMessage::SubmitHalf { request_id, .. }
        | ClientMessage::QueryOutcome { request_id, .. }
        | ClientMessage::Balance { request_id }
        | ClientMessage::History { request_id, .. }
        | ClientMessage::OpenAccount { request_id, .. }
        | ClientMessage::TopUp { request_id, .. } => *request_id = id,
    }
}

fn half_answer(message: NodeMessage) -> Result<HalfAnswer, ClientError> {
    match message {
        NodeMessage::Outcome { report, .. } => Ok(HalfAnswer::Decided(report)),
        NodeMessage::Refused {
            code, explanation, ..
        } => Ok(HalfAnswer::Refused { code, explanation }),
        error @ NodeMessage::Error { .. } => Err(node_error(error)),
        other => Err(unexpected(&other)),
    }
}

async fn first_answer(receiver: oneshot::Receiver<Answer>) -> Result<NodeMessage, ClientError> {
    let answer = receiver.await.map_err(|_| ClientError::Disconnected)?;
    Ok(answer.message)
}

fn unexpected(message: &NodeMessage) -> ClientError {
    ClientError::Unexpected(message.type_name().to_owned())
}

async fn read_loop(
    mut recv: quinn::RecvStream,
    routes: Routes,
    unrouted: mpsc::UnboundedSender<NodeMessage>,
) {
    let mut reader = FrameReader::<NodeMessage>::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match recv.read(&mut chunk).await {
            Ok(Some(bytes)) => reader.extend(&chunk[..bytes]),
            Ok(None) | Err(_) => break,
        }
        // A node sent something this client cannot read: skip it, or stop
        // reading when the stream cannot go on.
        for message in reader.frames().flatten() {
            route(&routes, &unrouted, message);
        }
        if reader.is_stopped() {
            break;
        }
    }
    // Dropping the routes tells every waiting request the connection is gone.
    routes.lock().expect("routes lock").clear();
}

fn route(routes: &Routes, unrouted: &mpsc::UnboundedSender<NodeMessage>, message: NodeMessage) {
    let Some(request_id) = message.request_id() else {
        let _ = unrouted.send(message);
        return;
    };
    let mut routes = routes.lock().expect("routes lock");
    let Some(sender) = routes.remove(&request_id) else {
        let _ = unrouted.send(message);
        return;
    };
    // `accepted` is followed by the outcome; every other answer is final.
    let then = matches!(message, NodeMessage::Accepted { .. }).then(|| {
        let (outcome, then) = oneshot::channel();
        routes.insert(request_id, outcome);
        then
    });
    // A requester that stopped waiting hears nothing; its outcome, if one
    // follows, finds the route and goes nowhere either.
    let _ = sender.send(Answer { message, then });
}

#[cfg(test)]
mod tests;
