use std::path::{Path, PathBuf};

use firkin_artifacts::sidecar_path;
use firkin_core::ContainerSnapshotState;
use serde::{Deserialize, Serialize};

/// [`ContainerSnapshotState`] as JSON beside a snapshot (`<artifact>.state.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedContainerSnapshotState {
    pub staging_dir: String,
    pub machine_identifier: Vec<u8>,
    pub network_macs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistedStateError {
    #[error("cannot read restore state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("restore state {path} is not valid: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write restore state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl PersistedContainerSnapshotState {
    pub fn from_snapshot_state(state: &ContainerSnapshotState) -> Self {
        Self {
            staging_dir: state.staging_dir().display().to_string(),
            machine_identifier: state.machine_identifier().to_vec(),
            network_macs: state.network_macs().to_vec(),
        }
    }

    pub fn to_snapshot_state(&self) -> ContainerSnapshotState {
        ContainerSnapshotState::new(
            &self.staging_dir,
            self.machine_identifier.clone(),
            self.network_macs.clone(),
        )
    }

    /// `repo-main.vz` → `repo-main.state.json`.
    pub fn sidecar_path_for_artifact(artifact: impl AsRef<Path>) -> PathBuf {
        sidecar_path(artifact.as_ref(), "state.json")
    }

    pub fn read_json(path: impl AsRef<Path>) -> Result<Self, PersistedStateError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| PersistedStateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| PersistedStateError::Decode {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn write_json(&self, path: impl AsRef<Path>) -> Result<(), PersistedStateError> {
        let path = path.as_ref();
        let write_err = |source| PersistedStateError::Write {
            path: path.to_path_buf(),
            source,
        };
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| write_err(std::io::Error::other(e)))?;
        firkin_artifacts::write_bytes_atomic(path, &json).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_decode_error() {
        let dir = tempfile::tempdir().unwrap();
        let state = ContainerSnapshotState::new("/s", vec![9, 8], vec!["02:00:00:00:00:02".into()]);
        let p = PersistedContainerSnapshotState::sidecar_path_for_artifact(dir.path().join("a.vz"));
        assert_eq!(p, dir.path().join("a.state.json"));
        let persisted = PersistedContainerSnapshotState::from_snapshot_state(&state);
        persisted.write_json(&p).unwrap();
        let back = PersistedContainerSnapshotState::read_json(&p).unwrap();
        assert_eq!(back.to_snapshot_state(), state);
        std::fs::write(&p, b"[]").unwrap();
        assert!(matches!(
            PersistedContainerSnapshotState::read_json(&p),
            Err(PersistedStateError::Decode { .. })
        ));
    }
}
