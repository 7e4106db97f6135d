//! Floods of connection attempts over real QUIC on loopback (issue 13):
//! forged Initial packets, connections that never authenticate, and one
//! account opening connection after connection. Each test keeps honest
//! phones paying throughout and checks what the node's defenses promise:
//! address validation (QUIC Retry) above an attempt rate, attempts counted
//! apart from completed handshakes, a cap of authenticated connections per
//! account (1015), and a short authentication deadline while the node is
//! nearly full.
//!
//! Timings are asserted only as generous floors (a tenth of the quiet rate,
//! a reconnect within seconds). The last test measures honest throughput
//! during each kind of flood against a quiet phase of the same run and
//! prints the ratios (README.md, "Not guaranteed").

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tapledger_node::{ApiCredentials, Phone};
use tapledger_protocol::{AccountId, ErrorCode};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::hostile::{CpuTicks, Honest, raw_connect, raw_endpoint};
use crate::net_support::*;
use crate::support::*;

/// Bytes of a forged Initial: the least a client's first datagram may carry
/// (RFC 9000 section 14.1), so the node cannot drop it for its size.
const INITIAL_BYTES: usize = 1200;
/// The longest a forged-Initial flood runs, whatever else happens.
const FLOOD_LIMIT: Duration = Duration::from_secs(20);
/// An honest phone must connect and authenticate within this during a
/// flood. Its first Initial may be lost in the flood (the socket's receive
/// queue overflows) and QUIC resends it after 1 s, then 2 s more.
const RECONNECT_WITHIN: Duration = Duration::from_secs(8);
/// How long each measured phase of the flood tests lasts.
const PHASE: Duration = Duration::from_secs(2);
/// Forged Initials a second in the test that asserts honest phones keep
/// paying. At full speed one local socket sends millions a second and takes
/// a core of this 2-core machine from the node; that case is measured (and
/// reported in README) by `honest_throughput_during_connection_floods`.
const PACED_FLOOD_PER_SEC: u64 = 50_000;

// ---------------------------------------------------------------------------
// Forged Initials.

/// Rewrites `packet` as a new QUIC version 1 Initial for a connection the
/// node has never seen: fresh connection ids and a random "encrypted"
/// payload that no key opens (the attacker does not bother with header
/// protection either, so the node keeps about a quarter of them, those whose
/// reserved bits come out zero, as connection attempts).
fn forge_initial(packet: &mut [u8; INITIAL_BYTES], state: &mut u64) {
    let mut next = || {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    };
    // Long header, fixed bit, type Initial; reserved and packet number
    // length bits are under header protection: random.
    packet[0] = 0xc0 | (next() as u8 & 0x0f);
    packet[1..5].copy_from_slice(&1u32.to_be_bytes());
    packet[5] = 8;
    packet[6..14].copy_from_slice(&next().to_le_bytes());
    packet[14] = 8;
    packet[15..23].copy_from_slice(&next().to_le_bytes());
    // No token; the length of what follows as a two-byte varint.
    packet[23] = 0;
    let length = (INITIAL_BYTES - 26) as u16;
    packet[24..26].copy_from_slice(&(0x4000 | length).to_be_bytes());
    // The bytes header protection samples, and some after them.
    for chunk in packet[26..26 + 64].chunks_mut(8) {
        chunk.copy_from_slice(&next().to_le_bytes());
    }
}

/// One thread sending forged Initials at `target` from one UDP socket as
/// fast as it can, until stopped or `FLOOD_LIMIT` passes.
struct InitialFlood {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl InitialFlood {
    /// At most `rate` datagrams a second when given, else as fast as the
    /// socket takes them.
    fn start(target: SocketAddr, rate: Option<u64>) -> InitialFlood {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("flood socket");
            socket.connect(target).expect("flood target");
            let mut state: u64 = 0x243f_6a88_85a3_08d3;
            let mut packet = [0u8; INITIAL_BYTES];
            for chunk in packet.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let bytes = state.to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            let started = Instant::now();
            let mut sent = 0u64;
            while !stopped.load(Ordering::Relaxed) && started.elapsed() < FLOOD_LIMIT {
                for _ in 0..64 {
                    forge_initial(&mut packet, &mut state);
                    // A full receive buffer drops it quietly; an error (the
                    // node gone) just ends the flood sooner.
                    if socket.send(&packet).is_ok() {
                        sent += 1;
                    }
                }
                if let Some(rate) = rate {
                    let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
            }
            sent
        });
        InitialFlood { stop, thread }
    }

    /// Stops the flood; returns the datagrams sent.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        within(tokio::task::spawn_blocking(move || thread.join()))
            .await
            .expect("join")
            .expect("flood thread")
    }
}

/// The node's counts of connection attempts and what became of them.
#[derive(Clone, Copy, Debug)]
struct Attempts {
    attempts: u64,
    retries: u64,
    failed: u64,
    accepted: u64,
    refused: u64,
}

impl Attempts {
    fn of(node: &TestNode) -> Attempts {
        let counters = node.node.counters();
        Attempts {
            attempts: counters.connection_attempts.load(Ordering::Relaxed),
            retries: counters.connection_retries.load(Ordering::Relaxed),
            failed: counters.handshakes_failed.load(Ordering::Relaxed),
            accepted: counters.connections_accepted.load(Ordering::Relaxed),
            refused: counters.connections_refused.load(Ordering::Relaxed),
        }
    }

    fn since(self, earlier: Attempts) -> Attempts {
        Attempts {
            attempts: self.attempts - earlier.attempts,
            retries: self.retries - earlier.retries,
            failed: self.failed - earlier.failed,
            accepted: self.accepted - earlier.accepted,
            refused: self.refused - earlier.refused,
        }
    }
}

/// Honest payments per second over `phase`.
async fn honest_rate(honest: &Honest, phase: Duration) -> f64 {
    let (before, started) = (honest.settled(), Instant::now());
    tokio::time::sleep(phase).await;
    (honest.settled() - before) as f64 / started.elapsed().as_secs_f64()
}

/// A new connection authenticated as `account`, or why not.
async fn try_reconnect(
    node: &TestNode,
    account: AccountId,
    credentials: &ApiCredentials,
) -> Result<Phone, String> {
    let mut phone = node
        .endpoint
        .connect(node.node.local_addr, "localhost")
        .await
        .map_err(|error| format!("connect: {error}"))?;
    phone
        .authenticate(account, &credentials.key)
        .await
        .map_err(|error| format!("authenticate: {error}"))?;
    Ok(phone)
}

/// How long an honest phone took to connect and authenticate, trying again
/// after failures, at most `limit`; `None` if it did not get in.
async fn reconnect_time(
    node: &TestNode,
    account: AccountId,
    credentials: &ApiCredentials,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let phone = tokio::time::timeout(limit, async {
        loop {
            match try_reconnect(node, account, credentials).await {
                Ok(phone) => return phone,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .ok()?;
    let took = started.elapsed();
    phone.close().await;
    Some(took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_initials_leaves_honest_phones_paying_and_reconnecting() {
    // Goal: one socket sending 50,000 forged Initials a second must not
    // stop honest phones: payments on open
    // connections keep settling (at least a tenth of the quiet rate measured
    // just before, a generous floor: CI, running other tests beside this one,
    // measured 25 %; an unpaced flood gives 1 %), a phone reconnects within a few
    // seconds, and the node counts the flood as attempts, answered with
    // Retries or failed at once, not as accepted connections.
    let node = TestNode::start(|_| {}).await;
    let honest = Honest::start(&node, 2).await;
    let (carol, carol_phone, carol_credentials) = node.phone_with_account(5).await;
    carol_phone.close().await;
    honest.wait_for(3).await;
    let quiet = honest_rate(&honest, PHASE).await;

    let before = Attempts::of(&node);
    let flood = InitialFlood::start(node.node.local_addr, Some(PACED_FLOOD_PER_SEC));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = honest_rate(&honest, PHASE).await;
    let reconnect = reconnect_time(&node, carol, &carol_credentials, RECONNECT_WITHIN).await;
    let sent = flood.stop().await;
    let counted = Attempts::of(&node).since(before);
    println!(
        "forged Initials: {sent} sent; honest {during:.0}/s during the flood, {quiet:.0}/s \
         quiet ({:.0}%); reconnect {reconnect:?}; node counted {counted:?}",
        100.0 * during / quiet.max(1.0)
    );

    assert!(
        reconnect.is_some(),
        "an honest phone could not reconnect within {RECONNECT_WITHIN:?} during the flood"
    );
    assert!(
        during >= quiet * 0.10,
        "honest payments fell to {during:.0}/s from {quiet:.0}/s during the flood"
    );
    assert!(
        counted.attempts >= 1_000,
        "the flood's attempts are counted: {counted:?} of {sent} sent"
    );
    // Only the honest reconnects completed a handshake (one, plus any the
    // phone retried); every other attempt got a Retry or failed.
    assert!(
        counted.accepted <= 5,
        "forged Initials counted as accepted connections: {counted:?}"
    );
    assert!(
        counted.retries + counted.failed + counted.accepted + counted.refused
            >= counted.attempts - 5,
        "every attempt is accounted for: {counted:?}"
    );
    assert!(
        counted.retries > 0,
        "above the attempt rate the node validates addresses: {counted:?}"
    );
    // The honest phones' connections survived, and the books add up.
    honest.wait_for(3).await;
    honest.finish().await;
    node.assert_still_settles().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_above_the_rate_must_validate_their_address_and_then_get_in() {
    // Goal: with an attempt rate of 0 every new client is sent a Retry
    // first; a real client answers it and connects as usual, so Retries
    // and attempts are counted, and accepted connections are exactly the
    // handshakes that completed.
    let node = TestNode::start(|config| {
        config.limits.retry_above_attempts_per_sec = 0;
    })
    .await;
    let before = Attempts::of(&node);
    let (alice, alice_phone, alice_credentials) = node.phone_with_account(10).await;
    alice_phone.close().await;
    let phone = node.reconnect(alice, &alice_credentials).await;
    assert_eq!(within(phone.balance()).await.unwrap(), 10);
    phone.close().await;
    let counted = Attempts::of(&node).since(before);
    // Three connections (the operator's, then two as Alice): each sent one
    // Retry and came back validated.
    // (A client that resent its first Initial before the Retry reached it
    // would be sent another: at least one each.)
    assert_eq!(counted.accepted, 3, "{counted:?}");
    assert!(counted.retries >= 3, "{counted:?}");
    assert_eq!(
        counted.attempts,
        counted.retries + counted.accepted,
        "{counted:?}"
    );
    assert_eq!(counted.failed, 0, "{counted:?}");
    node.assert_still_settles().await;
    node.stop().await;
}

// ---------------------------------------------------------------------------
// Connections per account.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_holds_at_most_its_connection_cap_and_places_come_back() {
    // Goal: with `connections_per_account_max` 3, an account's fourth
    // authentication gets error 1015 and its connection is closed with code
    // 1015, while other accounts (and unauthenticated or operator
    // connections) are unaffected; once one of the three closes, the
    // account can authenticate again. Honest payments go on throughout.
    const CAP: u32 = 3;
    let node = TestNode::start(|config| {
        config.limits.connections_per_account_max = CAP;
    })
    .await;
    let honest = Honest::start(&node, 1).await;
    let (mallory, first, credentials) = node.phone_with_account(50).await;
    let mut held = vec![first];
    for _ in 1..CAP {
        held.push(node.reconnect(mallory, &credentials).await);
    }
    // Connections that have not authenticated do not count.
    let idle = node.connect().await;
    for _ in 0..2 {
        let mut over = node.connect().await;
        node_error(
            within(over.authenticate(mallory, &credentials.key)).await,
            ErrorCode::TooManyConnections,
        );
        assert_eq!(closed_by_node(&over).await, 1015);
    }
    let counters = node.node.counters();
    assert_eq!(
        counters.account_connections_refused.load(Ordering::Relaxed),
        2
    );
    // The three it holds still work; so do other accounts and the operator.
    for phone in &held {
        assert_eq!(within(phone.balance()).await.unwrap(), 50);
    }
    let (_, other, _) = node.phone_with_account(7).await;
    assert_eq!(within(other.balance()).await.unwrap(), 7);
    honest.wait_for(3).await;

    // A place comes back when one of the three goes.
    held.pop().expect("three held").close().await;
    let again = within(async {
        loop {
            match try_reconnect(&node, mallory, &credentials).await {
                Ok(phone) => return phone,
                // The node may not have seen the close yet.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert_eq!(within(again.balance()).await.unwrap(), 50);
    let mut over = node.connect().await;
    node_error(
        within(over.authenticate(mallory, &credentials.key)).await,
        ErrorCode::TooManyConnections,
    );
    honest.wait_for(3).await;
    honest.finish().await;
    for phone in held.into_iter().chain([again, other, idle, over]) {
        phone.close().await;
    }
    node.assert_books();
    node.stop().await;
}

// ---------------------------------------------------------------------------
// Unauthenticated connections on a nearly full node.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_early_only_while_the_node_is_nearly_full() {
    // Goal: connections that never authenticate keep their place for the
    // whole deadline (30 s here) while the node has room, but while it is
    // busy (8 or more of its 10 places taken) those older than the busy
    // deadline (500 ms) are closed with 1010 until it is not, so a new
    // honest phone gets in within seconds, not 30 s. Authenticated
    // connections are never closed for it.
    const CONNECTIONS_MAX: usize = 10;
    // 80 % of 10.
    const BUSY_AT: usize = 8;
    let busy_deadline = Duration::from_millis(500);
    let node = TestNode::start(|config| {
        config.limits.connections_max = CONNECTIONS_MAX;
        config.limits.busy_above_percent = 80;
        config.limits.first_request_timeout = Duration::from_secs(30);
        config.limits.busy_first_request_timeout = busy_deadline;
    })
    .await;
    let honest = Honest::start(&node, 1).await;
    let (dave, dave_phone, dave_credentials) = node.phone_with_account(3).await;
    dave_phone.close().await;
    node.wait_for_open_connections(2).await;

    // Five idle connections: 7 of 10, not busy. They stay well past the
    // busy deadline.
    let attacker = raw_endpoint(&node);
    let mut old = Vec::new();
    for _ in 0..5 {
        old.push(raw_connect(&attacker, &node).await);
    }
    tokio::time::sleep(busy_deadline * 3).await;
    for connection in &old {
        assert!(
            connection.close_reason().is_none(),
            "closed while the node had room: {:?}",
            connection.close_reason()
        );
    }
    let counters = node.node.counters();
    assert_eq!(
        counters.auth_deadline_closes_busy.load(Ordering::Relaxed),
        0
    );
    honest.wait_for(3).await;

    // Three more fill the node: busy. Old idle ones are closed until it is
    // not busy any more (at least three of them), and a phone gets in.
    let mut new = Vec::new();
    for _ in 0..3 {
        new.push(raw_connect(&attacker, &node).await);
    }
    let started = Instant::now();
    let back = tokio::time::timeout(RECONNECT_WITHIN, async {
        loop {
            match try_reconnect(&node, dave, &dave_credentials).await {
                Ok(phone) => return phone,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no place for an honest phone within {RECONNECT_WITHIN:?}: {} open",
            counters.connections_open.load(Ordering::Relaxed)
        )
    });
    assert_eq!(within(back.balance()).await.unwrap(), 3);
    // Evictions go on while the node is busy: until at most 7 are open,
    // the honest three included.
    tokio::time::timeout(RECONNECT_WITHIN, async {
        while counters.connections_open.load(Ordering::Relaxed) >= BUSY_AT {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the node stayed busy: idle connections were not closed");
    let evicted = counters.auth_deadline_closes_busy.load(Ordering::Relaxed);
    assert!(evicted >= 4, "{evicted} idle connections closed");
    let mut closed = 0;
    for connection in old.iter().chain(&new) {
        // The node closed it, or will not: the close may still be in flight.
        let closing = tokio::time::timeout(Duration::from_millis(100), connection.closed());
        if let Ok(reason) = closing.await {
            assert!(
                matches!(&reason, quinn::ConnectionError::ApplicationClosed(close)
                    if close.error_code.into_inner() == 1010),
                "{reason:?}"
            );
            closed += 1;
        }
    }
    assert!(
        closed >= evicted,
        "{closed} idle connections saw their close after {:?}; the node closed {evicted}",
        started.elapsed()
    );
    assert_eq!(counters.auth_deadline_closes.load(Ordering::Relaxed), 0);
    // The honest pair was never closed.
    honest.wait_for(3).await;
    honest.finish().await;
    back.close().await;
    for connection in old.iter().chain(&new) {
        connection.close(0u32.into(), b"");
    }
    node.assert_books();
    node.stop().await;
}

// ---------------------------------------------------------------------------
// Measurement: honest throughput during each kind of flood.

/// Seconds per phase unless `TAPLEDGER_FLOOD_SECS` says otherwise.
const MEASURE_SECS_DEFAULT: f64 = 0.5;
/// Idle connections the second attacker keeps open (issue 13: 500).
const IDLE_CONNECTIONS: usize = 500;
/// Connections the third attacker tries to hold as one account (issue 13: 300).
const ACCOUNT_CONNECTIONS: usize = 300;
/// The measured node's connection cap: below the idle attacker's 500, so
/// that it fills the node as issue 13 describes.
const MEASURED_CONNECTIONS_MAX: usize = 400;

/// What the attacker does during one phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flood {
    ForgedInitials,
    IdleConnections,
    OneAccountManyConnections,
}

/// Opens connections that never authenticate, keeping `target` open
/// between `tasks` tasks, reopening those the node closes; returns
/// connections opened.
async fn idle_flooder(
    endpoint: quinn::Endpoint,
    node_addr: SocketAddr,
    target: usize,
    stop: watch::Receiver<bool>,
) -> u64 {
    let mut held: Vec<quinn::Connection> = Vec::new();
    let mut opened = 0;
    while !*stop.borrow() {
        held.retain(|connection| connection.close_reason().is_none());
        if held.len() >= target {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let Ok(connecting) = endpoint.connect(node_addr, "localhost") else {
            break;
        };
        match tokio::time::timeout(Duration::from_secs(2), connecting).await {
            Ok(Ok(connection)) => {
                held.push(connection);
                opened += 1;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    for connection in held {
        connection.close(0u32.into(), b"");
    }
    opened
}

/// Connects and authenticates as one account again and again, holding
/// what the node lets it keep, up to `target`; returns authentications the
/// node refused.
async fn account_flooder(
    node: Arc<TestNodeRef>,
    account: AccountId,
    credentials: ApiCredentials,
    target: usize,
    stop: watch::Receiver<bool>,
) -> u64 {
    let mut held: Vec<Phone> = Vec::new();
    let mut refused = 0;
    while !*stop.borrow() {
        held.retain(|phone| phone.close_reason().is_none());
        if held.len() >= target {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut phone = node.endpoint.connect(node.addr, "localhost").await.ok()?;
            match phone.authenticate(account, &credentials.key).await {
                Ok(_) => Some(Ok(phone)),
                Err(_) => Some(Err(phone)),
            }
        })
        .await;
        match attempt {
            Ok(Some(Ok(phone))) => held.push(phone),
            Ok(Some(Err(phone))) => {
                refused += 1;
                phone.close().await;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    for phone in held {
        phone.close().await;
    }
    refused
}

/// What the account flooder needs of the node, shareable between tasks.
struct TestNodeRef {
    endpoint: tapledger_node::ClientEndpoint,
    addr: SocketAddr,
}

/// One attack phase against the quiet phase before it.
struct Measured {
    quiet: f64,
    during: f64,
    reconnect: Option<Duration>,
    attacker: String,
    own_cores: f64,
    other_cores: f64,
}

async fn measure(
    node: &TestNode,
    honest: &Honest,
    flood: Flood,
    phase: Duration,
    victim: (AccountId, &ApiCredentials),
    probe: (AccountId, &ApiCredentials),
) -> Measured {
    let quiet = honest_rate(honest, phase).await;
    let before = Attempts::of(node);
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut initials = None;
    match flood {
        Flood::ForgedInitials => initials = Some(InitialFlood::start(node.node.local_addr, None)),
        Flood::IdleConnections => {
            let endpoint = raw_endpoint(node);
            for _ in 0..8 {
                tasks.spawn(idle_flooder(
                    endpoint.clone(),
                    node.node.local_addr,
                    IDLE_CONNECTIONS / 8,
                    stopped.clone(),
                ));
            }
        }
        Flood::OneAccountManyConnections => {
            let shared = Arc::new(TestNodeRef {
                endpoint: tapledger_node::ClientEndpoint::new(
                    node.node.fingerprint,
                    node.node.local_addr,
                )
                .expect("client endpoint"),
                addr: node.node.local_addr,
            });
            for _ in 0..8 {
                tasks.spawn(account_flooder(
                    shared.clone(),
                    victim.0,
                    victim.1.clone(),
                    ACCOUNT_CONNECTIONS / 8,
                    stopped.clone(),
                ));
            }
        }
    }
    // Let the attack get going (the idle one fills the node) before counting.
    tokio::time::sleep(phase.max(Duration::from_millis(500))).await;
    let cpu = CpuTicks::now();
    let during = honest_rate(honest, phase).await;
    let (own_cores, other_cores) = CpuTicks::now().cores_since(cpu);
    let reconnect = reconnect_time(node, probe.0, probe.1, RECONNECT_WITHIN).await;
    let _ = stop.send(true);
    let mut attacker_total = 0;
    while let Some(joined) = within(tasks.join_next()).await {
        attacker_total += joined.expect("attacker task");
    }
    let counted = Attempts::of(node).since(before);
    let attacker = match flood {
        Flood::ForgedInitials => {
            let sent = initials.take().expect("flood").stop().await;
            format!("{sent} forged Initials sent")
        }
        Flood::IdleConnections => format!("{attacker_total} idle connections opened"),
        Flood::OneAccountManyConnections => {
            format!("{attacker_total} authentications refused 1015")
        }
    };
    Measured {
        quiet,
        during,
        reconnect,
        attacker: format!("{attacker}; node counted {counted:?}"),
        own_cores,
        other_cores,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_throughput_during_connection_floods() {
    // Measurement, printed: honest payments per second (4 pairs) during each
    // kind of flood, against the quiet phase just before it, and how long a
    // new honest phone took to connect and authenticate during it. The node
    // has 400 places. Floods: one thread sending forged Initials as fast as
    // it can; 500 connections that never authenticate, reopened as they are
    // closed; one account connecting and authenticating 300 times over.
    // Node, phones and attackers share this machine's cores, so the figures
    // are a floor. `TAPLEDGER_FLOOD_SECS` sets the length of each phase.
    // Asserted: every honest payment settles and the books add up.
    let secs = std::env::var("TAPLEDGER_FLOOD_SECS")
        .ok()
        .and_then(|secs| secs.parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs > 0.0 && *secs < 600.0)
        .unwrap_or(MEASURE_SECS_DEFAULT);
    let phase = Duration::from_secs_f64(secs);
    let node = TestNode::start(|config| {
        config.limits.connections_max = MEASURED_CONNECTIONS_MAX;
    })
    .await;
    let (victim, victim_phone, victim_credentials) = node.phone_with_account(1).await;
    victim_phone.close().await;
    let (probe, probe_phone, probe_credentials) = node.phone_with_account(1).await;
    probe_phone.close().await;
    let honest = Honest::start(&node, 4).await;
    honest.wait_for(1).await;
    let settled_before = honest.settled();
    for flood in [
        Flood::ForgedInitials,
        Flood::IdleConnections,
        Flood::OneAccountManyConnections,
    ] {
        let measured = measure(
            &node,
            &honest,
            flood,
            phase,
            (victim, &victim_credentials),
            (probe, &probe_credentials),
        )
        .await;
        println!(
            "connection flood measurement, {secs} s phases, {flood:?}: honest {:.0} payments/s \
             ({:.0}% of {:.0}/s quiet just before); a new phone got in after {:?}; {}; CPU: this \
             process {:.2} cores, other processes {:.2} cores",
            measured.during,
            100.0 * measured.during / measured.quiet.max(1.0),
            measured.quiet,
            measured.reconnect,
            measured.attacker,
            measured.own_cores,
            measured.other_cores,
        );
        // Let the node forget the attack before the next quiet phase.
        node.wait_for_open_connections(8).await;
    }
    let total = honest.finish().await;
    println!(
        "connection flood measurement: {} honest payments settled during the floods' run",
        total - settled_before
    );
    node.assert_books();
    node.stop().await;
}
