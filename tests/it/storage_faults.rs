//! Storage faults: the ledger (a cluster of one replica) runs on two
//! simulated disks, one for the ledger file and one for the Raft log, and
//! one of them starts failing writes (cleanly or torn) or fsyncs after N
//! operations. Whatever the failure point, no caller is ever told "settled"
//! (or "pending", or "account opened") unless it is in the ledger file after
//! a power cut; replication stops and the replica refuses every later write
//! (`LedgerError::Replication`, wire 1100); and both files reopened on
//! healthy disks pass the audit and keep working.
//!
//! The simulated disk ([`SimDisk`]) keeps two images: what reads see (every
//! write so far) and what survives a power cut (only data covered by a
//! successful `sync_data`). Each case reopens both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tapledger_actors::{
    JournalEntry, Ledger, LedgerConfig, LedgerError, LogStore, Resolution, StorageIo, Store,
    Submission,
};
use tapledger_protocol::{AccountId, Half, Outcome, TxKey};

use crate::support::{new_account, receive, send, within, within_for};

// ---------------------------------------------------------------------------
// The simulated disk.

/// Which operation starts failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The n-th `write` (counted from arming) fails and writes nothing.
    Write,
    /// The n-th `write` stores its first half, then fails (a torn write).
    TornWrite,
    /// The n-th `sync_data` fails; nothing since the last good sync is durable.
    Sync,
    /// The n-th `write` panics (a bug in the commit path) and writes nothing.
    Panic,
}

#[derive(Debug, Default)]
struct DiskState {
    /// What reads see: every write so far.
    current: Vec<u8>,
    /// What a power cut leaves: the image as of the last successful sync.
    durable: Vec<u8>,
    /// Fault armed: (kind, operations of that kind still allowed).
    armed: Option<(Fault, u64)>,
    /// Once a fault fired, every later write, resize and sync fails too.
    dead: bool,
    /// Write counts after which to save both images, ascending.
    snapshot_at: std::collections::VecDeque<u64>,
    snapshots: Vec<Snapshot>,
    /// Another disk whose images each snapshot also saves (the Raft log's
    /// beside the ledger's), so a crash image is the pair of both.
    companion: Option<SimDisk>,
}

/// Both images of the disk right after one write: a crash at that moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Successful writes so far.
    pub writes: u64,
    pub current: Vec<u8>,
    pub durable: Vec<u8>,
    /// The companion disk's (current, durable) images at the same moment.
    pub companion: Option<(Vec<u8>, Vec<u8>)>,
}

/// An in-memory disk with separate "written" and "synced" images and an
/// injectable failure. Clones share the same disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<DiskState>>,
    writes: Arc<AtomicU64>,
    syncs: Arc<AtomicU64>,
    fired: Arc<AtomicBool>,
    /// Snapshots taken so far; raised before each copy is made, so anything a
    /// caller heard while it read a lower number is in that snapshot.
    taken: Arc<AtomicUsize>,
}

fn io_error(what: &str) -> std::io::Error {
    std::io::Error::other(format!("simulated disk failure: {what}"))
}

impl SimDisk {
    /// A disk holding `image` (written and synced).
    pub fn with_image(image: Vec<u8>) -> SimDisk {
        let disk = SimDisk::default();
        {
            let mut state = disk.state.lock().unwrap();
            state.durable = image.clone();
            state.current = image;
        }
        disk
    }

    /// From now on, the `allowed + 1`-th operation of kind `fault` fails, and
    /// so does every write-side operation after it.
    pub fn arm(&self, fault: Fault, allowed: u64) {
        self.state.lock().unwrap().armed = Some((fault, allowed));
    }

    /// Saves both images right after each of these write counts (counted
    /// from the disk's creation).
    pub fn snapshot_after_writes(&self, points: impl IntoIterator<Item = u64>) {
        let mut points: Vec<u64> = points.into_iter().collect();
        points.sort_unstable();
        points.dedup();
        self.state.lock().unwrap().snapshot_at = points.into();
    }

    /// Makes every snapshot of this disk also save `companion`'s images.
    pub fn snapshot_with(&self, companion: &SimDisk) {
        self.state.lock().unwrap().companion = Some(companion.clone());
    }

    /// How many snapshots exist; see [`SimDisk::taken`].
    pub fn snapshots_taken(&self) -> usize {
        self.taken.load(Ordering::SeqCst)
    }

    pub fn take_snapshots(&self) -> Vec<Snapshot> {
        std::mem::take(&mut self.state.lock().unwrap().snapshots)
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// (writes, syncs) that succeeded so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::SeqCst),
            self.syncs.load(Ordering::SeqCst),
        )
    }

    /// Every byte written so far: what a crashed process leaves when the
    /// operating system keeps its page cache.
    pub fn current_image(&self) -> Vec<u8> {
        self.state.lock().unwrap().current.clone()
    }

    /// Only what was synced: what a power cut leaves.
    pub fn durable_image(&self) -> Vec<u8> {
        self.state.lock().unwrap().durable.clone()
    }

    /// Decides whether the operation of kind `kind` fails; counts it down.
    fn trip(state: &mut DiskState, kinds: &[Fault]) -> Option<Fault> {
        if state.dead {
            return Some(kinds[0]);
        }
        let (fault, allowed) = state.armed.as_mut()?;
        if !kinds.contains(fault) {
            return None;
        }
        if *allowed == 0 {
            state.dead = true;
            return Some(*fault);
        }
        *allowed -= 1;
        None
    }

    fn die(&self) {
        self.fired.store(true, Ordering::SeqCst);
    }
}

fn range_of(offset: u64, len: usize) -> std::io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io_error("offset"))?;
    Ok(start..start + len)
}

impl redb::StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.state.lock().unwrap().current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let state = self.state.lock().unwrap();
        let source = state
            .current
            .get(range_of(offset, out.len())?)
            .ok_or_else(|| io_error("read past the end"))?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut state = self.state.lock().unwrap();
        if state.dead {
            return Err(io_error("set_len after a failure"));
        }
        let len = usize::try_from(len).map_err(|_| io_error("length"))?;
        state.current.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut state = self.state.lock().unwrap();
        if SimDisk::trip(&mut state, &[Fault::Sync]).is_some() {
            drop(state);
            self.die();
            return Err(io_error("sync_data"));
        }
        state.durable = state.current.clone();
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut state = self.state.lock().unwrap();
        let range = range_of(offset, data.len())?;
        match SimDisk::trip(&mut state, &[Fault::Write, Fault::TornWrite, Fault::Panic]) {
            None => {}
            Some(Fault::Panic) if !self.fired() => {
                drop(state);
                self.die();
                panic!("simulated bug: a panic in the middle of a commit");
            }
            Some(Fault::TornWrite) if !self.fired() => {
                let half = data.len() / 2;
                if let Some(target) = state.current.get_mut(range.start..range.start + half) {
                    target.copy_from_slice(&data[..half]);
                }
                drop(state);
                self.die();
                return Err(io_error("torn write"));
            }
            Some(_) => {
                drop(state);
                self.die();
                return Err(io_error("write"));
            }
        }
        let target = state
            .current
            .get_mut(range)
            .ok_or_else(|| io_error("write past the end"))?;
        target.copy_from_slice(data);
        let writes = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if state.snapshot_at.front() == Some(&writes) {
            state.snapshot_at.pop_front();
            self.taken.fetch_add(1, Ordering::SeqCst);
            let companion = state
                .companion
                .as_ref()
                .map(|companion| (companion.current_image(), companion.durable_image()));
            let snapshot = Snapshot {
                writes,
                current: state.current.clone(),
                durable: state.durable.clone(),
                companion,
            };
            state.snapshots.push(snapshot);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// What callers were told.

/// Every promise the ledger made to a caller during a run. Each carries the
/// number of disk snapshots taken when the caller heard it: snapshot `i`
/// must keep every promise tagged `i` or lower.
#[derive(Default)]
pub struct Told {
    /// Final outcomes callers heard, by key.
    pub finals: HashMap<TxKey, (Arc<Outcome>, usize)>,
    /// Halves acknowledged as durably pending: (key, party, tag).
    pub pending: Vec<(TxKey, AccountId, usize)>,
    /// Accounts whose opening was confirmed.
    pub opened: Vec<(AccountId, usize)>,
    /// Top-ups confirmed: (account, amount, balance after, tag).
    pub topped_up: Vec<(AccountId, u64, u64, usize)>,
    /// Requests answered with an error.
    pub errors: Vec<String>,
    /// Errors saying replication stopped (writes refused after the failure).
    pub poisoned: usize,
}

impl Told {
    fn error(&mut self, error: &LedgerError) {
        if is_poisoned(error) {
            self.poisoned += 1;
        }
        self.errors.push(error.to_string());
    }

    fn resolution(&mut self, tx_key: TxKey, result: Result<Resolution, LedgerError>, tag: usize) {
        match result {
            Ok(Resolution::Final(outcome)) => {
                let earlier = self.finals.entry(tx_key).or_insert((outcome.clone(), tag));
                assert_eq!(earlier.0, outcome, "{tx_key} heard two outcomes");
                earlier.1 = earlier.1.min(tag);
            }
            Ok(Resolution::Refused(_)) => {}
            Err(LedgerError::Closed) => {}
            Err(error) => self.error(&error),
        }
    }
}

/// The error a replica gives for every write once its storage failed.
pub fn is_poisoned(error: &LedgerError) -> bool {
    matches!(error, LedgerError::Replication(_))
}

pub const ACCOUNTS: u64 = 12;
const OPENING_BALANCE: u64 = 10_000;
pub const WORKERS: u64 = 16;

/// A workload of payments against a ledger on two [`SimDisk`]s (its file
/// and its Raft log), recording what callers were told.
#[derive(Clone)]
pub struct Workload {
    pub ledger: Arc<Ledger>,
    /// The ledger file's disk; its snapshots also save the log disk's images.
    pub disk: SimDisk,
    pub accounts: Vec<AccountId>,
    pub told: Arc<Mutex<Told>>,
    pub stop: tokio::sync::watch::Receiver<bool>,
}

impl Workload {
    /// A ledger on fresh simulated disks with `ACCOUNTS` funded accounts.
    pub async fn start(
        disk: SimDisk,
        log_disk: SimDisk,
        snapshots: &std::path::Path,
    ) -> (Workload, tokio::sync::watch::Sender<bool>) {
        disk.snapshot_with(&log_disk);
        let store =
            Store::open_with_backend(disk.clone()).expect("open store on the simulated disk");
        let log = LogStore::open_with_backend(log_disk.clone(), StorageIo::Blocking)
            .expect("open the Raft log on the simulated disk");
        let mut config = LedgerConfig::new(snapshots.join("simulated.redb"));
        config.matcher_shards = 2;
        config.pending_halves_per_account_max = 1_000;
        let ledger = within(Ledger::start(config, Arc::new(store), log))
            .await
            .expect("start ledger");
        let mut accounts = Vec::new();
        for _ in 0..ACCOUNTS {
            accounts.push(
                within(ledger.open_account(new_account(OPENING_BALANCE)))
                    .await
                    .expect("open account"),
            );
        }
        let (stop_sender, stop) = tokio::sync::watch::channel(false);
        let workload = Workload {
            ledger: Arc::new(ledger),
            disk,
            accounts,
            told: Arc::new(Mutex::new(Told::default())),
            stop,
        };
        (workload, stop_sender)
    }

    fn tag(&self) -> usize {
        self.disk.snapshots_taken()
    }

    fn heard(&self, tx_key: TxKey, result: Result<Resolution, LedgerError>) {
        let tag = self.tag();
        self.told.lock().unwrap().resolution(tx_key, result, tag);
    }

    /// Submits a half; waits for its resolution unless `wait` is false or the
    /// workload is stopped first.
    async fn submit(&self, submitter: AccountId, half: Half, wait: bool) {
        let tx_key = half.tx_key();
        match self.ledger.submit(submitter, half).await {
            Ok(Submission::Done(resolution)) => self.heard(tx_key, Ok(resolution)),
            Ok(Submission::Pending(ticket)) => {
                let tag = self.tag();
                self.told
                    .lock()
                    .unwrap()
                    .pending
                    .push((tx_key, submitter, tag));
                if !wait {
                    return;
                }
                let mut stop = self.stop.clone();
                tokio::select! {
                    result = ticket.resolution() => self.heard(tx_key, result),
                    _ = stop.wait_for(|stop| *stop) => {}
                }
            }
            Err(error) => self.heard(tx_key, Err(error)),
        }
    }

    /// One worker: payments between pseudo-random accounts, both halves at
    /// once, with now and then a lone half, a mismatch, a top-up or a new
    /// account, until it has made `payments` or sees the workload stop.
    pub async fn worker(self, index: u64, payments: u64) {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ (index + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let count = self.accounts.len() as u64;
        for round in 0..payments {
            if *self.stop.borrow() || self.told.lock().unwrap().errors.len() > 64 {
                return;
            }
            let sender_index = next() % count;
            let receiver_index = (sender_index + 1 + next() % (count - 1)) % count;
            let (sender, receiver) = (
                self.accounts[sender_index as usize],
                self.accounts[receiver_index as usize],
            );
            let amount = 1 + next() % 300;
            let tx_key = TxKey::new_random();
            match (round + index) % 23 {
                // A lone half that waits (the TTL is long); nobody waits for it.
                7 => {
                    self.submit(sender, send(tx_key, sender, amount), false)
                        .await
                }
                11 => match self.ledger.top_up(receiver, amount).await {
                    Ok(balance) => {
                        let tag = self.tag();
                        self.told
                            .lock()
                            .unwrap()
                            .topped_up
                            .push((receiver, amount, balance, tag))
                    }
                    Err(error) => self.told.lock().unwrap().error(&error),
                },
                19 => match self.ledger.open_account(new_account(amount)).await {
                    Ok(id) => {
                        let tag = self.tag();
                        self.told.lock().unwrap().opened.push((id, tag))
                    }
                    Err(error) => self.told.lock().unwrap().error(&error),
                },
                _ => {
                    // A third of the payments disagree on the amount (300).
                    let expected = if round % 3 == 0 { amount + 1 } else { amount };
                    tokio::join!(
                        self.submit(sender, send(tx_key, sender, amount), true),
                        self.submit(receiver, receive(tx_key, receiver, sender, expected), true),
                    );
                }
            }
        }
    }
}

/// Opens `image` on a healthy disk and checks every promise in `told` tagged
/// `upto` or lower, and the audit. Returns the store for further checks.
pub fn check_promises(
    what: &str,
    store: &Store,
    told: &Told,
    accounts: &[AccountId],
    upto: usize,
) -> tapledger_actors::AuditReport {
    let audit = store.audit().expect("audit");
    assert!(
        audit.is_ok(),
        "{what}: audit problems: {:#?}",
        audit.problems
    );
    for (tx_key, (outcome, tag)) in &told.finals {
        if *tag > upto {
            continue;
        }
        let stored = store.outcome(*tx_key).expect("read outcome");
        assert_eq!(
            stored.as_ref(),
            Some(&**outcome),
            "{what}: {tx_key} was told {outcome:?}"
        );
    }
    for (tx_key, party, tag) in &told.pending {
        if *tag > upto {
            continue;
        }
        let pending = store.pending(*tx_key).expect("read pending");
        let outcome = store.outcome(*tx_key).expect("read outcome");
        match (&pending, &outcome) {
            (Some(half), None) => assert_eq!(half.party(), *party, "{what}: {tx_key}"),
            (None, Some(outcome)) => {
                assert!(outcome.parties().contains(party), "{what}: {tx_key}")
            }
            other => panic!("{what}: {tx_key} was acknowledged as pending; the file has {other:?}"),
        }
    }
    let opened = told.opened.iter().filter(|(_, tag)| *tag <= upto);
    for account in accounts.iter().chain(opened.map(|(account, _)| account)) {
        assert!(
            store.account(*account).expect("read account").is_some(),
            "{what}: account {account} was opened"
        );
    }
    for &(account, amount, balance, tag) in &told.topped_up {
        if tag > upto {
            continue;
        }
        let history = store.history(account).expect("history");
        assert!(
            history.iter().any(|(_, entry)| matches!(
                entry,
                JournalEntry::Funding(funding)
                    if funding.amount == amount && funding.balance_before + amount == balance
            )),
            "{what}: the top-up of {amount} to account {account} (balance {balance}) is missing"
        );
    }
    audit
}

/// Runs a ledger on `store` and `log` (reopened images): it re-applies what
/// its log holds beyond the store, restores every lone half, audits clean
/// and settles a new payment.
pub async fn ledger_works_again(what: &str, store: Store, log: LogStore, accounts: &[AccountId]) {
    let snapshots = tempfile::tempdir().expect("temp dir");
    let ledger = within(Ledger::start(
        LedgerConfig::new(snapshots.path().join("reopened.redb")),
        Arc::new(store),
        log,
    ))
    .await
    .unwrap_or_else(|error| panic!("{what}: ledger on the reopened files: {error}"));
    // The leader applied its whole log before it served.
    let pending_now = ledger.store().all_pending().expect("pending").len();
    let lone = within(ledger.matcher_stats()).await.unwrap().lone_halves;
    assert_eq!(lone, pending_now, "{what}: lone halves restored");
    let payer = *accounts
        .iter()
        .max_by_key(|account| ledger.balance(**account).unwrap().unwrap())
        .unwrap();
    let payee = accounts.iter().copied().find(|a| *a != payer).unwrap();
    let tx_key = TxKey::new_random();
    let first = within(ledger.submit(payer, send(tx_key, payer, 1)))
        .await
        .unwrap();
    let second = within(ledger.submit(payee, receive(tx_key, payee, payer, 1)))
        .await
        .unwrap();
    let outcome = within(second.resolution()).await.unwrap();
    assert!(
        matches!(&outcome, Resolution::Final(outcome) if outcome.is_settled()),
        "{what}: a payment after reopening gave {outcome:?}"
    );
    assert_eq!(within(first.resolution()).await.unwrap(), outcome);
    let audit = ledger.audit().unwrap();
    assert!(
        audit.is_ok(),
        "{what}: audit problems: {:#?}",
        audit.problems
    );
    within(ledger.close()).await;
}

/// What a case did, for its report line.
struct CaseReport {
    finals: usize,
    pending: usize,
    errors: usize,
    poisoned: usize,
}

/// Payments each worker makes at most; the fault fires long before.
const PAYMENTS_PER_WORKER_MAX: u64 = 400;

/// Which disk fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failing {
    Ledger,
    Log,
}

/// Reopens the store and log held in `images` (ledger, log) on healthy disks.
pub fn reopen_images(what: &str, ledger: &[u8], log: &[u8]) -> (Store, LogStore) {
    let store = Store::open_with_backend(SimDisk::with_image(ledger.to_vec()))
        .unwrap_or_else(|error| panic!("{what}: reopen the ledger: {error}"));
    let log = LogStore::open_with_backend(SimDisk::with_image(log.to_vec()), StorageIo::Blocking)
        .unwrap_or_else(|error| panic!("{what}: reopen the Raft log: {error}"));
    (store, log)
}

/// Runs the workload with the `failing` disk armed with `fault` after
/// `allowed` operations, then checks everything on both images.
async fn run_case(failing: Failing, fault: Fault, allowed: u64) -> CaseReport {
    let snapshots = tempfile::tempdir().expect("temp dir");
    let (ledger_disk, log_disk) = (SimDisk::default(), SimDisk::default());
    let (workload, stop) =
        Workload::start(ledger_disk.clone(), log_disk.clone(), snapshots.path()).await;
    let disk = match failing {
        Failing::Ledger => ledger_disk.clone(),
        Failing::Log => log_disk.clone(),
    };
    let (writes_before, syncs_before) = disk.counts();
    disk.arm(fault, allowed);
    let workers: Vec<_> = (0..WORKERS)
        .map(|index| tokio::spawn(workload.clone().worker(index, PAYMENTS_PER_WORKER_MAX)))
        .collect();
    // Run until the fault fired and callers have heard of it.
    within_for(Duration::from_secs(30), async {
        while !disk.fired() || workload.told.lock().unwrap().errors.is_empty() {
            if workers.iter().all(|worker| worker.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let (writes, syncs) = disk.counts();
    assert!(
        disk.fired(),
        "{failing:?} {fault:?} after {allowed}: the workload ended before the fault fired \
         ({} more writes, {} more syncs)",
        writes - writes_before,
        syncs - syncs_before
    );
    // Let the workers see the failure for a moment, then stop them.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = stop.send(true);
    for worker in workers {
        within(worker).await.expect("worker panicked");
    }

    // Every later write is refused, not attempted.
    let Workload {
        ledger,
        accounts,
        told,
        ..
    } = workload;
    let flushed = within(ledger.flush()).await;
    assert!(
        matches!(&flushed, Err(error) if is_poisoned(error)),
        "{fault:?} after {allowed}: flush after the failure gave {flushed:?}"
    );
    let opened = within(ledger.open_account(new_account(5))).await;
    assert!(
        matches!(&opened, Err(error) if is_poisoned(error)),
        "{fault:?} after {allowed}: open_account after the failure gave {opened:?}"
    );
    let refused_key = TxKey::new_random();
    let submitted = within(ledger.submit(accounts[0], send(refused_key, accounts[0], 1))).await;
    assert!(
        matches!(&submitted, Err(error) if is_poisoned(error)),
        "{fault:?} after {allowed}: a half after the failure gave {submitted:?}"
    );
    // Nobody is told it takes writes (`/readyz` and `tapledger_ready` read
    // these): it once stayed "ready" while refusing every request.
    assert!(
        !ledger.is_serving() && ledger.status().failure.is_some(),
        "{fault:?} after {allowed}: a ledger refusing writes says it serves: {:?}",
        ledger.status()
    );
    // Reads still work: the committed state is there to be asked about.
    let balance = ledger.balance(accounts[0]);
    assert!(
        matches!(balance, Ok(Some(_))),
        "{fault:?} after {allowed}: a read after the failure gave {balance:?}"
    );
    let ledger = Arc::into_inner(ledger).expect("workers are done");
    within(ledger.close()).await;

    let told = Arc::into_inner(told).unwrap().into_inner().unwrap();
    assert!(
        !told.errors.is_empty(),
        "{fault:?} after {allowed}: nobody was told of the failure"
    );
    // Both what the page cache held and what a power cut leaves must keep
    // every promise; each is reopened from a real file on a healthy disk.
    for (image_name, ledger_image, log_image) in [
        (
            "after a crash",
            ledger_disk.current_image(),
            log_disk.current_image(),
        ),
        (
            "after a power cut",
            ledger_disk.durable_image(),
            log_disk.durable_image(),
        ),
    ] {
        let what = format!("{failing:?} {fault:?} after {allowed}, {image_name}");
        // The ledger file alone keeps every promise: nobody is told before
        // the entry is applied to it.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ledger.redb");
        std::fs::write(&path, &ledger_image).expect("write image");
        let store = Store::open(&path).unwrap_or_else(|error| panic!("{what}: reopen: {error}"));
        check_promises(&what, &store, &told, &accounts, usize::MAX);
        drop(store);
        let (store, log) = reopen_images(&what, &ledger_image, &log_image);
        assert!(
            store.outcome(refused_key).unwrap().is_none()
                && store.pending(refused_key).unwrap().is_none(),
            "{what}: a half refused after the failure was stored"
        );
        ledger_works_again(&what, store, log, &accounts).await;
    }
    CaseReport {
        finals: told.finals.len(),
        pending: told.pending.len(),
        errors: told.errors.len(),
        poisoned: told.poisoned,
    }
}

/// Runs every `(disk, fault, allowed)` case and prints one line per case.
async fn run_cases(cases: &[(Failing, Fault, u64)]) {
    for &(failing, fault, allowed) in cases {
        let report = run_case(failing, fault, allowed).await;
        println!(
            "storage fault on the {failing:?} disk, {fault:?} after {allowed}: {} outcomes told \
             and kept, {} halves acknowledged, {} errors told ({} replication stopped)",
            report.finals, report.pending, report.errors, report.poisoned
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_fsync_never_reports_a_false_outcome_and_poisons_the_ledger() {
    // Goal: whichever fsync fails (the first after the accounts exist, or one
    // deep into a busy run of group commits), callers hear an error, never a
    // false outcome; the ledger refuses further writes; and both the crashed
    // and the power-cut image reopen with every promise kept.
    run_cases(&[
        (Failing::Ledger, Fault::Sync, 0),
        (Failing::Ledger, Fault::Sync, 1),
        (Failing::Ledger, Fault::Sync, 4),
        (Failing::Ledger, Fault::Sync, 25),
        (Failing::Ledger, Fault::Sync, 80),
        (Failing::Log, Fault::Sync, 0),
        (Failing::Log, Fault::Sync, 30),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_writes_never_report_a_false_outcome_and_poison_the_ledger() {
    // Goal: as above for a write that fails outright, at several points of a
    // commit and of the run.
    run_cases(&[
        (Failing::Ledger, Fault::Write, 0),
        (Failing::Ledger, Fault::Write, 3),
        (Failing::Ledger, Fault::Write, 40),
        (Failing::Ledger, Fault::Write, 400),
        (Failing::Log, Fault::Write, 5),
        (Failing::Log, Fault::Write, 200),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_writes_never_report_a_false_outcome_and_poison_the_ledger() {
    // Goal: as above for a write that stores half its bytes before failing:
    // redb's checksums must make the torn commit invisible after reopening.
    run_cases(&[
        (Failing::Ledger, Fault::TornWrite, 1),
        (Failing::Ledger, Fault::TornWrite, 17),
        (Failing::Ledger, Fault::TornWrite, 150),
        (Failing::Log, Fault::TornWrite, 60),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_commit_path_never_reports_a_false_outcome_and_stops_the_replica() {
    // Goal (issue 13): a panic while a commit is written (a bug, or redb
    // tripping over a damaged page) stops the replica as a failed disk
    // does: nobody is told an outcome that is not stored, it no longer
    // says it serves (`/readyz` 503; the node exits so a supervisor
    // restarts it), and a restart keeps every promise. It once left a
    // process that answered every request "shutting down" and stayed ready.
    run_cases(&[
        (Failing::Ledger, Fault::Panic, 2),
        (Failing::Ledger, Fault::Panic, 60),
        (Failing::Log, Fault::Panic, 10),
    ])
    .await;
}

/// Goal: the simulated disk itself behaves: unsynced writes vanish in the
/// power-cut image and a fault, once fired, fails every later write.
#[test]
fn sim_disk_loses_unsynced_writes_and_stays_dead() {
    use redb::StorageBackend;
    let disk = SimDisk::default();
    disk.set_len(8).unwrap();
    disk.write(0, &[1, 2, 3, 4]).unwrap();
    disk.sync_data().unwrap();
    disk.write(4, &[5, 6, 7, 8]).unwrap();
    assert_eq!(disk.current_image(), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(disk.durable_image(), [1, 2, 3, 4, 0, 0, 0, 0]);
    disk.arm(Fault::TornWrite, 1);
    disk.write(0, &[9, 9]).unwrap();
    assert!(disk.write(0, &[7, 7, 7, 7]).is_err());
    assert_eq!(
        disk.current_image()[..4],
        [7, 7, 3, 4],
        "half of the torn write landed"
    );
    assert!(disk.fired());
    assert!(disk.write(6, &[0]).is_err());
    assert!(disk.sync_data().is_err());
    assert!(disk.set_len(16).is_err());
    assert_eq!(disk.durable_image(), [1, 2, 3, 4, 0, 0, 0, 0]);
    let mut out = [0u8; 2];
    disk.read(1, &mut out).unwrap();
    assert_eq!(out, [7, 3], "reads still work");
}
