//! The node's settings and the files of its data directory.
//!
//! A data directory holds the ledger (`ledger.redb`), the Raft log
//! (`ledger-raft.redb`: entries, vote, and what `init` recorded: this
//! replica's id and addresses, its peers, the voters a new cluster starts
//! with), snapshots (`ledger-snapshots/`), the TLS identity (`node.crt.pem`,
//! `node.key.pem`, key mode 0600) and the operator's admin credential
//! (`admin.key`, mode 0600). `init` creates them; `run` reads them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tapledger_protocol::{
    AUTH_FAILURES_PER_CONNECTION_MAX_DEFAULT, IDLE_TIMEOUT_MS_DEFAULT,
    REQUESTS_IN_FLIGHT_MAX_DEFAULT, STREAMS_PER_CONNECTION_MAX_DEFAULT,
};

pub const LEDGER_FILE: &str = "ledger.redb";
pub const RAFT_LOG_FILE: &str = "ledger-raft.redb";
pub const SNAPSHOT_DIR: &str = "ledger-snapshots";
pub const CERT_FILE: &str = "node.crt.pem";
pub const KEY_FILE: &str = "node.key.pem";
pub const ADMIN_FILE: &str = "admin.key";

/// Paths of the files in a data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }
    pub fn ledger(&self) -> PathBuf {
        self.root.join(LEDGER_FILE)
    }
    /// The Raft log (beside the ledger, as `LedgerConfig::new` expects it).
    pub fn raft_log(&self) -> PathBuf {
        self.root.join(RAFT_LOG_FILE)
    }
    pub fn snapshots(&self) -> PathBuf {
        self.root.join(SNAPSHOT_DIR)
    }
    pub fn cert(&self) -> PathBuf {
        self.root.join(CERT_FILE)
    }
    pub fn key(&self) -> PathBuf {
        self.root.join(KEY_FILE)
    }
    pub fn admin(&self) -> PathBuf {
        self.root.join(ADMIN_FILE)
    }
    pub fn path(&self) -> &Path {
        &self.root
    }
}

/// Limits on what clients control. Hitting one gives a clear error or a
/// closed connection, never unbounded growth.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections at most; further ones are refused.
    pub connections_max: usize,
    /// Above this many open connections, new clients must prove their address
    /// (QUIC retry) before the node spends a handshake on them.
    pub retry_above_connections: usize,
    /// Connection attempts (QUIC Initials that could start a handshake) per
    /// second the node takes without address validation; beyond this rate
    /// (a token bucket holding one second's worth) attempts from addresses
    /// not yet validated get a QUIC Retry. 0 validates every attempt.
    pub retry_above_attempts_per_sec: u32,
    /// Authenticated connections one account may hold at once; its next
    /// `authenticate` is answered 1015 and the connection closed.
    pub connections_per_account_max: u32,
    /// Above this share of `connections_max` (percent) the node is busy:
    /// connections that have not authenticated get `busy_first_request_timeout`
    /// instead of `first_request_timeout`, so idle slot-holders make way.
    pub busy_above_percent: u8,
    /// The authentication deadline while the node is busy.
    pub busy_first_request_timeout: Duration,
    /// Bidirectional streams a connection may have open at once.
    pub streams_per_connection_max: u32,
    /// Requests a stream may have in flight (including halves waiting for
    /// their partner); further requests are answered with `throttled`.
    pub requests_in_flight_max: u32,
    /// Failed authentications before the connection is closed.
    pub auth_failures_max: u32,
    /// Frames on one connection that could not be used (malformed, unknown
    /// type, limits broken) before it is closed with 1014: a client that
    /// only sends garbage must not cost honest clients their throughput.
    pub bad_frames_max: u32,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// A connection must authenticate (or make an admin request) within this.
    pub first_request_timeout: Duration,
    /// Flow-control window per stream, and for the whole connection.
    pub stream_receive_window_bytes: u32,
    pub connection_receive_window_bytes: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections_max: 20_000,
            retry_above_connections: 10_000,
            retry_above_attempts_per_sec: RETRY_ABOVE_ATTEMPTS_PER_SEC_DEFAULT,
            connections_per_account_max: CONNECTIONS_PER_ACCOUNT_MAX_DEFAULT,
            busy_above_percent: BUSY_ABOVE_PERCENT_DEFAULT,
            busy_first_request_timeout: Duration::from_secs(1),
            streams_per_connection_max: STREAMS_PER_CONNECTION_MAX_DEFAULT,
            requests_in_flight_max: REQUESTS_IN_FLIGHT_MAX_DEFAULT,
            auth_failures_max: AUTH_FAILURES_PER_CONNECTION_MAX_DEFAULT,
            bad_frames_max: BAD_FRAMES_PER_CONNECTION_MAX_DEFAULT,
            idle_timeout: Duration::from_millis(IDLE_TIMEOUT_MS_DEFAULT),
            first_request_timeout: Duration::from_secs(10),
            stream_receive_window_bytes: 256 * 1024,
            connection_receive_window_bytes: 1024 * 1024,
        }
    }
}

/// Default for [`Limits::bad_frames_max`].
pub const BAD_FRAMES_PER_CONNECTION_MAX_DEFAULT: u32 = 64;
/// Default for [`Limits::retry_above_attempts_per_sec`]: well above the
/// rate at which phones reconnect after a failover of a node of this size
/// (they are validated then, which costs them one round trip, not a refusal).
pub const RETRY_ABOVE_ATTEMPTS_PER_SEC_DEFAULT: u32 = 2_000;
/// Default for [`Limits::connections_per_account_max`].
pub const CONNECTIONS_PER_ACCOUNT_MAX_DEFAULT: u32 = 16;
/// Default for [`Limits::busy_above_percent`].
pub const BUSY_ABOVE_PERCENT_DEFAULT: u8 = 90;

/// Everything `run` needs besides the data directory's files.
#[derive(Clone)]
pub struct NodeConfig {
    pub data_dir: DataDir,
    /// Where phones connect.
    pub listen: SocketAddr,
    /// Where the other replicas connect; `None` runs a cluster of one with
    /// no replication endpoint.
    pub peer_listen: Option<SocketAddr>,
    pub limits: Limits,
    /// The whole ledger configuration, exactly as `run` builds it
    /// (`Settings::node_config`): [`crate::RunningNode::start`] opens the
    /// ledger with it, so the sim and the tests set any ledger setting
    /// (pending halves per account, account idle time, ...) here.
    pub ledger: tapledger_actors::LedgerConfig,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> NodeConfig {
        let data_dir = DataDir::new(data_dir);
        let ledger = tapledger_actors::LedgerConfig::new(data_dir.ledger());
        NodeConfig {
            data_dir,
            listen,
            peer_listen: None,
            limits: Limits::default(),
            ledger,
        }
    }
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("peer_listen", &self.peer_listen)
            .field("limits", &self.limits)
            .field("half_ttl", &self.ledger.half_ttl)
            .field("max_amount", &self.ledger.max_amount)
            .field("matcher_shards", &self.ledger.matcher_shards)
            .field(
                "pending_halves_per_account_max",
                &self.ledger.pending_halves_per_account_max,
            )
            .field("account_idle", &self.ledger.account_idle)
            .field("live_accounts_max", &self.ledger.live_accounts_max)
            .field("commit_interval_min", &self.ledger.commit_interval_min)
            .finish_non_exhaustive()
    }
}
