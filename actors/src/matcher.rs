//! The matcher actor: a thin shell around [`tapledger_core::matching::Matcher`]. It
//! stamps each half with node time, feeds the core, and carries the core's
//! effects out: intents to the committer, reservations, debits and credits to
//! account actors. Keys are partitioned across a few matcher shards by
//! `tx_key`, so both halves of a payment always meet in the same shard.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tapledger_protocol::{AccountId, Half, Outcome, Timestamp, TxKey};
use tokio::sync::{mpsc, oneshot};

use crate::account::{AccountMsg, Registry, Settled};
use crate::clock::Clock;
use crate::committer::{CommitResults, Job, KeyResult, ReplyTo};
use crate::error::LedgerError;
use crate::leader::Ended;
use crate::store::{Intent, OutcomeView, Store};
use tapledger_core::matching::{
    Answers, Effect, Matcher, MatcherConfig, PendingCounts, PendingHalf, Persisted, Resolution,
    Waiter,
};
use tapledger_core::rules::HalfContext;

/// First answer to a submission.
#[derive(Debug)]
pub enum Ack {
    /// The half is durable and waits for its partner.
    Pending,
    /// The submission is already over.
    Done(Resolution),
}

/// A submitter waiting on two channels: the first answer, then (if the first
/// was `Pending`) the resolution.
pub type AckReceiver = oneshot::Receiver<Result<Ack, LedgerError>>;
pub type ResolutionReceiver = oneshot::Receiver<Result<Resolution, LedgerError>>;

pub struct ChannelWaiter {
    ack: Option<oneshot::Sender<Result<Ack, LedgerError>>>,
    resolution: Option<oneshot::Sender<Result<Resolution, LedgerError>>>,
}

impl ChannelWaiter {
    pub fn new() -> (ChannelWaiter, AckReceiver, ResolutionReceiver) {
        let (ack_sender, ack_receiver) = oneshot::channel();
        let (resolution_sender, resolution_receiver) = oneshot::channel();
        (
            ChannelWaiter {
                ack: Some(ack_sender),
                resolution: Some(resolution_sender),
            },
            ack_receiver,
            resolution_receiver,
        )
    }
}

impl Waiter for ChannelWaiter {
    type Error = LedgerError;

    fn accepted(&mut self) {
        if let Some(ack) = self.ack.take() {
            // The submitter may have gone away; the half stays pending regardless.
            let _ = ack.send(Ok(Ack::Pending));
        }
    }

    fn is_gone(&self) -> bool {
        let ack_gone = self.ack.as_ref().is_none_or(|ack| ack.is_closed());
        let resolution_gone = self
            .resolution
            .as_ref()
            .is_none_or(|resolution| resolution.is_closed());
        ack_gone && resolution_gone
    }

    fn finish(mut self, result: Result<Resolution, LedgerError>) {
        if let Some(ack) = self.ack.take() {
            let _ = ack.send(result.map(Ack::Done));
        } else if let Some(resolution) = self.resolution.take() {
            let _ = resolution.send(result);
        }
    }
}

/// What a batch submitter ([`crate::Ledger::submit_batch`]) hears about one
/// half, under the tag it gave the half.
#[derive(Debug)]
pub struct Report {
    pub tag: u64,
    pub heard: Heard,
}

#[derive(Debug)]
pub enum Heard {
    /// The half is durable and waits for its partner; `Resolved` follows.
    Pending,
    /// The submission is over: every half hears this exactly once.
    Resolved(Result<Resolution, LedgerError>),
}

/// Where a batch submitter hears about its halves.
pub type ReportSender = mpsc::UnboundedSender<Report>;

/// A half of a batch: answers go to the submitter's one channel.
pub struct SinkWaiter {
    tag: u64,
    sink: ReportSender,
    /// Until the half is resolved: why the leader ended, for a waiter
    /// dropped unanswered (the leader stopped with the half in flight).
    ended: Option<Ended>,
}

impl SinkWaiter {
    pub(crate) fn new(tag: u64, sink: ReportSender, ended: Ended) -> SinkWaiter {
        SinkWaiter {
            tag,
            sink,
            ended: Some(ended),
        }
    }

    fn tell(&self, heard: Heard) {
        // The submitter may have gone away; the half's fate is durable regardless.
        let _ = self.sink.send(Report {
            tag: self.tag,
            heard,
        });
    }
}

impl Waiter for SinkWaiter {
    type Error = LedgerError;

    fn accepted(&mut self) {
        self.tell(Heard::Pending);
    }

    fn is_gone(&self) -> bool {
        self.sink.is_closed()
    }

    fn finish(mut self, result: Result<Resolution, LedgerError>) {
        self.ended = None;
        self.tell(Heard::Resolved(result));
    }
}

impl Drop for SinkWaiter {
    fn drop(&mut self) {
        if let Some(ended) = self.ended.take() {
            self.tell(Heard::Resolved(Err(ended.error())));
        }
    }
}

/// Whoever waits on a half: a caller of [`crate::Ledger::submit`] (two
/// channels of its own) or a batch submitter (one channel for all).
pub enum Reply {
    Channels(ChannelWaiter),
    Sink(SinkWaiter),
}

impl Waiter for Reply {
    type Error = LedgerError;

    fn accepted(&mut self) {
        match self {
            Reply::Channels(waiter) => waiter.accepted(),
            Reply::Sink(waiter) => waiter.accepted(),
        }
    }

    fn is_gone(&self) -> bool {
        match self {
            Reply::Channels(waiter) => waiter.is_gone(),
            Reply::Sink(waiter) => waiter.is_gone(),
        }
    }

    fn finish(self, result: Result<Resolution, LedgerError>) {
        match self {
            Reply::Channels(waiter) => waiter.finish(result),
            Reply::Sink(waiter) => waiter.finish(result),
        }
    }
}

/// One half on its way to a matcher.
pub struct Submit {
    pub context: HalfContext,
    pub half: Half,
    pub waiter: Reply,
}

pub enum MatcherMsg {
    Submit(Submit),
    /// Several halves at once, handled in order.
    SubmitMany(Vec<Submit>),
    /// Account actors left answers in the shard's [`ReservedInbox`].
    Reserved,
    /// The committer's report on one commit.
    Committed(CommitResults),
    /// Expire every lone half that is due; `done` hears how many were.
    ExpireDue {
        done: Option<oneshot::Sender<usize>>,
    },
    Stats(oneshot::Sender<MatcherStats>),
}

/// What one matcher shard holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct MatcherStats {
    /// Keys waiting, reserving or deciding.
    pub keys_in_flight: usize,
    /// Lone halves waiting for their partner.
    pub lone_halves: usize,
}

// The committer reaches a matcher through a `DerivedActorRef<CommitResults>`.
impl From<CommitResults> for MatcherMsg {
    fn from(results: CommitResults) -> MatcherMsg {
        MatcherMsg::Committed(results)
    }
}

impl TryFrom<MatcherMsg> for CommitResults {
    type Error = MatcherMsg;
    fn try_from(message: MatcherMsg) -> Result<CommitResults, MatcherMsg> {
        match message {
            MatcherMsg::Committed(results) => Ok(results),
            other => Err(other),
        }
    }
}

/// An account actor's answer to [`Effect::Reserve`].
#[derive(Debug)]
pub struct Reservation {
    pub tx_key: TxKey,
    pub sender: AccountId,
    pub amount: u64,
    /// `Err(balance)`: the sender cannot cover `amount`.
    pub result: Result<(), u64>,
}

/// Reservation answers on their way to one matcher shard. Account actors
/// answer into this queue rather than each sending a message: the answer
/// that finds the queue empty wakes the matcher ([`MatcherMsg::Reserved`]),
/// which then takes every answer queued by the time it runs, so a busy
/// matcher handles one message per batch of answers, not one per answer.
pub struct ReservedInbox {
    queue: std::sync::Mutex<Vec<Reservation>>,
    matcher: ActorRef<MatcherMsg>,
}

impl ReservedInbox {
    fn new(matcher: ActorRef<MatcherMsg>) -> ReservedInbox {
        ReservedInbox {
            queue: std::sync::Mutex::new(Vec::new()),
            matcher,
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Reservation>> {
        // Nothing panics while holding the lock (a push or a swap).
        self.queue.lock().expect("reserved inbox lock")
    }

    /// Queues `answer`, waking the matcher if nothing else was queued.
    pub fn answer(&self, answer: Reservation) {
        let wake = {
            let mut queue = self.queue();
            queue.push(answer);
            queue.len() == 1
        };
        if wake {
            // A matcher that is gone is shutting down: the reservation dies with the process state.
            let _ = self.matcher.send_message(MatcherMsg::Reserved);
        }
    }

    /// Every answer queued so far, in order; `empty` (cleared) takes their place.
    fn take(&self, mut empty: Vec<Reservation>) -> Vec<Reservation> {
        debug_assert!(empty.is_empty());
        std::mem::swap(&mut *self.queue(), &mut empty);
        empty
    }
}

pub struct MatcherActor;

pub struct MatcherArgs {
    pub shard: usize,
    pub config: MatcherConfig,
    /// Lone halves per account, shared by every shard.
    pub pending_counts: Arc<PendingCounts>,
    pub restored: Vec<PendingHalf>,
    pub commit_queue: mpsc::Sender<Job>,
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
}

pub struct MatcherState {
    shard: usize,
    /// Where account actors answer this shard's reservations.
    reserved: Arc<ReservedInbox>,
    /// The inbox's previous buffer, kept for its capacity.
    spare: Vec<Reservation>,
    /// Settled money not yet left in the account actors' inboxes.
    settling: Vec<(AccountId, Settled)>,
    core: Matcher<Reply>,
    commit_queue: mpsc::Sender<Job>,
    registry: Arc<Registry>,
    store: Arc<Store>,
    /// Storage's outcomes as of the last commit this shard heard of (taken
    /// again after each one), so that the core's lookups need no read
    /// transaction each. Keys decided since are in the core's recent
    /// outcomes, which hold more than two commits' worth.
    outcomes: Option<OutcomeView>,
    clock: Arc<dyn Clock>,
}

impl Actor for MatcherActor {
    type Msg = MatcherMsg;
    type State = MatcherState;
    type Arguments = MatcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MatcherMsg>,
        args: MatcherArgs,
    ) -> Result<MatcherState, ActorProcessingErr> {
        let mut core = Matcher::sharing(args.config, args.pending_counts);
        for pending in args.restored {
            core.restore(pending);
        }
        Ok(MatcherState {
            shard: args.shard,
            reserved: Arc::new(ReservedInbox::new(myself)),
            spare: Vec::new(),
            settling: Vec::new(),
            core,
            commit_queue: args.commit_queue,
            registry: args.registry,
            outcomes: args.store.outcome_view().ok(),
            store: args.store,
            clock: args.clock,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<MatcherMsg>,
        message: MatcherMsg,
        state: &mut MatcherState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MatcherMsg::Submit(submit) => {
                let now = state.clock.now();
                state.submit(now, submit).await;
            }
            MatcherMsg::SubmitMany(submits) => {
                let now = state.clock.now();
                let halves = submits.into_iter().map(|submit| {
                    let Submit {
                        context,
                        half,
                        waiter,
                    } = submit;
                    (context, half, waiter)
                });
                let effects = state.core.submit_many(now, halves);
                state.carry_out(effects).await;
            }
            MatcherMsg::Reserved => {
                let mut answers = state.reserved.take(std::mem::take(&mut state.spare));
                // Each answer's decision, in the order answered, carried out
                // together.
                let effects = answers
                    .drain(..)
                    .filter_map(|answer| {
                        let Reservation {
                            tx_key,
                            sender,
                            amount,
                            result,
                        } = answer;
                        state.core.on_reserved(tx_key, sender, amount, result)
                    })
                    .collect();
                state.spare = answers;
                state.carry_out(effects).await;
            }
            MatcherMsg::Committed(CommitResults { commit, results }) => {
                state.outcomes = state.store.outcome_view().ok();
                // One allocation of effects and answers per commit, not per key.
                let mut effects = Vec::with_capacity(2 * results.len());
                let mut answers = Answers::with_capacity(2 * results.len());
                for KeyResult {
                    tx_key,
                    persisted,
                    result,
                } in results
                {
                    state.core.on_committed_into(
                        tx_key,
                        persisted,
                        commit,
                        result,
                        &mut effects,
                        &mut answers,
                    );
                }
                state.carry_out(effects).await;
                // Debits and credits reach the account actors before anyone hears
                // the outcome, so money just received is spendable at once.
                state.flush_settled();
                answers.deliver();
            }
            MatcherMsg::ExpireDue { done } => {
                let effects = state.core.expire_due(state.clock.now());
                let expired = effects.len();
                state.carry_out(effects).await;
                if let Some(done) = done {
                    let _ = done.send(expired);
                }
            }
            MatcherMsg::Stats(reply) => {
                let _ = reply.send(MatcherStats {
                    keys_in_flight: state.core.keys_in_flight(),
                    lone_halves: state.core.lone_halves(),
                });
            }
        }
        state.flush_settled();
        Ok(())
    }
}

impl MatcherState {
    async fn submit(&mut self, now: Timestamp, submit: Submit) {
        let Submit {
            context,
            half,
            waiter,
        } = submit;
        let effects = self.core.submit(now, &context, half, waiter);
        self.carry_out(effects).await;
    }

    /// Storage's outcome for `tx_key`, read from the view of the last
    /// commit (no read transaction per lookup). A key that cannot be read
    /// counts as undecided: storage checks again inside the write
    /// transaction that would decide it.
    fn look_up(&self, tx_key: TxKey) -> Option<Arc<Outcome>> {
        let found = match &self.outcomes {
            Some(view) => view.outcome(tx_key),
            None => self.store.outcome(tx_key),
        };
        found.ok().flatten().map(Arc::new)
    }

    async fn carry_out(&mut self, effects: Vec<Effect>) {
        // In order; a lookup is answered at once and what follows from it
        // is carried out before the effects after it.
        // Reservations are asked for together, up to the next effect that
        // is neither a reservation nor a lookup (a lookup reads storage
        // only, so a reservation may wait past it).
        let mut effects = std::collections::VecDeque::from(effects);
        let mut reserving = Vec::new();
        while let Some(effect) = effects.pop_front() {
            if !matches!(effect, Effect::Reserve { .. } | Effect::LookUp { .. }) {
                self.reserve(std::mem::take(&mut reserving)).await;
            }
            match effect {
                Effect::LookUp { tx_key } => {
                    let outcome = self.look_up(tx_key);
                    if let Some(next) = self.core.on_looked_up(tx_key, outcome) {
                        effects.push_front(next);
                    }
                }
                Effect::StorePending(pending) => {
                    let tx_key = pending.tx_key();
                    let side = match &pending {
                        PendingHalf::Send(_) => tapledger_protocol::Side::Send,
                        PendingHalf::Receive(_) => tapledger_protocol::Side::Receive,
                    };
                    self.commit(
                        Intent::StorePending(pending),
                        tx_key,
                        Persisted::Pending(side),
                    )
                    .await;
                }
                Effect::Decide { decision, reserved } => {
                    let tx_key = decision.tx_key();
                    self.commit(
                        Intent::Decide(decision),
                        tx_key,
                        Persisted::Decision { reserved },
                    )
                    .await;
                }
                Effect::Reserve {
                    tx_key,
                    sender,
                    amount,
                } => {
                    reserving.push((tx_key, sender, amount));
                    continue;
                }
                Effect::Debit {
                    account,
                    amount,
                    commit,
                } => self.settled(account, Settled::Debit { amount, commit }),
                Effect::Release { account, amount } => {
                    self.settled(account, Settled::Release { amount })
                }
                Effect::Credit {
                    account,
                    amount,
                    commit,
                } => self.settled(account, Settled::Credit { amount, commit }),
            }
        }
        self.reserve(reserving).await;
    }

    /// Asks the senders' account actors for `reservations` (key, sender,
    /// amount), in order and in one registry lock, after leaving what was
    /// settled before in their inboxes (so an account decides on money
    /// settled before). A reservation that cannot be asked for fails its
    /// key's submissions rather than leave them hanging.
    async fn reserve(&mut self, reservations: Vec<(TxKey, AccountId, u64)>) {
        if reservations.is_empty() {
            return;
        }
        self.flush_settled();
        let messages = reservations
            .iter()
            .map(|&(tx_key, sender, amount)| {
                let message = AccountMsg::Reserve {
                    tx_key,
                    amount,
                    reply_to: self.reserved.clone(),
                };
                (sender, message)
            })
            .collect();
        for (at, error) in self.registry.send_many(messages).await {
            let (tx_key, sender, _) = reservations[at];
            tracing::error!(%error, %tx_key, sender, "reservation could not be asked for");
            let (effects, answers) = self.core.on_committed(
                tx_key,
                Persisted::Decision { reserved: None },
                None,
                Err(error),
            );
            debug_assert!(effects.is_empty());
            answers.deliver();
        }
    }

    async fn commit(&mut self, intent: Intent, tx_key: TxKey, persisted: Persisted) {
        let job = Job {
            intent,
            reply: ReplyTo::Matcher {
                shard: self.shard,
                tx_key,
                persisted,
            },
        };
        if self.commit_queue.send(job).await.is_err() {
            // The committer has stopped: the ledger is closing.
            let (effects, answers) =
                self.core
                    .on_committed(tx_key, persisted, None, Err(LedgerError::Closed));
            for effect in effects {
                if let Effect::Release { account, amount } = effect {
                    self.settled(account, Settled::Release { amount });
                }
            }
            answers.deliver();
        }
    }

    /// Queues what a commit settled for `account`; [`Self::flush_settled`]
    /// hands the queue to the account actors in one registry lock.
    fn settled(&mut self, account: AccountId, settled: Settled) {
        self.settling.push((account, settled));
    }

    /// Leaves every queued settlement in its account actor's inbox. Called
    /// before a reservation is asked for (so the account decides on money
    /// settled before it), before outcomes are told (so money just received
    /// is spendable at once) and at the end of every message.
    fn flush_settled(&mut self) {
        if self.settling.is_empty() {
            return;
        }
        for (account, settled) in self.registry.settle_many(&mut self.settling) {
            // Debits and releases are for an actor that holds a reservation,
            // so it is live: only a broken invariant gets here.
            tracing::error!(account, ?settled, "account actor unreachable");
        }
    }
}
