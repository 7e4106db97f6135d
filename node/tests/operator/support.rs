//! Helpers to drive the real `tapledger-node` binary: run subcommands with a
//! time limit, start `run` on 127.0.0.1 with ports chosen by the OS, read the
//! addresses it prints, stop it with SIGTERM, and talk to it with the Rust
//! phone client and a minimal HTTP/1.1 GET.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::Arc;

use tapledger_node::{ApiCredentials, ClientEndpoint, HalfAnswer, Phone, Submitted};
use tapledger_protocol::{AccountId, Half, OutcomeReport, Secret, TxKey};
pub use tapledger_test_kit::process::wait_bounded;
pub use tapledger_test_kit::{WAIT, receive, send, within};
use tapledger_test_kit::{process, wire};

pub const BIN: &str = env!("CARGO_BIN_EXE_tapledger-node");

/// A command for the binary with no TAPLEDGER_* variables inherited.
pub fn command() -> Command {
    process::command(BIN)
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
        wire::admin_credential(&self.path())
    }
}

/// A running `tapledger-node run`, with a client endpoint pinned to it.
pub struct NodeProcess {
    process: process::NodeProcess,
    pub quic: SocketAddr,
    pub http: SocketAddr,
    endpoint: ClientEndpoint,
}

impl NodeProcess {
    /// Starts `run` on ports the OS picks, with `extra` arguments after `run`.
    pub fn start(data: &DataDirectory, extra: &[&str]) -> NodeProcess {
        let log = data.file(&format!("node-{}.log", rand_suffix()));
        let mut run = command();
        run.arg("--data")
            .arg(data.path())
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(extra);
        let process = process::NodeProcess::start(run, &log, WAIT, |announced| {
            announced.listens() && announced.metrics.is_some()
        });
        NodeProcess {
            quic: process.quic(),
            http: process.http(),
            endpoint: process.endpoint(),
            process,
        }
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub fn terminate(self) -> (ExitStatus, String) {
        self.process.terminate(WAIT)
    }

    pub async fn connect(&self) -> Phone {
        within(self.endpoint.connect(self.quic, wire::SERVER_NAME))
            .await
            .expect("connect")
    }

    /// Opens an account over QUIC with the admin credential; returns it with
    /// a phone authenticated as it.
    pub async fn account(&self, admin: &Secret, bank: &str, opening_balance: u64) -> Account {
        let opened = within(wire::open_account(
            &self.endpoint,
            self.quic,
            admin,
            "checking",
            bank,
            opening_balance,
        ))
        .await
        .expect("open account");
        let phone = within(wire::authenticated_phone(
            &self.endpoint,
            self.quic,
            opened.id,
            &opened.credentials,
        ))
        .await
        .expect("authenticate");
        Account {
            id: opened.id,
            phone: Arc::new(phone),
            credentials: opened.credentials,
        }
    }

    /// A GET over plain HTTP/1.1; returns the status code and the body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
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
