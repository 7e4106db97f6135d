//! Certificates for tapledger nodes: generates a self-signed certificate with
//! rcgen, loads an operator's PEM pair, and computes the fingerprint phones pin.
//!
//! It does no networking and builds no TLS configuration; `tapledger-node` and
//! the client hand the [`CertificateDer`] and [`PrivateKeyDer`] values it
//! returns to rustls. Keys are made with the ring provider only (see the root
//! `Cargo.toml`).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The names a generated certificate covers unless the operator says otherwise.
pub const DEFAULT_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// File names `tapledger-node init` uses inside its data directory.
pub const CERT_FILE_NAME: &str = "node-cert.pem";
pub const KEY_FILE_NAME: &str = "node-key.pem";

/// The common name written into generated certificates, so an operator who
/// inspects one knows what made it. Clients match names or fingerprints, never this.
const COMMON_NAME: &str = "tapledger node";

/// Unix mode of a written private key: readable by its owner only.
pub const KEY_FILE_MODE: u32 = 0o600;

/// Unix mode of a written certificate: public information.
pub const CERT_FILE_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("a certificate needs at least one name")]
    NoNames,
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Pem {
        what: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("{0:?} is not a certificate fingerprint: expected 64 hex digits (colons allowed)")]
    BadFingerprint(String),
}

/// A node's certificate chain and private key, with their PEM text.
///
/// `Debug` shows the fingerprint only, never the key.
pub struct Identity {
    /// Leaf first; never empty.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl Identity {
    /// A fresh self-signed certificate (ECDSA P-256) for `names`. Names that
    /// parse as IP addresses become IP subject alternative names, the rest DNS
    /// names. Valid from 1975 to 4096: clients pin it, so expiry would only
    /// break them.
    pub fn generate<S: AsRef<str>>(names: &[S]) -> Result<Identity, CertError> {
        if names.is_empty() {
            return Err(CertError::NoNames);
        }
        let names: Vec<String> = names.iter().map(|name| name.as_ref().to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names)?;
        let mut distinguished_name = rcgen::DistinguishedName::new();
        distinguished_name.push(rcgen::DnType::CommonName, COMMON_NAME);
        params.distinguished_name = distinguished_name;
        let signing_key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&signing_key)?;
        let key_der = signing_key.serialize_der();
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key_der.into()),
            cert_pem: cert.pem(),
            key_pem: signing_key.serialize_pem(),
        })
    }

    /// A fresh self-signed certificate for [`DEFAULT_NAMES`].
    pub fn generate_default() -> Result<Identity, CertError> {
        Identity::generate(&DEFAULT_NAMES)
    }

    /// Parses a PEM certificate chain (leaf first) and a PEM private key
    /// (PKCS#8, PKCS#1 or SEC1). Does not check that they belong together;
    /// rustls does when the node builds its server configuration.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Identity, CertError> {
        let chain = certificates_from_pem(cert_pem.as_bytes(), "certificate PEM")?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| CertError::Pem {
                what: "private key PEM".to_owned(),
                source,
            })?;
        Ok(Identity {
            chain,
            key,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// Loads an operator-supplied (or earlier generated) PEM pair.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Identity, CertError> {
        let cert_pem = read_text(cert_path)?;
        let key_pem = read_text(key_path)?;
        let chain = certificates_from_pem(cert_pem.as_bytes(), &cert_path.display().to_string())?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| CertError::Pem {
                what: key_path.display().to_string(),
                source,
            })?;
        Ok(Identity {
            chain,
            key,
            cert_pem,
            key_pem,
        })
    }

    /// Writes the certificate (mode 0644) and key (mode 0600) as PEM.
    ///
    /// Each file is written to a temporary file in the same directory, synced,
    /// then renamed over the target, so a crash leaves either the old file or
    /// the complete new one, and the key is never readable by others, not even
    /// briefly. Existing files are replaced: refusing to overwrite is the
    /// caller's decision.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        write_atomically(cert_path, self.cert_pem.as_bytes(), CERT_FILE_MODE)?;
        write_atomically(key_path, self.key_pem.as_bytes(), KEY_FILE_MODE)
    }

    /// The leaf certificate: the one clients pin.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The chain to hand to rustls, leaf first.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.clone()
    }

    /// The private key to hand to rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The leaf certificate's SHA-256 fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self.certificate())
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Reads the certificates of a PEM file, leaf first: what a client pins when
/// given `--cert FILE`.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let text = read_text(path)?;
    certificates_from_pem(text.as_bytes(), &path.display().to_string())
}

/// Parses every certificate in PEM text, in order; at least one.
pub fn certificates_from_pem(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            what: what.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate(what.to_owned()));
    }
    Ok(chain)
}

/// SHA-256 of a certificate's DER bytes: what a client pins.
///
/// Shown as 64 lowercase hex digits without separators. [`Fingerprint::parse`]
/// also accepts uppercase and colon-separated pairs, as other tools print them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(certificate: &CertificateDer<'_>) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, certificate.as_ref());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }

    pub fn parse(text: &str) -> Result<Fingerprint, CertError> {
        let bad = || CertError::BadFingerprint(text.chars().take(100).collect());
        let digits: Vec<u8> = text.trim().bytes().filter(|byte| *byte != b':').collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (slot, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let high = hex_value(pair[0]).ok_or_else(bad)?;
            let low = hex_value(pair[1]).ok_or_else(bad)?;
            *slot = (high << 4) | low;
        }
        Ok(Fingerprint(bytes))
    }

    /// True when `certificate` is the pinned one.
    pub fn matches(&self, certificate: &CertificateDer<'_>) -> bool {
        Fingerprint::of(certificate) == *self
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = CertError;
    fn from_str(text: &str) -> Result<Fingerprint, CertError> {
        Fingerprint::parse(text)
    }
}

fn read_text(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let io_error = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // tempfile creates the file with mode 0600 on unix, so the key is never
    // exposed; the certificate is widened to `mode` before it is renamed.
    let mut file = tempfile::NamedTempFile::new_in(directory).map_err(io_error)?;
    file.write_all(contents).map_err(io_error)?;
    set_mode(file.as_file(), mode).map_err(io_error)?;
    file.as_file().sync_all().map_err(io_error)?;
    file.persist(path).map_err(|error| io_error(error.error))?;
    sync_directory(directory).map_err(io_error)
}

#[cfg(unix)]
fn set_mode(file: &fs::File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_file: &fs::File, _mode: u32) -> io::Result<()> {
    // No Unix modes here; the file keeps the platform's default ACL.
    Ok(())
}

/// Makes the rename itself durable.
#[cfg(unix)]
fn sync_directory(directory: &Path) -> io::Result<()> {
    fs::File::open(directory)?.sync_all()
}

#[cfg(not(unix))]
fn sync_directory(_directory: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests;
