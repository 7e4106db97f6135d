//! The matcher's decisions as a deterministic state machine: halves in, effects
//! out. It pairs halves by `tx_key`, applies the rules, tracks who is waiting
//! for which key and when each lone half expires.
//!
//! It never reads a clock, touches storage or awaits: time arrives as an
//! argument, and everything that must happen outside (look an outcome up,
//! persist, reserve, debit, credit) leaves as an [`Effect`], whose result
//! comes back as an input. Callers waiting on a half are a generic
//! [`Waiter`], so tests use plain recorders and the actor uses channels.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use tapledger_protocol::{
    AccountId, Half, Outcome, ReceiveHalf, RejectCode, SendHalf, Side, Stamped, Timestamp, TxKey,
};

use crate::rules::{self, HalfContext};

/// Maps and sets keyed by what clients choose (`tx_key`s, account ids):
/// foldhash's quality hasher, seeded at random per map, like ahash. std's
/// SipHash cost about 110 instructions per 16-byte key, over 20 lookups a
/// payment (5k of about 47k instructions per settlement in `bench core`); a
/// random seed keeps a client from choosing keys that collide.
pub type KeyMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;
/// See [`KeyMap`].
pub type KeySet<K> = std::collections::HashSet<K, foldhash::quality::RandomState>;
type HashMap<K, V> = KeyMap<K, V>;

/// How many recent outcomes each matcher keeps in memory to answer replays
/// without a storage round trip. Older ones are found in redb.
pub const RECENT_OUTCOMES_MAX: usize = 65_536;

/// How a submission ended, as seen by the phone that sent the half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The key's final outcome (this half is one of the halves it recorded).
    Final(Arc<Outcome>),
    /// This half was refused; the key's own state is unchanged.
    Refused(RejectCode),
}

/// Someone waiting on a half: first to hear that it is durably pending, then
/// for its resolution.
pub trait Waiter {
    /// Why carrying out an effect failed (storage, replication, shutdown):
    /// the matcher does not look inside, it hands a clone to every waiter on
    /// the key the failure concerns.
    type Error: Clone;
    /// The half is durable and waits for its partner.
    fn accepted(&mut self);
    /// The submission is over.
    fn finish(self, result: Result<Resolution, Self::Error>);
    /// True when nobody listens any more (the submitter went away); such
    /// waiters are dropped instead of piling up on a long-pending half.
    fn is_gone(&self) -> bool {
        false
    }
}

/// Answers held back until the effects that come with them were carried out:
/// a phone must not hear "settled" before the receiver's live balance holds the
/// credit, or its very next payment could be refused for funds it has.
#[must_use = "answers must be delivered after the effects"]
pub struct Answers<W: Waiter>(Vec<(W, Result<Resolution, W::Error>)>);

impl<W: Waiter> Answers<W> {
    fn new() -> Answers<W> {
        Answers(Vec::new())
    }

    /// Room for `capacity` answers, to collect a whole commit's.
    pub fn with_capacity(capacity: usize) -> Answers<W> {
        Answers(Vec::with_capacity(capacity))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn deliver(self) {
        for (waiter, result) in self.0 {
            waiter.finish(result);
        }
    }
}

/// A lone half as stored while it waits for its partner.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PendingHalf {
    Send(Stamped<SendHalf>),
    Receive(Stamped<ReceiveHalf>),
}

impl PendingHalf {
    pub fn tx_key(&self) -> TxKey {
        match self {
            PendingHalf::Send(stamped) => stamped.half.tx_key,
            PendingHalf::Receive(stamped) => stamped.half.tx_key,
        }
    }
    pub fn received_at(&self) -> Timestamp {
        match self {
            PendingHalf::Send(stamped) => stamped.received_at,
            PendingHalf::Receive(stamped) => stamped.received_at,
        }
    }
    pub fn party(&self) -> AccountId {
        match self {
            PendingHalf::Send(stamped) => stamped.half.sender_id,
            PendingHalf::Receive(stamped) => stamped.half.receiver_id,
        }
    }
}

/// A final decision the matcher hands to storage. Storage stamps the time,
/// reads the balances before the move and refuses it if the key already has an
/// outcome.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Decision {
    Settle {
        send: Stamped<SendHalf>,
        receive: Stamped<ReceiveHalf>,
    },
    Reject {
        tx_key: TxKey,
        code: RejectCode,
        send: Option<Stamped<SendHalf>>,
        receive: Option<Stamped<ReceiveHalf>>,
        sender_balance: Option<u64>,
    },
}

impl Decision {
    pub fn tx_key(&self) -> TxKey {
        match self {
            Decision::Settle { send, .. } => send.half.tx_key,
            Decision::Reject { tx_key, .. } => *tx_key,
        }
    }
}

/// Work the matcher asks for. Results come back through
/// [`Matcher::on_looked_up`], [`Matcher::on_reserved`] and
/// [`Matcher::on_committed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Say whether storage holds an outcome for `tx_key`. Asked where a key
    /// this matcher does not remember may already be decided and acting on
    /// it would have an effect: when a half would be refused for the
    /// pending cap (a replay of an old key gets its outcome, or 700, rather
    /// than 800), when a half conflicts with the one waiting (710, unless
    /// the key is long settled), and when two halves pair, before the
    /// sender's money is reserved. The last matters after a restart or a
    /// change of leader: phones resubmit both halves of payments the
    /// previous leader decided, and a reservation for them, however brief,
    /// would make the sender's honest payments in the meantime look
    /// underfunded (100).
    LookUp { tx_key: TxKey },
    /// Make this lone half durable as pending.
    StorePending(PendingHalf),
    /// Make this decision durable. `reserved` names the sender's reservation it
    /// holds, to be debited if it commits and released otherwise.
    Decide {
        decision: Decision,
        reserved: Option<(AccountId, u64)>,
    },
    /// Ask the sender's account to reserve `amount` for `tx_key`.
    Reserve {
        tx_key: TxKey,
        sender: AccountId,
        amount: u64,
    },
    /// A committed settlement: turn the sender's reservation into a debit.
    Debit {
        account: AccountId,
        amount: u64,
        commit: u64,
    },
    /// The reservation's settlement did not commit: give the money back.
    Release { account: AccountId, amount: u64 },
    /// A committed settlement: credit the receiver's live balance.
    Credit {
        account: AccountId,
        amount: u64,
        commit: u64,
    },
}

/// What storage reported for one [`Effect::StorePending`] or [`Effect::Decide`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Committed {
    /// The lone half is durable.
    PendingStored,
    /// The lone half was not written: its key reached a decision in the same
    /// commit, whose own result follows.
    PendingSkipped,
    /// The decision was recorded as the key's outcome.
    Decided(Arc<Outcome>),
    /// The key already had this outcome; nothing was written.
    AlreadyFinal(Arc<Outcome>),
}

/// Which effect a commit result answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persisted {
    Pending(Side),
    Decision { reserved: Option<(AccountId, u64)> },
}

#[derive(Debug)]
struct Slot<H, W> {
    stamped: Stamped<H>,
    /// True once storage confirmed the half as pending.
    durable: bool,
    waiters: Waiters<W>,
}

/// Who wait on one half: nearly always one phone, so kept inline.
type Waiters<W> = smallvec::SmallVec<[W; 1]>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// One half waits for its partner.
    Waiting,
    /// Both halves are here; storage is asked whether the key is decided.
    Checking,
    /// Both halves agree; the sender's account is reserving the amount.
    Reserving,
    /// A decision is on its way to storage.
    Deciding,
}

#[derive(Debug)]
struct Entry<W> {
    send: Option<Slot<SendHalf, W>>,
    receive: Option<Slot<ReceiveHalf, W>>,
    /// The side that arrived first and waited for its partner; its deadline
    /// and its party's pending count belong to the entry while `Waiting`.
    first: Side,
    phase: Phase,
    /// Halves of the missing side that arrived while the lone half's expiry
    /// was on its way to storage. They hear the decision once it commits
    /// (700 if it recorded the expiry), never a guess before: a leader cut
    /// off from its quorum may never commit it, and the key may settle with
    /// exactly this half on the next leader.
    late: Vec<(Half, W)>,
}

impl<W> Entry<W> {
    fn new_send(stamped: Stamped<SendHalf>, durable: bool, waiters: Waiters<W>) -> Entry<W> {
        Entry {
            send: Some(Slot {
                stamped,
                durable,
                waiters,
            }),
            receive: None,
            first: Side::Send,
            phase: Phase::Waiting,
            late: Vec::new(),
        }
    }

    fn new_receive(stamped: Stamped<ReceiveHalf>, durable: bool, waiters: Waiters<W>) -> Entry<W> {
        Entry {
            send: None,
            receive: Some(Slot {
                stamped,
                durable,
                waiters,
            }),
            first: Side::Receive,
            phase: Phase::Waiting,
            late: Vec::new(),
        }
    }

    /// The first half's expiry time and party.
    fn first_deadline_and_party(&self, half_ttl_micros: u64) -> (Timestamp, AccountId) {
        let (received_at, party) = match self.first {
            Side::Send => {
                let slot = self.send.as_ref().expect("first half present");
                (slot.stamped.received_at, slot.stamped.half.sender_id)
            }
            Side::Receive => {
                let slot = self.receive.as_ref().expect("first half present");
                (slot.stamped.received_at, slot.stamped.half.receiver_id)
            }
        };
        (received_at.saturating_add_micros(half_ttl_micros), party)
    }

    /// Each half of the entry with the waiters who sent it (the halves
    /// moved, not cloned: every waiter of one half hears the same answer).
    fn waiters(self) -> impl Iterator<Item = (Half, Waiters<W>)> {
        let send = self
            .send
            .map(|slot| (Half::Send(slot.stamped.half), slot.waiters));
        let receive = self
            .receive
            .map(|slot| (Half::Receive(slot.stamped.half), slot.waiters));
        let late = self
            .late
            .into_iter()
            .map(|(half, waiter)| (half, smallvec::smallvec![waiter]));
        send.into_iter().chain(receive).chain(late)
    }
}

/// Limits and settings of one matcher.
#[derive(Clone, Copy, Debug)]
pub struct MatcherConfig {
    pub half_ttl_micros: u64,
    /// Lone halves one account may have waiting, in every matcher sharing
    /// one [`PendingCounts`] together.
    pub pending_halves_per_account_max: u32,
}

/// Lone halves waiting per account, shared by the matcher shards: the cap
/// is on the account, whichever shards its halves' keys fall in.
#[derive(Debug, Default)]
pub struct PendingCounts(std::sync::Mutex<HashMap<AccountId, u32>>);

impl PendingCounts {
    /// Counts one more lone half for `party` if it has fewer than `max`.
    fn try_add(&self, party: AccountId, max: u32) -> bool {
        let mut counts = self.0.lock().expect("pending counts lock");
        let count = counts.entry(party).or_insert(0);
        if *count >= max {
            if *count == 0 {
                counts.remove(&party);
            }
            return false;
        }
        *count += 1;
        true
    }

    /// Counts a lone half that is waiting already (restored after a
    /// restart), whatever the cap.
    fn add(&self, party: AccountId) {
        *self
            .0
            .lock()
            .expect("pending counts lock")
            .entry(party)
            .or_insert(0) += 1;
    }

    fn remove(&self, party: AccountId) {
        let mut counts = self.0.lock().expect("pending counts lock");
        let count = counts.get_mut(&party).expect("pending count exists");
        *count -= 1;
        if *count == 0 {
            counts.remove(&party);
        }
    }
}

/// A half whose fate hangs on whether storage already decided its key.
enum Held<W> {
    /// Over the per-account cap: 800 unless the key is decided.
    OverCap(Half, W),
    /// Conflicts with the half waiting under its key: 710 unless decided.
    Conflicting(Half, W),
}

/// The pairing state of one matcher shard.
pub struct Matcher<W> {
    config: MatcherConfig,
    entries: HashMap<TxKey, Entry<W>>,
    /// Lone halves by expiry time. Invariant: holds exactly the entries in
    /// phase `Waiting`, at their lone half's deadline.
    deadlines: BTreeSet<(Timestamp, TxKey)>,
    /// Lone halves per account, counted against the per-account cap
    /// (shared with the other shards).
    pending_per_account: std::sync::Arc<PendingCounts>,
    recent: HashMap<TxKey, Arc<Outcome>>,
    recent_order: VecDeque<TxKey>,
    /// Halves waiting for an [`Effect::LookUp`] of their key; entries in
    /// phase `Checking` wait for it too.
    held: HashMap<TxKey, Vec<Held<W>>>,
    /// True while [`Matcher::submit_many`] runs; `batch_lone` then holds
    /// the keys whose first half arrived in the batch, to be written as
    /// pending at its end if still alone.
    batching: bool,
    batch_lone: Vec<TxKey>,
}

impl<W: Waiter> Matcher<W> {
    /// A matcher whose lone halves are the only ones counted against the
    /// per-account cap.
    pub fn new(config: MatcherConfig) -> Matcher<W> {
        Matcher::sharing(config, std::sync::Arc::default())
    }

    /// A matcher that counts lone halves against the per-account cap
    /// together with every other matcher sharing `counts`.
    pub fn sharing(config: MatcherConfig, counts: std::sync::Arc<PendingCounts>) -> Matcher<W> {
        Matcher {
            config,
            entries: HashMap::default(),
            deadlines: BTreeSet::new(),
            pending_per_account: counts,
            recent: HashMap::default(),
            recent_order: VecDeque::new(),
            held: HashMap::default(),
            batching: false,
            batch_lone: Vec::new(),
        }
    }

    /// Restores a half that was durably pending before a restart, with its
    /// original receive time (and so its original deadline).
    pub fn restore(&mut self, pending: PendingHalf) {
        let tx_key = pending.tx_key();
        assert!(
            !self.entries.contains_key(&tx_key),
            "pending half {tx_key} restored twice"
        );
        let entry = match pending {
            PendingHalf::Send(stamped) => Entry::new_send(stamped, true, Waiters::new()),
            PendingHalf::Receive(stamped) => Entry::new_receive(stamped, true, Waiters::new()),
        };
        self.add_waiting(tx_key, entry);
    }

    /// Number of keys this matcher tracks (waiting, checking, reserving or
    /// deciding, or with halves held for a lookup).
    pub fn keys_in_flight(&self) -> usize {
        self.entries.len()
            + self
                .held
                .keys()
                .filter(|key| !self.entries.contains_key(key))
                .count()
    }

    /// Number of lone halves waiting for a partner.
    pub fn lone_halves(&self) -> usize {
        self.deadlines.len()
    }

    /// The earliest time at which [`Matcher::expire_due`] has work.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Halves arrive together at node time `now`, handled in order. A first
    /// half whose partner arrives in the same batch is never written as
    /// pending (the pair's decision is what becomes durable, and its first
    /// waiter hears that instead of "accepted"): only halves still alone at
    /// the end of the batch are, in the effects after everything else.
    pub fn submit_many(
        &mut self,
        now: Timestamp,
        halves: impl IntoIterator<Item = (HalfContext, Half, W)>,
    ) -> Vec<Effect> {
        self.batching = true;
        let halves = halves.into_iter();
        // About one effect per half (a lookup or a reservation).
        let mut effects = Vec::with_capacity(halves.size_hint().0);
        for (context, half, waiter) in halves {
            effects.extend(self.submit_one(now, &context, half, waiter));
        }
        self.batching = false;
        let mut lone = std::mem::take(&mut self.batch_lone);
        for tx_key in lone.drain(..) {
            if let Some(pending) = self.still_lone(tx_key) {
                effects.push(Effect::StorePending(pending));
            }
        }
        // Kept for its capacity.
        self.batch_lone = lone;
        effects
    }

    /// The half of `tx_key` as it is to be written pending, if the entry is
    /// still one lone half not yet written.
    fn still_lone(&self, tx_key: TxKey) -> Option<PendingHalf> {
        let entry = self.entries.get(&tx_key)?;
        if entry.phase != Phase::Waiting {
            return None;
        }
        match entry.first {
            Side::Send => {
                let slot = entry.send.as_ref().expect("first half present");
                (!slot.durable).then(|| PendingHalf::Send(slot.stamped.clone()))
            }
            Side::Receive => {
                let slot = entry.receive.as_ref().expect("first half present");
                (!slot.durable).then(|| PendingHalf::Receive(slot.stamped.clone()))
            }
        }
    }

    /// A half arrives at node time `now`.
    pub fn submit(
        &mut self,
        now: Timestamp,
        context: &HalfContext,
        half: Half,
        waiter: W,
    ) -> Vec<Effect> {
        self.submit_one(now, context, half, waiter)
            .into_iter()
            .collect()
    }

    /// [`Matcher::submit`]: a half brings at most one effect (a lookup, or
    /// its pending write outside a batch), so no vector is made for it.
    fn submit_one(
        &mut self,
        now: Timestamp,
        context: &HalfContext,
        half: Half,
        waiter: W,
    ) -> Option<Effect> {
        if let Err(code) = rules::check_half(&half, context) {
            waiter.finish(Ok(Resolution::Refused(code)));
            return None;
        }
        let tx_key = half.tx_key();
        if let Some(outcome) = self.recent.get(&tx_key) {
            waiter.finish(Ok(resolve_against(outcome, &half)));
            return None;
        }
        let Some(entry) = self.entries.get_mut(&tx_key) else {
            return self.start_entry(now, half, waiter);
        };
        // A half for a key already in flight: identical (join), conflicting
        // (refuse, unless storage has the key's outcome), or the missing
        // partner (pair, or wait for the decision in flight).
        match half {
            Half::Send(send) => match &mut entry.send {
                Some(slot) if slot.stamped.half == send => join(slot, waiter),
                Some(_) => self.hold(tx_key, Held::Conflicting(Half::Send(send), waiter)),
                None if entry.phase == Phase::Waiting => {
                    entry.send = Some(Slot {
                        stamped: Stamped {
                            half: send,
                            received_at: now,
                        },
                        durable: false,
                        waiters: smallvec::smallvec![waiter],
                    });
                    self.pair(tx_key)
                }
                None => wait_for_decision(entry, Half::Send(send), waiter),
            },
            Half::Receive(receive) => match &mut entry.receive {
                Some(slot) if slot.stamped.half == receive => join(slot, waiter),
                Some(_) => self.hold(tx_key, Held::Conflicting(Half::Receive(receive), waiter)),
                None if entry.phase == Phase::Waiting => {
                    entry.receive = Some(Slot {
                        stamped: Stamped {
                            half: receive,
                            received_at: now,
                        },
                        durable: false,
                        waiters: smallvec::smallvec![waiter],
                    });
                    self.pair(tx_key)
                }
                None => wait_for_decision(entry, Half::Receive(receive), waiter),
            },
        }
    }

    /// Holds a half until storage says whether its key is decided (a
    /// conflicting half: after a restart or a change of leader, the waiting
    /// half may be a stranger's and the key long settled; a half over the
    /// cap: it may be a replay of an old key). One lookup per key at a time.
    fn hold(&mut self, tx_key: TxKey, held: Held<W>) -> Option<Effect> {
        let checking = self
            .entries
            .get(&tx_key)
            .is_some_and(|entry| entry.phase == Phase::Checking);
        let holding = self.held.entry(tx_key).or_default();
        let asked = checking || !holding.is_empty();
        holding.push(held);
        (!asked).then_some(Effect::LookUp { tx_key })
    }

    /// Storage answered an [`Effect::LookUp`]: `outcome` is the key's
    /// outcome if it has one. Halves held for it are answered (their
    /// outcome or 700 if decided; 710 or 800 if not), and a pair waiting for
    /// it is resolved or goes on to its reservation (the one effect it may
    /// bring).
    pub fn on_looked_up(&mut self, tx_key: TxKey, outcome: Option<Arc<Outcome>>) -> Option<Effect> {
        for held in self.held.remove(&tx_key).into_iter().flatten() {
            let (half, waiter, code) = match held {
                Held::OverCap(half, waiter) => (half, waiter, RejectCode::TooManyPending),
                Held::Conflicting(half, waiter) => (half, waiter, RejectCode::ConflictingHalf),
            };
            match &outcome {
                Some(outcome) => waiter.finish(Ok(resolve_against(outcome, &half))),
                None => waiter.finish(Ok(Resolution::Refused(code))),
            }
        }
        let checking = self
            .entries
            .get(&tx_key)
            .is_some_and(|entry| entry.phase == Phase::Checking);
        match outcome {
            Some(outcome) => {
                if checking {
                    let mut answers = Answers::new();
                    self.resolve(tx_key, &outcome, &mut answers);
                    answers.deliver();
                } else if !self.entries.contains_key(&tx_key) {
                    // A replay of an old key: its next halves need no lookup.
                    // (A key with an entry, say a stranger's lone half after
                    // a restart, keeps it until its expiry meets the outcome.)
                    self.remember(tx_key, outcome);
                }
                None
            }
            None if checking => Some(self.check_pair(tx_key)),
            None => None,
        }
    }

    fn start_entry(&mut self, now: Timestamp, half: Half, waiter: W) -> Option<Effect> {
        let party = half.party();
        if !self
            .pending_per_account
            .try_add(party, self.config.pending_halves_per_account_max)
        {
            return self.hold(half.tx_key(), Held::OverCap(half, waiter));
        }
        let tx_key = half.tx_key();
        // In a batch, written at its end if the partner is not in it.
        let write_now = !self.batching;
        let (entry, pending) = match half {
            Half::Send(send) => {
                let stamped = Stamped {
                    half: send,
                    received_at: now,
                };
                let pending = write_now.then(|| PendingHalf::Send(stamped.clone()));
                (
                    Entry::new_send(stamped, false, smallvec::smallvec![waiter]),
                    pending,
                )
            }
            Half::Receive(receive) => {
                let stamped = Stamped {
                    half: receive,
                    received_at: now,
                };
                let pending = write_now.then(|| PendingHalf::Receive(stamped.clone()));
                (
                    Entry::new_receive(stamped, false, smallvec::smallvec![waiter]),
                    pending,
                )
            }
        };
        // Counted against the cap above already.
        self.insert_waiting(tx_key, entry);
        match pending {
            Some(pending) => Some(Effect::StorePending(pending)),
            None => {
                self.batch_lone.push(tx_key);
                None
            }
        }
    }

    /// Records a waiting entry and counts its lone half.
    fn add_waiting(&mut self, tx_key: TxKey, entry: Entry<W>) {
        let (_, party) = entry.first_deadline_and_party(self.config.half_ttl_micros);
        self.pending_per_account.add(party);
        self.insert_waiting(tx_key, entry);
    }

    /// Records a waiting entry whose lone half is counted already.
    fn insert_waiting(&mut self, tx_key: TxKey, entry: Entry<W>) {
        let (deadline, _) = entry.first_deadline_and_party(self.config.half_ttl_micros);
        self.deadlines.insert((deadline, tx_key));
        self.entries.insert(tx_key, entry);
    }

    /// Takes an entry in phase `Waiting` out of the lone-half bookkeeping.
    fn leave_waiting(&mut self, tx_key: TxKey) {
        let entry = self.entries.get(&tx_key).expect("entry exists");
        assert_eq!(entry.phase, Phase::Waiting, "entry {tx_key} is waiting");
        let (deadline, party) = entry.first_deadline_and_party(self.config.half_ttl_micros);
        assert!(
            self.deadlines.remove(&(deadline, tx_key)),
            "deadline of {tx_key} missing"
        );
        self.uncount_pending(party);
    }

    fn uncount_pending(&mut self, party: AccountId) {
        self.pending_per_account.remove(party);
    }

    /// Both halves are present: ask storage whether the key is decided
    /// (then every waiter hears its outcome and nothing is reserved) before
    /// deciding what they say together ([`Matcher::check_pair`]).
    fn pair(&mut self, tx_key: TxKey) -> Option<Effect> {
        self.leave_waiting(tx_key);
        let entry = self.entries.get_mut(&tx_key).expect("entry exists");
        entry.phase = Phase::Checking;
        // Unless a lookup for this key is on its way already.
        (!self.held.contains_key(&tx_key)).then_some(Effect::LookUp { tx_key })
    }

    /// Storage has no outcome for the pair: reserve, or decide a mismatch.
    fn check_pair(&mut self, tx_key: TxKey) -> Effect {
        let entry = self.entries.get_mut(&tx_key).expect("entry exists");
        debug_assert_eq!(entry.phase, Phase::Checking);
        let send = &entry.send.as_ref().expect("send half").stamped;
        let receive = &entry.receive.as_ref().expect("receive half").stamped;
        match rules::check_pair(&send.half, &receive.half) {
            Ok(()) => {
                entry.phase = Phase::Reserving;
                Effect::Reserve {
                    tx_key,
                    sender: send.half.sender_id,
                    amount: send.half.amount,
                }
            }
            Err(code) => {
                entry.phase = Phase::Deciding;
                let decision = Decision::Reject {
                    tx_key,
                    code,
                    send: Some(send.clone()),
                    receive: Some(receive.clone()),
                    sender_balance: None,
                };
                Effect::Decide {
                    decision,
                    reserved: None,
                }
            }
        }
    }

    /// The sender's account answered a reservation: `Ok` if it holds the
    /// amount, `Err(available)` if it could not. Brings the key's decision,
    /// or a release if the key was resolved meanwhile.
    pub fn on_reserved(
        &mut self,
        tx_key: TxKey,
        sender: AccountId,
        amount: u64,
        result: Result<(), u64>,
    ) -> Option<Effect> {
        let entry = match self.entries.get_mut(&tx_key) {
            Some(entry) if entry.phase == Phase::Reserving => entry,
            // The key was resolved meanwhile (storage reported an older outcome):
            // give back what was reserved.
            _ => {
                return result.is_ok().then_some(Effect::Release {
                    account: sender,
                    amount,
                });
            }
        };
        entry.phase = Phase::Deciding;
        let send = entry.send.as_ref().expect("send half").stamped.clone();
        let receive = entry
            .receive
            .as_ref()
            .expect("receive half")
            .stamped
            .clone();
        debug_assert_eq!((send.half.sender_id, send.half.amount), (sender, amount));
        match result {
            Ok(()) => Some(Effect::Decide {
                decision: Decision::Settle { send, receive },
                reserved: Some((sender, amount)),
            }),
            Err(available) => Some(Effect::Decide {
                decision: Decision::Reject {
                    tx_key,
                    code: RejectCode::InsufficientFunds,
                    send: Some(send),
                    receive: Some(receive),
                    sender_balance: Some(available),
                },
                reserved: None,
            }),
        }
    }

    /// Storage answered an effect. `commit` is the sequence number of the
    /// commit that held it.
    pub fn on_committed(
        &mut self,
        tx_key: TxKey,
        persisted: Persisted,
        commit: Option<u64>,
        result: Result<Committed, W::Error>,
    ) -> (Vec<Effect>, Answers<W>) {
        let mut effects = Vec::new();
        let mut answers = Answers::new();
        self.on_committed_into(
            tx_key,
            persisted,
            commit,
            result,
            &mut effects,
            &mut answers,
        );
        (effects, answers)
    }

    /// [`Matcher::on_committed`], adding to `effects` and `answers` (a
    /// whole commit's results then allocate once). Its effects are only
    /// debits, credits and releases.
    pub fn on_committed_into(
        &mut self,
        tx_key: TxKey,
        persisted: Persisted,
        commit: Option<u64>,
        result: Result<Committed, W::Error>,
        effects: &mut Vec<Effect>,
        answers: &mut Answers<W>,
    ) {
        match (persisted, result) {
            (Persisted::Pending(side), Ok(Committed::PendingStored)) => {
                if let Some(entry) = self.entries.get_mut(&tx_key) {
                    let waiters = match side {
                        Side::Send => entry.send.as_mut().map(|slot| {
                            slot.durable = true;
                            &mut slot.waiters
                        }),
                        Side::Receive => entry.receive.as_mut().map(|slot| {
                            slot.durable = true;
                            &mut slot.waiters
                        }),
                    };
                    for waiter in waiters.into_iter().flatten() {
                        waiter.accepted();
                    }
                }
            }
            (Persisted::Pending(_), Ok(Committed::PendingSkipped)) => {}
            (Persisted::Pending(_), Ok(Committed::AlreadyFinal(outcome))) => {
                self.resolve(tx_key, &outcome, answers)
            }
            (Persisted::Decision { reserved }, Ok(Committed::Decided(outcome))) => {
                if let Outcome::Settled(settlement) = &*outcome {
                    let (sender, amount) = reserved.expect("a settlement holds a reservation");
                    let commit = commit.expect("a decided settlement comes from a ledger commit");
                    assert_eq!(
                        (sender, amount),
                        (settlement.sender(), settlement.amount()),
                        "settlement {tx_key} debits what was reserved"
                    );
                    effects.push(Effect::Debit {
                        account: sender,
                        amount,
                        commit,
                    });
                    effects.push(Effect::Credit {
                        account: settlement.receiver(),
                        amount,
                        commit,
                    });
                } else if let Some((account, amount)) = reserved {
                    effects.push(Effect::Release { account, amount });
                }
                self.resolve(tx_key, &outcome, answers);
            }
            (Persisted::Decision { reserved }, Ok(Committed::AlreadyFinal(outcome))) => {
                if let Some((account, amount)) = reserved {
                    effects.push(Effect::Release { account, amount });
                }
                self.resolve(tx_key, &outcome, answers);
            }
            (
                Persisted::Decision { .. },
                Ok(other @ (Committed::PendingStored | Committed::PendingSkipped)),
            ) => {
                unreachable!("decision for {tx_key} answered with {other:?}")
            }
            (Persisted::Pending(_), Ok(Committed::Decided(_))) => {
                unreachable!("pending half for {tx_key} answered with a decision")
            }
            (persisted, Err(error)) => {
                if let Persisted::Decision {
                    reserved: Some((account, amount)),
                } = persisted
                {
                    effects.push(Effect::Release { account, amount });
                }
                if let Some(entry) = self.remove_entry(tx_key) {
                    for waiter in entry.waiters().flat_map(|(_, waiters)| waiters) {
                        answers.0.push((waiter, Err(error.clone())));
                    }
                }
            }
        }
    }

    /// Every lone half whose deadline is at or before `now` becomes a decision
    /// to record it as expired (code 500).
    pub fn expire_due(&mut self, now: Timestamp) -> Vec<Effect> {
        let mut effects = Vec::new();
        while let Some(&(deadline, tx_key)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.leave_waiting(tx_key);
            let entry = self.entries.get_mut(&tx_key).expect("waiting entry exists");
            entry.phase = Phase::Deciding;
            let decision = Decision::Reject {
                tx_key,
                code: RejectCode::Expired,
                send: entry.send.as_ref().map(|slot| slot.stamped.clone()),
                receive: entry.receive.as_ref().map(|slot| slot.stamped.clone()),
                sender_balance: None,
            };
            effects.push(Effect::Decide {
                decision,
                reserved: None,
            });
        }
        effects
    }

    /// Ends every submission for `tx_key` against its final outcome.
    fn resolve(&mut self, tx_key: TxKey, outcome: &Arc<Outcome>, answers: &mut Answers<W>) {
        if let Some(entry) = self.remove_entry(tx_key) {
            for (half, waiters) in entry.waiters() {
                let resolution = resolve_against(outcome, &half);
                answers.0.extend(
                    waiters
                        .into_iter()
                        .map(|waiter| (waiter, Ok(resolution.clone()))),
                );
            }
        }
        self.remember(tx_key, outcome.clone());
    }

    fn remove_entry(&mut self, tx_key: TxKey) -> Option<Entry<W>> {
        if self.entries.get(&tx_key)?.phase == Phase::Waiting {
            self.leave_waiting(tx_key);
        }
        self.entries.remove(&tx_key)
    }

    fn remember(&mut self, tx_key: TxKey, outcome: Arc<Outcome>) {
        if self.recent.insert(tx_key, outcome).is_none() {
            self.recent_order.push_back(tx_key);
            if self.recent_order.len() > RECENT_OUTCOMES_MAX {
                let oldest = self.recent_order.pop_front().expect("not empty");
                self.recent.remove(&oldest);
            }
        }
    }
}

/// What a half hears about a key that already has `outcome`: the outcome if it
/// is the half recorded for its side, otherwise 700.
fn resolve_against(outcome: &Arc<Outcome>, half: &Half) -> Resolution {
    if outcome.recorded(half) {
        Resolution::Final(outcome.clone())
    } else {
        Resolution::Refused(RejectCode::TxKeyAlreadyUsed)
    }
}

/// An identical resubmission joins the half's waiters.
fn join<H, W: Waiter>(slot: &mut Slot<H, W>, mut waiter: W) -> Option<Effect> {
    if slot.durable {
        waiter.accepted();
    }
    slot.waiters.retain(|waiter| !waiter.is_gone());
    slot.waiters.push(waiter);
    None
}

/// The missing side of a key whose lone half is being expired: it hears the
/// decision once storage has it.
fn wait_for_decision<W: Waiter>(entry: &mut Entry<W>, half: Half, waiter: W) -> Option<Effect> {
    debug_assert_eq!(
        entry.phase,
        Phase::Deciding,
        "only an expiry leaves a side missing"
    );
    entry.late.retain(|(_, waiter)| !waiter.is_gone());
    entry.late.push((half, waiter));
    None
}

#[cfg(test)]
#[path = "matching_tests.rs"]
mod tests;
