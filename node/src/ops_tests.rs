//! Offline operations on real ledger files in temporary directories: what
//! they print, and that they never touch a file that is not a ledger.

use super::*;
use crate::export::tests::sample_ledger;
use tapledger_actors::Finding;
use tapledger_actors::finding::Party;

#[test]
fn open_refuses_missing_foreign_and_locked_files_without_touching_them() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.redb");
    assert!(matches!(
        open_existing(&missing),
        Err(OpenError::Missing(_))
    ));
    assert!(!missing.exists(), "opening never creates a ledger");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"precious notes, not a database").unwrap();
    assert!(matches!(open_existing(&text), Err(OpenError::NotRedb(_))));
    assert!(matches!(
        reset(&text),
        Err(RestoreError::Current(OpenError::NotRedb(_)))
    ));
    assert!(std::fs::read(&text).unwrap() == b"precious notes, not a database");

    let foreign = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&foreign).unwrap();
        let write = db.begin_write().unwrap();
        {
            let definition: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("photos");
            write.open_table(definition).unwrap().insert(1, 2).unwrap();
        }
        write.commit().unwrap();
    }
    let before = std::fs::read(&foreign).unwrap();
    assert!(matches!(
        open_existing(&foreign),
        Err(OpenError::NotALedger(_))
    ));
    assert!(matches!(
        reset(&foreign),
        Err(RestoreError::Current(OpenError::NotALedger(_)))
    ));
    assert!(
        std::fs::read(&foreign).unwrap() == before,
        "a foreign redb file is left as it was"
    );

    let ledger = dir.path().join("ledger.redb");
    let held = Store::open(&ledger).unwrap();
    assert!(matches!(open_existing(&ledger), Err(OpenError::Locked(_))));
    assert!(matches!(
        reset(&ledger),
        Err(RestoreError::Current(OpenError::Locked(_)))
    ));
    drop(held);
}

#[tokio::test]
async fn audit_accounts_and_history_read_well() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let sample = sample_ledger(&path).await;
    let store = open_existing(&path).unwrap();

    let report = store.audit().unwrap();
    let text = audit_text(&report);
    assert!(text.starts_with("accounts          2\n"), "{text}");
    assert!(text.contains("settlements     1"), "{text}");
    assert!(text.contains("rejections      3"), "{text}");
    assert!(text.contains("OK: "), "{text}");

    let accounts = accounts_text(&store).unwrap();
    assert_eq!(accounts.lines().count(), 3, "{accounts}");
    assert!(accounts.contains("North Bank"), "{accounts}");
    assert!(
        accounts.lines().nth(1).unwrap().contains(" 700 "),
        "{accounts}"
    );

    let shown = account_text(&store, sample.bob).unwrap().unwrap();
    assert!(shown.contains("balance   300"), "{shown}");
    assert!(!shown.contains("0909"), "no key hash bytes: {shown}");
    assert!(account_text(&store, 99).unwrap().is_none());

    let history = history_text(&store, sample.alice).unwrap().unwrap();
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 3, "header, opening, payment: {history}");
    assert!(
        lines[1].contains("opening") && lines[1].contains("+1000"),
        "{history}"
    );
    assert!(
        lines[2].contains("paid") && lines[2].contains("-300"),
        "{history}"
    );
    assert!(lines[2].contains(&sample.settled.to_string()), "{history}");
    assert!(history_text(&store, 99).unwrap().is_none());
}

#[test]
fn failed_audits_name_the_accounts() {
    let report = AuditReport {
        problems: vec![
            Finding::Balance {
                account: 7,
                stored: 10,
                history: 5,
            },
            Finding::SettlementBalance {
                seq: 3,
                party: Party::Sender,
                account: 12,
                recorded: 1,
                history: 2,
            },
            Finding::NotZeroSum {
                total: 9,
                issued: 8,
            },
        ],
        ..AuditReport::default()
    };
    let text = audit_text(&report);
    assert!(text.contains("FAILED: 3 problem(s)"), "{text}");
    assert!(text.contains("accounts involved: 7, 12"), "{text}");
    assert!(
        text.contains("  - journal 3: sender 12 balance before recorded 1 but history gives 2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_backup_restores_into_place_and_passes_its_audit() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.redb");
    let sample = sample_ledger(&ledger).await;
    let backup = dir.path().join("backup.redb");
    open_existing(&ledger).unwrap().backup(&backup).unwrap();

    // The live ledger moves on (reset here), then the backup is restored.
    reset(&ledger).unwrap();
    assert_eq!(open_existing(&ledger).unwrap().accounts().unwrap().len(), 0);
    let restored = restore(&backup, &ledger).unwrap();
    assert!(restored.report.is_ok(), "{:?}", restored.report.problems);
    assert_eq!(restored.report.settlements, 1);
    let previous = restored.previous.expect("the reset ledger was moved aside");
    assert!(previous.exists());
    assert_eq!(
        open_existing(&previous).unwrap().accounts().unwrap().len(),
        0
    );
    let store = open_existing(&ledger).unwrap();
    assert_eq!(store.balance(sample.bob).unwrap(), Some(300));
    assert!(store.outcome(sample.settled).unwrap().unwrap().is_settled());
}

#[tokio::test]
async fn reset_empties_a_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.redb");
    sample_ledger(&ledger).await;
    let described = describe_for_reset(&open_existing(&ledger).unwrap()).unwrap();
    assert_eq!(
        described,
        "2 account(s), 6 journal entries, 0 pending half(s), 1000 issued"
    );
    reset(&ledger).unwrap();
    let store = open_existing(&ledger).unwrap();
    assert_eq!(store.counters().unwrap().journal_entries, 0);
    assert!(store.audit().unwrap().is_ok());
}
