//! The server's shared state ([`App`]), its configuration, and the helpers every life-cycle
//! operation uses. The operations themselves live in [`crate::lifecycle`], one module per
//! concern, as further `impl App` blocks.
//!
//! Concurrency rule: every operation on one sandbox holds that sandbox's async lock from its
//! first read of the record to its last write, so a kill, a pause, a resume, a timeout and the
//! exit reaper never interleave on one sandbox. The database is written at the points where the
//! runtime's state changed (VM answered, continuation sealed, VM stopped), so it always describes
//! a state the server really was in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use firkin_admission::ResourceBudget;
use firkin_runtime::FirkinPaths;
use firkin_types::{SandboxId, Size};
use futures::future::{BoxFuture, Shared};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::OwnedMutexGuard;

use crate::auth::KeyRing;
use crate::error::ApiError;
use crate::lifecycle::MetricsHistory;
use crate::orchestrator::Orchestrator;
use crate::store::{RecordState, SandboxRecord, Store, StoreError};
use crate::templates::{BuildProgress, TemplateBuilder};

/// The envd protocol version firkin's agent speaks (must equal `firkin_envd::http::ENVD_VERSION`;
/// an integration test checks it against a running agent). 0.6.4 unlocks every SDK feature gate.
pub const ENVD_VERSION: &str = "0.6.4";

/// The template `firkin serve` builds on first use and SDKs create from by default.
pub const DEFAULT_TEMPLATE: &str = firkin_e2b_wire::DEFAULT_TEMPLATE;

/// `clientID` of every sandbox (the SDK requires the key and ignores the value).
pub const CLIENT_ID: &str = "firkin";

/// Default resources of a template built without explicit sizes.
pub const DEFAULT_TEMPLATE_BUDGET: ResourceBudget =
    ResourceBudget::new(2, Size::mib(512), Size::gib(2));

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub paths: FirkinPaths,
    /// Domain for `{port}-{id}.{domain}` host routing; also returned as the sandbox `domain`.
    pub domain: Option<String>,
    /// Longest lifetime a sandbox may be given.
    pub max_timeout: Duration,
    /// Largest control-plane request body.
    pub body_limit: usize,
    /// Warm-pool depth per template.
    pub warm_pools: BTreeMap<String, usize>,
    /// How long a create waits for a build of its template that is still running.
    pub template_wait: Duration,
    /// Period of the timeout and reconcile loop.
    pub tick: Duration,
    /// Whether the runtime gives each sandbox a network of its own and so can enforce egress
    /// policies (`allow_internet_access`, `network.allowOut/denyOut`); without it they are
    /// refused with 400.
    pub egress_control: bool,
}

impl ServerConfig {
    pub fn new(paths: FirkinPaths) -> Self {
        Self {
            paths,
            domain: None,
            max_timeout: Duration::from_secs(24 * 3600),
            body_limit: 1024 * 1024,
            warm_pools: BTreeMap::from([("base".to_owned(), 1)]),
            // Below the SDK's 60 s request timeout: past it, a 503 with Retry-After lets the SDK
            // retry instead of abandoning a create that would then run for nobody.
            template_wait: Duration::from_secs(50),
            tick: Duration::from_millis(250),
            egress_control: false,
        }
    }
}

/// Per-sandbox async locks.
#[derive(Debug, Default)]
pub(crate) struct Locks {
    map: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Locks {
    fn entry(&self, id: &SandboxId) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(
            self.map
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(id.clone())
                .or_default(),
        )
    }

    pub(crate) async fn lock(&self, id: &SandboxId) -> OwnedMutexGuard<()> {
        self.entry(id).lock_owned().await
    }

    pub(crate) fn try_lock(&self, id: &SandboxId) -> Option<OwnedMutexGuard<()>> {
        self.entry(id).try_lock_owned().ok()
    }

    /// Drops the lock of a deleted sandbox (holders of a clone keep theirs).
    pub(crate) fn forget(&self, id: &SandboxId) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

/// A create in flight or done, shared by every request with its idempotency key.
pub(crate) type CreateFuture = Shared<BoxFuture<'static, Result<SandboxRecord, ApiError>>>;

/// Creates by `Idempotency-Key`: a retry of a create joins (or reads) the first attempt's result
/// instead of making a second sandbox.
#[derive(Default)]
pub(crate) struct Idempotency {
    map: Mutex<HashMap<String, (Instant, CreateFuture)>>,
}

/// How long an idempotency key is remembered.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(3600);

impl Idempotency {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (Instant, CreateFuture)>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn get_or_insert(
        &self,
        key: String,
        make: impl FnOnce() -> CreateFuture,
    ) -> CreateFuture {
        let mut map = self.lock();
        map.entry(key)
            .or_insert_with(|| (Instant::now(), make()))
            .1
            .clone()
    }

    pub(crate) fn forget(&self, key: &str, fut: &CreateFuture) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|(_, f)| f.ptr_eq(fut)) {
            map.remove(key);
        }
    }

    pub(crate) fn expire(&self) {
        self.lock()
            .retain(|_, (at, _)| at.elapsed() < IDEMPOTENCY_TTL);
    }
}

pub(crate) struct LiveBuild {
    pub(crate) build_id: String,
    pub(crate) progress: BuildProgress,
}

/// Everything the handlers share.
pub struct App {
    pub(crate) rt: Arc<dyn Orchestrator>,
    pub(crate) store: Store,
    pub(crate) config: ServerConfig,
    pub(crate) keys: KeyRing,
    pub(crate) locks: Locks,
    pub(crate) idempotency: Idempotency,
    pub(crate) builder: Arc<dyn TemplateBuilder>,
    pub(crate) builds: Mutex<HashMap<String, LiveBuild>>,
    pub(crate) expiring: Mutex<HashSet<SandboxId>>,
    pub(crate) client: crate::upstream::GuestClient,
    pub(crate) metric_history: MetricsHistory,
    /// COPY steps' uploaded files (issue 14), in the cache: shared by every state directory.
    pub(crate) build_files: crate::build_files::BuildFiles,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(crate) fn rfc3339_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

pub(crate) fn secs_ms(secs: i64) -> i64 {
    secs.saturating_mul(1000)
}

pub(crate) fn store_err(err: StoreError) -> ApiError {
    tracing::error!(%err, "state database");
    ApiError::internal(format!("state database: {err}"))
}

impl App {
    pub(crate) fn new(
        rt: Arc<dyn Orchestrator>,
        store: Store,
        config: ServerConfig,
        keys: KeyRing,
        builder: Arc<dyn TemplateBuilder>,
    ) -> Self {
        Self {
            rt,
            store,
            keys,
            locks: Locks::default(),
            idempotency: Idempotency::default(),
            builder,
            builds: Mutex::new(HashMap::new()),
            expiring: Mutex::new(HashSet::new()),
            client: crate::upstream::http_client(),
            metric_history: MetricsHistory::default(),
            build_files: crate::build_files::BuildFiles::new(
                config.paths.cache_dir().join("build-files"),
            ),
            config,
        }
    }

    /// A lifetime in seconds, between `min` and the configured maximum.
    pub(crate) fn validate_timeout(
        &self,
        what: &str,
        secs: i64,
        min: i64,
    ) -> Result<i64, ApiError> {
        let max = i64::try_from(self.config.max_timeout.as_secs()).unwrap_or(i64::MAX);
        if !(min..=max).contains(&secs) {
            return Err(ApiError::bad_request(format!(
                "{what} must be between {min} and {max} seconds, got {secs}"
            )));
        }
        Ok(secs)
    }

    /// A sandbox the SDK may see (running or paused).
    pub(crate) fn visible(&self, id: &SandboxId) -> Result<SandboxRecord, ApiError> {
        match self.store.sandbox(id).map_err(store_err)? {
            Some(r) if r.state != RecordState::Starting => Ok(r),
            _ => Err(ApiError::sandbox_not_found(id.as_str())),
        }
    }

    /// Deletes a sandbox's record, lock and snapshot directories. Call with its lock held.
    pub(crate) fn forget(&self, id: &SandboxId) {
        let snapshots_dir = self.config.paths.snapshots_dir();
        if let Err(err) = delete_sandbox(&self.store, id, &snapshots_dir) {
            tracing::error!(sandbox = %id, %err, "cannot delete sandbox record");
            // The sandbox is given up either way; its snapshots go with it.
            remove_dir(&snapshots_dir.join(id.as_str()));
        }
        self.locks.forget(id);
        self.metric_history.forget(id);
    }
}

/// Deletes a sandbox's record and then its snapshot directories (after the commit: a crash in
/// between leaves directories the start-up clean-up removes, never a record without its files).
pub(crate) fn delete_sandbox(
    store: &Store,
    id: &SandboxId,
    snapshots_dir: &Path,
) -> Result<(), StoreError> {
    for s in store.delete_sandbox(id)? {
        remove_dir(&s.dir);
    }
    remove_dir(&snapshots_dir.join(id.as_str()));
    Ok(())
}

/// Removes `dir` and what is in it, detaching mounts inside it first: an interrupted
/// template build leaves its tree's `/proc`, `/sys` and `/dev` mounts behind.
pub(crate) fn remove_dir(dir: &Path) {
    if let Err(err) = firkin_runtime::qemu::remove_tree(dir) {
        tracing::warn!(dir = %dir.display(), %err, "cannot remove directory");
    }
}

pub(crate) fn remove_empty_dir(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}
