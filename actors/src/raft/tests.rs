//! openraft's own storage test suite against the log store and the state
//! machine (membership tracking, log reads, purge and truncate, applying,
//! building a snapshot and installing it on another state machine), plus the
//! snapshot and apply behaviour the suite does not reach.

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
use tapledger_protocol::Timestamp;

use super::*;
use crate::error::Refusal;
use crate::store::{Applied, NewAccount, Store};

struct Files;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Files {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, machine) = open_in(&dir);
        Ok((dir, log, machine))
    }
}

fn open_in(dir: &tempfile::TempDir) -> (LogStore, StateMachine) {
    let store = Arc::new(Store::open(&dir.path().join("ledger.redb")).expect("store"));
    let log = LogStore::open(&dir.path().join("raft.redb"), StorageIo::Blocking).expect("log");
    let machine = StateMachine::new(store, &dir.path().join("snapshots"), StorageIo::Blocking)
        .expect("state machine");
    (log, machine)
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Files).expect("openraft storage suite");
}

fn log_id(term: u64, index: u64) -> LogId {
    openraft::LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn account(opening_balance: u64) -> Intent {
    Intent::OpenAccount(NewAccount {
        account_type: "checking".into(),
        bank_name: "Bank".into(),
        salt: vec![1; 16],
        key_hash: vec![2; 64],
        opening_balance,
    })
}

fn ledger_entry(term: u64, index: u64, proposed_in: u64, intents: Vec<Intent>) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(LedgerEntry {
            term: proposed_in,
            at: Timestamp(1_000 + index),
            intents: intents.into(),
        }),
    }
}

fn membership(index: u64) -> Entry {
    let nodes = BTreeMap::from([(1, ReplicaInfo::default())]);
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Membership(Membership::new(vec![[1].into()], nodes)),
    }
}

#[tokio::test]
async fn ledger_entries_apply_with_their_log_id_and_survive_a_snapshot_round_trip() {
    let leader_dir = tempfile::tempdir().unwrap();
    let (_, mut leader) = open_in(&leader_dir);
    let results = leader
        .apply(vec![
            membership(0),
            ledger_entry(1, 1, 1, vec![account(100), account(50)]),
        ])
        .await
        .unwrap();
    assert_eq!(results[0], EntryResult::default());
    assert_eq!(results[1].commit, Some(1));
    assert_eq!(
        results[1].applied,
        vec![Applied::AccountOpened(1), Applied::AccountOpened(2)]
    );
    let (applied, members) = leader.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 1)));
    assert_eq!(members.log_id(), &Some(log_id(1, 0)));

    let snapshot = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 1)));

    // A follower installs it: same state, same digest.
    let follower_dir = tempfile::tempdir().unwrap();
    let (_, mut follower) = open_in(&follower_dir);
    let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
    let mut source = snapshot.snapshot;
    tokio::io::copy(&mut *source, &mut *receiving)
        .await
        .unwrap();
    follower
        .install_snapshot(&snapshot.meta, receiving)
        .await
        .unwrap();
    assert_eq!(
        follower.store().digest().unwrap(),
        leader.store().digest().unwrap()
    );
    assert_eq!(follower.store().balance(1).unwrap(), Some(100));
    assert!(follower.store().audit().unwrap().is_ok());
    let current = follower.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snapshot.meta);

    // The follower goes on applying from there exactly as the leader does.
    let next = ledger_entry(1, 2, 1, vec![account(7)]);
    let on_leader = leader.apply(vec![next.clone()]).await.unwrap();
    let on_follower = follower.apply(vec![next]).await.unwrap();
    assert_eq!(on_leader, on_follower);
    assert_eq!(
        follower.store().digest().unwrap(),
        leader.store().digest().unwrap()
    );
}

#[tokio::test]
async fn an_entry_proposed_in_an_earlier_term_is_refused_whole_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut machine) = open_in(&dir);
    machine
        .apply(vec![ledger_entry(1, 1, 1, vec![account(10)])])
        .await
        .unwrap();
    let before = machine.store().counters().unwrap();
    // Actors built in term 1 proposed it, but it was committed in term 3.
    let results = machine
        .apply(vec![ledger_entry(3, 2, 1, vec![account(10), account(20)])])
        .await
        .unwrap();
    assert_eq!(results[0].commit, None);
    assert!(
        results[0].applied.iter().all(|applied| matches!(
            applied,
            Applied::Refused(Refusal::StaleTerm {
                proposed: 1,
                committed: 3
            })
        )),
        "{results:?}"
    );
    let after = machine.store().counters().unwrap();
    assert_eq!(after, before, "nothing of a refused entry is applied");
    assert_eq!(machine.applied_state().await.unwrap().0, Some(log_id(3, 2)));
}

#[tokio::test]
async fn a_damaged_snapshot_is_refused_and_the_ledger_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut machine) = open_in(&dir);
    machine
        .apply(vec![ledger_entry(1, 1, 1, vec![account(10)])])
        .await
        .unwrap();
    let digest = machine.store().digest().unwrap();
    let mut receiving = machine.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *receiving, b"not a ledger at all")
        .await
        .unwrap();
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(2, 9)),
        last_membership: StoredMembership::default(),
        snapshot_id: "bogus".into(),
    };
    assert!(machine.install_snapshot(&meta, receiving).await.is_err());
    assert_eq!(machine.store().digest().unwrap(), digest);
    assert!(machine.get_current_snapshot().await.unwrap().is_none());
}

#[tokio::test]
async fn the_log_keeps_its_vote_and_bootstrap_members_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    {
        let mut log = LogStore::open(&path, StorageIo::Blocking).unwrap();
        assert!(log.is_pristine().unwrap());
        log.save_vote(&Vote::new(4, 2)).await.unwrap();
        assert!(!log.is_pristine().unwrap());
    }
    let mut log = LogStore::open(&path, StorageIo::Blocking).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(4, 2)));
    log.set_bootstrap(&BTreeMap::from([(2, ReplicaInfo::default())]))
        .unwrap();
    assert_eq!(log.bootstrap().unwrap().unwrap().len(), 1);
}

/// Goal: the committed log id, which gets no transaction of its own, is
/// written durably by the next append and read back after a reopen.
#[tokio::test]
async fn the_committed_log_id_is_written_by_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    {
        let mut log = LogStore::open(&path, StorageIo::Blocking).unwrap();
        log.append_now(vec![membership(1), membership(2)]).unwrap();
        log.save_committed(Some(log_id(1, 2))).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 2)));
        log.append_now(vec![membership(3)]).unwrap();
        // Told after the last append: only this process knows it.
        log.save_committed(Some(log_id(1, 3))).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 3)));
    }
    let mut log = LogStore::open(&path, StorageIo::Blocking).unwrap();
    assert_eq!(
        log.read_committed().await.unwrap(),
        Some(log_id(1, 2)),
        "the append after save_committed wrote it; the later one is a hint lost"
    );
}
