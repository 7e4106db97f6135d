//! Crash points inside group commits, in process: the ledger runs a busy
//! workload on a simulated disk that saves its images right after chosen
//! writes, as a `kill -9` (page cache kept) or a power cut (only synced data
//! kept) at that instant would leave them. Every image must reopen, pass the
//! audit, and keep every promise made to a caller before that instant.
//!
//! The real binary is killed with SIGKILL in `node/tests/crash.rs`; this test
//! reaches crash points no timer can aim at (between two page writes of one
//! commit) and runs in a second.

use std::sync::Arc;
use std::time::Duration;

use tapledger_actors::{JournalEntry, Store};

use crate::storage_faults::{
    SimDisk, WORKERS, Workload, check_promises, ledger_works_again, reopen_images,
};
use crate::support::{within, within_for};

/// Crash points per run unless `TAPLEDGER_CRASH_POINTS` says otherwise.
const CRASH_POINTS_DEFAULT: u64 = 24;
/// Payments per worker: enough writes for the crash points to spread over.
const PAYMENTS_PER_WORKER: u64 = 60;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_any_two_writes_keeps_every_promise() {
    // Goal: no write boundary of a group commit loses anything a caller was
    // told, or leaves books that do not add up. Method: 16 workers make
    // payments (some mismatched, some lone halves, top-ups, new accounts);
    // the disk saves both images after pseudo-randomly chosen writes
    // (seeded: `TAPLEDGER_SEED` repeats a run, `TAPLEDGER_CRASH_POINTS`
    // takes more). Each image reopens on a healthy disk, passes the audit,
    // holds every outcome, pending half, account and top-up confirmed before
    // that write, and agrees with the final file on every outcome it holds.
    let seed = env_u64("TAPLEDGER_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let points = env_u64("TAPLEDGER_CRASH_POINTS").unwrap_or(CRASH_POINTS_DEFAULT);
    println!("crash points: seed {seed} (TAPLEDGER_SEED={seed} repeats this run), {points} points");

    let snapshots = tempfile::tempdir().expect("temp dir");
    let disk = SimDisk::default();
    let (workload, _stop) =
        Workload::start(disk.clone(), SimDisk::default(), snapshots.path()).await;
    let (writes_at_start, _) = disk.counts();
    // This workload writes 1,000 to 1,500 pages after its setup; spread the
    // crash points over the first 900 writes after the setup, so that all
    // of them are reached however the commits group.
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    disk.snapshot_after_writes((0..points).map(|_| writes_at_start + 1 + next() % 900));

    let workers: Vec<_> = (0..WORKERS)
        .map(|index| tokio::spawn(workload.clone().worker(index, PAYMENTS_PER_WORKER)))
        .collect();
    for worker in workers {
        within_for(Duration::from_secs(60), worker)
            .await
            .expect("worker panicked");
    }
    let Workload {
        ledger,
        accounts,
        told,
        ..
    } = workload;
    let ledger = Arc::into_inner(ledger).expect("workers are done");
    within(ledger.close()).await;
    let told = Arc::into_inner(told).unwrap().into_inner().unwrap();
    assert!(
        told.errors.is_empty(),
        "a healthy disk failed: {:?}",
        told.errors
    );
    let (writes_total, syncs_total) = disk.counts();
    let snapshots = disk.take_snapshots();
    assert!(
        !snapshots.is_empty() || points == 0,
        "no crash point reached in {} writes",
        writes_total - writes_at_start
    );
    let final_store =
        Store::open_with_backend(SimDisk::with_image(disk.current_image())).expect("final file");
    let final_audit = check_promises("final file", &final_store, &told, &accounts, usize::MAX);

    let mut outcomes_checked = 0;
    for (index, snapshot) in snapshots.iter().enumerate() {
        let (log_current, log_durable) = snapshot.companion.clone().expect("log images");
        for (image_name, image, log_image) in [
            ("kill -9", &snapshot.current, &log_current),
            ("power cut", &snapshot.durable, &log_durable),
        ] {
            let what = format!("{image_name} after write {}", snapshot.writes);
            let (store, log) = reopen_images(&what, image, log_image);
            check_promises(&what, &store, &told, &accounts, index);
            // What the image holds is a prefix of what happened: every
            // outcome in it is the one the final file has.
            for (seq, entry) in store.journal(0, usize::MAX).expect("journal") {
                if let JournalEntry::Outcome(outcome) = entry {
                    let final_outcome = final_store.outcome(outcome.tx_key()).unwrap();
                    assert_eq!(
                        final_outcome.as_ref(),
                        Some(&outcome),
                        "{what}: journal {seq} differs from the final file"
                    );
                    outcomes_checked += 1;
                }
            }
            if index % 6 == 0 {
                ledger_works_again(&what, store, log, &accounts).await;
            }
        }
    }
    println!(
        "crash points: {} payments told an outcome, {} halves acknowledged, {} commits \
         ({writes_total} writes, {syncs_total} syncs); {} crash points x 2 images reopened, \
         audited and checked ({outcomes_checked} stored outcomes compared); final books: \
         {} settlements, {} rejections",
        told.finals.len(),
        told.pending.len(),
        syncs_total,
        snapshots.len(),
        final_audit.settlements,
        final_audit.rejections
    );
}
