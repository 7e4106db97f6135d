//! The phones of the swarm and what they do for one planned payment: build
//! the halves, send them after the tap's jitter, wait for the node's answers,
//! and turn each answer into an observation to compare with the plan.
//!
//! Each phone keeps one authenticated QUIC connection to the leader for the
//! whole run; a fault that needs another connection (a wrong API key, a
//! dropped connection) opens and closes its own, so the phone's other
//! payments are undisturbed. When the leader changes (its replica answers
//! "not the leader", or dies and the connection drops), the phone reconnects
//! to the new leader and resubmits its identical half, as a phone app would:
//! halves are idempotent by `tx_key`, so it hears the one outcome. Every wait
//! is bounded by the step timeout (expiry: `half_ttl` on top).
//!
//! This file holds the honest flow and the shared steps; each fault kind's
//! steps are in `faults`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tapledger_node::client::{Datagrams, Session};
use tapledger_node::{ClientError, HalfAnswer, Phone, Submitted};
use tapledger_protocol::{
    AccountId, Half, OutcomeReport, OutcomeStatus, ReceiveHalf, SendHalf, TxKey,
};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::liveness::Liveness;
use super::report::ToldOutcome;
use super::target::{Account, Connector, close_bounded};
use super::workload::{Expect, Kind, Payment};

/// Payments one phone takes part in at once. The node lets an account keep
/// 64 lone halves waiting (32 per matcher shard) and a connection 256
/// requests in flight; a payment holds at most three of either per phone.
pub const PAYMENTS_PER_PHONE_IN_FLIGHT: usize = 16;

/// Operating systems the phones report (recorded by the node for analysts).
const DEVICE_OS: [&str; 4] = ["ios 18.3", "android 15", "ios 17.6", "android 14"];

/// One simulated phone: its account and its long-lived connection to the
/// leader (replaced when the leader changes).
pub struct SimPhone {
    pub account: Account,
    connection: tokio::sync::RwLock<Connection>,
    /// Serialises reconnections: one task reconnects, the others reuse it.
    reconnecting: tokio::sync::Mutex<()>,
    pub device_os: &'static str,
    /// Slots for payments in flight (see [`PAYMENTS_PER_PHONE_IN_FLIGHT`]).
    pub slots: Arc<Semaphore>,
}

/// A phone's current connection: which replica it reached, and a number
/// that changes with every reconnection.
#[derive(Clone)]
pub struct Connection {
    pub phone: Arc<Phone>,
    pub replica: usize,
    pub generation: u64,
}

impl SimPhone {
    pub fn new(index: usize, account: Account, phone: Phone, replica: usize) -> SimPhone {
        SimPhone {
            account,
            connection: tokio::sync::RwLock::new(Connection {
                phone: Arc::new(phone),
                replica,
                generation: 0,
            }),
            reconnecting: tokio::sync::Mutex::new(()),
            device_os: DEVICE_OS[index % DEVICE_OS.len()],
            slots: Arc::new(Semaphore::new(PAYMENTS_PER_PHONE_IN_FLIGHT)),
        }
    }

    /// Datagrams the current connection sent and received.
    pub async fn datagrams(&self) -> Datagrams {
        self.connection.read().await.phone.datagrams()
    }

    /// The connection to use now.
    pub async fn connection(&self) -> Connection {
        self.connection.read().await.clone()
    }

    /// Replaces the connection `stale` (found not to lead, or dropped) by a
    /// new one to the leader, unless another task already did.
    pub async fn reconnect(
        &self,
        connector: &Connector,
        stale: &Connection,
        log: &FailoverLog,
    ) -> anyhow::Result<Connection> {
        let _one_at_a_time = self.reconnecting.lock().await;
        let current = self.connection().await;
        if current.generation != stale.generation {
            return Ok(current);
        }
        log.reconnects.fetch_add(1, Ordering::Relaxed);
        let (phone, _, replica) = connector
            .connect_phone(self.account.id, &self.account.key)
            .await?;
        let fresh = Connection {
            phone: Arc::new(phone),
            replica,
            generation: stale.generation + 1,
        };
        let old = std::mem::replace(&mut *self.connection.write().await, fresh.clone());
        // The old connection is closed once its last user lets go of it.
        tokio::spawn(async move {
            if let Ok(phone) = Arc::try_unwrap(old.phone) {
                close_bounded(phone).await;
            }
        });
        Ok(fresh)
    }

    /// Closes the connection (at the end of a run).
    pub async fn close(self) {
        let connection = self.connection.into_inner();
        if let Ok(phone) = Arc::try_unwrap(connection.phone) {
            close_bounded(phone).await;
        }
    }
}

/// What the swarm saw of a change of leader: for the failover report.
#[derive(Debug, Default)]
pub struct FailoverLog {
    /// When the leader was killed, and which replica (by index) it was.
    pub killed: Mutex<Option<(Instant, usize)>>,
    /// The first outcome told after the kill by another replica.
    pub first_outcome_after: Mutex<Option<Instant>>,
    /// Halves sent again after their replica stopped leading or died.
    pub resubmitted: AtomicU64,
    /// Phone connections replaced to reach a new leader.
    pub reconnects: AtomicU64,
    /// Every final outcome a phone was told, to look for afterwards.
    pub told: Mutex<HashMap<TxKey, OutcomeReport>>,
    /// Every outcome each phone was told, as told (one entry per telling),
    /// for the report: what to check against the node's ledger afterwards.
    pub told_by_account: Mutex<Vec<ToldOutcome>>,
    /// Outcomes told twice for one key with different contents.
    pub contradictions: AtomicUsize,
}

impl FailoverLog {
    /// Notes an outcome the phone of `account` was told, over its long-lived
    /// connection to `replica` (`None`: over a connection of its own, which
    /// the failover figures leave out).
    pub(super) fn told(&self, account: AccountId, report: &OutcomeReport, replica: Option<usize>) {
        self.told_by_account
            .lock()
            .expect("failover lock")
            .push(ToldOutcome::of(account, report));
        let Some(replica) = replica else {
            return;
        };
        if let Some((killed_at, killed)) = *self.killed.lock().expect("failover lock")
            && replica != killed
        {
            let mut first = self.first_outcome_after.lock().expect("failover lock");
            if first.is_none() {
                *first = Some(Instant::now().max(killed_at));
            }
        }
        let mut told = self.told.lock().expect("failover lock");
        match told.get(&report.tx_key) {
            // Each party hears its own view (balance after); the outcome is
            // the same: status, code, amount, parties.
            Some(earlier) if !same_outcome(earlier, report) => {
                self.contradictions.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
            None => {
                told.insert(report.tx_key, report.clone());
            }
        }
    }
}

/// Whether two parties' reports describe the same outcome.
pub fn same_outcome(one: &OutcomeReport, other: &OutcomeReport) -> bool {
    one.tx_key == other.tx_key
        && one.status == other.status
        && one.code == other.code
        && one.amount == other.amount
}

/// What a phone was told, as comparable with an [`Expect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Got {
    Answer(Expect),
    /// No usable answer: a timeout, a lost connection, a wrong report.
    Failed(String),
}

impl Got {
    pub fn label(&self) -> String {
        match self {
            Got::Answer(expect) => expect.label(),
            Got::Failed(_) => "failed".to_owned(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Got::Answer(expect) => expect.describe(),
            Got::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// One phone's answer at one step of a payment.
#[derive(Clone, Debug)]
pub struct Observation {
    pub role: &'static str,
    pub expected: Expect,
    pub got: Got,
}

impl Observation {
    pub fn matches(&self) -> bool {
        self.got == Got::Answer(self.expected)
    }
}

/// Everything one payment produced.
#[derive(Debug)]
pub struct PaymentResult {
    pub observations: Vec<Observation>,
    /// When its last answer arrived.
    pub finished: Instant,
    /// From sending the later of the two halves to that phone's outcome, when
    /// the payment had two concurrent halves.
    pub second_half: Option<Duration>,
    /// Whether any phone was told the payment settled.
    pub settled: bool,
}

/// A submitted half's final answer.
pub(super) struct Answer {
    pub(super) got: Got,
    pub(super) report: Option<OutcomeReport>,
    /// The half was `accepted` before its outcome came.
    pub(super) waited: bool,
    pub(super) at: Instant,
}

/// The connected swarm: every phone, the connector for extra connections,
/// and the node's parameters.
pub struct Swarm {
    pub connector: Arc<Connector>,
    pub phones: Vec<SimPhone>,
    pub session: Session,
    /// When set, every step is written here for people to read (`scenario`).
    pub transcript: Option<Mutex<Vec<String>>>,
    pub failover: FailoverLog,
    /// Whether the node still answers (see `liveness`).
    pub liveness: Liveness,
}

impl Swarm {
    /// Datagrams every phone's current connection sent and received.
    pub async fn datagrams(&self) -> Datagrams {
        let mut total = Datagrams::default();
        for phone in &self.phones {
            total = total + phone.datagrams().await;
        }
        total
    }

    pub(super) fn note(&self, line: impl FnOnce() -> String) {
        if let Some(transcript) = &self.transcript {
            transcript.lock().expect("transcript lock").push(line());
        }
    }

    /// Notes what `phone` was told, for scenario transcripts.
    pub(super) fn note_told(&self, phone: u32, answer: &Answer) {
        self.note(|| format!("  {} is told: {}", self.who(phone), describe_answer(answer)));
    }

    pub(super) fn who(&self, phone: u32) -> String {
        format!(
            "phone {phone} (account {})",
            self.phones[phone as usize].account.id
        )
    }

    pub(super) fn half_ttl(&self) -> Duration {
        Duration::from_millis(self.session.half_ttl_ms)
    }

    pub(super) fn step_timeout(&self) -> Duration {
        self.connector.step_timeout
    }

    pub fn send_half(&self, payment: &Payment) -> Half {
        let sender = &self.phones[payment.sender as usize];
        Half::Send(SendHalf {
            tx_key: payment.tx_key,
            sender_id: sender.account.id,
            amount: payment.amount,
            device_os: sender.device_os.into(),
            client_time: client_time_ms(),
        })
    }

    pub fn receive_half(&self, payment: &Payment) -> Half {
        let receiver = &self.phones[payment.receiver as usize];
        Half::Receive(ReceiveHalf {
            tx_key: payment.tx_key,
            receiver_id: receiver.account.id,
            expected_sender_id: self.phones[payment.expected_sender as usize].account.id,
            expected_amount: payment.expected_amount,
            device_os: receiver.device_os.into(),
            client_time: client_time_ms(),
        })
    }

    /// Runs one planned payment whose tap was at `tap`.
    pub async fn execute(&self, payment: &Payment, tap: Instant) -> PaymentResult {
        let expectations = payment.expectations();
        let mut gots: Vec<Got> = Vec::with_capacity(expectations.len());
        let mut second_half = None;
        match payment.kind {
            Kind::Normal | Kind::SenderMismatch | Kind::AmountMismatch | Kind::Overdraw => {
                let (send, receive, second) = self
                    .both_halves(
                        payment,
                        tap,
                        self.send_half(payment),
                        self.receive_half(payment),
                    )
                    .await;
                second_half = Some(second);
                gots.push(send.got);
                gots.push(receive.got);
            }
            Kind::Expiry => self.expiry(payment, tap, &mut gots).await,
            Kind::WrongApiKey => gots.push(self.wrong_api_key(payment, tap).await),
            Kind::WrongParty => second_half = Some(self.wrong_party(payment, tap, &mut gots).await),
            Kind::Replay => second_half = Some(self.replay(payment, tap, &mut gots).await),
            Kind::IdenticalResubmission => {
                self.identical_resubmission(payment, tap, &mut gots).await
            }
            Kind::DisconnectReconnect => {
                let (receiver_got, sender_got) = self.disconnect_reconnect(payment, tap).await;
                gots.push(receiver_got);
                gots.push(sender_got);
            }
        }
        let finished = Instant::now();
        debug_assert_eq!(gots.len(), expectations.len(), "{:?}", payment.kind);
        let settled = gots.contains(&Got::Answer(Expect::Settled));
        let observations = expectations
            .into_iter()
            .zip(gots)
            .map(|((role, expected), got)| Observation {
                role,
                expected,
                got,
            })
            .collect();
        PaymentResult {
            observations,
            finished,
            second_half,
            settled,
        }
    }

    /// Both phones send their half, each after its jitter; returns the
    /// sender's and receiver's answers and the second half's latency.
    pub(super) async fn both_halves(
        &self,
        payment: &Payment,
        tap: Instant,
        send_half: Half,
        receive_half: Half,
    ) -> (Answer, Answer, Duration) {
        let sender = &self.phones[payment.sender as usize];
        let receiver = &self.phones[payment.receiver as usize];
        let step_timeout = self.step_timeout();
        let sending = async {
            sleep_until(tap + delay(payment.send_delay_us)).await;
            self.note(|| {
                format!(
                    "{} sends {}",
                    self.who(payment.sender),
                    describe_half(&send_half)
                )
            });
            let started = Instant::now();
            (
                started,
                self.submit(sender, send_half.clone(), payment.amount, step_timeout)
                    .await,
            )
        };
        let receiving = async {
            sleep_until(tap + delay(payment.receive_delay_us)).await;
            self.note(|| {
                format!(
                    "{} sends {}",
                    self.who(payment.receiver),
                    describe_half(&receive_half)
                )
            });
            let started = Instant::now();
            (
                started,
                self.submit(receiver, receive_half.clone(), payment.amount, step_timeout)
                    .await,
            )
        };
        let ((send_started, send), (receive_started, receive)) = tokio::join!(sending, receiving);
        self.note_told(payment.sender, &send);
        self.note_told(payment.receiver, &receive);
        let second = if send_started >= receive_started {
            send.at.saturating_duration_since(send_started)
        } else {
            receive.at.saturating_duration_since(receive_started)
        };
        (send, receive, second)
    }

    /// Submits `half` on `phone`'s connection and waits for its final answer
    /// (bounded by `limit` in all). When the replica stops leading or the
    /// connection drops, reconnects to the leader and submits the identical
    /// half again.
    pub(super) async fn submit(
        &self,
        phone: &SimPhone,
        half: Half,
        amount: u64,
        limit: Duration,
    ) -> Answer {
        let _waiting = self.liveness.waiting();
        let deadline = Instant::now() + limit;
        let tx_key = half.tx_key();
        let mut waited = false;
        let mut connection = phone.connection().await;
        let result = loop {
            let (result, accepted) = submit_on(
                &connection.phone,
                half.clone(),
                deadline,
                limit,
                &self.liveness,
            )
            .await;
            waited |= accepted;
            match result {
                Err(error) if error.is_failover() && Instant::now() < deadline => {
                    self.failover.resubmitted.fetch_add(1, Ordering::Relaxed);
                    match tokio::time::timeout_at(
                        deadline,
                        phone.reconnect(&self.connector, &connection, &self.failover),
                    )
                    .await
                    {
                        Ok(Ok(fresh)) => {
                            self.liveness.answered();
                            connection = fresh;
                        }
                        Ok(Err(why)) => break Err(ClientError::Connect(why.to_string())),
                        Err(_) => break Err(ClientError::Timeout(limit)),
                    }
                }
                result => break result,
            }
        };
        let at = Instant::now();
        if let Ok(HalfAnswer::Decided(report)) = &result {
            self.failover
                .told(phone.account.id, report, Some(connection.replica));
        }
        let (got, report) = classify(result, tx_key, amount);
        Answer {
            got,
            report,
            waited,
            at,
        }
    }

    /// Submits `half` on a connection of its own (no reconnection),
    /// authenticated as `account`, and waits for its final answer within
    /// `limit`.
    pub(super) async fn submit_once(
        &self,
        phone: &Phone,
        account: AccountId,
        half: Half,
        amount: u64,
        limit: Duration,
    ) -> Answer {
        let _waiting = self.liveness.waiting();
        let deadline = Instant::now() + limit;
        let tx_key = half.tx_key();
        let (result, waited) = submit_on(phone, half, deadline, limit, &self.liveness).await;
        if let Ok(HalfAnswer::Decided(report)) = &result {
            self.failover.told(account, report, None);
        }
        let at = Instant::now();
        let (got, report) = classify(result, tx_key, amount);
        Answer {
            got,
            report,
            waited,
            at,
        }
    }
}

impl Swarm {
    /// `phone`'s committed balance, asked of the leader (reconnecting if its
    /// replica stopped leading).
    pub async fn balance(&self, phone: &SimPhone) -> Result<u64, ClientError> {
        let _waiting = self.liveness.waiting();
        let limit = self.step_timeout();
        let mut connection = phone.connection().await;
        for _ in 0..4 {
            let answer = tokio::time::timeout(limit, connection.phone.balance()).await;
            if let Ok(answer) = &answer {
                self.liveness.heard(answer);
            }
            match answer {
                Err(_) => return Err(ClientError::Timeout(limit)),
                Ok(Err(error)) if error.is_failover() => {
                    connection = phone
                        .reconnect(&self.connector, &connection, &self.failover)
                        .await
                        .map_err(|why| ClientError::Connect(why.to_string()))?;
                    self.liveness.answered();
                }
                Ok(answer) => return answer,
            }
        }
        Err(ClientError::Connect("no leader answered".into()))
    }
}

/// One submission on `phone` up to its final answer or `deadline`; and
/// whether it was `accepted` first. Notes every answer in `liveness`.
async fn submit_on(
    phone: &Phone,
    half: Half,
    deadline: Instant,
    limit: Duration,
    liveness: &Liveness,
) -> (Result<HalfAnswer, ClientError>, bool) {
    let submitted = tokio::time::timeout_at(deadline, phone.submit(half)).await;
    if let Ok(submitted) = &submitted {
        liveness.heard(submitted);
    }
    match submitted {
        Err(_) => (Err(ClientError::Timeout(limit)), false),
        Ok(Err(error)) => (Err(error), false),
        Ok(Ok(Submitted::Answered(answer))) => (Ok(answer), false),
        Ok(Ok(Submitted::Accepted(pending))) => {
            match tokio::time::timeout_at(deadline, pending.answer()).await {
                Err(_) => (Err(ClientError::Timeout(limit)), true),
                Ok(answer) => {
                    liveness.heard(&answer);
                    (answer, true)
                }
            }
        }
    }
}

/// Turns the node's answer into an observation, checking that an outcome
/// names the right key (and, when settled, the right amount).
pub(super) fn classify(
    result: Result<HalfAnswer, ClientError>,
    tx_key: tapledger_protocol::TxKey,
    amount: u64,
) -> (Got, Option<OutcomeReport>) {
    match result {
        Ok(HalfAnswer::Decided(report)) => {
            if report.tx_key != tx_key {
                let why = format!("an outcome for {} arrived for {tx_key}", report.tx_key);
                return (Got::Failed(why), Some(report));
            }
            let got = match (report.status, report.code) {
                (OutcomeStatus::Settled, _) if report.amount == Some(amount) => {
                    Got::Answer(Expect::Settled)
                }
                (OutcomeStatus::Settled, _) => {
                    Got::Failed(format!("settled {:?} instead of {amount}", report.amount))
                }
                (OutcomeStatus::Rejected, Some(code)) => Got::Answer(Expect::Rejected(code)),
                (OutcomeStatus::Rejected, None) => {
                    Got::Failed("a rejection without a code".to_owned())
                }
            };
            (got, Some(report))
        }
        Ok(HalfAnswer::Refused { code, .. }) => (Got::Answer(Expect::Refused(code)), None),
        Err(ClientError::Node { code, .. }) => (Got::Answer(Expect::Error(code)), None),
        Err(error) => (Got::Failed(error.to_string()), None),
    }
}

pub(super) fn describe_half(half: &Half) -> String {
    match half {
        Half::Send(send) => format!(
            "send half {}: account {} pays {}",
            send.tx_key, send.sender_id, send.amount
        ),
        Half::Receive(receive) => format!(
            "receive half {}: account {} expects {} from account {}",
            receive.tx_key,
            receive.receiver_id,
            receive.expected_amount,
            receive.expected_sender_id
        ),
    }
}

pub(super) fn describe_answer(answer: &Answer) -> String {
    let mut text = String::new();
    if answer.waited {
        text.push_str("accepted (durable, waiting), then ");
    }
    text.push_str(&answer.got.describe());
    if let Some(report) = &answer.report
        && let Some(balance) = report.balance_after
    {
        text.push_str(&format!(", balance after {balance}"));
    }
    text
}

pub(super) fn delay(micros: u32) -> Duration {
    Duration::from_micros(u64::from(micros))
}

pub(super) async fn sleep_until(deadline: Instant) {
    if Instant::now() < deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// The phone's clock in milliseconds since the epoch (recorded, never trusted).
fn client_time_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
