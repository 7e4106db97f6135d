//! Helpers to drive the real `tapledger-node` binary: run subcommands with a
//! time limit, start `run` on 127.0.0.1 with ports chosen by the OS, read the
//! addresses it prints, stop it with SIGTERM, and talk to it with the Rust
//! phone client and a minimal HTTP/1.1 GET.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tapledger_node::init::load_admin_credential;
use tapledger_node::{ApiCredentials, ClientEndpoint, HalfAnswer, Phone, Submitted};
use tapledger_protocol::{AccountId, Half, OutcomeReport, ReceiveHalf, Secret, SendHalf, TxKey};

pub const BIN: &str = env!("CARGO_BIN_EXE_tapledger-node");

/// Upper bound on any one wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// Runs `future` with the common time limit.
pub async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("timed out waiting")
}

/// A command for the binary with no TAPLEDGER_* variables inherited.
pub fn command() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("TAPLEDGER_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command
}

/// Waits for `child` at most `limit`, killing it if it overstays.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tapledger-node did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a subcommand to completion (bounded), with `stdin` as its input.
pub fn cli_with_input(data: &Path, args: &[&str], stdin: &str, envs: &[(&str, String)]) -> Output {
    let mut command = command();
    command
        .arg("--data")
        .arg(data)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in envs {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("spawn tapledger-node");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    // Outputs are small; read them after exit.
    let status = wait_bounded(&mut child, WAIT);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    Output {
        status,
        stdout,
        stderr,
    }
}

pub fn cli(data: &Path, args: &[&str]) -> Output {
    cli_with_input(data, args, "", &[])
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a subcommand that must succeed and returns its stdout.
pub fn cli_ok(data: &Path, args: &[&str]) -> String {
    let output = cli(data, args);
    assert!(
        output.status.success(),
        "tapledger-node {args:?} failed ({}):\n{}\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// A data directory made by `tapledger-node init`.
pub struct DataDirectory {
    pub dir: tempfile::TempDir,
}

impl DataDirectory {
    pub fn init() -> DataDirectory {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let out = cli_ok(&data, &["init"]);
        assert!(out.contains("certificate fingerprint"), "{out}");
        DataDirectory { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn admin(&self) -> Secret {
        load_admin_credential(&self.path().join("admin.key")).expect("admin credential")
    }
}

/// A running `tapledger-node run`.
pub struct NodeProcess {
    child: Child,
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub stderr_path: PathBuf,
    endpoint: ClientEndpoint,
}

impl NodeProcess {
    /// Starts `run` on ports the OS picks, with `extra` arguments after `run`.
    pub fn start(data: &DataDirectory, extra: &[&str]) -> NodeProcess {
        let stderr_path = data.file(&format!("node-{}.log", rand_suffix()));
        let stderr = std::fs::File::create(&stderr_path).expect("log file");
        let mut child = command()
            .arg("--data")
            .arg(data.path())
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
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
        let mut quic = None;
        let mut http = None;
        let mut fingerprint = None;
        let deadline = Instant::now() + WAIT;
        while quic.is_none() || http.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match receiver.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    panic!("node did not print its addresses; log:\n{log}");
                }
            };
            if let Some(rest) = line.strip_prefix("listening on ") {
                let (addr, rest) = rest.split_once(' ').expect("address and fingerprint");
                quic = Some(addr.parse::<SocketAddr>().expect("QUIC address"));
                let hex = rest
                    .trim_start_matches("(fingerprint ")
                    .trim_end_matches(')');
                fingerprint = Some(tapledger_certs::Fingerprint::parse(hex).expect("fingerprint"));
            } else if let Some(rest) = line.strip_prefix("metrics on http://") {
                let addr = rest.trim_end_matches("/metrics");
                http = Some(addr.parse::<SocketAddr>().expect("HTTP address"));
            }
        }
        let quic = quic.unwrap();
        let endpoint = ClientEndpoint::new(fingerprint.unwrap(), quic).expect("client endpoint");
        NodeProcess {
            child,
            quic,
            http: http.unwrap(),
            stderr_path,
            endpoint,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let sent = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM delivered");
        let status = wait_bounded(&mut self.child, WAIT);
        let log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        (status, log)
    }

    pub async fn connect(&self) -> Phone {
        within(self.endpoint.connect(self.quic, "localhost"))
            .await
            .expect("connect")
    }

    /// Opens an account over QUIC with the admin credential; returns it with
    /// a phone authenticated as it.
    pub async fn account(&self, admin: &Secret, bank: &str, opening_balance: u64) -> Account {
        let credentials = ApiCredentials::generate();
        let operator = self.connect().await;
        let id =
            within(operator.open_account(admin, "checking", bank, &credentials, opening_balance))
                .await
                .expect("open account");
        operator.close().await;
        let mut phone = self.connect().await;
        within(phone.authenticate(id, &credentials.key))
            .await
            .expect("authenticate");
        Account {
            id,
            phone: Arc::new(phone),
            credentials,
        }
    }

    /// A GET over plain HTTP/1.1; returns the status code and the body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // A test that panicked leaves no process behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub struct Account {
    pub id: AccountId,
    pub phone: Arc<Phone>,
    pub credentials: ApiCredentials,
}

pub fn send(tx_key: TxKey, sender_id: AccountId, amount: u64) -> Half {
    Half::Send(SendHalf {
        tx_key,
        sender_id,
        amount,
        device_os: "ios 18".into(),
        client_time: 1_700_000_000_000,
    })
}

pub fn receive(
    tx_key: TxKey,
    receiver_id: AccountId,
    expected_sender_id: AccountId,
    expected_amount: u64,
) -> Half {
    Half::Receive(ReceiveHalf {
        tx_key,
        receiver_id,
        expected_sender_id,
        expected_amount,
        device_os: "android 15".into(),
        client_time: 1_700_000_000_001,
    })
}

/// Both halves of a payment, each from its own phone; the payer's answer.
pub async fn pay(
    payer: &Account,
    payee: &Account,
    tx_key: TxKey,
    amount: u64,
    expected: u64,
) -> HalfAnswer {
    let first = within(payer.phone.submit(send(tx_key, payer.id, amount)))
        .await
        .expect("submit send half");
    let second = within(
        payee
            .phone
            .submit(receive(tx_key, payee.id, payer.id, expected)),
    )
    .await
    .expect("submit receive half");
    let payer_answer = within(first.answer()).await.expect("payer's answer");
    let payee_answer = within(second.answer()).await.expect("payee's answer");
    if let (HalfAnswer::Decided(payer_report), HalfAnswer::Decided(payee_report)) =
        (&payer_answer, &payee_answer)
    {
        // Each phone's report is written for its party; the outcome is one.
        assert_eq!(
            (payer_report.tx_key, payer_report.status, payer_report.code),
            (payee_report.tx_key, payee_report.status, payee_report.code),
            "both phones hear the same outcome"
        );
    }
    payer_answer
}

pub fn report(answer: &HalfAnswer) -> &OutcomeReport {
    match answer {
        HalfAnswer::Decided(report) => report,
        HalfAnswer::Refused { code, .. } => panic!("refused with {code:?}"),
    }
}

/// Submits a half and returns whether it was accepted or answered.
pub async fn submit(phone: &Phone, half: Half) -> Submitted {
    within(phone.submit(half)).await.expect("submit")
}

/// A minimal HTTP/1.1 GET over a TCP connection the server closes.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect HTTP");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read response");
        let response = String::from_utf8(response).expect("UTF-8 response");
        let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status code");
        (status, body.to_string())
    })
    .await
}

/// Prometheus text parsed into `name{labels}` -> value, checking that every
/// sample line has that shape and every metric has a TYPE line.
pub fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().expect("TYPE names a metric");
            let kind = parts.next().expect("TYPE names a kind");
            assert!(
                ["counter", "gauge", "histogram", "summary"].contains(&kind),
                "unknown type in {line}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("sample value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name: {line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| typed.contains(*base))
            })
            .unwrap_or(name);
        assert!(typed.contains(family), "no TYPE line before {line}");
        samples.insert(series.to_string(), value);
    }
    samples
}
