use std::path::{Path, PathBuf};

use firkin_guest::KernelAssets;

use crate::paths::FirkinPaths;

/// What a cold boot needs from the cache directory: the guest kernel with its virtio modules
/// and the two static guest binaries that go into the initramfs.
#[derive(Clone, Debug)]
pub struct GuestAssets {
    pub kernel: KernelAssets,
    /// The static `firkin-init` (initramfs PID 1).
    pub init: PathBuf,
    /// The static `firkin-envd` (the guest agent).
    pub envd: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestAssetsError {
    #[error(
        "guest kernel not found in {dir}: {reason}. Run scripts/setup.sh (it fetches Debian's \
         linux-image-cloud-amd64 into the cache)"
    )]
    Kernel { dir: PathBuf, reason: String },
    #[error(
        "static guest binary {path} is missing. Run scripts/setup.sh (it builds firkin-init and \
         firkin-envd with +crt-static and copies them there), or set FIRKIN_GUEST_BIN_DIR"
    )]
    Binary { path: PathBuf },
}

impl GuestAssets {
    /// Kernel from `<cache>/kernel`, binaries from `$FIRKIN_GUEST_BIN_DIR` or
    /// `<cache>/guest/bin`.
    pub fn locate(paths: &FirkinPaths) -> Result<Self, GuestAssetsError> {
        let bin_dir = std::env::var_os("FIRKIN_GUEST_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| paths.guest_dir().join("bin"));
        Self::from_dirs(&paths.cache_dir().join("kernel"), &bin_dir)
    }

    pub fn from_dirs(kernel_dir: &Path, bin_dir: &Path) -> Result<Self, GuestAssetsError> {
        let kernel = KernelAssets::load(kernel_dir).map_err(|e| GuestAssetsError::Kernel {
            dir: kernel_dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let bin = |name: &str| {
            let path = bin_dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(GuestAssetsError::Binary { path })
            }
        };
        Ok(Self {
            kernel,
            init: bin("firkin-init")?,
            envd: bin("firkin-envd")?,
        })
    }
}
