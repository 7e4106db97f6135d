//! The client's routing of answers to requests and its reading of the
//! node's errors, without a network: `route` and `half_answer` are what the
//! stream reader and `submit` apply to every decoded answer.

use super::*;
use tapledger_protocol::examples::EXAMPLE_TX_KEY;

fn routes_with(ids: &[RequestId]) -> (Routes, Vec<oneshot::Receiver<Answer>>) {
    let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
    let mut receivers = Vec::new();
    for id in ids {
        let (sender, receiver) = oneshot::channel();
        routes.lock().unwrap().insert(*id, sender);
        receivers.push(receiver);
    }
    (routes, receivers)
}

#[test]
fn accepted_keeps_the_route_for_the_pushed_outcome_and_a_final_answer_ends_it() {
    let (routes, receivers) = routes_with(&[7]);
    let (unrouted, mut unrouted_receiver) = mpsc::unbounded_channel();
    let accepted = NodeMessage::Accepted {
        request_id: 7,
        tx_key: EXAMPLE_TX_KEY,
    };
    route(&routes, &unrouted, accepted.clone());
    assert!(routes.lock().unwrap().contains_key(&7));
    let refused = NodeMessage::refused(7, EXAMPLE_TX_KEY, RejectCode::TxKeyAlreadyUsed);
    route(&routes, &unrouted, refused.clone());
    assert!(routes.lock().unwrap().is_empty());
    let [mut first] = <[_; 1]>::try_from(receivers).unwrap();
    let first = first.try_recv().unwrap();
    assert_eq!(first.message, accepted);
    let mut then = first.then.expect("accepted hands over the outcome's route");
    let last = then.try_recv().unwrap();
    assert_eq!(last.message, refused);
    assert!(last.then.is_none(), "a final answer has nothing after it");
    assert!(unrouted_receiver.try_recv().is_err());
}

#[test]
fn answers_for_no_waiting_request_and_errors_without_an_id_go_unrouted() {
    let (routes, _receivers) = routes_with(&[1]);
    let (unrouted, mut unrouted_receiver) = mpsc::unbounded_channel();
    let stray = NodeMessage::error(Some(99), ErrorCode::Malformed, "");
    let anonymous = NodeMessage::error(None, ErrorCode::Malformed, "");
    route(&routes, &unrouted, stray.clone());
    route(&routes, &unrouted, anonymous.clone());
    assert_eq!(unrouted_receiver.try_recv().unwrap(), stray);
    assert_eq!(unrouted_receiver.try_recv().unwrap(), anonymous);
    assert!(
        routes.lock().unwrap().contains_key(&1),
        "request 1 still waits"
    );
}

#[test]
fn not_the_leader_names_the_leader_and_counts_as_a_failover() {
    let leader = LeaderRef {
        id: 2,
        addr: "127.0.0.1:7444".into(),
    };
    let error = half_answer(NodeMessage::not_leader(Some(3), Some(leader.clone()))).unwrap_err();
    match &error {
        ClientError::NotLeader { leader: named, .. } => assert_eq!(named, &Some(leader)),
        other => panic!("expected NotLeader, got {other:?}"),
    }
    assert_eq!(error.code(), Some(ErrorCode::NotLeader));
    assert!(error.is_failover());
    let throttled = half_answer(NodeMessage::error(Some(3), ErrorCode::Throttled, "")).unwrap_err();
    assert_eq!(throttled.code(), Some(ErrorCode::Throttled));
    assert!(!throttled.is_failover(), "retrying elsewhere does not help");
}

#[test]
fn every_request_kind_takes_the_request_id_it_is_given() {
    for (title, mut message) in tapledger_protocol::examples::client_examples() {
        set_request_id(&mut message, 4242);
        assert_eq!(message.request_id(), 4242, "{title}");
    }
}
