//! Hostile and broken bytes on a real stream: each bad frame gets the error
//! PROTOCOL.md section 4 promises, the stream goes on where it can, and the
//! node keeps settling honest payments afterwards.

use std::time::Duration;

use tapledger_node::{ClientError, Phone};
use tapledger_protocol::{
    ClientMessage, ErrorCode, FRAME_BYTES_MAX, Half, NodeMessage, RequestId, SendHalf, TxKey,
    encode_frame_to_vec,
};

use crate::net_support::*;
use crate::support::*;

/// How long to wait for an answer that no request is routed to.
const WAIT: Duration = Duration::from_secs(5);

/// A frame: the 4-byte big-endian length, then `body`.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// A MessagePack `str` of fewer than 32 bytes.
fn fixstr(text: &str) -> Vec<u8> {
    assert!(text.len() < 32);
    let mut bytes = vec![0xa0 | text.len() as u8];
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

/// The next unrouted answer must be `error` with `code` and `request_id`.
async fn expect_error(phone: &Phone, code: ErrorCode, request_id: Option<RequestId>) -> String {
    match within(phone.next_unrouted(WAIT)).await {
        Ok(NodeMessage::Error {
            request_id: got_id,
            code: got,
            message,
            ..
        }) => {
            assert_eq!(got, code, "error {got:?}: {message}");
            assert_eq!(got_id, request_id, "error {got:?}: {message}");
            message
        }
        other => panic!("expected error {}, got {other:?}", code.code()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_1000_and_the_stream_continues() {
    // Goal: every kind of unreadable body inside a valid length prefix is
    // answered with 1000 and no request id, and the very next request on the
    // same stream is served.
    let node = TestNode::start(|_| {}).await;
    let (_, phone, _) = node.phone_with_account(42).await;
    let errors_before = node
        .node
        .counters()
        .protocol_errors
        .load(std::sync::atomic::Ordering::Relaxed);

    let mut balance_without_id = vec![0x81];
    balance_without_id.extend(fixstr("type"));
    balance_without_id.extend(fixstr("balance"));
    let mut balance_with_string_id = vec![0x82];
    balance_with_string_id.extend(fixstr("type"));
    balance_with_string_id.extend(fixstr("balance"));
    balance_with_string_id.extend(fixstr("request_id"));
    balance_with_string_id.extend(fixstr("seven"));
    let mut trailing =
        encode_frame_to_vec(&ClientMessage::Balance { request_id: 3 }).unwrap()[4..].to_vec();
    trailing.push(0xc0);
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("never-used byte 0xc1", vec![0xc1, 0xc1, 0xc1]),
        ("truncated str", vec![0xa5, b'a']),
        ("not a map", vec![0x07]),
        ("map with 15 entries, none present", vec![0x8f]),
        (
            "array declaring 2^32-1 items",
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        ),
        (
            "nesting deeper than 8",
            vec![0x91; 12].into_iter().chain([0xc0]).collect(),
        ),
        ("extension type", vec![0xd4, 0x01, 0x00]),
        ("known type, field missing", balance_without_id),
        (
            "known type, field of the wrong type",
            balance_with_string_id,
        ),
        ("trailing bytes", trailing),
    ];
    for (what, body) in &bodies {
        within(phone.send_raw(&frame(body))).await.unwrap();
        let message = expect_error(&phone, ErrorCode::Malformed, None).await;
        assert!(!message.is_empty(), "{what}");
        assert_eq!(within(phone.balance()).await.unwrap(), 42, "after {what}");
    }
    // An empty frame: 1000, and the stream resumes right after the prefix.
    within(phone.send_raw(&[0, 0, 0, 0])).await.unwrap();
    expect_error(&phone, ErrorCode::Malformed, None).await;
    assert_eq!(within(phone.balance()).await.unwrap(), 42);
    let errors_after = node
        .node
        .counters()
        .protocol_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(errors_after - errors_before, bodies.len() as u64 + 1);

    phone.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_message_type_gets_1002_and_the_stream_continues() {
    // Goal: a well-formed map whose `type` no client may send (including a
    // node message type) is answered 1002 naming its request_id (issue 12);
    // the stream goes on.
    let node = TestNode::start(|_| {}).await;
    let (_, phone, _) = node.phone_with_account(42).await;
    for type_name in ["launch_missiles", "balance_answer", "Balance", ""] {
        let mut body = vec![0x82];
        body.extend(fixstr("type"));
        body.extend(fixstr(type_name));
        body.extend(fixstr("request_id"));
        body.push(0x05);
        within(phone.send_raw(&frame(&body))).await.unwrap();
        let message = expect_error(&phone, ErrorCode::UnknownMessage, Some(5)).await;
        assert!(message.contains(type_name), "{message}");
        assert_eq!(within(phone.balance()).await.unwrap(), 42);
    }
    phone.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_outside_its_limits_gets_1003_with_the_request_id() {
    // Goal: well-formed requests breaking a field limit (section 12) get 1003
    // carrying their own request id, nothing is stored, and the stream goes on.
    let node = TestNode::start(|_| {}).await;
    let (alice, phone, _) = node.phone_with_account(42).await;
    let key = TxKey::new_random();
    let half_with_os = |device_os: String| {
        Half::Send(SendHalf {
            tx_key: key,
            sender_id: alice,
            amount: 1,
            device_os: device_os.into(),
            client_time: 0,
        })
    };
    let requests = [
        ClientMessage::SubmitHalf {
            request_id: 77,
            half: half_with_os("x".repeat(65)),
        },
        ClientMessage::SubmitHalf {
            request_id: 78,
            half: half_with_os("ios\n18".into()),
        },
        ClientMessage::History {
            request_id: 79,
            before_seq: None,
            limit: 0,
        },
        ClientMessage::History {
            request_id: 80,
            before_seq: None,
            limit: 51,
        },
        ClientMessage::Authenticate {
            request_id: 81,
            account_id: alice,
            api_key: tapledger_protocol::Secret::new(vec![1; 129]),
        },
    ];
    for request in &requests {
        within(phone.send_raw(&encode_frame_to_vec(request).unwrap()))
            .await
            .unwrap();
        expect_error(&phone, ErrorCode::InvalidField, Some(request.request_id())).await;
        assert_eq!(within(phone.balance()).await.unwrap(), 42);
    }
    // A device_os of exactly 64 bytes is fine.
    accepted(within(phone.submit(half_with_os("y".repeat(64)))).await);
    let (status, _) = within(phone.query_outcome(key)).await.unwrap();
    assert_eq!(status, tapledger_protocol::QueryStatus::Pending);
    phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_declared_over_the_limit_gets_1001_and_the_stream_is_stopped() {
    // Goal: a length prefix above FRAME_BYTES_MAX gets 1001 as soon as the
    // four bytes arrive (no body is sent at all), then the node finishes the
    // stream and stops reading it. The connection's owner can still use a new
    // connection, and the node still settles payments.
    let node = TestNode::start(|_| {}).await;
    let (alice, phone, credentials) = node.phone_with_account(42).await;
    let declared = u32::try_from(FRAME_BYTES_MAX + 1).unwrap();
    within(phone.send_raw(&declared.to_be_bytes()))
        .await
        .unwrap();
    expect_error(&phone, ErrorCode::FrameTooLarge, None).await;
    // The node finished its side: nothing more will come on this stream.
    assert!(matches!(
        within(phone.next_unrouted(WAIT)).await,
        Err(ClientError::Disconnected)
    ));
    assert!(within(phone.balance()).await.is_err());
    phone.close().await;

    // A prefix of u32::MAX is refused the same way.
    let (_, phone, _) = node.phone_with_account(0).await;
    within(phone.send_raw(&[0xff; 4])).await.unwrap();
    expect_error(&phone, ErrorCode::FrameTooLarge, None).await;
    phone.close().await;

    let again = node.reconnect(alice, &credentials).await;
    assert_eq!(within(again.balance()).await.unwrap(), 42);
    again.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_exactly_the_limit_is_read_whole_and_frames_may_arrive_in_pieces() {
    // Goal: the limit is inclusive (a 16384-byte body is read, then judged on
    // its content), and a valid frame trickling in a byte at a time, or
    // several frames in one write, are all understood.
    let node = TestNode::start(|_| {}).await;
    let (_, phone, _) = node.phone_with_account(42).await;

    let mut huge = vec![0xc1; FRAME_BYTES_MAX];
    huge[0] = 0x07;
    within(phone.send_raw(&frame(&huge))).await.unwrap();
    expect_error(&phone, ErrorCode::Malformed, None).await;

    let request = encode_frame_to_vec(&ClientMessage::Balance { request_id: 900 }).unwrap();
    for byte in &request {
        within(phone.send_raw(std::slice::from_ref(byte)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let answer = within(phone.next_unrouted(WAIT)).await.unwrap();
    assert!(
        matches!(
            answer,
            NodeMessage::BalanceAnswer {
                request_id: 900,
                balance: 42,
                ..
            }
        ),
        "{answer:?}"
    );

    let mut batch = Vec::new();
    for request_id in 901..=910 {
        batch.extend(encode_frame_to_vec(&ClientMessage::Balance { request_id }).unwrap());
    }
    within(phone.send_raw(&batch)).await.unwrap();
    let mut answered = Vec::new();
    for _ in 901..=910 {
        match within(phone.next_unrouted(WAIT)).await.unwrap() {
            NodeMessage::BalanceAnswer {
                request_id,
                balance: 42,
                ..
            } => answered.push(request_id),
            other => panic!("{other:?}"),
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, (901..=910).collect::<Vec<_>>());
    phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_never_break_the_node() {
    // Goal: a few hundred pseudo-random bodies (seeded, so a failure repeats)
    // each get exactly one error answer of a client-caused code, the stream
    // keeps going, and an honest payment settles afterwards.
    // The node closes a connection after `bad_frames_max` unusable frames, so
    // this allows more than 300 and checks that limit separately.
    let node = TestNode::start(|config| config.limits.bad_frames_max = 1_000).await;
    let (_, phone, _) = node.phone_with_account(42).await;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..300 {
        let len = 1 + (next() % 64) as usize;
        let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Start most bodies as a map with a "type" key, to reach deeper code.
        if round % 2 == 0 {
            let mut map = vec![0x82];
            map.extend(fixstr("type"));
            map.extend(fixstr(
                ["submit_half", "history", "authenticate"][round % 3],
            ));
            map.append(&mut body);
            body = map;
        }
        within(phone.send_raw(&frame(&body))).await.unwrap();
        match within(phone.next_unrouted(WAIT)).await {
            Ok(NodeMessage::Error { code, .. }) => {
                assert!(code.is_client_error(), "round {round}: {code:?}")
            }
            // A random body may happen to be a valid request; never one that
            // authenticates, since a random key matches no hash.
            Ok(other) => panic!("round {round}: {body:02x?} answered {other:?}"),
            Err(error) => panic!("round {round}: {body:02x?}: {error}"),
        }
    }
    assert_eq!(within(phone.balance()).await.unwrap(), 42);
    phone.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_sending_only_garbage_is_closed_with_1014() {
    // Goal: unusable frames are answered one by one up to `bad_frames_max`;
    // the last is followed by 1014 and the connection closes, while a
    // well-behaved connection on the same node goes on.
    let node = TestNode::start(|config| config.limits.bad_frames_max = 8).await;
    let (_, honest, _) = node.phone_with_account(5).await;
    let attacker = node.connect().await;
    for round in 0..8 {
        within(attacker.send_raw(&frame(&[0xc1]))).await.unwrap();
        match within(attacker.next_unrouted(WAIT)).await {
            Ok(NodeMessage::Error { code, .. }) => {
                assert_eq!(code, ErrorCode::Malformed, "round {round}")
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    match within(attacker.next_unrouted(WAIT)).await {
        Ok(NodeMessage::Error {
            code,
            request_id: None,
            ..
        }) => assert_eq!(code, ErrorCode::Throttled),
        other => panic!("expected 1014, got {other:?}"),
    }
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            if attacker.close_reason().is_some() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the attacker's connection is closed");
    assert_eq!(
        within(honest.balance()).await.unwrap(),
        5,
        "the honest phone is still served"
    );
    honest.close().await;
    node.assert_still_settles().await;
    node.stop().await;
}
