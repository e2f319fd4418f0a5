//! Test doubles for the orchestration logic's unit tests (never for tests of real parts):
//! an idle session, a launcher whose restores fail on demand, and a sealed template fixture.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use firkin_admission::ResourceBudget;
use firkin_artifacts::DigestCache;
use firkin_types::{Size, TemplateId};

use crate::{
    ContinuationSaved, EnvdInit, SandboxSession, SnapshotRestoreRequest, SnapshotSessionLauncher,
    TemplateSnapshot,
};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Failed(pub String);

#[derive(Debug)]
pub(crate) struct Idle(pub AtomicBool);

#[async_trait]
impl SandboxSession for Idle {
    type Error = Failed;
    fn envd_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 49983))
    }
    fn port_addr(&self, _: u16) -> Option<SocketAddr> {
        None
    }
    fn pid(&self) -> Option<u32> {
        None
    }
    fn is_alive(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    async fn init(&self, _: &EnvdInit) -> Result<(), Failed> {
        Ok(())
    }
    async fn save_continuation(&self, _: &Path) -> Result<ContinuationSaved, Failed> {
        Err(Failed("not in these tests".into()))
    }
    async fn stop(&self) -> Result<(), Failed> {
        self.0.store(false, Ordering::SeqCst);
        Ok(())
    }
    async fn exited(&self) {
        std::future::pending().await
    }
}

/// Restores fail with `fail_with` while it is set.
#[derive(Clone, Default)]
pub(crate) struct Flaky {
    fail_with: Arc<Mutex<Option<String>>>,
    attempts: Arc<AtomicUsize>,
}

impl Flaky {
    pub(crate) fn fail_with(&self, error: Option<&str>) {
        *self.fail_with.lock().unwrap() = error.map(str::to_owned);
    }
    pub(crate) fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl SnapshotSessionLauncher for Flaky {
    type Error = Failed;
    type Session = Idle;
    async fn restore_from_snapshot(
        &mut self,
        _: &SnapshotRestoreRequest<'_>,
    ) -> Result<Idle, Failed> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        match self.fail_with.lock().unwrap().clone() {
            Some(e) => Err(Failed(e)),
            None => Ok(Idle(AtomicBool::new(true))),
        }
    }
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
