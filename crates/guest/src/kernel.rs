//! The guest kernel: Debian's `linux-image-cloud-amd64`, fetched with `apt-get download` and
//! unpacked with `dpkg-deb -x` into the cache. Only `vmlinuz` and the modules firkin loads are
//! kept.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{GuestError, Result};
use crate::tool::run;
use crate::{Progress, ProgressFn};

/// Modules firkin-init loads, in dependency order (file stems as in `modules.order`). Modules
/// the kernel has built in are skipped. ext4 (and crc32c, jbd2, mbcache) and the 8250 serial
/// driver are built into the cloud kernel, so they are not here.
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
    // The host's per-VM secret (QEMU fw_cfg `opt/firkin/secret`), envd's gate before `/init`.
    "qemu_fw_cfg",
];

/// The Debian meta package that names the current cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
const MANIFEST: &str = "kernel.json";

/// A kernel ready to boot, with the modules the initramfs needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelAssets {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// The Debian package and version it came from.
    pub package: String,
    pub vmlinuz: PathBuf,
    /// Module files in load order.
    pub modules: Vec<PathBuf>,
}

impl KernelAssets {
    /// Reads the manifest a previous [`fetch_kernel`] wrote into `dir`.
    pub fn load(dir: &Path) -> Result<KernelAssets> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(GuestError::io("reading", &path))?;
        let assets: KernelAssets = serde_json::from_str(&text)
            .map_err(|e| GuestError::Kernel(format!("{}: {e}", path.display())))?;
        for f in std::iter::once(&assets.vmlinuz).chain(&assets.modules) {
            if !f.is_file() {
                return Err(GuestError::Kernel(format!(
                    "{} lists {}, which is missing",
                    path.display(),
                    f.display()
                )));
            }
        }
        Ok(assets)
    }

    /// Uses a kernel and an unpacked module tree from elsewhere (the path override):
    /// `modules_root` is the `lib/modules/VERSION` directory.
    pub fn from_paths(vmlinuz: &Path, modules_root: &Path) -> Result<KernelAssets> {
        let version = modules_root
            .file_name()
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(KernelAssets {
            version,
            package: "(override)".into(),
            vmlinuz: vmlinuz.to_path_buf(),
            modules: resolve_modules(modules_root, VIRTIO_MODULES)?,
        })
    }
}

/// Finds `names` in a module tree via its `modules.order`, skipping built-in ones.
pub fn resolve_modules(modules_root: &Path, names: &[&str]) -> Result<Vec<PathBuf>> {
    let read = |f: &str| {
        let p = modules_root.join(f);
        std::fs::read_to_string(&p).map_err(GuestError::io("reading", &p))
    };
    let order = read("modules.order")?;
    let builtin = read("modules.builtin").unwrap_or_default();
    let stem = |line: &str| {
        Path::new(line.trim())
            .file_name()
            .and_then(|f| f.to_str())
            .map(|f| f.trim_end_matches(".ko").to_string())
    };
    let mut out = Vec::new();
    for name in names {
        // modules.order and modules.builtin spell '-' and '_' as in the file name.
        if let Some(line) = order.lines().find(|l| stem(l).as_deref() == Some(name)) {
            let path = modules_root.join(line.trim());
            if !path.is_file() {
                return Err(GuestError::Kernel(format!(
                    "{} is in modules.order but missing (compressed modules are not supported)",
                    path.display()
                )));
            }
            out.push(path);
        } else if builtin.lines().any(|l| stem(l).as_deref() == Some(name)) {
            tracing::debug!(module = name, "built into the kernel");
        } else {
            return Err(GuestError::ModuleMissing {
                name: name.to_string(),
                dir: modules_root.to_path_buf(),
            });
        }
    }
    Ok(out)
}

/// Downloads and unpacks the cloud kernel into `dir` (e.g. `$CACHE/kernel`), reusing what a
/// previous run left there. `apt-get download` needs current package lists (`apt-get update`).
pub fn fetch_kernel(dir: &Path, progress: ProgressFn<'_>) -> Result<KernelAssets> {
    if let Ok(assets) = KernelAssets::load(dir) {
        progress(&Progress::step(
            "kernel",
            format!("cached {}", assets.version),
        ));
        return Ok(assets);
    }
    std::fs::create_dir_all(dir).map_err(GuestError::io("creating", dir))?;
    let scratch = dir.join(format!("scratch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(GuestError::io("creating", &scratch))?;
    let result = fetch_into(dir, &scratch, progress);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn deb_in(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .map_err(GuestError::io("listing", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| GuestError::Kernel(format!("apt-get download left no {prefix}*.deb")))
}

fn fetch_into(dir: &Path, scratch: &Path, progress: ProgressFn<'_>) -> Result<KernelAssets> {
    let s = |x: &'static str| OsStr::new(x);
    progress(&Progress::step(
        "kernel",
        format!("apt-get download {KERNEL_META_PACKAGE}"),
    ));
    run(
        "apt-get",
        &[s("download"), s(KERNEL_META_PACKAGE)],
        Some(scratch),
    )?;
    let meta = deb_in(scratch, KERNEL_META_PACKAGE)?;
    let depends = run("dpkg-deb", &[s("-f"), meta.as_os_str(), s("Depends")], None)?;
    let package = depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or_default())
        .find(|d| d.starts_with("linux-image-") && d != &KERNEL_META_PACKAGE)
        .ok_or_else(|| {
            GuestError::Kernel(format!(
                "{KERNEL_META_PACKAGE} depends on no kernel: {depends:?}"
            ))
        })?
        .to_string();
    progress(&Progress::step(
        "kernel",
        format!("apt-get download {package}"),
    ));
    run(
        "apt-get",
        &[s("download"), OsStr::new(&package)],
        Some(scratch),
    )?;
    let deb = deb_in(scratch, &format!("{package}_"))?;
    let pkg_version = run("dpkg-deb", &[s("-f"), deb.as_os_str(), s("Version")], None)?;
    progress(&Progress::step(
        "kernel",
        format!("dpkg-deb -x {}", deb.display()),
    ));
    let root = scratch.join("root");
    run(
        "dpkg-deb",
        &[s("-x"), deb.as_os_str(), root.as_os_str()],
        None,
    )?;

    let modules_dir = root.join("lib/modules");
    let version = std::fs::read_dir(&modules_dir)
        .map_err(GuestError::io("listing", &modules_dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| GuestError::Kernel(format!("{} is empty", modules_dir.display())))?;
    let modules_root = modules_dir.join(&version);
    let modules = resolve_modules(&modules_root, VIRTIO_MODULES)?;

    let dest = dir.join(&version);
    let _ = std::fs::remove_dir_all(&dest);
    let dest_mod = dest.join("modules");
    std::fs::create_dir_all(&dest_mod).map_err(GuestError::io("creating", &dest_mod))?;
    let vmlinuz = dest.join("vmlinuz");
    let src = root.join("boot").join(format!("vmlinuz-{version}"));
    std::fs::copy(&src, &vmlinuz).map_err(GuestError::io("copying", &src))?;
    let config_src = root.join("boot").join(format!("config-{version}"));
    let _ = std::fs::copy(&config_src, dest.join("config"));
    let mut kept = Vec::new();
    for m in &modules {
        let name = m
            .file_name()
            .ok_or_else(|| GuestError::Kernel(format!("bad module path {}", m.display())))?;
        let to = dest_mod.join(name);
        std::fs::copy(m, &to).map_err(GuestError::io("copying", m))?;
        kept.push(to);
    }
    let assets = KernelAssets {
        version,
        package: format!("{package} {}", pkg_version.trim()),
        vmlinuz,
        modules: kept,
    };
    let manifest = dir.join(MANIFEST);
    let text = serde_json::to_string_pretty(&assets)
        .map_err(|e| GuestError::Kernel(format!("serialising manifest: {e}")))?;
    firkin_artifacts::write_bytes_atomic(&manifest, text.as_bytes())
        .map_err(GuestError::io("writing", &manifest))?;
    progress(&Progress::step(
        "kernel",
        format!("kernel {} ready", assets.version),
    ));
    Ok(assets)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn modules_resolve_through_order_and_builtin() {
        let root = std::env::temp_dir().join(format!("firkin-kmod-{}", std::process::id()));
        let kdir = root.join("kernel/drivers/virtio");
        std::fs::create_dir_all(&kdir).unwrap();
        std::fs::write(kdir.join("virtio.ko"), b"x").unwrap();
        std::fs::write(kdir.join("virtio-rng.ko"), b"x").unwrap();
        std::fs::write(
            root.join("modules.order"),
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio-rng.ko\n",
        )
        .unwrap();
        std::fs::write(root.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let got = resolve_modules(&root, &["virtio", "ext4", "virtio-rng"]).unwrap();
        assert_eq!(
            got,
            vec![kdir.join("virtio.ko"), kdir.join("virtio-rng.ko")]
        );
        let err = resolve_modules(&root, &["virtio_net"]).unwrap_err();
        assert!(err.to_string().contains("virtio_net"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
