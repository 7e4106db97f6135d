//! What this machine's disk can do, measured in the benchmark's own directory
//! so the ledger's figures read as a ratio to the hardware:
//!
//! * the raw `fdatasync` rate: overwrite one 4 KiB block and `fdatasync`, in a
//!   loop;
//! * the raw redb commit rate: one tiny key per write transaction at
//!   `Durability::Immediate`, in a loop;
//! * the sequential write bandwidth: 1 MiB writes to a new file, then one
//!   `fdatasync`, the ceiling for commits that write many pages.
//!
//! The probes are synchronous and run for about a fixed wall time; call them
//! from a blocking thread. They write nothing outside `dir` and remove their files.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use redb::{Database, Durability, TableDefinition};

/// Size of the block the fsync probe overwrites: one page, like a small commit.
pub const FSYNC_PROBE_BLOCK_BYTES: usize = 4096;

/// Size of each write of the bandwidth probe.
pub const BANDWIDTH_PROBE_WRITE_BYTES: usize = 1 << 20;
/// The bandwidth probe stops writing at this size even if time is left.
pub const BANDWIDTH_PROBE_BYTES_MAX: u64 = 256 << 20;

const PROBE_TABLE: TableDefinition<u64, u64> = TableDefinition::new("probe");

/// How many times something durable happened in how long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub count: u64,
    pub seconds: f64,
}

impl Rate {
    pub fn per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.count as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Overwrites one 4 KiB block at offset 0 and `fdatasync`s it, for `duration`.
/// The block is written once first so that later syncs carry data only, no
/// change of file size.
pub fn fdatasync_rate(dir: &Path, duration: Duration) -> std::io::Result<Rate> {
    let path = dir.join("fsync-probe.bin");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let mut block = [0u8; FSYNC_PROBE_BLOCK_BYTES];
    file.write_all_at(&block, 0)?;
    file.sync_all()?;
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < duration {
        // Change the content each time so no layer can skip an identical write.
        block[..8].copy_from_slice(&count.to_le_bytes());
        file.write_all_at(&block, 0)?;
        file.sync_data()?;
        count += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Rate { count, seconds })
}

/// Commits one `u64 -> u64` insert per write transaction at
/// `Durability::Immediate` into a fresh redb file, for `duration`.
pub fn redb_commit_rate(dir: &Path, duration: Duration) -> Result<Rate, redb::Error> {
    let path = dir.join("redb-probe.redb");
    let rate = {
        let db = Database::create(&path)?;
        let started = Instant::now();
        let mut count = 0u64;
        while started.elapsed() < duration {
            let mut write = db.begin_write()?;
            write.set_durability(Durability::Immediate)?;
            {
                let mut table = write.open_table(PROBE_TABLE)?;
                table.insert(count, count)?;
            }
            write.commit()?;
            count += 1;
        }
        Rate {
            count,
            seconds: started.elapsed().as_secs_f64(),
        }
    };
    std::fs::remove_file(&path).map_err(redb::Error::Io)?;
    Ok(rate)
}

/// Writes 1 MiB blocks to a new file for about `duration` (at most
/// [`BANDWIDTH_PROBE_BYTES_MAX`]), then `fdatasync`s it; `count` is bytes and
/// `seconds` includes the sync.
pub fn write_bandwidth(dir: &Path, duration: Duration) -> std::io::Result<Rate> {
    let path = dir.join("bandwidth-probe.bin");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let mut block = vec![0u8; BANDWIDTH_PROBE_WRITE_BYTES];
    let started = Instant::now();
    let mut written = 0u64;
    while written < BANDWIDTH_PROBE_BYTES_MAX && (written == 0 || started.elapsed() < duration) {
        block[..8].copy_from_slice(&written.to_le_bytes());
        file.write_all_at(&block, written)?;
        written += BANDWIDTH_PROBE_WRITE_BYTES as u64;
    }
    file.sync_data()?;
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Rate {
        count: written,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_count_durable_writes_and_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let fsync = fdatasync_rate(dir.path(), Duration::from_millis(50)).unwrap();
        let redb = redb_commit_rate(dir.path(), Duration::from_millis(50)).unwrap();
        let bandwidth = write_bandwidth(dir.path(), Duration::from_millis(50)).unwrap();
        assert!(fsync.count > 0 && fsync.per_sec() > 0.0, "{fsync:?}");
        assert!(
            bandwidth.count >= BANDWIDTH_PROBE_WRITE_BYTES as u64,
            "{bandwidth:?}"
        );
        assert!(redb.count > 0 && redb.per_sec() > 0.0, "{redb:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
