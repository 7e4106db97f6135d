//! Many requests in one read: the node submits the halves of a read as one
//! batch and answers them from one report channel per stream. These tests
//! write many frames in one stream write (so they arrive in one read, or a
//! few) and check what PROTOCOL.md section 3 promises: every request is
//! answered, `accepted` comes before its `outcome`, the counters stay exact,
//! and a connection closed with accepted halves in flight loses none.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tapledger_node::Phone;
use tapledger_protocol::{
    AccountId, ClientMessage, Half, NodeMessage, OutcomeStatus, QueryStatus, RequestId, TxKey,
    encode_frame,
};

use crate::net_support::*;
use crate::support::*;

/// How long to wait for an answer that no request is routed to.
const WAIT: Duration = Duration::from_secs(10);
/// Request ids of the raw frames: far above the client's own counter.
const FIRST_RAW_ID: RequestId = 1_000_000;

/// Writes `halves` as `submit_half` frames in one stream write, under
/// request ids from `first_id`, with a `balance` request in the middle.
async fn submit_in_one_write(phone: &Phone, first_id: RequestId, halves: &[Half]) -> RequestId {
    let mut bytes = Vec::new();
    let mut request_id = first_id;
    for (index, half) in halves.iter().enumerate() {
        if index == halves.len() / 2 {
            encode_frame(&ClientMessage::Balance { request_id }, &mut bytes).unwrap();
            request_id += 1;
        }
        let submit = ClientMessage::SubmitHalf {
            request_id,
            half: half.clone(),
        };
        encode_frame(&submit, &mut bytes).unwrap();
        request_id += 1;
    }
    within(phone.send_raw(&bytes)).await.expect("write");
    // The id of the `balance` request.
    first_id + (halves.len() / 2) as RequestId
}

/// The next `count` answers no request of the client library is routed to.
async fn unrouted(phone: &Phone, count: usize) -> Vec<NodeMessage> {
    let mut answers = Vec::with_capacity(count);
    for _ in 0..count {
        answers.push(within(phone.next_unrouted(WAIT)).await.expect("answer"));
    }
    answers
}

/// Per request id, the kinds of answer it got, in the order they came.
fn kinds_by_request(answers: &[NodeMessage]) -> HashMap<RequestId, Vec<&'static str>> {
    let mut kinds: HashMap<RequestId, Vec<&'static str>> = HashMap::new();
    for answer in answers {
        let request_id = answer.request_id().expect("every answer names its request");
        kinds
            .entry(request_id)
            .or_default()
            .push(answer.type_name());
    }
    kinds
}

fn send_halves(keys: &[TxKey], sender: AccountId, amount: u64) -> Vec<Half> {
    keys.iter().map(|key| send(*key, sender, amount)).collect()
}

fn receive_halves(
    keys: &[TxKey],
    receiver: AccountId,
    sender: AccountId,
    amount: u64,
) -> Vec<Half> {
    keys.iter()
        .map(|key| receive(*key, receiver, sender, amount))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_in_one_write_are_all_answered_accepted_before_outcome() {
    // Goal: forty halves (and a balance request among them) written at once
    // are each answered: Alice's with `accepted` and later `outcome`, in
    // that order per request; Bob's, written at once too, with `outcome`;
    // `halves_received` counts each half once.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(10_000).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let received_before = node.node.counters().halves_received.load(Ordering::Relaxed);
    let keys: Vec<TxKey> = (0..40).map(|_| TxKey::new_random()).collect();

    let balance_id =
        submit_in_one_write(&alice_phone, FIRST_RAW_ID, &send_halves(&keys, alice, 10)).await;
    let first_answers = unrouted(&alice_phone, keys.len() + 1).await;
    let kinds = kinds_by_request(&first_answers);
    assert_eq!(kinds[&balance_id], vec!["balance_answer"]);
    assert_eq!(kinds.len(), keys.len() + 1);
    assert!(
        kinds
            .iter()
            .all(|(id, kinds)| *id == balance_id || kinds == &vec!["accepted"])
    );

    let bob_before = bob_phone.datagrams();
    submit_in_one_write(
        &bob_phone,
        FIRST_RAW_ID,
        &receive_halves(&keys, bob, alice, 10),
    )
    .await;
    let bob_answers = unrouted(&bob_phone, keys.len() + 1).await;
    // The answers to one read share datagrams: fewer datagrams than answers.
    let bob_received = bob_phone.datagrams().received - bob_before.received;
    assert!(
        (1..keys.len() as u64).contains(&bob_received),
        "{bob_received} datagrams carried {} answers",
        keys.len() + 1
    );
    let bob_kinds = kinds_by_request(&bob_answers);
    assert!(
        bob_kinds
            .iter()
            .all(|(id, kinds)| *id == balance_id || kinds == &vec!["outcome"])
    );
    let alice_outcomes = unrouted(&alice_phone, keys.len()).await;
    for outcome in &alice_outcomes {
        match outcome {
            NodeMessage::Outcome { report, .. } => {
                assert_eq!(report.status, OutcomeStatus::Settled)
            }
            other => panic!("expected an outcome, got {other:?}"),
        }
    }
    let received = node.node.counters().halves_received.load(Ordering::Relaxed) - received_before;
    assert_eq!(received, 2 * keys.len() as u64);
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 10_000 - 400);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 400);
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_halves_of_a_closed_connection_all_settle() {
    // Goal: Alice writes thirty halves at once, hears them accepted and
    // closes her connection while they wait. None is lost: Bob's halves
    // settle every one, and Alice, back on a new connection, is told each
    // outcome by `query_outcome`.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, alice_credentials) = node.phone_with_account(1_000).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let keys: Vec<TxKey> = (0..30).map(|_| TxKey::new_random()).collect();

    submit_in_one_write(&alice_phone, FIRST_RAW_ID, &send_halves(&keys, alice, 7)).await;
    let answers = unrouted(&alice_phone, keys.len() + 1).await;
    let accepted = answers
        .iter()
        .filter(|answer| matches!(answer, NodeMessage::Accepted { .. }))
        .count();
    assert_eq!(accepted, keys.len());
    alice_phone.close().await;

    for key in &keys {
        decided(within(bob_phone.submit(receive(*key, bob, alice, 7))).await);
    }
    let alice_phone = node.reconnect(alice, &alice_credentials).await;
    for key in &keys {
        let (status, report) = within(alice_phone.query_outcome(*key)).await.unwrap();
        assert_eq!(status, QueryStatus::Decided);
        assert_eq!(report.unwrap().status, OutcomeStatus::Settled);
    }
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 1_000 - 7 * 30);
    alice_phone.close().await;
    bob_phone.close().await;
    node.assert_books();
    node.stop().await;
}
