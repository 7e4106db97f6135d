//! `bench e2e`: the highest settlement rate the whole system sustains end to
//! end (phones → QUIC → node → durable commit → outcome back to both phones),
//! with at least 1,000 phone connections and the sim on the same machine, read
//! against `bench core` (the ledger alone) measured in the same run.
//!
//! Method: a short closed-loop probe (many payments in flight) estimates the
//! capacity; then open-loop steps from 40% of it upwards (by 15% past the
//! estimate) run until a step is not sustained twice in a row. A step is sustained when its p99 from intended tap to both
//! phones told stays within a bound, it achieved at least 95% of the offered
//! rate, and every answer was the expected one. Open loop measures from the
//! planned tap, so a node that falls behind shows as latency, not as a lower
//! offered load. Finally a step at half the best rate gives the latency at a
//! comfortable load, and balances and the audit are checked.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::bench::core::{self as core_bench, CoreBenchConfig};
use crate::swarm::phones::{SimPhone, Swarm};
use crate::swarm::report::LatencySummary;
use crate::swarm::run::{CpuSplit, Pace, RunOptions, run_plan};
use crate::swarm::target::{
    Connected, Connector, EmbeddedCluster, Target, connect_phones, open_accounts,
};
use crate::swarm::workload::{self, WorkloadConfig};
use crate::text::{duration_text, thousands};
use tapledger_node::client::Datagrams;

/// Fractions of the probed capacity the first open-loop steps offer; after
/// them the rate grows by [`STEP_GROWTH`] while steps are sustained.
const STEP_FRACTIONS: [f64; 4] = [0.4, 0.6, 0.8, 1.0];
const STEP_GROWTH: f64 = 1.15;
/// Open-loop steps at most, retries included.
const STEPS_MAX: usize = 14;
/// A step must achieve at least this share of its offered rate.
const ACHIEVED_SHARE_MIN: f64 = 0.95;

#[derive(Clone, Debug)]
pub struct E2eConfig {
    pub phones: usize,
    pub endpoints: usize,
    /// Length of the probe and of each open-loop step.
    pub step: Duration,
    /// A step is sustained only if its p99 (tap → both told) is within this.
    pub p99_bound: Duration,
    /// Payments in flight during the closed-loop probe.
    pub probe_in_flight: usize,
    /// Payments of the in-process core benchmark run alongside.
    pub core_payments: u64,
    pub core_accounts: u64,
    pub seed: u64,
    pub progress: bool,
}

impl Default for E2eConfig {
    fn default() -> E2eConfig {
        E2eConfig {
            phones: 1_000,
            endpoints: 4,
            step: Duration::from_secs(3),
            p99_bound: Duration::from_millis(100),
            probe_in_flight: 2_048,
            core_payments: 200_000,
            core_accounts: 10_000,
            seed: 1,
            progress: false,
        }
    }
}

/// One measured step.
#[derive(Clone, Debug)]
pub struct E2eStep {
    /// Offered open-loop rate; `None` for the closed-loop probe.
    pub offered: Option<f64>,
    pub payments: u64,
    pub settled: u64,
    pub seconds: f64,
    pub settlements_per_sec: f64,
    /// Intended tap → both phones told.
    pub latency: LatencySummary,
    /// Later half sent → its outcome.
    pub second_half: LatencySummary,
    pub mismatches: u64,
    /// The first few answers that differed, described.
    pub mismatch_examples: Vec<String>,
    pub sustained: bool,
    pub cpu: CpuSplit,
    /// What the phones' connections sent (the node received) and received
    /// during the step.
    pub datagrams: Datagrams,
    /// Ledger commits (Raft entries applied) during the step.
    pub commits: u64,
}

impl E2eStep {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "offered_per_sec": self.offered,
            "payments": self.payments,
            "settled": self.settled,
            "seconds": self.seconds,
            "settlements_per_sec": self.settlements_per_sec,
            "latency": self.latency.to_json(),
            "second_half_latency": self.second_half.to_json(),
            "mismatches": self.mismatches,
            "mismatch_examples": self.mismatch_examples,
            "sustained": self.sustained,
            "cpu": self.cpu.to_json(self.settled),
            "datagrams_to_node": self.datagrams.sent,
            "datagrams_from_node": self.datagrams.received,
            "commits": self.commits,
            "other_processes_cpu_share": self.others_share(),
        })
    }

    /// Share of the machine's CPUs other processes used during the step.
    fn others_share(&self) -> Option<f64> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        self.cpu
            .others_ns
            .map(|ns| ns as f64 / 1e9 / (self.seconds.max(1e-9) * cpus))
    }

    /// CPU microseconds per settlement, node and phones.
    fn cpu_per_settlement_us(&self) -> (f64, f64) {
        let settled = self.settled.max(1) as f64;
        (
            self.cpu.node_ns as f64 / 1e3 / settled,
            self.cpu.sim_ns as f64 / 1e3 / settled,
        )
    }

    fn render(&self) -> String {
        let offered = match self.offered {
            Some(rate) => format!("open loop {:>8}/s", thousands(rate as u64)),
            None => "closed-loop probe      ".to_owned(),
        };
        let (node_us, phones_us) = self.cpu_per_settlement_us();
        let others = self.others_share().map_or(String::new(), |share| {
            format!(" · others {:.0}% CPU", share * 100.0)
        });
        let settled = self.settled.max(1) as f64;
        let (to_node, from_node) = (
            self.datagrams.sent as f64 / settled,
            self.datagrams.received as f64 / settled,
        );
        format!(
            "{offered} → {:>8} settled/s · tap→told p50 {:>9} p99 {:>9} · second half p99 {:>9} · cpu µs/settlement node {node_us:.0} phones {phones_us:.0} · datagrams/settlement in {to_node:.1} out {from_node:.1} · {:.0} commits/s{others}{}",
            thousands(self.settlements_per_sec.round() as u64),
            duration_text(self.latency.p50_us),
            duration_text(self.latency.p99_us),
            duration_text(self.second_half.p99_us),
            self.commits as f64 / self.seconds.max(1e-9),
            match (self.offered, self.sustained) {
                (None, _) => "",
                (Some(_), true) => "  sustained",
                (Some(_), false) => "  NOT sustained",
            }
        )
    }
}

#[derive(Clone, Debug)]
pub struct E2eReport {
    pub phones: usize,
    pub endpoints: usize,
    pub cpus: usize,
    pub p99_bound: Duration,
    pub probe: E2eStep,
    pub steps: Vec<E2eStep>,
    /// Index in `steps` of the highest sustained step.
    pub best: Option<usize>,
    pub half_rate: Option<E2eStep>,
    pub core_settlements_per_sec: f64,
    pub core_p99_us: u64,
    /// CPU of the core benchmark's process per settlement.
    pub core_cpu_us_per_settlement: f64,
    pub core_failures: Vec<String>,
    pub balance_mismatches: u64,
    pub audit_problems: Vec<String>,
}

impl E2eReport {
    fn best_step(&self) -> Option<&E2eStep> {
        self.best.map(|index| &self.steps[index])
    }

    pub fn settlements_per_sec(&self) -> f64 {
        self.best_step()
            .map_or(0.0, |step| step.settlements_per_sec)
    }

    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let mismatches: u64 = self
            .steps
            .iter()
            .chain(self.half_rate.iter())
            .chain(std::iter::once(&self.probe))
            .map(|step| step.mismatches)
            .sum();
        if mismatches > 0 {
            failures.push(format!(
                "{mismatches} answers differ from the expected outcome"
            ));
        }
        if self.balance_mismatches > 0 {
            failures.push(format!("{} balances differ", self.balance_mismatches));
        }
        failures.extend(
            self.audit_problems
                .iter()
                .map(|problem| format!("audit: {problem}")),
        );
        failures.extend(
            self.core_failures
                .iter()
                .map(|problem| format!("bench core: {problem}")),
        );
        if self.best.is_none() {
            failures.push("no step was sustained".to_owned());
        }
        failures
    }

    pub fn to_json(&self) -> serde_json::Value {
        let best = self.best_step();
        json!({
            "settlements_per_sec": self.settlements_per_sec(),
            "phones": self.phones,
            "p50_us": best.map(|step| step.latency.p50_us),
            "p99_us": best.map(|step| step.latency.p99_us),
            "p999_us": best.map(|step| step.latency.p999_us),
            "core_settlements_per_sec": self.core_settlements_per_sec,
            "ratio_to_core": if self.core_settlements_per_sec > 0.0 {
                self.settlements_per_sec() / self.core_settlements_per_sec
            } else { 0.0 },
            "latency_measured_from": "intended tap time (open loop) to both phones told",
            "second_half_p99_us": best.map(|step| step.second_half.p99_us),
            "node_cpu_us_per_settlement": best.map(|step| step.cpu_per_settlement_us().0),
            "phones_cpu_us_per_settlement": best.map(|step| step.cpu_per_settlement_us().1),
            "half_rate": self.half_rate.as_ref().map(E2eStep::to_json),
            "core_p99_us": self.core_p99_us,
            "core_cpu_us_per_settlement": self.core_cpu_us_per_settlement,
            "endpoints": self.endpoints,
            "cpus": self.cpus,
            "p99_bound_us": self.p99_bound.as_micros() as u64,
            "probe": self.probe.to_json(),
            "steps": self.steps.iter().map(E2eStep::to_json).collect::<Vec<_>>(),
            "balance_mismatches": self.balance_mismatches,
            "audit_problems": self.audit_problems,
            "failures": self.failures(),
        })
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "bench e2e: {} phones (one QUIC connection each, {} client sockets), embedded durable node, \
             sim on the same {}-CPU machine",
            thousands(self.phones as u64),
            self.endpoints,
            self.cpus
        );
        let _ = writeln!(out, "  {}", self.probe.render());
        for step in &self.steps {
            let _ = writeln!(out, "  {}", step.render());
        }
        match self.best_step() {
            Some(best) => {
                let _ = writeln!(
                    out,
                    "highest sustained: {} settlements/s end to end (p99 tap → both told within {:?})",
                    thousands(best.settlements_per_sec.round() as u64),
                    self.p99_bound
                );
                let _ = writeln!(out, "  latency, tap → both told: {}", best.latency.render());
                let (node_us, phones_us) = best.cpu_per_settlement_us();
                let _ = writeln!(
                    out,
                    "  cpu per settlement: node {node_us:.0} µs, phones {phones_us:.0} µs \
                     (all {} CPUs to both would allow about {} settlements/s)",
                    self.cpus,
                    thousands((self.cpus as f64 * 1e6 / (node_us + phones_us).max(1e-9)) as u64)
                );
                let _ = writeln!(
                    out,
                    "  latency, second half → outcome: {}",
                    best.second_half.render()
                );
            }
            None => {
                let _ = writeln!(out, "highest sustained: none of the steps was sustained");
            }
        }
        if let Some(half) = &self.half_rate {
            let _ = writeln!(out, "at half that rate: {}", half.render());
        }
        let _ = writeln!(
            out,
            "bench core (ledger alone, same machine): {} settlements/s, p99 second half → outcome {}, {:.0} µs CPU per settlement",
            thousands(self.core_settlements_per_sec.round() as u64),
            duration_text(self.core_p99_us),
            self.core_cpu_us_per_settlement
        );
        if self.core_settlements_per_sec > 0.0 {
            let _ = writeln!(
                out,
                "end to end / core: {:.2}",
                self.settlements_per_sec() / self.core_settlements_per_sec
            );
        }
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(
                out,
                "checks: every answer as expected, balances and audit ok"
            );
        } else {
            for failure in failures {
                let _ = writeln!(out, "FAILED: {failure}");
            }
        }
        out
    }
}

/// Runs the end-to-end benchmark, then the core benchmark.
pub async fn run(config: &E2eConfig) -> anyhow::Result<E2eReport> {
    let (mut stepper, connector, embedded) = start(config).await?;
    let search = search_rate(config, &mut stepper).await?;

    phase(config, "checking balances and the audit...");
    let Stepper {
        swarm, balances, ..
    } = stepper;
    let (_, balance_mismatches, _) = crate::swarm::check_balances(&swarm, &balances).await;
    let audit = embedded.audit().await?.leader;
    crate::swarm::close_swarm(swarm).await;
    connector.wait_idle().await;
    if let Some(embedded) = Arc::into_inner(embedded) {
        embedded.stop().await;
    }

    phase(
        config,
        &format!(
            "bench core with {} payments for comparison...",
            thousands(config.core_payments)
        ),
    );
    let core = core_bench::run(&CoreBenchConfig {
        payments: config.core_payments,
        accounts: config.core_accounts,
        seed: config.seed,
        probe: Duration::from_millis(500),
        progress: config.progress,
        ..CoreBenchConfig::default()
    })
    .await
    .context("bench core")?;

    Ok(E2eReport {
        phones: config.phones,
        endpoints: config.endpoints,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        p99_bound: config.p99_bound,
        probe: search.probe,
        steps: search.steps,
        best: search.best,
        half_rate: search.half_rate,
        core_settlements_per_sec: core.settlements_per_sec(),
        core_p99_us: core.latency.p99_us,
        core_cpu_us_per_settlement: core.usage.run_ns() as f64 / 1e3 / core.settled.max(1) as f64,
        core_failures: core.failures(),
        balance_mismatches,
        audit_problems: audit.problems.iter().map(ToString::to_string).collect(),
    })
}

/// A line on stderr, when the run shows its progress.
fn phase(config: &E2eConfig, text: &str) {
    if config.progress {
        eprintln!("{text}");
    }
}

/// The swarm the steps run on, and what each step needs from the last.
struct Stepper<'a> {
    config: &'a E2eConfig,
    swarm: Arc<Swarm>,
    /// The next step's workload seed (one more per step).
    seed: u64,
    /// Every phone's balance after the steps so far.
    balances: Vec<u64>,
    /// The embedded node's ledger, for its commit count.
    ledger: Option<Arc<tapledger_actors::Ledger>>,
}

/// Starts the embedded node, opens one funded account per phone and
/// connects the phones.
async fn start(
    config: &E2eConfig,
) -> anyhow::Result<(Stepper<'_>, Arc<Connector>, Arc<EmbeddedCluster>)> {
    // The node's default half_ttl: no expiry faults here, and an overloaded
    // probe must not expire halves whose partner is merely queued.
    let target = Target::Embedded {
        half_ttl: tapledger_actors::HALF_TTL_DEFAULT,
        replicas: 1,
    };
    let step_timeout = Duration::from_secs(10);
    let Connected {
        connector,
        embedded,
        ..
    } = target.connect(config.endpoints, step_timeout).await?;
    let embedded = embedded.expect("an embedded target starts a node");

    // Enough money that tiny payments never run out over any number of steps.
    let opening_balance = 1_000_000_000u64;
    phase(
        config,
        &format!("opening {} accounts...", thousands(config.phones as u64)),
    );
    let balances = vec![opening_balance; config.phones];
    let accounts = open_accounts(&connector, &balances, 4, config.progress).await?;
    phase(
        config,
        &format!("connecting {} phones...", thousands(config.phones as u64)),
    );
    let (connections, session) = connect_phones(&connector, &accounts, config.progress).await?;
    let swarm = Arc::new(Swarm {
        connector: connector.clone(),
        phones: accounts
            .into_iter()
            .zip(connections)
            .enumerate()
            .map(|(index, (account, (phone, replica)))| {
                SimPhone::new(index, account, phone, replica)
            })
            .collect(),
        session,
        transcript: None,
        failover: Default::default(),
        liveness: Default::default(),
    });
    let stepper = Stepper {
        config,
        swarm,
        seed: config.seed,
        balances,
        ledger: embedded.ledger(0).await,
    };
    Ok((stepper, connector, embedded))
}

impl Stepper<'_> {
    /// Commits the node's ledger made so far.
    async fn commits(&self) -> u64 {
        match &self.ledger {
            Some(ledger) => ledger.stats().await.commits,
            None => 0,
        }
    }

    /// One step: open loop at `offered` settlements a second, or (`None`)
    /// the closed-loop probe.
    async fn step(&mut self, offered: Option<f64>) -> anyhow::Result<E2eStep> {
        let config = self.config;
        // Size the plan for the step: the offered rate, or a generous guess
        // of what a closed loop can reach.
        let payments = match offered {
            Some(rate) => (rate * config.step.as_secs_f64()).ceil() as u64,
            None => (200_000.0 * config.step.as_secs_f64()) as u64,
        };
        let plan = workload::plan(
            &WorkloadConfig {
                seed: self.seed,
                payments,
                fault_share: 0.0,
                faults: Vec::new(),
                amount_max: 100,
                max_amount: self.swarm.session.max_amount,
                rate: offered,
                jitter_us_max: 0,
                // Balances are large enough never to need credits.
                epoch_payments: None,
            },
            &self.balances,
        )?;
        self.seed += 1;
        let plan = Arc::new(plan.payments);
        let options = RunOptions {
            pace: match offered {
                Some(_) => Pace::Open,
                None => Pace::Closed {
                    in_flight: config.probe_in_flight,
                },
            },
            stop_after: Some(config.step),
            in_flight_max: 200_000,
            progress: config.progress,
            stall_timeout: Duration::from_secs(60),
            dead_after: None,
        };
        let datagrams_before = self.swarm.datagrams().await;
        let commits_before = self.commits().await;
        let tally = run_plan(&self.swarm, &plan, &options).await?;
        let commits = self.commits().await - commits_before;
        let datagrams = self.swarm.datagrams().await;
        let datagrams = Datagrams {
            sent: datagrams.sent - datagrams_before.sent,
            received: datagrams.received - datagrams_before.received,
        };
        if let Some(stop) = &tally.stopped {
            anyhow::bail!("{}", stop.describe("embedded node"));
        }
        self.balances =
            workload::balances_after(&self.balances, &plan[..tally.dispatched as usize]);
        let latency = LatencySummary::of(&tally.latency);
        let settlements_per_sec = tally.settled as f64 / tally.seconds.max(1e-9);
        let sustained = match offered {
            Some(rate) => {
                latency.p99_us <= config.p99_bound.as_micros() as u64
                    && settlements_per_sec >= rate * ACHIEVED_SHARE_MIN
                    && tally.mismatches == 0
            }
            None => false,
        };
        // Let the node's group commit and the phones' queues settle down.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let step = E2eStep {
            offered,
            payments: tally.dispatched,
            settled: tally.settled,
            seconds: tally.seconds,
            settlements_per_sec,
            latency,
            second_half: LatencySummary::of(&tally.second_half),
            mismatches: tally.mismatches,
            mismatch_examples: tally.mismatch_examples.iter().take(5).cloned().collect(),
            sustained,
            cpu: tally.cpu,
            datagrams,
            commits,
        };
        if config.progress {
            eprintln!("  {}", step.render());
        }
        Ok(step)
    }
}

/// The steps of the search for the highest sustained rate.
struct RateSearch {
    probe: E2eStep,
    steps: Vec<E2eStep>,
    /// Index in `steps` of the best sustained step.
    best: Option<usize>,
    half_rate: Option<E2eStep>,
}

/// The closed-loop probe, the open-loop steps upwards from a fraction of
/// its capacity, and a step at half the best rate.
async fn search_rate(config: &E2eConfig, stepper: &mut Stepper<'_>) -> anyhow::Result<RateSearch> {
    phase(config, "closed-loop probe for the capacity...");
    let probe = stepper.step(None).await?;
    let capacity = probe.settlements_per_sec.max(100.0);
    let mut steps = Vec::new();
    let mut best = None;
    // A step that fails is run once more before the search stops: on a
    // shared machine one stall (a neighbour's burst, a slow fsync) can push
    // a single step's p99 over the bound.
    let mut rate = (capacity * STEP_FRACTIONS[0] / 100.0).round() * 100.0;
    let mut fraction_index = 0;
    let mut retried = false;
    while steps.len() < STEPS_MAX {
        phase(
            config,
            &format!("open loop at {}/s...", thousands(rate as u64)),
        );
        let step = stepper.step(Some(rate)).await?;
        let sustained = step.sustained;
        steps.push(step);
        if sustained {
            best = Some(steps.len() - 1);
            retried = false;
            fraction_index += 1;
            rate = match STEP_FRACTIONS.get(fraction_index) {
                Some(fraction) => capacity * fraction,
                None => rate * STEP_GROWTH,
            };
            rate = (rate / 100.0).round() * 100.0;
        } else if !retried {
            retried = true;
        } else {
            break;
        }
    }
    let half_rate = match best {
        Some(index) => {
            let rate = (steps[index].settlements_per_sec / 2.0 / 100.0).round() * 100.0;
            phase(
                config,
                &format!(
                    "open loop at half the best rate, {}/s...",
                    thousands(rate as u64)
                ),
            );
            Some(stepper.step(Some(rate.max(100.0))).await?)
        }
        None => None,
    };
    Ok(RateSearch {
        probe,
        steps,
        best,
        half_rate,
    })
}
