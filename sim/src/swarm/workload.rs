//! The seeded workload: which phones pay which, how much, when, and which
//! payments are faults, together with the outcome the sim expects for each.
//!
//! Everything here is decided before the first half is sent, from the seed and
//! the balances the accounts start with, so a run is reproducible from its
//! seed and no expectation depends on timing. `tx_key`s are the one thing not
//! taken from the seed: a rerun against the same node needs fresh keys.
//!
//! **Epochs** keep expectations exact while phones spend what they received.
//! The plan is cut into epochs of consecutive payments; the runner starts no
//! payment of epoch `k` before every payment of epoch `k - 2` that moves or
//! checks money has finished (in practice long since: an epoch lasts far
//! longer than a payment). So a payment of epoch `k` may spend credits from
//! epochs up to `k - 2`, which have certainly settled, but never one that
//! might still be in flight; and an overdraw in epoch `k` asks for more than
//! its sender could hold even if every credit planned for it up to epoch
//! `k + 1` had arrived (later ones cannot start before it ends). Without
//! epochs a phone spends only its starting balance.
//!
//! No IO, no clock: `plan` is a plain function, tested without tokio.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use tapledger_protocol::{ErrorCode, RejectCode, Side, TxKey};

/// What a planned payment does. `Normal` is an honest tap; every other kind
/// is a fault with an outcome the sim knows in advance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Both halves agree and the sender can pay: settles.
    Normal,
    /// The receiver expects a third account as sender: 200 for both phones.
    SenderMismatch,
    /// The halves name different amounts: 300 for both phones.
    AmountMismatch,
    /// Both agree on more than the sender could possibly hold: 100 for both.
    Overdraw,
    /// Only one half is ever sent: after `half_ttl` its phone is told 500.
    Expiry,
    /// A phone authenticates with the wrong API key: error 1012.
    WrongApiKey,
    /// The receiver's phone first submits the sender's half, which is refused
    /// with 620 without touching the key; then the payment settles.
    WrongParty,
    /// After settling, the sender replays its identical half (the same outcome
    /// again, nothing moves) and the receiver sends a different half under the
    /// used key (refused 700).
    Replay,
    /// The sender submits its half twice; every answer is the one settlement.
    IdenticalResubmission,
    /// The sender submits on a connection it then drops, and learns the
    /// outcome after reconnecting (query or identical resubmission).
    DisconnectReconnect,
}

impl Kind {
    /// Every fault kind, in the order reports list them.
    pub const FAULTS: [Kind; 9] = [
        Kind::SenderMismatch,
        Kind::AmountMismatch,
        Kind::Overdraw,
        Kind::Expiry,
        Kind::WrongApiKey,
        Kind::WrongParty,
        Kind::Replay,
        Kind::IdenticalResubmission,
        Kind::DisconnectReconnect,
    ];

    /// Every kind, the honest one first.
    pub const ALL: [Kind; 10] = [
        Kind::Normal,
        Kind::SenderMismatch,
        Kind::AmountMismatch,
        Kind::Overdraw,
        Kind::Expiry,
        Kind::WrongApiKey,
        Kind::WrongParty,
        Kind::Replay,
        Kind::IdenticalResubmission,
        Kind::DisconnectReconnect,
    ];

    /// The name used on the command line (`tapledger-sim scenario NAME`) and
    /// in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Normal => "settle",
            Kind::SenderMismatch => "sender-mismatch",
            Kind::AmountMismatch => "amount-mismatch",
            Kind::Overdraw => "overdraw",
            Kind::Expiry => "expiry",
            Kind::WrongApiKey => "wrong-api-key",
            Kind::WrongParty => "wrong-party",
            Kind::Replay => "replay",
            Kind::IdenticalResubmission => "resubmit",
            Kind::DisconnectReconnect => "reconnect",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// One sentence for `scenario list` and reports.
    pub const fn description(self) -> &'static str {
        match self {
            Kind::Normal => "an honest payment: both halves agree, it settles",
            Kind::SenderMismatch => "the receiver expects a different sender: both phones get 200",
            Kind::AmountMismatch => "the halves name different amounts: both phones get 300",
            Kind::Overdraw => "the sender pays more than it has: both phones get 100",
            Kind::Expiry => "the partner never sends: after half_ttl the waiting phone is told 500",
            Kind::WrongApiKey => "a phone authenticates with the wrong API key: error 1012",
            Kind::WrongParty => {
                "the receiver submits the sender's half (refused 620), then the payment settles"
            }
            Kind::Replay => {
                "after settling, the identical half is replayed (same outcome, nothing moves) \
                 and a different half under the used key is refused 700"
            }
            Kind::IdenticalResubmission => {
                "the sender submits its half twice: both answers are the one settlement"
            }
            Kind::DisconnectReconnect => {
                "the sender drops its connection before the outcome, reconnects and gets it"
            }
        }
    }

    /// Whether a payment of this kind moves money (settles).
    pub const fn settles(self) -> bool {
        matches!(
            self,
            Kind::Normal
                | Kind::WrongParty
                | Kind::Replay
                | Kind::IdenticalResubmission
                | Kind::DisconnectReconnect
        )
    }

    /// Whether the sim can run this kind against a node with this `half_ttl`
    /// without waiting longer than `expiry_wait_max`.
    pub fn runnable(self, half_ttl_ms: u64, expiry_wait_max_ms: u64) -> bool {
        self != Kind::Expiry || half_ttl_ms <= expiry_wait_max_ms
    }
}

/// What one phone should be told at one step of a payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Expect {
    /// An `outcome` (pushed or direct) saying the payment settled.
    Settled,
    /// An `outcome` saying the payment was rejected with this code.
    Rejected(RejectCode),
    /// A `refused` answer to one half.
    Refused(RejectCode),
    /// A protocol `error`.
    Error(ErrorCode),
}

impl Expect {
    /// The row label in reports: "settled" or the wire code.
    pub fn label(self) -> String {
        match self {
            Expect::Settled => "settled".to_owned(),
            Expect::Rejected(code) | Expect::Refused(code) => code.code().to_string(),
            Expect::Error(code) => code.code().to_string(),
        }
    }

    /// A phrase for reports and scenario transcripts.
    pub fn describe(self) -> String {
        match self {
            Expect::Settled => "outcome settled".to_owned(),
            Expect::Rejected(code) => {
                format!("outcome rejected {} ({})", code.code(), code.explanation())
            }
            Expect::Refused(code) => format!("refused {} ({})", code.code(), code.explanation()),
            Expect::Error(code) => format!("error {} ({})", code.code(), code.explanation()),
        }
    }
}

/// One planned payment. Phones are indexes into the swarm's phone list.
#[derive(Clone, Debug)]
pub struct Payment {
    /// Position in the plan (and in the arrival schedule).
    pub index: u64,
    pub kind: Kind,
    pub tx_key: TxKey,
    pub sender: u32,
    pub receiver: u32,
    /// The send half's amount.
    pub amount: u64,
    /// The receive half's `expected_amount` (differs only for amount mismatch).
    pub expected_amount: u64,
    /// The phone the receive half names as sender (a third phone only for
    /// sender mismatch).
    pub expected_sender: u32,
    /// Intended tap time, microseconds after the run starts (open loop).
    pub at_us: u64,
    /// How long after the tap each phone sends its half (the jitter).
    pub send_delay_us: u32,
    pub receive_delay_us: u32,
    /// Expiry: which half is sent alone.
    pub lone_side: Side,
    /// Reconnect: ask with `query_outcome` (true) or resubmit the identical
    /// half (false).
    pub by_query: bool,
    /// The epoch this payment belongs to (see the module docs).
    pub epoch: u64,
}

impl Payment {
    /// Whether payments two epochs later wait for this one: it moves money,
    /// or its expectation (an overdraw) depends on balances.
    pub fn is_barrier(&self) -> bool {
        self.kind.settles() || self.kind == Kind::Overdraw
    }

    /// What each phone should be told, in the order the executor observes
    /// them. The role names which phone and which step.
    pub fn expectations(&self) -> Vec<(&'static str, Expect)> {
        use Expect::*;
        match self.kind {
            Kind::Normal => vec![("sender", Settled), ("receiver", Settled)],
            Kind::SenderMismatch => vec![
                ("sender", Rejected(RejectCode::SenderMismatch)),
                ("receiver", Rejected(RejectCode::SenderMismatch)),
            ],
            Kind::AmountMismatch => vec![
                ("sender", Rejected(RejectCode::AmountMismatch)),
                ("receiver", Rejected(RejectCode::AmountMismatch)),
            ],
            Kind::Overdraw => vec![
                ("sender", Rejected(RejectCode::InsufficientFunds)),
                ("receiver", Rejected(RejectCode::InsufficientFunds)),
            ],
            Kind::Expiry => match self.lone_side {
                Side::Send => vec![("lone sender", Rejected(RejectCode::Expired))],
                Side::Receive => vec![("lone receiver", Rejected(RejectCode::Expired))],
            },
            Kind::WrongApiKey => vec![("wrong key", Error(ErrorCode::BadCredentials))],
            Kind::WrongParty => vec![
                ("receiver posing as sender", Refused(RejectCode::WrongParty)),
                ("sender", Settled),
                ("receiver", Settled),
            ],
            Kind::Replay => vec![
                ("sender", Settled),
                ("receiver", Settled),
                ("sender replay", Settled),
                (
                    "receiver different half",
                    Refused(RejectCode::TxKeyAlreadyUsed),
                ),
            ],
            Kind::IdenticalResubmission => vec![
                ("sender", Settled),
                ("sender again", Settled),
                ("receiver", Settled),
            ],
            Kind::DisconnectReconnect => {
                vec![("receiver", Settled), ("sender after reconnect", Settled)]
            }
        }
    }

    /// The phones this payment submits halves for, ascending and distinct
    /// (the executor reserves a slot on each, in this order).
    pub fn phones(&self) -> Vec<u32> {
        let mut phones = match self.kind {
            Kind::WrongApiKey => vec![self.sender],
            Kind::Expiry => match self.lone_side {
                Side::Send => vec![self.sender],
                Side::Receive => vec![self.receiver],
            },
            _ => vec![self.sender, self.receiver],
        };
        phones.sort_unstable();
        phones.dedup();
        phones
    }
}

/// How to build a plan.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub seed: u64,
    pub payments: u64,
    /// Share of payments that are faults, 0.0 ..= 1.0.
    pub fault_share: f64,
    /// Fault kinds to draw from (uniformly); empty means no faults.
    pub faults: Vec<Kind>,
    /// Amounts of honest payments are uniform in 1 ..= `amount_max`.
    pub amount_max: u64,
    /// The node's largest accepted amount; an overdraw must stay within it.
    pub max_amount: u64,
    /// Open-loop arrivals per second (Poisson); `None` means no schedule
    /// (every `at_us` is 0: closed loop).
    pub rate: Option<f64>,
    /// Each half is sent uniformly 0 ..= this many microseconds after the tap.
    pub jitter_us_max: u32,
    /// Payments per epoch; `None`: one epoch, phones spend only their
    /// starting balance (see the module docs).
    pub epoch_payments: Option<u64>,
}

/// A planned run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub payments: Vec<Payment>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PlanError {
    TooFewPhones(usize),
    AmountMax(u64),
    OutOfMoney(u64),
    OverdrawTooLarge {
        phone: u32,
        amount: u64,
        max_amount: u64,
    },
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::TooFewPhones(phones) => write!(
                f,
                "a payment needs two phones and a sender mismatch three (got {phones})"
            ),
            PlanError::AmountMax(max_amount) => write!(
                f,
                "--amount-max must be at least 1 and at most the node's max_amount ({max_amount})"
            ),
            PlanError::OutOfMoney(index) => write!(
                f,
                "the phones ran out of money to plan honest payments with after {index} \
                 payments: raise --opening-balance or lower --amount-max"
            ),
            PlanError::OverdrawTooLarge {
                phone,
                amount,
                max_amount,
            } => write!(
                f,
                "an overdraw by phone {phone} would need {amount}, above the node's \
                 max_amount {max_amount}: lower --opening-balance"
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// How many other senders to try when the drawn one cannot afford an honest payment.
const SENDER_DRAWS_MAX: usize = 64;

/// Plans `config.payments` payments among phones whose balances are
/// `balances` when the plan starts.
pub fn plan(config: &WorkloadConfig, balances: &[u64]) -> Result<Plan, PlanError> {
    let phones = balances.len();
    let faults_on = config.fault_share > 0.0 && !config.faults.is_empty();
    if phones < 2 || (faults_on && phones < 3) {
        return Err(PlanError::TooFewPhones(phones));
    }
    if config.amount_max == 0 || config.amount_max > config.max_amount {
        return Err(PlanError::AmountMax(config.max_amount));
    }
    let phone_count = u32::try_from(phones).expect("phone count fits u32");
    let epoch_payments = config.epoch_payments.unwrap_or(u64::MAX).max(1);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    // What each phone may spend now without counting on any credit in flight.
    let mut spendable: Vec<u64> = balances.to_vec();
    // Credits planned per epoch, released to `spendable` two epochs later.
    let mut credits: std::collections::VecDeque<Vec<(u32, u64)>> = Default::default();
    let mut payments = Vec::with_capacity(usize::try_from(config.payments).unwrap_or(0));
    let mut clock_us = 0.0f64;

    for index in 0..config.payments {
        let epoch = index / epoch_payments;
        if index % epoch_payments == 0 {
            // Entering `epoch`: credits of `epoch - 2` have certainly settled.
            if credits.len() == 2 {
                for (phone, amount) in credits.pop_front().expect("two epochs kept") {
                    spendable[phone as usize] += amount;
                }
            }
            credits.push_back(Vec::new());
        }
        let kind = if faults_on && rng.random_bool(config.fault_share.clamp(0.0, 1.0)) {
            config.faults[rng.random_range(0..config.faults.len())]
        } else {
            Kind::Normal
        };
        let (sender, amount) =
            draw_sender(&mut rng, config, &spendable, kind).ok_or(PlanError::OutOfMoney(index))?;
        let receiver = other_than(&mut rng, phone_count, &[sender]);
        let (expected_sender, expected_amount) = expectations(
            &mut rng,
            config,
            kind,
            phone_count,
            (sender, receiver),
            amount,
        );
        if kind.settles() {
            spendable[sender as usize] -= amount;
            credits
                .back_mut()
                .expect("the current epoch")
                .push((receiver, amount));
        }
        if let Some(rate) = config.rate {
            // Poisson arrivals: exponential gaps with mean 1 / rate.
            let uniform: f64 = rng.random();
            clock_us += -(1.0 - uniform).ln() / rate * 1e6;
        }
        let send_delay_us = rng.random_range(0..=config.jitter_us_max);
        let receive_delay_us = rng.random_range(0..=config.jitter_us_max);
        let lone_side = if rng.random_bool(0.5) {
            Side::Send
        } else {
            Side::Receive
        };
        let by_query = rng.random_bool(0.5);
        payments.push(Payment {
            index,
            kind,
            tx_key: TxKey::new_random(),
            sender,
            receiver,
            amount,
            expected_amount,
            expected_sender,
            at_us: clock_us as u64,
            send_delay_us,
            receive_delay_us,
            lone_side,
            by_query,
            epoch,
        });
    }

    size_overdraws(&mut rng, config, balances, &mut payments)?;
    Ok(Plan { payments })
}

/// The amount and the sender of the next payment, in that order from
/// `rng`. A payment that settles gets a sender that can afford it (redrawn
/// up to [`SENDER_DRAWS_MAX`] times, then the first phone with money left)
/// and an amount capped by what it may spend; `None` when no phone has
/// money left.
fn draw_sender(
    rng: &mut Xoshiro256PlusPlus,
    config: &WorkloadConfig,
    spendable: &[u64],
    kind: Kind,
) -> Option<(u32, u64)> {
    let phone_count = spendable.len() as u32;
    let mut amount = rng.random_range(1..=config.amount_max);
    let mut sender = rng.random_range(0..phone_count);
    if kind.settles() {
        let mut draws = 0;
        while spendable[sender as usize] == 0 {
            draws += 1;
            if draws > SENDER_DRAWS_MAX {
                sender = spendable.iter().position(|&left| left > 0)? as u32;
                break;
            }
            sender = rng.random_range(0..phone_count);
        }
        amount = amount.min(spendable[sender as usize]);
    }
    Some((sender, amount))
}

/// The sender and amount the receive half expects: the true ones, but for a
/// sender mismatch (another phone) and an amount mismatch (another amount,
/// 1..=`max_amount`).
fn expectations(
    rng: &mut Xoshiro256PlusPlus,
    config: &WorkloadConfig,
    kind: Kind,
    phone_count: u32,
    (sender, receiver): (u32, u32),
    amount: u64,
) -> (u32, u64) {
    match kind {
        Kind::SenderMismatch => (other_than(rng, phone_count, &[sender, receiver]), amount),
        Kind::AmountMismatch => {
            let mut expected_amount = if amount > 1 && rng.random_bool(0.5) {
                amount - rng.random_range(1..amount)
            } else {
                amount + rng.random_range(1..=100u64)
            };
            if expected_amount > config.max_amount {
                expected_amount = amount - 1;
            }
            if expected_amount == 0 {
                expected_amount = amount + 1;
            }
            (sender, expected_amount)
        }
        _ => (sender, amount),
    }
}

/// Sets every overdraw's amount. An overdraw in epoch `k` asks for more
/// than its sender could hold if every credit planned for it up to epoch
/// `k + 1` had arrived.
fn size_overdraws(
    rng: &mut Xoshiro256PlusPlus,
    config: &WorkloadConfig,
    balances: &[u64],
    payments: &mut [Payment],
) -> Result<(), PlanError> {
    let mut ceiling: Vec<u64> = balances.to_vec();
    let mut counted = 0;
    for at in 0..payments.len() {
        if payments[at].kind != Kind::Overdraw {
            continue;
        }
        let horizon = payments[at].epoch.saturating_add(1);
        while counted < payments.len() && payments[counted].epoch <= horizon {
            let credit = &payments[counted];
            if credit.kind.settles() {
                ceiling[credit.receiver as usize] += credit.amount;
            }
            counted += 1;
        }
        let payment = &mut payments[at];
        let amount = ceiling[payment.sender as usize] + 1 + rng.random_range(0..config.amount_max);
        if amount > config.max_amount {
            return Err(PlanError::OverdrawTooLarge {
                phone: payment.sender,
                amount,
                max_amount: config.max_amount,
            });
        }
        payment.amount = amount;
        payment.expected_amount = amount;
    }
    Ok(())
}

/// A phone index uniformly chosen among those not in `excluded`.
fn other_than(rng: &mut Xoshiro256PlusPlus, phones: u32, excluded: &[u32]) -> u32 {
    loop {
        let candidate = rng.random_range(0..phones);
        if !excluded.contains(&candidate) {
            return candidate;
        }
    }
}

/// The balances after `payments` all reach their expected outcomes.
pub fn balances_after<'a>(
    starting: &[u64],
    payments: impl IntoIterator<Item = &'a Payment>,
) -> Vec<u64> {
    let mut balances = starting.to_vec();
    for payment in payments {
        if payment.kind.settles() {
            let sender = &mut balances[payment.sender as usize];
            *sender = sender
                .checked_sub(payment.amount)
                .expect("the plan never spends more than a phone has");
            balances[payment.receiver as usize] += payment.amount;
        }
    }
    balances
}

#[cfg(test)]
#[path = "workload_tests.rs"]
mod tests;
