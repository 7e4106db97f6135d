//! A redb storage backend that reads a file and never writes it: writes
//! land in memory over the file's bytes.
//!
//! It lets a read-only open do what only a writable open of redb can: verify
//! the checksum of every page (`Builder::set_check_integrity_on_open`) and
//! recover a file that was not closed cleanly (a node killed mid-run). Both
//! commit to the database, and here those commits stay in memory, so the
//! file hashes the same before and after (`tapledger-node audit` on a
//! backup, or on a `chmod 444` copy).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;

/// The backend: the file (opened read-only) and what was written over it.
#[derive(Debug)]
pub(crate) struct Overlay {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: File,
    /// Bytes of the file still visible (a shrink hides the rest for good).
    file_len: u64,
    /// The length redb sees.
    len: u64,
    /// Writes in the order they happened; later ones win.
    writes: Vec<(u64, Vec<u8>)>,
}

impl Overlay {
    pub(crate) fn open(path: &Path) -> io::Result<Overlay> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Overlay {
            state: Mutex::new(State {
                file,
                file_len: len,
                len,
                writes: Vec::new(),
            }),
        })
    }

    fn state(&self) -> io::Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| io::Error::other("overlay lock poisoned"))
    }
}

impl redb::StorageBackend for Overlay {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state()?.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut state = self.state()?;
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|end| *end <= state.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        out.fill(0);
        let from_file = state.file_len.min(end).saturating_sub(offset) as usize;
        if from_file > 0 {
            state.file.seek(SeekFrom::Start(offset))?;
            state.file.read_exact(&mut out[..from_file])?;
        }
        for (at, data) in &state.writes {
            let (start, stop) = (offset.max(*at), end.min(*at + data.len() as u64));
            if start < stop {
                out[(start - offset) as usize..(stop - offset) as usize]
                    .copy_from_slice(&data[(start - at) as usize..(stop - at) as usize]);
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state()?;
        if len < state.len {
            state.file_len = state.file_len.min(len);
            for (at, data) in &mut state.writes {
                data.truncate(len.saturating_sub(*at) as usize);
            }
            state.writes.retain(|(_, data)| !data.is_empty());
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state()?;
        let end = offset + data.len() as u64;
        state.len = state.len.max(end);
        // A page rewritten in place replaces its earlier write.
        if let Some((_, earlier)) = state
            .writes
            .iter_mut()
            .rev()
            .find(|(at, earlier)| *at == offset && earlier.len() == data.len())
        {
            earlier.copy_from_slice(data);
            return Ok(());
        }
        state.writes.push((offset, data.to_vec()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use redb::StorageBackend;

    use super::*;

    #[test]
    fn writes_show_over_the_file_and_never_reach_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        std::fs::write(&path, [1u8; 8]).unwrap();
        let overlay = Overlay::open(&path).unwrap();
        overlay.write(2, &[7, 7]).unwrap();
        overlay.write(6, &[9, 9, 9, 9]).unwrap();
        overlay.write(2, &[5, 5]).unwrap();
        let mut out = [0u8; 10];
        overlay.read(0, &mut out).unwrap();
        assert_eq!(out, [1, 1, 5, 5, 1, 1, 9, 9, 9, 9]);
        overlay.set_len(4).unwrap();
        overlay.set_len(10).unwrap();
        overlay.read(0, &mut out).unwrap();
        assert_eq!(
            out,
            [1, 1, 5, 5, 0, 0, 0, 0, 0, 0],
            "a shrink forgets what it cut"
        );
        assert!(overlay.read(8, &mut [0u8; 4]).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), [1u8; 8]);
    }
}
