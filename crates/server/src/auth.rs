//! API keys (`X-API-KEY`) and per-sandbox tokens.
//!
//! Keys are stored as SHA-256 digests, never in clear. A plain, fast hash is the right tool here
//! because firkin generates its keys: 160 random bits cannot be guessed from a digest however
//! many hashes per second an attacker runs. Slow password hashes (argon2, bcrypt) exist to
//! protect low-entropy human passwords and would only add latency to every API call. A key a
//! deployer chooses through `FIRKIN_API_KEY` is their responsibility; a short one is warned about.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{PoisonError, RwLock};

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

/// Keys shorter than this (set through `FIRKIN_API_KEY`) get a warning.
pub const MIN_RECOMMENDED_KEY_LEN: usize = 24;

/// Prefix of generated keys, shaped like E2B's so that tools that sniff for it are happy.
const KEY_PREFIX: &str = "e2b_";

/// Hex SHA-256 of a key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new API key: `e2b_` and 40 hex digits (160 random bits).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// A new envd access token (256 random bits, hex).
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Lowercase alphanumeric, so ids fit the `{port}-{id}.{domain}` host grammar.
pub fn random_alnum(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
        .iter()
        // 256 % 36 != 0 gives a slight bias towards the first 4 letters; ids only need to be
        // unique and unguessable enough not to collide, which 20 characters (~103 bits) are.
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

/// Recognisable part of a key for logs and listings (`e2b_1a2b…`), never enough to use it.
pub fn key_hint(key: &str) -> String {
    let visible: String = key.chars().take(8).collect();
    format!("{visible}…")
}

/// The set of accepted key digests, loaded from the store and kept in memory so that checking a
/// request costs one hash and one set lookup.
#[derive(Debug, Default)]
pub struct KeyRing {
    hashes: RwLock<HashSet<String>>,
}

impl KeyRing {
    pub fn load(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            hashes: RwLock::new(store.api_key_hashes()?.into_iter().collect()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.hashes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Whether `key` is one of ours. Comparing digests leaks nothing useful through timing: an
    /// attacker who learns digest prefixes still needs SHA-256 preimages.
    pub fn accepts(&self, key: &str) -> bool {
        let digest = hash_key(key);
        self.hashes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&digest)
    }

    /// Stores a key (digest only) and accepts it from now on. Returns whether it was new.
    pub fn add(
        &self,
        store: &Store,
        name: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let digest = hash_key(key);
        let added = store.add_api_key(name, &digest, &key_hint(key), now_ms)?;
        self.hashes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(digest);
        Ok(added)
    }
}

/// Where the local CLI finds the generated key: `<state>/api-key`, mode 0600. The database only
/// holds digests (so a copied database or backup grants nothing); this file is the operator's
/// own credential, like a kubeconfig, and can be deleted once the key is stored elsewhere.
pub fn key_file(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("api-key")
}

/// Writes the key file readable by the owner only.
pub fn write_key_file(state_dir: &Path, key: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let path = key_file(state_dir);
    firkin_artifacts::write_atomic_with(&path, |file, _| {
        // Private before the key is in it: the temporary starts out world-readable (0o666 less
        // the umask).
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(key.as_bytes())?;
        file.write_all(b"\n")
    })
    .map_err(firkin_artifacts::AtomicWriteError::into_io)
}

/// Reads the key file, if there is one.
pub fn read_key_file(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(key_file(state_dir)).ok()?;
    let key = text.trim();
    (!key.is_empty()).then(|| key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_values_have_their_shapes() {
        let k = generate_key();
        assert!(k.starts_with("e2b_") && k.len() == 44);
        assert_ne!(k, generate_key());
        assert_eq!(generate_token().len(), 64);
        let id = random_alnum(20);
        assert!(firkin_types::SandboxId::new(&id).is_ok());
        assert_eq!(hash_key("abc").len(), 64);
        assert_eq!(key_hint("e2b_0123456789"), "e2b_0123…");
    }

    #[test]
    fn the_key_file_is_the_owners_alone_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write_key_file(dir.path(), "e2b_first").unwrap();
        write_key_file(dir.path(), "e2b_second").unwrap();
        let meta = std::fs::metadata(key_file(dir.path())).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(read_key_file(dir.path()).as_deref(), Some("e2b_second"));
        // Nothing left behind but the key.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
