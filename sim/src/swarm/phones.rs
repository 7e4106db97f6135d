//! The phones of the swarm and what they do for one planned payment: build
//! the halves, send them after the tap's jitter, wait for the node's answers,
//! and turn each answer into an observation to compare with the plan.
//!
//! Each phone keeps one authenticated QUIC connection for the whole run; a
//! fault that needs another connection (a wrong API key, a dropped connection)
//! opens and closes its own, so the phone's other payments are undisturbed.
//! Every wait is bounded by the step timeout (expiry: `half_ttl` on top).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tapledger_node::client::Session;
use tapledger_node::{ApiCredentials, ClientError, HalfAnswer, Phone, Submitted};
use tapledger_protocol::{
    Half, OutcomeReport, OutcomeStatus, QueryStatus, ReceiveHalf, SendHalf, Side,
};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::target::{Account, Connector, close_bounded};
use super::workload::{Expect, Kind, Payment};

/// Payments one phone takes part in at once. The node lets an account keep
/// 64 lone halves waiting (32 per matcher shard) and a connection 256
/// requests in flight; a payment holds at most three of either per phone.
pub const PAYMENTS_PER_PHONE_IN_FLIGHT: usize = 16;

/// Operating systems the phones report (recorded by the node for analysts).
const DEVICE_OS: [&str; 4] = ["ios 18.3", "android 15", "ios 17.6", "android 14"];

/// One simulated phone: its account and its long-lived connection.
pub struct SimPhone {
    pub account: Account,
    pub phone: Phone,
    pub device_os: &'static str,
    /// Slots for payments in flight (see [`PAYMENTS_PER_PHONE_IN_FLIGHT`]).
    pub slots: Arc<Semaphore>,
}

impl SimPhone {
    pub fn new(index: usize, account: Account, phone: Phone) -> SimPhone {
        SimPhone {
            account,
            phone,
            device_os: DEVICE_OS[index % DEVICE_OS.len()],
            slots: Arc::new(Semaphore::new(PAYMENTS_PER_PHONE_IN_FLIGHT)),
        }
    }
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
struct Answer {
    got: Got,
    report: Option<OutcomeReport>,
    /// The half was `accepted` before its outcome came.
    waited: bool,
    at: Instant,
}

/// The connected swarm: every phone, the connector for extra connections,
/// and the node's parameters.
pub struct Swarm {
    pub connector: Arc<Connector>,
    pub phones: Vec<SimPhone>,
    pub session: Session,
    /// When set, every step is written here for people to read (`scenario`).
    pub transcript: Option<Mutex<Vec<String>>>,
}

impl Swarm {
    fn note(&self, line: impl FnOnce() -> String) {
        if let Some(transcript) = &self.transcript {
            transcript.lock().expect("transcript lock").push(line());
        }
    }

    fn who(&self, phone: u32) -> String {
        format!(
            "phone {phone} (account {})",
            self.phones[phone as usize].account.id
        )
    }

    fn half_ttl(&self) -> Duration {
        Duration::from_millis(self.session.half_ttl_ms)
    }

    fn step_timeout(&self) -> Duration {
        self.connector.step_timeout
    }

    pub fn send_half(&self, payment: &Payment) -> Half {
        let sender = &self.phones[payment.sender as usize];
        Half::Send(SendHalf {
            tx_key: payment.tx_key,
            sender_id: sender.account.id,
            amount: payment.amount,
            device_os: sender.device_os.to_owned(),
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
            device_os: receiver.device_os.to_owned(),
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
            Kind::Expiry => {
                let (phone, half) = match payment.lone_side {
                    Side::Send => (payment.sender, self.send_half(payment)),
                    Side::Receive => (payment.receiver, self.receive_half(payment)),
                };
                sleep_until(tap + delay(payment.send_delay_us)).await;
                self.note(|| {
                    format!(
                        "{} sends {}; its partner never will",
                        self.who(phone),
                        describe_half(&half)
                    )
                });
                let limit = self.half_ttl() + self.step_timeout();
                let answer = self
                    .submit(
                        &self.phones[phone as usize].phone,
                        half,
                        payment.amount,
                        limit,
                    )
                    .await;
                self.note(|| {
                    format!(
                        "  {} is told: {}",
                        self.who(phone),
                        describe_answer(&answer)
                    )
                });
                gots.push(answer.got);
            }
            Kind::WrongApiKey => gots.push(self.wrong_api_key(payment, tap).await),
            Kind::WrongParty => {
                sleep_until(tap).await;
                // The receiver's phone submits the sender's half.
                let forged = self.send_half(payment);
                let receiver = &self.phones[payment.receiver as usize];
                self.note(|| {
                    format!(
                        "{} submits the sender's {}",
                        self.who(payment.receiver),
                        describe_half(&forged)
                    )
                });
                let answer = self
                    .submit(&receiver.phone, forged, payment.amount, self.step_timeout())
                    .await;
                self.note(|| {
                    format!(
                        "  {} is told: {}",
                        self.who(payment.receiver),
                        describe_answer(&answer)
                    )
                });
                gots.push(answer.got);
                let (send, receive, second) = self
                    .both_halves(
                        payment,
                        Instant::now(),
                        self.send_half(payment),
                        self.receive_half(payment),
                    )
                    .await;
                second_half = Some(second);
                gots.push(send.got);
                gots.push(receive.got);
            }
            Kind::Replay => {
                let send_half = self.send_half(payment);
                let receive_half = self.receive_half(payment);
                let (send, receive, second) = self
                    .both_halves(payment, tap, send_half.clone(), receive_half.clone())
                    .await;
                second_half = Some(second);
                gots.push(send.got.clone());
                gots.push(receive.got);
                // The identical half again: the same outcome, nothing moves.
                let sender = &self.phones[payment.sender as usize];
                self.note(|| {
                    format!(
                        "{} replays its identical {}",
                        self.who(payment.sender),
                        describe_half(&send_half)
                    )
                });
                let replay = self
                    .submit(
                        &sender.phone,
                        send_half,
                        payment.amount,
                        self.step_timeout(),
                    )
                    .await;
                self.note(|| {
                    format!(
                        "  {} is told: {}",
                        self.who(payment.sender),
                        describe_answer(&replay)
                    )
                });
                let replay_got = match (&send.report, &replay.report) {
                    (Some(first), Some(again)) if first != again => Got::Failed(format!(
                        "the replay's outcome differs from the first: {again:?} vs {first:?}"
                    )),
                    _ => replay.got,
                };
                gots.push(replay_got);
                // A different half under the decided key.
                let mut different = receive_half;
                if let Half::Receive(half) = &mut different {
                    half.client_time += 1;
                }
                let receiver = &self.phones[payment.receiver as usize];
                self.note(|| {
                    format!(
                        "{} sends a different {} under the used key",
                        self.who(payment.receiver),
                        describe_half(&different)
                    )
                });
                let answer = self
                    .submit(
                        &receiver.phone,
                        different,
                        payment.amount,
                        self.step_timeout(),
                    )
                    .await;
                self.note(|| {
                    format!(
                        "  {} is told: {}",
                        self.who(payment.receiver),
                        describe_answer(&answer)
                    )
                });
                gots.push(answer.got);
            }
            Kind::IdenticalResubmission => {
                let send_half = self.send_half(payment);
                let receive_half = self.receive_half(payment);
                let sender = &self.phones[payment.sender as usize];
                let receiver = &self.phones[payment.receiver as usize];
                let step_timeout = self.step_timeout();
                let sending = async {
                    sleep_until(tap + delay(payment.send_delay_us)).await;
                    self.note(|| {
                        format!(
                            "{} sends {} twice",
                            self.who(payment.sender),
                            describe_half(&send_half)
                        )
                    });
                    tokio::join!(
                        self.submit(
                            &sender.phone,
                            send_half.clone(),
                            payment.amount,
                            step_timeout
                        ),
                        self.submit(
                            &sender.phone,
                            send_half.clone(),
                            payment.amount,
                            step_timeout
                        ),
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
                    self.submit(
                        &receiver.phone,
                        receive_half.clone(),
                        payment.amount,
                        step_timeout,
                    )
                    .await
                };
                let ((first, again), receive) = tokio::join!(sending, receiving);
                for (who, answer) in [
                    (payment.sender, &first),
                    (payment.sender, &again),
                    (payment.receiver, &receive),
                ] {
                    self.note(|| {
                        format!("  {} is told: {}", self.who(who), describe_answer(answer))
                    });
                }
                gots.push(first.got);
                gots.push(again.got);
                gots.push(receive.got);
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
    async fn both_halves(
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
                self.submit(
                    &sender.phone,
                    send_half.clone(),
                    payment.amount,
                    step_timeout,
                )
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
                self.submit(
                    &receiver.phone,
                    receive_half.clone(),
                    payment.amount,
                    step_timeout,
                )
                .await,
            )
        };
        let ((send_started, send), (receive_started, receive)) = tokio::join!(sending, receiving);
        self.note(|| {
            format!(
                "  {} is told: {}",
                self.who(payment.sender),
                describe_answer(&send)
            )
        });
        self.note(|| {
            format!(
                "  {} is told: {}",
                self.who(payment.receiver),
                describe_answer(&receive)
            )
        });
        let second = if send_started >= receive_started {
            send.at.saturating_duration_since(send_started)
        } else {
            receive.at.saturating_duration_since(receive_started)
        };
        (send, receive, second)
    }

    /// Submits `half` on `phone` and waits for its final answer (bounded by
    /// `limit` in all).
    async fn submit(&self, phone: &Phone, half: Half, amount: u64, limit: Duration) -> Answer {
        let deadline = Instant::now() + limit;
        let tx_key = half.tx_key();
        let (result, waited) = match tokio::time::timeout_at(deadline, phone.submit(half)).await {
            Err(_) => (Err(ClientError::Timeout(limit)), false),
            Ok(Err(error)) => (Err(error), false),
            Ok(Ok(Submitted::Answered(answer))) => (Ok(answer), false),
            Ok(Ok(Submitted::Accepted(pending))) => {
                match tokio::time::timeout_at(deadline, pending.answer()).await {
                    Err(_) => (Err(ClientError::Timeout(limit)), true),
                    Ok(answer) => (answer, true),
                }
            }
        };
        let at = Instant::now();
        let (got, report) = classify(result, tx_key, amount);
        Answer {
            got,
            report,
            waited,
            at,
        }
    }

    async fn wrong_api_key(&self, payment: &Payment, tap: Instant) -> Got {
        sleep_until(tap).await;
        let account = &self.phones[payment.sender as usize].account;
        let wrong_key = ApiCredentials::generate().key;
        self.note(|| {
            format!(
                "a new connection authenticates as account {} with a wrong API key",
                account.id
            )
        });
        let mut phone = match self.connector.connect().await {
            Ok(phone) => phone,
            Err(error) => return Got::Failed(error.to_string()),
        };
        let got = match tokio::time::timeout(
            self.step_timeout(),
            phone.authenticate(account.id, &wrong_key),
        )
        .await
        {
            Err(_) => Got::Failed(format!("no answer within {:?}", self.step_timeout())),
            Ok(Ok(_)) => Got::Failed("the node accepted a wrong API key".to_owned()),
            Ok(Err(ClientError::Node { code, .. })) => Got::Answer(Expect::Error(code)),
            Ok(Err(error)) => Got::Failed(error.to_string()),
        };
        self.note(|| format!("  the node answers: {}", got.describe()));
        close_bounded(phone).await;
        got
    }

    /// The sender submits on a connection it drops right after `accepted`;
    /// the receiver's half decides the payment; the sender reconnects and
    /// learns the outcome. Returns the receiver's and the sender's results.
    async fn disconnect_reconnect(&self, payment: &Payment, tap: Instant) -> (Got, Got) {
        sleep_until(tap).await;
        let sender = &self.phones[payment.sender as usize];
        let receiver = &self.phones[payment.receiver as usize];
        let send_half = self.send_half(payment);
        let step_timeout = self.step_timeout();
        let failed = |why: String| (Got::Failed(why.clone()), Got::Failed(why));

        let temporary = match self
            .connector
            .connect_as(sender.account.id, &sender.account.key)
            .await
        {
            Ok((phone, _)) => phone,
            Err(error) => return failed(error.to_string()),
        };
        self.note(|| {
            format!(
                "{} sends {} on a second connection",
                self.who(payment.sender),
                describe_half(&send_half)
            )
        });
        let submitted =
            tokio::time::timeout(step_timeout, temporary.submit(send_half.clone())).await;
        close_bounded(temporary).await;
        match submitted {
            Ok(Ok(Submitted::Accepted(_))) => {
                self.note(|| {
                    "  it is accepted; the phone drops that connection at once".to_owned()
                });
            }
            Ok(Ok(Submitted::Answered(answer))) => {
                return failed(format!(
                    "expected accepted before the partner, got {answer:?}"
                ));
            }
            Ok(Err(error)) => return failed(error.to_string()),
            Err(_) => return failed(format!("no answer within {step_timeout:?}")),
        }

        let receive_half = self.receive_half(payment);
        self.note(|| {
            format!(
                "{} sends {}",
                self.who(payment.receiver),
                describe_half(&receive_half)
            )
        });
        let receive = self
            .submit(&receiver.phone, receive_half, payment.amount, step_timeout)
            .await;
        self.note(|| {
            format!(
                "  {} is told: {}",
                self.who(payment.receiver),
                describe_answer(&receive)
            )
        });

        let (again, _) = match self
            .connector
            .connect_as(sender.account.id, &sender.account.key)
            .await
        {
            Ok(connected) => connected,
            Err(error) => return (receive.got, Got::Failed(error.to_string())),
        };
        let sender_got = if payment.by_query {
            self.note(|| {
                format!(
                    "{} reconnects and asks for the outcome of {}",
                    self.who(payment.sender),
                    payment.tx_key
                )
            });
            match tokio::time::timeout(step_timeout, again.query_outcome(payment.tx_key)).await {
                Err(_) => Got::Failed(format!("no answer within {step_timeout:?}")),
                Ok(Err(error)) => classify(Err(error), payment.tx_key, payment.amount).0,
                Ok(Ok((QueryStatus::Decided, Some(report)))) => {
                    classify(
                        Ok(HalfAnswer::Decided(report)),
                        payment.tx_key,
                        payment.amount,
                    )
                    .0
                }
                Ok(Ok((status, _))) => {
                    Got::Failed(format!("query answered {status:?} after the outcome"))
                }
            }
        } else {
            self.note(|| {
                format!(
                    "{} reconnects and resubmits its identical half",
                    self.who(payment.sender)
                )
            });
            self.submit(&again, send_half, payment.amount, step_timeout)
                .await
                .got
        };
        self.note(|| {
            format!(
                "  {} is told: {}",
                self.who(payment.sender),
                sender_got.describe()
            )
        });
        close_bounded(again).await;
        (receive.got, sender_got)
    }
}

/// Turns the node's answer into an observation, checking that an outcome
/// names the right key (and, when settled, the right amount).
fn classify(
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

fn describe_half(half: &Half) -> String {
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

fn describe_answer(answer: &Answer) -> String {
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

fn delay(micros: u32) -> Duration {
    Duration::from_micros(u64::from(micros))
}

async fn sleep_until(deadline: Instant) {
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
