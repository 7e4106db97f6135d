//! The ledger end to end in process: a payment settles, both submitters hear
//! it, balances and the audit agree, and a restart keeps everything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tapledger_actors::{Resolution, Submission};
use tapledger_protocol::{Outcome, TxKey};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_settles_and_survives_restart() {
    let (dir, ledger) = temp_ledger(|_| {}).await;
    let ids = open_accounts(&ledger, &[1_000, 0]).await;
    let (alice, bob) = (ids[0], ids[1]);
    let key = TxKey::new_random();

    let first = within(ledger.submit(alice, send(key, alice, 1_000)))
        .await
        .unwrap();
    let Submission::Pending(ticket) = first else {
        panic!("lone half should be pending, got {first:?}")
    };
    let second = within(ledger.submit(bob, receive(key, bob, alice, 1_000)))
        .await
        .unwrap();
    let Submission::Done(Resolution::Final(outcome)) = second else {
        panic!("pair should decide, got {second:?}")
    };
    assert!(
        outcome.is_settled(),
        "paying exactly the whole balance settles: {outcome:?}"
    );
    let Outcome::Settled(settlement) = &*outcome else {
        unreachable!()
    };
    assert_eq!(
        settlement.sender_balance_before, 1_000,
        "the sender's balance, not the receiver's"
    );
    assert_eq!(
        within(ticket.resolution()).await.unwrap(),
        Resolution::Final(outcome.clone())
    );

    assert_eq!(ledger.balance(alice).unwrap(), Some(0));
    assert_eq!(ledger.balance(bob).unwrap(), Some(1_000));
    let report = ledger.audit().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.settlements, 1);

    let path = ledger.config().path.clone();
    ledger.close().await;
    let ledger = tapledger_actors::Ledger::open(tapledger_actors::LedgerConfig::new(path))
        .await
        .unwrap();
    assert_eq!(ledger.outcome(key).unwrap().as_ref(), Some(&*outcome));
    assert_eq!(ledger.balance(bob).unwrap(), Some(1_000));
    // Replaying both halves after the restart moves nothing.
    let replay = within(ledger.submit(alice, send(key, alice, 1_000)))
        .await
        .unwrap();
    assert!(
        matches!(replay, Submission::Done(Resolution::Final(ref again)) if **again == *outcome)
    );
    assert_eq!(ledger.balance(alice).unwrap(), Some(0));
    ledger.close().await;
    drop(dir);
}

/// Goal: under a steady load of small requests the leader proposes at most
/// about one log entry per `commit_interval_min`, so each commit holds
/// several requests (a commit costs the same CPU whatever it holds), and
/// every request is still applied exactly once.
/// Method: eight tasks top up their own accounts one request after another
/// for a second with a 100 ms interval. Unpaced, a commit goes out every
/// few milliseconds (hundreds in the second); paced, at most two per
/// interval (an entry of one request does not start the interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_small_requests_are_paced_into_fuller_commits() {
    const INTERVAL: Duration = Duration::from_millis(100);
    let (_dir, ledger) = temp_ledger(|config| config.commit_interval_min = INTERVAL).await;
    let ledger = Arc::new(ledger);
    let ids = open_accounts(&ledger, &[0; 8]).await;
    let commits_before = ledger.stats().await.commits;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for &account in &ids {
        let ledger = ledger.clone();
        tasks.spawn(async move {
            let mut top_ups = 0u64;
            while started.elapsed() < Duration::from_secs(1) {
                let balance = within(ledger.top_up(account, 1)).await.expect("top up");
                top_ups += 1;
                assert_eq!(balance, top_ups, "each top-up applied once, in order");
            }
            (account, top_ups)
        });
    }
    let mut top_ups_total = 0;
    while let Some(done) = tasks.join_next().await {
        let (account, top_ups) = done.expect("top-up task");
        assert_eq!(ledger.balance(account).unwrap(), Some(top_ups));
        top_ups_total += top_ups;
    }
    let elapsed = started.elapsed();
    let commits = ledger.stats().await.commits - commits_before;
    let intervals = elapsed.as_secs_f64() / INTERVAL.as_secs_f64();
    println!("{top_ups_total} top-ups in {commits} commits over {elapsed:?}");
    assert!(
        commits as f64 <= 2.0 * intervals + 2.0,
        "{commits} commits in {elapsed:?}: not paced at {INTERVAL:?}"
    );
    assert!(
        top_ups_total >= 2 * commits,
        "{top_ups_total} top-ups in {commits} commits: commits not fuller"
    );
    Arc::into_inner(ledger).expect("tasks done").close().await;
}

/// Goal: pacing never holds back a lone requester: one request after
/// another, each an entry of its own, commits at once even with an
/// interval of an hour (otherwise the second would wait that hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_requester_is_not_held_back_by_commit_pacing() {
    let (_dir, ledger) =
        temp_ledger(|config| config.commit_interval_min = Duration::from_secs(3600)).await;
    let ids = open_accounts(&ledger, &[0, 0]).await;
    for round in 1..=20 {
        for &account in &ids {
            assert_eq!(within(ledger.top_up(account, 5)).await.unwrap(), 5 * round);
        }
    }
    ledger.close().await;
}
