//! Drives a plan through the swarm: an open-loop dispatcher starts each
//! payment at its intended tap time (or, closed loop, whenever one of a fixed
//! number of slots frees up), one task per payment, and a tally collects what
//! every phone was told, latencies and a timeline.
//!
//! Latency counts from the intended send time of a payment's later half (tap
//! plus its planned jitter), not from when the sim got round to sending: a
//! node (or a sim) that falls behind shows as latency, never as fewer
//! measurements (no coordinated omission).
//!
//! A run stops early, cutting off the payments still running, when the
//! target is found dead (`liveness::watch`) or payments stop finishing for
//! the stall timeout; the tally then says why ([`Tally::stopped`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::liveness::{self, Stop};
use super::phones::{PaymentResult, Swarm, sleep_until};
use super::target::progress_bar;
use super::workload::{Kind, Payment};
use crate::bench::threads;

/// Latencies above this are recorded as this (ten minutes, in microseconds).
pub const LATENCY_US_MAX: u64 = 600_000_000;
/// Width of one timeline bucket (throughput and latency over time).
pub const TIMELINE_BUCKET: Duration = Duration::from_millis(100);
/// Mismatches described in full in the report; the rest are only counted.
const MISMATCH_EXAMPLES_MAX: usize = 20;
/// How often the progress bar is refreshed.
const PROGRESS_TICK: Duration = Duration::from_millis(200);

/// How payments are started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// At their planned tap times (`Payment::at_us`), however the node keeps up.
    Open,
    /// Whenever fewer than this many are in flight; latency then counts from
    /// the start of each payment.
    Closed { in_flight: usize },
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub pace: Pace,
    /// Start no payment planned (open loop) or started (closed loop) later
    /// than this after the start.
    pub stop_after: Option<Duration>,
    /// Payments in flight at most (open loop): a bound on the sim's memory,
    /// not a brake on the schedule, since latency still counts from the tap.
    pub in_flight_max: usize,
    pub progress: bool,
    /// Stop if no payment finishes for this long.
    pub stall_timeout: Duration,
    /// Stop once the target has answered nothing for this long while
    /// requests waited and no replica completes a handshake (see
    /// `liveness::watch`); `None` never.
    pub dead_after: Option<Duration>,
}

/// One timeline bucket.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub settled: u64,
    pub finished: u64,
    /// Latencies of honest payments finishing in this bucket.
    pub latency: Histogram<u64>,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            settled: 0,
            finished: 0,
            latency: Histogram::new_with_bounds(1, LATENCY_US_MAX, 2).expect("valid bounds"),
        }
    }
}

/// Counts per row label: (expected, observed).
pub type OutcomeCounts = BTreeMap<String, (u64, u64)>;

/// Everything measured while running a plan.
#[derive(Debug)]
pub struct Tally {
    /// Payments started: always a prefix of the plan.
    pub dispatched: u64,
    pub finished: u64,
    /// Payments some phone was told settled.
    pub settled: u64,
    pub kinds: BTreeMap<Kind, u64>,
    pub outcomes: OutcomeCounts,
    pub observations: u64,
    pub mismatches: u64,
    pub mismatch_examples: Vec<String>,
    /// Intended send of the later half → both phones have the outcome,
    /// honest payments only.
    pub latency: Histogram<u64>,
    /// Later half sent → its outcome, for payments with two concurrent halves.
    pub second_half: Histogram<u64>,
    pub timeline: Vec<Bucket>,
    /// From the first intended tap to the last answer.
    pub seconds: f64,
    /// From the first intended tap to the last answer of a settled payment.
    pub settling_seconds: f64,
    last_settled: Option<Instant>,
    /// Where the CPU went while the payments ran.
    pub cpu: CpuSplit,
    /// Why the run stopped before the end of the plan, if it did; payments
    /// still running then were cut off (counted in `dispatched`, not in
    /// `finished`).
    pub stopped: Option<Stop>,
}

/// CPU time during a run, split between the embedded node (its runtime and
/// the ledger's commit thread), the sim's phones, and other processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSplit {
    pub node_ns: u64,
    pub sim_ns: u64,
    /// Time this process's threads were runnable but waiting for a CPU.
    pub waiting_ns: u64,
    /// Other processes on the machine; `None` where `/proc/stat` is missing.
    pub others_ns: Option<u64>,
}

impl CpuSplit {
    fn of(usage: &threads::Usage) -> CpuSplit {
        let mut split = CpuSplit {
            others_ns: usage.others_busy_ns(),
            ..CpuSplit::default()
        };
        for (name, times) in &usage.by_name {
            let is_node = name.starts_with(super::target::NODE_THREAD_PREFIX);
            if is_node {
                split.node_ns += times.run_ns;
            } else {
                split.sim_ns += times.run_ns;
            }
            split.waiting_ns += times.wait_ns;
        }
        split
    }
}

impl Tally {
    fn new() -> Tally {
        let histogram = || Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds");
        Tally {
            dispatched: 0,
            finished: 0,
            settled: 0,
            kinds: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            observations: 0,
            mismatches: 0,
            mismatch_examples: Vec::new(),
            latency: histogram(),
            second_half: histogram(),
            timeline: Vec::new(),
            seconds: 0.0,
            settling_seconds: 0.0,
            last_settled: None,
            cpu: CpuSplit::default(),
            stopped: None,
        }
    }

    fn record(
        &mut self,
        payment: &Payment,
        result: &PaymentResult,
        tap: Instant,
        started: Instant,
    ) {
        self.finished += 1;
        *self.kinds.entry(payment.kind).or_default() += 1;
        if result.settled {
            self.settled += 1;
            self.last_settled = self.last_settled.max(Some(result.finished));
        }
        // Open loop: from when the later half was meant to go, not from when
        // it went, so that a late sim or node shows as latency. The tap's
        // jitter itself is the workload, not latency.
        let intended = tap
            + Duration::from_micros(u64::from(
                payment.send_delay_us.max(payment.receive_delay_us),
            ));
        let latency_us = micros(result.finished.saturating_duration_since(intended));
        if payment.kind == Kind::Normal {
            self.latency.saturating_record(latency_us);
        }
        if let Some(second) = result.second_half {
            self.second_half.saturating_record(micros(second));
        }
        let bucket = (result
            .finished
            .saturating_duration_since(started)
            .as_micros()
            / TIMELINE_BUCKET.as_micros()) as usize;
        while self.timeline.len() <= bucket {
            self.timeline.push(Bucket::new());
        }
        let bucket = &mut self.timeline[bucket];
        bucket.finished += 1;
        if result.settled {
            bucket.settled += 1;
        }
        if payment.kind == Kind::Normal {
            bucket.latency.saturating_record(latency_us);
        }
        for observation in &result.observations {
            self.observations += 1;
            self.outcomes
                .entry(observation.expected.label())
                .or_default()
                .0 += 1;
            self.outcomes.entry(observation.got.label()).or_default().1 += 1;
            if !observation.matches() {
                self.mismatches += 1;
                if self.mismatch_examples.len() < MISMATCH_EXAMPLES_MAX {
                    self.mismatch_examples.push(format!(
                        "payment {} ({}, tx_key {}): {} expected {}, got {}",
                        payment.index,
                        payment.kind.name(),
                        payment.tx_key,
                        observation.role,
                        observation.expected.describe(),
                        observation.got.describe()
                    ));
                }
            }
        }
    }

    fn failed_task(&mut self, why: String) {
        self.finished += 1;
        self.mismatches += 1;
        if self.mismatch_examples.len() < MISMATCH_EXAMPLES_MAX {
            self.mismatch_examples.push(why);
        }
    }
}

/// Barrier payments (see `Payment::is_barrier`) still unfinished per epoch;
/// the dispatcher waits on these before starting epoch `k + 2`.
struct Epochs {
    remaining: Vec<AtomicUsize>,
    finished: Notify,
}

impl Epochs {
    fn of(plan: &[Payment]) -> Epochs {
        let count = plan.last().map_or(0, |payment| payment.epoch as usize + 1);
        let remaining: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
        for payment in plan.iter().filter(|payment| payment.is_barrier()) {
            remaining[payment.epoch as usize].fetch_add(1, Ordering::Relaxed);
        }
        Epochs {
            remaining,
            finished: Notify::new(),
        }
    }

    /// Waits until every barrier payment of `epoch` finished; false if that
    /// took longer than `limit`.
    async fn wait_finished(&self, epoch: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            // Registered before the check, so a wake-up in between is not lost.
            let notified = self.finished.notified();
            if self.remaining[epoch as usize].load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

/// Counts its payment as finished when dropped, even if its task panicked.
struct EpochGuard {
    epochs: Arc<Epochs>,
    epoch: u64,
}

impl Drop for EpochGuard {
    fn drop(&mut self) {
        let before = self.epochs.remaining[self.epoch as usize].fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            self.epochs.finished.notify_waiters();
        }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The watchdog a run selects on: resolves once the target is found dead.
type Watchdog<'a> = Pin<Box<dyn Future<Output = Stop> + Send + 'a>>;

/// Awaits `work` unless the watchdog resolves first.
async fn unless_stopped<T>(
    watchdog: &mut Watchdog<'_>,
    work: impl Future<Output = T>,
) -> Result<T, Stop> {
    tokio::select! {
        biased;
        stop = watchdog.as_mut() => Err(stop),
        done = work => Ok(done),
    }
}

/// Runs `plan` through `swarm` and returns the tally. A run that stops
/// early (the target stopped answering, or payments stopped finishing)
/// returns what it measured until then, with [`Tally::stopped`] saying why.
pub async fn run_plan(
    swarm: &Arc<Swarm>,
    plan: &Arc<Vec<Payment>>,
    options: &RunOptions,
) -> anyhow::Result<Tally> {
    let progress = progress_bar(plan.len() as u64, "payments", options.progress);
    let in_flight = match options.pace {
        Pace::Open => options.in_flight_max,
        Pace::Closed { in_flight } => in_flight,
    }
    .max(1);
    let cpu_before = threads::Snapshot::take();
    let mut run = Running {
        swarm,
        plan,
        options,
        tally: Arc::new(Mutex::new(Tally::new())),
        finished: Arc::new(AtomicU64::new(0)),
        settled: Arc::new(AtomicU64::new(0)),
        slots: Arc::new(Semaphore::new(in_flight)),
        epochs: Arc::new(Epochs::of(plan)),
        // A short lead so the first taps are not already late.
        started: Instant::now() + Duration::from_millis(5),
        tasks: JoinSet::new(),
        dispatched: 0,
    };
    let ticker = spawn_ticker(progress.clone(), run.finished.clone(), run.settled.clone());
    let mut watchdog: Watchdog<'_> = match options.dead_after {
        Some(limit) => Box::pin(liveness::watch(swarm, limit, run.started)),
        None => Box::pin(std::future::pending()),
    };
    let mut stopped = run.dispatch(&mut watchdog).await;
    if stopped.is_none() {
        stopped = run.drain(&mut watchdog).await;
    }
    drop(watchdog);
    if stopped.is_some() {
        run.tasks.abort_all();
        while let Some(done) = run.tasks.join_next().await {
            match done {
                Err(error) if error.is_cancelled() => {}
                done => run.reap(done),
            }
        }
    }
    let cpu = CpuSplit::of(&cpu_before.usage_until(&threads::Snapshot::take()));
    ticker.abort();
    progress.set_position(run.finished.load(Ordering::Relaxed));
    progress.finish_and_clear();
    let mut tally = Arc::try_unwrap(run.tally)
        .map_err(|_| anyhow!("the tally is still shared after every payment ended"))?
        .into_inner()
        .expect("tally lock");
    tally.dispatched = run.dispatched;
    tally.cpu = cpu;
    tally.seconds = run.started.elapsed().as_secs_f64();
    tally.settling_seconds = tally.last_settled.map_or(0.0, |last| {
        last.saturating_duration_since(run.started).as_secs_f64()
    });
    tally.stopped = stopped;
    Ok(tally)
}

/// Refreshes the progress bar: payments finished, settled, and the rate
/// over the last second.
fn spawn_ticker(
    progress: ProgressBar,
    finished: Arc<AtomicU64>,
    settled: Arc<AtomicU64>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Settled counts of the last second, to show the current rate.
        let mut window = std::collections::VecDeque::new();
        let mut interval = tokio::time::interval(PROGRESS_TICK);
        loop {
            interval.tick().await;
            let now_settled = settled.load(Ordering::Relaxed);
            window.push_back(now_settled);
            if window.len() > (1_000 / PROGRESS_TICK.as_millis()) as usize + 1 {
                window.pop_front();
            }
            let span = (window.len() - 1) as f64 * PROGRESS_TICK.as_secs_f64();
            let rate = if span > 0.0 {
                (now_settled - window.front().copied().unwrap_or(0)) as f64 / span
            } else {
                0.0
            };
            progress.set_position(finished.load(Ordering::Relaxed));
            progress.set_message(format!(
                "· {} settled, {}/s",
                crate::text::thousands(now_settled),
                crate::text::thousands(rate as u64)
            ));
        }
    })
}

/// A plan being run: what the dispatcher shares with the payment tasks.
struct Running<'a> {
    swarm: &'a Arc<Swarm>,
    plan: &'a Arc<Vec<Payment>>,
    options: &'a RunOptions,
    tally: Arc<Mutex<Tally>>,
    finished: Arc<AtomicU64>,
    settled: Arc<AtomicU64>,
    /// Payments in flight at most.
    slots: Arc<Semaphore>,
    epochs: Arc<Epochs>,
    /// The first planned tap.
    started: Instant,
    tasks: JoinSet<()>,
    dispatched: u64,
}

impl Running<'_> {
    /// Starts the payments of the plan in order, each at its time (open
    /// loop) or when a slot frees up (closed loop), up to `stop_after`.
    /// Returns why it stopped early, if it did.
    async fn dispatch(&mut self, watchdog: &mut Watchdog<'_>) -> Option<Stop> {
        let options = self.options;
        let plan = self.plan.clone();
        for (index, payment) in plan.iter().enumerate() {
            let planned = Duration::from_micros(payment.at_us);
            // Open loop stops at the planned time, closed loop at the wall clock.
            let elapsed = match options.pace {
                Pace::Open => planned,
                Pace::Closed { .. } => self.started.elapsed(),
            };
            if options.stop_after.is_some_and(|stop| elapsed > stop) {
                break;
            }
            if options.pace == Pace::Open
                && let Err(stop) =
                    unless_stopped(watchdog, sleep_until(self.started + planned)).await
            {
                return Some(stop);
            }
            if payment.epoch >= 2 {
                let epoch = payment.epoch - 2;
                let waiting = self.epochs.wait_finished(epoch, options.stall_timeout);
                match unless_stopped(watchdog, waiting).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Some(Stop::Stalled(format!(
                            "payments of epoch {epoch} did not finish within {:?}: the node stopped answering",
                            options.stall_timeout
                        )));
                    }
                    Err(stop) => return Some(stop),
                }
            }
            let permit = match unless_stopped(watchdog, self.slots.clone().acquire_owned()).await {
                Ok(permit) => permit.expect("never closed"),
                Err(stop) => return Some(stop),
            };
            let tap = match options.pace {
                Pace::Open => self.started + planned,
                Pace::Closed { .. } => Instant::now(),
            };
            self.spawn_payment(index, permit, tap);
            while let Some(done) = self.tasks.try_join_next() {
                self.reap(done);
            }
        }
        None
    }

    /// Runs payment `index` of the plan as a task of its own.
    fn spawn_payment(&mut self, index: usize, permit: OwnedSemaphorePermit, tap: Instant) {
        self.dispatched += 1;
        let payment = &self.plan[index];
        let epoch_guard = payment.is_barrier().then(|| EpochGuard {
            epochs: self.epochs.clone(),
            epoch: payment.epoch,
        });
        let swarm = self.swarm.clone();
        let plan = self.plan.clone();
        let tally = self.tally.clone();
        let finished = self.finished.clone();
        let settled = self.settled.clone();
        let started = self.started;
        self.tasks.spawn(async move {
            let _permit = permit;
            let _epoch_guard = epoch_guard;
            let payment = &plan[index];
            let mut phone_slots = Vec::with_capacity(2);
            // Ascending phone order: two payments never wait on each other's slots.
            for phone in payment.phones() {
                let slots = swarm.phones[phone as usize].slots.clone();
                phone_slots.push(slots.acquire_owned().await.expect("never closed"));
            }
            let result = swarm.execute(payment, tap).await;
            drop(phone_slots);
            if result.settled {
                settled.fetch_add(1, Ordering::Relaxed);
            }
            tally
                .lock()
                .expect("tally lock")
                .record(payment, &result, tap, started);
            finished.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// Waits for every payment started to finish; returns why it stopped
    /// waiting early, if it did.
    async fn drain(&mut self, watchdog: &mut Watchdog<'_>) -> Option<Stop> {
        let stall = self.options.stall_timeout;
        loop {
            let next = tokio::time::timeout(stall, self.tasks.join_next());
            match unless_stopped(watchdog, next).await {
                Err(stop) => return Some(stop),
                Ok(Ok(Some(done))) => self.reap(done),
                Ok(Ok(None)) => return None,
                Ok(Err(_)) => {
                    return Some(Stop::Stalled(format!(
                        "no payment finished for {stall:?} with {} still running: the node stopped answering",
                        self.tasks.len()
                    )));
                }
            }
        }
    }

    /// Counts a payment task that failed (panicked) as a mismatch.
    fn reap(&self, done: Result<(), tokio::task::JoinError>) {
        if let Err(error) = done {
            self.tally
                .lock()
                .expect("tally lock")
                .failed_task(format!("a payment task failed: {error}"));
        }
    }
}
