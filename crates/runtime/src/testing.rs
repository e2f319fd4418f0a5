//! Test doubles for the orchestration logic's unit tests (never for tests of real parts): a
//! session the test can watch and kill, one launcher that records every restore and fails on
//! demand, a runtime over it, and a sealed template fixture.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use firkin_admission::{QueuePolicy, ResourceBudget};
use firkin_artifacts::DigestCache;
use firkin_types::{Size, TemplateId};
use tokio::sync::Notify;

use crate::{
    ContinuationSaved, EnvdInit, RuntimeConfig, SandboxRuntime, SandboxSession,
    SnapshotRestoreRequest, SnapshotSessionLauncher, TemplateSnapshot,
};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Failed(pub String);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A sandbox that is alive until stopped or [`FakeSession::die`]s, and counts what was asked.
#[derive(Debug, Default)]
pub(crate) struct FakeSession {
    pub alive: AtomicBool,
    pub stopped: AtomicUsize,
    pub inits: AtomicUsize,
    pub fail_init: bool,
    died: Notify,
}

impl FakeSession {
    /// The VMM exits on its own (a crash, kill -9).
    pub(crate) fn die(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.died.notify_waiters();
    }
}

/// Shared, so that the test keeps watching a session the runtime owns.
#[async_trait]
impl SandboxSession for Arc<FakeSession> {
    type Error = Failed;
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
    async fn init(&self, _: &EnvdInit) -> Result<(), Failed> {
        self.inits.fetch_add(1, Ordering::SeqCst);
        if self.fail_init {
            Err(Failed("agent refused".into()))
        } else {
            Ok(())
        }
    }
    async fn save_continuation(&self, dir: &Path) -> Result<ContinuationSaved, Failed> {
        std::fs::write(dir.join("ram.bin"), b"ram").map_err(|e| Failed(e.to_string()))?;
        self.alive.store(false, Ordering::SeqCst);
        Ok(ContinuationSaved {
            components: vec![("ram".into(), "ram.bin".into())],
            machine: serde_json::json!({"fake": true}),
            depends_on: Vec::new(),
        })
    }
    async fn stop(&self) -> Result<(), Failed> {
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

/// One restore the launcher was asked for: the artifact, whether it came with a verified
/// sealed descriptor, and the session handed out (`None`: the restore failed).
type Restore = (PathBuf, bool, Option<Arc<FakeSession>>);

/// Records every restore; restores fail with `fail_with` while it is set, and the sessions'
/// `/init` fails when `fail_init` is.
#[derive(Clone, Default)]
pub(crate) struct FakeLauncher {
    restores: Arc<Mutex<Vec<Restore>>>,
    fail_with: Arc<Mutex<Option<String>>>,
    fail_init: bool,
}

impl FakeLauncher {
    pub(crate) fn with_failing_init(mut self) -> Self {
        self.fail_init = true;
        self
    }
    pub(crate) fn failing(error: &str) -> Self {
        let l = Self::default();
        l.fail_with(Some(error));
        l
    }
    pub(crate) fn fail_with(&self, error: Option<&str>) {
        *lock(&self.fail_with) = error.map(str::to_owned);
    }
    /// Restores asked for, failed ones included.
    pub(crate) fn attempts(&self) -> usize {
        lock(&self.restores).len()
    }
    /// The artifact of every restore asked for.
    pub(crate) fn artifacts(&self) -> Vec<PathBuf> {
        lock(&self.restores).iter().map(|r| r.0.clone()).collect()
    }
    /// Whether each restore got a verified sealed descriptor.
    pub(crate) fn saw_sealed(&self) -> Vec<bool> {
        lock(&self.restores).iter().map(|r| r.1).collect()
    }
    /// The sessions handed out, in order.
    pub(crate) fn sessions(&self) -> Vec<Arc<FakeSession>> {
        lock(&self.restores)
            .iter()
            .filter_map(|r| r.2.clone())
            .collect()
    }
    /// Successful restores.
    pub(crate) fn count(&self) -> usize {
        self.sessions().len()
    }
}

#[async_trait]
impl SnapshotSessionLauncher for FakeLauncher {
    type Error = Failed;
    type Session = Arc<FakeSession>;
    async fn restore_from_snapshot(
        &mut self,
        request: &SnapshotRestoreRequest<'_>,
    ) -> Result<Arc<FakeSession>, Failed> {
        let failure = lock(&self.fail_with).clone();
        let session = failure.is_none().then(|| {
            Arc::new(FakeSession {
                alive: AtomicBool::new(true),
                fail_init: self.fail_init,
                ..FakeSession::default()
            })
        });
        lock(&self.restores).push((
            request.manifest().path().to_path_buf(),
            request.sealed().is_some(),
            session.clone(),
        ));
        session.ok_or_else(|| Failed(failure.unwrap_or_default()))
    }
}

/// A runtime over `launcher` with room for `slots` unit sandboxes, no disk floors, a queue of
/// two and a fresh digest cache.
pub(crate) fn runtime(launcher: FakeLauncher, slots: u32) -> SandboxRuntime<FakeLauncher> {
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

pub(crate) fn unit() -> ResourceBudget {
    ResourceBudget::new(1, Size::gib(1), Size::gib(1))
}

pub(crate) fn template(dir: &Path, build: &str) -> TemplateSnapshot {
    let dir = dir.join(build);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ram.img"), vec![3u8; 4096]).unwrap();
    let cache = DigestCache::in_memory().with_racy_window(Duration::ZERO);
    let id = TemplateId::new("base").unwrap();
    TemplateSnapshot::seal_blocking(
        &dir,
        &id,
        build,
        unit(),
        &[("ram", "ram.img")],
        serde_json::json!({}),
        &cache,
    )
    .unwrap()
}

/// A create of sandbox `id` from template `t`, with nothing else asked.
pub fn start(id: &str, t: &TemplateSnapshot) -> crate::StartSandbox {
    crate::StartSandbox {
        sandbox_id: firkin_types::SandboxId::new(id).unwrap(),
        source: crate::SandboxSource::Template(t.clone()),
        init: EnvdInit::default(),
        network: None,
    }
}
