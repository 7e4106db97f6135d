//! The cluster the sim talks to and the phones it connects: an embedded
//! cluster (temporary data directories, generated certificates, loopback
//! ports; one replica or several, each on its own runtime) or a remote one
//! started by `tapledger-node run`, each replica pinned by its certificate.
//!
//! Everything goes over QUIC with the same client a phone app would use,
//! which finds the leader itself ([`ClientEndpoint::connect_leader`]); the
//! embedded replicas' ledger handles are used only to audit the books
//! afterwards and to kill and restart a replica for the failover fault.
//! Every network step is bounded by a timeout.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tapledger_certs::Fingerprint;
use tapledger_node::client::Session;
use tapledger_node::config::{DataDir, NodeConfig};
use tapledger_node::init::{init_cluster, load_admin_credential};
use tapledger_node::{
    ApiCredentials, ClientEndpoint, ClientError, Phone, ReplicaAddress, RunningNode,
};
use tapledger_protocol::{AccountId, Secret};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Account openings one admin connection has in flight (the node allows 256).
const OPENINGS_IN_FLIGHT_PER_CONNECTION: usize = 128;
/// Phones completing their handshake at once while the swarm connects.
const CONNECTS_IN_FLIGHT: usize = 64;
/// Attempts at one account opening that meets a change of leader.
const OPENING_ATTEMPTS: usize = 5;

/// Where the cluster is.
#[derive(Clone, Debug)]
pub enum Target {
    /// Start a cluster inside this process for the run.
    Embedded {
        /// `half_ttl` of the embedded replicas: short, so expiry faults
        /// finish soon.
        half_ttl: Duration,
        /// Replicas (voters); 1 is a cluster of one.
        replicas: usize,
    },
    /// A cluster started by `tapledger-node run`.
    Remote {
        /// Each replica: `host:port` of its phone listener and its
        /// certificate (`node.crt.pem`), to pin.
        replicas: Vec<(String, PathBuf)>,
        /// The admin credential file (`admin.key`), to open accounts with.
        admin: Option<PathBuf>,
    },
}

/// Thread names of the embedded replicas' runtimes start with this (Linux
/// keeps 15 bytes of a thread name): `node-rt-r1`, `node-rt-r2`, ...
pub const NODE_THREAD_PREFIX: &str = "node-rt";

/// Bound on the embedded cluster's final flush and on its audit.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on closing one connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Between the starts of two replicas of the embedded cluster.
const START_STAGGER: Duration = Duration::from_millis(97);
/// How long a killed replica's ports may take to be free again.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a phone's connection, waiting at most `CLOSE_TIMEOUT` (closing
/// waits for the stream's writer, which a stuck peer could hold).
pub async fn close_bounded(phone: Phone) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, phone.close()).await;
}

/// One replica of the embedded cluster: its node on its own runtime (so
/// its CPU time can be told apart), or nothing while it is down.
struct EmbeddedReplica {
    id: u64,
    address: ReplicaAddress,
    peer_addr: SocketAddr,
    config: NodeConfig,
    running: tokio::sync::Mutex<Option<Running>>,
}

struct Running {
    node: RunningNode,
    runtime: tokio::runtime::Runtime,
}

/// What the books look like on every live replica after the run.
#[derive(Debug)]
pub struct ClusterAudit {
    /// The leader's audit (the one the report shows).
    pub leader: tapledger_actors::AuditReport,
    /// Per replica: (id, applied index, audit ok).
    pub replicas: Vec<(u64, Option<u64>, bool)>,
    /// Whether every live replica applied the leader's last index and holds
    /// the same state digest.
    pub identical: bool,
    pub problems: Vec<String>,
}

/// A cluster started in this process, with its temporary data directories.
pub struct EmbeddedCluster {
    replicas: Vec<EmbeddedReplica>,
    _dir: tempfile::TempDir,
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(addr)
}

impl EmbeddedCluster {
    /// Starts `replicas` replicas on loopback and waits for a leader.
    pub async fn start(
        half_ttl: Duration,
        replicas: usize,
        step_timeout: Duration,
    ) -> anyhow::Result<(EmbeddedCluster, Secret)> {
        EmbeddedCluster::start_in(&std::env::temp_dir(), replicas, step_timeout, |config| {
            config.ledger.half_ttl = half_ttl
        })
        .await
    }

    /// Like [`EmbeddedCluster::start`], with the data directories in a
    /// temporary directory under `parent` and each replica's settings
    /// adjusted by `tune`.
    pub async fn start_in(
        parent: &std::path::Path,
        replicas: usize,
        step_timeout: Duration,
        tune: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<(EmbeddedCluster, Secret)> {
        if !(1..=9).contains(&replicas) {
            bail!("--replicas must be 1 to 9");
        }
        let dir = tempfile::Builder::new()
            .prefix("tapledger-sim-")
            .tempdir_in(parent)
            .context("cannot create a temporary data directory")?;
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("literal");
        let mut sockets = Vec::with_capacity(replicas);
        for _ in 0..replicas {
            sockets.push((
                bind(loopback).context("cannot bind a loopback port")?,
                bind(loopback).context("cannot bind a loopback port")?,
            ));
        }
        let dirs: Vec<DataDir> = (1..=replicas)
            .map(|id| DataDir::new(dir.path().join(format!("replica-{id}"))))
            .collect();
        let addrs: Vec<(String, String)> = sockets
            .iter()
            .map(|(phones, peers)| {
                Ok((
                    phones.local_addr()?.to_string(),
                    peers.local_addr()?.to_string(),
                ))
            })
            .collect::<std::io::Result<_>>()?;
        let names = ["localhost".to_string(), "127.0.0.1".to_string()];
        let initialised = init_cluster(&dirs, &addrs, &names)
            .context("cannot initialise the embedded cluster's data directories")?;
        let admin = load_admin_credential(&dirs[0].admin())?;
        let mut members = Vec::with_capacity(replicas);
        for (index, ((phones, peers), (info, report))) in
            sockets.into_iter().zip(initialised).enumerate()
        {
            let mut config = NodeConfig::new(dirs[index].path(), phones.local_addr()?);
            config.peer_listen = Some(peers.local_addr()?);
            tune(&mut config);
            members.push((
                EmbeddedReplica {
                    id: index as u64 + 1,
                    address: ReplicaAddress {
                        addr: info.client_addr.parse()?,
                        fingerprint: report.fingerprint,
                    },
                    peer_addr: peers.local_addr()?,
                    config,
                    running: tokio::sync::Mutex::new(None),
                },
                phones,
                peers,
            ));
        }
        let mut sockets = Vec::with_capacity(members.len());
        let mut cluster = EmbeddedCluster {
            replicas: Vec::with_capacity(members.len()),
            _dir: dir,
        };
        for (replica, phones, peers) in members {
            cluster.replicas.push(replica);
            sockets.push((phones, peers));
        }
        let starting: Vec<_> = cluster
            .replicas
            .iter()
            .zip(sockets)
            .enumerate()
            .map(|(index, (replica, (phones, peers)))| async move {
                // Replicas on separate machines never start in the same
                // millisecond; started together, their Raft timers would
                // tick in step and their elections collide (split votes).
                tokio::time::sleep(START_STAGGER * index as u32).await;
                start_replica(replica, phones, peers).await
            })
            .collect();
        // Every replica starts at about once: a cluster of several elects a
        // leader only once a majority runs.
        let started = tokio::time::timeout(step_timeout * 3, futures_join_all(starting))
            .await
            .map_err(|_| {
                anyhow!(
                    "the embedded cluster did not start within {:?}",
                    step_timeout * 3
                )
            })?;
        for (replica, running) in cluster.replicas.iter().zip(started) {
            *replica.running.lock().await = Some(running?);
        }
        cluster.wait_settled(step_timeout * 3).await?;
        Ok((cluster, admin))
    }

    /// Waits until some replica leads and every running replica follows it
    /// in the same term (a replica that started late may first call an
    /// election of its own).
    pub async fn wait_settled(&self, limit: Duration) -> anyhow::Result<usize> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(index) = self.leader().await
                && let Some(leader) = self.ledger(index).await
            {
                let status = leader.status();
                let mut agree = true;
                for other in 0..self.replicas.len() {
                    if let Some(ledger) = self.ledger(other).await {
                        let theirs = ledger.status();
                        agree &= theirs.leader == Some(status.id) && theirs.term == status.term;
                    }
                }
                if agree {
                    return Ok(index);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the embedded cluster did not settle on one leader within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many replicas the cluster has (up or down).
    pub fn size(&self) -> usize {
        self.replicas.len()
    }

    /// Where phones reach each replica.
    pub fn addresses(&self) -> Vec<ReplicaAddress> {
        self.replicas
            .iter()
            .map(|replica| replica.address)
            .collect()
    }

    /// The replica that leads and takes writes now, by index.
    pub async fn leader(&self) -> Option<usize> {
        for (index, replica) in self.replicas.iter().enumerate() {
            if let Some(running) = &*replica.running.lock().await
                && running.node.ledger().is_serving()
            {
                return Some(index);
            }
        }
        None
    }

    /// Waits until some replica leads.
    pub async fn wait_leader(&self, limit: Duration) -> anyhow::Result<usize> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(index) = self.leader().await {
                return Ok(index);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("no replica of the embedded cluster leads after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn replica_id(&self, index: usize) -> u64 {
        self.replicas[index].id
    }

    /// Kills replica `index` as a crash would (no flush, no goodbye); its
    /// files stay for [`EmbeddedCluster::restart`].
    pub async fn kill(&self, index: usize) -> anyhow::Result<()> {
        let running = self.replicas[index].running.lock().await.take();
        let Some(Running { node, runtime }) = running else {
            bail!("replica {} is not running", self.replicas[index].id);
        };
        let killing = runtime.spawn(node.kill());
        let _ = tokio::time::timeout(Duration::from_secs(10), killing).await;
        runtime.shutdown_background();
        Ok(())
    }

    /// Starts a killed replica again on its data directory and ports.
    pub async fn restart(&self, index: usize) -> anyhow::Result<()> {
        let replica = &self.replicas[index];
        let mut slot = replica.running.lock().await;
        if slot.is_some() {
            bail!("replica {} is already running", replica.id);
        }
        let deadline = tokio::time::Instant::now() + REBIND_TIMEOUT;
        let (phones, peers) = loop {
            match (bind(replica.address.addr), bind(replica.peer_addr)) {
                (Ok(phones), Ok(peers)) => break (phones, peers),
                (Err(error), _) | (_, Err(error)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(error).context("cannot bind the killed replica's ports again");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        *slot = Some(start_replica(replica, phones, peers).await?);
        Ok(())
    }

    /// Waits until every running replica has applied what the leader has,
    /// then audits each and compares their state digests.
    pub async fn audit(&self) -> anyhow::Result<ClusterAudit> {
        let leader = self.wait_leader(AUDIT_TIMEOUT).await?;
        let leader_ledger = self.ledger(leader).await.expect("the leader runs");
        tokio::time::timeout(AUDIT_TIMEOUT, leader_ledger.flush())
            .await
            .map_err(|_| anyhow!("the leader did not flush within {AUDIT_TIMEOUT:?}"))?
            .context("flushing the leader before the audit")?;
        let target = leader_ledger.status().applied_index;
        let mut problems = Vec::new();
        let mut replicas = Vec::new();
        let mut digests = Vec::new();
        let mut leader_report = None;
        for index in 0..self.replicas.len() {
            let Some(ledger) = self.ledger(index).await else {
                problems.push(format!("replica {} is down", self.replicas[index].id));
                continue;
            };
            let deadline = tokio::time::Instant::now() + AUDIT_TIMEOUT;
            while ledger.status().applied_index < target && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let applied = ledger.status().applied_index;
            let store = ledger.store().clone();
            let (report, digest) = tokio::task::spawn_blocking(move || {
                Ok::<_, tapledger_actors::StoreError>((store.audit()?, store.digest()?))
            })
            .await
            .map_err(|error| anyhow!("the audit task failed: {error}"))?
            .context("the audit could not read a replica's ledger")?;
            let id = self.replicas[index].id;
            if !report.is_ok() {
                problems.push(format!("replica {id}: audit failed"));
            }
            if applied != target {
                problems.push(format!(
                    "replica {id} applied up to {applied:?}, the leader {target:?}"
                ));
            }
            replicas.push((id, applied, report.is_ok()));
            digests.push((id, digest));
            if index == leader {
                leader_report = Some(report);
            }
        }
        let identical = digests.windows(2).all(|pair| pair[0].1 == pair[1].1)
            && replicas.iter().all(|(_, applied, _)| *applied == target);
        if !digests.windows(2).all(|pair| pair[0].1 == pair[1].1) {
            problems.push("replicas that applied the same log hold different ledgers".into());
        }
        Ok(ClusterAudit {
            leader: leader_report.expect("the leader was audited"),
            replicas,
            identical,
            problems,
        })
    }

    /// Replica `index`'s ledger, if it runs.
    pub async fn ledger(&self, index: usize) -> Option<Arc<tapledger_actors::Ledger>> {
        self.replicas[index]
            .running
            .lock()
            .await
            .as_ref()
            .map(|running| running.node.ledger().clone())
    }

    /// Stops every replica cleanly (bounded), their runtimes, and removes
    /// the data directories.
    pub async fn stop(self) {
        let grace = Duration::from_secs(5);
        let mut stopping = Vec::new();
        for replica in &self.replicas {
            if let Some(Running { node, runtime }) = replica.running.lock().await.take() {
                let task = runtime.spawn(node.shutdown(grace));
                stopping.push((task, runtime));
            }
        }
        for (task, runtime) in stopping {
            if tokio::time::timeout(grace * 2, task).await.is_err() {
                eprintln!(
                    "tapledger-sim: an embedded replica did not shut down within {:?}",
                    grace * 2
                );
            }
            runtime.shutdown_background();
        }
    }
}

/// Joins futures in order without a dependency on `futures`.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut set = Vec::with_capacity(futures.len());
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (index, future) in pinned.iter_mut().enumerate() {
            if done[index].is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(output) => done[index] = Some(output),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    set.extend(
        done.into_iter()
            .map(|output| output.expect("every future finished")),
    );
    set
}

/// Starts one replica's node on a new runtime of its own.
async fn start_replica(
    replica: &EmbeddedReplica,
    phones: std::net::UdpSocket,
    peers: std::net::UdpSocket,
) -> anyhow::Result<Running> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(format!("{NODE_THREAD_PREFIX}-r{}", replica.id))
        .build()
        .context("cannot start an embedded replica's runtime")?;
    let starting = runtime.spawn(RunningNode::start_on(
        replica.config.clone(),
        phones,
        Some(peers),
    ));
    match starting.await {
        Ok(Ok(node)) => Ok(Running { node, runtime }),
        Ok(Err(error)) => {
            runtime.shutdown_background();
            Err(anyhow!("cannot start replica {}: {error}", replica.id))
        }
        Err(error) => {
            runtime.shutdown_background();
            Err(anyhow!(
                "replica {}'s start task failed: {error}",
                replica.id
            ))
        }
    }
}

/// Opens QUIC connections to the cluster's leader over a few shared client
/// endpoints (one UDP socket each; each carries many connections).
pub struct Connector {
    endpoints: Vec<ClientEndpoint>,
    next: AtomicUsize,
    /// Every replica; connections go to the leader.
    pub replicas: Vec<ReplicaAddress>,
    /// The replica last found leading, by index: tried first.
    leader: AtomicUsize,
    pub admin: Option<Secret>,
    /// Bound on every single network step (connect, one answer).
    pub step_timeout: Duration,
}

impl Connector {
    pub fn new(
        replicas: Vec<ReplicaAddress>,
        admin: Option<Secret>,
        endpoints: usize,
        step_timeout: Duration,
    ) -> anyhow::Result<Connector> {
        let first = replicas.first().context("no replica to connect to")?;
        let endpoints = (0..endpoints.max(1))
            .map(|_| ClientEndpoint::new(first.fingerprint, first.addr))
            .collect::<Result<Vec<_>, _>>()
            .context("cannot create a client endpoint")?;
        Ok(Connector {
            endpoints,
            next: AtomicUsize::new(0),
            replicas,
            leader: AtomicUsize::new(0),
            admin,
            step_timeout,
        })
    }

    /// Tells the connector which replica leads (when the caller knows).
    pub fn prefer(&self, index: usize) {
        self.leader.store(index, Ordering::Relaxed);
    }

    /// A connection to the leader, authenticated as `account` when given,
    /// and the index of the replica it reached. Follows "not the leader"
    /// answers and tries every replica, within the step timeout (three times
    /// it while a leader is being elected).
    pub async fn connect_leader(
        &self,
        account: Option<(AccountId, &Secret)>,
    ) -> Result<(Phone, Option<Session>, usize), ClientError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        let first = self.leader.load(Ordering::Relaxed);
        let connected = self.endpoints[index]
            .connect_leader(&self.replicas, first, account, self.step_timeout * 3)
            .await?;
        self.leader.store(connected.2, Ordering::Relaxed);
        Ok(connected)
    }

    /// A new connection with its request stream, not authenticated, to the
    /// replica last found leading.
    pub async fn connect(&self) -> anyhow::Result<Phone> {
        self.connect_leader(None)
            .await
            .map(|(phone, _, _)| phone)
            .map_err(|error| anyhow!("cannot connect to the cluster: {error}"))
    }

    /// A new connection to the leader authenticated as `account`, with the
    /// index of the replica it reached.
    pub async fn connect_phone(
        &self,
        account: AccountId,
        key: &Secret,
    ) -> anyhow::Result<(Phone, Session, usize)> {
        match self.connect_leader(Some((account, key))).await {
            Ok((phone, Some(session), replica)) => Ok((phone, session, replica)),
            Ok((phone, None, _)) => {
                close_bounded(phone).await;
                bail!("account {account}: no session")
            }
            Err(error) => bail!("account {account} cannot authenticate: {error}"),
        }
    }

    /// A new connection to the leader authenticated as `account`.
    pub async fn connect_as(
        &self,
        account: AccountId,
        key: &Secret,
    ) -> anyhow::Result<(Phone, Session)> {
        match self.connect_leader(Some((account, key))).await {
            Ok((phone, Some(session), _)) => Ok((phone, session)),
            Ok((phone, None, _)) => {
                close_bounded(phone).await;
                bail!("account {account}: no session")
            }
            Err(error) => bail!("account {account} cannot authenticate: {error}"),
        }
    }

    /// Tries a QUIC handshake with every replica at once, each within
    /// `limit`: the index of one that completed it (a replica is up, leading
    /// or not), or what each replica did instead.
    pub async fn probe(&self, limit: Duration) -> Result<usize, String> {
        let endpoint = &self.endpoints[0];
        let attempts = self
            .replicas
            .iter()
            .enumerate()
            .map(|(index, replica)| async move {
                match tokio::time::timeout(limit, endpoint.connect_to(replica)).await {
                    Ok(Ok(phone)) => {
                        tokio::spawn(close_bounded(phone));
                        Ok(index)
                    }
                    Ok(Err(error)) => Err(format!("{}: {error}", replica.addr)),
                    Err(_) => Err(format!(
                        "{}: no QUIC handshake within {limit:?}",
                        replica.addr
                    )),
                }
            })
            .collect();
        let mut errors = Vec::new();
        for attempt in futures_join_all(attempts).await {
            match attempt {
                Ok(index) => return Ok(index),
                Err(error) => errors.push(error),
            }
        }
        Err(errors.join("; "))
    }

    pub fn admin(&self) -> anyhow::Result<&Secret> {
        self.admin.as_ref().ok_or_else(|| {
            anyhow!(
                "opening accounts needs the node's admin credential: pass --admin FILE (admin.key)"
            )
        })
    }

    /// Waits (bounded, 2 s in all) until every connection of every endpoint
    /// has closed.
    pub async fn wait_idle(&self) {
        let waits = self
            .endpoints
            .iter()
            .map(|endpoint| tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()))
            .collect();
        futures_join_all(waits).await;
    }
}

/// The cluster to talk to: connected, and the embedded cluster if the sim
/// owns it.
pub struct Connected {
    pub connector: Arc<Connector>,
    pub embedded: Option<Arc<EmbeddedCluster>>,
    /// "embedded cluster of 3 replicas on 127.0.0.1" or the remote addresses.
    pub label: String,
}

impl Target {
    /// Starts the embedded cluster or resolves and pins the remote one.
    pub async fn connect(
        &self,
        endpoints: usize,
        step_timeout: Duration,
    ) -> anyhow::Result<Connected> {
        match self {
            Target::Embedded { half_ttl, replicas } => {
                let (cluster, admin) =
                    EmbeddedCluster::start(*half_ttl, *replicas, step_timeout).await?;
                let addresses = cluster.addresses();
                let connector =
                    Connector::new(addresses.clone(), Some(admin), endpoints, step_timeout)?;
                if let Some(leader) = cluster.leader().await {
                    connector.prefer(leader);
                }
                let label = if *replicas == 1 {
                    format!("embedded node on {}", addresses[0].addr)
                } else {
                    let ports: Vec<String> = addresses
                        .iter()
                        .map(|address| address.addr.port().to_string())
                        .collect();
                    format!(
                        "embedded cluster of {replicas} replicas on 127.0.0.1 ports {}",
                        ports.join(", ")
                    )
                };
                Ok(Connected {
                    label,
                    connector: Arc::new(connector),
                    embedded: Some(Arc::new(cluster)),
                })
            }
            Target::Remote { replicas, admin } => {
                let mut addresses = Vec::with_capacity(replicas.len());
                for (address, cert) in replicas {
                    let node = address
                        .to_socket_addrs()
                        .with_context(|| format!("cannot resolve --node {address}"))?
                        .next()
                        .ok_or_else(|| anyhow!("--node {address} resolves to no address"))?;
                    let certificates =
                        tapledger_certs::load_certificates(cert).with_context(|| {
                            format!("cannot read the node certificate {}", cert.display())
                        })?;
                    let leaf = certificates
                        .first()
                        .ok_or_else(|| anyhow!("{} holds no certificate", cert.display()))?;
                    addresses.push(ReplicaAddress {
                        addr: node,
                        fingerprint: Fingerprint::of(leaf),
                    });
                }
                let admin = match admin {
                    Some(path) => Some(load_admin_credential(path).with_context(|| {
                        format!("cannot read the admin credential {}", path.display())
                    })?),
                    None => None,
                };
                let label = match &addresses[..] {
                    [one] => format!("node at {}", one.addr),
                    many => format!(
                        "cluster at {}",
                        many.iter()
                            .map(|address| address.addr.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                let connector = Connector::new(addresses, admin, endpoints, step_timeout)?;
                Ok(Connected {
                    label,
                    connector: Arc::new(connector),
                    embedded: None,
                })
            }
        }
    }
}

/// A phone's account: its id and the API key only the phone knows.
#[derive(Clone, Debug)]
pub struct Account {
    pub id: AccountId,
    pub key: Secret,
}

/// Opens one account per balance over a few admin connections, pipelining
/// the requests on each.
pub async fn open_accounts(
    connector: &Arc<Connector>,
    balances: &[u64],
    admin_connections: usize,
    show_progress: bool,
) -> anyhow::Result<Vec<Account>> {
    let admin = connector.admin()?.clone();
    let progress = progress_bar(balances.len() as u64, "accounts opened", show_progress);
    let connections = admin_connections.clamp(1, balances.len().max(1));
    let mut admin_phones = Vec::with_capacity(connections);
    for _ in 0..connections {
        admin_phones.push(Arc::new(connector.connect().await?));
    }
    let semaphores: Vec<Arc<Semaphore>> = (0..connections)
        .map(|_| Arc::new(Semaphore::new(OPENINGS_IN_FLIGHT_PER_CONNECTION)))
        .collect();
    let mut tasks = JoinSet::new();
    let mut accounts: Vec<Option<Account>> = vec![None; balances.len()];
    let mut first_error = None;
    let mut store =
        |done: Result<anyhow::Result<(usize, Account)>, tokio::task::JoinError>| match done {
            Ok(Ok((index, account))) => accounts[index] = Some(account),
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(error) => {
                first_error.get_or_insert(anyhow!("an opening task failed: {error}"));
            }
        };
    for (index, &balance) in balances.iter().enumerate() {
        let lane = index % connections;
        let permit = semaphores[lane]
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let phone = admin_phones[lane].clone();
        let admin = admin.clone();
        let connector = connector.clone();
        let progress = progress.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let opened = open_one(&connector, &phone, &admin, index, balance).await;
            progress.inc(1);
            opened.map(|account| (index, account))
        });
        // Reap finished openings as we go so the set stays small.
        while let Some(done) = tasks.try_join_next() {
            store(done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        store(done);
    }
    progress.finish_and_clear();
    for phone in admin_phones {
        if let Ok(phone) = Arc::try_unwrap(phone) {
            close_bounded(phone).await;
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    accounts
        .into_iter()
        .enumerate()
        .map(|(index, account)| account.ok_or_else(|| anyhow!("account {index} was not opened")))
        .collect()
}

/// Opens one account on `phone`; if that replica does not lead (any more),
/// on a new connection to the leader, a few times at most. (An opening is
/// not idempotent: one that met a change of leader mid-commit may exist
/// twice; the sim never uses the spare.)
async fn open_one(
    connector: &Connector,
    phone: &Phone,
    admin: &Secret,
    index: usize,
    balance: u64,
) -> anyhow::Result<Account> {
    let step_timeout = connector.step_timeout;
    let credentials = ApiCredentials::generate();
    let (account_type, bank_name) = ACCOUNT_KINDS[index % ACCOUNT_KINDS.len()];
    let mut spare: Option<Phone> = None;
    let mut last = None;
    for _ in 0..OPENING_ATTEMPTS {
        let on = spare.as_ref().unwrap_or(phone);
        let opened = tokio::time::timeout(
            step_timeout,
            on.open_account(admin, account_type, bank_name, &credentials, balance),
        )
        .await;
        match opened {
            Ok(Ok(id)) => {
                if let Some(spare) = spare {
                    close_bounded(spare).await;
                }
                return Ok(Account {
                    id,
                    key: credentials.key,
                });
            }
            Ok(Err(error)) if error.is_failover() => {
                if let ClientError::NotLeader {
                    leader: Some(leader),
                    ..
                } = &error
                    && let Some(at) = connector
                        .replicas
                        .iter()
                        .position(|replica| replica.addr.to_string() == leader.addr)
                {
                    connector.prefer(at);
                }
                last = Some(error);
                if let Some(old) = spare.take() {
                    close_bounded(old).await;
                }
                spare = Some(connector.connect().await?);
            }
            Ok(Err(error)) => bail!("opening an account failed: {error}"),
            Err(_) => bail!("opening an account: no answer within {step_timeout:?}"),
        }
    }
    if let Some(spare) = spare {
        close_bounded(spare).await;
    }
    bail!(
        "opening an account failed {OPENING_ATTEMPTS} times: {}",
        last.map_or_else(String::new, |error| error.to_string())
    )
}

/// Account types and banks the sim's phone users hold (the prototype's
/// analysts look at both).
const ACCOUNT_KINDS: [(&str, &str); 4] = [
    ("checking", "Harbor Bank"),
    ("savings", "Harbor Bank"),
    ("checking", "Northwind Credit Union"),
    ("checking", "Tap Savings & Loan"),
];

/// Connects one phone per account, each over its own QUIC connection, and
/// authenticates it. Returns the phones in account order (each with the
/// index of the replica it reached) and the node's parameters as the first
/// phone learned them.
pub async fn connect_phones(
    connector: &Arc<Connector>,
    accounts: &[Account],
    show_progress: bool,
) -> anyhow::Result<(Vec<(Phone, usize)>, Session)> {
    let progress = progress_bar(accounts.len() as u64, "phones connected", show_progress);
    let semaphore = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for (index, account) in accounts.iter().enumerate() {
        let permit = semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let connector = connector.clone();
        let account = account.clone();
        let progress = progress.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let connected = connector.connect_phone(account.id, &account.key).await;
            progress.inc(1);
            connected.map(|(phone, session, replica)| (index, (phone, replica), session))
        });
    }
    let mut phones: Vec<Option<(Phone, usize)>> = (0..accounts.len()).map(|_| None).collect();
    let mut session = None;
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        match done.context("a connecting task panicked")? {
            Ok((index, phone, this_session)) => {
                phones[index] = Some(phone);
                session.get_or_insert(this_session);
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    progress.finish_and_clear();
    if let Some(error) = first_error {
        for (phone, _) in phones.into_iter().flatten() {
            close_bounded(phone).await;
        }
        return Err(error);
    }
    let session = session.ok_or_else(|| anyhow!("no phone to connect"))?;
    Ok((
        phones
            .into_iter()
            .map(|phone| phone.expect("every phone connected"))
            .collect(),
        session,
    ))
}

/// A progress bar on stderr, hidden when stderr is not a terminal or when
/// `show` is false.
pub fn progress_bar(length: u64, what: &str, show: bool) -> ProgressBar {
    let bar = if show {
        ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:20}}] {{human_pos}}/{{human_len}} {what} {{msg}}"
        ))
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    bar
}

/// Seconds since `started`, for reports.
pub fn seconds_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}
