//! Message shapes: examples round-trip, every type is named and covered,
//! party views hide the counterparty's money, and validation enforces each
//! field limit.

use super::*;
use crate::examples::{client_examples, example_settlement, node_examples};
use crate::frame::{decode_frame, encode_frame_to_vec};
use crate::limits::{
    ADMIN_CREDENTIAL_BYTES_MIN, API_KEY_BYTES_MAX, API_KEY_BYTES_MIN, EXPLANATION_BYTES_MAX,
    FRAME_BYTES_MAX, HISTORY_PAGE_ENTRIES_MAX, SALT_BYTES_MAX, STRING_BYTES_MAX,
};
use crate::validate::Problem;
use crate::{Rejection, TxKey};

fn submit_with_device_os(device_os: &str) -> ClientMessage {
    let mut half = crate::examples::example_send_half();
    half.device_os = device_os.into();
    ClientMessage::SubmitHalf {
        request_id: 1,
        half: Half::Send(half),
    }
}

fn open_account() -> ClientMessage {
    client_examples()
        .into_iter()
        .map(|(_, message)| message)
        .find(|message| matches!(message, ClientMessage::OpenAccount { .. }))
        .expect("the examples open an account")
}

#[test]
fn every_example_round_trips_through_a_frame() {
    for (title, message) in client_examples() {
        let frame = encode_frame_to_vec(&message).unwrap();
        let (back, consumed) = decode_frame::<ClientMessage>(&frame).unwrap().unwrap();
        assert_eq!(back, message, "{title}");
        assert_eq!(consumed, frame.len(), "{title}");
    }
    for (title, message) in node_examples() {
        let frame = encode_frame_to_vec(&message).unwrap();
        let (back, consumed) = decode_frame::<NodeMessage>(&frame).unwrap().unwrap();
        assert_eq!(back, message, "{title}");
        assert_eq!(consumed, frame.len(), "{title}");
    }
}

#[test]
fn examples_cover_every_message_type_and_names_match_the_wire() {
    let client_names: Vec<&str> = client_examples()
        .iter()
        .map(|(_, message)| message.type_name())
        .collect();
    for name in CLIENT_TYPE_NAMES {
        assert!(client_names.contains(&name), "no example of {name}");
    }
    let node_names: Vec<&str> = node_examples()
        .iter()
        .map(|(_, message)| message.type_name())
        .collect();
    for name in NODE_TYPE_NAMES {
        assert!(node_names.contains(&name), "no example of {name}");
    }
    // The `type` the encoder writes is the one `type_name` reports.
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "type")]
        type_name: String,
    }
    for (_, message) in client_examples() {
        let body = rmp_serde::to_vec_named(&message).unwrap();
        let probe: Probe = rmp_serde::from_slice(&body).unwrap();
        assert_eq!(probe.type_name, message.type_name());
    }
    for (_, message) in node_examples() {
        let body = rmp_serde::to_vec_named(&message).unwrap();
        let probe: Probe = rmp_serde::from_slice(&body).unwrap();
        assert_eq!(probe.type_name, message.type_name());
    }
}

#[test]
fn only_account_requests_need_authentication() {
    for (_, message) in client_examples() {
        let expected = matches!(
            message,
            ClientMessage::SubmitHalf { .. }
                | ClientMessage::QueryOutcome { .. }
                | ClientMessage::Balance { .. }
                | ClientMessage::History { .. }
        );
        assert_eq!(message.needs_authentication(), expected, "{message:?}");
    }
}

#[test]
fn only_accepted_leaves_a_request_open() {
    for (_, message) in node_examples() {
        assert_eq!(
            message.is_final(),
            !matches!(message, NodeMessage::Accepted { .. })
        );
    }
}

#[test]
fn settled_report_shows_each_party_only_its_own_balance() {
    let settlement = example_settlement();
    let outcome = Outcome::Settled(settlement.clone());
    let sender_view = OutcomeReport::for_party(&outcome, settlement.sender());
    assert_eq!(sender_view.status, OutcomeStatus::Settled);
    assert_eq!(sender_view.code, None);
    assert_eq!(sender_view.amount, Some(2_500));
    assert_eq!(sender_view.balance_after, Some(10_000 - 2_500));
    let receiver_view = OutcomeReport::for_party(&outcome, settlement.receiver());
    assert_eq!(receiver_view.balance_after, Some(500 + 2_500));
    let stranger_view = OutcomeReport::for_party(&outcome, 99);
    assert_eq!(stranger_view.balance_after, None);
    // Nothing else differs between the views.
    assert_eq!(
        OutcomeReport {
            balance_after: None,
            ..sender_view
        },
        OutcomeReport {
            balance_after: None,
            ..receiver_view
        }
    );
}

#[test]
fn insufficient_funds_report_gives_the_balance_to_the_sender_only() {
    let settlement = example_settlement();
    let outcome = Outcome::Rejected(Rejection {
        tx_key: settlement.tx_key(),
        code: RejectCode::InsufficientFunds,
        send: Some(settlement.send.clone()),
        receive: Some(settlement.receive.clone()),
        sender_balance: Some(1_000),
        decided_at: settlement.settled_at,
    });
    let sender_view = OutcomeReport::for_party(&outcome, settlement.sender());
    assert_eq!(sender_view.status, OutcomeStatus::Rejected);
    assert_eq!(sender_view.code, Some(RejectCode::InsufficientFunds));
    assert_eq!(
        sender_view.explanation,
        RejectCode::InsufficientFunds.explanation()
    );
    assert_eq!(sender_view.amount, None);
    assert_eq!(sender_view.balance_after, Some(1_000));
    let receiver_view = OutcomeReport::for_party(&outcome, settlement.receiver());
    assert_eq!(receiver_view.balance_after, None);
}

#[test]
fn history_entry_reads_a_settlement_from_either_side() {
    let settlement = example_settlement();
    let sent = HistoryEntry::from_settlement(9, &settlement, settlement.sender()).unwrap();
    assert_eq!(sent.kind, HistoryKind::Sent);
    assert_eq!(sent.counterparty_id, Some(settlement.receiver()));
    assert_eq!(sent.balance_after, 7_500);
    assert_eq!(sent.seq, 9);
    let received = HistoryEntry::from_settlement(9, &settlement, settlement.receiver()).unwrap();
    assert_eq!(received.kind, HistoryKind::Received);
    assert_eq!(received.counterparty_id, Some(settlement.sender()));
    assert_eq!(received.balance_after, 3_000);
    assert_eq!(HistoryEntry::from_settlement(9, &settlement, 99), None);
}

#[test]
fn api_key_length_is_enforced_at_both_ends() {
    for (len, ok) in [
        (API_KEY_BYTES_MIN - 1, false),
        (API_KEY_BYTES_MIN, true),
        (API_KEY_BYTES_MAX, true),
        (API_KEY_BYTES_MAX + 1, false),
    ] {
        let message = ClientMessage::Authenticate {
            request_id: 1,
            account_id: 1,
            api_key: Secret::new(vec![1; len]),
        };
        assert_eq!(message.validate().is_ok(), ok, "key of {len} bytes");
    }
}

#[test]
fn device_os_is_bounded_printable_and_may_be_empty() {
    assert!(submit_with_device_os("").validate().is_ok());
    assert!(
        submit_with_device_os(&"x".repeat(STRING_BYTES_MAX))
            .validate()
            .is_ok()
    );
    let error = submit_with_device_os(&"x".repeat(STRING_BYTES_MAX + 1))
        .validate()
        .unwrap_err();
    assert_eq!(error.field, "half.device_os");
    assert_eq!(
        error.problem,
        Problem::TooLong {
            len: STRING_BYTES_MAX + 1,
            max: STRING_BYTES_MAX
        }
    );
    // 22 four-byte characters are 88 bytes: the limit counts bytes, not characters.
    assert!(submit_with_device_os(&"🦀".repeat(22)).validate().is_err());
    let error = submit_with_device_os("ios\n17").validate().unwrap_err();
    assert_eq!(error.problem, Problem::ControlCharacter);
}

#[test]
fn open_account_checks_every_registered_field() {
    assert!(open_account().validate().is_ok());
    let with = |change: &dyn Fn(&mut ClientMessage)| {
        let mut message = open_account();
        change(&mut message);
        message.validate().unwrap_err().field
    };
    let field = |change: fn(&mut Secret, &mut String, &mut String, &mut Vec<u8>, &mut Vec<u8>)| {
        with(&|message| {
            if let ClientMessage::OpenAccount {
                admin_credential,
                account_type,
                bank_name,
                salt,
                key_hash,
                ..
            } = message
            {
                change(admin_credential, account_type, bank_name, salt, key_hash);
            }
        })
    };
    assert_eq!(
        field(|credential, _, _, _, _| *credential =
            Secret::new(vec![0; ADMIN_CREDENTIAL_BYTES_MIN - 1])),
        "admin_credential"
    );
    assert_eq!(
        field(|_, account_type, _, _, _| account_type.clear()),
        "account_type"
    );
    assert_eq!(
        field(|_, _, bank_name, _, _| *bank_name = "b".repeat(STRING_BYTES_MAX + 1)),
        "bank_name"
    );
    assert_eq!(field(|_, _, _, salt, _| salt.truncate(15)), "salt");
    assert_eq!(
        field(|_, _, _, salt, _| salt.resize(SALT_BYTES_MAX + 1, 0)),
        "salt"
    );
    assert_eq!(field(|_, _, _, _, hash| hash.truncate(63)), "key_hash");
    assert_eq!(field(|_, _, _, _, hash| hash.push(0)), "key_hash");
}

#[test]
fn history_limit_must_be_between_one_and_a_page() {
    let history = |limit| ClientMessage::History {
        request_id: 1,
        before_seq: Some(10),
        limit,
    };
    assert!(history(0).validate().is_err());
    assert!(history(1).validate().is_ok());
    assert!(history(HISTORY_PAGE_ENTRIES_MAX).validate().is_ok());
    assert!(history(HISTORY_PAGE_ENTRIES_MAX + 1).validate().is_err());
}

#[test]
fn node_text_is_bounded_for_clients_too() {
    let long = "e".repeat(EXPLANATION_BYTES_MAX + 1);
    let refused = NodeMessage::Refused {
        request_id: 1,
        tx_key: TxKey::from_u128(1),
        code: RejectCode::WrongParty,
        explanation: long.clone(),
    };
    assert_eq!(refused.validate().unwrap_err().field, "explanation");
    let error = NodeMessage::Error {
        request_id: None,
        code: ErrorCode::Internal,
        message: long,
        leader: None,
    };
    assert_eq!(error.validate().unwrap_err().field, "message");
}

#[test]
fn not_leader_names_the_leader_and_other_errors_carry_no_leader_key() {
    let leader = LeaderRef {
        id: 2,
        addr: "127.0.0.1:7444".into(),
    };
    let answer = NodeMessage::not_leader(Some(9), Some(leader.clone()));
    let NodeMessage::Error {
        request_id,
        code,
        message,
        leader: named,
    } = &answer
    else {
        panic!("not_leader builds an error");
    };
    assert_eq!((*request_id, *code), (Some(9), ErrorCode::NotLeader));
    assert_eq!(named.as_ref(), Some(&leader));
    assert!(message.contains("replica 2 at 127.0.0.1:7444"), "{message}");
    let bytes = rmp_serde::to_vec_named(&answer).unwrap();
    assert_eq!(
        rmp_serde::from_slice::<NodeMessage>(&bytes).unwrap(),
        answer
    );
    // Errors without a leader encode exactly as before: no `leader` key.
    let plain =
        rmp_serde::to_vec_named(&NodeMessage::error(Some(1), ErrorCode::Internal, "")).unwrap();
    assert!(!plain.windows(6).any(|window| window == b"leader"));
    assert_eq!(ErrorCode::from_code(1102), Some(ErrorCode::NotLeader));
}

#[test]
fn error_helper_cuts_long_detail_on_a_character_boundary() {
    let detail = "é".repeat(EXPLANATION_BYTES_MAX);
    let NodeMessage::Error { message, code, .. } =
        NodeMessage::error(Some(1), ErrorCode::Malformed, &detail)
    else {
        panic!("error() builds an error");
    };
    assert_eq!(code, ErrorCode::Malformed);
    assert!(message.len() <= EXPLANATION_BYTES_MAX);
    assert!(message.starts_with(ErrorCode::Malformed.explanation()));
    assert!(
        NodeMessage::error(None, ErrorCode::Malformed, &detail)
            .validate()
            .is_ok()
    );
}

#[test]
fn the_largest_messages_fit_in_a_frame() {
    // A full history page of entries with every number at its widest.
    let entry = HistoryEntry {
        seq: u64::MAX,
        kind: HistoryKind::Received,
        tx_key: Some(TxKey::from_u128(u128::MAX)),
        counterparty_id: Some(u64::MAX),
        amount: u64::MAX,
        balance_after: u64::MAX,
        at: crate::Timestamp(u64::MAX),
    };
    let page = NodeMessage::HistoryAnswer {
        request_id: u64::MAX,
        entries: vec![entry; usize::from(HISTORY_PAGE_ENTRIES_MAX)],
        more: true,
    };
    let frame = encode_frame_to_vec(&page).unwrap();
    assert!(
        frame.len() <= FRAME_BYTES_MAX / 2,
        "a full page takes {} bytes",
        frame.len()
    );

    // An outcome report with the longest strings.
    let mut settlement = example_settlement();
    settlement.send.half.device_os = "s".repeat(STRING_BYTES_MAX).into();
    settlement.receive.half.device_os = "r".repeat(STRING_BYTES_MAX).into();
    let mut report = OutcomeReport::for_party(&Outcome::Settled(settlement), 1);
    report.explanation = "x".repeat(EXPLANATION_BYTES_MAX);
    let outcome = NodeMessage::Outcome {
        request_id: u64::MAX,
        report,
    };
    assert!(outcome.validate().is_ok());
    assert!(encode_frame_to_vec(&outcome).unwrap().len() < 1024);

    // The largest client request.
    let ClientMessage::OpenAccount {
        request_id,
        key_hash,
        ..
    } = open_account()
    else {
        unreachable!()
    };
    let largest = ClientMessage::OpenAccount {
        request_id,
        admin_credential: Secret::new(vec![0; crate::ADMIN_CREDENTIAL_BYTES_MAX]),
        account_type: "a".repeat(STRING_BYTES_MAX),
        bank_name: "b".repeat(STRING_BYTES_MAX),
        salt: vec![0; SALT_BYTES_MAX],
        key_hash,
        opening_balance: u64::MAX,
    };
    assert!(largest.validate().is_ok());
    assert!(encode_frame_to_vec(&largest).unwrap().len() < 1024);
}
