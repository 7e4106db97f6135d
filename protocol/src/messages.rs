//! Every message a phone, an operator tool and the node exchange.
//!
//! Encoding decisions (the full description is in `PROTOCOL.md`):
//!
//! * Each message is a MessagePack **map** with string keys. The key `type`
//!   names the message in `snake_case`; the other keys are the fields below.
//!   Maps cost a few bytes more than arrays but let clients in any language
//!   read and write messages without knowing field order, and let later
//!   versions add fields: receivers ignore keys they do not know.
//! * Domain types inside messages keep their own encoding: `tx_key` is `bin`
//!   of 16 bytes, a half is a one-key map `{"Send": {..}}` or
//!   `{"Receive": {..}}`, codes are unsigned integers.
//! * Every request carries a client-chosen `request_id` and every answer
//!   echoes it, so requests can be pipelined on one long-lived stream.
//!
//! This file defines shapes and pure conversions only; which answer a request
//! gets, and when, is the node's business.

use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::domain::{
    AccountId, Half, Outcome, ReceiveHalf, RejectCode, SendHalf, Settlement, Stamped, Timestamp,
    TxKey,
};
use crate::error_code::ErrorCode;

/// A client's choice of number for one request; echoed in every answer to it.
/// Clients should not reuse one while the request awaits its final answer.
pub type RequestId = u64;

/// A message from a client (phone or operator tool) to the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Proves the connection speaks for `account_id`. Send once, first.
    /// Answers: `authenticated`, or `error` 1011/1012/1014.
    Authenticate {
        request_id: RequestId,
        account_id: AccountId,
        /// The account's API key, `API_KEY_BYTES_MIN..=API_KEY_BYTES_MAX` bytes.
        api_key: Secret,
    },
    /// One phone's half of a payment. The half's party must be the
    /// authenticated account. Answers: `refused`; or `outcome`; or
    /// `accepted` and later `outcome`; or `error`.
    SubmitHalf { request_id: RequestId, half: Half },
    /// Asks for the state of a `tx_key` this account is a party to.
    /// Answer: `outcome_answer`.
    QueryOutcome {
        request_id: RequestId,
        tx_key: TxKey,
    },
    /// Asks for the authenticated account's balance. Answer: `balance_answer`.
    Balance { request_id: RequestId },
    /// Asks for one page of the authenticated account's money movements,
    /// newest first. Answer: `history_answer`.
    History {
        request_id: RequestId,
        /// Only entries with `seq` below this; `nil` starts at the newest.
        before_seq: Option<u64>,
        /// Most entries wanted: `1..=HISTORY_PAGE_ENTRIES_MAX`.
        limit: u16,
    },
    /// Operator: opens an account funded by the issuer. Needs no
    /// authentication, only the admin credential. Answer: `account_opened`.
    OpenAccount {
        request_id: RequestId,
        admin_credential: Secret,
        account_type: String,
        bank_name: String,
        /// The salt the phone chose, `SALT_BYTES_MIN..=SALT_BYTES_MAX` bytes.
        #[serde(with = "serde_bytes")]
        salt: Vec<u8>,
        /// `SHA3-512(api_key ‖ salt)`, exactly `KEY_HASH_BYTES` bytes.
        #[serde(with = "serde_bytes")]
        key_hash: Vec<u8>,
        /// Minor units moved from the issuer; zero opens an empty account.
        opening_balance: u64,
    },
    /// Operator: moves `amount` from the issuer into `account_id`.
    /// Answer: `topped_up`.
    TopUp {
        request_id: RequestId,
        admin_credential: Secret,
        account_id: AccountId,
        amount: u64,
    },
}

/// A message from the node to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeMessage {
    /// The connection now speaks for `account_id`.
    Authenticated {
        request_id: RequestId,
        account_id: AccountId,
        /// The node's largest payment amount, so phones can check before sending.
        max_amount: u64,
        /// How long a lone half waits for its partner, in milliseconds.
        half_ttl_ms: u64,
    },
    /// The half is durable and waits for its partner; an `outcome` with the
    /// same `request_id` follows on this stream.
    Accepted {
        request_id: RequestId,
        tx_key: TxKey,
    },
    /// The `tx_key`'s final outcome, pushed to the stream the half arrived on.
    Outcome {
        request_id: RequestId,
        report: OutcomeReport,
    },
    /// This half was refused (codes 400, 600..=800); nothing was stored and the
    /// `tx_key` is untouched. Final answer to the request.
    Refused {
        request_id: RequestId,
        tx_key: TxKey,
        code: RejectCode,
        explanation: String,
    },
    /// Answer to `query_outcome`.
    OutcomeAnswer {
        request_id: RequestId,
        tx_key: TxKey,
        status: QueryStatus,
        /// Present exactly when `status` is `decided`.
        report: Option<OutcomeReport>,
    },
    /// Answer to `balance`: the committed balance in minor units.
    BalanceAnswer {
        request_id: RequestId,
        account_id: AccountId,
        balance: u64,
    },
    /// Answer to `history`: entries newest first.
    HistoryAnswer {
        request_id: RequestId,
        entries: Vec<HistoryEntry>,
        /// True when older entries exist: ask again with `before_seq` set to
        /// the last entry's `seq`.
        more: bool,
    },
    /// Answer to `open_account`: the new account, durable.
    AccountOpened {
        request_id: RequestId,
        account_id: AccountId,
        balance: u64,
    },
    /// Answer to `top_up`: the account's balance after it, durable.
    ToppedUp {
        request_id: RequestId,
        account_id: AccountId,
        balance: u64,
    },
    /// A protocol-level error. `request_id` is `nil` when the node could not
    /// read one (a malformed or oversized frame).
    Error {
        request_id: Option<RequestId>,
        code: ErrorCode,
        message: String,
        /// With 1102 (not the leader): the leader, when this replica knows
        /// it. Absent from every other error.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leader: Option<LeaderRef>,
    },
}

/// Where the cluster's leader is: its replica id and the address phones
/// reach it at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRef {
    pub id: u64,
    pub addr: String,
}

/// Whether a reported payment moved money.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    Settled,
    Rejected,
}

/// What the node knows of a `tx_key`, as far as the asking account may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryStatus {
    /// The key has its final outcome; the report is attached.
    Decided,
    /// This account's half is durable and waits for its partner.
    Pending,
    /// Nothing this account may see: no half of this account under this key.
    /// Deliberately the same answer whether or not others used the key.
    Unknown,
}

/// A final outcome as one of its parties sees it.
///
/// It carries the halves as the node recorded them but not the other party's
/// balance, so a payment never reveals the counterparty's money.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeReport {
    pub tx_key: TxKey,
    pub status: OutcomeStatus,
    /// `nil` when settled; the payment rejection code otherwise.
    pub code: Option<RejectCode>,
    /// `"settled"`, or the rejection code's explanation.
    pub explanation: String,
    /// The amount that moved; `nil` when rejected (the halves show what each
    /// side named).
    pub amount: Option<u64>,
    /// The send half as recorded, with the node's receive time; `nil` when a
    /// rejection happened without it (a receive half that expired alone).
    pub send: Option<Stamped<SendHalf>>,
    /// The receive half as recorded; `nil` when a rejection happened without it.
    pub receive: Option<Stamped<ReceiveHalf>>,
    /// Node time of the decision.
    pub decided_at: Timestamp,
    /// The viewing account's balance right after the decision, where the node
    /// knows it: both parties of a settlement, and the sender of a payment
    /// rejected for insufficient funds. `nil` otherwise.
    pub balance_after: Option<u64>,
}

/// The explanation an `OutcomeReport` of a settlement carries.
pub const SETTLED_EXPLANATION: &str = "settled";

impl OutcomeReport {
    /// The report `viewer` gets about `outcome`. A viewer who is not a party
    /// gets no balance; the node should not send it a report at all.
    pub fn for_party(outcome: &Outcome, viewer: AccountId) -> OutcomeReport {
        match outcome {
            Outcome::Settled(settlement) => {
                let balance_after = if viewer == settlement.sender() {
                    settlement
                        .sender_balance_before
                        .checked_sub(settlement.amount())
                } else if viewer == settlement.receiver() {
                    settlement
                        .receiver_balance_before
                        .checked_add(settlement.amount())
                } else {
                    None
                };
                OutcomeReport {
                    tx_key: settlement.tx_key(),
                    status: OutcomeStatus::Settled,
                    code: None,
                    explanation: SETTLED_EXPLANATION.to_owned(),
                    amount: Some(settlement.amount()),
                    send: Some(settlement.send.clone()),
                    receive: Some(settlement.receive.clone()),
                    decided_at: settlement.settled_at,
                    balance_after,
                }
            }
            Outcome::Rejected(rejection) => {
                let viewer_is_sender = rejection
                    .send
                    .as_ref()
                    .is_some_and(|send| send.half.sender_id == viewer);
                OutcomeReport {
                    tx_key: rejection.tx_key,
                    status: OutcomeStatus::Rejected,
                    code: Some(rejection.code),
                    explanation: rejection.code.explanation().to_owned(),
                    amount: None,
                    send: rejection.send.clone(),
                    receive: rejection.receive.clone(),
                    decided_at: rejection.decided_at,
                    balance_after: rejection.sender_balance.filter(|_| viewer_is_sender),
                }
            }
        }
    }
}

/// Why an account's balance moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    /// The opening balance, from the issuer.
    Opening,
    /// An operator top-up, from the issuer.
    TopUp,
    /// A settled payment this account made.
    Sent,
    /// A settled payment this account received.
    Received,
}

/// One movement of an account's money.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The node's journal sequence number: increases with every commit, so it
    /// orders entries and serves as the paging cursor. Not contiguous per account.
    pub seq: u64,
    pub kind: HistoryKind,
    /// The payment's key; `nil` for openings and top-ups.
    pub tx_key: Option<TxKey>,
    /// The other account of a payment; `nil` for openings and top-ups.
    pub counterparty_id: Option<AccountId>,
    /// Minor units moved; always positive.
    pub amount: u64,
    /// This account's balance right after the movement.
    pub balance_after: u64,
    /// Node time of the commit.
    pub at: Timestamp,
}

impl HistoryEntry {
    /// The entry `viewer` sees for a settlement recorded at journal `seq`;
    /// `None` when the viewer is not a party (or the record's balances would
    /// overflow, which storage never lets happen).
    pub fn from_settlement(
        seq: u64,
        settlement: &Settlement,
        viewer: AccountId,
    ) -> Option<HistoryEntry> {
        let (kind, counterparty_id, balance_after) = if viewer == settlement.sender() {
            (
                HistoryKind::Sent,
                settlement.receiver(),
                settlement
                    .sender_balance_before
                    .checked_sub(settlement.amount())?,
            )
        } else if viewer == settlement.receiver() {
            (
                HistoryKind::Received,
                settlement.sender(),
                settlement
                    .receiver_balance_before
                    .checked_add(settlement.amount())?,
            )
        } else {
            return None;
        };
        Some(HistoryEntry {
            seq,
            kind,
            tx_key: Some(settlement.tx_key()),
            counterparty_id: Some(counterparty_id),
            amount: settlement.amount(),
            balance_after,
            at: settlement.settled_at,
        })
    }
}

impl ClientMessage {
    /// The `type` string this message carries on the wire.
    pub const fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::Authenticate { .. } => "authenticate",
            ClientMessage::SubmitHalf { .. } => "submit_half",
            ClientMessage::QueryOutcome { .. } => "query_outcome",
            ClientMessage::Balance { .. } => "balance",
            ClientMessage::History { .. } => "history",
            ClientMessage::OpenAccount { .. } => "open_account",
            ClientMessage::TopUp { .. } => "top_up",
        }
    }

    pub const fn request_id(&self) -> RequestId {
        match self {
            ClientMessage::Authenticate { request_id, .. }
            | ClientMessage::SubmitHalf { request_id, .. }
            | ClientMessage::QueryOutcome { request_id, .. }
            | ClientMessage::Balance { request_id }
            | ClientMessage::History { request_id, .. }
            | ClientMessage::OpenAccount { request_id, .. }
            | ClientMessage::TopUp { request_id, .. } => *request_id,
        }
    }

    /// True for requests that need an authenticated connection. Admin
    /// requests carry their own credential instead.
    pub const fn needs_authentication(&self) -> bool {
        match self {
            ClientMessage::SubmitHalf { .. }
            | ClientMessage::QueryOutcome { .. }
            | ClientMessage::Balance { .. }
            | ClientMessage::History { .. } => true,
            ClientMessage::Authenticate { .. }
            | ClientMessage::OpenAccount { .. }
            | ClientMessage::TopUp { .. } => false,
        }
    }
}

impl NodeMessage {
    /// The `type` string this message carries on the wire.
    pub const fn type_name(&self) -> &'static str {
        match self {
            NodeMessage::Authenticated { .. } => "authenticated",
            NodeMessage::Accepted { .. } => "accepted",
            NodeMessage::Outcome { .. } => "outcome",
            NodeMessage::Refused { .. } => "refused",
            NodeMessage::OutcomeAnswer { .. } => "outcome_answer",
            NodeMessage::BalanceAnswer { .. } => "balance_answer",
            NodeMessage::HistoryAnswer { .. } => "history_answer",
            NodeMessage::AccountOpened { .. } => "account_opened",
            NodeMessage::ToppedUp { .. } => "topped_up",
            NodeMessage::Error { .. } => "error",
        }
    }

    /// The request this answers; `None` only for an `error` about an
    /// unreadable frame.
    pub const fn request_id(&self) -> Option<RequestId> {
        match self {
            NodeMessage::Authenticated { request_id, .. }
            | NodeMessage::Accepted { request_id, .. }
            | NodeMessage::Outcome { request_id, .. }
            | NodeMessage::Refused { request_id, .. }
            | NodeMessage::OutcomeAnswer { request_id, .. }
            | NodeMessage::BalanceAnswer { request_id, .. }
            | NodeMessage::HistoryAnswer { request_id, .. }
            | NodeMessage::AccountOpened { request_id, .. }
            | NodeMessage::ToppedUp { request_id, .. } => Some(*request_id),
            NodeMessage::Error { request_id, .. } => *request_id,
        }
    }

    /// True when no further message will answer this request: everything but
    /// `accepted`, which an `outcome` follows.
    pub const fn is_final(&self) -> bool {
        !matches!(self, NodeMessage::Accepted { .. })
    }

    /// An `error` carrying the code's standard explanation, plus `detail`
    /// when given, cut to `EXPLANATION_BYTES_MAX` on a character boundary.
    pub fn error(request_id: Option<RequestId>, code: ErrorCode, detail: &str) -> NodeMessage {
        let mut message = code.explanation().to_owned();
        if !detail.is_empty() {
            message.push_str(": ");
            message.push_str(detail);
        }
        truncate_to_char_boundary(&mut message, crate::limits::EXPLANATION_BYTES_MAX);
        NodeMessage::Error {
            request_id,
            code,
            message,
            leader: None,
        }
    }

    /// A 1102 `error`: this replica does not lead; `leader` is where the
    /// leader is, if known.
    pub fn not_leader(request_id: Option<RequestId>, leader: Option<LeaderRef>) -> NodeMessage {
        let detail = match &leader {
            Some(leader) => format!("the leader is replica {} at {}", leader.id, leader.addr),
            None => "no leader is known yet; try another replica".to_string(),
        };
        let NodeMessage::Error {
            request_id,
            code,
            message,
            ..
        } = NodeMessage::error(request_id, ErrorCode::NotLeader, &detail)
        else {
            unreachable!("error builds an error")
        };
        NodeMessage::Error {
            request_id,
            code,
            message,
            leader,
        }
    }

    /// A `refused` for `code` with its standard explanation.
    pub fn refused(request_id: RequestId, tx_key: TxKey, code: RejectCode) -> NodeMessage {
        NodeMessage::Refused {
            request_id,
            tx_key,
            code,
            explanation: code.explanation().to_owned(),
        }
    }
}

/// Shortens `text` to at most `bytes_max` bytes without splitting a character.
pub(crate) fn truncate_to_char_boundary(text: &mut String, bytes_max: usize) {
    if text.len() <= bytes_max {
        return;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
}

/// The message names each direction accepts, for telling an unknown `type`
/// apart from a malformed message of a known one.
pub const CLIENT_TYPE_NAMES: [&str; 7] = [
    "authenticate",
    "submit_half",
    "query_outcome",
    "balance",
    "history",
    "open_account",
    "top_up",
];

/// See [`CLIENT_TYPE_NAMES`].
pub const NODE_TYPE_NAMES: [&str; 10] = [
    "authenticated",
    "accepted",
    "outcome",
    "refused",
    "outcome_answer",
    "balance_answer",
    "history_answer",
    "account_opened",
    "topped_up",
    "error",
];

#[cfg(test)]
#[path = "messages_tests.rs"]
mod tests;
