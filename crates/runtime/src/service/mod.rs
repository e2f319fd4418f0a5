//! The concurrent orchestrator the server drives: creates (from a warm pool or through the
//! restore gates), pause, resume, kill, admission with a bounded FIFO queue, warm-pool refill,
//! and reaping of sandboxes whose VM died.
//!
//! Locking rule: the state mutex is a `std` mutex and is never held across an `.await`. Every
//! reservation taken is owned by a guard whose `Drop` gives it back, so a create cancelled at any
//! await point (a client disconnect drops the future) cannot leak capacity.

mod admission;
mod pause;
mod reaper;
#[cfg(test)]
mod tests;
mod types;
mod warm;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use firkin_admission::{CapacityLedger, ResourceBudget};
use firkin_artifacts::{
    DigestCache, SealedSnapshot, SnapshotArtifactIntegrity, SnapshotArtifactManifest,
};
use firkin_types::SandboxId;
use tokio::sync::{Notify, broadcast};

use crate::WARM_SNAPSHOT_RESTORE_METRIC;
use crate::gates::Gates;
use crate::restore::{IntegrityFailure, IntegritySource, SnapshotSessionLauncher, verify_sealed};
use crate::samples::BenchmarkSample;
use crate::session::SandboxSession;
use crate::warm_pool::PoolHealth;

use admission::{QueueAdmission, Waiter, grant_waiters, into_runtime_error};
pub use types::{
    CapacityStatus, PausedSandbox, RuntimeConfig, RuntimeError, SNAPSHOT_DESCRIPTOR, SandboxExit,
    SandboxSource, StartSandbox, StartedSandbox, TemplateSealError, TemplateSnapshot,
};

struct Active<S> {
    session: Arc<S>,
    budget: ResourceBudget,
    pausing: bool,
}

struct Warm<S> {
    session: Arc<S>,
    budget: ResourceBudget,
}

struct State<S> {
    ledger: CapacityLedger,
    active: HashMap<SandboxId, Active<S>>,
    starting: HashMap<SandboxId, ()>,
    warm: HashMap<PathBuf, VecDeque<Warm<S>>>,
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
}

struct Inner<L: SnapshotSessionLauncher> {
    launcher: L,
    config: RuntimeConfig,
    cache: Arc<DigestCache>,
    state: Mutex<State<L::Session>>,
    exits: broadcast::Sender<SandboxExit>,
    pool_targets: Mutex<HashMap<PathBuf, (TemplateSnapshot, usize)>>,
    /// Lock order: never held together with `state` or `pool_targets`.
    pool_health: Mutex<PoolHealth>,
    refill: Notify,
}

/// A launcher the concurrent runtime can drive: cloneable and shareable (warm-pool refills run
/// in the background), with sessions it manages and errors it keeps as sources. Implemented
/// for every such launcher.
pub trait RuntimeLauncher:
    SnapshotSessionLauncher<
        Session: SandboxSession,
        Error: std::error::Error + Send + Sync + 'static,
    > + Clone
    + Sync
    + 'static
{
}

impl<L> RuntimeLauncher for L where
    L: SnapshotSessionLauncher<
            Session: SandboxSession,
            Error: std::error::Error + Send + Sync + 'static,
        > + Clone
        + Sync
        + 'static
{
}

/// The orchestrator. Cheap to clone; all clones share one state.
pub struct SandboxRuntime<L: SnapshotSessionLauncher> {
    inner: Arc<Inner<L>>,
}

impl<L: SnapshotSessionLauncher> Clone for SandboxRuntime<L> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<L: SnapshotSessionLauncher> fmt::Debug for SandboxRuntime<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxRuntime")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section of the runtime (here and in its submodules) leaves the state
    // consistent before any call that could panic, so a poisoned lock still guards valid data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn stop_all<S: SandboxSession>(sessions: Vec<Arc<S>>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        // Outside a runtime (final teardown): dropping the sessions kills their VMs.
        return;
    };
    for s in sessions {
        handle.spawn(async move {
            if let Err(err) = s.stop().await {
                tracing::warn!(%err, "stopping evicted warm sandbox");
            }
        });
    }
}

impl<L> SandboxRuntime<L>
where
    L: RuntimeLauncher,
{
    pub fn new(launcher: L, config: RuntimeConfig, cache: Arc<DigestCache>) -> Self {
        let (exits, _) = broadcast::channel(256);
        Self {
            inner: Arc::new(Inner {
                launcher,
                state: Mutex::new(State {
                    ledger: CapacityLedger::new(config.capacity),
                    active: HashMap::new(),
                    starting: HashMap::new(),
                    warm: HashMap::new(),
                    waiters: VecDeque::new(),
                    next_ticket: 0,
                }),
                config,
                cache,
                exits,
                pool_targets: Mutex::new(HashMap::new()),
                pool_health: Mutex::new(PoolHealth::default()),
                refill: Notify::new(),
            }),
        }
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    pub fn digest_cache(&self) -> &DigestCache {
        &self.inner.cache
    }

    /// Sandboxes that died on their own (VM crashed or was killed outside firkin).
    pub fn exits(&self) -> broadcast::Receiver<SandboxExit> {
        self.inner.exits.subscribe()
    }

    pub fn capacity(&self) -> CapacityStatus {
        let st = lock(&self.inner.state);
        CapacityStatus {
            capacity: st.ledger.capacity(),
            active: st.ledger.active(),
            warm: st.ledger.warm(),
            queued: st.waiters.len(),
            running: st.active.len(),
            warm_sandboxes: st.warm.values().map(VecDeque::len).sum(),
        }
    }

    pub fn is_running(&self, id: &SandboxId) -> bool {
        lock(&self.inner.state)
            .active
            .get(id)
            .is_some_and(|a| a.session.is_alive())
    }

    pub fn running_ids(&self) -> Vec<SandboxId> {
        lock(&self.inner.state).active.keys().cloned().collect()
    }

    /// Loopback address of a guest port of a running sandbox.
    pub fn route(&self, id: &SandboxId, guest_port: u16) -> Option<SocketAddr> {
        let st = lock(&self.inner.state);
        let a = st.active.get(id)?;
        if a.pausing {
            return None;
        }
        a.session.port_addr(guest_port)
    }

    /// Replaces a running sandbox's egress policy (new connections see it at once).
    pub async fn set_egress(
        &self,
        id: &SandboxId,
        policy: &crate::session::EgressPolicy,
    ) -> Result<(), RuntimeError> {
        let session = {
            let st = lock(&self.inner.state);
            let a = st
                .active
                .get(id)
                .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
            Arc::clone(&a.session)
        };
        apply_egress(id, session.as_ref(), policy).await
    }

    /// Loopback address of a guest port of a running sandbox, forwarding the port first if it
    /// is not yet (the first request for a port a guest server listens on). `Ok(None)`: the
    /// sandbox is not running (or is being paused), or its backend cannot reach the port.
    pub async fn open_port(
        &self,
        id: &SandboxId,
        guest_port: u16,
    ) -> Result<Option<SocketAddr>, RuntimeError> {
        let session = {
            let st = lock(&self.inner.state);
            let Some(a) = st.active.get(id) else {
                return Ok(None);
            };
            if a.pausing {
                return Ok(None);
            }
            if let Some(addr) = a.session.port_addr(guest_port) {
                return Ok(Some(addr));
            }
            Arc::clone(&a.session)
        };
        // The session serialises forwards per sandbox; the state lock is not held across it.
        session
            .open_port(guest_port)
            .await
            .map_err(|e| RuntimeError::Port {
                sandbox_id: id.clone(),
                port: guest_port,
                reason: e.to_string(),
            })
    }

    pub fn pid(&self, id: &SandboxId) -> Option<u32> {
        lock(&self.inner.state).active.get(id)?.session.pid()
    }

    /// Creates (from a template) or resumes (from a continuation) a sandbox. Returns once its
    /// agent has accepted `/init`.
    pub async fn start(&self, req: StartSandbox) -> Result<StartedSandbox, RuntimeError> {
        let id = req.sandbox_id.clone();
        {
            let mut st = lock(&self.inner.state);
            if st.active.contains_key(&id) || st.starting.contains_key(&id) {
                return Err(RuntimeError::AlreadyRunning(id));
            }
            st.starting.insert(id.clone(), ());
        }
        let result = self.start_inner(req).await;
        lock(&self.inner.state).starting.remove(&id);
        // The refill loop stands aside while creates are in flight (see `refill_once`).
        self.inner.refill.notify_one();
        result
    }

    async fn start_inner(&self, req: StartSandbox) -> Result<StartedSandbox, RuntimeError> {
        let started = Instant::now();
        if let SandboxSource::Template(t) = &req.source
            && let Some(hot) = self.try_warm_checkout(t, &req, started).await?
        {
            return Ok(hot);
        }

        let (manifest, integrity, budget) = match &req.source {
            SandboxSource::Template(t) => (
                SnapshotArtifactManifest::base(t.template_id.as_str(), &t.descriptor),
                t.integrity.clone(),
                t.budget,
            ),
            SandboxSource::Continuation(p) => (
                SnapshotArtifactManifest::continuation(p.sandbox_id.as_str(), &p.descriptor),
                p.integrity.clone(),
                p.budget,
            ),
        };
        let mut probe = self.inner.config.disk_probe.clone();
        let mut launcher = self.inner.launcher.clone();
        let gates = Gates {
            manifest: &manifest,
            budget,
            disk_floor: self.inner.config.restore_disk_floor,
            disk_probe: &mut probe,
        };
        let passed = gates
            .pass(
                self.verify(&manifest, &integrity),
                &mut QueueAdmission(self),
                &mut launcher,
            )
            .await
            .map_err(into_runtime_error)?;
        let (session, held) = (Arc::new(passed.session), passed.held);
        let launch_time = passed.launch;
        if let Some(policy) = &req.network
            && let Err(err) = apply_egress(&req.sandbox_id, session.as_ref(), policy).await
        {
            let _ = session.stop().await;
            return Err(err);
        }
        let init_started = Instant::now();
        if let Err(err) = session.init(&req.init).await {
            let _ = session.stop().await;
            return Err(RuntimeError::Init(err.to_string()));
        }
        tracing::debug!(
            sandbox = %req.sandbox_id,
            gates_ms = passed.elapsed.saturating_sub(launch_time).as_secs_f64() * 1e3,
            launch_ms = launch_time.as_secs_f64() * 1e3,
            init_ms = init_started.elapsed().as_secs_f64() * 1e3,
            "restored and initialised"
        );
        let envd_addr = session.envd_addr();
        let pid = session.pid();
        self.register(&req.sandbox_id, session, budget);
        held.disarm();
        if let SandboxSource::Continuation(p) = &req.source {
            tracing::info!(sandbox = %req.sandbox_id, descriptor = %p.descriptor.display(), "resumed");
        }
        Ok(StartedSandbox {
            sandbox_id: req.sandbox_id,
            envd_addr,
            pid,
            budget,
            from_warm_pool: false,
            samples: vec![
                BenchmarkSample::latency(WARM_SNAPSHOT_RESTORE_METRIC, launch_time),
                BenchmarkSample::latency("sandbox_start", started.elapsed()),
            ],
        })
    }

    /// The integrity gate: the sealed descriptor and every component, through the digest cache.
    /// A cache miss hashes GiBs, so it runs on the blocking pool.
    fn verify(
        &self,
        manifest: &SnapshotArtifactManifest,
        integrity: &SnapshotArtifactIntegrity,
    ) -> impl std::future::Future<Output = Result<Option<SealedSnapshot>, IntegrityFailure>>
    + Send
    + 'static {
        let cache = Arc::clone(&self.inner.cache);
        let manifest = manifest.clone();
        let integrity = integrity.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                verify_sealed(&manifest, IntegritySource::Record(&integrity), &cache).map(Some)
            })
            .await
            .map_err(|join| IntegrityFailure::Aborted(join.to_string()))?
        }
    }

    /// Takes `budget` as an active reservation now, after evicting warm entries, or after
    /// Stops a running sandbox and gives its capacity back.
    pub async fn kill(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        let active = {
            let mut st = lock(&self.inner.state);
            let a = st
                .active
                .remove(id)
                .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
            if let Err(err) = st.ledger.release_active(a.budget) {
                tracing::error!(%err, "releasing a killed sandbox");
            }
            let evicted = grant_waiters(&mut st);
            drop(st);
            stop_all(evicted);
            a
        };
        self.inner.refill.notify_one();
        active.session.stop().await.map_err(|e| RuntimeError::Stop {
            sandbox_id: id.clone(),
            reason: e.to_string(),
        })
    }

    /// Stops every sandbox, warm or active. For shutdown.
    pub async fn shutdown(&self) {
        let sessions: Vec<Arc<L::Session>> = {
            let mut st = lock(&self.inner.state);
            let active: Vec<Active<L::Session>> = st.active.drain().map(|(_, a)| a).collect();
            let warm: Vec<Warm<L::Session>> = st.warm.drain().flat_map(|(_, q)| q).collect();
            // Only what these sessions hold is given back: creates still in flight hold
            // reservations of their own and return them when they end. (Resetting the whole
            // ledger here made each of those returns fail.)
            for a in &active {
                if let Err(err) = st.ledger.release_active(a.budget) {
                    tracing::error!(%err, "releasing a sandbox's capacity at shutdown");
                }
            }
            for w in &warm {
                if let Err(err) = st.ledger.release_warm(w.budget) {
                    tracing::error!(%err, "releasing a warm sandbox's capacity at shutdown");
                }
            }
            active
                .into_iter()
                .map(|a| a.session)
                .chain(warm.into_iter().map(|w| w.session))
                .collect()
        };
        for s in sessions {
            let _ = s.stop().await;
        }
    }
}

/// Applies `policy` to `session`, or says why it could not be.
pub(crate) async fn apply_egress<S: SandboxSession>(
    id: &SandboxId,
    session: &S,
    policy: &crate::session::EgressPolicy,
) -> Result<(), RuntimeError> {
    let err = |reason: String| RuntimeError::Network {
        sandbox_id: id.clone(),
        reason,
    };
    match session.set_egress(policy).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(err(
            "this backend has no network of its own per sandbox, so it cannot enforce an \
             egress policy"
                .into(),
        )),
        Err(e) => Err(err(e.to_string())),
    }
}
