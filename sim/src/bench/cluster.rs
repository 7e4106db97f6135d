//! `bench core --replicas N`: the settlement core on a replicated cluster,
//! read against one replica in the same run, and the failover time.
//!
//! Three phases on one disk, after one set of disk probes:
//!
//! 1. **One replica**: exactly `bench core` (a cluster of one voter).
//! 2. **N replicas**: an embedded cluster (each replica a whole node on its
//!    own runtime, replicating over QUIC on loopback, as the swarm runs it);
//!    the same workload is driven in process on the leader's `Ledger`, so the
//!    difference is what replication costs. CPU is split per replica by its
//!    runtime's thread names. Afterwards every replica is audited and their
//!    state digests compared.
//! 3. **Failover**: under a steady background load, the leader is killed
//!    `kills` times (restarted, and caught up, between kills). Each kill
//!    measures the time until another replica serves and until a payment
//!    submitted to it settles.
//!
//! Everything is checked as in `bench core`; a failed check makes the binary
//! exit non-zero. The failover targets are printed beside the figures, not
//! enforced: on a shared 2-core machine they are noisy.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tapledger_actors::{Ledger, Resolution};
use tapledger_protocol::Outcome;
use tokio::task::JoinSet;

use super::core::{
    self, CoreBenchConfig, CoreBenchReport, HalvesMode, KeyOrder, Workload, open_accounts, pay,
    per, phase,
};
use crate::swarm::target::{EmbeddedCluster, NODE_THREAD_PREFIX};
use crate::text::{micros, millis};

/// How long the cluster gets to start, and each replica to restart.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// A kill that no replica takes over from within this is a failure.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);
/// A restarted replica that has not caught up within this is a failure.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);
/// How long the killed replica stays down (as the swarm's default).
const DOWN_FOR: Duration = Duration::from_secs(2);
/// A background payment that takes longer than this is given up (its
/// replica may have been killed under it).
const BACKGROUND_PAYMENT_LIMIT: Duration = Duration::from_secs(2);
/// Accounts the failover phase opens for its own payments.
const FAILOVER_ACCOUNTS: u64 = 200;
/// Enough for every background payment (amounts up to 100).
const FAILOVER_OPENING_BALANCE: u64 = 100_000_000;
/// Probe payments' indexes start here, apart from the background load's.
const PROBE_INDEX_BASE: u64 = 1 << 40;
/// The failover targets the report reads the figures against.
const FAILOVER_P50_TARGET: Duration = Duration::from_secs(1);
const FAILOVER_P99_TARGET: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct ClusterBenchConfig {
    pub core: CoreBenchConfig,
    /// Replicas of the cluster (at least 2).
    pub replicas: usize,
    /// Leader kills in the failover phase (0 skips it).
    pub kills: usize,
    /// Payments in flight in the background during the failover phase.
    pub failover_in_flight: usize,
}

/// One leader kill.
#[derive(Clone, Debug)]
pub struct Failover {
    pub killed: u64,
    pub successor: u64,
    /// From the kill to another replica serving.
    pub serving: Duration,
    /// From the kill to a payment submitted to the successor settling.
    pub first_settlement: Duration,
    /// From the restart to the killed replica having applied what the
    /// leader had applied at the restart.
    pub caught_up: Duration,
}

/// Per replica: (id, CPU seconds its runtime's threads ran).
pub type ReplicaCpu = Vec<(u64, f64)>;

#[derive(Clone, Debug)]
pub struct ClusterBenchReport {
    pub replicas: usize,
    pub single: CoreBenchReport,
    pub replicated: CoreBenchReport,
    /// The leader of the replicated phase, by id.
    pub leader: u64,
    pub replica_cpu: ReplicaCpu,
    /// Problems the cluster audit found (replicas that differ, fail their
    /// audit or lag), after the replicated phase and after the failovers.
    pub cluster_problems: Vec<String>,
    pub failovers: Vec<Failover>,
    pub failover_in_flight: usize,
    /// Background payments that settled, and that ended otherwise (a
    /// replica killed under them: error or timeout), during the failovers.
    pub background_settled: u64,
    pub background_interrupted: u64,
    pub failover_errors: Vec<String>,
}

/// Runs the three phases on the current tokio runtime.
pub async fn run(config: &ClusterBenchConfig) -> anyhow::Result<ClusterBenchReport> {
    if config.replicas < 2 {
        bail!("--replicas must be at least 2 to compare against one");
    }
    let core_config = &config.core;
    let (parent, work_dir) = core::prepare(core_config)?;
    phase(
        core_config,
        "measuring the disk (fdatasync, redb commits)...",
    );
    let disk = core::probe_disk(work_dir.path(), core_config.probe).await?;

    phase(core_config, "one replica:");
    let single_dir = work_dir.path().join("single");
    std::fs::create_dir_all(&single_dir)?;
    let ledger = Arc::new(
        Ledger::open(core::ledger_config(core_config, &single_dir))
            .await
            .context("cannot open the single replica's ledger")?,
    );
    let single = core::measure(core_config, &ledger, &parent, disk).await?;
    match Arc::try_unwrap(ledger) {
        Ok(ledger) => ledger.close().await,
        Err(_) => bail!("the ledger is still shared after every task ended"),
    }

    phase(
        core_config,
        &format!("{} replicas (QUIC on loopback):", config.replicas),
    );
    let (cluster, _admin) =
        EmbeddedCluster::start_in(work_dir.path(), config.replicas, STEP_TIMEOUT, |node| {
            core::tune_ledger(core_config, &mut node.ledger)
        })
        .await?;
    let cluster = Arc::new(cluster);
    let outcome = measure_cluster(config, &cluster, &parent, disk).await;
    match Arc::try_unwrap(cluster) {
        Ok(cluster) => cluster.stop().await,
        Err(_) => bail!("the cluster is still shared after every task ended"),
    }
    let (replicated, leader, replica_cpu, cluster_problems, failover) = outcome?;
    Ok(ClusterBenchReport {
        replicas: config.replicas,
        single,
        replicated,
        leader,
        replica_cpu,
        cluster_problems,
        failovers: failover.failovers,
        failover_in_flight: config.failover_in_flight,
        background_settled: failover.background_settled,
        background_interrupted: failover.background_interrupted,
        failover_errors: failover.errors,
    })
}

type ClusterPhases = (CoreBenchReport, u64, ReplicaCpu, Vec<String>, FailoverPhase);

async fn measure_cluster(
    config: &ClusterBenchConfig,
    cluster: &Arc<EmbeddedCluster>,
    parent: &Path,
    disk: core::DiskProbes,
) -> anyhow::Result<ClusterPhases> {
    let leader_index = cluster.wait_settled(STEP_TIMEOUT).await?;
    let leader = cluster.replica_id(leader_index);
    let ledger = cluster
        .ledger(leader_index)
        .await
        .ok_or_else(|| anyhow!("the leader stopped before the payments"))?;
    let mut replicated = core::measure(&config.core, &ledger, parent, disk).await?;
    // Its actors take memory the single replica's run freed: RSS hardly
    // moves, and the per-actor figure would read near 0 (the single run's
    // stands for both).
    replicated.actor_memory = None;
    drop(ledger);
    let replica_cpu = (0..cluster.size())
        .map(|index| {
            let id = cluster.replica_id(index);
            let name = format!("{NODE_THREAD_PREFIX}-r{id}");
            let seconds = replicated
                .usage
                .by_name
                .iter()
                .filter(|(thread, _)| **thread == name)
                .map(|(_, group)| group.run_ns as f64 / 1e9)
                .sum();
            (id, seconds)
        })
        .collect();
    phase(&config.core, "auditing every replica...");
    let mut problems = cluster.audit().await?.problems;
    let failover = if config.kills == 0 {
        FailoverPhase::default()
    } else {
        phase(
            &config.core,
            &format!(
                "killing the leader {} times under a load of {} payments in flight...",
                config.kills, config.failover_in_flight
            ),
        );
        let failover = failovers(config, cluster).await?;
        phase(&config.core, "auditing every replica again...");
        problems.extend(
            cluster
                .audit()
                .await?
                .problems
                .into_iter()
                .map(|problem| format!("after the failovers: {problem}")),
        );
        failover
    };
    Ok((replicated, leader, replica_cpu, problems, failover))
}

#[derive(Default)]
struct FailoverPhase {
    failovers: Vec<Failover>,
    background_settled: u64,
    background_interrupted: u64,
    errors: Vec<String>,
}

/// The failover phase: a background load on whichever replica leads, and
/// `kills` rounds of kill, take over, restart, catch up.
async fn failovers(
    config: &ClusterBenchConfig,
    cluster: &Arc<EmbeddedCluster>,
) -> anyhow::Result<FailoverPhase> {
    let leader = cluster.wait_leader(STEP_TIMEOUT).await?;
    let ledger = cluster
        .ledger(leader)
        .await
        .ok_or_else(|| anyhow!("the leader stopped"))?;
    let accounts = open_accounts(&ledger, FAILOVER_ACCOUNTS, FAILOVER_OPENING_BALANCE)
        .await
        .context("opening the failover phase's accounts")?;
    drop(ledger);
    let workload = Arc::new(Workload {
        seed: config.core.seed ^ 0xfa11_0fe5,
        payments: u64::MAX,
        accounts,
        amount_max: 100,
        halves: HalvesMode::Together,
        keys: KeyOrder::Random,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let mut background = JoinSet::new();
    for _ in 0..config.failover_in_flight {
        background.spawn(background_payer(
            cluster.clone(),
            workload.clone(),
            next.clone(),
            stop.clone(),
        ));
    }
    let mut phase = FailoverPhase::default();
    let mut probe_index = PROBE_INDEX_BASE;
    for round in 0..config.kills {
        match kill_round(cluster, &workload, &mut probe_index).await {
            Ok(failover) => {
                if config.core.progress {
                    eprintln!(
                        "  kill {}: replica {} -> replica {} serving after {} ms, first settlement {} ms, caught up {} ms after its restart",
                        round + 1,
                        failover.killed,
                        failover.successor,
                        failover.serving.as_millis(),
                        failover.first_settlement.as_millis(),
                        failover.caught_up.as_millis()
                    );
                }
                phase.failovers.push(failover);
            }
            Err(error) => {
                phase.errors.push(format!("kill {}: {error:#}", round + 1));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = background.join_next().await {
        let (settled, interrupted) = joined.context("background payment task")?;
        phase.background_settled += settled;
        phase.background_interrupted += interrupted;
    }
    Ok(phase)
}

/// Pays one payment after another on whichever replica leads, until told to
/// stop. Returns (settled, interrupted).
async fn background_payer(
    cluster: Arc<EmbeddedCluster>,
    workload: Arc<Workload>,
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> (u64, u64) {
    let (mut settled, mut interrupted) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        // Hold a replica's ledger only for one bounded payment, so a killed
        // replica's files are free again soon for its restart.
        let Some(ledger) = leading_ledger(&cluster).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let payment = workload.payment(next.fetch_add(1, Ordering::Relaxed));
        let paid = settles_in_time(&ledger, &payment).await;
        drop(ledger);
        if paid {
            settled += 1;
        } else {
            interrupted += 1;
        }
    }
    (settled, interrupted)
}

/// Pays `payment` on `ledger`; true if both halves heard it settle within
/// [`BACKGROUND_PAYMENT_LIMIT`] (its replica may be killed under it).
async fn settles_in_time(ledger: &Ledger, payment: &core::Payment) -> bool {
    let settled = |result: &Result<Resolution, _>| matches!(result, Ok(Resolution::Final(outcome)) if matches!(**outcome, Outcome::Settled(_)));
    match tokio::time::timeout(
        BACKGROUND_PAYMENT_LIMIT,
        pay(ledger, payment, HalvesMode::Together),
    )
    .await
    {
        Ok(paid) => settled(&paid.send) && settled(&paid.receive),
        Err(_) => false,
    }
}

async fn leading_ledger(cluster: &EmbeddedCluster) -> Option<Arc<Ledger>> {
    let index = cluster.leader().await?;
    cluster.ledger(index).await
}

/// Kills the leader, waits for a successor to serve and settle a payment,
/// restarts the killed replica and waits until it caught up.
async fn kill_round(
    cluster: &Arc<EmbeddedCluster>,
    workload: &Workload,
    probe_index: &mut u64,
) -> anyhow::Result<Failover> {
    let killed_index = cluster.wait_leader(STEP_TIMEOUT).await?;
    let killed = cluster.replica_id(killed_index);
    let killed_at = Instant::now();
    // The kill cuts the replica off at once (its endpoints close) but may
    // take a moment to finish while payments still hold its ledger; the
    // successor is looked for meanwhile.
    let killing = {
        let cluster = cluster.clone();
        tokio::spawn(async move { cluster.kill(killed_index).await })
    };
    let mut serving = None;
    let (successor, first_settlement) = loop {
        if killed_at.elapsed() > FAILOVER_LIMIT {
            bail!(
                "no replica settled a payment within {FAILOVER_LIMIT:?} of killing replica {killed}"
            );
        }
        let Some(index) = cluster
            .leader()
            .await
            .filter(|index| *index != killed_index)
        else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let serving_after = *serving.get_or_insert_with(|| killed_at.elapsed());
        let Some(ledger) = cluster.ledger(index).await else {
            continue;
        };
        let payment = workload.payment(*probe_index);
        *probe_index += 1;
        if settles_in_time(&ledger, &payment).await {
            break ((index, serving_after), killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let (successor_index, serving) = successor;
    killing.await.context("the kill task")??;
    tokio::time::sleep(DOWN_FOR.saturating_sub(killed_at.elapsed())).await;
    restart(cluster, killed_index).await?;
    let restarted_at = Instant::now();
    let leader = cluster
        .ledger(successor_index)
        .await
        .ok_or_else(|| anyhow!("the successor stopped"))?;
    let target = leader.status().applied_index;
    drop(leader);
    loop {
        let applied = match cluster.ledger(killed_index).await {
            Some(ledger) => ledger.status().applied_index,
            None => None,
        };
        if applied >= target {
            break;
        }
        if restarted_at.elapsed() > CATCH_UP_LIMIT {
            bail!(
                "replica {killed} applied {applied:?} {CATCH_UP_LIMIT:?} after its restart, the leader {target:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Failover {
        killed,
        successor: cluster.replica_id(successor_index),
        serving,
        first_settlement,
        caught_up: restarted_at.elapsed(),
    })
}

/// Restarts a killed replica, retrying while a payment still holds its old
/// ledger (the file stays locked until the last handle goes).
async fn restart(cluster: &EmbeddedCluster, index: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match cluster.restart(index).await {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Nearest-rank percentile of durations (`quantile` in 0..=1).
fn percentile(values: &[Duration], quantile: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

impl ClusterBenchReport {
    /// CPU per settlement, µs: all threads of the run (driver included).
    fn cpu_us(report: &CoreBenchReport) -> f64 {
        per(report.usage.run_ns() as f64 / 1e3, report.settled as f64)
    }

    pub fn throughput_ratio(&self) -> f64 {
        per(
            self.replicated.settlements_per_sec(),
            self.single.settlements_per_sec(),
        )
    }

    fn durations(&self, pick: fn(&Failover) -> Duration) -> Vec<Duration> {
        self.failovers.iter().map(pick).collect()
    }

    /// Every check that failed; empty means the run is trustworthy.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for (label, report) in [
            ("1 replica", &self.single),
            ("replicated", &self.replicated),
        ] {
            failures.extend(
                report
                    .failures()
                    .into_iter()
                    .map(|failure| format!("{label}: {failure}")),
            );
        }
        failures.extend(self.cluster_problems.iter().cloned());
        failures.extend(self.failover_errors.iter().cloned());
        failures
    }

    pub fn to_json(&self) -> serde_json::Value {
        let failovers: Vec<_> = self
            .failovers
            .iter()
            .map(|failover| {
                serde_json::json!({
                    "killed": failover.killed,
                    "successor": failover.successor,
                    "serving_ms": failover.serving.as_secs_f64() * 1e3,
                    "first_settlement_ms": failover.first_settlement.as_secs_f64() * 1e3,
                    "caught_up_ms": failover.caught_up.as_secs_f64() * 1e3,
                })
            })
            .collect();
        let ms = |value: Option<Duration>| value.map(|value| value.as_secs_f64() * 1e3);
        let settlements = self.durations(|failover| failover.first_settlement);
        serde_json::json!({
            "replicas": self.replicas,
            "single": self.single.to_json(),
            "replicated": self.replicated.to_json(),
            "throughput_ratio": self.throughput_ratio(),
            "cpu_us_per_settlement_single": Self::cpu_us(&self.single),
            "cpu_us_per_settlement_replicated": Self::cpu_us(&self.replicated),
            "cpu_us_per_settlement_by_replica": self.replica_cpu.iter().map(|(id, seconds)| {
                (id.to_string(), serde_json::json!(per(seconds * 1e6, self.replicated.settled as f64)))
            }).collect::<serde_json::Map<_, _>>(),
            "leader": self.leader,
            "failovers": failovers,
            "failover_first_settlement_p50_ms": ms(percentile(&settlements, 0.5)),
            "failover_first_settlement_p99_ms": ms(percentile(&settlements, 0.99)),
            "background_settled": self.background_settled,
            "background_interrupted": self.background_interrupted,
            "failures": self.failures(),
        })
    }

    pub fn render(&self) -> String {
        let mut out = self.replicated.render();
        let _ = writeln!(
            out,
            "replication (same run, same disk, same workload; the replicas share this machine's CPUs)"
        );
        for (label, report) in [
            ("1 replica ".to_string(), &self.single),
            (format!("{} replicas", self.replicas), &self.replicated),
        ] {
            let _ = writeln!(
                out,
                "  {label}  {:>9.0} settlements/s  p50 {:>8}  p99 {:>8}  {:>6.1} µs CPU per settlement (all threads)",
                report.settlements_per_sec(),
                micros(report.latency.p50_us),
                micros(report.latency.p99_us),
                Self::cpu_us(report)
            );
        }
        let _ = writeln!(
            out,
            "  ratio        {:.2} of one replica's throughput",
            self.throughput_ratio()
        );
        let driver = self.replicated.usage.run_ns() as f64 / 1e9
            - self.replica_cpu.iter().map(|(_, s)| s).sum::<f64>();
        let mut line = format!(
            "  cpu/replica  driver {:.1} µs",
            per(driver * 1e6, self.replicated.settled as f64)
        );
        for (id, seconds) in &self.replica_cpu {
            let role = if *id == self.leader { " (leader)" } else { "" };
            let _ = write!(
                line,
                ", replica {id}{role} {:.1} µs",
                per(seconds * 1e6, self.replicated.settled as f64)
            );
        }
        let _ = writeln!(out, "{line} per settlement");
        let _ = writeln!(
            out,
            "  cluster      {}",
            if self.cluster_problems.is_empty() {
                "every replica applied the same log, audits ok, identical state digests".into()
            } else {
                format!("{} problem(s), see below", self.cluster_problems.len())
            }
        );
        if !self.failovers.is_empty() || !self.failover_errors.is_empty() {
            let _ = writeln!(
                out,
                "failover ({} leader kill(s) under {} background payments in flight; killed replica restarted after {} s)",
                self.failovers.len(),
                self.failover_in_flight,
                DOWN_FOR.as_secs()
            );
            for (what, pick) in [
                (
                    "serving   ",
                    (|failover: &Failover| failover.serving) as fn(&Failover) -> Duration,
                ),
                ("settlement", |failover| failover.first_settlement),
                ("caught up ", |failover| failover.caught_up),
            ] {
                let values = self.durations(pick);
                let _ = writeln!(
                    out,
                    "  {what}  p50 {:>8}  p99 {:>8}  max {:>8}",
                    millis(percentile(&values, 0.5)),
                    millis(percentile(&values, 0.99)),
                    millis(percentile(&values, 1.0))
                );
            }
            let settlements = self.durations(|failover| failover.first_settlement);
            let (p50, p99) = (
                percentile(&settlements, 0.5),
                percentile(&settlements, 0.99),
            );
            let met = p50.is_some_and(|p50| p50 <= FAILOVER_P50_TARGET)
                && p99.is_some_and(|p99| p99 <= FAILOVER_P99_TARGET);
            let _ = writeln!(
                out,
                "  target      kill -> first settlement p50 <= {} ms, p99 <= {} ms: {}",
                FAILOVER_P50_TARGET.as_millis(),
                FAILOVER_P99_TARGET.as_millis(),
                if met { "met" } else { "NOT met" }
            );
            let _ = writeln!(
                out,
                "  background  {} payments settled, {} interrupted by a kill (error or timeout; resubmitted by no one)",
                self.background_settled, self.background_interrupted
            );
        }
        for failure in self.failures() {
            let _ = writeln!(out, "  FAILED      {failure}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.5), Some(Duration::from_millis(5)));
        assert_eq!(percentile(&values, 0.99), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&values, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
