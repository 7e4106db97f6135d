//! Crash safety of the real binary: `tapledger-node run` is killed with
//! SIGKILL at random moments while dozens of payments are in flight (so
//! group commits are under way), and restarted on the same data directory.
//! After every kill the ledger file is opened directly and checked, then the
//! node is restarted and asked again over QUIC:
//!
//! * every outcome any phone heard is recorded exactly as heard;
//! * every half acknowledged as `accepted` is still pending with the receive
//!   time the node gave it, or decided; an expiry happened no earlier than
//!   its original deadline, and a deadline that passed while the node was
//!   down is not pushed back by the restart;
//! * every account whose opening was confirmed exists;
//! * no `tx_key` has two outcomes, and `Store::audit` passes.
//!
//! Some rounds also kill the node while it is still starting (recovering
//! the file after the previous kill). `TAPLEDGER_CRASH_ROUNDS=N` runs N
//! rounds (3 by default); `TAPLEDGER_SEED` repeats a run's random choices.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tapledger_actors::{JournalEntry, Store};
use tapledger_node::{ApiCredentials, ClientEndpoint, HalfAnswer, Phone, Submitted};
use tapledger_protocol::{
    AccountId, Half, Outcome, OutcomeReport, QueryStatus, RejectCode, Secret, Timestamp, TxKey,
};
use tapledger_test_kit::process::{self, NodeProcess};
use tapledger_test_kit::wire::{self, WireAccount};
use tapledger_test_kit::{WAIT, receive, send, within};

const BIN: &str = env!("CARGO_BIN_EXE_tapledger-node");
const ROUNDS_DEFAULT: u64 = 3;
/// Short, so that lone halves expire across kills and restarts.
const HALF_TTL: Duration = Duration::from_secs(3);
const ACCOUNTS: usize = 12;
const OPENING_BALANCE: u64 = 1_000_000;
/// Payment loops running at once: many payments in flight at every moment.
const PAYERS: usize = 32;

fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros();
    Timestamp(micros as u64)
}

fn micros(duration: Duration) -> u64 {
    duration.as_micros() as u64
}

// ---------------------------------------------------------------------------
// The node process.

fn command(data: &Path) -> Command {
    let mut command = process::command(BIN);
    command.arg("--data").arg(data);
    command
}

fn init(data: &Path) {
    let mut init = command(data);
    init.arg("init");
    process::run_ok(init, WAIT, "tapledger-node init");
}

/// `run` on a port the OS picks, without metrics; stderr goes to the log.
fn run(data: &Path) -> Command {
    let mut run = command(data);
    run.args(["run", "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--half-ttl-secs", &HALF_TTL.as_secs_f64().to_string()]);
    run
}

/// Spawns `run` without waiting for it (to kill it while it starts).
fn spawn(data: &Path, log: &Path) -> Child {
    process::spawn_node(run(data), log)
}

/// Starts `run` and waits until it prints where it listens.
fn start(data: &Path, log: &Path) -> NodeProcess {
    NodeProcess::start(run(data), log, WAIT, |announced| announced.listens())
}

// ---------------------------------------------------------------------------
// What phones heard.

/// A half the node acknowledged as durably pending, with the bounds its
/// node receive time must lie within.
#[derive(Clone, Debug)]
struct AcceptedHalf {
    tx_key: TxKey,
    party: AccountId,
    sent_at: Timestamp,
    accepted_at: Timestamp,
}

#[derive(Default)]
struct Heard {
    /// (key, party) -> the report that party heard.
    reports: HashMap<(TxKey, AccountId), OutcomeReport>,
    accepted: Vec<AcceptedHalf>,
    opened: Vec<AccountId>,
    refused: u64,
    lost: u64,
}

/// Submits `half` and records whatever the node says until the answer is
/// final or the connection dies.
async fn submit(phone: &Phone, party: AccountId, half: Half, heard: &Mutex<Heard>) {
    let tx_key = half.tx_key();
    let sent_at = now();
    let answer = match phone.submit(half).await {
        Ok(Submitted::Answered(answer)) => Ok(answer),
        Ok(Submitted::Accepted(pending)) => {
            heard.lock().unwrap().accepted.push(AcceptedHalf {
                tx_key,
                party,
                sent_at,
                accepted_at: now(),
            });
            pending.answer().await
        }
        Err(error) => Err(error),
    };
    let mut heard = heard.lock().unwrap();
    match answer {
        Ok(HalfAnswer::Decided(report)) => {
            if let Some(earlier) = heard.reports.insert((tx_key, party), report.clone()) {
                assert_eq!(
                    earlier, report,
                    "{tx_key}: account {party} heard two outcomes"
                );
            }
        }
        Ok(HalfAnswer::Refused { .. }) => heard.refused += 1,
        Err(_) => heard.lost += 1,
    }
}

/// Pays between random accounts until the node is killed: mostly good
/// payments, some mismatched (300), some overdrawn (100), some lone halves.
/// Once `killed` flips, whatever it still waits for is lost: a dead node's
/// connections only time out after many seconds.
async fn payer(
    phones: Arc<Vec<(AccountId, Arc<Phone>)>>,
    heard: Arc<Mutex<Heard>>,
    in_flight: Arc<AtomicUsize>,
    mut killed: tokio::sync::watch::Receiver<bool>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !*killed.borrow() {
        let from = rng.random_range(0..phones.len());
        let to = (from + rng.random_range(1..phones.len())) % phones.len();
        let ((sender, sender_phone), (receiver, receiver_phone)) = (&phones[from], &phones[to]);
        let tx_key = TxKey::new_random();
        let amount = rng.random_range(1..=500);
        let (amount, expected) = match rng.random_range(0..20) {
            0 => (amount, amount + 1),
            1 => (OPENING_BALANCE * 50, OPENING_BALANCE * 50),
            _ => (amount, amount),
        };
        let lone = rng.random_range(0..20) == 0;
        in_flight.fetch_add(1, Ordering::SeqCst);
        let payment = async {
            if lone {
                submit(sender_phone, *sender, send(tx_key, *sender, amount), &heard).await;
            } else {
                tokio::join!(
                    submit(sender_phone, *sender, send(tx_key, *sender, amount), &heard),
                    submit(
                        receiver_phone,
                        *receiver,
                        receive(tx_key, *receiver, *sender, expected),
                        &heard
                    ),
                );
            }
        };
        tokio::select! {
            _ = payment => {}
            _ = killed.wait_for(|killed| *killed) => heard.lock().unwrap().lost += 1,
        }
        in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connect(endpoint: &ClientEndpoint, node: &NodeProcess, account: &WireAccount) -> Phone {
    within(wire::authenticated_phone(
        endpoint,
        node.quic(),
        account.id,
        &account.credentials,
    ))
    .await
    .expect("connect and authenticate")
}

async fn open_account(
    endpoint: &ClientEndpoint,
    node: &NodeProcess,
    admin: &Secret,
    balance: u64,
) -> Result<WireAccount, tapledger_node::ClientError> {
    wire::open_account(
        endpoint,
        node.quic(),
        admin,
        "checking",
        "Crash Bank",
        balance,
    )
    .await
}

// ---------------------------------------------------------------------------
// Checks.

/// Opens the ledger file of the killed node directly and checks everything
/// phones heard against it. Returns (outcomes, pending halves) in the file.
fn check_file(ledger: &Path, heard: &Heard, accounts: &[WireAccount]) -> (u64, u64) {
    let store = Store::open(ledger).expect("the killed node's ledger opens");
    let audit = store.audit().expect("audit");
    assert!(audit.is_ok(), "audit problems: {:#?}", audit.problems);

    // No tx_key has two outcomes in the journal.
    let mut outcomes_per_key: HashMap<TxKey, u32> = HashMap::new();
    let mut from = 0;
    loop {
        let page = store.journal(from, 4_096).expect("journal");
        let Some((last, _)) = page.last() else { break };
        from = last + 1;
        for (_, entry) in page {
            if let JournalEntry::Outcome(outcome) = entry {
                *outcomes_per_key.entry(outcome.tx_key()).or_default() += 1;
            }
        }
    }
    if let Some((key, count)) = outcomes_per_key.iter().find(|(_, count)| **count > 1) {
        panic!("{key} has {count} outcomes in the journal");
    }

    for ((tx_key, party), report) in &heard.reports {
        let outcome = store
            .outcome(*tx_key)
            .expect("read outcome")
            .unwrap_or_else(|| {
                panic!("{tx_key}: account {party} heard {report:?}; the file has no outcome")
            });
        assert_eq!(
            &OutcomeReport::for_party(&outcome, *party),
            report,
            "{tx_key}: account {party} heard another outcome than the file holds"
        );
    }
    for half in &heard.accepted {
        let pending = store.pending(half.tx_key).expect("read pending");
        let outcome = store.outcome(half.tx_key).expect("read outcome");
        match (pending, outcome) {
            (Some(pending), None) => {
                assert_eq!(pending.party(), half.party, "{half:?}");
                let received_at = pending.received_at();
                assert!(
                    half.sent_at <= received_at && received_at <= half.accepted_at,
                    "{half:?}: stored receive time {received_at:?} is not the original"
                );
            }
            (None, Some(outcome)) => check_decided_half(half, &outcome),
            other => panic!("{half:?} was accepted; the file has {other:?}"),
        }
    }
    for account in accounts
        .iter()
        .map(|account| account.id)
        .chain(heard.opened.iter().copied())
    {
        assert!(
            store.account(account).unwrap().is_some(),
            "account {account} was opened"
        );
    }
    (audit.settlements + audit.rejections, audit.pending_halves)
}

/// A decided key one of whose halves was accepted: the half is recorded with
/// its original receive time, and an expiry came no earlier than its deadline.
fn check_decided_half(half: &AcceptedHalf, outcome: &Outcome) {
    assert!(
        outcome.parties().contains(&half.party),
        "{half:?}: {outcome:?}"
    );
    let Outcome::Rejected(rejection) = outcome else {
        return;
    };
    if rejection.code != RejectCode::Expired {
        return;
    }
    let received_at = match (&rejection.send, &rejection.receive) {
        (Some(send), _) if send.half.sender_id == half.party => send.received_at,
        (_, Some(receive)) if receive.half.receiver_id == half.party => receive.received_at,
        other => panic!("{half:?}: expired without the half: {other:?}"),
    };
    assert!(
        half.sent_at <= received_at && received_at <= half.accepted_at,
        "{half:?}: recorded receive time {received_at:?} is not the original"
    );
    assert!(
        rejection.decided_at.0 >= received_at.0 + micros(HALF_TTL),
        "{half:?}: expired at {:?}, before its deadline",
        rejection.decided_at
    );
}

/// What to ask the restarted node: (key, party, the report heard if any;
/// `None` for an accepted half whose outcome the phone never heard).
type Query = (TxKey, AccountId, Option<OutcomeReport>);

/// The queries after a round: every report and accepted half of the last
/// round, and a sample of at most `SAMPLE_MAX` of each from earlier rounds
/// (the file check covers them all; asking all over QUIC every round would
/// make long soaks quadratic).
fn queries(heard: &Heard, latest: &Heard, rng: &mut StdRng) -> Vec<Query> {
    const SAMPLE_MAX: usize = 1_000;
    let sample = |count: usize, rng: &mut StdRng| -> Vec<usize> {
        if count <= SAMPLE_MAX {
            (0..count).collect()
        } else {
            (0..SAMPLE_MAX)
                .map(|_| rng.random_range(0..count))
                .collect()
        }
    };
    let mut queries: Vec<Query> = latest
        .reports
        .iter()
        .map(|((tx_key, party), report)| (*tx_key, *party, Some(report.clone())))
        .chain(
            latest
                .accepted
                .iter()
                .map(|half| (half.tx_key, half.party, None)),
        )
        .collect();
    let earlier: Vec<_> = heard.reports.iter().collect();
    for index in sample(earlier.len(), rng) {
        let ((tx_key, party), report) = earlier[index];
        queries.push((*tx_key, *party, Some(report.clone())));
    }
    for index in sample(heard.accepted.len(), rng) {
        let half = &heard.accepted[index];
        queries.push((half.tx_key, half.party, None));
    }
    queries
}

/// Asks the restarted node, over QUIC: a heard report must come back the
/// same; an accepted half must be pending or decided. Halves whose deadline
/// passed before `restarted_at` and that expired must not have expired later
/// than a deadline reset by the restart would allow.
async fn check_over_quic(
    node: &NodeProcess,
    accounts: &[WireAccount],
    queries: Vec<Query>,
    restarted_at: Timestamp,
) -> (usize, usize) {
    let endpoint = node.endpoint();
    let mut phones = HashMap::new();
    for account in accounts {
        phones.insert(account.id, connect(&endpoint, node, account).await);
    }
    let checked = queries.len();
    let mut still_pending = 0;
    for (tx_key, party, report) in queries {
        let Some(phone) = phones.get(&party) else {
            continue;
        };
        let (status, answer) = within(phone.query_outcome(tx_key)).await.expect("query");
        match (report, status) {
            (Some(report), _) => {
                assert_eq!(status, QueryStatus::Decided, "{tx_key} for {party}");
                assert_eq!(answer, Some(report), "{tx_key} for {party} over QUIC");
            }
            (None, QueryStatus::Pending) => still_pending += 1,
            (None, QueryStatus::Decided) => {
                let answer = answer.expect("a decided answer carries its report");
                if answer.code == Some(RejectCode::Expired) {
                    let recorded = answer
                        .send
                        .as_ref()
                        .map(|send| send.received_at)
                        .or(answer.receive.as_ref().map(|receive| receive.received_at))
                        .expect("an expiry records its half");
                    let deadline = recorded.0 + micros(HALF_TTL);
                    if deadline < restarted_at.0 {
                        assert!(
                            answer.decided_at.0 < restarted_at.0 + micros(HALF_TTL),
                            "{tx_key}: deadline passed while the node was down, yet it \
                             expired only at {:?} (restart at {restarted_at:?})",
                            answer.decided_at
                        );
                    }
                }
            }
            (None, QueryStatus::Unknown) => {
                panic!("{tx_key} was accepted for {party}; now unknown")
            }
        }
    }
    for (_, phone) in phones {
        phone.close().await;
    }
    (checked, still_pending)
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_anyone_heard() {
    let rounds = std::env::var("TAPLEDGER_CRASH_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(ROUNDS_DEFAULT);
    let seed = std::env::var("TAPLEDGER_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| now().0);
    println!("crash: {rounds} rounds, seed {seed} (TAPLEDGER_SEED={seed} repeats the choices)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let data: PathBuf = dir.path().join("data");
    let log = dir.path().join("node.log");
    let ledger = data.join("ledger.redb");
    init(&data);
    let admin = wire::admin_credential(&data);

    let mut node = start(&data, &log);
    let mut accounts = Vec::new();
    {
        let endpoint = node.endpoint();
        for _ in 0..ACCOUNTS {
            accounts.push(
                within(open_account(&endpoint, &node, &admin, OPENING_BALANCE))
                    .await
                    .expect("open account"),
            );
        }
    }
    let mut heard = Heard::default();
    let payments = Arc::new(AtomicU64::new(0));

    for round in 1..=rounds {
        // The phones of this round, one connection per account.
        let endpoint = node.endpoint();
        let mut phones = Vec::new();
        for account in &accounts {
            phones.push((
                account.id,
                Arc::new(connect(&endpoint, &node, account).await),
            ));
        }
        let phones = Arc::new(phones);
        let round_heard = Arc::new(Mutex::new(Heard::default()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (kill_switch, killed) = tokio::sync::watch::channel(false);
        let payers: Vec<_> = (0..PAYERS)
            .map(|index| {
                tokio::spawn(payer(
                    phones.clone(),
                    round_heard.clone(),
                    in_flight.clone(),
                    killed.clone(),
                    seed ^ (round << 32) ^ index as u64,
                ))
            })
            .collect();
        // An operator opening accounts meanwhile: confirmed ones must survive.
        let operator = {
            let (endpoint, quic, admin, heard) = (
                endpoint.clone(),
                node.quic(),
                admin.clone(),
                round_heard.clone(),
            );
            let mut killed = killed.clone();
            tokio::spawn(async move {
                while !*killed.borrow() {
                    let opening = async {
                        let operator = endpoint.connect(quic, "localhost").await.ok()?;
                        let credentials = ApiCredentials::generate();
                        let opened = operator
                            .open_account(&admin, "savings", "Crash Bank", &credentials, 7)
                            .await;
                        operator.close().await;
                        opened.ok()
                    };
                    tokio::select! {
                        opened = opening => if let Some(id) = opened {
                            heard.lock().unwrap().opened.push(id);
                        },
                        _ = killed.wait_for(|killed| *killed) => return,
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };

        let run_for = Duration::from_millis(rng.random_range(30..600));
        tokio::time::sleep(run_for).await;
        let in_flight_at_kill = in_flight.load(Ordering::SeqCst);
        node.kill();
        let _ = kill_switch.send(true);
        for payer in payers {
            within(payer).await.expect("payer panicked");
        }
        within(operator).await.expect("operator panicked");
        for (_, phone) in Arc::into_inner(phones).expect("payers are done") {
            Arc::into_inner(phone)
                .expect("payers are done")
                .close()
                .await;
        }

        let round_heard = Arc::into_inner(round_heard).unwrap().into_inner().unwrap();
        let round_queries = queries(&heard, &round_heard, &mut rng);
        let decided_now = round_heard.reports.len();
        let accepted_now = round_heard.accepted.len();
        payments.fetch_add(decided_now as u64, Ordering::Relaxed);
        heard.reports.extend(round_heard.reports);
        heard.accepted.extend(round_heard.accepted);
        heard.opened.extend(round_heard.opened.iter().copied());
        heard.refused += round_heard.refused;
        heard.lost += round_heard.lost;

        let (outcomes, pending) = check_file(&ledger, &heard, &accounts);

        // Now and then, kill it again while it is starting up on the
        // crashed file.
        let startup_kill = if rng.random_range(0..2) == 0 {
            let delay = Duration::from_millis(rng.random_range(0..40));
            let mut child = spawn(&data, &log);
            std::thread::sleep(delay);
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            check_file(&ledger, &heard, &accounts);
            format!("; killed again {delay:?} into a restart")
        } else {
            String::new()
        };

        let restarted_at = now();
        node = start(&data, &log);
        let (queried, still_pending) =
            check_over_quic(&node, &accounts, round_queries, restarted_at).await;
        println!(
            "crash round {round}: SIGKILL after {run_for:?} with {in_flight_at_kill} payments in \
             flight; this round phones heard {decided_now} outcomes, {accepted_now} accepted \
             halves, {} new accounts; the file holds {outcomes} outcomes and {pending} pending \
             halves, audit clean{startup_kill}; after restart {queried} answers checked over \
             QUIC ({still_pending} halves still pending)",
            round_heard.opened.len(),
        );
    }

    // Every accepted half's deadline passes: each is then decided (settled,
    // rejected, or expired no earlier than its deadline).
    tokio::time::sleep(HALF_TTL + Duration::from_millis(800)).await;
    let every_accepted = heard
        .accepted
        .iter()
        .map(|half| (half.tx_key, half.party, None))
        .collect();
    let (queried, still_pending) =
        check_over_quic(&node, &accounts, every_accepted, Timestamp(0)).await;
    assert_eq!(still_pending, 0, "halves left pending past their deadline");
    node.kill();
    let (outcomes, pending) = check_file(&ledger, &heard, &accounts);
    assert_eq!(pending, 0, "lone halves left in the file");
    println!(
        "crash: {rounds} rounds, {} outcomes heard by phones (all kept), {} accepted halves (all \
         decided by now), {} confirmed accounts, {} refusals, {} answers lost to kills; final \
         file: {outcomes} outcomes, audit clean; the {queried} accepted halves asked over QUIC",
        heard.reports.len(),
        heard.accepted.len(),
        heard.opened.len() + accounts.len(),
        heard.refused,
        heard.lost,
    );
}
