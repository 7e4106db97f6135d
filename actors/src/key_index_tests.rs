use std::collections::HashMap;

use redb::{Database, ReadableDatabase, ReadableTableMetadata};

use super::*;

/// SplitMix64: enough randomness for keys, with no dependency.
struct Keys(u64);

impl Keys {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn key(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }
}

fn database() -> Database {
    Database::builder()
        .create_with_backend(redb::backends::InMemoryBackend::new())
        .unwrap()
}

/// Adds `commits` commits of random keys (of random sizes) to an empty
/// index in `db`, one write transaction each, and returns every key with
/// its sequence number.
fn fill(db: &Database, secret: u64, commits: usize, seed: u64) -> (KeyIndex, HashMap<u128, u64>) {
    let mut rng = Keys(seed);
    let mut index = KeyIndex {
        runs: Vec::new(),
        secret,
        commit: 0,
        damage: None,
    };
    let mut next_run = 0;
    let mut all = HashMap::new();
    let mut seq = 0;
    for commit in 1..=commits as u64 {
        let size = rng.next_u64() % 300;
        let new: Vec<(u128, u64)> = (0..size)
            .map(|_| {
                seq += 1;
                (rng.key(), seq)
            })
            .collect();
        all.extend(new.iter().copied());
        let write = db.begin_write().unwrap();
        index = {
            let mut tables = IndexTables {
                runs: write.open_table(RUNS).unwrap(),
                chunks: write.open_table(CHUNKS).unwrap(),
            };
            index.add(&mut tables, &mut next_run, commit, new).unwrap()
        };
        write.commit().unwrap();
    }
    (index, all)
}

fn lookup(db: &Database, index: &KeyIndex, key: u128) -> Option<u64> {
    let read = db.begin_read().unwrap();
    index.get(&read.open_table(CHUNKS).unwrap(), key).unwrap()
}

#[test]
fn every_key_is_found_with_its_entry_and_no_other_key_is() {
    let db = database();
    let (index, all) = fill(&db, 7, 200, 1);
    assert_eq!(index.len(), all.len() as u64);
    for (&key, &seq) in &all {
        assert_eq!(lookup(&db, &index, key), Some(seq));
    }
    let mut rng = Keys(99);
    for _ in 0..2_000 {
        let stranger = rng.key();
        assert_eq!(lookup(&db, &index, stranger), None);
    }
}

#[test]
fn merging_keeps_fewer_than_fan_in_runs_per_level() {
    let db = database();
    let (index, all) = fill(&db, 7, 300, 2);
    let mut per_level = HashMap::<u8, usize>::new();
    for run in &index.runs {
        *per_level.entry(run.level).or_default() += 1;
    }
    assert!(
        per_level.values().all(|count| *count < FAN_IN),
        "{per_level:?}"
    );
    assert!(
        per_level.keys().any(|level| *level >= 2),
        "merged at least twice: {per_level:?}"
    );
    // Merged runs' records are gone: the tables hold the live runs only.
    let read = db.begin_read().unwrap();
    let runs = read.open_table(RUNS).unwrap();
    let chunks = read.open_table(CHUNKS).unwrap();
    assert_eq!(runs.len().unwrap(), index.run_count() as u64);
    let expected_chunks: u64 = index.runs.iter().map(|run| run.chunks()).sum();
    assert_eq!(chunks.len().unwrap(), expected_chunks);
    let audit = audit_entries(&runs, &chunks, u64::MAX).unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    assert_eq!(audit.entries.len(), all.len());
    // A run counter behind the runs it made is a problem for each run.
    let behind = audit_entries(&runs, &chunks, 0).unwrap().problems;
    assert_eq!(behind.len(), index.run_count(), "{behind:?}");
}

#[test]
fn an_index_loaded_with_another_secret_answers_the_same() {
    let db = database();
    let (_, all) = fill(&db, 7, 120, 3);
    let read = db.begin_read().unwrap();
    let loaded = KeyIndex::load(
        &read.open_table(RUNS).unwrap(),
        &read.open_table(CHUNKS).unwrap(),
        12_345,
        120,
    )
    .unwrap();
    assert_eq!(loaded.commit, 120);
    assert_eq!(loaded.len(), all.len() as u64);
    for (&key, &seq) in all.iter().take(5_000) {
        assert_eq!(lookup(&db, &loaded, key), Some(seq));
    }
}

#[test]
fn a_damaged_chunk_stops_the_load_and_a_stray_one_is_an_audit_problem() {
    let db = database();
    fill(&db, 7, 20, 4);
    let write = db.begin_write().unwrap();
    {
        let mut chunks = write.open_table(CHUNKS).unwrap();
        let (first, mut bytes) = {
            let (key, value) = chunks.first().unwrap().unwrap();
            (key.value(), value.value().to_vec())
        };
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        chunks.insert(first, bytes.as_slice()).unwrap();
        let stray = ChunkId {
            run: 9_999,
            chunk: 0,
        };
        chunks
            .insert(
                stray.key(),
                seal::seal(CHUNKS.name(), stray, &[0u8; ENTRY_LEN]).as_slice(),
            )
            .unwrap();
    }
    write.commit().unwrap();
    let read = db.begin_read().unwrap();
    let runs = read.open_table(RUNS).unwrap();
    let chunks = read.open_table(CHUNKS).unwrap();
    let error = KeyIndex::load(&runs, &chunks, 1, 20).expect_err("damage found");
    assert!(matches!(error, StoreError::Damaged { .. }), "{error}");
    let problems = audit_entries(&runs, &chunks, u64::MAX).unwrap().problems;
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems.iter().any(|problem| problem.contains("checksum")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|problem| problem.contains("run 9999 chunk 0 belongs to no run"))
    );
}

#[test]
fn the_filter_passes_every_key_it_holds_and_few_others() {
    let mut filter = Filter::new(10_000);
    for key in 0..10_000u128 {
        filter.insert(filter_hash(5, key));
    }
    assert!((0..10_000u128).all(|key| filter.may_contain(filter_hash(5, key))));
    let false_positives = (10_000..110_000u128)
        .filter(|key| filter.may_contain(filter_hash(5, *key)))
        .count();
    // About 1 % expected; 3 % leaves room for chance.
    assert!(false_positives < 3_000, "{false_positives} of 100,000");
}

#[test]
fn merging_runs_gives_every_entry_once_in_key_order_and_names_a_key_found_twice() {
    let mut keys = Keys(11);
    for runs in 1..=FAN_IN + 1 {
        let mut all = Vec::new();
        let sorted: Vec<Vec<(u128, u64)>> = (0..runs)
            .map(|run| {
                let mut entries: Vec<_> = (0..100 * run as u64 + 7)
                    .map(|seq| (keys.key(), seq))
                    .collect();
                entries.sort_unstable();
                all.extend_from_slice(&entries);
                entries
            })
            .collect();
        all.sort_unstable();
        assert_eq!(merge_runs(sorted.clone()).unwrap(), all, "{runs} runs");
        if runs > 1 {
            let mut twice = sorted;
            let repeated = twice[0][3].0;
            let last = twice.len() - 1;
            twice[last].push((repeated, 1));
            twice[last].sort_unstable();
            assert_eq!(merge_runs(twice), Err(repeated), "{runs} runs");
        }
    }
    assert_eq!(merge_runs(Vec::new()), Ok(Vec::new()));
}
