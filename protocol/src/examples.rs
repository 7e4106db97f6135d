//! One fixed, realistic example of every message, and the hex dump format
//! `PROTOCOL.md` shows them in.
//!
//! The byte examples in `PROTOCOL.md` are printed from these by
//! `cargo run -p tapledger-protocol --example wire_examples`, and a test checks
//! that the document still shows exactly these bytes, so the document cannot
//! drift from the code. Nothing here is used on a live connection.

use crate::auth::{Secret, key_hash};
use crate::domain::{
    Half, Outcome, ReceiveHalf, RejectCode, Rejection, SendHalf, Settlement, Stamped, Timestamp,
    TxKey,
};
use crate::error_code::ErrorCode;
use crate::frame::encode_frame_to_vec;
use crate::messages::{
    ClientMessage, HistoryEntry, HistoryKind, LeaderRef, NodeMessage, OutcomeReport, QueryStatus,
};

/// The payment every example talks about: account 1 (Alice, iOS) pays 25.00
/// to account 2 (Bob, Android).
pub const EXAMPLE_TX_KEY: TxKey = TxKey::from_u128(0x67e5_5044_10b1_426f_9247_bb68_0e5f_e0c8);
pub const EXAMPLE_SENDER: u64 = 1;
pub const EXAMPLE_RECEIVER: u64 = 2;
pub const EXAMPLE_AMOUNT: u64 = 2_500;

/// Alice's example API key: the bytes 0x00, 0x01, ..., 0x1f.
pub fn example_api_key() -> Vec<u8> {
    (0u8..32).collect()
}

/// Alice's example salt: the bytes 0xa0, 0xa1, ..., 0xaf.
pub fn example_salt() -> Vec<u8> {
    (0xa0u8..0xb0).collect()
}

/// The example admin credential: 32 bytes of 0x5a.
pub fn example_admin_credential() -> Secret {
    Secret::new(vec![0x5a; 32])
}

pub fn example_send_half() -> SendHalf {
    SendHalf {
        tx_key: EXAMPLE_TX_KEY,
        sender_id: EXAMPLE_SENDER,
        amount: EXAMPLE_AMOUNT,
        device_os: "ios".into(),
        client_time: 1_700_000_000_000,
    }
}

pub fn example_receive_half() -> ReceiveHalf {
    ReceiveHalf {
        tx_key: EXAMPLE_TX_KEY,
        receiver_id: EXAMPLE_RECEIVER,
        expected_sender_id: EXAMPLE_SENDER,
        expected_amount: EXAMPLE_AMOUNT,
        device_os: "android".into(),
        client_time: 1_700_000_000_150,
    }
}

/// The settlement of the example payment: Alice had 10,000, Bob 500.
pub fn example_settlement() -> Settlement {
    Settlement {
        send: Stamped {
            half: example_send_half(),
            received_at: Timestamp(1_700_000_000_200_000),
        },
        receive: Stamped {
            half: example_receive_half(),
            received_at: Timestamp(1_700_000_000_310_000),
        },
        sender_balance_before: 10_000,
        receiver_balance_before: 500,
        settled_at: Timestamp(1_700_000_000_312_500),
    }
}

/// Every client message once, each with a short title, in the order
/// `PROTOCOL.md` presents them.
pub fn client_examples() -> Vec<(&'static str, ClientMessage)> {
    vec![
        (
            "authenticate: Alice proves she is account 1",
            ClientMessage::Authenticate {
                request_id: 1,
                account_id: EXAMPLE_SENDER,
                api_key: Secret::new(example_api_key()),
            },
        ),
        (
            "submit_half: Alice's send half",
            ClientMessage::SubmitHalf {
                request_id: 2,
                half: Half::Send(example_send_half()),
            },
        ),
        (
            "submit_half: Bob's receive half",
            ClientMessage::SubmitHalf {
                request_id: 7,
                half: Half::Receive(example_receive_half()),
            },
        ),
        (
            "query_outcome",
            ClientMessage::QueryOutcome {
                request_id: 3,
                tx_key: EXAMPLE_TX_KEY,
            },
        ),
        ("balance", ClientMessage::Balance { request_id: 4 }),
        (
            "history: the newest 20 entries",
            ClientMessage::History {
                request_id: 5,
                before_seq: None,
                limit: 20,
            },
        ),
        (
            "open_account: the operator opens Alice's account with 100.00",
            ClientMessage::OpenAccount {
                request_id: 1,
                admin_credential: example_admin_credential(),
                account_type: "checking".to_owned(),
                bank_name: "Example Bank".to_owned(),
                salt: example_salt(),
                key_hash: key_hash(&example_api_key(), &example_salt()).to_vec(),
                opening_balance: 10_000,
            },
        ),
        (
            "top_up: the operator adds 50.00 to account 2",
            ClientMessage::TopUp {
                request_id: 2,
                admin_credential: example_admin_credential(),
                account_id: EXAMPLE_RECEIVER,
                amount: 5_000,
            },
        ),
    ]
}

/// Every node message once, each with a short title.
pub fn node_examples() -> Vec<(&'static str, NodeMessage)> {
    let settlement = example_settlement();
    let expired = Outcome::Rejected(Rejection {
        tx_key: EXAMPLE_TX_KEY,
        code: RejectCode::Expired,
        send: Some(settlement.send.clone()),
        receive: None,
        sender_balance: None,
        decided_at: Timestamp(1_700_000_300_200_000),
    });
    vec![
        (
            "authenticated",
            NodeMessage::Authenticated {
                request_id: 1,
                account_id: EXAMPLE_SENDER,
                max_amount: 100_000_000,
                half_ttl_ms: 300_000,
            },
        ),
        (
            "accepted: Alice's half is durable and waits for Bob's",
            NodeMessage::Accepted {
                request_id: 2,
                tx_key: EXAMPLE_TX_KEY,
            },
        ),
        (
            "outcome: settled, as Alice sees it",
            NodeMessage::Outcome {
                request_id: 2,
                report: OutcomeReport::for_party(
                    &Outcome::Settled(settlement.clone()),
                    EXAMPLE_SENDER,
                ),
            },
        ),
        (
            "outcome: rejected, Alice's half expired alone",
            NodeMessage::Outcome {
                request_id: 2,
                report: OutcomeReport::for_party(&expired, EXAMPLE_SENDER),
            },
        ),
        (
            "refused: a half for another account",
            NodeMessage::refused(9, EXAMPLE_TX_KEY, RejectCode::WrongParty),
        ),
        (
            "outcome_answer: still pending",
            NodeMessage::OutcomeAnswer {
                request_id: 3,
                tx_key: EXAMPLE_TX_KEY,
                status: QueryStatus::Pending,
                report: None,
            },
        ),
        (
            "balance_answer",
            NodeMessage::BalanceAnswer {
                request_id: 4,
                account_id: EXAMPLE_SENDER,
                balance: 7_500,
            },
        ),
        (
            "history_answer: one payment and the opening",
            NodeMessage::HistoryAnswer {
                request_id: 5,
                entries: vec![
                    HistoryEntry::from_settlement(2, &settlement, EXAMPLE_SENDER)
                        .expect("the example sender is a party"),
                    HistoryEntry {
                        seq: 0,
                        kind: HistoryKind::Opening,
                        tx_key: None,
                        counterparty_id: None,
                        amount: 10_000,
                        balance_after: 10_000,
                        at: Timestamp(1_699_999_000_000_000),
                    },
                ],
                more: false,
            },
        ),
        (
            "account_opened",
            NodeMessage::AccountOpened {
                request_id: 1,
                account_id: EXAMPLE_SENDER,
                balance: 10_000,
            },
        ),
        (
            "topped_up",
            NodeMessage::ToppedUp {
                request_id: 2,
                account_id: EXAMPLE_RECEIVER,
                balance: 5_500,
            },
        ),
        (
            "error: a request before authenticate",
            NodeMessage::error(Some(4), ErrorCode::NotAuthenticated, ""),
        ),
        (
            "error: this replica is not the leader, which is replica 2",
            NodeMessage::not_leader(
                Some(5),
                Some(LeaderRef {
                    id: 2,
                    addr: "127.0.0.1:7444".to_string(),
                }),
            ),
        ),
    ]
}

/// Every example as (title, complete frame bytes), client messages first.
pub fn example_frames() -> Vec<(&'static str, Vec<u8>)> {
    let client = client_examples()
        .into_iter()
        .map(|(title, message)| (title, encode_frame_to_vec(&message)));
    let node = node_examples()
        .into_iter()
        .map(|(title, message)| (title, encode_frame_to_vec(&message)));
    client
        .chain(node)
        .map(|(title, frame)| (title, frame.expect("every example fits in a frame")))
        .collect()
}

/// Lowercase hex, 16 bytes a line, bytes separated by spaces: the format of
/// every dump in `PROTOCOL.md`.
pub fn hex_dump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|line| {
            line.iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}
