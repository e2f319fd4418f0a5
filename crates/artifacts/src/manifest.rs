use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::io::{SidecarError, read_json, sidecar_path, write_json_atomic};

/// What a snapshot artifact is a snapshot *of*.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotArtifactKind {
    /// A prepared template: booted once, prepared, snapshotted. Logical id = template id.
    BaseTemplate,
    /// A running sandbox saved to be resumed later (E2B's pause). Logical id = sandbox or
    /// snapshot id.
    Continuation,
}

/// Names one artifact and says what it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotArtifactManifest {
    kind: SnapshotArtifactKind,
    logical_id: String,
    path: PathBuf,
    /// RFC 3339, UTC, when the manifest value was made.
    created_at: String,
}

impl SnapshotArtifactManifest {
    pub fn base(logical_id: impl Into<String>, path: impl AsRef<Path>) -> Self {
        Self::new(SnapshotArtifactKind::BaseTemplate, logical_id, path)
    }

    pub fn continuation(logical_id: impl Into<String>, path: impl AsRef<Path>) -> Self {
        Self::new(SnapshotArtifactKind::Continuation, logical_id, path)
    }

    pub fn new(
        kind: SnapshotArtifactKind,
        logical_id: impl Into<String>,
        path: impl AsRef<Path>,
    ) -> Self {
        Self {
            kind,
            logical_id: logical_id.into(),
            path: path.as_ref().to_path_buf(),
            created_at: now_rfc3339(),
        }
    }

    pub fn kind(&self) -> SnapshotArtifactKind {
        self.kind
    }

    pub fn logical_id(&self) -> &str {
        &self.logical_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn created_at(&self) -> &str {
        &self.created_at
    }

    /// The directory whose free space a restore of this artifact consumes: the artifact's
    /// parent, or `/` for a bare file name.
    pub fn parent_dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("/"),
        }
    }

    /// `repo-main.vz` → `repo-main.manifest.json`.
    pub fn sidecar_path_for_artifact(artifact: impl AsRef<Path>) -> PathBuf {
        sidecar_path(artifact.as_ref(), "manifest.json")
    }

    pub fn write_json(&self, path: impl AsRef<Path>) -> Result<(), SidecarError> {
        write_json_atomic(path.as_ref(), self)
    }

    pub fn read_json(path: impl AsRef<Path>) -> Result<Self, SidecarError> {
        read_json(path.as_ref())
    }
}

pub(crate) fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_dir_falls_back_to_root() {
        let m = SnapshotArtifactManifest::base("t", "/snapshots/repo-main.vz");
        assert_eq!(m.parent_dir(), Path::new("/snapshots"));
        let bare = SnapshotArtifactManifest::base("t", "repo-main.vz");
        assert_eq!(bare.parent_dir(), Path::new("/"));
    }

    #[test]
    fn manifest_sidecar_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let artifact = dir.path().join("repo-main.vz");
        let m = SnapshotArtifactManifest::continuation("sbx1", &artifact);
        let side = SnapshotArtifactManifest::sidecar_path_for_artifact(&artifact);
        assert_eq!(side, dir.path().join("repo-main.manifest.json"));
        m.write_json(&side)?;
        let back = SnapshotArtifactManifest::read_json(&side)?;
        assert_eq!(back, m);
        assert_eq!(back.kind(), SnapshotArtifactKind::Continuation);
        let text = std::fs::read_to_string(&side)?;
        assert!(text.contains("\"kind\": \"continuation\""), "{text}");
        assert!(OffsetDateTime::parse(back.created_at(), &Rfc3339).is_ok());
        Ok(())
    }

    #[test]
    fn corrupt_manifest_is_a_decode_error() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let side = dir.path().join("x.manifest.json");
        std::fs::write(&side, b"{\"kind\":\"weird\"}")?;
        assert!(matches!(
            SnapshotArtifactManifest::read_json(&side),
            Err(SidecarError::Decode { .. })
        ));
        Ok(())
    }
}
