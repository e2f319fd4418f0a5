//! The one error type of this crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running {tool}: {source} (is it installed? scripts/setup-guest.sh installs it)")]
    ToolMissing {
        tool: String,
        source: std::io::Error,
    },
    #[error("{tool} {args} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("kernel package: {0}")]
    Kernel(String),
    #[error("kernel module {name} is neither in {dir}/modules.order nor built in")]
    ModuleMissing { name: String, dir: PathBuf },
    #[error("OCI archive {path}: {why}")]
    Oci { path: PathBuf, why: String },
    #[error("unsafe path {path:?} in {origin}")]
    UnsafePath { path: String, origin: String },
    #[error("{what} ({size} bytes) does not fit a newc cpio entry (max 4 GiB)")]
    TooBig { what: String, size: u64 },
    #[error("bad option: {0}")]
    BadOption(String),
}

impl GuestError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| GuestError::Io { op, path, source }
    }

    /// Flattens a failed atomic replacement of `path`: the caller's own error as it was, the
    /// temporary file's, rename's or fsync's I/O error as writing `path`.
    pub(crate) fn atomic(
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(firkin_artifacts::AtomicWriteError<GuestError>) -> Self {
        let path = path.into();
        move |e| match e {
            firkin_artifacts::AtomicWriteError::Fill(e) => e,
            firkin_artifacts::AtomicWriteError::Io(source) => GuestError::Io {
                op: "writing",
                path,
                source,
            },
        }
    }
}

pub type Result<T, E = GuestError> = std::result::Result<T, E>;
