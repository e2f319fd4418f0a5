//! The server's state and every sandbox life-cycle operation: create, kill, pause, resume,
//! timeouts, reacting to VMs that die, template builds.
//!
//! Concurrency rule: every operation on one sandbox holds that sandbox's async lock from its
//! first read of the record to its last write, so a kill, a pause, a resume, a timeout and the
//! exit reaper never interleave on one sandbox. The database is written at the points where the
//! runtime's state changed (VM answered, continuation sealed, VM stopped), so it always describes
//! a state the server really was in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use base64::Engine;
use firkin_admission::ResourceBudget;
use firkin_artifacts::{DigestCache, SnapshotArtifactIntegrity};
use firkin_e2b_contract::ENVD_PORT;
use firkin_e2b_wire::{
    ListedSandbox, OnTimeout, Sandbox, SandboxCreateRequest, SandboxDetail, SandboxLifecycle,
    SandboxMetric, SandboxState,
};
use firkin_runtime::{
    EnvdInit, FirkinPaths, PausedSandbox, RuntimeError, SandboxSource, StartSandbox,
    TemplateSnapshot,
};
use firkin_types::{SandboxId, Size, TemplateId};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use rand::RngCore;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::OwnedMutexGuard;

use crate::auth::{KeyRing, generate_token, random_alnum};
use crate::error::ApiError;
use crate::orchestrator::Orchestrator;
use crate::procfs;
use crate::store::{
    BuildRecord, BuildStatus, RecordState, SandboxRecord, SnapshotRecord, Store, StoreError,
    TemplateRecord,
};
use crate::templates::{
    BuildProgress, TemplateBuildRequest, TemplateBuilder, build_fingerprint,
    write_template_manifest,
};
use crate::types::{BuildStatusResponse, BuildTemplateRequest};

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
    fn forget(&self, id: &SandboxId) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

type CreateFuture = Shared<BoxFuture<'static, Result<Sandbox, ApiError>>>;

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

    fn get_or_insert(&self, key: String, make: impl FnOnce() -> CreateFuture) -> CreateFuture {
        let mut map = self.lock();
        map.entry(key)
            .or_insert_with(|| (Instant::now(), make()))
            .1
            .clone()
    }

    fn forget(&self, key: &str, fut: &CreateFuture) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|(_, f)| f.ptr_eq(fut)) {
            map.remove(key);
        }
    }

    fn expire(&self) {
        self.lock()
            .retain(|_, (at, _)| at.elapsed() < IDEMPOTENCY_TTL);
    }
}

struct LiveBuild {
    build_id: String,
    progress: BuildProgress,
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
    builds: Mutex<HashMap<String, LiveBuild>>,
    expiring: Mutex<HashSet<SandboxId>>,
    pub(crate) client: Client<HttpConnector, Body>,
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

fn secs_ms(secs: i64) -> i64 {
    secs.saturating_mul(1000)
}

fn store_err(err: StoreError) -> ApiError {
    tracing::error!(%err, "state database");
    ApiError::internal(format!("state database: {err}"))
}

/// How long a shutdown spends pausing auto-pause sandboxes.
const SHUTDOWN_PAUSE_LIMIT: Duration = Duration::from_secs(30);

/// The proxy's HTTP/1.1 client, also used for envd calls (metrics).
pub(crate) fn http_client() -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

#[derive(Debug, Deserialize)]
struct EnvdMetrics {
    ts: i64,
    cpu_count: u32,
    cpu_used_pct: f64,
    mem_total: u64,
    mem_used: u64,
    #[serde(default)]
    mem_cache: u64,
    disk_used: u64,
    disk_total: u64,
}

fn validate_vars(what: &str, vars: &BTreeMap<String, String>, names: bool) -> Result<(), ApiError> {
    const MAX_ENTRIES: usize = 1000;
    if vars.len() > MAX_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "{what} has {} entries; at most {MAX_ENTRIES} are allowed",
            vars.len()
        )));
    }
    for (k, v) in vars {
        if k.is_empty() || k.len() > 1024 {
            return Err(ApiError::bad_request(format!(
                "{what} key {k:?} must be 1-1024 bytes"
            )));
        }
        if k.contains('\0') || v.contains('\0') || (names && k.contains('=')) {
            return Err(ApiError::bad_request(format!(
                "{what} entry {k:?} contains a forbidden character (NUL{})",
                if names { " or '='" } else { "" }
            )));
        }
    }
    Ok(())
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
            config,
            keys,
            locks: Locks::default(),
            idempotency: Idempotency::default(),
            builder,
            builds: Mutex::new(HashMap::new()),
            expiring: Mutex::new(HashSet::new()),
            client: http_client(),
        }
    }

    fn validate_timeout(&self, what: &str, secs: i64) -> Result<i64, ApiError> {
        let max = i64::try_from(self.config.max_timeout.as_secs()).unwrap_or(i64::MAX);
        if !(1..=max).contains(&secs) {
            return Err(ApiError::bad_request(format!(
                "{what} must be between 1 and {max} seconds, got {secs}"
            )));
        }
        Ok(secs)
    }

    // ------------------------------------------------------------------ DTOs

    pub(crate) fn sandbox_dto(&self, r: &SandboxRecord) -> Sandbox {
        Sandbox {
            template_id: r.template_id.clone(),
            sandbox_id: r.sandbox_id.to_string(),
            client_id: CLIENT_ID.to_owned(),
            envd_version: ENVD_VERSION.to_owned(),
            alias: Some(r.template_id.clone()),
            envd_access_token: Some(r.access_token.clone()),
            traffic_access_token: None,
            domain: self.config.domain.clone(),
        }
    }

    pub(crate) fn listed_dto(&self, r: &SandboxRecord) -> ListedSandbox {
        ListedSandbox {
            template_id: r.template_id.clone(),
            sandbox_id: r.sandbox_id.to_string(),
            client_id: CLIENT_ID.to_owned(),
            started_at: rfc3339_ms(r.started_ms),
            end_at: rfc3339_ms(r.end_ms),
            envd_version: ENVD_VERSION.to_owned(),
            cpu_count: r.budget.cpus,
            memory_mb: r.budget.memory.as_mib(),
            disk_size_mb: r.budget.disk.as_mib(),
            state: public_state(r.state),
            alias: Some(r.template_id.clone()),
            metadata: r.metadata.clone(),
        }
    }

    pub(crate) fn detail_dto(&self, r: &SandboxRecord) -> SandboxDetail {
        SandboxDetail {
            template_id: r.template_id.clone(),
            sandbox_id: r.sandbox_id.to_string(),
            client_id: CLIENT_ID.to_owned(),
            started_at: rfc3339_ms(r.started_ms),
            end_at: rfc3339_ms(r.end_ms),
            envd_version: ENVD_VERSION.to_owned(),
            cpu_count: r.budget.cpus,
            memory_mb: r.budget.memory.as_mib(),
            disk_size_mb: r.budget.disk.as_mib(),
            state: public_state(r.state),
            alias: Some(r.template_id.clone()),
            metadata: r.metadata.clone(),
            envd_access_token: Some(r.access_token.clone()),
            allow_internet_access: Some(true),
            domain: self.config.domain.clone(),
            lifecycle: Some(SandboxLifecycle {
                auto_resume: r.auto_resume,
                on_timeout: if r.auto_pause {
                    OnTimeout::Pause
                } else {
                    OnTimeout::Kill
                },
            }),
        }
    }

    /// A sandbox the SDK may see (running or paused).
    pub(crate) fn visible(&self, id: &SandboxId) -> Result<SandboxRecord, ApiError> {
        match self.store.sandbox(id).map_err(store_err)? {
            Some(r) if r.state != RecordState::Starting => Ok(r),
            _ => Err(ApiError::sandbox_not_found(id.as_str())),
        }
    }

    // ------------------------------------------------------------------ create

    /// `POST /v2/sandboxes`, optionally deduplicated by an idempotency key. The create itself
    /// runs in its own task: a client that disconnects must not cancel a half-done restore.
    pub(crate) async fn create_idempotent(
        self: &Arc<Self>,
        req: SandboxCreateRequest,
        key: Option<String>,
    ) -> Result<Sandbox, ApiError> {
        let spawn = {
            let app = Arc::clone(self);
            move || -> CreateFuture {
                let handle = tokio::spawn(async move { app.create(req).await });
                async move {
                    handle.await.unwrap_or_else(|err| {
                        tracing::error!(%err, "create task failed");
                        Err(ApiError::internal(format!("create task failed: {err}")))
                    })
                }
                .boxed()
                .shared()
            }
        };
        match key {
            Some(key) => {
                let fut = self.idempotency.get_or_insert(key.clone(), spawn);
                let result = fut.clone().await;
                if result.is_err() {
                    // Only successes are remembered: a retry of a failed create (a 429, say)
                    // must try again, not replay the failure.
                    self.idempotency.forget(&key, &fut);
                }
                result
            }
            None => spawn().await,
        }
    }

    async fn create(self: Arc<Self>, req: SandboxCreateRequest) -> Result<Sandbox, ApiError> {
        let timeout = self.validate_timeout("timeout", req.timeout)?;
        validate_vars("metadata", &req.metadata, false)?;
        validate_vars("envVars", &req.env_vars, true)?;
        refuse_unsupported(&req)?;
        let template = self.resolve_template(&req.template_id).await?;
        let snapshot = template_snapshot(&template)?;

        let sandbox_id = SandboxId::new(random_alnum(20))
            .map_err(|e| ApiError::internal(format!("generating a sandbox id: {e}")))?;
        let _guard = self.locks.lock(&sandbox_id).await;
        let now = now_ms();
        let mut record = SandboxRecord {
            seq: 0,
            sandbox_id: sandbox_id.clone(),
            template_id: template.template_id.clone(),
            build_id: template.build_id.clone(),
            state: RecordState::Starting,
            metadata: req.metadata,
            env_vars: req.env_vars,
            access_token: generate_token(),
            timeout_secs: timeout,
            auto_pause: req.auto_pause.unwrap_or(false),
            auto_resume: req.auto_resume.is_some_and(|a| a.enabled),
            budget: template.budget,
            started_ms: now,
            end_ms: now + secs_ms(timeout),
            pid: None,
            pid_start: None,
            snapshot: None,
            created_ms: now,
        };
        record.seq = self.store.insert_sandbox(&record).map_err(store_err)?;

        let started = self
            .rt
            .start(StartSandbox {
                sandbox_id: sandbox_id.clone(),
                source: SandboxSource::Template(snapshot),
                init: envd_init(&record),
            })
            .await;
        let started = match started {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(sandbox = %sandbox_id, template = %template.template_id, %err, "create failed");
                self.forget(&sandbox_id);
                return Err(ApiError::from_runtime(&err));
            }
        };
        // The lifetime starts when the sandbox is usable, not when the request arrived.
        let ready = now_ms();
        record.state = RecordState::Running;
        record.started_ms = ready;
        record.end_ms = ready + secs_ms(timeout);
        record.pid = started.pid;
        record.pid_start = started.pid.and_then(procfs::start_time);
        let marked = self.store.mark_running(
            &sandbox_id,
            record.pid,
            record.pid_start,
            record.started_ms,
            record.end_ms,
        );
        if !matches!(marked, Ok(true)) {
            // Without a record the sandbox would be invisible and unkillable: stop it.
            let _ = self.rt.kill(&sandbox_id).await;
            self.forget(&sandbox_id);
            return Err(match marked {
                Err(e) => store_err(e),
                Ok(_) => ApiError::internal("sandbox record vanished during create"),
            });
        }
        tracing::info!(
            sandbox = %sandbox_id,
            template = %template.template_id,
            warm = started.from_warm_pool,
            ms = ready - now,
            "sandbox created"
        );
        Ok(self.sandbox_dto(&record))
    }

    /// The template a create names, waiting for a build of it that is in progress.
    async fn resolve_template(&self, raw: &str) -> Result<TemplateRecord, ApiError> {
        let id = TemplateId::new(raw)
            .map_err(|e| ApiError::bad_request(format!("invalid templateID: {e}")))?;
        if let Some(t) = self.store.template(id.as_str()).map_err(store_err)? {
            return Ok(t);
        }
        let live = self.live_build(id.as_str());
        if let Some(progress) = live {
            tracing::info!(template = %id, "create waits for the template build");
            match tokio::time::timeout(self.config.template_wait, progress.wait()).await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    return Err(ApiError::not_found(format!(
                        "template {id:?} failed to build: {reason}"
                    )));
                }
                Err(_) => {
                    return Err(ApiError::new(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("template {id:?} is still being built; retry shortly"),
                    )
                    .retry_after(Duration::from_secs(10)));
                }
            }
            if let Some(t) = self.store.template(id.as_str()).map_err(store_err)? {
                return Ok(t);
            }
        }
        Err(ApiError::not_found(format!(
            "template {id:?} not found; build it with `firkin template build {id}`"
        )))
    }

    /// Deletes a sandbox's record, lock and snapshot directories. Call with its lock held.
    fn forget(&self, id: &SandboxId) {
        match self.store.delete_sandbox(id) {
            Ok(snaps) => {
                for s in snaps {
                    remove_dir(&s.dir);
                }
            }
            Err(err) => tracing::error!(sandbox = %id, %err, "cannot delete sandbox record"),
        }
        remove_dir(&self.config.paths.snapshots_dir().join(id.as_str()));
        self.locks.forget(id);
    }

    // ------------------------------------------------------------------ kill

    pub(crate) async fn kill(&self, id: &SandboxId) -> Result<(), ApiError> {
        let _guard = self.locks.lock(id).await;
        let record = self.visible(id)?;
        self.kill_locked(&record).await;
        Ok(())
    }

    async fn kill_locked(&self, record: &SandboxRecord) {
        let id = &record.sandbox_id;
        if record.state != RecordState::Paused {
            match self.rt.kill(id).await {
                Ok(()) | Err(RuntimeError::NotFound(_)) => {}
                // The runtime has let go of it either way; its run directory is the launcher's.
                Err(err) => tracing::warn!(sandbox = %id, %err, "stopping sandbox"),
            }
        }
        self.forget(id);
        tracing::info!(sandbox = %id, "sandbox killed");
    }

    // ------------------------------------------------------------------ pause / resume

    /// Returns `false` if the sandbox was already paused (409 for the SDK).
    pub(crate) async fn pause(&self, id: &SandboxId) -> Result<bool, ApiError> {
        let _guard = self.locks.lock(id).await;
        let record = self.visible(id)?;
        if record.state == RecordState::Paused {
            return Ok(false);
        }
        self.pause_locked(&record).await?;
        Ok(true)
    }

    async fn pause_locked(&self, record: &SandboxRecord) -> Result<(), ApiError> {
        let id = &record.sandbox_id;
        let snapshot_id = random_alnum(12);
        let dir = self
            .config
            .paths
            .snapshots_dir()
            .join(id.as_str())
            .join(&snapshot_id);
        let started = Instant::now();
        match self.rt.pause(id, &dir).await {
            Ok(paused) => {
                let snap = SnapshotRecord {
                    snapshot_id,
                    sandbox_id: id.clone(),
                    dir,
                    descriptor: paused.descriptor,
                    integrity: paused.integrity,
                    created_ms: now_ms(),
                };
                if let Err(err) = self.store.mark_paused(id, &snap) {
                    // The VM is gone and the database does not know the snapshot: nothing could
                    // ever resume it, so do not keep it.
                    self.forget(id);
                    return Err(store_err(err));
                }
                tracing::info!(sandbox = %id, ms = started.elapsed().as_millis() as u64, "sandbox paused");
                self.drop_superseded_snapshots(id, &paused.depends_on);
                self.warm_digests_later(snap.descriptor, snap.integrity);
                Ok(())
            }
            Err(err) => {
                remove_dir(&dir);
                if self.rt.is_running(id) {
                    tracing::warn!(sandbox = %id, %err, "pause failed; sandbox keeps running");
                    Err(ApiError::from_runtime(&err))
                } else {
                    tracing::warn!(sandbox = %id, %err, "pause failed and the sandbox is gone");
                    self.forget(id);
                    Err(ApiError::sandbox_not_found(id.as_str()))
                }
            }
        }
    }

    /// A sandbox paused again no longer needs its earlier continuations (the new one's disk was
    /// flattened onto the template): each held a full RAM image, ~130 MiB on disk for `base`.
    /// Failing here only leaves files behind; the pause itself succeeded.
    fn drop_superseded_snapshots(&self, id: &SandboxId, depends_on: &[PathBuf]) {
        match self.store.drop_superseded_snapshots(id, depends_on) {
            Ok(dirs) => {
                for dir in &dirs {
                    remove_dir(dir);
                }
                if !dirs.is_empty() {
                    tracing::debug!(sandbox = %id, removed = dirs.len(), "earlier continuations deleted");
                }
            }
            Err(err) => tracing::warn!(sandbox = %id, %err, "keeping earlier continuations"),
        }
    }

    /// A pause has just written its snapshot, too recently for the digest cache to keep the
    /// digests the seal computed (see `DigestCache`'s racy window), so a resume would hash the
    /// whole RAM image again. Hashing once more just past the window, in the background, makes
    /// a later resume's integrity check one `stat` per file.
    fn warm_digests_later(&self, descriptor: PathBuf, integrity: SnapshotArtifactIntegrity) {
        let rt = Arc::clone(&self.rt);
        tokio::spawn(async move {
            tokio::time::sleep(DigestCache::DEFAULT_RACY_WINDOW + Duration::from_millis(250)).await;
            // A snapshot resumed or deleted meanwhile fails here harmlessly; a restore verifies
            // on its own either way.
            if let Err(err) = rt.warm_digests(descriptor, integrity).await {
                tracing::debug!(%err, "pre-hashing a paused sandbox's snapshot");
            }
        });
    }

    /// `connect`: a running sandbox is returned as is (its lifetime extended to `timeout` if
    /// given); a paused one is resumed. Returns whether it was resumed.
    pub(crate) async fn connect(
        &self,
        id: &SandboxId,
        timeout: Option<i64>,
    ) -> Result<(Sandbox, bool), ApiError> {
        let timeout = timeout
            .map(|t| self.validate_timeout("timeout", t))
            .transpose()?;
        let _guard = self.locks.lock(id).await;
        let mut record = self.visible(id)?;
        match record.state {
            RecordState::Running => {
                if let Some(t) = timeout {
                    let end = record.end_ms.max(now_ms() + secs_ms(t));
                    self.store.set_end(id, end).map_err(store_err)?;
                    record.end_ms = end;
                }
                Ok((self.sandbox_dto(&record), false))
            }
            RecordState::Paused => {
                self.resume_locked(&mut record, timeout).await?;
                Ok((self.sandbox_dto(&record), true))
            }
            RecordState::Starting => Err(ApiError::sandbox_not_found(id.as_str())),
        }
    }

    async fn resume_locked(
        &self,
        record: &mut SandboxRecord,
        timeout: Option<i64>,
    ) -> Result<(), ApiError> {
        let id = record.sandbox_id.clone();
        let Some(snap) = record.snapshot.clone() else {
            self.forget(&id);
            return Err(ApiError::sandbox_not_found(id.as_str()));
        };
        let begun = Instant::now();
        let started = self
            .rt
            .start(StartSandbox {
                sandbox_id: id.clone(),
                source: SandboxSource::Continuation(PausedSandbox {
                    sandbox_id: id.clone(),
                    descriptor: snap.descriptor.clone(),
                    integrity: snap.integrity.clone(),
                    budget: record.budget,
                    depends_on: Vec::new(),
                }),
                init: envd_init(record),
            })
            .await
            .map_err(|err| {
                tracing::warn!(sandbox = %id, %err, "resume failed; sandbox stays paused");
                ApiError::from_runtime(&err)
            })?;
        let now = now_ms();
        record.state = RecordState::Running;
        record.end_ms = now + secs_ms(timeout.unwrap_or(record.timeout_secs));
        record.pid = started.pid;
        record.pid_start = started.pid.and_then(procfs::start_time);
        let marked = self.store.mark_running(
            &id,
            record.pid,
            record.pid_start,
            record.started_ms,
            record.end_ms,
        );
        if !matches!(marked, Ok(true)) {
            let _ = self.rt.kill(&id).await;
            return Err(match marked {
                Err(e) => store_err(e),
                Ok(_) => ApiError::internal("sandbox record vanished during resume"),
            });
        }
        tracing::info!(sandbox = %id, ms = begun.elapsed().as_millis() as u64, "sandbox resumed");
        Ok(())
    }

    /// For the proxy: resumes a paused sandbox that asked for auto-resume. Returns whether the
    /// sandbox is running afterwards.
    pub(crate) async fn auto_resume(&self, id: &SandboxId) -> Result<bool, ApiError> {
        let _guard = self.locks.lock(id).await;
        let Some(mut record) = self.store.sandbox(id).map_err(store_err)? else {
            return Ok(false);
        };
        match record.state {
            RecordState::Running => Ok(self.rt.is_running(id)),
            RecordState::Paused if record.auto_resume => {
                self.resume_locked(&mut record, None).await?;
                Ok(true)
            }
            RecordState::Paused | RecordState::Starting => Ok(false),
        }
    }

    // ------------------------------------------------------------------ timeouts

    pub(crate) async fn set_timeout(&self, id: &SandboxId, secs: i64) -> Result<(), ApiError> {
        let secs = self.validate_timeout("timeout", secs)?;
        let _guard = self.locks.lock(id).await;
        let record = self.visible(id)?;
        let end = match record.state {
            RecordState::Running => now_ms() + secs_ms(secs),
            // A paused sandbox's clock starts at resume; keep the new lifetime for then.
            _ => record.end_ms,
        };
        self.store.set_timeout(id, secs, end).map_err(store_err)?;
        Ok(())
    }

    pub(crate) async fn refresh(
        &self,
        id: &SandboxId,
        duration: Option<i64>,
    ) -> Result<(), ApiError> {
        if let Some(d) = duration
            && !(0..=3600).contains(&d)
        {
            return Err(ApiError::bad_request(format!(
                "duration must be between 0 and 3600 seconds, got {d}"
            )));
        }
        let _guard = self.locks.lock(id).await;
        let record = self.visible(id)?;
        if record.state == RecordState::Running {
            let d = duration.unwrap_or(record.timeout_secs);
            let end = record.end_ms.max(now_ms() + secs_ms(d));
            self.store.set_end(id, end).map_err(store_err)?;
        }
        Ok(())
    }

    /// One pass of the timeout loop: kill (or pause) every running sandbox past its end.
    pub(crate) fn expire_due(self: &Arc<Self>) {
        let due = match self.store.expired(now_ms()) {
            Ok(d) => d,
            Err(err) => {
                tracing::error!(%err, "reading expired sandboxes");
                return;
            }
        };
        for (raw, auto_pause) in due {
            let Ok(id) = SandboxId::new(&raw) else {
                continue;
            };
            if !self
                .expiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id.clone())
            {
                continue;
            }
            let app = Arc::clone(self);
            tokio::spawn(async move {
                app.expire(&id, auto_pause).await;
                app.expiring
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
            });
        }
    }

    async fn expire(&self, id: &SandboxId, auto_pause: bool) {
        let _guard = self.locks.lock(id).await;
        let Ok(Some(record)) = self.store.sandbox(id) else {
            return;
        };
        // set_timeout may have moved the end while we waited for the lock.
        if record.state != RecordState::Running || record.end_ms > now_ms() {
            return;
        }
        if auto_pause {
            tracing::info!(sandbox = %id, "timeout: pausing");
            match self.pause_locked(&record).await {
                Ok(()) => return,
                Err(err) if err.status == http::StatusCode::NOT_FOUND => return,
                Err(err) => {
                    tracing::warn!(sandbox = %id, %err, "timeout pause failed; killing instead");
                }
            }
        } else {
            tracing::info!(sandbox = %id, "timeout: killing");
        }
        self.kill_locked(&record).await;
    }

    // ------------------------------------------------------------------ exits

    /// A sandbox's VM died on its own: forget the sandbox.
    pub(crate) async fn on_exit(&self, id: &SandboxId, reason: &str) {
        let _guard = self.locks.lock(id).await;
        let Ok(Some(record)) = self.store.sandbox(id) else {
            return;
        };
        if record.state == RecordState::Running && !self.rt.is_running(id) {
            tracing::warn!(sandbox = %id, %reason, "sandbox VM exited; removing the sandbox");
            self.forget(id);
        }
    }

    /// Removes records of running sandboxes the runtime no longer has, and stale `starting`
    /// records (whose create task is gone: a create holds the sandbox lock throughout).
    pub(crate) fn reconcile(&self) {
        let records = match self.store.sandboxes() {
            Ok(r) => r,
            Err(err) => {
                tracing::error!(%err, "reconcile: reading sandboxes");
                return;
            }
        };
        for r in records {
            let stale = match r.state {
                RecordState::Running => !self.rt.is_running(&r.sandbox_id),
                RecordState::Starting => true,
                RecordState::Paused => false,
            };
            if !stale {
                continue;
            }
            // Busy sandboxes are being changed right now; look again next time.
            let Some(_guard) = self.locks.try_lock(&r.sandbox_id) else {
                continue;
            };
            let Ok(Some(now)) = self.store.sandbox(&r.sandbox_id) else {
                continue;
            };
            let stale = match now.state {
                RecordState::Running => !self.rt.is_running(&r.sandbox_id),
                RecordState::Starting => true,
                RecordState::Paused => false,
            };
            if stale {
                tracing::warn!(sandbox = %r.sandbox_id, state = now.state.as_str(), "removing a sandbox the runtime does not have");
                if now.state == RecordState::Running {
                    // Make sure nothing is left in the runtime either.
                    let rt = Arc::clone(&self.rt);
                    let id = r.sandbox_id.clone();
                    tokio::spawn(async move {
                        let _ = rt.kill(&id).await;
                    });
                }
                self.forget(&r.sandbox_id);
            }
        }
        self.idempotency.expire();
    }

    /// Stops every VM. Sandboxes that asked to be paused on timeout are paused (so a restart
    /// or upgrade of the server does not lose them), within a bounded time; the others are gone
    /// afterwards. Paused ones stay.
    pub(crate) async fn shutdown(&self) {
        let pausable: Vec<SandboxRecord> = self
            .store
            .sandboxes()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.state == RecordState::Running && r.auto_pause)
            .collect();
        if !pausable.is_empty() {
            tracing::info!(
                n = pausable.len(),
                "pausing auto-pause sandboxes before stopping"
            );
            let pauses = pausable.iter().map(|r| async move {
                let _guard = self.locks.lock(&r.sandbox_id).await;
                if let Err(err) = self.pause_locked(r).await {
                    tracing::warn!(sandbox = %r.sandbox_id, %err, "could not pause at shutdown");
                }
            });
            if tokio::time::timeout(SHUTDOWN_PAUSE_LIMIT, futures::future::join_all(pauses))
                .await
                .is_err()
            {
                tracing::warn!("pausing at shutdown took too long; stopping the rest");
            }
        }
        self.rt.shutdown().await;
        if let Ok(records) = self.store.sandboxes() {
            for r in records.iter().filter(|r| r.state != RecordState::Paused) {
                self.forget(&r.sandbox_id);
            }
        }
    }

    // ------------------------------------------------------------------ metrics

    pub(crate) async fn metrics(&self, id: &SandboxId) -> Result<Vec<SandboxMetric>, ApiError> {
        let record = self.visible(id)?;
        if record.state != RecordState::Running {
            return Ok(Vec::new());
        }
        let Some(addr) = self.rt.route(id, ENVD_PORT) else {
            return Ok(Vec::new());
        };
        let req = http::Request::get(format!("http://{addr}/metrics"))
            .header("x-access-token", &record.access_token)
            .body(Body::empty())
            .map_err(|e| ApiError::internal(format!("building the metrics request: {e}")))?;
        let unavailable = |detail: String| {
            ApiError::new(
                http::StatusCode::BAD_GATEWAY,
                format!("sandbox agent did not report metrics: {detail}"),
            )
        };
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| unavailable("timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("status {}", resp.status())));
        }
        let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .map_err(|_| unavailable("timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?
            .to_bytes();
        let m: EnvdMetrics =
            serde_json::from_slice(&body).map_err(|e| unavailable(format!("bad JSON: {e}")))?;
        Ok(vec![SandboxMetric {
            timestamp: rfc3339_ms(m.ts.saturating_mul(1000)),
            timestamp_unix: m.ts,
            cpu_count: m.cpu_count,
            cpu_used_pct: m.cpu_used_pct,
            mem_used: m.mem_used,
            mem_total: m.mem_total,
            mem_cache: m.mem_cache,
            disk_used: m.disk_used,
            disk_total: m.disk_total,
        }])
    }

    // ------------------------------------------------------------------ templates

    fn live_build(&self, template: &str) -> Option<BuildProgress> {
        self.builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(template)
            .map(|b| b.progress.clone())
    }

    /// The build currently running for `template`, if any.
    pub fn building(&self, template: &str) -> Option<(String, BuildProgress)> {
        self.builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(template)
            .map(|b| (b.build_id.clone(), b.progress.clone()))
    }

    /// Publishes a template's warm pool (depth from the configuration; 0 disables it).
    pub(crate) fn apply_warm_pool(&self, t: &TemplateRecord) {
        let depth = self
            .config
            .warm_pools
            .get(&t.template_id)
            .copied()
            .unwrap_or(0);
        if depth > 0
            && let Ok(snapshot) = template_snapshot(t)
        {
            tracing::info!(template = %t.template_id, depth, "warm pool");
            self.rt.set_warm_pool(snapshot, depth);
        }
    }

    /// Starts a template build in the background.
    pub fn start_build(
        self: &Arc<Self>,
        spec: BuildTemplateRequest,
    ) -> Result<(String, BuildProgress), ApiError> {
        let template_id = TemplateId::new(&spec.template_id)
            .map_err(|e| ApiError::bad_request(format!("invalid templateID: {e}")))?;
        let budget = budget_of(&spec)?;
        for c in &spec.commands {
            if c.contains('\0') {
                return Err(ApiError::bad_request("a build command contains NUL"));
            }
        }
        let existing = self
            .store
            .template(template_id.as_str())
            .map_err(store_err)?;
        if existing.is_some() && !spec.force {
            return Err(ApiError::conflict(format!(
                "template {template_id:?} is already built; pass force to rebuild it"
            )));
        }
        let build_id = random_alnum(12);
        let progress = BuildProgress::new();
        {
            let mut builds = self.builds.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(b) = builds.get(template_id.as_str()) {
                return Err(ApiError::conflict(format!(
                    "template {template_id:?} is already being built (build {})",
                    b.build_id
                )));
            }
            builds.insert(
                template_id.to_string(),
                LiveBuild {
                    build_id: build_id.clone(),
                    progress: progress.clone(),
                },
            );
        }
        let dir = self
            .config
            .paths
            .templates_dir()
            .join(template_id.as_str())
            .join(&build_id);
        let record = BuildRecord {
            build_id: build_id.clone(),
            template_id: template_id.to_string(),
            status: BuildStatus::Building,
            spec: serde_json::to_string(&spec).unwrap_or_default(),
            dir: dir.clone(),
            logs: String::new(),
            reason: None,
            created_ms: now_ms(),
            finished_ms: None,
        };
        let prepared = std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))
            .and_then(|()| self.store.insert_build(&record).map_err(store_err));
        if let Err(e) = prepared {
            self.end_build(template_id.as_str());
            remove_dir(&dir);
            return Err(e);
        }
        let request = TemplateBuildRequest {
            template_id,
            build_id: build_id.clone(),
            dir,
            budget,
            source: spec.from.clone(),
            commands: spec.commands,
        };
        let app = Arc::clone(self);
        let p = progress.clone();
        tokio::spawn(async move {
            // A second task so that a panicking builder still ends the build cleanly.
            let app2 = Arc::clone(&app);
            let req2 = request.clone();
            let p2 = p.clone();
            let result = tokio::spawn(async move { app2.builder.build(&req2, &p2).await }).await;
            let result = result.unwrap_or_else(|e| {
                Err(crate::templates::TemplateBuildError::new(format!(
                    "the builder crashed: {e}"
                )))
            });
            app.finish_build(&request, &p, result);
        });
        Ok((build_id, progress))
    }

    fn end_build(&self, template: &str) {
        self.builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(template);
    }

    fn finish_build(
        &self,
        req: &TemplateBuildRequest,
        progress: &BuildProgress,
        result: Result<TemplateSnapshot, crate::templates::TemplateBuildError>,
    ) {
        let now = now_ms();
        let outcome = result
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                msg
            })
            .and_then(|snap| {
                if snap.template_id != req.template_id || !snap.descriptor.starts_with(&req.dir) {
                    return Err(format!(
                        "the builder returned a snapshot of {} at {}, not of {} in {}",
                        snap.template_id,
                        snap.descriptor.display(),
                        req.template_id,
                        req.dir.display()
                    ));
                }
                let fingerprint = build_fingerprint(
                    self.builder.as_ref(),
                    req.source.as_ref(),
                    &req.commands,
                    req.budget,
                );
                write_template_manifest(&req.dir, &snap, ENVD_VERSION, now, fingerprint)
                    .map_err(|e| e.to_string())?;
                Ok(snap)
            });
        let logs = progress.snapshot().logs.join("\n");
        match outcome {
            Ok(snap) => {
                let record = TemplateRecord {
                    template_id: snap.template_id.to_string(),
                    build_id: snap.build_id.clone(),
                    descriptor: snap.descriptor.clone(),
                    integrity: snap.integrity.clone(),
                    budget: snap.budget,
                    envd_version: ENVD_VERSION.to_owned(),
                    created_ms: now,
                    updated_ms: now,
                };
                match self.store.finish_build(
                    &req.build_id,
                    BuildStatus::Ready,
                    None,
                    &logs,
                    now,
                    Some(&record),
                ) {
                    Ok(()) => {
                        tracing::info!(template = %req.template_id, build = %req.build_id, "template built");
                        self.apply_warm_pool(&record);
                        if let Ok(old) = self.store.prune_builds(&record.template_id) {
                            for dir in old.iter().filter(|d| **d != req.dir) {
                                remove_dir(dir);
                            }
                        }
                        self.end_build(req.template_id.as_str());
                        progress.finish(Ok(()));
                    }
                    Err(err) => {
                        remove_dir(&req.dir);
                        self.end_build(req.template_id.as_str());
                        progress.finish(Err(err.to_string()));
                    }
                }
            }
            Err(reason) => {
                tracing::warn!(template = %req.template_id, build = %req.build_id, %reason, "template build failed");
                if let Err(err) = self.store.finish_build(
                    &req.build_id,
                    BuildStatus::Error,
                    Some(&reason),
                    &logs,
                    now,
                    None,
                ) {
                    tracing::error!(%err, "recording a failed build");
                }
                remove_dir(&req.dir);
                self.end_build(req.template_id.as_str());
                progress.finish(Err(reason));
            }
        }
    }

    /// A build's status, with log lines from `offset` on.
    pub(crate) fn build_status(
        &self,
        template: &str,
        build_id: &str,
        offset: usize,
    ) -> Result<BuildStatusResponse, ApiError> {
        let record = self
            .store
            .build(build_id)
            .map_err(store_err)?
            .filter(|b| b.template_id == template)
            .ok_or_else(|| {
                ApiError::not_found(format!("build {build_id:?} of {template:?} not found"))
            })?;
        let live = self
            .building(template)
            .filter(|(b, _)| b == build_id)
            .map(|(_, p)| p.snapshot());
        let (status, phase, fraction, logs, reason) = match live {
            Some(s) => ("building".to_owned(), s.phase, s.fraction, s.logs, None),
            None => (
                record.status.as_str().to_owned(),
                record.status.as_str().to_owned(),
                if record.status == BuildStatus::Ready {
                    1.0
                } else {
                    0.0
                },
                record.logs.lines().map(str::to_owned).collect(),
                record.reason,
            ),
        };
        let total = logs.len();
        Ok(BuildStatusResponse {
            template_id: template.to_owned(),
            build_id: build_id.to_owned(),
            status,
            phase,
            progress: fraction,
            logs: logs.into_iter().skip(offset).collect(),
            next_logs_offset: total,
            reason,
        })
    }

    /// Deletes a template and its builds, unless sandboxes still use it.
    pub(crate) fn delete_template(&self, raw: &str) -> Result<(), ApiError> {
        let id = TemplateId::new(raw)
            .map_err(|e| ApiError::bad_request(format!("invalid templateID: {e}")))?;
        if self.building(id.as_str()).is_some() {
            return Err(ApiError::conflict(format!(
                "template {id:?} is being built; wait for the build to end"
            )));
        }
        let known = self.store.template(id.as_str()).map_err(store_err)?;
        let users = self
            .store
            .sandboxes_of_template(id.as_str())
            .map_err(store_err)?;
        if known.is_none() {
            return Err(ApiError::not_found(format!("template {id:?} not found")));
        }
        if users > 0 {
            return Err(ApiError::conflict(format!(
                "template {id:?} is used by {users} sandbox(es), running or paused; kill them first"
            )));
        }
        if let Some(Ok(t)) = known.as_ref().map(template_snapshot) {
            self.rt.set_warm_pool(t, 0);
        }
        let dirs = self.store.delete_template(id.as_str()).map_err(store_err)?;
        for d in dirs {
            remove_dir(&d);
        }
        remove_empty_dir(&self.config.paths.templates_dir().join(id.as_str()));
        tracing::info!(template = %id, "template deleted");
        Ok(())
    }
}

fn public_state(s: RecordState) -> SandboxState {
    match s {
        RecordState::Paused => SandboxState::Paused,
        RecordState::Running | RecordState::Starting => SandboxState::Running,
    }
}

pub(crate) fn budget_of(spec: &BuildTemplateRequest) -> Result<ResourceBudget, ApiError> {
    let d = DEFAULT_TEMPLATE_BUDGET;
    let cpus = spec.cpu_count.unwrap_or(d.cpus);
    let memory = spec.memory_mb.unwrap_or(d.memory.as_mib());
    let disk = spec.disk_size_mb.unwrap_or(d.disk.as_mib());
    if !(1..=64).contains(&cpus) {
        return Err(ApiError::bad_request(format!(
            "cpuCount must be 1-64, got {cpus}"
        )));
    }
    if !(128..=256 * 1024).contains(&memory) {
        return Err(ApiError::bad_request(format!(
            "memoryMB must be 128-262144, got {memory}"
        )));
    }
    if !(256..=16 * 1024 * 1024).contains(&disk) {
        return Err(ApiError::bad_request(format!(
            "diskSizeMB must be 256-16777216, got {disk}"
        )));
    }
    Ok(ResourceBudget::new(
        cpus,
        Size::mib(memory),
        Size::mib(disk),
    ))
}

/// Options firkin cannot honour. Ignoring them would hand out a sandbox weaker than asked for
/// (network isolation above all), so they are refused.
fn refuse_unsupported(req: &SandboxCreateRequest) -> Result<(), ApiError> {
    let unsupported = |what: &str| {
        Err(ApiError::bad_request(format!(
            "{what} is not supported by this firkin server"
        )))
    };
    if req.allow_internet_access == Some(false) {
        return unsupported("allow_internet_access=false (egress control)");
    }
    if let Some(net) = req.network.as_ref().and_then(|n| n.as_object()) {
        for key in ["allowOut", "denyOut", "rules", "egressProxy", "dnsServers"] {
            let set = net.get(key).is_some_and(|v| match v {
                serde_json::Value::Null => false,
                serde_json::Value::Array(a) => !a.is_empty(),
                serde_json::Value::Object(o) => !o.is_empty(),
                _ => true,
            });
            if set {
                return unsupported(&format!("network.{key}"));
            }
        }
        if net.get("allowPublicTraffic") == Some(&serde_json::Value::Bool(false)) {
            return unsupported("network.allowPublicTraffic=false");
        }
    }
    if req.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return unsupported("volumeMounts");
    }
    if req.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return unsupported("mcp");
    }
    Ok(())
}

pub(crate) fn template_snapshot(t: &TemplateRecord) -> Result<TemplateSnapshot, ApiError> {
    // Stored ids were validated when they were written; a bad one means a damaged database.
    let template_id = TemplateId::new(&t.template_id)
        .map_err(|e| ApiError::internal(format!("stored template id: {e}")))?;
    Ok(TemplateSnapshot {
        template_id,
        build_id: t.build_id.clone(),
        descriptor: t.descriptor.clone(),
        integrity: t.integrity.clone(),
        budget: t.budget,
    })
}

fn envd_init(r: &SandboxRecord) -> EnvdInit {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    EnvdInit {
        env_vars: r.env_vars.clone(),
        access_token: Some(r.access_token.clone()),
        timestamp: OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default(),
        default_user: None,
        default_workdir: None,
        entropy: base64::engine::general_purpose::STANDARD.encode(seed),
        hostname: Some(r.sandbox_id.to_string()),
        require_template_processes_only: false,
    }
}

pub(crate) fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => tracing::warn!(dir = %dir.display(), %err, "cannot remove directory"),
    }
}

fn remove_empty_dir(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}
