//! Restore orchestration: integrity, disk floor, capacity, launch.
//!
//! Every way of getting a running sandbox goes through the same gates, in this order, and a
//! failing gate stops everything after it:
//!
//! 1. **integrity**: the artifact matches its size and SHA-256 (through the verified-digest
//!    cache, so an unchanged artifact costs one `stat`);
//! 2. **host disk floor**: at least 10 GiB (configurable) free in the artifact's directory;
//! 3. **capacity**: the sandbox's budget is reserved in the [`CapacityLedger`];
//! 4. **launch**: the [`SnapshotSessionLauncher`] restores the VM. If it fails, the
//!    reservation is given back before the error is returned.
//!
//! A success records exactly one `warm_snapshot_restore` latency sample.
//!
//! [`CapacityLedger`]: firkin_admission::CapacityLedger

pub use firkin_core as core;
pub use firkin_types as types;

mod backoff;
mod cube;
mod disk;
#[cfg(test)]
mod gate_failures;
mod gates;
mod paths;
pub mod pids;
pub mod process;
pub mod qemu;
mod restore;
mod samples;
mod service;
mod session;
#[cfg(test)]
mod testing;
mod warm_pool;

#[cfg(feature = "snapshot")]
mod continuation;

pub use cube::{
    RuntimeCubeSandboxCreate, RuntimeCubeSandboxCreateConfig, RuntimeCubeSandboxCreateError,
    RuntimeCubeSandboxCreateReport,
};
pub use disk::{
    DiskFloorError, DiskPressureProbe, HostDiskProbe, SharedDiskProbe, check_disk_floor,
};
pub use paths::{FirkinPaths, PathsError};
pub use restore::{
    ActiveSessionReservation, IntegrityFailure, IntegritySource, RuntimeSnapshotRestore,
    SnapshotRestoreError, SnapshotRestoreReport, SnapshotRestoreRequest, SnapshotSessionLauncher,
    verify_integrity, verify_sealed,
};
pub use samples::{BenchmarkSample, SampleUnit};
pub use service::{
    CapacityStatus, PausedSandbox, RuntimeConfig, RuntimeError, RuntimeLauncher,
    SNAPSHOT_DESCRIPTOR, SandboxExit, SandboxRuntime, SandboxSource, StartSandbox, StartedSandbox,
    TemplateSealError, TemplateSnapshot,
};
pub use session::{ContinuationSaved, EnvdInit, SandboxSession, fresh_init, wall_clock_now};
pub use warm_pool::{WarmPoolFailure, WarmPoolStatus};

#[cfg(feature = "snapshot")]
pub use continuation::{PersistedContainerSnapshotState, PersistedStateError};

use firkin_types::Size;

/// Free space required in an artifact's directory before a restore, a continuation capture or a
/// template build starts.
pub const DEFAULT_RESTORE_DISK_FLOOR: Size = Size::gib(10);

/// Free space required before a warm-pool refill. Higher than the restore floor so that refills
/// stop before they can starve active restores of disk.
pub const DEFAULT_WARM_POOL_DISK_FLOOR: Size = Size::gib(20);

/// Metric name of the one latency sample every successful restore records.
pub const WARM_SNAPSHOT_RESTORE_METRIC: &str = "warm_snapshot_restore";
