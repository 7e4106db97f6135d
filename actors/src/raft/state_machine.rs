//! The Raft state machine: the ledger's [`Store`], and its snapshots.
//!
//! Applying committed entries is [`Store::apply_entries`]: one durable write
//! transaction for everything openraft hands over at once, recording the
//! applied log id in the same transaction.
//!
//! A snapshot is a redb file holding a copy of the whole ledger taken from
//! one read transaction (so its last log id and membership are exactly those
//! of the state it copies). Files live in the snapshot directory:
//! `current.snapshot` is the newest built or installed one; `*.tmp` files are
//! being built or received. A file becomes current only once it is complete
//! and synced: written to a temporary name, fsync'd, renamed, directory
//! fsync'd. Installing one replaces the ledger in one write transaction.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::{
    Entry, EntryResult, LogId, SnapshotMeta, StorageError, StorageIo, StoredMembership, TypeConfig,
};
use crate::error::StoreError;
use crate::store::Store;

const CURRENT: &str = "current.snapshot";

/// A snapshot's bytes: an open file and its path.
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
}

impl SnapshotFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

/// The snapshot directory, and the metadata of its current snapshot.
struct SnapshotDir {
    dir: PathBuf,
    /// Distinguishes temporary files and snapshot ids made by this process.
    next: AtomicU64,
    /// Held while a file becomes current, and naming it.
    current: Mutex<Option<SnapshotMeta>>,
}

impl SnapshotDir {
    fn open(dir: &Path) -> Result<SnapshotDir, StoreError> {
        std::fs::create_dir_all(dir).map_err(|error| io_store_error(dir, error))?;
        let entries = std::fs::read_dir(dir).map_err(|error| io_store_error(dir, error))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|extension| extension == "tmp") {
                // Left by a crash while building or receiving: never current.
                let _ = std::fs::remove_file(&path);
            }
        }
        let current_path = dir.join(CURRENT);
        let current = if current_path.exists() {
            Some(Store::snapshot_meta(&current_path)?)
        } else {
            None
        };
        Ok(SnapshotDir {
            dir: dir.to_path_buf(),
            next: AtomicU64::new(0),
            current: Mutex::new(current),
        })
    }

    fn temp_path(&self, purpose: &str) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{purpose}-{}-{n}.tmp", std::process::id()))
    }

    fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// The current snapshot's metadata and an open handle on its file, read
    /// together under the lock so they describe the same file.
    // openraft's own error types, as its traits return them.
    #[allow(clippy::result_large_err)]
    fn open_current(&self) -> Result<Option<(SnapshotMeta, SnapshotFile)>, StorageError> {
        let current = self.current.lock().expect("snapshot lock");
        let Some(meta) = current.clone() else {
            return Ok(None);
        };
        let path = self.current_path();
        let file = std::fs::File::open(&path)
            .map_err(|error| sm_read_error(format!("{}: {error}", path.display())))?;
        Ok(Some((
            meta,
            SnapshotFile {
                file: tokio::fs::File::from_std(file),
                path,
            },
        )))
    }

    /// Makes the complete, synced file at `from` the current snapshot, unless
    /// the current one already covers as much of the log (a build that ran
    /// while a newer snapshot was installed): then `from` is removed and the
    /// current snapshot stays. Returns whether `from` became current.
    fn make_current(&self, from: &Path, meta: SnapshotMeta) -> Result<bool, StoreError> {
        let mut current = self.current.lock().expect("snapshot lock");
        if let Some(newer) = current.as_ref()
            && newer.last_log_id >= meta.last_log_id
        {
            let _ = std::fs::remove_file(from);
            return Ok(false);
        }
        let to = self.current_path();
        std::fs::rename(from, &to).map_err(|error| io_store_error(&to, error))?;
        sync_dir(&self.dir)?;
        *current = Some(meta);
        Ok(true)
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|error| io_store_error(dir, error))
}

fn io_store_error(path: &Path, error: io::Error) -> StoreError {
    StoreError::Redb(redb::Error::Io(io::Error::new(
        error.kind(),
        format!("{}: {error}", path.display()),
    )))
}

fn sm_read_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_state_machine(AnyError::error(error)).into()
}

fn snapshot_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::error(error)).into()
}

/// The state machine. Clones share the store and the snapshot directory
/// (openraft builds snapshots through a clone while it applies).
#[derive(Clone)]
pub struct StateMachine {
    store: Arc<Store>,
    snapshots: Arc<SnapshotDir>,
    io: StorageIo,
}

impl StateMachine {
    /// The state machine over `store`, keeping snapshots in `snapshot_dir`.
    pub fn new(
        store: Arc<Store>,
        snapshot_dir: &Path,
        io: StorageIo,
    ) -> Result<StateMachine, StoreError> {
        Ok(StateMachine {
            store,
            snapshots: Arc::new(SnapshotDir::open(snapshot_dir)?),
            io,
        })
    }

    /// The ledger this state machine applies to.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(StateMachine) -> Result<T, StoreError> + Send + 'static,
        error: fn(String) -> StorageError,
    ) -> Result<T, StorageError> {
        let machine = self.clone();
        match self.io.run(move || work(machine)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(store_error)) => Err(error(store_error.to_string())),
            Err(panic) => {
                self.store.mark_broken();
                Err(error(panic))
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let built = self
            .run(
                |machine| {
                    let temp = machine.snapshots.temp_path("building");
                    let id = format!(
                        "{}-{}",
                        std::process::id(),
                        machine.snapshots.next.fetch_add(1, Ordering::Relaxed)
                    );
                    let meta = machine.store.write_snapshot(&temp, id)?;
                    // Open before it becomes current: the handle stays on this
                    // file even if a newer one replaces it at once.
                    let file =
                        std::fs::File::open(&temp).map_err(|error| io_store_error(&temp, error))?;
                    if !machine.snapshots.make_current(&temp, meta.clone())? {
                        tracing::debug!(
                            last_log = ?meta.last_log_id,
                            "a newer snapshot became current meanwhile; this one is dropped"
                        );
                    }
                    Ok((meta, file))
                },
                snapshot_error,
            )
            .await?;
        let (meta, file) = built;
        tracing::info!(last_log = ?meta.last_log_id, id = %meta.snapshot_id, "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotFile {
                file: tokio::fs::File::from_std(file),
                path: self.snapshots.current_path(),
            }),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.run(|machine| machine.store.raft_state(), sm_read_error)
            .await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<EntryResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|entry| entry.log_id) else {
            return Ok(Vec::new());
        };
        let machine = self.clone();
        match self
            .io
            .run(move || machine.store.apply_entries(&entries))
            .await
        {
            Ok(Ok(results)) => Ok(results),
            Ok(Err(error)) => {
                Err(StorageIOError::apply(last, AnyError::error(error.to_string())).into())
            }
            Err(panic) => {
                self.store.mark_broken();
                Err(StorageIOError::apply(last, AnyError::error(panic)).into())
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        let path = self.snapshots.temp_path("receiving");
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|error| snapshot_error(format!("{}: {error}", path.display())))?;
        Ok(Box::new(SnapshotFile { file, path }))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        let SnapshotFile { mut file, path } = *snapshot;
        let received = path.starts_with(&self.snapshots.dir)
            && path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("receiving-"));
        let path = if received {
            file.flush().await.map_err(snapshot_error)?;
            file.sync_all().await.map_err(snapshot_error)?;
            path
        } else {
            // Someone else's file (a snapshot handed over in process): take a
            // copy of our own, so the original can change or go away.
            let copy = self.snapshots.temp_path("receiving");
            file.seek(io::SeekFrom::Start(0))
                .await
                .map_err(snapshot_error)?;
            let mut target = tokio::fs::File::create(&copy)
                .await
                .map_err(snapshot_error)?;
            tokio::io::copy(&mut file, &mut target)
                .await
                .map_err(snapshot_error)?;
            target.sync_all().await.map_err(snapshot_error)?;
            copy
        };
        drop(file);
        let meta = meta.clone();
        self.run(
            move |machine| {
                // The ledger first: a crash between the two leaves the newer
                // state in the store, which openraft handles (applied ahead of
                // the log); the other order could leave a current snapshot
                // newer than the state it claims to describe.
                machine.store.install_snapshot(&path, &meta)?;
                machine.snapshots.make_current(&path, meta.clone())?;
                tracing::info!(last_log = ?meta.last_log_id, id = %meta.snapshot_id, "snapshot installed");
                Ok(())
            },
            snapshot_error,
        )
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self
            .snapshots
            .open_current()?
            .map(|(meta, snapshot)| Snapshot {
                meta,
                snapshot: Box::new(snapshot),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(index: u64, id: &str) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 1),
                index,
            )),
            last_membership: StoredMembership::default(),
            snapshot_id: id.into(),
        }
    }

    #[test]
    fn an_older_snapshot_never_replaces_a_newer_current_one() {
        // openraft builds snapshots in a task of its own: a build that read
        // the ledger at index 1 can finish after a snapshot at index 100 was
        // installed. It must not become current, or the replica would later
        // offer a snapshot older than the log it purged.
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotDir::open(dir.path()).unwrap();
        let newer = snapshots.temp_path("receiving");
        std::fs::write(&newer, b"newer").unwrap();
        assert!(snapshots.make_current(&newer, meta(100, "newer")).unwrap());
        let older = snapshots.temp_path("building");
        std::fs::write(&older, b"older").unwrap();
        assert!(!snapshots.make_current(&older, meta(1, "older")).unwrap());
        assert!(!older.exists(), "the stale build is removed");
        let (current, _) = snapshots.open_current().unwrap().unwrap();
        assert_eq!(current.snapshot_id, "newer");
        assert_eq!(std::fs::read(snapshots.current_path()).unwrap(), b"newer");
        let later = snapshots.temp_path("building");
        std::fs::write(&later, b"later").unwrap();
        assert!(snapshots.make_current(&later, meta(101, "later")).unwrap());
        assert_eq!(std::fs::read(snapshots.current_path()).unwrap(), b"later");
    }
}
