//! `tapledger-node`: the operator's binary.
//!
//! `init` prepares a data directory; `run` serves it over QUIC (with metrics
//! and health over HTTP) until SIGTERM or Ctrl-C, then shuts down cleanly.
//! The other subcommands inspect and maintain a ledger: `audit`, `export`,
//! `backup`, `restore`, `accounts`, `topup`, `reset`, and `config` shows the
//! settings in force. Settings come from flags, `TAPLEDGER_*` variables and a
//! TOML file, in that order of precedence (see `settings`).
//!
//! Exit status: 0 success, 1 the audit found problems, 2 any other failure.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tapledger_actors::Ledger;
use tapledger_certs::Identity;
use tapledger_node::config::DataDir;
use tapledger_node::export::{TimeRange, parse_time};
use tapledger_node::init::{init_data_dir, load_admin_credential};
use tapledger_node::ops::{self, OpenError};
use tapledger_node::settings::{FileSettings, GlobalLayer, RunLayer, Settings, run_layer_from_env};
use tapledger_node::telemetry::{self, HttpServer, Telemetry};
use tapledger_node::{ClientEndpoint, RunningNode};
use tapledger_protocol::{AccountId, Timestamp};

/// Exit status when an audit finds problems.
const EXIT_AUDIT_FAILED: u8 = 1;
/// Exit status for every other failure.
const EXIT_ERROR: u8 = 2;

const AFTER_HELP: &str = "\
Settings: every setting is a flag (--half-ttl-secs), an environment variable \
(TAPLEDGER_HALF_TTL_SECS) and a key of the --config TOML file (half_ttl_secs = 300). \
Precedence: flags > environment > file > defaults. `tapledger-node config` prints \
the settings in force.

Quick start:
  tapledger-node init            # data directory, TLS certificate, admin credential
  tapledger-node run             # QUIC on 127.0.0.1:7443, metrics on 127.0.0.1:9464

Exit status: 0 success, 1 audit found problems, 2 other failure.";

#[derive(Parser)]
#[command(
    name = "tapledger-node",
    version,
    about = "Settles tap-to-pay payments over QUIC, and maintains the ledger",
    after_help = AFTER_HELP
)]
struct Cli {
    /// TOML configuration file; keys are the flag names with underscores.
    #[arg(long, env = "TAPLEDGER_CONFIG", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    global: GlobalLayer,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory: ledger file, TLS certificate and key, admin
    /// credential. Keeps whatever already exists.
    Init {
        /// Names for a generated certificate (DNS names or IP addresses);
        /// repeat for several.
        #[arg(long = "name", value_name = "NAME", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Serve the data directory: QUIC for phones, HTTP for metrics and
    /// health. Stops cleanly on SIGTERM or Ctrl-C.
    Run {
        #[command(flatten)]
        run: RunLayer,
    },
    /// Print the settings in force (flags, environment, file and defaults
    /// combined) as a TOML file `--config` accepts.
    Config {
        #[command(flatten)]
        run: RunLayer,
    },
    /// Check the books: every balance against its history, no negative
    /// balance, the sum over all accounts (issuer included) zero, one
    /// outcome per tx_key. Exits 1 and names the accounts if not.
    ///
    /// Reads the ledger file directly when no node holds it; while a node
    /// runs (redb locks the file) it asks that node over its loopback admin
    /// endpoint (needs metrics_listen on).
    Audit {
        /// Audit this ledger file (e.g. a backup) instead of DATA/ledger.redb.
        #[arg(long, value_name = "FILE")]
        ledger: Option<PathBuf>,
    },
    /// Write settled transfers and rejected payments as CSV for analysts.
    ///
    /// Reads a stopped node's ledger or a backup (`backup`, then `export
    /// --ledger BACKUP`). Times are RFC 3339 (2025-01-31T12:00:00Z), a date
    /// (2025-01-31, midnight UTC) or Unix seconds; the range applies to the
    /// time each outcome was decided.
    Export {
        /// CSV file to write; refuses to replace an existing file.
        #[arg(long, value_name = "FILE.csv")]
        out: PathBuf,
        /// Only outcomes decided at or after this time.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        from: Option<Timestamp>,
        /// Only outcomes decided before this time.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        to: Option<Timestamp>,
        /// Export this ledger file instead of DATA/ledger.redb.
        #[arg(long, value_name = "FILE")]
        ledger: Option<PathBuf>,
    },
    /// Write a consistent copy of the ledger (one read snapshot) to a new
    /// file, then audit the copy.
    ///
    /// With the node stopped this reads the file directly. While the node
    /// runs, the node writes the copy itself, asked over its loopback admin
    /// endpoint with the admin credential from DATA/admin.key (needs
    /// metrics_listen on; the path is resolved here and must be writable by
    /// the node).
    Backup {
        /// The new backup file; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Put a backup in place as DATA/ledger.redb, with the node stopped.
    ///
    /// Audits the backup first and refuses one that fails; moves the current
    /// ledger aside to ledger.redb.before-restore-<unix seconds> (never
    /// deletes it); copies the backup in and audits the result. The TLS
    /// identity and admin credential stay as they are.
    Restore {
        /// The backup file to restore.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
    /// List accounts, show one, or show one's history (with the node
    /// stopped, or on a backup with --ledger).
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
        /// Read this ledger file instead of DATA/ledger.redb.
        #[arg(long, value_name = "FILE", global = true)]
        ledger: Option<PathBuf>,
    },
    /// Move money from the issuer to an account.
    ///
    /// With the node stopped this writes the ledger directly; while it runs,
    /// it sends an admin top-up over QUIC to the node's listen address,
    /// pinning DATA/node.crt.pem and using DATA/admin.key.
    Topup {
        /// The account to credit.
        #[arg(long, value_name = "ID")]
        account: AccountId,
        /// Minor units to add.
        #[arg(long, value_name = "MINOR_UNITS")]
        amount: u64,
    },
    /// Delete every account, balance and outcome: replace DATA/ledger.redb
    /// with an empty ledger. Keeps the TLS identity and admin credential.
    ///
    /// Asks for confirmation unless --yes. Refuses a file that is not a
    /// tapledger ledger, and a ledger a running node holds. Take a backup
    /// first if the data may matter.
    Reset {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum AccountsCommand {
    /// Every account: id, type, bank, balance, opening time.
    List,
    /// One account's details (never its key hash).
    Show {
        #[arg(value_name = "ID")]
        account: AccountId,
    },
    /// Every opening, top-up and payment of one account, oldest first, with
    /// the balance after each.
    History {
        #[arg(value_name = "ID")]
        account: AccountId,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn load_settings(
    config: Option<&Path>,
    global: GlobalLayer,
    run: RunLayer,
) -> anyhow::Result<Settings> {
    let file = match config {
        Some(path) => FileSettings::load(path)?,
        None => FileSettings::default(),
    };
    Ok(Settings::resolve(global, run, file)?)
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let Cli {
        config,
        global,
        command,
    } = cli;
    let run_layer = match &command {
        Command::Run { run } | Command::Config { run } => run.clone(),
        _ => run_layer_from_env()?,
    };
    let settings = load_settings(config.as_deref(), global, run_layer)?;
    tapledger_node::logging::init(settings.global.log_format, &settings.global.log)?;
    let data_dir = DataDir::new(&settings.global.data);
    match command {
        Command::Init { names } => {
            let report = init_data_dir(&data_dir, &names)
                .with_context(|| format!("initialising {}", data_dir.path().display()))?;
            for path in &report.created {
                println!("created  {path}");
            }
            for path in &report.kept {
                println!("kept     {path}");
            }
            println!(
                "certificate fingerprint (SHA-256, pin this in clients): {}",
                report.fingerprint
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { .. } => run(&settings).await,
        Command::Config { .. } => {
            print!("{}", settings.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { ledger } => audit(&settings, ledger).await,
        Command::Export {
            out,
            from,
            to,
            ledger,
        } => export(&data_dir, ledger, &out, TimeRange { from, to }),
        Command::Backup { to } => backup(&settings, &to).await,
        Command::Restore { from } => {
            let restored = ops::restore(&from, &data_dir.ledger())?;
            if let Some(previous) = &restored.previous {
                println!("previous ledger moved to {}", previous.display());
            }
            println!(
                "restored {} into {}",
                from.display(),
                data_dir.ledger().display()
            );
            print!("{}", ops::audit_text(&restored.report));
            Ok(exit_for(restored.report.is_ok()))
        }
        Command::Accounts { command, ledger } => {
            let path = ledger.unwrap_or_else(|| data_dir.ledger());
            let store = open_offline(&path)?;
            let text = match command {
                AccountsCommand::List => Some(ops::accounts_text(&store)?),
                AccountsCommand::Show { account } => ops::account_text(&store, account)?,
                AccountsCommand::History { account } => ops::history_text(&store, account)?,
            };
            match text {
                Some(text) => {
                    print!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                None => bail!("no such account in {}", path.display()),
            }
        }
        Command::Topup { account, amount } => topup(&settings, account, amount).await,
        Command::Reset { yes } => reset(&data_dir, yes),
    }
}

fn exit_for(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_AUDIT_FAILED)
    }
}

/// Opens a ledger for reading, explaining a lock held by a running node.
fn open_offline(path: &Path) -> anyhow::Result<tapledger_actors::Store> {
    match ops::open_existing(path) {
        Ok(store) => Ok(store),
        Err(OpenError::Locked(path)) => bail!(
            "{path} is locked by a running node: stop it, or take a `backup` and read that with --ledger"
        ),
        Err(error) => Err(error.into()),
    }
}

async fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    let data_dir = DataDir::new(&settings.global.data);
    let ledger_path = data_dir.ledger();
    match ops::check_redb_file(&ledger_path) {
        Ok(()) => {}
        Err(OpenError::Missing(_)) => bail!(
            "{} has no ledger: run `tapledger-node init --data {}` first",
            data_dir.path().display(),
            data_dir.path().display()
        ),
        Err(error) => return Err(error.into()),
    }
    let identity = Identity::load(&data_dir.cert(), &data_dir.key()).with_context(|| {
        format!(
            "loading the TLS identity from {}",
            data_dir.path().display()
        )
    })?;
    let admin_credential = load_admin_credential(&data_dir.admin())?;
    let recorder = match settings.run.metrics_listen.addr() {
        Some(_) => Some(telemetry::install_recorder()?),
        None => None,
    };
    tracing::info!(
        data = %data_dir.path().display(),
        listen = %settings.run.listen,
        metrics_listen = %settings.run.metrics_listen,
        half_ttl_secs = settings.run.half_ttl_secs,
        max_amount = settings.run.max_amount,
        matcher_shards = settings.run.matcher_shards,
        "starting"
    );
    let ledger = match Ledger::open(settings.ledger_config()).await {
        Ok(ledger) => Arc::new(ledger),
        Err(tapledger_actors::LedgerError::Store(error))
            if matches!(
                *error,
                tapledger_actors::StoreError::Redb(redb::Error::DatabaseAlreadyOpen)
            ) =>
        {
            bail!(
                "{} is locked: is another node running on this data directory?",
                ledger_path.display()
            )
        }
        Err(error) => return Err(error).context("opening the ledger"),
    };
    let node_config = settings.node_config();
    let node = RunningNode::serve(
        node_config.listen,
        &identity,
        admin_credential.clone(),
        node_config.limits,
        ledger,
    )?;

    let mut http = None;
    if let (Some(addr), Some(recorder)) = (settings.run.metrics_listen.addr(), recorder) {
        let started = async {
            let telemetry = Arc::new(
                Telemetry::new(
                    recorder,
                    node.ledger(),
                    node.counters_handle(),
                    admin_credential,
                )
                .await?,
            );
            let server = HttpServer::start(addr, telemetry.clone())
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            anyhow::Ok((telemetry, server))
        }
        .await;
        match started {
            Ok(started) => http = Some(started),
            Err(error) => {
                node.shutdown(settings.grace()).await;
                return Err(error);
            }
        }
    }
    // Operators and scripts read these two lines; the addresses are the real
    // ones (a port of 0 in the settings is resolved here).
    println!(
        "listening on {} (fingerprint {})",
        node.local_addr, node.fingerprint
    );
    if let Some((telemetry, server)) = &http {
        telemetry.set_ready(true);
        println!("metrics on http://{}/metrics", server.local_addr);
    }
    let _ = std::io::stdout().flush();

    wait_for_signal().await;
    tracing::info!("shutting down");
    if let Some((telemetry, server)) = http {
        telemetry.set_ready(false);
        server.stop().await;
    }
    node.shutdown(settings.grace()).await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// The running node's loopback HTTP address, or why there is none.
fn node_http(settings: &Settings) -> anyhow::Result<std::net::SocketAddr> {
    settings.local_http_addr().context(
        "the ledger is locked by a running node, and metrics_listen is off so it cannot be asked",
    )
}

async fn audit(settings: &Settings, ledger: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let explicit = ledger.is_some();
    let path = ledger.unwrap_or_else(|| DataDir::new(&settings.global.data).ledger());
    match ops::open_existing(&path) {
        Ok(store) => {
            let report = tokio::task::spawn_blocking(move || store.audit()).await??;
            println!("audit of {}", path.display());
            print!("{}", ops::audit_text(&report));
            Ok(exit_for(report.is_ok()))
        }
        Err(OpenError::Locked(_)) if !explicit => {
            let addr = node_http(settings)?;
            let admin = load_admin_credential(&DataDir::new(&settings.global.data).admin())?;
            let (status, body) =
                telemetry::admin_request(addr, "/admin/audit", &admin, String::new()).await?;
            println!(
                "audit of {} (by the running node at {addr})",
                path.display()
            );
            print!("{body}");
            match status.as_u16() {
                200 => Ok(ExitCode::SUCCESS),
                409 => Ok(ExitCode::from(EXIT_AUDIT_FAILED)),
                _ => bail!("the node answered {status}"),
            }
        }
        Err(error) => Err(error.into()),
    }
}

fn export(
    data_dir: &DataDir,
    ledger: Option<PathBuf>,
    out: &Path,
    range: TimeRange,
) -> anyhow::Result<ExitCode> {
    if let (Some(from), Some(to)) = (range.from, range.to)
        && from >= to
    {
        bail!("--from must be before --to");
    }
    let path = ledger.unwrap_or_else(|| data_dir.ledger());
    let store = open_offline(&path)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    let summary = tapledger_node::export::export_csv(&store, std::io::BufWriter::new(file), range)?;
    println!(
        "wrote {}: {} settled, {} rejected ({} outside the time range)",
        out.display(),
        summary.settlements,
        summary.rejections,
        summary.skipped
    );
    Ok(ExitCode::SUCCESS)
}

async fn backup(settings: &Settings, to: &Path) -> anyhow::Result<ExitCode> {
    let data_dir = DataDir::new(&settings.global.data);
    if to.exists() {
        bail!("{} already exists; refusing to overwrite it", to.display());
    }
    match ops::open_existing(&data_dir.ledger()) {
        Ok(store) => {
            let target = to.to_path_buf();
            tokio::task::spawn_blocking(move || store.backup(&target)).await??;
            println!(
                "backup written to {} (node stopped; read directly)",
                to.display()
            );
        }
        Err(OpenError::Locked(_)) => {
            let addr = node_http(settings)?;
            let admin = load_admin_credential(&data_dir.admin())?;
            let target = ops::absolute(to)?;
            let (status, body) = telemetry::admin_request(
                addr,
                "/admin/backup",
                &admin,
                target.display().to_string(),
            )
            .await?;
            if !status.is_success() {
                bail!("the node refused the backup ({status}): {}", body.trim());
            }
            println!("{} (by the running node at {addr})", body.trim());
        }
        Err(error) => return Err(error.into()),
    }
    let copy = ops::open_existing(to)?;
    let report = tokio::task::spawn_blocking(move || copy.audit()).await??;
    println!("audit of the backup:");
    print!("{}", ops::audit_text(&report));
    Ok(exit_for(report.is_ok()))
}

async fn topup(settings: &Settings, account: AccountId, amount: u64) -> anyhow::Result<ExitCode> {
    let data_dir = DataDir::new(&settings.global.data);
    match ops::open_existing(&data_dir.ledger()) {
        Ok(store) => {
            drop(store);
            let ledger = Ledger::open(settings.ledger_config()).await?;
            let result = ledger.top_up(account, amount).await;
            ledger.close().await;
            let balance = result?;
            println!(
                "account {account}: +{amount}, balance {balance} (node stopped; written directly)"
            );
        }
        Err(OpenError::Locked(_)) => {
            let identity = Identity::load(&data_dir.cert(), &data_dir.key())?;
            let admin = load_admin_credential(&data_dir.admin())?;
            let addr = settings.local_quic_addr();
            let endpoint = ClientEndpoint::new(identity.fingerprint(), addr)?;
            let phone = endpoint
                .connect(addr, "localhost")
                .await
                .with_context(|| format!("connecting to the running node at {addr}"))?;
            let result = phone.top_up(&admin, account, amount).await;
            phone.close().await;
            let balance = result?;
            println!(
                "account {account}: +{amount}, balance {balance} (by the running node at {addr})"
            );
        }
        Err(error) => return Err(error.into()),
    }
    Ok(ExitCode::SUCCESS)
}

fn reset(data_dir: &DataDir, yes: bool) -> anyhow::Result<ExitCode> {
    let path = data_dir.ledger();
    let store = match ops::open_existing(&path) {
        Ok(store) => store,
        Err(OpenError::Missing(_)) => {
            println!("{}: no ledger; nothing to reset", path.display());
            return Ok(ExitCode::SUCCESS);
        }
        Err(error) => return Err(error.into()),
    };
    let contents = ops::describe_for_reset(&store)?;
    drop(store);
    if !yes {
        eprintln!(
            "This deletes {} ({contents}) and starts an empty ledger.\nType `reset` to confirm: ",
            path.display()
        );
        let mut answer = String::new();
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            eprintln!("(reading the confirmation from standard input)");
        }
        stdin.lock().read_line(&mut answer)?;
        if answer.trim() != "reset" {
            bail!("not confirmed; nothing changed");
        }
    }
    ops::reset(&path)?;
    println!(
        "{}: reset to an empty ledger (was: {contents})",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}
