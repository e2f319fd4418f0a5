use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::DigestCache;
use crate::integrity::{IntegrityError, SnapshotArtifactIntegrity};
use crate::io::{SidecarError, read_json, write_json_atomic};
use crate::manifest::{SnapshotArtifactKind, SnapshotArtifactManifest, now_rfc3339};

/// Descriptor format written by this version of firkin.
const FORMAT: u32 = 1;

/// One file of a sealed snapshot, relative to the descriptor's directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentDigest {
    /// Role of the file, such as `ram`, `vmstate`, `disk`, `kernel`, `initramfs`.
    pub name: String,
    /// File name inside the snapshot directory.
    pub file: String,
    pub size_bytes: u64,
    pub sha256_hex: String,
}

/// A multi-file snapshot whose descriptor lists every component with its SHA-256.
///
/// On disk: `<dir>/<descriptor>` (this struct as JSON), its integrity sidecar and its manifest
/// sidecar. The sidecars are written last, so a crash while sealing leaves a directory that fails
/// verification instead of one that passes with missing parts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSnapshot {
    pub format: u32,
    pub kind: SnapshotArtifactKind,
    pub logical_id: String,
    pub created_at: String,
    pub components: Vec<ComponentDigest>,
    /// Whatever the launcher needs to restore (machine type, RAM size, kernel command line).
    /// Opaque to this crate but covered by the descriptor's digest.
    pub machine: serde_json::Value,
    #[serde(skip)]
    dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("snapshot component {name:?} failed its integrity check: {source}")]
    Component {
        name: String,
        source: IntegrityError,
    },
    #[error("snapshot descriptor failed its integrity check: {0}")]
    Descriptor(IntegrityError),
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    #[error(
        "snapshot component file {file:?} is not a plain file name inside the snapshot directory"
    )]
    UnsafeComponentPath { file: String },
    #[error("snapshot descriptor {path} has format {found}; this firkin reads format {FORMAT}")]
    UnsupportedFormat { path: PathBuf, found: u32 },
    #[error("cannot hash snapshot component {path}: {source}")]
    Hash {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SealedSnapshot {
    /// Hashes every component (each `(name, file)` pair, `file` relative to `dir`) and writes the
    /// descriptor, its integrity sidecar and its manifest sidecar. Returns the sealed value and
    /// the manifest that names the descriptor as the artifact.
    pub fn seal(
        dir: &Path,
        descriptor_file: &str,
        kind: SnapshotArtifactKind,
        logical_id: &str,
        components: &[(&str, &str)],
        machine: serde_json::Value,
        cache: &DigestCache,
    ) -> Result<(Self, SnapshotArtifactManifest), SealError> {
        let mut digests = Vec::with_capacity(components.len());
        for (name, file) in components {
            check_plain_file_name(file)?;
            let path = dir.join(file);
            let (d, _) = cache.digest(&path).map_err(|source| SealError::Hash {
                path: path.clone(),
                source,
            })?;
            digests.push(ComponentDigest {
                name: (*name).to_owned(),
                file: (*file).to_owned(),
                size_bytes: d.size_bytes,
                sha256_hex: d.sha256_hex,
            });
        }
        let sealed = Self {
            format: FORMAT,
            kind,
            logical_id: logical_id.to_owned(),
            created_at: now_rfc3339(),
            components: digests,
            machine,
            dir: dir.to_path_buf(),
        };
        let descriptor = dir.join(descriptor_file);
        write_json_atomic(&descriptor, &sealed)?;
        let manifest = SnapshotArtifactManifest::new(kind, logical_id, &descriptor);
        let integrity =
            SnapshotArtifactIntegrity::from_path(&descriptor).map_err(SealError::Descriptor)?;
        integrity.write_json(SnapshotArtifactIntegrity::sidecar_path_for_artifact(
            &descriptor,
        ))?;
        manifest.write_json(SnapshotArtifactManifest::sidecar_path_for_artifact(
            &descriptor,
        ))?;
        Ok((sealed, manifest))
    }

    /// Verifies the descriptor against `integrity` and every component against the descriptor,
    /// through `cache`. Returns the descriptor only if everything matches.
    pub fn verify(
        descriptor: &Path,
        integrity: &SnapshotArtifactIntegrity,
        cache: &DigestCache,
    ) -> Result<Self, SealError> {
        integrity
            .verify_with(cache, descriptor)
            .map_err(SealError::Descriptor)?;
        let mut sealed = Self::read_unverified(descriptor)?;
        for c in &sealed.components {
            check_plain_file_name(&c.file)?;
            let rec = SnapshotArtifactIntegrity::new(c.size_bytes, c.sha256_hex.clone());
            rec.verify_with(cache, &sealed.dir.join(&c.file))
                .map_err(|source| SealError::Component {
                    name: c.name.clone(),
                    source,
                })?;
        }
        sealed.dir = descriptor_dir(descriptor);
        Ok(sealed)
    }

    /// Verifies using the descriptor's integrity sidecar.
    pub fn verify_with_sidecar(descriptor: &Path, cache: &DigestCache) -> Result<Self, SealError> {
        let integrity = SnapshotArtifactIntegrity::read_json(
            SnapshotArtifactIntegrity::sidecar_path_for_artifact(descriptor),
        )?;
        Self::verify(descriptor, &integrity, cache)
    }

    /// Parses the descriptor without checking any digest. For listing and diagnostics only;
    /// never restore from a value obtained this way.
    pub fn read_unverified(descriptor: &Path) -> Result<Self, SealError> {
        let mut sealed: Self = read_json(descriptor)?;
        if sealed.format != FORMAT {
            return Err(SealError::UnsupportedFormat {
                path: descriptor.to_path_buf(),
                found: sealed.format,
            });
        }
        sealed.dir = descriptor_dir(descriptor);
        Ok(sealed)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Absolute path of the component with this role.
    pub fn component_path(&self, name: &str) -> Option<PathBuf> {
        self.components
            .iter()
            .find(|c| c.name == name)
            .map(|c| self.dir.join(&c.file))
    }

    /// Total bytes of all components.
    pub fn total_bytes(&self) -> u64 {
        self.components.iter().map(|c| c.size_bytes).sum()
    }
}

fn descriptor_dir(descriptor: &Path) -> PathBuf {
    match descriptor.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn check_plain_file_name(file: &str) -> Result<(), SealError> {
    let mut parts = Path::new(file).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(()),
        _ => Err(SealError::UnsafeComponentPath {
            file: file.to_owned(),
        }),
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

    fn sealed_dir() -> Result<(tempfile::TempDir, PathBuf), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        fs::write(dir.path().join("ram.img"), vec![7u8; 4096])?;
        fs::write(dir.path().join("vmstate.bin"), b"state")?;
        fs::write(dir.path().join("disk.img"), b"disk")?;
        let (sealed, manifest) = SealedSnapshot::seal(
            dir.path(),
            "snapshot.json",
            SnapshotArtifactKind::BaseTemplate,
            "base",
            &[
                ("ram", "ram.img"),
                ("vmstate", "vmstate.bin"),
                ("disk", "disk.img"),
            ],
            serde_json::json!({"memory_mib": 256}),
            &cache(),
        )?;
        assert_eq!(sealed.components.len(), 3);
        assert_eq!(manifest.path(), dir.path().join("snapshot.json"));
        let desc = dir.path().join("snapshot.json");
        Ok((dir, desc))
    }

    #[test]
    fn sealed_snapshot_verifies() -> TestResult {
        let (dir, desc) = sealed_dir()?;
        let s = SealedSnapshot::verify_with_sidecar(&desc, &cache())?;
        assert_eq!(s.component_path("ram"), Some(dir.path().join("ram.img")));
        assert_eq!(s.machine["memory_mib"], 256);
        assert!(dir.path().join("snapshot.manifest.json").exists());
        Ok(())
    }

    #[test]
    fn one_flipped_byte_in_a_component_is_caught() -> TestResult {
        let (dir, desc) = sealed_dir()?;
        let ram = dir.path().join("ram.img");
        let mut bytes = fs::read(&ram)?;
        bytes[100] ^= 1;
        fs::write(&ram, bytes)?;
        let err = SealedSnapshot::verify_with_sidecar(&desc, &cache());
        assert!(
            matches!(&err, Err(SealError::Component { name, source: IntegrityError::DigestMismatch { .. } }) if name == "ram"),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn edited_descriptor_is_caught() -> TestResult {
        let (_dir, desc) = sealed_dir()?;
        let text = fs::read_to_string(&desc)?.replace("\"base\"", "\"evil\"");
        fs::write(&desc, text)?;
        assert!(matches!(
            SealedSnapshot::verify_with_sidecar(&desc, &cache()),
            Err(SealError::Descriptor(_))
        ));
        Ok(())
    }

    #[test]
    fn missing_sidecar_fails() -> TestResult {
        let (dir, desc) = sealed_dir()?;
        fs::remove_file(dir.path().join("snapshot.integrity.json"))?;
        assert!(matches!(
            SealedSnapshot::verify_with_sidecar(&desc, &cache()),
            Err(SealError::Sidecar(SidecarError::Read { .. }))
        ));
        Ok(())
    }

    #[test]
    fn component_paths_cannot_escape() -> TestResult {
        let dir = tempfile::tempdir()?;
        let err = SealedSnapshot::seal(
            dir.path(),
            "snapshot.json",
            SnapshotArtifactKind::BaseTemplate,
            "base",
            &[("ram", "../ram.img")],
            serde_json::Value::Null,
            &cache(),
        );
        assert!(matches!(err, Err(SealError::UnsafeComponentPath { .. })));
        Ok(())
    }
}
