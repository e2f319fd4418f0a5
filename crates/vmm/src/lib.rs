//! QEMU microvm driver: command lines, QMP, accelerator detection and process lifetime.
//!
//! The entry points the runtime uses are [`Vm::cold_boot`], [`Vm::snapshot_template`],
//! [`Vm::restore`], [`Vm::save_continuation`] and [`Vm::stop`]; [`accel::detect`] says which
//! accelerator this host gets and why. Every QEMU is spawned so that it dies with this process,
//! even on SIGKILL, and is reaped when it exits (see [`process`]).

pub mod accel;
pub mod cmdline;
mod error;
mod health;
pub mod process;
pub mod qmp;
mod sys;
pub mod tsc;
mod vm;

pub use accel::{Accel, AccelDecision};
pub use cmdline::{
    CODE_PORT, DiskFormat, DiskLayer, ENVD_PORT, GUEST_SECRET_FW_CFG, GUEST_SECRET_LEN, Launch,
    MachineConfig,
};
pub use error::{Result, VmmError};
pub use health::probe as health_probe;
pub use process::ExitInfo;
pub use vm::{
    BootRequest, CONSOLE_LOG, CONTINUATION_DISK_FILE, MemoryUsage, OVERLAY_FILE, QEMU_LOG,
    RAM_FILE, RestoreRequest, RestoreTimings, SNAPSHOT_JSON, STATE_FILE, Snapshot, SnapshotKind,
    TEMPLATE_DISK_FILE, Vm, create_overlay, log_tail, memory_of, parse_smaps_rollup,
};
