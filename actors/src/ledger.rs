//! The ledger API: opens the store, starts the committer and the actors, and
//! turns calls into messages. Every money-moving call resolves only after the
//! commit that holds its effect returned.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tapledger_protocol::{AccountId, Half, ISSUER_ACCOUNT_ID, Outcome, TxKey};
use tokio::sync::{mpsc, oneshot};

use crate::account::{AccountMsg, Registry};
use crate::clock::{Clock, SystemClock};
use crate::committer::{CommitStats, Committer, Job, ReplyTo};
use crate::core::matching::{MatcherConfig, PendingHalf, Resolution};
use crate::core::rules::HalfContext;
use crate::error::LedgerError;
use crate::expiry::{self, ExpiryActor, ExpiryArgs, ExpiryMsg};
use crate::matcher::{Ack, ChannelWaiter, MatcherActor, MatcherArgs, MatcherMsg};
use crate::store::{AccountRecord, Applied, AuditReport, Intent, JournalEntry, NewAccount, Store};

/// Default time a lone half waits for its partner.
pub const HALF_TTL_DEFAULT: Duration = Duration::from_secs(5 * 60);
/// Default largest payment: 1,000,000.00 in minor units.
pub const MAX_AMOUNT_DEFAULT: u64 = 100_000_000;
/// Default cap on lone halves per account (per matcher shard).
pub const PENDING_HALVES_PER_ACCOUNT_MAX_DEFAULT: u32 = 64;
/// Default time an unused account actor stays alive.
pub const ACCOUNT_IDLE_DEFAULT: Duration = Duration::from_secs(30);

/// How a ledger runs. `LedgerConfig::new(path)` gives the defaults.
#[derive(Clone)]
pub struct LedgerConfig {
    /// The redb file; created with its tables if missing.
    pub path: PathBuf,
    pub half_ttl: Duration,
    pub max_amount: u64,
    /// Matcher actors; halves are spread over them by `tx_key`.
    pub matcher_shards: usize,
    /// Lone halves one account may have waiting. Split evenly over the
    /// matcher shards (at least one each), so the total never exceeds it
    /// when it is at least `matcher_shards`.
    pub pending_halves_per_account_max: u32,
    pub account_idle: Duration,
    pub clock: Arc<dyn Clock>,
}

impl LedgerConfig {
    pub fn new(path: impl Into<PathBuf>) -> LedgerConfig {
        LedgerConfig {
            path: path.into(),
            half_ttl: HALF_TTL_DEFAULT,
            max_amount: MAX_AMOUNT_DEFAULT,
            matcher_shards: 2,
            pending_halves_per_account_max: PENDING_HALVES_PER_ACCOUNT_MAX_DEFAULT,
            account_idle: ACCOUNT_IDLE_DEFAULT,
            clock: Arc::new(SystemClock),
        }
    }
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
}

impl Ticket {
    pub async fn resolution(self) -> Result<Resolution, LedgerError> {
        self.receiver.await.unwrap_or(Err(LedgerError::Closed))
    }
}

/// Live figures for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerStats {
    pub commits: u64,
    pub intents_committed: u64,
    pub live_account_actors: usize,
    pub account_actors_started: u64,
}

/// A running ledger. Cheap to share behind an `Arc`; call [`Ledger::close`]
/// to shut it down cleanly.
pub struct Ledger {
    config: LedgerConfig,
    store: Arc<Store>,
    commit_queue: mpsc::Sender<Job>,
    committer: Committer,
    matchers: Vec<ActorRef<MatcherMsg>>,
    expiry: ActorRef<ExpiryMsg>,
    registry: Arc<Registry>,
    sweeper: tokio::task::JoinHandle<()>,
    /// Accounts `1 .. accounts_end` exist.
    accounts_end: AtomicU64,
    stats: Arc<CommitStats>,
}

impl Ledger {
    /// Opens (or creates) the ledger at `config.path` and rebuilds its live
    /// state from it: pending halves keep their original receive times.
    pub async fn open(config: LedgerConfig) -> Result<Ledger, LedgerError> {
        if config.matcher_shards == 0 {
            return Err(LedgerError::Invalid(
                "matcher_shards must be at least 1".into(),
            ));
        }
        let store = {
            let path = config.path.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || Store::open(&path))
                    .await
                    .map_err(|_| LedgerError::Closed)??,
            )
        };
        Ledger::start(config, store).await
    }

    /// Runs a ledger on an already opened store (e.g. one on a custom backend).
    pub async fn start(config: LedgerConfig, store: Arc<Store>) -> Result<Ledger, LedgerError> {
        let counters = store.counters()?;
        let mut restored: Vec<Vec<PendingHalf>> =
            (0..config.matcher_shards).map(|_| Vec::new()).collect();
        for pending in store.all_pending()? {
            restored[shard_of(pending.tx_key(), config.matcher_shards)].push(pending);
        }

        let matcher_slot = Arc::new(OnceLock::new());
        let stats = Arc::new(CommitStats::default());
        let (committer, commit_queue) = Committer::start(
            store.clone(),
            config.clock.clone(),
            matcher_slot.clone(),
            stats.clone(),
        );
        let registry = Registry::new(store.clone());
        let matcher_config = MatcherConfig {
            half_ttl_micros: u64::try_from(config.half_ttl.as_micros()).unwrap_or(u64::MAX),
            pending_halves_per_account_max: (config.pending_halves_per_account_max
                / config.matcher_shards as u32)
                .max(1),
        };
        let mut matchers = Vec::with_capacity(config.matcher_shards);
        for (shard, restored) in restored.into_iter().enumerate() {
            let args = MatcherArgs {
                shard,
                config: matcher_config,
                restored,
                commit_queue: commit_queue.clone(),
                registry: registry.clone(),
                store: store.clone(),
                clock: config.clock.clone(),
            };
            let (matcher, _) = Actor::spawn(None, MatcherActor, args)
                .await
                .map_err(|error| LedgerError::Invalid(format!("cannot start matcher: {error}")))?;
            matchers.push(matcher);
        }
        matcher_slot
            .set(matchers.clone())
            .unwrap_or_else(|_| unreachable!("matchers set once"));

        let (expiry, _) = Actor::spawn(
            None,
            ExpiryActor,
            ExpiryArgs {
                matchers: matchers.clone(),
                tick: expiry::tick_for(config.half_ttl),
            },
        )
        .await
        .map_err(|error| LedgerError::Invalid(format!("cannot start expiry actor: {error}")))?;
        let sweeper = {
            let registry = registry.clone();
            let idle = config.account_idle;
            tokio::spawn(async move {
                let mut interval = tokio::time::interval((idle / 2).max(Duration::from_millis(1)));
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    registry.sweep_idle(idle).await;
                }
            })
        };

        Ok(Ledger {
            config,
            store,
            commit_queue,
            committer,
            matchers,
            expiry,
            registry,
            sweeper,
            accounts_end: AtomicU64::new(counters.account_next),
            stats,
        })
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// The store, for reads (outcomes, history, audit, export, backup).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    async fn commit(&self, intent: Intent) -> Result<(u64, Applied), LedgerError> {
        let (sender, receiver) = oneshot::channel();
        self.commit_queue
            .send(Job {
                intent,
                reply: ReplyTo::Caller(sender),
            })
            .await
            .map_err(|_| LedgerError::Closed)?;
        receiver.await.unwrap_or(Err(LedgerError::Closed))
    }

    /// Opens an account funded with `opening_balance` by the issuer. Resolves
    /// with the new account id once durable. Checking the operator's admin
    /// credential is the caller's job.
    pub async fn open_account(&self, new_account: NewAccount) -> Result<AccountId, LedgerError> {
        match self.commit(Intent::OpenAccount(new_account)).await? {
            (_, Applied::AccountOpened(id)) => {
                self.accounts_end.fetch_max(id + 1, Ordering::AcqRel);
                Ok(id)
            }
            (_, Applied::Invalid(reason)) => Err(LedgerError::Invalid(reason)),
            (_, other) => unreachable!("open account answered with {other:?}"),
        }
    }

    /// Moves `amount` from the issuer to `account`; returns the new balance
    /// once durable.
    pub async fn top_up(&self, account: AccountId, amount: u64) -> Result<u64, LedgerError> {
        if !self.account_exists(account) {
            return Err(LedgerError::UnknownAccount(account));
        }
        match self.commit(Intent::TopUp { account, amount }).await? {
            (commit, Applied::ToppedUp { balance }) => {
                self.registry
                    .send_if_live(account, AccountMsg::Credit { amount, commit })
                    .await;
                Ok(balance)
            }
            (_, Applied::Invalid(reason)) => Err(LedgerError::Invalid(reason)),
            (_, other) => unreachable!("top-up answered with {other:?}"),
        }
    }

    fn account_exists(&self, account: AccountId) -> bool {
        account != ISSUER_ACCOUNT_ID && account < self.accounts_end.load(Ordering::Acquire)
    }

    /// Submits a half on behalf of the authenticated account `submitter`.
    /// Resolves once the half is refused, durably pending, or its key decided.
    pub async fn submit(
        &self,
        submitter: AccountId,
        half: Half,
    ) -> Result<Submission, LedgerError> {
        let tx_key = half.tx_key();
        let context = HalfContext {
            submitter,
            accounts_end: self.accounts_end.load(Ordering::Acquire),
            max_amount: self.config.max_amount,
        };
        let (waiter, ack, resolution) = ChannelWaiter::new();
        let matcher = &self.matchers[shard_of(tx_key, self.matchers.len())];
        matcher
            .send_message(MatcherMsg::Submit {
                context,
                half,
                waiter,
            })
            .map_err(|_| LedgerError::Closed)?;
        match ack.await.unwrap_or(Err(LedgerError::Closed))? {
            Ack::Done(resolution) => Ok(Submission::Done(resolution)),
            Ack::Pending => Ok(Submission::Pending(Ticket {
                tx_key,
                receiver: resolution,
            })),
        }
    }

    /// The final outcome of `tx_key` if it has one.
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
        if !self.account_exists(account) {
            return Err(LedgerError::UnknownAccount(account));
        }
        self.registry.inspect(account).await
    }

    /// Expires every lone half that is due now and waits until those
    /// expiries are durable. Returns how many halves expired. (The expiry
    /// actor does the same on its own tick.)
    pub async fn expire_now(&self) -> Result<usize, LedgerError> {
        let mut expired = 0;
        for matcher in &self.matchers {
            let (sender, receiver) = oneshot::channel();
            matcher
                .send_message(MatcherMsg::ExpireDue { done: Some(sender) })
                .map_err(|_| LedgerError::Closed)?;
            expired += receiver.await.map_err(|_| LedgerError::Closed)?;
        }
        self.flush().await?;
        Ok(expired)
    }

    /// Waits until everything queued for commit before this call is durable.
    pub async fn flush(&self) -> Result<(), LedgerError> {
        self.commit(Intent::Barrier).await.map(|_| ())
    }

    pub async fn stats(&self) -> LedgerStats {
        LedgerStats {
            commits: self.stats.commits.load(Ordering::Relaxed),
            intents_committed: self.stats.intents.load(Ordering::Relaxed),
            live_account_actors: self.registry.live(),
            account_actors_started: self.registry.spawned(),
        }
    }

    /// Keys in flight and lone halves, summed over the matcher shards.
    pub async fn matcher_stats(&self) -> Result<(usize, usize), LedgerError> {
        let mut totals = (0, 0);
        for matcher in &self.matchers {
            let (sender, receiver) = oneshot::channel();
            matcher
                .send_message(MatcherMsg::Stats(sender))
                .map_err(|_| LedgerError::Closed)?;
            let (keys, lone) = receiver.await.map_err(|_| LedgerError::Closed)?;
            totals = (totals.0 + keys, totals.1 + lone);
        }
        Ok(totals)
    }

    /// Shuts down: stops expiry and matchers (waiting submissions get
    /// `LedgerError::Closed`), lets the committer finish its last commit, stops
    /// account actors and closes the file.
    pub async fn close(self) {
        let Ledger {
            store,
            commit_queue,
            committer,
            matchers,
            expiry,
            registry,
            sweeper,
            ..
        } = self;
        sweeper.abort();
        // The sweeper holds the registry and through it the store: wait until
        // it is gone, or the file could still be open when close returns.
        let _ = sweeper.await;
        let _ = expiry
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
        for matcher in &matchers {
            let _ = matcher
                .stop_and_wait(None, Some(Duration::from_secs(5)))
                .await;
        }
        drop(matchers);
        drop(commit_queue);
        let _ = tokio::task::spawn_blocking(move || committer.join()).await;
        registry.stop_all().await;
        drop(registry);
        drop(store);
    }
}

fn shard_of(tx_key: TxKey, shards: usize) -> usize {
    (tx_key.as_u128() % shards as u128) as usize
}
