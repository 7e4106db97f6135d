//! Group commit through Raft: one task takes intents off its queue as they
//! come, proposes what has gathered as one log entry, and answers each
//! requester only once that entry is committed (durable on a majority of
//! replicas) and applied to this replica's ledger. Up to
//! [`COMMITS_IN_FLIGHT`] entries are in flight at once: the next is
//! proposed while the previous one is still replicated or applied once
//! [`PIPELINE_INTENTS_MIN`] intents wait for it, so a fsync overlaps the
//! apply before it. Under a steady load of small entries it proposes at
//! most one per [`COMMIT_INTERVAL_MIN`], so that each holds more.
//!
//! Nobody hears of an outcome before then. Entries are answered in log order,
//! so the results of one commit always reach a matcher before those of the
//! next. After Raft failed on this replica (storage error) the committer
//! answers every later intent with that error: a failure is never reported
//! as success.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use openraft::error::ClientWriteError;
use ractor::DerivedActorRef;
use tapledger_protocol::TxKey;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::error::{LeaderHint, LedgerError};
use crate::raft::{EntryResult, LedgerEntry, Raft, ReplicaId, ReplicaInfo, TypeConfig};
use crate::store::{Applied, Intent};
use tapledger_core::matching::{Committed, Persisted};

/// Intents that may wait for the committer before senders are slowed down.
pub const COMMIT_QUEUE_MAX: usize = 65_536;
/// Intents in one log entry at most.
pub const COMMIT_BATCH_MAX: usize = 16_384;
/// Log entries proposed and not yet applied at most. Two lets the next batch
/// be replicated while the previous one is applied.
pub const COMMITS_IN_FLIGHT: usize = 2;
/// A second entry is proposed while one is in flight only once this many
/// intents wait; fewer wait for the one in flight instead, so that a
/// lightly loaded ledger makes fewer, fuller commits (each costs two redb
/// commits and fsyncs, whatever it holds).
pub const PIPELINE_INTENTS_MIN: usize = 256;
/// While fewer than [`PIPELINE_INTENTS_MIN`] intents wait, an entry is
/// proposed at most this soon after the previous one, if that one held
/// more than one intent: under a steady load each commit then holds what
/// queued over this interval instead of the few intents of one commit's
/// round trip. A commit costs about 1.6 ms of CPU on one replica whatever
/// it holds (fitted over `bench e2e`'s rate steps: two redb commits and
/// fsyncs, openraft's rounds, waking every task involved), so without
/// this a lighter load made more commits and cost more CPU. A lone
/// requester (each entry one intent) and an intent after a quiet interval
/// are proposed at once.
///
/// Measured with `tapledger-sim bench e2e` (README's end-to-end command): at
/// 2,300–2,800 settlements/s the node spent 228–254 µs of CPU per
/// settlement with 5 ms against 329–353 µs with none, for 2–3 ms more at
/// p50 under light load.
pub const COMMIT_INTERVAL_MIN: Duration = Duration::from_millis(5);
/// How long a closing ledger waits for its last entries to commit.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Who to tell what became of an intent.
pub enum ReplyTo {
    /// A matcher shard, about the effect it asked for on `tx_key`.
    Matcher {
        shard: usize,
        tx_key: TxKey,
        persisted: Persisted,
    },
    /// A caller of the ledger API.
    /// With the ledger commit that applied it (`None` if its entry was
    /// refused whole).
    Caller(oneshot::Sender<Result<(Option<u64>, Applied), LedgerError>>),
}

pub struct Job {
    pub intent: Intent,
    pub reply: ReplyTo,
}

/// What became of one effect a matcher asked for.
#[derive(Debug)]
pub struct KeyResult {
    pub tx_key: TxKey,
    pub persisted: Persisted,
    pub result: Result<Committed, LedgerError>,
}

/// One matcher's share of a commit, sent to every shard for every commit
/// (with no results if none were its own).
#[derive(Debug)]
pub struct CommitResults {
    /// `None` when the entry failed or was refused whole.
    pub commit: Option<u64>,
    pub results: Vec<KeyResult>,
}

/// The queue matchers and callers send jobs into; made before either the
/// matchers or the committer, so each gets its end at spawn.
pub fn queue() -> (mpsc::Sender<Job>, JobQueue) {
    let (sender, receiver) = mpsc::channel(COMMIT_QUEUE_MAX);
    (sender, JobQueue(receiver))
}

/// The committer's end of [`queue`].
pub struct JobQueue(mpsc::Receiver<Job>);

/// Statistics the benchmark and metrics read.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub intents: std::sync::atomic::AtomicU64,
    /// Entries proposed while an earlier one was still in flight.
    pub pipelined: std::sync::atomic::AtomicU64,
}

/// How the committer should stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// Propose what is queued, wait (a few seconds at most) for every entry
    /// in flight, then end: the ledger is closing.
    Drain,
    /// End now, answering nobody more: this replica stopped leading, and its
    /// requesters hear that from their dropped channels.
    Abandon,
}

pub struct Committer {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<Stop>,
}

/// What the committer needs to propose entries.
pub struct CommitterArgs {
    pub raft: Raft,
    /// The term this leader's actors were built in; stamped on every entry.
    pub term: u64,
    pub clock: Arc<dyn Clock>,
    /// Each matcher shard, by index, as far as the committer may talk to
    /// it: it only ever sends a shard its share of a commit.
    pub matchers: Vec<DerivedActorRef<CommitResults>>,
    pub stats: Arc<CommitStats>,
    /// [`COMMIT_INTERVAL_MIN`] unless the ledger's configuration says.
    pub interval: Duration,
}

impl Committer {
    /// Starts the commit task on `jobs`. It ends when told to stop, or
    /// when every sender of the queue is dropped and what they sent is
    /// answered.
    pub fn start(args: CommitterArgs, jobs: JobQueue) -> Committer {
        let (stop, stop_receiver) = watch::channel(Stop::Running);
        let task = tokio::spawn(run(args, jobs.0, stop_receiver));
        Committer { task, stop }
    }

    /// Stops the task as `how` says and waits for it to end.
    pub async fn stop(self, how: Stop) {
        let _ = self.stop.send(how);
        if let Err(error) = self.task.await
            && error.is_panic()
        {
            // A panic in the committer is a broken invariant: let it surface.
            std::panic::resume_unwind(error.into_panic());
        }
    }
}

type Answer = oneshot::Receiver<
    Result<
        openraft::raft::ClientWriteResponse<TypeConfig>,
        ClientWriteError<ReplicaId, ReplicaInfo>,
    >,
>;

/// An entry proposed and not yet answered.
struct InFlight {
    replies: Vec<ReplyTo>,
    answer: Answer,
}

async fn run(
    args: CommitterArgs,
    mut receiver: mpsc::Receiver<Job>,
    mut stop: watch::Receiver<Stop>,
) {
    let CommitterArgs {
        raft,
        term,
        clock,
        matchers,
        stats,
        interval,
    } = args;
    let mut failed: Option<LedgerError> = None;
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut jobs: Vec<Job> = Vec::with_capacity(COMMIT_BATCH_MAX);
    let mut open = true;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut owned = true;
    // The earliest a proposal of fewer than PIPELINE_INTENTS_MIN intents
    // may go out (COMMIT_INTERVAL_MIN).
    let mut paced_until = tokio::time::Instant::now();
    loop {
        let how = *stop.borrow();
        match how {
            Stop::Abandon => return,
            Stop::Drain if drain_deadline.is_none() => {
                drain_deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                // Whatever is queued now goes out; nothing more comes in.
                receiver.close();
            }
            _ => {}
        }
        if !open && in_flight.is_empty() && jobs.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let paced = drain_deadline.is_none() && now < paced_until;
        // Jobs are taken off the queue as they come, whether or not an
        // entry may go out yet, so that the count of those waiting is seen
        // to pass PIPELINE_INTENTS_MIN while an entry is in flight.
        let may_propose = !jobs.is_empty()
            && in_flight.len() < COMMITS_IN_FLIGHT
            && (jobs.len() >= PIPELINE_INTENTS_MIN || (in_flight.is_empty() && !paced));
        if may_propose {
            let mut intents = Vec::with_capacity(jobs.len());
            let replies: Vec<ReplyTo> = jobs
                .drain(..)
                .map(|job| {
                    intents.push(job.intent);
                    job.reply
                })
                .collect();
            if let Some(error) = &failed {
                deliver(&matchers, replies, Err(error.clone()));
                continue;
            }
            if intents.len() > 1 {
                paced_until = now.checked_add(interval).unwrap_or(now);
            }
            let entry = LedgerEntry {
                term,
                at: clock.now(),
                intents: intents.into(),
            };
            match raft.client_write_ff(entry).await {
                Ok(answer) => {
                    if !in_flight.is_empty() {
                        stats.pipelined.fetch_add(1, Ordering::Relaxed);
                    }
                    in_flight.push_back(InFlight { replies, answer });
                }
                Err(fatal) => {
                    tracing::error!(error = %fatal, "replication stopped; refusing further writes");
                    let error = LedgerError::Replication(fatal.to_string());
                    failed = Some(error.clone());
                    deliver(&matchers, replies, Err(error));
                }
            }
            continue;
        }
        let deadline = drain_deadline.unwrap_or_else(|| now + Duration::from_secs(3600));
        let room = COMMIT_BATCH_MAX - jobs.len();
        tokio::select! {
            biased;
            changed = stop.changed(), if how == Stop::Running && owned => {
                // The `Committer` was dropped without `stop`: no signal can
                // come any more (and a closed watch is ready on every poll,
                // which would spin this loop). Go on until every sender of
                // jobs is gone and what they sent is answered.
                owned = changed.is_ok();
            }
            _ = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => {
                tracing::warn!(entries = in_flight.len(), "closing with log entries not yet committed");
                return;
            }
            result = async { (&mut in_flight.front_mut().expect("not empty").answer).await },
                if !in_flight.is_empty() =>
            {
                let done = in_flight.pop_front().expect("not empty");
                let result = answer_of(result, done.replies.len());
                if let Ok((_, applied)) = &result {
                    stats.commits.fetch_add(1, Ordering::Relaxed);
                    stats.intents.fetch_add(applied.len() as u64, Ordering::Relaxed);
                }
                deliver(&matchers, done.replies, result);
            }
            // Held back by the pacing: look again once it ends.
            _ = tokio::time::sleep_until(paced_until),
                if paced && in_flight.is_empty() && !jobs.is_empty() => {}
            received = receiver.recv_many(&mut jobs, room),
                if open && room > 0 && in_flight.len() < COMMITS_IN_FLIGHT =>
            {
                if received == 0 {
                    open = false;
                }
            }
        }
    }
}

/// What an entry's requesters hear, from Raft's answer to it.
fn answer_of(
    result: Result<
        Result<
            openraft::raft::ClientWriteResponse<TypeConfig>,
            ClientWriteError<ReplicaId, ReplicaInfo>,
        >,
        oneshot::error::RecvError,
    >,
    intents: usize,
) -> Result<(Option<u64>, Vec<Applied>), LedgerError> {
    match result {
        Ok(Ok(response)) => {
            let EntryResult { commit, applied } = response.data;
            assert_eq!(applied.len(), intents, "one result per intent");
            Ok((commit, applied))
        }
        Ok(Err(ClientWriteError::ForwardToLeader(forward))) => Err(LedgerError::NotLeader(
            forward
                .leader_id
                .zip(forward.leader_node)
                .map(|(id, node)| LeaderHint {
                    id,
                    client_addr: node.client_addr,
                }),
        )),
        Ok(Err(ClientWriteError::ChangeMembershipError(error))) => {
            unreachable!("a ledger entry changes no membership: {error}")
        }
        // Raft dropped the answer: it is shutting down or stopped.
        Err(_) => Err(LedgerError::NotLeader(None)),
    }
}

fn deliver(
    matchers: &[DerivedActorRef<CommitResults>],
    replies: Vec<ReplyTo>,
    result: Result<(Option<u64>, Vec<Applied>), LedgerError>,
) {
    let (commit, mut applied) = match result {
        Ok((commit, applied)) => (commit, applied.into_iter().map(Ok).collect::<Vec<_>>()),
        Err(error) => (None, vec![Err(error); replies.len()]),
    };
    assert_eq!(applied.len(), replies.len(), "one result per intent");
    let per_shard_capacity = shard_capacity(replies.len(), matchers.len());
    let mut per_shard: Vec<Vec<KeyResult>> = (0..matchers.len())
        .map(|_| Vec::with_capacity(per_shard_capacity))
        .collect();
    let mut callers = Vec::new();
    for (reply, applied) in replies.into_iter().zip(applied.drain(..)) {
        match reply {
            ReplyTo::Matcher {
                shard,
                tx_key,
                persisted,
            } => {
                let result = applied.and_then(|applied| match applied {
                    Applied::Matched(committed) => Ok(committed),
                    Applied::Refused(refusal) => {
                        tracing::error!(%tx_key, %refusal, "storage refused the leader's decision");
                        Err(LedgerError::Refused(refusal))
                    }
                    other => unreachable!("matcher intent answered with {other:?}"),
                });
                per_shard[shard].push(KeyResult {
                    tx_key,
                    persisted,
                    result,
                });
            }
            ReplyTo::Caller(sender) => callers.push((sender, applied)),
        }
    }
    // Every shard hears of every commit, with no results if none were its
    // own: each then reads storage as of this commit from now on (and lets
    // go of what it read before).
    for (shard, results) in per_shard.into_iter().enumerate() {
        // A matcher that is gone is shutting down; its waiters are told by their dropped channels.
        let _ = matchers[shard].send_message(CommitResults { commit, results });
    }
    // Callers hear last: when `flush` returns, every matcher already has this
    // commit's results queued ahead of anything the caller sends next.
    for (sender, applied) in callers {
        // The caller may have given up waiting; the change is durable regardless.
        let _ = sender.send(applied.map(|applied| (commit, applied)));
    }
}

/// Room for one shard's share of `items` spread over `shards` by key hash:
/// a fair share and an eighth more, so that a batch's vectors are not
/// regrown (and copied) as they fill.
pub(crate) fn shard_capacity(items: usize, shards: usize) -> usize {
    items / shards.max(1) + items / 8 + 1
}
