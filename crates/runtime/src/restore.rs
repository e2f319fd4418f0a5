use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use firkin_admission::{CapacityError, CapacityLedger, ResourceBudget};
use firkin_artifacts::{
    DigestCache, IntegrityError, SealError, SealedSnapshot, SidecarError,
    SnapshotArtifactIntegrity, SnapshotArtifactManifest,
};

use crate::disk::{DiskPressureProbe, HostDiskProbe};
use crate::gates::{Admission, GateError, Gates};
use crate::samples::BenchmarkSample;
use crate::{DEFAULT_RESTORE_DISK_FLOOR, WARM_SNAPSHOT_RESTORE_METRIC};

/// What a launcher is asked to restore.
#[derive(Debug)]
pub struct SnapshotRestoreRequest<'a> {
    manifest: &'a SnapshotArtifactManifest,
    budget: ResourceBudget,
    sealed: Option<&'a SealedSnapshot>,
}

impl<'a> SnapshotRestoreRequest<'a> {
    pub fn new(manifest: &'a SnapshotArtifactManifest, budget: ResourceBudget) -> Self {
        Self {
            manifest,
            budget,
            sealed: None,
        }
    }

    /// Attaches the already-verified descriptor of a multi-file snapshot.
    pub fn with_sealed(mut self, sealed: &'a SealedSnapshot) -> Self {
        self.sealed = Some(sealed);
        self
    }

    pub fn manifest(&self) -> &SnapshotArtifactManifest {
        self.manifest
    }

    pub fn budget(&self) -> ResourceBudget {
        self.budget
    }

    /// The verified descriptor, when the restore was run in sealed mode
    /// ([`RuntimeSnapshotRestore::sealed_snapshot`]). Its components passed their digests just
    /// before the launcher was called.
    pub fn sealed(&self) -> Option<&SealedSnapshot> {
        self.sealed
    }
}

/// Turns a snapshot artifact into a running session. Implemented by the QEMU backend, and by
/// recording doubles in orchestration tests.
#[async_trait]
pub trait SnapshotSessionLauncher: Send {
    type Error;
    type Session;

    async fn restore_from_snapshot(
        &mut self,
        request: &SnapshotRestoreRequest<'_>,
    ) -> Result<Self::Session, Self::Error>;
}

/// An active reservation held on behalf of one session. Releasing it gives its budget back to a
/// ledger exactly once; later calls do nothing.
#[derive(Debug)]
pub struct ActiveSessionReservation {
    budget: ResourceBudget,
    released: bool,
}

impl ActiveSessionReservation {
    pub fn new(budget: ResourceBudget) -> Self {
        Self {
            budget,
            released: false,
        }
    }

    pub fn budget(&self) -> ResourceBudget {
        self.budget
    }

    pub fn is_released(&self) -> bool {
        self.released
    }

    /// Returns the budget to `ledger` the first time; `None` afterwards.
    pub fn release_into(&mut self, ledger: &mut CapacityLedger) -> Option<ResourceBudget> {
        if self.released {
            return None;
        }
        self.released = true;
        match ledger.release_active(self.budget) {
            Ok(()) => Some(self.budget),
            Err(err) => {
                // The ledger refused: somebody else already gave this capacity back. Keeping the
                // ledger consistent matters more than this reservation's view of itself.
                tracing::error!(%err, "active reservation release refused by ledger");
                None
            }
        }
    }

    /// Marks the reservation as released without touching a ledger, for a caller that moved the
    /// capacity elsewhere itself (for example back into a warm pool).
    pub fn forget(&mut self) {
        self.released = true;
    }
}

/// Where the expected size and digest of the artifact come from.
#[derive(Clone, Copy, Debug)]
pub enum IntegritySource<'a> {
    /// Trust the artifact as is (used by callers that verified it themselves).
    Unchecked,
    /// A record the caller holds (for example from the template database).
    Record(&'a SnapshotArtifactIntegrity),
    /// An integrity sidecar at this path.
    Sidecar(&'a Path),
    /// The artifact's own sidecar (`<artifact>.integrity.json`).
    ArtifactSidecar,
}

/// Why an artifact failed its integrity gate.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityFailure {
    #[error(transparent)]
    Artifact(#[from] IntegrityError),
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    #[error(transparent)]
    Sealed(#[from] SealError),
    /// The check itself did not complete (its blocking task panicked or was cancelled).
    #[error("the integrity check did not finish: {0}")]
    Aborted(String),
}

/// A restore stopped at one of its gates.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotRestoreError<E> {
    #[error("snapshot integrity check failed for {artifact}: {source}")]
    Integrity {
        artifact: PathBuf,
        source: IntegrityFailure,
    },
    #[error("{0}")]
    Capacity(CapacityError),
    #[error("snapshot restore failed: {error}")]
    Launch { error: E },
}

impl<E> SnapshotRestoreError<E> {
    /// Maps the launcher's error type, keeping every other variant.
    pub fn map_launch<F>(self, f: impl FnOnce(E) -> F) -> SnapshotRestoreError<F> {
        match self {
            SnapshotRestoreError::Integrity { artifact, source } => {
                SnapshotRestoreError::Integrity { artifact, source }
            }
            SnapshotRestoreError::Capacity(c) => SnapshotRestoreError::Capacity(c),
            SnapshotRestoreError::Launch { error } => {
                SnapshotRestoreError::Launch { error: f(error) }
            }
        }
    }
}

/// The outcome of a successful restore.
#[derive(Debug)]
pub struct SnapshotRestoreReport<S> {
    session: S,
    reservation: ActiveSessionReservation,
    samples: Vec<BenchmarkSample>,
    sealed: Option<SealedSnapshot>,
}

impl<S> SnapshotRestoreReport<S> {
    pub fn session(&self) -> &S {
        &self.session
    }

    pub fn reservation(&self) -> &ActiveSessionReservation {
        &self.reservation
    }

    pub fn benchmark_samples(&self) -> &[BenchmarkSample] {
        &self.samples
    }

    pub fn sealed(&self) -> Option<&SealedSnapshot> {
        self.sealed.as_ref()
    }

    pub fn into_parts(
        self,
    ) -> (
        S,
        ActiveSessionReservation,
        Vec<BenchmarkSample>,
        Option<SealedSnapshot>,
    ) {
        (self.session, self.reservation, self.samples, self.sealed)
    }
}

/// The integrity gate on its own, for orchestrators that hold their ledger behind a lock and
/// must not keep it across a launch.
///
/// With `sealed`, the artifact is a [`SealedSnapshot`] descriptor: the descriptor is checked
/// against the record and then every component against the descriptor, and the verified
/// descriptor is returned. A sealed check with [`IntegritySource::Unchecked`] reads the
/// artifact's sidecar: components are never trusted unchecked.
pub fn verify_integrity(
    manifest: &SnapshotArtifactManifest,
    source: IntegritySource<'_>,
    cache: &DigestCache,
    sealed: bool,
) -> Result<Option<SealedSnapshot>, IntegrityFailure> {
    let artifact = manifest.path();
    let owned;
    let record = match source {
        IntegritySource::Unchecked if !sealed => return Ok(None),
        IntegritySource::Record(r) => r,
        IntegritySource::Sidecar(p) => {
            owned = SnapshotArtifactIntegrity::read_json(p)?;
            &owned
        }
        IntegritySource::Unchecked | IntegritySource::ArtifactSidecar => {
            owned = SnapshotArtifactIntegrity::read_json(
                SnapshotArtifactIntegrity::sidecar_path_for_artifact(artifact),
            )?;
            &owned
        }
    };
    if sealed {
        Ok(Some(SealedSnapshot::verify(artifact, record, cache)?))
    } else {
        record.verify_with(cache, artifact)?;
        Ok(None)
    }
}

/// [`verify_integrity`] in sealed mode: the descriptor and every component it lists.
pub fn verify_sealed(
    manifest: &SnapshotArtifactManifest,
    source: IntegritySource<'_>,
    cache: &DigestCache,
) -> Result<SealedSnapshot, IntegrityFailure> {
    verify_integrity(manifest, source, cache, true)?.ok_or(IntegrityFailure::Aborted(
        "a sealed check returned no descriptor".into(),
    ))
}

/// The options both seed-contract builders ([`RuntimeSnapshotRestore`] and
/// [`crate::RuntimeCubeSandboxCreate`]) take, as inherent methods of each (the seed calls them
/// so); expanded inside an `impl<'a>` of a type with `disk_floor`, `cache` and `sealed` fields.
macro_rules! restore_options {
    () => {
        /// Free space required in the artifact's directory (default 10 GiB).
        pub fn with_disk_floor(mut self, floor: firkin_types::Size) -> Self {
            self.disk_floor = floor;
            self
        }

        /// The verified-digest cache to use (default: the process-wide one).
        pub fn with_digest_cache(mut self, cache: &'a DigestCache) -> Self {
            self.cache = cache;
            self
        }

        /// The artifact is a [`firkin_artifacts::SealedSnapshot`] descriptor: verify every
        /// component too, and hand the verified descriptor to the launcher.
        pub fn sealed_snapshot(mut self) -> Self {
            self.sealed = true;
            self
        }
    };
}
pub(crate) use restore_options;

/// Restores one session from a snapshot artifact through the four gates (see the crate docs):
/// the seed contract's face over the same [`crate::gates`] code [`crate::SandboxRuntime`] runs,
/// with capacity taken from a ledger the caller holds mutably for the whole restore.
#[derive(Debug)]
pub struct RuntimeSnapshotRestore<'a> {
    ledger: &'a mut CapacityLedger,
    manifest: &'a SnapshotArtifactManifest,
    budget: ResourceBudget,
    disk_floor: firkin_types::Size,
    cache: &'a DigestCache,
    sealed: bool,
}

/// The capacity gate over a ledger the caller holds.
struct LedgerAdmission<'l>(&'l mut CapacityLedger);

#[async_trait]
impl Admission for LedgerAdmission<'_> {
    type Held = ActiveSessionReservation;
    type Error = CapacityError;

    async fn admit(&mut self, budget: ResourceBudget) -> Result<Self::Held, Self::Error> {
        self.0.reserve_active(budget).inspect_err(|err| {
            tracing::info!(%err, %budget, "restore refused: capacity");
        })?;
        Ok(ActiveSessionReservation::new(budget))
    }

    fn release(&mut self, mut held: Self::Held) {
        held.release_into(self.0);
    }
}

impl<'a> RuntimeSnapshotRestore<'a> {
    pub fn new(
        ledger: &'a mut CapacityLedger,
        manifest: &'a SnapshotArtifactManifest,
        budget: ResourceBudget,
    ) -> Self {
        Self {
            ledger,
            manifest,
            budget,
            disk_floor: DEFAULT_RESTORE_DISK_FLOOR,
            cache: DigestCache::global(),
            sealed: false,
        }
    }

    restore_options!();

    /// No integrity record, the host's disk; records `elapsed` as the latency.
    pub async fn execute_with_elapsed<L>(
        self,
        launcher: &mut L,
        elapsed: Duration,
    ) -> Result<SnapshotRestoreReport<L::Session>, SnapshotRestoreError<L::Error>>
    where
        L: SnapshotSessionLauncher,
    {
        self.run(
            launcher,
            IntegritySource::Unchecked,
            &mut HostDiskProbe,
            Some(elapsed),
        )
        .await
    }

    pub async fn execute_with_disk_probe_elapsed<L, P>(
        self,
        launcher: &mut L,
        elapsed: Duration,
        probe: &mut P,
    ) -> Result<SnapshotRestoreReport<L::Session>, SnapshotRestoreError<L::Error>>
    where
        L: SnapshotSessionLauncher,
        P: DiskPressureProbe + ?Sized,
    {
        self.run(launcher, IntegritySource::Unchecked, probe, Some(elapsed))
            .await
    }

    pub async fn execute_with_integrity_disk_probe_elapsed<L, P>(
        self,
        launcher: &mut L,
        elapsed: Duration,
        integrity: &SnapshotArtifactIntegrity,
        probe: &mut P,
    ) -> Result<SnapshotRestoreReport<L::Session>, SnapshotRestoreError<L::Error>>
    where
        L: SnapshotSessionLauncher,
        P: DiskPressureProbe + ?Sized,
    {
        self.run(
            launcher,
            IntegritySource::Record(integrity),
            probe,
            Some(elapsed),
        )
        .await
    }

    pub async fn execute_with_integrity_sidecar_disk_probe_elapsed<L, P>(
        self,
        launcher: &mut L,
        elapsed: Duration,
        sidecar: &Path,
        probe: &mut P,
    ) -> Result<SnapshotRestoreReport<L::Session>, SnapshotRestoreError<L::Error>>
    where
        L: SnapshotSessionLauncher,
        P: DiskPressureProbe + ?Sized,
    {
        self.run(
            launcher,
            IntegritySource::Sidecar(sidecar),
            probe,
            Some(elapsed),
        )
        .await
    }

    /// The general form. `elapsed`: the latency to record; `None` measures the whole restore
    /// with a monotonic clock.
    pub async fn run<L, P>(
        self,
        launcher: &mut L,
        integrity: IntegritySource<'_>,
        probe: &mut P,
        elapsed: Option<Duration>,
    ) -> Result<SnapshotRestoreReport<L::Session>, SnapshotRestoreError<L::Error>>
    where
        L: SnapshotSessionLauncher,
        P: DiskPressureProbe + ?Sized,
    {
        let (manifest, cache, sealed) = (self.manifest, self.cache, self.sealed);
        let gates = Gates {
            manifest,
            budget: self.budget,
            disk_floor: self.disk_floor,
            disk_probe: probe,
        };
        let check = async { verify_integrity(manifest, integrity, cache, sealed) };
        let passed = gates
            .pass(check, &mut LedgerAdmission(self.ledger), launcher)
            .await
            .map_err(|e| match e {
                GateError::Integrity { artifact, source } => {
                    SnapshotRestoreError::Integrity { artifact, source }
                }
                GateError::Disk { floor, error } => {
                    SnapshotRestoreError::Capacity(error.as_capacity_error(floor))
                }
                GateError::Capacity(err) => SnapshotRestoreError::Capacity(err),
                GateError::Launch(error) => SnapshotRestoreError::Launch { error },
            })?;
        let elapsed = elapsed.unwrap_or(passed.elapsed);
        tracing::debug!(
            logical_id = manifest.logical_id(),
            ms = elapsed.as_secs_f64() * 1e3,
            "restored"
        );
        Ok(SnapshotRestoreReport {
            session: passed.session,
            reservation: passed.held,
            samples: vec![BenchmarkSample::latency(
                WARM_SNAPSHOT_RESTORE_METRIC,
                elapsed,
            )],
            sealed: passed.sealed,
        })
    }
}

impl fmt::Display for IntegritySource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntegritySource::Unchecked => f.write_str("unchecked"),
            IntegritySource::Record(_) => f.write_str("record"),
            IntegritySource::Sidecar(p) => write!(f, "sidecar {}", p.display()),
            IntegritySource::ArtifactSidecar => f.write_str("artifact sidecar"),
        }
    }
}
