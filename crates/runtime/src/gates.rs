//! The one implementation of the restore gates: integrity, then the disk floor, then capacity,
//! then the launch. A failing gate stops everything after it, and nothing is reserved before the
//! integrity and disk gates pass.
//!
//! Three faces run it: [`crate::SandboxRuntime`]'s creates and resumes (capacity from its FIFO
//! queue), its warm-pool refill (capacity as a warm reservation) and the seed contract's
//! [`crate::RuntimeSnapshotRestore`] (capacity from a ledger the caller holds). They differ only
//! in where the capacity comes from ([`Admission`]) and in how the integrity check is run (a
//! blocking hash on a cache miss goes to tokio's blocking pool in the server).

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use firkin_admission::ResourceBudget;
use firkin_artifacts::{SealedSnapshot, SnapshotArtifactManifest};
use firkin_types::Size;

use crate::disk::{DiskFloorError, DiskPressureProbe, check_disk_floor};
use crate::restore::{IntegrityFailure, SnapshotRestoreRequest, SnapshotSessionLauncher};

/// The capacity gate: where a restore's reservation comes from, and where it goes back when the
/// launch fails.
#[async_trait]
pub(crate) trait Admission: Send {
    /// What holds the reservation once admitted.
    type Held: Send;
    /// Why nothing was reserved.
    type Error: Send;

    async fn admit(&mut self, budget: ResourceBudget) -> Result<Self::Held, Self::Error>;

    /// Gives back what [`Admission::admit`] took: the launch that needed it failed.
    fn release(&mut self, held: Self::Held);
}

/// The gate a restore stopped at.
#[derive(Debug)]
pub(crate) enum GateError<C, L> {
    Integrity {
        artifact: PathBuf,
        source: IntegrityFailure,
    },
    Disk {
        floor: Size,
        error: DiskFloorError,
    },
    Capacity(C),
    Launch(L),
}

impl<C, L> GateError<C, L> {
    /// The capacity refusal as `Err`; every other gate's error, retyped, as `Ok`.
    pub fn split_capacity<C2>(self) -> Result<GateError<C2, L>, C> {
        match self {
            GateError::Integrity { artifact, source } => {
                Ok(GateError::Integrity { artifact, source })
            }
            GateError::Disk { floor, error } => Ok(GateError::Disk { floor, error }),
            GateError::Capacity(c) => Err(c),
            GateError::Launch(l) => Ok(GateError::Launch(l)),
        }
    }
}

/// A restore through every gate.
#[derive(Debug)]
pub(crate) struct Passed<S, H> {
    pub session: S,
    pub held: H,
    pub sealed: Option<SealedSnapshot>,
    /// From the first gate until the launcher returned.
    pub elapsed: Duration,
    /// The launcher's share of `elapsed`.
    pub launch: Duration,
}

/// One restore's gates.
pub(crate) struct Gates<'r, P: ?Sized> {
    pub manifest: &'r SnapshotArtifactManifest,
    pub budget: ResourceBudget,
    pub disk_floor: Size,
    pub disk_probe: &'r mut P,
}

impl<P: DiskPressureProbe + ?Sized> Gates<'_, P> {
    /// Runs the gates in order. `integrity` is the integrity check, awaited first (it yields the
    /// verified descriptor of a sealed snapshot, handed to the launcher).
    pub async fn pass<A, L, V>(
        self,
        integrity: V,
        admission: &mut A,
        launcher: &mut L,
    ) -> Result<Passed<L::Session, A::Held>, GateError<A::Error, L::Error>>
    where
        A: Admission,
        L: SnapshotSessionLauncher,
        V: Future<Output = Result<Option<SealedSnapshot>, IntegrityFailure>>,
    {
        let started = Instant::now();
        let artifact = self.manifest.path();
        let sealed = integrity.await.map_err(|source| {
            tracing::warn!(artifact = %artifact.display(), %source, "restore refused: integrity");
            GateError::Integrity {
                artifact: artifact.to_path_buf(),
                source,
            }
        })?;

        check_disk_floor(self.disk_probe, self.manifest.parent_dir(), self.disk_floor).map_err(
            |error| {
                tracing::warn!(%error, "restore refused: disk floor");
                GateError::Disk {
                    floor: self.disk_floor,
                    error,
                }
            },
        )?;

        let held = admission
            .admit(self.budget)
            .await
            .map_err(GateError::Capacity)?;

        let launch_started = Instant::now();
        let launched = {
            let mut request = SnapshotRestoreRequest::new(self.manifest, self.budget);
            if let Some(s) = sealed.as_ref() {
                request = request.with_sealed(s);
            }
            launcher.restore_from_snapshot(&request).await
        };
        match launched {
            Ok(session) => Ok(Passed {
                session,
                held,
                sealed,
                elapsed: started.elapsed(),
                launch: launch_started.elapsed(),
            }),
            Err(error) => {
                admission.release(held);
                tracing::warn!(
                    logical_id = self.manifest.logical_id(),
                    "restore failed at launch; capacity released"
                );
                Err(GateError::Launch(error))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use firkin_admission::{CapacityError, QueuePolicy};
    use firkin_artifacts::{DigestCache, SnapshotArtifactIntegrity};
    use firkin_types::{SandboxId, Size};

    use crate::testing::{FakeLauncher, start, template, unit};
    use crate::{
        DiskPressureProbe, RuntimeConfig, RuntimeError, SandboxRuntime, SharedDiskProbe,
        TemplateSnapshot,
    };

    /// Reports whatever free space the test sets.
    struct Free(Arc<AtomicU64>);

    impl DiskPressureProbe for Free {
        type Error = std::convert::Infallible;
        fn available_disk(&mut self, _: &Path) -> Result<Size, Self::Error> {
            Ok(Size::bytes(self.0.load(Ordering::SeqCst)))
        }
    }

    /// The runtime `firkin serve` runs, with every gate failing at once, refuses at the
    /// integrity gate; fixed one by one, at the disk floor, then at capacity, then launches:
    /// the seed contract's order. Nothing after a failing gate runs or stays reserved.
    #[tokio::test]
    async fn the_server_runtime_refuses_in_the_seed_order() {
        let dir = tempfile::tempdir().unwrap();
        let good = template(dir.path(), "b1");
        let other = dir.path().join("other");
        std::fs::write(&other, b"not the descriptor").unwrap();
        let tampered = TemplateSnapshot {
            integrity: SnapshotArtifactIntegrity::from_path(&other).unwrap(),
            ..good.clone()
        };
        let free = Arc::new(AtomicU64::new(Size::gib(100).as_bytes()));
        let launcher = FakeLauncher::default();
        let mut config = RuntimeConfig::new(unit());
        config.queue = QueuePolicy { max_pending: 0 };
        config.disk_probe = SharedDiskProbe::new(Free(Arc::clone(&free)));
        let cache = Arc::new(DigestCache::in_memory().with_racy_window(Duration::ZERO));
        let rt = SandboxRuntime::new(launcher.clone(), config, cache);

        // Fill the ledger, then take the disk below the floor.
        rt.start(start("filler", &good)).await.unwrap();
        assert_eq!(launcher.attempts(), 1);
        free.store(Size::gib(1).as_bytes(), Ordering::SeqCst);

        let err = rt.start(start("sbx", &tampered)).await.unwrap_err();
        assert!(matches!(err, RuntimeError::Integrity { .. }), "{err}");

        let err = rt.start(start("sbx", &good)).await.unwrap_err();
        assert!(
            matches!(
                err,
                RuntimeError::Disk(CapacityError::Disk { requested, available })
                    if requested == Size::gib(10) && available == Size::gib(1)
            ),
            "{err}"
        );

        free.store(Size::gib(100).as_bytes(), Ordering::SeqCst);
        let err = rt.start(start("sbx", &good)).await.unwrap_err();
        assert!(
            matches!(err, RuntimeError::QueueFull { max_pending: 0 }),
            "{err}"
        );
        assert_eq!(
            launcher.attempts(),
            1,
            "a refused create reached the launcher"
        );
        assert_eq!(
            rt.capacity().active,
            unit(),
            "a refused create holds capacity"
        );

        launcher.fail_with(Some("qemu exited"));
        rt.kill(&SandboxId::new("filler").unwrap()).await.unwrap();
        let err = rt.start(start("sbx", &good)).await.unwrap_err();
        assert!(matches!(err, RuntimeError::Launch(_)), "{err}");
        assert!(
            std::error::Error::source(&err).is_some_and(|s| s.to_string() == "qemu exited"),
            "the launcher's error is kept as the source"
        );
        assert_eq!(rt.capacity().active, firkin_admission::ResourceBudget::ZERO);

        launcher.fail_with(None);
        rt.start(start("sbx", &good)).await.unwrap();
        assert_eq!(launcher.attempts(), 3);
    }
}
