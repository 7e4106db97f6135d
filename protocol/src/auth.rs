//! API-key arithmetic shared by phones and the node: the salted hash a phone
//! registers, the constant-time checks the node runs, and [`Secret`], a byte
//! string that never shows up in logs.
//!
//! Everything here is pure. Generating keys and salts needs randomness and is
//! left to the client library; storing hashes and counting failed attempts is
//! left to the node.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_512};
use subtle::ConstantTimeEq;

use crate::limits::{API_KEY_BYTES_MIN, KEY_HASH_BYTES, SALT_BYTES_MIN};

/// `SHA3-512(key ‖ salt)`: what a phone registers instead of its key.
///
/// Pure arithmetic with no length checks, so a test can hash anything; the
/// limits (`API_KEY_BYTES_MIN`, `SALT_BYTES_MIN`) are enforced where keys and
/// salts enter the system, by [`crate::validate`] and [`key_matches`].
pub fn key_hash(key: &[u8], salt: &[u8]) -> [u8; KEY_HASH_BYTES] {
    let mut hasher = Sha3_512::new();
    hasher.update(key);
    hasher.update(salt);
    hasher.finalize().into()
}

/// True when `key` hashes with `salt` to `expected_hash`.
///
/// The comparison takes the same time wherever the hashes differ, so timing
/// reveals nothing about the stored hash. A key or salt shorter than the
/// minimum never matches, even if someone registered its hash, and a stored
/// hash of the wrong length never matches either.
pub fn key_matches(key: &[u8], salt: &[u8], expected_hash: &[u8]) -> bool {
    if key.len() < API_KEY_BYTES_MIN || salt.len() < SALT_BYTES_MIN {
        return false;
    }
    let actual = key_hash(key, salt);
    bytes_equal(&actual, expected_hash)
}

/// Constant-time equality of two byte strings, for credentials.
///
/// Time depends only on the lengths, which are not secret here (a credential's
/// length is fixed by the node that made it).
pub fn bytes_equal(left: &[u8], right: &[u8]) -> bool {
    bool::from(left.ct_eq(right))
}

/// A credential in transit (an API key or the admin credential).
///
/// Encoded as MessagePack `bin`. Its `Debug` shows only the length, so a
/// message that carries one can be logged whole without leaking it, and `==`
/// compares in constant time.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(#[serde(with = "serde_bytes")] Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// The secret bytes. Call sites are where the secret is used, which makes
    /// them easy to audit.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        bytes_equal(&self.0, &other.0)
    }
}

impl Eq for Secret {}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    #[test]
    fn key_hash_is_sha3_512_of_key_then_salt() {
        // SHA3-512("abc"), the FIPS 202 example, split as key "ab" + salt "c":
        // the hash covers the concatenation and nothing else.
        assert_eq!(
            hex(&key_hash(b"ab", b"c")),
            "b751850b1a57168a5693cd924b6b096e08f621827444f70d884f5d0240d2712e\
             10e116e9192af3c91a7ec57647e3934057340b4cf408d5a56592f8274eec53f0"
        );
    }

    #[test]
    fn matching_key_is_accepted_and_any_change_is_not() {
        let key = [7u8; 32];
        let salt = [9u8; 16];
        let hash = key_hash(&key, &salt);
        assert!(key_matches(&key, &salt, &hash));

        let mut wrong_key = key;
        wrong_key[31] ^= 1;
        assert!(!key_matches(&wrong_key, &salt, &hash));
        let mut wrong_salt = salt;
        wrong_salt[0] ^= 1;
        assert!(!key_matches(&key, &wrong_salt, &hash));
        assert!(!key_matches(&key, &salt, &hash[..63]));
    }

    #[test]
    fn short_keys_and_salts_never_match_even_when_registered() {
        let short_key = [1u8; API_KEY_BYTES_MIN - 1];
        let salt = [2u8; SALT_BYTES_MIN];
        assert!(!key_matches(
            &short_key,
            &salt,
            &key_hash(&short_key, &salt)
        ));
        let key = [1u8; API_KEY_BYTES_MIN];
        let short_salt = [2u8; SALT_BYTES_MIN - 1];
        assert!(!key_matches(
            &key,
            &short_salt,
            &key_hash(&key, &short_salt)
        ));
    }

    #[test]
    fn secret_debug_hides_the_bytes() {
        let secret = Secret::new(b"hunter2-hunter2-hunter2-hunter2!".to_vec());
        let shown = format!("{secret:?}");
        assert_eq!(shown, "Secret(<32 bytes>)");
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn secret_is_msgpack_bin() {
        let bytes = rmp_serde::to_vec(&Secret::new(vec![1, 2, 3])).unwrap();
        assert_eq!(bytes, [0xc4, 3, 1, 2, 3]);
        let back: Secret = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.expose(), &[1, 2, 3]);
    }
}
