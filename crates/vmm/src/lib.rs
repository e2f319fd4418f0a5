//! QEMU microvm driver: command lines, QMP, accelerator detection and process lifetime.
//!
//! The entry points the runtime uses are [`Vm::cold_boot`], [`Vm::snapshot_template`],
//! [`Vm::restore`], [`Vm::save_continuation`] and [`Vm::stop`]; [`accel::detect`] says which
//! accelerator this host gets and why. Every QEMU is spawned so that it dies with this process,
//! even on SIGKILL, and is reaped when it exits (see [`process`]).
//!
//! The VMM knows nothing of the guest's agent: its caller names the guest ports to forward and
//! how to tell that the guest is ready ([`ReadyCheck`]).

pub mod accel;
pub mod cmdline;
mod error;
pub mod process;
pub mod qmp;
mod sys;
pub mod tsc;
mod vm;

pub use accel::{Accel, AccelDecision};
pub use cmdline::{
    DiskFormat, DiskLayer, GUEST_SECRET_FW_CFG, GUEST_SECRET_LEN, Launch, MachineConfig, NetAttach,
    NetKind,
};
pub use error::{Result, VmmError};
pub use process::ExitInfo;
pub use vm::{
    BootRequest, CONSOLE_LOG, CONTINUATION_DISK_FILE, MemoryUsage, OVERLAY_FILE, ProbeFuture,
    QEMU_LOG, RAM_FILE, ReadyCheck, RestoreRequest, RestoreTimings, SNAPSHOT_JSON, STATE_FILE,
    Snapshot, SnapshotKind, TEMPLATE_DISK_FILE, Vm, create_overlay, log_tail, memory_of,
    parse_smaps_rollup,
};
