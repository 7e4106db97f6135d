//! The ledger end to end in process: a payment settles, both submitters hear
//! it, balances and the audit agree, and a restart keeps everything.

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
