//! What only the leader runs: the matcher shards, the account actors, the
//! expiry actor and the committer, built for one term from the applied ledger
//! exactly as a restart builds them, and stopped when this replica stops
//! leading (requests in flight then hear [`LedgerError::NotLeader`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tapledger_protocol::{AccountId, Half, ISSUER_ACCOUNT_ID, TxKey};
use tokio::sync::oneshot;

use crate::account::{Registry, Settled};
use crate::committer::{self, CommitStats, Committer, CommitterArgs, Job, ReplyTo, Stop};
use crate::error::LedgerError;
use crate::expiry::{self, ExpiryActor, ExpiryArgs, ExpiryMsg};
use crate::ledger::BatchHalf;
use crate::ledger::{LedgerConfig, LedgerStats, Submission, Ticket};
use crate::matcher::{
    Ack, ChannelWaiter, MatcherActor, MatcherArgs, MatcherMsg, MatcherStats, Reply, ReportSender,
    SinkWaiter, Submit,
};
use crate::raft::Raft;
use crate::store::{Applied, Intent, NewAccount, Store};
use tapledger_core::matching::{MatcherConfig, PendingCounts, PendingHalf};
use tapledger_core::rules::HalfContext;

/// Why a leader's services ended, told to everyone still waiting on them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ended(Arc<OnceLock<LedgerError>>);

impl Ended {
    /// The error for a request whose channel closed.
    pub(crate) fn error(&self) -> LedgerError {
        self.0.get().cloned().unwrap_or(LedgerError::Closed)
    }

    fn set(&self, reason: LedgerError) {
        let _ = self.0.set(reason);
    }
}

/// The leader's actors for one term.
pub(crate) struct LeaderServices {
    max_amount: u64,
    commit_queue: tokio::sync::mpsc::Sender<Job>,
    committer: Mutex<Option<Committer>>,
    matchers: Vec<ActorRef<MatcherMsg>>,
    expiry: ActorRef<ExpiryMsg>,
    registry: Arc<Registry>,
    sweeper: tokio::task::JoinHandle<()>,
    /// Accounts `1 .. accounts_end` exist.
    accounts_end: AtomicU64,
    stats: Arc<CommitStats>,
    pub(crate) ended: Ended,
}

impl LeaderServices {
    /// Builds the services from the ledger as applied now: pending halves
    /// keep their original receive times (and so their deadlines).
    pub(crate) async fn start(
        config: &LedgerConfig,
        store: Arc<Store>,
        raft: Raft,
        term: u64,
    ) -> Result<LeaderServices, LedgerError> {
        let counters = store.counters()?;
        let mut restored: Vec<Vec<PendingHalf>> =
            (0..config.matcher_shards).map(|_| Vec::new()).collect();
        for pending in store.all_pending()? {
            restored[shard_of(pending.tx_key(), config.matcher_shards)].push(pending);
        }

        // The queue first: matchers get its sending end at spawn, and the
        // committer, started after them, its receiving end and the matchers.
        let (commit_queue, jobs) = committer::queue();
        let registry = Registry::new(store.clone());
        let matcher_config = MatcherConfig {
            half_ttl_micros: u64::try_from(config.half_ttl.as_micros()).unwrap_or(u64::MAX),
            pending_halves_per_account_max: config.pending_halves_per_account_max,
        };
        let pending_counts = Arc::new(PendingCounts::default());
        let mut matchers = Vec::with_capacity(config.matcher_shards);
        for (shard, restored) in restored.into_iter().enumerate() {
            let args = MatcherArgs {
                shard,
                config: matcher_config,
                pending_counts: pending_counts.clone(),
                restored,
                commit_queue: commit_queue.clone(),
                registry: registry.clone(),
                store: store.clone(),
                clock: config.clock.clone(),
            };
            let (matcher, _) = Actor::spawn(None, MatcherActor, args)
                .await
                .map_err(|error| LedgerError::Actor(format!("cannot start matcher: {error}")))?;
            matchers.push(matcher);
        }
        let stats = Arc::new(CommitStats::default());
        let committer = Committer::start(
            CommitterArgs {
                raft,
                term,
                clock: config.clock.clone(),
                matchers: matchers.iter().map(ActorRef::get_derived).collect(),
                stats: stats.clone(),
                interval: config.commit_interval_min,
            },
            jobs,
        );

        let (expiry, _) = Actor::spawn(
            None,
            ExpiryActor,
            ExpiryArgs {
                matchers: matchers.clone(),
                tick: expiry::tick_for(config.half_ttl),
            },
        )
        .await
        .map_err(|error| LedgerError::Actor(format!("cannot start expiry actor: {error}")))?;
        let sweeper = {
            let registry = registry.clone();
            let (idle, live_max) = (config.account_idle, config.live_accounts_max);
            let every =
                (idle / 2).clamp(Duration::from_millis(1), crate::ledger::SWEEP_INTERVAL_MAX);
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(every);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    registry.sweep_idle(idle, live_max);
                }
            })
        };

        Ok(LeaderServices {
            max_amount: config.max_amount,
            commit_queue,
            committer: Mutex::new(Some(committer)),
            matchers,
            expiry,
            registry,
            sweeper,
            accounts_end: AtomicU64::new(counters.account_next),
            stats,
            ended: Ended::default(),
        })
    }

    async fn commit(&self, intent: Intent) -> Result<(Option<u64>, Applied), LedgerError> {
        let (sender, receiver) = oneshot::channel();
        self.commit_queue
            .send(Job {
                intent,
                reply: ReplyTo::Caller(sender),
            })
            .await
            .map_err(|_| self.ended.error())?;
        receiver.await.unwrap_or_else(|_| Err(self.ended.error()))
    }

    pub(crate) async fn open_account(
        &self,
        new_account: NewAccount,
    ) -> Result<AccountId, LedgerError> {
        match self.commit(Intent::OpenAccount(new_account)).await? {
            (_, Applied::AccountOpened(id)) => {
                self.accounts_end.fetch_max(id + 1, Ordering::AcqRel);
                Ok(id)
            }
            (_, Applied::Refused(refusal)) => Err(LedgerError::Refused(refusal)),
            (_, other) => unreachable!("open account answered with {other:?}"),
        }
    }

    pub(crate) async fn top_up(&self, account: AccountId, amount: u64) -> Result<u64, LedgerError> {
        if !self.account_exists(account) {
            return Err(LedgerError::UnknownAccount(account));
        }
        match self.commit(Intent::TopUp { account, amount }).await? {
            (commit, Applied::ToppedUp { balance }) => {
                let commit = commit.expect("a top-up is applied in a ledger commit");
                self.registry
                    .settle(account, Settled::Credit { amount, commit });
                Ok(balance)
            }
            (_, Applied::Refused(refusal)) => Err(LedgerError::Refused(refusal)),
            (_, other) => unreachable!("top-up answered with {other:?}"),
        }
    }

    fn account_exists(&self, account: AccountId) -> bool {
        account != ISSUER_ACCOUNT_ID && account < self.accounts_end.load(Ordering::Acquire)
    }

    pub(crate) async fn submit(
        &self,
        submitter: AccountId,
        half: Half,
    ) -> Result<Submission, LedgerError> {
        let tx_key = half.tx_key();
        let context = HalfContext {
            submitter,
            accounts_end: self.accounts_end.load(Ordering::Acquire),
            max_amount: self.max_amount,
        };
        let (waiter, ack, resolution) = ChannelWaiter::new();
        let matcher = &self.matchers[shard_of(tx_key, self.matchers.len())];
        matcher
            .send_message(MatcherMsg::Submit(Submit {
                context,
                half,
                waiter: Reply::Channels(waiter),
            }))
            .map_err(|_| self.ended.error())?;
        match ack.await.unwrap_or_else(|_| Err(self.ended.error()))? {
            Ack::Done(resolution) => Ok(Submission::Done(resolution)),
            Ack::Pending => Ok(Submission::Pending(Ticket::new(
                tx_key,
                resolution,
                self.ended.clone(),
            ))),
        }
    }

    /// Hands every half to its matcher shard, one message per shard; each
    /// half's fate reaches `sink` under its tag.
    pub(crate) fn submit_batch(&self, halves: Vec<BatchHalf>, sink: &ReportSender) {
        let accounts_end = self.accounts_end.load(Ordering::Acquire);
        let shards = self.matchers.len();
        let capacity = crate::committer::shard_capacity(halves.len(), shards);
        let mut per_shard: Vec<Vec<Submit>> =
            (0..shards).map(|_| Vec::with_capacity(capacity)).collect();
        for BatchHalf {
            tag,
            submitter,
            half,
        } in halves
        {
            let context = HalfContext {
                submitter,
                accounts_end,
                max_amount: self.max_amount,
            };
            let waiter = SinkWaiter::new(tag, sink.clone(), self.ended.clone());
            per_shard[shard_of(half.tx_key(), shards)].push(Submit {
                context,
                half,
                waiter: Reply::Sink(waiter),
            });
        }
        for (matcher, submits) in self.matchers.iter().zip(per_shard) {
            if submits.is_empty() {
                continue;
            }
            // A matcher that is gone drops the message: each waiter then
            // tells the sink why the leader ended.
            let _ = matcher.send_message(MatcherMsg::SubmitMany(submits));
        }
    }

    pub(crate) async fn live_balance(&self, account: AccountId) -> Result<(u64, u64), LedgerError> {
        if !self.account_exists(account) {
            return Err(LedgerError::UnknownAccount(account));
        }
        self.registry.inspect(account).await
    }

    pub(crate) async fn expire_now(&self) -> Result<usize, LedgerError> {
        let mut expired = 0;
        for matcher in &self.matchers {
            let (sender, receiver) = oneshot::channel();
            matcher
                .send_message(MatcherMsg::ExpireDue { done: Some(sender) })
                .map_err(|_| self.ended.error())?;
            expired += receiver.await.map_err(|_| self.ended.error())?;
        }
        self.flush().await?;
        Ok(expired)
    }

    pub(crate) async fn flush(&self) -> Result<(), LedgerError> {
        self.commit(Intent::Barrier).await.map(|_| ())
    }

    pub(crate) fn stats(&self) -> LedgerStats {
        LedgerStats {
            commits: self.stats.commits.load(Ordering::Relaxed),
            intents_committed: self.stats.intents.load(Ordering::Relaxed),
            commits_pipelined: self.stats.pipelined.load(Ordering::Relaxed),
            live_account_actors: self.registry.live(),
            account_actors_started: self.registry.spawned(),
        }
    }

    pub(crate) async fn matcher_stats(&self) -> Result<MatcherStats, LedgerError> {
        let mut totals = MatcherStats::default();
        for matcher in &self.matchers {
            let (sender, receiver) = oneshot::channel();
            matcher
                .send_message(MatcherMsg::Stats(sender))
                .map_err(|_| self.ended.error())?;
            let shard = receiver.await.map_err(|_| self.ended.error())?;
            totals.keys_in_flight += shard.keys_in_flight;
            totals.lone_halves += shard.lone_halves;
        }
        Ok(totals)
    }

    /// Stops everything. `reason` is what requests still waiting hear.
    /// Closing (`LedgerError::Closed`) lets the committer finish the entries
    /// it has; losing leadership abandons them (they may still commit: the
    /// next leader rebuilds from whatever did).
    pub(crate) async fn stop(&self, reason: LedgerError) {
        let drain = matches!(reason, LedgerError::Closed);
        self.ended.set(reason);
        self.sweeper.abort();
        let _ = self
            .expiry
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
        for matcher in &self.matchers {
            let _ = matcher
                .stop_and_wait(None, Some(Duration::from_secs(5)))
                .await;
        }
        tracing::debug!("leader stop: matchers stopped");
        let committer = self.committer.lock().expect("committer lock").take();
        if let Some(committer) = committer {
            committer
                .stop(if drain { Stop::Drain } else { Stop::Abandon })
                .await;
        }
        tracing::debug!("leader stop: committer stopped");
        self.registry.stop_all().await;
        tracing::debug!("leader stop: account actors stopped");
    }
}

pub(crate) fn shard_of(tx_key: TxKey, shards: usize) -> usize {
    (tx_key.as_u128() % shards as u128) as usize
}

impl Drop for LeaderServices {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}
