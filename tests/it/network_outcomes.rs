//! Outcomes after the fact and the account's own records over the wire:
//! replaying a settled key, resubmitting after a reconnect, `query_outcome`
//! while pending and after, balance and history paging, operator top-ups.

use tapledger_protocol::{ErrorCode, HistoryKind, OutcomeStatus, QueryStatus, TxKey};

use crate::net_support::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_settled_key_returns_the_same_outcome_and_moves_nothing() {
    // Goal: a prototype bug moved the money again when both halves were
    // replayed. Here both identical halves, sent again after settlement (on
    // the old streams and on new connections), get the recorded outcome and
    // the balances and history stay as they were.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, alice_credentials) = node.phone_with_account(500).await;
    let (bob, bob_phone, bob_credentials) = node.phone_with_account(0).await;
    let key = TxKey::new_random();
    let pending = accepted(within(alice_phone.submit(send(key, alice, 200))).await);
    let bob_report = decided(within(bob_phone.submit(receive(key, bob, alice, 200))).await);
    let alice_report = decided_later(pending).await;

    for _ in 0..3 {
        assert_eq!(
            decided(within(alice_phone.submit(send(key, alice, 200))).await),
            alice_report
        );
        assert_eq!(
            decided(within(bob_phone.submit(receive(key, bob, alice, 200))).await),
            bob_report
        );
    }
    alice_phone.close().await;
    bob_phone.close().await;
    let alice_phone = node.reconnect(alice, &alice_credentials).await;
    let bob_phone = node.reconnect(bob, &bob_credentials).await;
    // Receive half first this time: still no second settlement.
    assert_eq!(
        decided(within(bob_phone.submit(receive(key, bob, alice, 200))).await),
        bob_report
    );
    assert_eq!(
        decided(within(alice_phone.submit(send(key, alice, 200))).await),
        alice_report
    );
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 300);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 200);
    let (history, _) = within(bob_phone.history(None, 50)).await.unwrap();
    assert_eq!(
        history
            .iter()
            .filter(|entry| entry.tx_key == Some(key))
            .count(),
        1
    );
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_half_after_reconnect_is_accepted_again_and_the_new_stream_hears() {
    // Goal: PROTOCOL.md section 3 step 8. Alice's half waits; her phone drops
    // the connection; she reconnects and resubmits the identical half, which
    // is accepted again. When Bob's half arrives the outcome is pushed on the
    // new stream, and `query_outcome` tells her (and Bob) the same; a third
    // account learns nothing.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, credentials) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let (_carol, carol_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();

    let _lost = accepted(within(alice_phone.submit(send(key, alice, 250))).await);
    alice_phone.close().await;

    let alice_phone = node.reconnect(alice, &credentials).await;
    let (status, report) = within(alice_phone.query_outcome(key)).await.unwrap();
    assert_eq!((status, report), (QueryStatus::Pending, None));
    let pending = accepted(within(alice_phone.submit(send(key, alice, 250))).await);
    let bob_report = decided(within(bob_phone.submit(receive(key, bob, alice, 250))).await);
    let alice_report = decided_later(pending).await;
    assert_eq!(alice_report.status, OutcomeStatus::Settled);
    assert_eq!(alice_report, report_for_other_party(&bob_report, 250));

    let (status, report) = within(alice_phone.query_outcome(key)).await.unwrap();
    assert_eq!(status, QueryStatus::Decided);
    assert_eq!(report.as_ref(), Some(&alice_report));
    let (status, report) = within(bob_phone.query_outcome(key)).await.unwrap();
    assert_eq!(status, QueryStatus::Decided);
    assert_eq!(report.as_ref(), Some(&bob_report));
    let (status, report) = within(carol_phone.query_outcome(key)).await.unwrap();
    assert_eq!((status, report), (QueryStatus::Unknown, None));
    // A key nobody used looks the same to Carol.
    let (status, _) = within(carol_phone.query_outcome(TxKey::new_random()))
        .await
        .unwrap();
    assert_eq!(status, QueryStatus::Unknown);

    assert_eq!(within(alice_phone.balance()).await.unwrap(), 250);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 250);
    for phone in [alice_phone, bob_phone, carol_phone] {
        phone.close().await;
    }
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_query_while_pending_says_pending_to_the_submitter_only() {
    // Goal: `query_outcome` on a waiting key: `pending` for the account whose
    // half waits, `unknown` for the named partner who has not submitted yet
    // (and for anyone else), then `decided` for both once it settles.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();

    let pending = accepted(within(bob_phone.submit(receive(key, bob, alice, 5))).await);
    let (status, report) = within(bob_phone.query_outcome(key)).await.unwrap();
    assert_eq!((status, report), (QueryStatus::Pending, None));
    let (status, _) = within(alice_phone.query_outcome(key)).await.unwrap();
    assert_eq!(status, QueryStatus::Unknown);

    let alice_report = decided(within(alice_phone.submit(send(key, alice, 5))).await);
    let bob_report = decided_later(pending).await;
    for (phone, report) in [(&alice_phone, &alice_report), (&bob_phone, &bob_report)] {
        let (status, answer) = within(phone.query_outcome(key)).await.unwrap();
        assert_eq!(status, QueryStatus::Decided);
        assert_eq!(answer.as_ref(), Some(report));
    }
    alice_phone.close().await;
    bob_phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_with_a_waiting_half_gives_back_its_slot() {
    // Goal: a phone that vanishes while its half waits for a partner (here
    // for the default five minutes) must not keep its connection counted as
    // open: otherwise a few thousand such phones would use up
    // `connections_max` until their halves expire. The half itself stays
    // durable and settles later.
    let node = TestNode::start(|config| config.limits.connections_max = 3).await;
    let (alice, alice_phone, credentials) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();
    let _lost = accepted(within(alice_phone.submit(send(key, alice, 100))).await);
    alice_phone.close().await;

    node.wait_for_open_connections(1).await;
    // Two more connections fit beside Bob's.
    let first = node.connect().await;
    let alice_phone = node.reconnect(alice, &credentials).await;
    assert_eq!(
        within(first.balance()).await.map_err(|e| e.code()),
        Err(Some(ErrorCode::NotAuthenticated))
    );
    decided(within(bob_phone.submit(receive(key, bob, alice, 100))).await);
    let (status, report) = within(alice_phone.query_outcome(key)).await.unwrap();
    assert_eq!(status, QueryStatus::Decided);
    assert_eq!(report.unwrap().status, OutcomeStatus::Settled);
    for phone in [first, alice_phone, bob_phone] {
        phone.close().await;
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_and_history_over_the_wire_newest_first_with_paging() {
    // Goal: `balance` and `history` show the account's own movements: the
    // opening, a top-up, payments sent and received, newest first, each with
    // its balance after; rejected payments are not movements; paging with
    // `before_seq` walks every entry exactly once.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(1_000).await;
    let (bob, bob_phone, _) = node.phone_with_account(50).await;

    let mut expected_alice = vec![(HistoryKind::Opening, None, 1_000, 1_000)];
    let mut balance = 1_000;
    for round in 1..=6u64 {
        let key = TxKey::new_random();
        let (kind, amount) = if round % 3 == 0 {
            // Bob pays Alice.
            let pending = accepted(within(bob_phone.submit(send(key, bob, round))).await);
            decided(within(alice_phone.submit(receive(key, alice, bob, round))).await);
            decided_later(pending).await;
            balance += round;
            (HistoryKind::Received, round)
        } else {
            let pending = accepted(within(alice_phone.submit(send(key, alice, round * 10))).await);
            decided(within(bob_phone.submit(receive(key, bob, alice, round * 10))).await);
            decided_later(pending).await;
            balance -= round * 10;
            (HistoryKind::Sent, round * 10)
        };
        expected_alice.push((kind, Some(key), amount, balance));
    }
    // A rejected payment leaves no entry.
    let key = TxKey::new_random();
    let pending = accepted(within(alice_phone.submit(send(key, alice, 7))).await);
    decided(within(bob_phone.submit(receive(key, bob, alice, 8))).await);
    assert_eq!(decided_later(pending).await.status, OutcomeStatus::Rejected);
    // A top-up is an entry.
    let operator = node.connect().await;
    balance = within(operator.top_up(&node.admin, alice, 333))
        .await
        .unwrap();
    operator.close().await;
    expected_alice.push((HistoryKind::TopUp, None, 333, balance));
    expected_alice.reverse();

    assert_eq!(within(alice_phone.balance()).await.unwrap(), balance);
    let (all, more) = within(alice_phone.history(None, 50)).await.unwrap();
    assert!(!more);
    let seen: Vec<_> = all
        .iter()
        .map(|entry| (entry.kind, entry.tx_key, entry.amount, entry.balance_after))
        .collect();
    assert_eq!(seen, expected_alice);
    assert!(all.windows(2).all(|pair| pair[0].seq > pair[1].seq));
    assert!(all.windows(2).all(|pair| pair[0].at >= pair[1].at));
    for entry in &all {
        let counterparty = match entry.kind {
            HistoryKind::Sent | HistoryKind::Received => Some(bob),
            _ => None,
        };
        assert_eq!(entry.counterparty_id, counterparty);
    }
    let opening = all.last().unwrap();
    assert_eq!(
        (opening.kind, opening.amount),
        (HistoryKind::Opening, 1_000)
    );

    // Pages of 3: nil cursor, then the last seq of each page.
    let mut paged = Vec::new();
    let mut before_seq = None;
    loop {
        let (page, more) = within(alice_phone.history(before_seq, 3)).await.unwrap();
        assert!(page.len() <= 3);
        paged.extend(page.iter().cloned());
        if !more {
            break;
        }
        assert_eq!(page.len(), 3);
        before_seq = Some(page.last().unwrap().seq);
    }
    assert_eq!(paged, all);
    // A cursor at the oldest entry gives an empty last page.
    let (empty, more) = within(alice_phone.history(Some(opening.seq), 3))
        .await
        .unwrap();
    assert!(empty.is_empty() && !more);

    // Bob sees only his own side, the mirror of Alice's payments.
    let (bob_history, _) = within(bob_phone.history(None, 50)).await.unwrap();
    assert_eq!(bob_history.len(), 7);
    assert_eq!(bob_history.last().unwrap().kind, HistoryKind::Opening);
    assert_eq!(
        bob_history[0].balance_after,
        within(bob_phone.balance()).await.unwrap()
    );
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_up_with_the_admin_credential_moves_money_from_the_issuer() {
    // Goal: `top_up` over the wire: with the operator's credential it raises
    // the balance durably; an unknown account (or the issuer) gets 1020; a zero
    // amount or an overflowing balance gets 1021; no other connection state is
    // needed, and none of these count as failed attempts.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(100).await;
    let operator = node.connect().await;

    assert_eq!(
        within(operator.top_up(&node.admin, alice, 25))
            .await
            .unwrap(),
        125
    );
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 125);
    node_error(
        within(operator.top_up(&node.admin, alice + 1, 25)).await,
        ErrorCode::UnknownAccount,
    );
    node_error(
        within(operator.top_up(&node.admin, 0, 25)).await,
        ErrorCode::UnknownAccount,
    );
    node_error(
        within(operator.top_up(&node.admin, alice, 0)).await,
        ErrorCode::InvalidAmount,
    );
    node_error(
        within(operator.top_up(&node.admin, alice, u64::MAX)).await,
        ErrorCode::InvalidAmount,
    );
    assert_eq!(node.auth_failures(), 0);
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 125);
    // The topped-up money can be spent.
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();
    let pending = accepted(within(alice_phone.submit(send(key, alice, 125))).await);
    decided(within(bob_phone.submit(receive(key, bob, alice, 125))).await);
    assert_eq!(decided_later(pending).await.balance_after, Some(0));
    for phone in [operator, alice_phone, bob_phone] {
        phone.close().await;
    }
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_limit_get_1014_until_one_is_answered() {
    // Goal: a connection has at most `requests_in_flight_max` requests
    // awaiting their final answer, waiting halves included; one more gets
    // 1014 and changes nothing. The limit is per connection, and frees up as
    // answers go out.
    let node = TestNode::start(|config| config.limits.requests_in_flight_max = 2).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let keys = [
        TxKey::new_random(),
        TxKey::new_random(),
        TxKey::new_random(),
    ];

    let first = accepted(within(alice_phone.submit(send(keys[0], alice, 1))).await);
    let _second = accepted(within(alice_phone.submit(send(keys[1], alice, 1))).await);
    node_error(
        within(alice_phone.submit(send(keys[2], alice, 1))).await,
        ErrorCode::Throttled,
    );
    node_error(within(alice_phone.balance()).await, ErrorCode::Throttled);
    // Bob's connection has its own budget.
    let (status, _) = within(bob_phone.query_outcome(keys[2])).await.unwrap();
    assert_eq!(
        status,
        QueryStatus::Unknown,
        "the throttled half left no trace"
    );

    decided(within(bob_phone.submit(receive(keys[0], bob, alice, 1))).await);
    decided_later(first).await;
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 499);
    accepted(within(alice_phone.submit(send(keys[2], alice, 1))).await);
    alice_phone.close().await;
    bob_phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_a_waiting_phone_1101_and_everything_survives_a_restart() {
    // Goal: at shutdown a waiting phone is told 1101 and its connection
    // closed with 1101; after a restart on the same data directory the
    // settled outcome reads the same, the waiting half is still pending with
    // its original receive time, and it settles when its partner comes.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, alice_credentials) = node.phone_with_account(500).await;
    let (bob, bob_phone, bob_credentials) = node.phone_with_account(0).await;
    let settled_key = TxKey::new_random();
    let pending = accepted(within(alice_phone.submit(send(settled_key, alice, 100))).await);
    decided(within(bob_phone.submit(receive(settled_key, bob, alice, 100))).await);
    let settled = decided_later(pending).await;
    let waiting_key = TxKey::new_random();
    let waiting = accepted(within(alice_phone.submit(send(waiting_key, alice, 50))).await);

    let node = node.restart(|_| {}).await;
    node_error(within(waiting.answer()).await, ErrorCode::ShuttingDown);
    assert_eq!(closed_by_node(&alice_phone).await, 1101);
    assert_eq!(closed_by_node(&bob_phone).await, 1101);
    alice_phone.close().await;
    bob_phone.close().await;

    let alice_phone = node.reconnect(alice, &alice_credentials).await;
    let bob_phone = node.reconnect(bob, &bob_credentials).await;
    let (status, report) = within(alice_phone.query_outcome(settled_key))
        .await
        .unwrap();
    assert_eq!((status, report), (QueryStatus::Decided, Some(settled)));
    let (status, _) = within(alice_phone.query_outcome(waiting_key))
        .await
        .unwrap();
    assert_eq!(status, QueryStatus::Pending);
    let report = decided(within(bob_phone.submit(receive(waiting_key, bob, alice, 50))).await);
    assert_eq!(report.status, OutcomeStatus::Settled);
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 350);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 150);
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_books();
    node.stop().await;
}
