//! The core benchmark end to end on a tiny workload: it must finish quickly,
//! account for every payment, and pass its own checks and the audit.

use std::time::Duration;

use super::*;

/// Runs the bench and checks it passed its own checks.
async fn run_clean(config: &CoreBenchConfig) -> CoreBenchReport {
    let report = run(config).await.unwrap();
    assert_eq!(
        report.failures(),
        Vec::<String>::new(),
        "{}",
        report.render()
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_run_accounts_for_every_payment_and_passes_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoreBenchConfig {
        payments: 2_000,
        accounts: 50,
        concurrency: 256,
        dir: Some(dir.path().to_owned()),
        // Small balances so that some payments are rejected for funds.
        opening_balance: 20_000,
        probe: Duration::from_millis(100),
        ..CoreBenchConfig::default()
    };
    let report = run_clean(&config).await;
    assert!(report.audit.is_ok(), "{:?}", report.audit.problems);
    assert_eq!(report.outcomes_total(), 2_000);
    assert_eq!(
        report.settled + report.rejected_total(),
        2_000,
        "nothing refused or failed: {:?} {:?}",
        report.refused,
        report.first_error
    );
    assert_eq!(report.audit.settlements, report.settled);
    assert!(
        report.settled > 1_000,
        "most payments settle: {}",
        report.settled
    );
    assert_eq!(
        report.rejected.keys().copied().collect::<Vec<_>>(),
        [100],
        "only insufficient funds rejects"
    );
    assert_eq!(report.latency.count, 2_000);
    assert!(report.latency.p50_us <= report.latency.p99_us);
    assert!(report.commits > 0 && report.commits <= report.intents_committed);
    assert!(report.fsync.count > 0 && report.redb_commit.count > 0);
    assert_eq!(report.live_account_actors, 50);
    assert_eq!(report.actor_memory.map(|memory| memory.actors), Some(50));

    let json = report.to_json();
    for key in [
        "settlements",
        "seconds",
        "settlements_per_sec",
        "p50_us",
        "p99_us",
        "commits",
        "fsync_per_sec",
    ] {
        assert!(json.get(key).is_some(), "json has {key}");
    }
    // The run cleans up after itself.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Under a load that keeps intents queued, the committer proposes the next
/// entry while the previous one is still being replicated and applied
/// (a loop that only looked at its queue between answers once proposed
/// strictly one entry at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_load_keeps_two_commits_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoreBenchConfig {
        payments: 20_000,
        accounts: 1_000,
        concurrency: 4_096,
        dir: Some(dir.path().to_owned()),
        probe: Duration::from_millis(20),
        ..CoreBenchConfig::default()
    };
    let report = run_clean(&config).await;
    assert!(report.commits_pipelined > 0, "{}", report.render());
    assert!(report.commits_pipelined < report.commits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_halves_settle_too() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoreBenchConfig {
        payments: 300,
        accounts: 20,
        concurrency: 64,
        dir: Some(dir.path().to_owned()),
        halves: HalvesMode::Sequential,
        probe: Duration::from_millis(20),
        ..CoreBenchConfig::default()
    };
    let report = run_clean(&config).await;
    assert_eq!(report.settled, 300, "{}", report.render());
    // Each second half waited for its first to be durably pending.
    assert_eq!(report.first_stored_pending, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_ordered_keys_settle_and_the_table_reads_each_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoreBenchConfig {
        payments: 600,
        accounts: 40,
        concurrency: 128,
        dir: Some(dir.path().to_owned()),
        keys: KeyOrder::TimeOrdered,
        probe: Duration::from_millis(20),
        ..CoreBenchConfig::default()
    };
    let report = run_clean(&config).await;
    assert_eq!(report.settled, 600);
    assert!(report.render().contains("keys time-ordered (UUID v7)"));
    let cpu = report
        .cpu_us_per_settlement()
        .expect("thread times on Linux");
    assert!(cpu > 0.0);
    let table = in_flight_table(std::slice::from_ref(&report));
    let row = table.lines().nth(2).expect("one row per run");
    assert!(row.trim_start().starts_with("128 "), "{table}");
    assert!(row.ends_with("ok"), "{table}");
}

#[test]
fn the_workload_is_a_function_of_seed_and_index() {
    let accounts: Vec<AccountId> = (1..=10).collect();
    let first = payment(7, 42, &accounts, 500, KeyOrder::Random);
    assert_eq!(first, payment(7, 42, &accounts, 500, KeyOrder::Random));
    assert_ne!(
        first.tx_key,
        payment(8, 42, &accounts, 500, KeyOrder::Random).tx_key
    );
    for index in 0..1_000 {
        let payment = payment(7, index, &accounts, 500, KeyOrder::Random);
        assert_ne!(payment.sender, payment.receiver);
        assert!((1..=500).contains(&payment.amount));
        assert!(accounts.contains(&payment.sender) && accounts.contains(&payment.receiver));
        // UUID v4: version 4, RFC 4122 variant.
        assert_eq!(payment.tx_key.0[6] >> 4, 4);
        assert_eq!(payment.tx_key.0[8] >> 6, 0b10);
    }
}

#[test]
fn time_ordered_keys_are_uuid_v7_and_ascend_with_the_index() {
    let accounts: Vec<AccountId> = (1..=10).collect();
    let mut previous: Option<TxKey> = None;
    for index in 0..10_000 {
        let key = payment(7, index, &accounts, 500, KeyOrder::TimeOrdered).tx_key;
        assert_eq!(key.0[6] >> 4, 7, "version 7");
        assert_eq!(key.0[8] >> 6, 0b10, "RFC 9562 variant");
        if let Some(previous) = previous {
            assert!(previous.as_u128() < key.as_u128(), "payment {index}");
        }
        previous = Some(key);
    }
    // The leading 48 bits are the milliseconds the keys claim.
    let first = payment(7, 0, &accounts, 500, KeyOrder::TimeOrdered).tx_key;
    assert_eq!((first.as_u128() >> 80) as u64, CLIENT_TIME_BASE_MS);
}
