//! `tapledger-sim`: load and benchmarks for tapledger.
//!
//! With no subcommand it will run the phone swarm against an embedded node
//! (not built yet: it says so and points to what exists). `bench core` drives
//! the ledger in process; see `tapledger_sim::bench::core`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tapledger_sim::bench::core::{self, CoreBenchConfig, HalvesMode};

#[derive(Parser)]
#[command(
    name = "tapledger-sim",
    version,
    about = "Load generator and benchmarks for tapledger"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Measure parts of tapledger against this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The ledger alone, in process and durable: settlements per second,
    /// latency, commits and memory, read against the disk's raw fsync rate.
    Core(CoreArgs),
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
    /// Payments in flight at once.
    #[arg(long, default_value_t = 4_096)]
    concurrency: usize,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // The phone swarm becomes the default run here (issue 4).
        None => {
            println!(
                "tapledger-sim: the phone swarm (the default run) is not built yet.\n\
                 What exists: `tapledger-sim bench core` benchmarks the ledger in process \
                 (try --payments 200000; --help lists the options)."
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Bench(BenchCommand::Core(args))) => bench_core(args),
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
        concurrency: args.concurrency,
        seed: args.seed,
        dir: args.dir,
        halves: args.halves,
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
    let report = runtime.block_on(core::run(&config))?;
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
