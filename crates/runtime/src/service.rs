//! The concurrent orchestrator the server drives: creates (from a warm pool or through the
//! restore gates), pause, resume, kill, admission with a bounded FIFO queue, warm-pool refill,
//! and reaping of sandboxes whose VM died.
//!
//! Locking rule: the state mutex is a `std` mutex and is never held across an `.await`. Every
//! reservation taken is owned by a guard whose `Drop` gives it back, so a create cancelled at any
//! await point (a client disconnect drops the future) cannot leak capacity.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use firkin_admission::{
    AdmissionDecision, CapacityError, CapacityLedger, QueuePolicy, ResourceBudget, plan_admission,
};
use firkin_artifacts::{
    DigestCache, SealError, SealedSnapshot, SnapshotArtifactIntegrity, SnapshotArtifactKind,
    SnapshotArtifactManifest,
};
use firkin_types::{SandboxId, Size, TemplateId};
use tokio::sync::{Notify, broadcast, oneshot};

use crate::disk::{HostDiskProbe, check_disk_floor};
use crate::restore::{
    IntegrityFailure, IntegritySource, SnapshotRestoreRequest, SnapshotSessionLauncher,
    verify_sealed,
};
use crate::samples::BenchmarkSample;
use crate::session::{EnvdInit, SandboxSession};
use crate::warm_pool::{PoolHealth, WarmPoolStatus};
use crate::{
    DEFAULT_RESTORE_DISK_FLOOR, DEFAULT_WARM_POOL_DISK_FLOOR, WARM_SNAPSHOT_RESTORE_METRIC,
};

/// Descriptor file name of every sealed snapshot firkin writes. (The VMM's own restore
/// description, `snapshot.json`, is one of the components it seals.)
pub const SNAPSHOT_DESCRIPTOR: &str = "seal.json";

/// Tunables of a [`SandboxRuntime`].
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
}

impl RuntimeConfig {
    pub fn new(capacity: ResourceBudget) -> Self {
        Self {
            capacity,
            queue: QueuePolicy::default(),
            queue_wait: Duration::from_secs(30),
            restore_disk_floor: DEFAULT_RESTORE_DISK_FLOOR,
            warm_pool_disk_floor: DEFAULT_WARM_POOL_DISK_FLOOR,
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

impl TemplateSnapshot {
    fn pool_key(&self) -> PathBuf {
        self.descriptor.clone()
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
    Launch(String),
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

struct Active<S> {
    session: Arc<S>,
    budget: ResourceBudget,
    pausing: bool,
}

struct Warm<S> {
    session: Arc<S>,
    budget: ResourceBudget,
}

struct Waiter {
    ticket: u64,
    budget: ResourceBudget,
    grant: oneshot::Sender<()>,
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

/// Gives a reservation back on drop unless disarmed. Also wakes waiters.
struct Held<L>
where
    L: SnapshotSessionLauncher + Clone + Sync + 'static,
    L::Session: SandboxSession,
    L::Error: fmt::Display + Send,
{
    inner: Arc<Inner<L>>,
    budget: ResourceBudget,
    armed: bool,
}

impl<L> Drop for Held<L>
where
    L: SnapshotSessionLauncher + Clone + Sync + 'static,
    L::Session: SandboxSession,
    L::Error: fmt::Display + Send,
{
    fn drop(&mut self) {
        if self.armed {
            let mut st = lock(&self.inner.state);
            if let Err(err) = st.ledger.release_active(self.budget) {
                tracing::error!(%err, "releasing an abandoned reservation");
            }
            let evicted = grant_waiters(&mut st);
            drop(st);
            stop_all(evicted);
            self.inner.refill.notify_one();
        }
    }
}

/// A place in the admission queue. Settling it (or dropping it, when the create is cancelled)
/// either withdraws it from the queue or, if capacity was granted meanwhile, takes or returns
/// that capacity, so no grant is ever lost.
struct QueueTicket<L>
where
    L: SnapshotSessionLauncher + Clone + Sync + 'static,
    L::Session: SandboxSession,
    L::Error: fmt::Display + Send,
{
    inner: Arc<Inner<L>>,
    ticket: u64,
    budget: ResourceBudget,
    armed: bool,
}

enum TicketOutcome {
    /// Capacity was reserved for us; the caller now owns it.
    Granted,
    /// We left the queue before any grant.
    Withdrawn,
}

impl<L> QueueTicket<L>
where
    L: SnapshotSessionLauncher + Clone + Sync + 'static,
    L::Session: SandboxSession,
    L::Error: fmt::Display + Send,
{
    fn settle(mut self) -> TicketOutcome {
        self.armed = false;
        let mut st = lock(&self.inner.state);
        let before = st.waiters.len();
        st.waiters.retain(|w| w.ticket != self.ticket);
        if st.waiters.len() < before {
            // Leaving may unblock those behind us.
            let evicted = grant_waiters(&mut st);
            drop(st);
            stop_all(evicted);
            TicketOutcome::Withdrawn
        } else {
            TicketOutcome::Granted
        }
    }
}

impl<L> Drop for QueueTicket<L>
where
    L: SnapshotSessionLauncher + Clone + Sync + 'static,
    L::Session: SandboxSession,
    L::Error: fmt::Display + Send,
{
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = lock(&self.inner.state);
        let before = st.waiters.len();
        st.waiters.retain(|w| w.ticket != self.ticket);
        if st.waiters.len() == before {
            // Granted while the create was being cancelled: give the capacity back.
            if let Err(err) = st.ledger.release_active(self.budget) {
                tracing::error!(%err, "returning a grant of a cancelled create");
            }
        }
        let evicted = grant_waiters(&mut st);
        drop(st);
        stop_all(evicted);
    }
}

impl<L> Held<L>
where
    L: SnapshotSessionLauncher + Clone + Sync + 'static,
    L::Session: SandboxSession,
    L::Error: fmt::Display + Send,
{
    fn disarm(mut self) {
        self.armed = false;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves the state consistent before any call that could
    // panic, so a poisoned lock still guards valid data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hands freed capacity to waiters in FIFO order, evicting warm entries where that makes the
/// head fit. Stops at the first waiter that still does not fit: later, smaller requests must not
/// overtake it.
fn grant_waiters<S: SandboxSession>(st: &mut State<S>) -> Vec<Arc<S>> {
    let mut evicted = Vec::new();
    while let Some(head) = st.waiters.front() {
        let budget = head.budget;
        if st.ledger.check_active(budget).is_err() {
            if st.ledger.shortfall_after_evicting_warm(budget).is_some() {
                break;
            }
            evicted.extend(evict_warm_until_fits(st, budget));
        }
        if st.ledger.reserve_active(budget).is_err() {
            break;
        }
        let Some(waiter) = st.waiters.pop_front() else {
            break;
        };
        if waiter.grant.send(()).is_err() {
            // The waiter was cancelled between its timeout and ours; take the capacity back.
            let _ = st.ledger.release_active(budget);
        }
    }
    evicted
}

fn evict_warm_until_fits<S: SandboxSession>(
    st: &mut State<S>,
    budget: ResourceBudget,
) -> Vec<Arc<S>> {
    let mut evicted = Vec::new();
    while st.ledger.check_active(budget).is_err() {
        let key = st
            .warm
            .iter()
            .find(|(_, q)| !q.is_empty())
            .map(|(k, _)| k.clone());
        let Some(key) = key else { break };
        if let Some(w) = st.warm.get_mut(&key).and_then(VecDeque::pop_front) {
            if let Err(err) = st.ledger.release_warm(w.budget) {
                tracing::error!(%err, "evicting warm entry");
            }
            evicted.push(w.session);
        }
    }
    evicted
}

impl<L> SandboxRuntime<L>
where
    L: SnapshotSessionLauncher + Clone + Sync + 'static,
    L::Session: SandboxSession,
    L::Error: fmt::Display + Send,
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
        let sealed = self.verify(&manifest, &integrity).await?;
        self.check_floor(manifest.parent_dir(), self.inner.config.restore_disk_floor)?;
        let held = self.admit(budget).await?;

        let launch_started = Instant::now();
        let session = self.launch(&manifest, budget, &sealed).await?;
        let launch_time = launch_started.elapsed();
        if let Err(err) = session.init(&req.init).await {
            let _ = session.stop().await;
            return Err(RuntimeError::Init(err.to_string()));
        }
        tracing::debug!(
            sandbox = %req.sandbox_id,
            before_launch_ms = (launch_started - started).as_secs_f64() * 1e3,
            launch_ms = launch_time.as_secs_f64() * 1e3,
            init_ms = (started.elapsed() - launch_time - (launch_started - started)).as_secs_f64()
                * 1e3,
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

    async fn try_warm_checkout(
        &self,
        template: &TemplateSnapshot,
        req: &StartSandbox,
        started: Instant,
    ) -> Result<Option<StartedSandbox>, RuntimeError> {
        loop {
            let warm = {
                let mut st = lock(&self.inner.state);
                // Waiting creates have first claim on capacity; a warm checkout does not take new
                // capacity, so it may go ahead of them.
                let popped = st
                    .warm
                    .get_mut(&template.pool_key())
                    .and_then(VecDeque::pop_front);
                match popped {
                    Some(w) => match st.ledger.promote_warm(w.budget) {
                        Ok(()) => w,
                        Err(err) => {
                            tracing::error!(%err, "warm entry without warm reservation");
                            continue;
                        }
                    },
                    None => return Ok(None),
                }
            };
            let held = Held {
                inner: Arc::clone(&self.inner),
                budget: warm.budget,
                armed: true,
            };
            if !warm.session.is_alive() {
                drop(held);
                continue;
            }
            let checkout = started.elapsed();
            let init = EnvdInit {
                require_template_processes_only: true,
                ..req.init.clone()
            };
            if let Err(err) = warm.session.init(&init).await {
                tracing::warn!(%err, "warm sandbox refused /init; discarding it");
                let _ = warm.session.stop().await;
                drop(held);
                continue;
            }
            tracing::debug!(
                sandbox = %req.sandbox_id,
                checkout_ms = checkout.as_secs_f64() * 1e3,
                init_ms = (started.elapsed() - checkout).as_secs_f64() * 1e3,
                "warm checkout"
            );
            let envd_addr = warm.session.envd_addr();
            let pid = warm.session.pid();
            self.register(&req.sandbox_id, warm.session, warm.budget);
            held.disarm();
            return Ok(Some(StartedSandbox {
                sandbox_id: req.sandbox_id.clone(),
                envd_addr,
                pid,
                budget: warm.budget,
                from_warm_pool: true,
                samples: vec![
                    BenchmarkSample::latency("warm_pool_checkout", checkout),
                    BenchmarkSample::latency("sandbox_start", started.elapsed()),
                ],
            }));
        }
    }

    async fn verify(
        &self,
        manifest: &SnapshotArtifactManifest,
        integrity: &SnapshotArtifactIntegrity,
    ) -> Result<SealedSnapshot, RuntimeError> {
        let cache = Arc::clone(&self.inner.cache);
        let manifest2 = manifest.clone();
        let integrity = integrity.clone();
        // Hashing (on a cache miss) is blocking file I/O of possibly GiBs.
        let result = tokio::task::spawn_blocking(move || {
            verify_sealed(&manifest2, IntegritySource::Record(&integrity), &cache)
        })
        .await;
        let artifact = manifest.path().to_path_buf();
        match result {
            Ok(Ok(sealed)) => Ok(sealed),
            Ok(Err(source)) => Err(RuntimeError::Integrity { artifact, source }),
            Err(join) => Err(RuntimeError::Io {
                path: artifact,
                source: std::io::Error::other(join.to_string()),
            }),
        }
    }

    fn check_floor(&self, dir: &Path, floor: Size) -> Result<(), RuntimeError> {
        check_disk_floor(&mut HostDiskProbe, dir, floor)
            .map(|_| ())
            .map_err(|e| RuntimeError::Disk(e.as_capacity_error(floor)))
    }

    async fn launch(
        &self,
        manifest: &SnapshotArtifactManifest,
        budget: ResourceBudget,
        sealed: &SealedSnapshot,
    ) -> Result<Arc<L::Session>, RuntimeError> {
        let mut launcher = self.inner.launcher.clone();
        let request = SnapshotRestoreRequest::new(manifest, budget).with_sealed(sealed);
        launcher
            .restore_from_snapshot(&request)
            .await
            .map(Arc::new)
            .map_err(|e| RuntimeError::Launch(e.to_string()))
    }

    /// Takes `budget` as an active reservation now, after evicting warm entries, or after
    /// waiting in the FIFO queue.
    async fn admit(&self, budget: ResourceBudget) -> Result<Held<L>, RuntimeError> {
        let held = |inner: &Arc<Inner<L>>| Held {
            inner: Arc::clone(inner),
            budget,
            armed: true,
        };
        let (ticket, rx) = {
            let mut st = lock(&self.inner.state);
            let decision = plan_admission(
                &st.ledger,
                budget,
                st.waiters.len(),
                self.inner.config.queue,
            );
            match decision {
                AdmissionDecision::Admit => {
                    st.ledger
                        .reserve_active(budget)
                        .map_err(RuntimeError::Oversized)?;
                    return Ok(held(&self.inner));
                }
                AdmissionDecision::AdmitAfterEvictingWarm => {
                    let evicted = evict_warm_until_fits(&mut st, budget);
                    st.ledger
                        .reserve_active(budget)
                        .map_err(RuntimeError::Oversized)?;
                    drop(st);
                    stop_all(evicted);
                    return Ok(held(&self.inner));
                }
                AdmissionDecision::RejectOversized(e) => return Err(RuntimeError::Oversized(e)),
                AdmissionDecision::RejectQueueFull { max_pending } => {
                    return Err(RuntimeError::QueueFull { max_pending });
                }
                AdmissionDecision::Queue { position } => {
                    let (tx, rx) = oneshot::channel();
                    let ticket = st.next_ticket;
                    st.next_ticket += 1;
                    st.waiters.push_back(Waiter {
                        ticket,
                        budget,
                        grant: tx,
                    });
                    tracing::info!(position, %budget, "create queued for capacity");
                    (ticket, rx)
                }
            }
        };
        let ticket = QueueTicket {
            inner: Arc::clone(&self.inner),
            ticket,
            budget,
            armed: true,
        };
        let wait = self.inner.config.queue_wait;
        let granted = matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(())));
        match ticket.settle() {
            TicketOutcome::Granted => Ok(held(&self.inner)),
            TicketOutcome::Withdrawn if granted => Ok(held(&self.inner)),
            TicketOutcome::Withdrawn => Err(RuntimeError::QueueTimeout { waited: wait }),
        }
    }

    fn register(&self, id: &SandboxId, session: Arc<L::Session>, budget: ResourceBudget) {
        lock(&self.inner.state).active.insert(
            id.clone(),
            Active {
                session: Arc::clone(&session),
                budget,
                pausing: false,
            },
        );
        let rt = self.clone();
        let id = id.clone();
        tokio::spawn(async move {
            session.exited().await;
            rt.on_exit(&id, &session);
        });
    }

    fn on_exit(&self, id: &SandboxId, session: &Arc<L::Session>) {
        let mut st = lock(&self.inner.state);
        let ours = st
            .active
            .get(id)
            .is_some_and(|a| Arc::ptr_eq(&a.session, session) && !a.pausing);
        if !ours {
            return;
        }
        if let Some(a) = st.active.remove(id) {
            if let Err(err) = st.ledger.release_active(a.budget) {
                tracing::error!(%err, "releasing a dead sandbox");
            }
            let mut evicted = grant_waiters(&mut st);
            drop(st);
            // Stopping a dead VM cleans up what it left: run directory, overlay, sockets.
            evicted.push(a.session);
            stop_all(evicted);
            self.inner.refill.notify_one();
            tracing::warn!(sandbox = %id, "sandbox VM exited on its own");
            let _ = self.inner.exits.send(SandboxExit {
                sandbox_id: id.clone(),
                reason: "the sandbox VM exited".into(),
            });
        }
    }

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

    /// Saves a running sandbox as a sealed continuation snapshot in `dir`, stops it and gives
    /// its capacity back. On failure the sandbox keeps running when it still can.
    pub async fn pause(&self, id: &SandboxId, dir: &Path) -> Result<PausedSandbox, RuntimeError> {
        let (session, budget) = {
            let mut st = lock(&self.inner.state);
            let a = st
                .active
                .get_mut(id)
                .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
            if a.pausing {
                return Err(RuntimeError::NotFound(id.clone()));
            }
            a.pausing = true;
            (Arc::clone(&a.session), a.budget)
        };
        let result = self.pause_inner(id, &session, budget, dir).await;
        let mut st = lock(&self.inner.state);
        match &result {
            Ok(_) => {
                if st.active.remove(id).is_some()
                    && let Err(err) = st.ledger.release_active(budget)
                {
                    tracing::error!(%err, "releasing a paused sandbox");
                }
                let evicted = grant_waiters(&mut st);
                drop(st);
                stop_all(evicted);
                self.inner.refill.notify_one();
            }
            Err(_) => {
                if session.is_alive() {
                    if let Some(a) = st.active.get_mut(id) {
                        a.pausing = false;
                    }
                } else if st.active.remove(id).is_some() {
                    let _ = st.ledger.release_active(budget);
                    grant_waiters(&mut st);
                }
            }
        }
        result
    }

    async fn pause_inner(
        &self,
        id: &SandboxId,
        session: &Arc<L::Session>,
        budget: ResourceBudget,
        dir: &Path,
    ) -> Result<PausedSandbox, RuntimeError> {
        let io = |source| RuntimeError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let saved = session
            .save_continuation(dir)
            .await
            .map_err(|e| RuntimeError::Pause {
                sandbox_id: id.clone(),
                reason: e.to_string(),
            })?;
        let depends_on = saved.depends_on.clone();
        let cache = Arc::clone(&self.inner.cache);
        let dir2 = dir.to_path_buf();
        let id2 = id.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            let components: Vec<(&str, &str)> = saved
                .components
                .iter()
                .map(|(n, f)| (n.as_str(), f.as_str()))
                .collect();
            SealedSnapshot::seal(
                &dir2,
                SNAPSHOT_DESCRIPTOR,
                SnapshotArtifactKind::Continuation,
                id2.as_str(),
                &components,
                saved.machine.clone(),
                &cache,
            )
        })
        .await
        .map_err(|e| io(std::io::Error::other(e.to_string())))??;
        let descriptor = sealed.1.path().to_path_buf();
        let integrity = SnapshotArtifactIntegrity::from_path(&descriptor).map_err(|e| {
            RuntimeError::Integrity {
                artifact: descriptor.clone(),
                source: IntegrityFailure::Artifact(e),
            }
        })?;
        // save_continuation stopped the VM; make sure its run directory is gone too.
        let _ = session.stop().await;
        Ok(PausedSandbox {
            sandbox_id: id.clone(),
            descriptor,
            integrity,
            budget,
            depends_on,
        })
    }

    /// Keeps `depth` restored sandboxes of `template` ready (0 removes the target). A new build
    /// of a template replaces the pool of its earlier builds: their snapshots are pruned after
    /// a rebuild, so refilling them could only fail, and their entries can never be checked
    /// out. Call [`SandboxRuntime::run_warm_pool`] once to run the refill loop.
    pub fn set_warm_pool(&self, template: TemplateSnapshot, depth: usize) {
        let key = template.pool_key();
        let mut targets = lock(&self.inner.pool_targets);
        let superseded: Vec<PathBuf> = targets
            .iter()
            .filter(|(k, (t, _))| **k != key && t.template_id == template.template_id)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &superseded {
            targets.remove(k);
        }
        if depth == 0 {
            targets.remove(&key);
        } else {
            targets.insert(key.clone(), (template, depth));
        }
        drop(targets);
        let mut st = lock(&self.inner.state);
        let mut stale = Vec::new();
        for k in &superseded {
            for w in st.warm.remove(k).unwrap_or_default() {
                let _ = st.ledger.release_warm(w.budget);
                stale.push(w.session);
            }
        }
        let evicted = grant_waiters(&mut st);
        drop(st);
        stop_all(stale);
        stop_all(evicted);
        // Whoever sets a pool again may have fixed what failed it.
        lock(&self.inner.pool_health).nudge(&key);
        self.inner.refill.notify_one();
    }

    /// Every warm pool: its target, its ready entries and whether its refills are failing.
    pub fn warm_pools(&self) -> Vec<WarmPoolStatus> {
        let targets: Vec<(TemplateSnapshot, usize)> =
            lock(&self.inner.pool_targets).values().cloned().collect();
        let ready: Vec<usize> = {
            let st = lock(&self.inner.state);
            let alive =
                |q: &VecDeque<Warm<L::Session>>| q.iter().filter(|w| w.session.is_alive()).count();
            targets
                .iter()
                .map(|(t, _)| st.warm.get(&t.pool_key()).map_or(0, alive))
                .collect()
        };
        let health = lock(&self.inner.pool_health);
        let now = tokio::time::Instant::now();
        let mut pools: Vec<WarmPoolStatus> = targets
            .into_iter()
            .zip(ready)
            .map(|((t, target), ready)| WarmPoolStatus {
                failing: health.failure(&t.pool_key(), now),
                template_id: t.template_id,
                build_id: t.build_id,
                target,
                ready,
            })
            .collect();
        pools.sort_by(|a, b| a.template_id.cmp(&b.template_id));
        pools
    }

    /// The warm-pool refill loop: restores entries while targets are unmet, capacity is free,
    /// no create is waiting or in flight, and the warm-pool disk floor holds; a pool whose
    /// refills fail is retried with exponential backoff (1 s doubling to 5 min). Runs until the
    /// runtime is dropped by every other owner.
    pub async fn run_warm_pool(self) {
        // A dead warm entry or freed disk produces no event.
        const POLL: Duration = Duration::from_secs(5);
        let weak = Arc::downgrade(&self.inner);
        drop(self);
        loop {
            let Some(inner) = weak.upgrade() else { return };
            let rt = SandboxRuntime { inner };
            let progressed = rt.refill_once().await;
            let notified = {
                let inner = Arc::clone(&rt.inner);
                drop(rt);
                async move {
                    let n = inner.refill.notified();
                    // Also wake when a failing pool's backoff ends. Earlier wake-ups (creates,
                    // kills) find it not yet due, so they cannot shorten its backoff.
                    let now = tokio::time::Instant::now();
                    let wait = lock(&inner.pool_health)
                        .next_due()
                        .filter(|due| *due > now)
                        .map_or(POLL, |due| (due - now).min(POLL));
                    let _ = tokio::time::timeout(wait, n).await;
                }
            };
            if !progressed {
                notified.await;
            }
        }
    }

    /// One refill step. Returns whether it restored an entry.
    pub async fn refill_once(&self) -> bool {
        let targets: Vec<(TemplateSnapshot, usize)> =
            lock(&self.inner.pool_targets).values().cloned().collect();
        lock(&self.inner.pool_health)
            .retain(|key| targets.iter().any(|(t, _)| t.pool_key() == key));
        for (template, depth) in targets {
            let key = template.pool_key();
            let due = lock(&self.inner.pool_health).is_due(&key, tokio::time::Instant::now());
            {
                let mut st = lock(&self.inner.state);
                // Drop dead entries first.
                if let Some(q) = st.warm.get_mut(&key) {
                    let (alive, dead): (VecDeque<_>, VecDeque<_>) =
                        q.drain(..).partition(|w| w.session.is_alive());
                    *q = alive;
                    let mut gone = Vec::new();
                    for d in dead {
                        let _ = st.ledger.release_warm(d.budget);
                        gone.push(d.session);
                    }
                    stop_all(gone);
                }
                let have = st.warm.get(&key).map_or(0, VecDeque::len);
                // A refill is a restore: on a small host it competes for CPU with the creates
                // in flight (a checked-out entry's /init took 45-100 ms instead of ~10 ms while
                // its replacement was being restored), so it waits until they are done.
                if have >= depth || !due || !st.waiters.is_empty() || !st.starting.is_empty() {
                    continue;
                }
                if st.ledger.reserve_warm(template.budget).is_err() {
                    continue;
                }
            }
            let release_warm = |inner: &Inner<L>| {
                let mut st = lock(&inner.state);
                let _ = st.ledger.release_warm(template.budget);
                grant_waiters(&mut st)
            };
            let manifest =
                SnapshotArtifactManifest::base(template.template_id.as_str(), &template.descriptor);
            let outcome = async {
                let sealed = self.verify(&manifest, &template.integrity).await?;
                self.check_floor(
                    manifest.parent_dir(),
                    self.inner.config.warm_pool_disk_floor,
                )?;
                self.launch(&manifest, template.budget, &sealed).await
            }
            .await;
            match outcome {
                Ok(session) => {
                    session.warm_up().await;
                    lock(&self.inner.state)
                        .warm
                        .entry(key)
                        .or_default()
                        .push_back(Warm {
                            session,
                            budget: template.budget,
                        });
                    lock(&self.inner.pool_health).succeeded(&template);
                    return true;
                }
                Err(err) => {
                    let evicted = release_warm(&self.inner);
                    stop_all(evicted);
                    lock(&self.inner.pool_health).failed(&template, &err);
                }
            }
        }
        false
    }

    /// Stops every sandbox, warm or active. For shutdown.
    pub async fn shutdown(&self) {
        let sessions: Vec<Arc<L::Session>> = {
            let mut st = lock(&self.inner.state);
            let mut all: Vec<_> = st.active.drain().map(|(_, a)| a.session).collect();
            for (_, q) in st.warm.drain() {
                all.extend(q.into_iter().map(|w| w.session));
            }
            st.ledger = CapacityLedger::new(self.inner.config.capacity);
            all
        };
        for s in sessions {
            let _ = s.stop().await;
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! Orchestration logic against a recording launcher; the real QEMU launcher is exercised by
    //! the VM tests.
    use super::*;
    use crate::session::ContinuationSaved;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
        fail: bool,
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
            if self.fail {
                return Err(FakeError("qemu died".into()));
            }
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

    fn unit() -> ResourceBudget {
        ResourceBudget::new(1, Size::gib(1), Size::gib(1))
    }

    fn template(dir: &Path) -> TemplateSnapshot {
        std::fs::write(dir.join("ram.img"), vec![3u8; 4096]).unwrap();
        let cache = DigestCache::in_memory().with_racy_window(Duration::ZERO);
        let (_, manifest) = SealedSnapshot::seal(
            dir,
            SNAPSHOT_DESCRIPTOR,
            SnapshotArtifactKind::BaseTemplate,
            "base",
            &[("ram", "ram.img")],
            serde_json::json!({}),
            &cache,
        )
        .unwrap();
        TemplateSnapshot {
            template_id: TemplateId::new("base").unwrap(),
            build_id: "b1".into(),
            descriptor: manifest.path().to_path_buf(),
            integrity: SnapshotArtifactIntegrity::from_path(manifest.path()).unwrap(),
            budget: unit(),
        }
    }

    fn runtime(launcher: FakeLauncher, slots: u32) -> SandboxRuntime<FakeLauncher> {
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
        let t = template(dir.path());
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
        let t = template(dir.path());
        let rt = runtime(
            FakeLauncher {
                fail: true,
                ..FakeLauncher::default()
            },
            1,
        );
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
        let t = template(dir.path());
        std::fs::write(dir.path().join("ram.img"), vec![4u8; 4096]).unwrap();
        let launcher = FakeLauncher::default();
        let rt = runtime(launcher.clone(), 1);
        assert!(matches!(
            rt.start(start("a", &t)).await,
            Err(RuntimeError::Integrity { .. })
        ));
        assert_eq!(launcher.count(), 0);
        assert_eq!(rt.capacity().active, ResourceBudget::ZERO);
    }

    #[tokio::test]
    async fn queued_create_proceeds_when_capacity_frees() {
        let dir = tempfile::tempdir().unwrap();
        let t = template(dir.path());
        let rt = runtime(FakeLauncher::default(), 1);
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
        let t = template(dir.path());
        let mut rt = runtime(FakeLauncher::default(), 1);
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
        let t = template(dir.path());
        let rt = runtime(FakeLauncher::default(), 1);
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
        let t = template(dir.path());
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
        let t = template(dir.path());
        let launcher = FakeLauncher::default();
        let rt = runtime(launcher.clone(), 2);
        rt.set_warm_pool(t.clone(), 1);
        lock(&rt.inner.state).starting.insert(sid("busy"), ());
        assert!(!rt.refill_once().await, "refilled during a create");
        assert_eq!(launcher.count(), 0);
        lock(&rt.inner.state).starting.remove(&sid("busy"));
        assert!(rt.refill_once().await);
        assert_eq!(rt.capacity().warm_sandboxes, 1);
    }

    #[tokio::test]
    async fn active_creates_evict_warm_entries() {
        let dir = tempfile::tempdir().unwrap();
        let t = template(dir.path());
        let launcher = FakeLauncher::default();
        let rt = runtime(launcher.clone(), 1);
        // A warm entry of `t` fills the host; a create of another template must evict it.
        rt.set_warm_pool(t.clone(), 1);
        assert!(rt.refill_once().await);
        std::fs::create_dir_all(dir.path().join("other")).unwrap();
        let other = template(&dir.path().join("other"));
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
        let t = template(dir.path());
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
        let t = template(dir.path());
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
        let mut t = template(dir.path());
        t.budget = ResourceBudget::new(64, Size::gib(1), Size::gib(1));
        let rt = runtime(FakeLauncher::default(), 1);
        assert!(matches!(
            rt.start(start("a", &t)).await,
            Err(RuntimeError::Oversized(CapacityError::Cpu { .. }))
        ));
    }
}
