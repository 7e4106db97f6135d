//! A seeded, in-process cluster of three replicas over a simulated network,
//! checked after every step.
//!
//! Three `Ledger` replicas run on in-memory disks ([`SimDisk`], one for the
//! ledger and one for the Raft log each) and real snapshot directories, on
//! tokio's paused clock. Their Raft traffic goes through [`Net`]: a router
//! from replica id to that replica's current `Raft` handle, with a seeded
//! fault model (drops, random delays, duplicates, and a link matrix for full,
//! partial and one-way partitions). Simulated phones submit halves to
//! whichever replica they believe leads and retry the identical half on
//! `NotLeader`, `Closed`, a timeout or a crash.
//!
//! Each step picks one action from the seed: a payment (honest, conflicting,
//! overdrawn, lone, or a replay of a decided key), time passing, a cut or a
//! heal, new fault rates, a crash (kill -9 or power cut; at most one replica
//! down), a restart, a crash of the leader, or a step of one replica's clock
//! (each also starts with a skew of up to 0.5 s). Snapshots every 20 entries
//! with 5 kept make compaction and snapshot installs to lagging or restarted
//! replicas routine. After every step the cheap invariants are checked;
//! every `CONVERGE_EVERY` steps everything is healed, the cluster converges
//! and every invariant is checked:
//!
//! 1. an outcome a phone was told never changes: any replica that has an
//!    outcome for that key has exactly the told one;
//! 2. no key has two outcomes (`Store::audit` on every state observed);
//! 3. two replicas that applied the same log index have the same digest (one
//!    map index -> (log id, digest) for the whole run);
//! 4. at convergence: every told outcome is on all three replicas, every half
//!    a phone heard `accepted` is pending or decided (recording that half) on
//!    the leader, and no half refused 700 is recorded in its key's outcome
//!    (at the end, after every phone finished: every such key has one);
//! 5. the books balance (audit), and the issued total never changes (the
//!    workload opens accounts once and never tops up).
//!
//! Phones also check what they hear as they hear it: a final outcome must
//! record their half and be one the payment's kind allows (an overdraw never
//! settles, a lone half only expires, ...), and a refusal must be one the
//! kind allows (700 once the partner expired alone; never 710: no phone
//! sends a second, different half for an undecided key).
//!
//! `TAPLEDGER_SEED` replays a run (the seed is printed first);
//! `TAPLEDGER_CLUSTER_STEPS` raises the step count for a soak;
//! `TAPLEDGER_CLUSTER_TRACE=1` prints every event as it happens (a failure
//! prints the last 80, and the phones' history of the key involved).
//!
//! Reproducibility: one seed drives every choice of the test. Each step draws
//! from its own generator (seeded from the run's seed), and each message's
//! faults from its link, the virtual instant it is sent and its rank at that
//! instant, so a replay meets the same actions and fault plan even where
//! timing differs. It is not bit-exact: tokio's `select!`, openraft's
//! election timeouts and std's `HashMap`s are randomised per process, and
//! snapshot files go through tokio's blocking pool; a failing seed has so
//! far reproduced in most reruns, not all.
//!
//! The scripted tests at the end hold, deterministically, two bugs the seeded
//! run found (both fixed in the matcher): a deposed leader refusing 700 on an
//! expiry that never committed; 710 for an identical resubmission after a
//! leader change.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::AnyError;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tapledger_actors::core::matching::PendingHalf;
use tapledger_actors::raft::{LogId, Raft, TypeConfig};
use tapledger_actors::{
    Clock, Ledger, LedgerConfig, LedgerError, LogStore, ReplicaId, ReplicaInfo, ReplicaSetup,
    ReplicaStatus, ReplicationConfig, Resolution, StorageIo, Store, Submission,
};
use tapledger_protocol::{
    AccountId, Half, Outcome, ReceiveHalf, RejectCode, SendHalf, Timestamp, TxKey,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::storage_faults::SimDisk;
use crate::support::{CLOCK_START, new_account, ram_tempdir, receive, send};

const IDS: [ReplicaId; 3] = [1, 2, 3];
const STEPS_DEFAULT: usize = 4_000;
/// Heal everything and converge this often.
const CONVERGE_EVERY: usize = 250;
const ACCOUNTS: usize = 12;
const OPENING_BALANCE: u64 = 1_000;
const HALF_TTL: Duration = Duration::from_secs(2);
/// How long a phone waits for the first answer to a submission.
const SUBMIT_WAIT: Duration = Duration::from_millis(1_500);
/// How long a phone waits on a pending half's ticket before asking again.
const TICKET_WAIT: Duration = Duration::from_secs(4);
/// A phone gives up after this long (its half may stay pending, then expire).
const PHONE_PATIENCE: Duration = Duration::from_secs(40);
/// The last convergence point, after every phone finished.
const THE_END: &str = "the end";
/// Convergence must happen within this (virtual) time once all is healed.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

fn replication() -> ReplicationConfig {
    ReplicationConfig {
        heartbeat: Duration::from_millis(100),
        election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
        snapshot_after_entries: 20,
        entries_kept_after_snapshot: 5,
    }
}

fn seed() -> u64 {
    match std::env::var("TAPLEDGER_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("TAPLEDGER_SEED={text:?} is not a u64")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            (nanos as u64) ^ ((nanos >> 64) as u64)
        }
    }
}

fn steps() -> usize {
    std::env::var("TAPLEDGER_CLUSTER_STEPS")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(STEPS_DEFAULT)
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

// ---------------------------------------------------------------------------
// Node time that follows tokio's (paused, virtual) clock.

/// Each replica's clock is off by a skew, as real clocks are; the skew can
/// be stepped (as NTP steps a clock).
struct VirtualClock {
    origin: Instant,
    skew_micros: Arc<AtomicI64>,
}

impl Clock for VirtualClock {
    fn now(&self) -> Timestamp {
        let elapsed = Instant::now().saturating_duration_since(self.origin);
        let micros = i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX);
        let skew = self.skew_micros.load(Ordering::SeqCst);
        Timestamp(
            CLOCK_START
                .0
                .saturating_add_signed(micros.saturating_add(skew)),
        )
    }
}

/// A 64-bit mixer (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

// ---------------------------------------------------------------------------
// The simulated network.

/// Fault rates applied to every message that crosses a live link.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Faults {
    /// Chance that a request, or separately its answer, is lost.
    drop: f64,
    /// Chance that a request is delivered a second time, later.
    dup: f64,
    /// Each direction takes 0..=delay_max_ms.
    delay_max_ms: u64,
}

const CALM: Faults = Faults {
    drop: 0.0,
    dup: 0.0,
    delay_max_ms: 2,
};

#[derive(Debug, Default, Clone, Copy)]
struct NetStats {
    sent: u64,
    refused: u64,
    dropped: u64,
    duplicated: u64,
    snapshot_chunks: u64,
    /// InstallSnapshot requests with `done` that the target answered.
    snapshot_transfers: u64,
    /// Of those, ones after which the target's applied log id reached the
    /// snapshot's last log id from below: a snapshot really installed.
    snapshot_installs: u64,
}

struct Route {
    incarnation: u64,
    raft: Raft,
    store: Arc<Store>,
}

struct NetState {
    /// Live replicas only.
    routes: BTreeMap<ReplicaId, Route>,
    /// (from, to) pairs whose messages are not delivered.
    cut: BTreeSet<(ReplicaId, ReplicaId)>,
    faults: Faults,
    /// One seed per directed link, drawn from the test's seed. Each message's
    /// fault draws come from (link seed, virtual time it is sent, how many
    /// were sent on the link at that same instant): a message sent at the
    /// same moment of a replay meets the same faults, however the tasks
    /// before it interleaved.
    link_seed: BTreeMap<(ReplicaId, ReplicaId), u64>,
    /// Per link: (instant of the last message in microseconds, how many at it).
    link_clock: BTreeMap<(ReplicaId, ReplicaId), (u64, u64)>,
    origin: Instant,
    stats: NetStats,
}

/// What happens to one request.
enum Plan {
    /// The link is cut or an end is down: fails after `after`.
    Refuse(Duration),
    /// Lost on the way there.
    Lose,
    Deliver {
        there: Duration,
        back: Duration,
        /// A duplicate, delivered this much after the original.
        duplicate: Option<Duration>,
        lose_answer: bool,
    },
}

#[derive(Clone)]
struct Net(Arc<Mutex<NetState>>);

impl Net {
    fn new(rng: &mut StdRng) -> Net {
        let mut link_seed = BTreeMap::new();
        for from in IDS {
            for to in IDS {
                if from != to {
                    link_seed.insert((from, to), rng.random());
                }
            }
        }
        Net(Arc::new(Mutex::new(NetState {
            routes: BTreeMap::new(),
            cut: BTreeSet::new(),
            faults: CALM,
            link_seed,
            link_clock: BTreeMap::new(),
            origin: Instant::now(),
            stats: NetStats::default(),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.0.lock().expect("net lock")
    }

    fn up(&self, id: ReplicaId, incarnation: u64, raft: Raft, store: Arc<Store>) {
        self.state().routes.insert(
            id,
            Route {
                incarnation,
                raft,
                store,
            },
        );
    }

    fn down(&self, id: ReplicaId) {
        self.state().routes.remove(&id);
    }

    fn is_alive(state: &NetState, id: ReplicaId, incarnation: u64) -> bool {
        state
            .routes
            .get(&id)
            .is_some_and(|route| route.incarnation == incarnation)
    }

    fn plan(&self, from: ReplicaId, incarnation: u64, to: ReplicaId) -> Plan {
        let mut guard = self.state();
        let state = &mut *guard;
        state.stats.sent += 1;
        let faults = state.faults;
        let passable = Net::is_alive(state, from, incarnation)
            && state.routes.contains_key(&to)
            && !state.cut.contains(&(from, to));
        let at = u64::try_from(
            Instant::now()
                .saturating_duration_since(state.origin)
                .as_micros(),
        )
        .unwrap_or(u64::MAX);
        let clock = state.link_clock.entry((from, to)).or_insert((at, 0));
        if clock.0 == at {
            clock.1 += 1;
        } else {
            *clock = (at, 1);
        }
        let nth = clock.1;
        let link = state.link_seed[&(from, to)];
        let rng = &mut StdRng::seed_from_u64(mix(link ^ mix(at ^ mix(nth))));
        let refuse_after = ms(rng.random_range(2..=10));
        let lost = rng.random_bool(faults.drop);
        let answer_lost = rng.random_bool(faults.drop);
        let duplicated = rng.random_bool(faults.dup);
        let there = ms(rng.random_range(0..=faults.delay_max_ms));
        let back = ms(rng.random_range(0..=faults.delay_max_ms));
        let duplicate_after = ms(rng.random_range(1..=3 * faults.delay_max_ms + 5));
        if !passable {
            state.stats.refused += 1;
            return Plan::Refuse(refuse_after);
        }
        if lost {
            state.stats.dropped += 1;
            return Plan::Lose;
        }
        if duplicated {
            state.stats.duplicated += 1;
        }
        if answer_lost {
            state.stats.dropped += 1;
        }
        Plan::Deliver {
            there,
            back,
            duplicate: duplicated.then_some(duplicate_after),
            lose_answer: answer_lost,
        }
    }

    /// The target's handle if the message may be delivered now.
    fn target(&self, from: ReplicaId, incarnation: u64, to: ReplicaId) -> Option<(u64, Raft)> {
        let state = self.state();
        if !Net::is_alive(&state, from, incarnation) || state.cut.contains(&(from, to)) {
            return None;
        }
        state
            .routes
            .get(&to)
            .map(|route| (route.incarnation, route.raft.clone()))
    }

    /// True if an answer from `to` (incarnation `target_incarnation`) may
    /// reach `from` now.
    fn answer_passes(
        &self,
        from: ReplicaId,
        incarnation: u64,
        to: ReplicaId,
        target_incarnation: u64,
    ) -> bool {
        let state = self.state();
        Net::is_alive(&state, from, incarnation)
            && Net::is_alive(&state, to, target_incarnation)
            && !state.cut.contains(&(to, from))
    }

    fn applied(&self, id: ReplicaId) -> Option<LogId> {
        let state = self.state();
        let route = state.routes.get(&id)?;
        route.store.raft_state().ok()?.0
    }
}

struct NetFactory {
    net: Net,
    from: ReplicaId,
    incarnation: u64,
}

impl RaftNetworkFactory<TypeConfig> for NetFactory {
    type Network = NetClient;

    async fn new_client(&mut self, target: ReplicaId, _node: &ReplicaInfo) -> NetClient {
        NetClient {
            net: self.net.clone(),
            from: self.from,
            incarnation: self.incarnation,
            to: target,
        }
    }
}

struct NetClient {
    net: Net,
    from: ReplicaId,
    incarnation: u64,
    to: ReplicaId,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<ReplicaId, ReplicaInfo, RaftError<ReplicaId, E>>>;

#[allow(clippy::result_large_err)] // openraft's error type, as its trait returns it
fn cannot_reach<T, E: std::error::Error>(from: ReplicaId, to: ReplicaId) -> RpcResult<T, E> {
    Err(RPCError::Unreachable(Unreachable::new(&AnyError::error(
        format!("simulated network: {from} cannot reach {to}"),
    ))))
}

#[allow(clippy::result_large_err)] // openraft's error type, as its trait returns it
fn lost<T, E: std::error::Error>(from: ReplicaId, to: ReplicaId) -> RpcResult<T, E> {
    Err(RPCError::Network(NetworkError::new(&AnyError::error(
        format!("simulated network: message {from} -> {to} lost"),
    ))))
}

impl NetClient {
    /// Carries one request to the target and its answer back, as the plan
    /// for this message says.
    async fn call<Req, Resp, E, F, Fut>(
        &self,
        request: Req,
        ttl: Duration,
        rpc: F,
    ) -> RpcResult<Resp, E>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        E: std::error::Error + Send + 'static,
        F: Fn(Raft, Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, RaftError<ReplicaId, E>>> + Send + 'static,
    {
        let (from, to, incarnation) = (self.from, self.to, self.incarnation);
        match self.net.plan(from, incarnation, to) {
            Plan::Refuse(after) => {
                tokio::time::sleep(after).await;
                cannot_reach(from, to)
            }
            Plan::Lose => {
                // The sender hears nothing until its own deadline.
                tokio::time::sleep(ttl).await;
                lost(from, to)
            }
            Plan::Deliver {
                there,
                back,
                duplicate,
                lose_answer,
            } => {
                tokio::time::sleep(there).await;
                let Some((target_incarnation, raft)) = self.net.target(from, incarnation, to)
                else {
                    return cannot_reach(from, to);
                };
                if let Some(after) = duplicate {
                    let (net, request, rpc) = (self.net.clone(), request.clone(), rpc.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        if let Some((again, raft)) = net.target(from, incarnation, to)
                            && again == target_incarnation
                        {
                            let _ = rpc(raft, request).await;
                        }
                    });
                }
                let result = rpc(raft, request).await;
                if lose_answer {
                    tokio::time::sleep(ttl).await;
                    return lost(from, to);
                }
                tokio::time::sleep(back).await;
                if !self
                    .net
                    .answer_passes(from, incarnation, to, target_incarnation)
                {
                    return cannot_reach(from, to);
                }
                result.map_err(|error| RPCError::RemoteError(RemoteError::new(to, error)))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for NetClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<ReplicaId>> {
        self.call(rpc, option.hard_ttl(), |raft: Raft, rpc| async move {
            raft.append_entries(rpc).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<ReplicaId>, InstallSnapshotError> {
        let done = rpc.done;
        let (net, to) = (self.net.clone(), self.to);
        self.net.state().stats.snapshot_chunks += 1;
        let result = self
            .call(rpc, option.hard_ttl(), move |raft: Raft, rpc| {
                let net = net.clone();
                async move {
                    let before = net.applied(to);
                    let snapshot_last = rpc.meta.last_log_id;
                    let done = rpc.done;
                    let answer = raft.install_snapshot(rpc).await;
                    let after = net.applied(to);
                    if done && answer.is_ok() && before < snapshot_last && after >= snapshot_last {
                        net.state().stats.snapshot_installs += 1;
                    }
                    answer
                }
            })
            .await;
        if done && result.is_ok() {
            self.net.state().stats.snapshot_transfers += 1;
        }
        result
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ReplicaId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<ReplicaId>> {
        self.call(rpc, option.hard_ttl(), |raft: Raft, rpc| async move {
            raft.vote(rpc).await
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// Phones and what they were told.

/// What a payment is meant to be, and so which outcomes it may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Honest,
    AmountMismatch,
    SenderMismatch,
    Overdraw,
    Lone,
    /// The identical recorded half of a decided key again.
    Replay,
    /// A different half of the same side for a decided key.
    ReplayConflict,
}

impl Kind {
    /// Outcome codes allowed for a key of this kind (`None` = settled).
    fn allows_outcome(self, code: Option<RejectCode>) -> bool {
        use RejectCode::*;
        match self {
            Kind::Honest => matches!(code, None | Some(InsufficientFunds) | Some(Expired)),
            Kind::AmountMismatch => matches!(code, Some(AmountMismatch) | Some(Expired)),
            Kind::SenderMismatch => matches!(code, Some(SenderMismatch) | Some(Expired)),
            Kind::Overdraw => matches!(code, Some(InsufficientFunds) | Some(Expired)),
            Kind::Lone => matches!(code, Some(Expired)),
            // The key's own kind decided; the told map checks it is unchanged.
            Kind::Replay => true,
            Kind::ReplayConflict => false,
        }
    }

    /// Refusals a half of this kind may hear.
    fn allows_refusal(self, code: RejectCode) -> bool {
        match self {
            // The partner may have expired alone first.
            Kind::Honest | Kind::AmountMismatch | Kind::SenderMismatch | Kind::Overdraw => {
                code == RejectCode::TxKeyAlreadyUsed
            }
            Kind::ReplayConflict => code == RejectCode::TxKeyAlreadyUsed,
            Kind::Lone | Kind::Replay => false,
        }
    }
}

#[derive(Default)]
struct Told {
    /// Every final outcome any phone heard, by key.
    outcomes: BTreeMap<u128, Arc<Outcome>>,
    /// Keys of `outcomes` in the order they were first told.
    order: Vec<u128>,
    /// Told since the last per-step check.
    fresh: Vec<u128>,
    /// The kind of each key's payment.
    kinds: BTreeMap<u128, Kind>,
    /// Halves a phone heard as durably pending.
    accepted: Vec<Half>,
    /// Halves refused 700 (the key decided without them).
    refused: Vec<(Half, String)>,
    /// Final answers heard (one per phone that finished with an outcome).
    finals: u64,
    phones: u64,
    gave_up: u64,
    errors: BTreeMap<String, u64>,
    violations: Vec<String>,
    /// What phones did and heard, per key.
    history: BTreeMap<u128, Vec<String>>,
}

impl Told {
    fn violation(&mut self, message: String) {
        self.violations.push(message);
    }

    /// The phones' history of `tx_key`, one event a line.
    fn history_of(&self, tx_key: TxKey) -> String {
        match self.history.get(&tx_key.as_u128()) {
            Some(lines) => format!("\n  phones on {tx_key}:\n    {}", lines.join("\n    ")),
            None => format!("\n  no phone history for {tx_key}"),
        }
    }

    fn heard(&mut self, kind: Kind, half: &Half, resolution: Resolution, how: &str) {
        let before = self.violations.len();
        self.judge(kind, half, resolution, how);
        if self.violations.len() > before {
            let history = self.history_of(half.tx_key());
            if let Some(last) = self.violations.last_mut() {
                last.push_str(&history);
            }
        }
    }

    fn judge(&mut self, kind: Kind, half: &Half, resolution: Resolution, how: &str) {
        let tx_key = half.tx_key();
        match resolution {
            Resolution::Final(outcome) => {
                self.finals += 1;
                if outcome.tx_key() != tx_key || !outcome.recorded(half) {
                    self.violation(format!(
                        "{tx_key}: a phone was told ({how}) an outcome that does not record its \
                         half {half:?}: {outcome:?}"
                    ));
                }
                let key_kind = self.kinds.get(&tx_key.as_u128()).copied().unwrap_or(kind);
                if !kind.allows_outcome(outcome.code()) || !key_kind.allows_outcome(outcome.code())
                {
                    self.violation(format!(
                        "{tx_key}: a {kind:?} half of a {key_kind:?} payment was told ({how}) \
                         {:?}: {outcome:?}",
                        outcome.code()
                    ));
                }
                match self.outcomes.entry(tx_key.as_u128()) {
                    std::collections::btree_map::Entry::Vacant(vacant) => {
                        vacant.insert(outcome);
                        self.order.push(tx_key.as_u128());
                        self.fresh.push(tx_key.as_u128());
                    }
                    std::collections::btree_map::Entry::Occupied(told) => {
                        if **told.get() != *outcome {
                            let earlier = told.get().clone();
                            self.violation(format!(
                                "{tx_key}: phones were told two outcomes: first {earlier:?}, \
                                 now ({how}) {outcome:?}"
                            ));
                        }
                    }
                }
            }
            Resolution::Refused(code) => {
                if !kind.allows_refusal(code) {
                    self.violation(format!(
                        "{tx_key}: a {kind:?} half {half:?} was refused ({how}) with {code:?}"
                    ));
                } else {
                    self.refused.push((half.clone(), how.to_string()));
                }
            }
        }
    }

    fn error(&mut self, what: String) {
        *self.errors.entry(what).or_insert(0) += 1;
    }
}

struct Live {
    ledger: Arc<Ledger>,
    /// True once this incarnation is dead: phones drop their request at once.
    killed: watch::Receiver<bool>,
}

/// What the phones share with the driver.
struct Shared {
    live: Mutex<BTreeMap<ReplicaId, Live>>,
    told: Mutex<Told>,
    /// Phones make no new attempt while this is true (convergence points).
    paused: watch::Sender<bool>,
    origin: Instant,
}

impl Shared {
    fn told(&self) -> std::sync::MutexGuard<'_, Told> {
        self.told.lock().expect("told lock")
    }

    /// Records what a phone did or heard about `tx_key`, for failure reports.
    fn log(&self, tx_key: TxKey, what: String) {
        let at = Instant::now().saturating_duration_since(self.origin);
        self.told()
            .history
            .entry(tx_key.as_u128())
            .or_default()
            .push(format!("{:>9.3} s {what}", at.as_secs_f64()));
    }

    fn live(&self) -> std::sync::MutexGuard<'_, BTreeMap<ReplicaId, Live>> {
        self.live.lock().expect("live lock")
    }

    /// The replica a phone believes leads: a random live one if it serves,
    /// else the leader it names (if live), else that random one anyway.
    fn choose(&self, rng: &mut StdRng) -> Option<(Arc<Ledger>, watch::Receiver<bool>)> {
        let live = self.live();
        if live.is_empty() {
            return None;
        }
        let ids: Vec<ReplicaId> = live.keys().copied().collect();
        let first = ids[rng.random_range(0..ids.len())];
        let ledger = &live[&first].ledger;
        let pick = if ledger.is_serving() {
            first
        } else {
            ledger
                .leader_hint()
                .map(|hint| hint.id)
                .filter(|id| live.contains_key(id))
                .unwrap_or(first)
        };
        let chosen = &live[&pick];
        Some((chosen.ledger.clone(), chosen.killed.clone()))
    }

    /// Asks a serving leader for the key's outcome.
    fn ask_leader(&self, tx_key: TxKey) -> Option<(ReplicaId, Arc<Outcome>)> {
        let live = self.live();
        let leader = live.values().find(|live| live.ledger.is_serving())?;
        let id = leader.ledger.id();
        match leader.ledger.outcome(tx_key) {
            Ok(outcome) => outcome.map(|outcome| (id, Arc::new(outcome))),
            Err(error) => {
                drop(live);
                self.told()
                    .violation(format!("{tx_key}: reading the outcome failed: {error}"));
                None
            }
        }
    }
}

fn error_kind(error: &LedgerError) -> String {
    match error {
        LedgerError::NotLeader(_) => "not leader".into(),
        LedgerError::Closed => "closed".into(),
        LedgerError::Replication(_) => "replication stopped".into(),
        LedgerError::Refused(refusal) => format!("refused: {refusal}"),
        other => format!("other: {other}"),
    }
}

/// One phone submitting one half until it hears how it ended (or gives up).
async fn phone(
    shared: Arc<Shared>,
    kind: Kind,
    half: Half,
    start_after: Duration,
    mut rng: StdRng,
) {
    tokio::time::sleep(start_after).await;
    let tx_key = half.tx_key();
    let party = half.party();
    let side = match half {
        Half::Send(_) => "send",
        Half::Receive(_) => "receive",
    };
    let give_up_at = Instant::now() + PHONE_PATIENCE;
    let mut paused = shared.paused.subscribe();
    let mut accepted = false;
    let log = |what: String| shared.log(tx_key, format!("{kind:?} {side} half: {what}"));
    loop {
        let _ = paused.wait_for(|paused| !*paused).await;
        if Instant::now() >= give_up_at {
            log("gives up".into());
            shared.told().gave_up += 1;
            return;
        }
        if let Some((ledger, mut killed)) = shared.choose(&mut rng) {
            let id = ledger.id();
            log(format!("submits to replica {id}"));
            let answer = tokio::select! {
                biased;
                _ = killed.wait_for(|killed| *killed) => None,
                answer = tokio::time::timeout(SUBMIT_WAIT, ledger.submit(party, half.clone())) => Some(answer),
            };
            drop(ledger);
            match answer {
                Some(Ok(Ok(Submission::Done(resolution)))) => {
                    log(format!("replica {id} answers {}", brief(&resolution)));
                    shared
                        .told()
                        .heard(kind, &half, resolution, &format!("at once by {id}"));
                    return;
                }
                Some(Ok(Ok(Submission::Pending(ticket)))) => {
                    log(format!("replica {id} accepts it"));
                    if !accepted {
                        accepted = true;
                        shared.told().accepted.push(half.clone());
                    }
                    let answer = tokio::select! {
                        biased;
                        _ = killed.wait_for(|killed| *killed) => None,
                        answer = tokio::time::timeout(TICKET_WAIT, ticket.resolution()) => Some(answer),
                    };
                    match answer {
                        Some(Ok(Ok(resolution))) => {
                            log(format!("replica {id}'s ticket: {}", brief(&resolution)));
                            shared.told().heard(
                                kind,
                                &half,
                                resolution,
                                &format!("by {id}'s ticket"),
                            );
                            return;
                        }
                        Some(Ok(Err(error))) => {
                            log(format!("replica {id}'s ticket: {error}"));
                            shared.told().error(error_kind(&error));
                        }
                        Some(Err(_)) => {
                            log(format!("replica {id}'s ticket times out"));
                            shared.told().error("ticket timed out".into());
                        }
                        None => {
                            log(format!("replica {id} crashed (ticket)"));
                            shared.told().error("replica crashed".into());
                        }
                    }
                }
                Some(Ok(Err(error))) => {
                    log(format!("replica {id}: {error}"));
                    shared.told().error(error_kind(&error));
                }
                Some(Err(_)) => {
                    log(format!("replica {id}: submit times out"));
                    shared.told().error("submit timed out".into());
                }
                None => {
                    log(format!("replica {id} crashed"));
                    shared.told().error("replica crashed".into());
                }
            }
        }
        if let Some((id, outcome)) = shared.ask_leader(tx_key) {
            let resolution = if outcome.recorded(&half) {
                Resolution::Final(outcome)
            } else {
                Resolution::Refused(RejectCode::TxKeyAlreadyUsed)
            };
            log(format!("asks leader {id}: {}", brief(&resolution)));
            shared
                .told()
                .heard(kind, &half, resolution, &format!("by asking leader {id}"));
            return;
        }
        tokio::time::sleep(ms(rng.random_range(50..=400))).await;
    }
}

fn brief(resolution: &Resolution) -> String {
    match resolution {
        Resolution::Final(outcome) => match outcome.code() {
            None => "final: settled".into(),
            Some(code) => format!("final: rejected {}", code.code()),
        },
        Resolution::Refused(code) => format!("refused {}", code.code()),
    }
}

// ---------------------------------------------------------------------------
// The cluster and its driver.

struct Slot {
    _dir: tempfile::TempDir,
    /// This replica's clock skew in microseconds.
    skew: Arc<AtomicI64>,
    config: LedgerConfig,
    ledger_disk: SimDisk,
    log_disk: SimDisk,
    incarnation: u64,
    killed: watch::Sender<bool>,
    up: bool,
    /// The applied log id last observed in this incarnation.
    last_applied: Option<LogId>,
    /// This incarnation's store, to see whether anything outlives a crash.
    store: std::sync::Weak<Store>,
    snapshot_index: Option<u64>,
    purged_index: Option<u64>,
}

#[derive(Debug, Default)]
struct Stats {
    leader_changes: u64,
    crashes: u64,
    power_cuts: u64,
    leader_crashes: u64,
    restarts: u64,
    convergences: u64,
    states_audited: u64,
    digest_checks: u64,
    snapshot_advances: u64,
    purge_advances: u64,
    replicas_snapshotted: BTreeSet<ReplicaId>,
    replicas_purged: BTreeSet<ReplicaId>,
    cuts: u64,
    heals: u64,
    fault_changes: u64,
    /// Crashes after which a task of the dead incarnation still held its store.
    lingering: u64,
}

struct Cluster {
    seed: u64,
    step: usize,
    /// Seeded from the test's seed; gives each step its own generator.
    master: StdRng,
    /// This step's generator: the same draws for the same step of a replay,
    /// whatever earlier steps observed.
    rng: StdRng,
    net: Net,
    shared: Arc<Shared>,
    members: BTreeMap<ReplicaId, ReplicaInfo>,
    slots: BTreeMap<ReplicaId, Slot>,
    /// Applied index -> (log id, digest) over the whole run.
    digests: BTreeMap<u64, (LogId, [u8; 32])>,
    /// Term -> the replica that led it.
    leaders: BTreeMap<u64, ReplicaId>,
    last_leader: Option<(u64, ReplicaId)>,
    accounts: Vec<AccountId>,
    /// What the issuer paid out once the accounts were opened.
    issued: u64,
    /// The leader's applied index once the accounts were opened.
    setup_index: Option<u64>,
    /// Virtual time when the cluster was made.
    origin: Instant,
    trace: VecDeque<String>,
    /// `TAPLEDGER_CLUSTER_TRACE=1`: print every event as it happens.
    print_trace: bool,
    told_cursor: usize,
    phones: Vec<tokio::task::JoinHandle<()>>,
    stats: Stats,
}

impl Cluster {
    fn new(seed: u64) -> Cluster {
        let mut master = StdRng::seed_from_u64(seed);
        let net = Net::new(&mut master);
        let origin = Instant::now();
        let members = IDS
            .iter()
            .map(|&id| {
                (
                    id,
                    ReplicaInfo {
                        client_addr: format!("r{id}"),
                        peer_addr: format!("peer-r{id}"),
                        fingerprint: String::new(),
                    },
                )
            })
            .collect();
        let slots = IDS
            .iter()
            .map(|&id| {
                // Snapshots are real files; on a RAM disk where there is one,
                // so hundreds of snapshot fsyncs cost no disk time.
                let dir = ram_tempdir();
                let mut config = LedgerConfig::new(dir.path().join("ledger.redb"));
                config.snapshot_dir = dir.path().join("snapshots");
                config.storage_io = StorageIo::Inline;
                let skew = Arc::new(AtomicI64::new(master.random_range(-500_000..=500_000)));
                config.clock = Arc::new(VirtualClock {
                    origin,
                    skew_micros: skew.clone(),
                });
                config.half_ttl = HALF_TTL;
                config.pending_halves_per_account_max = 1_000;
                config.replication = replication();
                (
                    id,
                    Slot {
                        _dir: dir,
                        skew,
                        config,
                        ledger_disk: SimDisk::default(),
                        log_disk: SimDisk::default(),
                        incarnation: 0,
                        killed: watch::channel(false).0,
                        up: false,
                        last_applied: None,
                        store: std::sync::Weak::new(),
                        snapshot_index: None,
                        purged_index: None,
                    },
                )
            })
            .collect();
        let rng = StdRng::seed_from_u64(master.random());
        Cluster {
            seed,
            step: 0,
            master,
            rng,
            net,
            shared: Arc::new(Shared {
                live: Mutex::new(BTreeMap::new()),
                told: Mutex::new(Told::default()),
                paused: watch::channel(false).0,
                origin,
            }),
            members,
            slots,
            digests: BTreeMap::new(),
            leaders: BTreeMap::new(),
            last_leader: None,
            accounts: Vec::new(),
            issued: 0,
            setup_index: None,
            origin,
            trace: VecDeque::new(),
            print_trace: std::env::var_os("TAPLEDGER_CLUSTER_TRACE").is_some(),
            told_cursor: 0,
            phones: Vec::new(),
            stats: Stats::default(),
        }
    }

    fn note(&mut self, what: String) {
        if self.trace.len() >= 80 {
            self.trace.pop_front();
        }
        let at = Instant::now().saturating_duration_since(self.origin);
        let line = format!(
            "step {:>5} at {:>9.3} s: {what}",
            self.step,
            at.as_secs_f64()
        );
        if self.print_trace {
            println!("{line}");
        }
        self.trace.push_back(line);
    }

    fn statuses(&self) -> Vec<ReplicaStatus> {
        self.shared
            .live()
            .values()
            .map(|live| live.ledger.status())
            .collect()
    }

    /// Reports a broken invariant with everything needed to replay it.
    fn fail(&self, what: impl std::fmt::Display) -> ! {
        eprintln!("---- cluster trace (last {} events) ----", self.trace.len());
        for line in &self.trace {
            eprintln!("{line}");
        }
        for status in self.statuses() {
            eprintln!("{status:?}");
        }
        {
            let net = self.net.state();
            eprintln!(
                "net: faults {:?}, cut {:?}, stats {:?}",
                net.faults, net.cut, net.stats
            );
        }
        panic!(
            "cluster invariant broken at step {} (TAPLEDGER_SEED={}): {what}",
            self.step, self.seed
        );
    }

    fn down_count(&self) -> usize {
        self.slots.values().filter(|slot| !slot.up).count()
    }

    fn live_ledgers(&self) -> Vec<(ReplicaId, Arc<Ledger>)> {
        self.shared
            .live()
            .iter()
            .map(|(id, live)| (*id, live.ledger.clone()))
            .collect()
    }

    fn serving(&self) -> Option<(ReplicaId, Arc<Ledger>)> {
        self.live_ledgers()
            .into_iter()
            .find(|(_, ledger)| ledger.is_serving())
    }

    async fn start(&mut self, id: ReplicaId) {
        let slot = self.slots.get_mut(&id).expect("slot");
        slot.incarnation += 1;
        let store = match Store::open_with_backend(slot.ledger_disk.clone()) {
            Ok(store) => Arc::new(store),
            Err(error) => self.fail(format!(
                "replica {id}: the ledger image does not reopen: {error}"
            )),
        };
        let slot = self.slots.get_mut(&id).expect("slot");
        let log = match LogStore::open_with_backend(slot.log_disk.clone(), StorageIo::Inline) {
            Ok(log) => log,
            Err(error) => self.fail(format!(
                "replica {id}: the log image does not reopen: {error}"
            )),
        };
        let slot = self.slots.get_mut(&id).expect("slot");
        let setup = ReplicaSetup {
            id,
            network: NetFactory {
                net: self.net.clone(),
                from: id,
                incarnation: slot.incarnation,
            },
            bootstrap: Some(self.members.clone()),
        };
        let started = tokio::time::timeout(
            Duration::from_secs(30),
            Ledger::start_replica(slot.config.clone(), store.clone(), log, setup),
        )
        .await;
        let ledger = match started {
            Ok(Ok(ledger)) => Arc::new(ledger),
            Ok(Err(error)) => self.fail(format!("replica {id} does not start: {error}")),
            Err(_) => self.fail(format!("replica {id} does not start within 30 s")),
        };
        let slot = self.slots.get_mut(&id).expect("slot");
        self.net
            .up(id, slot.incarnation, ledger.raft().clone(), store.clone());
        let (killed, killed_receiver) = watch::channel(false);
        slot.killed = killed;
        slot.up = true;
        slot.last_applied = None;
        slot.store = Arc::downgrade(&store);
        self.shared.live().insert(
            id,
            Live {
                ledger,
                killed: killed_receiver,
            },
        );
    }

    /// Stops replica `id` as a kill -9 (`power_cut` false: every write so far
    /// survives) or a power cut (only what was synced survives) would.
    async fn crash(&mut self, id: ReplicaId, power_cut: bool) {
        let Some(live) = self.shared.live().remove(&id) else {
            return;
        };
        // From here the process is gone: nothing it sends or answers arrives,
        // no phone hears from it, and what it writes later is not on the disk
        // it restarts from.
        self.net.down(id);
        let slot = self.slots.get_mut(&id).expect("slot");
        let _ = slot.killed.send(true);
        let (ledger_image, log_image) = if power_cut {
            (
                slot.ledger_disk.durable_image(),
                slot.log_disk.durable_image(),
            )
        } else {
            (
                slot.ledger_disk.current_image(),
                slot.log_disk.current_image(),
            )
        };
        slot.ledger_disk = SimDisk::with_image(ledger_image);
        slot.log_disk = SimDisk::with_image(log_image);
        slot.up = false;
        self.stats.crashes += 1;
        if power_cut {
            self.stats.power_cuts += 1;
        }
        // Phones let go of it once they see it killed.
        let mut ledger = live.ledger;
        let deadline = Instant::now() + Duration::from_secs(10);
        let ledger = loop {
            match Arc::try_unwrap(ledger) {
                Ok(ledger) => break ledger,
                Err(shared) => ledger = shared,
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "replica {id}: something still holds the crashed ledger"
                ));
            }
            tokio::task::yield_now().await;
            if Arc::strong_count(&ledger) > 1 {
                tokio::time::sleep(ms(1)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), ledger.crash())
            .await
            .is_err()
        {
            self.fail(format!("replica {id}: crash() did not return"));
        }
        if self.slots[&id].store.strong_count() > 0 {
            // Some task of the dead incarnation still holds its store; it
            // cannot reach anyone (the network refuses it), but say so.
            self.stats.lingering += 1;
            self.note(format!(
                "replica {id}: the crashed incarnation's store is still held"
            ));
        }
    }

    async fn restart_down(&mut self) {
        let down: Vec<ReplicaId> = self
            .slots
            .iter()
            .filter(|(_, slot)| !slot.up)
            .map(|(id, _)| *id)
            .collect();
        for id in down {
            self.note(format!("restart replica {id}"));
            self.start(id).await;
            self.stats.restarts += 1;
        }
    }

    /// Waits until some replica serves.
    async fn wait_leader(&mut self, limit: Duration) -> (ReplicaId, Arc<Ledger>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(leader) = self.serving() {
                return leader;
            }
            if Instant::now() > deadline {
                self.fail(format!("no replica serves after {limit:?}"));
            }
            tokio::time::sleep(ms(20)).await;
        }
    }

    async fn open_accounts(&mut self) {
        while self.accounts.len() < ACCOUNTS {
            let (_, leader) = self.wait_leader(Duration::from_secs(30)).await;
            match tokio::time::timeout(
                Duration::from_secs(5),
                leader.open_account(new_account(OPENING_BALANCE)),
            )
            .await
            {
                Ok(Ok(id)) => self.accounts.push(id),
                Ok(Err(LedgerError::NotLeader(_))) | Err(_) => {}
                Ok(Err(error)) => self.fail(format!("open account: {error}")),
            }
        }
        let (_, leader) = self.wait_leader(Duration::from_secs(30)).await;
        self.issued = leader.store().counters().expect("counters").issued;
        self.setup_index = leader.status().applied_index;
        assert_eq!(
            self.issued,
            OPENING_BALANCE * ACCOUNTS as u64,
            "seed {}: accounts opened more than once",
            self.seed
        );
    }

    // -- cheap invariants, after every step -----------------------------------

    fn observe(&mut self) {
        let violations = self.shared.told().violations.clone();
        if let Some(first) = violations.first() {
            self.fail(format!(
                "{} phone-side violations; first: {first}",
                violations.len()
            ));
        }
        for (id, ledger) in self.live_ledgers() {
            let status = ledger.status();
            if let Some(failure) = &status.failure {
                self.fail(format!("replica {id}: replication stopped: {failure}"));
            }
            if status.role == "leader" {
                match self.leaders.get(&status.term) {
                    Some(&other) if other != id => self.fail(format!(
                        "replicas {other} and {id} both led term {}",
                        status.term
                    )),
                    _ => {
                        self.leaders.insert(status.term, id);
                    }
                }
                if self.last_leader.is_none_or(|(term, _)| status.term > term) {
                    self.last_leader = Some((status.term, id));
                    self.stats.leader_changes += 1;
                    self.note(format!("replica {id} leads term {}", status.term));
                }
            }
            let slot = self.slots.get_mut(&id).expect("slot");
            if status.snapshot_index > slot.snapshot_index {
                slot.snapshot_index = status.snapshot_index;
                self.stats.snapshot_advances += 1;
                self.stats.replicas_snapshotted.insert(id);
            }
            if status.purged_index > slot.purged_index {
                slot.purged_index = status.purged_index;
                self.stats.purge_advances += 1;
                self.stats.replicas_purged.insert(id);
            }
            // Read the applied log id and the digest with no await between:
            // nothing else runs on this single-threaded runtime meanwhile.
            let store = ledger.store();
            let applied = match store.raft_state() {
                Ok((applied, _)) => applied,
                Err(error) => self.fail(format!("replica {id}: raft state: {error}")),
            };
            let last = slot.last_applied;
            if applied == last {
                continue;
            }
            if applied.map(|log_id| log_id.index) < last.map(|log_id| log_id.index) {
                self.fail(format!(
                    "replica {id}: applied log id went back from {last:?} to {applied:?}"
                ));
            }
            slot.last_applied = applied;
            let Some(applied) = applied else { continue };
            let digest = match store.digest() {
                Ok(digest) => digest,
                Err(error) => self.fail(format!("replica {id}: digest: {error}")),
            };
            self.stats.digest_checks += 1;
            match self.digests.get(&applied.index) {
                Some((log_id, known)) => {
                    if *log_id != applied || *known != digest {
                        self.fail(format!(
                            "replica {id} applied {applied} with digest {}, but {log_id} was seen \
                             at index {} with digest {}",
                            hex(&digest),
                            applied.index,
                            hex(known)
                        ));
                    }
                }
                None => {
                    // A state seen for the first time: audit it (equal digests
                    // later mean the same state).
                    let audit = match store.audit() {
                        Ok(audit) => audit,
                        Err(error) => self.fail(format!("replica {id}: audit: {error}")),
                    };
                    self.stats.states_audited += 1;
                    if !audit.is_ok() {
                        self.fail(format!(
                            "replica {id} at {applied}: audit problems: {:#?}",
                            audit.problems
                        ));
                    }
                    if self.setup_index.is_some_and(|setup| applied.index >= setup)
                        && audit.issued != self.issued
                    {
                        self.fail(format!(
                            "replica {id} at {applied}: the issuer paid out {} (expected {})",
                            audit.issued, self.issued
                        ));
                    }
                    self.digests.insert(applied.index, (applied, digest));
                }
            }
        }
        // Outcomes told since the last step, and a rotating window of older
        // ones, against every live replica.
        let keys: Vec<(u128, Arc<Outcome>)> = {
            let mut told = self.shared.told();
            let fresh = std::mem::take(&mut told.fresh);
            let mut keys: Vec<u128> = fresh;
            let total = told.order.len();
            for _ in 0..total.min(24) {
                self.told_cursor = (self.told_cursor + 1) % total;
                keys.push(told.order[self.told_cursor]);
            }
            keys.into_iter()
                .map(|key| (key, told.outcomes[&key].clone()))
                .collect()
        };
        for (id, ledger) in self.live_ledgers() {
            for (key, told) in &keys {
                let tx_key = TxKey::from_u128(*key);
                match ledger.outcome(tx_key) {
                    Ok(None) => {}
                    Ok(Some(stored)) if stored == **told => {}
                    Ok(Some(stored)) => self.fail(format!(
                        "replica {id}: {tx_key} was told {told:?} but the store has \
                         {stored:?}{}",
                        self.shared.told().history_of(tx_key)
                    )),
                    Err(error) => self.fail(format!("replica {id}: outcome {tx_key}: {error}")),
                }
            }
        }
    }

    // -- convergence: every invariant -----------------------------------------

    async fn converge(&mut self, why: &str) {
        self.rng = StdRng::seed_from_u64(self.master.random());
        self.note(format!("converge ({why}): heal everything"));
        {
            let mut net = self.net.state();
            net.cut.clear();
            net.faults = CALM;
        }
        self.restart_down().await;
        let _ = self.shared.paused.send(true);
        let deadline = Instant::now() + CONVERGE_LIMIT;
        loop {
            self.observe();
            if self.converged() {
                break;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "the cluster did not converge within {CONVERGE_LIMIT:?} of healing ({why})"
                ));
            }
            tokio::time::sleep(ms(20)).await;
        }
        self.full_check(why, why == THE_END);
        self.stats.convergences += 1;
        let _ = self.shared.paused.send(false);
    }

    /// One replica serves, all are up and have applied everything it logged.
    fn converged(&self) -> bool {
        let live = self.live_ledgers();
        if live.len() != IDS.len() {
            return false;
        }
        let Some((_, leader)) = live.iter().find(|(_, ledger)| ledger.is_serving()) else {
            return false;
        };
        let last = leader.status().last_log_index;
        live.iter().all(|(_, ledger)| {
            let status = ledger.status();
            status.applied_index == last
                && ledger
                    .store()
                    .raft_state()
                    .ok()
                    .and_then(|(applied, _)| applied)
                    .map(|log_id| log_id.index)
                    == last
        })
    }

    /// Every invariant, on a converged cluster. `last`: every phone is done
    /// and every lone half is past its deadline.
    fn full_check(&mut self, why: &str, last: bool) {
        let live = self.live_ledgers();
        let Some((leader_id, leader)) =
            live.iter().find(|(_, ledger)| ledger.is_serving()).cloned()
        else {
            self.fail("no leader at a convergence point");
        };
        let mut digests = BTreeSet::new();
        for (id, ledger) in &live {
            let store = ledger.store();
            let audit = store.audit().expect("audit");
            if !audit.is_ok() {
                self.fail(format!(
                    "replica {id}: audit problems: {:#?}",
                    audit.problems
                ));
            }
            if audit.issued != self.issued || audit.user_balances_total != u128::from(self.issued) {
                self.fail(format!(
                    "replica {id}: issued {} and balances {} (expected {})",
                    audit.issued, audit.user_balances_total, self.issued
                ));
            }
            digests.insert(store.digest().expect("digest"));
        }
        if digests.len() != 1 {
            self.fail(format!(
                "converged replicas have {} different digests",
                digests.len()
            ));
        }
        let (told, accepted, refused) = {
            let told = self.shared.told();
            (
                told.outcomes.clone(),
                told.accepted.clone(),
                told.refused.clone(),
            )
        };
        for (key, outcome) in &told {
            let tx_key = TxKey::from_u128(*key);
            for (id, ledger) in &live {
                match ledger.outcome(tx_key) {
                    Ok(Some(stored)) if stored == **outcome => {}
                    other => self.fail(format!(
                        "replica {id} at convergence: {tx_key} was told {outcome:?}, the store \
                         has {other:?}{}",
                        self.shared.told().history_of(tx_key)
                    )),
                }
            }
        }
        for half in &accepted {
            let tx_key = half.tx_key();
            let pending = leader.pending(tx_key).expect("pending");
            let outcome = leader.outcome(tx_key).expect("outcome");
            let fine = match (&pending, &outcome) {
                (Some(pending), None) => same_half(pending, half),
                (None, Some(outcome)) => outcome.recorded(half),
                _ => false,
            };
            if !fine {
                self.fail(format!(
                    "leader {leader_id}: {half:?} was acknowledged as pending; it has pending \
                     {pending:?}, outcome {outcome:?}{}",
                    self.shared.told().history_of(tx_key)
                ));
            }
        }
        for (half, how) in &refused {
            let tx_key = half.tx_key();
            match leader.outcome(tx_key).expect("outcome") {
                Some(outcome) if !outcome.recorded(half) => {}
                // An expiry the leader has decided may not be in the log yet;
                // once every half is over (the end) the key must be decided.
                None if !last => {}
                other => self.fail(format!(
                    "leader {leader_id}: {half:?} was refused 700 ({how}), but the key has \
                     {other:?}{}",
                    self.shared.told().history_of(tx_key)
                )),
            }
        }
        let status = leader.status();
        self.note(format!(
            "converged ({why}): leader {leader_id} term {} applied {:?}, {} told outcomes, {} \
             accepted halves checked on all",
            status.term,
            status.applied_index,
            told.len(),
            accepted.len()
        ));
    }

    // -- actions --------------------------------------------------------------

    fn account(&mut self) -> AccountId {
        self.accounts[self.rng.random_range(0..self.accounts.len())]
    }

    fn two_accounts(&mut self) -> (AccountId, AccountId) {
        let sender = self.account();
        loop {
            let receiver = self.account();
            if receiver != sender {
                return (sender, receiver);
            }
        }
    }

    fn spawn_phone(&mut self, kind: Kind, half: Half, start_after: Duration) {
        let rng = StdRng::seed_from_u64(self.rng.random());
        self.shared.told().phones += 1;
        let shared = self.shared.clone();
        self.phones
            .push(tokio::spawn(phone(shared, kind, half, start_after, rng)));
    }

    fn pay(&mut self) {
        let tx_key = TxKey::from_u128(self.rng.random());
        let (sender, receiver) = self.two_accounts();
        let amount = self.rng.random_range(1..=250);
        let roll = self.rng.random_range(0..100);
        let (kind, halves): (Kind, Vec<Half>) = match roll {
            0..=59 => (
                Kind::Honest,
                vec![
                    send(tx_key, sender, amount),
                    receive(tx_key, receiver, sender, amount),
                ],
            ),
            60..=71 => {
                let off = self.rng.random_range(1..=50);
                (
                    Kind::AmountMismatch,
                    vec![
                        send(tx_key, sender, amount),
                        receive(tx_key, receiver, sender, amount + off),
                    ],
                )
            }
            72..=81 => {
                let expected = if self.rng.random_bool(0.5) {
                    9_999
                } else {
                    loop {
                        let other = self.account();
                        if other != sender && other != receiver {
                            break other;
                        }
                    }
                };
                (
                    Kind::SenderMismatch,
                    vec![
                        send(tx_key, sender, amount),
                        receive(tx_key, receiver, expected, amount),
                    ],
                )
            }
            82..=89 => {
                // More than all the money there is.
                let amount = self.issued + 1 + self.rng.random_range(0..1_000);
                (
                    Kind::Overdraw,
                    vec![
                        send(tx_key, sender, amount),
                        receive(tx_key, receiver, sender, amount),
                    ],
                )
            }
            _ => {
                let half = if self.rng.random_bool(0.5) {
                    send(tx_key, sender, amount)
                } else {
                    receive(tx_key, receiver, sender, amount)
                };
                (Kind::Lone, vec![half])
            }
        };
        self.shared.told().kinds.insert(tx_key.as_u128(), kind);
        self.note(format!(
            "pay {kind:?} {tx_key}: {sender} -> {receiver}, {} half(s)",
            halves.len()
        ));
        let mut halves = halves;
        if self.rng.random_bool(0.5) {
            halves.reverse();
        }
        let mut start_after = Duration::ZERO;
        for half in halves {
            self.spawn_phone(kind, half, start_after);
            start_after += ms(self.rng.random_range(0..=400));
        }
    }

    fn replay(&mut self) {
        let picked = {
            let told = self.shared.told();
            if told.order.is_empty() {
                None
            } else {
                let key = told.order[self.rng.random_range(0..told.order.len())];
                Some(told.outcomes[&key].clone())
            }
        };
        let Some(outcome) = picked else {
            return self.pay();
        };
        let mut recorded: Vec<Half> = Vec::new();
        match &*outcome {
            Outcome::Settled(settlement) => {
                recorded.push(Half::Send(settlement.send.half.clone()));
                recorded.push(Half::Receive(settlement.receive.half.clone()));
            }
            Outcome::Rejected(rejection) => {
                if let Some(send) = &rejection.send {
                    recorded.push(Half::Send(send.half.clone()));
                }
                if let Some(receive) = &rejection.receive {
                    recorded.push(Half::Receive(receive.half.clone()));
                }
            }
        }
        let half = recorded[self.rng.random_range(0..recorded.len())].clone();
        if self.rng.random_bool(0.6) {
            self.note(format!("replay {} identically", outcome.tx_key()));
            self.spawn_phone(Kind::Replay, half, Duration::ZERO);
        } else {
            let conflicting = match half {
                Half::Send(send) => Half::Send(SendHalf {
                    amount: send.amount + 1,
                    ..send
                }),
                Half::Receive(receive) => Half::Receive(ReceiveHalf {
                    expected_amount: receive.expected_amount + 1,
                    ..receive
                }),
            };
            self.note(format!("replay {} with a different half", outcome.tx_key()));
            self.spawn_phone(Kind::ReplayConflict, conflicting, Duration::ZERO);
        }
    }

    fn other(&mut self, not: ReplicaId) -> ReplicaId {
        loop {
            let id = IDS[self.rng.random_range(0..IDS.len())];
            if id != not {
                return id;
            }
        }
    }

    fn pick(&mut self) -> ReplicaId {
        IDS[self.rng.random_range(0..IDS.len())]
    }

    fn cut(&mut self, links: &[(ReplicaId, ReplicaId)], what: String) {
        self.note(what);
        self.stats.cuts += 1;
        let mut net = self.net.state();
        for link in links {
            net.cut.insert(*link);
        }
    }

    fn new_faults(&mut self) {
        let faults = match self.rng.random_range(0..5) {
            0 => CALM,
            1 => Faults {
                drop: 0.03,
                dup: 0.03,
                delay_max_ms: 10,
            },
            2 => Faults {
                drop: 0.15,
                dup: 0.1,
                delay_max_ms: 20,
            },
            3 => Faults {
                drop: 0.02,
                dup: 0.05,
                delay_max_ms: 60,
            },
            _ => Faults {
                drop: self.rng.random_range(0.0..0.25),
                dup: self.rng.random_range(0.0..0.25),
                delay_max_ms: self.rng.random_range(0..=40),
            },
        };
        self.note(format!("faults {faults:?}"));
        self.stats.fault_changes += 1;
        self.net.state().faults = faults;
    }

    async fn one_step(&mut self) {
        self.rng = StdRng::seed_from_u64(self.master.random());
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=33 => self.pay(),
            34..=53 => {
                let wait = ms(self.rng.random_range(100..=2_000));
                self.note(format!("time passes: {wait:?}"));
                tokio::time::sleep(wait).await;
            }
            54..=57 => {
                let from = self.pick();
                let to = self.other(from);
                self.cut(&[(from, to)], format!("cut one way {from} -> {to}"));
            }
            58..=60 => {
                let alone = self.pick();
                let links: Vec<_> = IDS
                    .iter()
                    .filter(|&&id| id != alone)
                    .flat_map(|&id| [(alone, id), (id, alone)])
                    .collect();
                self.cut(&links, format!("isolate {alone}"));
            }
            61..=64 => {
                let a = self.pick();
                let c = self.other(a);
                self.cut(
                    &[(a, c), (c, a)],
                    format!("partial partition: {a} and {c} cannot see each other"),
                );
            }
            65..=69 => {
                self.note("heal all links".into());
                self.stats.heals += 1;
                self.net.state().cut.clear();
            }
            70..=72 => {
                let a = self.pick();
                let b = self.other(a);
                self.note(format!("heal {a} <-> {b}"));
                self.stats.heals += 1;
                let mut net = self.net.state();
                net.cut.remove(&(a, b));
                net.cut.remove(&(b, a));
            }
            73..=77 => self.new_faults(),
            78..=80 if self.down_count() == 0 => {
                let id = self.pick();
                let power_cut = self.rng.random_bool(0.5);
                self.note(format!(
                    "crash replica {id} ({})",
                    if power_cut { "power cut" } else { "kill -9" }
                ));
                self.crash(id, power_cut).await;
            }
            81..=83 if self.down_count() == 0 => {
                let power_cut = self.rng.random_bool(0.5);
                let leader = self.serving().map(|(id, _)| id);
                if let Some(id) = leader {
                    self.note(format!(
                        "crash the leader, replica {id} ({})",
                        if power_cut { "power cut" } else { "kill -9" }
                    ));
                    self.stats.leader_crashes += 1;
                    self.crash(id, power_cut).await;
                }
            }
            78..=85 if self.down_count() > 0 => self.restart_down().await,
            84..=86 => {
                let id = self.pick();
                let step = self.rng.random_range(-400_000..=400_000);
                let skew = self.slots[&id].skew.fetch_add(step, Ordering::SeqCst) + step;
                self.note(format!(
                    "replica {id}'s clock steps by {} ms (skew now {} ms)",
                    step / 1_000,
                    skew / 1_000
                ));
            }
            87..=90 => {
                let wait = ms(self.rng.random_range(10..=300));
                tokio::time::sleep(wait).await;
            }
            _ => self.replay(),
        }
        tokio::time::sleep(ms(self.rng.random_range(1..=30))).await;
        self.observe();
    }
}

fn same_half(pending: &PendingHalf, half: &Half) -> bool {
    match (pending, half) {
        (PendingHalf::Send(stamped), Half::Send(send)) => stamped.half == *send,
        (PendingHalf::Receive(stamped), Half::Receive(receive)) => stamped.half == *receive,
        _ => false,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Goal: under a seeded mix of payments, partitions (full, partial, one-way),
/// message loss, delay and duplication, crashes (kill -9 and power cut) and
/// restarts of any replica or of the leader, snapshots and log compaction,
/// no phone is ever told an outcome that changes or disappears, every
/// replica that applied an index holds the same ledger, the books balance,
/// and the cluster converges with every promise kept whenever it is healed.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_three_replica_cluster_keeps_every_promise_under_seeded_faults() {
    let seed = seed();
    let steps = steps();
    println!("cluster: TAPLEDGER_SEED={seed} TAPLEDGER_CLUSTER_STEPS={steps}");
    let wall = std::time::Instant::now();
    let virtual_start = Instant::now();
    let mut cluster = Cluster::new(seed);
    for id in IDS {
        cluster.start(id).await;
    }
    cluster.wait_leader(Duration::from_secs(30)).await;
    cluster.open_accounts().await;
    cluster.converge("accounts opened").await;

    for step in 1..=steps {
        cluster.step = step;
        cluster.one_step().await;
        if step % CONVERGE_EVERY == 0 {
            cluster.converge("periodic").await;
        }
    }

    // The end: heal everything, let every phone finish, let every lone half
    // expire, then check it all once more.
    cluster.step = steps + 1;
    cluster.note("end: heal everything, let phones finish".into());
    {
        let mut net = cluster.net.state();
        net.cut.clear();
        net.faults = CALM;
    }
    cluster.restart_down().await;
    let deadline = Instant::now() + PHONE_PATIENCE + Duration::from_secs(30);
    while cluster.phones.iter().any(|phone| !phone.is_finished()) {
        if Instant::now() > deadline {
            cluster.fail("phones still running long after the cluster was healed");
        }
        tokio::time::sleep(ms(100)).await;
        cluster.observe();
    }
    tokio::time::sleep(HALF_TTL * 2).await;
    cluster.converge(THE_END).await;
    let (_, leader) = cluster.wait_leader(Duration::from_secs(5)).await;
    let pending = leader.store().all_pending().expect("pending");
    if !pending.is_empty() {
        cluster.fail(format!(
            "{} lone halves still pending {:?} after they were due to expire on a healthy \
             cluster: {:?}",
            pending.len(),
            HALF_TTL * 2,
            pending.iter().map(|half| half.tx_key()).collect::<Vec<_>>()
        ));
    }
    drop(leader);

    let net = cluster.net.state().stats;
    {
        let told = cluster.shared.told();
        let stats = &cluster.stats;
        println!(
            "cluster: {steps} steps, {} phones, {} payments told (distinct keys {}), {} accepted, {} \
             refused 700, {} gave up; {} leader changes (last term {}), {} crashes ({} power cuts, \
             {} of the leader), {} restarts, {} convergences; snapshots: {} installs ({} transfers, \
             {} chunks), {} snapshot advances on {} replicas, {} purges on {} replicas; {} states \
             audited, {} digest checks; {} crashes left a task holding the store; net {} sent, {} refused, {} dropped, {} duplicated; {:.1} s \
             virtual, {:.1} s wall; TAPLEDGER_SEED={seed}",
            told.phones,
            told.finals,
            told.outcomes.len(),
            told.accepted.len(),
            told.refused.len(),
            told.gave_up,
            stats.leader_changes,
            cluster.last_leader.map(|(term, _)| term).unwrap_or(0),
            stats.crashes,
            stats.power_cuts,
            stats.leader_crashes,
            stats.restarts,
            stats.convergences,
            net.snapshot_installs,
            net.snapshot_transfers,
            net.snapshot_chunks,
            stats.snapshot_advances,
            stats.replicas_snapshotted.len(),
            stats.purge_advances,
            stats.replicas_purged.len(),
            stats.states_audited,
            stats.digest_checks,
            stats.lingering,
            net.sent,
            net.refused,
            net.dropped,
            net.duplicated,
            Instant::now()
                .saturating_duration_since(virtual_start)
                .as_secs_f64(),
            wall.elapsed().as_secs_f64(),
        );
        println!("cluster: errors phones saw: {:?}", told.errors);
    }

    let live = std::mem::take(&mut *cluster.shared.live());
    for (_, live) in live {
        if let Ok(ledger) = Arc::try_unwrap(live.ledger) {
            let _ = tokio::time::timeout(Duration::from_secs(10), ledger.close()).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Scripted reproductions of what the seeded run found.

/// A converged cluster with its accounts open, clocks without skew.
async fn scripted_cluster(seed: u64) -> Cluster {
    let mut cluster = Cluster::new(seed);
    for slot in cluster.slots.values() {
        slot.skew.store(0, Ordering::SeqCst);
    }
    for id in IDS {
        cluster.start(id).await;
    }
    cluster.wait_leader(Duration::from_secs(30)).await;
    cluster.open_accounts().await;
    cluster.converge("accounts opened").await;
    cluster
}

/// Waits until a replica other than `not` serves.
async fn wait_new_leader(cluster: &mut Cluster, not: ReplicaId) -> Arc<Ledger> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, ledger)) = cluster
            .live_ledgers()
            .into_iter()
            .find(|(id, ledger)| *id != not && ledger.is_serving())
        {
            return ledger;
        }
        if Instant::now() > deadline {
            cluster.fail(format!("no replica but {not} serves after 10 s"));
        }
        tokio::time::sleep(ms(10)).await;
    }
}

/// Goal: a leader that has lost its quorum (and does not know yet) must not
/// refuse a half with 700 "the key already has an outcome" on the strength
/// of a decision it proposed but that never committed; here the key then
/// settles with exactly that half on the new leader, so the phone was told
/// the opposite of what happened.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_deposed_leader_does_not_refuse_a_half_on_an_uncommitted_expiry() {
    let mut cluster = scripted_cluster(1).await;
    let (old, old_leader) = cluster.wait_leader(Duration::from_secs(5)).await;
    let (payer, payee) = (cluster.accounts[0], cluster.accounts[1]);
    let tx_key = TxKey::from_u128(0x7ab1_ed9e_0001);
    // The old leader's clock runs 1.5 s ahead, so on it the receive half is
    // due 0.5 s before it is due anywhere else.
    cluster.slots[&old].skew.store(1_500_000, Ordering::SeqCst);
    let receive_half = receive(tx_key, payee, payer, 50);
    let send_half = send(tx_key, payer, 50);
    let first = tokio::time::timeout(
        Duration::from_secs(2),
        old_leader.submit(payee, receive_half),
    )
    .await;
    assert!(
        matches!(first, Ok(Ok(Submission::Pending(_)))),
        "precondition: the receive half is durably pending, got {first:?}"
    );
    let submitted = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let links: Vec<_> = IDS
        .iter()
        .filter(|&&id| id != old)
        .flat_map(|&id| [(old, id), (id, old)])
        .collect();
    cluster.cut(&links, format!("isolate the leader {old}"));
    let new_leader = wait_new_leader(&mut cluster, old).await;
    // By the old leader's clock the half is now overdue: it proposes its
    // expiry, which cannot commit.
    tokio::time::sleep_until(submitted + Duration::from_millis(2_300)).await;
    assert!(
        old_leader.is_serving(),
        "precondition: the isolated leader has not noticed yet"
    );
    // The payer's phone reaches the new leader: the payment settles there.
    let settled = match tokio::time::timeout(
        Duration::from_secs(5),
        new_leader.submit(payer, send_half.clone()),
    )
    .await
    {
        Ok(Ok(submission)) => submission.resolution().await,
        other => panic!("precondition: the new leader takes the send half, got {other:?}"),
    };
    let outcome = match &settled {
        Ok(Resolution::Final(outcome)) if outcome.is_settled() => outcome.clone(),
        other => panic!("precondition: the payment settles on the new leader, got {other:?}"),
    };
    // The same phone retries against the replica it believed led.
    let at_old = tokio::time::timeout(
        Duration::from_secs(1),
        old_leader.submit(payer, send_half.clone()),
    )
    .await;
    let refused = matches!(&at_old, Ok(Ok(Submission::Done(Resolution::Refused(_)))));
    drop(old_leader);
    drop(new_leader);
    cluster.converge("healed").await;
    let stored = cluster
        .serving()
        .map(|(_, leader)| leader.outcome(tx_key).expect("outcome"));
    assert_eq!(stored, Some(Some((*outcome).clone())));
    assert!(
        !refused,
        "the deposed leader {old} told the payer {at_old:?} (700: the key already has an \
         outcome that is not this half), from an expiry it proposed but never committed; the \
         key is settled with exactly that half: {outcome:?}"
    );
}

/// Goal: after a leader change (its matcher starts with no recent outcomes)
/// the identical resubmission of a half recorded in a decided key gets that
/// outcome, even while a different half for the same key is being checked;
/// it must not be refused 710 "a different half is pending" because of a
/// half that storage is about to refuse.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_identical_resubmission_after_a_leader_change_is_not_refused_for_a_conflicting_half() {
    let mut cluster = scripted_cluster(2).await;
    let (old, leader) = cluster.wait_leader(Duration::from_secs(5)).await;
    let (payer, payee) = (cluster.accounts[0], cluster.accounts[1]);
    let tx_key = TxKey::from_u128(0x7ab1_ed9e_0002);
    let outcome = crate::support::pay(&leader, tx_key, payer, payee, 50).await;
    assert!(outcome.is_settled());
    drop(leader);
    cluster.converge("paid").await;
    cluster.crash(old, false).await;
    let leader = wait_new_leader(&mut cluster, old).await;
    let original = send(tx_key, payer, 50);
    let conflicting = send(tx_key, payer, 51);
    let (conflicting_answer, original_answer) = tokio::join!(
        leader.submit(payer, conflicting),
        leader.submit(payer, original)
    );
    let conflicting_answer = conflicting_answer
        .expect("submit")
        .resolution()
        .await
        .expect("resolution");
    let original_answer = original_answer
        .expect("submit")
        .resolution()
        .await
        .expect("resolution");
    assert_eq!(
        conflicting_answer,
        Resolution::Refused(RejectCode::TxKeyAlreadyUsed),
        "a different half for a decided key"
    );
    assert_eq!(
        original_answer,
        Resolution::Final(outcome),
        "the identical recorded half resubmitted to the new leader"
    );
    drop(leader);
    cluster.restart_down().await;
    cluster.converge("the end").await;
}
