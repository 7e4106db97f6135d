//! `submit_half`: one phone's half of a payment. The first answer is
//! `accepted` (durable, waiting for the partner; the outcome is pushed
//! later on the same stream), or at once the key's `outcome` or a
//! `refused`.
//!
//! A half is not a task: the stream's reader queues the halves of one read
//! ([`Queued`]) and hands them to the ledger in one
//! [`Ledger::submit_batch`](tapledger_actors::Ledger::submit_batch)
//! ([`submit`]); every half's fate comes back on the stream's one report
//! channel, and the stream's writer turns the reports into answers through
//! its [`Answerer`] and writes them with whatever else is queued (no task
//! and no channel hop between a report and its answer's write). The halves
//! still owed an answer ([`HalvesInFlight`]) hold their places among the
//! connection's requests in flight. Spans and metric look-ups are per stream, not per half.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tapledger_actors::{BatchHalf, Heard, Report, ReportSender, Resolution};
use tapledger_protocol::{
    AccountId, ErrorCode, Half, NodeMessage, OutcomeReport, RequestId, TxKey,
};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::{RequestContext, internal_answer, stopping};
use crate::server::Shared;
use crate::telemetry::{HalfFate, HalfHistograms};

/// Reports turned into answers per turn of the [`Answerer`], so that one
/// busy stream's writer works in bounded steps.
const REPORTS_PER_TURN_MAX: usize = 256;

const SHUTTING_DOWN_DETAIL: &str =
    "node shutting down; the half is durable and pending: reconnect and query the outcome";

/// A half that passed the checks every request needs, waiting for the end
/// of its read to be submitted with the others.
pub(crate) struct Queued {
    request_id: RequestId,
    account: AccountId,
    half: Half,
    permit: OwnedSemaphorePermit,
}

/// A submitted half whose final answer is still owed.
struct Waiting {
    request_id: RequestId,
    account: AccountId,
    tx_key: TxKey,
    /// When its read arrived: the start of its `half_durable_seconds`.
    started: Instant,
    /// `accepted` has been answered; the outcome follows.
    accepted: bool,
    /// Its place among the connection's requests in flight, given back with
    /// the final answer.
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Table {
    /// By the tag the half was submitted under; a tag is never reused.
    waiting: HashMap<u64, Waiting>,
    next_tag: u64,
}

/// One stream's submitted halves still owed a final answer.
#[derive(Default)]
pub(crate) struct HalvesInFlight {
    table: Mutex<Table>,
}

impl HalvesInFlight {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table holds no invariant a panicking holder could break halfway.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_empty(&self) -> bool {
        self.lock().waiting.is_empty()
    }
}

pub(super) fn queue(
    request_id: RequestId,
    account: AccountId,
    half: Half,
    permit: OwnedSemaphorePermit,
) -> Queued {
    Queued {
        request_id,
        account,
        half,
        permit,
    }
}

/// Hands the halves of one read to the ledger in one batch; their fates
/// reach `sink`, which the stream's [`Answerer`] reads.
pub(crate) fn submit(
    context: &RequestContext,
    in_flight: &HalvesInFlight,
    queued: Vec<Queued>,
    sink: &ReportSender,
    started: Instant,
) {
    if queued.is_empty() {
        return;
    }
    context
        .shared
        .counters
        .halves_received
        .fetch_add(queued.len() as u64, Ordering::Relaxed);
    let mut batch = Vec::with_capacity(queued.len());
    {
        let mut table = in_flight.lock();
        for queued in queued {
            let tag = table.next_tag;
            table.next_tag += 1;
            let waiting = Waiting {
                request_id: queued.request_id,
                account: queued.account,
                tx_key: queued.half.tx_key(),
                started,
                accepted: false,
                _permit: queued.permit,
            };
            table.waiting.insert(tag, waiting);
            batch.push(BatchHalf {
                tag,
                submitter: queued.account,
                half: queued.half,
            });
        }
    }
    tracing::debug!(halves = batch.len(), "halves submitted");
    context.shared.ledger.submit_batch(batch, sink);
}

/// One stream's halves in flight and the reports that answer them: the
/// stream's writer waits on [`Answerer::next`] beside its outbox and writes
/// the answers it leaves, in the order the reports arrive (so `accepted`
/// precedes its `outcome`). Done once the reader is done and no half is
/// owed an answer, or the ledger is gone. At shutdown each accepted half is
/// answered 1101 at once (it stays durable and pending).
pub(crate) struct Answerer {
    shared: Arc<Shared>,
    in_flight: Arc<HalvesInFlight>,
    reports: mpsc::UnboundedReceiver<Report>,
    reader_done: oneshot::Receiver<()>,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    histograms: HalfHistograms,
    stopped: bool,
    reading: bool,
    turn: Vec<Report>,
    /// Answers made and not yet taken by the writer.
    pub(crate) answers: Vec<NodeMessage>,
}

impl Answerer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        in_flight: Arc<HalvesInFlight>,
        reports: mpsc::UnboundedReceiver<Report>,
        reader_done: oneshot::Receiver<()>,
    ) -> Answerer {
        let stop = Box::pin(stopping(shared.shutdown.clone()));
        Answerer {
            shared,
            in_flight,
            reports,
            reader_done,
            stop,
            histograms: HalfHistograms::new(),
            stopped: false,
            reading: true,
            turn: Vec::with_capacity(REPORTS_PER_TURN_MAX),
            answers: Vec::new(),
        }
    }

    /// Waits for reports (or the shutdown, or the reader's end) and turns
    /// them into [`Answerer::answers`]; false once no half of this stream
    /// will be answered any more. Cancel-safe: nothing is taken before the
    /// wait ends.
    pub(crate) async fn next(&mut self) -> bool {
        if self.is_done() {
            return false;
        }
        tokio::select! {
            received = self.reports.recv_many(&mut self.turn, REPORTS_PER_TURN_MAX) => {
                if received == 0 {
                    return false;
                }
                self.answer_turn();
            }
            _ = &mut self.stop, if !self.stopped => {
                self.stopped = true;
                shut_down_accepted(&mut self.in_flight.lock(), &mut self.answers);
            }
            _ = &mut self.reader_done, if self.reading => self.reading = false,
        }
        !self.is_done()
    }

    /// Turns the reports already queued into answers, without waiting.
    pub(crate) fn ready(&mut self) {
        while self.turn.len() < REPORTS_PER_TURN_MAX {
            match self.reports.try_recv() {
                Ok(report) => self.turn.push(report),
                Err(_) => break,
            }
        }
        self.answer_turn();
    }

    fn is_done(&self) -> bool {
        !self.reading && self.in_flight.is_empty()
    }

    fn answer_turn(&mut self) {
        if self.turn.is_empty() {
            return;
        }
        let mut table = self.in_flight.lock();
        let answering = Answering {
            shared: &self.shared,
            histograms: &self.histograms,
            stopped: self.stopped,
        };
        for report in self.turn.drain(..) {
            answering.report(&mut table, report, &mut self.answers);
        }
    }
}

/// Answers every accepted half 1101 and forgets it (its waiter in the
/// ledger lingers until the ledger stops).
fn shut_down_accepted(table: &mut Table, answers: &mut Vec<NodeMessage>) {
    let mut accepted: Vec<(u64, RequestId)> = table
        .waiting
        .iter()
        .filter(|(_, waiting)| waiting.accepted)
        .map(|(tag, waiting)| (*tag, waiting.request_id))
        .collect();
    // In submission order, as the halves arrived.
    accepted.sort_unstable();
    for (tag, request_id) in accepted {
        table.waiting.remove(&tag);
        answers.push(shutting_down(request_id));
    }
}

fn shutting_down(request_id: RequestId) -> NodeMessage {
    NodeMessage::error(
        Some(request_id),
        ErrorCode::ShuttingDown,
        SHUTTING_DOWN_DETAIL,
    )
}

/// What turning one report into answers needs.
struct Answering<'a> {
    shared: &'a Shared,
    histograms: &'a HalfHistograms,
    /// The node is shutting down: a half accepted now is answered 1101 too.
    stopped: bool,
}

impl Answering<'_> {
    fn report(&self, table: &mut Table, report: Report, answers: &mut Vec<NodeMessage>) {
        let tag = report.tag;
        // A half answered at shutdown may still hear from the ledger.
        let Some(waiting) = table.waiting.get_mut(&tag) else {
            return;
        };
        match report.heard {
            Heard::Pending => {
                if waiting.accepted {
                    return;
                }
                waiting.accepted = true;
                self.histograms.record(waiting.started, HalfFate::Pending);
                tracing::debug!(tx_key = %waiting.tx_key, "half pending");
                answers.push(NodeMessage::Accepted {
                    request_id: waiting.request_id,
                    tx_key: waiting.tx_key,
                });
                if self.stopped {
                    answers.push(shutting_down(waiting.request_id));
                    table.waiting.remove(&tag);
                }
            }
            Heard::Resolved(result) => {
                let Some(waiting) = table.waiting.remove(&tag) else {
                    return;
                };
                answers.push(self.resolved(&waiting, result));
            }
        }
    }

    fn resolved(
        &self,
        waiting: &Waiting,
        result: Result<Resolution, tapledger_actors::LedgerError>,
    ) -> NodeMessage {
        let resolution = match result {
            Ok(resolution) => resolution,
            Err(error) => return internal_answer(self.shared, waiting.request_id, &error),
        };
        if !waiting.accepted {
            self.histograms
                .record(waiting.started, fate_of(&resolution));
        }
        match &resolution {
            Resolution::Final(outcome) => tracing::debug!(
                tx_key = %waiting.tx_key,
                settled = outcome.is_settled(),
                code = outcome.code().map(|code| code.code()),
                "half resolved"
            ),
            Resolution::Refused(code) => {
                tracing::debug!(tx_key = %waiting.tx_key, code = code.code(), "half refused")
            }
        }
        resolution_message(
            waiting.request_id,
            waiting.tx_key,
            waiting.account,
            &resolution,
        )
    }
}

/// How a half's first answer counts in the metrics.
fn fate_of(resolution: &Resolution) -> HalfFate {
    match resolution {
        Resolution::Final(_) => HalfFate::Decided,
        Resolution::Refused(code) => HalfFate::Refused(*code),
    }
}

/// The answer a phone gets once its half is resolved.
fn resolution_message(
    request_id: RequestId,
    tx_key: TxKey,
    account: AccountId,
    resolution: &Resolution,
) -> NodeMessage {
    match resolution {
        Resolution::Final(outcome) => NodeMessage::Outcome {
            request_id,
            report: OutcomeReport::for_party(outcome, account),
        },
        Resolution::Refused(code) => NodeMessage::refused(request_id, tx_key, *code),
    }
}
