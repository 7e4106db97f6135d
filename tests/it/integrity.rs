//! Damaged ledger files, the way bit rot, a bad disk or a careless copy
//! damage them: every flipped bit and every zeroed page is either found (the
//! read-only audit fails, or the file is refused at open, as `run` opens it)
//! or provably harmless (everything the ledger holds reads back the same:
//! `Store::digest` is unchanged). Nothing panics.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use rand::{Rng, SeedableRng};
use tapledger_actors::Store;
use tapledger_protocol::TxKey;

use crate::support::*;

/// The device OS of this module's settled payments: a string that appears
/// only inside journal records, so flips in it must be found.
const MARKED_OS: &str = "ios 17.6 integrity";

/// A closed ledger with accounts, settlements, a rejection and a lone
/// pending half: its file's bytes and digest.
async fn ledger_image() -> (Vec<u8>, [u8; 32]) {
    let (dir, ledger) = temp_ledger(|_| {}).await;
    let accounts = open_accounts(&ledger, &[500, 300, 10]).await;
    for round in 0..6u128 {
        let key = TxKey::from_u128(1_000 + round);
        let mut half = send(key, accounts[0], 7);
        if let tapledger_protocol::Half::Send(send) = &mut half {
            send.device_os = MARKED_OS.into();
        }
        let ticket = submit_pending(&ledger, accounts[0], half).await;
        let done = submit_done(
            &ledger,
            accounts[1],
            receive(key, accounts[1], accounts[0], 7),
        )
        .await;
        final_outcome(&done);
        within(ticket.resolution()).await.expect("ticket");
    }
    // Account 3 cannot pay 50: a rejection.
    pay(
        &ledger,
        TxKey::from_u128(2_000),
        accounts[2],
        accounts[0],
        50,
    )
    .await;
    let _lone = submit_pending(
        &ledger,
        accounts[1],
        send(TxKey::from_u128(3_000), accounts[1], 1),
    )
    .await;
    assert_books(&ledger);
    let path = ledger.config().path.clone();
    within(ledger.close()).await;
    let image = std::fs::read(&path).expect("read ledger file");
    let digest = Store::open_read_only(&path)
        .expect("open read-only")
        .digest()
        .expect("digest");
    drop(dir);
    (image, digest)
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The audit failed or the file was refused: the damage was found.
    Found(String),
    /// Nothing the ledger holds changed.
    Harmless,
}

/// What the read-only audit (`tapledger-node audit`) makes of `image`.
fn audit_verdict(path: &Path, image: &[u8], digest: [u8; 32]) -> Verdict {
    std::fs::write(path, image).expect("write image");
    let store = match Store::open_read_only(path) {
        Ok(store) => store,
        Err(error) => return Verdict::Found(format!("refused: {error}")),
    };
    match store.audit() {
        Ok(report) if !report.is_ok() => Verdict::Found(
            report
                .problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Ok(_) => match store.digest() {
            Ok(found) if found == digest => Verdict::Harmless,
            Ok(_) => panic!("the audit passed on a ledger whose content changed"),
            Err(error) => panic!("the audit passed on a ledger it cannot read: {error}"),
        },
        Err(error) => Verdict::Found(format!("audit error: {error}")),
    }
}

/// What opening `image` the way a node opens it before serving makes of it.
fn open_verdict(path: &Path, image: &[u8], digest: [u8; 32]) -> Verdict {
    std::fs::write(path, image).expect("write image");
    let store = match Store::open(path) {
        Ok(store) => store,
        Err(error) => return Verdict::Found(format!("refused: {error}")),
    };
    match store.digest() {
        Ok(found) if found == digest => Verdict::Harmless,
        Ok(_) => panic!("a node would serve from a ledger whose content changed"),
        Err(error) => panic!("a node would serve from a ledger it cannot read: {error}"),
    }
}

fn judge(what: &str, verdict: impl FnOnce() -> Verdict) -> Verdict {
    catch_unwind(AssertUnwindSafe(verdict)).unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
            .unwrap_or_default();
        panic!("{what}: {text}")
    })
}

/// Goal: a changed bit anywhere in the file is found by the read-only audit
/// or changes nothing the ledger holds; a changed bit inside a payment's
/// record is always found (30 random flips of a stopped node's file once
/// changed recorded details, `device_os` "ios 17.6" -> "ios 1w.6", and the
/// audit passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bit_flip_is_found_by_the_audit_or_harmless() {
    let (image, digest) = ledger_image().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("flipped.redb");
    assert_eq!(audit_verdict(&path, &image, digest), Verdict::Harmless);

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1e_d6e5);
    let (mut found, mut harmless) = (0, 0);
    for _ in 0..400 {
        let offset = rng.random_range(0..image.len());
        let bit = rng.random_range(0..8);
        let mut flipped = image.clone();
        flipped[offset] ^= 1 << bit;
        let what = format!("bit {bit} of byte {offset}");
        match judge(&what, || audit_verdict(&path, &flipped, digest)) {
            Verdict::Found(_) => found += 1,
            Verdict::Harmless => harmless += 1,
        }
    }

    // Inside the payments' records every flip must be found.
    let marked: Vec<usize> = image
        .windows(MARKED_OS.len())
        .enumerate()
        .filter(|(_, window)| *window == MARKED_OS.as_bytes())
        .map(|(offset, _)| offset)
        .collect();
    assert!(
        marked.len() >= 6,
        "the journal holds {} marked records",
        marked.len()
    );
    let mut in_records = 0;
    for &start in &marked {
        for offset in start..start + MARKED_OS.len() {
            let mut flipped = image.clone();
            flipped[offset] ^= 0x08;
            let what = format!("byte {offset} inside a payment's record");
            match judge(&what, || audit_verdict(&path, &flipped, digest)) {
                Verdict::Found(problems) => {
                    assert!(
                        problems.contains("damaged") || problems.contains("refused"),
                        "{what}: {problems}"
                    );
                    in_records += 1;
                }
                Verdict::Harmless => {
                    // A copy redb no longer reaches (a freed page) may hold it.
                    let store = Store::open_read_only(&path).expect("reopen");
                    assert_eq!(store.digest().expect("digest"), digest, "{what}");
                }
            }
        }
    }
    assert!(
        in_records >= MARKED_OS.len() * 6,
        "{in_records} flips in records found"
    );
    println!(
        "bit flips: {found} found and {harmless} harmless of 400 random; \
         {in_records} of {} inside payment records found",
        marked.len() * MARKED_OS.len()
    );
}

/// Goal: a zeroed 4 KiB page (a lost write, a bad sector) makes a node
/// refuse to open the ledger, and the read-only audit fail, unless the page
/// held nothing the ledger uses. It once made `audit` panic inside redb,
/// and `run` started and served until the first write touched the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_zeroed_page_is_refused_at_open_or_harmless() {
    let (image, digest) = ledger_image().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("zeroed.redb");
    const PAGE: usize = 4096;
    let (mut refused, mut harmless) = (0, 0);
    for page in 0..image.len().div_ceil(PAGE) {
        let mut zeroed = image.clone();
        let range = page * PAGE..((page + 1) * PAGE).min(image.len());
        if zeroed[range.clone()].iter().all(|byte| *byte == 0) {
            continue;
        }
        zeroed[range].fill(0);
        let what = format!("page {page} zeroed");
        let audit = judge(&what, || audit_verdict(&path, &zeroed, digest));
        let open = judge(&what, || open_verdict(&path, &zeroed, digest));
        match open {
            Verdict::Found(_) => refused += 1,
            Verdict::Harmless => harmless += 1,
        }
        // What a node refuses the audit reports too.
        if let Verdict::Found(reason) = &open {
            assert!(
                matches!(audit, Verdict::Found(_)),
                "{what}: refused at open ({reason}) but the audit passed"
            );
        }
    }
    assert!(refused > 0, "no page was in use");
    println!("zeroed pages: {refused} refused at open, {harmless} harmless");
}
