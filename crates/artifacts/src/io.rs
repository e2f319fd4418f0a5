use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Reading or writing a JSON sidecar failed.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot read sidecar {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sidecar {path} is not valid JSON for this record: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot encode sidecar {path}: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write sidecar {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The sidecar of `artifact` with the given suffix, made by replacing the artifact's extension:
/// `repo-main.vz` + `integrity.json` → `repo-main.integrity.json`. An artifact without an
/// extension gets the suffix appended.
pub fn sidecar_path(artifact: &Path, suffix: &str) -> PathBuf {
    artifact.with_extension(suffix)
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, SidecarError> {
    let bytes = fs::read(path).map_err(|source| SidecarError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| SidecarError::Decode {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes JSON so that a reader never sees a half-written file: write a temporary sibling,
/// fsync it, rename it over the target, then fsync the directory so the rename survives a crash.
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), SidecarError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| SidecarError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    write_bytes_atomic(path, &bytes).map_err(|source| SidecarError::Write {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let Some(file_name) = file_name else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has no file name",
        ));
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Unique per call, not just per process: two threads may save the same file at once.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{seq}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_replaces_the_extension() {
        assert_eq!(
            sidecar_path(Path::new("/s/repo-main.vz"), "integrity.json"),
            PathBuf::from("/s/repo-main.integrity.json")
        );
        assert_eq!(
            sidecar_path(Path::new("/s/snapshot.json"), "manifest.json"),
            PathBuf::from("/s/snapshot.manifest.json")
        );
        assert_eq!(
            sidecar_path(Path::new("/s/noext"), "integrity.json"),
            PathBuf::from("/s/noext.integrity.json")
        );
    }
}
