//! The ledger's vocabulary: accounts, halves, outcomes and rejection codes.
//!
//! These types are shared by the wire protocol and the ledger core, so they are
//! plain data with serde derives. They hold no behaviour beyond small, pure
//! helpers (identity checks, code tables); the rules that decide outcomes live
//! in `tapledger-actors`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// An account number. Assigned by the node, starting at 1; never reused.
pub type AccountId = u64;

/// The issuer's account id. The issuer funds openings and top-ups and is the
/// only account whose balance may be negative; it cannot make or take payments.
pub const ISSUER_ACCOUNT_ID: AccountId = 0;

/// A point in time as microseconds since the Unix epoch.
///
/// Node timestamps are read from the node's clock; phone timestamps
/// (`client_time`) are recorded for analysis and never trusted for expiry.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const fn from_micros(micros: u64) -> Timestamp {
        Timestamp(micros)
    }

    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Adds a duration, saturating at the far future rather than wrapping.
    pub fn saturating_add_micros(self, micros: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(micros))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// The key both phones of one payment share over NFC: a UUID (v4 by
/// convention; the node accepts any 16 bytes and only requires uniqueness).
///
/// Serialized as MessagePack `bin` of exactly 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxKey(pub [u8; 16]);

impl TxKey {
    /// A fresh random key, as a phone would generate it.
    pub fn new_random() -> TxKey {
        TxKey(*uuid::Uuid::new_v4().as_bytes())
    }

    pub const fn from_u128(value: u128) -> TxKey {
        TxKey(value.to_be_bytes())
    }

    pub const fn as_u128(self) -> u128 {
        u128::from_be_bytes(self.0)
    }

    /// Parses the canonical hyphenated form (`67e55044-10b1-426f-9247-bb680e5fe0c8`).
    pub fn parse(text: &str) -> Option<TxKey> {
        uuid::Uuid::parse_str(text)
            .ok()
            .map(|uuid| TxKey(*uuid.as_bytes()))
    }
}

impl fmt::Display for TxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0), f)
    }
}

impl fmt::Debug for TxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxKey({self})")
    }
}

impl Serialize for TxKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for TxKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TxKey, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = TxKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("16 bytes of tx_key")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<TxKey, E> {
                let array: [u8; 16] = bytes
                    .try_into()
                    .map_err(|_| E::invalid_length(bytes.len(), &self))?;
                Ok(TxKey(array))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TxKey, A::Error> {
                // Some MessagePack writers send byte strings as arrays of integers.
                let mut array = [0u8; 16];
                for (index, slot) in array.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(index, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(17, &self));
                }
                Ok(TxKey(array))
            }
        }
        deserializer.deserialize_bytes(KeyVisitor)
    }
}

/// The sender's half: "I, `sender_id`, pay `amount` under `tx_key`."
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SendHalf {
    pub tx_key: TxKey,
    pub sender_id: AccountId,
    /// Minor units; must be 1 ..= the node's `max_amount`.
    pub amount: u64,
    /// Shared, not copied, as the half travels through the ledger.
    pub device_os: Arc<str>,
    /// The phone's own clock in milliseconds since the epoch; recorded, never trusted.
    pub client_time: u64,
}

/// The receiver's half: "I, `receiver_id`, expect `expected_amount` from
/// `expected_sender_id` under `tx_key`."
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReceiveHalf {
    pub tx_key: TxKey,
    pub receiver_id: AccountId,
    pub expected_sender_id: AccountId,
    pub expected_amount: u64,
    /// Shared, not copied, as the half travels through the ledger.
    pub device_os: Arc<str>,
    /// The phone's own clock in milliseconds since the epoch; recorded, never trusted.
    pub client_time: u64,
}

/// Which side of a payment a half speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    Send,
    Receive,
}

/// Either half of a payment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Half {
    Send(SendHalf),
    Receive(ReceiveHalf),
}

impl Half {
    pub fn tx_key(&self) -> TxKey {
        match self {
            Half::Send(half) => half.tx_key,
            Half::Receive(half) => half.tx_key,
        }
    }

    pub fn side(&self) -> Side {
        match self {
            Half::Send(_) => Side::Send,
            Half::Receive(_) => Side::Receive,
        }
    }

    /// The account this half speaks for: only that account may submit it.
    pub fn party(&self) -> AccountId {
        match self {
            Half::Send(half) => half.sender_id,
            Half::Receive(half) => half.receiver_id,
        }
    }

    /// The amount this half names (sent or expected).
    pub fn amount(&self) -> u64 {
        match self {
            Half::Send(half) => half.amount,
            Half::Receive(half) => half.expected_amount,
        }
    }

    pub fn device_os(&self) -> &str {
        match self {
            Half::Send(half) => &half.device_os,
            Half::Receive(half) => &half.device_os,
        }
    }
}

/// A half as the node recorded it: with the node's own receive time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped<H> {
    pub half: H,
    /// Node clock when the half was first accepted; expiry counts from here.
    pub received_at: Timestamp,
}

/// A payment that moved money: both halves agreed and the sender could pay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub send: Stamped<SendHalf>,
    pub receive: Stamped<ReceiveHalf>,
    /// The sender's balance immediately before this debit.
    pub sender_balance_before: u64,
    /// The receiver's balance immediately before this credit.
    pub receiver_balance_before: u64,
    pub settled_at: Timestamp,
}

impl Settlement {
    pub fn tx_key(&self) -> TxKey {
        self.send.half.tx_key
    }
    pub fn sender(&self) -> AccountId {
        self.send.half.sender_id
    }
    pub fn receiver(&self) -> AccountId {
        self.receive.half.receiver_id
    }
    pub fn amount(&self) -> u64 {
        self.send.half.amount
    }
}

/// A payment that did not move money, with the halves the node had.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub tx_key: TxKey,
    pub code: RejectCode,
    pub send: Option<Stamped<SendHalf>>,
    pub receive: Option<Stamped<ReceiveHalf>>,
    /// The sender's balance when the decision was taken, where it was looked at
    /// (insufficient funds); `None` otherwise.
    pub sender_balance: Option<u64>,
    pub decided_at: Timestamp,
}

/// The one final outcome of a `tx_key`. Once recorded it never changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Settled(Settlement),
    Rejected(Rejection),
}

impl Outcome {
    pub fn tx_key(&self) -> TxKey {
        match self {
            Outcome::Settled(settlement) => settlement.tx_key(),
            Outcome::Rejected(rejection) => rejection.tx_key,
        }
    }

    /// `None` for a settlement, the code for a rejection.
    pub fn code(&self) -> Option<RejectCode> {
        match self {
            Outcome::Settled(_) => None,
            Outcome::Rejected(rejection) => Some(rejection.code),
        }
    }

    pub fn is_settled(&self) -> bool {
        matches!(self, Outcome::Settled(_))
    }

    /// True when `half` is exactly the half this outcome recorded for its side:
    /// resubmitting it is idempotent and returns this outcome.
    pub fn recorded(&self, half: &Half) -> bool {
        match (self, half) {
            (Outcome::Settled(settlement), Half::Send(send)) => &settlement.send.half == send,
            (Outcome::Settled(settlement), Half::Receive(receive)) => {
                &settlement.receive.half == receive
            }
            (Outcome::Rejected(rejection), Half::Send(send)) => rejection
                .send
                .as_ref()
                .is_some_and(|stamped| &stamped.half == send),
            (Outcome::Rejected(rejection), Half::Receive(receive)) => rejection
                .receive
                .as_ref()
                .is_some_and(|stamped| &stamped.half == receive),
        }
    }

    /// The accounts named by the recorded halves (sender first). Only these
    /// parties may ask for the outcome.
    pub fn parties(&self) -> Vec<AccountId> {
        match self {
            Outcome::Settled(settlement) => vec![settlement.sender(), settlement.receiver()],
            Outcome::Rejected(rejection) => {
                let mut parties = Vec::with_capacity(2);
                if let Some(send) = &rejection.send {
                    parties.push(send.half.sender_id);
                }
                if let Some(receive) = &rejection.receive {
                    parties.push(receive.half.receiver_id);
                }
                parties
            }
        }
    }
}

/// Why a payment or a half did not go through. Each has a fixed wire code.
///
/// Two families share this table:
///
/// * **Payment rejections** (100, 200, 300, 410, 500) are final outcomes of a
///   `tx_key`: recorded durably, pushed to both phones, never changed.
/// * **Half refusals** (400, 600..=800) answer one submission only. The half is
///   not stored and the `tx_key`'s own state (pending or final) is untouched, so
///   a stray or hostile half can never decide someone else's payment.
///
/// When a pair of halves breaks several rules, the first in this order wins:
/// 200 sender mismatch, 300 amount mismatch, 410 paying yourself,
/// 100 insufficient funds. A single half is checked, in order, for:
/// 620 wrong party, 400 invalid amount, 600 unknown account, 410 paying
/// yourself (receive half naming its own account as sender), then against the
/// key's state: 700 already used, 710 conflicting half, 800 too many pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
pub enum RejectCode {
    /// 100: the sender's balance is below the amount (prototype code).
    InsufficientFunds,
    /// 200: the receive half expects a different sender (prototype code).
    SenderMismatch,
    /// 300: the halves name different amounts (prototype code).
    AmountMismatch,
    /// 400: the amount is zero or above the node's `max_amount`.
    InvalidAmount,
    /// 410: sender and receiver are the same account.
    SelfPayment,
    /// 500: the partner half did not arrive within `half_ttl` (prototype code).
    Expired,
    /// 600: the half names an account the node does not have.
    UnknownAccount,
    /// 620: the half speaks for an account other than the authenticated one.
    WrongParty,
    /// 700: the `tx_key` already has a final outcome and this half is not the
    /// one recorded for it.
    TxKeyAlreadyUsed,
    /// 710: a different half of the same side is already pending for this `tx_key`.
    ConflictingHalf,
    /// 800: the account has too many halves waiting for a partner.
    TooManyPending,
}

impl RejectCode {
    pub const ALL: [RejectCode; 11] = [
        RejectCode::InsufficientFunds,
        RejectCode::SenderMismatch,
        RejectCode::AmountMismatch,
        RejectCode::InvalidAmount,
        RejectCode::SelfPayment,
        RejectCode::Expired,
        RejectCode::UnknownAccount,
        RejectCode::WrongParty,
        RejectCode::TxKeyAlreadyUsed,
        RejectCode::ConflictingHalf,
        RejectCode::TooManyPending,
    ];

    pub const fn code(self) -> u16 {
        match self {
            RejectCode::InsufficientFunds => 100,
            RejectCode::SenderMismatch => 200,
            RejectCode::AmountMismatch => 300,
            RejectCode::InvalidAmount => 400,
            RejectCode::SelfPayment => 410,
            RejectCode::Expired => 500,
            RejectCode::UnknownAccount => 600,
            RejectCode::WrongParty => 620,
            RejectCode::TxKeyAlreadyUsed => 700,
            RejectCode::ConflictingHalf => 710,
            RejectCode::TooManyPending => 800,
        }
    }

    pub fn from_code(code: u16) -> Option<RejectCode> {
        RejectCode::ALL
            .into_iter()
            .find(|candidate| candidate.code() == code)
    }

    /// A sentence for people: phone screens, logs and analysts' exports.
    pub const fn explanation(self) -> &'static str {
        match self {
            RejectCode::InsufficientFunds => "the sender's balance is lower than the amount",
            RejectCode::SenderMismatch => "the receiver expected a different sender",
            RejectCode::AmountMismatch => "the two halves name different amounts",
            RejectCode::InvalidAmount => {
                "the amount must be at least 1 and at most the node's maximum"
            }
            RejectCode::SelfPayment => "an account cannot pay itself",
            RejectCode::Expired => "the other half did not arrive in time",
            RejectCode::UnknownAccount => "the half names an account that does not exist",
            RejectCode::WrongParty => "a half may only be submitted by its own party",
            RejectCode::TxKeyAlreadyUsed => "this tx_key already has a final outcome",
            RejectCode::ConflictingHalf => {
                "a different half of the same side is already pending for this tx_key"
            }
            RejectCode::TooManyPending => "the account has too many halves waiting for a partner",
        }
    }

    /// True for codes that are final outcomes of a `tx_key` (recorded), false
    /// for codes that refuse one half only.
    pub const fn is_payment_outcome(self) -> bool {
        matches!(
            self,
            RejectCode::InsufficientFunds
                | RejectCode::SenderMismatch
                | RejectCode::AmountMismatch
                | RejectCode::SelfPayment
                | RejectCode::Expired
        )
    }
}

impl From<RejectCode> for u16 {
    fn from(code: RejectCode) -> u16 {
        code.code()
    }
}

impl TryFrom<u16> for RejectCode {
    type Error = String;
    fn try_from(code: u16) -> Result<RejectCode, String> {
        RejectCode::from_code(code).ok_or_else(|| format!("unknown reject code {code}"))
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.explanation())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for code in RejectCode::ALL {
            assert_eq!(RejectCode::from_code(code.code()), Some(code));
        }
        let mut numbers: Vec<u16> = RejectCode::ALL.iter().map(|code| code.code()).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), RejectCode::ALL.len());
        assert_eq!(RejectCode::from_code(999), None);
    }

    #[test]
    fn prototype_codes_keep_their_numbers() {
        assert_eq!(RejectCode::InsufficientFunds.code(), 100);
        assert_eq!(RejectCode::SenderMismatch.code(), 200);
        assert_eq!(RejectCode::AmountMismatch.code(), 300);
        assert_eq!(RejectCode::Expired.code(), 500);
    }

    #[test]
    fn tx_key_is_sixteen_bytes_on_the_wire() {
        let key = TxKey::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        let bytes = rmp_serde::to_vec(&key).unwrap();
        assert_eq!(bytes[0], 0xc4, "bin8 marker");
        assert_eq!(bytes[1], 16);
        assert_eq!(&bytes[2..], &key.0);
        let back: TxKey = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, key);
        // bin8 of three bytes: too short for a key.
        let short = [0xc4, 3, 1, 2, 3];
        assert!(rmp_serde::from_slice::<TxKey>(&short).is_err());
    }

    #[test]
    fn tx_key_display_parses_back() {
        let key = TxKey::new_random();
        assert_eq!(TxKey::parse(&key.to_string()), Some(key));
        assert_eq!(TxKey::parse("not a uuid"), None);
    }

    #[test]
    fn recorded_matches_only_the_exact_half() {
        let send = SendHalf {
            tx_key: TxKey::from_u128(7),
            sender_id: 1,
            amount: 10,
            device_os: "ios".into(),
            client_time: 5,
        };
        let rejection = Rejection {
            tx_key: send.tx_key,
            code: RejectCode::Expired,
            send: Some(Stamped {
                half: send.clone(),
                received_at: Timestamp(1),
            }),
            receive: None,
            sender_balance: None,
            decided_at: Timestamp(2),
        };
        let outcome = Outcome::Rejected(rejection);
        assert!(outcome.recorded(&Half::Send(send.clone())));
        let mut other = send;
        other.amount = 11;
        assert!(!outcome.recorded(&Half::Send(other)));
        assert_eq!(outcome.parties(), vec![1]);
    }
}
