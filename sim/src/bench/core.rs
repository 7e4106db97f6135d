//! `bench core`: the ledger alone, in process, durable. Opens `accounts`
//! funded accounts, then settles `payments` seeded random payments among them,
//! each as two halves submitted by `concurrency` tasks at once so group commit
//! has work to batch. Measures durable settlements per second, the latency from
//! a payment's second half to its outcome, commits and memory, and the raw
//! fsync and redb commit rates of the same directory to read them against.
//!
//! It checks what it measured: every payment has one outcome that both halves
//! agree on, the counts add up, and the ledger's audit passes; a report with a
//! failed check makes the binary exit non-zero.
//!
//! It deliberately uses only the public `Ledger` API (no network, no TLS, no
//! authentication: the submitter is always the half's own party) and changes
//! nothing inside the ledger; limits are raised only where the workload itself
//! would trip them (lone halves per account, see `ledger_config`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use tapledger_actors::{
    AuditReport, BatchHalf, Heard, Ledger, LedgerConfig, LedgerError, NewAccount, Report,
    Resolution, Submission,
};
use tapledger_protocol::{AccountId, Half, Outcome, ReceiveHalf, SendHalf, TxKey};
use tokio::task::JoinSet;

use super::hardware::{self, Rate};
use super::memory;
use super::threads::{self, Usage};
use crate::text::{MIB, mebibytes, micros, thousands};

/// Account openings in flight at once while setting up (each is one intent
/// for group commit, so they batch like payments do).
const OPEN_CONCURRENCY: usize = 1_024;
/// If no payment finishes for this long the run is stuck: abort it.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the progress bar and the stall check look at the counters.
const PROGRESS_TICK: Duration = Duration::from_millis(200);
/// Latencies above this are recorded as this (one minute, in microseconds).
const LATENCY_US_MAX: u64 = 60_000_000;
/// Client timestamps start here (2023-11-14, in milliseconds); the ledger
/// records them for analysis and never trusts them.
const CLIENT_TIME_BASE_MS: u64 = 1_700_000_000_000;

/// How the two phones of a payment submit their halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HalvesMode {
    /// Both halves at once (the usual tap: both phones talk to the node within
    /// milliseconds); they often meet inside one commit.
    Together,
    /// The second half only after the first is durably pending: two commits
    /// per payment, one of them for a pending half.
    Sequential,
}

impl HalvesMode {
    fn name(self) -> &'static str {
        match self {
            HalvesMode::Together => "together",
            HalvesMode::Sequential => "sequential",
        }
    }
}

/// How payments' `tx_key`s are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyOrder {
    /// UUID v4: uniformly random, as most phones make them (TigerBeetle's
    /// "random ids").
    Random,
    /// UUID v7: a millisecond timestamp first, so keys ascend with the
    /// payment's index (TigerBeetle's "sequential ids").
    TimeOrdered,
}

impl KeyOrder {
    fn name(self) -> &'static str {
        match self {
            KeyOrder::Random => "random (UUID v4)",
            KeyOrder::TimeOrdered => "time-ordered (UUID v7)",
        }
    }

    /// The key of payment `index`, from the payment's random bits.
    fn key(self, index: u64, random: u128) -> TxKey {
        // Version nibble at bits 76..80, variant bits 10 at 62..64.
        let version_and_variant = |bits: u128, version: u128| {
            (bits & !(0xf << 76) & !(0x3 << 62)) | (version << 76) | (0x2 << 62)
        };
        match self {
            KeyOrder::Random => TxKey::from_u128(version_and_variant(random, 4)),
            KeyOrder::TimeOrdered => {
                // 48 bits of milliseconds, then a 12-bit counter within the
                // millisecond (RFC 9562's "rand_a" used as a counter), then
                // random bits: strictly ascending with `index`.
                let millis = u128::from(CLIENT_TIME_BASE_MS + index / 4096);
                let counter = u128::from(index % 4096);
                let bits = (millis << 80) | (counter << 64) | (random & u128::from(u64::MAX));
                TxKey::from_u128(version_and_variant(bits, 7))
            }
        }
    }
}

/// What to run. [`CoreBenchConfig::default`] is the documented default run.
#[derive(Clone, Debug)]
pub struct CoreBenchConfig {
    /// Payments to make, each of two halves.
    pub payments: u64,
    /// Accounts to open before the payments start (at least 2).
    pub accounts: u64,
    /// Matcher shards of the ledger.
    pub shards: usize,
    /// Payments in flight at once, one task each.
    pub concurrency: usize,
    /// Seeds the workload: the same seed makes the same payments.
    pub seed: u64,
    /// Directory to create the run's own temporary directory in (the ledger
    /// file and the disk probes go there); the system temp dir if `None`.
    pub dir: Option<PathBuf>,
    pub halves: HalvesMode,
    pub keys: KeyOrder,
    /// Every account's opening balance, in minor units.
    pub opening_balance: u64,
    /// Payment amounts are uniform in `1 ..= amount_max` minor units.
    pub amount_max: u64,
    /// How long each disk probe (fdatasync, redb commit) runs.
    pub probe: Duration,
    /// Show phases and a progress bar on stderr (hidden when not a terminal).
    pub progress: bool,
}

impl Default for CoreBenchConfig {
    fn default() -> CoreBenchConfig {
        CoreBenchConfig {
            payments: 1_000_000,
            accounts: 10_000,
            shards: 2,
            concurrency: 4_096,
            seed: 1,
            dir: None,
            halves: HalvesMode::Together,
            keys: KeyOrder::Random,
            opening_balance: 100_000,
            amount_max: 10_000,
            probe: Duration::from_secs(2),
            progress: false,
        }
    }
}

/// Latency percentiles from a payment's second half to its outcome (the
/// swarm's summary type, so both reports read the same).
pub use crate::swarm::report::LatencySummary;

/// Resident memory around starting one idle actor per account. The actors are
/// started after every account's balance was read once, so redb's page cache
/// is already warm and the difference is the actors and their registry entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActorMemory {
    pub actors: u64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
}

impl ActorMemory {
    pub fn bytes_per_actor(&self) -> f64 {
        if self.actors == 0 {
            return 0.0;
        }
        self.rss_after_bytes.saturating_sub(self.rss_before_bytes) as f64 / self.actors as f64
    }
}

/// Everything one run measured and checked.
#[derive(Clone, Debug)]
pub struct CoreBenchReport {
    pub payments: u64,
    pub accounts: u64,
    pub shards: usize,
    pub concurrency: usize,
    pub runtime_workers: usize,
    pub seed: u64,
    pub halves: HalvesMode,
    pub keys: KeyOrder,
    /// Where the ledger file and the probes were written.
    pub dir: PathBuf,
    pub open_accounts_seconds: f64,
    /// Payments both halves saw settle.
    pub settled: u64,
    /// Payments both halves saw rejected, by rejection code.
    pub rejected: BTreeMap<u16, u64>,
    /// Payments with a half refused on its own, by refusal code.
    pub refused: BTreeMap<u16, u64>,
    /// Payments with a half that ended in a ledger error.
    pub errors: u64,
    /// Payments whose halves heard different outcomes, or an outcome of another key.
    pub inconsistent: u64,
    pub first_error: Option<String>,
    /// Payments whose first half was written as pending before its partner
    /// was decided (the rest met their partner within one commit).
    pub first_stored_pending: u64,
    /// Wall time of the payment phase: first submission to last outcome.
    pub seconds: f64,
    pub latency: LatencySummary,
    /// Commits and intents during the payment phase only.
    pub commits: u64,
    pub intents_committed: u64,
    /// Commits proposed while the one before was still in flight.
    pub commits_pipelined: u64,
    pub fsync: Rate,
    pub redb_commit: Rate,
    /// Sequential write bandwidth; `count` is bytes.
    pub write_bandwidth: Rate,
    /// CPU per thread name and bytes written to storage during the payments.
    pub usage: Usage,
    /// CPUs the process may use.
    pub cpus: usize,
    /// Peak RSS over the whole run, the audit included.
    pub peak_rss_bytes: Option<u64>,
    /// Peak RSS by the end of the payments: what the ledger itself needed
    /// to open the accounts and settle, before the audit's own maps.
    pub peak_rss_settling_bytes: Option<u64>,
    pub live_account_actors: usize,
    pub account_actors_started: u64,
    pub actor_memory: Option<ActorMemory>,
    pub audit: AuditReport,
    /// Matcher keys still in flight and lone halves after the run (both 0).
    pub keys_in_flight: usize,
    pub lone_halves: usize,
}

impl CoreBenchReport {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// Payments accounted for in some outcome class; equals `payments` when
    /// every payment finished.
    pub fn outcomes_total(&self) -> u64 {
        self.settled
            + self.rejected_total()
            + self.refused_total()
            + self.errors
            + self.inconsistent
    }

    pub fn settlements_per_sec(&self) -> f64 {
        per(self.settled as f64, self.seconds)
    }

    /// CPU of every thread of the process during the payments (the driver
    /// included), per settlement, in microseconds; `None` where threads'
    /// times cannot be read.
    pub fn cpu_us_per_settlement(&self) -> Option<f64> {
        if self.usage.by_name.is_empty() || self.settled == 0 {
            return None;
        }
        Some(self.usage.run_ns() as f64 / 1e3 / self.settled as f64)
    }

    pub fn settlements_per_commit(&self) -> f64 {
        per(self.settled as f64, self.commits as f64)
    }

    pub fn commits_per_sec(&self) -> f64 {
        per(self.commits as f64, self.seconds)
    }

    /// Every check that failed; empty means the run is trustworthy.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if !self.audit.is_ok() {
            failures.push(format!(
                "audit found {} problems, first: {}",
                self.audit.problems.len(),
                self.audit
                    .problems
                    .first()
                    .map_or_else(String::new, ToString::to_string)
            ));
        }
        if self.outcomes_total() != self.payments {
            failures.push(format!(
                "{} payments made but {} outcomes counted",
                self.payments,
                self.outcomes_total()
            ));
        }
        if self.audit.settlements != self.settled {
            failures.push(format!(
                "the ledger recorded {} settlements but the tasks saw {}",
                self.audit.settlements, self.settled
            ));
        }
        if self.audit.rejections != self.rejected_total() {
            failures.push(format!(
                "the ledger recorded {} rejections but the tasks saw {}",
                self.audit.rejections,
                self.rejected_total()
            ));
        }
        if self.audit.pending_halves != 0 || self.lone_halves != 0 || self.keys_in_flight != 0 {
            failures.push(format!(
                "left behind: {} pending halves in storage, {} lone halves and {} keys in the matchers",
                self.audit.pending_halves, self.lone_halves, self.keys_in_flight
            ));
        }
        if self.errors != 0 {
            failures.push(format!(
                "{} payments ended in a ledger error, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("")
            ));
        }
        if self.inconsistent != 0 {
            failures.push(format!(
                "{} payments had halves that heard different outcomes",
                self.inconsistent
            ));
        }
        failures
    }

    /// The figures as JSON (keys are stable: scripts read them).
    pub fn to_json(&self) -> serde_json::Value {
        let codes = |counts: &BTreeMap<u16, u64>| {
            counts
                .iter()
                .map(|(code, count)| (code.to_string(), serde_json::json!(count)))
                .collect::<serde_json::Map<_, _>>()
        };
        let redb_per_sec = self.redb_commit.per_sec();
        let mut json = serde_json::json!({
            "settlements": self.settled,
            "seconds": self.seconds,
            "settlements_per_sec": self.settlements_per_sec(),
            "p50_us": self.latency.p50_us,
            "p99_us": self.latency.p99_us,
            "commits": self.commits,
            "fsync_per_sec": self.fsync.per_sec(),
            "redb_commits_per_sec": self.redb_commit.per_sec(),
            "settlements_per_commit": self.settlements_per_commit(),
            "settlements_per_fsync": per(self.settlements_per_sec(), self.fsync.per_sec()),
            "settlements_per_redb_commit": per(self.settlements_per_sec(), redb_per_sec),
        });
        let rss_per_live_actor = self.actor_memory.map(|memory| memory.bytes_per_actor());
        let details = serde_json::json!({
            "intents_committed": self.intents_committed,
            "commits_pipelined": self.commits_pipelined,
            "payments": self.payments,
            "accounts": self.accounts,
            "shards": self.shards,
            "concurrency": self.concurrency,
            "runtime_workers": self.runtime_workers,
            "seed": self.seed,
            "halves": self.halves.name(),
            "keys": self.keys.name(),
            "rejected": self.rejected_total(),
            "rejected_by_code": codes(&self.rejected),
            "refused": self.refused_total(),
            "refused_by_code": codes(&self.refused),
            "errors": self.errors,
            "inconsistent": self.inconsistent,
            "first_halves_stored_pending": self.first_stored_pending,
            "p90_us": self.latency.p90_us,
            "p999_us": self.latency.p999_us,
            "max_us": self.latency.max_us,
            "mean_us": self.latency.mean_us,
            "open_accounts_seconds": self.open_accounts_seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_settling_bytes": self.peak_rss_settling_bytes,
            "live_account_actors": self.live_account_actors,
            "account_actors_started": self.account_actors_started,
            "rss_per_live_actor_bytes": rss_per_live_actor,
        });
        let cpu_by_thread = self
            .usage
            .by_name
            .iter()
            .map(|(name, group)| {
                let times = serde_json::json!({
                    "threads": group.threads,
                    "run_seconds": group.run_ns as f64 / 1e9,
                    "runnable_waiting_seconds": group.wait_ns as f64 / 1e9,
                });
                (name.clone(), times)
            })
            .collect::<serde_json::Map<_, _>>();
        let write_bytes_per_settlement = self
            .usage
            .write_bytes
            .map(|bytes| per(bytes as f64, self.settled as f64));
        let others_cpu_seconds = self
            .usage
            .others_busy_ns()
            .map(|others| others as f64 / 1e9);
        let hardware_and_checks = serde_json::json!({
            "write_bandwidth_bytes_per_sec": self.write_bandwidth.per_sec(),
            "disk_write_bytes": self.usage.write_bytes,
            "disk_write_bytes_per_settlement": write_bytes_per_settlement,
            "cpu_seconds_by_thread": cpu_by_thread,
            "cpu_us_per_settlement": self.cpu_us_per_settlement(),
            "other_processes_cpu_seconds": others_cpu_seconds,
            "audit_ok": self.audit.is_ok(),
            "failures": self.failures(),
        });
        let object = json.as_object_mut().expect("an object");
        for extra in [details, hardware_and_checks] {
            if let serde_json::Value::Object(extra) = extra {
                object.extend(extra);
            }
        }
        json
    }

    /// The report people read.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_setup(&mut out);
        self.render_outcomes(&mut out);
        self.render_throughput(&mut out);
        self.render_hardware(&mut out);
        self.render_cpu(&mut out);
        self.render_memory(&mut out);
        self.render_checks(&mut out);
        out
    }

    /// The workload, where it ran and how long setup took.
    fn render_setup(&self, out: &mut String) {
        let _ = writeln!(out, "tapledger bench core");
        let _ = writeln!(
            out,
            "  workload      {} payments among {} accounts, seed {}, halves {}, keys {}, {} in flight, {} matcher shard(s), {} runtime worker(s)",
            thousands(self.payments),
            thousands(self.accounts),
            self.seed,
            self.halves.name(),
            self.keys.name(),
            thousands(self.concurrency as u64),
            self.shards,
            self.runtime_workers
        );
        let _ = writeln!(out, "  directory     {}", self.dir.display());
        let _ = writeln!(
            out,
            "  setup         {} accounts opened in {:.2} s",
            thousands(self.accounts),
            self.open_accounts_seconds
        );
    }

    /// What the payments ended as.
    fn render_outcomes(&self, out: &mut String) {
        let _ = writeln!(out, "outcomes");
        let _ = writeln!(out, "  settled       {}", thousands(self.settled));
        for (code, count) in &self.rejected {
            let _ = writeln!(out, "  rejected {code}  {}", thousands(*count));
        }
        for (code, count) in &self.refused {
            let _ = writeln!(out, "  refused {code}   {}", thousands(*count));
        }
        if self.errors != 0 || self.inconsistent != 0 {
            let _ = writeln!(
                out,
                "  errors        {}   inconsistent {}",
                self.errors, self.inconsistent
            );
        }
    }

    /// Durable throughput, commits, and latency.
    fn render_throughput(&self, out: &mut String) {
        let _ = writeln!(out, "throughput (durable)");
        let _ = writeln!(
            out,
            "  settlements   {:>12.0} /s   ({} in {:.2} s)",
            self.settlements_per_sec(),
            thousands(self.settled),
            self.seconds
        );
        let _ = writeln!(
            out,
            "  commits       {:>12}      {:.0} /s, {:.1} settlements and {:.1} intents per commit; {} proposed while the one before was in flight",
            thousands(self.commits),
            self.commits_per_sec(),
            self.settlements_per_commit(),
            per(self.intents_committed as f64, self.commits as f64),
            thousands(self.commits_pipelined)
        );
        let _ = writeln!(
            out,
            "  pairing       {:.1}% of first halves were written as pending (and deleted a commit later); the rest met their partner inside one commit",
            100.0 * per(self.first_stored_pending as f64, self.payments as f64)
        );
        let _ = writeln!(out, "latency, second half to outcome");
        let _ = writeln!(
            out,
            "  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {})",
            micros(self.latency.p50_us),
            micros(self.latency.p90_us),
            micros(self.latency.p99_us),
            micros(self.latency.p999_us),
            micros(self.latency.max_us),
            micros(self.latency.mean_us as u64)
        );
    }

    /// The disk's raw rates, and the run read against them.
    fn render_hardware(&self, out: &mut String) {
        let fsync_per_sec = self.fsync.per_sec();
        let redb_per_sec = self.redb_commit.per_sec();
        let _ = writeln!(out, "hardware, same directory");
        let _ = writeln!(
            out,
            "  fdatasync     {:>12.0} /s   (4 KiB overwrite + fdatasync, {:.1} s)",
            fsync_per_sec, self.fsync.seconds
        );
        let _ = writeln!(
            out,
            "  redb commit   {:>12.0} /s   (one insert per write txn, Durability::Immediate, {:.1} s)",
            redb_per_sec, self.redb_commit.seconds
        );
        let _ = writeln!(
            out,
            "  ratios        {:.1} settlements per fdatasync-equivalent, {:.1} per raw redb commit; ledger commits ran at {:.0}% of the raw redb commit rate",
            per(self.settlements_per_sec(), fsync_per_sec),
            per(self.settlements_per_sec(), redb_per_sec),
            100.0 * per(self.commits_per_sec(), redb_per_sec)
        );
        let _ = writeln!(
            out,
            "  write bandwidth {:>10.0} MiB/s (1 MiB sequential writes + fdatasync)",
            self.write_bandwidth.per_sec() / MIB
        );
        if let Some(bytes) = self.usage.write_bytes {
            let _ = writeln!(
                out,
                "  ledger wrote  {:>12.0} MiB/s   ({:.0} MiB during payments: {:.0} bytes per settlement, {:.1} MiB per commit; {:.0}% of the write bandwidth)",
                per(bytes as f64 / MIB, self.seconds),
                bytes as f64 / MIB,
                per(bytes as f64, self.settled as f64),
                per(bytes as f64 / MIB, self.commits as f64),
                100.0
                    * per(
                        per(bytes as f64, self.seconds),
                        self.write_bandwidth.per_sec()
                    )
            );
        }
    }

    /// CPU per thread group, per settlement, and what else ran.
    fn render_cpu(&self, out: &mut String) {
        if !self.usage.by_name.is_empty() {
            let _ = writeln!(
                out,
                "cpu during payments ({} CPUs x {:.2} s = {:.2} CPU-s available)",
                self.cpus,
                self.seconds,
                self.cpus as f64 * self.seconds
            );
            let mut used = 0.0;
            for (name, group) in &self.usage.by_name {
                let run = group.run_ns as f64 / 1e9;
                used += run;
                if run < 0.005 && group.wait_ns < 5_000_000 {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "  {:<16} {:>2} thread(s) {:>8.2} CPU-s ({:>3.0}% of wall), {:>6.2} s runnable but waiting for a CPU",
                    name,
                    group.threads,
                    run,
                    100.0 * per(run, self.seconds),
                    group.wait_ns as f64 / 1e9
                );
            }
            if let Some(cpu) = self.cpu_us_per_settlement() {
                let _ = writeln!(
                    out,
                    "  {:<30}{:>8.1} µs of CPU (every thread above, the driver included)",
                    "per settlement", cpu
                );
            }
            if let Some(others) = self.usage.others_busy_ns() {
                let others = others as f64 / 1e9;
                used += others;
                let _ = writeln!(
                    out,
                    "  {:<30}{:>8.2} CPU-s{}",
                    "other processes",
                    others,
                    if others > 0.1 * self.seconds {
                        "  (the machine was not quiet: figures are lower than they should be)"
                    } else {
                        ""
                    }
                );
            }
            let _ = writeln!(
                out,
                "  {:<30}{:>8.2} CPU-s",
                "idle or waiting for IO",
                (self.cpus as f64 * self.seconds - used).max(0.0)
            );
        }
    }

    /// RSS and actors.
    fn render_memory(&self, out: &mut String) {
        let _ = writeln!(out, "memory");
        let _ = writeln!(
            out,
            "  peak RSS      {} opening and settling; {} with the audit",
            self.peak_rss_settling_bytes
                .map_or("unknown".into(), mebibytes),
            self.peak_rss_bytes.map_or("unknown".into(), mebibytes)
        );
        let _ = writeln!(
            out,
            "  live actors   {} account actors ({} started)",
            thousands(self.live_account_actors as u64),
            thousands(self.account_actors_started)
        );
        if let Some(memory) = self.actor_memory {
            let _ = writeln!(
                out,
                "  per actor     {:.0} bytes of RSS (RSS {} -> {} starting {} idle actors, page cache warmed first)",
                memory.bytes_per_actor(),
                mebibytes(memory.rss_before_bytes),
                mebibytes(memory.rss_after_bytes),
                thousands(memory.actors)
            );
        }
    }

    /// The audit and the run's own checks.
    fn render_checks(&self, out: &mut String) {
        let _ = writeln!(out, "checks");
        let _ = writeln!(
            out,
            "  audit         {} ({} settlements, {} rejections, {} fundings, {} pending halves)",
            if self.audit.is_ok() { "ok" } else { "FAILED" },
            thousands(self.audit.settlements),
            thousands(self.audit.rejections),
            thousands(self.audit.fundings),
            self.audit.pending_halves
        );
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(
                out,
                "  counts        ok (every payment has one outcome both halves agree on)"
            );
        }
        for failure in failures {
            let _ = writeln!(out, "  FAILED        {failure}");
        }
    }
}

/// Throughput, CPU and latency of runs that differ in payments in flight.
pub fn in_flight_table(reports: &[CoreBenchReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "by payments in flight");
    let _ = writeln!(
        out,
        "  {:>9}  {:>14}  {:>13}  {:>10}  {:>10}  {:>6}",
        "in flight", "settlements/s", "CPU/settlement", "p50", "p99", "audit"
    );
    for report in reports {
        let cpu = report
            .cpu_us_per_settlement()
            .map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.1} µs"));
        let _ = writeln!(
            out,
            "  {:>9}  {:>14.0}  {:>13}  {:>10}  {:>10}  {:>6}",
            thousands(report.concurrency as u64),
            report.settlements_per_sec(),
            cpu,
            micros(report.latency.p50_us),
            micros(report.latency.p99_us),
            if report.failures().is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        );
    }
    out
}

/// The raw rates of the run's directory, measured once per run so that
/// every figure is read against the same disk.
#[derive(Clone, Copy, Debug)]
pub struct DiskProbes {
    pub fsync: Rate,
    pub redb_commit: Rate,
    pub write_bandwidth: Rate,
}

/// Runs the benchmark on the current (multi-threaded) tokio runtime.
pub async fn run(config: &CoreBenchConfig) -> anyhow::Result<CoreBenchReport> {
    let (parent, work_dir) = prepare(config)?;
    phase(config, "measuring the disk (fdatasync, redb commits)...");
    let disk = probe_disk(work_dir.path(), config.probe).await?;
    let ledger = Arc::new(
        Ledger::open(ledger_config(config, work_dir.path()))
            .await
            .context("cannot open the ledger")?,
    );
    let report = measure(config, &ledger, &parent, disk).await?;
    match Arc::try_unwrap(ledger) {
        Ok(ledger) => ledger.close().await,
        Err(_) => bail!("the ledger is still shared after every task ended"),
    }
    Ok(report)
}

/// Checks the configuration and makes the run's temporary directory: returns
/// its parent (what the report names) and the directory.
pub fn prepare(config: &CoreBenchConfig) -> anyhow::Result<(PathBuf, tempfile::TempDir)> {
    if config.accounts < 2 {
        bail!("--accounts must be at least 2 (a payment needs two parties)");
    }
    if config.payments == 0 || config.concurrency == 0 || config.shards == 0 {
        bail!("--payments, --concurrency and --shards must be at least 1");
    }
    if config.amount_max == 0 {
        bail!("--amount-max must be at least 1");
    }
    let parent = match &config.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let work_dir = tempfile::Builder::new()
        .prefix("tapledger-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
    Ok((parent, work_dir))
}

/// A phase of the run on stderr, unless the run is quiet.
pub(crate) fn phase(config: &CoreBenchConfig, text: &str) {
    if config.progress {
        eprintln!("{text}");
    }
}

/// The measured part of the run on an open ledger (a replica that leads, for
/// a cluster): opens the accounts, starts their actors, settles the
/// payments, audits. `dir` is what the report names as the directory.
pub async fn measure(
    config: &CoreBenchConfig,
    ledger: &Arc<Ledger>,
    dir: &Path,
    disk: DiskProbes,
) -> anyhow::Result<CoreBenchReport> {
    let phase = |text: &str| phase(config, text);
    phase(&format!(
        "opening {} accounts...",
        thousands(config.accounts)
    ));
    let open_started = Instant::now();
    let accounts = open_accounts(ledger, config.accounts, config.opening_balance).await?;
    let open_accounts_seconds = open_started.elapsed().as_secs_f64();

    let actor_memory = if accounts.len() <= PRESTART_ACTORS_MAX {
        phase("starting one account actor per account...");
        start_account_actors(ledger, &accounts).await?
    } else {
        // Millions of idle actors would only measure memory the ledger
        // never spends: its actors start on first use and retire when idle.
        phase(&format!(
            "more than {} accounts: actors start on demand",
            thousands(PRESTART_ACTORS_MAX as u64)
        ));
        None
    };

    let workload = Arc::new(Workload {
        seed: config.seed,
        payments: config.payments,
        accounts,
        amount_max: config.amount_max,
        halves: config.halves,
        keys: config.keys,
    });
    phase(&format!(
        "settling {} payments, {} in flight...",
        thousands(config.payments),
        thousands(config.concurrency as u64)
    ));
    let stats_before = ledger.stats().await;
    let threads_before = threads::Snapshot::take();
    let started = Instant::now();
    let tally = pay_all(ledger, &workload, config.concurrency, config.progress).await?;
    let seconds = started.elapsed().as_secs_f64();
    let usage = threads_before.usage_until(&threads::Snapshot::take());
    let stats_after = ledger.stats().await;
    let peak_rss_settling_bytes = memory::peak_rss_bytes();

    phase("auditing the books...");
    ledger.flush().await.context("final flush")?;
    let tapledger_actors::MatcherStats {
        keys_in_flight,
        lone_halves,
    } = ledger.matcher_stats().await?;
    let audit = {
        let ledger = ledger.clone();
        on_named_thread("bench-audit", move || ledger.audit()).await??
    };
    let peak_rss_bytes = memory::peak_rss_bytes();
    let latency = LatencySummary::of(&tally.latency_histogram());

    Ok(CoreBenchReport {
        payments: config.payments,
        accounts: config.accounts,
        shards: config.shards,
        concurrency: config.concurrency,
        runtime_workers: tokio::runtime::Handle::current().metrics().num_workers(),
        seed: config.seed,
        halves: config.halves,
        keys: config.keys,
        dir: dir.to_owned(),
        open_accounts_seconds,
        settled: tally.settled,
        rejected: tally.rejected,
        refused: tally.refused,
        errors: tally.errors,
        inconsistent: tally.inconsistent,
        first_error: tally.first_error,
        first_stored_pending: tally.first_stored_pending,
        seconds,
        latency,
        commits: stats_after.commits - stats_before.commits,
        intents_committed: stats_after.intents_committed - stats_before.intents_committed,
        commits_pipelined: stats_after.commits_pipelined - stats_before.commits_pipelined,
        fsync: disk.fsync,
        redb_commit: disk.redb_commit,
        write_bandwidth: disk.write_bandwidth,
        usage,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        peak_rss_bytes,
        peak_rss_settling_bytes,
        live_account_actors: stats_after.live_account_actors,
        account_actors_started: stats_after.account_actors_started,
        actor_memory,
        audit,
        keys_in_flight,
        lone_halves,
    })
}

/// The ledger's defaults, except: the shard count asked for, and a cap on lone
/// halves per account no lower than the payments in flight. With many
/// payments in flight among few accounts the default cap (64) would refuse a
/// first half with 800, and its partner would then wait out the whole TTL.
pub(crate) fn ledger_config(config: &CoreBenchConfig, dir: &Path) -> LedgerConfig {
    let mut ledger_config = LedgerConfig::new(dir.join("ledger.redb"));
    tune_ledger(config, &mut ledger_config);
    ledger_config
}

/// What `ledger_config` changes from the defaults, for a ledger configured
/// elsewhere (a cluster's replicas).
pub fn tune_ledger(config: &CoreBenchConfig, ledger_config: &mut LedgerConfig) {
    ledger_config.matcher_shards = config.shards;
    let in_flight = u32::try_from(config.concurrency).unwrap_or(u32::MAX);
    ledger_config.pending_halves_per_account_max =
        ledger_config.pending_halves_per_account_max.max(in_flight);
}

/// Measures the raw rates of `dir`'s disk, each for `duration`.
pub async fn probe_disk(dir: &Path, duration: Duration) -> anyhow::Result<DiskProbes> {
    let dir = dir.to_owned();
    on_named_thread("bench-disk-probe", move || -> anyhow::Result<DiskProbes> {
        let fsync = hardware::fdatasync_rate(&dir, duration).context("fdatasync probe")?;
        let redb_commit =
            hardware::redb_commit_rate(&dir, duration).context("redb commit probe")?;
        let write_bandwidth =
            hardware::write_bandwidth(&dir, duration / 2).context("write bandwidth probe")?;
        Ok(DiskProbes {
            fsync,
            redb_commit,
            write_bandwidth,
        })
    })
    .await?
}

/// Runs blocking work on a thread of its own, named so that profiles and the
/// per-thread CPU figures keep it apart from the runtime's threads.
async fn on_named_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = sender.send(work());
        })
        .with_context(|| format!("cannot start thread {name}"))?;
    receiver
        .await
        .with_context(|| format!("thread {name} ended without an answer"))
}

/// Opens `count` accounts, many at once so their commits batch. Returns their
/// ids in ascending order.
pub(crate) async fn open_accounts(
    ledger: &Arc<Ledger>,
    count: u64,
    opening_balance: u64,
) -> anyhow::Result<Vec<AccountId>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..OPEN_CONCURRENCY.min(usize::try_from(count).unwrap_or(usize::MAX)) {
        let ledger = ledger.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                ids.push(ledger.open_account(new_account(opening_balance)).await?);
            }
            Ok::<_, LedgerError>(ids)
        });
    }
    let mut ids = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    while let Some(joined) = tasks.join_next().await {
        ids.extend(joined.context("account opening task")??);
    }
    ids.sort_unstable();
    ids.dedup();
    if ids.len() as u64 != count {
        bail!("opened {count} accounts but got {} distinct ids", ids.len());
    }
    Ok(ids)
}

/// The bench authenticates nobody, so the key material is a fixed placeholder.
fn new_account(opening_balance: u64) -> NewAccount {
    NewAccount {
        account_type: "checking".into(),
        bank_name: "Bench Bank".into(),
        salt: vec![0x5a; 16],
        key_hash: vec![0xa5; 64],
        opening_balance,
    }
}

/// Accounts up to which every actor is started before the payments.
const PRESTART_ACTORS_MAX: usize = 100_000;

/// Starts every account's actor before the payments (as a busy node would have
/// them) and measures what that cost in resident memory.
async fn start_account_actors(
    ledger: &Ledger,
    accounts: &[AccountId],
) -> anyhow::Result<Option<ActorMemory>> {
    // Read every balance once so that redb's cache holds the pages the actors
    // load from, and their growth is not counted against the actors.
    for &account in accounts {
        ledger.balance(account)?;
    }
    let live_before = ledger.stats().await.live_account_actors;
    let rss_before = memory::rss_bytes();
    for &account in accounts {
        ledger.live_balance(account).await?;
    }
    let rss_after = memory::rss_bytes();
    let live_after = ledger.stats().await.live_account_actors;
    Ok(match (rss_before, rss_after) {
        (Some(rss_before_bytes), Some(rss_after_bytes)) => Some(ActorMemory {
            actors: (live_after - live_before) as u64,
            rss_before_bytes,
            rss_after_bytes,
        }),
        _ => None,
    })
}

/// The seeded payments. Payment `index` depends only on the seed and the
/// index, so the workload is the same whatever the task scheduling.
pub(crate) struct Workload {
    pub(crate) seed: u64,
    pub(crate) payments: u64,
    pub(crate) accounts: Vec<AccountId>,
    pub(crate) amount_max: u64,
    pub(crate) halves: HalvesMode,
    pub(crate) keys: KeyOrder,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    pub tx_key: TxKey,
    pub sender: AccountId,
    pub receiver: AccountId,
    pub amount: u64,
    /// Which phone's half reaches the node first.
    pub send_first: bool,
    pub index: u64,
}

impl Workload {
    pub(crate) fn payment(&self, index: u64) -> Payment {
        payment(self.seed, index, &self.accounts, self.amount_max, self.keys)
    }
}

/// Payment `index` of the workload seeded with `seed`, between two distinct
/// accounts of `accounts` (at least two).
pub fn payment(
    seed: u64,
    index: u64,
    accounts: &[AccountId],
    amount_max: u64,
    keys: KeyOrder,
) -> Payment {
    let mut rng =
        Xoshiro256PlusPlus::seed_from_u64(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let count = accounts.len();
    let sender_slot = rng.random_range(0..count);
    let receiver_slot = (sender_slot + 1 + rng.random_range(0..count - 1)) % count;
    let random: u128 = rng.random();
    Payment {
        tx_key: keys.key(index, random),
        sender: accounts[sender_slot],
        receiver: accounts[receiver_slot],
        amount: rng.random_range(1..=amount_max),
        send_first: rng.random(),
        index,
    }
}

impl Payment {
    fn send_half(&self) -> Half {
        Half::Send(SendHalf {
            tx_key: self.tx_key,
            sender_id: self.sender,
            amount: self.amount,
            device_os: "ios 18.2".into(),
            client_time: CLIENT_TIME_BASE_MS + self.index,
        })
    }

    fn receive_half(&self) -> Half {
        Half::Receive(ReceiveHalf {
            tx_key: self.tx_key,
            receiver_id: self.receiver,
            expected_sender_id: self.sender,
            expected_amount: self.amount,
            device_os: "android 15".into(),
            client_time: CLIENT_TIME_BASE_MS + self.index,
        })
    }
}

/// What each task counted; merged at the end.
struct Tally {
    settled: u64,
    rejected: BTreeMap<u16, u64>,
    refused: BTreeMap<u16, u64>,
    errors: u64,
    inconsistent: u64,
    first_stored_pending: u64,
    first_error: Option<String>,
    /// Second half to outcome, in microseconds, one per agreed payment. A
    /// plain vector per task: thousands of tasks each with a histogram of
    /// its own would cost hundreds of MiB and page faults in the measured
    /// phase.
    latencies_us: Vec<u32>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            settled: 0,
            rejected: BTreeMap::new(),
            refused: BTreeMap::new(),
            errors: 0,
            inconsistent: 0,
            first_stored_pending: 0,
            first_error: None,
            latencies_us: Vec::new(),
        }
    }

    /// The latencies as a histogram.
    fn latency_histogram(&self) -> Histogram<u64> {
        let mut histogram =
            Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds");
        for &latency in &self.latencies_us {
            histogram.saturating_record(u64::from(latency).clamp(1, LATENCY_US_MAX));
        }
        histogram
    }

    fn record(&mut self, payment: &Payment, paid: Paid) {
        let Paid {
            send,
            receive,
            latency,
            first_stored_pending,
        } = paid;
        self.first_stored_pending += u64::from(first_stored_pending);
        match (send, receive) {
            (Ok(Resolution::Final(send)), Ok(Resolution::Final(receive))) => {
                let agree = Arc::ptr_eq(&send, &receive) || send == receive;
                if !agree || send.tx_key() != payment.tx_key {
                    self.inconsistent += 1;
                    return;
                }
                self.latencies_us
                    .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
                match &*send {
                    Outcome::Settled(_) => self.settled += 1,
                    Outcome::Rejected(rejection) => {
                        *self.rejected.entry(rejection.code.code()).or_insert(0) += 1
                    }
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                self.errors += 1;
                self.first_error
                    .get_or_insert_with(|| format!("payment {}: {error}", payment.tx_key));
            }
            (Ok(Resolution::Refused(code)), _) | (_, Ok(Resolution::Refused(code))) => {
                *self.refused.entry(code.code()).or_insert(0) += 1
            }
        }
    }
}

/// What the two phones of one payment heard.
pub(crate) struct Paid {
    pub(crate) send: Result<Resolution, LedgerError>,
    pub(crate) receive: Result<Resolution, LedgerError>,
    /// From the second half's submission to its outcome.
    latency: Duration,
    /// The first half was written to storage as pending (its partner did not
    /// reach a decision in the same commit).
    first_stored_pending: bool,
}

/// Runs every payment of `workload` with `concurrency` payments in flight,
/// from one driver task: it hands halves to the ledger in batches
/// ([`Ledger::submit_batch`]) and hears every answer on one channel, so
/// that the load generator costs little beside the ledger it measures. It
/// aborts if the run stops making progress.
async fn pay_all(
    ledger: &Arc<Ledger>,
    workload: &Arc<Workload>,
    concurrency: usize,
    show_progress: bool,
) -> anyhow::Result<Tally> {
    let progress = if show_progress {
        ProgressBar::with_draw_target(Some(workload.payments), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {human_pos}/{human_len} payments, {per_sec}, eta {eta}",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    let mut driver = Driver::new(workload.clone(), concurrency);
    let (sink, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let mut received = Vec::with_capacity(8_192);
    let mut ticker = tokio::time::interval(PROGRESS_TICK);
    let mut last_done = 0;
    let mut last_change = Instant::now();
    loop {
        let batch = driver.next_halves();
        if !batch.is_empty() {
            ledger.submit_batch(batch, &sink);
        }
        if driver.finished() {
            break;
        }
        tokio::select! {
            count = reports.recv_many(&mut received, 8_192) => {
                // The driver holds a sender, so the channel cannot close.
                debug_assert!(count > 0);
                for report in received.drain(..) {
                    driver.heard(report);
                }
            }
            _ = ticker.tick() => {
                let done = driver.done;
                progress.set_position(done);
                if done != last_done {
                    last_done = done;
                    last_change = Instant::now();
                } else if last_change.elapsed() > STALL_TIMEOUT {
                    progress.abandon();
                    bail!("no payment finished for {STALL_TIMEOUT:?} ({done} of {} done); aborting", workload.payments);
                }
            }
        }
    }
    progress.set_position(driver.done);
    progress.finish_and_clear();
    Ok(driver.tally)
}

/// One payment in flight in the driver.
struct Paying {
    payment: Payment,
    /// The halves in the order the phones submit them (index 0 first).
    results: [Option<Result<Resolution, LedgerError>>; 2],
    first_stored_pending: bool,
    /// When the second half was handed over; `None` until then.
    second_submitted: Option<Instant>,
    /// When the second half heard its resolution.
    second_resolved: Option<Instant>,
}

/// The driver's payments in flight, by workload index. Tags are
/// `index * 2 + n`, where half `n` is the `n`th its payment submits.
struct Driver {
    workload: Arc<Workload>,
    concurrency: usize,
    next: u64,
    done: u64,
    /// By payment index (the driver's own keys, so foldhash's fast hasher).
    paying: foldhash::HashMap<u64, Paying>,
    /// Halves to hand over with the next batch.
    queued: Vec<BatchHalf>,
    tally: Tally,
}

impl Driver {
    fn new(workload: Arc<Workload>, concurrency: usize) -> Driver {
        Driver {
            workload,
            concurrency,
            next: 0,
            done: 0,
            paying: foldhash::HashMap::with_capacity_and_hasher(concurrency, Default::default()),
            queued: Vec::new(),
            tally: Tally::new(),
        }
    }

    fn finished(&self) -> bool {
        self.done == self.workload.payments
    }

    /// Starts payments up to the in-flight count, and returns every half
    /// due to be handed over.
    fn next_halves(&mut self) -> Vec<BatchHalf> {
        while self.paying.len() < self.concurrency && self.next < self.workload.payments {
            let index = self.next;
            self.next += 1;
            let payment = self.workload.payment(index);
            let [first, second] = phone_order(&payment);
            self.queued.push(BatchHalf {
                tag: index * 2,
                submitter: first.0,
                half: first.1,
            });
            let together = self.workload.halves == HalvesMode::Together;
            if together {
                self.queued.push(BatchHalf {
                    tag: index * 2 + 1,
                    submitter: second.0,
                    half: second.1,
                });
            }
            self.paying.insert(
                index,
                Paying {
                    payment,
                    results: [None, None],
                    first_stored_pending: false,
                    second_submitted: together.then(Instant::now),
                    second_resolved: None,
                },
            );
        }
        let room = self.queued.len();
        std::mem::replace(&mut self.queued, Vec::with_capacity(room))
    }

    fn heard(&mut self, report: Report) {
        let (index, half) = (report.tag / 2, (report.tag % 2) as usize);
        let paying = self
            .paying
            .get_mut(&index)
            .expect("a report is for a payment in flight");
        let first_answer = half == 0 && !paying.first_stored_pending && paying.results[0].is_none();
        match report.heard {
            Heard::Pending => {
                // A second half waits too when its partner was refused.
                if half == 0 {
                    assert!(first_answer, "payment {index}: first half pending twice");
                    paying.first_stored_pending = true;
                }
            }
            Heard::Resolved(result) => {
                assert!(
                    paying.results[half].replace(result).is_none(),
                    "payment {index} half {half}: resolved twice"
                );
                if half == 1 {
                    paying.second_resolved = Some(Instant::now());
                }
            }
        }
        if first_answer && paying.second_submitted.is_none() {
            // Sequential: the second phone taps once the first has its answer.
            let [_, second] = phone_order(&paying.payment);
            paying.second_submitted = Some(Instant::now());
            self.queued.push(BatchHalf {
                tag: index * 2 + 1,
                submitter: second.0,
                half: second.1,
            });
        }
        if paying.results.iter().all(Option::is_some) {
            let mut paying = self.paying.remove(&index).expect("in flight");
            let [first, second] = [paying.results[0].take(), paying.results[1].take()]
                .map(|result| result.expect("resolved"));
            let latency = match (paying.second_submitted, paying.second_resolved) {
                (Some(submitted), Some(resolved)) => resolved - submitted,
                _ => unreachable!("the second half was submitted and resolved"),
            };
            let (send, receive) = if paying.payment.send_first {
                (first, second)
            } else {
                (second, first)
            };
            let paid = Paid {
                send,
                receive,
                latency,
                first_stored_pending: paying.first_stored_pending,
            };
            self.tally.record(&paying.payment, paid);
            self.done += 1;
        }
    }
}

/// A payment's two halves, each with the account that submits it, in the
/// order its phones submit them.
fn phone_order(payment: &Payment) -> [(AccountId, Half); 2] {
    let send = (payment.sender, payment.send_half());
    let receive = (payment.receiver, payment.receive_half());
    if payment.send_first {
        [send, receive]
    } else {
        [receive, send]
    }
}

/// Both phones of one payment submit their halves, and each waits for its
/// resolution.
pub(crate) async fn pay(ledger: &Ledger, payment: &Payment, halves: HalvesMode) -> Paid {
    let send = (payment.sender, payment.send_half());
    let receive = (payment.receiver, payment.receive_half());
    let (first, second) = if payment.send_first {
        (send, receive)
    } else {
        (receive, send)
    };
    let (first_result, second_result, latency, first_stored_pending) = match halves {
        HalvesMode::Together => {
            // `join!` polls in order, so the first half is queued at its
            // matcher before the second is submitted.
            let first_done = async {
                let submission = ledger.submit(first.0, first.1).await;
                let stored_pending = matches!(submission, Ok(Submission::Pending(_)));
                (resolution_of(submission).await, stored_pending)
            };
            let second_done = async {
                let submitted = Instant::now();
                let result = resolution_of(ledger.submit(second.0, second.1).await).await;
                (result, submitted.elapsed())
            };
            let ((first_result, stored_pending), (second_result, latency)) =
                tokio::join!(first_done, second_done);
            (first_result, second_result, latency, stored_pending)
        }
        HalvesMode::Sequential => {
            let first_submission = ledger.submit(first.0, first.1).await;
            let stored_pending = matches!(first_submission, Ok(Submission::Pending(_)));
            let submitted = Instant::now();
            let second_result = resolution_of(ledger.submit(second.0, second.1).await).await;
            let latency = submitted.elapsed();
            let first_result = resolution_of(first_submission).await;
            (first_result, second_result, latency, stored_pending)
        }
    };
    if payment.send_first {
        Paid {
            send: first_result,
            receive: second_result,
            latency,
            first_stored_pending,
        }
    } else {
        Paid {
            send: second_result,
            receive: first_result,
            latency,
            first_stored_pending,
        }
    }
}

async fn resolution_of(
    submission: Result<Submission, LedgerError>,
) -> Result<Resolution, LedgerError> {
    submission?.resolution().await
}

pub(crate) fn per(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
