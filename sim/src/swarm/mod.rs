//! The phone swarm: the binary's default run, and the library the tests and
//! `bench e2e` drive.
//!
//! A run starts (or pins) a node, opens one funded account per phone over the
//! wire with the admin credential, connects every phone over its own QUIC
//! connection, plans a seeded workload of honest payments and faults whose
//! outcomes it knows in advance, runs it open loop, and then checks every
//! answer, every balance over the wire and (embedded) the node's audit.
//!
//! * [`config`] — what to run; [`workload`] — the seeded plan and expectations;
//! * [`target`] — the node, connections, account opening;
//! * [`phones`] — the phones and the honest payment; `faults` — each fault;
//! * [`run`] — dispatch and tally; [`report`] and [`plot`] — the results;
//! * [`actions`] — single actions for people; [`e2e`] — `bench e2e`.
//!
//! It uses only the node's public client and, for the audit, the embedded
//! node's ledger handle; it knows nothing of the ledger's internals.

pub mod actions;
pub mod config;
pub mod e2e;
mod faults;
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

use phones::{SimPhone, Swarm};
use report::{AuditSummary, LatencySummary};
use run::{Pace, RunOptions};
use target::{Connected, EmbeddedNode, connect_phones, open_accounts};
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
    if let Some(embedded) = embedded {
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
    embedded: Option<&EmbeddedNode>,
    label: &str,
) -> anyhow::Result<SwarmReport> {
    phase(
        config,
        &format!(
            "{label}: opening {} funded accounts...",
            report::thousands(config.phones as u64)
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
            report::thousands(config.phones as u64)
        ),
    );
    let connect_started = Instant::now();
    let (connections, session) = connect_phones(connector, &accounts, config.progress).await?;
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let phones = accounts
        .into_iter()
        .zip(connections)
        .enumerate()
        .map(|(index, (account, phone))| SimPhone::new(index, account, phone))
        .collect();
    let swarm = Arc::new(Swarm {
        connector: connector.clone(),
        phones,
        session,
        transcript: None,
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

/// Plans and runs the payments, then checks balances and the audit.
async fn exercise(
    config: &SwarmConfig,
    swarm: &Arc<Swarm>,
    embedded: Option<&EmbeddedNode>,
    opening: &[u64],
) -> anyhow::Result<(SwarmReport, Vec<String>)> {
    let mut notes = Vec::new();
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
    let plan = Arc::new(workload::plan(&workload, opening)?.payments);

    phase(
        config,
        &format!(
            "running {} payments ({:.1}% faults, {}), seed {}...",
            report::thousands(plan.len() as u64),
            config.fault_share * 100.0,
            match config.rate {
                Some(rate) => format!("{}/s open loop", report::thousands(rate as u64)),
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
    };
    let tally = run::run_plan(swarm, &plan, &options).await?;
    let ran = &plan[..tally.dispatched as usize];

    phase(config, "checking every balance over the wire...");
    let expected = workload::balances_after(opening, ran);
    let (balances_checked, balance_mismatches, balance_mismatch_examples) =
        check_balances(swarm, &expected).await;

    let audit = match embedded {
        Some(embedded) => {
            phase(config, "auditing the node's books...");
            Some(audit(embedded, ran, swarm.phones.len()).await?)
        }
        None => None,
    };

    let report = SwarmReport {
        target: String::new(),
        seed: config.seed,
        phones: swarm.phones.len(),
        endpoints: config.endpoints,
        payments_planned: plan.len() as u64,
        payments_run: tally.dispatched,
        fault_share: config.fault_share,
        rate: config.rate,
        half_ttl_ms,
        open_accounts_seconds: 0.0,
        connect_seconds: 0.0,
        seconds: tally.seconds,
        settling_seconds: tally.settling_seconds,
        settled: tally.settled,
        kinds: tally.kinds.clone(),
        outcomes: tally.outcomes.clone(),
        observations: tally.observations,
        mismatches: tally.mismatches,
        mismatch_examples: tally.mismatch_examples.clone(),
        latency: LatencySummary::of(&tally.latency),
        second_half: LatencySummary::of(&tally.second_half),
        timeline: report::timeline(&tally.timeline),
        cpu: tally.cpu,
        balances_checked,
        balance_mismatches,
        balance_mismatch_examples,
        audit,
        notes: Vec::new(),
    };
    Ok((report, notes))
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
            let step_timeout = swarm.connector.step_timeout;
            let answer = tokio::time::timeout(step_timeout, phone.phone.balance()).await;
            match answer {
                Ok(Ok(balance)) if balance == expected_balance => None,
                Ok(Ok(balance)) => Some(format!(
                    "account {} (phone {index}): balance {balance}, expected {expected_balance}",
                    phone.account.id
                )),
                Ok(Err(error)) => Some(format!(
                    "account {} (phone {index}): balance request failed: {error}",
                    phone.account.id
                )),
                Err(_) => Some(format!(
                    "account {} (phone {index}): no balance within {step_timeout:?}",
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

/// The embedded node's audit, and whether its counts match the payments run.
async fn audit(
    embedded: &EmbeddedNode,
    ran: &[Payment],
    phones: usize,
) -> anyhow::Result<AuditSummary> {
    let report = embedded.audit().await?;
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
    })
}

/// Closes every phone's connection once no task holds the swarm.
pub async fn close_swarm(swarm: Arc<Swarm>) {
    match Arc::try_unwrap(swarm) {
        Ok(swarm) => {
            let mut closing = JoinSet::new();
            for phone in swarm.phones {
                closing.spawn(target::close_bounded(phone.phone));
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
