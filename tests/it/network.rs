//! Payments over real QUIC on loopback: a settlement heard by both phones,
//! then every payment rejection and half refusal end to end, each followed
//! by an honest payment on the same node to show it still serves.
//!
//! Authentication, framing and reconnection live in the `network_*` modules.

use std::time::Duration;

use tapledger_protocol::{OutcomeStatus, RejectCode, TxKey};

use crate::net_support::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_settles_over_quic_and_both_phones_hear() {
    // Goal: the happy path over the wire. Alice's half waits while her phone
    // keeps using the same stream; the outcome is pushed onto that stream,
    // under her submit's request id, once Bob's half settles the payment.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();

    let pending = accepted(within(alice_phone.submit(send(key, alice, 500))).await);
    assert_eq!(pending.tx_key, key);
    // The stream stays usable while the half waits.
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 500);
    let bob_report = decided(within(bob_phone.submit(receive(key, bob, alice, 500))).await);
    let alice_report = decided_later(pending).await;

    assert_eq!(bob_report.status, OutcomeStatus::Settled);
    assert_eq!(bob_report.tx_key, key);
    assert_eq!(bob_report.code, None);
    assert_eq!(bob_report.amount, Some(500));
    assert_eq!(bob_report.explanation, "settled");
    assert_eq!(bob_report.balance_after, Some(500));
    assert_eq!(bob_report.send.as_ref().unwrap().half.sender_id, alice);
    assert_eq!(bob_report.receive.as_ref().unwrap().half.receiver_id, bob);
    // Both phones hear the same outcome, each with only its own balance.
    assert_eq!(alice_report, report_for_other_party(&bob_report, 0));
    // Nothing arrived that answered no request.
    assert!(
        alice_phone
            .next_unrouted(Duration::from_millis(50))
            .await
            .is_err()
    );
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 0);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 500);
    node.assert_books();
    alice_phone.close().await;
    bob_phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdraw_is_rejected_with_100_and_both_phones_hear() {
    // Goal: code 100 end to end. Alice has 100 and sends 500; the pair agrees,
    // her account cannot pay, nothing moves and both phones are told.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(100).await;
    let (bob, bob_phone, _) = node.phone_with_account(7).await;
    let key = TxKey::new_random();

    let pending = accepted(within(alice_phone.submit(send(key, alice, 500))).await);
    let bob_report = decided(within(bob_phone.submit(receive(key, bob, alice, 500))).await);
    let alice_report = decided_later(pending).await;

    assert_rejected(&bob_report, key, RejectCode::InsufficientFunds);
    assert_rejected(&alice_report, key, RejectCode::InsufficientFunds);
    // Only the sender learns a balance: its own.
    assert_eq!(alice_report.balance_after, Some(100));
    assert_eq!(bob_report.balance_after, None);
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 100);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 7);
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_expecting_another_sender_gets_200() {
    // Goal: code 200 end to end. Bob expects Carol, but Alice sends under the
    // same key; the pair is rejected and nobody's money moves.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let (carol, carol_phone, _) = node.phone_with_account(500).await;
    let key = TxKey::new_random();

    // Receive half first this time.
    let pending = accepted(within(bob_phone.submit(receive(key, bob, carol, 50))).await);
    let alice_report = decided(within(alice_phone.submit(send(key, alice, 50))).await);
    let bob_report = decided_later(pending).await;

    assert_rejected(&alice_report, key, RejectCode::SenderMismatch);
    assert_eq!(bob_report, alice_report);
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 500);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 0);
    assert_eq!(within(carol_phone.balance()).await.unwrap(), 500);
    // Carol, who was named but never submitted, sees nothing of the key.
    let (status, report) = within(carol_phone.query_outcome(key)).await.unwrap();
    assert_eq!(status, tapledger_protocol::QueryStatus::Unknown);
    assert_eq!(report, None);

    // A receive half naming an account that does not exist is not refused
    // (600 is only for the half's own party): it waits, and a real sender's
    // half makes the pair a 200.
    let key = TxKey::new_random();
    let pending = accepted(within(bob_phone.submit(receive(key, bob, 9_999, 50))).await);
    let alice_report = decided(within(alice_phone.submit(send(key, alice, 50))).await);
    assert_rejected(&alice_report, key, RejectCode::SenderMismatch);
    assert_eq!(decided_later(pending).await, alice_report);
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 500);
    for phone in [alice_phone, bob_phone, carol_phone] {
        phone.close().await;
    }
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_naming_different_amounts_get_300() {
    // Goal: code 300 end to end: the phones disagree on the amount.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();

    let pending = accepted(within(alice_phone.submit(send(key, alice, 50))).await);
    let bob_report = decided(within(bob_phone.submit(receive(key, bob, alice, 60))).await);
    let alice_report = decided_later(pending).await;

    assert_rejected(&bob_report, key, RejectCode::AmountMismatch);
    assert_eq!(alice_report, bob_report);
    // The report keeps what each side said.
    assert_eq!(bob_report.send.as_ref().unwrap().half.amount, 50);
    assert_eq!(
        bob_report.receive.as_ref().unwrap().half.expected_amount,
        60
    );
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 500);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 0);
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_yourself_is_refused_with_410_and_creates_no_money() {
    // Goal: code 410 end to end (a prototype bug made the account 100 richer).
    // A receive half that names its own account as sender is refused on its
    // own, whichever half came first; the key's pending send half is untouched.
    let node = TestNode::start(|config| config.ledger.half_ttl = Duration::from_millis(300)).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;

    let lone_key = TxKey::new_random();
    refused(
        within(alice_phone.submit(receive(lone_key, alice, alice, 100))).await,
        RejectCode::SelfPayment,
    );

    let key = TxKey::new_random();
    let pending = accepted(within(alice_phone.submit(send(key, alice, 100))).await);
    refused(
        within(alice_phone.submit(receive(key, alice, alice, 100))).await,
        RejectCode::SelfPayment,
    );
    // The send half still waits, and expires alone.
    let report = decided_later(pending).await;
    assert_rejected(&report, key, RejectCode::Expired);
    assert_eq!(report.receive, None);
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 500);
    alice_phone.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_half_expires_with_500_and_its_phone_is_told() {
    // Goal: code 500 end to end with a short TTL. Alice's half waits alone;
    // the node expires it on its own clock and pushes the outcome to her
    // stream; Bob's half, arriving after, finds the key used (700).
    let node = TestNode::start(|config| config.ledger.half_ttl = Duration::from_millis(200)).await;
    let (alice, alice_phone, credentials) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();

    let started = std::time::Instant::now();
    let pending = accepted(within(alice_phone.submit(send(key, alice, 50))).await);
    let report = decided_later(pending).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "expired after {waited:?}, before its TTL"
    );
    assert_rejected(&report, key, RejectCode::Expired);
    assert_eq!(report.send.as_ref().unwrap().half.sender_id, alice);
    assert_eq!(report.receive, None);
    assert_eq!(report.balance_after, None);
    assert!(report.decided_at.0 >= report.send.as_ref().unwrap().received_at.0 + 200_000);

    refused(
        within(bob_phone.submit(receive(key, bob, alice, 50))).await,
        RejectCode::TxKeyAlreadyUsed,
    );
    // Alice's identical half after the fact gets the recorded outcome again.
    assert_eq!(
        decided(within(alice_phone.submit(send(key, alice, 50))).await),
        report
    );
    // Phones learn the TTL at authentication.
    let mut fresh = node.connect().await;
    let session = within(fresh.authenticate(alice, &credentials.key))
        .await
        .unwrap();
    assert_eq!(session.half_ttl_ms, 200);
    fresh.close().await;
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 500);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 0);
    alice_phone.close().await;
    bob_phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_too_large_amounts_are_refused_with_400() {
    // Goal: code 400 end to end on both sides, at both ends of the range,
    // and the amounts at the edges of the range still work.
    let node = TestNode::start(|config| config.ledger.max_amount = 1_000).await;
    let (alice, alice_phone, _) = node.phone_with_account(5_000).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;

    for amount in [0, 1_001, u64::MAX] {
        let key = TxKey::new_random();
        refused(
            within(alice_phone.submit(send(key, alice, amount))).await,
            RejectCode::InvalidAmount,
        );
        refused(
            within(bob_phone.submit(receive(key, bob, alice, amount))).await,
            RejectCode::InvalidAmount,
        );
        let (status, _) = within(alice_phone.query_outcome(key)).await.unwrap();
        assert_eq!(status, tapledger_protocol::QueryStatus::Unknown);
    }
    for amount in [1, 1_000] {
        let key = TxKey::new_random();
        let pending = accepted(within(alice_phone.submit(send(key, alice, amount))).await);
        let report = decided(within(bob_phone.submit(receive(key, bob, alice, amount))).await);
        assert_eq!(report.status, OutcomeStatus::Settled);
        assert_eq!(decided_later(pending).await.status, OutcomeStatus::Settled);
    }
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 3_999);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 1_001);
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_for_someone_elses_account_is_refused_with_620() {
    // Goal: code 620 end to end. Mallory, authenticated as herself, submits a
    // send half paying from Alice's account and a receive half for Bob's; both
    // are refused, nothing is stored, and the real payment under the same key
    // still settles.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let (_mallory, mallory_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();

    refused(
        within(mallory_phone.submit(send(key, alice, 500))).await,
        RejectCode::WrongParty,
    );
    refused(
        within(mallory_phone.submit(receive(key, bob, alice, 500))).await,
        RejectCode::WrongParty,
    );
    // Even with a half of her own pending, she cannot supply the partner.
    let pending = accepted(within(bob_phone.submit(receive(key, bob, alice, 500))).await);
    refused(
        within(mallory_phone.submit(send(key, alice, 500))).await,
        RejectCode::WrongParty,
    );
    let (status, _) = within(mallory_phone.query_outcome(key)).await.unwrap();
    assert_eq!(status, tapledger_protocol::QueryStatus::Unknown);

    let alice_report = decided(within(alice_phone.submit(send(key, alice, 500))).await);
    assert_eq!(alice_report.status, OutcomeStatus::Settled);
    assert_eq!(decided_later(pending).await.status, OutcomeStatus::Settled);
    assert_eq!(within(mallory_phone.balance()).await.unwrap(), 0);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 500);
    for phone in [alice_phone, bob_phone, mallory_phone] {
        phone.close().await;
    }
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_settled_key_with_a_different_half_is_refused_with_700() {
    // Goal: code 700 end to end. After a key settled, a half that differs from
    // the recorded one, from either party, is refused and moves nothing.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();

    let pending = accepted(within(alice_phone.submit(send(key, alice, 100))).await);
    decided(within(bob_phone.submit(receive(key, bob, alice, 100))).await);
    decided_later(pending).await;

    refused(
        within(alice_phone.submit(send(key, alice, 200))).await,
        RejectCode::TxKeyAlreadyUsed,
    );
    refused(
        within(bob_phone.submit(receive(key, bob, alice, 200))).await,
        RejectCode::TxKeyAlreadyUsed,
    );
    // Bob trying to use the key as a sender is a different half too.
    refused(
        within(bob_phone.submit(send(key, bob, 100))).await,
        RejectCode::TxKeyAlreadyUsed,
    );
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 400);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 100);
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_half_of_the_same_side_while_pending_is_refused_with_710() {
    // Goal: code 710 end to end. Alice's send half waits; a changed send half
    // under the same key is refused, and the original still settles as sent.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();

    let pending = accepted(within(alice_phone.submit(send(key, alice, 100))).await);
    refused(
        within(alice_phone.submit(send(key, alice, 300))).await,
        RejectCode::ConflictingHalf,
    );
    let report = decided(within(bob_phone.submit(receive(key, bob, alice, 100))).await);
    assert_eq!(report.status, OutcomeStatus::Settled);
    assert_eq!(report.amount, Some(100));
    assert_eq!(decided_later(pending).await.status, OutcomeStatus::Settled);

    // The same on the receive side.
    let key = TxKey::new_random();
    let pending = accepted(within(bob_phone.submit(receive(key, bob, alice, 10))).await);
    refused(
        within(bob_phone.submit(receive(key, bob, alice, 11))).await,
        RejectCode::ConflictingHalf,
    );
    decided(within(alice_phone.submit(send(key, alice, 10))).await);
    assert_eq!(decided_later(pending).await.amount, Some(10));

    assert_eq!(within(alice_phone.balance()).await.unwrap(), 390);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 110);
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_pending_halves_for_one_account_are_refused_with_800() {
    // Goal: code 800 end to end, on a node started as `run` starts one with
    // a cap of 2 (one matcher shard, so the cap is per account overall).
    // Once a half is decided the account may wait on another again.
    let node = TestNode::start(|config| {
        config.ledger.pending_halves_per_account_max = 2;
        config.ledger.matcher_shards = 1;
    })
    .await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let keys = [
        TxKey::new_random(),
        TxKey::new_random(),
        TxKey::new_random(),
    ];

    let first = accepted(within(alice_phone.submit(send(keys[0], alice, 10))).await);
    let _second = accepted(within(alice_phone.submit(send(keys[1], alice, 10))).await);
    refused(
        within(alice_phone.submit(send(keys[2], alice, 10))).await,
        RejectCode::TooManyPending,
    );
    // An identical resubmission joins its waiting half; it is not a new one.
    let again = accepted(within(alice_phone.submit(send(keys[0], alice, 10))).await);
    // Other accounts are not limited by Alice's halves.
    let bobs = accepted(within(bob_phone.submit(receive(keys[2], bob, alice, 10))).await);

    decided(within(bob_phone.submit(receive(keys[0], bob, alice, 10))).await);
    assert_eq!(decided_later(first).await.status, OutcomeStatus::Settled);
    assert_eq!(decided_later(again).await.status, OutcomeStatus::Settled);
    // A slot is free again: Alice's third half now pairs with Bob's.
    decided(within(alice_phone.submit(send(keys[2], alice, 10))).await);
    assert_eq!(decided_later(bobs).await.status, OutcomeStatus::Settled);
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 480);
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_cap_bounds_the_account_across_matcher_shards() {
    // Goal: pin down what PROTOCOL.md section 12 says about code 800: the cap
    // on an account's lone halves bounds the account, however its keys fall
    // over the matcher shards: with 2 shards and a cap of 4, 3 halves on one
    // shard and 1 on the other fill it, and a fifth is refused on either.
    let node = TestNode::start(|config| {
        config.ledger.pending_halves_per_account_max = 4;
        config.ledger.matcher_shards = 2;
    })
    .await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let mut waiting = Vec::new();
    for (shard, count) in [(0, 3), (1, 1)] {
        for index in 0..count {
            let key = key_on_shard(index, shard, 2);
            waiting.push(accepted(
                within(alice_phone.submit(send(key, alice, 1))).await,
            ));
        }
    }
    for shard in 0..2 {
        refused(
            within(alice_phone.submit(send(key_on_shard(5, shard, 2), alice, 1))).await,
            RejectCode::TooManyPending,
        );
    }
    assert_eq!(waiting.len(), 4);
    alice_phone.close().await;
    node.stop().await;
}
