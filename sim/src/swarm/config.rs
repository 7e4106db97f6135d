//! What a swarm run does: the node, how many phones and payments, the fault
//! share, the arrival rate and the seed. [`SwarmConfig::default`] is the
//! binary's default run (about 10–30 s on two cores in release mode).

use std::time::Duration;

use super::target::Target;
use super::workload::Kind;

/// `half_ttl` of the embedded node: short, so that expiry faults are decided
/// within the run instead of after the default five minutes, and well above
/// a failover (about a second, and the phones' reconnections), so that an
/// honest half the new leader holds does not expire before its partner,
/// resubmitted, arrives.
pub const EMBEDDED_HALF_TTL: Duration = Duration::from_secs(5);

/// How long the target may answer nothing while phones wait (and no replica
/// completes a handshake) before the run ends as failed: well above a change
/// of leader (phones reach the new leader within one to three seconds),
/// well below the schedule of a run.
pub const DEAD_AFTER_DEFAULT: Duration = Duration::from_secs(5);

/// Replicas of the embedded cluster in the default run.
pub const REPLICAS_DEFAULT: usize = 3;

#[derive(Clone, Debug)]
pub struct SwarmConfig {
    pub target: Target,
    /// Simulated phones, each with its own account and QUIC connection.
    pub phones: usize,
    /// Payments to plan (fewer run if `duration` ends first).
    pub payments: u64,
    /// Share of payments that are faults, 0.0 ..= 1.0.
    pub fault_share: f64,
    /// Fault kinds to draw from.
    pub faults: Vec<Kind>,
    /// Open-loop arrivals per second; `None` runs closed loop with
    /// `in_flight` payments at once.
    pub rate: Option<f64>,
    /// Closed loop: payments in flight. Open loop: a bound on the sim's own
    /// memory (latency still counts from the planned tap time).
    pub in_flight: usize,
    /// Start no payment planned later than this.
    pub duration: Option<Duration>,
    /// Seeds every workload choice: the same seed runs the same payments.
    pub seed: u64,
    /// Client UDP sockets the phones' connections are spread over.
    pub endpoints: usize,
    /// Admin connections that open the accounts, pipelined.
    pub admin_connections: usize,
    /// Every phone's opening balance, in minor units.
    pub opening_balance: u64,
    /// Honest amounts are uniform in 1 ..= this, in minor units.
    pub amount_max: u64,
    /// Each phone sends its half up to this long after the tap.
    pub jitter: Duration,
    /// Payments per epoch (see `workload`): phones spend credits received two
    /// epochs earlier. `None`: twice the number of phones.
    pub epoch_payments: Option<u64>,
    /// Bound on every single network step.
    pub step_timeout: Duration,
    /// Expiry faults are skipped when the node's `half_ttl` is longer.
    pub expiry_wait_max: Duration,
    /// Phases and a progress bar on stderr (hidden when not a terminal).
    pub progress: bool,
    /// Kill the embedded cluster's leader this long after the first tap
    /// (only with more than one replica); `None` never.
    pub kill_leader_after: Option<Duration>,
    /// Start the killed replica again this long after the kill; `None` never.
    pub restart_after: Option<Duration>,
    /// End the run, failed, once the target has answered nothing for this
    /// long while requests waited and no replica completes a handshake;
    /// `None` never (then only the stall timeout ends a run whose target
    /// died).
    pub dead_after: Option<Duration>,
}

impl Default for SwarmConfig {
    fn default() -> SwarmConfig {
        SwarmConfig {
            target: Target::Embedded {
                half_ttl: EMBEDDED_HALF_TTL,
                replicas: REPLICAS_DEFAULT,
            },
            phones: 1_000,
            payments: 20_000,
            fault_share: 0.05,
            faults: Kind::FAULTS.to_vec(),
            rate: Some(2_000.0),
            in_flight: 50_000,
            duration: None,
            seed: 1,
            endpoints: 4,
            admin_connections: 4,
            opening_balance: 1_000_000,
            amount_max: 20_000,
            jitter: Duration::from_millis(2),
            epoch_payments: None,
            step_timeout: Duration::from_secs(10),
            expiry_wait_max: Duration::from_secs(30),
            progress: false,
            kill_leader_after: Some(Duration::from_secs(4)),
            restart_after: Some(Duration::from_secs(3)),
            dead_after: Some(DEAD_AFTER_DEFAULT),
        }
    }
}
