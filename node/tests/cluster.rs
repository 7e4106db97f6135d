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
//! `TAPLEDGER_CLUSTER_ROUNDS=N` runs N rounds (2 by default);
//! `TAPLEDGER_SEED` repeats a run's random choices.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tapledger_actors::Store;
use tapledger_node::init::load_admin_credential;
use tapledger_node::{
    ApiCredentials, ClientEndpoint, ClientError, HalfAnswer, Phone, ReplicaAddress, Submitted,
};
use tapledger_protocol::{AccountId, Half, OutcomeReport, ReceiveHalf, Secret, SendHalf, TxKey};

const BIN: &str = env!("CARGO_BIN_EXE_tapledger-node");
/// Upper bound on any one wait.
const WAIT: Duration = Duration::from_secs(30);
const REPLICAS: usize = 3;
const ROUNDS_DEFAULT: u64 = 2;
/// Well above a failover, so that honest halves never expire across one.
const HALF_TTL_SECS: u64 = 10;
/// Payment loops running at once, each between two accounts of its own.
const PAYERS: usize = 4;
const ACCOUNTS: usize = PAYERS * 2;
const OPENING_BALANCE: u64 = 1_000_000;

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("timed out waiting")
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
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("TAPLEDGER_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command.arg("--data").arg(data);
    command
}

fn run_ok(mut command: Command, what: &str) -> String {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Loopback addresses nobody listens on (a port the OS handed out and that
/// was released again).
fn free_addrs(count: usize) -> Vec<SocketAddr> {
    let sockets: Vec<std::net::UdpSocket> = (0..count)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    sockets
        .iter()
        .map(|socket| socket.local_addr().expect("address"))
        .collect()
}

/// One replica's files and addresses.
struct Replica {
    data: PathBuf,
    log: PathBuf,
    phones: SocketAddr,
    peers: SocketAddr,
    /// Where its HTTP server (status) listens, once started.
    http: Option<String>,
    process: Option<Child>,
}

impl Replica {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut child = command(&self.data)
            .args(["run", "--metrics-listen", "127.0.0.1:0"])
            .arg("--listen")
            .arg(self.phones.to_string())
            .arg("--peer-listen")
            .arg(self.peers.to_string())
            .args(["--half-ttl-secs", &HALF_TTL_SECS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn tapledger-node run");
        let stdout = child.stdout.take().expect("stdout");
        let (lines, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(line) if line.starts_with("replicating on ") => break,
                Ok(line) if line.starts_with("metrics on http://") => {
                    let addr = line["metrics on http://".len()..].trim_end_matches("/metrics");
                    self.http = Some(addr.to_string());
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "replica {} did not start; log:\n{}",
                        self.data.display(),
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
        }
        self.process = Some(child);
    }

    /// `tapledger-node status` of the running replica: (role, applied index).
    fn status(&self) -> Option<(String, Option<u64>)> {
        let http = self.http.as_ref()?;
        let mut status = command(&self.data);
        status.env("TAPLEDGER_METRICS_LISTEN", http).arg("status");
        let output = status.stdin(Stdio::null()).output().ok()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|rest| rest.trim().to_string())
        };
        let role = field("role")?.split_whitespace().next()?.to_string();
        let applied = field("applied")?.parse().ok();
        Some((role, applied))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.process.take() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().expect("reap");
            assert!(
                status.success(),
                "replica {} did not stop cleanly: {status}; log:\n{}",
                self.data.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Initialises three replicas as an operator would on three machines.
fn init_cluster(root: &Path) -> Vec<Replica> {
    let addrs = free_addrs(REPLICAS * 2);
    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|index| Replica {
            data: root.join(format!("replica-{}", index + 1)),
            log: root.join(format!("replica-{}.log", index + 1)),
            phones: addrs[index * 2],
            peers: addrs[index * 2 + 1],
            http: None,
            process: None,
        })
        .collect();
    // Each replica's identity first (joining nothing yet)...
    for (index, replica) in replicas.iter().enumerate() {
        let mut init = command(&replica.data);
        init.arg("init")
            .args(["--id", &(index + 1).to_string(), "--join"])
            .args(["--client-addr", &replica.phones.to_string()])
            .args(["--peer-addr", &replica.peers.to_string()]);
        if index > 0 {
            init.arg("--admin-key")
                .arg(replicas[0].data.join("admin.key"));
        }
        run_ok(init, "init identity");
    }
    // ...then each is told of the others, and they start a cluster together.
    for (index, replica) in replicas.iter().enumerate() {
        let mut init = command(&replica.data);
        init.arg("init")
            .args(["--id", &(index + 1).to_string()])
            .args(["--client-addr", &replica.phones.to_string()])
            .args(["--peer-addr", &replica.peers.to_string()]);
        for (other, peer) in replicas.iter().enumerate() {
            if other != index {
                init.arg("--peer").arg(format!(
                    "{}={},{},{}",
                    other + 1,
                    peer.phones,
                    peer.peers,
                    peer.data.join("node.crt.pem").display()
                ));
            }
        }
        let out = run_ok(init, "init cluster");
        assert!(out.contains("a new cluster of 3"), "{out}");
    }
    for replica in &mut replicas {
        replica.start();
    }
    replicas
}

/// The last lines of every replica's log, for a failure message.
fn logs(replicas: &[Replica]) -> String {
    replicas
        .iter()
        .map(|replica| {
            let text = std::fs::read_to_string(&replica.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(400)..].join("\n");
            format!("--- {}\n{tail}\n", replica.log.display())
        })
        .collect()
}

fn addresses(replicas: &[Replica]) -> Vec<ReplicaAddress> {
    replicas
        .iter()
        .map(|replica| {
            let cert = tapledger_certs::load_certificates(&replica.data.join("node.crt.pem"))
                .expect("certificate");
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

fn send(tx_key: TxKey, sender_id: AccountId, amount: u64) -> Half {
    Half::Send(SendHalf {
        tx_key,
        sender_id,
        amount,
        device_os: "ios 18".into(),
        client_time: 1_700_000_000_000,
    })
}

fn receive(tx_key: TxKey, receiver_id: AccountId, sender: AccountId, amount: u64) -> Half {
    Half::Receive(ReceiveHalf {
        tx_key,
        receiver_id,
        expected_sender_id: sender,
        expected_amount: amount,
        device_os: "android 15".into(),
        client_time: 1_700_000_000_001,
    })
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
) -> Vec<Account> {
    let mut accounts = Vec::new();
    let mut first = 0;
    let deadline = Instant::now() + WAIT;
    while accounts.len() < ACCOUNTS {
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
    let mut replicas = init_cluster(dir.path());
    let addresses = addresses(&replicas);
    let admin = load_admin_credential(&replicas[0].data.join("admin.key")).expect("admin");
    let endpoint =
        ClientEndpoint::new(addresses[0].fingerprint, addresses[0].addr).expect("endpoint");

    let accounts = open_accounts(&endpoint, &addresses, &admin).await;
    let probe = Account {
        id: accounts[0].id,
        key: accounts[0].key.clone(),
    };
    let heard: Heard = Arc::default();
    let settled = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut payers = Vec::new();
    let mut accounts = accounts.into_iter();
    for index in 0..PAYERS {
        let (Some(from), Some(to)) = (accounts.next(), accounts.next()) else {
            unreachable!("two accounts per payer")
        };
        let sender = LeaderPhone::connect(&endpoint, &addresses, from).await;
        let receiver = LeaderPhone::connect(&endpoint, &addresses, to).await;
        payers.push(tokio::spawn(payer(
            sender,
            receiver,
            heard.clone(),
            settled.clone(),
            stopped.clone(),
            seed ^ index as u64,
        )));
    }

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
    let mut phones = Vec::new();
    for payer in payers {
        phones.push(within(payer).await.expect("payer"));
    }
    // Wait until every replica, the restarted ones included, has applied
    // what the leader has; then stop everything.
    let deadline = Instant::now() + WAIT;
    loop {
        let statuses: Vec<_> = replicas.iter().map(Replica::status).collect();
        let applied: Vec<Option<u64>> = statuses
            .iter()
            .map(|status| status.as_ref().and_then(|(_, applied)| *applied))
            .collect();
        let led = statuses
            .iter()
            .any(|status| matches!(status, Some((role, _)) if role == "leader"));
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
            logs(&replicas)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (sender, receiver) in phones {
        sender.phone.close().await;
        receiver.phone.close().await;
    }
    for replica in &mut replicas {
        replica.terminate();
    }

    let heard = heard.lock().unwrap().clone();
    let mut digests = Vec::new();
    for replica in &replicas {
        let store = Store::open(&replica.data.join("ledger.redb")).expect("ledger opens");
        let audit = store.audit().expect("audit");
        assert!(
            audit.is_ok(),
            "{}: {:#?}",
            replica.data.display(),
            audit.problems
        );
        for ((tx_key, party), report) in &heard {
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
        digests.push((
            store.raft_state().expect("raft state").0,
            store.digest().expect("digest"),
        ));
    }
    assert!(
        digests.windows(2).all(|pair| pair[0] == pair[1]),
        "replicas differ after the run: {digests:?}"
    );
    println!(
        "cluster: {rounds} leader kills; {} payments settled; {} outcomes heard, all on all {REPLICAS} replicas; applied {:?}",
        settled.load(Ordering::Relaxed),
        heard.len(),
        digests[0].0.map(|log_id| log_id.index)
    );
}
