//! Metrics, health and the loopback admin endpoints, on a small HTTP server
//! separate from the QUIC port.
//!
//! * `GET /metrics` — Prometheus text format, rendered by
//!   `metrics-exporter-prometheus` from the global `metrics` recorder.
//! * `GET /healthz` — 200 while the process serves HTTP (liveness).
//! * `GET /readyz` — 200 while this replica leads the cluster, takes writes
//!   and its matchers answer; 503 while starting, shutting down, following
//!   another replica, or after replication stopped (readiness).
//! * `POST /admin/backup` (body: absolute path of a new file),
//!   `POST /admin/audit`, `POST /admin/status` and `POST /admin/cluster/add`
//!   (body: `ID CLIENT_ADDR PEER_ADDR FINGERPRINT`), `POST
//!   /admin/cluster/remove` (body: `ID`) — only from loopback peers and only
//!   with the admin credential as `Authorization: Bearer <hex>`. Backup and
//!   audit exist because redb locks the ledger file while the node runs, so
//!   `tapledger-node backup` and `audit` ask the running node to read its own
//!   snapshot; the others are `status` and `cluster add|remove`.
//!
//! Figures the node already keeps (its connection counters, `LedgerStats`,
//! matcher stats) are copied into the recorder at each scrape; settlements
//! and rejections are counted by reading the journal entries committed since
//! the previous scrape, so they count exactly what is durable, expiries
//! included, whether or not a phone was connected to hear it. Counters start
//! from zero when the node starts, as Prometheus expects.
//!
//! This module does not decide anything about payments and never logs the
//! admin credential.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tapledger_actors::{FundingKind, JournalEntry, Ledger, Store};
use tapledger_protocol::{Outcome, RejectCode, Secret, bytes_equal};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;

use crate::server::NodeCounters;

/// Open HTTP connections at most; further ones are closed at once.
pub const HTTP_CONNECTIONS_MAX: usize = 64;
/// Bytes of a request body at most (admin requests carry a path).
pub const HTTP_BODY_BYTES_MAX: usize = 4096;
/// A connection that has not finished its one request by then is dropped.
pub const HTTP_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Admin requests (a backup of a big ledger) may take longer.
pub const HTTP_ADMIN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long `/readyz` waits for the matchers to answer.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Journal entries read per blocking call while counting outcomes.
const JOURNAL_CHUNK_ENTRIES: usize = 4096;

/// Upper bounds (seconds) of the latency histograms' buckets.
const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// The metric names, described once here and in README.md.
pub mod names {
    pub const HALVES_RECEIVED: &str = "tapledger_halves_received_total";
    pub const HALF_DURABLE_SECONDS: &str = "tapledger_half_durable_seconds";
    pub const HALF_REFUSALS: &str = "tapledger_half_refusals_total";
    pub const SETTLEMENTS: &str = "tapledger_settlements_total";
    pub const SETTLED_AMOUNT: &str = "tapledger_settled_amount_total";
    pub const REJECTIONS: &str = "tapledger_rejections_total";
    pub const EXPIRIES: &str = "tapledger_expiries_total";
    pub const FUNDINGS: &str = "tapledger_fundings_total";
    pub const PENDING_HALVES: &str = "tapledger_pending_halves";
    pub const KEYS_IN_FLIGHT: &str = "tapledger_keys_in_flight";
    pub const LIVE_ACCOUNT_ACTORS: &str = "tapledger_live_account_actors";
    pub const ACCOUNT_ACTORS_STARTED: &str = "tapledger_account_actors_started_total";
    pub const COMMITS: &str = "tapledger_commits_total";
    pub const COMMIT_INTENTS: &str = "tapledger_commit_intents_total";
    pub const COMMIT_BATCH_MEAN: &str = "tapledger_commit_batch_intents_mean";
    pub const CONNECTIONS_OPEN: &str = "tapledger_connections_open";
    pub const CONNECTION_ATTEMPTS: &str = "tapledger_connection_attempts_total";
    pub const CONNECTION_RETRIES: &str = "tapledger_connection_retries_total";
    pub const HANDSHAKES_FAILED: &str = "tapledger_handshakes_failed_total";
    pub const CONNECTIONS_ACCEPTED: &str = "tapledger_connections_accepted_total";
    pub const CONNECTIONS_REFUSED: &str = "tapledger_connections_refused_total";
    pub const ACCOUNT_CONNECTIONS_REFUSED: &str = "tapledger_account_connections_refused_total";
    pub const AUTH_DEADLINE_CLOSES: &str = "tapledger_auth_deadline_closes_total";
    pub const AUTH_FAILURES: &str = "tapledger_auth_failures_total";
    pub const PROTOCOL_ERRORS: &str = "tapledger_protocol_errors_total";
    pub const READY: &str = "tapledger_ready";
    pub const RAFT_TERM: &str = "tapledger_raft_term";
    pub const RAFT_LEADER: &str = "tapledger_raft_is_leader";
    pub const RAFT_LAST_LOG: &str = "tapledger_raft_last_log_index";
    pub const RAFT_COMMITTED: &str = "tapledger_raft_committed_index";
    pub const RAFT_APPLIED: &str = "tapledger_raft_applied_index";
    pub const RAFT_SNAPSHOT: &str = "tapledger_raft_snapshot_index";
    pub const RAFT_VOTERS: &str = "tapledger_raft_voters";
    pub const RAFT_FOLLOWER_LAG: &str = "tapledger_raft_follower_lag_entries";
    pub const BUILD_INFO: &str = "tapledger_build_info";
}

/// How a submitted half first became durable (or was refused).
#[derive(Clone, Copy, Debug)]
pub enum HalfFate {
    /// Stored as a lone half; the outcome follows when the partner arrives.
    Pending,
    /// Its key was decided by this submission (or already had an outcome).
    Decided,
    /// Refused without being stored (codes 400, 600..=800).
    Refused(RejectCode),
}

/// The half-latency histograms, looked up once (per stream) rather than at
/// every half: recording into a handle is a push, looking one up hashes its
/// name and labels. No-ops unless a recorder is installed
/// (`install_recorder`) when they are made.
pub struct HalfHistograms {
    pending: metrics::Histogram,
    decided: metrics::Histogram,
    refused: metrics::Histogram,
}

impl HalfHistograms {
    pub fn new() -> HalfHistograms {
        HalfHistograms {
            pending: metrics::histogram!(names::HALF_DURABLE_SECONDS, "result" => "pending"),
            decided: metrics::histogram!(names::HALF_DURABLE_SECONDS, "result" => "decided"),
            refused: metrics::histogram!(names::HALF_DURABLE_SECONDS, "result" => "refused"),
        }
    }

    /// Records a submission's latency from arrival to its first durable
    /// answer; one sample per half, so the histogram's count stays exact.
    pub fn record(&self, started: Instant, fate: HalfFate) {
        let histogram = match fate {
            HalfFate::Pending => &self.pending,
            HalfFate::Decided => &self.decided,
            HalfFate::Refused(code) => {
                metrics::counter!(names::HALF_REFUSALS, "code" => code.code().to_string())
                    .increment(1);
                &self.refused
            }
        };
        histogram.record(started.elapsed().as_secs_f64());
    }
}

impl Default for HalfHistograms {
    fn default() -> HalfHistograms {
        HalfHistograms::new()
    }
}

/// Installs the process-wide Prometheus recorder and describes every metric.
/// Call once per process (the binary's `run` does).
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS_SECONDS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(HALVES_RECEIVED, "Halves submitted by authenticated phones.");
    describe_histogram!(
        HALF_DURABLE_SECONDS,
        Unit::Seconds,
        "Time from a half's arrival to its first durable answer (group commit included), by result: pending, decided, refused."
    );
    describe_counter!(
        HALF_REFUSALS,
        "Halves refused without touching their tx_key, by code (400, 600, 620, 700, 710, 800; 410 for a receive half expecting its own account)."
    );
    describe_counter!(SETTLEMENTS, "Payments settled (committed).");
    describe_counter!(SETTLED_AMOUNT, "Minor units moved by settled payments.");
    describe_counter!(
        REJECTIONS,
        "Payments rejected (committed final outcomes), by code: 100, 200, 300, 410, 500."
    );
    describe_counter!(
        EXPIRIES,
        "Lone halves expired because their partner did not arrive within half_ttl (also counted as rejections code 500)."
    );
    describe_counter!(FUNDINGS, "Account openings and top-ups, by kind.");
    describe_gauge!(PENDING_HALVES, "Lone halves waiting for their partner.");
    describe_gauge!(
        KEYS_IN_FLIGHT,
        "tx_keys the matchers hold (lone, reserving or deciding)."
    );
    describe_gauge!(LIVE_ACCOUNT_ACTORS, "Account actors in memory.");
    describe_counter!(ACCOUNT_ACTORS_STARTED, "Account actors started.");
    describe_counter!(COMMITS, "redb write transactions (group commits).");
    describe_counter!(
        COMMIT_INTENTS,
        "Intents (pending halves, decisions, openings, top-ups) committed; divide by commits for the batch size."
    );
    describe_gauge!(
        COMMIT_BATCH_MEAN,
        "Mean intents per group commit since the previous scrape."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "QUIC connections open (handshakes in progress included)."
    );
    describe_counter!(
        CONNECTION_ATTEMPTS,
        "New QUIC connection attempts (Initial packets for no known connection), whatever became of them; forged ones included."
    );
    describe_counter!(
        CONNECTION_RETRIES,
        "Connection attempts answered with a QUIC Retry (address validation: above retry_above_attempts_per_sec or retry_above_connections)."
    );
    describe_counter!(
        HANDSHAKES_FAILED,
        "QUIC handshakes started that did not complete (undecryptable Initials, TLS failures, clients gone silent)."
    );
    describe_counter!(
        CONNECTIONS_ACCEPTED,
        "QUIC handshakes completed (connections a client could use)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "QUIC connection attempts refused at connections_max."
    );
    describe_counter!(
        ACCOUNT_CONNECTIONS_REFUSED,
        "Authentications refused with 1015: the account held connections_per_account_max connections."
    );
    describe_counter!(
        AUTH_DEADLINE_CLOSES,
        "Connections closed with 1010 for not authenticating in time, by deadline: normal (first_request_timeout) or busy (busy_first_request_timeout, the node nearly full)."
    );
    describe_counter!(
        AUTH_FAILURES,
        "Failed authentications and rejected admin credentials."
    );
    describe_counter!(PROTOCOL_ERRORS, "Malformed or oversized frames received.");
    describe_gauge!(
        READY,
        "1 while this replica leads and accepts payments, else 0 (starting, shutting down, following, or replication stopped)."
    );
    describe_gauge!(RAFT_TERM, "Raft term this replica is in.");
    describe_gauge!(
        RAFT_LEADER,
        "1 while this replica is the Raft leader, else 0."
    );
    describe_gauge!(
        RAFT_LAST_LOG,
        "Index of the last entry in this replica's Raft log."
    );
    describe_gauge!(
        RAFT_COMMITTED,
        "Index of the last Raft entry this replica knows is committed (on a majority)."
    );
    describe_gauge!(
        RAFT_APPLIED,
        "Index of the last Raft entry applied to this replica's ledger."
    );
    describe_gauge!(
        RAFT_SNAPSHOT,
        "Index covered by this replica's newest snapshot (the log is compacted behind it)."
    );
    describe_gauge!(RAFT_VOTERS, "Voting members of the cluster.");
    describe_gauge!(
        RAFT_FOLLOWER_LAG,
        "On the leader: entries each follower is behind the leader's log, by follower id."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for code in RejectCode::ALL {
        let label = code.code().to_string();
        if code.is_payment_outcome() {
            metrics::counter!(REJECTIONS, "code" => label).increment(0);
        } else {
            metrics::counter!(HALF_REFUSALS, "code" => label).increment(0);
        }
    }
    metrics::counter!(HALF_REFUSALS, "code" => RejectCode::SelfPayment.code().to_string())
        .increment(0);
    // Every documented series exists from the start, so that dashboards and
    // alerts see zeros on a fresh node rather than nothing.
    for result in ["pending", "decided", "refused"] {
        let _ = metrics::histogram!(HALF_DURABLE_SECONDS, "result" => result);
    }
    metrics::gauge!(COMMIT_BATCH_MEAN).set(0.0);
    for kind in ["opening", "top_up"] {
        metrics::counter!(FUNDINGS, "kind" => kind).increment(0);
    }
    metrics::counter!(SETTLEMENTS).increment(0);
    metrics::counter!(SETTLED_AMOUNT).increment(0);
    metrics::counter!(EXPIRIES).increment(0);
}

/// What the last scrape saw, so the next one counts only what is new.
#[derive(Default)]
struct Progress {
    /// Journal sequence of the next entry to count.
    journal_next: u64,
    commits: u64,
    intents: u64,
}

/// A ledger served for inspection only (`run --inspect`).
struct Inspection {
    store: Arc<Store>,
    damage: String,
}

/// The running node as the HTTP server sees it. Holds the ledger weakly so
/// that it never keeps the ledger from closing at shutdown.
pub struct Telemetry {
    handle: PrometheusHandle,
    ledger: Weak<Ledger>,
    /// Set when `run --inspect` serves a ledger that failed its integrity
    /// check: no ledger runs, only this read-only store.
    inspecting: Option<Inspection>,
    counters: Arc<NodeCounters>,
    admin_credential: Secret,
    ready: AtomicBool,
    progress: Mutex<Progress>,
}

impl Telemetry {
    /// Starts counting from what the ledger holds now.
    pub async fn new(
        handle: PrometheusHandle,
        ledger: &Arc<Ledger>,
        counters: Arc<NodeCounters>,
        admin_credential: Secret,
    ) -> anyhow::Result<Telemetry> {
        let journal_next = ledger.store().counters()?.journal_entries;
        let stats = ledger.stats().await;
        Ok(Telemetry {
            handle,
            ledger: Arc::downgrade(ledger),
            inspecting: None,
            counters,
            admin_credential,
            ready: AtomicBool::new(false),
            progress: Mutex::new(Progress {
                journal_next,
                commits: stats.commits,
                intents: stats.intents_committed,
            }),
        })
    }

    /// The endpoints of `run --inspect`: a ledger that failed its integrity
    /// check (`damage` says how), open read-only. `/readyz` is 503 with the
    /// damage, the admin audit and backup read `store`, nothing is written.
    pub fn inspecting(
        handle: PrometheusHandle,
        store: Arc<Store>,
        damage: String,
        admin_credential: Secret,
    ) -> Telemetry {
        metrics::gauge!(names::READY).set(0.0);
        Telemetry {
            handle,
            ledger: Weak::new(),
            inspecting: Some(Inspection { store, damage }),
            counters: Arc::default(),
            admin_credential,
            ready: AtomicBool::new(false),
            progress: Mutex::new(Progress::default()),
        }
    }

    /// Marks the node ready (serving) or not (starting, shutting down).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        metrics::gauge!(names::READY).set(if ready { 1.0 } else { 0.0 });
    }

    /// Brings every figure up to date and renders the Prometheus text.
    pub async fn render(&self) -> String {
        if let Err(error) = self.refresh().await {
            tracing::warn!(%error, "metrics: could not read the ledger");
        }
        self.handle.run_upkeep();
        self.handle.render()
    }

    async fn refresh(&self) -> anyhow::Result<()> {
        use metrics::{counter, gauge};
        use names::*;
        let counters = &self.counters;
        gauge!(CONNECTIONS_OPEN).set(counters.connections_open.load(Ordering::Relaxed) as f64);
        counter!(CONNECTION_ATTEMPTS)
            .absolute(counters.connection_attempts.load(Ordering::Relaxed));
        counter!(CONNECTION_RETRIES).absolute(counters.connection_retries.load(Ordering::Relaxed));
        counter!(HANDSHAKES_FAILED).absolute(counters.handshakes_failed.load(Ordering::Relaxed));
        counter!(CONNECTIONS_ACCEPTED)
            .absolute(counters.connections_accepted.load(Ordering::Relaxed));
        counter!(CONNECTIONS_REFUSED)
            .absolute(counters.connections_refused.load(Ordering::Relaxed));
        counter!(ACCOUNT_CONNECTIONS_REFUSED)
            .absolute(counters.account_connections_refused.load(Ordering::Relaxed));
        counter!(AUTH_DEADLINE_CLOSES, "deadline" => "normal")
            .absolute(counters.auth_deadline_closes.load(Ordering::Relaxed));
        counter!(AUTH_DEADLINE_CLOSES, "deadline" => "busy")
            .absolute(counters.auth_deadline_closes_busy.load(Ordering::Relaxed));
        counter!(AUTH_FAILURES).absolute(counters.auth_failures.load(Ordering::Relaxed));
        counter!(HALVES_RECEIVED).absolute(counters.halves_received.load(Ordering::Relaxed));
        counter!(PROTOCOL_ERRORS).absolute(counters.protocol_errors.load(Ordering::Relaxed));

        let Some(ledger) = self.ledger.upgrade() else {
            return Ok(());
        };
        let status = ledger.status();
        let index = |index: Option<u64>| index.map_or(-1.0, |index| index as f64);
        gauge!(RAFT_TERM).set(status.term as f64);
        gauge!(RAFT_LEADER).set(if status.role == "leader" { 1.0 } else { 0.0 });
        gauge!(RAFT_LAST_LOG).set(index(status.last_log_index));
        gauge!(RAFT_COMMITTED).set(index(status.committed_index));
        gauge!(RAFT_APPLIED).set(index(status.applied_index));
        gauge!(RAFT_SNAPSHOT).set(index(status.snapshot_index));
        gauge!(RAFT_VOTERS).set(status.voters.len() as f64);
        for follower in &status.followers {
            gauge!(RAFT_FOLLOWER_LAG, "follower" => follower.id.to_string())
                .set(follower.lag as f64);
        }
        let ready = self.ready.load(Ordering::Acquire) && ledger.is_serving();
        gauge!(READY).set(if ready { 1.0 } else { 0.0 });
        let stats = ledger.stats().await;
        let matcher_stats = tokio::time::timeout(READY_PROBE_TIMEOUT, ledger.matcher_stats()).await;
        let store = ledger.store().clone();
        drop(ledger);

        let mut progress = self.progress.lock().await;
        counter!(COMMITS).increment(stats.commits.saturating_sub(progress.commits));
        counter!(COMMIT_INTENTS)
            .increment(stats.intents_committed.saturating_sub(progress.intents));
        let new_commits = stats.commits.saturating_sub(progress.commits);
        if new_commits > 0 {
            let new_intents = stats.intents_committed.saturating_sub(progress.intents);
            gauge!(COMMIT_BATCH_MEAN).set(new_intents as f64 / new_commits as f64);
        }
        progress.commits = stats.commits;
        progress.intents = stats.intents_committed;
        gauge!(LIVE_ACCOUNT_ACTORS).set(stats.live_account_actors as f64);
        counter!(ACCOUNT_ACTORS_STARTED).absolute(stats.account_actors_started);
        if let Ok(Ok(tapledger_actors::MatcherStats {
            keys_in_flight: keys,
            lone_halves: lone,
        })) = matcher_stats
        {
            gauge!(KEYS_IN_FLIGHT).set(keys as f64);
            gauge!(PENDING_HALVES).set(lone as f64);
        }

        let from = progress.journal_next;
        let (journal_next, tally) =
            tokio::task::spawn_blocking(move || tally_journal(&store, from)).await??;
        progress.journal_next = journal_next;
        drop(progress);
        counter!(SETTLEMENTS).increment(tally.settlements);
        counter!(SETTLED_AMOUNT).increment(tally.settled_amount);
        counter!(EXPIRIES).increment(tally.expiries);
        for (code, count) in tally.rejections {
            counter!(REJECTIONS, "code" => code.to_string()).increment(count);
        }
        counter!(FUNDINGS, "kind" => "opening").increment(tally.openings);
        counter!(FUNDINGS, "kind" => "top_up").increment(tally.top_ups);
        Ok(())
    }

    /// Why the node is not ready, or `None` when it is.
    async fn not_ready(&self) -> Option<String> {
        if let Some(inspection) = &self.inspecting {
            return Some(format!(
                "inspecting a damaged ledger, read-only: {}",
                inspection.damage
            ));
        }
        if !self.ready.load(Ordering::Acquire) {
            return Some("not serving (starting or shutting down)".into());
        }
        let Some(ledger) = self.ledger.upgrade() else {
            return Some("ledger closed".into());
        };
        if !ledger.is_serving() {
            let status = ledger.status();
            return Some(match (&status.failure, status.leader) {
                (Some(failure), _) => format!("replication stopped: {failure}"),
                (None, Some(leader)) if leader != status.id => format!(
                    "replica {} is a {} of leader {leader}; it takes no writes",
                    status.id, status.role
                ),
                (None, _) => format!(
                    "replica {} is a {} with no leader serving yet",
                    status.id, status.role
                ),
            });
        }
        match tokio::time::timeout(READY_PROBE_TIMEOUT, ledger.matcher_stats()).await {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => Some(format!("the ledger refuses writes: {error}")),
            Err(_) => Some("matchers did not answer within 1 s".into()),
        }
    }
}

/// Outcomes and fundings found in a stretch of the journal.
#[derive(Debug, Default)]
struct Tally {
    settlements: u64,
    settled_amount: u64,
    expiries: u64,
    rejections: BTreeMap<u16, u64>,
    openings: u64,
    top_ups: u64,
}

fn tally_journal(store: &Store, from: u64) -> anyhow::Result<(u64, Tally)> {
    let mut tally = Tally::default();
    let mut next = from;
    loop {
        let entries = store.journal(next, JOURNAL_CHUNK_ENTRIES)?;
        let Some((last, _)) = entries.last() else {
            return Ok((next, tally));
        };
        next = last + 1;
        for (_, entry) in &entries {
            match entry {
                JournalEntry::Funding(funding) => match funding.kind {
                    FundingKind::Opening => tally.openings += 1,
                    FundingKind::TopUp => tally.top_ups += 1,
                },
                JournalEntry::Outcome(Outcome::Settled(settlement)) => {
                    tally.settlements += 1;
                    tally.settled_amount = tally.settled_amount.saturating_add(settlement.amount());
                }
                JournalEntry::Outcome(Outcome::Rejected(rejection)) => {
                    *tally.rejections.entry(rejection.code.code()).or_default() += 1;
                    if rejection.code == RejectCode::Expired {
                        tally.expiries += 1;
                    }
                }
            }
        }
        if entries.len() < JOURNAL_CHUNK_ENTRIES {
            return Ok((next, tally));
        }
    }
}

/// The HTTP server; stop it with [`HttpServer::stop`] before the node shuts
/// down, so no scrape holds the ledger.
pub struct HttpServer {
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub async fn start(
        listen: SocketAddr,
        telemetry: Arc<Telemetry>,
    ) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, telemetry, stopped));
        tracing::info!(%local_addr, "metrics and health listening");
        Ok(HttpServer {
            local_addr,
            stop,
            task,
        })
    }

    /// Stops accepting and waits (boundedly) for requests in flight.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                if connections.len() >= HTTP_CONNECTIONS_MAX {
                    drop(stream);
                    continue;
                }
                connections.spawn(serve_http_connection(stream, peer, telemetry.clone()));
            }
            _ = stopped.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

async fn serve_http_connection(stream: TcpStream, peer: SocketAddr, telemetry: Arc<Telemetry>) {
    let service = hyper::service::service_fn(move |request| {
        let telemetry = telemetry.clone();
        async move { Ok::<_, Infallible>(route(request, peer, &telemetry).await) }
    });
    // One request per connection: scrapes are rare and this keeps shutdown
    // from waiting on idle keep-alive connections.
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if let Err(error) = tokio::time::timeout(HTTP_ADMIN_TIMEOUT, connection)
        .await
        .unwrap_or(Ok(()))
    {
        tracing::debug!(%error, %peer, "http connection failed");
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.into())))
        .expect("static response parts")
}

async fn route(
    request: Request<Incoming>,
    peer: SocketAddr,
    telemetry: &Telemetry,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            let body = tokio::time::timeout(HTTP_CONNECTION_TIMEOUT, telemetry.render()).await;
            match body {
                Ok(body) => Response::builder()
                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                    .body(Full::new(Bytes::from(body)))
                    .expect("static response parts"),
                Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "metrics timed out\n"),
            }
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => match telemetry.not_ready().await {
            None => text(StatusCode::OK, "ready\n"),
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        (
            &Method::POST,
            "/admin/backup"
            | "/admin/audit"
            | "/admin/status"
            | "/admin/cluster/add"
            | "/admin/cluster/remove",
        ) => admin(request, peer, telemetry, &path).await,
        (
            _,
            "/metrics"
            | "/healthz"
            | "/readyz"
            | "/admin/backup"
            | "/admin/audit"
            | "/admin/status"
            | "/admin/cluster/add"
            | "/admin/cluster/remove",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz or /readyz\n",
        ),
    }
}

async fn admin(
    request: Request<Incoming>,
    peer: SocketAddr,
    telemetry: &Telemetry,
    path: &str,
) -> Response<Full<Bytes>> {
    if !peer.ip().is_loopback() {
        tracing::warn!(%peer, path, "admin request from a non-loopback address refused");
        return text(
            StatusCode::FORBIDDEN,
            "admin requests are accepted from loopback only\n",
        );
    }
    let presented = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|hex| crate::init::parse_hex(hex.trim()))
        .unwrap_or_default();
    if !bytes_equal(&presented, telemetry.admin_credential.expose()) {
        telemetry
            .counters
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        // Never log what was presented.
        tracing::warn!(%peer, path, "admin request with a wrong credential refused");
        return text(StatusCode::UNAUTHORIZED, "wrong admin credential\n");
    }
    let body = match Limited::new(request.into_body(), HTTP_BODY_BYTES_MAX)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
    };
    if let Some(inspection) = &telemetry.inspecting {
        return match path {
            "/admin/backup" | "/admin/audit" => {
                read_admin(inspection.store.clone(), path, &body).await
            }
            _ => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "inspecting a damaged ledger, read-only: {}\n",
                    inspection.damage
                ),
            ),
        };
    }
    let Some(ledger) = telemetry.ledger.upgrade() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the ledger is closed\n");
    };
    match path {
        "/admin/status" => return text(StatusCode::OK, crate::ops::status_text(&ledger.status())),
        "/admin/cluster/add" | "/admin/cluster/remove" => {
            let body = String::from_utf8_lossy(&body).into_owned();
            return match crate::ops::change_cluster(&ledger, path, &body).await {
                Ok(done) => text(StatusCode::OK, done),
                Err((status, why)) => text(status, why),
            };
        }
        _ => {}
    }
    let store = ledger.store().clone();
    drop(ledger);
    read_admin(store, path, &body).await
}

/// The admin requests that only read the ledger: backup and audit.
async fn read_admin(store: Arc<Store>, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    match path {
        "/admin/backup" => {
            let target = String::from_utf8_lossy(body).trim().to_string();
            let target = PathBuf::from(target);
            if !target.is_absolute() {
                return text(
                    StatusCode::BAD_REQUEST,
                    "the body must be the absolute path of the backup file\n",
                );
            }
            tracing::info!(target = %target.display(), "backup requested");
            let started = Instant::now();
            let written = {
                let target = target.clone();
                tokio::task::spawn_blocking(move || store.backup(&target)).await
            };
            match written {
                Ok(Ok(())) => {
                    tracing::info!(target = %target.display(), elapsed_ms = started.elapsed().as_millis() as u64, "backup written");
                    text(
                        StatusCode::OK,
                        format!("backup written to {}\n", target.display()),
                    )
                }
                Ok(Err(tapledger_actors::StoreError::TargetExists(path))) => text(
                    StatusCode::CONFLICT,
                    format!("{path} already exists; refusing to overwrite it\n"),
                ),
                Ok(Err(error)) => {
                    tracing::error!(%error, "backup failed");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("backup failed: {error}\n"),
                    )
                }
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "backup task failed\n"),
            }
        }
        _ => match tokio::task::spawn_blocking(move || store.audit()).await {
            Ok(Ok(report)) => {
                let status = if report.is_ok() {
                    StatusCode::OK
                } else {
                    StatusCode::CONFLICT
                };
                text(status, crate::ops::audit_text(&report))
            }
            Ok(Err(error)) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("audit failed: {error}\n"),
            ),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "audit task failed\n"),
        },
    }
}

/// Sends an admin request to a running node's HTTP server (from this
/// machine) and returns the status and body.
pub async fn admin_request(
    addr: SocketAddr,
    path: &str,
    admin_credential: &Secret,
    body: String,
) -> anyhow::Result<(StatusCode, String)> {
    use anyhow::Context;
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within 5 s"))?
        .with_context(|| format!("cannot reach the node's HTTP server at {addr}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", crate::init::hex(admin_credential.expose())),
        )
        .body(Full::new(Bytes::from(body)))?;
    let response = tokio::time::timeout(HTTP_ADMIN_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {HTTP_ADMIN_TIMEOUT:?}"))??;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), 16 * 1024 * 1024)
        .collect()
        .await
        .map_err(|error| anyhow::anyhow!("reading the answer: {error}"))?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
