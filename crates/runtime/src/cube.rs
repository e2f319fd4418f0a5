use std::time::Duration;

use firkin_admission::{CapacityLedger, ResourceBudget};
use firkin_artifacts::{DigestCache, SnapshotArtifactIntegrity, SnapshotArtifactManifest};
use firkin_e2b_contract::{RuntimeSandbox, SandboxRuntimeConfig, StartSandboxRequest};
use firkin_types::Size;

use crate::DEFAULT_RESTORE_DISK_FLOOR;
use crate::disk::{DiskPressureProbe, HostDiskProbe};
use crate::restore::{
    ActiveSessionReservation, IntegritySource, RuntimeSnapshotRestore, SnapshotRestoreError,
    SnapshotRestoreReport, SnapshotSessionLauncher,
};
use crate::samples::BenchmarkSample;

/// The facts the API layer decided for a new sandbox before asking the runtime to start it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeCubeSandboxCreateConfig {
    config: SandboxRuntimeConfig,
}

impl RuntimeCubeSandboxCreateConfig {
    pub fn new(
        sandbox_id: impl Into<String>,
        domain: impl Into<String>,
        envd_version: impl Into<String>,
        started_at: impl Into<String>,
        end_at: impl Into<String>,
        cpu_count: u32,
        memory_mb: u64,
    ) -> Self {
        Self {
            config: SandboxRuntimeConfig {
                sandbox_id: sandbox_id.into(),
                domain: domain.into(),
                envd_version: envd_version.into(),
                started_at: started_at.into(),
                end_at: end_at.into(),
                cpu_count,
                memory_mb,
                envd_access_token: None,
                traffic_access_token: None,
            },
        }
    }

    pub fn with_envd_access_token(mut self, token: impl Into<String>) -> Self {
        self.config.envd_access_token = Some(token.into());
        self
    }

    pub fn config(&self) -> &SandboxRuntimeConfig {
        &self.config
    }

    pub fn into_config(self) -> SandboxRuntimeConfig {
        self.config
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeCubeSandboxCreateError<E> {
    #[error("template {template_id:?} has no prepared snapshot; build it first")]
    MissingPreparedTemplate { template_id: String },
    #[error(transparent)]
    Restore(SnapshotRestoreError<E>),
}

/// A create's outcome: the sandbox as E2B describes it, over the restore that started it.
#[derive(Debug)]
pub struct RuntimeCubeSandboxCreateReport<S> {
    runtime_sandbox: RuntimeSandbox,
    restore: SnapshotRestoreReport<S>,
}

impl<S> RuntimeCubeSandboxCreateReport<S> {
    pub fn runtime_sandbox(&self) -> &RuntimeSandbox {
        &self.runtime_sandbox
    }

    pub fn session(&self) -> &S {
        self.restore.session()
    }

    pub fn reservation(&self) -> &ActiveSessionReservation {
        self.restore.reservation()
    }

    pub fn benchmark_samples(&self) -> &[BenchmarkSample] {
        self.restore.benchmark_samples()
    }

    pub fn into_parts(
        self,
    ) -> (
        RuntimeSandbox,
        S,
        ActiveSessionReservation,
        Vec<BenchmarkSample>,
    ) {
        let (session, reservation, samples, _) = self.restore.into_parts();
        (self.runtime_sandbox, session, reservation, samples)
    }
}

/// E2B/Cube create: a prepared template's snapshot is the primary (and only) create path.
///
/// The template's base manifest is restored through [`RuntimeSnapshotRestore`] with integrity
/// taken from the template record, or else from the artifact's integrity sidecar.
#[derive(Debug)]
pub struct RuntimeCubeSandboxCreate<'a> {
    ledger: &'a mut CapacityLedger,
    request: &'a StartSandboxRequest,
    budget: ResourceBudget,
    config: RuntimeCubeSandboxCreateConfig,
    disk_floor: Size,
    cache: &'a DigestCache,
    sealed: bool,
}

impl<'a> RuntimeCubeSandboxCreate<'a> {
    pub fn new(
        ledger: &'a mut CapacityLedger,
        request: &'a StartSandboxRequest,
        budget: ResourceBudget,
        config: RuntimeCubeSandboxCreateConfig,
    ) -> Self {
        Self {
            ledger,
            request,
            budget,
            config,
            disk_floor: DEFAULT_RESTORE_DISK_FLOOR,
            cache: DigestCache::global(),
            sealed: false,
        }
    }

    crate::restore::restore_options!();

    pub async fn execute<L>(
        self,
        launcher: &mut L,
    ) -> Result<RuntimeCubeSandboxCreateReport<L::Session>, RuntimeCubeSandboxCreateError<L::Error>>
    where
        L: SnapshotSessionLauncher,
    {
        self.run(launcher, &mut HostDiskProbe, None).await
    }

    pub async fn execute_with_elapsed<L>(
        self,
        launcher: &mut L,
        elapsed: Duration,
    ) -> Result<RuntimeCubeSandboxCreateReport<L::Session>, RuntimeCubeSandboxCreateError<L::Error>>
    where
        L: SnapshotSessionLauncher,
    {
        self.run(launcher, &mut HostDiskProbe, Some(elapsed)).await
    }

    pub async fn execute_with_disk_probe_elapsed<L, P>(
        self,
        launcher: &mut L,
        elapsed: Duration,
        probe: &mut P,
    ) -> Result<RuntimeCubeSandboxCreateReport<L::Session>, RuntimeCubeSandboxCreateError<L::Error>>
    where
        L: SnapshotSessionLauncher,
        P: DiskPressureProbe + ?Sized,
    {
        self.run(launcher, probe, Some(elapsed)).await
    }

    async fn run<L, P>(
        self,
        launcher: &mut L,
        probe: &mut P,
        elapsed: Option<Duration>,
    ) -> Result<RuntimeCubeSandboxCreateReport<L::Session>, RuntimeCubeSandboxCreateError<L::Error>>
    where
        L: SnapshotSessionLauncher,
        P: DiskPressureProbe + ?Sized,
    {
        let Some(template) = self.request.prepared_template.as_ref() else {
            return Err(RuntimeCubeSandboxCreateError::MissingPreparedTemplate {
                template_id: self.request.create_request.template_id.clone(),
            });
        };
        let manifest = SnapshotArtifactManifest::base(&template.template_id, &template.artifact);
        let record = template
            .artifact_integrity
            .as_ref()
            .map(|i| SnapshotArtifactIntegrity::new(i.size_bytes, i.sha256_hex.clone()));
        let integrity = match record.as_ref() {
            Some(r) => IntegritySource::Record(r),
            None => IntegritySource::ArtifactSidecar,
        };
        let mut restore = RuntimeSnapshotRestore::new(self.ledger, &manifest, self.budget)
            .with_disk_floor(self.disk_floor)
            .with_digest_cache(self.cache);
        if self.sealed {
            restore = restore.sealed_snapshot();
        }
        let report = restore
            .run(launcher, integrity, probe, elapsed)
            .await
            .map_err(RuntimeCubeSandboxCreateError::Restore)?;
        Ok(RuntimeCubeSandboxCreateReport {
            runtime_sandbox: RuntimeSandbox::with_default_ports(self.config.into_config()),
            restore: report,
        })
    }
}
