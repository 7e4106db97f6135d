//! Concurrency tests: thousands of payments submitted at once from many tasks,
//! halves in random order, with deliberate races for one account's money.
//!
//! The ledger may interleave concurrent payments in any order, so these tests
//! do not predict which regular payment wins a race for money; they check what
//! must hold for every order: each submission resolves, both halves of a key
//! hear the same outcome and it is the stored one, no key has two outcomes,
//! balances equal opening balances plus what settled, nobody is overdrawn,
//! the audit passes (before and after a restart), and where the race has only
//! one answer (an account that only pays, in equal amounts) exactly
//! `balance / amount` payments settle.
//!
//! The workload is drawn from a seeded generator; set `CONCURRENCY_SEED` to
//! replay one (the seed is printed on failure).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};
use tapledger_actors::{JournalEntry, Ledger, LedgerConfig, Resolution};
use tapledger_protocol::{AccountId, Half, Outcome, RejectCode, TxKey};

use crate::support::*;

/// Bound on a whole workload run.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Tasks submitting halves at once.
const SUBMITTERS: usize = 256;

/// One payment of the workload, with the outcome it must have when the race
/// does not decide it.
#[derive(Clone, Debug)]
struct Payment {
    tx_key: TxKey,
    sender: AccountId,
    receiver: AccountId,
    amount: u64,
    send: Half,
    receive: Half,
    /// `Some(code)` for halves built to disagree; `None` for agreeing ones,
    /// which settle or (losing a race for money) are rejected with 100.
    disagreement: Option<RejectCode>,
}

impl Payment {
    fn agreeing(tx_key: TxKey, sender: AccountId, receiver: AccountId, amount: u64) -> Payment {
        Payment {
            tx_key,
            sender,
            receiver,
            amount,
            send: send(tx_key, sender, amount),
            receive: receive(tx_key, receiver, sender, amount),
            disagreement: None,
        }
    }
}

fn seed() -> u64 {
    std::env::var("CONCURRENCY_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or(0x7a91_e5d3)
}

fn rng_for(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

fn shuffle<T>(items: &mut [T], rng: &mut TestRng) {
    for index in (1..items.len()).rev() {
        let other = rng.random_range(0..=index);
        items.swap(index, other);
    }
}

/// What each half heard, by payment index and side (0 send, 1 receive).
type Heard = BTreeMap<(usize, usize), Resolution>;

/// Submits every half of `payments` in a random order from `SUBMITTERS`
/// tasks; a half answered `Pending` is waited for in its own task, so
/// submitters never block on partners. Returns what every half heard.
async fn submit_all(ledger: &Arc<Ledger>, payments: &[Payment], rng: &mut TestRng) -> Heard {
    let mut halves: Vec<(usize, usize, Half)> = payments
        .iter()
        .enumerate()
        .flat_map(|(index, payment)| {
            [
                (index, 0, payment.send.clone()),
                (index, 1, payment.receive.clone()),
            ]
        })
        .collect();
    shuffle(&mut halves, rng);
    let mut queues: Vec<Vec<(usize, usize, Half)>> = vec![Vec::new(); SUBMITTERS];
    for (position, half) in halves.into_iter().enumerate() {
        queues[position % SUBMITTERS].push(half);
    }
    let mut submitters = Vec::new();
    for queue in queues {
        let ledger = ledger.clone();
        submitters.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut waiting = Vec::new();
            for (index, side, half) in queue {
                let submission = within(ledger.submit(half.party(), half))
                    .await
                    .expect("submit");
                waiting.push(tokio::spawn(async move {
                    let resolution = within(submission.resolution()).await.expect("resolution");
                    ((index, side), resolution)
                }));
            }
            for waiter in waiting {
                done.push(within(waiter).await.expect("waiter task"));
            }
            done
        }));
    }
    let mut heard = Heard::new();
    for submitter in submitters {
        for (slot, resolution) in within(submitter).await.expect("submitter task") {
            assert!(heard.insert(slot, resolution).is_none());
        }
    }
    assert_eq!(heard.len(), 2 * payments.len(), "every half resolved");
    heard
}

/// Everything that must hold after a workload, whatever order won the races.
/// Returns the settled payments' indices.
async fn check_after(
    ledger: &Ledger,
    payments: &[Payment],
    heard: &Heard,
    opening: &BTreeMap<AccountId, u64>,
) -> Vec<usize> {
    let mut settled = Vec::new();
    let mut rejected_100 = 0;
    // Signed: summed in payment order, not commit order.
    let mut expected: BTreeMap<AccountId, i128> = opening
        .iter()
        .map(|(&account, &balance)| (account, i128::from(balance)))
        .collect();
    for (index, payment) in payments.iter().enumerate() {
        let send_heard = &heard[&(index, 0)];
        let receive_heard = &heard[&(index, 1)];
        let outcome = final_outcome(send_heard);
        assert_eq!(
            send_heard, receive_heard,
            "both phones of {} hear the same outcome",
            payment.tx_key
        );
        assert_eq!(
            ledger.outcome(payment.tx_key).unwrap().as_ref(),
            Some(&*outcome),
            "the outcome heard is the stored one"
        );
        match (payment.disagreement, &*outcome) {
            (Some(code), _) => assert_eq!(outcome.code(), Some(code), "{outcome:?}"),
            (None, Outcome::Settled(settlement)) => {
                assert_eq!(
                    (
                        settlement.sender(),
                        settlement.receiver(),
                        settlement.amount()
                    ),
                    (payment.sender, payment.receiver, payment.amount)
                );
                settled.push(index);
                *expected.get_mut(&payment.sender).unwrap() -= i128::from(payment.amount);
                *expected.get_mut(&payment.receiver).unwrap() += i128::from(payment.amount);
            }
            (None, Outcome::Rejected(rejection)) => {
                assert_eq!(
                    rejection.code,
                    RejectCode::InsufficientFunds,
                    "{rejection:?}"
                );
                let available = rejection.sender_balance.expect("100 records the balance");
                assert!(
                    available < payment.amount,
                    "{}: rejected for {} with {available} available",
                    payment.tx_key,
                    payment.amount
                );
                rejected_100 += 1;
            }
        }
    }

    // The journal holds exactly one outcome per key and the same settlements.
    let journal = ledger.store().journal(0, usize::MAX).unwrap();
    let mut outcomes_per_key: HashMap<TxKey, usize> = HashMap::new();
    let mut journal_settlements = 0;
    for (_, entry) in &journal {
        if let JournalEntry::Outcome(outcome) = entry {
            *outcomes_per_key.entry(outcome.tx_key()).or_default() += 1;
            journal_settlements += usize::from(outcome.is_settled());
        }
    }
    assert_eq!(outcomes_per_key.len(), payments.len());
    assert!(
        outcomes_per_key.values().all(|&count| count == 1),
        "a key with two outcomes"
    );
    assert_eq!(
        journal_settlements,
        settled.len(),
        "settled as the phones heard it"
    );

    let report = assert_books(ledger);
    assert_eq!(report.settlements as usize, settled.len());
    assert_eq!(report.rejections as usize, payments.len() - settled.len());
    assert_eq!(report.pending_halves, 0);
    assert!(rejected_100 + settled.len() <= payments.len());

    for (&account, &balance) in &expected {
        let balance = u64::try_from(balance)
            .unwrap_or_else(|_| panic!("account {account} would be overdrawn: {balance}"));
        assert_eq!(
            ledger.balance(account).unwrap(),
            Some(balance),
            "account {account}: opening plus what settled"
        );
        // Live actors catch up with the durable balance, nothing reserved.
        let mut live = within(ledger.live_balance(account)).await.unwrap();
        for _ in 0..500 {
            if live == (balance, 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            live = within(ledger.live_balance(account)).await.unwrap();
        }
        assert_eq!(
            live,
            (balance, 0),
            "account {account} live (balance, reserved)"
        );
    }
    let stats = within(ledger.matcher_stats()).await.unwrap();
    assert_eq!((stats.keys_in_flight, stats.lone_halves), (0, 0));
    settled
}

/// A mixed workload: `regular` random payments among `regular_accounts`, some
/// built to disagree, plus `poor_accounts` that only pay, each `poor_payments`
/// times `poor_amount` from `poor_balance`.
struct Workload {
    regular_accounts: usize,
    regular_balance: u64,
    regular_payments: usize,
    poor_accounts: usize,
    poor_balance: u64,
    poor_payments: usize,
    poor_amount: u64,
}

async fn run_workload(workload: Workload, configure: impl FnOnce(&mut LedgerConfig)) {
    let seed = seed();
    eprintln!("concurrency workload seed {seed} (CONCURRENCY_SEED to replay)");
    let mut rng = rng_for(seed);
    let (_dir, ledger) = temp_ledger(|config| {
        // Thousands of halves in flight at once: the per-account cap on lone
        // halves (tested in regressions.rs) is not what this test is about.
        config.pending_halves_per_account_max = 1_000_000;
        configure(config);
    })
    .await;
    let regular = open_accounts(
        &ledger,
        &vec![workload.regular_balance; workload.regular_accounts],
    )
    .await;
    let poor = open_accounts(
        &ledger,
        &vec![workload.poor_balance; workload.poor_accounts],
    )
    .await;
    let opening: BTreeMap<AccountId, u64> = regular
        .iter()
        .map(|&id| (id, workload.regular_balance))
        .chain(poor.iter().map(|&id| (id, workload.poor_balance)))
        .collect();

    let mut payments = Vec::new();
    for _ in 0..workload.regular_payments {
        let tx_key = TxKey::new_random();
        let sender = regular[rng.random_range(0..regular.len())];
        let mut receiver = regular[rng.random_range(0..regular.len())];
        while receiver == sender {
            receiver = regular[rng.random_range(0..regular.len())];
        }
        // Amounts up to a third of an opening balance: some senders run dry.
        let amount = rng.random_range(1..=workload.regular_balance / 3);
        let mut payment = Payment::agreeing(tx_key, sender, receiver, amount);
        match rng.random_range(0..100) {
            0 | 1 => {
                let mut someone_else = regular[rng.random_range(0..regular.len())];
                while someone_else == sender || someone_else == receiver {
                    someone_else = regular[rng.random_range(0..regular.len())];
                }
                payment.receive = receive(tx_key, receiver, someone_else, amount);
                payment.disagreement = Some(RejectCode::SenderMismatch);
            }
            2 | 3 => {
                payment.receive = receive(tx_key, receiver, sender, amount + 1);
                payment.disagreement = Some(RejectCode::AmountMismatch);
            }
            _ => {}
        }
        payments.push(payment);
    }
    for &sender in &poor {
        for _ in 0..workload.poor_payments {
            let receiver = regular[rng.random_range(0..regular.len())];
            payments.push(Payment::agreeing(
                TxKey::new_random(),
                sender,
                receiver,
                workload.poor_amount,
            ));
        }
    }
    let ledger = Arc::new(ledger);
    let heard = within_for(RUN_TIMEOUT, submit_all(&ledger, &payments, &mut rng)).await;
    let settled = check_after(&ledger, &payments, &heard, &opening).await;

    // The overdraw races with one possible answer: an account that only pays
    // equal amounts settles exactly balance / amount of them.
    let races_won = (workload.poor_balance / workload.poor_amount) as usize;
    for &sender in &poor {
        let won = settled
            .iter()
            .filter(|&&index| payments[index].sender == sender)
            .count();
        assert_eq!(
            won,
            races_won.min(workload.poor_payments),
            "account {sender} racing for its balance"
        );
    }
    eprintln!(
        "{} payments, {} settled, seed {seed}",
        payments.len(),
        settled.len()
    );

    // Everything survives a restart.
    let before: Vec<Option<u64>> = opening
        .keys()
        .map(|&account| ledger.balance(account).unwrap())
        .collect();
    let ledger = reopen(Arc::into_inner(ledger).expect("tasks done")).await;
    let after: Vec<Option<u64>> = opening
        .keys()
        .map(|&account| ledger.balance(account).unwrap())
        .collect();
    assert_eq!(before, after);
    assert_eq!(assert_books(&ledger).settlements as usize, settled.len());
    within(ledger.close()).await;
}

/// Goal: 5,000 payments among 40 accounts from 256 tasks at once keep the
/// books, with 8 accounts each racing 10 payments of 300 for 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_payments_keep_the_books() {
    run_workload(
        Workload {
            regular_accounts: 32,
            regular_balance: 3_000,
            regular_payments: 4_920,
            poor_accounts: 8,
            poor_balance: 1_000,
            poor_payments: 10,
            poor_amount: 300,
        },
        |_| {},
    )
    .await;
}

/// Goal: the same guarantees while account actors keep retiring and
/// restarting from storage mid-run (an idle period of a few milliseconds),
/// with four matcher shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_keep_the_books_while_account_actors_come_and_go() {
    run_workload(
        Workload {
            regular_accounts: 24,
            regular_balance: 2_000,
            regular_payments: 3_000,
            poor_accounts: 4,
            poor_balance: 500,
            poor_payments: 8,
            poor_amount: 120,
        },
        |config| {
            config.account_idle = Duration::from_millis(4);
            config.matcher_shards = 4;
        },
    )
    .await;
}

/// Goal: many payments from ONE account racing for its balance settle exactly
/// balance / amount times; the rest are rejected with 100 and nothing is
/// overdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_account_racing_for_its_balance_settles_at_most_balance_over_amount_times() {
    const BALANCE: u64 = 10_000;
    const AMOUNT: u64 = 70;
    const PAYMENTS: usize = 1_000;
    let mut rng = rng_for(seed());
    let (_dir, ledger) = temp_ledger(|config| {
        config.pending_halves_per_account_max = 1_000_000;
    })
    .await;
    let payer = open_accounts(&ledger, &[BALANCE]).await[0];
    let receivers = open_accounts(&ledger, &[0; 20]).await;
    let payments: Vec<Payment> = (0..PAYMENTS)
        .map(|_| {
            let receiver = receivers[rng.random_range(0..receivers.len())];
            Payment::agreeing(TxKey::new_random(), payer, receiver, AMOUNT)
        })
        .collect();
    let opening: BTreeMap<AccountId, u64> = std::iter::once((payer, BALANCE))
        .chain(receivers.iter().map(|&id| (id, 0)))
        .collect();
    let ledger = Arc::new(ledger);
    let heard = within_for(RUN_TIMEOUT, submit_all(&ledger, &payments, &mut rng)).await;
    let settled = check_after(&ledger, &payments, &heard, &opening).await;
    let can_pay = (BALANCE / AMOUNT) as usize;
    assert!(settled.len() <= can_pay, "{} settled", settled.len());
    assert_eq!(
        settled.len(),
        can_pay,
        "a payment was refused while money was there"
    );
    assert_eq!(ledger.balance(payer).unwrap(), Some(BALANCE % AMOUNT));
    within(Arc::into_inner(ledger).expect("tasks done").close()).await;
}

/// Goal: the cap on live account actors, not their idle time, makes them
/// retire: 40 accounts paying each other through a cap of 8 actors (idle
/// time an hour) keep the books; once payments stop the sweep brings the
/// live count under the cap; a second round restarts the retired actors
/// from storage with the balances the first round left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_actor_cap_retires_the_least_recently_used_actors() {
    const ACCOUNTS: usize = 40;
    const CAP: usize = 8;
    let mut rng = rng_for(seed());
    let (_dir, ledger) = temp_ledger(|config| {
        config.account_idle = Duration::from_secs(3600);
        config.live_accounts_max = CAP;
    })
    .await;
    let accounts = open_accounts(&ledger, &[100; ACCOUNTS]).await;
    let opening: BTreeMap<AccountId, u64> = accounts.iter().map(|&id| (id, 100)).collect();
    let ledger = Arc::new(ledger);
    let wait_for_the_cap = async |round: &str| {
        // The sweep (every 250 ms at most) retires down to the cap.
        let deadline = std::time::Instant::now() + RUN_TIMEOUT;
        while ledger.stats().await.live_account_actors > CAP {
            assert!(
                std::time::Instant::now() < deadline,
                "{round}: still {:?} above a cap of {CAP}",
                ledger.stats().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // Round 1: each account pays the next one (in a ring) 1, ten times.
    let payments: Vec<Payment> = (0..10 * ACCOUNTS)
        .map(|index| {
            let (from, to) = (accounts[index % ACCOUNTS], accounts[(index + 1) % ACCOUNTS]);
            Payment::agreeing(TxKey::new_random(), from, to, 1)
        })
        .collect();
    let heard = within_for(RUN_TIMEOUT, submit_all(&ledger, &payments, &mut rng)).await;
    let settled = check_after(&ledger, &payments, &heard, &opening).await;
    assert_eq!(settled.len(), payments.len(), "round 1: all payable");
    wait_for_the_cap("round 1").await;
    let started = ledger.stats().await.account_actors_started;

    // Round 2: each account pays its whole balance, 100, to the next one:
    // only actors that reload exactly 100 from storage can, and (in the
    // ring's order of arrival) some find their balance already doubled.
    let payments: Vec<Payment> = (0..ACCOUNTS)
        .map(|index| {
            let (from, to) = (accounts[index], accounts[(index + 1) % ACCOUNTS]);
            Payment::agreeing(TxKey::new_random(), from, to, 100)
        })
        .collect();
    within_for(RUN_TIMEOUT, submit_all(&ledger, &payments, &mut rng)).await;
    let total: u64 = accounts
        .iter()
        .map(|&account| ledger.balance(account).unwrap().expect("account"))
        .sum();
    assert_eq!(total, 100 * ACCOUNTS as u64, "money created or lost");
    let audit = ledger.store().audit().unwrap();
    assert!(audit.is_ok(), "{:#?}", audit.problems);
    let settlements = ledger
        .store()
        .journal(0, usize::MAX)
        .unwrap()
        .iter()
        .filter(
            |(_, entry)| matches!(entry, JournalEntry::Outcome(outcome) if outcome.is_settled()),
        )
        .count();
    assert_eq!(
        settlements,
        10 * ACCOUNTS + ACCOUNTS,
        "round 2: every account could pay 100"
    );
    wait_for_the_cap("round 2").await;
    let stats = ledger.stats().await;
    assert!(
        stats.account_actors_started >= started + (ACCOUNTS - CAP) as u64,
        "round 2 did not restart the actors the cap retired: {stats:?}"
    );
    within(Arc::into_inner(ledger).expect("tasks done").close()).await;
}
