use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use firkin_admission::CapacityError;
use firkin_types::Size;

/// Reports free disk space at a path.
pub trait DiskPressureProbe {
    type Error: fmt::Display;

    /// Bytes an unprivileged writer can still allocate on the filesystem holding `path`.
    fn available_disk(&mut self, path: &Path) -> Result<Size, Self::Error>;
}

/// Probes the host with `statvfs(2)`: `f_bavail * f_frsize`, the space available to
/// non-root writers, which is what a sandbox's overlay will actually get.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostDiskProbe;

#[derive(Debug, thiserror::Error)]
#[error("statvfs({path}) failed: {source}")]
pub struct HostDiskProbeError {
    pub path: PathBuf,
    pub source: nix::Error,
}

impl DiskPressureProbe for HostDiskProbe {
    type Error = HostDiskProbeError;

    fn available_disk(&mut self, path: &Path) -> Result<Size, Self::Error> {
        let st = nix::sys::statvfs::statvfs(path).map_err(|source| HostDiskProbeError {
            path: path.to_path_buf(),
            source,
        })?;
        let blocks = st.blocks_available();
        let frag = st.fragment_size();
        Ok(Size::bytes(blocks.saturating_mul(frag)))
    }
}

/// The disk floor was not met.
#[derive(Debug, thiserror::Error)]
pub enum DiskFloorError {
    #[error("{path}: {source}")]
    Below {
        path: PathBuf,
        source: CapacityError,
    },
    #[error("cannot measure free disk at {path}: {reason}")]
    Probe { path: PathBuf, reason: String },
}

impl DiskFloorError {
    /// The capacity error the restore contract reports: the floor as `requested` and the
    /// observed free space (0 when the probe failed) as `available`.
    pub fn as_capacity_error(&self, floor: Size) -> CapacityError {
        match self {
            DiskFloorError::Below { source, .. } => *source,
            DiskFloorError::Probe { .. } => CapacityError::Disk {
                requested: floor,
                available: Size::ZERO,
            },
        }
    }
}

/// Passes when at least `floor` bytes are free at `dir`. Exactly the floor passes; one byte less
/// fails.
pub fn check_disk_floor<P: DiskPressureProbe + ?Sized>(
    probe: &mut P,
    dir: &Path,
    floor: Size,
) -> Result<Size, DiskFloorError> {
    match probe.available_disk(dir) {
        Ok(available) if available < floor => Err(DiskFloorError::Below {
            path: dir.to_path_buf(),
            source: CapacityError::Disk {
                requested: floor,
                available,
            },
        }),
        Ok(available) => Ok(available),
        Err(err) => Err(DiskFloorError::Probe {
            path: dir.to_path_buf(),
            reason: err.to_string(),
        }),
    }
}

/// The disk probe a [`crate::SandboxRuntime`] shares between its concurrent restores: the
/// host's `statvfs` unless another is injected (tests inject failing or small ones, and see the
/// production gates refuse).
#[derive(Clone)]
pub struct SharedDiskProbe(Arc<Mutex<dyn ErasedProbe + Send>>);

/// [`DiskPressureProbe`] with its error as text, so probes of any error type can be shared.
trait ErasedProbe {
    fn probe(&mut self, path: &Path) -> Result<Size, String>;
}

impl<P: DiskPressureProbe> ErasedProbe for P {
    fn probe(&mut self, path: &Path) -> Result<Size, String> {
        self.available_disk(path).map_err(|e| e.to_string())
    }
}

impl SharedDiskProbe {
    pub fn new(probe: impl DiskPressureProbe + Send + 'static) -> Self {
        Self(Arc::new(Mutex::new(probe)))
    }
}

impl Default for SharedDiskProbe {
    fn default() -> Self {
        Self::new(HostDiskProbe)
    }
}

impl fmt::Debug for SharedDiskProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedDiskProbe")
    }
}

impl DiskPressureProbe for SharedDiskProbe {
    type Error = String;

    fn available_disk(&mut self, path: &Path) -> Result<Size, Self::Error> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .probe(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<Size, &'static str>);

    impl DiskPressureProbe for Fixed {
        type Error = &'static str;
        fn available_disk(&mut self, _: &Path) -> Result<Size, Self::Error> {
            self.0
        }
    }

    #[test]
    fn floor_is_inclusive() {
        let dir = Path::new("/x");
        assert!(check_disk_floor(&mut Fixed(Ok(Size::gib(10))), dir, Size::gib(10)).is_ok());
        let below = check_disk_floor(
            &mut Fixed(Ok(Size::gib(10).saturating_sub(Size::bytes(1)))),
            dir,
            Size::gib(10),
        );
        assert!(matches!(below, Err(DiskFloorError::Below { .. })));
    }

    #[test]
    fn probe_error_reports_zero_available() {
        let err = check_disk_floor(&mut Fixed(Err("boom")), Path::new("/x"), Size::gib(10));
        let err = err.err();
        assert!(matches!(err, Some(DiskFloorError::Probe { .. })));
        assert_eq!(
            err.map(|e| e.as_capacity_error(Size::gib(10))),
            Some(CapacityError::Disk {
                requested: Size::gib(10),
                available: Size::ZERO
            })
        );
    }

    #[test]
    fn host_probe_reads_a_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let free = HostDiskProbe.available_disk(dir.path()).unwrap();
        assert!(free > Size::ZERO);
        assert!(
            HostDiskProbe
                .available_disk(Path::new("/nonexistent/x"))
                .is_err()
        );
    }
}
