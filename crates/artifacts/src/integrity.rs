use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::{DigestCache, FileDigest, hash_file};
use crate::io::{SidecarError, read_json, sidecar_path, write_json_atomic};
use crate::manifest::SnapshotArtifactManifest;

/// An artifact does not match its integrity record, or the record could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error("cannot read artifact {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("artifact {path} is {actual} bytes, its integrity record says {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("artifact {path} has SHA-256 {actual}, its integrity record says {expected}")]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "integrity record for {path} has a malformed SHA-256 {value:?} (want 64 lowercase hex digits)"
    )]
    MalformedDigest { path: PathBuf, value: String },
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
}

/// Size and SHA-256 of one artifact file, as recorded when it was sealed.
///
/// JSON: `{"size_bytes": 123, "sha256_hex": "…"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotArtifactIntegrity {
    size_bytes: u64,
    sha256_hex: String,
}

impl SnapshotArtifactIntegrity {
    pub fn new(size_bytes: u64, sha256_hex: impl Into<String>) -> Self {
        Self {
            size_bytes,
            sha256_hex: sha256_hex.into(),
        }
    }

    /// Reads and hashes the manifest's artifact. Always a full read: this is the sealing step.
    pub fn from_file(manifest: &SnapshotArtifactManifest) -> Result<Self, IntegrityError> {
        Self::from_path(manifest.path())
    }

    pub fn from_path(path: &Path) -> Result<Self, IntegrityError> {
        let d = hash_file(path).map_err(|source| IntegrityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::from(d))
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn sha256_hex(&self) -> &str {
        &self.sha256_hex
    }

    /// `repo-main.vz` → `repo-main.integrity.json`.
    pub fn sidecar_path_for_artifact(artifact: impl AsRef<Path>) -> PathBuf {
        sidecar_path(artifact.as_ref(), "integrity.json")
    }

    pub fn write_json(&self, path: impl AsRef<Path>) -> Result<(), SidecarError> {
        write_json_atomic(path.as_ref(), self)
    }

    pub fn read_json(path: impl AsRef<Path>) -> Result<Self, SidecarError> {
        read_json(path.as_ref())
    }

    /// Checks `path` against this record through the process-wide [`DigestCache`].
    pub fn verify(&self, path: &Path) -> Result<(), IntegrityError> {
        self.verify_with(DigestCache::global(), path)
    }

    /// Checks `path` against this record. The size is compared before anything is hashed, so a
    /// truncated or grown file fails on one `stat`; an unchanged, already verified file passes on
    /// one `stat` through the cache.
    pub fn verify_with(&self, cache: &DigestCache, path: &Path) -> Result<(), IntegrityError> {
        self.check_well_formed(path)?;
        let io_err = |source| IntegrityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let actual_size = std::fs::metadata(path).map_err(io_err)?.len();
        if actual_size != self.size_bytes {
            return Err(IntegrityError::SizeMismatch {
                path: path.to_path_buf(),
                expected: self.size_bytes,
                actual: actual_size,
            });
        }
        let (digest, _) = cache.digest(path).map_err(io_err)?;
        if digest.size_bytes != self.size_bytes {
            // The file changed size between the stat and the read.
            return Err(IntegrityError::SizeMismatch {
                path: path.to_path_buf(),
                expected: self.size_bytes,
                actual: digest.size_bytes,
            });
        }
        if digest.sha256_hex != self.sha256_hex {
            return Err(IntegrityError::DigestMismatch {
                path: path.to_path_buf(),
                expected: self.sha256_hex.clone(),
                actual: digest.sha256_hex,
            });
        }
        Ok(())
    }

    fn check_well_formed(&self, path: &Path) -> Result<(), IntegrityError> {
        let ok = self.sha256_hex.len() == 64
            && self
                .sha256_hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(())
        } else {
            Err(IntegrityError::MalformedDigest {
                path: path.to_path_buf(),
                value: self.sha256_hex.clone(),
            })
        }
    }
}

impl From<FileDigest> for SnapshotArtifactIntegrity {
    fn from(d: FileDigest) -> Self {
        Self {
            size_bytes: d.size_bytes,
            sha256_hex: d.sha256_hex,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Duration;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn cache() -> DigestCache {
        DigestCache::in_memory().with_racy_window(Duration::ZERO)
    }

    #[test]
    fn matching_file_verifies() -> TestResult {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.vz");
        fs::write(&p, b"snapshot")?;
        let rec = SnapshotArtifactIntegrity::from_path(&p)?;
        rec.verify_with(&cache(), &p)?;
        Ok(())
    }

    #[test]
    fn size_mismatch_is_reported_before_digest() -> TestResult {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.vz");
        fs::write(&p, b"snapshot")?;
        let rec = SnapshotArtifactIntegrity::from_path(&p)?;
        fs::write(&p, b"snapshot-grown")?;
        let err = rec.verify_with(&cache(), &p);
        assert!(matches!(
            err,
            Err(IntegrityError::SizeMismatch {
                expected: 8,
                actual: 14,
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn digest_mismatch_at_same_size() -> TestResult {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.vz");
        fs::write(&p, b"snapshot")?;
        let rec = SnapshotArtifactIntegrity::from_path(&p)?;
        fs::write(&p, b"snapsh0t")?;
        assert!(matches!(
            rec.verify_with(&cache(), &p),
            Err(IntegrityError::DigestMismatch { .. })
        ));
        Ok(())
    }

    #[test]
    fn cached_verification_still_catches_same_size_rewrite() -> TestResult {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.vz");
        fs::write(&p, b"snapshot")?;
        std::thread::sleep(Duration::from_millis(20));
        let cache = DigestCache::in_memory().with_racy_window(Duration::from_millis(10));
        let rec = SnapshotArtifactIntegrity::from_path(&p)?;
        rec.verify_with(&cache, &p)?;
        rec.verify_with(&cache, &p)?;
        assert_eq!(cache.len(), 1);
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&p, b"snapsh0t")?;
        assert!(matches!(
            rec.verify_with(&cache, &p),
            Err(IntegrityError::DigestMismatch { .. })
        ));
        Ok(())
    }

    #[test]
    fn missing_artifact_is_an_io_error() {
        let rec = SnapshotArtifactIntegrity::new(1, "0".repeat(64));
        assert!(matches!(
            rec.verify_with(&cache(), Path::new("/nonexistent/a.vz")),
            Err(IntegrityError::Io { .. })
        ));
    }

    #[test]
    fn malformed_digest_is_refused_before_reading() -> TestResult {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.vz");
        fs::write(&p, b"x")?;
        let rec = SnapshotArtifactIntegrity::new(1, "ABC");
        assert!(matches!(
            rec.verify_with(&cache(), &p),
            Err(IntegrityError::MalformedDigest { .. })
        ));
        Ok(())
    }

    #[test]
    fn sidecar_round_trip_and_errors() -> TestResult {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a.vz");
        fs::write(&p, b"snapshot")?;
        let rec = SnapshotArtifactIntegrity::from_path(&p)?;
        let sidecar = SnapshotArtifactIntegrity::sidecar_path_for_artifact(&p);
        assert_eq!(sidecar, dir.path().join("a.integrity.json"));
        rec.write_json(&sidecar)?;
        assert_eq!(SnapshotArtifactIntegrity::read_json(&sidecar)?, rec);

        let missing = dir.path().join("missing.integrity.json");
        assert!(matches!(
            SnapshotArtifactIntegrity::read_json(&missing),
            Err(SidecarError::Read { .. })
        ));
        fs::write(&sidecar, b"{\"size_bytes\": \"eight\"}")?;
        assert!(matches!(
            SnapshotArtifactIntegrity::read_json(&sidecar),
            Err(SidecarError::Decode { .. })
        ));
        fs::write(&sidecar, b"not json at all")?;
        assert!(matches!(
            SnapshotArtifactIntegrity::read_json(&sidecar),
            Err(SidecarError::Decode { .. })
        ));
        Ok(())
    }
}
