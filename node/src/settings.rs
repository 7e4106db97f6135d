//! The operator's settings: where each comes from and which source wins.
//!
//! Every setting has one name used three ways: a key in the TOML file given by
//! `--config` (`half_ttl_secs = 300`), an environment variable
//! (`TAPLEDGER_HALF_TTL_SECS=300`) and a flag (`--half-ttl-secs 300`).
//! Precedence, highest first: flags, environment, file, built-in defaults.
//! An unknown key in the file is an error, so a typo never silently falls
//! back to a default.
//!
//! This module only resolves values; it opens no sockets and reads no ledger.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tapledger_protocol::{
    AUTH_FAILURES_PER_CONNECTION_MAX_DEFAULT, IDLE_TIMEOUT_MS_DEFAULT,
    REQUESTS_IN_FLIGHT_MAX_DEFAULT, STREAMS_PER_CONNECTION_MAX_DEFAULT,
};

use crate::config::{Limits, NodeConfig};
use tapledger_actors::ReplicationConfig;

/// Where the node serves QUIC when nothing says otherwise.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7443";
/// Where the metrics and health HTTP server listens when nothing says otherwise.
pub const METRICS_LISTEN_DEFAULT: &str = "127.0.0.1:9464";
pub const DATA_DEFAULT: &str = "tapledger-data";
/// The longest `commit_interval_ms` accepted: longer only delays commits.
const COMMIT_INTERVAL_MS_MAX: u64 = 1_000;

/// Declares one layer of optional settings (what flags, environment or file
/// may set) and its resolved counterpart (every value present).
macro_rules! settings_layer {
    (
        $(#[$layer_meta:meta])*
        pub struct $layer:ident => $resolved:ident {
            $(
                $(#[$field_meta:meta])*
                $field:ident : $ty:ty = $default:expr;
            )*
        }
    ) => {
        $(#[$layer_meta])*
        #[derive(Clone, Debug, Default, clap::Args, Deserialize)]
        pub struct $layer {
            $(
                $(#[$field_meta])*
                #[serde(default)]
                pub $field: Option<$ty>,
            )*
        }

        impl $layer {
            /// The keys this layer accepts in a configuration file.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Each value of `self`, or of `lower` where `self` has none.
            pub fn over(self, lower: $layer) -> $layer {
                $layer { $($field: self.$field.or(lower.$field),)* }
            }
        }

        /// Every setting with its value decided.
        #[derive(Clone, Debug, PartialEq, Serialize)]
        pub struct $resolved {
            $(pub $field: $ty,)*
        }

        impl $resolved {
            /// Fills what no source set with the built-in default.
            pub fn from_layer(layer: $layer) -> $resolved {
                $resolved { $($field: layer.$field.unwrap_or_else(|| $default),)* }
            }
        }
    };
}

settings_layer! {
    /// Settings every subcommand reads.
    pub struct GlobalLayer => GlobalSettings {
        /// Data directory: ledger, TLS identity, admin credential.
        /// [default: tapledger-data]
        #[arg(long, env = "TAPLEDGER_DATA", global = true, value_name = "DIR")]
        data: PathBuf = PathBuf::from(DATA_DEFAULT);
        /// Log format: `human` (for terminals) or `json` (one object a line).
        /// [default: human]
        #[arg(long, env = "TAPLEDGER_LOG_FORMAT", global = true, value_name = "FORMAT")]
        log_format: LogFormat = LogFormat::Human;
        /// Log filter, in tracing's EnvFilter syntax (e.g. `info`,
        /// `tapledger_node=debug`, `info,openraft=info` for Raft's own
        /// chatter). [default: info,openraft=warn]
        #[arg(long, env = "TAPLEDGER_LOG", global = true, value_name = "FILTER")]
        log: String = "info,openraft=warn".to_string();
    }
}

settings_layer! {
    /// Settings of a serving node (`run`).
    pub struct RunLayer => RunSettings {
        /// UDP address to serve QUIC on. [default: 127.0.0.1:7443]
        #[arg(long, env = "TAPLEDGER_LISTEN", value_name = "ADDR", help_heading = "Network")]
        listen: SocketAddr = LISTEN_DEFAULT.parse().expect("valid default");
        /// UDP address the other replicas connect to (replication, mutual
        /// TLS), `off`, or `auto`: the replication address `init` recorded,
        /// when the cluster has more than this replica. [default: auto]
        #[arg(long, env = "TAPLEDGER_PEER_LISTEN", value_name = "ADDR|auto|off", help_heading = "Network")]
        peer_listen: PeerListen = PeerListen::Auto;
        /// TCP address of the HTTP server for /metrics, /healthz, /readyz and
        /// the loopback-only admin endpoints, or `off`.
        /// [default: 127.0.0.1:9464]
        #[arg(long, env = "TAPLEDGER_METRICS_LISTEN", value_name = "ADDR|off", help_heading = "Network")]
        metrics_listen: HttpListen = HttpListen::At(METRICS_LISTEN_DEFAULT.parse().expect("valid default"));
        /// Seconds a lone half waits for its partner before it expires (code 500).
        /// [default: 300]
        #[arg(long, env = "TAPLEDGER_HALF_TTL_SECS", value_name = "SECS", help_heading = "Ledger")]
        half_ttl_secs: f64 = tapledger_actors::HALF_TTL_DEFAULT.as_secs_f64();
        /// Largest payment, in minor units. [default: 100000000]
        #[arg(long, env = "TAPLEDGER_MAX_AMOUNT", value_name = "MINOR_UNITS", help_heading = "Ledger")]
        max_amount: u64 = tapledger_actors::MAX_AMOUNT_DEFAULT;
        /// Matcher actors; halves are spread over them by tx_key. [default: 2]
        #[arg(long, env = "TAPLEDGER_MATCHER_SHARDS", value_name = "N", help_heading = "Ledger")]
        matcher_shards: usize = 2;
        /// Lone halves one account may have waiting (code 800 beyond). [default: 64]
        #[arg(long, env = "TAPLEDGER_PENDING_HALVES_PER_ACCOUNT_MAX", value_name = "N", help_heading = "Ledger")]
        pending_halves_per_account_max: u32 = tapledger_actors::PENDING_HALVES_PER_ACCOUNT_MAX_DEFAULT;
        /// Seconds an unused account actor stays in memory. [default: 30]
        #[arg(long, env = "TAPLEDGER_ACCOUNT_IDLE_SECS", value_name = "SECS", help_heading = "Ledger")]
        account_idle_secs: f64 = tapledger_actors::ACCOUNT_IDLE_DEFAULT.as_secs_f64();
        /// Account actors in memory at once, about: beyond it the least
        /// recently used idle ones leave early (~6.5 KB each). [default: 65536]
        #[arg(long, env = "TAPLEDGER_LIVE_ACCOUNTS_MAX", value_name = "N", help_heading = "Ledger")]
        live_accounts_max: usize = tapledger_actors::LIVE_ACCOUNTS_MAX_DEFAULT;
        /// Milliseconds the leader waits after proposing a log entry of
        /// several requests before it proposes the next small one (under
        /// a steady load each commit then holds more; a commit costs about
        /// the same CPU whatever it holds). A lone request never waits; 0
        /// proposes whenever nothing is in flight. [default: 5]
        #[arg(long, env = "TAPLEDGER_COMMIT_INTERVAL_MS", value_name = "MS", help_heading = "Ledger")]
        commit_interval_ms: u64 = tapledger_actors::committer::COMMIT_INTERVAL_MIN.as_millis() as u64;
        /// Milliseconds between the leader's heartbeats; also how long a
        /// follower has to answer the leader (openraft): raise it on slow
        /// disks or busy machines. [default: 100]
        #[arg(long, env = "TAPLEDGER_HEARTBEAT_MS", value_name = "MS", help_heading = "Replication")]
        heartbeat_ms: u64 = ReplicationConfig::default().heartbeat.as_millis() as u64;
        /// A follower that hears no leader for a random time between this and
        /// its maximum (about 1.5 times this), plus that maximum again
        /// (openraft's leader lease), starts an election: about 280 to 340 ms
        /// by default (checked every 1.5 heartbeats). Must be above
        /// heartbeat_ms. [default: 110]
        #[arg(long, env = "TAPLEDGER_ELECTION_TIMEOUT_MS", value_name = "MS", help_heading = "Replication")]
        election_timeout_ms: u64 = ReplicationConfig::default().election_timeout.0.as_millis() as u64;
        /// Log entries between snapshots (each snapshot compacts the log).
        /// [default: 4096]
        #[arg(long, env = "TAPLEDGER_SNAPSHOT_AFTER_ENTRIES", value_name = "N", help_heading = "Replication")]
        snapshot_after_entries: u64 = ReplicationConfig::default().snapshot_after_entries;
        /// Open connections at most; further ones are refused. [default: 20000]
        #[arg(long, env = "TAPLEDGER_CONNECTIONS_MAX", value_name = "N", help_heading = "Limits")]
        connections_max: usize = Limits::default().connections_max;
        /// Above this many open connections, new clients must first prove
        /// their address (QUIC retry). [default: 10000]
        #[arg(long, env = "TAPLEDGER_RETRY_ABOVE_CONNECTIONS", value_name = "N", help_heading = "Limits")]
        retry_above_connections: usize = Limits::default().retry_above_connections;
        /// New connection attempts per second taken without address
        /// validation; beyond this rate (a bucket of one second's worth),
        /// clients must first prove their address (QUIC retry). 0 validates
        /// every client. [default: 2000]
        #[arg(long, env = "TAPLEDGER_RETRY_ABOVE_ATTEMPTS_PER_SEC", value_name = "N", help_heading = "Limits")]
        retry_above_attempts_per_sec: u32 = Limits::default().retry_above_attempts_per_sec;
        /// Authenticated connections one account may hold at once; the next
        /// authentication is refused (error 1015). [default: 16]
        #[arg(long, env = "TAPLEDGER_CONNECTIONS_PER_ACCOUNT_MAX", value_name = "N", help_heading = "Limits")]
        connections_per_account_max: u32 = Limits::default().connections_per_account_max;
        /// Percent of connections_max above which the node is busy and gives
        /// connections that have not authenticated only
        /// busy_first_request_timeout_secs. [default: 90]
        #[arg(long, env = "TAPLEDGER_BUSY_ABOVE_PERCENT", value_name = "PERCENT", help_heading = "Limits")]
        busy_above_percent: u8 = Limits::default().busy_above_percent;
        /// Seconds a new connection has to authenticate while the node is
        /// busy (see busy_above_percent). [default: 1]
        #[arg(long, env = "TAPLEDGER_BUSY_FIRST_REQUEST_TIMEOUT_SECS", value_name = "SECS", help_heading = "Limits")]
        busy_first_request_timeout_secs: f64 = Limits::default().busy_first_request_timeout.as_secs_f64();
        /// Request streams a connection may have open at once. [default: 4]
        #[arg(long, env = "TAPLEDGER_STREAMS_PER_CONNECTION_MAX", value_name = "N", help_heading = "Limits")]
        streams_per_connection_max: u32 = STREAMS_PER_CONNECTION_MAX_DEFAULT;
        /// Requests a connection may have awaiting an answer. [default: 256]
        #[arg(long, env = "TAPLEDGER_REQUESTS_IN_FLIGHT_MAX", value_name = "N", help_heading = "Limits")]
        requests_in_flight_max: u32 = REQUESTS_IN_FLIGHT_MAX_DEFAULT;
        /// Failed authentications before a connection is closed. [default: 3]
        #[arg(long, env = "TAPLEDGER_AUTH_FAILURES_MAX", value_name = "N", help_heading = "Limits")]
        auth_failures_max: u32 = AUTH_FAILURES_PER_CONNECTION_MAX_DEFAULT;
        /// Malformed frames (errors 1000..=1003) one connection may send,
        /// over all its streams, before it is closed with 1014. [default: 64]
        #[arg(long, env = "TAPLEDGER_BAD_FRAMES_MAX", value_name = "N", help_heading = "Limits")]
        bad_frames_max: u32 = crate::config::BAD_FRAMES_PER_CONNECTION_MAX_DEFAULT;
        /// Seconds of silence after which a connection is closed. [default: 30]
        #[arg(long, env = "TAPLEDGER_IDLE_TIMEOUT_SECS", value_name = "SECS", help_heading = "Limits")]
        idle_timeout_secs: f64 = IDLE_TIMEOUT_MS_DEFAULT as f64 / 1000.0;
        /// Seconds a new connection has to authenticate (or make an admin
        /// request). [default: 10]
        #[arg(long, env = "TAPLEDGER_FIRST_REQUEST_TIMEOUT_SECS", value_name = "SECS", help_heading = "Limits")]
        first_request_timeout_secs: f64 = Limits::default().first_request_timeout.as_secs_f64();
        /// Seconds requests in flight get to finish at shutdown (SIGTERM,
        /// Ctrl-C) before connections are closed. [default: 10]
        #[arg(long, env = "TAPLEDGER_GRACE_SECS", value_name = "SECS", help_heading = "Shutdown")]
        grace_secs: f64 = 10.0;
    }
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event, with its spans.
    Human,
    /// One JSON object per event, with its spans' fields.
    Json,
}

/// A TCP listening address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpListen {
    Off,
    At(SocketAddr),
}

impl HttpListen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            HttpListen::Off => None,
            HttpListen::At(addr) => Some(addr),
        }
    }
}

impl FromStr for HttpListen {
    type Err = String;
    fn from_str(text: &str) -> Result<HttpListen, String> {
        match text.trim() {
            "off" | "none" | "" => Ok(HttpListen::Off),
            addr => addr
                .parse()
                .map(HttpListen::At)
                .map_err(|error| format!("`{addr}`: {error} (expected HOST:PORT or `off`)")),
        }
    }
}

impl std::fmt::Display for HttpListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpListen::Off => f.write_str("off"),
            HttpListen::At(addr) => addr.fmt(f),
        }
    }
}

impl Serialize for HttpListen {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HttpListen {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<HttpListen, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the replication endpoint listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerListen {
    /// The replication address `init` recorded, when the cluster has more
    /// than this replica; none for a cluster of one.
    Auto,
    Off,
    At(SocketAddr),
}

impl FromStr for PeerListen {
    type Err = String;
    fn from_str(text: &str) -> Result<PeerListen, String> {
        match text.trim() {
            "auto" => Ok(PeerListen::Auto),
            "off" | "none" => Ok(PeerListen::Off),
            addr => addr.parse().map(PeerListen::At).map_err(|error| {
                format!("`{addr}`: {error} (expected HOST:PORT, `auto` or `off`)")
            }),
        }
    }
}

impl std::fmt::Display for PeerListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerListen::Auto => f.write_str("auto"),
            PeerListen::Off => f.write_str("off"),
            PeerListen::At(addr) => addr.fmt(f),
        }
    }
}

impl Serialize for PeerListen {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PeerListen {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<PeerListen, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a configuration file may hold: both layers, flat.
#[derive(Clone, Debug, Default)]
pub struct FileSettings {
    pub global: GlobalLayer,
    pub run: RunLayer,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: unknown setting `{key}` (known: {known})")]
    UnknownKey {
        path: String,
        key: String,
        known: String,
    },
    #[error("environment: {0}")]
    Environment(String),
    #[error("{name} must be a positive number of seconds, not {value}")]
    NotPositive { name: &'static str, value: f64 },
    #[error("{0}")]
    Invalid(String),
}

/// A TOML error as one line: `line L, column C: what` when the error knows
/// where it is, then the message with its own line breaks folded.
fn toml_error_line(text: &str, error: &toml::de::Error) -> String {
    let message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

impl FileSettings {
    /// Parses a configuration file's text. `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<FileSettings, SettingsError> {
        let parse_error = |message: String| SettingsError::Parse {
            path: origin.to_string(),
            message,
        };
        let table: toml::Table =
            toml::from_str(text).map_err(|error| parse_error(toml_error_line(text, &error)))?;
        let known: Vec<&str> = GlobalLayer::KEYS
            .iter()
            .chain(RunLayer::KEYS)
            .copied()
            .collect();
        if let Some(key) = table.keys().find(|key| !known.contains(&key.as_str())) {
            return Err(SettingsError::UnknownKey {
                path: origin.to_string(),
                key: key.clone(),
                known: known.join(", "),
            });
        }
        let global = GlobalLayer::deserialize(table.clone())
            .map_err(|error| parse_error(toml_error_line(text, &error)))?;
        let run = RunLayer::deserialize(table)
            .map_err(|error| parse_error(toml_error_line(text, &error)))?;
        Ok(FileSettings { global, run })
    }

    pub fn load(path: &Path) -> Result<FileSettings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        FileSettings::parse(&text, &path.display().to_string())
    }
}

/// Reads the `TAPLEDGER_*` variables of the run settings, for subcommands
/// that take no run flags but need to find a running node.
pub fn run_layer_from_env() -> Result<RunLayer, SettingsError> {
    #[derive(clap::Parser)]
    struct EnvOnly {
        #[command(flatten)]
        run: RunLayer,
    }
    use clap::Parser;
    EnvOnly::try_parse_from(["tapledger-node"])
        .map(|parsed| parsed.run)
        .map_err(|error| SettingsError::Environment(error.to_string().trim().to_string()))
}

/// Every setting, resolved.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    #[serde(flatten)]
    pub global: GlobalSettings,
    #[serde(flatten)]
    pub run: RunSettings,
}

impl Settings {
    /// Stacks the layers: `flags_and_env` (clap reads both, flags first)
    /// over the file over the defaults.
    pub fn resolve(
        global_flags_and_env: GlobalLayer,
        run_flags_and_env: RunLayer,
        file: FileSettings,
    ) -> Result<Settings, SettingsError> {
        let settings = Settings {
            global: GlobalSettings::from_layer(global_flags_and_env.over(file.global)),
            run: RunSettings::from_layer(run_flags_and_env.over(file.run)),
        };
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), SettingsError> {
        let run = &self.run;
        for (name, value) in [
            ("half_ttl_secs", run.half_ttl_secs),
            ("account_idle_secs", run.account_idle_secs),
            ("idle_timeout_secs", run.idle_timeout_secs),
            ("first_request_timeout_secs", run.first_request_timeout_secs),
            (
                "busy_first_request_timeout_secs",
                run.busy_first_request_timeout_secs,
            ),
            ("grace_secs", run.grace_secs),
        ] {
            if !(value.is_finite() && value > 0.0 && value < 1e9) {
                return Err(SettingsError::NotPositive { name, value });
            }
        }
        if run.matcher_shards == 0
            || run.pending_halves_per_account_max == 0
            || run.live_accounts_max == 0
        {
            return Err(SettingsError::Invalid(
                "matcher_shards, pending_halves_per_account_max and live_accounts_max must be at least 1".into(),
            ));
        }
        if run.commit_interval_ms > COMMIT_INTERVAL_MS_MAX {
            return Err(SettingsError::Invalid(format!(
                "commit_interval_ms must be at most {COMMIT_INTERVAL_MS_MAX} (it delays commits under load)"
            )));
        }
        if run.max_amount == 0 {
            return Err(SettingsError::Invalid(
                "max_amount must be at least 1".into(),
            ));
        }
        if run.connections_max == 0 || run.streams_per_connection_max == 0 {
            return Err(SettingsError::Invalid(
                "connections_max and streams_per_connection_max must be at least 1".into(),
            ));
        }
        if run.heartbeat_ms == 0 || run.election_timeout_ms <= run.heartbeat_ms {
            return Err(SettingsError::Invalid(
                "heartbeat_ms must be at least 1 and election_timeout_ms above it".into(),
            ));
        }
        if run.snapshot_after_entries == 0 {
            return Err(SettingsError::Invalid(
                "snapshot_after_entries must be at least 1".into(),
            ));
        }
        if run.requests_in_flight_max == 0 || run.auth_failures_max == 0 || run.bad_frames_max == 0
        {
            return Err(SettingsError::Invalid(
                "requests_in_flight_max, auth_failures_max and bad_frames_max must be at least 1"
                    .into(),
            ));
        }
        if run.connections_per_account_max == 0 {
            return Err(SettingsError::Invalid(
                "connections_per_account_max must be at least 1".into(),
            ));
        }
        if !(1..=100).contains(&run.busy_above_percent) {
            return Err(SettingsError::Invalid(format!(
                "busy_above_percent must be 1 ..= 100, not {}",
                run.busy_above_percent
            )));
        }
        tracing_subscriber::EnvFilter::try_new(&self.global.log)
            .map_err(|error| SettingsError::Invalid(format!("log filter: {error}")))?;
        Ok(())
    }

    /// The settings as a configuration file would hold them.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("settings serialize to TOML")
    }

    pub fn grace(&self) -> Duration {
        Duration::from_secs_f64(self.run.grace_secs)
    }

    /// The node's QUIC and ledger configuration. `peer_listen` is set only
    /// when given as an address (`auto` is resolved against the data
    /// directory by `run`).
    pub fn node_config(&self) -> NodeConfig {
        let run = &self.run;
        let mut config = NodeConfig::new(&self.global.data, run.listen);
        config.ledger = self.ledger_config();
        config.peer_listen = match run.peer_listen {
            PeerListen::At(addr) => Some(addr),
            PeerListen::Auto | PeerListen::Off => None,
        };
        config.limits = Limits {
            connections_max: run.connections_max,
            retry_above_connections: run.retry_above_connections,
            retry_above_attempts_per_sec: run.retry_above_attempts_per_sec,
            connections_per_account_max: run.connections_per_account_max,
            busy_above_percent: run.busy_above_percent,
            busy_first_request_timeout: Duration::from_secs_f64(
                run.busy_first_request_timeout_secs,
            ),
            streams_per_connection_max: run.streams_per_connection_max,
            requests_in_flight_max: run.requests_in_flight_max,
            auth_failures_max: run.auth_failures_max,
            bad_frames_max: run.bad_frames_max,
            idle_timeout: Duration::from_secs_f64(run.idle_timeout_secs),
            first_request_timeout: Duration::from_secs_f64(run.first_request_timeout_secs),
            ..Limits::default()
        };
        config
    }

    /// The ledger's configuration, as `run` opens the ledger (it is
    /// [`NodeConfig::ledger`] too).
    pub fn ledger_config(&self) -> tapledger_actors::LedgerConfig {
        let run = &self.run;
        let mut config =
            tapledger_actors::LedgerConfig::new(self.global.data.join(crate::config::LEDGER_FILE));
        config.half_ttl = Duration::from_secs_f64(run.half_ttl_secs);
        config.max_amount = run.max_amount;
        config.matcher_shards = run.matcher_shards;
        config.pending_halves_per_account_max = run.pending_halves_per_account_max;
        config.account_idle = Duration::from_secs_f64(run.account_idle_secs);
        config.live_accounts_max = run.live_accounts_max;
        config.commit_interval_min = Duration::from_millis(run.commit_interval_ms);
        config.replication = ReplicationConfig {
            heartbeat: Duration::from_millis(run.heartbeat_ms),
            election_timeout: (
                Duration::from_millis(run.election_timeout_ms),
                Duration::from_millis(run.election_timeout_ms * 20 / 13),
            ),
            snapshot_after_entries: run.snapshot_after_entries,
            entries_kept_after_snapshot: (run.snapshot_after_entries / 4).max(1),
        };
        config
    }

    /// Where a client on this machine reaches the node's QUIC port: the
    /// listening address, with an unspecified IP replaced by loopback.
    pub fn local_quic_addr(&self) -> SocketAddr {
        loopback_for(self.run.listen)
    }

    /// Where a client on this machine reaches the HTTP server, if enabled.
    pub fn local_http_addr(&self) -> Option<SocketAddr> {
        self.run.metrics_listen.addr().map(loopback_for)
    }
}

fn loopback_for(addr: SocketAddr) -> SocketAddr {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
