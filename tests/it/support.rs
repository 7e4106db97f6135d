//! Helpers shared by the integration tests: a ledger in a temporary
//! directory, submissions that must end one way, payments in one call. Half
//! builders, funded accounts and time limits are the test kit's
//! (`tapledger-test-kit`), re-exported here.

use std::sync::Arc;

use tapledger_actors::{
    AuditReport, Ledger, LedgerConfig, ManualClock, Resolution, Submission, Ticket,
};
use tapledger_protocol::{AccountId, Half, Outcome, Timestamp, TxKey};
pub use tapledger_test_kit::{
    new_account, open_accounts, receive, receive_half, send, send_half, within, within_for,
};

/// A ledger on a fresh temporary file. Keep the `TempDir` alive while it runs.
pub async fn temp_ledger(configure: impl FnOnce(&mut LedgerConfig)) -> (tempfile::TempDir, Ledger) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = LedgerConfig::new(dir.path().join("ledger.redb"));
    configure(&mut config);
    let ledger = Ledger::open(config).await.expect("open ledger");
    (dir, ledger)
}

/// Node time at which manual clocks start: 2023-11-14, far from zero so that
/// "the past" is representable.
pub const CLOCK_START: Timestamp = Timestamp(1_700_000_000_000_000);

/// A ledger on a fresh temporary file whose node time moves only when the
/// returned clock is advanced.
pub async fn manual_ledger(
    configure: impl FnOnce(&mut LedgerConfig),
) -> (tempfile::TempDir, Ledger, ManualClock) {
    let clock = ManualClock::new(CLOCK_START);
    let shared = clock.clone();
    let (dir, ledger) = temp_ledger(move |config| {
        config.clock = Arc::new(shared);
        configure(config);
    })
    .await;
    (dir, ledger, clock)
}

/// Closes `ledger` cleanly and opens the same file with the same
/// configuration (and so the same clock): a restart.
pub async fn reopen(ledger: Ledger) -> Ledger {
    let config = ledger.config().clone();
    within(ledger.close()).await;
    open_after_close(config).await
}

/// Opens a ledger whose previous instance on the same file just closed.
/// `Ledger::close` releases the file before it returns, so this must succeed
/// at the first attempt (`regressions::ledger_reopens_as_soon_as_close_returns`).
pub async fn open_after_close(config: LedgerConfig) -> Ledger {
    within(Ledger::open(config))
        .await
        .unwrap_or_else(|error| panic!("reopen ledger right after close: {error}"))
}

/// Audits the books and fails the test, naming every problem, if they are off.
pub fn assert_books(ledger: &Ledger) -> AuditReport {
    let report = ledger.audit().expect("audit");
    assert!(report.is_ok(), "audit problems: {:#?}", report.problems);
    report
}

/// Submits a half that must be over at once (refused, or its key decided).
pub async fn submit_done(ledger: &Ledger, submitter: AccountId, half: Half) -> Resolution {
    match within(ledger.submit(submitter, half.clone()))
        .await
        .expect("submit")
    {
        Submission::Done(resolution) => resolution,
        Submission::Pending(_) => panic!("{half:?} from {submitter} should be over, not pending"),
    }
}

/// Submits a half that must wait for its partner.
pub async fn submit_pending(ledger: &Ledger, submitter: AccountId, half: Half) -> Ticket {
    match within(ledger.submit(submitter, half.clone()))
        .await
        .expect("submit")
    {
        Submission::Pending(ticket) => ticket,
        Submission::Done(resolution) => {
            panic!("{half:?} from {submitter} should be pending, got {resolution:?}")
        }
    }
}

/// The outcome a resolution carries; fails the test on a refusal.
pub fn final_outcome(resolution: &Resolution) -> Arc<Outcome> {
    match resolution {
        Resolution::Final(outcome) => outcome.clone(),
        Resolution::Refused(code) => panic!("expected a final outcome, got refusal {code}"),
    }
}

/// A payment's two halves in one go: send first, then receive. Returns the
/// outcome both submitters heard (they must agree).
pub async fn pay(
    ledger: &Ledger,
    tx_key: TxKey,
    sender: AccountId,
    receiver: AccountId,
    amount: u64,
) -> Arc<Outcome> {
    let ticket = submit_pending(ledger, sender, send(tx_key, sender, amount)).await;
    let resolution = submit_done(ledger, receiver, receive(tx_key, receiver, sender, amount)).await;
    let outcome = final_outcome(&resolution);
    let heard_by_sender = within(ticket.resolution()).await.expect("ticket");
    assert_eq!(heard_by_sender, Resolution::Final(outcome.clone()));
    outcome
}

/// A key on a chosen matcher shard (the ledger spreads keys by
/// `tx_key % matcher_shards`), distinct for distinct `index`.
pub fn key_on_shard(index: u128, shard: u128, shards: u128) -> TxKey {
    TxKey::from_u128((index + 1) * shards + shard)
}

/// A temporary directory on a RAM-backed file system where there is one
/// (`/dev/shm`), else the usual one. fsync there returns at once, so tests of
/// logic that commit thousands of times are bound by CPU, not by a disk
/// shared with other builds. Tests of durability should use `tempdir()`.
pub fn ram_tempdir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().expect("temp dir")
}
