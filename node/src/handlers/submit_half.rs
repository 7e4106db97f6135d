//! `submit_half`: one phone's half of a payment. The first answer is
//! `accepted` (durable, waiting for the partner; the outcome is pushed
//! later on the same stream), or at once the key's `outcome` or a
//! `refused`. Runs as a task: a half may wait minutes for its partner.

use std::sync::atomic::Ordering;

use tapledger_actors::{Resolution, Submission};
use tapledger_protocol::{
    AccountId, ErrorCode, Half, NodeMessage, OutcomeReport, RequestId, TxKey,
};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::{RequestContext, RequestTask, stopping};
use crate::telemetry::{HalfFate, record_half};

pub(super) fn start(
    context: RequestContext,
    request_id: RequestId,
    account: AccountId,
    half: Half,
    permit: OwnedSemaphorePermit,
) -> RequestTask {
    context
        .shared
        .counters
        .halves_received
        .fetch_add(1, Ordering::Relaxed);
    // One span per half, named by its tx_key: every event of this
    // submission, down to its outcome, carries the key.
    let span = tracing::info_span!("half", tx_key = %half.tx_key(), side = ?half.side());
    Box::pin(async move {
        submit(&context, request_id, account, half)
            .instrument(span)
            .await;
        drop(permit);
    })
}

async fn submit(context: &RequestContext, request_id: RequestId, account: AccountId, half: Half) {
    let tx_key = half.tx_key();
    let started = std::time::Instant::now();
    let resolution = match context.shared.ledger.submit(account, half).await {
        Err(error) => return context.internal(request_id, &error).await,
        Ok(Submission::Done(resolution)) => {
            record_half(started, fate_of(&resolution));
            resolution
        }
        Ok(Submission::Pending(ticket)) => {
            record_half(started, HalfFate::Pending);
            tracing::debug!("half pending");
            context
                .answer(NodeMessage::Accepted { request_id, tx_key })
                .await;
            tokio::select! {
                resolution = ticket.resolution() => match resolution {
                    Ok(resolution) => resolution,
                    Err(error) => return context.internal(request_id, &error).await,
                },
                _ = stopping(context.shared.shutdown.clone()) => {
                    let message = "node shutting down; the half is durable and pending: reconnect and query the outcome";
                    return context.fail(request_id, ErrorCode::ShuttingDown, message).await;
                }
            }
        }
    };
    match &resolution {
        Resolution::Final(outcome) => tracing::debug!(
            settled = outcome.is_settled(),
            code = outcome.code().map(|code| code.code()),
            "half resolved"
        ),
        Resolution::Refused(code) => tracing::debug!(code = code.code(), "half refused"),
    }
    context
        .answer(resolution_message(request_id, tx_key, account, &resolution))
        .await;
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
