use std::path::{Path, PathBuf};

use firkin_artifacts::DigestCache;
use firkin_guest::KernelAssets;
use firkin_vmm::Accel;

use crate::paths::FirkinPaths;

/// What a cold boot needs from the cache directory: the guest kernel with its virtio modules
/// and the two static guest binaries that go into the initramfs, plus the binaries only some
/// recipes install into their root filesystem.
#[derive(Clone, Debug)]
pub struct GuestAssets {
    pub kernel: KernelAssets,
    /// The static `firkin-init` (initramfs PID 1).
    pub init: PathBuf,
    /// The static `firkin-envd` (the guest agent).
    pub envd: PathBuf,
    /// The static `firkin-interpreter` (the code interpreter, port 49999), if the set-up built
    /// it. Optional: only recipes that install it need it, and `base` must keep working on a
    /// cache that predates it.
    pub interpreter: Option<PathBuf>,
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

/// A recipe asked for a guest binary the cache does not have.
#[derive(Debug, thiserror::Error)]
#[error(
    "static guest binary {name} is missing from the guest binary directory. Run \
     scripts/setup-guest.sh (it builds {name} with +crt-static and copies it there), or set \
     FIRKIN_GUEST_BIN_DIR"
)]
pub struct MissingGuestBinary {
    pub name: &'static str,
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
            interpreter: bin("firkin-interpreter").ok(),
        })
    }

    /// The code interpreter's binary, or why a recipe that installs it cannot be built.
    pub fn interpreter(&self) -> Result<&Path, MissingGuestBinary> {
        self.interpreter.as_deref().ok_or(MissingGuestBinary {
            name: "firkin-interpreter",
        })
    }

    /// Identifies the code interpreter binary (size and SHA-256). Kept apart from
    /// [`Self::fingerprint`] so that only templates that install it are rebuilt when it
    /// changes. `Ok(None)`: the binary is not there.
    pub fn interpreter_fingerprint(&self, cache: &DigestCache) -> std::io::Result<Option<String>> {
        let Some(path) = &self.interpreter else {
            return Ok(None);
        };
        let (d, _) = cache.digest(path)?;
        Ok(Some(format!("{} {}", d.size_bytes, d.sha256_hex)))
    }

    /// SHA-256 over the digests of everything a build copies into the guest (kernel, modules,
    /// `firkin-init`, `firkin-envd`) and the kernel command line a build under `accel` boots
    /// with. A template built from other assets, or booted with another command line (its
    /// clocksource, say), is stale.
    pub fn fingerprint(&self, cache: &DigestCache, accel: Accel) -> std::io::Result<String> {
        use sha2::{Digest, Sha256};
        let k = &self.kernel;
        let files = std::iter::once(("kernel", &k.vmlinuz))
            .chain(k.modules.iter().map(|m| ("module", m)))
            .chain([("init", &self.init), ("envd", &self.envd)]);
        let mut all = Sha256::new();
        for (role, path) in files {
            let (d, _) = cache.digest(path)?;
            all.update(format!("{role} {} {}\n", d.size_bytes, d.sha256_hex).as_bytes());
        }
        let cmdline = firkin_vmm::cmdline::default_kernel_cmdline(accel);
        all.update(format!("cmdline {cmdline}\n").as_bytes());
        Ok(hex::encode(all.finalize()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn assets(dir: &Path) -> GuestAssets {
        let file = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        GuestAssets {
            kernel: KernelAssets {
                version: "6.1.0-test".into(),
                package: "linux-image-test".into(),
                vmlinuz: file("vmlinuz", "kernel"),
                modules: vec![file("virtio.ko", "module")],
            },
            init: file("firkin-init", "init"),
            envd: file("firkin-envd", "envd"),
            interpreter: Some(file("firkin-interpreter", "interpreter")),
        }
    }

    /// A template booted with another kernel command line (under TCG `tsc=reliable` decides
    /// the guest's clocksource) must not be adopted: the fingerprint covers the command line.
    #[test]
    fn the_fingerprint_covers_the_kernel_command_line_and_every_asset() {
        let dir = tempfile::tempdir().unwrap();
        let a = assets(dir.path());
        let tcg = a
            .fingerprint(&DigestCache::in_memory(), Accel::Tcg)
            .unwrap();
        let kvm = a
            .fingerprint(&DigestCache::in_memory(), Accel::Kvm)
            .unwrap();
        assert_ne!(
            tcg, kvm,
            "the two accelerators boot different command lines"
        );
        assert_eq!(
            tcg,
            a.fingerprint(&DigestCache::in_memory(), Accel::Tcg)
                .unwrap()
        );
        std::fs::write(&a.envd, "another envd").unwrap();
        assert_ne!(
            tcg,
            a.fingerprint(&DigestCache::in_memory(), Accel::Tcg)
                .unwrap()
        );
    }

    /// The interpreter is fingerprinted on its own: a new one must not change what every
    /// template (`base` too) is compared by, only what the recipes that install it are.
    #[test]
    fn the_interpreter_is_not_in_the_common_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let a = assets(dir.path());
        let common = a
            .fingerprint(&DigestCache::in_memory(), Accel::Tcg)
            .unwrap();
        let own = a
            .interpreter_fingerprint(&DigestCache::in_memory())
            .unwrap()
            .unwrap();
        std::fs::write(a.interpreter.as_ref().unwrap(), "another interpreter").unwrap();
        assert_eq!(
            common,
            a.fingerprint(&DigestCache::in_memory(), Accel::Tcg)
                .unwrap()
        );
        assert_ne!(
            Some(own),
            a.interpreter_fingerprint(&DigestCache::in_memory())
                .unwrap()
        );
        let without = GuestAssets {
            interpreter: None,
            ..a
        };
        assert!(
            without
                .interpreter_fingerprint(&DigestCache::in_memory())
                .unwrap()
                .is_none()
        );
        assert!(without.interpreter().is_err());
    }
}
