//! Guest assets: the kernel, the initramfs firkin writes itself, and root filesystem images.
//!
//! Everything is written under directories the caller passes (the runtime resolves
//! `$FIRKIN_CACHE_DIR`, default `~/.firkin/cache`); nothing goes to `TMPDIR`. Long work reports
//! through a [`Progress`] callback so the CLI can draw a bar.

mod error;
pub mod host_tools;
pub mod initramfs;
pub mod kernel;
pub mod oci;
pub mod rootfs;
pub mod rootfs_cache;
mod tool;
pub mod unmount;

pub use error::{GuestError, Result};
pub use initramfs::{InitramfsSpec, write_initramfs};
pub use kernel::{KernelAssets, VIRTIO_MODULES, fetch_kernel};
pub use rootfs::{
    ImageOptions, ROOTFS_RULES_VERSION, RootfsInfo, RootfsSource, UserSpec, base_template,
    build_rootfs, code_interpreter_template, dir_to_ext4,
};
pub use rootfs_cache::RootfsCache;
pub use unmount::remove_tree;

/// A progress report from long work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// What is being done ("mmdebstrap", "oci layer 2/5", "mkfs.ext4", ...).
    pub phase: String,
    /// Units done and the total when known (bytes for downloads and copies, steps otherwise).
    pub done: u64,
    pub total: Option<u64>,
    /// A human-readable line (e.g. the tool's last output line).
    pub message: String,
}

impl Progress {
    pub fn step(phase: impl Into<String>, message: impl Into<String>) -> Self {
        Progress {
            phase: phase.into(),
            done: 0,
            total: None,
            message: message.into(),
        }
    }
}

/// Callback receiving [`Progress`] reports.
pub type ProgressFn<'a> = &'a mut dyn FnMut(&Progress);

/// A callback that ignores every report.
pub fn no_progress() -> impl FnMut(&Progress) {
    |_| {}
}
