//! The swarm against a real embedded node over QUIC on loopback: a small run
//! with every fault kind must get exactly the answers it planned, balances
//! that match over the wire and a clean audit; so must a run on a cluster of
//! three whose leader is killed midway (and every outcome told must be on the
//! new leader); single scenarios and a manual payment must do what they say.
//! Kept to a few seconds each on two cores.

use std::time::Duration;

use super::actions::{self, PayRequest};
use super::target::Target;
use super::workload::Kind;
use super::*;

/// Bounds a whole test so that a bug shows as a failure, not a hang.
async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .expect("the test did not finish in time")
}

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
    let report = within(Duration::from_secs(120), run(&config))
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
    let report = within(Duration::from_secs(60), run(&config))
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
    let report = within(Duration::from_secs(60), run(&config))
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
        let output = within(
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
    let output = within(
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
    let output = within(
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
