//! Account actors: one ractor actor per *active* account owns its live
//! balance and reservations. The [`Registry`] spawns an actor on first use
//! (loading the committed balance from redb) and retires it after an idle
//! period, so a ledger with millions of accounts on disk runs only as many
//! actors as are busy.
//!
//! A live balance has one writer, its actor. What a commit settles for an
//! account (a debit or release of its reservation, a credit) is left in the
//! actor's [`Settled`] inbox rather than sent as a message each: the actor
//! takes everything in it before every decision it makes (a reservation, an
//! inspection, retiring), so it never decides on a view older than what it
//! was told, and a commit costs the actors no message at all.
//!
//! Retiring is safe because the registry counts messages on their way to
//! each actor: an actor leaves only when none are in flight and it holds no
//! reservation, so nothing it owned is lost, and its successor reloads a
//! balance that already includes every commit it saw (credits carry their
//! commit number to avoid double counting).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tapledger_protocol::{AccountId, TxKey};
use tokio::sync::Mutex;

use crate::error::LedgerError;
use crate::matcher::{Reservation, ReservedInbox};
use crate::store::Store;
use tapledger_core::book::AccountBook;

/// How long a retiring actor may take to stop before shutdown moves on.
const ACTOR_STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub enum AccountMsg {
    /// Reserve `amount` for the settlement of `tx_key` and tell `reply_to`.
    Reserve {
        tx_key: TxKey,
        amount: u64,
        reply_to: Arc<ReservedInbox>,
    },
    /// Live (balance, reserved).
    Inspect(RpcReplyPort<(u64, u64)>),
    /// Sent by the idle sweep, outside the in-flight count: stop if idle.
    Retire,
}

/// What a commit settled for an account, left in its actor's inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The reserved settlement committed in `commit`.
    Debit { amount: u64, commit: u64 },
    /// The reserved settlement did not commit.
    Release { amount: u64 },
    /// Money arrived in `commit`.
    Credit { amount: u64, commit: u64 },
}

/// What the registry and an actor share: the messages on their way to it
/// and its inbox of settled money (filled by the registry, emptied by the
/// actor before each message it handles). One allocation, so that a send
/// or a settlement touches one cache line of it, not two.
#[derive(Default)]
struct Mailbox {
    /// Messages sent through the registry and not yet handled.
    inflight: AtomicU64,
    inbox: std::sync::Mutex<Vec<Settled>>,
}

impl Mailbox {
    fn inbox(&self) -> std::sync::MutexGuard<'_, Vec<Settled>> {
        // Nothing panics while holding the lock (a push, an extend or a swap).
        self.inbox.lock().expect("inbox lock")
    }
}

pub struct AccountActor;

pub struct AccountState {
    book: AccountBook,
    mailbox: Arc<Mailbox>,
    /// The inbox's previous buffer, swapped back in empty so that neither
    /// side allocates once both have grown.
    spare: Vec<Settled>,
    registry: Arc<Registry>,
}

impl Actor for AccountActor {
    type Msg = AccountMsg;
    type State = AccountState;
    type Arguments = AccountState;

    async fn pre_start(
        &self,
        _myself: ActorRef<AccountMsg>,
        state: AccountState,
    ) -> Result<AccountState, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<AccountMsg>,
        message: AccountMsg,
        state: &mut AccountState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(message, AccountMsg::Retire) {
            state.mailbox.inflight.fetch_sub(1, Ordering::AcqRel);
        }
        state.take_settled();
        match message {
            AccountMsg::Reserve {
                tx_key,
                amount,
                reply_to,
            } => {
                let result = state.book.reserve(amount);
                reply_to.answer(Reservation {
                    tx_key,
                    sender: state.book.account,
                    amount,
                    result,
                });
            }
            AccountMsg::Inspect(reply) => {
                let _ = reply.send((state.book.balance(), state.book.reserved()));
            }
            AccountMsg::Retire => {
                if state.book.reserved() == 0
                    && state.registry.remove_if_idle(state.book.account, &myself)
                {
                    myself.stop(None);
                }
            }
        }
        Ok(())
    }
}

impl AccountState {
    /// Applies everything settled since the last message, in order.
    fn take_settled(&mut self) {
        let mut taken = std::mem::take(&mut self.spare);
        std::mem::swap(&mut *self.mailbox.inbox(), &mut taken);
        for settled in taken.drain(..) {
            match settled {
                Settled::Debit { amount, commit } => self.book.debit(amount, commit),
                Settled::Release { amount } => self.book.release(amount),
                Settled::Credit { amount, commit } => {
                    self.book.credit(amount, commit);
                }
            }
        }
        self.spare = taken;
    }
}

struct Entry {
    actor: ActorRef<AccountMsg>,
    mailbox: Arc<Mailbox>,
    last_used: Instant,
}

/// The registry's map, under one lock.
#[derive(Default)]
struct Actors {
    live: foldhash::HashMap<AccountId, Entry>,
    /// Accounts whose actor is being started, with credits settled meanwhile.
    starting: foldhash::HashMap<AccountId, Vec<Settled>>,
    /// Set by [`Registry::stop_all`]: an actor started afterwards is stopped
    /// at once instead of joining the map.
    closed: bool,
}

/// The live account actors, by account id.
///
/// Sends to a live actor take a plain mutex for a map lookup and a counter
/// increment, never across an await. Starting an actor (a storage read and a
/// spawn) happens outside that lock, one start at a time.
pub struct Registry {
    store: Arc<Store>,
    entries: std::sync::Mutex<Actors>,
    /// Held while an actor is being started, so an account is started once.
    starting: Mutex<()>,
    live: AtomicUsize,
    spawned: AtomicU64,
}

/// What a send to a live actor came to.
enum Sent {
    Done,
    /// No live actor: the message comes back to be sent after starting one.
    NotLive(AccountMsg),
}

impl Registry {
    pub fn new(store: Arc<Store>) -> Arc<Registry> {
        Arc::new(Registry {
            store,
            entries: std::sync::Mutex::new(Actors::default()),
            starting: Mutex::new(()),
            live: AtomicUsize::new(0),
            spawned: AtomicU64::new(0),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Actors> {
        // Nothing panics while holding the lock (sends do not block).
        self.entries.lock().expect("registry lock")
    }

    /// Account actors alive now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Account actors started since the ledger opened.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::Relaxed)
    }

    /// Sends `message` to `account`'s actor, starting it if it is not live.
    pub async fn send(
        self: &Arc<Self>,
        account: AccountId,
        message: AccountMsg,
    ) -> Result<(), LedgerError> {
        let mut message = match self.send_to_live(account, message)? {
            Sent::Done => return Ok(()),
            Sent::NotLive(message) => message,
        };
        let _starting = self.starting.lock().await;
        for _attempt in 0..2 {
            // Another sender may have started it while this one waited.
            message = match self.send_to_live(account, message)? {
                Sent::Done => return Ok(()),
                Sent::NotLive(message) => message,
            };
            self.entries().starting.insert(account, Vec::new());
            let started = self.spawn(account).await;
            let mut entries = self.entries();
            let buffered = entries.starting.remove(&account).unwrap_or_default();
            let entry = started?;
            if entries.closed {
                entry.actor.stop(None);
                self.live.fetch_sub(1, Ordering::Relaxed);
                return Err(LedgerError::Closed);
            }
            // Credits settled while it started: each carries its commit, so
            // the actor skips those its loaded balance already holds.
            entry.mailbox.inbox().extend(buffered);
            entries.live.insert(account, entry);
        }
        Err(LedgerError::Actor(format!(
            "account {account} actor cannot be started"
        )))
    }

    /// [`Self::send`] for each of `messages`, in order: those to live actors
    /// under one registry lock and one clock read, then the rest one at a
    /// time (each starts its actor). An account's messages keep their order
    /// (the map does not change under the lock, so an account's messages
    /// are either all sent there or all left for after). Returns the
    /// position in `messages` and the error of each that could not be sent.
    pub async fn send_many(
        self: &Arc<Self>,
        messages: Vec<(AccountId, AccountMsg)>,
    ) -> Vec<(usize, LedgerError)> {
        let mut failed = Vec::new();
        let mut not_live = Vec::new();
        {
            let mut entries = self.entries();
            let now = Instant::now();
            for (at, (account, message)) in messages.into_iter().enumerate() {
                match Self::send_to_live_in(&mut entries, &self.live, now, account, message) {
                    Ok(Sent::Done) => {}
                    Ok(Sent::NotLive(message)) => not_live.push((at, account, message)),
                    Err(error) => failed.push((at, error)),
                }
            }
        }
        for (at, account, message) in not_live {
            if let Err(error) = self.send(account, message).await {
                failed.push((at, error));
            }
        }
        failed
    }

    /// Sends `message` if `account` has a live actor (and counts it in
    /// flight); gives it back if not.
    fn send_to_live(&self, account: AccountId, message: AccountMsg) -> Result<Sent, LedgerError> {
        Self::send_to_live_in(
            &mut self.entries(),
            &self.live,
            Instant::now(),
            account,
            message,
        )
    }

    fn send_to_live_in(
        entries: &mut Actors,
        live: &AtomicUsize,
        now: Instant,
        account: AccountId,
        message: AccountMsg,
    ) -> Result<Sent, LedgerError> {
        let Some(entry) = entries.live.get_mut(&account) else {
            return Ok(Sent::NotLive(message));
        };
        entry.last_used = now;
        entry.mailbox.inflight.fetch_add(1, Ordering::AcqRel);
        match entry.actor.send_message(message) {
            Ok(()) => Ok(Sent::Done),
            Err(ractor::MessagingErr::SendErr(returned)) => {
                // The actor died (only a broken invariant does that); start afresh.
                tracing::error!(account, "account actor died; restarting it from storage");
                entries.live.remove(&account);
                live.fetch_sub(1, Ordering::Relaxed);
                Ok(Sent::NotLive(returned))
            }
            Err(other) => {
                entry.mailbox.inflight.fetch_sub(1, Ordering::AcqRel);
                Err(LedgerError::Actor(format!(
                    "account {account} actor: {other}"
                )))
            }
        }
    }

    /// Leaves what a commit settled for `account` in its actor's inbox.
    /// Debits and releases are for an actor holding a reservation, so live;
    /// a credit for an account with no actor is dropped (its next actor
    /// loads it from storage), and one for an actor being started waits for
    /// it (it may have read its balance just before the credit applied).
    /// False if nobody took it.
    pub fn settle(&self, account: AccountId, settled: Settled) -> bool {
        Self::settle_in(&mut self.entries(), account, settled)
    }

    /// [`Self::settle`] for each of `settled`, in order and under one lock;
    /// empties `settled` and returns those nobody took but should have (a
    /// debit or release for an account with no live actor).
    pub fn settle_many(
        &self,
        settled: &mut Vec<(AccountId, Settled)>,
    ) -> Vec<(AccountId, Settled)> {
        let mut entries = self.entries();
        let mut lost = Vec::new();
        for (account, settled) in settled.drain(..) {
            if !Self::settle_in(&mut entries, account, settled)
                && !matches!(settled, Settled::Credit { .. })
            {
                lost.push((account, settled));
            }
        }
        lost
    }

    fn settle_in(entries: &mut Actors, account: AccountId, settled: Settled) -> bool {
        if let Some(entry) = entries.live.get(&account) {
            entry.mailbox.inbox().push(settled);
            return true;
        }
        match (settled, entries.starting.get_mut(&account)) {
            (Settled::Credit { .. }, Some(buffered)) => {
                buffered.push(settled);
                true
            }
            _ => false,
        }
    }

    async fn spawn(self: &Arc<Self>, account: AccountId) -> Result<Entry, LedgerError> {
        let (balance, commit) = self
            .store
            .balance_at_commit(account)?
            .ok_or(LedgerError::UnknownAccount(account))?;
        let mailbox = Arc::new(Mailbox::default());
        let state = AccountState {
            book: AccountBook::new(account, balance, commit),
            mailbox: mailbox.clone(),
            spare: Vec::new(),
            registry: self.clone(),
        };
        let (actor, _join) = Actor::spawn(None, AccountActor, state)
            .await
            .map_err(|error| {
                LedgerError::Actor(format!("cannot start actor for account {account}: {error}"))
            })?;
        self.live.fetch_add(1, Ordering::Relaxed);
        self.spawned.fetch_add(1, Ordering::Relaxed);
        Ok(Entry {
            actor,
            mailbox,
            last_used: Instant::now(),
        })
    }

    /// Asks every actor unused for `idle` to retire, and while more than
    /// `live_max` are live, the least recently used ones too: enough to come
    /// down to 7/8 of `live_max`. Only an actor holding no reservation and
    /// with no message on its way retires, so some may stay above the cap
    /// until a later sweep.
    pub fn sweep_idle(&self, idle: Duration, live_max: usize) {
        let entries = self.entries();
        let now = Instant::now();
        let mut retire_before = now.checked_sub(idle);
        let live = entries.live.len();
        if live > live_max {
            let retiring = live - live_max + live_max / 8;
            let mut used: Vec<Instant> =
                entries.live.values().map(|entry| entry.last_used).collect();
            let (_, newest_retired, _) = used.select_nth_unstable(retiring.min(live) - 1);
            let newest_retired = *newest_retired;
            retire_before =
                Some(retire_before.map_or(newest_retired, |idle| idle.max(newest_retired)));
        }
        let Some(retire_before) = retire_before else {
            return;
        };
        for entry in entries.live.values() {
            if entry.last_used <= retire_before {
                let _ = entry.actor.send_message(AccountMsg::Retire);
            }
        }
    }

    /// Called by an actor that wants to retire: removes it if no message is on
    /// its way to it. After this returns true no one can reach the actor.
    fn remove_if_idle(&self, account: AccountId, actor: &ActorRef<AccountMsg>) -> bool {
        let mut entries = self.entries();
        match entries.live.get(&account) {
            Some(entry)
                if entry.actor.get_id() == actor.get_id()
                    && entry.mailbox.inflight.load(Ordering::Acquire) == 0 =>
            {
                entries.live.remove(&account);
                self.live.fetch_sub(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Live (balance, reserved) of `account`, starting its actor if needed.
    pub async fn inspect(self: &Arc<Self>, account: AccountId) -> Result<(u64, u64), LedgerError> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.send(account, AccountMsg::Inspect(RpcReplyPort::from(sender)))
            .await?;
        receiver.await.map_err(|_| LedgerError::Closed)
    }

    /// Stops every actor and waits for each.
    pub async fn stop_all(&self) {
        let actors: Vec<ActorRef<AccountMsg>> = {
            let mut entries = self.entries();
            entries.closed = true;
            self.live.store(0, Ordering::Relaxed);
            entries.live.drain().map(|(_, entry)| entry.actor).collect()
        };
        for actor in actors {
            let _ = actor.stop_and_wait(None, Some(ACTOR_STOP_TIMEOUT)).await;
        }
    }
}
