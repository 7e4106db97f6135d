//! Group commit: one thread owns the write side of the store. It takes every
//! intent that queued while the previous commit was in flight, applies them all
//! in one durable write transaction, and only then answers each requester.
//!
//! Nobody hears of an outcome before the fsync that holds it returned. After a
//! failed commit the committer answers every later intent with an error until
//! the ledger is reopened: a storage failure is never reported as success.

use std::sync::Arc;
use std::thread::JoinHandle;

use ractor::ActorRef;
use tapledger_protocol::TxKey;
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::core::matching::{Committed, Persisted};
use crate::error::{LedgerError, StoreError};
use crate::matcher::MatcherMsg;
use crate::store::{Applied, Intent, Store};

/// Intents that may wait for the committer before senders are slowed down.
pub const COMMIT_QUEUE_MAX: usize = 65_536;
/// Intents in one write transaction at most.
pub const COMMIT_BATCH_MAX: usize = 16_384;

/// Who to tell what became of an intent.
pub enum ReplyTo {
    /// A matcher shard, about the effect it asked for on `tx_key`.
    Matcher {
        shard: usize,
        tx_key: TxKey,
        persisted: Persisted,
    },
    /// A caller of the ledger API.
    Caller(oneshot::Sender<Result<(u64, Applied), LedgerError>>),
}

pub struct Job {
    pub intent: Intent,
    pub reply: ReplyTo,
}

/// One matcher's share of a commit's results.
pub type MatcherResults = Vec<(TxKey, Persisted, Result<Committed, LedgerError>)>;

/// Statistics the benchmark and metrics read.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: std::sync::atomic::AtomicU64,
    pub intents: std::sync::atomic::AtomicU64,
}

pub struct Committer {
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Starts the commit thread. It ends when every sender of `jobs` is dropped
    /// and the queue is drained.
    pub fn start(
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        matchers: Arc<std::sync::OnceLock<Vec<ActorRef<MatcherMsg>>>>,
        stats: Arc<CommitStats>,
    ) -> (Committer, mpsc::Sender<Job>) {
        let (sender, receiver) = mpsc::channel(COMMIT_QUEUE_MAX);
        let thread = std::thread::Builder::new()
            .name("tapledger-commit".into())
            .spawn(move || run(store, clock, matchers, stats, receiver))
            .expect("spawn commit thread");
        (
            Committer {
                thread: Some(thread),
            },
            sender,
        )
    }

    /// Waits for the thread to finish its last commit.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            // A panic in the committer is a broken invariant: let it surface.
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

fn run(
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    matchers: Arc<std::sync::OnceLock<Vec<ActorRef<MatcherMsg>>>>,
    stats: Arc<CommitStats>,
    mut receiver: mpsc::Receiver<Job>,
) {
    use std::sync::atomic::Ordering;
    let mut poisoned = false;
    let mut jobs: Vec<Job> = Vec::with_capacity(COMMIT_BATCH_MAX);
    let mut intents: Vec<Intent> = Vec::with_capacity(COMMIT_BATCH_MAX);
    loop {
        let Some(first) = receiver.blocking_recv() else {
            break;
        };
        jobs.push(first);
        while jobs.len() < COMMIT_BATCH_MAX {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        intents.clear();
        let replies: Vec<ReplyTo> = jobs
            .drain(..)
            .map(|job| {
                intents.push(job.intent);
                job.reply
            })
            .collect();
        let result = if poisoned {
            Err(LedgerError::from(StoreError::Poisoned))
        } else {
            match store.commit_batch(clock.now(), &intents) {
                Ok(done) => {
                    stats.commits.fetch_add(1, Ordering::Relaxed);
                    stats
                        .intents
                        .fetch_add(intents.len() as u64, Ordering::Relaxed);
                    Ok(done)
                }
                Err(error) => {
                    tracing::error!(%error, intents = intents.len(), "commit failed; refusing further writes");
                    poisoned = true;
                    Err(LedgerError::from(error))
                }
            }
        };
        deliver(&matchers, replies, result);
    }
}

fn deliver(
    matchers: &std::sync::OnceLock<Vec<ActorRef<MatcherMsg>>>,
    replies: Vec<ReplyTo>,
    result: Result<(u64, Vec<Applied>), LedgerError>,
) {
    let Some(matchers) = matchers.get() else {
        unreachable!("matchers are registered before the first half is submitted")
    };
    let (commit, mut applied) = match result {
        Ok((commit, applied)) => (commit, applied.into_iter().map(Ok).collect::<Vec<_>>()),
        Err(error) => (0, vec![Err(error); replies.len()]),
    };
    assert_eq!(applied.len(), replies.len(), "one result per intent");
    let mut per_shard: Vec<MatcherResults> = (0..matchers.len()).map(|_| Vec::new()).collect();
    let mut callers = Vec::new();
    for (reply, applied) in replies.into_iter().zip(applied.drain(..)) {
        match reply {
            ReplyTo::Matcher {
                shard,
                tx_key,
                persisted,
            } => {
                let result = applied.map(|applied| match applied {
                    Applied::Matched(committed) => committed,
                    other => unreachable!("matcher intent answered with {other:?}"),
                });
                per_shard[shard].push((tx_key, persisted, result));
            }
            ReplyTo::Caller(sender) => callers.push((sender, applied)),
        }
    }
    for (shard, results) in per_shard.into_iter().enumerate() {
        if !results.is_empty() {
            // A matcher that is gone is shutting down; its waiters are told by their dropped channels.
            let _ = matchers[shard].send_message(MatcherMsg::Committed { commit, results });
        }
    }
    // Callers hear last: when `flush` returns, every matcher already has this
    // commit's results queued ahead of anything the caller sends next.
    for (sender, applied) in callers {
        // The caller may have given up waiting; the change is durable regardless.
        let _ = sender.send(applied.map(|applied| (commit, applied)));
    }
}
