//! Every failure path of the restore gates through the seed contract's faces: what fails, in
//! which order, and that nothing after a failing gate runs or stays reserved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use firkin_admission::{CapacityError, CapacityLedger, ResourceBudget};
use firkin_artifacts::{
    DigestCache, IntegrityError, SealError, SealedSnapshot, SidecarError,
    SnapshotArtifactIntegrity, SnapshotArtifactKind, SnapshotArtifactManifest,
};
use firkin_e2b_contract::{PreparedTemplate, StartSandboxRequest};
use firkin_e2b_wire::SandboxCreateRequest;
use firkin_types::Size;

use crate::testing::{Failed, FakeLauncher};
use crate::{
    DiskPressureProbe, IntegrityFailure, IntegritySource, RuntimeCubeSandboxCreate,
    RuntimeCubeSandboxCreateConfig, RuntimeCubeSandboxCreateError, RuntimeSnapshotRestore,
    SnapshotRestoreError,
};

struct Probe {
    answer: Result<Size, &'static str>,
    probed: Vec<PathBuf>,
}

impl Probe {
    fn free(size: Size) -> Self {
        Self {
            answer: Ok(size),
            probed: Vec::new(),
        }
    }
}

impl DiskPressureProbe for Probe {
    type Error = &'static str;
    fn available_disk(&mut self, path: &Path) -> Result<Size, Self::Error> {
        self.probed.push(path.to_path_buf());
        self.answer
    }
}

fn ledger() -> CapacityLedger {
    CapacityLedger::new(ResourceBudget::new(8, Size::gib(64), Size::gib(512)))
}

fn budget() -> ResourceBudget {
    ResourceBudget::new(2, Size::gib(8), Size::gib(64))
}

fn cache() -> DigestCache {
    DigestCache::in_memory().with_racy_window(Duration::ZERO)
}

fn artifact(dir: &Path, content: &[u8]) -> (PathBuf, SnapshotArtifactManifest) {
    let path = dir.join("repo-main.vz");
    std::fs::write(&path, content).unwrap();
    let manifest = SnapshotArtifactManifest::base("repo-main", &path);
    (path, manifest)
}

const MS: Duration = Duration::from_millis(5);

async fn expect_capacity_failure(request: ResourceBudget) -> CapacityError {
    let mut l = ledger();
    let manifest = SnapshotArtifactManifest::base("t", "/snapshots/t.vz");
    let mut launcher = FakeLauncher::default();
    let mut probe = Probe::free(Size::gib(100));
    let err = RuntimeSnapshotRestore::new(&mut l, &manifest, request)
        .execute_with_disk_probe_elapsed(&mut launcher, MS, &mut probe)
        .await
        .expect_err("must not fit");
    assert_eq!(launcher.attempts(), 0);
    assert_eq!(l.active(), ResourceBudget::ZERO);
    match err {
        SnapshotRestoreError::Capacity(c) => c,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn each_capacity_resource_is_checked_in_order() {
    assert_eq!(
        expect_capacity_failure(ResourceBudget::new(9, Size::gib(65), Size::gib(513))).await,
        CapacityError::Cpu {
            requested: 9,
            available: 8
        }
    );
    assert_eq!(
        expect_capacity_failure(ResourceBudget::new(8, Size::gib(65), Size::gib(513))).await,
        CapacityError::Memory {
            requested: Size::gib(65),
            available: Size::gib(64)
        }
    );
    assert_eq!(
        expect_capacity_failure(ResourceBudget::new(8, Size::gib(64), Size::gib(513))).await,
        CapacityError::Disk {
            requested: Size::gib(513),
            available: Size::gib(512)
        }
    );
}

#[tokio::test]
async fn capacity_already_held_by_others_is_respected() {
    let mut l = ledger();
    l.reserve_active(ResourceBudget::new(7, Size::gib(1), Size::gib(1)))
        .unwrap();
    let manifest = SnapshotArtifactManifest::base("t", "/snapshots/t.vz");
    let mut launcher = FakeLauncher::default();
    let err = RuntimeSnapshotRestore::new(&mut l, &manifest, budget())
        .execute_with_disk_probe_elapsed(&mut launcher, MS, &mut Probe::free(Size::gib(100)))
        .await
        .expect_err("only one cpu left");
    assert!(matches!(
        err,
        SnapshotRestoreError::Capacity(CapacityError::Cpu {
            requested: 2,
            available: 1
        })
    ));
    assert_eq!(l.active().cpus, 7);
}

#[tokio::test]
async fn disk_probe_error_reports_floor_and_zero_and_launches_nothing() {
    let mut l = ledger();
    let manifest = SnapshotArtifactManifest::base("t", "/snapshots/t.vz");
    let mut launcher = FakeLauncher::default();
    let mut probe = Probe {
        answer: Err("statvfs: EIO"),
        probed: Vec::new(),
    };
    let err = RuntimeSnapshotRestore::new(&mut l, &manifest, budget())
        .execute_with_disk_probe_elapsed(&mut launcher, MS, &mut probe)
        .await
        .expect_err("probe failure blocks restore");
    assert!(matches!(
        err,
        SnapshotRestoreError::Capacity(CapacityError::Disk { requested, available })
            if requested == Size::gib(10) && available == Size::ZERO
    ));
    assert_eq!(probe.probed, vec![PathBuf::from("/snapshots")]);
    assert_eq!(launcher.attempts(), 0);
    assert_eq!(l.active(), ResourceBudget::ZERO);
}

#[tokio::test]
async fn disk_floor_is_configurable_and_inclusive() {
    let mut l = ledger();
    let manifest = SnapshotArtifactManifest::base("t", "/snapshots/t.vz");
    let mut launcher = FakeLauncher::default();
    let ok = RuntimeSnapshotRestore::new(&mut l, &manifest, budget())
        .with_disk_floor(Size::gib(2))
        .execute_with_disk_probe_elapsed(&mut launcher, MS, &mut Probe::free(Size::gib(2)))
        .await;
    assert!(ok.is_ok());
    let err = RuntimeSnapshotRestore::new(&mut l, &manifest, budget())
        .with_disk_floor(Size::gib(2))
        .execute_with_disk_probe_elapsed(
            &mut launcher,
            MS,
            &mut Probe::free(Size::gib(2).saturating_sub(Size::bytes(1))),
        )
        .await
        .expect_err("one byte below the floor");
    assert!(matches!(
        err,
        SnapshotRestoreError::Capacity(CapacityError::Disk { requested, .. }) if requested == Size::gib(2)
    ));
}

#[tokio::test]
async fn launch_failure_releases_and_reports_the_launcher_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, manifest) = artifact(dir.path(), b"x");
    let mut l = ledger();
    let mut launcher = FakeLauncher::failing("qemu exited");
    let err = RuntimeSnapshotRestore::new(&mut l, &manifest, budget())
        .execute_with_disk_probe_elapsed(&mut launcher, MS, &mut Probe::free(Size::gib(100)))
        .await
        .expect_err("launch fails");
    assert!(err.to_string().contains("qemu exited"), "{err}");
    assert_eq!(l.active(), ResourceBudget::ZERO);
    assert_eq!(launcher.attempts(), 1);
}

fn integrity_failure(err: SnapshotRestoreError<Failed>) -> IntegrityFailure {
    match err {
        SnapshotRestoreError::Integrity { source, .. } => source,
        other => panic!("expected integrity failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_or_corrupt_sidecar_is_an_integrity_failure() {
    type Expected = fn(&SidecarError) -> bool;
    let cases: [(Option<&[u8]>, Expected); 2] = [
        (None, |e| matches!(e, SidecarError::Read { .. })),
        (Some(b"{\"size_bytes\":8,"), |e| {
            matches!(e, SidecarError::Decode { .. })
        }),
    ];
    for (content, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (path, manifest) = artifact(dir.path(), b"snapshot");
        let sidecar = SnapshotArtifactIntegrity::sidecar_path_for_artifact(&path);
        if let Some(content) = content {
            std::fs::write(&sidecar, content).unwrap();
        }
        let mut l = ledger();
        let mut launcher = FakeLauncher::default();
        let mut probe = Probe::free(Size::gib(100));
        let err = RuntimeSnapshotRestore::new(&mut l, &manifest, budget())
            .execute_with_integrity_sidecar_disk_probe_elapsed(
                &mut launcher,
                MS,
                &sidecar,
                &mut probe,
            )
            .await
            .expect_err("no usable sidecar");
        let failure = integrity_failure(err);
        assert!(
            matches!(&failure, IntegrityFailure::Sidecar(e) if expected(e)),
            "{failure}"
        );
        assert!(probe.probed.is_empty());
        assert_eq!(launcher.attempts(), 0);
        assert_eq!(l.active(), ResourceBudget::ZERO);
    }
}

/// A restore of `manifest` checked against `record` through `cache`.
async fn restore_against(
    l: &mut CapacityLedger,
    manifest: &SnapshotArtifactManifest,
    cache: &DigestCache,
    record: &SnapshotArtifactIntegrity,
    launcher: &mut FakeLauncher,
) -> Result<(), SnapshotRestoreError<Failed>> {
    RuntimeSnapshotRestore::new(l, manifest, budget())
        .with_digest_cache(cache)
        .execute_with_integrity_disk_probe_elapsed(
            launcher,
            MS,
            record,
            &mut Probe::free(Size::gib(100)),
        )
        .await
        .map(drop)
}

#[tokio::test]
async fn size_mismatch_and_digest_mismatch_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (path, manifest) = artifact(dir.path(), b"snapshot");
    let record = SnapshotArtifactIntegrity::from_path(&path).unwrap();
    let cache = cache();

    std::fs::write(&path, b"snapshot+").unwrap();
    let mut l = ledger();
    let mut launcher = FakeLauncher::default();
    let err = restore_against(&mut l, &manifest, &cache, &record, &mut launcher)
        .await
        .expect_err("grown file");
    assert!(matches!(
        integrity_failure(err),
        IntegrityFailure::Artifact(IntegrityError::SizeMismatch {
            expected: 8,
            actual: 9,
            ..
        })
    ));

    std::fs::write(&path, b"SNAPSHOT").unwrap();
    let err = restore_against(&mut l, &manifest, &cache, &record, &mut launcher)
        .await
        .expect_err("same size, other bytes");
    assert!(matches!(
        integrity_failure(err),
        IntegrityFailure::Artifact(IntegrityError::DigestMismatch { .. })
    ));
    assert_eq!(l.active(), ResourceBudget::ZERO);
}

#[tokio::test]
async fn cached_check_still_refuses_a_same_size_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let (path, manifest) = artifact(dir.path(), b"snapshot");
    std::thread::sleep(Duration::from_millis(30));
    let record = SnapshotArtifactIntegrity::from_path(&path).unwrap();
    let cache = DigestCache::in_memory().with_racy_window(Duration::from_millis(10));
    let mut l = ledger();
    let mut launcher = FakeLauncher::default();
    for _ in 0..2 {
        restore_against(&mut l, &manifest, &cache, &record, &mut launcher)
            .await
            .expect("unchanged artifact restores");
    }
    assert_eq!(cache.len(), 1, "the second check was a cache hit");
    std::thread::sleep(Duration::from_millis(30));
    std::fs::write(&path, b"snapsh0t").unwrap();
    let err = restore_against(&mut l, &manifest, &cache, &record, &mut launcher)
        .await
        .expect_err("rewritten artifact");
    assert!(matches!(
        integrity_failure(err),
        IntegrityFailure::Artifact(IntegrityError::DigestMismatch { .. })
    ));
    assert_eq!(launcher.attempts(), 2);
}

fn sealed_template(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("ram.img"), vec![1u8; 8192]).unwrap();
    std::fs::write(dir.join("vmstate.bin"), b"device state").unwrap();
    let (_, manifest) = SealedSnapshot::seal(
        dir,
        "snapshot.json",
        SnapshotArtifactKind::BaseTemplate,
        "base",
        &[("ram", "ram.img"), ("vmstate", "vmstate.bin")],
        serde_json::json!({}),
        &cache(),
    )
    .unwrap();
    manifest.path().to_path_buf()
}

#[tokio::test]
async fn sealed_snapshot_hands_verified_descriptor_to_the_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let descriptor = sealed_template(dir.path());
    let manifest = SnapshotArtifactManifest::base("base", &descriptor);
    let mut l = ledger();
    let mut launcher = FakeLauncher::default();
    let report = RuntimeSnapshotRestore::new(&mut l, &manifest, budget())
        .with_digest_cache(&cache())
        .sealed_snapshot()
        .run(
            &mut launcher,
            IntegritySource::ArtifactSidecar,
            &mut Probe::free(Size::gib(100)),
            Some(MS),
        )
        .await
        .expect("sealed restore");
    assert_eq!(launcher.saw_sealed(), vec![true]);
    assert_eq!(
        report.sealed().and_then(|s| s.component_path("ram")),
        Some(dir.path().join("ram.img"))
    );
}

#[tokio::test]
async fn one_flipped_byte_in_a_sealed_component_blocks_everything() {
    let dir = tempfile::tempdir().unwrap();
    let descriptor = sealed_template(dir.path());
    let ram = dir.path().join("ram.img");
    let mut bytes = std::fs::read(&ram).unwrap();
    bytes[4096] ^= 0x80;
    std::fs::write(&ram, bytes).unwrap();
    let manifest = SnapshotArtifactManifest::base("base", &descriptor);
    let mut l = ledger();
    let mut launcher = FakeLauncher::default();
    let mut probe = Probe::free(Size::gib(100));
    let err = RuntimeSnapshotRestore::new(&mut l, &manifest, budget())
        .with_digest_cache(&cache())
        .sealed_snapshot()
        .run(
            &mut launcher,
            IntegritySource::Unchecked,
            &mut probe,
            Some(MS),
        )
        .await
        .expect_err("tampered ram image");
    let failure = integrity_failure(err);
    assert!(
        matches!(&failure, IntegrityFailure::Sealed(SealError::Component { name, .. }) if name == "ram"),
        "{failure}"
    );
    assert!(probe.probed.is_empty());
    assert_eq!(launcher.attempts(), 0);
    assert_eq!(l.active(), ResourceBudget::ZERO);
}

#[tokio::test]
async fn cube_create_without_prepared_template_is_refused() {
    let mut l = ledger();
    let request = StartSandboxRequest {
        create_request: SandboxCreateRequest {
            template_id: "missing".into(),
            ..SandboxCreateRequest::default()
        },
        prepared_template: None,
    };
    let config =
        RuntimeCubeSandboxCreateConfig::new("sbx1", "localhost", "0.6.4", "a", "b", 1, 512);
    let mut launcher = FakeLauncher::default();
    let err = RuntimeCubeSandboxCreate::new(&mut l, &request, budget(), config)
        .execute_with_disk_probe_elapsed(&mut launcher, MS, &mut Probe::free(Size::gib(100)))
        .await
        .expect_err("no template");
    assert!(matches!(
        err,
        RuntimeCubeSandboxCreateError::MissingPreparedTemplate { ref template_id } if template_id == "missing"
    ));
    assert_eq!(launcher.attempts(), 0);
}

#[tokio::test]
async fn cube_create_without_inline_integrity_or_sidecar_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = artifact(dir.path(), b"snapshot");
    let request = StartSandboxRequest {
        create_request: SandboxCreateRequest::default(),
        prepared_template: Some(PreparedTemplate {
            template_id: "repo-main".into(),
            build_id: "b".into(),
            artifact: path.display().to_string(),
            has_envd: true,
            artifact_integrity: None,
        }),
    };
    let config =
        RuntimeCubeSandboxCreateConfig::new("sbx1", "localhost", "0.6.4", "a", "b", 1, 512);
    let mut l = ledger();
    let mut launcher = FakeLauncher::default();
    let err = RuntimeCubeSandboxCreate::new(&mut l, &request, budget(), config)
        .execute_with_disk_probe_elapsed(&mut launcher, MS, &mut Probe::free(Size::gib(100)))
        .await
        .expect_err("no integrity anywhere");
    assert!(matches!(
        err,
        RuntimeCubeSandboxCreateError::Restore(SnapshotRestoreError::Integrity { .. })
    ));
    assert_eq!(launcher.attempts(), 0);
    assert_eq!(l.active(), ResourceBudget::ZERO);
}
