//! The ledger API: one replica of a cluster. It opens the store and the Raft
//! log, runs openraft over them, and while this replica leads it runs the
//! matcher, account and expiry actors and the committer
//! ([`crate::leader`]). Every money-moving call resolves only after the log
//! entry that holds its effect is committed on a majority and applied here.
//!
//! A single node is a cluster of one voter ([`Ledger::open`]): the same code
//! path, with no network.
//!
//! Leadership is watched by one task. On becoming leader it first applies
//! everything in its log (so the store holds every committed decision), then
//! builds the actors from the store exactly as a restart does; on losing
//! leadership (a new term, another leader, or no quorum answering) it stops
//! them, and requests in flight hear [`LedgerError::NotLeader`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{RaftNetworkFactory, ServerState, SnapshotPolicy};
use tapledger_protocol::{AccountId, Half, Outcome, TxKey};
use tokio::sync::{oneshot, watch};

use crate::clock::{Clock, SystemClock};
use crate::error::{LeaderHint, LedgerError, StoreError};
use crate::leader::{Ended, LeaderServices};
use crate::matcher::{Heard, MatcherStats, Report, ReportSender};
use crate::raft::{
    LogStore, NoNetwork, Raft, RaftMetrics, ReplicaId, ReplicaInfo, StateMachine, StorageIo,
    TypeConfig,
};
use crate::store::{AccountRecord, AuditReport, JournalEntry, NewAccount, Store};
use tapledger_core::matching::{PendingHalf, Resolution};

/// Default time a lone half waits for its partner.
pub const HALF_TTL_DEFAULT: Duration = Duration::from_secs(5 * 60);
/// Default largest payment: 1,000,000.00 in minor units.
pub const MAX_AMOUNT_DEFAULT: u64 = 100_000_000;
/// Default cap on lone halves per account (per matcher shard).
pub const PENDING_HALVES_PER_ACCOUNT_MAX_DEFAULT: u32 = 64;
/// Default time an unused account actor stays alive.
pub const ACCOUNT_IDLE_DEFAULT: Duration = Duration::from_secs(30);
/// See [`LedgerConfig::live_accounts_max`].
pub const LIVE_ACCOUNTS_MAX_DEFAULT: usize = 65_536;
/// The idle sweep runs every `account_idle / 2`, and at least this often.
pub const SWEEP_INTERVAL_MAX: Duration = Duration::from_millis(250);
/// How long [`Ledger::open`] waits for a cluster of one to elect itself.
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new leader may take to apply its log before it serves.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// A leader whose proposed entries commit nothing for this long (at least)
/// stops serving.
const LEADER_STALL_LIMIT: Duration = Duration::from_secs(3);

/// Raft timing and log compaction.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// How often the leader sends heartbeats.
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time in this range
    /// (plus openraft's leader lease, the range's upper bound) starts an
    /// election.
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot, and compact the log, after this many entries.
    pub snapshot_after_entries: u64,
    /// Entries kept behind the snapshot, so that a follower a little behind
    /// catches up from the log rather than a whole snapshot.
    pub entries_kept_after_snapshot: u64,
}

impl Default for ReplicationConfig {
    /// openraft 0.9 gives every AppendEntries the heartbeat interval to be
    /// answered (the follower's fsync included), so the interval must cover
    /// a loaded machine: 100 ms, as etcd's default. A follower of a leader
    /// that died starts an election after openraft's leader lease (the
    /// timeout's upper bound) plus a random timeout, checked every 1.5
    /// heartbeats: 280 to 490 ms with these. Measured with `bench core
    /// --replicas 3` (ten kills under load): a new leader settles a payment
    /// 0.4 to 1.2 s after the kill (p50 0.64 s); the slow ones are
    /// elections a lagging follower called first and lost. With 250 ms
    /// heartbeats the same bench gave p50 1.3 to 1.9 s.
    fn default() -> ReplicationConfig {
        ReplicationConfig {
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(110), Duration::from_millis(169)),
            snapshot_after_entries: 4096,
            entries_kept_after_snapshot: 1024,
        }
    }
}

impl ReplicationConfig {
    fn raft_config(&self) -> Result<openraft::Config, LedgerError> {
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        openraft::Config {
            cluster_name: "tapledger".into(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_timeout.0),
            election_timeout_max: millis(self.election_timeout.1),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.entries_kept_after_snapshot,
            // Each entry is a whole group commit: a few per message keep every
            // AppendEntries well within its time limit (the heartbeat).
            max_payload_entries: 8,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|error| LedgerError::Settings(format!("replication: {error}")))
    }
}

/// How a ledger runs. `LedgerConfig::new(path)` gives the defaults.
#[derive(Clone)]
pub struct LedgerConfig {
    /// The redb file holding the ledger; created with its tables if missing.
    pub path: PathBuf,
    /// The Raft log's redb file (default: `<stem>-raft.redb` beside `path`).
    pub log_path: PathBuf,
    /// Where snapshots live (default: `<stem>-snapshots/` beside `path`).
    pub snapshot_dir: PathBuf,
    pub half_ttl: Duration,
    pub max_amount: u64,
    /// Matcher actors; halves are spread over them by `tx_key`.
    pub matcher_shards: usize,
    /// Lone halves one account may have waiting. Split evenly over the
    /// matcher shards (at least one each), so the total never exceeds it
    /// when it is at least `matcher_shards`.
    pub pending_halves_per_account_max: u32,
    /// An account actor unused this long retires.
    pub account_idle: Duration,
    /// Account actors live at once, at most about: above it the least
    /// recently used idle ones retire before `account_idle` (a sweep every
    /// `SWEEP_INTERVAL_MAX` at most), so a ledger of millions of accounts
    /// keeps only its busy ones in memory (~6.5 KB each).
    pub live_accounts_max: usize,
    pub clock: Arc<dyn Clock>,
    pub replication: ReplicationConfig,
    /// Where storage work runs (the blocking pool unless a test says).
    pub storage_io: StorageIo,
    /// After a log entry of more than one intent, the leader proposes the
    /// next one of fewer than [`crate::committer::PIPELINE_INTENTS_MIN`]
    /// intents only this long after it
    /// ([`crate::committer::COMMIT_INTERVAL_MIN`]); zero proposes whenever
    /// nothing is in flight.
    pub commit_interval_min: Duration,
}

impl LedgerConfig {
    pub fn new(path: impl Into<PathBuf>) -> LedgerConfig {
        let path = path.into();
        let (log_path, snapshot_dir) = beside(&path);
        LedgerConfig {
            path,
            log_path,
            snapshot_dir,
            half_ttl: HALF_TTL_DEFAULT,
            max_amount: MAX_AMOUNT_DEFAULT,
            matcher_shards: 2,
            pending_halves_per_account_max: PENDING_HALVES_PER_ACCOUNT_MAX_DEFAULT,
            account_idle: ACCOUNT_IDLE_DEFAULT,
            live_accounts_max: LIVE_ACCOUNTS_MAX_DEFAULT,
            clock: Arc::new(SystemClock),
            replication: ReplicationConfig::default(),
            storage_io: StorageIo::Blocking,
            commit_interval_min: crate::committer::COMMIT_INTERVAL_MIN,
        }
    }
}

/// The Raft log file and snapshot directory that go with ledger file `path`.
fn beside(path: &Path) -> (PathBuf, PathBuf) {
    let stem = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ledger".into());
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    (
        dir.join(format!("{stem}-raft.redb")),
        dir.join(format!("{stem}-snapshots")),
    )
}

/// The first answer to [`Ledger::submit`].
#[derive(Debug)]
pub enum Submission {
    /// Over already: refused, or the key's final outcome (the partner was
    /// already there, or this is an identical resubmission).
    Done(Resolution),
    /// Durably pending; the ticket resolves when the key is decided.
    Pending(Ticket),
}

impl Submission {
    /// Waits for the resolution however the submission started.
    pub async fn resolution(self) -> Result<Resolution, LedgerError> {
        match self {
            Submission::Done(resolution) => Ok(resolution),
            Submission::Pending(ticket) => ticket.resolution().await,
        }
    }
}

/// A durably pending half's claim on its key's outcome.
#[derive(Debug)]
pub struct Ticket {
    pub tx_key: TxKey,
    receiver: oneshot::Receiver<Result<Resolution, LedgerError>>,
    ended: Ended,
}

impl Ticket {
    pub(crate) fn new(
        tx_key: TxKey,
        receiver: oneshot::Receiver<Result<Resolution, LedgerError>>,
        ended: Ended,
    ) -> Ticket {
        Ticket {
            tx_key,
            receiver,
            ended,
        }
    }

    /// The key's resolution; [`LedgerError::NotLeader`] if this replica
    /// stopped leading first (the half stays durably pending: ask the new
    /// leader).
    pub async fn resolution(self) -> Result<Resolution, LedgerError> {
        self.receiver
            .await
            .unwrap_or_else(|_| Err(self.ended.error()))
    }
}

/// One half of a [`Ledger::submit_batch`]: `submitter` is the account the
/// half's phone authenticated as, `tag` is the caller's own name for it.
#[derive(Debug)]
pub struct BatchHalf {
    pub tag: u64,
    pub submitter: AccountId,
    pub half: Half,
}

/// Live figures for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerStats {
    pub commits: u64,
    pub intents_committed: u64,
    /// Log entries proposed while an earlier one was still in flight
    /// (replicated while that one was applied).
    pub commits_pipelined: u64,
    pub live_account_actors: usize,
    pub account_actors_started: u64,
}

/// How a replica joins Raft.
pub struct ReplicaSetup<N> {
    pub id: ReplicaId,
    /// How it reaches its peers.
    pub network: N,
    /// The voters a brand-new cluster starts with. Used only when this
    /// replica's log has never held anything; `None` reads what `init`
    /// recorded in the log (if anything: a replica being added waits to be
    /// told by the leader).
    pub bootstrap: Option<BTreeMap<ReplicaId, ReplicaInfo>>,
}

/// A replica's place in the cluster, as `tapledger-node status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub id: ReplicaId,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: &'static str,
    /// True when this replica leads and its actors take writes.
    pub serving: bool,
    pub term: u64,
    pub leader: Option<ReplicaId>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: Vec<ReplicaId>,
    pub learners: Vec<ReplicaId>,
    /// On the leader: each follower's last replicated index and how many
    /// entries it is behind this replica's log.
    pub followers: Vec<FollowerStatus>,
    /// Why Raft stopped on this replica, if it did.
    pub failure: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowerStatus {
    pub id: ReplicaId,
    pub matched_index: Option<u64>,
    pub lag: u64,
}

/// What the leadership task shares with every caller.
#[derive(Default)]
struct Slot {
    services: RwLock<Option<Arc<LeaderServices>>>,
    hint: RwLock<Option<LeaderHint>>,
    failure: RwLock<Option<String>>,
}

impl Slot {
    fn not_leader(&self) -> LedgerError {
        if let Some(failure) = self.failure.read().expect("slot lock").clone() {
            return LedgerError::Replication(failure);
        }
        LedgerError::NotLeader(self.hint.read().expect("slot lock").clone())
    }
}

/// One replica of the ledger. Cheap to share behind an `Arc`; call
/// [`Ledger::close`] to shut it down cleanly.
pub struct Ledger {
    config: LedgerConfig,
    id: ReplicaId,
    store: Arc<Store>,
    log: LogStore,
    raft: Raft,
    slot: Arc<Slot>,
    serving: watch::Receiver<bool>,
    manager: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

impl Ledger {
    /// Opens (or creates) a single-node ledger, a cluster of one voter, at
    /// `config.path`, and waits until it serves. Its live state is rebuilt
    /// from the store: pending halves keep their original receive times.
    pub async fn open(config: LedgerConfig) -> Result<Ledger, LedgerError> {
        let (store, log) = open_files(&config).await?;
        Ledger::start(config, store, log).await
    }

    /// Runs a single-node ledger on already opened stores (e.g. ones on a
    /// custom backend), and waits until it serves. The replica keeps the id
    /// `init` recorded in its log (1 if none); a replica whose cluster has
    /// other voters is refused, since it could never be elected alone.
    pub async fn start(
        config: LedgerConfig,
        store: Arc<Store>,
        log: LogStore,
    ) -> Result<Ledger, LedgerError> {
        let (id, info) = log.identity()?.unwrap_or((1, ReplicaInfo::default()));
        let (_, membership) = store.raft_state()?;
        let mut voters: BTreeSet<ReplicaId> = membership.membership().voter_ids().collect();
        let bootstrap = log
            .bootstrap()?
            .unwrap_or_else(|| BTreeMap::from([(id, info)]));
        if voters.is_empty() {
            voters = bootstrap.keys().copied().collect();
        }
        if voters != BTreeSet::from([id]) {
            return Err(LedgerError::NeedsPeers {
                id,
                voters: voters.into_iter().collect(),
            });
        }
        let setup = ReplicaSetup {
            id,
            network: NoNetwork,
            bootstrap: Some(bootstrap),
        };
        let ledger = Ledger::start_replica(config, store, log, setup).await?;
        ledger.wait_serving(SERVE_TIMEOUT).await?;
        Ok(ledger)
    }

    /// Opens one replica of a cluster on the files of `config`. It serves
    /// writes once it is elected leader.
    pub async fn open_replica<N: RaftNetworkFactory<TypeConfig>>(
        config: LedgerConfig,
        setup: ReplicaSetup<N>,
    ) -> Result<Ledger, LedgerError> {
        let (store, log) = open_files(&config).await?;
        Ledger::start_replica(config, store, log, setup).await
    }

    /// Runs one replica of a cluster on already opened stores.
    pub async fn start_replica<N: RaftNetworkFactory<TypeConfig>>(
        config: LedgerConfig,
        store: Arc<Store>,
        log: LogStore,
        setup: ReplicaSetup<N>,
    ) -> Result<Ledger, LedgerError> {
        if config.matcher_shards == 0 || config.pending_halves_per_account_max == 0 {
            return Err(LedgerError::Settings(
                "matcher_shards and pending_halves_per_account_max must be at least 1".into(),
            ));
        }
        let raft_config = Arc::new(config.replication.raft_config()?);
        let pristine = log.is_pristine()?;
        let bootstrap = match setup.bootstrap {
            Some(members) => Some(members),
            None => log.bootstrap()?,
        };
        let machine = StateMachine::new(store.clone(), &config.snapshot_dir, config.storage_io)?;
        let raft = Raft::new(setup.id, raft_config, setup.network, log.clone(), machine)
            .await
            .map_err(|fatal| LedgerError::Replication(fatal.to_string()))?;
        if pristine && let Some(members) = bootstrap {
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(error) => {
                    let _ = raft.shutdown().await;
                    return Err(LedgerError::Replication(format!(
                        "cannot start the cluster: {error}"
                    )));
                }
            }
        }
        // A lone voter need not wait out an election timeout to lead again.
        let alone = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            let voters: Vec<ReplicaId> =
                metrics.membership_config.membership().voter_ids().collect();
            voters == [setup.id] && metrics.state != ServerState::Leader
        };
        if alone {
            let _ = raft.trigger().elect().await;
        }
        let slot = Arc::new(Slot::default());
        let (serving_sender, serving) = watch::channel(false);
        let (stop, stop_receiver) = watch::channel(false);
        let manager = tokio::spawn(manage(
            Leadership {
                raft: raft.clone(),
                store: store.clone(),
                log: log.clone(),
                config: config.clone(),
                slot: slot.clone(),
                serving: serving_sender,
            },
            stop_receiver,
        ));
        Ok(Ledger {
            config,
            id: setup.id,
            store,
            log,
            raft,
            slot,
            serving,
            manager: Mutex::new(Some(manager)),
            stop,
        })
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// The store, for reads (outcomes, history, audit, export, backup). On a
    /// follower it may lag the leader by the entries not yet applied here.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The Raft instance: the node feeds it its peers' RPCs.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// True while this replica leads and takes writes.
    pub fn is_serving(&self) -> bool {
        *self.serving.borrow()
    }

    /// Waits until this replica takes writes.
    pub async fn wait_serving(&self, limit: Duration) -> Result<(), LedgerError> {
        let mut serving = self.serving.clone();
        match tokio::time::timeout(limit, serving.wait_for(|serving| *serving)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(LedgerError::Closed),
            Err(_) => Err(self.slot.not_leader()),
        }
    }

    /// A watch that is true while this replica takes writes.
    pub fn serving_watch(&self) -> watch::Receiver<bool> {
        self.serving.clone()
    }

    /// Where the leader is, as far as this replica knows.
    pub fn leader_hint(&self) -> Option<LeaderHint> {
        self.slot.hint.read().expect("slot lock").clone()
    }

    fn services(&self) -> Result<Arc<LeaderServices>, LedgerError> {
        self.slot
            .services
            .read()
            .expect("slot lock")
            .clone()
            .ok_or_else(|| self.slot.not_leader())
    }

    /// Opens an account funded with `opening_balance` by the issuer. Resolves
    /// with the new account id once durable. Checking the operator's admin
    /// credential is the caller's job.
    pub async fn open_account(&self, new_account: NewAccount) -> Result<AccountId, LedgerError> {
        self.services()?.open_account(new_account).await
    }

    /// Moves `amount` from the issuer to `account`; returns the new balance
    /// once durable.
    pub async fn top_up(&self, account: AccountId, amount: u64) -> Result<u64, LedgerError> {
        self.services()?.top_up(account, amount).await
    }

    /// Submits a half on behalf of the authenticated account `submitter`.
    /// Resolves once the half is refused, durably pending, or its key decided.
    pub async fn submit(
        &self,
        submitter: AccountId,
        half: Half,
    ) -> Result<Submission, LedgerError> {
        self.services()?.submit(submitter, half).await
    }

    /// Submits many halves at once, and returns without waiting: each
    /// half's fate reaches `sink` under the half's tag, as
    /// [`Heard::Pending`] when it is durably pending (if it waits for its
    /// partner) and then exactly one [`Heard::Resolved`]. The halves reach
    /// each matcher shard in the order given, one message per shard, so a
    /// caller with many halves in flight pays per batch what
    /// [`Ledger::submit`] pays per half. A half whose partner is in the same
    /// batch is never written pending (nor hears `Pending`): the pair's
    /// decision is what becomes durable. If this replica does not lead,
    /// every half is resolved at once with that error.
    pub fn submit_batch(&self, halves: Vec<BatchHalf>, sink: &ReportSender) {
        match self.services() {
            Ok(services) => services.submit_batch(halves, sink),
            Err(error) => {
                for half in halves {
                    let _ = sink.send(Report {
                        tag: half.tag,
                        heard: Heard::Resolved(Err(error.clone())),
                    });
                }
            }
        }
    }

    /// The final outcome of `tx_key` if it has one (as applied here).
    pub fn outcome(&self, tx_key: TxKey) -> Result<Option<Outcome>, LedgerError> {
        Ok(self.store.outcome(tx_key)?)
    }

    /// The durable lone half waiting under `tx_key`, if any.
    pub fn pending(&self, tx_key: TxKey) -> Result<Option<PendingHalf>, LedgerError> {
        Ok(self.store.pending(tx_key)?)
    }

    /// The committed balance of `account`.
    pub fn balance(&self, account: AccountId) -> Result<Option<u64>, LedgerError> {
        Ok(self.store.balance(account)?)
    }

    pub fn account(&self, account: AccountId) -> Result<Option<AccountRecord>, LedgerError> {
        Ok(self.store.account(account)?)
    }

    /// Every entry that moved `account`'s money, oldest first.
    pub fn history(&self, account: AccountId) -> Result<Vec<(u64, JournalEntry)>, LedgerError> {
        Ok(self.store.history(account)?)
    }

    /// Checks the books on a snapshot (see [`Store::audit`]).
    pub fn audit(&self) -> Result<AuditReport, LedgerError> {
        Ok(self.store.audit()?)
    }

    /// Live (balance, reserved) of an account as its actor holds them.
    pub async fn live_balance(&self, account: AccountId) -> Result<(u64, u64), LedgerError> {
        self.services()?.live_balance(account).await
    }

    /// Expires every lone half that is due now and waits until those
    /// expiries are durable. Returns how many halves expired. (The expiry
    /// actor does the same on its own tick.)
    pub async fn expire_now(&self) -> Result<usize, LedgerError> {
        self.services()?.expire_now().await
    }

    /// Waits until everything queued for commit before this call is durable.
    pub async fn flush(&self) -> Result<(), LedgerError> {
        self.services()?.flush().await
    }

    /// The leader's commit figures (zeros on a replica that does not lead).
    pub async fn stats(&self) -> LedgerStats {
        self.services()
            .map(|services| services.stats())
            .unwrap_or_default()
    }

    /// Keys in flight and lone halves, summed over the matcher shards.
    pub async fn matcher_stats(&self) -> Result<MatcherStats, LedgerError> {
        self.services()?.matcher_stats().await
    }

    /// Where this replica stands in the cluster.
    pub fn status(&self) -> ReplicaStatus {
        status_of(
            &self.raft.metrics().borrow(),
            self.is_serving(),
            self.log.committed().map(|log_id| log_id.index),
        )
    }

    /// Adds replica `id` as a learner (it receives the log but does not vote)
    /// and waits until it has caught up; then [`Ledger::change_voters`] can
    /// make it a voter. Only the leader can.
    pub async fn add_learner(&self, id: ReplicaId, info: ReplicaInfo) -> Result<(), LedgerError> {
        self.raft
            .add_learner(id, info, true)
            .await
            .map(|_| ())
            .map_err(|error| self.membership_error(error))
    }

    /// Makes exactly `voters` the voting members (each must already be a
    /// learner or voter). A removed voter stays a learner unless `retain` is
    /// false.
    pub async fn change_voters(
        &self,
        voters: BTreeSet<ReplicaId>,
        retain: bool,
    ) -> Result<(), LedgerError> {
        self.raft
            .change_membership(voters, retain)
            .await
            .map(|_| ())
            .map_err(|error| self.membership_error(error))
    }

    fn membership_error(
        &self,
        error: RaftError<ReplicaId, openraft::error::ClientWriteError<ReplicaId, ReplicaInfo>>,
    ) -> LedgerError {
        match error {
            RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(_)) => {
                self.slot.not_leader()
            }
            RaftError::APIError(openraft::error::ClientWriteError::ChangeMembershipError(
                error,
            )) => LedgerError::Membership(error.to_string()),
            RaftError::Fatal(fatal) => LedgerError::Replication(fatal.to_string()),
        }
    }

    /// Shuts down: stops the leader's actors (waiting submissions get
    /// `LedgerError::Closed`), lets the committer finish its last entries,
    /// stops Raft and closes both files before returning.
    pub async fn close(self) {
        let _ = self.stop.send(true);
        let manager = self.manager.lock().expect("manager lock").take();
        if let Some(manager) = manager {
            let _ = manager.await;
        }
        tracing::debug!("close: leader's actors stopped");
        let _ = self.raft.shutdown().await;
        tracing::debug!("close: raft stopped");
        let Ledger {
            store, log, raft, ..
        } = self;
        drop(raft);
        // openraft's tasks hold the stores until they have wound down.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while (Arc::strong_count(&store) > 1 || log.handles() > 1)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if Arc::strong_count(&store) > 1 || log.handles() > 1 {
            tracing::warn!(
                store = Arc::strong_count(&store),
                log = log.handles(),
                "ledger files still in use after close"
            );
        }
        tracing::debug!("close: files closed");
    }

    /// Stops this replica abruptly, as a crash would: nothing waits for the
    /// committer, nothing is flushed; files are released once openraft's
    /// tasks end. For tests and the simulator's fault injection.
    pub async fn crash(self) {
        let services = self.slot.services.write().expect("slot lock").take();
        if let Some(services) = services {
            services.stop(LedgerError::NotLeader(None)).await;
        }
        let manager = self.manager.lock().expect("manager lock").take();
        if let Some(manager) = manager {
            manager.abort();
            let _ = manager.await;
        }
        let _ = self.raft.shutdown().await;
        let Ledger { store, log, .. } = self;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while (Arc::strong_count(&store) > 1 || log.handles() > 1)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Opens the ledger store and the Raft log of `config` (off the runtime).
/// Opens the ledger and the Raft log files of `config`, each checked as
/// [`Store::open`] checks it: a damaged file is [`LedgerError::Damaged`],
/// naming it.
pub async fn open_files(config: &LedgerConfig) -> Result<(Arc<Store>, LogStore), LedgerError> {
    let path = config.path.clone();
    let log_path = config.log_path.clone();
    let io = config.storage_io;
    let damaged = |file: &std::path::Path| {
        let file = file.display().to_string();
        move |error: StoreError| {
            if crate::store::is_damage(&error) {
                LedgerError::Damaged {
                    file,
                    reason: error.to_string(),
                }
            } else {
                LedgerError::from(error)
            }
        }
    };
    tokio::task::spawn_blocking(move || -> Result<(Arc<Store>, LogStore), LedgerError> {
        let store = Store::open(&path).map_err(damaged(&path))?;
        let log = LogStore::open(&log_path, io).map_err(damaged(&log_path))?;
        Ok((Arc::new(store), log))
    })
    .await
    .map_err(|_| LedgerError::Closed)?
}

fn leading(metrics: &RaftMetrics) -> bool {
    metrics.state == ServerState::Leader
        && metrics.current_leader == Some(metrics.id)
        && metrics.running_state.is_ok()
}

fn hint_of(metrics: &RaftMetrics) -> Option<LeaderHint> {
    let id = metrics.current_leader?;
    let node = metrics.membership_config.membership().get_node(&id)?;
    Some(LeaderHint {
        id,
        client_addr: node.client_addr.clone(),
    })
}

fn status_of(metrics: &RaftMetrics, serving: bool, committed: Option<u64>) -> ReplicaStatus {
    let membership = metrics.membership_config.membership();
    let last = metrics.last_log_index;
    let followers = metrics
        .replication
        .as_ref()
        .map(|replication| {
            replication
                .iter()
                .filter(|(id, _)| **id != metrics.id)
                .map(|(id, matched)| {
                    let matched_index = matched.map(|log_id| log_id.index);
                    let lag = match (last, matched_index) {
                        (Some(last), Some(matched)) => last.saturating_sub(matched),
                        (Some(last), None) => last + 1,
                        (None, _) => 0,
                    };
                    FollowerStatus {
                        id: *id,
                        matched_index,
                        lag,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    ReplicaStatus {
        id: metrics.id,
        role: match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        },
        serving,
        term: metrics.current_term,
        leader: metrics.current_leader,
        last_log_index: last,
        committed_index: committed,
        applied_index: metrics.last_applied.map(|log_id| log_id.index),
        snapshot_index: metrics.snapshot.map(|log_id| log_id.index),
        purged_index: metrics.purged.map(|log_id| log_id.index),
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        followers,
        failure: metrics
            .running_state
            .as_ref()
            .err()
            .map(|fatal| fatal.to_string()),
    }
}

/// What the leadership task works with.
struct Leadership {
    raft: Raft,
    store: Arc<Store>,
    log: LogStore,
    config: LedgerConfig,
    slot: Arc<Slot>,
    serving: watch::Sender<bool>,
}

impl Leadership {
    /// Records what the latest metrics say about the leader and failures.
    fn observe(&self, metrics: &RaftMetrics) {
        *self.slot.hint.write().expect("slot lock") = hint_of(metrics);
        if let Err(fatal) = &metrics.running_state {
            let mut failure = self.slot.failure.write().expect("slot lock");
            if failure.is_none() {
                tracing::error!(error = %fatal, "replication stopped on this replica; it refuses writes until restarted");
                *failure = Some(fatal.to_string());
            }
        }
    }

    /// Catches up with the log and builds the leader's actors for `term`.
    async fn take_office(&self, term: u64) -> Result<LeaderServices, String> {
        let target = self.raft.metrics().borrow().last_log_index;
        tokio::time::timeout(CATCH_UP_TIMEOUT, self.raft.ensure_linearizable())
            .await
            .map_err(|_| "no quorum confirmed leadership in time".to_string())?
            .map_err(|error| error.to_string())?;
        // Everything in the log, entries a previous leader's actors proposed
        // in this very term included, is applied before the store is read.
        self.raft
            .wait(Some(CATCH_UP_TIMEOUT))
            .applied_index_at_least(target, "leader catches up")
            .await
            .map_err(|error| error.to_string())?;
        let still = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            leading(&metrics) && metrics.current_term == term
        };
        if !still {
            return Err("lost leadership while catching up".into());
        }
        LeaderServices::start(&self.config, self.store.clone(), self.raft.clone(), term)
            .await
            .map_err(|error| error.to_string())
    }

    /// Leads until the term ends, quorum stops answering, Raft fails or the
    /// ledger closes; returns what waiting requests should hear.
    async fn hold_office(
        &self,
        term: u64,
        metrics: &mut watch::Receiver<RaftMetrics>,
        stop: &mut watch::Receiver<bool>,
    ) -> LedgerError {
        // A leader cut off from its quorum never hears of the next one (openraft
        // 0.9 leaders do not step down on their own). It notices instead that
        // entries it proposed stop committing: then it stops serving, so that
        // phones waiting on it hear "not the leader" and look elsewhere.
        let check_every = self.config.replication.election_timeout.0;
        let stall_limit = (self.config.replication.election_timeout.1 * 4).max(LEADER_STALL_LIMIT);
        let mut stalled: Option<(tokio::time::Instant, Option<u64>)> = None;
        loop {
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return LedgerError::NotLeader(None);
                    }
                    let metrics = metrics.borrow_and_update().clone();
                    self.observe(&metrics);
                    if let Err(fatal) = &metrics.running_state {
                        return LedgerError::Replication(fatal.to_string());
                    }
                    if !leading(&metrics) || metrics.current_term != term {
                        return LedgerError::NotLeader(hint_of(&metrics));
                    }
                }
                _ = tokio::time::sleep(check_every) => {
                    let last = self.raft.metrics().borrow().last_log_index;
                    let committed = self.log.committed().map(|log_id| log_id.index);
                    let now = tokio::time::Instant::now();
                    stalled = match stalled {
                        _ if committed >= last => None,
                        Some((since, at)) if at == committed => {
                            if now.duration_since(since) >= stall_limit {
                                tracing::warn!(
                                    term,
                                    ?committed,
                                    ?last,
                                    "nothing committed for {stall_limit:?}: no quorum answers this leader; not serving"
                                );
                                return LedgerError::NotLeader(None);
                            }
                            Some((since, at))
                        }
                        _ => Some((now, committed)),
                    };
                }
                _ = stop.changed() => return LedgerError::Closed,
            }
        }
    }
}

/// The leadership task: serves while leading, and only then.
async fn manage(leadership: Leadership, mut stop: watch::Receiver<bool>) {
    let mut metrics = leadership.raft.metrics();
    loop {
        let term = loop {
            if *stop.borrow() {
                return;
            }
            let lead = {
                let metrics = metrics.borrow_and_update().clone();
                leadership.observe(&metrics);
                leading(&metrics).then_some(metrics.current_term)
            };
            if let Some(term) = lead {
                break term;
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = stop.changed() => {}
            }
        };
        let services = match leadership.take_office(term).await {
            Ok(services) => Arc::new(services),
            Err(why) => {
                tracing::warn!(term, %why, "elected but not serving yet");
                tokio::select! {
                    _ = tokio::time::sleep(leadership.config.replication.heartbeat) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        *leadership.slot.services.write().expect("slot lock") = Some(services.clone());
        let _ = leadership.serving.send(true);
        tracing::info!(term, "leading: taking writes");
        let reason = leadership.hold_office(term, &mut metrics, &mut stop).await;
        *leadership.slot.services.write().expect("slot lock") = None;
        let _ = leadership.serving.send(false);
        let closing = matches!(reason, LedgerError::Closed);
        if !closing {
            tracing::info!(term, %reason, "stopped leading");
        }
        services.stop(reason).await;
        if closing {
            return;
        }
    }
}
