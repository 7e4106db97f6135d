//! Store tests on real redb files: schema checks, group-commit semantics,
//! the audit catching tampered books, and backups.

use tapledger_protocol::{ReceiveHalf, RejectCode, SendHalf, Stamped};

use super::*;
use crate::finding::Finding;

fn new_account(opening_balance: u64) -> NewAccount {
    NewAccount {
        account_type: "checking".into(),
        bank_name: "Bank".into(),
        salt: vec![1; 16],
        key_hash: vec![2; 64],
        opening_balance,
    }
}

fn settle(key: u128, sender: AccountId, receiver: AccountId, amount: u64) -> Intent {
    let tx_key = TxKey::from_u128(key);
    Intent::Decide(Decision::Settle {
        send: Stamped {
            half: SendHalf {
                tx_key,
                sender_id: sender,
                amount,
                device_os: "ios".into(),
                client_time: 0,
            },
            received_at: Timestamp(1),
        },
        receive: Stamped {
            half: ReceiveHalf {
                tx_key,
                receiver_id: receiver,
                expected_sender_id: sender,
                expected_amount: amount,
                device_os: "android".into(),
                client_time: 0,
            },
            received_at: Timestamp(2),
        },
    })
}

/// Opens two accounts with these opening balances in one commit (ids 1, 2).
fn open_two(store: &Store, first: u64, second: u64) {
    store
        .commit_batch(
            Timestamp(1),
            &[
                Intent::OpenAccount(new_account(first)),
                Intent::OpenAccount(new_account(second)),
            ],
        )
        .unwrap();
}

fn store_in(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("ledger.redb")).unwrap()
}

#[test]
fn new_file_gets_schema_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    assert_eq!(
        store.counters().unwrap(),
        Counters {
            commit_seq: 0,
            journal_entries: 0,
            account_next: 1,
            issued: 0
        }
    );
    drop(store);
    let store = store_in(&dir);
    assert!(store.audit().unwrap().is_ok());
}

#[test]
fn other_schema_version_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    drop(Store::open(&path).unwrap());
    {
        let db = Database::create(&path).unwrap();
        let write = db.begin_write().unwrap();
        meta_put(
            &mut write.open_table(META).unwrap(),
            META_SCHEMA_VERSION,
            SCHEMA_VERSION + 1,
        )
        .unwrap();
        write.commit().unwrap();
    }
    let error = Store::open(&path).unwrap_err();
    assert!(
        matches!(error, StoreError::SchemaVersion { found, expected } if found == SCHEMA_VERSION + 1 && expected == SCHEMA_VERSION),
        "{error}"
    );
}

#[test]
fn a_redb_file_of_another_program_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = Database::create(&path).unwrap();
        let write = db.begin_write().unwrap();
        write
            .open_table(TableDefinition::<&str, &str>::new("settings"))
            .unwrap()
            .insert("a", "b")
            .unwrap();
        write.commit().unwrap();
    }
    assert!(matches!(Store::open(&path), Err(StoreError::NotALedger)));
}

#[test]
fn a_batch_applies_in_order_and_balances_sum_to_issued() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    let (commit, applied) = store
        .commit_batch(
            Timestamp(10),
            &[
                Intent::OpenAccount(new_account(100)),
                Intent::OpenAccount(new_account(0)),
            ],
        )
        .unwrap();
    assert_eq!(commit, 1);
    assert_eq!(
        applied,
        vec![Applied::AccountOpened(1), Applied::AccountOpened(2)]
    );
    let (_, applied) = store
        .commit_batch(
            Timestamp(20),
            &[
                settle(7, 1, 2, 100),
                settle(7, 1, 2, 100),
                Intent::TopUp {
                    account: 2,
                    amount: 5,
                },
            ],
        )
        .unwrap();
    let Applied::Matched(Committed::Decided(outcome)) = &applied[0] else {
        panic!("{applied:?}")
    };
    let Outcome::Settled(settlement) = &**outcome else {
        panic!()
    };
    assert_eq!(
        (
            settlement.sender_balance_before,
            settlement.receiver_balance_before,
            settlement.settled_at
        ),
        (100, 0, Timestamp(20))
    );
    assert!(
        matches!(&applied[1], Applied::Matched(Committed::AlreadyFinal(again)) if again == outcome),
        "a key decides once, even within one batch"
    );
    assert_eq!(applied[2], Applied::ToppedUp { balance: 105 });
    assert_eq!(
        (store.balance(1).unwrap(), store.balance(2).unwrap()),
        (Some(0), Some(105))
    );
    let report = store.audit().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(
        (
            report.settlements,
            report.fundings,
            report.issued,
            report.user_balances_total
        ),
        (1, 3, 105, 105)
    );
    assert_eq!(store.history(2).unwrap().len(), 3);
}

#[test]
fn pending_half_is_skipped_when_decided_in_the_same_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    open_two(&store, 10, 0);
    let Intent::Decide(Decision::Settle { send, .. }) = settle(9, 1, 2, 10) else {
        unreachable!()
    };
    let (_, applied) = store
        .commit_batch(
            Timestamp(2),
            &[
                Intent::StorePending(PendingHalf::Send(send.clone())),
                settle(9, 1, 2, 10),
            ],
        )
        .unwrap();
    assert_eq!(applied[0], Applied::Matched(Committed::PendingSkipped));
    assert!(store.all_pending().unwrap().is_empty());
    // A pending half for a decided key is answered with the outcome, not stored.
    let (_, applied) = store
        .commit_batch(
            Timestamp(3),
            &[Intent::StorePending(PendingHalf::Send(send))],
        )
        .unwrap();
    assert!(matches!(
        &applied[0],
        Applied::Matched(Committed::AlreadyFinal(_))
    ));
    assert!(store.audit().unwrap().is_ok());
}

#[test]
fn rejection_is_recorded_without_moving_money() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    store
        .commit_batch(Timestamp(1), &[Intent::OpenAccount(new_account(10))])
        .unwrap();
    let Intent::Decide(Decision::Settle { send, .. }) = settle(3, 1, 2, 10) else {
        unreachable!()
    };
    let reject = Intent::Decide(Decision::Reject {
        tx_key: TxKey::from_u128(3),
        code: RejectCode::Expired,
        send: Some(send),
        receive: None,
        sender_balance: None,
    });
    store.commit_batch(Timestamp(5), &[reject]).unwrap();
    let Some(Outcome::Rejected(rejection)) = store.outcome(TxKey::from_u128(3)).unwrap() else {
        panic!()
    };
    assert_eq!(
        (rejection.code, rejection.decided_at),
        (RejectCode::Expired, Timestamp(5))
    );
    assert_eq!(store.balance(1).unwrap(), Some(10));
    assert!(store.audit().unwrap().is_ok());
}

#[test]
fn invalid_top_ups_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    store
        .commit_batch(
            Timestamp(1),
            &[Intent::OpenAccount(new_account(u64::MAX - 1))],
        )
        .unwrap();
    let (_, applied) = store
        .commit_batch(
            Timestamp(2),
            &[
                Intent::TopUp {
                    account: 1,
                    amount: 2,
                },
                Intent::TopUp {
                    account: 99,
                    amount: 1,
                },
                Intent::TopUp {
                    account: 1,
                    amount: 0,
                },
            ],
        )
        .unwrap();
    assert_eq!(
        applied,
        vec![
            Applied::Refused(Refusal::TopUpOverflow),
            Applied::Refused(Refusal::NoSuchAccount(99)),
            Applied::Refused(Refusal::ZeroTopUp),
        ]
    );
    assert_eq!(store.balance(1).unwrap(), Some(u64::MAX - 1));
    assert!(store.audit().unwrap().is_ok());
}

#[test]
fn audit_names_an_account_whose_balance_was_tampered_with() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    open_two(&store, 50, 50);
    store.checkpoint().unwrap();
    {
        let write = store.db.begin_write().unwrap();
        let mut balances = write.open_table(BALANCES).unwrap();
        // A forgery with a valid checksum: the books themselves must catch it.
        let (_, head) = balance_get(&balances, 2).unwrap().unwrap();
        balance_put(&mut balances, 2, (51, head)).unwrap();
        drop(balances);
        write.commit().unwrap();
    }
    let report = store.audit().unwrap();
    assert!(!report.is_ok());
    assert!(
        report.problems.iter().any(|problem| matches!(
            problem,
            Finding::Balance {
                account: 2,
                stored: 51,
                ..
            }
        )),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .problems
            .iter()
            .any(|problem| matches!(problem, Finding::NotZeroSum { .. })),
        "{:?}",
        report.problems
    );
}

#[test]
fn backup_is_a_consistent_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    store
        .commit_batch(
            Timestamp(1),
            &[
                Intent::OpenAccount(new_account(50)),
                Intent::OpenAccount(new_account(0)),
                settle(1, 1, 2, 20),
            ],
        )
        .unwrap();
    let copy_path = dir.path().join("copy.redb");
    store.backup(&copy_path).unwrap();
    let copy = Store::open(&copy_path).unwrap();
    assert!(copy.audit().unwrap().is_ok());
    assert_eq!(copy.counters().unwrap(), store.counters().unwrap());
    assert_eq!(
        copy.outcome(TxKey::from_u128(1)).unwrap(),
        store.outcome(TxKey::from_u128(1)).unwrap()
    );
    drop(copy);
    assert!(
        matches!(store.backup(&copy_path), Err(StoreError::TargetExists(_))),
        "never overwrites"
    );
}

#[test]
fn history_follows_each_accounts_links_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    store
        .commit_batch(
            Timestamp(1),
            &[
                Intent::OpenAccount(new_account(100)),
                Intent::OpenAccount(new_account(0)),
                Intent::OpenAccount(new_account(0)),
            ],
        )
        .unwrap();
    // Two batches, several entries per account per batch.
    store
        .commit_batch(
            Timestamp(2),
            &[settle(1, 1, 2, 10), settle(2, 1, 3, 10), settle(3, 2, 3, 5)],
        )
        .unwrap();
    store
        .commit_batch(
            Timestamp(3),
            &[
                Intent::TopUp {
                    account: 3,
                    amount: 1,
                },
                settle(4, 3, 1, 16),
            ],
        )
        .unwrap();
    let seqs = |account| {
        store
            .history(account)
            .unwrap()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect::<Vec<_>>()
    };
    // Journal: 0..=2 openings, 3..=5 settlements, 6 top-up, 7 settlement.
    assert_eq!(seqs(1), vec![0, 3, 4, 7]);
    assert_eq!(seqs(2), vec![1, 3, 5]);
    assert_eq!(seqs(3), vec![2, 4, 5, 6, 7]);
    assert_eq!(store.balance(1).unwrap(), Some(96));
    let report = store.audit().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn audit_names_a_broken_history_head() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    store
        .commit_batch(
            Timestamp(1),
            &[
                Intent::OpenAccount(new_account(50)),
                Intent::OpenAccount(new_account(0)),
                settle(1, 1, 2, 5),
            ],
        )
        .unwrap();
    store.checkpoint().unwrap();
    {
        let write = store.db.begin_write().unwrap();
        let mut balances = write.open_table(BALANCES).unwrap();
        let (balance, _) = balance_get(&balances, 2).unwrap().unwrap();
        // Point account 2's history at its opening, skipping the settlement.
        balance_put(&mut balances, 2, (balance, 1)).unwrap();
        drop(balances);
        write.commit().unwrap();
    }
    let report = store.audit().unwrap();
    assert!(
        report.problems.iter().any(|problem| matches!(
            problem,
            Finding::HistoryHead {
                account: 2,
                head: 1,
                ..
            }
        )),
        "{:?}",
        report.problems
    );
}

#[test]
fn every_decided_key_is_found_after_merges_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    open_two(&store, 1_000_000, 0);
    // Enough commits for runs to merge two levels up.
    let commits = (key_index::FAN_IN * key_index::FAN_IN + 3) as u128;
    for commit in 0..commits {
        let intents: Vec<Intent> = (0..5)
            .map(|n| settle((commit * 977 + n) * 0x9e37_79b9_7f4a_7c15, 1, 2, 1))
            .collect();
        store.commit_batch(Timestamp(2), &intents).unwrap();
    }
    let decided = (commits * 5) as u64;
    assert_eq!(store.indexes().current.len(), decided);
    // A replay of a decided key is found already final, not settled twice.
    let replay = settle(0x9e37_79b9_7f4a_7c15 * 977, 1, 2, 1);
    let (_, applied) = store.commit_batch(Timestamp(3), &[replay]).unwrap();
    assert!(matches!(
        applied[0],
        Applied::Matched(Committed::AlreadyFinal(_))
    ));
    drop(store);

    let store = store_in(&dir);
    for commit in 0..commits {
        for n in 0..5 {
            let key = TxKey::from_u128((commit * 977 + n) * 0x9e37_79b9_7f4a_7c15);
            assert!(store.outcome(key).unwrap().is_some(), "{key}");
        }
    }
    assert_eq!(store.outcome(TxKey::from_u128(7)).unwrap(), None);
    let report = store.audit().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.settlements, decided);
}

#[test]
fn a_damaged_index_chunk_refuses_a_writable_open_and_is_named_by_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    {
        let store = store_in(&dir);
        open_two(&store, 100, 0);
        store
            .commit_batch(Timestamp(2), &[settle(42, 1, 2, 10)])
            .unwrap();
    }
    {
        let db = Database::builder().create(&path).unwrap();
        let write = db.begin_write().unwrap();
        {
            let mut chunks = write.open_table(TX_KEY_CHUNKS).unwrap();
            let (key, mut bytes) = {
                let (key, value) = chunks.first().unwrap().unwrap();
                (key.value(), value.value().to_vec())
            };
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            chunks.insert(key, bytes.as_slice()).unwrap();
        }
        write.commit().unwrap();
    }
    let error = Store::open(&path).expect_err("damage refuses the open");
    assert!(is_damage(&error), "{error}");
    let store = Store::open_read_only(&path).expect("inspecting a damaged ledger");
    assert!(store.outcome(TxKey::from_u128(42)).is_err());
    let report = store.audit().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|problem| matches!(problem, Finding::Index(text)
                if text.contains("tx_key_chunks") && text.contains("checksum"))),
        "{:?}",
        report.problems
    );
}

/// The balances `BALANCES` holds and the journal entry they are exact as of.
fn checkpoint_of(store: &Store) -> (u64, u64) {
    let read = store.db.begin_read().unwrap();
    let meta = read.open_table(META).unwrap();
    let rows = read.open_table(BALANCES).unwrap().len().unwrap();
    (meta_get(&meta, META_BALANCES_AT).unwrap(), rows)
}

/// Balances are written behind (a checkpoint every few entries in unit
/// tests), so most commits leave the table behind the journal. Whatever the
/// moment a store is dropped without a checkpoint (every commit is durable,
/// so that is a crash), the reopened store, writable or read-only, has every
/// balance and history head the model has, and its audit is clean. Over all
/// cases, some commits must have left a tail and some must have
/// checkpointed (one case alone may do only one: its sizes are random).
#[test]
fn balances_written_behind_survive_a_reopen_after_any_commit() {
    use proptest::strategy::Strategy as _;
    let seen = std::cell::Cell::new((0u32, 0u32));
    let strategy = proptest::collection::vec(
        (
            proptest::collection::vec((0u64..6, 0u64..6, 1u64..40), 1..8),
            proptest::bool::ANY,
        ),
        4..24,
    );
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 12,
        source_file: Some(file!()),
        ..proptest::test_runner::Config::default()
    });
    let result = runner.run(&strategy.boxed(), |commits| {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_in(&dir);
        let accounts = 6u64;
        store
            .commit_batch(
                Timestamp(1),
                &(0..accounts)
                    .map(|_| Intent::OpenAccount(new_account(100)))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let mut model: HashMap<AccountId, u64> = (1..=accounts).map(|id| (id, 100)).collect();
        let mut key = 0u128;
        let (mut tails_seen, mut checkpoints_seen) = (0, 0);
        for (payments, reopen) in commits {
            let mut intents = Vec::new();
            let mut planned = model.clone();
            for (from, to, amount) in payments {
                let (sender, receiver) = (from + 1, to + 1);
                key += 1;
                if sender != receiver && planned[&sender] >= amount {
                    *planned.get_mut(&sender).unwrap() -= amount;
                    *planned.get_mut(&receiver).unwrap() += amount;
                    intents.push(settle(key, sender, receiver, amount));
                } else {
                    intents.push(Intent::TopUp {
                        account: sender,
                        amount,
                    });
                    *planned.get_mut(&sender).unwrap() += amount;
                }
            }
            let (_, applied) = store.commit_batch(Timestamp(2), &intents).unwrap();
            proptest::prop_assert!(
                applied
                    .iter()
                    .all(|applied| !matches!(applied, Applied::Refused(_))),
                "{applied:?}"
            );
            model = planned;
            let (balances_at, _) = checkpoint_of(&store);
            let journal_next = store.counters().unwrap().journal_entries;
            if balances_at < journal_next {
                tails_seen += 1;
            }
            if balances_at > 0 {
                checkpoints_seen += 1;
            }
            if reopen {
                drop(store);
                let read_only = Store::open_read_only(&dir.path().join("ledger.redb")).unwrap();
                for (&account, &balance) in &model {
                    proptest::prop_assert_eq!(read_only.balance(account).unwrap(), Some(balance));
                }
                proptest::prop_assert!(read_only.audit().unwrap().is_ok());
                drop(read_only);
                store = store_in(&dir);
            }
            for (&account, &balance) in &model {
                proptest::prop_assert_eq!(store.balance(account).unwrap(), Some(balance));
                let history = store.history(account).unwrap();
                let newest = history.last().map(|(seq, _)| *seq);
                proptest::prop_assert_eq!(
                    store
                        .balance_at_commit(account)
                        .unwrap()
                        .map(|(balance, _)| balance),
                    Some(balance)
                );
                proptest::prop_assert!(newest.is_some());
            }
            let listed: HashMap<AccountId, u64> = store
                .accounts()
                .unwrap()
                .into_iter()
                .map(|(record, balance)| (record.id, balance))
                .collect();
            proptest::prop_assert_eq!(&listed, &model);
            let report = store.audit().unwrap();
            proptest::prop_assert!(report.is_ok(), "{:?}", report.problems);
        }
        let (tails, checkpoints) = seen.get();
        seen.set((tails + tails_seen, checkpoints + checkpoints_seen));
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    let (tails, checkpoints) = seen.get();
    assert!(
        tails > 0 && checkpoints > 0,
        "the cases never wrote behind ({tails}) or never checkpointed ({checkpoints})"
    );
}

#[test]
fn a_checkpoint_writes_every_balance_and_the_audit_checks_the_table_against_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    open_two(&store, 50, 50);
    // Two accounts opened: the table holds neither yet (the tail has them).
    assert_eq!(checkpoint_of(&store), (0, 0));
    store.checkpoint().unwrap();
    assert_eq!(checkpoint_of(&store), (2, 2));
    store
        .commit_batch(Timestamp(2), &[settle(1, 1, 2, 5)])
        .unwrap();
    // The settlement is in the tail; the table still says 50 and 50.
    assert_eq!(checkpoint_of(&store), (2, 2));
    assert_eq!(store.balance(1).unwrap(), Some(45));
    assert_eq!(store.balance(2).unwrap(), Some(55));
    assert!(store.audit().unwrap().is_ok());
    // A forged table row behind the tail is still caught: the table must
    // hold what the journal gives at the checkpoint.
    {
        let write = store.db.begin_write().unwrap();
        let mut balances = write.open_table(BALANCES).unwrap();
        let (_, head) = balance_get(&balances, 1).unwrap().unwrap();
        balance_put(&mut balances, 1, (45, head)).unwrap();
        drop(balances);
        write.commit().unwrap();
    }
    let report = store.audit().unwrap();
    assert!(
        report.problems.iter().any(|problem| problem
            == &Finding::Balance {
                account: 1,
                stored: 45,
                history: 50,
            }
            && problem.to_string() == "account 1: balance 45 but its history gives 50"),
        "{:?}",
        report.problems
    );
}

/// Every row of `table`, as stored.
fn raw_rows<K: redb::Key + 'static>(
    store: &Store,
    table: TableDefinition<K, Sealed>,
) -> Vec<(Vec<u8>, Vec<u8>)>
where
    for<'a> K::SelfType<'a>: Clone,
{
    let read = store.db.begin_read().unwrap();
    let table = read.open_table(table).unwrap();
    table
        .iter()
        .unwrap()
        .map(|row| {
            let (key, value) = row.unwrap();
            (
                K::as_bytes(&key.value()).as_ref().to_vec(),
                value.value().to_vec(),
            )
        })
        .collect()
}

fn ledger_entry(index: u64, intents: Vec<Intent>) -> raft::Entry {
    raft::Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(LedgerEntry {
            term: 1,
            at: Timestamp(1_000 + index),
            intents: intents.into(),
        }),
    }
}

/// Ledger entries of random payments among `accounts` accounts opened by
/// the first, every one of them valid (a payment its sender cannot cover
/// becomes a top-up), and the balances they leave.
fn valid_entries(
    accounts: u64,
    commits: Vec<Vec<(u64, u64, u64)>>,
) -> (Vec<raft::Entry>, HashMap<AccountId, u64>) {
    let opening = (0..accounts)
        .map(|_| Intent::OpenAccount(new_account(100)))
        .collect();
    let mut entries = vec![ledger_entry(1, opening)];
    let mut model: HashMap<AccountId, u64> = (1..=accounts).map(|id| (id, 100)).collect();
    let mut key = 0u128;
    for payments in commits {
        let mut intents = Vec::new();
        for (from, to, amount) in payments {
            let (sender, receiver) = (from % accounts + 1, to % accounts + 1);
            key += 1;
            if sender != receiver && model[&sender] >= amount {
                *model.get_mut(&sender).unwrap() -= amount;
                *model.get_mut(&receiver).unwrap() += amount;
                intents.push(settle(key, sender, receiver, amount));
            } else {
                intents.push(Intent::TopUp {
                    account: sender,
                    amount,
                });
                *model.get_mut(&sender).unwrap() += amount;
            }
        }
        entries.push(ledger_entry(entries.len() as u64 + 1, intents));
    }
    (entries, model)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

    /// Checkpoints are decided per ledger entry from the log alone, so a
    /// replica writes the same tables whether it applies entries one per
    /// transaction or many (as its committer groups them), and whether it
    /// was reopened (tail replayed) in between: `balances` and `meta` are
    /// equal byte for byte, and so are the balances read back. The cache
    /// keeps 3 clean balances here, so trims happen too.
    #[test]
    fn grouping_and_reopens_write_identical_tables(
        commits in proptest::collection::vec(
            proptest::collection::vec((0u64..8, 0u64..8, 1u64..40), 1..8),
            4..30,
        ),
        groups in proptest::collection::vec((1usize..6, proptest::bool::ANY), 30),
    ) {
        let (entries, model) = valid_entries(8, commits);
        let one_dir = tempfile::tempdir().unwrap();
        let one_by_one = store_in(&one_dir);
        for entry in &entries {
            let results = one_by_one.apply_entries(std::slice::from_ref(entry)).unwrap();
            proptest::prop_assert!(results[0].applied.iter().all(|a| !matches!(a, Applied::Refused(_))));
        }
        let grouped_dir = tempfile::tempdir().unwrap();
        let mut grouped = store_in(&grouped_dir);
        let mut rest = &entries[..];
        for (size, reopen) in groups.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (group, after) = rest.split_at((*size).min(rest.len()));
            grouped.apply_entries(group).unwrap();
            rest = after;
            if *reopen {
                drop(grouped);
                grouped = store_in(&grouped_dir);
            }
        }
        proptest::prop_assert_eq!(raw_rows(&one_by_one, BALANCES), raw_rows(&grouped, BALANCES));
        proptest::prop_assert_eq!(raw_rows(&one_by_one, META), raw_rows(&grouped, META));
        proptest::prop_assert_eq!(one_by_one.digest().unwrap(), grouped.digest().unwrap());
        for (&account, &balance) in &model {
            proptest::prop_assert_eq!(one_by_one.balance(account).unwrap(), Some(balance));
            proptest::prop_assert_eq!(grouped.balance(account).unwrap(), Some(balance));
            proptest::prop_assert_eq!(
                one_by_one.history(account).unwrap(),
                grouped.history(account).unwrap()
            );
        }
        let report = grouped.audit().unwrap();
        proptest::prop_assert!(report.is_ok(), "{:?}", report.problems);
    }
}

#[test]
fn an_installed_snapshot_replaces_the_balances_readers_and_the_writer_see() {
    // Two ledgers at the same commit number with different balances.
    let (leader_entries, leader_model) =
        valid_entries(4, vec![vec![(0, 1, 30), (2, 3, 7)], vec![(1, 2, 60)]]);
    let (follower_entries, _) = valid_entries(4, vec![vec![(3, 0, 90)], vec![(2, 1, 5)]]);
    let leader_dir = tempfile::tempdir().unwrap();
    let leader = store_in(&leader_dir);
    leader.apply_entries(&leader_entries).unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let follower = store_in(&follower_dir);
    follower.apply_entries(&follower_entries).unwrap();
    assert_eq!(
        leader.counters().unwrap().commit_seq,
        follower.counters().unwrap().commit_seq
    );
    assert_ne!(leader.balance(1).unwrap(), follower.balance(1).unwrap());

    let snapshot = leader_dir.path().join("snapshot.redb");
    let meta = leader.write_snapshot(&snapshot, "s1".into()).unwrap();
    follower.install_snapshot(&snapshot, &meta).unwrap();
    for (&account, &balance) in &leader_model {
        assert_eq!(follower.balance(account).unwrap(), Some(balance));
        assert_eq!(
            follower.history(account).unwrap(),
            leader.history(account).unwrap()
        );
    }
    // The writer goes on from the snapshot's balances, as the leader does.
    let next = ledger_entry(3, vec![settle(1_000, 2, 1, 10)]);
    for store in [&leader, &follower] {
        let results = store.apply_entries(std::slice::from_ref(&next)).unwrap();
        assert!(
            matches!(
                &results[0].applied[0],
                Applied::Matched(Committed::Decided(outcome)) if matches!(**outcome, Outcome::Settled(_))
            ),
            "{:?}",
            results[0].applied
        );
    }
    assert_eq!(follower.digest().unwrap(), leader.digest().unwrap());
    assert_eq!(follower.balance(2).unwrap(), leader.balance(2).unwrap());
    assert!(follower.audit().unwrap().is_ok());
}

#[test]
fn a_read_only_store_with_a_damaged_journal_tail_refuses_balances_it_cannot_give() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    open_two(&store, 50, 50);
    store.checkpoint().unwrap();
    store
        .commit_batch(Timestamp(2), &[settle(1, 1, 2, 5)])
        .unwrap();
    // Account 1's only change since the checkpoint is in journal entry 2:
    // the table says 50, the truth is 45. Flip a byte of that entry.
    assert_eq!(checkpoint_of(&store), (2, 2));
    {
        let write = store.db.begin_write().unwrap();
        let mut journal = write.open_table(JOURNAL).unwrap();
        let mut bytes = journal.get(2).unwrap().unwrap().value().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        journal.insert(2, bytes.as_slice()).unwrap();
        drop(journal);
        write.commit().unwrap();
    }
    drop(store);
    let read_only = Store::open_read_only(&dir.path().join("ledger.redb")).unwrap();
    let error = read_only.balance(1).unwrap_err();
    assert!(is_damage(&error), "{error}");
    assert!(error.to_string().contains("journal"), "{error}");
    assert!(read_only.history(1).is_err());
    assert!(!read_only.audit().unwrap().is_ok());
}

/// The first sequence of each journal block, as stored.
fn journal_blocks(store: &Store) -> Vec<u64> {
    raw_rows(store, JOURNAL)
        .into_iter()
        .map(|(key, _)| u64::from_le_bytes(key.try_into().unwrap()))
        .collect()
}

#[test]
fn a_commit_writes_its_entries_in_blocks_read_back_by_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    open_two(&store, 1_000, 1_000);
    // Seven settlements in one commit, with a key decided twice: once
    // while its entry is still being built into a block, once after its
    // block was written inside the same transaction.
    let intents: Vec<Intent> = (1..=7)
        .map(|key| settle(key, 1 + key as u64 % 2, 2 - key as u64 % 2, 10))
        .chain([settle(7, 2, 1, 10), settle(1, 2, 1, 10)])
        .collect();
    let (_, applied) = store.commit_batch(Timestamp(2), &intents).unwrap();
    for (at, first) in [(7, 6), (8, 0)] {
        let (
            Applied::Matched(Committed::Decided(outcome)),
            Applied::Matched(Committed::AlreadyFinal(again)),
        ) = (&applied[first], &applied[at])
        else {
            panic!("{:?} then {:?}", applied[first], applied[at]);
        };
        assert_eq!(again, outcome);
    }
    // Openings 0..=1 in one block; settlements 2..=8 in blocks of 3, none
    // spanning the two commits.
    assert_eq!(journal_blocks(&store), vec![0, 2, 5, 8]);
    let all: Vec<u64> = store
        .journal(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(all, (0..=8).collect::<Vec<_>>());
    // Pages that start and end inside blocks.
    for from in 0..=9 {
        for limit in 0..=4 {
            let page: Vec<u64> = store
                .journal(from, limit)
                .unwrap()
                .into_iter()
                .map(|(seq, _)| seq)
                .collect();
            let expected: Vec<u64> = (from..=8).take(limit).collect();
            assert_eq!(page, expected, "journal({from}, {limit})");
        }
    }
    // Key 5's outcome is entry 6, the middle of the second block.
    let outcome = store.outcome(TxKey::from_u128(5)).unwrap().unwrap();
    assert_eq!(
        store.journal(6, 1).unwrap()[0].1,
        JournalEntry::Outcome(outcome)
    );
    let history: Vec<u64> = store
        .history(1)
        .unwrap()
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(history, (0..=8).filter(|seq| *seq != 1).collect::<Vec<_>>());
    let report = store.audit().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.journal_entries, 9);
    drop(store);
    let reopened = store_in(&dir);
    reopened.verify_at_open().unwrap();
    assert_eq!(reopened.balance(1).unwrap(), Some(1_000 + 40 - 30));
}

#[test]
fn audit_names_a_lost_and_a_damaged_journal_block() {
    let tamper = |change: &dyn Fn(&mut redb::Table<u64, Sealed>)| {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(&dir);
        open_two(&store, 1_000, 1_000);
        let intents: Vec<Intent> = (1..=7).map(|key| settle(key, 1, 2, 10)).collect();
        store.commit_batch(Timestamp(2), &intents).unwrap();
        assert_eq!(journal_blocks(&store), vec![0, 2, 5, 8]);
        {
            let write = store.db.begin_write().unwrap();
            change(&mut write.open_table(JOURNAL).unwrap());
            write.commit().unwrap();
        }
        store.audit().unwrap().problems
    };
    let lost = tamper(&|journal| {
        journal.remove(5).unwrap();
    });
    assert!(
        lost.contains(&Finding::JournalGap { seq: 8, after: 4 }),
        "{lost:?}"
    );
    assert!(
        lost.contains(&Finding::JournalLength {
            held: 6,
            written: 9
        }),
        "{lost:?}"
    );
    let damaged = tamper(&|journal| {
        let mut bytes = journal.get(5).unwrap().unwrap().value().to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        journal.insert(5, bytes.as_slice()).unwrap();
    });
    assert!(
        damaged.iter().any(|problem| matches!(
            problem,
            Finding::JournalDamaged { seq: 5, what } if what == "checksum mismatch"
        )),
        "{damaged:?}"
    );
}

#[test]
fn a_lost_first_journal_block_is_a_gap_after_entry_minus_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    open_two(&store, 1_000, 1_000);
    store
        .commit_batch(Timestamp(2), &[settle(1, 1, 2, 10)])
        .unwrap();
    {
        let write = store.db.begin_write().unwrap();
        write.open_table(JOURNAL).unwrap().remove(0).unwrap();
        write.commit().unwrap();
    }
    let problems = store.audit().unwrap().problems;
    assert!(
        problems.contains(&Finding::JournalGap { seq: 2, after: -1 }),
        "{problems:?}"
    );
}
