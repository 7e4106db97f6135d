//! The swarm against a real embedded node over QUIC on loopback: a small run
//! with every fault kind must get exactly the answers it planned, balances
//! that match over the wire and a clean audit; so must a run on a cluster of
//! three whose leader is killed midway (and every outcome told must be on the
//! new leader); a run whose node dies must stop within seconds, fail, and
//! still write its report with every outcome told; single scenarios and a
//! manual payment must do what they say. Kept to a few seconds each on two
//! cores.

use std::time::Duration;

use tapledger_test_kit::within_for;
use tokio::time::Instant;

use super::actions::{self, PayRequest};
use super::liveness::Stop;
use super::target::Target;
use super::workload::Kind;
use super::*;

fn embedded(half_ttl: Duration) -> Target {
    Target::Embedded {
        half_ttl,
        replicas: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_run_loses_no_outcome_and_the_cluster_goes_on() {
    // Goal: the default run's promise on a small scale. Three replicas; the
    // leader is killed 0.5 s into a 2 s run and started again 1 s later.
    // half_ttl (3 s) is well above the failover (about a second), or honest
    // halves waiting for a partner the dead leader never stored would expire.
    // Every answer is still the planned one (phones reconnect to the new
    // leader and resubmit identical halves), every outcome a phone heard is
    // on the new leader, and the restarted replica catches up to identical
    // books.
    let config = SwarmConfig {
        target: Target::Embedded {
            half_ttl: Duration::from_secs(3),
            replicas: 3,
        },
        phones: 24,
        payments: 800,
        fault_share: 0.3,
        rate: Some(400.0),
        seed: 11,
        endpoints: 2,
        admin_connections: 2,
        opening_balance: 8_000,
        amount_max: 3_000,
        kill_leader_after: Some(Duration::from_millis(500)),
        restart_after: Some(Duration::from_secs(1)),
        ..SwarmConfig::default()
    };
    let report = within_for(Duration::from_secs(120), run(&config))
        .await
        .expect("the swarm runs");
    assert_eq!(
        report.failures(),
        Vec::<String>::new(),
        "{}",
        report.render()
    );
    assert_eq!(report.replicas, 3);
    let failover = report.failover.as_ref().expect("the leader was killed");
    assert!(failover.told_outcomes > 0);
    assert_eq!(failover.told_found, failover.told_outcomes);
    assert!(failover.restarted);
    assert!(failover.new_leader.is_some());
    assert!(
        failover.first_outcome_after_ms.is_some(),
        "{}",
        report.render()
    );
    let audit = report.audit.as_ref().expect("embedded runs are audited");
    assert_eq!(audit.replicas.len(), 3, "every replica audited");
    assert!(audit.replicas.iter().all(|(_, _, ok)| *ok));
    let json = report.to_json();
    assert_eq!(json["replicas"], 3);
    assert_eq!(json["failover"]["told_found"], failover.told_found);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_swarm_gets_every_planned_answer_and_passes_the_audit() {
    let config = SwarmConfig {
        // Short enough for a quick test, long enough that a busy machine
        // never delays an honest partner half past it.
        target: embedded(Duration::from_secs(1)),
        phones: 24,
        payments: 400,
        // A high share so that every fault kind occurs several times.
        fault_share: 0.4,
        rate: Some(500.0),
        seed: 4,
        endpoints: 2,
        admin_connections: 2,
        // Small balances: about 10 honest payments of up to 3,000 from each
        // phone spend more than it opened with, so phones must spend what
        // they received (epochs), and overdraws must still be exact.
        opening_balance: 8_000,
        amount_max: 3_000,
        jitter: Duration::from_millis(2),
        step_timeout: Duration::from_secs(10),
        ..SwarmConfig::default()
    };
    let report = within_for(Duration::from_secs(60), run(&config))
        .await
        .expect("the swarm runs");

    assert_eq!(
        report.failures(),
        Vec::<String>::new(),
        "{}",
        report.render()
    );
    assert_eq!(report.payments_run, 400);
    for kind in Kind::ALL {
        assert!(
            report.kinds.get(&kind).copied().unwrap_or(0) > 0,
            "{kind:?} never ran: {:?}",
            report.kinds
        );
    }
    // Every answer the plan expected was observed, code by code.
    for (label, (expected, observed)) in &report.outcomes {
        assert_eq!(expected, observed, "answers {label}");
    }
    for label in ["settled", "100", "200", "300", "500", "620", "700", "1012"] {
        assert!(
            report.outcomes.contains_key(label),
            "no {label} answer in {:?}",
            report.outcomes
        );
    }
    assert_eq!(report.balances_checked, 24);
    let audit = report.audit.as_ref().expect("embedded runs are audited");
    assert!(
        audit.is_ok(),
        "{:?} {:?}",
        audit.report.problems,
        audit.count_problems
    );
    assert_eq!(audit.report.settlements, report.settled);
    assert_eq!(report.latency.count, report.kinds[&Kind::Normal]);
    assert!(report.latency.p50_us <= report.latency.p99_us);
    // The JSON report and the plot are well formed.
    let json = report.to_json();
    assert_eq!(json["passed"], true);
    assert_eq!(json["payments"], 400);
    let svg = plot::render_svg(&report.timeline, "test");
    assert!(svg.contains("<polyline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_run_without_faults_settles_everything() {
    let config = SwarmConfig {
        target: embedded(Duration::from_secs(2)),
        phones: 10,
        payments: 300,
        fault_share: 0.0,
        rate: None,
        in_flight: 32,
        seed: 9,
        endpoints: 1,
        admin_connections: 1,
        jitter: Duration::ZERO,
        ..SwarmConfig::default()
    };
    let report = within_for(Duration::from_secs(60), run(&config))
        .await
        .expect("the swarm runs");
    assert_eq!(
        report.failures(),
        Vec::<String>::new(),
        "{}",
        report.render()
    );
    assert_eq!(report.settled, 300);
    assert_eq!(report.outcomes["settled"], (600, 600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_named_scenario_gets_the_answers_it_expects() {
    let target = embedded(Duration::from_secs(1));
    for kind in Kind::ALL {
        let output = within_for(
            Duration::from_secs(30),
            actions::scenario(&target, kind, Duration::from_secs(10)),
        )
        .await
        .unwrap_or_else(|error| panic!("scenario {}: {error:#}", kind.name()));
        assert!(output.ok, "scenario {}:\n{}", kind.name(), output.text);
        assert!(
            output.text.contains("result: as expected"),
            "{}",
            output.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_opens_two_accounts_and_moves_the_money() {
    let request = PayRequest {
        from: None,
        to: None,
        amount: 1_234,
        opening_balance: 5_000,
    };
    let output = within_for(
        Duration::from_secs(30),
        actions::pay(
            &embedded(Duration::from_secs(2)),
            request,
            Duration::from_secs(10),
        ),
    )
    .await
    .expect("pay runs");
    assert!(output.ok, "{}", output.text);
    assert!(output.text.contains("outcome settled"), "{}", output.text);
    assert!(output.text.contains(" 3766;"), "{}", output.text);
    assert!(output.text.trim_end().ends_with(" 6234"), "{}", output.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdrawn_manual_payment_is_reported_as_not_settled() {
    let request = PayRequest {
        from: None,
        to: None,
        amount: 9_000,
        opening_balance: 5_000,
    };
    let output = within_for(
        Duration::from_secs(30),
        actions::pay(
            &embedded(Duration::from_secs(2)),
            request,
            Duration::from_secs(10),
        ),
    )
    .await
    .expect("pay runs");
    assert!(!output.ok, "{}", output.text);
    assert!(output.text.contains("rejected 100"), "{}", output.text);
}

/// A small open-loop run whose schedule (60 s) is far longer than any test
/// should take: 50 payments a second among 12 phones.
fn long_schedule() -> SwarmConfig {
    SwarmConfig {
        phones: 12,
        payments: 3_000,
        fault_share: 0.3,
        rate: Some(50.0),
        seed: 21,
        endpoints: 2,
        admin_connections: 2,
        opening_balance: 8_000,
        amount_max: 3_000,
        ..SwarmConfig::default()
    }
}

/// Runs `config` against an embedded single node that is killed (as a crash
/// would, its files kept) `kill_after` after the run starts. Returns the
/// report, how long the run went on after the kill, and the node's cluster.
async fn run_against_a_node_killed_after(
    config: &SwarmConfig,
    kill_after: Duration,
) -> (SwarmReport, Duration, Arc<EmbeddedCluster>) {
    let (cluster, admin) = EmbeddedCluster::start(Duration::from_secs(2), 1, config.step_timeout)
        .await
        .expect("the node starts");
    let cluster = Arc::new(cluster);
    let connector = Arc::new(
        target::Connector::new(
            cluster.addresses(),
            Some(admin),
            config.endpoints,
            config.step_timeout,
        )
        .expect("a connector"),
    );
    let killer = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            cluster.kill(0).await.expect("the node is killed");
            Instant::now()
        })
    };
    let label = format!("node at {}", cluster.addresses()[0].addr);
    let report = run_connected(config, &connector, Some(&cluster), &label)
        .await
        .expect("a run that stops early still has a report");
    let ended = Instant::now();
    let killed_at = killer.await.expect("the kill ran");
    connector.wait_idle().await;
    (report, ended.saturating_duration_since(killed_at), cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_run_ends_the_run_within_seconds_as_failed() {
    // Goal: a dead target is noticed within seconds, not after the schedule
    // (60 s here, and every payment's step timeout after it). The node dies
    // 2.5 s in; with the default limit (5 s without any answer, then a 2 s
    // handshake probe) the run ends well within 20 s of the kill, says which
    // target stopped answering and when, and fails.
    let config = long_schedule();
    assert_eq!(config.dead_after, Some(Duration::from_secs(5)));
    let (report, after_kill, cluster) = within_for(
        Duration::from_secs(60),
        run_against_a_node_killed_after(&config, Duration::from_millis(2_500)),
    )
    .await;
    let rendered = report.render();
    assert!(
        after_kill < Duration::from_secs(20),
        "{after_kill:?}\n{rendered}"
    );
    assert!(report.seconds < 20.0, "{rendered}");
    assert!(report.payments_run < report.payments_planned, "{rendered}");
    let Some(Stop::TargetDead {
        last_answer_seconds,
        unanswered,
        error,
    }) = &report.stopped
    else {
        panic!("the run did not stop for a dead target:\n{rendered}");
    };
    assert!(*unanswered > 0, "{rendered}");
    assert!(*last_answer_seconds < report.seconds, "{rendered}");
    assert!(error.contains("no QUIC handshake"), "{error}");
    let failures = report.failures();
    let address = cluster.addresses()[0].addr.to_string();
    assert!(
        failures[0].contains(&format!("the node at {address} stopped answering at")),
        "{failures:?}"
    );
    assert!(rendered.contains("result: FAIL"), "{rendered}");
    assert!(rendered.contains("STOPPED EARLY"), "{rendered}");
    // The checks after a run are skipped, not waited out.
    assert!(report.audit.is_none());
    assert_eq!(report.balances_checked, 0);
    if let Some(cluster) = Arc::into_inner(cluster) {
        cluster.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_writes_its_json_with_every_outcome_told_and_the_node_holds_them() {
    // Goal: the report of a run that failed (its node killed, the run
    // stopped after a 1 s limit) is written as JSON, says why it stopped,
    // and lists every outcome a phone was told; started again, the node
    // holds each of them exactly as told.
    let config = SwarmConfig {
        dead_after: Some(Duration::from_secs(1)),
        ..long_schedule()
    };
    let (report, after_kill, cluster) = within_for(
        Duration::from_secs(60),
        run_against_a_node_killed_after(&config, Duration::from_millis(2_500)),
    )
    .await;
    assert!(after_kill < Duration::from_secs(15), "{after_kill:?}");
    assert!(!report.told.is_empty(), "{}", report.render());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("report.json");
    report.write_json(&path).expect("the JSON is written");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the JSON is there"))
            .expect("the JSON parses");
    assert_eq!(json["passed"], false);
    assert_eq!(json["stopped"]["reason"], "target_dead");
    assert!(
        json["stopped"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("stopped answering")),
        "{}",
        json["stopped"]
    );
    let told = json["outcomes_told"].as_array().expect("a list");
    assert_eq!(told.len(), report.told.len());
    for entry in told {
        assert!(entry["tx_key"].as_str().is_some_and(|key| key.len() == 36));
        assert!(entry["account"].as_u64().is_some());
        match entry["status"].as_str() {
            Some("settled") => assert!(entry["code"].is_null(), "{entry}"),
            Some("rejected") => assert!(entry["code"].as_u64().is_some(), "{entry}"),
            other => panic!("status {other:?} in {entry}"),
        }
    }
    assert!(told.iter().any(|entry| entry["status"] == "settled"));

    // Checked against the node's ledger after a restart.
    within_for(Duration::from_secs(30), cluster.restart(0))
        .await
        .expect("the node starts again");
    let ledger = cluster.ledger(0).await.expect("the node runs");
    for told in &report.told {
        let outcome = ledger
            .outcome(told.tx_key)
            .expect("the ledger reads")
            .unwrap_or_else(|| panic!("{} was told but is not in the ledger", told.tx_key));
        let stored = tapledger_protocol::OutcomeReport::for_party(&outcome, told.account);
        assert_eq!(
            (stored.status, stored.code, stored.amount),
            (told.status, told.code, told.amount),
            "{}",
            told.tx_key
        );
    }
    drop(ledger);
    if let Some(cluster) = Arc::into_inner(cluster) {
        cluster.stop().await;
    }
}
