//! The QUIC service: a quinn endpoint configured for untrusted clients, an
//! accept loop that caps connections and asks for address validation under
//! load, a task per connection, and a clean shutdown.
//!
//! Business rules are not here: sessions translate frames into ledger calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tapledger_actors::{Ledger, LedgerConfig};
use tapledger_certs::{Fingerprint, Identity};
use tapledger_protocol::Secret;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::{Limits, NodeConfig};
use crate::session;
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Init(#[from] crate::init::InitError),
    #[error(transparent)]
    Ledger(#[from] tapledger_actors::LedgerError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Counters the node keeps about its clients.
#[derive(Debug, Default)]
pub struct NodeCounters {
    pub connections_open: AtomicUsize,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
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
    /// Flips to true when the node starts shutting down.
    pub shutdown: watch::Receiver<bool>,
}

/// A node serving on a socket. Drop it only after [`RunningNode::shutdown`].
pub struct RunningNode {
    pub local_addr: SocketAddr,
    pub fingerprint: Fingerprint,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    shutdown: watch::Sender<bool>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    /// Opens the ledger in the data directory and starts serving.
    pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
        let identity = Identity::load(&config.data_dir.cert(), &config.data_dir.key())
            .map_err(crate::init::InitError::from)?;
        let admin_credential = crate::init::load_admin_credential(&config.data_dir.admin())?;
        let mut ledger_config = LedgerConfig::new(config.data_dir.ledger());
        ledger_config.half_ttl = config.half_ttl;
        ledger_config.max_amount = config.max_amount;
        ledger_config.matcher_shards = config.matcher_shards;
        let ledger = Arc::new(Ledger::open(ledger_config).await?);
        RunningNode::serve(
            config.listen,
            &identity,
            admin_credential,
            config.limits,
            ledger,
        )
    }

    /// Serves an already open ledger.
    pub fn serve(
        listen: SocketAddr,
        identity: &Identity,
        admin_credential: Secret,
        limits: Limits,
        ledger: Arc<Ledger>,
    ) -> Result<RunningNode, NodeError> {
        let server_config = server_config(identity, &limits)?;
        let endpoint =
            quinn::Endpoint::server(server_config, listen).map_err(|source| NodeError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = endpoint.local_addr().map_err(|source| NodeError::Bind {
            addr: listen,
            source,
        })?;
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let shared = Arc::new(Shared {
            ledger,
            admin_credential,
            limits,
            counters: Arc::default(),
            shutdown: shutdown_receiver,
        });
        let accept_loop = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        tracing::info!(%local_addr, fingerprint = %identity.fingerprint(), "node listening");
        Ok(RunningNode {
            local_addr,
            fingerprint: identity.fingerprint(),
            shared,
            endpoint,
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
    /// after its last commit.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        // The accept loop drains its connection tasks before it returns.
        if tokio::time::timeout(grace, self.accept_loop).await.is_err() {
            tracing::warn!("connections did not finish within the grace period");
        }
        self.endpoint
            .close(session::CLOSE_SHUTDOWN, b"node shutting down");
        self.endpoint.wait_idle().await;
        match Arc::try_unwrap(self.shared) {
            Ok(shared) => match Arc::try_unwrap(shared.ledger) {
                Ok(ledger) => ledger.close().await,
                Err(_) => tracing::warn!("ledger still referenced at shutdown; not closing it"),
            },
            Err(_) => tracing::warn!("sessions still running at shutdown"),
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
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Some(incoming) = incoming else { break };
        let open = shared.counters.connections_open.load(Ordering::Relaxed);
        if open >= shared.limits.connections_max {
            shared
                .counters
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        }
        if open >= shared.limits.retry_above_connections
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            // Under load, make the client prove its address before the handshake.
            let _ = incoming.retry();
            continue;
        }
        shared
            .counters
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        // One span per connection; the session records the account once
        // authenticated.
        let span = tracing::info_span!(
            "connection",
            remote = %incoming.remote_address(),
            account = tracing::field::Empty
        );
        connections.spawn(
            async move {
                session::serve_connection(incoming, shared.clone()).await;
                shared
                    .counters
                    .connections_open
                    .fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    }
    // Shutting down: sessions see the flag, finish what is in flight and close.
    while connections.join_next().await.is_some() {}
}
