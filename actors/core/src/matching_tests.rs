//! Unit tests of the matcher state machine with recording waiters: every
//! effect and every answer is checked without a runtime or storage.

use std::cell::RefCell;
use std::rc::Rc;

use tapledger_protocol::{Rejection, Settlement};

use super::*;

type Entry = (u32, &'static str, Option<Result<Resolution, &'static str>>);
type Log = Rc<RefCell<Vec<Entry>>>;

/// A waiter that writes what it hears into a shared log under its id.
struct Recorder {
    id: u32,
    log: Log,
}

impl Waiter for Recorder {
    type Error = &'static str;
    fn accepted(&mut self) {
        self.log.borrow_mut().push((self.id, "accepted", None));
    }
    fn finish(self, result: Result<Resolution, &'static str>) {
        self.log
            .borrow_mut()
            .push((self.id, "finish", Some(result)));
    }
}

struct Harness {
    matcher: Matcher<Recorder>,
    log: Log,
}

const TTL: u64 = 1_000;
const KEY: TxKey = TxKey::from_u128(42);

impl Harness {
    fn new() -> Harness {
        Harness {
            matcher: Matcher::new(MatcherConfig {
                half_ttl_micros: TTL,
                pending_halves_per_account_max: 3,
            }),
            log: Rc::new(RefCell::new(Vec::new())),
        }
    }

    fn submit(&mut self, id: u32, now: u64, half: Half) -> Vec<Effect> {
        let context = HalfContext {
            submitter: half.party(),
            accounts_end: 100,
            max_amount: 1_000,
        };
        let waiter = Recorder {
            id,
            log: self.log.clone(),
        };
        let effects = self.matcher.submit(Timestamp(now), &context, half, waiter);
        self.look_up(effects)
    }

    /// Answers every lookup among `effects` as an empty storage would (no
    /// key decided), in place, as the actor does.
    fn look_up(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        let mut done = Vec::new();
        for effect in effects {
            match effect {
                Effect::LookUp { tx_key } => {
                    let more = Vec::from_iter(self.matcher.on_looked_up(tx_key, None));
                    done.extend(self.look_up(more));
                }
                other => done.push(other),
            }
        }
        done
    }

    /// Feeds a commit result and delivers its answers after its effects, as
    /// the actor does.
    fn committed(
        &mut self,
        tx_key: TxKey,
        persisted: Persisted,
        commit: u64,
        result: Result<Committed, &'static str>,
    ) -> Vec<Effect> {
        let (effects, answers) = self
            .matcher
            .on_committed(tx_key, persisted, Some(commit), result);
        answers.deliver();
        effects
    }

    fn take_log(&self) -> Vec<Entry> {
        std::mem::take(&mut *self.log.borrow_mut())
    }
}

fn send_half(key: TxKey, sender: AccountId, amount: u64) -> Half {
    Half::Send(SendHalf {
        tx_key: key,
        sender_id: sender,
        amount,
        device_os: "ios".into(),
        client_time: 1,
    })
}

fn receive_half(key: TxKey, receiver: AccountId, expected_sender: AccountId, amount: u64) -> Half {
    Half::Receive(ReceiveHalf {
        tx_key: key,
        receiver_id: receiver,
        expected_sender_id: expected_sender,
        expected_amount: amount,
        device_os: "android".into(),
        client_time: 2,
    })
}

fn settled(effect: &Effect) -> Arc<Outcome> {
    let Effect::Decide {
        decision: Decision::Settle { send, receive },
        ..
    } = effect
    else {
        panic!("expected a settle decision, got {effect:?}");
    };
    Arc::new(Outcome::Settled(Settlement {
        send: send.clone(),
        receive: receive.clone(),
        sender_balance_before: 500,
        receiver_balance_before: 0,
        settled_at: Timestamp(99),
    }))
}

fn rejected(effect: &Effect) -> Arc<Outcome> {
    let Effect::Decide {
        decision:
            Decision::Reject {
                tx_key,
                code,
                send,
                receive,
                sender_balance,
            },
        ..
    } = effect
    else {
        panic!("expected a reject decision, got {effect:?}");
    };
    Arc::new(Outcome::Rejected(Rejection {
        tx_key: *tx_key,
        code: *code,
        send: send.clone(),
        receive: receive.clone(),
        sender_balance: *sender_balance,
        decided_at: Timestamp(99),
    }))
}

#[test]
fn agreeing_halves_reserve_then_settle_and_both_phones_hear() {
    let mut harness = Harness::new();
    let effects = harness.submit(1, 10, send_half(KEY, 1, 50));
    assert!(matches!(
        &effects[..],
        [Effect::StorePending(PendingHalf::Send(_))]
    ));
    harness.committed(
        KEY,
        Persisted::Pending(Side::Send),
        1,
        Ok(Committed::PendingStored),
    );
    assert_eq!(harness.take_log(), vec![(1, "accepted", None)]);

    let effects = harness.submit(2, 20, receive_half(KEY, 2, 1, 50));
    assert_eq!(
        effects,
        vec![Effect::Reserve {
            tx_key: KEY,
            sender: 1,
            amount: 50
        }]
    );
    let effects = Vec::from_iter(harness.matcher.on_reserved(KEY, 1, 50, Ok(())));
    assert_eq!(effects.len(), 1);
    let outcome = settled(&effects[0]);
    let effects = harness.committed(
        KEY,
        Persisted::Decision {
            reserved: Some((1, 50)),
        },
        2,
        Ok(Committed::Decided(outcome.clone())),
    );
    assert_eq!(
        effects,
        vec![
            Effect::Debit {
                account: 1,
                amount: 50,
                commit: 2
            },
            Effect::Credit {
                account: 2,
                amount: 50,
                commit: 2
            }
        ]
    );
    let log = harness.take_log();
    assert_eq!(log.len(), 2);
    for (_, kind, result) in log {
        assert_eq!(kind, "finish");
        assert_eq!(result.unwrap().unwrap(), Resolution::Final(outcome.clone()));
    }
    assert_eq!(harness.matcher.keys_in_flight(), 0);
    assert_eq!(harness.matcher.lone_halves(), 0);
}

#[test]
fn receive_half_first_then_send_half_pairs_the_same_way() {
    let mut harness = Harness::new();
    harness.submit(1, 10, receive_half(KEY, 2, 1, 50));
    let effects = harness.submit(2, 11, send_half(KEY, 1, 50));
    assert_eq!(
        effects,
        vec![Effect::Reserve {
            tx_key: KEY,
            sender: 1,
            amount: 50
        }]
    );
}

#[test]
fn concurrent_unrelated_payments_do_not_touch_each_other() {
    // Prototype bug: mismatch checks ran across unrelated halves (s1 s2 r2 r1).
    let mut harness = Harness::new();
    let (key1, key2) = (TxKey::from_u128(1), TxKey::from_u128(2));
    harness.submit(1, 1, send_half(key1, 1, 10));
    harness.submit(2, 2, send_half(key2, 3, 20));
    let effects = harness.submit(3, 3, receive_half(key2, 4, 3, 20));
    assert_eq!(
        effects,
        vec![Effect::Reserve {
            tx_key: key2,
            sender: 3,
            amount: 20
        }]
    );
    let effects = harness.submit(4, 4, receive_half(key1, 2, 1, 10));
    assert_eq!(
        effects,
        vec![Effect::Reserve {
            tx_key: key1,
            sender: 1,
            amount: 10
        }]
    );
    assert!(
        harness.take_log().is_empty(),
        "nobody was answered or refused"
    );
}

#[test]
fn mismatching_halves_are_rejected_without_reservation() {
    let mut harness = Harness::new();
    harness.submit(1, 1, send_half(KEY, 1, 50));
    let effects = harness.submit(2, 2, receive_half(KEY, 2, 1, 60));
    let outcome = rejected(&effects[0]);
    assert_eq!(outcome.code(), Some(RejectCode::AmountMismatch));
    let effects = harness.committed(
        KEY,
        Persisted::Decision { reserved: None },
        1,
        Ok(Committed::Decided(outcome.clone())),
    );
    assert!(effects.is_empty(), "no money to release or move");
    assert_eq!(harness.take_log().len(), 2);
}

#[test]
fn insufficient_funds_records_the_senders_available_balance() {
    let mut harness = Harness::new();
    harness.submit(1, 1, send_half(KEY, 1, 50));
    harness.submit(2, 2, receive_half(KEY, 2, 1, 50));
    let effects = Vec::from_iter(harness.matcher.on_reserved(KEY, 1, 50, Err(49)));
    let outcome = rejected(&effects[0]);
    assert_eq!(outcome.code(), Some(RejectCode::InsufficientFunds));
    let Outcome::Rejected(rejection) = &*outcome else {
        unreachable!()
    };
    assert_eq!(rejection.sender_balance, Some(49));
}

#[test]
fn identical_resubmission_joins_and_conflicting_one_is_refused() {
    let mut harness = Harness::new();
    harness.submit(1, 1, send_half(KEY, 1, 50));
    assert!(harness.submit(2, 2, send_half(KEY, 1, 50)).is_empty());
    assert!(harness.submit(3, 3, send_half(KEY, 1, 51)).is_empty());
    assert_eq!(
        harness.take_log(),
        vec![(
            3,
            "finish",
            Some(Ok(Resolution::Refused(RejectCode::ConflictingHalf)))
        )]
    );
    harness.committed(
        KEY,
        Persisted::Pending(Side::Send),
        1,
        Ok(Committed::PendingStored),
    );
    assert_eq!(
        harness.take_log(),
        vec![(1, "accepted", None), (2, "accepted", None)]
    );
    // Once durable, a further identical half is accepted at once.
    harness.submit(4, 4, send_half(KEY, 1, 50));
    assert_eq!(harness.take_log(), vec![(4, "accepted", None)]);
}

#[test]
fn lone_half_expires_at_node_time_deadline() {
    let mut harness = Harness::new();
    harness.submit(1, 100, receive_half(KEY, 2, 1, 50));
    assert_eq!(harness.matcher.next_deadline(), Some(Timestamp(100 + TTL)));
    assert!(
        harness
            .matcher
            .expire_due(Timestamp(100 + TTL - 1))
            .is_empty()
    );
    let effects = harness.matcher.expire_due(Timestamp(100 + TTL));
    let outcome = rejected(&effects[0]);
    assert_eq!(outcome.code(), Some(RejectCode::Expired));
    let Outcome::Rejected(rejection) = &*outcome else {
        unreachable!()
    };
    // Prototype bug: a timed-out receive half was recorded with the parties swapped.
    assert!(rejection.send.is_none());
    assert_eq!(rejection.receive.as_ref().unwrap().half.receiver_id, 2);
    // The partner arriving while the expiry is being written waits for it:
    // until storage has it, nothing says the key is decided.
    harness.submit(2, 100 + TTL + 1, send_half(KEY, 1, 50));
    assert_eq!(harness.take_log(), vec![]);
    harness.committed(
        KEY,
        Persisted::Decision { reserved: None },
        3,
        Ok(Committed::Decided(outcome.clone())),
    );
    assert_eq!(
        harness.take_log(),
        vec![
            (1, "finish", Some(Ok(Resolution::Final(outcome)))),
            (
                2,
                "finish",
                Some(Ok(Resolution::Refused(RejectCode::TxKeyAlreadyUsed)))
            ),
        ]
    );
    assert_eq!(harness.matcher.next_deadline(), None);
}

#[test]
fn a_partner_waiting_on_an_expiry_that_never_commits_is_not_told_700() {
    // A leader cut off from its quorum expires a lone half but cannot commit
    // the expiry; the next leader may settle the key with this very partner.
    // The partner that reached the old leader must hear the failure (and
    // retry elsewhere), never "already decided".
    let mut harness = Harness::new();
    harness.submit(1, 100, receive_half(KEY, 2, 1, 50));
    harness.matcher.expire_due(Timestamp(100 + TTL));
    harness.submit(2, 100 + TTL + 1, send_half(KEY, 1, 50));
    harness.committed(
        KEY,
        Persisted::Decision { reserved: None },
        0,
        Err("not the leader"),
    );
    let log = harness.take_log();
    assert_eq!(log.len(), 2, "{log:?}");
    for (_, what, result) in log {
        assert_eq!(what, "finish");
        assert!(matches!(result, Some(Err(_))), "{result:?}");
    }
    assert_eq!(harness.matcher.keys_in_flight(), 0);
}

#[test]
fn paired_halves_do_not_expire() {
    let mut harness = Harness::new();
    harness.submit(1, 0, send_half(KEY, 1, 50));
    harness.submit(2, 1, receive_half(KEY, 2, 1, 50));
    assert!(harness.matcher.expire_due(Timestamp(10 * TTL)).is_empty());
}

#[test]
fn replay_of_a_decided_key_returns_the_outcome_or_700() {
    let mut harness = Harness::new();
    harness.submit(1, 0, send_half(KEY, 1, 50));
    harness.submit(2, 1, receive_half(KEY, 2, 1, 50));
    let effects = Vec::from_iter(harness.matcher.on_reserved(KEY, 1, 50, Ok(())));
    let outcome = settled(&effects[0]);
    harness.committed(
        KEY,
        Persisted::Decision {
            reserved: Some((1, 50)),
        },
        2,
        Ok(Committed::Decided(outcome.clone())),
    );
    harness.take_log();
    // Prototype bug: replaying both halves moved the money again.
    assert!(harness.submit(3, 5, send_half(KEY, 1, 50)).is_empty());
    assert!(harness.submit(4, 5, receive_half(KEY, 2, 1, 50)).is_empty());
    assert!(harness.submit(5, 5, send_half(KEY, 1, 49)).is_empty());
    assert_eq!(
        harness.take_log(),
        vec![
            (3, "finish", Some(Ok(Resolution::Final(outcome.clone())))),
            (4, "finish", Some(Ok(Resolution::Final(outcome)))),
            (
                5,
                "finish",
                Some(Ok(Resolution::Refused(RejectCode::TxKeyAlreadyUsed)))
            ),
        ]
    );
}

#[test]
fn resubmitted_halves_of_a_key_decided_before_a_restart_reserve_nothing() {
    // A new leader (or a restarted node) remembers no recent outcome. Phones
    // resubmit both halves of a payment the previous leader settled: they must
    // hear that outcome, and the sender's money must not be reserved for it
    // even briefly (a concurrent honest payment would be refused 100).
    let mut harness = Harness::new();
    let Half::Send(send) = send_half(KEY, 1, 50) else {
        unreachable!()
    };
    let Half::Receive(receive) = receive_half(KEY, 2, 1, 50) else {
        unreachable!()
    };
    let stored = Arc::new(Outcome::Settled(Settlement {
        send: Stamped {
            half: send,
            received_at: Timestamp(0),
        },
        receive: Stamped {
            half: receive,
            received_at: Timestamp(0),
        },
        sender_balance_before: 500,
        receiver_balance_before: 0,
        settled_at: Timestamp(1),
    }));
    let context = |party| HalfContext {
        submitter: party,
        accounts_end: 100,
        max_amount: 1_000,
    };
    let first = harness.matcher.submit(
        Timestamp(5),
        &context(1),
        send_half(KEY, 1, 50),
        Recorder {
            id: 1,
            log: harness.log.clone(),
        },
    );
    // A first half under the cap needs no lookup.
    assert!(matches!(first[..], [Effect::StorePending(_)]), "{first:?}");
    let second = harness.matcher.submit(
        Timestamp(6),
        &context(2),
        receive_half(KEY, 2, 1, 50),
        Recorder {
            id: 2,
            log: harness.log.clone(),
        },
    );
    assert_eq!(second, vec![Effect::LookUp { tx_key: KEY }]);
    assert!(
        harness.take_log().is_empty(),
        "nobody hears before the lookup"
    );
    let second = harness.matcher.on_looked_up(KEY, Some(stored.clone()));
    assert!(second.is_none(), "no reservation, no decision: {second:?}");
    let mut log = harness.take_log();
    log.sort_by_key(|entry| entry.0);
    assert_eq!(
        log,
        vec![
            (1, "finish", Some(Ok(Resolution::Final(stored.clone())))),
            (2, "finish", Some(Ok(Resolution::Final(stored.clone())))),
        ]
    );
    // The lone half's commit comes back as the older outcome: nothing more.
    let effects = harness.committed(
        KEY,
        Persisted::Pending(Side::Send),
        3,
        Ok(Committed::AlreadyFinal(stored)),
    );
    assert!(effects.is_empty());
    assert!(harness.take_log().is_empty());
    assert_eq!(harness.matcher.keys_in_flight(), 0);
}

#[test]
fn after_a_restart_the_recorded_half_hears_its_outcome_though_a_stranger_waits_first() {
    // A new leader knows nothing of a key the old one settled. A conflicting
    // send half arrives first and waits (its write will find the outcome);
    // the recorded send half then arrives: it must hear the settlement, not
    // 710 for conflicting with the stranger.
    let mut harness = Harness::new();
    let recorded = send_half(KEY, 1, 50);
    let Half::Send(send) = recorded.clone() else {
        unreachable!()
    };
    let Half::Receive(receive) = receive_half(KEY, 2, 1, 50) else {
        unreachable!()
    };
    let stored = Arc::new(Outcome::Settled(Settlement {
        send: Stamped {
            half: send,
            received_at: Timestamp(0),
        },
        receive: Stamped {
            half: receive,
            received_at: Timestamp(0),
        },
        sender_balance_before: 500,
        receiver_balance_before: 0,
        settled_at: Timestamp(1),
    }));
    harness.submit(1, 5, send_half(KEY, 1, 49));
    let context = HalfContext {
        submitter: 1,
        accounts_end: 100,
        max_amount: 1_000,
    };
    let effects = harness.matcher.submit(
        Timestamp(6),
        &context,
        recorded,
        Recorder {
            id: 2,
            log: harness.log.clone(),
        },
    );
    assert_eq!(effects, vec![Effect::LookUp { tx_key: KEY }]);
    assert!(
        harness
            .matcher
            .on_looked_up(KEY, Some(stored.clone()))
            .is_none()
    );
    assert_eq!(
        harness.take_log(),
        vec![(2, "finish", Some(Ok(Resolution::Final(stored.clone()))))]
    );
    // The stranger's write finds the outcome: 700 for it.
    harness.committed(
        KEY,
        Persisted::Pending(Side::Send),
        3,
        Ok(Committed::AlreadyFinal(stored)),
    );
    assert_eq!(
        harness.take_log(),
        vec![(
            1,
            "finish",
            Some(Ok(Resolution::Refused(RejectCode::TxKeyAlreadyUsed)))
        )]
    );
}

#[test]
fn storage_reporting_an_older_outcome_releases_the_reservation() {
    let mut harness = Harness::new();
    harness.submit(1, 0, send_half(KEY, 1, 50));
    harness.submit(2, 1, receive_half(KEY, 2, 1, 50));
    let effects = Vec::from_iter(harness.matcher.on_reserved(KEY, 1, 50, Ok(())));
    let older = settled(&effects[0]);
    let effects = harness.committed(
        KEY,
        Persisted::Decision {
            reserved: Some((1, 50)),
        },
        2,
        Ok(Committed::AlreadyFinal(older)),
    );
    assert_eq!(
        effects,
        vec![Effect::Release {
            account: 1,
            amount: 50
        }]
    );
}

#[test]
fn reservation_answered_after_key_resolved_is_released() {
    let mut harness = Harness::new();
    harness.submit(1, 0, send_half(KEY, 1, 50));
    harness.submit(2, 1, receive_half(KEY, 2, 1, 50));
    let error = "closed";
    harness.committed(KEY, Persisted::Pending(Side::Send), 1, Err(error));
    assert_eq!(
        harness.take_log().len(),
        2,
        "both submitters hear the failure"
    );
    let effects = Vec::from_iter(harness.matcher.on_reserved(KEY, 1, 50, Ok(())));
    assert_eq!(
        effects,
        vec![Effect::Release {
            account: 1,
            amount: 50
        }]
    );
}

#[test]
fn pending_cap_per_account_refuses_extra_lone_halves() {
    let mut harness = Harness::new();
    for key in 1..=3 {
        assert_eq!(
            harness
                .submit(key as u32, 0, send_half(TxKey::from_u128(key), 1, 5))
                .len(),
            1
        );
    }
    assert!(
        harness
            .submit(9, 0, send_half(TxKey::from_u128(9), 1, 5))
            .is_empty()
    );
    assert_eq!(
        harness.take_log(),
        vec![(
            9,
            "finish",
            Some(Ok(Resolution::Refused(RejectCode::TooManyPending)))
        )]
    );
    // Pairing one frees a slot.
    harness.submit(10, 0, receive_half(TxKey::from_u128(1), 2, 1, 5));
    assert_eq!(
        harness
            .submit(11, 0, send_half(TxKey::from_u128(11), 1, 5))
            .len(),
        1
    );
}

#[test]
fn restored_half_keeps_its_original_deadline() {
    let mut harness = Harness::new();
    let stamped = Stamped {
        half: SendHalf {
            tx_key: KEY,
            sender_id: 1,
            amount: 5,
            device_os: "ios".into(),
            client_time: 1,
        },
        received_at: Timestamp(7),
    };
    harness.matcher.restore(PendingHalf::Send(stamped));
    assert_eq!(harness.matcher.next_deadline(), Some(Timestamp(7 + TTL)));
    // Its identical resubmission is accepted at once: it is already durable.
    harness.submit(1, 8, send_half(KEY, 1, 5));
    assert_eq!(harness.take_log(), vec![(1, "accepted", None)]);
}

#[test]
fn answers_wait_until_the_effects_are_out() {
    let mut harness = Harness::new();
    harness.submit(1, 0, send_half(KEY, 1, 50));
    harness.submit(2, 1, receive_half(KEY, 2, 1, 50));
    let effects = Vec::from_iter(harness.matcher.on_reserved(KEY, 1, 50, Ok(())));
    let outcome = settled(&effects[0]);
    let (effects, answers) = harness.matcher.on_committed(
        KEY,
        Persisted::Decision {
            reserved: Some((1, 50)),
        },
        Some(2),
        Ok(Committed::Decided(outcome)),
    );
    assert_eq!(effects.len(), 2, "debit and credit");
    assert!(
        harness.take_log().is_empty(),
        "nobody heard before the credit went out"
    );
    answers.deliver();
    assert_eq!(harness.take_log().len(), 2);
}

#[test]
fn replay_at_the_pending_cap_is_answered_from_storage_not_800() {
    let mut harness = Harness::new();
    for key in 1..=3 {
        harness.submit(key as u32, 0, send_half(TxKey::from_u128(key), 1, 5));
    }
    let old_key = TxKey::from_u128(99);
    let half = send_half(old_key, 1, 5);
    let Half::Send(recorded) = half.clone() else {
        unreachable!()
    };
    let stored = Arc::new(Outcome::Rejected(Rejection {
        tx_key: old_key,
        code: RejectCode::Expired,
        send: Some(Stamped {
            half: recorded,
            received_at: Timestamp(0),
        }),
        receive: None,
        sender_balance: None,
        decided_at: Timestamp(1),
    }));
    let context = HalfContext {
        submitter: 1,
        accounts_end: 100,
        max_amount: 1_000,
    };
    let waiter = Recorder {
        id: 7,
        log: harness.log.clone(),
    };
    let effects = harness.matcher.submit(Timestamp(5), &context, half, waiter);
    assert_eq!(effects, vec![Effect::LookUp { tx_key: old_key }]);
    assert!(
        harness
            .matcher
            .on_looked_up(old_key, Some(stored.clone()))
            .is_none()
    );
    assert_eq!(
        harness.take_log(),
        vec![(7, "finish", Some(Ok(Resolution::Final(stored.clone()))))]
    );
    // Remembered: the next replay needs no lookup.
    let waiter = Recorder {
        id: 8,
        log: harness.log.clone(),
    };
    let replay = send_half(old_key, 1, 5);
    assert!(
        harness
            .matcher
            .submit(Timestamp(6), &context, replay, waiter)
            .is_empty()
    );
    assert_eq!(
        harness.take_log(),
        vec![(8, "finish", Some(Ok(Resolution::Final(stored))))]
    );
}

#[test]
fn a_pair_checking_storage_and_a_conflicting_half_share_one_lookup() {
    let mut harness = Harness::new();
    harness.submit(1, 0, send_half(KEY, 1, 50));
    let context = |party| HalfContext {
        submitter: party,
        accounts_end: 100,
        max_amount: 1_000,
    };
    let recorder = |id| Recorder {
        id,
        log: harness.log.clone(),
    };
    let (second, third) = (recorder(2), recorder(3));
    let effects = harness.matcher.submit(
        Timestamp(1),
        &context(2),
        receive_half(KEY, 2, 1, 50),
        second,
    );
    assert_eq!(effects, vec![Effect::LookUp { tx_key: KEY }]);
    // While storage is asked, a conflicting send half: no second lookup.
    let effects = harness
        .matcher
        .submit(Timestamp(2), &context(1), send_half(KEY, 1, 51), third);
    assert!(effects.is_empty(), "{effects:?}");
    // Not decided: the conflicting half hears 710, the pair reserves.
    let effects = Vec::from_iter(harness.matcher.on_looked_up(KEY, None));
    assert_eq!(
        effects,
        vec![Effect::Reserve {
            tx_key: KEY,
            sender: 1,
            amount: 50
        }]
    );
    assert_eq!(
        harness.take_log(),
        vec![(
            3,
            "finish",
            Some(Ok(Resolution::Refused(RejectCode::ConflictingHalf)))
        )]
    );
    assert_eq!(harness.matcher.keys_in_flight(), 1);
}

#[test]
fn a_pair_meeting_in_one_batch_writes_nothing_pending_and_a_lone_half_is_written_last() {
    let mut harness = Harness::new();
    let lone = TxKey::from_u128(7);
    let context = |half: &Half| HalfContext {
        submitter: half.party(),
        accounts_end: 100,
        max_amount: 1_000,
    };
    let halves = [
        send_half(KEY, 1, 50),
        send_half(lone, 3, 5),
        receive_half(KEY, 2, 1, 50),
    ];
    let batch: Vec<_> = halves
        .into_iter()
        .enumerate()
        .map(|(id, half)| {
            let waiter = Recorder {
                id: id as u32,
                log: harness.log.clone(),
            };
            (context(&half), half, waiter)
        })
        .collect();
    let effects = harness.matcher.submit_many(Timestamp(10), batch);
    // The pair asks storage about its key; the lone half is written
    // pending after everything the batch asked for.
    assert!(
        matches!(
            effects.as_slice(),
            [
                Effect::LookUp { tx_key },
                Effect::StorePending(PendingHalf::Send(stamped)),
            ] if *tx_key == KEY && stamped.half.tx_key == lone
        ),
        "{effects:?}"
    );
    assert_eq!(harness.matcher.lone_halves(), 1);
    // The pair goes on to its reservation as if its halves came one by one.
    let effects = harness.look_up(vec![Effect::LookUp { tx_key: KEY }]);
    assert!(
        matches!(
            effects.as_slice(),
            [Effect::Reserve { tx_key, sender: 1, amount: 50 }] if *tx_key == KEY
        ),
        "{effects:?}"
    );
    assert!(harness.take_log().is_empty(), "nobody hears anything yet");
}
