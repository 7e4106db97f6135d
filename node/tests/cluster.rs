//! Three real replicas: `tapledger-node run` three times on loopback,
//! initialised the way an operator sets up three machines (each replica's
//! identity first, then every replica told of the others' addresses and
//! certificates), with phones paying through the client, which follows the
//! leader. In each round the leader is killed with SIGKILL at a random
//! moment; the two replicas left must elect a new leader and go on settling;
//! then the killed one is restarted and must catch up.
//!
//! After the rounds the payers stop, every replica is stopped with SIGTERM,
//! and each one's ledger file is opened directly: every outcome any phone
//! was told is there exactly as told, on every replica; the books pass the
//! audit; every replica applied the same log and holds the same state digest.
//!
//! A second test changes the membership of a running cluster the way an
//! operator does (README, "Adding and removing replicas"): a fourth replica
//! initialised with `init --join`, started, added with `cluster add` and
//! later removed with `cluster remove`, all through the real binary while
//! phones pay.
//!
//! `TAPLEDGER_CLUSTER_ROUNDS=N` runs N rounds (2 by default);
//! `TAPLEDGER_SEED` repeats a run's random choices.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tapledger_actors::Store;
use tapledger_actors::raft::LogId;
use tapledger_node::{
    ApiCredentials, ClientEndpoint, ClientError, HalfAnswer, Phone, ReplicaAddress, Submitted,
};
use tapledger_protocol::{AccountId, Half, OutcomeReport, Secret, TxKey};
use tapledger_test_kit::process::{self, NodeProcess};
use tapledger_test_kit::{receive, send, wire, within_for};

const BIN: &str = env!("CARGO_BIN_EXE_tapledger-node");
/// Upper bound on any one wait.
const WAIT: Duration = Duration::from_secs(30);
const REPLICAS: usize = 3;
const ROUNDS_DEFAULT: u64 = 2;
/// Well above a failover, so that honest halves never expire across one.
const HALF_TTL_SECS: u64 = 10;
/// After the last half is sent, every lone half has expired by then: its TTL,
/// the expiry actor's tick (at most 1 s) and a margin for the commit.
const LONE_HALVES_EXPIRED: Duration = Duration::from_secs(HALF_TTL_SECS + 3);
/// Payment loops running at once, each between two accounts of its own.
const PAYERS: usize = 4;
const ACCOUNTS: usize = PAYERS * 2;
const OPENING_BALANCE: u64 = 1_000_000;
/// Snapshots (and log compaction) every few entries, so that a replica
/// added later must start from a snapshot.
const SMALL_SNAPSHOTS: &[&str] = &["--snapshot-after-entries", "16"];

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    within_for(WAIT, future).await
}

fn seed() -> u64 {
    std::env::var("TAPLEDGER_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

fn command(data: &Path) -> Command {
    let mut command = process::command(BIN);
    command.arg("--data").arg(data);
    command
}

/// Runs `command` to its end, or kills it after [`WAIT`]; `None` when it
/// could not run or did not end in time.
fn output_within(command: Command) -> Option<Output> {
    process::output_within(command, WAIT)
}

/// One replica's files and addresses.
struct Replica {
    id: u64,
    data: PathBuf,
    log: PathBuf,
    phones: SocketAddr,
    peers: SocketAddr,
    /// Where its HTTP server (status, admin) listens, once started.
    http: Option<String>,
    /// Further options for `run`.
    run_args: Vec<String>,
    process: Option<NodeProcess>,
}

/// What `tapledger-node status` says of a running replica.
#[derive(Debug)]
struct Status {
    role: String,
    applied: Option<u64>,
    /// Up to where its log is compacted away (and only a snapshot has it).
    purged: Option<u64>,
    voters: Vec<u64>,
    learners: Vec<u64>,
    /// On the leader: each follower (learners too) and the index it has
    /// replicated.
    followers: Vec<(u64, Option<u64>)>,
}

impl Replica {
    /// Replica `id`'s place under `root`; nothing is created yet.
    fn new(
        root: &Path,
        id: u64,
        phones: SocketAddr,
        peers: SocketAddr,
        run_args: &[&str],
    ) -> Replica {
        Replica {
            id,
            data: root.join(format!("replica-{id}")),
            log: root.join(format!("replica-{id}.log")),
            phones,
            peers,
            http: None,
            run_args: run_args.iter().map(ToString::to_string).collect(),
            process: None,
        }
    }

    /// `tapledger-node init` for this replica: with `join`, an identity that
    /// starts no cluster (it waits to be added); without, a new cluster of
    /// this replica and `peers`. `admin` is the credential file to copy.
    fn init(&self, join: bool, admin: Option<&Path>, peers: &[&Replica]) -> String {
        let mut init = command(&self.data);
        init.arg("init")
            .args(["--id", &self.id.to_string()])
            .args(["--client-addr", &self.phones.to_string()])
            .args(["--peer-addr", &self.peers.to_string()]);
        if join {
            init.arg("--join");
        }
        if let Some(admin) = admin {
            init.arg("--admin-key").arg(admin);
        }
        for peer in peers {
            init.arg("--peer").arg(format!(
                "{}={},{},{}",
                peer.id,
                peer.phones,
                peer.peers,
                peer.cert().display()
            ));
        }
        process::run_ok(init, WAIT, &format!("init replica {}", self.id))
    }

    fn cert(&self) -> PathBuf {
        self.data.join("node.crt.pem")
    }

    fn start(&mut self) {
        let mut run = command(&self.data);
        run.args(["run", "--metrics-listen", "127.0.0.1:0"])
            .arg("--listen")
            .arg(self.phones.to_string())
            .arg("--peer-listen")
            .arg(self.peers.to_string())
            .args(["--half-ttl-secs", &HALF_TTL_SECS.to_string()])
            .args(&self.run_args);
        let process = NodeProcess::start(run, &self.log, WAIT, |announced| announced.replicating);
        self.http = process.announced.metrics.map(|addr| addr.to_string());
        self.process = Some(process);
    }

    /// A `tapledger-node` command run against this running replica: its data
    /// directory (admin credential) and its HTTP server.
    fn admin_command(&self) -> Option<Command> {
        let http = self.http.as_ref()?;
        let mut command = command(&self.data);
        command.env("TAPLEDGER_METRICS_LISTEN", http);
        Some(command)
    }

    /// `tapledger-node status` of the running replica.
    fn status(&self) -> Option<Status> {
        self.process.as_ref()?;
        let mut status = self.admin_command()?;
        status.arg("status");
        let output = output_within(status)?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|rest| rest.trim().to_string())
        };
        let ids = |name: &str| -> Option<Vec<u64>> {
            let list = field(name)?;
            if list == "none" {
                return Some(Vec::new());
            }
            list.split(", ").map(|id| id.parse().ok()).collect()
        };
        // "follower 4   replicated to 17, 0 behind"
        let followers = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("follower ")?;
                let (id, rest) = rest.split_once(" replicated to ")?;
                let matched = rest.split(',').next()?.trim();
                Some((id.trim().parse().ok()?, matched.parse().ok()))
            })
            .collect();
        Some(Status {
            followers,
            role: field("role")?.split_whitespace().next()?.to_string(),
            applied: field("applied")?.parse().ok(),
            purged: field("purged")?.parse().ok(),
            voters: ids("voters")?,
            learners: ids("learners")?,
        })
    }

    /// `tapledger-node cluster ARGS` against this running replica: its
    /// stdout, or its stderr when it fails.
    async fn cluster(&self, args: &[&str]) -> Result<String, String> {
        let mut cluster = self.admin_command().expect("a running replica");
        cluster.arg("cluster").args(args);
        let what = format!("cluster {} against replica {}", args.join(" "), self.id);
        let output = tokio::task::spawn_blocking(move || output_within(cluster))
            .await
            .expect("cluster command thread")
            .unwrap_or_else(|| panic!("{what}: did not run or did not end within {WAIT:?}"));
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
    }

    fn terminate(&mut self) {
        if let Some(process) = self.process.take() {
            let (status, log) = process.terminate(WAIT);
            assert!(
                status.success(),
                "replica {} did not stop cleanly: {status}; log:\n{log}",
                self.data.display(),
            );
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Initialises three replicas as an operator would on three machines, and
/// starts them (`run` with `run_args` added).
fn init_cluster(root: &Path, run_args: &[&str]) -> Vec<Replica> {
    let addrs = process::free_addrs(REPLICAS * 2);
    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|index| {
            Replica::new(
                root,
                index as u64 + 1,
                addrs[index * 2],
                addrs[index * 2 + 1],
                run_args,
            )
        })
        .collect();
    // Each replica's identity first (joining nothing yet)...
    let admin = replicas[0].data.join("admin.key");
    for (index, replica) in replicas.iter().enumerate() {
        replica.init(true, (index > 0).then_some(admin.as_path()), &[]);
    }
    // ...then each is told of the others, and they start a cluster together.
    for replica in &replicas {
        let others: Vec<&Replica> = replicas
            .iter()
            .filter(|other| other.id != replica.id)
            .collect();
        let out = replica.init(false, None, &others);
        assert!(out.contains("a new cluster of 3"), "{out}");
    }
    for replica in &mut replicas {
        replica.start();
    }
    replicas
}

/// The last lines of every replica's log, for a failure message.
fn logs<'a>(replicas: impl IntoIterator<Item = &'a Replica>) -> String {
    log_tails(replicas.into_iter().map(|replica| replica.log.as_path()))
}

/// The last lines of each log file.
fn log_tails<'a>(files: impl IntoIterator<Item = &'a Path>) -> String {
    process::log_tails(files, 400)
}

fn addresses<'a>(replicas: impl IntoIterator<Item = &'a Replica>) -> Vec<ReplicaAddress> {
    replicas
        .into_iter()
        .map(|replica| {
            let cert = tapledger_certs::load_certificates(&replica.cert()).expect("certificate");
            ReplicaAddress {
                addr: replica.phones,
                fingerprint: tapledger_certs::Fingerprint::of(&cert[0]),
            }
        })
        .collect()
}

struct Account {
    id: AccountId,
    key: Secret,
}

/// Every final answer phones heard: (key, party) -> report.
type Heard = Arc<Mutex<HashMap<(TxKey, AccountId), OutcomeReport>>>;

/// A phone that follows the leader: reconnects when its replica dies or
/// stops leading.
struct LeaderPhone {
    endpoint: ClientEndpoint,
    replicas: Vec<ReplicaAddress>,
    account: Account,
    phone: Phone,
    replica: usize,
}

impl LeaderPhone {
    async fn connect(
        endpoint: &ClientEndpoint,
        replicas: &[ReplicaAddress],
        account: Account,
    ) -> LeaderPhone {
        let (phone, _, replica) =
            within(endpoint.connect_leader(replicas, 0, Some((account.id, &account.key)), WAIT))
                .await
                .expect("a leader answers");
        LeaderPhone {
            endpoint: endpoint.clone(),
            replicas: replicas.to_vec(),
            account,
            phone,
            replica,
        }
    }

    async fn reconnect(&mut self) {
        let (phone, _, replica) = within(self.endpoint.connect_leader(
            &self.replicas,
            self.replica + 1,
            Some((self.account.id, &self.account.key)),
            WAIT,
        ))
        .await
        .expect("a leader answers again");
        let old = std::mem::replace(&mut self.phone, phone);
        old.close().await;
        self.replica = replica;
    }

    /// Submits `half` until some leader answers it finally; resubmits the
    /// identical half after every change of leader.
    async fn submit(&mut self, half: Half) -> HalfAnswer {
        for _ in 0..20 {
            let answer = match tokio::time::timeout(WAIT, self.phone.submit(half.clone())).await {
                Ok(Ok(Submitted::Answered(answer))) => Ok(answer),
                Ok(Ok(Submitted::Accepted(pending))) => {
                    match tokio::time::timeout(WAIT, pending.answer()).await {
                        Ok(answer) => answer,
                        Err(_) => Err(ClientError::Timeout(WAIT)),
                    }
                }
                Ok(Err(error)) => Err(error),
                Err(_) => Err(ClientError::Timeout(WAIT)),
            };
            match answer {
                Ok(answer) => return answer,
                Err(error) if error.is_failover() || matches!(error, ClientError::Timeout(_)) => {
                    self.reconnect().await
                }
                Err(error) => panic!("{}: {error}", half.tx_key()),
            }
        }
        panic!("{}: no leader answered after 20 attempts", half.tx_key())
    }
}

fn record(heard: &Heard, tx_key: TxKey, party: AccountId, answer: HalfAnswer) {
    if let HalfAnswer::Decided(report) = answer {
        let mut heard = heard.lock().unwrap();
        if let Some(earlier) = heard.insert((tx_key, party), report.clone()) {
            assert_eq!(
                earlier, report,
                "{tx_key}: account {party} heard two outcomes"
            );
        }
    }
}

/// Pays between two fixed accounts (sender, receiver) until told to stop;
/// some payments disagree on the amount (300).
async fn payer(
    mut sender: LeaderPhone,
    mut receiver: LeaderPhone,
    heard: Heard,
    settled: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    seed: u64,
) -> (LeaderPhone, LeaderPhone) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !*stop.borrow() {
        let tx_key = TxKey::new_random();
        let amount = rng.random_range(1..=50);
        let expected = if rng.random_range(0..10) == 0 {
            amount + 1
        } else {
            amount
        };
        let (sender_id, receiver_id) = (sender.account.id, receiver.account.id);
        let (sent, received) = tokio::join!(
            sender.submit(send(tx_key, sender_id, amount)),
            receiver.submit(receive(tx_key, receiver_id, sender_id, expected)),
        );
        if matches!(&sent, HalfAnswer::Decided(report) if report.code.is_none()) {
            settled.fetch_add(1, Ordering::Relaxed);
        }
        record(&heard, tx_key, sender_id, sent);
        record(&heard, tx_key, receiver_id, received);
        if stop.has_changed().unwrap_or(true) && *stop.borrow_and_update() {
            break;
        }
    }
    (sender, receiver)
}

/// Which replica leads now (by index), asked of the cluster through a phone.
async fn leader_of(
    endpoint: &ClientEndpoint,
    replicas: &[ReplicaAddress],
    account: &Account,
) -> usize {
    let (phone, _, index) =
        within(endpoint.connect_leader(replicas, 0, Some((account.id, &account.key)), WAIT))
            .await
            .expect("a leader answers");
    phone.close().await;
    index
}

async fn open_accounts(
    endpoint: &ClientEndpoint,
    replicas: &[ReplicaAddress],
    admin: &Secret,
    count: usize,
) -> Vec<Account> {
    let mut accounts = Vec::new();
    let mut first = 0;
    let deadline = Instant::now() + WAIT;
    while accounts.len() < count {
        assert!(Instant::now() < deadline, "no leader opened the accounts");
        let (operator, _, reached) = within(endpoint.connect_leader(replicas, first, None, WAIT))
            .await
            .expect("connect");
        let credentials = ApiCredentials::generate();
        let opened = within(operator.open_account(
            admin,
            "checking",
            "Raft Bank",
            &credentials,
            OPENING_BALANCE,
        ))
        .await;
        operator.close().await;
        match opened {
            Ok(id) => accounts.push(Account {
                id,
                key: credentials.key,
            }),
            // Reached a follower (or a leader still starting): go where it
            // points, or to the next replica.
            Err(ClientError::NotLeader { leader, .. }) => {
                first = leader
                    .and_then(|leader| {
                        replicas
                            .iter()
                            .position(|replica| replica.addr.to_string() == leader.addr)
                    })
                    .filter(|&index| index != reached)
                    .unwrap_or(reached + 1);
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(error) if error.is_failover() => {
                first = reached + 1;
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(error) => panic!("open account: {error}"),
        }
    }
    accounts
}

/// Connects two phones per payer (accounts taken in pairs: sender,
/// receiver) and starts each payer.
async fn start_payers(
    endpoint: &ClientEndpoint,
    addresses: &[ReplicaAddress],
    accounts: Vec<Account>,
    heard: &Heard,
    settled: &Arc<AtomicU64>,
    stopped: &tokio::sync::watch::Receiver<bool>,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<(LeaderPhone, LeaderPhone)>> {
    let mut payers = Vec::new();
    let mut accounts = accounts.into_iter();
    for index in 0.. {
        let (Some(from), Some(to)) = (accounts.next(), accounts.next()) else {
            break;
        };
        let sender = LeaderPhone::connect(endpoint, addresses, from).await;
        let receiver = LeaderPhone::connect(endpoint, addresses, to).await;
        payers.push(tokio::spawn(payer(
            sender,
            receiver,
            heard.clone(),
            settled.clone(),
            stopped.clone(),
            seed ^ index as u64,
        )));
    }
    payers
}

/// Waits until one of `replicas` leads and all of them have applied the
/// same index.
async fn wait_converged(replicas: &[Replica], logs: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let statuses: Vec<_> = replicas.iter().map(Replica::status).collect();
        let applied: Vec<Option<u64>> = statuses
            .iter()
            .map(|status| status.as_ref().and_then(|status| status.applied))
            .collect();
        let led = statuses
            .iter()
            .any(|status| matches!(status, Some(status) if status.role == "leader"));
        if led
            && applied
                .iter()
                .all(|index| index.is_some() && *index == applied[0])
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge: {statuses:?}; logs:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Closes both phones of every payer.
async fn close_phones(phones: Vec<(LeaderPhone, LeaderPhone)>) {
    for (sender, receiver) in phones {
        sender.phone.close().await;
        receiver.phone.close().await;
    }
}

/// Checks every replica's ledger against what phones were told
/// ([`check_ledger`]); they must all have applied the same log to the same
/// state. Returns that log position and digest.
fn check_replicas_agree(
    replicas: &[Replica],
    told: &HashMap<(TxKey, AccountId), OutcomeReport>,
) -> (Option<LogId>, [u8; 32]) {
    let digests: Vec<_> = replicas
        .iter()
        .map(|replica| check_ledger(replica, told, &HashMap::new()))
        .collect();
    assert!(
        digests.windows(2).all(|pair| pair[0] == pair[1]),
        "replicas differ after the run: {digests:?}"
    );
    digests[0]
}

/// Opens a stopped replica's ledger file: the books pass the audit, every
/// outcome in `told` is there exactly as told, and no outcome in `others`
/// (told too, but perhaps after this replica left) is contradicted.
/// Returns its applied log id and state digest.
fn check_ledger(
    replica: &Replica,
    told: &HashMap<(TxKey, AccountId), OutcomeReport>,
    others: &HashMap<(TxKey, AccountId), OutcomeReport>,
) -> (Option<LogId>, [u8; 32]) {
    let store = Store::open(&replica.data.join("ledger.redb")).expect("ledger opens");
    let audit = store.audit().expect("audit");
    assert!(
        audit.is_ok(),
        "{}: {:#?}",
        replica.data.display(),
        audit.problems
    );
    for ((tx_key, party), report) in told {
        let outcome = store.outcome(*tx_key).expect("read").unwrap_or_else(|| {
            panic!(
                "{tx_key} was told {report:?}; {} has no outcome",
                replica.data.display()
            )
        });
        assert_eq!(
            &OutcomeReport::for_party(&outcome, *party),
            report,
            "{tx_key}: {} holds another outcome than account {party} heard",
            replica.data.display()
        );
    }
    for ((tx_key, party), report) in others {
        if let Some(outcome) = store.outcome(*tx_key).expect("read") {
            assert_eq!(
                &OutcomeReport::for_party(&outcome, *party),
                report,
                "{tx_key}: {} holds another outcome than account {party} heard",
                replica.data.display()
            );
        }
    }
    (
        store.raft_state().expect("raft state").0,
        store.digest().expect("digest"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_at_random_moments_loses_nothing_anyone_heard() {
    let rounds = std::env::var("TAPLEDGER_CLUSTER_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(ROUNDS_DEFAULT);
    let seed = seed();
    println!("cluster: {rounds} rounds, seed {seed} (TAPLEDGER_SEED={seed} repeats the choices)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut replicas = init_cluster(dir.path(), &[]);
    let addresses = addresses(&replicas);
    let admin = wire::admin_credential(&replicas[0].data);
    let endpoint =
        ClientEndpoint::new(addresses[0].fingerprint, addresses[0].addr).expect("endpoint");

    let accounts = open_accounts(&endpoint, &addresses, &admin, ACCOUNTS).await;
    let probe = Account {
        id: accounts[0].id,
        key: accounts[0].key.clone(),
    };
    let heard: Heard = Arc::default();
    let settled = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let payers = start_payers(
        &endpoint, &addresses, accounts, &heard, &settled, &stopped, seed,
    )
    .await;

    for round in 1..=rounds {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        let leader = leader_of(&endpoint, &addresses, &probe).await;
        let before = settled.load(Ordering::Relaxed);
        replicas[leader].kill();
        let killed_at = Instant::now();
        // The two left elect a leader and settle again.
        let deadline = killed_at + WAIT;
        while settled.load(Ordering::Relaxed) < before + 20 {
            assert!(
                Instant::now() < deadline,
                "round {round}: nothing settled for {WAIT:?} after the leader was killed; logs:\n{}",
                logs(&replicas)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "cluster: round {round}: replica {} killed; settling again after {:.0} ms",
            leader + 1,
            killed_at.elapsed().as_secs_f64() * 1e3
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
        replicas[leader].start();
    }

    let _ = stop.send(true);
    let stopped_at = Instant::now();
    let mut phones = Vec::new();
    for payer in payers {
        phones.push(within(payer).await.expect("payer"));
    }
    // A half whose partner was lost with a killed leader stays pending until
    // it expires, and its expiry is a log entry the leader appends on its
    // own: let every such half expire first, so that no entry is committed
    // while the replicas are being stopped one by one.
    tokio::time::sleep_until((stopped_at + LONE_HALVES_EXPIRED).into()).await;
    // Wait until every replica, the restarted ones included, has applied
    // what the leader has; then stop everything.
    wait_converged(&replicas, || logs(&replicas)).await;
    close_phones(phones).await;
    for replica in &mut replicas {
        replica.terminate();
    }

    let heard = heard.lock().unwrap().clone();
    let (applied, _) = check_replicas_agree(&replicas, &heard);
    println!(
        "cluster: {rounds} leader kills; {} payments settled; {} outcomes heard, all on all {REPLICAS} replicas; applied {:?}",
        settled.load(Ordering::Relaxed),
        heard.len(),
        applied.map(|log_id| log_id.index)
    );
}

/// The replica of `replicas` that says it leads (bounded wait).
fn leader_among<'a>(replicas: &[&'a Replica], logs: impl Fn() -> String) -> &'a Replica {
    let deadline = Instant::now() + WAIT;
    loop {
        let leader = replicas.iter().find(|replica| {
            replica
                .status()
                .is_some_and(|status| status.role == "leader")
        });
        if let Some(leader) = leader {
            return leader;
        }
        assert!(
            Instant::now() < deadline,
            "no replica leads; logs:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tapledger-node cluster ARGS` against whichever of `replicas` leads,
/// again after a change of leader (409, "not the leader"), within [`WAIT`].
/// Returns the replica that took it and what the command printed.
async fn change_membership<'a>(
    replicas: &[&'a Replica],
    args: &[&str],
    logs: impl Fn() -> String,
) -> (&'a Replica, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let leader = leader_among(replicas, &logs);
        match leader.cluster(args).await {
            Ok(done) => return (leader, done),
            Err(refused) if refused.contains("409") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(refused) => panic!(
                "cluster {} against replica {}: {refused}; logs:\n{}",
                args.join(" "),
                leader.id,
                logs()
            ),
        }
    }
}

/// Waits until `count` more payments have settled than `settled` counted
/// when called (bounded wait).
async fn settle_more(settled: &AtomicU64, count: u64, when: &str, logs: impl Fn() -> String) {
    let target = settled.load(Ordering::Relaxed) + count;
    let deadline = Instant::now() + WAIT;
    while settled.load(Ordering::Relaxed) < target {
        assert!(
            Instant::now() < deadline,
            "{when}: fewer than {count} payments settled in {WAIT:?}; logs:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `replica` has applied at least `index` (bounded wait).
fn wait_applied(replica: &Replica, index: u64, logs: impl Fn() -> String) -> Status {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = replica.status();
        if let Some(status) = status
            && status.applied.is_some_and(|applied| applied >= index)
        {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "replica {} did not apply index {index} within {WAIT:?}: {:?}; logs:\n{}",
            replica.id,
            replica.status(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An operator grows the running cluster of three to four and shrinks it
/// back, while phones pay: a fourth replica initialised with `init --join`
/// and the others' certificates, started, and added with `cluster add`
/// against the leader (after the leader compacted its log, so it starts
/// from a snapshot); later taken out with `cluster remove`. Before that, a
/// `cluster add` of a replica that is not running must leave it a learner,
/// which `cluster remove` takes out. Payments settle throughout; the new
/// replica catches up and holds every outcome told before it was removed;
/// afterwards the three hold identical ledgers with every outcome any phone
/// was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_adds_a_replica_and_removes_it_while_phones_pay() {
    let seed = seed();
    println!("cluster: membership, seed {seed}");
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut replicas = init_cluster(dir.path(), SMALL_SNAPSHOTS);
    // The new replica's identity: it joins no cluster yet, trusts the three
    // and takes the cluster's admin credential.
    let [phones, peers] = process::free_addrs(2)[..] else {
        unreachable!("two addresses")
    };
    let mut fourth = Replica::new(dir.path(), 4, phones, peers, SMALL_SNAPSHOTS);
    let out = fourth.init(
        true,
        Some(&replicas[0].data.join("admin.key")),
        &replicas.iter().collect::<Vec<_>>(),
    );
    assert!(out.contains("joining an existing cluster"), "{out}");
    let log_files: Vec<PathBuf> = replicas
        .iter()
        .chain([&fourth])
        .map(|replica| replica.log.clone())
        .collect();
    let all_logs = || log_tails(log_files.iter().map(PathBuf::as_path));

    // Phones are given every replica, the fourth included.
    let addresses = addresses(replicas.iter().chain([&fourth]));
    let admin = wire::admin_credential(&replicas[0].data);
    let endpoint =
        ClientEndpoint::new(addresses[0].fingerprint, addresses[0].addr).expect("endpoint");
    let accounts = open_accounts(&endpoint, &addresses, &admin, 4).await;
    let heard: Heard = Arc::default();
    let settled = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let payers = start_payers(
        &endpoint, &addresses, accounts, &heard, &settled, &stopped, seed,
    )
    .await;
    settle_more(&settled, 20, "three replicas", all_logs).await;
    // By now the leader has compacted its log: the fourth can only start
    // from a snapshot, sent over the replication endpoint.
    let leader = leader_among(&replicas.iter().collect::<Vec<_>>(), all_logs);
    let deadline = Instant::now() + WAIT;
    while leader.status().is_none_or(|status| status.purged.is_none()) {
        assert!(
            Instant::now() < deadline,
            "replica {} compacted no log within {WAIT:?}; logs:\n{}",
            leader.id,
            all_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An operator's slip: `cluster add` for a replica not running yet (here
    // a fifth, initialised but never started). It must not become a voter
    // (a dead voter would leave a cluster of four that survives no further
    // loss); the command waits for it to catch up instead, and once given
    // up, `cluster remove` takes the learner out again.
    let [phones, peers] = process::free_addrs(2)[..] else {
        unreachable!("two addresses")
    };
    let fifth = Replica::new(dir.path(), 5, phones, peers, &[]);
    fifth.init(
        true,
        Some(&replicas[0].data.join("admin.key")),
        &replicas.iter().collect::<Vec<_>>(),
    );
    let mut premature = leader.admin_command().expect("a running leader");
    premature
        .args(["cluster", "add", "--id", "5"])
        .args(["--client-addr", &fifth.phones.to_string()])
        .args(["--peer-addr", &fifth.peers.to_string()])
        .arg("--cert")
        .arg(fifth.cert())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut premature = premature.spawn().expect("spawn cluster add");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(exit) = premature.try_wait().expect("cluster add") {
            let output = premature.wait_with_output().expect("cluster add output");
            panic!(
                "cluster add of a replica that never ran ended ({exit}) at once: {}{}; leader: {:?}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                leader.status()
            );
        }
        let status = leader.status();
        if status
            .as_ref()
            .is_some_and(|status| status.learners.contains(&5))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica 5 never became a learner: {status:?}; logs:\n{}",
            all_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = leader.status().expect("status of the leader");
    assert!(
        premature.try_wait().expect("cluster add").is_none(),
        "cluster add of a replica that never ran returned"
    );
    assert_eq!(status.voters, [1, 2, 3], "{status:?}");
    assert_eq!(status.learners, [5], "{status:?}");
    premature.kill().expect("stop cluster add");
    premature.wait().expect("reap cluster add");
    let (leader, removed) = change_membership(
        &replicas.iter().collect::<Vec<_>>(),
        &["remove", "--id", "5"],
        all_logs,
    )
    .await;
    assert!(
        removed.contains("replica 5 removed; voters now 1, 2, 3"),
        "{removed}"
    );
    let status = leader.status().expect("status of the leader");
    assert!(
        status.voters == [1, 2, 3]
            && status.learners.is_empty()
            && status.followers.iter().all(|(id, _)| *id != 5),
        "replica 5 is still in the cluster: {status:?}"
    );

    // Started, the fourth waits to be added: a learner of nothing yet.
    fourth.start();
    let status = fourth.status().expect("status of replica 4");
    assert!(
        status.role == "learner" && status.voters.is_empty(),
        "replica 4 before it is added: {status:?}"
    );

    // Membership changes go through the leader: a follower refuses them.
    let leader = leader_among(&replicas.iter().collect::<Vec<_>>(), all_logs);
    let follower = replicas
        .iter()
        .find(|replica| replica.id != leader.id)
        .expect("a follower");
    let add = [
        "add",
        "--id",
        "4",
        "--client-addr",
        &fourth.phones.to_string(),
        "--peer-addr",
        &fourth.peers.to_string(),
        "--cert",
        &fourth.cert().display().to_string(),
    ];
    let refused = follower
        .cluster(&add)
        .await
        .expect_err("a follower refuses cluster add");
    assert!(refused.contains("409"), "{refused}");

    let held = leader
        .status()
        .and_then(|status| status.applied)
        .expect("the leader applied something");
    let adding = Instant::now();
    let (leader, added) =
        change_membership(&replicas.iter().collect::<Vec<_>>(), &add, all_logs).await;
    let add_took = adding.elapsed();
    assert!(
        added.contains("replica 4 added; voters now 1, 2, 3, 4"),
        "{added}"
    );
    let status = leader.status().expect("status of the leader");
    assert_eq!(status.voters, [1, 2, 3, 4], "{status:?}");
    assert!(status.learners.is_empty(), "{status:?}");
    // It became a voter only once it had what the leader held before.
    let matched = status
        .followers
        .iter()
        .find(|(id, _)| *id == 4)
        .and_then(|(_, matched)| *matched);
    assert!(
        matched >= Some(held),
        "replica 4 was made a voter at {matched:?}, behind the leader's {held}: {status:?}"
    );
    // The fourth catches up with the leader and votes.
    let applied = status.applied.expect("the leader applied something");
    let status = wait_applied(&fourth, applied, all_logs);
    assert!(
        status.role == "follower" && status.voters == [1, 2, 3, 4],
        "replica 4 after it was added: {status:?}"
    );
    let log = std::fs::read_to_string(&fourth.log).unwrap_or_default();
    assert!(
        log.contains("snapshot installed"),
        "replica 4 caught up without a snapshot; log:\n{log}"
    );
    settle_more(&settled, 20, "four replicas", all_logs).await;

    // Everything told so far is applied on the fourth before it leaves.
    let told_to_four = heard.lock().unwrap().clone();
    let leader = leader_among(
        &replicas.iter().chain([&fourth]).collect::<Vec<_>>(),
        all_logs,
    );
    let applied = leader
        .status()
        .and_then(|status| status.applied)
        .expect("the leader's applied index");
    wait_applied(&fourth, applied, all_logs);

    let removing = Instant::now();
    let (_, removed) = change_membership(
        &replicas.iter().chain([&fourth]).collect::<Vec<_>>(),
        &["remove", "--id", "4"],
        all_logs,
    )
    .await;
    let remove_took = removing.elapsed();
    assert!(
        removed.contains("replica 4 removed; voters now 1, 2, 3"),
        "{removed}"
    );
    let leader = leader_among(&replicas.iter().collect::<Vec<_>>(), all_logs);
    let status = leader.status().expect("status of the leader");
    assert_eq!(status.voters, [1, 2, 3], "{status:?}");
    assert!(status.learners.is_empty(), "{status:?}");
    settle_more(&settled, 20, "three replicas again", all_logs).await;

    let _ = stop.send(true);
    let mut phones = Vec::new();
    for payer in payers {
        phones.push(within(payer).await.expect("payer"));
    }
    wait_converged(&replicas, all_logs).await;
    close_phones(phones).await;
    for replica in replicas.iter_mut().chain([&mut fourth]) {
        replica.terminate();
    }

    let heard = heard.lock().unwrap().clone();
    let (applied, _) = check_replicas_agree(&replicas, &heard);
    let (fourth_applied, _) = check_ledger(&fourth, &told_to_four, &heard);
    println!(
        "cluster: replica 4 added in {:.0} ms and removed in {:.0} ms while paying; {} payments settled; {} outcomes heard, all on the 3 replicas (applied {:?}); the {} heard before 4 was removed all on 4 (applied {:?}); {:.1} s",
        add_took.as_secs_f64() * 1e3,
        remove_took.as_secs_f64() * 1e3,
        settled.load(Ordering::Relaxed),
        heard.len(),
        applied.map(|log_id| log_id.index),
        told_to_four.len(),
        fourth_applied.map(|log_id| log_id.index),
        started.elapsed().as_secs_f64(),
    );
}
