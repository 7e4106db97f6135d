//! The operator's view, end to end: every test runs the real `tapledger-node`
//! binary on 127.0.0.1 (ports chosen by the OS), drives it with the Rust phone
//! client, a plain HTTP GET and its own subcommands, and stops it with
//! SIGTERM. Every wait is bounded (`support::WAIT`).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tapledger_node::HalfAnswer;
use tapledger_node::init::hex;
use tapledger_node::ops::open_existing;
use tapledger_protocol::{OutcomeReport, OutcomeStatus, QueryStatus, RejectCode, Secret, TxKey};

use support::*;

/// Goal: a fresh node that has done nothing yet serves every metric README
/// documents (issue 12: two appeared only once used, which breaks
/// dashboards and alerts). Method: the names in README's metrics table,
/// looked for in the first scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_serves_every_documented_metric() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let documented: Vec<&str> = readme
        .lines()
        .filter(|line| line.starts_with("| `tapledger_"))
        .flat_map(|line| line.split('|').nth(1).unwrap_or_default().split('`'))
        .filter(|word| word.starts_with("tapledger_"))
        .map(|name| name.split('{').next().unwrap_or(name))
        .collect();
    assert!(
        documented.len() >= 25,
        "README's metrics table: {documented:?}"
    );
    let data = DataDirectory::init();
    let node = NodeProcess::start(&data, &[]);
    let (status, body) = node.get("/metrics").await;
    assert_eq!(status, 200, "{body}");
    for name in documented {
        // The follower lag has a series per follower: none in a cluster of one.
        if name == "tapledger_raft_follower_lag_entries" {
            continue;
        }
        assert!(
            body.lines()
                .any(|line| !line.starts_with('#') && line.starts_with(name)),
            "{name} is documented but missing from a fresh node's /metrics:\n{body}"
        );
    }
}

/// Goal: the metrics endpoint serves valid Prometheus text whose counters
/// match what the node did, health answers, and the JSON logs carry the
/// tx_key span but never a secret. Method: a real node with a 2 s half TTL;
/// a settlement, an amount mismatch, a refused half, a failed
/// authentication and an expired lone half; then scrape and parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_node_did_and_logs_keep_secrets() {
    let data = DataDirectory::init();
    let node = NodeProcess::start(
        &data,
        &[
            "--half-ttl-secs",
            "2",
            "--log-format",
            "json",
            "--log",
            "info,tapledger_node=debug",
        ],
    );
    let admin = data.admin();
    let alice = node.account(&admin, "North Bank", 1_000).await;
    let bob = node.account(&admin, "South Bank", 0).await;

    let settled = TxKey::new_random();
    let answer = pay(&alice, &bob, settled, 300, 300).await;
    assert_eq!(report(&answer).status, OutcomeStatus::Settled);
    let mismatched = TxKey::new_random();
    let answer = pay(&alice, &bob, mismatched, 100, 150).await;
    assert_eq!(report(&answer).code, Some(RejectCode::AmountMismatch));
    let refused = submit(&alice.phone, send(TxKey::new_random(), bob.id, 5)).await;
    let refused = within(refused.answer()).await.unwrap();
    assert!(
        matches!(
            refused,
            HalfAnswer::Refused {
                code: RejectCode::WrongParty,
                ..
            }
        ),
        "{refused:?}"
    );
    let mut intruder = node.connect().await;
    let wrong_key = Secret::new(vec![0x5a; 32]);
    assert!(
        within(intruder.authenticate(alice.id, &wrong_key))
            .await
            .is_err()
    );
    let lone = TxKey::new_random();
    let lone_half = submit(&bob.phone, receive(lone, bob.id, alice.id, 40)).await;
    let expired = within(lone_half.answer()).await.expect("expiry is pushed");
    assert_eq!(report(&expired).code, Some(RejectCode::Expired));

    let (status, body) = node.get("/metrics").await;
    assert_eq!(status, 200, "{body}");
    let samples = parse_prometheus(&body);
    let value = |series: &str| -> f64 {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing from:\n{body}"))
    };
    assert_eq!(value("tapledger_settlements_total"), 1.0);
    assert_eq!(value("tapledger_settled_amount_total"), 300.0);
    assert_eq!(value(r#"tapledger_rejections_total{code="300"}"#), 1.0);
    assert_eq!(value(r#"tapledger_rejections_total{code="500"}"#), 1.0);
    assert_eq!(value(r#"tapledger_rejections_total{code="100"}"#), 0.0);
    assert_eq!(value("tapledger_expiries_total"), 1.0);
    assert_eq!(value(r#"tapledger_half_refusals_total{code="620"}"#), 1.0);
    assert_eq!(value(r#"tapledger_fundings_total{kind="opening"}"#), 2.0);
    assert_eq!(value("tapledger_halves_received_total"), 6.0);
    assert_eq!(value("tapledger_auth_failures_total"), 1.0);
    assert_eq!(value("tapledger_pending_halves"), 0.0);
    assert_eq!(value("tapledger_ready"), 1.0);
    assert!(value("tapledger_connections_accepted_total") >= 5.0);
    assert!(value("tapledger_connections_open") >= 2.0);
    assert!(value("tapledger_live_account_actors") >= 0.0);
    let commits = value("tapledger_commits_total");
    assert!(commits >= 1.0);
    assert!(value("tapledger_commit_intents_total") >= commits);
    assert!(value("tapledger_commit_batch_intents_mean") >= 1.0);
    // Two first halves waited, two second halves decided their key, one was refused.
    assert_eq!(
        value(r#"tapledger_half_durable_seconds_count{result="decided"}"#),
        2.0
    );
    assert_eq!(
        value(r#"tapledger_half_durable_seconds_count{result="pending"}"#),
        3.0
    );
    assert_eq!(
        value(r#"tapledger_half_durable_seconds_count{result="refused"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tapledger_half_durable_seconds_bucket{result="decided",le="+Inf"}"#),
        2.0
    );

    assert_eq!(node.get("/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(node.get("/readyz").await, (200, "ready\n".to_string()));
    assert_eq!(node.get("/nowhere").await.0, 404);
    assert_eq!(node.get("/admin/backup").await.0, 405);

    intruder.close().await;
    let (status, log) = tokio::task::spawn_blocking(move || node.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");

    // A half's events carry its tx_key as a field (there is no span per
    // half: halves are handled in batches) and sit inside the span of the
    // connection it arrived on.
    let mut half_events_with_settled_key = 0;
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        if event["tx_key"] == settled.to_string().as_str() {
            half_events_with_settled_key += 1;
            let spans = event["spans"].as_array().cloned().unwrap_or_default();
            assert!(
                spans.iter().any(|span| span["name"] == "connection"),
                "a half's event sits inside its connection's span: {line}"
            );
        }
    }
    assert!(
        half_events_with_settled_key >= 2,
        "both halves logged with their tx_key:\n{log}"
    );
    for secret in [
        &admin,
        &alice.credentials.key,
        &bob.credentials.key,
        &wrong_key,
    ] {
        let bytes = secret.expose();
        assert!(!log.contains(&hex(bytes)), "a secret in hex is in the log");
        let listed = format!("{:?}", &bytes[..8]);
        assert!(
            !log.contains(listed.trim_start_matches('[').trim_end_matches(']')),
            "a secret's bytes are in the log"
        );
    }
}

/// Goal: SIGTERM while phones are paying loses nothing that was
/// acknowledged, and the books still balance. Method: six payer/payee pairs
/// pay in a loop; after at least 40 acknowledged outcomes the node gets
/// SIGTERM; every acknowledged outcome and every acknowledged (durably
/// pending) half must be in the ledger file, `audit` must pass, and a
/// restarted node must tell a reconnecting phone the same outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_acknowledged_outcome() {
    const PAIRS: usize = 6;
    const ACKNOWLEDGED_BEFORE_SIGTERM: usize = 40;
    let data = DataDirectory::init();
    let node = NodeProcess::start(&data, &["--grace-secs", "5"]);
    let admin = data.admin();
    let mut pairs = Vec::new();
    for _ in 0..PAIRS {
        let payer = node.account(&admin, "North Bank", 1_000_000).await;
        let payee = node.account(&admin, "South Bank", 0).await;
        pairs.push((payer, payee));
    }

    // Every final answer a phone received: key, the phone's account, report.
    let decided: Arc<Mutex<Vec<(TxKey, u64, OutcomeReport)>>> = Arc::default();
    let durable_halves: Arc<Mutex<Vec<TxKey>>> = Arc::default();
    let mut loops = tokio::task::JoinSet::new();
    for (index, (payer, payee)) in pairs.iter().enumerate() {
        let (payer_phone, payee_phone) = (payer.phone.clone(), payee.phone.clone());
        let (payer_id, payee_id) = (payer.id, payee.id);
        let (decided, durable_halves) = (decided.clone(), durable_halves.clone());
        loops.spawn(async move {
            for round in 0..100_000u64 {
                let tx_key = TxKey::new_random();
                // Every seventh payment is a mismatch, so rejections are in the mix.
                let expected = if round % 7 == (index as u64) % 7 {
                    2
                } else {
                    1
                };
                let Ok(first) = payer_phone.submit(send(tx_key, payer_id, 1)).await else {
                    return;
                };
                if matches!(first, tapledger_node::Submitted::Accepted(_)) {
                    durable_halves.lock().unwrap().push(tx_key);
                }
                let Ok(second) = payee_phone
                    .submit(receive(tx_key, payee_id, payer_id, expected))
                    .await
                else {
                    return;
                };
                for (party, answer) in [
                    (payer_id, first.answer().await),
                    (payee_id, second.answer().await),
                ] {
                    match answer {
                        Ok(HalfAnswer::Decided(report)) => {
                            decided.lock().unwrap().push((tx_key, party, report))
                        }
                        Ok(other) => panic!("unexpected answer {other:?}"),
                        // Shutting down (1101) or disconnected: stop paying.
                        Err(_) => return,
                    }
                }
            }
        });
    }
    within(async {
        while decided.lock().unwrap().len() < ACKNOWLEDGED_BEFORE_SIGTERM {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let sigterm_at = Instant::now();
    let (status, log) = tokio::task::spawn_blocking(move || node.terminate())
        .await
        .unwrap();
    let shutdown_took = sigterm_at.elapsed();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(log.contains("stopped"), "clean stop logged:\n{log}");
    within(async { while loops.join_next().await.is_some() {} }).await;
    eprintln!(
        "SIGTERM to exit: {shutdown_took:?}; {} answers acknowledged",
        decided.lock().unwrap().len()
    );

    let audit = cli(&data.path(), &["audit"]);
    assert!(
        audit.status.success(),
        "audit after SIGTERM:\n{}{}",
        text(&audit.stdout),
        text(&audit.stderr)
    );
    let decided = decided.lock().unwrap().clone();
    let durable_halves = durable_halves.lock().unwrap().clone();
    {
        let store = open_existing(&data.path().join("ledger.redb")).expect("ledger");
        for (tx_key, _, report) in &decided {
            let outcome = store
                .outcome(*tx_key)
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged outcome of {tx_key} lost"));
            assert_eq!(
                outcome.is_settled(),
                report.status == OutcomeStatus::Settled
            );
            assert_eq!(outcome.code(), report.code, "{tx_key}");
        }
        for tx_key in &durable_halves {
            assert!(
                store.outcome(*tx_key).unwrap().is_some()
                    || store.pending(*tx_key).unwrap().is_some(),
                "acknowledged half of {tx_key} lost"
            );
        }
    }

    // A restarted node tells a returning phone the same outcomes.
    let node = NodeProcess::start(&data, &[]);
    let (payer, _) = &pairs[0];
    let mut phone = node.connect().await;
    within(phone.authenticate(payer.id, &payer.credentials.key))
        .await
        .expect("authenticate after restart");
    let mut checked = 0;
    for (tx_key, _, report) in decided.iter().filter(|(_, party, _)| *party == payer.id) {
        let (status, again) = within(phone.query_outcome(*tx_key)).await.unwrap();
        assert_eq!(status, QueryStatus::Decided);
        assert_eq!(again.as_ref(), Some(report));
        checked += 1;
    }
    assert!(checked > 0, "pair 0 had acknowledged outcomes");
    phone.close().await;
    let (status, log) = tokio::task::spawn_blocking(move || node.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");
}

/// Goal: a backup of a running node restores into a working node. Method:
/// pay 250, back up and audit through the running node, pay 100 more, top up
/// online, stop; export the CSV; restore the backup; the restored node
/// serves the balances of the backup's moment to a returning phone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_of_a_running_node_restores_and_serves() {
    let data = DataDirectory::init();
    let node = NodeProcess::start(&data, &[]);
    let admin = data.admin();
    let alice = node.account(&admin, "North Bank", 1_000).await;
    let bob = node.account(&admin, "South Bank", 0).await;
    pay(&alice, &bob, TxKey::new_random(), 250, 250).await;

    let backup = data.file("backup.redb");
    let backup_arg = backup.to_str().unwrap();
    let running = [("TAPLEDGER_METRICS_LISTEN", node.http.to_string())];
    let taken = cli_with_input(&data.path(), &["backup", "--to", backup_arg], "", &running);
    let taken_out = text(&taken.stdout);
    assert!(taken.status.success(), "{taken_out}{}", text(&taken.stderr));
    assert!(taken_out.contains("by the running node"), "{taken_out}");
    assert!(taken_out.contains("OK: "), "{taken_out}");
    let again = cli_with_input(&data.path(), &["backup", "--to", backup_arg], "", &running);
    assert_eq!(
        again.status.code(),
        Some(2),
        "an existing backup is never overwritten"
    );

    let audited = cli_with_input(&data.path(), &["audit"], "", &running);
    assert!(audited.status.success(), "{}", text(&audited.stderr));
    assert!(text(&audited.stdout).contains("by the running node"));

    pay(&alice, &bob, TxKey::new_random(), 100, 100).await;
    let quic = [("TAPLEDGER_LISTEN", node.quic.to_string())];
    let alice_id = alice.id.to_string();
    let topped = cli_with_input(
        &data.path(),
        &["topup", "--account", &alice_id, "--amount", "5"],
        "",
        &quic,
    );
    assert!(topped.status.success(), "{}", text(&topped.stderr));
    assert!(
        text(&topped.stdout).contains("balance 655 (by the running node"),
        "{}",
        text(&topped.stdout)
    );
    let (status, _) = tokio::task::spawn_blocking(move || node.terminate())
        .await
        .unwrap();
    assert!(status.success());

    let csv_path = data.file("outcomes.csv");
    let exported = cli_ok(
        &data.path(),
        &["export", "--out", csv_path.to_str().unwrap()],
    );
    assert!(exported.contains("2 settled, 0 rejected"), "{exported}");
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    assert!(
        csv.starts_with("transaction_key,account_number_sender,account_number_receiver,"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 3, "{csv}");

    let restored = cli_ok(&data.path(), &["restore", "--from", backup_arg]);
    assert!(restored.contains("previous ledger moved to"), "{restored}");
    assert!(restored.contains("OK: "), "{restored}");
    let shown = cli_ok(&data.path(), &["accounts", "show", &bob.id.to_string()]);
    assert!(shown.contains("balance   250\n"), "{shown}");

    let node = NodeProcess::start(&data, &[]);
    let mut phone = node.connect().await;
    within(phone.authenticate(bob.id, &bob.credentials.key))
        .await
        .unwrap();
    assert_eq!(within(phone.balance()).await.unwrap(), 250);
    phone.close().await;
    let (status, _) = tokio::task::spawn_blocking(move || node.terminate())
        .await
        .unwrap();
    assert!(status.success());
}

/// Goal: a tampered ledger fails `audit` with exit status 1 naming the
/// account, and offline commands read and top up a stopped node's ledger.
/// Method: pay, stop, top up offline, then change one account's record
/// with redb directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_names_a_tampered_account_and_exits_one() {
    let data = DataDirectory::init();
    let node = NodeProcess::start(&data, &[]);
    let admin = data.admin();
    let alice = node.account(&admin, "North Bank", 1_000).await;
    let bob = node.account(&admin, "South Bank", 0).await;
    pay(&alice, &bob, TxKey::new_random(), 400, 400).await;
    let (status, _) = tokio::task::spawn_blocking(move || node.terminate())
        .await
        .unwrap();
    assert!(status.success());

    let topped = cli_ok(
        &data.path(),
        &["topup", "--account", &bob.id.to_string(), "--amount", "10"],
    );
    assert!(topped.contains("balance 410 (node stopped"), "{topped}");
    let listed = cli_ok(&data.path(), &["accounts", "list"]);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    let history = cli_ok(&data.path(), &["accounts", "history", &bob.id.to_string()]);
    assert!(
        history.contains("received") && history.contains("top-up"),
        "{history}"
    );
    assert!(cli_ok(&data.path(), &["audit"]).contains("OK: "));

    {
        let database = redb::Database::create(data.path().join("ledger.redb")).unwrap();
        let write = database.begin_write().unwrap();
        {
            // The store's layout (schema 5): account -> checksum (16 bytes),
            // then its record. (Balances are written behind: a ledger this
            // young holds them in its journal tail, not in `balances`.)
            // Change the record and leave the checksum: the damage a disk
            // does.
            let accounts: redb::TableDefinition<u64, &[u8]> =
                redb::TableDefinition::new("accounts");
            let mut table = write.open_table(accounts).unwrap();
            use redb::ReadableTable;
            let mut record = table
                .get(bob.id)
                .unwrap()
                .expect("bob's account")
                .value()
                .to_vec();
            let last = record.len() - 1;
            record[last] ^= 0x5a;
            table.insert(bob.id, record.as_slice()).unwrap();
        }
        write.commit().unwrap();
    }
    let audit = cli(&data.path(), &["audit"]);
    let out = text(&audit.stdout);
    assert_eq!(audit.status.code(), Some(1), "{out}");
    assert!(out.contains("FAILED"), "{out}");
    assert!(
        out.contains(&format!("accounts involved: {}", bob.id)),
        "{out}"
    );
    // A node does not serve from it (issue 13): it exits at once, saying why.
    let refused = cli(
        &data.path(),
        &["run", "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
    );
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("failed its integrity check") && stderr.contains("accounts"),
        "{stderr}"
    );
    // Unless asked to serve it for inspection: HTTP only, never ready, the
    // audit read from the damaged file, no phone served.
    let before = std::fs::read(data.path().join("ledger.redb")).unwrap();
    let inspected = inspect_process(&data);
    let (status, body) = http_get(inspected.1, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("damaged") && body.contains("accounts"),
        "{body}"
    );
    let (status, body) = within(tapledger_node::telemetry::admin_request(
        inspected.1,
        "/admin/audit",
        &data.admin(),
        String::new(),
    ))
    .await
    .expect("admin audit");
    assert_eq!(status.as_u16(), 409, "{body}");
    assert!(
        body.contains(&format!("accounts involved: {}", bob.id)),
        "{body}"
    );
    let (exit, log) = stop_process(inspected.0);
    assert!(exit.success(), "{log}");
    assert!(std::fs::read(data.path().join("ledger.redb")).unwrap() == before);
}

/// `run --inspect` on this data directory, once it printed its HTTP address.
fn inspect_process(data: &DataDirectory) -> (std::process::Child, std::net::SocketAddr) {
    use std::io::BufRead;
    let mut child = command()
        .arg("--data")
        .arg(data.path())
        .args(["run", "--inspect", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn tapledger-node run --inspect");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = receiver.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("run --inspect did not print its HTTP address");
        };
        if let Some(rest) = line.strip_prefix("metrics on http://") {
            let addr = rest.trim_end_matches("/metrics").parse().expect("address");
            return (child, addr);
        }
    }
}

/// SIGTERM, then a bounded wait.
fn stop_process(mut child: std::process::Child) -> (std::process::ExitStatus, String) {
    // SAFETY: kill(2) on the child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    (wait_bounded(&mut child, WAIT), String::new())
}

/// Goal: `reset` asks first, and never touches what is not a ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_asks_first_and_refuses_foreign_files() {
    let data = DataDirectory::init();
    let node = NodeProcess::start(&data, &[]);
    node.account(&data.admin(), "North Bank", 10).await;
    // A running node's ledger is refused.
    let locked = cli(&data.path(), &["reset", "--yes"]);
    assert_eq!(locked.status.code(), Some(2));
    assert!(
        text(&locked.stderr).contains("locked"),
        "{}",
        text(&locked.stderr)
    );
    let (status, _) = tokio::task::spawn_blocking(move || node.terminate())
        .await
        .unwrap();
    assert!(status.success());

    let declined = cli_with_input(&data.path(), &["reset"], "no\n", &[]);
    assert_eq!(declined.status.code(), Some(2));
    assert!(
        text(&declined.stderr).contains("not confirmed"),
        "{}",
        text(&declined.stderr)
    );
    assert!(
        text(&declined.stderr).contains("1 account(s)"),
        "{}",
        text(&declined.stderr)
    );
    assert_eq!(
        cli_ok(&data.path(), &["accounts", "list"]).lines().count(),
        2
    );

    let confirmed = cli_with_input(&data.path(), &["reset"], "reset\n", &[]);
    assert!(confirmed.status.success(), "{}", text(&confirmed.stderr));
    assert_eq!(
        cli_ok(&data.path(), &["accounts", "list"]).lines().count(),
        1
    );

    let ledger = data.path().join("ledger.redb");
    std::fs::write(&ledger, b"someone else's file").unwrap();
    let refused = cli(&data.path(), &["reset", "--yes"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("not a redb file"),
        "{}",
        text(&refused.stderr)
    );
    assert!(std::fs::read(&ledger).unwrap() == b"someone else's file");
}

/// Goal (issue 12): operator mistakes get one clear line each and a failing
/// exit status: `reset` of a data directory that does not exist, an
/// address in use (the OS error once, not twice), a bad TOML value, an
/// unknown flag.
#[test]
fn operator_mistakes_get_one_line_each_and_exit_2() {
    let missing = tempfile::tempdir().unwrap().path().join("nowhere");
    let reset = cli(&missing, &["reset", "--yes"]);
    assert_eq!(reset.status.code(), Some(2), "{}", text(&reset.stdout));
    assert!(
        text(&reset.stderr).contains("no ledger"),
        "{}",
        text(&reset.stderr)
    );
    assert!(!missing.exists(), "reset created {}", missing.display());

    let data = DataDirectory::init();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let busy = cli(
        &data.path(),
        &["run", "--listen", &addr, "--metrics-listen", "off"],
    );
    assert_eq!(busy.status.code(), Some(2));
    let stderr = text(&busy.stderr);
    let error_lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error"))
        .collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(error_lines[0].contains(&addr), "{stderr}");
    assert_eq!(
        error_lines[0].matches("os error").count(),
        1,
        "the OS error once: {stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "half_ttl_secs = 60\nlisten = nowhere\n").unwrap();
    let bad_file = cli_with_input(
        &data.path(),
        &["--config", file.to_str().unwrap(), "config"],
        "",
        &[],
    );
    assert_eq!(bad_file.status.code(), Some(2));
    let stderr = text(&bad_file.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("node.toml: line 2, column 10"), "{stderr}");

    let unknown = cli(&data.path(), &["run", "--no-such-flag"]);
    assert_eq!(unknown.status.code(), Some(2));
    let stderr = text(&unknown.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

/// Goal (issue 12): a node refuses to use a secret other users can read,
/// as ssh does: the TLS key at 0644, the admin credential at 0666; with
/// the modes put back, it starts.
#[cfg(unix)]
#[test]
fn secrets_open_to_other_users_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let data = DataDirectory::init();
    let set_mode = |name: &str, mode: u32| {
        std::fs::set_permissions(
            data.path().join(name),
            std::fs::Permissions::from_mode(mode),
        )
        .unwrap()
    };
    let run = || {
        cli(
            &data.path(),
            &["run", "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
        )
    };
    for (name, mode) in [("node.key.pem", 0o644), ("admin.key", 0o666)] {
        set_mode(name, mode);
        let refused = run();
        assert_eq!(refused.status.code(), Some(2), "{name} at {mode:o}");
        let stderr = text(&refused.stderr);
        assert!(
            stderr.contains(name) && stderr.contains("chmod 600"),
            "{name}: {stderr}"
        );
        set_mode(name, 0o600);
    }
    // Copying a credential from a file others can read is refused too.
    set_mode("admin.key", 0o640);
    let other = tempfile::tempdir().unwrap();
    let admin = data.path().join("admin.key");
    let copied = cli(
        other.path(),
        &["init", "--admin-key", admin.to_str().unwrap()],
    );
    assert_eq!(copied.status.code(), Some(2));
    assert!(
        text(&copied.stderr).contains("chmod 600"),
        "{}",
        text(&copied.stderr)
    );
}

/// Goal (issue 13): `audit`, `export`, `accounts` and `status` only read: a
/// backup's bytes are the same before and after them (they used to open the
/// file for writing, which changes it), and they work on a read-only file.
/// A file that was not closed cleanly (a node killed) is recovered in
/// memory and read, and is not changed either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_commands_never_change_the_file() {
    let data = DataDirectory::init();
    let node = NodeProcess::start(&data, &[]);
    let (alice, bob) = (
        node.account(&data.admin(), "North Bank", 1_000).await,
        node.account(&data.admin(), "South Bank", 0).await,
    );
    pay(&alice, &bob, TxKey::new_random(), 250, 250).await;
    let backup = data.file("backup.redb");
    let running = [("TAPLEDGER_METRICS_LISTEN", node.http.to_string())];
    let taken = cli_with_input(
        &data.path(),
        &["backup", "--to", backup.to_str().unwrap()],
        "",
        &running,
    );
    assert!(taken.status.success(), "{}", text(&taken.stderr));
    let (status, _) = tokio::task::spawn_blocking(move || node.terminate())
        .await
        .unwrap();
    assert!(status.success());

    for file in [backup.clone(), data.path().join("ledger.redb")] {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
        }
        let before = std::fs::read(&file).unwrap();
        let ledger = file.to_str().unwrap();
        let out = data.file("read-only.csv");
        let _ = std::fs::remove_file(&out);
        assert!(cli_ok(&data.path(), &["audit", "--ledger", ledger]).contains("OK: "));
        cli_ok(
            &data.path(),
            &["export", "--ledger", ledger, "--out", out.to_str().unwrap()],
        );
        let listed = cli_ok(&data.path(), &["accounts", "--ledger", ledger, "list"]);
        assert_eq!(listed.lines().count(), 3, "{listed}");
        cli_ok(
            &data.path(),
            &["accounts", "--ledger", ledger, "history", "1"],
        );
        if file.ends_with("ledger.redb") {
            assert!(cli_ok(&data.path(), &["status"]).contains("stopped"));
        }
        assert!(
            std::fs::read(&file).unwrap() == before,
            "{} changed by a reading command",
            file.display()
        );
    }

    // A node killed with SIGKILL leaves a file that needs recovery.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.path().join("ledger.redb"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    let node = NodeProcess::start(&data, &[]);
    node.account(&data.admin(), "West Bank", 5).await;
    // SAFETY: signalling the child process this test started.
    unsafe { libc::kill(node.pid(), libc::SIGKILL) };
    let (_, _) = tokio::task::spawn_blocking(move || node.terminate())
        .await
        .unwrap();
    let before = std::fs::read(data.path().join("ledger.redb")).unwrap();
    // Its recovery runs in memory: the accounts are read, the file unchanged.
    let listed = cli_ok(&data.path(), &["accounts", "list"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(listed.contains("West Bank"), "{listed}");
    assert!(cli_ok(&data.path(), &["audit"]).contains("OK: "));
    assert!(std::fs::read(data.path().join("ledger.redb")).unwrap() == before);
}

/// Goal: flags beat environment, environment beats the file, the file beats
/// defaults, and a typo in the file is an error. Method: `config` prints
/// the resolved settings.
#[test]
fn settings_precedence_is_flags_env_file_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1111\"\nhalf_ttl_secs = 60\nmax_amount = 5\nlog_format = \"json\"\n",
    )
    .unwrap();
    let output = command()
        .args([
            "--config",
            file.to_str().unwrap(),
            "config",
            "--max-amount",
            "9",
        ])
        .env("TAPLEDGER_HALF_TTL_SECS", "30")
        .env("TAPLEDGER_MAX_AMOUNT", "7")
        .output()
        .unwrap();
    let printed = text(&output.stdout);
    assert!(output.status.success(), "{printed}{}", text(&output.stderr));
    for line in [
        "listen = \"127.0.0.1:1111\"",
        "half_ttl_secs = 30.0",
        "max_amount = 9",
        "log_format = \"json\"",
        "matcher_shards = 2",
        "metrics_listen = \"127.0.0.1:9464\"",
    ] {
        assert!(
            printed.lines().any(|printed| printed == line),
            "{line} in:\n{printed}"
        );
    }

    std::fs::write(&file, "half_ttl = 60\n").unwrap();
    let output = command()
        .args(["--config", file.to_str().unwrap(), "config"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("unknown setting `half_ttl`"),
        "{}",
        text(&output.stderr)
    );
}

/// Goal: every subcommand documents itself.
#[test]
fn every_subcommand_has_help() {
    for subcommand in [
        "init", "run", "config", "audit", "export", "backup", "restore", "accounts", "topup",
        "reset",
    ] {
        let output = command().args([subcommand, "--help"]).output().unwrap();
        let help = text(&output.stdout);
        assert!(
            output.status.success(),
            "{subcommand}: {}",
            text(&output.stderr)
        );
        assert!(
            help.contains("Usage: tapledger-node"),
            "{subcommand}:\n{help}"
        );
        assert!(help.contains("--data <DIR>"), "{subcommand}:\n{help}");
    }
    let run = text(&command().args(["run", "--help"]).output().unwrap().stdout);
    for needle in [
        "TAPLEDGER_LISTEN",
        "--metrics-listen",
        "--half-ttl-secs",
        "--grace-secs",
    ] {
        assert!(run.contains(needle), "run --help mentions {needle}");
    }
}

/// Goal (issue 13): `audit` of a file with a zeroed page fails with exit 1
/// and a line naming the damage, or passes when the page held nothing in
/// use; never another exit or a panic's backtrace (a zeroed page made it
/// panic inside redb before).
#[test]
fn audit_of_a_zeroed_page_fails_with_one_line_or_passes() {
    let data = DataDirectory::init();
    let image = std::fs::read(data.path().join("ledger.redb")).unwrap();
    let copy = data.file("zeroed.redb");
    let mut failed = 0;
    for page in 1..image.len() / 4096 {
        let range = page * 4096..(page + 1) * 4096;
        if image[range.clone()].iter().all(|byte| *byte == 0) {
            continue;
        }
        let mut zeroed = image.clone();
        zeroed[range].fill(0);
        std::fs::write(&copy, &zeroed).unwrap();
        let audit = cli(&data.path(), &["audit", "--ledger", copy.to_str().unwrap()]);
        let (out, err) = (text(&audit.stdout), text(&audit.stderr));
        assert!(!err.contains("panicked at"), "page {page}: {err}");
        match audit.status.code() {
            Some(0) => assert!(out.contains("OK: "), "page {page}: {out}"),
            Some(1) => {
                assert!(
                    out.contains("FAILED") && out.contains("damaged"),
                    "page {page}: {out}"
                );
                failed += 1;
            }
            other => panic!("page {page}: exit {other:?}\n{out}\n{err}"),
        }
    }
    assert!(failed > 0, "no zeroed page was found");
}
