//! Replication between replicas: Raft's RPCs over QUIC with mutual TLS on
//! the replication ALPN ([`crate::tls::PEER_ALPN`]).
//!
//! Each RPC is one bidirectional stream: the caller writes one MessagePack
//! [`PeerRequest`] and finishes its side, the callee answers with one
//! [`PeerResponse`] and finishes. Both sides present certificates and accept
//! only the replicas they know ([`PeerTrust`]: the cluster's membership, and
//! before any membership the peers `init` recorded), so nothing
//! unauthenticated reaches Raft. One QUIC connection per peer is shared by
//! all of Raft's streams to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tapledger_actors::raft::{Raft, RaftMetrics, TypeConfig};
use tapledger_actors::{ReplicaId, ReplicaInfo};
use tapledger_certs::{Fingerprint, Identity};
use tokio::task::JoinSet;

use crate::tls::{self, PeerTrust};

/// Bytes of one replication message at most (a batch of log entries or a
/// snapshot chunk; see the Raft payload limits in `tapledger-actors`).
pub const PEER_MESSAGE_BYTES_MAX: usize = 256 * 1024 * 1024;
/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The name replicas present in the handshake; certificates are pinned by
/// fingerprint, so it only has to be a valid DNS name.
const PEER_SERVER_NAME: &str = "tapledger-replica";

/// One Raft RPC.
#[derive(Serialize, Deserialize)]
pub enum PeerRequest {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<ReplicaId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// The callee's answer to a [`PeerRequest`] of the same kind.
#[derive(Serialize, Deserialize)]
pub enum PeerResponse {
    Append(Result<AppendEntriesResponse<ReplicaId>, RaftError<ReplicaId>>),
    Vote(Result<VoteResponse<ReplicaId>, RaftError<ReplicaId>>),
    Snapshot(
        Result<InstallSnapshotResponse<ReplicaId>, RaftError<ReplicaId, InstallSnapshotError>>,
    ),
}

/// The QUIC transport settings of replication: large windows (log batches
/// and snapshot chunks are big), keep-alives so a dead peer is noticed.
pub fn peer_transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1024u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None)
        .stream_receive_window((16u32 * 1024 * 1024).into())
        .receive_window((64u32 * 1024 * 1024).into())
        .send_window(64 * 1024 * 1024)
        .keep_alive_interval(Some(Duration::from_millis(500)))
        .max_idle_timeout(Some(
            Duration::from_secs(5)
                .try_into()
                .expect("idle timeout fits QUIC's range"),
        ));
    Arc::new(transport)
}

/// The replication endpoint: it serves peers' RPCs and dials peers.
pub struct PeerEndpoint {
    pub endpoint: quinn::Endpoint,
    pub local_addr: SocketAddr,
    pub trust: PeerTrust,
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
}

impl PeerEndpoint {
    /// Binds the replication endpoint on `socket`.
    pub fn bind(
        socket: std::net::UdpSocket,
        identity: &Identity,
        trust: PeerTrust,
    ) -> Result<PeerEndpoint, crate::NodeError> {
        let crypto =
            tls::peer_server_crypto(identity.cert_chain(), identity.private_key(), trust.clone())?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(peer_transport());
        let local_addr = socket
            .local_addr()
            .map_err(|source| crate::NodeError::Bind {
                addr: "0.0.0.0:0".parse().expect("valid"),
                source,
            })?;
        let runtime = quinn::default_runtime().ok_or_else(|| crate::NodeError::Bind {
            addr: local_addr,
            source: std::io::Error::other("no async runtime for QUIC"),
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(|source| crate::NodeError::Bind {
            addr: local_addr,
            source,
        })?;
        Ok(PeerEndpoint {
            endpoint,
            local_addr,
            trust,
            chain: identity.cert_chain(),
            key: identity.private_key(),
        })
    }

    /// The Raft network that dials peers from this endpoint.
    pub fn network(&self) -> PeerNetwork {
        PeerNetwork {
            shared: Arc::new(NetworkShared {
                endpoint: self.endpoint.clone(),
                chain: self.chain.clone(),
                key: self.key.clone_key(),
                connections: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Serves peers' RPCs to `raft` until the endpoint is closed.
    pub fn serve(&self, raft: Raft) -> tokio::task::JoinHandle<()> {
        tokio::spawn(accept_loop(self.endpoint.clone(), raft))
    }
}

/// Keeps `trust` equal to the certificates of the replicas in the cluster's
/// membership, or to `known` (the peers `init` recorded) while this replica
/// has no membership yet. Ends when Raft stops.
pub fn follow_membership(
    raft: &Raft,
    trust: PeerTrust,
    known: Vec<Fingerprint>,
) -> tokio::task::JoinHandle<()> {
    let mut metrics = raft.metrics();
    tokio::spawn(async move {
        loop {
            let fingerprints = trusted_by(&metrics.borrow_and_update(), &known);
            trust.set(fingerprints);
            if metrics.changed().await.is_err() {
                return;
            }
        }
    })
}

fn trusted_by(metrics: &RaftMetrics, known: &[Fingerprint]) -> Vec<Fingerprint> {
    let members: Vec<Fingerprint> = metrics
        .membership_config
        .membership()
        .nodes()
        .filter_map(|(_, node)| Fingerprint::parse(&node.fingerprint).ok())
        .collect();
    if members.is_empty() {
        known.to_vec()
    } else {
        members
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, raft: Raft) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                connections.spawn(serve_peer(incoming, raft.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn serve_peer(incoming: quinn::Incoming, raft: Raft) {
    // The handshake already checked the peer's certificate.
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%error, "replication handshake failed");
            return;
        }
    };
    let mut calls = JoinSet::new();
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    calls.spawn(answer(send, recv, raft.clone()));
                }
                Err(error) => {
                    tracing::debug!(%error, remote = %connection.remote_address(), "replication connection ended");
                    break;
                }
            },
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
    calls.abort_all();
}

async fn answer(mut send: quinn::SendStream, mut recv: quinn::RecvStream, raft: Raft) {
    let request = match recv.read_to_end(PEER_MESSAGE_BYTES_MAX).await {
        Ok(bytes) => match rmp_serde::from_slice::<PeerRequest>(&bytes) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(%error, "undecodable replication request");
                return;
            }
        },
        Err(error) => {
            tracing::debug!(%error, "replication request not read");
            return;
        }
    };
    let response = match request {
        PeerRequest::Append(request) => PeerResponse::Append(raft.append_entries(request).await),
        PeerRequest::Vote(request) => PeerResponse::Vote(raft.vote(request).await),
        PeerRequest::Snapshot(request) => {
            PeerResponse::Snapshot(raft.install_snapshot(request).await)
        }
    };
    match rmp_serde::to_vec(&response) {
        Ok(bytes) => {
            if send.write_all(&bytes).await.is_ok() {
                let _ = send.finish();
                let _ = send.stopped().await;
            }
        }
        Err(error) => tracing::error!(%error, "replication answer could not be encoded"),
    }
}

struct NetworkShared {
    endpoint: quinn::Endpoint,
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    /// One connection per peer, reused by every RPC to it.
    connections: Mutex<HashMap<ReplicaId, quinn::Connection>>,
}

/// Raft's network over the replication endpoint.
#[derive(Clone)]
pub struct PeerNetwork {
    shared: Arc<NetworkShared>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: ReplicaId, node: &ReplicaInfo) -> PeerClient {
        PeerClient {
            target,
            node: node.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// Raft's client for one peer.
pub struct PeerClient {
    target: ReplicaId,
    node: ReplicaInfo,
    shared: Arc<NetworkShared>,
}

#[derive(Debug, thiserror::Error)]
#[error("replica {target} at {addr}: {reason}")]
struct PeerFailure {
    target: ReplicaId,
    addr: String,
    reason: String,
}

type RpcError<E = openraft::error::Infallible> =
    RPCError<ReplicaId, ReplicaInfo, RaftError<ReplicaId, E>>;

impl PeerClient {
    fn failure(&self, reason: impl std::fmt::Display) -> PeerFailure {
        PeerFailure {
            target: self.target,
            addr: self.node.peer_addr.clone(),
            reason: reason.to_string(),
        }
    }

    fn unreachable<E: std::error::Error>(&self, reason: impl std::fmt::Display) -> RpcError<E> {
        RPCError::Unreachable(Unreachable::new(&self.failure(reason)))
    }

    async fn connection<E: std::error::Error>(&self) -> Result<quinn::Connection, RpcError<E>> {
        if let Some(connection) = self
            .shared
            .connections
            .lock()
            .expect("connections lock")
            .get(&self.target)
            && connection.close_reason().is_none()
        {
            return Ok(connection.clone());
        }
        let fingerprint = Fingerprint::parse(&self.node.fingerprint)
            .map_err(|error| self.unreachable(format!("no certificate to pin: {error}")))?;
        let addr = tokio::net::lookup_host(&self.node.peer_addr)
            .await
            .map_err(|error| self.unreachable(error))?
            .next()
            .ok_or_else(|| self.unreachable("the address resolves to nothing"))?;
        let crypto = tls::peer_client_crypto(
            fingerprint,
            self.shared.chain.clone(),
            self.shared.key.clone_key(),
        )
        .map_err(|error| self.unreachable(error))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(peer_transport());
        let connecting = self
            .shared
            .endpoint
            .connect_with(config, addr, PEER_SERVER_NAME)
            .map_err(|error| self.unreachable(error))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| self.unreachable("no handshake within 2 s"))?
            .map_err(|error| self.unreachable(error))?;
        self.shared
            .connections
            .lock()
            .expect("connections lock")
            .insert(self.target, connection.clone());
        Ok(connection)
    }

    /// Sends `request` and reads its answer within `ttl`.
    async fn call<E: std::error::Error>(
        &self,
        request: &PeerRequest,
        ttl: Duration,
    ) -> Result<PeerResponse, RpcError<E>> {
        let bytes = rmp_serde::to_vec(request)
            .map_err(|error| RPCError::Network(NetworkError::new(&self.failure(error))))?;
        let connection = self.connection().await?;
        let exchange = async {
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|error| error.to_string())?;
            send.write_all(&bytes)
                .await
                .map_err(|error| error.to_string())?;
            send.finish().map_err(|error| error.to_string())?;
            recv.read_to_end(PEER_MESSAGE_BYTES_MAX)
                .await
                .map_err(|error| error.to_string())
        };
        let answer = match tokio::time::timeout(ttl, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(reason)) => {
                self.forget(&connection);
                return Err(RPCError::Network(NetworkError::new(&self.failure(reason))));
            }
            Err(_) => {
                // Either the peer is slow or the connection leads nowhere: a
                // peer that crashed and restarted on the same port does not
                // know this connection, and QUIC would notice only at the
                // idle timeout. Dial afresh next time rather than wait.
                self.forget(&connection);
                return Err(RPCError::Network(NetworkError::new(
                    &self.failure(format!("no answer within {ttl:?}")),
                )));
            }
        };
        rmp_serde::from_slice(&answer).map_err(|error| {
            RPCError::Network(NetworkError::new(
                &self.failure(format!("undecodable answer: {error}")),
            ))
        })
    }

    /// Drops the cached connection to this peer if it is still `connection`
    /// (another call may have replaced it already). Calls still using it
    /// finish on it; it closes when the last of them lets go.
    fn forget(&self, connection: &quinn::Connection) {
        let mut connections = self.shared.connections.lock().expect("connections lock");
        if connections
            .get(&self.target)
            .is_some_and(|cached| cached.stable_id() == connection.stable_id())
        {
            connections.remove(&self.target);
        }
    }

    fn remote<E: std::error::Error>(&self, error: RaftError<ReplicaId, E>) -> RpcError<E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            error,
        ))
    }

    fn mismatch<E: std::error::Error>(&self) -> RpcError<E> {
        RPCError::Network(NetworkError::new(
            &self.failure("answered a different kind of request"),
        ))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<ReplicaId>, RpcError> {
        match self
            .call(&PeerRequest::Append(rpc), option.hard_ttl())
            .await?
        {
            PeerResponse::Append(answer) => answer.map_err(|error| self.remote(error)),
            _ => Err(self.mismatch()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<ReplicaId>, RpcError<InstallSnapshotError>> {
        match self
            .call(&PeerRequest::Snapshot(rpc), option.hard_ttl())
            .await?
        {
            PeerResponse::Snapshot(answer) => answer.map_err(|error| self.remote(error)),
            _ => Err(self.mismatch()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ReplicaId>,
        option: RPCOption,
    ) -> Result<VoteResponse<ReplicaId>, RpcError> {
        match self
            .call(&PeerRequest::Vote(rpc), option.hard_ttl())
            .await?
        {
            PeerResponse::Vote(answer) => answer.map_err(|error| self.remote(error)),
            _ => Err(self.mismatch()),
        }
    }
}
