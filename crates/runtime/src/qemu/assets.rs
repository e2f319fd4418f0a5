use std::path::{Path, PathBuf};

use firkin_artifacts::DigestCache;
use firkin_guest::KernelAssets;
use firkin_vmm::Accel;

use crate::paths::FirkinPaths;

/// What a cold boot needs from the cache directory: the guest kernel with its virtio modules
/// and the two static guest binaries that go into the initramfs, plus the code interpreter's
/// bundle that only some recipes install into their root filesystem.
#[derive(Clone, Debug)]
pub struct GuestAssets {
    pub kernel: KernelAssets,
    /// The static `firkin-init` (initramfs PID 1).
    pub init: PathBuf,
    /// The static `firkin-envd` (the guest agent).
    pub envd: PathBuf,
    /// The code interpreter's files, or what of them the cache lacks. Not an error here: only
    /// recipes that install it need it, and `base` must keep working on a cache without it.
    pub interpreter: Result<InterpreterBundle, MissingInterpreterBundle>,
}

/// The files a code interpreter template gets from the host (the set-up builds or fetches them
/// into the guest binary directory): the service, the bash kernel Debian does not package and
/// Deno (JavaScript and TypeScript).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterpreterBundle {
    /// The static `firkin-interpreter` (port 49999).
    pub interpreter: PathBuf,
    /// bash_kernel's wheel from PyPI (pinned and verified by the set-up), under its own file
    /// name: pip reads the package's name and version from it.
    pub bash_kernel_wheel: PathBuf,
    /// The `deno` binary from npm's `@deno/linux-x64-glibc` (pinned and verified by the set-up).
    pub deno: PathBuf,
}

/// Where a build that installs the code interpreter finds its bundle in the guest: every file
/// under its own name (uploaded through envd, mode 0644: the recipe's commands install them
/// where and how they want, then remove the directory).
pub const INTERPRETER_UPLOAD_DIR: &str = "/var/tmp/firkin-interpreter";

/// The file name bash_kernel's wheels have (`bash_kernel-<version>-<tags>.whl`).
fn is_bash_kernel_wheel(name: &str) -> bool {
    name.starts_with("bash_kernel-") && name.ends_with(".whl")
}

impl InterpreterBundle {
    /// The bundle in `dir`, or every file of it that is missing (or ambiguous).
    pub fn find(dir: &Path) -> Result<Self, MissingInterpreterBundle> {
        let mut missing = Vec::new();
        let mut file = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Some(path)
            } else {
                missing.push(name.to_owned());
                None
            }
        };
        let interpreter = file("firkin-interpreter");
        let deno = file("deno");
        let mut wheels: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(is_bash_kernel_wheel))
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        wheels.sort();
        let wheel = match wheels.len() {
            1 => wheels.pop(),
            0 => {
                missing.push("bash_kernel-*.whl".to_owned());
                None
            }
            _ => {
                let names: Vec<String> = wheels
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
                    .collect();
                missing.push(format!(
                    "one bash_kernel wheel (there are {})",
                    names.join(", ")
                ));
                None
            }
        };
        match (interpreter, wheel, deno) {
            (Some(interpreter), Some(bash_kernel_wheel), Some(deno)) => Ok(Self {
                interpreter,
                bash_kernel_wheel,
                deno,
            }),
            _ => Err(MissingInterpreterBundle {
                dir: dir.to_path_buf(),
                missing,
            }),
        }
    }

    /// Every file with the guest path it is uploaded to, in upload order.
    pub fn uploads(&self) -> Vec<(&Path, String)> {
        [&self.interpreter, &self.bash_kernel_wheel, &self.deno]
            .into_iter()
            .map(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                let name = name.unwrap_or_default();
                (p.as_path(), format!("{INTERPRETER_UPLOAD_DIR}/{name}"))
            })
            .collect()
    }

    /// Identifies the bundle: each file's guest path, size and SHA-256. Kept apart from
    /// [`GuestAssets::fingerprint`] so that only templates that install the bundle are rebuilt
    /// when a file of it changes.
    pub fn fingerprint(&self, cache: &DigestCache) -> std::io::Result<String> {
        let mut out = String::new();
        for (path, guest) in self.uploads() {
            let (d, _) = cache.digest(path)?;
            out.push_str(&format!("{guest} {} {}\n", d.size_bytes, d.sha256_hex));
        }
        Ok(out)
    }
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

/// A recipe installs the code interpreter and the cache lacks (part of) its bundle.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the code interpreter's files are missing from {}: {}. Run scripts/setup.sh (it builds \
     firkin-interpreter and fetches the pinned bash_kernel wheel and Deno there), or set \
     FIRKIN_GUEST_BIN_DIR",
    dir.display(),
    missing.join(", ")
)]
pub struct MissingInterpreterBundle {
    pub dir: PathBuf,
    pub missing: Vec<String>,
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
            interpreter: InterpreterBundle::find(bin_dir),
        })
    }

    /// The code interpreter's bundle, or why a recipe that installs it cannot be built.
    pub fn interpreter(&self) -> Result<&InterpreterBundle, MissingInterpreterBundle> {
        self.interpreter.as_ref().map_err(Clone::clone)
    }

    /// Identifies the code interpreter's bundle (see [`InterpreterBundle::fingerprint`]).
    /// `Ok(None)`: the bundle is not (all) there.
    pub fn interpreter_fingerprint(&self, cache: &DigestCache) -> std::io::Result<Option<String>> {
        match &self.interpreter {
            Ok(bundle) => bundle.fingerprint(cache).map(Some),
            Err(_) => Ok(None),
        }
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
            interpreter: Ok(InterpreterBundle {
                interpreter: file("firkin-interpreter", "interpreter"),
                bash_kernel_wheel: file("bash_kernel-0.10.0-py2.py3-none-any.whl", "wheel"),
                deno: file("deno", "deno"),
            }),
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

    /// The interpreter's bundle is fingerprinted on its own: a new file of it must not change
    /// what every template (`base` too) is compared by, only what the recipes that install it
    /// are; and each of its files counts.
    #[test]
    fn the_interpreter_bundle_is_not_in_the_common_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let a = assets(dir.path());
        let common = a
            .fingerprint(&DigestCache::in_memory(), Accel::Tcg)
            .unwrap();
        let bundle = a.interpreter().unwrap().clone();
        let mut seen = vec![
            a.interpreter_fingerprint(&DigestCache::in_memory())
                .unwrap()
                .unwrap(),
        ];
        for (i, path) in [&bundle.interpreter, &bundle.bash_kernel_wheel, &bundle.deno]
            .into_iter()
            .enumerate()
        {
            std::fs::write(path, format!("another {i}")).unwrap();
            assert_eq!(
                common,
                a.fingerprint(&DigestCache::in_memory(), Accel::Tcg)
                    .unwrap()
            );
            let now = a
                .interpreter_fingerprint(&DigestCache::in_memory())
                .unwrap()
                .unwrap();
            assert!(
                !seen.contains(&now),
                "{} is not fingerprinted",
                path.display()
            );
            seen.push(now);
        }
        let without = GuestAssets {
            interpreter: Err(MissingInterpreterBundle {
                dir: dir.path().to_path_buf(),
                missing: vec!["deno".into()],
            }),
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

    /// A directory without the bundle (a `base`-only cache) names each missing file and the
    /// set-up script; two wheels are refused rather than one picked.
    #[test]
    fn a_missing_bundle_is_named() {
        let bin = tempfile::tempdir().unwrap();
        for name in ["firkin-init", "firkin-envd"] {
            std::fs::write(bin.path().join(name), name).unwrap();
        }
        let missing = InterpreterBundle::find(bin.path()).unwrap_err();
        assert_eq!(
            missing.missing,
            ["firkin-interpreter", "deno", "bash_kernel-*.whl"]
        );
        let msg = missing.to_string();
        assert!(msg.contains("scripts/setup.sh"), "{msg}");
        assert!(msg.contains("deno"), "{msg}");

        for name in [
            "firkin-interpreter",
            "deno",
            "bash_kernel-0.10.0-py2.py3-none-any.whl",
        ] {
            std::fs::write(bin.path().join(name), name).unwrap();
        }
        let b = InterpreterBundle::find(bin.path()).unwrap();
        let guest: Vec<String> = b.uploads().into_iter().map(|(_, g)| g).collect();
        assert_eq!(
            guest,
            [
                "/var/tmp/firkin-interpreter/firkin-interpreter",
                "/var/tmp/firkin-interpreter/bash_kernel-0.10.0-py2.py3-none-any.whl",
                "/var/tmp/firkin-interpreter/deno",
            ]
        );

        std::fs::write(
            bin.path().join("bash_kernel-0.9.3-py2.py3-none-any.whl"),
            "old",
        )
        .unwrap();
        let two = InterpreterBundle::find(bin.path()).unwrap_err();
        assert!(two.to_string().contains("0.9.3"), "{two}");
    }
}
