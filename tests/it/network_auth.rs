//! Who may do what over the wire: API-key authentication and its failure
//! limit, the admin credential, requests before authentication, and a client
//! that refuses a node whose certificate is not the pinned one.

use tapledger_node::{ApiCredentials, ClientEndpoint, ClientError};
use tapledger_protocol::{
    ClientMessage, ErrorCode, NodeMessage, QueryStatus, Secret, TxKey, encode_frame_to_vec,
};

use crate::net_support::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_api_key_gets_1012_is_counted_and_three_failures_close_the_connection() {
    // Goal: a wrong key and an unknown account get the same 1012, each is
    // counted, nothing moves, and the third failure on one connection gets
    // 1014 and a QUIC close with code 1014. The right key still works on a
    // new connection.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, credentials) = node.phone_with_account(500).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let failures_before = node.auth_failures();
    let wrong_key = ApiCredentials::generate().key;

    let mut intruder = node.connect().await;
    let wrong_key_message = node_error(
        within(intruder.authenticate(alice, &wrong_key)).await,
        ErrorCode::BadCredentials,
    );
    assert_eq!(node.auth_failures(), failures_before + 1);
    // Still unauthenticated: it cannot pay from Alice's account.
    node_error(
        within(intruder.submit(send(TxKey::new_random(), alice, 500))).await,
        ErrorCode::NotAuthenticated,
    );
    node_error(
        within(intruder.balance()).await,
        ErrorCode::NotAuthenticated,
    );
    // An account that does not exist gets exactly the same answer.
    let unknown_account_message = node_error(
        within(intruder.authenticate(9_999, &wrong_key)).await,
        ErrorCode::BadCredentials,
    );
    assert_eq!(unknown_account_message, wrong_key_message);
    assert_eq!(node.auth_failures(), failures_before + 2);
    // The third failure ends the connection.
    node_error(
        within(intruder.authenticate(alice, &wrong_key)).await,
        ErrorCode::Throttled,
    );
    assert_eq!(node.auth_failures(), failures_before + 3);
    assert_eq!(closed_by_node(&intruder).await, 1014);
    assert!(matches!(
        within(intruder.balance()).await,
        Err(ClientError::Disconnected)
    ));
    intruder.close().await;

    // Nothing moved, and the owner's key still works.
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 500);
    assert_eq!(within(bob_phone.balance()).await.unwrap(), 0);
    let again = node.reconnect(alice, &credentials).await;
    assert_eq!(within(again.balance()).await.unwrap(), 500);
    assert_eq!(node.auth_failures(), failures_before + 3);
    let _ = bob;
    for phone in [alice_phone, bob_phone, again] {
        phone.close().await;
    }
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_authenticate_on_a_connection_gets_1011() {
    // Goal: a connection speaks for one account for its whole life; a second
    // authenticate, even for another account with its right key, is refused.
    let node = TestNode::start(|_| {}).await;
    let (alice, mut alice_phone, credentials) = node.phone_with_account(500).await;
    let (bob, _bob_phone, bob_credentials) = node.phone_with_account(0).await;
    node_error(
        within(alice_phone.authenticate(bob, &bob_credentials.key)).await,
        ErrorCode::AlreadyAuthenticated,
    );
    node_error(
        within(alice_phone.authenticate(alice, &credentials.key)).await,
        ErrorCode::AlreadyAuthenticated,
    );
    // Still Alice.
    refused(
        within(alice_phone.submit(send(TxKey::new_random(), bob, 1))).await,
        tapledger_protocol::RejectCode::WrongParty,
    );
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 500);
    alice_phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_with_a_wrong_credential_get_1013_and_count_as_failures() {
    // Goal: opening an account and topping one up need the operator's
    // credential; a wrong one gets 1013, opens nothing, moves nothing, and
    // counts towards the connection's failure limit.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, _) = node.phone_with_account(500).await;
    let failures_before = node.auth_failures();
    let wrong = Secret::new(vec![0x5a; 32]);
    let credentials = ApiCredentials::generate();

    let operator = node.connect().await;
    node_error(
        within(operator.open_account(&wrong, "checking", "Rogue Bank", &credentials, 1_000_000))
            .await,
        ErrorCode::BadAdminCredential,
    );
    node_error(
        within(operator.top_up(&wrong, alice, 1_000_000)).await,
        ErrorCode::BadAdminCredential,
    );
    assert_eq!(node.auth_failures(), failures_before + 2);
    node_error(
        within(operator.top_up(&wrong, alice, 1_000_000)).await,
        ErrorCode::Throttled,
    );
    assert_eq!(closed_by_node(&operator).await, 1014);
    operator.close().await;

    assert_eq!(within(alice_phone.balance()).await.unwrap(), 500);
    // No account was opened: the next one gets the next id.
    let (next, next_phone, _) = node.phone_with_account(0).await;
    assert_eq!(next, alice + 1);
    next_phone.close().await;
    alice_phone.close().await;
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_authentication_get_1010_and_the_stream_goes_on() {
    // Goal: every request that needs an account is answered 1010 before
    // `authenticate`, without closing anything; authenticating afterwards on
    // the same stream works.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, credentials) = node.phone_with_account(500).await;
    alice_phone.close().await;
    let key = TxKey::new_random();

    let mut phone = node.connect().await;
    node_error(
        within(phone.submit(send(key, alice, 1))).await,
        ErrorCode::NotAuthenticated,
    );
    node_error(
        within(phone.query_outcome(key)).await,
        ErrorCode::NotAuthenticated,
    );
    node_error(within(phone.balance()).await, ErrorCode::NotAuthenticated);
    node_error(
        within(phone.history(None, 10)).await,
        ErrorCode::NotAuthenticated,
    );
    assert_eq!(node.auth_failures(), 0, "1010 is not a failed attempt");

    within(phone.authenticate(alice, &credentials.key))
        .await
        .unwrap();
    assert_eq!(within(phone.balance()).await.unwrap(), 500);
    let (status, _) = within(phone.query_outcome(key)).await.unwrap();
    assert_eq!(
        status,
        QueryStatus::Unknown,
        "the refused half left no trace"
    );
    phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_behind_authenticate_see_its_result() {
    // Goal: PROTOCOL.md section 3 lets a client send requests right behind
    // `authenticate` without waiting: they run after it. Behind a failed one
    // they get 1010. Raw frames, so the client library's waiting plays no part.
    let node = TestNode::start(|_| {}).await;
    let (alice, alice_phone, credentials) = node.phone_with_account(321).await;
    alice_phone.close().await;

    let mut frames = Vec::new();
    for message in [
        ClientMessage::Authenticate {
            request_id: 1,
            account_id: alice,
            api_key: credentials.key.clone(),
        },
        ClientMessage::Balance { request_id: 2 },
    ] {
        frames.extend(encode_frame_to_vec(&message).unwrap());
    }
    let phone = node.connect().await;
    within(phone.send_raw(&frames)).await.unwrap();
    let authenticated = within(phone.next_unrouted(WAIT)).await.unwrap();
    assert!(
        matches!(authenticated, NodeMessage::Authenticated { request_id: 1, account_id, .. } if account_id == alice),
        "{authenticated:?}"
    );
    let balance = within(phone.next_unrouted(WAIT)).await.unwrap();
    assert!(
        matches!(
            balance,
            NodeMessage::BalanceAnswer {
                request_id: 2,
                balance: 321,
                ..
            }
        ),
        "{balance:?}"
    );
    phone.close().await;

    let mut frames = Vec::new();
    for message in [
        ClientMessage::Authenticate {
            request_id: 1,
            account_id: alice,
            api_key: Secret::new(vec![1; 32]),
        },
        ClientMessage::Balance { request_id: 2 },
    ] {
        frames.extend(encode_frame_to_vec(&message).unwrap());
    }
    let phone = node.connect().await;
    within(phone.send_raw(&frames)).await.unwrap();
    for (request, code) in [
        (1, ErrorCode::BadCredentials),
        (2, ErrorCode::NotAuthenticated),
    ] {
        let answer = within(phone.next_unrouted(WAIT)).await.unwrap();
        assert!(
            matches!(answer, NodeMessage::Error { request_id: Some(id), code: got, .. } if id == request && got == code),
            "{answer:?}"
        );
    }
    phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinned_to_another_certificate_refuses_to_connect() {
    // Goal: pinning is enforced by the client. A client pinned to a freshly
    // generated certificate, to another real node's certificate, or to a
    // fingerprint one bit off, fails the handshake; the right pin connects.
    let node = TestNode::start(|_| {}).await;
    let other_node = TestNode::start(|_| {}).await;
    assert_ne!(node.node.fingerprint, other_node.node.fingerprint);
    let stranger = tapledger_certs::Identity::generate_default()
        .unwrap()
        .fingerprint();
    let mut one_bit_off = node.node.fingerprint;
    one_bit_off.0[31] ^= 1;

    for pin in [stranger, other_node.node.fingerprint, one_bit_off] {
        let endpoint = ClientEndpoint::new(pin, node.node.local_addr).unwrap();
        let attempt = within(endpoint.connect(node.node.local_addr, "localhost")).await;
        match attempt {
            Err(ClientError::Connect(reason)) => {
                assert!(reason.to_lowercase().contains("certificate"), "{reason}")
            }
            Err(other) => panic!("pinned to {pin}: unexpected error {other}"),
            Ok(_) => panic!("pinned to {pin}: connected to a node with another certificate"),
        }
    }
    // The node is unharmed, and the right pin works.
    let (_, phone, _) = node.phone_with_account(1).await;
    assert_eq!(within(phone.balance()).await.unwrap(), 1);
    phone.close().await;
    other_node.stop().await;
    node.stop().await;
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_authenticate_in_time_is_closed_with_1010() {
    // Goal: a connection must authenticate (or make an admin request with the
    // right credential) within `first_request_timeout`, else the node closes
    // it with 1010. Sending some other request does not buy time: otherwise
    // an anonymous client could hold a connection slot for ever with one
    // `balance` and keep-alives. Authenticated and operator connections stay.
    let node = TestNode::start(|config| {
        config.limits.first_request_timeout = std::time::Duration::from_millis(300)
    })
    .await;
    let (_, alice_phone, _) = node.phone_with_account(5).await;
    let operator = node.connect().await;
    let credentials = ApiCredentials::generate();
    within(operator.open_account(&node.admin, "savings", "Test Bank", &credentials, 0))
        .await
        .unwrap();
    let silent = node.connect().await;
    let chatty = node.connect().await;
    node_error(within(chatty.balance()).await, ErrorCode::NotAuthenticated);
    let guesser = node.connect().await;
    node_error(
        within(guesser.top_up(&Secret::new(vec![7; 32]), 1, 1)).await,
        ErrorCode::BadAdminCredential,
    );

    for phone in [&silent, &chatty, &guesser] {
        assert_eq!(closed_by_node(phone).await, 1010);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(alice_phone.close_reason().is_none());
    assert!(operator.close_reason().is_none());
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 5);
    within(operator.top_up(&node.admin, 1, 1)).await.unwrap();
    for phone in [alice_phone, operator, silent, chatty, guesser] {
        phone.close().await;
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_and_retry_is_transparent() {
    // Goal: the node serves at most `connections_max` connections and refuses
    // more at the handshake; a closed connection frees its place. With
    // `retry_above_connections` at 0 every client must first prove its
    // address with a QUIC Retry, which the client library handles unseen.
    let node = TestNode::start(|config| {
        config.limits.connections_max = 2;
        config.limits.retry_above_connections = 0;
    })
    .await;
    let (_, alice_phone, _) = node.phone_with_account(10).await;
    // The operator connection that opened the account has gone.
    node.wait_for_open_connections(1).await;
    let second = node.connect().await;
    let refused_attempt = within(node.endpoint.connect(node.node.local_addr, "localhost")).await;
    assert!(
        matches!(refused_attempt, Err(ClientError::Connect(_))),
        "a third connection was served: {:?}",
        refused_attempt.as_ref().err()
    );
    assert!(
        node.node
            .counters()
            .connections_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    second.close().await;
    // The place comes back once the node has seen the close.
    let third = within(async {
        loop {
            match node
                .endpoint
                .connect(node.node.local_addr, "localhost")
                .await
            {
                Ok(phone) => return phone,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 10);
    third.close().await;
    alice_phone.close().await;
    node.stop().await;
}
