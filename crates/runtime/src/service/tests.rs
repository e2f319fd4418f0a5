//! Orchestration logic against test doubles: `testing::Flaky` where a test only needs sandboxes
//! that start and stop, a recording launcher where it watches what happened to a session. The
//! real QEMU launcher is exercised by the VM tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use firkin_admission::{CapacityError, QueuePolicy, ResourceBudget};
use firkin_artifacts::{DigestCache, SealedSnapshot, SnapshotArtifactKind};
use firkin_types::{SandboxId, Size};
use tokio::sync::Notify;

use super::{
    RuntimeConfig, RuntimeError, SandboxRuntime, SandboxSource, StartSandbox, TemplateSnapshot,
    lock,
};
use crate::restore::{SnapshotRestoreRequest, SnapshotSessionLauncher};
use crate::session::{ContinuationSaved, EnvdInit, SandboxSession};
use crate::testing::{Flaky, template, unit};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct FakeError(String);

#[derive(Debug, Default)]
struct FakeSession {
    alive: AtomicBool,
    stopped: AtomicUsize,
    inits: AtomicUsize,
    fail_init: bool,
    died: Notify,
}

impl FakeSession {
    fn die(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.died.notify_waiters();
    }
}

#[async_trait]
impl SandboxSession for FakeSession {
    type Error = FakeError;
    fn envd_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4000))
    }
    fn port_addr(&self, p: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], p)))
    }
    fn pid(&self) -> Option<u32> {
        Some(1)
    }
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
    async fn init(&self, _: &EnvdInit) -> Result<(), FakeError> {
        self.inits.fetch_add(1, Ordering::SeqCst);
        if self.fail_init {
            Err(FakeError("agent refused".into()))
        } else {
            Ok(())
        }
    }
    async fn save_continuation(&self, dir: &Path) -> Result<ContinuationSaved, FakeError> {
        std::fs::write(dir.join("ram.bin"), b"ram").map_err(|e| FakeError(e.to_string()))?;
        self.alive.store(false, Ordering::SeqCst);
        Ok(ContinuationSaved {
            components: vec![("ram".into(), "ram.bin".into())],
            machine: serde_json::json!({"fake": true}),
            depends_on: Vec::new(),
        })
    }
    async fn stop(&self) -> Result<(), FakeError> {
        self.stopped.fetch_add(1, Ordering::SeqCst);
        self.alive.store(false, Ordering::SeqCst);
        Ok(())
    }
    async fn exited(&self) {
        loop {
            let n = self.died.notified();
            if !self.is_alive() && self.stopped.load(Ordering::SeqCst) == 0 {
                return;
            }
            n.await;
        }
    }
}

type Launches = Arc<Mutex<Vec<(PathBuf, bool, Arc<FakeSession>)>>>;

#[derive(Clone, Default)]
struct FakeLauncher {
    launched: Launches,
    fail_init: bool,
}

impl FakeLauncher {
    fn sessions(&self) -> Vec<Arc<FakeSession>> {
        lock(&self.launched)
            .iter()
            .map(|l| Arc::clone(&l.2))
            .collect()
    }
    fn count(&self) -> usize {
        lock(&self.launched).len()
    }
}

/// The launcher hands the runtime an `Arc`-shared session so the test can watch it.
#[derive(Debug)]
struct Shared(Arc<FakeSession>);

#[async_trait]
impl SandboxSession for Shared {
    type Error = FakeError;
    fn envd_addr(&self) -> SocketAddr {
        self.0.envd_addr()
    }
    fn port_addr(&self, p: u16) -> Option<SocketAddr> {
        self.0.port_addr(p)
    }
    fn pid(&self) -> Option<u32> {
        self.0.pid()
    }
    fn is_alive(&self) -> bool {
        self.0.is_alive()
    }
    async fn init(&self, i: &EnvdInit) -> Result<(), FakeError> {
        self.0.init(i).await
    }
    async fn save_continuation(&self, d: &Path) -> Result<ContinuationSaved, FakeError> {
        self.0.save_continuation(d).await
    }
    async fn stop(&self) -> Result<(), FakeError> {
        self.0.stop().await
    }
    async fn exited(&self) {
        self.0.exited().await
    }
}

#[async_trait]
impl SnapshotSessionLauncher for FakeLauncher {
    type Error = FakeError;
    type Session = Shared;
    async fn restore_from_snapshot(
        &mut self,
        request: &SnapshotRestoreRequest<'_>,
    ) -> Result<Shared, FakeError> {
        let s = Arc::new(FakeSession {
            alive: AtomicBool::new(true),
            fail_init: self.fail_init,
            ..FakeSession::default()
        });
        lock(&self.launched).push((
            request.manifest().path().to_path_buf(),
            request.sealed().is_some(),
            Arc::clone(&s),
        ));
        Ok(Shared(s))
    }
}

fn runtime<L>(launcher: L, slots: u32) -> SandboxRuntime<L>
where
    L: SnapshotSessionLauncher + Clone + Sync + 'static,
    L::Session: SandboxSession,
    L::Error: std::error::Error + Send + Sync + 'static,
{
    let mut config = RuntimeConfig::new(ResourceBudget::new(
        slots,
        Size::gib(u64::from(slots)),
        Size::gib(u64::from(slots)),
    ));
    config.restore_disk_floor = Size::ZERO;
    config.warm_pool_disk_floor = Size::ZERO;
    config.queue = QueuePolicy { max_pending: 2 };
    config.queue_wait = Duration::from_secs(5);
    SandboxRuntime::new(
        launcher,
        config,
        Arc::new(DigestCache::in_memory().with_racy_window(Duration::ZERO)),
    )
}

fn start(id: &str, t: &TemplateSnapshot) -> StartSandbox {
    StartSandbox {
        sandbox_id: SandboxId::new(id).unwrap(),
        source: SandboxSource::Template(t.clone()),
        init: EnvdInit::default(),
    }
}

fn sid(s: &str) -> SandboxId {
    SandboxId::new(s).unwrap()
}

#[tokio::test]
async fn start_then_kill_round_trips_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let launcher = FakeLauncher::default();
    let rt = runtime(launcher.clone(), 2);
    let s = rt.start(start("a1", &t)).await.unwrap();
    assert!(!s.from_warm_pool);
    assert_eq!(rt.capacity().active, unit());
    assert!(rt.route(&sid("a1"), 49983).is_some());
    assert!(
        lock(&launcher.launched)[0].1,
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
    let flaky = Flaky::default();
    flaky.fail_with(Some("qemu died"));
    let rt = runtime(flaky, 1);
    assert!(matches!(
        rt.start(start("a", &t)).await,
        Err(RuntimeError::Launch(_))
    ));
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);

    let launcher = FakeLauncher {
        fail_init: true,
        ..FakeLauncher::default()
    };
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
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    std::fs::write(dir.path().join("b1").join("ram.img"), vec![4u8; 4096]).unwrap();
    let launcher = Flaky::default();
    let rt = runtime(launcher.clone(), 1);
    assert!(matches!(
        rt.start(start("a", &t)).await,
        Err(RuntimeError::Integrity { .. })
    ));
    assert_eq!(launcher.attempts(), 0);
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
}

#[tokio::test]
async fn queued_create_proceeds_when_capacity_frees() {
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let rt = runtime(Flaky::default(), 1);
    rt.start(start("a", &t)).await.unwrap();
    let rt2 = rt.clone();
    let t2 = t.clone();
    let waiting = tokio::spawn(async move { rt2.start(start("b", &t2)).await });
    while rt.capacity().queued == 0 {
        tokio::task::yield_now().await;
    }
    rt.kill(&sid("a")).await.unwrap();
    let b = waiting.await.unwrap().unwrap();
    assert_eq!(b.sandbox_id, sid("b"));
    assert_eq!(rt.capacity().active, unit());
    assert_eq!(rt.capacity().queued, 0);
}

#[tokio::test]
async fn full_queue_refuses_fast_and_timeouts_hold_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let mut rt = runtime(Flaky::default(), 1);
    Arc::get_mut(&mut rt.inner).unwrap().config.queue_wait = Duration::from_millis(200);
    rt.start(start("a", &t)).await.unwrap();
    let mut waiters = Vec::new();
    for id in ["b", "c"] {
        let rt2 = rt.clone();
        let t2 = t.clone();
        waiters.push(tokio::spawn(async move { rt2.start(start(id, &t2)).await }));
    }
    while rt.capacity().queued < 2 {
        tokio::task::yield_now().await;
    }
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
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let rt = runtime(Flaky::default(), 1);
    rt.start(start("a", &t)).await.unwrap();
    let rt2 = rt.clone();
    let t2 = t.clone();
    let waiting = tokio::spawn(async move { rt2.start(start("b", &t2)).await });
    while rt.capacity().queued == 0 {
        tokio::task::yield_now().await;
    }
    waiting.abort();
    let _ = waiting.await;
    assert_eq!(rt.capacity().queued, 0);
    rt.kill(&sid("a")).await.unwrap();
    assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    assert!(rt.start(start("c", &t)).await.is_ok());
}

#[tokio::test]
async fn warm_pool_checkout_skips_the_restore() {
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let launcher = FakeLauncher::default();
    let rt = runtime(launcher.clone(), 2);
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
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let launcher = Flaky::default();
    let rt = runtime(launcher.clone(), 2);
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
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let launcher = FakeLauncher::default();
    let rt = runtime(launcher.clone(), 1);
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
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let launcher = FakeLauncher::default();
    let rt = runtime(launcher.clone(), 1);
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
    let dir = tempfile::tempdir().unwrap();
    let t = template(dir.path(), "b1");
    let launcher = FakeLauncher::default();
    let rt = runtime(launcher.clone(), 1);
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
        })
        .await
        .unwrap();
    assert!(!resumed.from_warm_pool);
    assert_eq!(lock(&launcher.launched)[1].0, paused.descriptor);
    // A tampered continuation is refused.
    rt.kill(&sid("a")).await.unwrap();
    std::fs::write(snap.join("ram.bin"), b"RAM").unwrap();
    assert!(matches!(
        rt.start(StartSandbox {
            sandbox_id: sid("a"),
            source: SandboxSource::Continuation(paused),
            init: EnvdInit::default(),
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
    let rt = runtime(Flaky::default(), 1);
    assert!(matches!(
        rt.start(start("a", &t)).await,
        Err(RuntimeError::Oversized(CapacityError::Cpu { .. }))
    ));
}
