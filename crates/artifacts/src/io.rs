use std::ffi::OsString;
use std::fs::{self, File, Permissions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
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

/// Writes JSON so that a reader never sees a half-written file (see [`write_bytes_atomic`]).
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

/// Replacing a file atomically failed: in what the caller wrote, or in the temporary file,
/// its fsync, the rename or the directory fsync around it.
#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError<E> {
    #[error(transparent)]
    Fill(E),
    #[error("replacing the file atomically: {0}")]
    Io(#[source] std::io::Error),
}

impl AtomicWriteError<std::io::Error> {
    /// One I/O error, for callers whose fill step fails with I/O errors too.
    pub fn into_io(self) -> std::io::Error {
        match self {
            AtomicWriteError::Fill(e) | AtomicWriteError::Io(e) => e,
        }
    }
}

/// Replaces `path` with `bytes` so that a reader sees the old file or the new one, never a
/// half-written one, even across a crash (see [`write_atomic_with`]).
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |file, _| file.write_all(bytes)).map_err(AtomicWriteError::into_io)
}

/// Replaces `path` with what `fill` writes into a temporary sibling, given open and by name
/// (for tools that write a file by its path). The temporary (unique, so concurrent writers of
/// the same file do not collide) is fsynced, renamed over `path`, and the directory is fsynced
/// so the rename itself survives a crash. On any failure the temporary is removed.
pub fn write_atomic_with<E>(
    path: &Path,
    fill: impl FnOnce(&mut File, &Path) -> Result<(), E>,
) -> Result<(), AtomicWriteError<E>> {
    let Some(file_name) = path.file_name() else {
        return Err(AtomicWriteError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has no file name",
        )));
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut prefix = OsString::from(".");
    prefix.push(file_name);
    prefix.push(".tmp-");
    // 0o666 before the umask, as `File::create` would: the temporary's default 0o600 would
    // make the file private to this user once renamed.
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .permissions(Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(AtomicWriteError::Io)?;
    let tmp_path = tmp.path().to_path_buf();
    fill(tmp.as_file_mut(), &tmp_path).map_err(AtomicWriteError::Fill)?;
    (|| {
        // fsync works on the file, not the descriptor: it also covers what a tool wrote by name.
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        File::open(dir)?.sync_all()
    })()
    .map_err(AtomicWriteError::Io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_bytes_atomic(&path, b"one").unwrap();
        write_bytes_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.json"]);
        // Readable by others as a plainly created file is (umask permitting), not 0o600.
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let plain = dir.path().join("plain");
        File::create(&plain).unwrap();
        assert_eq!(
            mode,
            fs::metadata(&plain).unwrap().permissions().mode() & 0o777
        );
    }

    #[test]
    fn failed_atomic_write_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a directory fails after the temporary was written.
        let target = dir.path().join("taken");
        fs::create_dir(&target).unwrap();
        assert!(write_bytes_atomic(&target, b"x").is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

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
