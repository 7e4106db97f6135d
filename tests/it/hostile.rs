//! Hostile clients over real QUIC, beyond the single-request cases of
//! `network_frames.rs`, `network_auth.rs` and `network.rs`: each attack runs
//! while an honest pair of phones keeps paying each other on the same node,
//! and the test asserts both the attacker's answers and that every honest
//! payment settled.
//!
//! The last test measures how much honest throughput survives a flood of
//! garbage frames and wrong keys (printed, not asserted: timings depend on
//! the machine).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tapledger_node::{ApiCredentials, Phone};
use tapledger_protocol::{
    AccountId, ClientMessage, ErrorCode, FRAME_BYTES_MAX, Half, NodeMessage, OutcomeStatus,
    QueryStatus, ReceiveHalf, RejectCode, Secret, SendHalf, TxKey, encode_frame_to_vec,
};
use tapledger_tests::fuzz_targets::field_value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::net_support::*;
use crate::support::*;

/// How long to wait for an answer no request is routed to.
const WAIT: Duration = Duration::from_secs(5);
/// The authentication deadline where a test waits for it to pass.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_millis(2_500);

// ---------------------------------------------------------------------------
// The honest client: pairs of phones paying 1 back and forth until stopped.

/// Honest payments running in the background on their own connections.
pub(crate) struct Honest {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<u64>>,
    settled: Arc<AtomicU64>,
}

impl Honest {
    /// Opens `pairs` pairs of funded accounts (before any attack starts, so
    /// their connections exist) and starts paying.
    pub(crate) async fn start(node: &TestNode, pairs: usize) -> Honest {
        let (stop, stopped) = watch::channel(false);
        let settled = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..pairs {
            let (alice, alice_phone, _) = node.phone_with_account(1_000_000).await;
            let (bob, bob_phone, _) = node.phone_with_account(0).await;
            let stopped = stopped.clone();
            let settled = settled.clone();
            tasks.push(tokio::spawn(async move {
                let mut count = 0;
                while !*stopped.borrow() {
                    pay_one(&alice_phone, alice, &bob_phone, bob).await;
                    count += 1;
                    settled.fetch_add(1, Ordering::Relaxed);
                }
                assert_eq!(
                    within(alice_phone.balance()).await.unwrap(),
                    1_000_000 - count
                );
                assert_eq!(within(bob_phone.balance()).await.unwrap(), count);
                alice_phone.close().await;
                bob_phone.close().await;
                count
            }));
        }
        Honest {
            stop,
            tasks,
            settled,
        }
    }

    pub(crate) fn settled(&self) -> u64 {
        self.settled.load(Ordering::Relaxed)
    }

    /// Waits until `more` further payments settled: the node is serving.
    pub(crate) async fn wait_for(&self, more: u64) {
        let target = self.settled() + more;
        within(async {
            while self.settled() < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    /// Stops paying; every payment settled and the balances agree. Returns
    /// how many settled.
    pub(crate) async fn finish(self) -> u64 {
        let _ = self.stop.send(true);
        let mut total = 0;
        for task in self.tasks {
            total += within(task).await.expect("honest payer failed");
        }
        assert!(total > 0, "no honest payment settled");
        total
    }
}

/// One honest payment of 1 from Alice to Bob; both must hear "settled".
async fn pay_one(alice_phone: &Phone, alice: AccountId, bob_phone: &Phone, bob: AccountId) {
    let key = TxKey::new_random();
    let pending = accepted(within(alice_phone.submit(send(key, alice, 1))).await);
    let report = decided(within(bob_phone.submit(receive(key, bob, alice, 1))).await);
    assert_eq!(report.status, OutcomeStatus::Settled, "{report:?}");
    assert_eq!(decided_later(pending).await.status, OutcomeStatus::Settled);
}

// ---------------------------------------------------------------------------
// Raw QUIC, for attackers the client library would not let misbehave.

pub(crate) fn raw_endpoint(node: &TestNode) -> quinn::Endpoint {
    let crypto = tapledger_node::tls::client_crypto(node.node.fingerprint).expect("client TLS");
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    endpoint.set_default_client_config(config);
    endpoint
}

pub(crate) async fn raw_connect(endpoint: &quinn::Endpoint, node: &TestNode) -> quinn::Connection {
    within(
        endpoint
            .connect(node.node.local_addr, "localhost")
            .expect("connect"),
    )
    .await
    .expect("handshake")
}

/// Issue 12: PROTOCOL.md section 2 says the node takes no datagrams; it
/// must not advertise them either (it used to send a
/// `max_datagram_frame_size` transport parameter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_neither_takes_nor_advertises_datagrams() {
    let node = TestNode::start(|_| {}).await;
    let endpoint = raw_endpoint(&node);
    let connection = raw_connect(&endpoint, &node).await;
    assert_eq!(connection.max_datagram_size(), None);
    assert!(matches!(
        connection.send_datagram(b"hello".to_vec().into()),
        Err(quinn::SendDatagramError::UnsupportedByPeer)
    ));
    connection.close(0u32.into(), b"");
    node.assert_still_settles().await;
    node.stop().await;
}

/// A half with a chosen `device_os`.
fn send_with_os(tx_key: TxKey, sender_id: AccountId, amount: u64, device_os: String) -> Half {
    Half::Send(SendHalf {
        tx_key,
        sender_id,
        amount,
        device_os: device_os.into(),
        client_time: 0,
    })
}

/// The next unrouted answer must be `error` with `code`; returns it.
async fn unrouted_error(phone: &Phone, code: ErrorCode) -> (Option<u64>, String) {
    match within(phone.next_unrouted(WAIT)).await {
        Ok(NodeMessage::Error {
            request_id,
            code: got,
            message,
            ..
        }) => {
            assert_eq!(got, code, "error {got:?}: {message}");
            (request_id, message)
        }
        other => panic!("expected error {}, got {other:?}", code.code()),
    }
}

/// `frame` with the scalar value of its first `key` field replaced by `value`
/// (MessagePack bytes) and its length prefix fixed.
fn with_field(frame: &[u8], key: &str, value: &[u8]) -> Vec<u8> {
    let range = field_value(frame, key).unwrap_or_else(|| panic!("no scalar field {key}"));
    let mut frame = frame.to_vec();
    frame.splice(range, value.iter().copied());
    let body = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&body.to_be_bytes());
    frame
}

// ---------------------------------------------------------------------------
// The matrix.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_at_the_edges_of_u64_move_nothing_and_overflow_nothing() {
    // Goal: zero and u64::MAX wherever a client or operator names an amount
    // or an id: halves are refused 400 (or wait, for an unknown expected
    // sender, and can never settle), top-ups and openings that would overflow
    // a balance or the issuer's total get 1021, u64::MAX ids get the same
    // answers as any unknown id. No money moves; the books add up.
    let node = TestNode::start(|_| {}).await;
    let honest = Honest::start(&node, 1).await;
    let (mallory, phone, _) = node.phone_with_account(1_000).await;
    let (victim, victim_phone, _) = node.phone_with_account(0).await;
    let admin = node.connect().await;

    for amount in [0, u64::MAX] {
        let key = TxKey::new_random();
        refused(
            within(phone.submit(send(key, mallory, amount))).await,
            RejectCode::InvalidAmount,
        );
        refused(
            within(phone.submit(receive(key, mallory, victim, amount))).await,
            RejectCode::InvalidAmount,
        );
    }
    // Ids at the edge: a half for u64::MAX is for someone else (620); a
    // receive half expecting sender u64::MAX waits and can only ever end as a
    // mismatch or expire; authenticating as u64::MAX is a plain 1012.
    refused(
        within(phone.submit(send(TxKey::new_random(), u64::MAX, 5))).await,
        RejectCode::WrongParty,
    );
    let expecting_nobody = TxKey::new_random();
    let _waits =
        accepted(within(phone.submit(receive(expecting_nobody, mallory, u64::MAX, 5))).await);
    let mut stranger = node.connect().await;
    node_error(
        within(stranger.authenticate(u64::MAX, &Secret::new(vec![1; 32]))).await,
        ErrorCode::BadCredentials,
    );
    stranger.close().await;

    // Operator amounts: zero and overflowing top-ups, an opening that would
    // overflow the issuer's total.
    node_error(
        within(admin.top_up(&node.admin, victim, 0)).await,
        ErrorCode::InvalidAmount,
    );
    within(admin.top_up(&node.admin, victim, u64::MAX - 2_000_000))
        .await
        .unwrap();
    node_error(
        within(admin.top_up(&node.admin, victim, u64::MAX)).await,
        ErrorCode::InvalidAmount,
    );
    node_error(
        within(admin.open_account(
            &node.admin,
            "checking",
            "Test Bank",
            &ApiCredentials::generate(),
            u64::MAX,
        ))
        .await,
        ErrorCode::InvalidAmount,
    );
    node_error(
        within(admin.top_up(&node.admin, u64::MAX, 1)).await,
        ErrorCode::UnknownAccount,
    );
    assert_eq!(within(phone.balance()).await.unwrap(), 1_000);
    assert_eq!(
        within(victim_phone.balance()).await.unwrap(),
        u64::MAX - 2_000_000
    );

    honest.wait_for(3).await;
    honest.finish().await;
    for phone in [phone, victim_phone, admin] {
        phone.close().await;
    }
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_and_float_amounts_in_raw_msgpack_are_malformed() {
    // Goal: MessagePack can say -1000, -1, i64::MIN or 100.0 where the
    // protocol wants an unsigned integer. None of them may become a huge
    // unsigned amount or a float: each frame gets 1000 (malformed), nothing
    // is stored, and the stream goes on. A positive amount written as a
    // signed 64-bit integer (as some MessagePack writers do) is just 100.
    let node = TestNode::start(|_| {}).await;
    let honest = Honest::start(&node, 1).await;
    let (mallory, phone, _) = node.phone_with_account(1_000).await;
    let (bob, bob_phone, _) = node.phone_with_account(0).await;

    let key = TxKey::new_random();
    let frame = encode_frame_to_vec(&ClientMessage::SubmitHalf {
        request_id: 41,
        half: send(key, mallory, 100),
    })
    .unwrap();
    let hostile_values: [(&str, &str, &[u8]); 8] = [
        ("amount", "-1000", &[0xd1, 0xfc, 0x18]),
        ("amount", "-1", &[0xff]),
        ("amount", "i64::MIN", &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ("amount", "100.0", &[0xcb, 0x40, 0x59, 0, 0, 0, 0, 0, 0]),
        ("amount", "\"100\"", &[0xa3, b'1', b'0', b'0']),
        ("amount", "nil", &[0xc0]),
        ("sender_id", "-1", &[0xff]),
        ("request_id", "-7", &[0xf9]),
    ];
    for (field, what, value) in hostile_values {
        within(phone.send_raw(&with_field(&frame, field, value)))
            .await
            .unwrap();
        let (request_id, message) = unrouted_error(&phone, ErrorCode::Malformed).await;
        // The error names its request whenever the request_id is readable.
        let expected = (field != "request_id").then_some(41);
        assert_eq!(request_id, expected, "{field} = {what}: {message}");
        assert_eq!(
            within(phone.balance()).await.unwrap(),
            1_000,
            "{field} = {what}"
        );
    }
    let (status, _) = within(phone.query_outcome(key)).await.unwrap();
    assert_eq!(
        status,
        QueryStatus::Unknown,
        "nothing was stored under the key"
    );
    // Negative values in other requests are malformed the same way.
    let history = encode_frame_to_vec(&ClientMessage::History {
        request_id: 42,
        before_seq: Some(5),
        limit: 10,
    })
    .unwrap();
    for (field, value) in [("limit", &[0xff][..]), ("before_seq", &[0xd0, 0x80][..])] {
        within(phone.send_raw(&with_field(&history, field, value)))
            .await
            .unwrap();
        unrouted_error(&phone, ErrorCode::Malformed).await;
    }

    // 100 as int64 is fine: it pairs and settles as 100.
    within(phone.send_raw(&with_field(
        &frame,
        "amount",
        &[0xd3, 0, 0, 0, 0, 0, 0, 0, 100],
    )))
    .await
    .unwrap();
    match within(phone.next_unrouted(WAIT)).await {
        Ok(NodeMessage::Accepted {
            request_id: 41,
            tx_key,
        }) => assert_eq!(tx_key, key),
        other => panic!("expected the int64 amount to be accepted, got {other:?}"),
    }
    let report = decided(within(bob_phone.submit(receive(key, bob, mallory, 100))).await);
    assert_eq!(report.status, OutcomeStatus::Settled);
    assert_eq!(report.amount, Some(100));
    assert_eq!(within(phone.balance()).await.unwrap(), 900);

    honest.wait_for(3).await;
    honest.finish().await;
    phone.close().await;
    bob_phone.close().await;
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_strings_get_1003_or_1002_with_short_answers() {
    // Goal: strings far over their limits (up to a whole frame's worth) in
    // every text or byte field a client sends get 1003 carrying the request
    // id (1002 for a huge unknown `type`), the answer stays short however
    // long the input, nothing is stored, and the stream goes on.
    let node = TestNode::start(|_| {}).await;
    let honest = Honest::start(&node, 1).await;
    let (mallory, phone, _) = node.phone_with_account(1_000).await;
    let accounts_before = node.ledger().store().counters().unwrap().account_next;
    // Room in a frame for the rest of a submit_half message.
    let huge = "é".repeat((FRAME_BYTES_MAX - 300) / 2);
    let key = TxKey::new_random();
    let requests = [
        ClientMessage::SubmitHalf {
            request_id: 1,
            half: send_with_os(key, mallory, 5, huge.clone()),
        },
        ClientMessage::SubmitHalf {
            request_id: 2,
            half: Half::Receive(ReceiveHalf {
                tx_key: key,
                receiver_id: mallory,
                expected_sender_id: 1,
                expected_amount: 5,
                device_os: "x".repeat(65).into(),
                client_time: 0,
            }),
        },
        ClientMessage::Authenticate {
            request_id: 3,
            account_id: mallory,
            api_key: Secret::new(vec![7; FRAME_BYTES_MAX - 100]),
        },
        ClientMessage::OpenAccount {
            request_id: 4,
            admin_credential: node.admin.clone(),
            account_type: "a".repeat(65),
            bank_name: "Test Bank".into(),
            salt: vec![1; 16],
            key_hash: vec![2; 64],
            opening_balance: 1,
        },
        ClientMessage::OpenAccount {
            request_id: 5,
            admin_credential: node.admin.clone(),
            account_type: "checking".into(),
            bank_name: huge[..8_000].to_string(),
            salt: vec![1; 16],
            key_hash: vec![2; 64],
            opening_balance: 1,
        },
        ClientMessage::OpenAccount {
            request_id: 6,
            admin_credential: node.admin.clone(),
            account_type: "checking".into(),
            bank_name: "Test Bank".into(),
            salt: vec![1; 10_000],
            key_hash: vec![2; 64],
            opening_balance: 1,
        },
        ClientMessage::TopUp {
            request_id: 7,
            admin_credential: Secret::new(vec![3; 10_000]),
            account_id: mallory,
            amount: 1,
        },
    ];
    for request in &requests {
        let frame = encode_frame_to_vec(request).unwrap();
        assert!(frame.len() <= FRAME_BYTES_MAX + 4);
        within(phone.send_raw(&frame)).await.unwrap();
        let (request_id, message) = unrouted_error(&phone, ErrorCode::InvalidField).await;
        assert_eq!(request_id, Some(request.request_id()), "{message}");
        assert!(message.len() <= 256, "{} bytes of answer", message.len());
        assert_eq!(within(phone.balance()).await.unwrap(), 1_000);
    }
    // An unknown `type` of 10,000 bytes: 1002, named in a short answer.
    let mut body = vec![0x82, 0xa4];
    body.extend_from_slice(b"type");
    body.push(0xda);
    body.extend_from_slice(&10_000u16.to_be_bytes());
    body.extend(std::iter::repeat_n(b'z', 10_000));
    body.push(0xaa);
    body.extend_from_slice(b"request_id");
    body.push(0x09);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    within(phone.send_raw(&frame)).await.unwrap();
    let (_, message) = unrouted_error(&phone, ErrorCode::UnknownMessage).await;
    assert!(message.len() <= 256 && message.contains("zzz"), "{message}");

    let (status, _) = within(phone.query_outcome(key)).await.unwrap();
    assert_eq!(status, QueryStatus::Unknown);
    assert_eq!(
        node.ledger().store().counters().unwrap().account_next,
        accounts_before,
        "no account opened"
    );
    honest.wait_for(3).await;
    honest.finish().await;
    phone.close().await;
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_lone_halves_from_one_account_is_capped_with_800() {
    // Goal: one account pipelining 400 lone halves over 4 connections at
    // once gets exactly the per-account cap (64 by default, 32 per matcher
    // shard) accepted and 800 for every other; the node holds no more, and
    // honest payments go on settling. Once some of the flood is paired, the
    // account may wait on new halves again.
    const CONNECTIONS: usize = 4;
    const HALVES_PER_CONNECTION: usize = 100;
    let node = TestNode::start(|_| {}).await;
    let honest = Honest::start(&node, 1).await;
    let (mallory, first, credentials) = node.phone_with_account(1_000_000).await;
    let mut phones = vec![Arc::new(first)];
    for _ in 1..CONNECTIONS {
        phones.push(Arc::new(node.reconnect(mallory, &credentials).await));
    }
    let mut floods = tokio::task::JoinSet::new();
    for phone in &phones {
        for _ in 0..HALVES_PER_CONNECTION {
            let phone = phone.clone();
            floods.spawn(async move {
                let key = TxKey::new_random();
                (key, within(phone.submit(send(key, mallory, 1))).await)
            });
        }
    }
    let mut waiting = Vec::new();
    let mut refused_800 = 0;
    while let Some(joined) = within(floods.join_next()).await {
        let (key, answer) = joined.expect("flooding task");
        match answer {
            Ok(tapledger_node::Submitted::Accepted(pending)) => waiting.push((key, pending)),
            Ok(tapledger_node::Submitted::Answered(tapledger_node::HalfAnswer::Refused {
                code: RejectCode::TooManyPending,
                ..
            })) => refused_800 += 1,
            other => panic!("unexpected answer to a flooding half: {other:?}"),
        }
    }
    let cap = tapledger_actors::PENDING_HALVES_PER_ACCOUNT_MAX_DEFAULT as usize;
    assert_eq!(waiting.len(), cap, "halves accepted from one account");
    assert_eq!(refused_800, CONNECTIONS * HALVES_PER_CONNECTION - cap);
    let stored = node.ledger().store().all_pending().unwrap();
    let mallorys = stored.iter().filter(|half| half.party() == mallory).count();
    assert_eq!(mallorys, cap, "the node holds exactly the cap");
    honest.wait_for(3).await;

    // Pair ten of them: ten places free up, on the matcher shards (key
    // parity, with the default two) those keys were on.
    let (bob, bob_phone, _) = node.phone_with_account(0).await;
    let mut freed = Vec::new();
    for (key, pending) in waiting.drain(..10) {
        decided(within(bob_phone.submit(receive(key, bob, mallory, 1))).await);
        assert_eq!(decided_later(pending).await.status, OutcomeStatus::Settled);
        freed.push(key.as_u128() % 2);
    }
    let key_on = |shard: u128| loop {
        let key = TxKey::new_random();
        if key.as_u128() % 2 == shard {
            return key;
        }
    };
    for shard in freed {
        accepted(within(phones[0].submit(send(key_on(shard), mallory, 1))).await);
    }
    for shard in 0..2 {
        refused(
            within(phones[0].submit(send(key_on(shard), mallory, 1))).await,
            RejectCode::TooManyPending,
        );
    }
    honest.finish().await;
    drop(waiting);
    for phone in phones {
        Arc::into_inner(phone).expect("floods done").close().await;
    }
    bob_phone.close().await;
    node.assert_books();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_from_one_client_are_capped_and_idle_ones_are_closed() {
    // Goal: one client opening connections as fast as it can gets at most
    // `connections_max` in total (the honest phones' included) and refusals
    // after that; its connections, which never authenticate, are closed with
    // 1010 after `first_request_timeout`, so the places come back for new
    // honest phones. The honest pair, connected first, never stops settling.
    const CONNECTIONS_MAX: usize = 12;
    let node = TestNode::start(|config| {
        config.limits.connections_max = CONNECTIONS_MAX;
        // Long enough for 24 handshakes on a busy machine.
        config.limits.first_request_timeout = FIRST_REQUEST_TIMEOUT;
    })
    .await;
    let honest = Honest::start(&node, 1).await;
    let (alice, alice_first, alice_credentials) = node.phone_with_account(10).await;
    alice_first.close().await;
    // The honest pair holds two connections; the operator ones are gone.
    node.wait_for_open_connections(2).await;

    let attacker = raw_endpoint(&node);
    let mut held = Vec::new();
    let mut refusals = 0;
    for _ in 0..CONNECTIONS_MAX * 2 {
        let connecting = attacker
            .connect(node.node.local_addr, "localhost")
            .expect("connect");
        match within(connecting).await {
            Ok(connection) => held.push(connection),
            Err(_) => refusals += 1,
        }
    }
    assert_eq!(
        held.len(),
        CONNECTIONS_MAX - 2,
        "connections the attacker got"
    );
    assert_eq!(refusals, CONNECTIONS_MAX + 2);
    honest.wait_for(3).await;

    // A new phone cannot get in while the places are held...
    assert!(
        within(node.endpoint.connect(node.node.local_addr, "localhost"))
            .await
            .is_err()
    );
    // ...but the attacker's connections are closed once the deadline passes,
    // and then it can.
    for connection in &held {
        let reason = within(connection.closed()).await;
        assert!(
            matches!(&reason, quinn::ConnectionError::ApplicationClosed(close)
                if close.error_code.into_inner() == 1010),
            "{reason:?}"
        );
    }
    let alice_phone = within(async {
        loop {
            match node
                .endpoint
                .connect(node.node.local_addr, "localhost")
                .await
            {
                Ok(mut phone) => {
                    phone
                        .authenticate(alice, &alice_credentials.key)
                        .await
                        .unwrap();
                    return phone;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert_eq!(within(alice_phone.balance()).await.unwrap(), 10);
    honest.wait_for(3).await;
    honest.finish().await;
    alice_phone.close().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_opened_and_never_finished_are_capped_and_timed_out() {
    // Goal: a connection that opens streams and sends a partial frame on
    // each (the node cannot see a stream before its first byte) may hold at
    // most `streams_per_connection_max` of them: opening one more waits for
    // a place that never comes. Without authenticating it is closed with
    // 1010 after `first_request_timeout`. An authenticated connection doing
    // the same keeps its stuck streams but can still use a fresh one (it has
    // a spare), and honest payments go on throughout.
    let node = TestNode::start(|config| {
        config.limits.first_request_timeout = FIRST_REQUEST_TIMEOUT;
    })
    .await;
    let honest = Honest::start(&node, 1).await;
    let streams_max = tapledger_protocol::STREAMS_PER_CONNECTION_MAX_DEFAULT as usize;
    let endpoint = raw_endpoint(&node);

    // Anonymous: fills its streams with half a length prefix, or a prefix
    // whose body never comes.
    let anonymous = raw_connect(&endpoint, &node).await;
    let mut stuck = Vec::new();
    for index in 0..streams_max {
        let (mut send, recv) = within(anonymous.open_bi()).await.unwrap();
        let partial: &[u8] = if index % 2 == 0 {
            &[0, 0]
        } else {
            &[0, 0, 0, 100, 0x82, 0xa4]
        };
        within(send.write_all(partial)).await.unwrap();
        stuck.push((send, recv));
    }
    let one_more = tokio::time::timeout(Duration::from_millis(300), anonymous.open_bi()).await;
    assert!(one_more.is_err(), "a stream beyond the cap was opened");
    let reason = within(anonymous.closed()).await;
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code.into_inner() == 1010),
        "{reason:?}"
    );
    drop(stuck);
    honest.wait_for(3).await;

    // Authenticated: its own request stream works, plus stuck streams up to
    // the cap; the stuck ones do not block the working one.
    let (_, phone, _) = node.phone_with_account(77).await;
    // The client library keeps its connection private: raw QUIC for the
    // stuck streams of a second account.
    let (mallory, _, credentials) = node.phone_with_account(5).await;
    let raw = raw_connect(&endpoint, &node).await;
    let (mut request, mut answers) = within(raw.open_bi()).await.unwrap();
    let authenticate = encode_frame_to_vec(&ClientMessage::Authenticate {
        request_id: 1,
        account_id: mallory,
        api_key: credentials.key.clone(),
    })
    .unwrap();
    within(request.write_all(&authenticate)).await.unwrap();
    let mut buffer = vec![0u8; 512];
    let read = within(answers.read(&mut buffer)).await.unwrap().unwrap();
    assert!(read > 4, "an answer to authenticate");
    let mut stuck = Vec::new();
    for _ in 1..streams_max {
        let (mut send, recv) = within(raw.open_bi()).await.unwrap();
        within(send.write_all(&[0, 0, 1])).await.unwrap();
        stuck.push((send, recv));
    }
    let balance = encode_frame_to_vec(&ClientMessage::Balance { request_id: 2 }).unwrap();
    within(request.write_all(&balance)).await.unwrap();
    let read = within(answers.read(&mut buffer)).await.unwrap().unwrap();
    let answer = tapledger_protocol::decode_frame::<NodeMessage>(&buffer[..read]).unwrap();
    assert!(
        matches!(
            answer,
            Some((NodeMessage::BalanceAnswer { balance: 5, .. }, _))
        ),
        "{answer:?}"
    );
    // Past the first-request deadline it stays: it authenticated.
    tokio::time::sleep(FIRST_REQUEST_TIMEOUT + Duration::from_millis(200)).await;
    assert!(raw.close_reason().is_none(), "{:?}", raw.close_reason());
    assert_eq!(within(phone.balance()).await.unwrap(), 77);
    honest.wait_for(3).await;
    honest.finish().await;
    raw.close(0u32.into(), b"bye");
    phone.close().await;
    node.stop().await;
}

// ---------------------------------------------------------------------------
// Measurement: honest throughput under a flood.

/// Seconds per phase unless `TAPLEDGER_FLOOD_SECS` says otherwise.
const FLOOD_SECS_DEFAULT: f64 = 0.5;

/// Prints one phase; `baseline` is the quiet rate to compare with.
fn report(attack: Attack, phase: &Phase, baseline: f64, secs: f64) {
    println!(
        "flood measurement, {secs} s, attack {attack:?}: honest {:.0} payments/s ({:.0}% of the \
         quiet phases around it); attacker sent {} garbage frames ({:.0}/s) and {} wrong keys \
         ({:.0}/s); CPU: this process {:.2} cores, other processes {:.2} cores",
        phase.payments_per_sec,
        100.0 * phase.payments_per_sec / baseline.max(1.0),
        phase.garbage_frames,
        phase.garbage_frames as f64 / secs,
        phase.wrong_keys,
        phase.wrong_keys as f64 / secs,
        phase.own_cores,
        phase.other_cores,
    );
}

/// Sends garbage frames as fast as the node takes them, discarding the
/// answers, and connects again whenever the node closes the connection (or
/// the first-request deadline does); returns frames sent.
async fn garbage_flooder(
    node_addr: std::net::SocketAddr,
    endpoint: quinn::Endpoint,
    stop: watch::Receiver<bool>,
) -> u64 {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut sent = 0;
    let mut batch = Vec::with_capacity(64 * 1024);
    while !*stop.borrow() {
        let Ok(connecting) = endpoint.connect(node_addr, "localhost") else {
            break;
        };
        let Ok(connection) = connecting.await else {
            continue;
        };
        let Ok((mut send, mut recv)) = connection.open_bi().await else {
            continue;
        };
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 * 1024];
            while let Ok(Some(_)) = recv.read(&mut sink).await {}
        });
        while !*stop.borrow() {
            batch.clear();
            for _ in 0..256 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let len = 1 + (state % 48) as usize;
                batch.extend_from_slice(&(len as u32).to_be_bytes());
                batch.extend((0..len).map(|index| (state >> (index % 8 * 8)) as u8 | 0x80));
            }
            if send.write_all(&batch).await.is_err() {
                break;
            }
            sent += 256;
        }
        connection.close(0u32.into(), b"again");
        drain.abort();
    }
    sent
}

/// Connects again and again, trying three wrong keys each time (the node
/// closes the connection after the third); returns attempts made.
async fn wrong_key_flooder(
    node_addr: std::net::SocketAddr,
    endpoint: quinn::Endpoint,
    account: AccountId,
    stop: watch::Receiver<bool>,
) -> u64 {
    let mut attempts = 0;
    while !*stop.borrow() {
        let Ok(connecting) = endpoint.connect(node_addr, "localhost") else {
            break;
        };
        let Ok(connection) = connecting.await else {
            continue;
        };
        let Ok((mut send, mut recv)) = connection.open_bi().await else {
            continue;
        };
        let mut frames = Vec::new();
        for request_id in 0..3 {
            frames.extend(
                encode_frame_to_vec(&ClientMessage::Authenticate {
                    request_id,
                    account_id: account,
                    api_key: Secret::new(vec![request_id as u8; 32]),
                })
                .unwrap(),
            );
        }
        if send.write_all(&frames).await.is_ok() {
            attempts += 3;
        }
        let mut sink = vec![0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(Some(_)) = recv.read(&mut sink).await {}
        })
        .await;
        connection.close(0u32.into(), b"again");
    }
    attempts
}

/// CPU time in USER_HZ ticks (100 a second on Linux): the whole machine's
/// busy and total time from `/proc/stat`, and this process's own from
/// `/proc/self/stat`. Zeros where those files do not exist.
#[derive(Clone, Copy, Default)]
pub(crate) struct CpuTicks {
    machine_busy: u64,
    machine_total: u64,
    own: u64,
}

impl CpuTicks {
    pub(crate) fn now() -> CpuTicks {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let field = |index: usize| fields.get(index).copied().unwrap_or(0);
        let idle = field(3) + field(4);
        let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
        let own_stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // After the command name (which may hold spaces) come the state,
        // then numbered fields; utime and stime are the 14th and 15th of the
        // whole line, so the 12th and 13th after the name.
        let after_name = own_stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or("");
        let own_field = |index: usize| -> u64 {
            after_name
                .split_whitespace()
                .nth(index)
                .and_then(|field| field.parse().ok())
                .unwrap_or(0)
        };
        let own = own_field(11) + own_field(12);
        CpuTicks {
            machine_busy: busy,
            machine_total: busy + idle,
            own,
        }
    }

    /// Cores this process used, and cores other processes used, since `earlier`.
    pub(crate) fn cores_since(self, earlier: CpuTicks) -> (f64, f64) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = self
            .machine_total
            .saturating_sub(earlier.machine_total)
            .max(1) as f64;
        let busy = self.machine_busy.saturating_sub(earlier.machine_busy) as f64;
        let own = self.own.saturating_sub(earlier.own) as f64;
        let share = |ticks: f64| ticks / total * cores;
        (share(own), share((busy - own).max(0.0)))
    }
}

/// What the attacker does during one phase of the measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
    None,
    Garbage,
    WrongKeys,
    Both,
}

/// One phase of the measurement.
struct Phase {
    payments_per_sec: f64,
    garbage_frames: u64,
    wrong_keys: u64,
    /// Cores used by this test process (node, honest phones and attacker).
    own_cores: f64,
    /// Cores used by other processes on the machine meanwhile.
    other_cores: f64,
}

/// Honest payments per second during `phase` while `attack` runs, what the
/// attacker sent, and the CPU used.
async fn measure(
    node: &TestNode,
    honest: &Honest,
    victim: AccountId,
    attack: Attack,
    phase: Duration,
) -> Phase {
    let (stop, stopped) = watch::channel(false);
    let endpoint = raw_endpoint(node);
    let addr = node.node.local_addr;
    let garbage_tasks = if matches!(attack, Attack::Garbage | Attack::Both) {
        2
    } else {
        0
    };
    let key_tasks = if matches!(attack, Attack::WrongKeys | Attack::Both) {
        2
    } else {
        0
    };
    let garbage: Vec<_> = (0..garbage_tasks)
        .map(|_| tokio::spawn(garbage_flooder(addr, endpoint.clone(), stopped.clone())))
        .collect();
    let keys: Vec<_> = (0..key_tasks)
        .map(|_| {
            tokio::spawn(wrong_key_flooder(
                addr,
                endpoint.clone(),
                victim,
                stopped.clone(),
            ))
        })
        .collect();
    // Let the attack get going before counting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (before, started, cpu) = (honest.settled(), Instant::now(), CpuTicks::now());
    tokio::time::sleep(phase).await;
    let payments_per_sec = (honest.settled() - before) as f64 / started.elapsed().as_secs_f64();
    let (own_cores, other_cores) = CpuTicks::now().cores_since(cpu);
    let _ = stop.send(true);
    let mut garbage_frames = 0;
    for task in garbage {
        garbage_frames += within(task).await.unwrap();
    }
    let mut wrong_keys = 0;
    for task in keys {
        wrong_keys += within(task).await.unwrap();
    }
    Phase {
        payments_per_sec,
        garbage_frames,
        wrong_keys,
        own_cores,
        other_cores,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_throughput_with_and_without_a_flooding_attacker() {
    // Measurement, printed: honest payments per second on a node with 4
    // honest pairs, alone and while one attacker (2 tasks per kind, one UDP
    // socket) floods it with garbage frames, with wrong API keys (a new
    // connection per three), or both, at full speed. Node, honest phones and
    // attacker share this machine's cores, so the attacker's own CPU counts
    // against the node: the figures are a floor. `TAPLEDGER_FLOOD_SECS` sets
    // the length of each phase. Asserted: every honest payment settles.
    let secs = std::env::var("TAPLEDGER_FLOOD_SECS")
        .ok()
        .and_then(|secs| secs.parse::<f64>().ok())
        .unwrap_or(FLOOD_SECS_DEFAULT);
    let phase = Duration::from_secs_f64(secs);
    let node = TestNode::start(|_| {}).await;
    let (victim, victim_phone, _) = node.phone_with_account(1).await;
    victim_phone.close().await;
    let honest = Honest::start(&node, 4).await;
    honest.wait_for(1).await;

    // Each attack between two quiet phases, so that a change in the
    // machine's load shows as a change between the quiet ones.
    let mut quiet = measure(&node, &honest, victim, Attack::None, phase).await;
    report(Attack::None, &quiet, quiet.payments_per_sec, secs);
    for attack in [Attack::Garbage, Attack::WrongKeys, Attack::Both] {
        let attacked = measure(&node, &honest, victim, attack, phase).await;
        let after = measure(&node, &honest, victim, Attack::None, phase).await;
        let baseline = (quiet.payments_per_sec + after.payments_per_sec) / 2.0;
        report(attack, &attacked, baseline, secs);
        report(Attack::None, &after, after.payments_per_sec, secs);
        quiet = after;
    }
    let total = honest.finish().await;
    println!(
        "flood measurement: {total} honest payments settled in all, {} failed authentications \
         counted by the node",
        node.auth_failures()
    );
    node.assert_books();
    node.stop().await;
}
