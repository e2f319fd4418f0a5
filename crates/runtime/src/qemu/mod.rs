//! The QEMU backend: the launcher that restores sealed snapshots into `microvm`s, the session
//! the runtime drives, and template builds (rootfs → cold boot → prepare → snapshot → seal).
//!
//! Everything QEMU-specific below the runtime's traits lives in `firkin-vmm` (processes, QMP,
//! command lines) and `firkin-guest` (kernel, initramfs, root filesystems); this module only
//! composes them with sealing and envd: which guest ports a VM forwards, waiting for envd's
//! `/health` (`ready`), and envd's `/init`.

mod assets;
mod launcher;
mod net;
mod ready;
mod template;

pub use assets::{
    GuestAssets, GuestAssetsError, INTERPRETER_UPLOAD_DIR, InterpreterBundle,
    MissingInterpreterBundle,
};
pub use firkin_guest::{
    ROOTFS_RULES_VERSION, RootfsSource, UserSpec, base_template, code_interpreter_template,
    remove_tree,
};
pub use firkin_vmm::{Accel, AccelDecision, accel::detect as detect_accel};
pub use launcher::{QemuError, QemuLauncher, QemuSession};
pub use ready::{GUEST_PORTS, envd_addr, envd_health, envd_ready};
pub use template::{BuildEvent, TemplateBuild, TemplateBuildError, build_template};

/// Component names in a sealed QEMU snapshot.
pub mod component {
    /// The VMM's own restore description (`snapshot.json`).
    pub const VM: &str = "vm";
    pub const RAM: &str = "ram";
    pub const STATE: &str = "state";
    pub const DISK: &str = "disk";
}
