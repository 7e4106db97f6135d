//! The fault kinds of the swarm, one method each: what the phones do and
//! the answers they collect, in the order `Payment::expectations` lists them.
//! The honest flow (both halves after the tap's jitter) is
//! `Swarm::both_halves` in `phones`; faults build on it.
//!
//! Nothing here decides what is expected: the plan does. These methods only
//! act and observe, every wait bounded like the honest flow's.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tapledger_node::{ApiCredentials, ClientError, HalfAnswer, Submitted};
use tapledger_protocol::{Half, QueryStatus, Side};
use tokio::time::Instant;

use super::phones::{Got, SimPhone, Swarm, classify, delay, describe_half, sleep_until};
use super::target::close_bounded;
use super::workload::{Expect, Payment};

impl Swarm {
    /// One half alone; its phone waits through `half_ttl` for the 500.
    pub(super) async fn expiry(&self, payment: &Payment, tap: Instant, gots: &mut Vec<Got>) {
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
            .submit(&self.phones[phone as usize], half, payment.amount, limit)
            .await;
        self.note_told(phone, &answer);
        gots.push(answer.got);
    }

    /// The receiver's phone submits the sender's half (refused 620), then the
    /// payment goes ahead. Returns the second half's latency.
    pub(super) async fn wrong_party(
        &self,
        payment: &Payment,
        tap: Instant,
        gots: &mut Vec<Got>,
    ) -> Duration {
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
            .submit(receiver, forged, payment.amount, self.step_timeout())
            .await;
        self.note_told(payment.receiver, &answer);
        gots.push(answer.got);
        let (send, receive, second) = self
            .both_halves(
                payment,
                Instant::now(),
                self.send_half(payment),
                self.receive_half(payment),
            )
            .await;
        gots.push(send.got);
        gots.push(receive.got);
        second
    }

    /// Settles, then the sender replays its identical half and the receiver
    /// sends a different half under the decided key. Returns the second
    /// half's latency.
    pub(super) async fn replay(
        &self,
        payment: &Payment,
        tap: Instant,
        gots: &mut Vec<Got>,
    ) -> Duration {
        let send_half = self.send_half(payment);
        let receive_half = self.receive_half(payment);
        let (send, receive, second) = self
            .both_halves(payment, tap, send_half.clone(), receive_half.clone())
            .await;
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
            .submit(sender, send_half, payment.amount, self.step_timeout())
            .await;
        self.note_told(payment.sender, &replay);
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
            .submit(receiver, different, payment.amount, self.step_timeout())
            .await;
        self.note_told(payment.receiver, &answer);
        gots.push(answer.got);
        second
    }

    /// The sender submits its identical half twice, concurrently.
    pub(super) async fn identical_resubmission(
        &self,
        payment: &Payment,
        tap: Instant,
        gots: &mut Vec<Got>,
    ) {
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
                self.submit(sender, send_half.clone(), payment.amount, step_timeout),
                self.submit(sender, send_half.clone(), payment.amount, step_timeout),
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
            self.submit(receiver, receive_half.clone(), payment.amount, step_timeout)
                .await
        };
        let ((first, again), receive) = tokio::join!(sending, receiving);
        for (who, answer) in [
            (payment.sender, &first),
            (payment.sender, &again),
            (payment.receiver, &receive),
        ] {
            self.note_told(who, answer);
        }
        gots.push(first.got);
        gots.push(again.got);
        gots.push(receive.got);
    }

    pub(super) async fn wrong_api_key(&self, payment: &Payment, tap: Instant) -> Got {
        sleep_until(tap).await;
        let account = &self.phones[payment.sender as usize].account;
        let wrong_key = ApiCredentials::generate().key;
        self.note(|| {
            format!(
                "a new connection authenticates as account {} with a wrong API key",
                account.id
            )
        });
        // Finding the leader authenticates: with a wrong key the leader
        // refuses it (1012), whichever replica answers first.
        let waiting = self.liveness.waiting();
        let connected = tokio::time::timeout(
            self.step_timeout() * 4,
            self.connector
                .connect_leader(Some((account.id, &wrong_key))),
        )
        .await;
        drop(waiting);
        if let Ok(connected) = &connected {
            self.liveness.heard(connected);
        }
        let got = match connected {
            Err(_) => Got::Failed(format!("no answer within {:?}", self.step_timeout() * 4)),
            Ok(Ok((phone, _, _))) => {
                close_bounded(phone).await;
                Got::Failed("the node accepted a wrong API key".to_owned())
            }
            Ok(Err(ClientError::Node { code, .. })) => Got::Answer(Expect::Error(code)),
            Ok(Err(error)) => Got::Failed(error.to_string()),
        };
        self.note(|| format!("  the node answers: {}", got.describe()));
        got
    }

    /// The sender submits on a connection it drops right after `accepted`;
    /// the receiver's half decides the payment; the sender reconnects and
    /// learns the outcome. Returns the receiver's and the sender's results.
    pub(super) async fn disconnect_reconnect(&self, payment: &Payment, tap: Instant) -> (Got, Got) {
        sleep_until(tap).await;
        let sender = &self.phones[payment.sender as usize];
        let receiver = &self.phones[payment.receiver as usize];
        let send_half = self.send_half(payment);
        let step_timeout = self.step_timeout();
        let failed = |why: String| (Got::Failed(why.clone()), Got::Failed(why));

        self.note(|| {
            format!(
                "{} sends {} on a second connection",
                self.who(payment.sender),
                describe_half(&send_half)
            )
        });
        if let Err(why) = self.submit_and_drop(sender, &send_half, step_timeout).await {
            return failed(why);
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
            .submit(receiver, receive_half, payment.amount, step_timeout)
            .await;
        self.note_told(payment.receiver, &receive);

        let again = match self.connect_as(sender).await {
            Ok(phone) => phone,
            Err(error) => return (receive.got, Got::Failed(error.to_string())),
        };
        let (sender_got, again) = if payment.by_query {
            match self
                .query_reconnected(payment, sender, again, step_timeout)
                .await
            {
                Ok(answered) => answered,
                Err(why) => return (receive.got, Got::Failed(why)),
            }
        } else {
            self.note(|| {
                format!(
                    "{} reconnects and resubmits its identical half",
                    self.who(payment.sender)
                )
            });
            let got = self
                .submit_once(
                    &again,
                    sender.account.id,
                    send_half,
                    payment.amount,
                    step_timeout,
                )
                .await
                .got;
            (got, again)
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

    /// The sender's half on a connection of its own, closed right after the
    /// answer; after a change of leader, sent again on a new connection to
    /// the new leader. `Err` says why it was not `accepted`.
    async fn submit_and_drop(
        &self,
        sender: &SimPhone,
        send_half: &Half,
        step_timeout: Duration,
    ) -> Result<(), String> {
        // A change of leader between connecting and the answer: connect to
        // the new leader and send the identical half again.
        let mut attempts = 0;
        let waiting = self.liveness.waiting();
        let submitted = loop {
            attempts += 1;
            let temporary = match self.connect_as(sender).await {
                Ok(phone) => phone,
                Err(error) => return Err(error.to_string()),
            };
            let submitted =
                tokio::time::timeout(step_timeout, temporary.submit(send_half.clone())).await;
            if let Ok(submitted) = &submitted {
                self.liveness.heard(submitted);
            }
            close_bounded(temporary).await;
            match submitted {
                Ok(Err(error)) if error.is_failover() && attempts < 4 => {
                    self.failover.resubmitted.fetch_add(1, Ordering::Relaxed);
                }
                submitted => break submitted,
            }
        };
        drop(waiting);
        match submitted {
            Ok(Ok(Submitted::Accepted(_))) => {
                self.note(|| {
                    "  it is accepted; the phone drops that connection at once".to_owned()
                });
                Ok(())
            }
            Ok(Ok(Submitted::Answered(answer))) => Err(format!(
                "expected accepted before the partner, got {answer:?}"
            )),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {step_timeout:?}")),
        }
    }

    /// The sender, reconnected as `again`, asks for the outcome of its
    /// payment (on a new connection to the new leader after a change of
    /// leader). Returns what it was told and the connection it asked on;
    /// `Err` when it could not reconnect.
    async fn query_reconnected(
        &self,
        payment: &Payment,
        sender: &SimPhone,
        mut again: tapledger_node::Phone,
        step_timeout: Duration,
    ) -> Result<(Got, tapledger_node::Phone), String> {
        self.note(|| {
            format!(
                "{} reconnects and asks for the outcome of {}",
                self.who(payment.sender),
                payment.tx_key
            )
        });
        let mut asked = 0;
        let waiting = self.liveness.waiting();
        let queried = loop {
            asked += 1;
            let queried =
                tokio::time::timeout(step_timeout, again.query_outcome(payment.tx_key)).await;
            if let Ok(queried) = &queried {
                self.liveness.heard(queried);
            }
            match queried {
                Ok(Err(error)) if error.is_failover() && asked < 4 => {
                    close_bounded(again).await;
                    again = match self.connect_as(sender).await {
                        Ok(phone) => phone,
                        Err(error) => return Err(error.to_string()),
                    };
                }
                queried => break queried,
            }
        };
        drop(waiting);
        let got = match queried {
            Err(_) => Got::Failed(format!("no answer within {step_timeout:?}")),
            Ok(Err(error)) => classify(Err(error), payment.tx_key, payment.amount).0,
            Ok(Ok((QueryStatus::Decided, Some(report)))) => {
                self.failover.told(sender.account.id, &report, None);
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
        };
        Ok((got, again))
    }

    /// A connection of its own for `phone`'s account, counted as a request
    /// waiting for the node until it is made.
    async fn connect_as(&self, phone: &SimPhone) -> anyhow::Result<tapledger_node::Phone> {
        let _waiting = self.liveness.waiting();
        let (connection, _) = self
            .connector
            .connect_as(phone.account.id, &phone.account.key)
            .await?;
        self.liveness.answered();
        Ok(connection)
    }
}
