//! Orchestration logic against the test doubles of `testing`: a launcher that records every
//! restore and sessions the test watches. The real QEMU launcher is exercised by the VM tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use firkin_admission::{CapacityError, ResourceBudget};
use firkin_artifacts::{SealedSnapshot, SnapshotArtifactKind};
use firkin_types::{SandboxId, Size};
use tempfile::TempDir;
use tokio::task::JoinHandle;

use super::{
    RuntimeError, SandboxRuntime, SandboxSource, StartSandbox, StartedSandbox, TemplateSnapshot,
    lock,
};
use crate::session::EnvdInit;
use crate::testing::{FakeLauncher, runtime, template, unit};

/// A template in a temporary directory and a runtime of `slots` over a launcher the test keeps.
fn setup(
    slots: u32,
) -> (
    TempDir,
    TemplateSnapshot,
    FakeLauncher,
    SandboxRuntime<FakeLauncher>,
) {
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let launcher = FakeLauncher::default();
    let rt = runtime(launcher.clone(), slots);
    (dir, t, launcher, rt)
}

/// Starts `id` in the background and returns once it waits in the admission queue.
async fn queued_start(
    rt: &SandboxRuntime<FakeLauncher>,
    t: &TemplateSnapshot,
    id: &'static str,
) -> JoinHandle<Result<StartedSandbox, RuntimeError>> {
    let queued = rt.capacity().queued;
    let (rt2, t2) = (rt.clone(), t.clone());
    let waiting = tokio::spawn(async move { rt2.start(start(id, &t2)).await });
    while rt.capacity().queued == queued {
        tokio::task::yield_now().await;
    }
    waiting
}

use crate::testing::start;

fn sid(s: &str) -> SandboxId {
    SandboxId::new(s).unwrap()
}

#[tokio::test]
async fn start_then_kill_round_trips_capacity() {
    let (_dir, t, launcher, rt) = setup(2);
    let s = rt.start(start("a1", &t)).await.unwrap();
    assert!(!s.from_warm_pool);
    assert_eq!(rt.capacity().active, unit());
    assert!(rt.route(&sid("a1"), 49983).is_some());
    assert!(
        launcher.saw_sealed()[0],
        "launcher got the sealed descriptor"
    );
    assert!(matches!(
        rt.start(start("a1", &t)).await,
        Err(RuntimeError::AlreadyRunning(_))
    ));
    rt.kill(&sid("a1")).await.unwrap();
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    assert_eq!(launcher.sessions()[0].stopped.load(Ordering::SeqCst), 1);
    assert!(matches!(
        rt.kill(&sid("a1")).await,
        Err(RuntimeError::NotFound(_))
    ));
}

#[tokio::test]
async fn launch_and_init_failures_release_everything() {
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let rt = runtime(FakeLauncher::failing("qemu died"), 1);
    assert!(matches!(
        rt.start(start("a", &t)).await,
        Err(RuntimeError::Launch(_))
    ));
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);

    let launcher = FakeLauncher::default().with_failing_init();
    let rt = runtime(launcher.clone(), 1);
    assert!(matches!(
        rt.start(start("a", &t)).await,
        Err(RuntimeError::Init(_))
    ));
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    assert_eq!(launcher.sessions()[0].stopped.load(Ordering::SeqCst), 1);
    assert!(rt.running_ids().is_empty());
}

#[tokio::test]
async fn tampered_template_launches_nothing() {
    let (dir, t, launcher, rt) = setup(1);
    std::fs::write(dir.path().join("b1").join("ram.img"), vec![4u8; 4096]).unwrap();
    assert!(matches!(
        rt.start(start("a", &t)).await,
        Err(RuntimeError::Integrity { .. })
    ));
    assert_eq!(launcher.attempts(), 0);
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
}

#[tokio::test]
async fn queued_create_proceeds_when_capacity_frees() {
    let (_dir, t, _, rt) = setup(1);
    rt.start(start("a", &t)).await.unwrap();
    let waiting = queued_start(&rt, &t, "b").await;
    rt.kill(&sid("a")).await.unwrap();
    let b = waiting.await.unwrap().unwrap();
    assert_eq!(b.sandbox_id, sid("b"));
    assert_eq!(rt.capacity().active, unit());
    assert_eq!(rt.capacity().queued, 0);
}

#[tokio::test]
async fn full_queue_refuses_fast_and_timeouts_hold_nothing() {
    let (_dir, t, _, mut rt) = setup(1);
    Arc::get_mut(&mut rt.inner).unwrap().config.queue_wait = Duration::from_millis(200);
    rt.start(start("a", &t)).await.unwrap();
    let waiters = [
        queued_start(&rt, &t, "b").await,
        queued_start(&rt, &t, "c").await,
    ];
    let refused = Instant::now();
    assert!(matches!(
        rt.start(start("d", &t)).await,
        Err(RuntimeError::QueueFull { max_pending: 2 })
    ));
    assert!(refused.elapsed() < Duration::from_millis(100));
    for w in waiters {
        assert!(matches!(
            w.await.unwrap(),
            Err(RuntimeError::QueueTimeout { .. })
        ));
    }
    assert_eq!(rt.capacity().queued, 0);
    assert_eq!(rt.capacity().active, unit());
}

#[tokio::test]
async fn cancelled_queued_create_leaks_nothing() {
    let (_dir, t, _, rt) = setup(1);
    rt.start(start("a", &t)).await.unwrap();
    let waiting = queued_start(&rt, &t, "b").await;
    waiting.abort();
    let _ = waiting.await;
    assert_eq!(rt.capacity().queued, 0);
    rt.kill(&sid("a")).await.unwrap();
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    assert!(rt.start(start("c", &t)).await.is_ok());
}

#[tokio::test]
async fn warm_pool_checkout_skips_the_restore() {
    let (_dir, t, launcher, rt) = setup(2);
    rt.set_warm_pool(t.clone(), 1);
    assert!(rt.refill_once().await);
    assert!(!rt.refill_once().await, "target already met");
    assert_eq!(rt.capacity().warm, unit());
    assert_eq!(launcher.count(), 1);
    let s = rt.start(start("a", &t)).await.unwrap();
    assert!(s.from_warm_pool);
    assert_eq!(launcher.count(), 1, "no restore on a hit");
    assert_eq!(rt.capacity().active, unit());
    assert_eq!(rt.capacity().warm, ResourceBudget::ZERO);
    assert_eq!(launcher.sessions()[0].inits.load(Ordering::SeqCst), 1);
    assert!(rt.refill_once().await, "refilled after the checkout");
    assert_eq!(rt.capacity().warm_sandboxes, 1);
}

#[tokio::test]
async fn refill_stands_aside_while_a_create_is_in_flight() {
    let (_dir, t, launcher, rt) = setup(2);
    rt.set_warm_pool(t.clone(), 1);
    lock(&rt.inner.state).starting.insert(sid("busy"), ());
    assert!(!rt.refill_once().await, "refilled during a create");
    assert_eq!(launcher.attempts(), 0);
    lock(&rt.inner.state).starting.remove(&sid("busy"));
    assert!(rt.refill_once().await);
    assert_eq!(rt.capacity().warm_sandboxes, 1);
}

#[tokio::test]
async fn active_creates_evict_warm_entries() {
    let (dir, t, launcher, rt) = setup(1);
    // A warm entry of `t` fills the host; a create of another template must evict it.
    rt.set_warm_pool(t.clone(), 1);
    assert!(rt.refill_once().await);
    let other = template(dir.path(), "other");
    rt.set_warm_pool(t.clone(), 0);
    let s = rt.start(start("b", &other)).await.unwrap();
    assert!(!s.from_warm_pool);
    assert_eq!(rt.capacity().warm, ResourceBudget::ZERO);
    assert_eq!(rt.capacity().active, unit());
    tokio::task::yield_now().await;
    assert_eq!(launcher.sessions()[0].stopped.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_vm_that_dies_is_reaped_and_reported() {
    let (_dir, t, launcher, rt) = setup(1);
    let mut exits = rt.exits();
    rt.start(start("a", &t)).await.unwrap();
    launcher.sessions()[0].die();
    let exit = tokio::time::timeout(Duration::from_secs(5), exits.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.sandbox_id, sid("a"));
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    assert!(!rt.is_running(&sid("a")));
}

#[tokio::test]
async fn pause_seals_a_continuation_and_resume_restores_it() {
    let (dir, t, launcher, rt) = setup(1);
    rt.start(start("a", &t)).await.unwrap();
    let snap = dir.path().join("paused-a");
    let paused = rt.pause(&sid("a"), &snap).await.unwrap();
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    assert!(!rt.is_running(&sid("a")));
    assert!(snap.join("seal.integrity.json").exists());
    let sealed =
        SealedSnapshot::verify_with_sidecar(&paused.descriptor, rt.digest_cache()).unwrap();
    assert_eq!(sealed.kind, SnapshotArtifactKind::Continuation);
    let resumed = rt
        .start(StartSandbox {
            sandbox_id: sid("a"),
            source: SandboxSource::Continuation(paused.clone()),
            init: EnvdInit::default(),
            network: None,
        })
        .await
        .unwrap();
    assert!(!resumed.from_warm_pool);
    assert_eq!(launcher.artifacts()[1], paused.descriptor);
    // A tampered continuation is refused.
    rt.kill(&sid("a")).await.unwrap();
    std::fs::write(snap.join("ram.bin"), b"RAM").unwrap();
    assert!(matches!(
        rt.start(StartSandbox {
            sandbox_id: sid("a"),
            source: SandboxSource::Continuation(paused),
            init: EnvdInit::default(),
            network: None,
        })
        .await,
        Err(RuntimeError::Integrity { .. })
    ));
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
}

#[tokio::test]
async fn oversized_requests_are_refused_outright() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = template(dir.path(), "b1");
    t.budget = ResourceBudget::new(64, Size::gib(1), Size::gib(1));
    let rt = runtime(FakeLauncher::default(), 1);
    assert!(matches!(
        rt.start(start("a", &t)).await,
        Err(RuntimeError::Oversized(CapacityError::Cpu { .. }))
    ));
}
