//! `tapledger-node init`: creates a data directory with the ledger file, the
//! Raft log, a TLS identity and the operator's admin credential, and loads
//! them for `run`.
//!
//! It refuses to overwrite anything: an existing identity or credential is
//! kept, so re-running `init` never locks phones out of a running node. What
//! it records in the Raft log (this replica's id and addresses, its peers,
//! the voters a new cluster starts with) may be changed only while the
//! replica has never run; after that, membership changes go through the
//! cluster (`tapledger-node cluster add|remove`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use tapledger_actors::{LogStore, ReplicaId, ReplicaInfo, StorageIo};
use tapledger_certs::{Fingerprint, Identity};
use tapledger_protocol::Secret;

use crate::config::DataDir;

/// Where phones reach a replica unless `init` is told otherwise.
pub const CLIENT_ADDR_DEFAULT: &str = "127.0.0.1:7443";
/// Where replicas reach each other unless `init` is told otherwise.
pub const PEER_ADDR_DEFAULT: &str = "127.0.0.1:7453";

/// This replica's place in its cluster, as `init` records it.
#[derive(Clone, Debug)]
pub struct ReplicaPlan {
    pub id: ReplicaId,
    /// What this replica advertises: its phone and replication addresses.
    pub client_addr: String,
    pub peer_addr: String,
    /// The other replicas, with their addresses and certificate fingerprints.
    pub peers: BTreeMap<ReplicaId, ReplicaInfo>,
    /// True: start a new cluster whose voters are this replica and `peers`.
    /// False: join an existing cluster (wait for its leader to add this one;
    /// `peers` are the replicas to trust meanwhile).
    pub bootstrap: bool,
}

impl Default for ReplicaPlan {
    /// A cluster of one: replica 1 on the default addresses.
    fn default() -> ReplicaPlan {
        ReplicaPlan {
            id: 1,
            client_addr: CLIENT_ADDR_DEFAULT.into(),
            peer_addr: PEER_ADDR_DEFAULT.into(),
            peers: BTreeMap::new(),
            bootstrap: true,
        }
    }
}

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
    #[error(
        "{path} already ran as replica {id} of a cluster; its id and peers cannot change now (use `tapledger-node cluster add|remove` on the running cluster)"
    )]
    AlreadyRan { path: String, id: ReplicaId },
    #[error("replica id {0} is listed as its own peer")]
    SelfPeer(ReplicaId),
    #[error(
        "{path} is open to other users (mode {mode:04o}); a secret must be readable by its owner only: run `chmod 600 {path}`"
    )]
    Unprotected { path: String, mode: u32 },
}

/// Refuses a secret (the TLS key, the admin credential) that users other
/// than its owner may read or write, as ssh refuses such a private key.
pub fn check_private(path: &Path) -> Result<(), InitError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(io_error(path))?
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o077 != 0 {
            return Err(InitError::Unprotected {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    Ok(())
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

/// Creates whatever the data directory lacks, for a cluster of one.
/// `names` go into a generated certificate (ignored when the directory
/// already has one).
pub fn init_data_dir(data_dir: &DataDir, names: &[String]) -> Result<InitReport, InitError> {
    init_replica(data_dir, names, &ReplicaPlan::default(), None)
}

/// Creates whatever the data directory lacks and records `plan` in its Raft
/// log. With `admin_from`, the admin credential is copied from that file
/// (every replica of a cluster takes the same operator credential).
pub fn init_replica(
    data_dir: &DataDir,
    names: &[String],
    plan: &ReplicaPlan,
    admin_from: Option<&Path>,
) -> Result<InitReport, InitError> {
    if plan.peers.contains_key(&plan.id) {
        return Err(InitError::SelfPeer(plan.id));
    }
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
        let bytes = match admin_from {
            Some(source) => load_admin_credential(source)?.expose().to_vec(),
            None => {
                let mut bytes = vec![0u8; ADMIN_CREDENTIAL_BYTES];
                rand::fill(&mut bytes[..]);
                bytes
            }
        };
        write_private(&admin, format!("{}\n", hex(&bytes)).as_bytes())?;
        created.push(admin.display().to_string());
    }

    let log_path = data_dir.raft_log();
    if log_path.exists() {
        kept.push(log_path.display().to_string());
    } else {
        created.push(log_path.display().to_string());
    }
    record_plan(&log_path, plan, identity.fingerprint())?;
    Ok(InitReport {
        fingerprint: identity.fingerprint(),
        created,
        kept,
    })
}

/// Initialises a whole new cluster: replica `i + 1` in `dirs[i]`, reached by
/// phones at `addrs[i].0` and by replicas at `addrs[i].1`, every replica
/// trusting the others' certificates, one admin credential (the first
/// replica's) for all. Returns each replica's recorded info and `init`'s
/// report.
pub fn init_cluster(
    dirs: &[DataDir],
    addrs: &[(String, String)],
    names: &[String],
) -> Result<Vec<(ReplicaInfo, InitReport)>, InitError> {
    assert_eq!(dirs.len(), addrs.len(), "one address pair per replica");
    // Identities first: every replica's plan names the others' certificates.
    let mut infos = Vec::with_capacity(dirs.len());
    for (index, (dir, (client_addr, peer_addr))) in dirs.iter().zip(addrs).enumerate() {
        let admin = (index > 0).then(|| dirs[0].admin());
        let placeholder = ReplicaPlan {
            id: index as ReplicaId + 1,
            client_addr: client_addr.clone(),
            peer_addr: peer_addr.clone(),
            peers: BTreeMap::new(),
            bootstrap: false,
        };
        let fingerprint = match init_replica(dir, names, &placeholder, admin.as_deref()) {
            Ok(report) => report.fingerprint,
            // Already part of this cluster: the plan is checked below.
            Err(InitError::AlreadyRan { .. }) => {
                Identity::load(&dir.cert(), &dir.key())?.fingerprint()
            }
            Err(error) => return Err(error),
        };
        infos.push(ReplicaInfo {
            client_addr: client_addr.clone(),
            peer_addr: peer_addr.clone(),
            fingerprint: fingerprint.to_string(),
        });
    }
    let mut done = Vec::with_capacity(dirs.len());
    for (index, dir) in dirs.iter().enumerate() {
        let peers = infos
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(other, info)| (other as ReplicaId + 1, info.clone()))
            .collect();
        let plan = ReplicaPlan {
            id: index as ReplicaId + 1,
            client_addr: infos[index].client_addr.clone(),
            peer_addr: infos[index].peer_addr.clone(),
            peers,
            bootstrap: true,
        };
        let report = init_replica(dir, names, &plan, None)?;
        done.push((infos[index].clone(), report));
    }
    Ok(done)
}

/// Writes `plan` into the Raft log at `path`, unless the replica already
/// ran, in which case the recorded plan must be the same one.
fn record_plan(path: &Path, plan: &ReplicaPlan, fingerprint: Fingerprint) -> Result<(), InitError> {
    let log = LogStore::open(path, StorageIo::Blocking)?;
    let me = ReplicaInfo {
        client_addr: plan.client_addr.clone(),
        peer_addr: plan.peer_addr.clone(),
        fingerprint: fingerprint.to_string(),
    };
    if !log.is_pristine()? {
        let recorded = log.identity()?;
        let same = recorded
            .as_ref()
            .is_some_and(|(id, info)| *id == plan.id && *info == me)
            && log.known()? == plan.peers;
        if same {
            return Ok(());
        }
        return Err(InitError::AlreadyRan {
            path: path.display().to_string(),
            id: recorded.map_or(1, |(id, _)| id),
        });
    }
    log.set_identity(plan.id, &me)?;
    log.set_known(&plan.peers)?;
    if plan.bootstrap {
        let mut members = plan.peers.clone();
        members.insert(plan.id, me);
        log.set_bootstrap(&members)?;
    } else {
        log.clear_bootstrap()?;
    }
    Ok(())
}

/// The replica id, advertised addresses and cluster size recorded in a data
/// directory's Raft log (`None` before `init`): what `run` needs to decide
/// whether to open a replication endpoint.
pub fn recorded_replica(data_dir: &DataDir) -> Result<Option<RecordedReplica>, InitError> {
    let path = data_dir.raft_log();
    if !path.exists() {
        return Ok(None);
    }
    let log = LogStore::open(&path, StorageIo::Blocking)?;
    let Some((id, info)) = log.identity()? else {
        return Ok(None);
    };
    let mut members: std::collections::BTreeSet<ReplicaId> = log.known()?.keys().copied().collect();
    members.extend(log.bootstrap()?.unwrap_or_default().keys().copied());
    members.insert(id);
    drop(log);
    let ledger = data_dir.ledger();
    if ledger.exists() {
        // Read-only when it can be (`status` must not change the file); a
        // file that needs recovery is opened for writing, as `run` would.
        let store = match tapledger_actors::Store::open_read_only(&ledger) {
            Err(tapledger_actors::StoreError::Redb(redb::Error::RepairAborted)) => {
                tapledger_actors::Store::open(&ledger)?
            }
            opened => opened?,
        };
        let (_, membership) = store.raft_state()?;
        members.extend(membership.membership().nodes().map(|(id, _)| *id));
    }
    Ok(Some(RecordedReplica {
        id,
        info,
        cluster_size: members.len(),
    }))
}

/// What [`recorded_replica`] found.
#[derive(Clone, Debug)]
pub struct RecordedReplica {
    pub id: ReplicaId,
    pub info: ReplicaInfo,
    /// Replicas this one knows of, itself included.
    pub cluster_size: usize,
}

/// Reads an admin credential file (hex text).
pub fn load_admin_credential(path: &Path) -> Result<Secret, InitError> {
    check_private(path)?;
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
        assert_eq!(first.created.len(), 5, "{:?}", first.created);
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
