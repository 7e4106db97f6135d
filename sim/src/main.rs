//! `tapledger-sim`: load and benchmarks for tapledger.
//!
//! With no subcommand it runs the phone swarm against an embedded node (or a
//! node given with `--node`), see `tapledger_sim::swarm`. `open-account`,
//! `pay` and `scenario` are single actions for people. `bench core` drives
//! the ledger in process (`tapledger_sim::bench::core`); `bench e2e` measures
//! the whole system over QUIC (`tapledger_sim::bench::e2e`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tapledger_sim::bench::cluster::{self, ClusterBenchConfig};
use tapledger_sim::bench::core::{self, CoreBenchConfig, HalvesMode, KeyOrder};
use tapledger_sim::bench::e2e::{self, E2eConfig};
use tapledger_sim::swarm::actions::{self, GivenAccount, PayRequest};
use tapledger_sim::swarm::config::{DEAD_AFTER_DEFAULT, EMBEDDED_HALF_TTL};
use tapledger_sim::swarm::target::Target;
use tapledger_sim::swarm::workload::Kind;
use tapledger_sim::swarm::{self, SwarmConfig};

#[derive(Parser)]
#[command(
    name = "tapledger-sim",
    version,
    about = "Load generator and benchmarks for tapledger",
    long_about = "Load generator and benchmarks for tapledger.\n\n\
        With no subcommand: starts an embedded node (or targets --node), opens a funded \
        account per phone, connects every phone over its own QUIC connection, runs a seeded \
        mix of honest payments and faults with known outcomes, and prints a report that \
        checks every answer, every balance and the node's audit. Exits non-zero if any check fails.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    swarm: SwarmArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Open one funded account and print its id and API key.
    OpenAccount {
        /// Opening balance, in minor units.
        #[arg(long, default_value_t = 100_000)]
        balance: u64,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Make one payment and show what the node told each phone. Without
    /// --from/--to, two fresh accounts are opened for it.
    Pay {
        /// Amount in minor units.
        #[arg(long)]
        amount: u64,
        /// Paying account id (needs --from-key).
        #[arg(long, requires = "from_key")]
        from: Option<u64>,
        /// API key of the paying account, hex (as `open-account` prints it).
        #[arg(long, requires = "from")]
        from_key: Option<String>,
        /// Receiving account id (needs --to-key).
        #[arg(long, requires = "to_key")]
        to: Option<u64>,
        /// API key of the receiving account, hex.
        #[arg(long, requires = "to")]
        to_key: Option<String>,
        /// Opening balance of accounts opened for the payment.
        #[arg(long, default_value_t = 100_000)]
        opening_balance: u64,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Run one named fault scenario among fresh accounts and show every step
    /// (`scenario list` names them).
    Scenario {
        /// Scenario name, or `list`.
        name: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Measure parts of tapledger against this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// Which cluster to talk to: embedded by default.
#[derive(Args, Clone)]
struct TargetArgs {
    /// Address (host:port) of a node started by `tapledger-node run`; repeat
    /// for each replica of a cluster (phones find the leader). Default:
    /// start an embedded cluster for this run.
    #[arg(long, requires = "cert")]
    node: Vec<String>,
    /// Each --node's certificate (node.crt.pem in its data directory), to
    /// pin, in the same order.
    #[arg(long, requires = "node")]
    cert: Vec<PathBuf>,
    /// The cluster's admin credential file (admin.key), to open accounts with.
    #[arg(long, requires = "node")]
    admin: Option<PathBuf>,
    /// Replicas of the embedded cluster (1 runs a single node).
    #[arg(long, default_value_t = tapledger_sim::swarm::config::REPLICAS_DEFAULT)]
    replicas: usize,
    /// half_ttl of the embedded node, in seconds (short, so expiry faults
    /// finish within the run).
    #[arg(long, default_value_t = EMBEDDED_HALF_TTL.as_secs_f64())]
    half_ttl_seconds: f64,
    /// Bound on every single network step, in seconds.
    #[arg(long, default_value_t = 10.0)]
    step_timeout_seconds: f64,
}

impl TargetArgs {
    fn target(&self) -> anyhow::Result<Target> {
        if self.node.is_empty() {
            return Ok(Target::Embedded {
                half_ttl: seconds(self.half_ttl_seconds, "--half-ttl-seconds")?,
                replicas: self.replicas,
            });
        }
        if self.node.len() != self.cert.len() {
            anyhow::bail!(
                "give one --cert per --node ({} nodes, {} certificates)",
                self.node.len(),
                self.cert.len()
            );
        }
        Ok(Target::Remote {
            replicas: self
                .node
                .iter()
                .cloned()
                .zip(self.cert.iter().cloned())
                .collect(),
            admin: self.admin.clone(),
        })
    }

    fn step_timeout(&self) -> anyhow::Result<Duration> {
        seconds(self.step_timeout_seconds, "--step-timeout-seconds")
    }
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|duration| !duration.is_zero())
        .with_context(|| format!("{flag} must be a positive number of seconds"))
}

/// `None` for 0, else the duration.
fn optional_seconds(value: f64, flag: &str) -> anyhow::Result<Option<Duration>> {
    if value == 0.0 {
        return Ok(None);
    }
    seconds(value, flag).map(Some)
}

/// The default run: the phone swarm.
#[derive(Args)]
struct SwarmArgs {
    /// Simulated phones, each with its own account and QUIC connection.
    #[arg(long, default_value_t = 1_000)]
    phones: usize,
    /// Payments to make, fewer if --duration ends first [default: 20,000;
    /// with --duration alone: rate × duration].
    #[arg(long)]
    payments: Option<u64>,
    /// Share of payments that are faults with known outcomes (0..=1).
    #[arg(long, default_value_t = 0.05)]
    fault_share: f64,
    /// Open-loop arrivals per second (Poisson); 0 runs closed loop with
    /// --in-flight payments at once.
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    /// Closed loop: payments in flight. Open loop: a cap on the sim's memory.
    #[arg(long, default_value_t = 50_000)]
    in_flight: usize,
    /// Start no payment later than this many seconds into the run; with no
    /// --payments given, plans rate × duration payments.
    #[arg(long)]
    duration: Option<f64>,
    /// Seed of every workload choice: the same seed runs the same payments.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Client UDP sockets the phones' connections share.
    #[arg(long, default_value_t = 4)]
    endpoints: usize,
    /// Every phone's opening balance, in minor units.
    #[arg(long, default_value_t = 1_000_000)]
    opening_balance: u64,
    /// Largest honest amount, in minor units.
    #[arg(long, default_value_t = 20_000)]
    amount_max: u64,
    /// Each phone sends its half up to this many milliseconds after the tap.
    #[arg(long, default_value_t = 2.0)]
    jitter_ms: f64,
    /// Skip expiry faults when the node's half_ttl is longer than this (s).
    #[arg(long, default_value_t = 30.0)]
    expiry_wait_max_seconds: f64,
    /// Write the report as JSON to this file, also when the run fails or
    /// stops early; it lists every outcome each phone was told
    /// (`outcomes_told`), to check against the node's ledger afterwards.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput and latency over time to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No phases or progress bar on stderr.
    #[arg(long)]
    quiet: bool,
    /// Kill the embedded cluster's leader this many seconds after the first
    /// tap (with more than one replica); 0 never.
    #[arg(long, default_value_t = 4.0)]
    kill_leader_after: f64,
    /// Start the killed replica again this many seconds after the kill; 0
    /// never.
    #[arg(long, default_value_t = 3.0)]
    restart_after: f64,
    /// End the run early, as failed, once the target has answered nothing
    /// (no outcome, refusal or error) for this many seconds while phones
    /// wait, and no replica completes a QUIC handshake: a dead node or
    /// cluster. A change of leader does not count (the other replicas
    /// answer). 0 never; the report (and --json) is still written.
    #[arg(long, default_value_t = DEAD_AFTER_DEFAULT.as_secs_f64())]
    dead_after: f64,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The ledger alone, in process and durable: settlements per second,
    /// latency, commits and memory, read against the disk's raw fsync rate.
    Core(CoreArgs),
    /// The whole system over QUIC: the highest sustained settlement rate with
    /// 1,000+ phone connections, read against `bench core` run alongside.
    E2e(E2eArgs),
}

#[derive(Args)]
struct E2eArgs {
    /// Phone connections (the benchmark is defined for at least 1,000).
    #[arg(long, default_value_t = 1_000)]
    phones: usize,
    /// Client UDP sockets the connections share.
    #[arg(long, default_value_t = 4)]
    endpoints: usize,
    /// Seconds of the probe and of each rate step.
    #[arg(long, default_value_t = 3.0)]
    step_seconds: f64,
    /// A rate is sustained only if p99 (tap → both phones told) stays within
    /// this many milliseconds.
    #[arg(long, default_value_t = 100.0)]
    p99_bound_ms: f64,
    /// Payments in flight during the closed-loop probe.
    #[arg(long, default_value_t = 2_048)]
    probe_in_flight: usize,
    /// Payments of the `bench core` run alongside.
    #[arg(long, default_value_t = 200_000)]
    core_payments: u64,
    /// Accounts of the `bench core` run alongside.
    #[arg(long, default_value_t = 10_000)]
    core_accounts: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No phases or progress bar on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct CoreArgs {
    /// Payments to settle (two halves each).
    #[arg(long, default_value_t = 1_000_000)]
    payments: u64,
    /// Accounts to open first and pay among.
    #[arg(long, default_value_t = 10_000)]
    accounts: u64,
    /// Matcher shards.
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Payments in flight at once. A comma-separated list runs the bench
    /// once per value, each on a fresh ledger, and ends with a table of
    /// throughput and latency per value (e.g. 256,1024,4096,16384).
    #[arg(
        long,
        alias = "in-flight",
        value_delimiter = ',',
        default_value = "4096"
    )]
    concurrency: Vec<usize>,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for the ledger file and disk probes (a fresh subdirectory is
    /// made and removed); default: the system temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How the two halves of a payment arrive.
    #[arg(long, value_enum, default_value_t = HalvesMode::Together)]
    halves: HalvesMode,
    /// How payments' keys are made: random (UUID v4) or time-ordered (UUID v7).
    #[arg(long, value_enum, default_value_t = KeyOrder::Random)]
    keys: KeyOrder,
    /// Opening balance of every account, in minor units.
    #[arg(long, default_value_t = 100_000)]
    opening_balance: u64,
    /// Largest payment, in minor units (amounts are uniform from 1).
    #[arg(long, default_value_t = 10_000)]
    amount_max: u64,
    /// Seconds each disk probe runs.
    #[arg(long, default_value_t = 2.0)]
    probe_seconds: f64,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No phases or progress bar on stderr.
    #[arg(long)]
    quiet: bool,
    /// Replicas: 1 is the ledger alone; more runs the same workload on one
    /// replica and then on an embedded cluster of this many (QUIC on
    /// loopback), and measures failover by killing the leader.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// With --replicas above 1: leader kills in the failover phase (0 skips it).
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// With --replicas above 1: background payments in flight while the
    /// leader is killed.
    #[arg(long, default_value_t = 64)]
    failover_in_flight: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The embedded cluster's logs, on request (`TAPLEDGER_LOG=warn`, or any
    // tracing filter): silent by default, the report is the output.
    if let Ok(filter) = std::env::var("TAPLEDGER_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let result = match cli.command {
        None => run_swarm(cli.swarm),
        Some(Command::OpenAccount { balance, target }) => {
            single_action(&target, move |target, step| {
                Box::pin(async move { actions::open_account(&target, balance, step).await })
            })
        }
        Some(Command::Pay {
            amount,
            from,
            from_key,
            to,
            to_key,
            opening_balance,
            target,
        }) => (|| {
            let given = |id: Option<u64>, key: Option<String>| match (id, key) {
                (Some(id), Some(key)) => GivenAccount::parse(id, &key).map(Some),
                _ => Ok(None),
            };
            let request = PayRequest {
                from: given(from, from_key)?,
                to: given(to, to_key)?,
                amount,
                opening_balance,
            };
            single_action(&target, move |target, step| {
                Box::pin(async move { actions::pay(&target, request, step).await })
            })
        })(),
        Some(Command::Scenario { name, target }) => scenario(&name, &target),
        Some(Command::Bench(BenchCommand::Core(args))) => bench_core(args),
        Some(Command::Bench(BenchCommand::E2e(args))) => bench_e2e(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tapledger-sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench_core(args: CoreArgs) -> anyhow::Result<ExitCode> {
    let config = CoreBenchConfig {
        payments: args.payments,
        accounts: args.accounts,
        shards: args.shards,
        concurrency: args.concurrency.first().copied().unwrap_or(4_096),
        seed: args.seed,
        dir: args.dir,
        halves: args.halves,
        keys: args.keys,
        opening_balance: args.opening_balance,
        amount_max: args.amount_max,
        probe: Duration::try_from_secs_f64(args.probe_seconds)
            .context("--probe-seconds must be a non-negative number")?,
        progress: !args.quiet,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(workers) = args.workers {
        runtime.worker_threads(workers);
    }
    let runtime = runtime.build().context("cannot start the tokio runtime")?;
    if args.concurrency.len() > 1 {
        if args.replicas > 1 {
            anyhow::bail!("a list of --in-flight values runs the ledger alone: drop --replicas");
        }
        return bench_core_in_flight(&runtime, &config, &args.concurrency, args.json.as_deref());
    }
    let (rendered, json, failures) = if args.replicas > 1 {
        let config = ClusterBenchConfig {
            core: config,
            replicas: args.replicas,
            kills: args.kills,
            failover_in_flight: args.failover_in_flight,
        };
        let report = runtime.block_on(cluster::run(&config))?;
        (report.render(), report.to_json(), report.failures())
    } else {
        let report = runtime.block_on(core::run(&config))?;
        (report.render(), report.to_json(), report.failures())
    };
    print!("{rendered}");
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&json)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `bench core` once per in-flight count, then the table that compares them.
fn bench_core_in_flight(
    runtime: &tokio::runtime::Runtime,
    config: &CoreBenchConfig,
    in_flight: &[usize],
    json_path: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let mut reports = Vec::with_capacity(in_flight.len());
    for &concurrency in in_flight {
        let config = CoreBenchConfig {
            concurrency,
            ..config.clone()
        };
        let mut report = runtime.block_on(core::run(&config))?;
        if !reports.is_empty() {
            // A later run's actors take memory an earlier run freed: its RSS
            // hardly moves, and the per-actor figure would read near 0.
            report.actor_memory = None;
        }
        print!("{}", report.render());
        println!();
        reports.push(report);
    }
    print!("{}", core::in_flight_table(&reports));
    if let Some(path) = json_path {
        let json: Vec<_> = reports.iter().map(|report| report.to_json()).collect();
        let json = serde_json::to_string_pretty(&json)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed = reports.iter().any(|report| !report.failures().is_empty());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // The embedded node runs on its own runtime; these threads are the phones.
    runtime.enable_all().thread_name("sim-rt-worker");
    if let Some(workers) = workers {
        runtime.worker_threads(workers);
    }
    runtime.build().context("cannot start the tokio runtime")
}

fn run_swarm(args: SwarmArgs) -> anyhow::Result<ExitCode> {
    let rate = (args.rate > 0.0).then_some(args.rate);
    let duration = args
        .duration
        .map(|value| seconds(value, "--duration"))
        .transpose()?;
    // --duration alone plans as many payments as the rate fills it with.
    let payments = match (args.payments, duration, rate) {
        (Some(payments), _, _) => payments,
        (None, Some(duration), Some(rate)) => (rate * duration.as_secs_f64()).ceil() as u64,
        (None, _, _) => SwarmConfig::default().payments,
    };
    let config = SwarmConfig {
        target: args.target.target()?,
        phones: args.phones,
        payments,
        fault_share: args.fault_share,
        rate,
        in_flight: args.in_flight,
        duration,
        seed: args.seed,
        endpoints: args.endpoints,
        opening_balance: args.opening_balance,
        amount_max: args.amount_max,
        jitter: Duration::try_from_secs_f64(args.jitter_ms / 1e3)
            .context("--jitter-ms must be a non-negative number")?,
        step_timeout: args.target.step_timeout()?,
        expiry_wait_max: Duration::try_from_secs_f64(args.expiry_wait_max_seconds)
            .context("--expiry-wait-max-seconds must be a non-negative number")?,
        progress: !args.quiet,
        kill_leader_after: optional_seconds(args.kill_leader_after, "--kill-leader-after")?,
        restart_after: optional_seconds(args.restart_after, "--restart-after")?,
        dead_after: optional_seconds(args.dead_after, "--dead-after")?,
        ..SwarmConfig::default()
    };
    let report = runtime(None)?.block_on(swarm::run(&config))?;
    if let Some(stop) = &report.stopped {
        eprintln!("tapledger-sim: {}", stop.describe(&report.target));
    }
    print!("{}", report.render());
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "tapledger-sim: {} phones, {} payments, seed {}",
            tapledger_sim::text::thousands(report.phones as u64),
            tapledger_sim::text::thousands(report.payments_run),
            report.seed
        );
        std::fs::write(path, swarm::plot::render_svg(&report.timeline, &title))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if report.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

type ActionFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<actions::ActionOutput>>>>;

fn single_action(
    target: &TargetArgs,
    action: impl FnOnce(Target, Duration) -> ActionFuture,
) -> anyhow::Result<ExitCode> {
    let step_timeout = target.step_timeout()?;
    let output = runtime(None)?.block_on(action(target.target()?, step_timeout))?;
    print!("{}", output.text);
    Ok(if output.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn scenario(name: &str, target: &TargetArgs) -> anyhow::Result<ExitCode> {
    if name == "list" {
        print!("scenarios:\n{}", actions::scenario_list());
        return Ok(ExitCode::SUCCESS);
    }
    let kind = Kind::from_name(name).with_context(|| {
        format!(
            "no scenario named {name:?}; the scenarios are:\n{}",
            actions::scenario_list()
        )
    })?;
    single_action(target, move |target, step| {
        Box::pin(async move { actions::scenario(&target, kind, step).await })
    })
}

fn bench_e2e(args: E2eArgs) -> anyhow::Result<ExitCode> {
    let config = E2eConfig {
        phones: args.phones,
        endpoints: args.endpoints,
        step: seconds(args.step_seconds, "--step-seconds")?,
        p99_bound: Duration::try_from_secs_f64(args.p99_bound_ms / 1e3)
            .context("--p99-bound-ms must be a positive number")?,
        probe_in_flight: args.probe_in_flight,
        core_payments: args.core_payments,
        core_accounts: args.core_accounts,
        seed: args.seed,
        progress: !args.quiet,
    };
    let report = runtime(args.workers)?.block_on(e2e::run(&config))?;
    print!("{}", report.render());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if report.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
