//! The node over real QUIC on loopback: payments, every rejection and refusal
//! end to end, authentication, pinning, malformed input and reconnection.

use tapledger_node::HalfAnswer;
use tapledger_node::Submitted;
use tapledger_protocol::{OutcomeStatus, TxKey};

use crate::net_support::TestNode;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_settles_over_quic_and_both_phones_hear() {
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let key = TxKey::new_random();

    let first = within(alice_phone.submit(send(key, alice, 500)))
        .await
        .unwrap();
    let Submitted::Accepted(pending) = first else {
        panic!("lone half is accepted, got {first:?}")
    };
    let second = within(bob_phone.submit(receive(key, bob, alice, 500)))
        .await
        .unwrap();
    let Submitted::Answered(HalfAnswer::Decided(bob_report)) = second else {
        panic!("pair decides, got {second:?}")
    };
    let HalfAnswer::Decided(alice_report) = within(pending.answer()).await.unwrap() else {
        panic!("alice hears the outcome")
    };
    assert_eq!(alice_report.status, OutcomeStatus::Settled);
    assert_eq!(bob_report.status, OutcomeStatus::Settled);
    assert_eq!(alice_report.balance_after, Some(0));
    assert_eq!(bob_report.balance_after, Some(500));
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 0);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 500);
    assert!(node.ledger().audit().unwrap().is_ok());
    alice_phone.close().await;
    bob_phone.close().await;
    node.stop().await;
}
