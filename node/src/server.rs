//! The QUIC service: a quinn endpoint configured for untrusted clients, an
//! accept loop that caps connections and asks for address validation under
//! load (too many open connections, or new attempts above a rate), a task
//! per connection, and a clean shutdown. Beside it, when the
//! node is one replica of a cluster, the replication endpoint
//! ([`crate::peer`]) that carries Raft between replicas.
//!
//! Business rules are not here: sessions translate frames into ledger calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tapledger_actors::{Ledger, ReplicaSetup};
use tapledger_certs::{Fingerprint, Identity};
use tapledger_protocol::Secret;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::admission::{AccountConnections, AttemptBudget, ConnectionTable};
use crate::config::{Limits, NodeConfig};
use crate::peer::{self, PeerEndpoint};
use crate::session;
use crate::tls::{self, PeerTrust};

/// How long shutdown waits for closed connections to finish draining.
const ENDPOINT_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `RunningNode::start` waits for a cluster of one to lead.
const SINGLE_SERVE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Init(#[from] crate::init::InitError),
    #[error(transparent)]
    Ledger(#[from] tapledger_actors::LedgerError),
    #[error(transparent)]
    Store(#[from] tapledger_actors::StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "{0}: this replica belongs to a cluster of several voters; give it its replication address (peer_listen)"
    )]
    NeedsPeers(String),
}

/// Counters the node keeps about its clients.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Connections holding a place: handshaking or established.
    pub connections_open: AtomicUsize,
    /// New connection attempts: Initial packets for no known connection
    /// that quinn could parse, whatever became of them (forged ones included).
    pub connection_attempts: AtomicU64,
    /// Attempts answered with a QUIC Retry (address validation).
    pub connection_retries: AtomicU64,
    /// Handshakes started that did not complete: an Initial that cannot be
    /// decrypted, a TLS failure, a client that went silent.
    pub handshakes_failed: AtomicU64,
    /// Handshakes completed: connections a client can use.
    pub connections_accepted: AtomicU64,
    /// Attempts refused at `connections_max`.
    pub connections_refused: AtomicU64,
    /// Authentications refused because the account held
    /// `connections_per_account_max` connections (1015).
    pub account_connections_refused: AtomicU64,
    /// Connections closed with 1010 for not authenticating within
    /// `first_request_timeout`, and within `busy_first_request_timeout`
    /// while the node was busy.
    pub auth_deadline_closes: AtomicU64,
    pub auth_deadline_closes_busy: AtomicU64,
    pub auth_failures: AtomicU64,
    pub halves_received: AtomicU64,
    pub protocol_errors: AtomicU64,
}

/// What every session shares.
pub struct Shared {
    pub ledger: Arc<Ledger>,
    pub admin_credential: Secret,
    pub limits: Limits,
    /// Shared with the metrics server, which reads it at each scrape.
    pub counters: Arc<NodeCounters>,
    /// Open connections and whether the node is busy.
    pub table: ConnectionTable,
    /// Authenticated connections per account.
    pub accounts: Arc<AccountConnections>,
    /// Flips to true when the node starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Failed requests' errors, logged once per window with a count.
    pub request_errors: crate::logging::Repeats,
}

/// The replication side of a node that is one replica of a cluster.
struct Replication {
    endpoint: PeerEndpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The same request error is logged at most once per this, with a count.
const REPEATED_ERROR_WINDOW: Duration = Duration::from_secs(10);

/// A node serving on a socket. Drop it only after [`RunningNode::shutdown`]
/// (or [`RunningNode::kill`]).
pub struct RunningNode {
    pub local_addr: SocketAddr,
    /// Where the replication endpoint listens, when there is one.
    pub peer_addr: Option<SocketAddr>,
    pub fingerprint: Fingerprint,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    replication: Option<Replication>,
    shutdown: watch::Sender<bool>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    /// Opens the ledger in the data directory and starts serving: phones on
    /// `config.listen`, replicas on `config.peer_listen` (if set).
    pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
        let bind = |addr: SocketAddr| {
            std::net::UdpSocket::bind(addr).map_err(|source| NodeError::Bind { addr, source })
        };
        let phones = bind(config.listen)?;
        let peers = config.peer_listen.map(bind).transpose()?;
        RunningNode::start_on(config, phones, peers).await
    }

    /// Like [`RunningNode::start`] on sockets already bound (so that a test
    /// or the simulator can learn every replica's port before any starts).
    pub async fn start_on(
        config: NodeConfig,
        phones: std::net::UdpSocket,
        peers: Option<std::net::UdpSocket>,
    ) -> Result<RunningNode, NodeError> {
        crate::init::check_private(&config.data_dir.key())?;
        let identity = Identity::load(&config.data_dir.cert(), &config.data_dir.key())
            .map_err(crate::init::InitError::from)?;
        let admin_credential = crate::init::load_admin_credential(&config.data_dir.admin())?;
        let (store, log) = tapledger_actors::open_files(&config.ledger).await?;
        let (ledger, replication) = match peers {
            None => {
                let ledger = Ledger::start(config.ledger, store, log)
                    .await
                    .map_err(|error| match error {
                        error @ tapledger_actors::LedgerError::NeedsPeers { .. } => {
                            NodeError::NeedsPeers(error.to_string())
                        }
                        error => NodeError::Ledger(error),
                    })?;
                (ledger, None)
            }
            Some(socket) => {
                let (id, _) = log.identity()?.unwrap_or((1, Default::default()));
                let mut known: Vec<Fingerprint> = log
                    .known()?
                    .values()
                    .chain(log.bootstrap()?.unwrap_or_default().values())
                    .filter_map(|info| Fingerprint::parse(&info.fingerprint).ok())
                    .collect();
                known.push(identity.fingerprint());
                let trust = PeerTrust::default();
                trust.set(known.iter().copied());
                let endpoint = PeerEndpoint::bind(socket, &identity, trust.clone())?;
                let setup = ReplicaSetup {
                    id,
                    network: endpoint.network(),
                    bootstrap: None,
                };
                let ledger = Ledger::start_replica(config.ledger, store, log, setup).await?;
                let tasks = vec![
                    endpoint.serve(ledger.raft().clone()),
                    peer::follow_membership(ledger.raft(), trust, known),
                ];
                let status = ledger.status();
                if status.voters == [id] {
                    ledger.wait_serving(SINGLE_SERVE_TIMEOUT).await?;
                }
                (ledger, Some(Replication { endpoint, tasks }))
            }
        };
        let mut node = RunningNode::serve_on(
            phones,
            &identity,
            admin_credential,
            config.limits,
            Arc::new(ledger),
        )?;
        node.peer_addr = replication
            .as_ref()
            .map(|replication| replication.endpoint.local_addr);
        node.replication = replication;
        Ok(node)
    }

    /// Serves an already open ledger on `listen`.
    pub fn serve(
        listen: SocketAddr,
        identity: &Identity,
        admin_credential: Secret,
        limits: Limits,
        ledger: Arc<Ledger>,
    ) -> Result<RunningNode, NodeError> {
        let socket = std::net::UdpSocket::bind(listen).map_err(|source| NodeError::Bind {
            addr: listen,
            source,
        })?;
        RunningNode::serve_on(socket, identity, admin_credential, limits, ledger)
    }

    fn serve_on(
        socket: std::net::UdpSocket,
        identity: &Identity,
        admin_credential: Secret,
        limits: Limits,
        ledger: Arc<Ledger>,
    ) -> Result<RunningNode, NodeError> {
        let server_config = server_config(identity, &limits)?;
        let listen = socket.local_addr().map_err(|source| NodeError::Bind {
            addr: "0.0.0.0:0".parse().expect("literal"),
            source,
        })?;
        let runtime = quinn::default_runtime().ok_or_else(|| NodeError::Bind {
            addr: listen,
            source: std::io::Error::other("no async runtime for QUIC"),
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(|source| NodeError::Bind {
            addr: listen,
            source,
        })?;
        let local_addr = endpoint.local_addr().map_err(|source| NodeError::Bind {
            addr: listen,
            source,
        })?;
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let counters = Arc::new(NodeCounters::default());
        let shared = Arc::new(Shared {
            ledger,
            admin_credential,
            table: ConnectionTable::new(
                counters.clone(),
                limits.connections_max,
                limits.busy_above_percent,
            ),
            accounts: AccountConnections::new(limits.connections_per_account_max),
            limits,
            counters,
            shutdown: shutdown_receiver,
            request_errors: crate::logging::Repeats::new(REPEATED_ERROR_WINDOW),
        });
        let accept_loop = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        tracing::info!(%local_addr, fingerprint = %identity.fingerprint(), "node listening");
        Ok(RunningNode {
            local_addr,
            peer_addr: None,
            fingerprint: identity.fingerprint(),
            shared,
            endpoint,
            replication: None,
            shutdown,
            accept_loop,
        })
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.shared.ledger
    }

    pub fn counters(&self) -> &NodeCounters {
        &self.shared.counters
    }

    /// The counters, to keep for reading after the node is gone (metrics).
    pub fn counters_handle(&self) -> Arc<NodeCounters> {
        self.shared.counters.clone()
    }

    /// Stops accepting, lets requests in flight reach an answer (up to
    /// `grace`), closes every connection with a reason, then closes the ledger
    /// after its last commit (still replicating it), then the replication
    /// endpoint.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        // The accept loop drains its connection tasks before it returns.
        if tokio::time::timeout(grace, self.accept_loop).await.is_err() {
            tracing::warn!("connections did not finish within the grace period");
        }
        tracing::debug!(
            open = self.endpoint.open_connections(),
            "shutdown: connections drained"
        );
        self.endpoint
            .close(session::CLOSE_SHUTDOWN, b"node shutting down");
        // Connections drain for a few round trips after the close; one whose
        // peer vanished without a word can take far longer. The close frames
        // are out: do not hold the ledger open for them.
        if tokio::time::timeout(ENDPOINT_IDLE_TIMEOUT, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::debug!(
                open = self.endpoint.open_connections(),
                "shutdown: connections still draining; going on"
            );
        }
        match Arc::try_unwrap(self.shared) {
            Ok(shared) => match Arc::try_unwrap(shared.ledger) {
                Ok(ledger) => ledger.close().await,
                Err(_) => tracing::warn!("ledger still referenced at shutdown; not closing it"),
            },
            Err(_) => tracing::warn!("sessions still running at shutdown"),
        }
        if let Some(replication) = self.replication {
            replication
                .endpoint
                .endpoint
                .close(0u32.into(), b"replica shutting down");
            for task in replication.tasks {
                task.abort();
            }
        }
    }

    /// Stops the node at once, as a crash would: connections are dropped
    /// without answers, nothing is flushed, the ledger stops mid-flight. What
    /// was durable stays on disk. For the simulator's and tests' faults.
    pub async fn kill(self) {
        let _ = self.shutdown.send(true);
        self.endpoint.close(0u32.into(), b"");
        if let Some(replication) = &self.replication {
            replication.endpoint.endpoint.close(0u32.into(), b"");
            for task in &replication.tasks {
                task.abort();
            }
        }
        self.accept_loop.abort();
        let _ = self.accept_loop.await;
        let shared = self.shared;
        // Sessions may still hold the ledger for a moment; crash it through
        // whichever handle ends last.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut shared = shared;
        loop {
            match Arc::try_unwrap(shared) {
                Ok(inner) => {
                    let mut ledger = inner.ledger;
                    loop {
                        match Arc::try_unwrap(ledger) {
                            Ok(ledger) => return ledger.crash().await,
                            Err(still) if tokio::time::Instant::now() < deadline => {
                                ledger = still;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(_) => {
                                tracing::warn!("ledger still referenced; leaving it to its tasks");
                                return;
                            }
                        }
                    }
                }
                Err(still) if tokio::time::Instant::now() < deadline => {
                    shared = still;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(_) => {
                    tracing::warn!("sessions still running after the kill");
                    return;
                }
            }
        }
    }
}

fn server_config(identity: &Identity, limits: &Limits) -> Result<quinn::ServerConfig, NodeError> {
    let crypto = tls::server_crypto(identity.cert_chain(), identity.private_key())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(limits.streams_per_connection_max.into())
        .max_concurrent_uni_streams(0u32.into())
        // No datagrams (PROTOCOL.md section 2): not even advertised.
        .datagram_receive_buffer_size(None)
        .stream_receive_window(limits.stream_receive_window_bytes.into())
        .receive_window(limits.connection_receive_window_bytes.into())
        .max_idle_timeout(Some(
            limits
                .idle_timeout
                .try_into()
                .expect("idle timeout fits QUIC's range"),
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    let mut shutdown = shared.shutdown.clone();
    let mut budget = AttemptBudget::new(
        shared.limits.retry_above_attempts_per_sec,
        std::time::Instant::now(),
    );
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Some(incoming) = incoming else { break };
        let counters = &shared.counters;
        counters.connection_attempts.fetch_add(1, Ordering::Relaxed);
        let open = shared.table.open();
        // An Initial is cheap to forge and costs the node a handshake (and,
        // for a forged one, a place until it fails). Under load, and above
        // the attempt rate, make the client prove its address first: a
        // Retry costs one packet and no state; an honest client comes back
        // at once with the token and is let through. Validated attempts take
        // no token, so a flood of unvalidated ones never locks them out.
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && (open >= shared.limits.retry_above_connections
                || !budget.take(std::time::Instant::now()))
        {
            counters.connection_retries.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = incoming.retry() {
                error.into_incoming().ignore();
            }
            continue;
        }
        if open >= shared.limits.connections_max {
            counters.connections_refused.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        }
        let remote = incoming.remote_address();
        // Accepting decrypts the Initial first: a forged one fails here, at
        // the cost of one decryption, before it holds a place or a task.
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(error) => {
                counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%remote, %error, "connection attempt failed at once");
                continue;
            }
        };
        shared.table.opened();
        let shared = shared.clone();
        // One span per connection; the session records the account once
        // authenticated.
        let span = tracing::info_span!(
            "connection",
            %remote,
            account = tracing::field::Empty
        );
        connections.spawn(
            async move {
                session::serve_connection(connecting, shared.clone()).await;
                shared.table.closed();
            }
            .instrument(span),
        );
    }
    // Shutting down: sessions see the flag, finish what is in flight and close.
    while connections.join_next().await.is_some() {}
}
