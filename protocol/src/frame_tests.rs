//! The frame codec: exact bytes, incremental input, every kind of bad input,
//! and property tests that decoding never panics and encoding round-trips.

use proptest::prelude::*;

use super::*;
use crate::auth::Secret;
use crate::domain::{Half, ReceiveHalf, RejectCode, SendHalf, Stamped, Timestamp, TxKey};
use crate::examples::{
    EXAMPLE_TX_KEY, client_examples, example_frames, example_send_half, hex_dump, node_examples,
};
use crate::limits::{
    ADMIN_CREDENTIAL_BYTES_MAX, ADMIN_CREDENTIAL_BYTES_MIN, API_KEY_BYTES_MAX, API_KEY_BYTES_MIN,
    HISTORY_PAGE_ENTRIES_MAX, KEY_HASH_BYTES, SALT_BYTES_MAX, SALT_BYTES_MIN,
};
use crate::messages::{
    HistoryEntry, HistoryKind, LeaderRef, OutcomeReport, OutcomeStatus, QueryStatus,
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// A frame around arbitrary body bytes.
pub(crate) fn framed(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

// Byte-exact vectors. They pin the encoding against library upgrades; the same
// bytes appear in PROTOCOL.md (checked below).

#[test]
fn balance_request_has_these_exact_bytes() {
    let frame = encode_frame_to_vec(&ClientMessage::Balance { request_id: 4 }).unwrap();
    assert_eq!(
        hex(&frame),
        "0000001a82a474797065a762616c616e6365aa726571756573745f696404"
    );
}

#[test]
fn authenticate_request_has_these_exact_bytes() {
    let frame = encode_frame_to_vec(&ClientMessage::Authenticate {
        request_id: 1,
        account_id: 1,
        api_key: Secret::new((0u8..32).collect::<Vec<u8>>()),
    })
    .unwrap();
    assert_eq!(
        hex(&frame),
        "0000005584a474797065ac61757468656e746963617465aa726571756573745f696401\
         aa6163636f756e745f696401a76170695f6b6579c420\
         000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    );
}

#[test]
fn send_half_submission_has_these_exact_bytes() {
    let frame = encode_frame_to_vec(&ClientMessage::SubmitHalf {
        request_id: 2,
        half: Half::Send(example_send_half()),
    })
    .unwrap();
    assert_eq!(
        hex(&frame),
        "0000007b83a474797065ab7375626d69745f68616c66aa726571756573745f696402\
         a468616c6681a453656e6485a674785f6b6579c41067e5504410b1426f9247bb680e5fe0c8\
         a973656e6465725f696401a6616d6f756e74cd09c4a96465766963655f6f73a3696f73\
         ab636c69656e745f74696d65cf0000018bcfe56800"
    );
}

#[test]
fn accepted_and_error_answers_have_these_exact_bytes() {
    let accepted = encode_frame_to_vec(&NodeMessage::Accepted {
        request_id: 2,
        tx_key: EXAMPLE_TX_KEY,
    })
    .unwrap();
    assert_eq!(
        hex(&accepted),
        "0000003483a474797065a86163636570746564aa726571756573745f696402\
         a674785f6b6579c41067e5504410b1426f9247bb680e5fe0c8"
    );
    let error = encode_frame_to_vec(&NodeMessage::error(
        Some(4),
        ErrorCode::NotAuthenticated,
        "",
    ))
    .unwrap();
    assert_eq!(
        error,
        unhex(
            "00 00 00 4a 84 a4 74 79 70 65 a5 65 72 72 6f 72
             aa 72 65 71 75 65 73 74 5f 69 64 04 a4 63 6f 64
             65 cd 03 f2 a7 6d 65 73 73 61 67 65 d9 20 61 75
             74 68 65 6e 74 69 63 61 74 65 20 62 65 66 6f 72
             65 20 74 68 69 73 20 72 65 71 75 65 73 74"
        )
    );
}

#[test]
fn protocol_md_shows_every_example_frame_byte_for_byte() {
    // Keeps PROTOCOL.md honest: regenerate its examples with
    // `cargo run -p tapledger-protocol --example wire_examples` when this fails.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    let document = std::fs::read_to_string(path).expect("PROTOCOL.md at the repository root");
    for (title, frame) in example_frames() {
        let dump = hex_dump(&frame);
        assert!(
            document.contains(&dump),
            "PROTOCOL.md lacks the frame for {title:?}:\n{dump}"
        );
        assert!(document.contains(&format!("#### {title}")), "{title}");
    }
}

#[test]
fn protocol_md_shows_the_admin_credential_as_raw_bytes() {
    // Issue 12: section 7.6 says how admin.key's hex text becomes the bytes on
    // the wire, with a byte example; the example is the encoder's output.
    let document = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md"))
        .expect("PROTOCOL.md at the repository root");
    let file_text = "5a".repeat(32);
    assert!(
        document.contains(&format!("\n{file_text}\n")),
        "the file's text"
    );
    let credential = Secret::new(unhex(&file_text));
    let encoded = rmp_serde::to_vec(&credential).unwrap();
    assert_eq!(encoded.len(), 34);
    assert!(
        document.contains(&hex_dump(&encoded)),
        "PROTOCOL.md lacks the credential's bytes:\n{}",
        hex_dump(&encoded)
    );
}

#[test]
fn every_prefix_of_a_frame_asks_for_more_bytes() {
    for (title, frame) in example_frames() {
        for cut in 0..frame.len() {
            assert_eq!(split_frame(&frame[..cut]), Ok(None), "{title} cut at {cut}");
        }
    }
}

#[test]
fn frames_back_to_back_decode_one_at_a_time() {
    let messages: Vec<ClientMessage> = client_examples().into_iter().map(|(_, m)| m).collect();
    let mut stream = Vec::new();
    for message in &messages {
        encode_frame(message, &mut stream).unwrap();
    }
    let mut decoded = Vec::new();
    let mut rest = &stream[..];
    while let Some((message, consumed)) = decode_frame::<ClientMessage>(rest).unwrap() {
        decoded.push(message);
        rest = &rest[consumed..];
    }
    assert!(rest.is_empty());
    assert_eq!(decoded, messages);
}

#[test]
fn oversized_length_is_refused_from_the_prefix_alone() {
    let declared = (FRAME_BYTES_MAX + 1) as u32;
    let error = decode_frame::<ClientMessage>(&declared.to_be_bytes()).unwrap_err();
    assert_eq!(error, DecodeError::FrameTooLarge { declared });
    assert_eq!(error.code(), ErrorCode::FrameTooLarge);
    assert_eq!(error.frame_bytes(), None, "the stream cannot continue");
    let error = decode_frame::<ClientMessage>(&u32::MAX.to_be_bytes()).unwrap_err();
    assert_eq!(error, DecodeError::FrameTooLarge { declared: u32::MAX });
}

#[test]
fn a_maximal_frame_waits_for_its_body() {
    let prefix = (FRAME_BYTES_MAX as u32).to_be_bytes();
    assert_eq!(decode_frame::<ClientMessage>(&prefix), Ok(None));
}

#[test]
fn empty_body_is_malformed_and_skippable() {
    let error = decode_frame::<ClientMessage>(&[0, 0, 0, 0, 0xff]).unwrap_err();
    assert_eq!(error, DecodeError::EmptyFrame);
    assert_eq!(error.code(), ErrorCode::Malformed);
    assert_eq!(error.frame_bytes(), Some(4));
}

#[test]
fn garbage_body_is_malformed_and_the_next_frame_still_decodes() {
    let mut stream = framed(&[0xc1, 0xff, 0x00]);
    encode_frame(&ClientMessage::Balance { request_id: 8 }, &mut stream).unwrap();
    let error = decode_frame::<ClientMessage>(&stream).unwrap_err();
    assert_eq!(error.code(), ErrorCode::Malformed);
    let skip = error.frame_bytes().unwrap();
    assert_eq!(skip, 7);
    let (message, _) = decode_frame::<ClientMessage>(&stream[skip..])
        .unwrap()
        .unwrap();
    assert_eq!(message, ClientMessage::Balance { request_id: 8 });
}

#[test]
fn unknown_type_is_told_apart_from_a_broken_known_type() {
    // {"type": "transfer_all", "request_id": 1}
    let body = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([
        ("request_id", rmpv_like::Value::Int(1)),
        ("type", rmpv_like::Value::Text("transfer_all")),
    ]))
    .unwrap();
    let error = decode_frame::<ClientMessage>(&framed(&body)).unwrap_err();
    assert_eq!(
        error,
        DecodeError::UnknownMessage {
            type_name: "transfer_all".to_owned(),
            request_id: Some(1),
            frame_bytes: body.len() + 4,
        }
    );
    assert_eq!(error.code(), ErrorCode::UnknownMessage);
    // The error names its request (issue 12).
    assert_eq!(error.request_id(), Some(1));

    // A node message sent to the node is unknown to it.
    let accepted = encode_frame_to_vec(&NodeMessage::Accepted {
        request_id: 1,
        tx_key: EXAMPLE_TX_KEY,
    })
    .unwrap();
    let error = decode_frame::<ClientMessage>(&accepted).unwrap_err();
    assert_eq!(error.code(), ErrorCode::UnknownMessage);

    // {"type": "balance"} without its request_id: a known type, broken.
    let body =
        rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("type", "balance")])).unwrap();
    let error = decode_frame::<ClientMessage>(&framed(&body)).unwrap_err();
    assert_eq!(error.code(), ErrorCode::Malformed, "{error}");
}

#[test]
fn a_field_over_its_limit_is_invalid_and_keeps_the_request_id() {
    let mut half = example_send_half();
    half.device_os = "x".repeat(crate::STRING_BYTES_MAX + 1).into();
    let frame = encode_frame_to_vec(&ClientMessage::SubmitHalf {
        request_id: 41,
        half: Half::Send(half),
    })
    .unwrap();
    let error = decode_frame::<ClientMessage>(&frame).unwrap_err();
    assert_eq!(error.code(), ErrorCode::InvalidField);
    assert_eq!(error.request_id(), Some(41));
    assert_eq!(error.frame_bytes(), Some(frame.len()));
}

#[test]
fn decoding_tolerates_what_other_msgpack_writers_produce() {
    // Fields in another order, integers wider than needed, an unknown extra
    // key, a missing optional field, and a tx_key as an array of integers.
    let mut body = vec![0x85];
    body.extend_from_slice(b"\xa5limit\xcf\x00\x00\x00\x00\x00\x00\x00\x07");
    body.extend_from_slice(b"\xa4type\xa7history");
    body.extend_from_slice(b"\xa7comment\xa5hello");
    body.extend_from_slice(b"\xaarequest_id\xd3\x00\x00\x00\x00\x00\x00\x00\x09");
    body.extend_from_slice(b"\xa6future\x90");
    let (message, _) = decode_frame::<ClientMessage>(&framed(&body))
        .unwrap()
        .unwrap();
    assert_eq!(
        message,
        ClientMessage::History {
            request_id: 9,
            before_seq: None,
            limit: 7,
        }
    );

    let mut body = vec![0x83];
    body.extend_from_slice(b"\xa4type\xadquery_outcome");
    body.extend_from_slice(b"\xaarequest_id\x01");
    body.extend_from_slice(b"\xa6tx_key\xdc\x00\x10");
    for byte in EXAMPLE_TX_KEY.0 {
        // Each element as a uint8, as some writers send bytes.
        body.extend_from_slice(&[0xcc, byte]);
    }
    let (message, _) = decode_frame::<ClientMessage>(&framed(&body))
        .unwrap()
        .unwrap();
    assert_eq!(
        message,
        ClientMessage::QueryOutcome {
            request_id: 1,
            tx_key: EXAMPLE_TX_KEY,
        }
    );
}

#[test]
fn wrong_value_types_are_malformed() {
    // amount as a string, request_id negative, tx_key of 15 bytes.
    let cases: [&[u8]; 3] = [
        b"\x83\xa4type\xa6top_up\xaarequest_id\x01\xa6amount\xa15",
        b"\x82\xa4type\xa7balance\xaarequest_id\xff",
        b"\x83\xa4type\xadquery_outcome\xaarequest_id\x01\xa6tx_key\xc4\x0f000000000000000",
    ];
    for body in cases {
        let error = decode_frame::<ClientMessage>(&framed(body)).unwrap_err();
        assert_eq!(error.code(), ErrorCode::Malformed, "{error}");
    }
}

#[test]
fn too_large_message_leaves_the_buffer_untouched() {
    let mut out = b"earlier frames".to_vec();
    let huge = NodeMessage::Error {
        request_id: None,
        code: ErrorCode::Internal,
        message: "x".repeat(FRAME_BYTES_MAX),
        leader: None,
    };
    let error = encode_frame(&huge, &mut out).unwrap_err();
    assert!(matches!(error, EncodeError::TooLarge { .. }), "{error}");
    assert_eq!(out, b"earlier frames");
}

#[test]
fn example_dump_format_is_sixteen_bytes_a_line() {
    let bytes: Vec<u8> = (0u8..20).collect();
    assert_eq!(
        hex_dump(&bytes),
        "00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f\n10 11 12 13"
    );
    assert_eq!(unhex(&hex_dump(&bytes)), bytes);
}

/// Just enough of a dynamic MessagePack value to build odd test bodies.
/// Issue 12: a request whose `request_id` can be read gets it back in its
/// error, whatever else is wrong with it; a body that is not a map (or whose
/// `request_id` is not a u64) gets nil.
#[test]
fn errors_name_the_request_whenever_its_id_is_readable() {
    let submit = ClientMessage::SubmitHalf {
        request_id: 7,
        half: Half::Send(SendHalf {
            amount: 5,
            ..example_send_half()
        }),
    };
    let good = rmp_serde::to_vec_named(&submit).unwrap();
    // `amount` (a6 61 6d 6f 75 6e 74) followed by the positive fixint 5.
    let key = b"\xa6amount\x05";
    let at = good
        .windows(key.len())
        .position(|window| window == key)
        .expect("the amount in the encoding")
        + key.len()
        - 1;
    let replace = |value: &[u8]| {
        let mut body = good[..at].to_vec();
        body.extend_from_slice(value);
        body.extend_from_slice(&good[at + 1..]);
        body
    };
    let negative = replace(&[0xfb]); // -5
    let float = replace(&[0xcb, 0x40, 0x14, 0, 0, 0, 0, 0, 0]); // 5.0
    let string = replace(&[0xa1, b'5']); // "5"
    for (what, body) in [("negative", negative), ("float", float), ("string", string)] {
        let error = decode_frame::<ClientMessage>(&framed(&body)).unwrap_err();
        assert_eq!(error.code(), ErrorCode::Malformed, "{what}");
        assert_eq!(error.request_id(), Some(7), "{what} amount: {error:?}");
    }
    // A request id that is not a u64 cannot be named.
    let unnamed = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([
        ("request_id", rmpv_like::Value::Text("seven")),
        ("type", rmpv_like::Value::Text("balance")),
    ]))
    .unwrap();
    let error = decode_frame::<ClientMessage>(&framed(&unnamed)).unwrap_err();
    assert_eq!(error.request_id(), None, "{error:?}");
    // Nor can an array's first element be taken for one.
    let array = rmp_serde::to_vec(&(9u64, "balance")).unwrap();
    let error = decode_frame::<ClientMessage>(&framed(&array)).unwrap_err();
    assert_eq!(error.request_id(), None, "{error:?}");
}

mod rmpv_like {
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    pub enum Value {
        Int(u64),
        Text(&'static str),
    }
}

// Property tests.

fn text(chars_max: usize) -> impl Strategy<Value = String> {
    // Printable characters of up to 4 UTF-8 bytes each, so `chars_max`
    // characters stay within `4 * chars_max` bytes.
    proptest::collection::vec(
        any::<char>().prop_filter("printable", |c| !c.is_control()),
        0..=chars_max,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn bytes(min: usize, max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), min..=max)
}

fn tx_key() -> impl Strategy<Value = TxKey> {
    any::<u128>().prop_map(TxKey::from_u128)
}

fn send_half() -> impl Strategy<Value = SendHalf> {
    (tx_key(), any::<u64>(), any::<u64>(), text(16), any::<u64>()).prop_map(
        |(tx_key, sender_id, amount, device_os, client_time)| SendHalf {
            tx_key,
            sender_id,
            amount,
            device_os: device_os.into(),
            client_time,
        },
    )
}

fn receive_half() -> impl Strategy<Value = ReceiveHalf> {
    (
        tx_key(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        text(16),
        any::<u64>(),
    )
        .prop_map(
            |(tx_key, receiver_id, expected_sender_id, expected_amount, device_os, client_time)| {
                ReceiveHalf {
                    tx_key,
                    receiver_id,
                    expected_sender_id,
                    expected_amount,
                    device_os: device_os.into(),
                    client_time,
                }
            },
        )
}

fn half() -> impl Strategy<Value = Half> {
    prop_oneof![
        send_half().prop_map(Half::Send),
        receive_half().prop_map(Half::Receive)
    ]
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    proptest::sample::select(RejectCode::ALL.to_vec())
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

fn stamped<H: std::fmt::Debug + Clone>(
    inner: impl Strategy<Value = H>,
) -> impl Strategy<Value = Stamped<H>> {
    (inner, any::<u64>()).prop_map(|(half, at)| Stamped {
        half,
        received_at: Timestamp(at),
    })
}

fn report() -> impl Strategy<Value = OutcomeReport> {
    (
        tx_key(),
        prop_oneof![Just(OutcomeStatus::Settled), Just(OutcomeStatus::Rejected)],
        proptest::option::of(reject_code()),
        text(60),
        proptest::option::of(any::<u64>()),
        proptest::option::of(stamped(send_half())),
        proptest::option::of(stamped(receive_half())),
        any::<u64>(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(
                tx_key,
                status,
                code,
                explanation,
                amount,
                send,
                receive,
                decided_at,
                balance_after,
            )| {
                OutcomeReport {
                    tx_key,
                    status,
                    code,
                    explanation,
                    amount,
                    send,
                    receive,
                    decided_at: Timestamp(decided_at),
                    balance_after,
                }
            },
        )
}

fn history_entry() -> impl Strategy<Value = HistoryEntry> {
    (
        any::<u64>(),
        proptest::sample::select(vec![
            HistoryKind::Opening,
            HistoryKind::TopUp,
            HistoryKind::Sent,
            HistoryKind::Received,
        ]),
        proptest::option::of(tx_key()),
        proptest::option::of(any::<u64>()),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(seq, kind, tx_key, counterparty_id, amount, balance_after, at)| HistoryEntry {
                seq,
                kind,
                tx_key,
                counterparty_id,
                amount,
                balance_after,
                at: Timestamp(at),
            },
        )
}

pub(crate) fn client_message() -> impl Strategy<Value = ClientMessage> {
    let admin =
        || bytes(ADMIN_CREDENTIAL_BYTES_MIN, ADMIN_CREDENTIAL_BYTES_MAX).prop_map(Secret::new);
    let name = || text(16).prop_filter("non-empty", |name| !name.is_empty());
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            bytes(API_KEY_BYTES_MIN, API_KEY_BYTES_MAX)
        )
            .prop_map(
                |(request_id, account_id, key)| ClientMessage::Authenticate {
                    request_id,
                    account_id,
                    api_key: Secret::new(key),
                }
            ),
        (any::<u64>(), half())
            .prop_map(|(request_id, half)| ClientMessage::SubmitHalf { request_id, half }),
        (any::<u64>(), tx_key())
            .prop_map(|(request_id, tx_key)| ClientMessage::QueryOutcome { request_id, tx_key }),
        any::<u64>().prop_map(|request_id| ClientMessage::Balance { request_id }),
        (
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            1..=HISTORY_PAGE_ENTRIES_MAX
        )
            .prop_map(|(request_id, before_seq, limit)| ClientMessage::History {
                request_id,
                before_seq,
                limit
            }),
        (
            any::<u64>(),
            admin(),
            name(),
            name(),
            bytes(SALT_BYTES_MIN, SALT_BYTES_MAX),
            bytes(KEY_HASH_BYTES, KEY_HASH_BYTES),
            any::<u64>()
        )
            .prop_map(
                |(
                    request_id,
                    admin_credential,
                    account_type,
                    bank_name,
                    salt,
                    key_hash,
                    opening_balance,
                )| {
                    ClientMessage::OpenAccount {
                        request_id,
                        admin_credential,
                        account_type,
                        bank_name,
                        salt,
                        key_hash,
                        opening_balance,
                    }
                }
            ),
        (any::<u64>(), admin(), any::<u64>(), any::<u64>()).prop_map(
            |(request_id, admin_credential, account_id, amount)| ClientMessage::TopUp {
                request_id,
                admin_credential,
                account_id,
                amount
            }
        ),
    ]
}

pub(crate) fn node_message() -> impl Strategy<Value = NodeMessage> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(request_id, account_id, max_amount, half_ttl_ms)| NodeMessage::Authenticated {
                request_id,
                account_id,
                max_amount,
                half_ttl_ms
            }
        ),
        (any::<u64>(), tx_key())
            .prop_map(|(request_id, tx_key)| NodeMessage::Accepted { request_id, tx_key }),
        (any::<u64>(), report())
            .prop_map(|(request_id, report)| NodeMessage::Outcome { request_id, report }),
        (any::<u64>(), tx_key(), reject_code(), text(60)).prop_map(
            |(request_id, tx_key, code, explanation)| NodeMessage::Refused {
                request_id,
                tx_key,
                code,
                explanation
            }
        ),
        (
            any::<u64>(),
            tx_key(),
            proptest::sample::select(vec![
                QueryStatus::Decided,
                QueryStatus::Pending,
                QueryStatus::Unknown
            ]),
            proptest::option::of(report())
        )
            .prop_map(
                |(request_id, tx_key, status, report)| NodeMessage::OutcomeAnswer {
                    request_id,
                    tx_key,
                    status,
                    report
                }
            ),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(request_id, account_id, balance)| {
            NodeMessage::BalanceAnswer {
                request_id,
                account_id,
                balance,
            }
        }),
        (
            any::<u64>(),
            proptest::collection::vec(history_entry(), 0..=usize::from(HISTORY_PAGE_ENTRIES_MAX)),
            any::<bool>()
        )
            .prop_map(|(request_id, entries, more)| NodeMessage::HistoryAnswer {
                request_id,
                entries,
                more
            }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(request_id, account_id, balance)| {
            NodeMessage::AccountOpened {
                request_id,
                account_id,
                balance,
            }
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(request_id, account_id, balance)| {
            NodeMessage::ToppedUp {
                request_id,
                account_id,
                balance,
            }
        }),
        (
            proptest::option::of(any::<u64>()),
            error_code(),
            text(60),
            proptest::option::of((any::<u64>(), text(40)))
        )
            .prop_map(|(request_id, code, message, leader)| NodeMessage::Error {
                request_id,
                code,
                message,
                leader: leader.map(|(id, addr)| LeaderRef { id, addr }),
            }),
    ]
}

/// Checks the decoder's contract on one input, whatever it is.
fn decoder_contract_holds<M: WireMessage + std::fmt::Debug>(input: &[u8]) {
    match decode_frame::<M>(input) {
        Ok(Some((_, consumed))) => {
            assert!(consumed > FRAME_HEADER_BYTES && consumed <= input.len());
        }
        Ok(None) => {
            // Only an incomplete frame may ask for more.
            let declared = input
                .first_chunk::<4>()
                .map(|prefix| u32::from_be_bytes(*prefix) as usize);
            if let Some(declared) = declared {
                assert!(input.len() < FRAME_HEADER_BYTES + declared);
            }
        }
        Err(error) => {
            if let Some(skip) = error.frame_bytes() {
                assert!(skip >= FRAME_HEADER_BYTES && skip <= input.len());
            }
            assert!(error.code().is_client_error());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(input in bytes(0, 256)) {
        decoder_contract_holds::<ClientMessage>(&input);
        decoder_contract_holds::<NodeMessage>(&input);
    }

    #[test]
    fn decoding_arbitrary_bodies_behind_a_valid_prefix_never_panics(body in bytes(0, 512)) {
        let input = framed(&body);
        decoder_contract_holds::<ClientMessage>(&input);
        decoder_contract_holds::<NodeMessage>(&input);
    }

    #[test]
    fn decoding_mutated_real_frames_never_panics(
        index in 0usize..1000,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        // Arbitrary bytes rarely look like messages; corrupting real frames
        // reaches deeper into the decoder.
        let frames = example_frames();
        let (_, mut frame) = frames[index % frames.len()].clone();
        for (position, value) in flips {
            let at = FRAME_HEADER_BYTES + position.index(frame.len() - FRAME_HEADER_BYTES);
            frame[at] = value;
        }
        decoder_contract_holds::<ClientMessage>(&frame);
        decoder_contract_holds::<NodeMessage>(&frame);
    }

    #[test]
    fn every_client_message_round_trips(message in client_message()) {
        prop_assert!(message.validate().is_ok());
        let frame = encode_frame_to_vec(&message).unwrap();
        let (back, consumed) = decode_frame::<ClientMessage>(&frame).unwrap().unwrap();
        prop_assert_eq!(back, message);
        prop_assert_eq!(consumed, frame.len());
    }

    #[test]
    fn every_node_message_round_trips(message in node_message()) {
        prop_assert!(message.validate().is_ok());
        let frame = encode_frame_to_vec(&message).unwrap();
        let (back, consumed) = decode_frame::<NodeMessage>(&frame).unwrap().unwrap();
        prop_assert_eq!(back, message);
        prop_assert_eq!(consumed, frame.len());
    }

    #[test]
    fn a_stream_split_anywhere_decodes_the_same_messages(
        messages in proptest::collection::vec(client_message(), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        // A socket may deliver any split of the byte stream; decoding after
        // each delivery must give the same messages as decoding it whole.
        let mut stream = Vec::new();
        for message in &messages {
            encode_frame(message, &mut stream).unwrap();
        }
        let cut = cut.index(stream.len() + 1);
        let mut buffer = Vec::new();
        let mut decoded = Vec::new();
        for delivery in [&stream[..cut], &stream[cut..]] {
            buffer.extend_from_slice(delivery);
            while let Some((message, consumed)) = decode_frame::<ClientMessage>(&buffer).unwrap() {
                decoded.push(message);
                buffer.drain(..consumed);
            }
        }
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(decoded, messages);
    }
}

#[test]
fn node_examples_are_valid_and_decode_as_node_messages_only() {
    for (title, message) in node_examples() {
        assert!(message.validate().is_ok(), "{title}");
        let frame = encode_frame_to_vec(&message).unwrap();
        let error = decode_frame::<ClientMessage>(&frame).unwrap_err();
        assert_eq!(error.code(), ErrorCode::UnknownMessage, "{title}");
    }
}

#[test]
fn byte_strings_sent_as_integer_arrays_are_accepted() {
    // {"type": "authenticate", "request_id": 1, "account_id": 3,
    //  "api_key": [32 integers]} from a writer without `bin` support.
    let mut body = vec![0x84];
    body.extend_from_slice(b"\xa4type\xacauthenticate");
    body.extend_from_slice(b"\xaarequest_id\x01");
    body.extend_from_slice(b"\xaaaccount_id\x03");
    body.extend_from_slice(b"\xa7api_key\xdc\x00\x20");
    body.extend(0u8..32);
    let (message, _) = decode_frame::<ClientMessage>(&framed(&body))
        .unwrap()
        .unwrap();
    assert_eq!(
        message,
        ClientMessage::Authenticate {
            request_id: 1,
            account_id: 3,
            api_key: Secret::new((0u8..32).collect::<Vec<u8>>()),
        }
    );
}

#[test]
fn a_body_without_a_string_type_is_malformed() {
    for body in [
        &b"\x81\xa4type\x05"[..],
        b"\x81\xaarequest_id\x01",
        b"\x92\x01\x02",
        b"\xa7balance",
    ] {
        let error = decode_frame::<ClientMessage>(&framed(body)).unwrap_err();
        assert_eq!(error.code(), ErrorCode::Malformed, "{body:?}: {error}");
    }
}
