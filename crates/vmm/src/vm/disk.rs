//! Files on the host side of a VM: qcow2 overlays (`qemu-img create`/`rebase`), moving and
//! syncing snapshot files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cmdline::{self, DiskLayer, MachineConfig};
use crate::error::{Result, VmmError};

/// Moves `from` to `to`, copying when they are on different filesystems.
pub(super) fn move_file(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(from, to).map_err(VmmError::io("copying", from))?;
            std::fs::remove_file(from).map_err(VmmError::io("removing", from))
        }
        Err(e) => Err(VmmError::io("moving", from)(e)),
    }
}

pub(super) fn fsync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(VmmError::io("syncing", path))
}

pub(super) fn make_read_only(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(VmmError::io("making read-only", path))
}

/// `qemu-img create -f qcow2 -b BACKING -F FMT OVERLAY`. The backing path recorded in the
/// header is informational: QEMU is always given the whole chain explicitly.
pub async fn create_overlay(qemu_img: &Path, backing: &DiskLayer, overlay: &Path) -> Result<()> {
    run_qemu_img(qemu_img, qcow2_on("create", backing, overlay)).await
}

/// `qemu-img rebase -f qcow2 -b BASE -F FMT OVERLAY` (safe mode): copies into `overlay` every
/// cluster the layers between it and `base` hold, then records `base` as its backing file. With
/// `base` in the old chain, only clusters allocated above it are compared (milliseconds for a
/// sandbox's few MiB). A failure part-way leaves `overlay` valid on its old chain: the copied
/// clusters hold what the old chain already read there.
pub async fn flatten_onto(qemu_img: &Path, overlay: &Path, base: &DiskLayer) -> Result<()> {
    run_qemu_img(qemu_img, qcow2_on("rebase", base, overlay)).await
}

/// `qemu-img SUBCOMMAND -q -f qcow2 -F FMT -b BACKING OVERLAY`: the shape `create` and `rebase`
/// share.
fn qcow2_on(subcommand: &str, backing: &DiskLayer, overlay: &Path) -> Vec<std::ffi::OsString> {
    vec![
        subcommand.into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        backing.format.as_str().into(),
        "-b".into(),
        backing.path.clone().into(),
        overlay.into(),
    ]
}

async fn run_qemu_img(qemu_img: &Path, args: Vec<std::ffi::OsString>) -> Result<()> {
    let out = tokio::process::Command::new(qemu_img)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| VmmError::Spawn {
            program: qemu_img.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmmError::Tool {
            tool: "qemu-img",
            args: cmdline::render(qemu_img, &args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The `qemu-img` next to the configured QEMU binary, else the one on `PATH`.
pub(super) fn qemu_img_for(machine: &MachineConfig) -> PathBuf {
    machine
        .qemu
        .parent()
        .map(|d| d.join("qemu-img"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}
