//! The matcher driven by random operations against a model of the world
//! around it (the shape of quinn's `fuzz/fuzz_targets/streams.rs`): halves
//! arrive in any order, storage and the sender's account answer effects in
//! any order, some effects fail, time jumps, lookups of old keys are answered
//! late, and the leader restarts (a new matcher restored from storage's
//! pending halves, knowing nothing of what was decided, while phones replay
//! old keys). The model plays storage (one outcome per key, balances that
//! must cover every settlement) and the account actors (an `AccountBook` per
//! account), and checks after every step what a phone may hear:
//!
//! * every submission is answered exactly once (unless the leader that
//!   held it restarted), and "accepted" (durably pending) comes before the
//!   answer, at most once;
//! * a final outcome is the one storage holds for the key, and records the
//!   very half the phone sent; 700 only when the key's outcome records
//!   another half; an error only if a failure was injected for the key;
//! * no settlement is applied that storage's balance cannot cover (a
//!   reservation precedes every debit), no reservation outlives its key,
//!   and none is asked for a key storage has decided;
//! * once every effect is answered and every deadline passed, the matcher
//!   holds nothing and the live books equal storage's balances.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use proptest::prelude::*;
use tapledger_core::book::AccountBook;
use tapledger_core::matching::{
    Committed, Decision, Effect, Matcher, MatcherConfig, PendingHalf, Persisted, Resolution, Waiter,
};
use tapledger_core::rules::HalfContext;
use tapledger_protocol::{
    AccountId, Half, Outcome, ReceiveHalf, RejectCode, Rejection, SendHalf, Settlement, Side,
    Timestamp, TxKey,
};

const TTL: u64 = 1_000;
const ACCOUNTS_END: AccountId = 4;
const OPENING_BALANCE: u64 = 100;
const PENDING_MAX: u32 = 2;
/// What a failed effect hands its waiters.
const FAILED: &str = "storage failed";

/// What one submission heard.
#[derive(Debug, Default)]
struct Heard {
    half: Option<Half>,
    accepted: u32,
    finished: Option<Result<Resolution, &'static str>>,
    /// Its matcher was replaced by a restart before it was answered (its
    /// phone hears "not the leader" and resubmits).
    abandoned: bool,
    /// Its answer was checked against storage as it stood when given.
    checked: bool,
}

type Log = Rc<RefCell<Vec<Heard>>>;

/// A submission's waiter: records into the log under its index.
struct Probe {
    id: usize,
    log: Log,
}

impl Waiter for Probe {
    type Error = &'static str;

    fn accepted(&mut self) {
        let mut log = self.log.borrow_mut();
        let heard = &mut log[self.id];
        assert!(heard.finished.is_none(), "accepted after the answer");
        assert_eq!(heard.accepted, 0, "accepted twice");
        heard.accepted += 1;
    }

    fn finish(self, result: Result<Resolution, &'static str>) {
        let mut log = self.log.borrow_mut();
        let heard = &mut log[self.id];
        assert!(
            heard.finished.is_none(),
            "submission {} answered twice: {:?} then {result:?}",
            self.id,
            heard.finished
        );
        heard.finished = Some(result);
    }
}

/// An effect waiting for storage.
#[derive(Clone, Debug)]
enum Stored {
    Pending(PendingHalf),
    Decide {
        decision: Decision,
        reserved: Option<(AccountId, u64)>,
    },
}

impl Stored {
    fn tx_key(&self) -> TxKey {
        match self {
            Stored::Pending(half) => half.tx_key(),
            Stored::Decide { decision, .. } => decision.tx_key(),
        }
    }

    fn persisted(&self) -> Persisted {
        match self {
            Stored::Pending(PendingHalf::Send(_)) => Persisted::Pending(Side::Send),
            Stored::Pending(PendingHalf::Receive(_)) => Persisted::Pending(Side::Receive),
            Stored::Decide { reserved, .. } => Persisted::Decision {
                reserved: *reserved,
            },
        }
    }
}

/// One random step.
#[derive(Clone, Debug)]
enum Op {
    /// A phone sends a half (`wrong_submitter`: authenticated as someone else).
    Submit { half: Half, wrong_submitter: bool },
    /// Several halves arrive in one batch ([`Matcher::submit_many`]): a
    /// first half that meets its partner in it is never written pending.
    SubmitMany { halves: Vec<(Half, bool)> },
    /// Storage commits every queued effect, in order, in one commit.
    CommitAll,
    /// Storage commits (or fails, and from then on fails every commit) one
    /// queued effect on its own.
    CommitOne { pick: usize, fail: bool },
    /// The sender's account answers one reservation.
    Reserve { pick: usize },
    /// Time passes and due lone halves expire.
    Advance { micros: u64 },
    /// Storage answers one lookup, as it stands now.
    LookUp { pick: usize },
    /// The leader restarts: what its actors had in flight is lost (entries
    /// it proposed are refused whole in the new term), the new matcher is
    /// restored from storage's pending halves and the books from its
    /// balances.
    Restart,
}

/// How a half departs from its key's payment.
#[derive(Clone, Copy, Debug)]
enum Twist {
    None,
    /// Another amount (the partner disagrees: 200, or 710 against a
    /// waiting half of the same side).
    Amount(u64),
    /// Another sender (300 on a receive half; a send half from someone else).
    Sender(AccountId),
    /// Receiver and expected sender are the same account (410).
    SelfPayment,
}

/// Keys are few, so halves pair, collide and replay; each key has one
/// payment its honest halves agree on (sender, receiver, amount), and a
/// quarter of the halves are twisted.
fn half() -> impl Strategy<Value = Half> {
    const PAYMENTS: [(AccountId, AccountId, u64); 6] = [
        (1, 2, 10),
        (2, 3, 60),
        (3, 1, 100),
        (1, 3, 40),
        (2, 1, 100),
        (3, 2, 30),
    ];
    let twist = prop_oneof![
        12 => Just(Twist::None),
        1 => prop::sample::select(vec![0u64, 2_000, 100, 61]).prop_map(Twist::Amount),
        1 => (1..=ACCOUNTS_END).prop_map(Twist::Sender),
        1 => Just(Twist::SelfPayment),
    ];
    (0..PAYMENTS.len(), any::<bool>(), twist).prop_map(|(key, send, twist)| {
        let (mut sender, mut receiver, mut amount) = PAYMENTS[key];
        match twist {
            Twist::None => {}
            Twist::Amount(other) => amount = other,
            Twist::Sender(other) => sender = other,
            Twist::SelfPayment => receiver = sender,
        }
        let tx_key = TxKey::from_u128(key as u128);
        if send {
            Half::Send(SendHalf {
                tx_key,
                sender_id: sender,
                amount,
                device_os: "ios".into(),
                client_time: 1,
            })
        } else {
            Half::Receive(ReceiveHalf {
                tx_key,
                receiver_id: receiver,
                expected_sender_id: sender,
                expected_amount: amount,
                device_os: "android".into(),
                client_time: 2,
            })
        }
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (half(), prop::bool::weighted(0.05)).prop_map(|(half, wrong_submitter)| Op::Submit {
            half,
            wrong_submitter
        }),
        2 => prop::collection::vec((half(), prop::bool::weighted(0.05)), 1..5)
            .prop_map(|halves| Op::SubmitMany { halves }),
        2 => Just(Op::CommitAll),
        3 => (any::<usize>(), prop::bool::weighted(0.02))
            .prop_map(|(pick, fail)| Op::CommitOne { pick, fail }),
        3 => any::<usize>().prop_map(|pick| Op::Reserve { pick }),
        1 => prop::sample::select(vec![1u64, 100, TTL / 2, TTL + 1])
            .prop_map(|micros| Op::Advance { micros }),
        2 => any::<usize>().prop_map(|pick| Op::LookUp { pick }),
        1 => Just(Op::Restart),
    ]
}

struct World {
    matcher: Matcher<Probe>,
    log: Log,
    now: u64,
    commit: u64,
    /// Effects storage has not answered yet, in the order asked.
    storing: Vec<Stored>,
    /// Reservations the accounts have not answered yet.
    reserving: Vec<(TxKey, AccountId, u64)>,
    /// Keys the matcher asked storage about.
    looking: Vec<TxKey>,
    /// Storage: one outcome per key, the balances, the durable lone halves.
    outcomes: HashMap<TxKey, Arc<Outcome>>,
    balances: HashMap<AccountId, u64>,
    pending: HashMap<TxKey, PendingHalf>,
    /// The account actors' live books.
    books: HashMap<AccountId, AccountBook>,
    /// Keys for which an effect failed (their waiters may hear an error).
    failed: HashSet<TxKey>,
    /// A commit failed: every later one fails too, as the committer
    /// refuses writes after a failed commit until the ledger is reopened
    /// (storage holds what it held, the matcher forgets the failed keys).
    poisoned: bool,
}

impl World {
    fn new() -> World {
        let accounts = 1..ACCOUNTS_END;
        World {
            matcher: Matcher::new(MatcherConfig {
                half_ttl_micros: TTL,
                pending_halves_per_account_max: PENDING_MAX,
            }),
            log: Rc::default(),
            now: 1,
            commit: 0,
            storing: Vec::new(),
            reserving: Vec::new(),
            looking: Vec::new(),
            outcomes: HashMap::new(),
            balances: accounts.clone().map(|a| (a, OPENING_BALANCE)).collect(),
            pending: HashMap::new(),
            books: accounts
                .map(|a| (a, AccountBook::new(a, OPENING_BALANCE, 0)))
                .collect(),
            failed: HashSet::new(),
            poisoned: false,
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Submit {
                half,
                wrong_submitter,
            } => self.submit(half, wrong_submitter),
            Op::SubmitMany { halves } => self.submit_many(halves),
            Op::CommitAll => {
                let batch = std::mem::take(&mut self.storing);
                self.commit_batch(batch, false);
            }
            Op::CommitOne { pick, fail } => {
                if !self.storing.is_empty() {
                    let stored = self.storing.remove(pick % self.storing.len());
                    self.commit_batch(vec![stored], fail);
                }
            }
            Op::Reserve { pick } => {
                if !self.reserving.is_empty() {
                    let (tx_key, sender, amount) =
                        self.reserving.remove(pick % self.reserving.len());
                    let book = self.books.get_mut(&sender).expect("sender's book");
                    let result = book.reserve(amount);
                    let effects =
                        Vec::from_iter(self.matcher.on_reserved(tx_key, sender, amount, result));
                    self.carry_out(effects);
                }
            }
            Op::Advance { micros } => {
                self.now += micros;
                let effects = self.matcher.expire_due(Timestamp(self.now));
                self.carry_out(effects);
            }
            Op::LookUp { pick } => {
                if !self.looking.is_empty() {
                    let tx_key = self.looking.remove(pick % self.looking.len());
                    let outcome = self.outcomes.get(&tx_key).cloned();
                    let effects = Vec::from_iter(self.matcher.on_looked_up(tx_key, outcome));
                    self.carry_out(effects);
                }
            }
            Op::Restart => self.restart(),
        }
        self.check();
    }

    fn submit(&mut self, half: Half, wrong_submitter: bool) {
        let (context, waiter) = self.submission(&half, wrong_submitter);
        let effects = self
            .matcher
            .submit(Timestamp(self.now), &context, half, waiter);
        self.carry_out(effects);
    }

    fn submit_many(&mut self, halves: Vec<(Half, bool)>) {
        let submissions: Vec<_> = halves
            .into_iter()
            .map(|(half, wrong_submitter)| {
                let (context, waiter) = self.submission(&half, wrong_submitter);
                (context, half, waiter)
            })
            .collect();
        let effects = self.matcher.submit_many(Timestamp(self.now), submissions);
        self.carry_out(effects);
    }

    /// Logs a submission of `half`: what it is checked against, and who hears.
    fn submission(&mut self, half: &Half, wrong_submitter: bool) -> (HalfContext, Probe) {
        let id = {
            let mut log = self.log.borrow_mut();
            log.push(Heard {
                half: Some(half.clone()),
                ..Heard::default()
            });
            log.len() - 1
        };
        let party = half.party();
        let context = HalfContext {
            submitter: if wrong_submitter { party + 1 } else { party },
            accounts_end: ACCOUNTS_END,
            max_amount: 1_000,
        };
        let waiter = Probe {
            id,
            log: self.log.clone(),
        };
        (context, waiter)
    }

    fn restart(&mut self) {
        for heard in self.log.borrow_mut().iter_mut() {
            heard.abandoned |= heard.finished.is_none();
        }
        self.storing.clear();
        self.reserving.clear();
        self.looking.clear();
        self.poisoned = false;
        self.matcher = Matcher::new(MatcherConfig {
            half_ttl_micros: TTL,
            pending_halves_per_account_max: PENDING_MAX,
        });
        let mut pending: Vec<_> = self.pending.values().cloned().collect();
        pending.sort_by_key(PendingHalf::tx_key);
        for half in pending {
            self.matcher.restore(half);
        }
        for (account, book) in self.books.iter_mut() {
            *book = AccountBook::new(*account, self.balances[account], self.commit);
        }
    }

    /// Carries out effects the matcher asked for: storage and reservations
    /// are queued (answered by later steps); moves of live money happen now,
    /// as the actors do before the answers that come with them go out.
    fn carry_out(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::LookUp { tx_key } => self.looking.push(tx_key),
                Effect::StorePending(half) => self.storing.push(Stored::Pending(half)),
                Effect::Decide { decision, reserved } => {
                    if let Some((account, amount)) = reserved {
                        assert!(
                            self.books[&account].reserved() >= amount,
                            "a decision holds a reservation its account does not"
                        );
                    }
                    self.storing.push(Stored::Decide { decision, reserved });
                }
                Effect::Reserve {
                    tx_key,
                    sender,
                    amount,
                } => {
                    // A replayed key storage decided is answered from
                    // storage: no money is held for it, however briefly.
                    assert!(
                        !self.outcomes.contains_key(&tx_key),
                        "a reservation for {tx_key}, decided already"
                    );
                    self.reserving.push((tx_key, sender, amount))
                }
                Effect::Debit {
                    account,
                    amount,
                    commit,
                } => self.book(account).debit(amount, commit),
                Effect::Credit {
                    account,
                    amount,
                    commit,
                } => {
                    assert!(self.book(account).credit(amount, commit), "credit applied");
                }
                Effect::Release { account, amount } => self.book(account).release(amount),
            }
        }
    }

    fn book(&mut self, account: AccountId) -> &mut AccountBook {
        self.books.get_mut(&account).expect("known account")
    }

    /// One commit holding `batch`, applied in order as `Store::commit_batch`
    /// does, or failed as a whole.
    fn commit_batch(&mut self, batch: Vec<Stored>, fail: bool) {
        if batch.is_empty() {
            return;
        }
        self.commit += 1;
        let commit = self.commit;
        self.poisoned |= fail;
        let mut results = Vec::with_capacity(batch.len());
        let mut decided_in_batch = HashSet::new();
        for stored in &batch {
            let result = if self.poisoned {
                self.failed.insert(stored.tx_key());
                Err(FAILED)
            } else {
                Ok(self.apply(stored, &mut decided_in_batch))
            };
            results.push(result);
        }
        for (stored, result) in batch.into_iter().zip(results) {
            let (effects, answers) = self.matcher.on_committed(
                stored.tx_key(),
                stored.persisted(),
                Some(commit),
                result,
            );
            self.carry_out(effects);
            answers.deliver();
        }
    }

    fn apply(&mut self, stored: &Stored, decided_in_batch: &mut HashSet<TxKey>) -> Committed {
        let tx_key = stored.tx_key();
        match stored {
            Stored::Pending(_) if decided_in_batch.contains(&tx_key) => Committed::PendingSkipped,
            _ if self.outcomes.contains_key(&tx_key) => {
                Committed::AlreadyFinal(self.outcomes[&tx_key].clone())
            }
            Stored::Pending(half) => {
                assert!(
                    self.pending.insert(tx_key, half.clone()).is_none(),
                    "{tx_key} pending twice"
                );
                Committed::PendingStored
            }
            Stored::Decide { decision, .. } => {
                let outcome = Arc::new(self.decide(decision));
                self.outcomes.insert(tx_key, outcome.clone());
                self.pending.remove(&tx_key);
                decided_in_batch.insert(tx_key);
                Committed::Decided(outcome)
            }
        }
    }

    fn decide(&mut self, decision: &Decision) -> Outcome {
        let now = Timestamp(self.now);
        match decision {
            Decision::Settle { send, receive } => {
                let (sender, receiver, amount) = (
                    send.half.sender_id,
                    receive.half.receiver_id,
                    send.half.amount,
                );
                assert_eq!(send.half.tx_key, receive.half.tx_key);
                assert_eq!(receive.half.expected_sender_id, sender);
                assert_eq!(receive.half.expected_amount, amount);
                assert_ne!(sender, receiver, "a self-payment settled");
                let sender_before = self.balances[&sender];
                let receiver_before = self.balances[&receiver];
                assert!(
                    sender_before >= amount,
                    "settlement of {amount} from {sender} holding {sender_before}"
                );
                self.balances.insert(sender, sender_before - amount);
                self.balances.insert(receiver, receiver_before + amount);
                Outcome::Settled(Settlement {
                    send: send.clone(),
                    receive: receive.clone(),
                    sender_balance_before: sender_before,
                    receiver_balance_before: receiver_before,
                    settled_at: now,
                })
            }
            Decision::Reject {
                tx_key,
                code,
                send,
                receive,
                sender_balance,
            } => {
                assert!(
                    code.is_payment_outcome(),
                    "recorded a half-only code {code}"
                );
                Outcome::Rejected(Rejection {
                    tx_key: *tx_key,
                    code: *code,
                    send: send.clone(),
                    receive: receive.clone(),
                    sender_balance: *sender_balance,
                    decided_at: now,
                })
            }
        }
    }

    /// What must hold after every step.
    fn check(&self) {
        // Refusals come from submissions and lookups, never from a commit:
        // storage now is storage as it was when they were given.
        for heard in self.log.borrow_mut().iter_mut() {
            if let (false, Some(Ok(Resolution::Refused(code)))) = (heard.checked, &heard.finished) {
                let tx_key = heard.half.as_ref().expect("submitted half").tx_key();
                if matches!(
                    code,
                    RejectCode::ConflictingHalf | RejectCode::TooManyPending
                ) {
                    assert!(
                        !self.outcomes.contains_key(&tx_key),
                        "{code} for a half of {tx_key}, which storage decided"
                    );
                }
            }
            heard.checked |= heard.finished.is_some();
        }
        for (id, heard) in self.log.borrow().iter().enumerate() {
            let half = heard.half.as_ref().expect("submitted half");
            let tx_key = half.tx_key();
            match &heard.finished {
                None => {}
                Some(Ok(Resolution::Final(outcome))) => {
                    assert_eq!(
                        Some(outcome),
                        self.outcomes.get(&tx_key),
                        "submission {id} heard an outcome storage does not hold"
                    );
                    assert!(outcome.recorded(half), "{id} heard another half's outcome");
                }
                Some(Ok(Resolution::Refused(RejectCode::TxKeyAlreadyUsed))) => {
                    let outcome = self.outcomes.get(&tx_key).expect("700 for a decided key");
                    assert!(!outcome.recorded(half), "700 for the recorded half");
                }
                Some(Ok(Resolution::Refused(code))) => assert!(
                    !code.is_payment_outcome() || *code == RejectCode::SelfPayment,
                    "submission {id} refused with a payment outcome {code}"
                ),
                Some(Err(error)) => {
                    assert_eq!(*error, FAILED);
                    assert!(self.failed.contains(&tx_key), "an error nobody injected");
                }
            }
        }
        // Live books apply every commit's moves before its answers go out.
        for (account, book) in &self.books {
            assert_eq!(
                book.balance(),
                self.balances[account],
                "account {account}: live balance differs from storage"
            );
        }
        let stored: u64 = self.balances.values().sum();
        assert_eq!(
            stored,
            OPENING_BALANCE * (ACCOUNTS_END - 1),
            "money created"
        );
    }

    /// Answers everything, lets every deadline pass, and checks that nothing
    /// is left behind.
    fn settle_down(&mut self) {
        for _ in 0..64 {
            if self.storing.is_empty() && self.reserving.is_empty() && self.looking.is_empty() {
                if self.matcher.keys_in_flight() == 0 {
                    break;
                }
                // Nothing is on its way: whoever still waits has a lone
                // half, and was told it is durably pending.
                for (id, heard) in self.log.borrow().iter().enumerate() {
                    assert!(
                        heard.finished.is_some() || heard.abandoned || heard.accepted > 0,
                        "submission {id} waits for a partner but was never written pending"
                    );
                }
                self.step(Op::Advance { micros: TTL + 1 });
            }
            while !self.looking.is_empty() {
                self.step(Op::LookUp { pick: 0 });
            }
            while !self.reserving.is_empty() {
                self.step(Op::Reserve { pick: 0 });
            }
            self.step(Op::CommitAll);
        }
        assert_eq!(self.matcher.keys_in_flight(), 0, "keys left in flight");
        assert_eq!(self.matcher.lone_halves(), 0);
        assert_eq!(self.matcher.next_deadline(), None);
        for (id, heard) in self.log.borrow().iter().enumerate() {
            assert!(
                heard.finished.is_some() || heard.abandoned,
                "submission {id} never answered"
            );
        }
        for (account, book) in &self.books {
            assert_eq!(book.reserved(), 0, "account {account} still reserves");
        }
        // Nothing counts against the per-account cap any more: every
        // account may leave its full allowance of new lone halves.
        let mut fresh = 1_000;
        for account in 1..ACCOUNTS_END {
            for _ in 0..PENDING_MAX {
                fresh += 1;
                self.submit(
                    Half::Send(SendHalf {
                        tx_key: TxKey::from_u128(fresh),
                        sender_id: account,
                        amount: 1,
                        device_os: "ios".into(),
                        client_time: 1,
                    }),
                    false,
                );
            }
        }
        assert_eq!(
            self.storing.len(),
            (PENDING_MAX as usize) * (ACCOUNTS_END as usize - 1),
            "lone halves still counted against their accounts"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // An integration test has no source file proptest could keep
        // regressions beside; a failure prints its shrunk operations.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_matcher_keeps_its_promises_under_any_order(ops in prop::collection::vec(op(), 1..80)) {
        let mut world = World::new();
        for op in ops {
            world.step(op);
        }
        world.settle_down();
    }
}

/// The model itself can fail: a storage that lost the sender's money between
/// reservation and commit trips the balance check (so the check is live).
#[test]
#[should_panic(expected = "settlement of 60 from 1 holding 0")]
fn the_model_catches_a_settlement_storage_cannot_cover() {
    let mut world = World::new();
    let key = TxKey::from_u128(9);
    world.step(Op::Submit {
        half: Half::Send(SendHalf {
            tx_key: key,
            sender_id: 1,
            amount: 60,
            device_os: "ios".into(),
            client_time: 1,
        }),
        wrong_submitter: false,
    });
    world.step(Op::Submit {
        half: Half::Receive(ReceiveHalf {
            tx_key: key,
            receiver_id: 2,
            expected_sender_id: 1,
            expected_amount: 60,
            device_os: "android".into(),
            client_time: 2,
        }),
        wrong_submitter: false,
    });
    world.step(Op::LookUp { pick: 0 });
    world.step(Op::Reserve { pick: 0 });
    world.balances.insert(1, 0);
    world.step(Op::CommitAll);
}
