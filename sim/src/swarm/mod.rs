//! The phone swarm: the binary's default run, and the library the tests and
//! `bench e2e` drive.
//!
//! A run starts (or pins) a cluster, opens one funded account per phone over
//! the wire with the admin credential, connects every phone over its own
//! QUIC connection to the leader, plans a seeded workload of honest payments
//! and faults whose outcomes it knows in advance, runs it open loop (killing
//! the embedded cluster's leader once along the way, and starting it again a
//! little later), and then checks every answer, every balance over the wire,
//! that every outcome a phone was told is on the new leader, and (embedded)
//! every replica's audit and that the replicas hold identical ledgers. A
//! target that stops answering altogether ends the run early, as failed;
//! its report still says what was run and every outcome each phone was told.
//!
//! * [`config`] — what to run; [`workload`] — the seeded plan and expectations;
//! * [`target`] — the node, connections, account opening;
//! * [`phones`] — the phones and the honest payment; `faults` — each fault;
//! * [`run()`] — dispatch and tally; [`liveness`] — noticing a dead target;
//! * [`report`] and [`plot`] — the results;
//! * [`actions`] — single actions for people (`bench e2e` is in `crate::bench::e2e`).
//!
//! It uses only the node's public client and, for the audit, the embedded
//! node's ledger handle; it knows nothing of the ledger's internals.

pub mod actions;
pub mod config;
mod faults;
pub mod liveness;
pub mod phones;
pub mod plot;
pub mod report;
pub mod run;
pub mod target;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

pub use config::SwarmConfig;
pub use report::SwarmReport;

use phones::{SimPhone, Swarm, same_outcome};
use report::{AuditSummary, FailoverReport, LatencySummary};
use run::{Pace, RunOptions};
use target::{Connected, EmbeddedCluster, connect_phones, open_accounts};
use workload::{Kind, Payment, WorkloadConfig};

/// Balance mismatches described in full in the report.
const BALANCE_EXAMPLES_MAX: usize = 20;

/// Runs the swarm described by `config` on the current tokio runtime.
pub async fn run(config: &SwarmConfig) -> anyhow::Result<SwarmReport> {
    validate(config)?;
    let Connected {
        connector,
        embedded,
        label,
    } = config
        .target
        .connect(config.endpoints, config.step_timeout)
        .await?;
    let result = run_connected(config, &connector, embedded.as_ref(), &label).await;
    connector.wait_idle().await;
    if let Some(embedded) = embedded.and_then(Arc::into_inner) {
        embedded.stop().await;
    }
    result
}

fn validate(config: &SwarmConfig) -> anyhow::Result<()> {
    if config.phones < 3 {
        anyhow::bail!("--phones must be at least 3 (a sender mismatch names a third phone)");
    }
    if !(0.0..=1.0).contains(&config.fault_share) {
        anyhow::bail!("--fault-share must be between 0 and 1");
    }
    if config
        .rate
        .is_some_and(|rate| !(rate > 0.0 && rate.is_finite()))
    {
        anyhow::bail!("--rate must be a positive number of payments per second");
    }
    if config.opening_balance == 0 {
        anyhow::bail!("--opening-balance must be at least 1");
    }
    Ok(())
}

/// Prints a phase line on stderr when progress is on.
fn phase(config: &SwarmConfig, text: &str) {
    if config.progress {
        eprintln!("{text}");
    }
}

async fn run_connected(
    config: &SwarmConfig,
    connector: &Arc<target::Connector>,
    embedded: Option<&Arc<EmbeddedCluster>>,
    label: &str,
) -> anyhow::Result<SwarmReport> {
    phase(
        config,
        &format!(
            "{label}: opening {} funded accounts...",
            crate::text::thousands(config.phones as u64)
        ),
    );
    let opening = vec![config.opening_balance; config.phones];
    let open_started = Instant::now();
    let accounts = open_accounts(
        connector,
        &opening,
        config.admin_connections,
        config.progress,
    )
    .await?;
    let open_accounts_seconds = open_started.elapsed().as_secs_f64();

    phase(
        config,
        &format!(
            "connecting {} phones, one QUIC connection each...",
            crate::text::thousands(config.phones as u64)
        ),
    );
    let connect_started = Instant::now();
    let (connections, session) = connect_phones(connector, &accounts, config.progress).await?;
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let phones = accounts
        .into_iter()
        .zip(connections)
        .enumerate()
        .map(|(index, (account, (phone, replica)))| SimPhone::new(index, account, phone, replica))
        .collect();
    let swarm = Arc::new(Swarm {
        connector: connector.clone(),
        phones,
        session,
        transcript: None,
        failover: Default::default(),
        liveness: Default::default(),
    });

    let result = exercise(config, &swarm, embedded, &opening).await;
    close_swarm(swarm).await;
    let (mut report, notes) = result?;
    report.target = label.to_owned();
    report.open_accounts_seconds = open_accounts_seconds;
    report.connect_seconds = connect_seconds;
    report.notes.extend(notes);
    Ok(report)
}

/// Plans and runs the payments, then checks balances and the audit. A run
/// that stopped early (its target stopped answering) is reported as far as
/// it got, without the checks after it.
async fn exercise(
    config: &SwarmConfig,
    swarm: &Arc<Swarm>,
    embedded: Option<&Arc<EmbeddedCluster>>,
    opening: &[u64],
) -> anyhow::Result<(SwarmReport, Vec<String>)> {
    let mut notes = Vec::new();
    let plan = plan_payments(config, swarm, opening, &mut notes)?;
    phase(
        config,
        &format!(
            "running {} payments ({:.1}% faults, {}), seed {}...",
            crate::text::thousands(plan.len() as u64),
            config.fault_share * 100.0,
            match config.rate {
                Some(rate) => format!("{}/s open loop", crate::text::thousands(rate as u64)),
                None => format!("closed loop, {} in flight", config.in_flight),
            },
            config.seed
        ),
    );
    let options = RunOptions {
        pace: match config.rate {
            Some(_) => Pace::Open,
            None => Pace::Closed {
                in_flight: config.in_flight,
            },
        },
        stop_after: config.duration,
        in_flight_max: config.in_flight,
        progress: config.progress,
        stall_timeout: stall_timeout(swarm, config.step_timeout),
        dead_after: config.dead_after,
    };
    let started = tokio::time::Instant::now();
    let killing = match (embedded, config.kill_leader_after) {
        (Some(cluster), Some(after)) if cluster.size() > 1 => Some(tokio::spawn(kill_leader(
            cluster.clone(),
            swarm.clone(),
            after,
            config.restart_after,
        ))),
        _ => None,
    };
    let tally = run::run_plan(swarm, &plan, &options).await;
    let mut errors = Vec::new();
    let killed = match killing {
        Some(task) if task.is_finished() => match task.await {
            Ok(Ok(killed)) => Some(killed),
            Ok(Err(error)) => {
                errors.push(format!("killing the leader: {error:#}"));
                None
            }
            Err(error) => {
                errors.push(format!("the task killing the leader failed: {error}"));
                None
            }
        },
        Some(task) => {
            task.abort();
            // Let go of the swarm, so that its phones can be closed.
            let _ = task.await;
            notes.push(format!(
                "the run ended before the leader was to be killed ({:?} in): no failover",
                config.kill_leader_after.unwrap_or_default()
            ));
            None
        }
        None => None,
    };
    let tally = tally?;
    let checks = if tally.stopped.is_some() {
        notes.push(
            "balances, the audit and the failover were not checked: the run stopped early".into(),
        );
        Checks::default()
    } else {
        let ran = &plan[..tally.dispatched as usize];
        check_after(config, swarm, embedded, opening, ran, killed, started).await
    };
    errors.extend(checks.errors.iter().cloned());
    let mut report = report_of(config, swarm, &plan, tally, checks);
    report.replicas = embedded.map_or(0, |cluster| cluster.size());
    report.errors = errors;
    Ok((report, notes))
}

/// The seeded plan for `config` (faults the node's `half_ttl` makes too
/// slow are left out, with a note).
fn plan_payments(
    config: &SwarmConfig,
    swarm: &Swarm,
    opening: &[u64],
    notes: &mut Vec<String>,
) -> anyhow::Result<Arc<Vec<Payment>>> {
    let half_ttl_ms = swarm.session.half_ttl_ms;
    let expiry_wait_max_ms = config.expiry_wait_max.as_millis() as u64;
    let faults: Vec<Kind> = config
        .faults
        .iter()
        .copied()
        .filter(|kind| kind.runnable(half_ttl_ms, expiry_wait_max_ms))
        .collect();
    if faults.len() < config.faults.len() {
        notes.push(format!(
            "expiry faults skipped: the node's half_ttl is {} s, above --expiry-wait-max",
            half_ttl_ms / 1_000
        ));
    }
    let workload = WorkloadConfig {
        seed: config.seed,
        payments: config.payments,
        fault_share: config.fault_share,
        faults,
        amount_max: config.amount_max,
        max_amount: swarm.session.max_amount,
        rate: config.rate,
        jitter_us_max: u32::try_from(config.jitter.as_micros()).unwrap_or(u32::MAX),
        epoch_payments: Some(
            config
                .epoch_payments
                .unwrap_or(2 * config.phones as u64)
                .max(1),
        ),
    };
    Ok(Arc::new(workload::plan(&workload, opening)?.payments))
}

/// What the checks after a run found.
#[derive(Default)]
struct Checks {
    balances_checked: u64,
    balance_mismatches: u64,
    balance_mismatch_examples: Vec<String>,
    audit: Option<AuditSummary>,
    failover: Option<FailoverReport>,
    /// Checks that could not run.
    errors: Vec<String>,
}

/// Checks every balance over the wire, and on an embedded cluster every
/// replica's audit and (after a leader kill) every outcome told.
async fn check_after(
    config: &SwarmConfig,
    swarm: &Arc<Swarm>,
    embedded: Option<&Arc<EmbeddedCluster>>,
    opening: &[u64],
    ran: &[Payment],
    killed: Option<Killed>,
    started: tokio::time::Instant,
) -> Checks {
    phase(config, "checking every balance over the wire...");
    let expected = workload::balances_after(opening, ran);
    let (balances_checked, balance_mismatches, balance_mismatch_examples) =
        check_balances(swarm, &expected).await;
    let mut errors = Vec::new();
    let audit = match embedded {
        Some(embedded) => {
            phase(config, "auditing every replica's books...");
            match audit(embedded, ran, swarm.phones.len()).await {
                Ok(audit) => Some(audit),
                Err(error) => {
                    errors.push(format!("audit: {error:#}"));
                    None
                }
            }
        }
        None => None,
    };
    let failover = match (embedded, killed) {
        (Some(cluster), Some(killed)) => {
            phase(config, "looking for every outcome a phone was told...");
            Some(failover_report(cluster, swarm, killed, started).await)
        }
        _ => None,
    };
    Checks {
        balances_checked,
        balance_mismatches,
        balance_mismatch_examples,
        audit,
        failover,
        errors,
    }
}

/// The report of a run: the tally, the checks, and every outcome told.
fn report_of(
    config: &SwarmConfig,
    swarm: &Swarm,
    plan: &[Payment],
    tally: run::Tally,
    checks: Checks,
) -> SwarmReport {
    let mut told = std::mem::take(&mut *swarm.failover.told_by_account.lock().expect("told lock"));
    told.sort_by_key(|told| (told.tx_key, told.account));
    told.dedup();
    SwarmReport {
        target: String::new(),
        seed: config.seed,
        phones: swarm.phones.len(),
        endpoints: config.endpoints,
        payments_planned: plan.len() as u64,
        payments_run: tally.dispatched,
        payments_finished: tally.finished,
        fault_share: config.fault_share,
        rate: config.rate,
        half_ttl_ms: swarm.session.half_ttl_ms,
        open_accounts_seconds: 0.0,
        connect_seconds: 0.0,
        seconds: tally.seconds,
        settling_seconds: tally.settling_seconds,
        settled: tally.settled,
        latency: LatencySummary::of(&tally.latency),
        second_half: LatencySummary::of(&tally.second_half),
        timeline: report::timeline(&tally.timeline),
        cpu: tally.cpu,
        kinds: tally.kinds,
        outcomes: tally.outcomes,
        observations: tally.observations,
        mismatches: tally.mismatches,
        mismatch_examples: tally.mismatch_examples,
        balances_checked: checks.balances_checked,
        balance_mismatches: checks.balance_mismatches,
        balance_mismatch_examples: checks.balance_mismatch_examples,
        audit: checks.audit,
        replicas: 0,
        failover: checks.failover,
        stopped: tally.stopped,
        told,
        errors: Vec::new(),
        notes: Vec::new(),
    }
}

/// What the leader kill did, for the report.
struct Killed {
    replica: usize,
    at: tokio::time::Instant,
    /// When another replica first took writes.
    new_leader_at: Option<tokio::time::Instant>,
    restarted: bool,
}

/// Waits `after`, kills the leader, and starts it again `restart_after` later.
async fn kill_leader(
    cluster: Arc<EmbeddedCluster>,
    swarm: Arc<Swarm>,
    after: Duration,
    restart_after: Option<Duration>,
) -> anyhow::Result<Killed> {
    tokio::time::sleep(after).await;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let at = tokio::time::Instant::now();
    *swarm.failover.killed.lock().expect("failover lock") = Some((at, leader));
    cluster.kill(leader).await?;
    let restart_at = restart_after.map(|after| at + after);
    let mut new_leader_at = None;
    // Watch for the new leader until it is time to restart the old one.
    let watch_until = restart_at.unwrap_or(at + Duration::from_secs(30));
    while tokio::time::Instant::now() < watch_until {
        if let Some(now_leading) = cluster.leader().await
            && now_leading != leader
        {
            new_leader_at = Some(tokio::time::Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut restarted = false;
    if let Some(restart_at) = restart_at {
        tokio::time::sleep_until(restart_at).await;
        cluster.restart(leader).await?;
        restarted = true;
    }
    Ok(Killed {
        replica: leader,
        at,
        new_leader_at,
        restarted,
    })
}

/// Checks that every outcome a phone was told is on the new leader.
async fn failover_report(
    cluster: &EmbeddedCluster,
    swarm: &Swarm,
    killed: Killed,
    started: tokio::time::Instant,
) -> FailoverReport {
    let log = &swarm.failover;
    let mut report = FailoverReport {
        killed_replica: cluster.replica_id(killed.replica),
        killed_at_seconds: killed.at.duration_since(started).as_secs_f64(),
        resubmitted_halves: log.resubmitted.load(std::sync::atomic::Ordering::Relaxed),
        reconnects: log.reconnects.load(std::sync::atomic::Ordering::Relaxed),
        restarted: killed.restarted,
        new_leader_after_ms: killed
            .new_leader_at
            .map(|at| at.duration_since(killed.at).as_secs_f64() * 1e3),
        first_outcome_after_ms: log
            .first_outcome_after
            .lock()
            .expect("failover lock")
            .map(|first| first.duration_since(killed.at).as_secs_f64() * 1e3),
        ..FailoverReport::default()
    };
    let contradictions = log
        .contradictions
        .load(std::sync::atomic::Ordering::Relaxed);
    if contradictions > 0 {
        report.problems.push(format!(
            "{contradictions} payments were told two different outcomes"
        ));
    }
    if report.first_outcome_after_ms.is_none() {
        report
            .problems
            .push("no phone was told an outcome by another replica after the kill".into());
    }
    let Some(leader) = cluster.leader().await else {
        report
            .problems
            .push("no replica leads after the run".into());
        return report;
    };
    report.new_leader = Some(cluster.replica_id(leader));
    let Some(ledger) = cluster.ledger(leader).await else {
        report.problems.push("the leader stopped".into());
        return report;
    };
    let told: Vec<_> = log
        .told
        .lock()
        .expect("failover lock")
        .values()
        .cloned()
        .collect();
    report.told_outcomes = told.len() as u64;
    let checked = tokio::task::spawn_blocking(move || find_told(&ledger, &told)).await;
    match checked {
        Ok((found, problems)) => {
            report.told_found = found;
            report.problems.extend(problems);
            if found != report.told_outcomes {
                report.problems.push(format!(
                    "{} of {} told outcomes are missing or different on the leader",
                    report.told_outcomes - found,
                    report.told_outcomes
                ));
            }
        }
        Err(error) => report.problems.push(format!("the check failed: {error}")),
    }
    report
}

/// Looks up every outcome phones were told on the leader's ledger: how many
/// are there exactly as told, and (the first ten of) those that are not.
fn find_told(
    ledger: &tapledger_actors::Ledger,
    told: &[tapledger_protocol::OutcomeReport],
) -> (u64, Vec<String>) {
    let mut found = 0u64;
    let mut problems = Vec::new();
    for told in told {
        match ledger.outcome(told.tx_key) {
            Ok(Some(outcome)) => {
                let party = outcome.parties()[0];
                let stored = tapledger_protocol::OutcomeReport::for_party(&outcome, party);
                if same_outcome(&stored, told) {
                    found += 1;
                } else if problems.len() < 10 {
                    problems.push(format!(
                        "{} was told {:?} {:?} but the leader holds {:?} {:?}",
                        told.tx_key, told.status, told.code, stored.status, stored.code
                    ));
                }
            }
            Ok(None) if problems.len() < 10 => {
                problems.push(format!(
                    "{} was told an outcome the leader does not hold",
                    told.tx_key
                ));
            }
            Ok(None) => {}
            Err(error) => {
                problems.push(format!("reading {}: {error}", told.tx_key));
                break;
            }
        }
    }
    (found, problems)
}

/// How long the run may go without any payment finishing: longer than the
/// slowest single payment (an expiry: `half_ttl` plus a step).
pub fn stall_timeout(swarm: &Swarm, step_timeout: Duration) -> Duration {
    Duration::from_millis(swarm.session.half_ttl_ms) + step_timeout * 4
}

/// Asks every phone its balance over its own connection and compares it
/// with `expected`. Returns (checked, mismatches, examples).
pub async fn check_balances(swarm: &Arc<Swarm>, expected: &[u64]) -> (u64, u64, Vec<String>) {
    let mut tasks = JoinSet::new();
    for (index, &expected_balance) in expected.iter().enumerate() {
        let swarm = swarm.clone();
        tasks.spawn(async move {
            let phone = &swarm.phones[index];
            match swarm.balance(phone).await {
                Ok(balance) if balance == expected_balance => None,
                Ok(balance) => Some(format!(
                    "account {} (phone {index}): balance {balance}, expected {expected_balance}",
                    phone.account.id
                )),
                Err(error) => Some(format!(
                    "account {} (phone {index}): balance request failed: {error}",
                    phone.account.id
                )),
            }
        });
    }
    let mut mismatches = 0;
    let mut examples = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let problem = done.unwrap_or_else(|error| Some(format!("a balance task failed: {error}")));
        if let Some(problem) = problem {
            mismatches += 1;
            if examples.len() < BALANCE_EXAMPLES_MAX {
                examples.push(problem);
            }
        }
    }
    examples.sort();
    (expected.len() as u64, mismatches, examples)
}

/// The embedded cluster's audit (the leader's, every replica's, and whether
/// they agree), and whether its counts match the payments run.
async fn audit(
    embedded: &EmbeddedCluster,
    ran: &[Payment],
    phones: usize,
) -> anyhow::Result<AuditSummary> {
    let cluster = embedded.audit().await?;
    let report = cluster.leader;
    let settlements = ran.iter().filter(|p| p.kind.settles()).count() as u64;
    let rejections = ran
        .iter()
        .filter(|p| {
            matches!(
                p.kind,
                Kind::SenderMismatch | Kind::AmountMismatch | Kind::Overdraw | Kind::Expiry
            )
        })
        .count() as u64;
    let mut count_problems = Vec::new();
    let mut check = |what: &str, found: u64, expected: u64| {
        if found != expected {
            count_problems.push(format!("{found} {what} recorded, the sim made {expected}"));
        }
    };
    check("accounts", report.accounts, phones as u64);
    check("fundings", report.fundings, phones as u64);
    check("settlements", report.settlements, settlements);
    check("rejections", report.rejections, rejections);
    check("pending halves", report.pending_halves, 0);
    Ok(AuditSummary {
        report,
        count_problems,
        replicas: cluster.replicas,
        replica_problems: cluster.problems,
    })
}

/// Closes every phone's connection once no task holds the swarm.
pub async fn close_swarm(swarm: Arc<Swarm>) {
    match Arc::try_unwrap(swarm) {
        Ok(swarm) => {
            let mut closing = JoinSet::new();
            for phone in swarm.phones {
                closing.spawn(phone.close());
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                while closing.join_next().await.is_some() {}
            })
            .await;
        }
        Err(_) => eprintln!("tapledger-sim: phones still in use at the end; not closing them"),
    }
}

#[cfg(test)]
#[path = "swarm_tests.rs"]
mod tests;
