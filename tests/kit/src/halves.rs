//! Payment halves as a test writes them: who pays whom how much under which
//! key, with fixed device names and client times (the node ignores both for
//! its decisions; a test that cares sets them with struct update syntax,
//! `SendHalf { client_time: 0, ..send_half(key, alice, 10) }`).

use tapledger_protocol::{AccountId, Half, ReceiveHalf, SendHalf, TxKey};

/// The device a send half says it comes from.
pub const SEND_DEVICE_OS: &str = "ios 18";
/// The device a receive half says it comes from.
pub const RECEIVE_DEVICE_OS: &str = "android 15";
/// The phone clock a send half reports (ms since the epoch, 2023-11-14).
pub const SEND_CLIENT_TIME_MS: u64 = 1_700_000_000_000;
/// The phone clock a receive half reports, a millisecond after the sender's.
pub const RECEIVE_CLIENT_TIME_MS: u64 = 1_700_000_000_001;

/// The sender's half: `sender_id` pays `amount` under `tx_key`.
pub fn send_half(tx_key: TxKey, sender_id: AccountId, amount: u64) -> SendHalf {
    SendHalf {
        tx_key,
        sender_id,
        amount,
        device_os: SEND_DEVICE_OS.into(),
        client_time: SEND_CLIENT_TIME_MS,
    }
}

/// The receiver's half: `receiver_id` expects `expected_amount` from
/// `expected_sender_id` under `tx_key`.
pub fn receive_half(
    tx_key: TxKey,
    receiver_id: AccountId,
    expected_sender_id: AccountId,
    expected_amount: u64,
) -> ReceiveHalf {
    ReceiveHalf {
        tx_key,
        receiver_id,
        expected_sender_id,
        expected_amount,
        device_os: RECEIVE_DEVICE_OS.into(),
        client_time: RECEIVE_CLIENT_TIME_MS,
    }
}

/// [`send_half`] as a [`Half`], ready to submit.
pub fn send(tx_key: TxKey, sender_id: AccountId, amount: u64) -> Half {
    Half::Send(send_half(tx_key, sender_id, amount))
}

/// [`receive_half`] as a [`Half`], ready to submit.
pub fn receive(
    tx_key: TxKey,
    receiver_id: AccountId,
    expected_sender_id: AccountId,
    expected_amount: u64,
) -> Half {
    Half::Receive(receive_half(
        tx_key,
        receiver_id,
        expected_sender_id,
        expected_amount,
    ))
}
