//! Certificates in a temporary directory: generate, write, reload, pin.

use super::*;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn paths(directory: &tempfile::TempDir) -> (PathBuf, PathBuf) {
    (
        directory.path().join(CERT_FILE_NAME),
        directory.path().join(KEY_FILE_NAME),
    )
}

#[test]
fn generated_certificate_names_localhost_and_the_loopback_address() {
    let identity = Identity::generate_default().unwrap();
    let der = identity.certificate().as_ref();
    assert!(contains(der, b"localhost"));
    // The IP SAN is the four raw address bytes, tagged [7] with length 4.
    assert!(contains(der, &[0x87, 0x04, 127, 0, 0, 1]));
    assert!(contains(der, COMMON_NAME.as_bytes()));
    assert_eq!(identity.cert_chain().len(), 1);
}

#[test]
fn generating_without_names_is_refused() {
    let names: [&str; 0] = [];
    assert!(matches!(
        Identity::generate(&names),
        Err(CertError::NoNames)
    ));
}

#[test]
fn written_pair_reloads_with_the_same_certificate_key_and_fingerprint() {
    let directory = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = paths(&directory);
    let identity = Identity::generate(&["node.example", "10.0.0.7"]).unwrap();
    identity.write(&cert_path, &key_path).unwrap();

    let loaded = Identity::load(&cert_path, &key_path).unwrap();
    assert_eq!(loaded.certificate(), identity.certificate());
    assert_eq!(
        loaded.private_key().secret_der(),
        identity.private_key().secret_der()
    );
    assert_eq!(loaded.fingerprint(), identity.fingerprint());
    // Loading twice gives the same fingerprint: it depends on the bytes only.
    let again = Identity::load(&cert_path, &key_path).unwrap();
    assert_eq!(again.fingerprint(), identity.fingerprint());

    let pinned = load_certificates(&cert_path).unwrap();
    assert_eq!(pinned, vec![identity.certificate().clone()]);
    assert!(identity.fingerprint().matches(&pinned[0]));
}

#[cfg(unix)]
#[test]
fn key_file_is_owner_only_and_certificate_is_world_readable() {
    use std::os::unix::fs::PermissionsExt;
    let directory = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = paths(&directory);
    Identity::generate_default()
        .unwrap()
        .write(&cert_path, &key_path)
        .unwrap();
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&cert_path), 0o644);
}

#[cfg(unix)]
#[test]
fn rewriting_replaces_a_loose_key_file_with_a_private_one() {
    use std::os::unix::fs::PermissionsExt;
    let directory = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = paths(&directory);
    fs::write(&key_path, "old").unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
    let identity = Identity::generate_default().unwrap();
    identity.write(&cert_path, &key_path).unwrap();
    let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        Identity::load(&cert_path, &key_path).unwrap().fingerprint(),
        identity.fingerprint()
    );
    // Only the two files remain: no temporary files left behind.
    assert_eq!(fs::read_dir(directory.path()).unwrap().count(), 2);
}

#[test]
fn each_generation_has_its_own_key_and_fingerprint() {
    let first = Identity::generate_default().unwrap();
    let second = Identity::generate_default().unwrap();
    assert_ne!(first.fingerprint(), second.fingerprint());
    assert_ne!(
        first.private_key().secret_der(),
        second.private_key().secret_der()
    );
}

#[test]
fn operator_chain_keeps_its_order_leaf_first() {
    let leaf = Identity::generate(&["node.example"]).unwrap();
    let other = Identity::generate(&["intermediate.example"]).unwrap();
    let chain_pem = format!("{}{}", leaf.cert_pem(), other.cert_pem());
    let identity = Identity::from_pem(&chain_pem, &leaf.key_pem).unwrap();
    assert_eq!(identity.cert_chain().len(), 2);
    assert_eq!(identity.certificate(), leaf.certificate());
    assert_eq!(identity.fingerprint(), leaf.fingerprint());
}

#[test]
fn fingerprint_is_sha256_of_the_der_bytes() {
    // SHA-256 of "abc" (FIPS 180-2 example), as if it were a certificate.
    let fingerprint = Fingerprint::of(&CertificateDer::from(b"abc".to_vec()));
    assert_eq!(
        fingerprint.to_string(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn fingerprint_parses_its_own_form_and_colon_separated_uppercase() {
    let fingerprint = Identity::generate_default().unwrap().fingerprint();
    let shown = fingerprint.to_string();
    assert_eq!(shown.len(), 64);
    assert_eq!(Fingerprint::parse(&shown).unwrap(), fingerprint);
    let colons = fingerprint
        .0
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(colons.parse::<Fingerprint>().unwrap(), fingerprint);
    for bad in ["", "abc", &shown[..62], &format!("{}zz", &shown[..62])] {
        assert!(
            matches!(Fingerprint::parse(bad), Err(CertError::BadFingerprint(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn missing_files_and_empty_pem_are_clear_errors() {
    let directory = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = paths(&directory);
    let error = Identity::load(&cert_path, &key_path).unwrap_err();
    assert!(matches!(error, CertError::Io { .. }), "{error}");
    assert!(error.to_string().contains(CERT_FILE_NAME), "{error}");

    fs::write(&cert_path, "no pem here\n").unwrap();
    let error = load_certificates(&cert_path).unwrap_err();
    assert!(matches!(error, CertError::NoCertificate(_)), "{error}");

    let identity = Identity::generate_default().unwrap();
    fs::write(&cert_path, identity.cert_pem()).unwrap();
    fs::write(&key_path, identity.cert_pem()).unwrap();
    let error = Identity::load(&cert_path, &key_path).unwrap_err();
    assert!(matches!(error, CertError::Pem { .. }), "{error}");
    assert!(error.to_string().contains(KEY_FILE_NAME), "{error}");
}

#[test]
fn debug_output_never_contains_the_key() {
    let identity = Identity::generate_default().unwrap();
    let shown = format!("{identity:?}");
    assert!(shown.contains(&identity.fingerprint().to_string()));
    assert!(!shown.contains("PRIVATE KEY"));
    assert!(!shown.contains(&identity.key_pem[40..80]));
}
