//! `tapledger-node init`: creates a data directory with the ledger file, a
//! TLS identity and the operator's admin credential, and loads them for `run`.
//!
//! It refuses to overwrite anything: an existing identity or credential is
//! kept, so re-running `init` never locks phones out of a running node.

use std::io::Write;
use std::path::Path;

use tapledger_certs::{Fingerprint, Identity};
use tapledger_protocol::Secret;

use crate::config::DataDir;

/// Bytes of a generated admin credential.
pub const ADMIN_CREDENTIAL_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cert(#[from] tapledger_certs::CertError),
    #[error(transparent)]
    Store(#[from] tapledger_actors::StoreError),
    #[error(
        "{0}: not a valid admin credential file (expected hex of {ADMIN_CREDENTIAL_BYTES} bytes or more)"
    )]
    BadAdminFile(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What `init` created or found.
#[derive(Debug)]
pub struct InitReport {
    pub fingerprint: Fingerprint,
    pub created: Vec<String>,
    pub kept: Vec<String>,
}

/// Creates whatever the data directory lacks. `names` go into a generated
/// certificate (ignored when the directory already has one).
pub fn init_data_dir(data_dir: &DataDir, names: &[String]) -> Result<InitReport, InitError> {
    std::fs::create_dir_all(data_dir.path()).map_err(io_error(data_dir.path()))?;
    let mut created = Vec::new();
    let mut kept = Vec::new();

    let ledger = data_dir.ledger();
    if ledger.exists() {
        kept.push(ledger.display().to_string());
    } else {
        created.push(ledger.display().to_string());
    }
    // Opening creates the tables, or checks the schema of an existing file.
    drop(tapledger_actors::Store::open(&ledger)?);

    let (cert, key) = (data_dir.cert(), data_dir.key());
    let identity = if cert.exists() || key.exists() {
        kept.push(cert.display().to_string());
        kept.push(key.display().to_string());
        Identity::load(&cert, &key)?
    } else {
        let identity = Identity::generate(names)?;
        identity.write(&cert, &key)?;
        created.push(cert.display().to_string());
        created.push(key.display().to_string());
        identity
    };

    let admin = data_dir.admin();
    if admin.exists() {
        load_admin_credential(&admin)?;
        kept.push(admin.display().to_string());
    } else {
        let mut bytes = [0u8; ADMIN_CREDENTIAL_BYTES];
        rand::fill(&mut bytes);
        write_private(&admin, format!("{}\n", hex(&bytes)).as_bytes())?;
        created.push(admin.display().to_string());
    }
    Ok(InitReport {
        fingerprint: identity.fingerprint(),
        created,
        kept,
    })
}

/// Reads an admin credential file (hex text).
pub fn load_admin_credential(path: &Path) -> Result<Secret, InitError> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    parse_hex(text.trim())
        .filter(|bytes| bytes.len() >= ADMIN_CREDENTIAL_BYTES)
        .map(Secret::new)
        .ok_or_else(|| InitError::BadAdminFile(path.display().to_string()))
}

/// Writes a new file readable only by its owner; never replaces one.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), InitError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_error(path))?;
    file.write_all(contents).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(&text[index..index + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_everything_once_and_keeps_it_after() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path().join("data"));
        let first = init_data_dir(&data_dir, &["localhost".into()]).unwrap();
        assert_eq!(first.created.len(), 4);
        let admin = load_admin_credential(&data_dir.admin()).unwrap();
        assert_eq!(admin.len(), ADMIN_CREDENTIAL_BYTES);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(data_dir.admin())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "admin credential is private");
        }
        let second = init_data_dir(&data_dir, &["localhost".into()]).unwrap();
        assert!(second.created.is_empty(), "{:?}", second.created);
        assert_eq!(
            second.fingerprint, first.fingerprint,
            "the identity is kept"
        );
        assert_eq!(load_admin_credential(&data_dir.admin()).unwrap(), admin);
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        assert_eq!(
            parse_hex(&hex(&[0, 1, 254, 255])),
            Some(vec![0, 1, 254, 255])
        );
        assert_eq!(parse_hex("abc"), None);
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex("éé"), None);
    }
}
