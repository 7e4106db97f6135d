//! The node the sim talks to and the phones it connects: an embedded node
//! (temporary data directory, generated certificate, loopback port) or a
//! remote one started by `tapledger-node run`, pinned by its certificate.
//!
//! Everything goes over QUIC with the same client a phone app would use; the
//! embedded node's ledger handle is used only to audit the books afterwards.
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
use tapledger_node::init::{init_data_dir, load_admin_credential};
use tapledger_node::{ApiCredentials, ClientEndpoint, Phone, RunningNode};
use tapledger_protocol::{AccountId, Secret};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The name the client asks for in TLS; the pin, not the name, is checked.
const SERVER_NAME: &str = "localhost";
/// Account openings one admin connection has in flight (the node allows 256).
const OPENINGS_IN_FLIGHT_PER_CONNECTION: usize = 128;
/// Phones completing their handshake at once while the swarm connects.
const CONNECTS_IN_FLIGHT: usize = 64;

/// Where the node is.
#[derive(Clone, Debug)]
pub enum Target {
    /// Start a node inside this process for the run.
    Embedded {
        /// `half_ttl` of the embedded node: short, so expiry faults finish soon.
        half_ttl: Duration,
    },
    /// A node started by `tapledger-node run`.
    Remote {
        /// `host:port` of its QUIC listener.
        address: String,
        /// Its certificate (`node.crt.pem`), to pin.
        cert: PathBuf,
        /// Its admin credential file (`admin.key`), to open accounts with.
        admin: Option<PathBuf>,
    },
}

/// A node started in this process on its own tokio runtime (threads named
/// `node-rt-worker`), so that it competes with the phones for CPU the way a
/// separate process would and its CPU time can be told apart; with its
/// temporary data directory.
pub struct EmbeddedNode {
    /// Always `Some` until `stop` or drop.
    node: Option<RunningNode>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

/// Bound on the embedded node's final flush and on its audit.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on closing one connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes a phone's connection, waiting at most [`CLOSE_TIMEOUT`] (closing
/// waits for the stream's writer, which a stuck peer could hold).
pub async fn close_bounded(phone: Phone) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, phone.close()).await;
}

/// Thread name of the embedded node's runtime (at most 15 bytes: Linux
/// truncates thread names there).
pub const NODE_THREAD_NAME: &str = "node-rt-worker";

impl EmbeddedNode {
    pub async fn start(
        half_ttl: Duration,
        step_timeout: Duration,
    ) -> anyhow::Result<(EmbeddedNode, Secret)> {
        let dir = tempfile::Builder::new()
            .prefix("tapledger-sim-")
            .tempdir()
            .context("cannot create a temporary data directory")?;
        let data_dir = DataDir::new(dir.path().join("data"));
        init_data_dir(&data_dir, &["localhost".into(), "127.0.0.1".into()])
            .context("cannot initialise the embedded node's data directory")?;
        let mut config = NodeConfig::new(data_dir.path(), "127.0.0.1:0".parse().expect("literal"));
        config.ledger.half_ttl = half_ttl;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name(NODE_THREAD_NAME)
            .build()
            .context("cannot start the embedded node's runtime")?;
        let mut embedded = EmbeddedNode {
            node: None,
            runtime: Some(runtime),
            _dir: dir,
        };
        let starting = embedded.runtime().spawn(RunningNode::start(config));
        let node = tokio::time::timeout(step_timeout, starting)
            .await
            .map_err(|_| anyhow!("the embedded node did not start within {step_timeout:?}"))?
            .context("the embedded node's start task failed")?
            .context("cannot start the embedded node")?;
        embedded.node = Some(node);
        let admin = load_admin_credential(&data_dir.admin())?;
        Ok((embedded, admin))
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("running until stopped")
    }

    pub fn node(&self) -> &RunningNode {
        self.node.as_ref().expect("running until stopped")
    }

    /// The node's own audit of its books, after its last commit (bounded).
    pub async fn audit(&self) -> anyhow::Result<tapledger_actors::AuditReport> {
        let ledger = self.node().ledger().clone();
        tokio::time::timeout(AUDIT_TIMEOUT, ledger.flush())
            .await
            .map_err(|_| anyhow!("the ledger did not flush within {AUDIT_TIMEOUT:?}"))?
            .context("flushing the ledger before the audit")?;
        let auditing = tokio::task::spawn_blocking(move || ledger.audit());
        tokio::time::timeout(AUDIT_TIMEOUT, auditing)
            .await
            .map_err(|_| anyhow!("the audit did not finish within {AUDIT_TIMEOUT:?}"))?
            .map_err(|error| anyhow!("the audit task failed: {error}"))?
            .context("the audit could not read the ledger")
    }

    /// Stops the node cleanly (bounded), its runtime, and removes its data
    /// directory.
    pub async fn stop(mut self) {
        let grace = Duration::from_secs(5);
        if let Some(node) = self.node.take() {
            let stopping = self.runtime().spawn(node.shutdown(grace));
            if tokio::time::timeout(grace * 2, stopping).await.is_err() {
                eprintln!(
                    "tapledger-sim: the embedded node did not shut down within {:?}",
                    grace * 2
                );
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for EmbeddedNode {
    fn drop(&mut self) {
        // Only after an error: drop the node while its runtime still runs,
        // then let the runtime go without blocking the caller's runtime.
        drop(self.node.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Opens QUIC connections to one node over a few shared client endpoints
/// (one UDP socket each; each carries many connections).
pub struct Connector {
    endpoints: Vec<ClientEndpoint>,
    next: AtomicUsize,
    pub node: SocketAddr,
    pub admin: Option<Secret>,
    /// Bound on every single network step (connect, one answer).
    pub step_timeout: Duration,
}

impl Connector {
    pub fn new(
        fingerprint: Fingerprint,
        node: SocketAddr,
        admin: Option<Secret>,
        endpoints: usize,
        step_timeout: Duration,
    ) -> anyhow::Result<Connector> {
        let endpoints = (0..endpoints.max(1))
            .map(|_| ClientEndpoint::new(fingerprint, node))
            .collect::<Result<Vec<_>, _>>()
            .context("cannot create a client endpoint")?;
        Ok(Connector {
            endpoints,
            next: AtomicUsize::new(0),
            node,
            admin,
            step_timeout,
        })
    }

    /// A new connection with its request stream, not authenticated.
    pub async fn connect(&self) -> anyhow::Result<Phone> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        let connecting = self.endpoints[index].connect(self.node, SERVER_NAME);
        match tokio::time::timeout(self.step_timeout, connecting).await {
            Ok(Ok(phone)) => Ok(phone),
            Ok(Err(error)) => Err(anyhow!("cannot connect to {}: {error}", self.node)),
            Err(_) => Err(anyhow!(
                "no connection to {} within {:?}",
                self.node,
                self.step_timeout
            )),
        }
    }

    /// A new connection authenticated as `account`.
    pub async fn connect_as(
        &self,
        account: AccountId,
        key: &Secret,
    ) -> anyhow::Result<(Phone, Session)> {
        let mut phone = self.connect().await?;
        let session =
            match tokio::time::timeout(self.step_timeout, phone.authenticate(account, key)).await {
                Ok(Ok(session)) => session,
                Ok(Err(error)) => {
                    close_bounded(phone).await;
                    bail!("account {account} cannot authenticate: {error}");
                }
                Err(_) => {
                    close_bounded(phone).await;
                    bail!(
                        "account {account}: no answer to authenticate within {:?}",
                        self.step_timeout
                    );
                }
            };
        Ok((phone, session))
    }

    pub fn admin(&self) -> anyhow::Result<&Secret> {
        self.admin.as_ref().ok_or_else(|| {
            anyhow!(
                "opening accounts needs the node's admin credential: pass --admin FILE (admin.key)"
            )
        })
    }

    /// Waits (bounded) until every connection of every endpoint has closed.
    pub async fn wait_idle(&self) {
        for endpoint in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
    }
}

/// The node to talk to: connected, and the embedded node if the sim owns it.
pub struct Connected {
    pub connector: Arc<Connector>,
    pub embedded: Option<EmbeddedNode>,
    /// "embedded node on 127.0.0.1:PORT" or the remote address.
    pub label: String,
}

impl Target {
    /// Starts the embedded node or resolves and pins the remote one.
    pub async fn connect(
        &self,
        endpoints: usize,
        step_timeout: Duration,
    ) -> anyhow::Result<Connected> {
        match self {
            Target::Embedded { half_ttl } => {
                let (embedded, admin) = EmbeddedNode::start(*half_ttl, step_timeout).await?;
                let connector = Connector::new(
                    embedded.node().fingerprint,
                    embedded.node().local_addr,
                    Some(admin),
                    endpoints,
                    step_timeout,
                )?;
                Ok(Connected {
                    label: format!("embedded node on {}", embedded.node().local_addr),
                    connector: Arc::new(connector),
                    embedded: Some(embedded),
                })
            }
            Target::Remote {
                address,
                cert,
                admin,
            } => {
                let node = address
                    .to_socket_addrs()
                    .with_context(|| format!("cannot resolve --node {address}"))?
                    .next()
                    .ok_or_else(|| anyhow!("--node {address} resolves to no address"))?;
                let certificates = tapledger_certs::load_certificates(cert).with_context(|| {
                    format!("cannot read the node certificate {}", cert.display())
                })?;
                let leaf = certificates
                    .first()
                    .ok_or_else(|| anyhow!("{} holds no certificate", cert.display()))?;
                let fingerprint = Fingerprint::of(leaf);
                let admin = match admin {
                    Some(path) => Some(load_admin_credential(path).with_context(|| {
                        format!("cannot read the admin credential {}", path.display())
                    })?),
                    None => None,
                };
                let connector = Connector::new(fingerprint, node, admin, endpoints, step_timeout)?;
                Ok(Connected {
                    label: format!("node at {node}"),
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
        let step_timeout = connector.step_timeout;
        let progress = progress.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let credentials = ApiCredentials::generate();
            let (account_type, bank_name) = ACCOUNT_KINDS[index % ACCOUNT_KINDS.len()];
            let opened = tokio::time::timeout(
                step_timeout,
                phone.open_account(&admin, account_type, bank_name, &credentials, balance),
            )
            .await;
            progress.inc(1);
            match opened {
                Ok(Ok(id)) => Ok((
                    index,
                    Account {
                        id,
                        key: credentials.key,
                    },
                )),
                Ok(Err(error)) => Err(anyhow!("opening an account failed: {error}")),
                Err(_) => Err(anyhow!(
                    "opening an account: no answer within {step_timeout:?}"
                )),
            }
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

/// Account types and banks the sim's phone users hold (the prototype's
/// analysts look at both).
const ACCOUNT_KINDS: [(&str, &str); 4] = [
    ("checking", "Harbor Bank"),
    ("savings", "Harbor Bank"),
    ("checking", "Northwind Credit Union"),
    ("checking", "Tap Savings & Loan"),
];

/// Connects one phone per account, each over its own QUIC connection, and
/// authenticates it. Returns the phones in account order and the node's
/// parameters as the first phone learned them.
pub async fn connect_phones(
    connector: &Arc<Connector>,
    accounts: &[Account],
    show_progress: bool,
) -> anyhow::Result<(Vec<Phone>, Session)> {
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
            let connected = connector.connect_as(account.id, &account.key).await;
            progress.inc(1);
            connected.map(|(phone, session)| (index, phone, session))
        });
    }
    let mut phones: Vec<Option<Phone>> = (0..accounts.len()).map(|_| None).collect();
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
        for phone in phones.into_iter().flatten() {
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
