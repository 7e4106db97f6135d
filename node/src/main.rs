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
use std::collections::BTreeMap;

use tapledger_actors::{Ledger, ReplicaId, ReplicaInfo};
use tapledger_certs::Identity;
use tapledger_node::config::DataDir;
use tapledger_node::export::{Format, TimeRange, parse_time};
use tapledger_node::init::{
    ReplicaPlan, init_cluster, init_replica, load_admin_credential, recorded_replica,
};
use tapledger_node::ops::{self, OpenError};
use tapledger_node::settings::{
    FileSettings, GlobalLayer, PeerListen, RunLayer, Settings, run_layer_from_env,
};
use tapledger_node::telemetry::{self, HttpServer, Telemetry};
use tapledger_node::{ClientEndpoint, NodeError, RunningNode};
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
    /// Create the data directory: ledger file, Raft log, TLS certificate and
    /// key, admin credential. Keeps whatever already exists.
    ///
    /// Without options: a cluster of one replica. For a cluster, give this
    /// replica's --id and addresses and each other replica with --peer
    /// (their certificates must exist: init each replica first with --id,
    /// then again with the peers), or make a whole cluster on this machine
    /// with --replicas N.
    Init {
        /// Names for a generated certificate (DNS names or IP addresses);
        /// repeat for several.
        #[arg(long = "name", value_name = "NAME", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
        /// This replica's id in its cluster (unique, never reused).
        #[arg(long, value_name = "N", default_value_t = 1, help_heading = "Cluster")]
        id: u64,
        /// Address phones use to reach this replica.
        #[arg(long, value_name = "HOST:PORT", default_value = tapledger_node::init::CLIENT_ADDR_DEFAULT, help_heading = "Cluster")]
        client_addr: String,
        /// Address the other replicas use to reach this one.
        #[arg(long, value_name = "HOST:PORT", default_value = tapledger_node::init::PEER_ADDR_DEFAULT, help_heading = "Cluster")]
        peer_addr: String,
        /// Another replica of the cluster: ID=CLIENT_ADDR,PEER_ADDR,CERT_FILE
        /// (its node.crt.pem). Repeat for each.
        #[arg(
            long = "peer",
            value_name = "ID=CLIENT,PEER,CERT",
            help_heading = "Cluster"
        )]
        peers: Vec<String>,
        /// Join an existing cluster instead of starting one: the replica
        /// waits until the leader adds it (`cluster add`). --peer names the
        /// replicas to trust meanwhile.
        #[arg(long, help_heading = "Cluster")]
        join: bool,
        /// Copy the admin credential from this file instead of generating
        /// one (every replica of a cluster takes the same credential).
        #[arg(long, value_name = "FILE", help_heading = "Cluster")]
        admin_key: Option<PathBuf>,
        /// Create a whole cluster of N replicas on this machine instead:
        /// DATA/replica-1 .. DATA/replica-N with consecutive loopback ports
        /// from --client-addr and --peer-addr (metrics from 9464), one shared
        /// admin credential, and DATA/replica-I.toml for `--config` to run each.
        #[arg(long, value_name = "N", help_heading = "Cluster")]
        replicas: Option<u64>,
    },
    /// Serve the data directory: QUIC for phones, HTTP for metrics and
    /// health. Stops cleanly on SIGTERM or Ctrl-C.
    Run {
        #[command(flatten)]
        run: RunLayer,
        /// When the ledger or Raft log fails its integrity check, serve only
        /// the HTTP endpoints, for inspection, instead of exiting: /readyz
        /// answers 503 with the damage, the admin audit and backup read the
        /// ledger read-only. No phone is served and nothing is written.
        #[arg(long)]
        inspect: bool,
    },
    /// Show this replica's place in its cluster: role, term, leader, last
    /// log, committed and applied indexes, snapshot, voters, and on the
    /// leader each follower's lag. Asks the running node (loopback admin
    /// endpoint); with the node stopped, reads its files.
    Status,
    /// Change the cluster's membership, through the running leader.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
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
        /// File to write; refuses to replace an existing file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// `csv` or `parquet` (same columns; Parquet keeps their types)
        /// [default: parquet for a FILE ending in .parquet, else csv].
        #[arg(long, value_enum)]
        format: Option<tapledger_node::export::Format>,
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
enum ClusterCommand {
    /// Add a replica: first as a learner that receives the log, then, once
    /// it has caught up, as a voter. Run against the leader (DATA is the
    /// leader's data directory). Initialise the new replica with `init
    /// --join --id N --peer ...` and start it first.
    Add {
        #[arg(long, value_name = "N")]
        id: u64,
        /// Where phones reach the new replica.
        #[arg(long, value_name = "HOST:PORT")]
        client_addr: String,
        /// Where the other replicas reach it.
        #[arg(long, value_name = "HOST:PORT")]
        peer_addr: String,
        /// Its certificate (its node.crt.pem), pinned by every replica.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
    },
    /// Remove a replica from the voters and the cluster. Run against the
    /// leader.
    Remove {
        #[arg(long, value_name = "N")]
        id: u64,
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

/// A panic inside redb is how it meets a damaged file (a zeroed page, a
/// flipped bit in a tree node): the ledger catches it and reports the damage
/// (`audit` names it; a node refuses the file or stops replicating). It is
/// logged as one ERROR line rather than the default multi-line panic text
/// with a backtrace; every other panic keeps the default report.
fn quiet_redb_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_redb = info
            .location()
            .is_some_and(|location| location.file().contains("redb-"));
        if !in_redb {
            return default(info);
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|text| text.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        tracing::error!(%location, %message, "redb panicked (a damaged file?)");
    }));
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => error.exit(), // --help, --version
        Err(error) => {
            eprintln!("{}", one_line_usage_error(&error));
            return ExitCode::from(EXIT_ERROR);
        }
    };
    quiet_redb_panics();
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
            eprintln!("error: {}", one_line(&error));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// An error and its causes on one line, each cause once: a message that
/// already quotes its source (`cannot listen on ADDR: <io error>`) is not
/// followed by the same source again.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// clap's usage error as one line: the error and its tip, without the usage
/// block (`--help` has it).
fn one_line_usage_error(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("Usage:")
                && !line.starts_with("For more information")
        })
        .collect();
    format!("{} (see --help)", parts.join("; "))
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
        Command::Run { run, .. } | Command::Config { run } => run.clone(),
        _ => run_layer_from_env()?,
    };
    let settings = load_settings(config.as_deref(), global, run_layer)?;
    tapledger_node::logging::init(settings.global.log_format, &settings.global.log)?;
    let data_dir = DataDir::new(&settings.global.data);
    match command {
        Command::Init {
            names,
            id,
            client_addr,
            peer_addr,
            peers,
            join,
            admin_key,
            replicas,
        } => match replicas {
            Some(count) => init_local_cluster(&data_dir, &names, count, &client_addr, &peer_addr),
            None => {
                let plan = ReplicaPlan {
                    id,
                    client_addr,
                    peer_addr,
                    peers: parse_peers(&peers)?,
                    bootstrap: !join,
                };
                init_one(&data_dir, &names, &plan, admin_key.as_deref())?;
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Run { inspect, .. } => run(&settings, inspect).await,
        Command::Status => status(&settings).await,
        Command::Cluster { command } => cluster(&settings, command).await,
        Command::Config { .. } => {
            print!("{}", settings.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { ledger } => audit(&settings, ledger).await,
        Command::Export {
            out,
            format,
            from,
            to,
            ledger,
        } => export(&data_dir, ledger, &out, format, TimeRange { from, to }),
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
    match ops::open_read_only(path) {
        Ok(store) => Ok(store),
        Err(OpenError::Locked(path)) => bail!(
            "{path} is locked by a running node: stop it, or take a `backup` and read that with --ledger"
        ),
        Err(error) => Err(error.into()),
    }
}

/// Parses `--peer ID=CLIENT_ADDR,PEER_ADDR,CERT_FILE` values.
fn parse_peers(peers: &[String]) -> anyhow::Result<BTreeMap<ReplicaId, ReplicaInfo>> {
    let mut parsed = BTreeMap::new();
    for peer in peers {
        let (id, rest) = peer.split_once('=').with_context(|| {
            format!("--peer {peer}: expected ID=CLIENT_ADDR,PEER_ADDR,CERT_FILE")
        })?;
        let id: ReplicaId = id
            .trim()
            .parse()
            .with_context(|| format!("--peer {peer}: {id:?} is not a replica id"))?;
        let parts: Vec<&str> = rest.split(',').map(str::trim).collect();
        let [client_addr, peer_addr, cert] = parts[..] else {
            bail!("--peer {peer}: expected ID=CLIENT_ADDR,PEER_ADDR,CERT_FILE");
        };
        let certificates = tapledger_certs::load_certificates(Path::new(cert))
            .with_context(|| format!("--peer {peer}: reading its certificate"))?;
        let fingerprint = tapledger_certs::Fingerprint::of(&certificates[0]);
        let info = ReplicaInfo {
            client_addr: client_addr.to_string(),
            peer_addr: peer_addr.to_string(),
            fingerprint: fingerprint.to_string(),
        };
        if parsed.insert(id, info).is_some() {
            bail!("--peer {id} is given twice");
        }
    }
    Ok(parsed)
}

fn init_one(
    data_dir: &DataDir,
    names: &[String],
    plan: &ReplicaPlan,
    admin_from: Option<&Path>,
) -> anyhow::Result<()> {
    let report = init_replica(data_dir, names, plan, admin_from)
        .with_context(|| format!("initialising {}", data_dir.path().display()))?;
    for path in &report.created {
        println!("created  {path}");
    }
    for path in &report.kept {
        println!("kept     {path}");
    }
    let role = if plan.peers.is_empty() && plan.bootstrap {
        "a cluster of one".to_string()
    } else if plan.bootstrap {
        format!("a new cluster of {}", plan.peers.len() + 1)
    } else {
        "joining an existing cluster".to_string()
    };
    println!(
        "replica {} ({role}): phones at {}, replicas at {}",
        plan.id, plan.client_addr, plan.peer_addr
    );
    println!(
        "certificate fingerprint (SHA-256, pin this in clients): {}",
        report.fingerprint
    );
    Ok(())
}

/// `init --replicas N`: a whole cluster on this machine.
fn init_local_cluster(
    root: &DataDir,
    names: &[String],
    count: u64,
    client_addr: &str,
    peer_addr: &str,
) -> anyhow::Result<ExitCode> {
    if !(1..=9).contains(&count) {
        bail!("--replicas must be 1 to 9");
    }
    let base = |addr: &str, what: &str| -> anyhow::Result<std::net::SocketAddr> {
        addr.parse()
            .with_context(|| format!("--{what} {addr}: with --replicas, give HOST:PORT"))
    };
    let (client_base, peer_base) = (
        base(client_addr, "client-addr")?,
        base(peer_addr, "peer-addr")?,
    );
    let at = |addr: std::net::SocketAddr, offset: u64| {
        let mut addr = addr;
        addr.set_port(addr.port() + offset as u16);
        addr
    };
    let dirs: Vec<DataDir> = (1..=count)
        .map(|id| DataDir::new(root.path().join(format!("replica-{id}"))))
        .collect();
    let addrs: Vec<(String, String)> = (0..count)
        .map(|index| {
            (
                at(client_base, index).to_string(),
                at(peer_base, index).to_string(),
            )
        })
        .collect();
    let initialised = init_cluster(&dirs, &addrs, names)
        .with_context(|| format!("initialising a cluster in {}", root.path().display()))?;
    for (index, ((info, report), dir)) in initialised.iter().zip(&dirs).enumerate() {
        let id = index as u64 + 1;
        for path in &report.created {
            println!("created  {path}");
        }
        println!(
            "replica {id}: phones at {}, replicas at {}, fingerprint {}",
            info.client_addr, info.peer_addr, report.fingerprint
        );
        let config_path = root.path().join(format!("replica-{id}.toml"));
        let metrics = format!("127.0.0.1:{}", 9464 + index);
        let config = format!(
            "# Replica {id} of {count}: `tapledger-node --config {} run`\ndata = {:?}\nlisten = {:?}\npeer_listen = {:?}\nmetrics_listen = {:?}\n",
            config_path.display(),
            dir.path().display().to_string(),
            info.client_addr,
            info.peer_addr,
            metrics,
        );
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        println!("wrote    {}", config_path.display());
    }
    println!("\nstart each replica:");
    for id in 1..=count {
        println!(
            "  tapledger-node --config {} run",
            root.path().join(format!("replica-{id}.toml")).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(settings: &Settings, inspect: bool) -> anyhow::Result<ExitCode> {
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
    let mut node_config = settings.node_config();
    let recorded = recorded_replica(&data_dir).map_err(|error| match error {
        tapledger_node::init::InitError::Store(tapledger_actors::StoreError::Redb(
            redb::Error::DatabaseAlreadyOpen,
        )) => anyhow::anyhow!(
            "{} is locked: is another node running on this data directory?",
            data_dir.path().display()
        ),
        error => error.into(),
    })?;
    if settings.run.peer_listen == PeerListen::Auto
        && let Some(recorded) = &recorded
        && recorded.cluster_size > 1
    {
        node_config.peer_listen = Some(recorded.info.peer_addr.parse().with_context(|| {
            format!(
                "the recorded replication address {} is not HOST:PORT; set peer_listen",
                recorded.info.peer_addr
            )
        })?);
    }
    let recorder = match settings.run.metrics_listen.addr() {
        Some(_) => Some(telemetry::install_recorder()?),
        None => None,
    };
    tracing::info!(
        data = %data_dir.path().display(),
        replica = recorded.as_ref().map_or(1, |recorded| recorded.id),
        listen = %settings.run.listen,
        peer_listen = ?node_config.peer_listen,
        metrics_listen = %settings.run.metrics_listen,
        half_ttl_secs = settings.run.half_ttl_secs,
        max_amount = settings.run.max_amount,
        matcher_shards = settings.run.matcher_shards,
        "starting"
    );
    let node = match RunningNode::start(node_config).await {
        Ok(node) => node,
        Err(NodeError::Ledger(tapledger_actors::LedgerError::Store(error)))
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
        Err(NodeError::Ledger(tapledger_actors::LedgerError::Damaged { file, reason }))
            if inspect =>
        {
            let damage = format!("{file}: {reason}");
            return serve_inspection(settings, &data_dir, damage, recorder).await;
        }
        Err(NodeError::Ledger(tapledger_actors::LedgerError::Damaged { file, reason })) => bail!(
            "{file} failed its integrity check ({reason}); the node does not serve from a damaged \
             ledger. Inspect it read-only with `tapledger-node audit` or `export` (or `run \
             --inspect`, which serves only /readyz and the admin audit), then restore a \
             backup (`tapledger-node restore`) or, on a replica of a cluster, replace it: \
             `cluster remove` it, `init` a new data directory and `cluster add` that"
        ),
        Err(error) => return Err(error).context("starting the node"),
    };
    let admin_credential = load_admin_credential(&data_dir.admin())?;

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
    // Operators and scripts read these lines; the addresses are the real
    // ones (a port of 0 in the settings is resolved here).
    println!(
        "listening on {} (fingerprint {})",
        node.local_addr, node.fingerprint
    );
    if let Some((telemetry, server)) = &http {
        telemetry.set_ready(true);
        println!("metrics on http://{}/metrics", server.local_addr);
    }
    if let Some(peer_addr) = node.peer_addr {
        println!(
            "replicating on {peer_addr} as replica {}",
            node.ledger().id()
        );
    }
    let _ = std::io::stdout().flush();

    let failed = tokio::select! {
        _ = wait_for_signal() => None,
        failure = replication_failure(node.ledger()) => Some(failure),
    };
    match &failed {
        None => tracing::info!("shutting down"),
        Some(failure) => {
            tracing::error!(%failure, "replication stopped on this replica; exiting so a supervisor restarts it")
        }
    }
    if let Some((telemetry, server)) = http {
        telemetry.set_ready(false);
        server.stop().await;
    }
    node.shutdown(settings.grace()).await;
    tracing::info!("stopped");
    Ok(match failed {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(EXIT_ERROR),
    })
}

/// `run --inspect` on a damaged ledger: the HTTP endpoints over the ledger
/// opened read-only, until SIGTERM or Ctrl-C.
async fn serve_inspection(
    settings: &Settings,
    data_dir: &DataDir,
    damage: String,
    recorder: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<ExitCode> {
    let (Some(addr), Some(recorder)) = (settings.run.metrics_listen.addr(), recorder) else {
        bail!("{damage}; --inspect serves the HTTP endpoints, but metrics_listen is off");
    };
    tracing::error!(%damage, "the ledger failed its integrity check; serving it read-only for inspection: no phones, no writes");
    let store = Arc::new(ops::open_read_only(&data_dir.ledger())?);
    let telemetry = Arc::new(Telemetry::inspecting(
        recorder,
        store,
        damage.clone(),
        load_admin_credential(&data_dir.admin())?,
    ));
    let server = HttpServer::start(addr, telemetry)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    println!("inspecting a damaged ledger, read-only ({damage}); Ctrl-C to stop");
    println!("metrics on http://{}/metrics", server.local_addr);
    let _ = std::io::stdout().flush();
    wait_for_signal().await;
    server.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// Resolves when Raft stops on this replica (its log or ledger failed): the
/// replica can no longer take part, so the process should end.
async fn replication_failure(ledger: &Arc<Ledger>) -> String {
    let mut metrics = ledger.raft().metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "Raft stopped".into();
        }
    }
}

async fn status(settings: &Settings) -> anyhow::Result<ExitCode> {
    let data_dir = DataDir::new(&settings.global.data);
    match ops::open_read_only(&data_dir.ledger()) {
        Ok(store) => {
            let (applied, membership) = store.raft_state()?;
            drop(store);
            let recorded = recorded_replica(&data_dir)?;
            println!(
                "replica     {} (stopped; read from {})",
                recorded.as_ref().map_or(1, |recorded| recorded.id),
                data_dir.path().display()
            );
            println!(
                "applied     {}",
                applied.map_or("-".to_string(), |log_id| log_id.index.to_string())
            );
            let voters: Vec<String> = membership
                .membership()
                .voter_ids()
                .map(|id| id.to_string())
                .collect();
            println!(
                "voters      {}",
                if voters.is_empty() {
                    "none yet".to_string()
                } else {
                    voters.join(", ")
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(OpenError::Locked(_)) => {
            let addr = node_http(settings)?;
            let admin = load_admin_credential(&data_dir.admin())?;
            let (status, body) =
                telemetry::admin_request(addr, "/admin/status", &admin, String::new()).await?;
            if !status.is_success() {
                bail!("the node answered {status}: {}", body.trim());
            }
            print!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => Err(error.into()),
    }
}

async fn cluster(settings: &Settings, command: ClusterCommand) -> anyhow::Result<ExitCode> {
    let data_dir = DataDir::new(&settings.global.data);
    let (path, body) = match command {
        ClusterCommand::Add {
            id,
            client_addr,
            peer_addr,
            cert,
        } => {
            let certificates = tapledger_certs::load_certificates(&cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            let fingerprint = tapledger_certs::Fingerprint::of(&certificates[0]);
            (
                "/admin/cluster/add",
                format!("{id} {client_addr} {peer_addr} {fingerprint}"),
            )
        }
        ClusterCommand::Remove { id } => ("/admin/cluster/remove", id.to_string()),
    };
    let addr = settings.local_http_addr().context(
        "cluster changes go through the running leader's HTTP server, and metrics_listen is off",
    )?;
    let admin = load_admin_credential(&data_dir.admin())?;
    let (status, answer) = telemetry::admin_request(addr, path, &admin, body).await?;
    if !status.is_success() {
        bail!("the node refused ({status}): {}", answer.trim());
    }
    print!("{answer}");
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
    match ops::open_read_only(&path) {
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
        // A file too damaged to open fails the audit: it says so, exit 1.
        Err(OpenError::Store { source, .. }) if tapledger_actors::store::is_damage(&source) => {
            let report = tapledger_actors::AuditReport {
                problems: vec![tapledger_actors::Finding::FileDamaged(format!(
                    "the file is damaged: redb's page checksums or structure fail ({source})"
                ))],
                ..Default::default()
            };
            println!("audit of {}", path.display());
            print!("{}", ops::audit_text(&report));
            Ok(ExitCode::from(EXIT_AUDIT_FAILED))
        }
        Err(error) => Err(error.into()),
    }
}

fn export(
    data_dir: &DataDir,
    ledger: Option<PathBuf>,
    out: &Path,
    format: Option<Format>,
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
    let format = format.unwrap_or(
        if out
            .extension()
            .is_some_and(|extension| extension == "parquet")
        {
            Format::Parquet
        } else {
            Format::Csv
        },
    );
    let out_file = std::io::BufWriter::new(file);
    let summary = match format {
        Format::Csv => tapledger_node::export::export_csv(&store, out_file, range)?,
        Format::Parquet => tapledger_node::export::export_parquet(&store, out_file, range)?,
    };
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
    let copy = ops::open_read_only(to)?;
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
    let store = match ops::open_to_replace(&path) {
        Ok(store) => store,
        Err(OpenError::Missing(_)) => {
            // A typo in --data must not look like success.
            bail!(
                "{}: no ledger there, nothing reset (is --data right? `tapledger-node init` makes one)",
                path.display()
            );
        }
        Err(error) => return Err(error.into()),
    };
    let contents =
        ops::describe_for_reset(&store).unwrap_or_else(|error| format!("unreadable: {error}"));
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
