//! The swarm's report: what was run, throughput, latency percentiles, every
//! phone's answer counted against what the plan expected, the balances over
//! the wire and the node's audit. Rendered for people and as JSON; a report
//! with any failure makes the binary exit non-zero.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::json;
use tapledger_actors::AuditReport;
use tapledger_protocol::{AccountId, ErrorCode, OutcomeReport, OutcomeStatus, RejectCode, TxKey};

use super::liveness::Stop;
use super::run::{Bucket, CpuSplit, OutcomeCounts, TIMELINE_BUCKET};
use super::workload::Kind;
use crate::text::{duration_text, thousands, thousands_u128};

/// One outcome as one phone was told it: what to look for in the node's
/// ledger afterwards (`tapledger-node export`, `accounts --history`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToldOutcome {
    pub tx_key: TxKey,
    /// The account whose phone was told.
    pub account: AccountId,
    pub status: OutcomeStatus,
    pub code: Option<RejectCode>,
    pub amount: Option<u64>,
    pub balance_after: Option<u64>,
}

impl ToldOutcome {
    pub fn of(account: AccountId, report: &OutcomeReport) -> ToldOutcome {
        ToldOutcome {
            tx_key: report.tx_key,
            account,
            status: report.status,
            code: report.code,
            amount: report.amount,
            balance_after: report.balance_after,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "tx_key": self.tx_key.to_string(),
            "account": self.account,
            "status": match self.status {
                OutcomeStatus::Settled => "settled",
                OutcomeStatus::Rejected => "rejected",
            },
            "code": self.code.map(RejectCode::code),
            "amount": self.amount,
            "balance_after": self.balance_after,
        })
    }
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: histogram.len(),
            mean_us: histogram.mean(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        json!({
            "count": self.count,
            "mean_us": self.mean_us,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
        })
    }

    /// "p50 1.2 ms · p90 ... · max ..." for people.
    pub fn render(self) -> String {
        format!(
            "p50 {} · p90 {} · p99 {} · p99.9 {} · max {}",
            duration_text(self.p50_us),
            duration_text(self.p90_us),
            duration_text(self.p99_us),
            duration_text(self.p999_us),
            duration_text(self.max_us)
        )
    }
}

/// One point of the timeline: a bucket of [`TIMELINE_BUCKET`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimelinePoint {
    /// End of the bucket, seconds after the first tap.
    pub seconds: f64,
    pub settled_per_sec: f64,
    pub latency_count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

pub fn timeline(buckets: &[Bucket]) -> Vec<TimelinePoint> {
    let width = TIMELINE_BUCKET.as_secs_f64();
    buckets
        .iter()
        .enumerate()
        .map(|(index, bucket)| {
            let latency = LatencySummary::of(&bucket.latency);
            TimelinePoint {
                seconds: (index + 1) as f64 * width,
                settled_per_sec: bucket.settled as f64 / width,
                latency_count: latency.count,
                p50_us: latency.p50_us,
                p99_us: latency.p99_us,
                max_us: latency.max_us,
            }
        })
        .collect()
}

/// The leader's audit, whether its counts agree with the sim's, and every
/// replica's own audit.
#[derive(Clone, Debug)]
pub struct AuditSummary {
    pub report: AuditReport,
    /// Disagreements between the audit's counts and the payments the sim ran.
    pub count_problems: Vec<String>,
    /// Each replica: (id, last applied log index, its audit passed).
    pub replicas: Vec<(u64, Option<u64>, bool)>,
    /// Replicas down, behind, failing their audit, or holding a ledger that
    /// differs from the others' at the same log index.
    pub replica_problems: Vec<String>,
}

impl AuditSummary {
    pub fn is_ok(&self) -> bool {
        self.report.is_ok() && self.count_problems.is_empty() && self.replica_problems.is_empty()
    }
}

/// What killing the leader mid-run did, and whether every promise made to a
/// phone survived it.
#[derive(Clone, Debug, Default)]
pub struct FailoverReport {
    pub killed_replica: u64,
    /// Since the first planned tap.
    pub killed_at_seconds: f64,
    /// The replica that led at the end.
    pub new_leader: Option<u64>,
    /// From the kill to another replica taking writes.
    pub new_leader_after_ms: Option<f64>,
    /// From the kill to the first outcome a phone heard from another replica.
    pub first_outcome_after_ms: Option<f64>,
    /// Halves phones sent again because their replica stopped leading or died.
    pub resubmitted_halves: u64,
    /// Phone connections moved to the new leader.
    pub reconnects: u64,
    /// Whether the killed replica was started again (and caught up: see the
    /// audit's replica lines).
    pub restarted: bool,
    /// Outcomes phones were told, and how many the final leader holds exactly so.
    pub told_outcomes: u64,
    pub told_found: u64,
    pub problems: Vec<String>,
}

impl FailoverReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "failover: leader (replica {}) killed at {:.1} s; replica {} leads now",
            self.killed_replica,
            self.killed_at_seconds,
            self.new_leader
                .map_or("none".to_string(), |leader| leader.to_string())
        );
        let ms = |ms: Option<f64>| ms.map_or("none".to_string(), |ms| format!("{ms:.0} ms"));
        let _ = writeln!(
            out,
            "  kill → a new leader takes writes: {} · → first outcome told by the new leader: {}",
            ms(self.new_leader_after_ms),
            ms(self.first_outcome_after_ms),
        );
        let _ = writeln!(
            out,
            "  {} halves resubmitted · {} phone connections moved",
            thousands(self.resubmitted_halves),
            thousands(self.reconnects)
        );
        let _ = writeln!(
            out,
            "  {} of {} outcomes phones were told found exactly so on the new leader{}",
            thousands(self.told_found),
            thousands(self.told_outcomes),
            if self.restarted {
                "; the killed replica restarted and caught up (see audit)"
            } else {
                ""
            }
        );
        for problem in &self.problems {
            let _ = writeln!(out, "    {problem}");
        }
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "killed_replica": self.killed_replica,
            "killed_at_seconds": self.killed_at_seconds,
            "new_leader": self.new_leader,
            "new_leader_after_ms": self.new_leader_after_ms,
            "first_outcome_after_ms": self.first_outcome_after_ms,
            "resubmitted_halves": self.resubmitted_halves,
            "reconnects": self.reconnects,
            "restarted": self.restarted,
            "told_outcomes": self.told_outcomes,
            "told_found": self.told_found,
            "problems": self.problems,
        })
    }
}

/// Everything a swarm run found.
#[derive(Clone, Debug)]
pub struct SwarmReport {
    pub target: String,
    pub seed: u64,
    pub phones: usize,
    pub endpoints: usize,
    pub payments_planned: u64,
    pub payments_run: u64,
    /// Payments whose every step ended (the rest were cut off by a stop).
    pub payments_finished: u64,
    pub fault_share: f64,
    /// Offered open-loop arrivals per second; `None` for closed loop.
    pub rate: Option<f64>,
    pub half_ttl_ms: u64,
    pub open_accounts_seconds: f64,
    pub connect_seconds: f64,
    /// From the first tap to the last answer.
    pub seconds: f64,
    /// From the first tap to the last answer of a settled payment (the
    /// expiry faults' wait comes after it).
    pub settling_seconds: f64,
    pub settled: u64,
    pub kinds: BTreeMap<Kind, u64>,
    pub outcomes: OutcomeCounts,
    pub observations: u64,
    pub mismatches: u64,
    pub mismatch_examples: Vec<String>,
    pub latency: LatencySummary,
    pub second_half: LatencySummary,
    pub timeline: Vec<TimelinePoint>,
    /// CPU used while the payments ran.
    pub cpu: CpuSplit,
    pub balances_checked: u64,
    pub balance_mismatches: u64,
    pub balance_mismatch_examples: Vec<String>,
    /// The embedded cluster's audit; `None` against a remote one.
    pub audit: Option<AuditSummary>,
    /// Replicas of the embedded cluster (0 for a remote one).
    pub replicas: usize,
    /// The leader kill, when the run made one.
    pub failover: Option<FailoverReport>,
    /// Why the run stopped before the end of its plan, if it did.
    pub stopped: Option<Stop>,
    /// Every outcome each phone was told, sorted by key and account.
    pub told: Vec<ToldOutcome>,
    /// Checks or steps that could not run (each one a failure).
    pub errors: Vec<String>,
    pub notes: Vec<String>,
}

impl SwarmReport {
    pub fn settlements_per_sec(&self) -> f64 {
        if self.settling_seconds > 0.0 {
            self.settled as f64 / self.settling_seconds
        } else {
            0.0
        }
    }

    /// Every failed check; empty means the run passed.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if let Some(stop) = &self.stopped {
            failures.push(format!("stopped early: {}", stop.describe(&self.target)));
        }
        failures.extend(self.errors.iter().cloned());
        if self.mismatches > 0 {
            failures.push(format!(
                "{} of {} answers differ from what the sim expected",
                thousands(self.mismatches),
                thousands(self.observations)
            ));
        }
        if self.balance_mismatches > 0 {
            failures.push(format!(
                "{} of {} balances differ from the sim's expectation",
                thousands(self.balance_mismatches),
                thousands(self.balances_checked)
            ));
        }
        if let Some(audit) = &self.audit {
            for problem in audit
                .report
                .problems
                .iter()
                .map(ToString::to_string)
                .chain(audit.count_problems.iter().cloned())
                .chain(audit.replica_problems.iter().cloned())
            {
                failures.push(format!("audit: {problem}"));
            }
        }
        if let Some(failover) = &self.failover {
            for problem in &failover.problems {
                failures.push(format!("failover: {problem}"));
            }
        }
        failures
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "tapledger-sim: {} phones, {} payments (seed {}) against the {}",
            thousands(self.phones as u64),
            thousands(self.payments_run),
            self.seed,
            self.target
        );
        let _ = writeln!(
            out,
            "  setup: {} accounts opened in {:.2} s, {} phones connected (one QUIC connection each, over {} client sockets) in {:.2} s",
            thousands(self.phones as u64),
            self.open_accounts_seconds,
            thousands(self.phones as u64),
            self.endpoints,
            self.connect_seconds
        );
        self.render_payments(&mut out);
        self.render_answers(&mut out);
        let _ = writeln!(out);
        self.render_balances(&mut out);
        self.render_audit(&mut out);
        if let Some(failover) = &self.failover {
            out.push_str(&failover.render());
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(out, "result: PASS");
        } else {
            let _ = writeln!(out, "result: FAIL");
            for failure in failures {
                let _ = writeln!(out, "  {failure}");
            }
        }
        out
    }

    fn render_payments(&self, out: &mut String) {
        let pace = match self.rate {
            Some(rate) => format!("offered {}/s open loop", thousands(rate as u64)),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "payments: {} in {:.1} s ({pace}, {:.1}% faults)",
            thousands(self.payments_run),
            self.seconds,
            self.fault_share * 100.0
        );
        if let Some(stop) = &self.stopped {
            let _ = writeln!(out, "  STOPPED EARLY: {}", stop.describe(&self.target));
            let _ = writeln!(
                out,
                "  {} of {} payments started had finished",
                thousands(self.payments_finished),
                thousands(self.payments_run)
            );
        }
        let _ = writeln!(
            out,
            "  settled {} · {} settlements/s (over {:.1} s to the last settlement)",
            thousands(self.settled),
            thousands(self.settlements_per_sec().round() as u64),
            self.settling_seconds
        );
        let _ = writeln!(
            out,
            "  latency, later half's intended send → both phones told ({} honest payments):",
            thousands(self.latency.count)
        );
        let _ = writeln!(out, "    {}", self.latency.render());
        let _ = writeln!(
            out,
            "  latency, second half sent → its outcome ({} payments):",
            thousands(self.second_half.count)
        );
        let _ = writeln!(out, "    {}", self.second_half.render());
        let kinds: Vec<String> = self
            .kinds
            .iter()
            .map(|(kind, count)| format!("{} {}", kind.name(), thousands(*count)))
            .collect();
        let _ = writeln!(out, "  by kind: {}", kinds.join(" · "));
        if self.audit.is_some() {
            let _ = writeln!(out, "  cpu: {}", self.cpu.render(self.settled));
        } else {
            // A remote node's CPU is another process's: it counts as "other".
            let _ = writeln!(
                out,
                "  cpu: phones {:.2} s ({:.0} µs per settlement) · other processes (the node among them) {}",
                self.cpu.sim_ns as f64 / 1e9,
                self.cpu.sim_ns as f64 / 1e3 / self.settled.max(1) as f64,
                self.cpu
                    .others_ns
                    .map_or("unknown".to_owned(), |ns| format!(
                        "{:.2} s",
                        ns as f64 / 1e9
                    ))
            );
        }
    }

    fn render_answers(&self, out: &mut String) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "answers, expected vs observed (one per phone and step):"
        );
        let _ = writeln!(
            out,
            "  {:<8} {:<48} {:>10} {:>10}",
            "code", "meaning", "expected", "observed"
        );
        for (label, (expected, observed)) in self.outcome_rows() {
            let verdict = if expected == observed { "" } else { "  ✗" };
            let _ = writeln!(
                out,
                "  {:<8} {:<48} {:>10} {:>10}{verdict}",
                label,
                meaning(label),
                thousands(*expected),
                thousands(*observed)
            );
        }
        if self.mismatches == 0 {
            let _ = writeln!(
                out,
                "  all {} answers as expected",
                thousands(self.observations)
            );
        } else {
            let _ = writeln!(
                out,
                "  {} answers differ from the plan; the first:",
                thousands(self.mismatches)
            );
            for example in &self.mismatch_examples {
                let _ = writeln!(out, "    {example}");
            }
        }
    }

    fn render_balances(&self, out: &mut String) {
        if self.stopped.is_some() {
            let _ = writeln!(out, "balances: not asked (the run stopped early)");
        } else if self.balance_mismatches == 0 {
            let _ = writeln!(
                out,
                "balances: {} accounts asked over the wire, every one as the sim expected",
                thousands(self.balances_checked)
            );
        } else {
            let _ = writeln!(
                out,
                "balances: {} of {} differ from the sim's expectation; the first:",
                thousands(self.balance_mismatches),
                thousands(self.balances_checked)
            );
            for example in &self.balance_mismatch_examples {
                let _ = writeln!(out, "    {example}");
            }
        }
        let _ = writeln!(
            out,
            "told: {} outcomes, one per phone and payment (listed in --json under outcomes_told, to check against the node's ledger)",
            thousands(self.told.len() as u64)
        );
    }

    fn render_audit(&self, out: &mut String) {
        match &self.audit {
            Some(audit) => {
                let report = &audit.report;
                let verdict = if audit.is_ok() { "ok" } else { "FAILED" };
                let _ = writeln!(
                    out,
                    "audit: {verdict} · {} accounts, {} settlements, {} rejections, {} halves pending; \
                     user balances {} = issued {}",
                    thousands(report.accounts),
                    thousands(report.settlements),
                    thousands(report.rejections),
                    thousands(report.pending_halves),
                    thousands_u128(report.user_balances_total),
                    thousands(report.issued)
                );
                let problems = report.problems.iter().map(ToString::to_string);
                for problem in problems.chain(audit.count_problems.iter().cloned()) {
                    let _ = writeln!(out, "    {problem}");
                }
                if audit.replicas.len() > 1 {
                    let lines: Vec<String> = audit
                        .replicas
                        .iter()
                        .map(|(id, applied, ok)| {
                            format!(
                                "replica {id} applied {} {}",
                                applied.map_or("-".to_string(), |index| index.to_string()),
                                if *ok { "ok" } else { "FAILED" }
                            )
                        })
                        .collect();
                    let same = if audit.replica_problems.is_empty() {
                        ", identical ledgers"
                    } else {
                        ""
                    };
                    let _ = writeln!(out, "  replicas: {}{same}", lines.join(" · "));
                    for problem in &audit.replica_problems {
                        let _ = writeln!(out, "    {problem}");
                    }
                }
            }
            None if self.stopped.is_some() && self.replicas > 0 => {
                let _ = writeln!(out, "audit: not run (the run stopped early)");
            }
            None if self.replicas > 0 => {
                let _ = writeln!(out, "audit: could not run (see the failures below)");
            }
            None => {
                let _ = writeln!(
                    out,
                    "audit: not available over the wire; run `tapledger-node audit` on the node"
                );
            }
        }
    }

    /// Outcome rows in reading order: settled, then codes ascending, then
    /// anything else.
    pub fn outcome_rows(&self) -> Vec<(&String, &(u64, u64))> {
        let mut rows: Vec<_> = self.outcomes.iter().collect();
        rows.sort_by_key(|(label, _)| match label.as_str() {
            "settled" => (0, 0),
            other => other.parse::<u32>().map_or((2, 0), |code| (1, code)),
        });
        rows
    }

    pub fn to_json(&self) -> serde_json::Value {
        let outcomes: serde_json::Map<String, serde_json::Value> = self
            .outcomes
            .iter()
            .map(|(label, (expected, observed))| {
                (
                    label.clone(),
                    json!({"meaning": meaning(label), "expected": expected, "observed": observed}),
                )
            })
            .collect();
        let kinds: serde_json::Map<String, serde_json::Value> = self
            .kinds
            .iter()
            .map(|(kind, count)| (kind.name().to_owned(), json!(count)))
            .collect();
        let timeline: Vec<serde_json::Value> = self
            .timeline
            .iter()
            .map(|point| {
                json!({
                    "seconds": point.seconds,
                    "settled_per_sec": point.settled_per_sec,
                    "latency_count": point.latency_count,
                    "p50_us": point.p50_us,
                    "p99_us": point.p99_us,
                    "max_us": point.max_us,
                })
            })
            .collect();
        let audit = self.audit.as_ref().map(|audit| {
            json!({
                "ok": audit.is_ok(),
                "accounts": audit.report.accounts,
                "journal_entries": audit.report.journal_entries,
                "fundings": audit.report.fundings,
                "settlements": audit.report.settlements,
                "rejections": audit.report.rejections,
                "pending_halves": audit.report.pending_halves,
                "issued": audit.report.issued,
                "user_balances_total": audit.report.user_balances_total.to_string(),
                "problems": audit.report.problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "count_problems": audit.count_problems,
                "replicas": audit.replicas.iter().map(|(id, applied, ok)| json!({
                    "id": id, "applied_index": applied, "ok": ok,
                })).collect::<Vec<_>>(),
                "replica_problems": audit.replica_problems,
            })
        });
        json!({
            "target": self.target,
            "seed": self.seed,
            "phones": self.phones,
            "endpoints": self.endpoints,
            "payments_planned": self.payments_planned,
            "payments": self.payments_run,
            "fault_share": self.fault_share,
            "rate": self.rate,
            "half_ttl_ms": self.half_ttl_ms,
            "open_accounts_seconds": self.open_accounts_seconds,
            "connect_seconds": self.connect_seconds,
            "seconds": self.seconds,
            "settling_seconds": self.settling_seconds,
            "latency_measured_from": "intended send time of the later half (open loop)",
            "settled": self.settled,
            "settlements_per_sec": self.settlements_per_sec(),
            "latency": self.latency.to_json(),
            "second_half_latency": self.second_half.to_json(),
            "kinds": kinds,
            "outcomes": outcomes,
            "observations": self.observations,
            "mismatches": self.mismatches,
            "mismatch_examples": self.mismatch_examples,
            "balances_checked": self.balances_checked,
            "balance_mismatches": self.balance_mismatches,
            "balance_mismatch_examples": self.balance_mismatch_examples,
            "audit": audit,
            "replicas": self.replicas,
            "failover": self.failover.as_ref().map(FailoverReport::to_json),
            "cpu": self.cpu.to_json(self.settled),
            "timeline_bucket_seconds": TIMELINE_BUCKET.as_secs_f64(),
            "timeline": timeline,
            "notes": self.notes,
            "payments_finished": self.payments_finished,
            "stopped": self.stopped.as_ref().map(|stop| stop.to_json(&self.target)),
            "errors": self.errors,
            "outcomes_told": self.told.iter().map(ToldOutcome::to_json).collect::<Vec<_>>(),
            "failures": self.failures(),
            "passed": self.failures().is_empty(),
        })
    }

    /// Writes [`SwarmReport::to_json`] to `path`, pretty-printed.
    pub fn write_json(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(&self.to_json())?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

impl CpuSplit {
    /// "node 1.2 s (120 µs per settlement) · phones ... · other processes ...".
    pub fn render(&self, settled: u64) -> String {
        let per = |ns: u64| {
            if settled == 0 {
                String::new()
            } else {
                format!(
                    " ({:.0} µs per settlement)",
                    ns as f64 / 1e3 / settled as f64
                )
            }
        };
        let mut text = format!(
            "node {:.2} s{} · phones {:.2} s{} · runnable but waiting for a CPU {:.2} s",
            self.node_ns as f64 / 1e9,
            per(self.node_ns),
            self.sim_ns as f64 / 1e9,
            per(self.sim_ns),
            self.waiting_ns as f64 / 1e9
        );
        if let Some(others) = self.others_ns {
            let _ = write!(text, " · other processes {:.2} s", others as f64 / 1e9);
        }
        text
    }

    pub fn to_json(&self, settled: u64) -> serde_json::Value {
        let per = |ns: u64| (settled > 0).then(|| ns as f64 / 1e3 / settled as f64);
        json!({
            "node_seconds": self.node_ns as f64 / 1e9,
            "phones_seconds": self.sim_ns as f64 / 1e9,
            "waiting_for_cpu_seconds": self.waiting_ns as f64 / 1e9,
            "other_processes_seconds": self.others_ns.map(|ns| ns as f64 / 1e9),
            "node_us_per_settlement": per(self.node_ns),
            "phones_us_per_settlement": per(self.sim_ns),
        })
    }
}

/// What a row label means.
pub fn meaning(label: &str) -> &'static str {
    if label == "settled" {
        return "the payment settled";
    }
    if label == "failed" {
        return "no usable answer (timeout, lost connection, wrong report)";
    }
    match label.parse::<u16>() {
        Ok(code) => RejectCode::from_code(code)
            .map(RejectCode::explanation)
            .or_else(|| ErrorCode::from_code(code).map(ErrorCode::explanation))
            .unwrap_or("unknown code"),
        Err(_) => "unknown",
    }
}
