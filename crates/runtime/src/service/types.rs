//! The runtime's public vocabulary: its configuration, what it starts sandboxes from, what it
//! reports back, and its error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use firkin_admission::{CapacityError, QueuePolicy, ResourceBudget};
use firkin_artifacts::{
    DigestCache, IntegrityError, SealError, SealedSnapshot, SnapshotArtifactIntegrity,
    SnapshotArtifactKind,
};
use firkin_types::{SandboxId, Size, TemplateId};

use crate::disk::SharedDiskProbe;
use crate::restore::IntegrityFailure;
use crate::samples::BenchmarkSample;
use crate::session::EnvdInit;
use crate::{DEFAULT_RESTORE_DISK_FLOOR, DEFAULT_WARM_POOL_DISK_FLOOR};

/// A launcher's or session's own error, kept with its type behind the runtime's boundary.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Descriptor file name of every sealed snapshot firkin writes. (The VMM's own restore
/// description, `snapshot.json`, is one of the components it seals.)
pub const SNAPSHOT_DESCRIPTOR: &str = "seal.json";

/// Tunables of a [`SandboxRuntime`](super::SandboxRuntime).
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// What all sandboxes together may hold.
    pub capacity: ResourceBudget,
    /// How many creates may wait for capacity at once.
    pub queue: QueuePolicy,
    /// How long a create waits in the queue before it is refused.
    pub queue_wait: Duration,
    pub restore_disk_floor: Size,
    pub warm_pool_disk_floor: Size,
    /// Measures free disk for the disk-floor gate (the host's `statvfs` unless injected).
    pub disk_probe: SharedDiskProbe,
}

impl RuntimeConfig {
    pub fn new(capacity: ResourceBudget) -> Self {
        Self {
            capacity,
            queue: QueuePolicy::default(),
            queue_wait: Duration::from_secs(30),
            restore_disk_floor: DEFAULT_RESTORE_DISK_FLOOR,
            warm_pool_disk_floor: DEFAULT_WARM_POOL_DISK_FLOOR,
            disk_probe: SharedDiskProbe::default(),
        }
    }
}

/// A built template's snapshot, as the server's template registry knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateSnapshot {
    pub template_id: TemplateId,
    pub build_id: String,
    /// The sealed descriptor (`…/snapshot.json`).
    pub descriptor: PathBuf,
    /// Expected size and digest of the descriptor.
    pub integrity: SnapshotArtifactIntegrity,
    /// What one sandbox of this template holds: vCPUs, guest RAM, disk quota.
    pub budget: ResourceBudget,
}

/// Sealing a finished template build failed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateSealError {
    #[error("sealing the template snapshot: {0}")]
    Seal(#[from] SealError),
    #[error("hashing the sealed descriptor: {0}")]
    Descriptor(#[from] IntegrityError),
    #[error("the sealing task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl TemplateSnapshot {
    pub(super) fn pool_key(&self) -> PathBuf {
        self.descriptor.clone()
    }

    /// Seals `components` (`(role, file in dir)`) of a finished build in `dir` as a base
    /// template and records the descriptor's digest, which is what every restore checks first.
    pub fn seal_blocking(
        dir: &Path,
        template_id: &TemplateId,
        build_id: &str,
        budget: ResourceBudget,
        components: &[(&str, &str)],
        machine: serde_json::Value,
        cache: &DigestCache,
    ) -> Result<Self, TemplateSealError> {
        let (_, manifest) = SealedSnapshot::seal(
            dir,
            SNAPSHOT_DESCRIPTOR,
            SnapshotArtifactKind::BaseTemplate,
            template_id.as_str(),
            components,
            machine,
            cache,
        )?;
        let descriptor = manifest.path().to_path_buf();
        Ok(Self {
            template_id: template_id.clone(),
            build_id: build_id.to_owned(),
            integrity: SnapshotArtifactIntegrity::from_path(&descriptor)?,
            descriptor,
            budget,
        })
    }

    /// [`Self::seal_blocking`] off the async threads: sealing hashes every component.
    pub async fn seal(
        dir: PathBuf,
        template_id: TemplateId,
        build_id: String,
        budget: ResourceBudget,
        components: &'static [(&'static str, &'static str)],
        machine: serde_json::Value,
        cache: Arc<DigestCache>,
    ) -> Result<Self, TemplateSealError> {
        tokio::task::spawn_blocking(move || {
            Self::seal_blocking(
                &dir,
                &template_id,
                &build_id,
                budget,
                components,
                machine,
                &cache,
            )
        })
        .await?
    }
}

/// A paused sandbox: a sealed continuation snapshot on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PausedSandbox {
    pub sandbox_id: SandboxId,
    pub descriptor: PathBuf,
    pub integrity: SnapshotArtifactIntegrity,
    pub budget: ResourceBudget,
    /// Set by a pause: see [`crate::session::ContinuationSaved::depends_on`]. Not needed to resume.
    pub depends_on: Vec<PathBuf>,
}

/// Where a sandbox comes from.
#[derive(Clone, Debug)]
pub enum SandboxSource {
    Template(TemplateSnapshot),
    Continuation(PausedSandbox),
}

/// A create or resume request.
#[derive(Clone, Debug)]
pub struct StartSandbox {
    pub sandbox_id: SandboxId,
    pub source: SandboxSource,
    pub init: EnvdInit,
    /// The sandbox's egress policy, applied before its agent is configured (so before any of
    /// the user's code runs). `None`: the backend's default (all but the always-denied ranges).
    /// A backend that cannot enforce a policy fails such a start.
    pub network: Option<crate::session::EgressPolicy>,
}

/// A sandbox that is running and configured.
#[derive(Clone, Debug)]
pub struct StartedSandbox {
    pub sandbox_id: SandboxId,
    pub envd_addr: SocketAddr,
    pub pid: Option<u32>,
    pub budget: ResourceBudget,
    pub from_warm_pool: bool,
    pub samples: Vec<BenchmarkSample>,
}

/// Why a sandbox left the runtime without being killed or paused through it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxExit {
    pub sandbox_id: SandboxId,
    pub reason: String,
}

/// Capacity figures for status pages and `firkin doctor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapacityStatus {
    pub capacity: ResourceBudget,
    pub active: ResourceBudget,
    pub warm: ResourceBudget,
    pub queued: usize,
    pub running: usize,
    pub warm_sandboxes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("sandbox {0} is not running")]
    NotFound(SandboxId),
    #[error("sandbox {0} is already running")]
    AlreadyRunning(SandboxId),
    #[error("snapshot {artifact} failed its integrity check: {source}")]
    Integrity {
        artifact: PathBuf,
        source: IntegrityFailure,
    },
    #[error("not enough free disk for a sandbox: {0}")]
    Disk(CapacityError),
    #[error("a sandbox needs more than this host has in total: {0}")]
    Oversized(CapacityError),
    #[error("host is at capacity and {max_pending} creates are already waiting; retry later")]
    QueueFull { max_pending: usize },
    #[error("host stayed at capacity for {waited:?}; retry later")]
    QueueTimeout { waited: Duration },
    #[error("sandbox VM failed to start: {0}")]
    Launch(#[source] BoxError),
    #[error("sandbox agent did not accept its configuration: {0}")]
    Init(String),
    #[error("saving sandbox {sandbox_id} failed: {reason}")]
    Pause {
        sandbox_id: SandboxId,
        reason: String,
    },
    #[error("sealing snapshot failed: {0}")]
    Seal(#[from] SealError),
    #[error("stopping sandbox {sandbox_id} failed: {reason}")]
    Stop {
        sandbox_id: SandboxId,
        reason: String,
    },
    #[error("setting the egress policy of sandbox {sandbox_id}: {reason}")]
    Network {
        sandbox_id: SandboxId,
        reason: String,
    },
    #[error("opening port {port} of sandbox {sandbox_id}: {reason}")]
    Port {
        sandbox_id: SandboxId,
        port: u16,
        reason: String,
    },
    #[error("runtime i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RuntimeError {
    /// Whether the caller may retry the same request later and expect it to succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RuntimeError::QueueFull { .. }
                | RuntimeError::QueueTimeout { .. }
                | RuntimeError::Disk(_)
        )
    }
}
