//! Opening the state directory (lock, database, crash recovery), API keys, the default
//! template, and serving the listener.

use std::convert::Infallible;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::serve::ListenerExt;
use firkin_runtime::{SandboxRuntime, SandboxSession, SnapshotSessionLauncher};
use firkin_types::{SandboxId, TemplateId};
use nix::fcntl::{Flock, FlockArg};
use tokio::net::TcpListener;

use crate::app::{App, ServerConfig, now_ms, remove_dir};
use crate::auth::{self, KeyRing};
use crate::orchestrator::Orchestrator;
use crate::procfs;
use crate::store::{BuildStatus, RecordState, Store, StoreError, TemplateRecord};
use crate::templates::{
    BuildProgress, TemplateBuilder, build_fingerprint, find_cached_build, read_template_manifest,
};
use crate::types::BuildTemplateRequest;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another firkin server is using the state directory {0}; stop it or use another \
         FIRKIN_STATE_DIR"
    )]
    Busy(PathBuf),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the API key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template {template}: {message}")]
    Template { template: String, message: String },
    #[error("serving HTTP failed: {0}")]
    Serve(std::io::Error),
}

/// What restart recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Sandboxes that were running or starting when the previous server stopped: their VMs
    /// died with it (PDEATHSIG), so they are gone.
    pub removed_sandboxes: Vec<String>,
    /// Paused sandboxes whose snapshot is missing.
    pub removed_paused: Vec<String>,
    /// Paused sandboxes kept (resumable).
    pub kept_paused: usize,
    /// Leftover VMM processes that referenced this state directory and were killed.
    pub killed_processes: usize,
    pub removed_run_dirs: usize,
    pub removed_snapshot_dirs: usize,
    /// Builds that were running and are now marked failed.
    pub interrupted_builds: usize,
}

/// How the API key was set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiKeySetup {
    /// `FIRKIN_API_KEY` is accepted (and stored hashed).
    FromEnv,
    /// A new key was generated; shown once, and kept in `<state>/api-key` (0600) for the CLI.
    Generated(String),
    /// Keys exist already; the key file's content, if it is still there.
    Existing(Option<String>),
}

/// What [`Server::ensure_template`] did.
#[derive(Debug)]
pub enum EnsureTemplate {
    Ready,
    /// A finished build was found in the cache and adopted (no build needed).
    Adopted {
        build_id: String,
    },
    /// A build was started.
    Building {
        build_id: String,
        progress: BuildProgress,
    },
}

/// An opened firkin server: it owns the state directory until it is dropped.
#[derive(Debug)]
pub struct Server {
    app: Arc<App>,
    recovery: RecoveryReport,
    _lock: Flock<File>,
}

fn create_private_dir(path: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).map_err(|source| ServerError::Dir {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
    Ok(())
}

impl Server {
    /// Locks the state directory, opens and migrates the database, and recovers from whatever
    /// the previous server left behind.
    pub fn open<L>(
        config: ServerConfig,
        runtime: SandboxRuntime<L>,
        builder: Arc<dyn TemplateBuilder>,
    ) -> Result<Self, ServerError>
    where
        L: SnapshotSessionLauncher + Clone + Sync + 'static,
        L::Session: SandboxSession,
        L::Error: std::fmt::Display + Send,
    {
        Self::open_with(config, Arc::new(runtime), builder)
    }

    pub(crate) fn open_with(
        config: ServerConfig,
        rt: Arc<dyn Orchestrator>,
        builder: Arc<dyn TemplateBuilder>,
    ) -> Result<Self, ServerError> {
        let paths = &config.paths;
        create_private_dir(paths.state_dir())?;
        for dir in [paths.sandboxes_dir(), paths.snapshots_dir()] {
            create_private_dir(&dir)?;
        }
        std::fs::create_dir_all(paths.templates_dir()).map_err(|source| ServerError::Dir {
            path: paths.templates_dir(),
            source,
        })?;
        let lock_path = paths.state_dir().join("serve.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| ServerError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                ServerError::Busy(paths.state_dir().to_path_buf())
            } else {
                ServerError::Lock {
                    path: lock_path.clone(),
                    source: errno.into(),
                }
            }
        })?;
        let store = Store::open(&paths.database())?;
        let recovery = recover(&store, &config)?;
        let keys = KeyRing::load(&store)?;
        let app = Arc::new(App::new(rt, store, config, keys, builder));
        for t in app.store.templates()? {
            app.apply_warm_pool(&t);
        }
        Ok(Self {
            app,
            recovery,
            _lock: lock,
        })
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn config(&self) -> &ServerConfig {
        &self.app.config
    }

    pub fn store(&self) -> &Store {
        &self.app.store
    }

    /// Makes sure at least one API key is accepted: `env_key` (from `FIRKIN_API_KEY`) if given,
    /// otherwise a generated one on first start.
    pub fn ensure_api_key(&self, env_key: Option<&str>) -> Result<ApiKeySetup, ServerError> {
        let state = self.app.config.paths.state_dir();
        let now = now_ms();
        if let Some(key) = env_key.map(str::trim).filter(|k| !k.is_empty()) {
            if key.len() < auth::MIN_RECOMMENDED_KEY_LEN {
                tracing::warn!(
                    "FIRKIN_API_KEY is shorter than {} characters; anyone who can reach the \
                     server may guess it",
                    auth::MIN_RECOMMENDED_KEY_LEN
                );
            }
            self.app
                .keys
                .add(&self.app.store, "FIRKIN_API_KEY", key, now)?;
            return Ok(ApiKeySetup::FromEnv);
        }
        if !self.app.keys.is_empty() {
            return Ok(ApiKeySetup::Existing(auth::read_key_file(state)));
        }
        let key = auth::generate_key();
        auth::write_key_file(state, &key).map_err(|source| ServerError::KeyFile {
            path: auth::key_file(state),
            source,
        })?;
        self.app.keys.add(&self.app.store, "generated", &key, now)?;
        Ok(ApiKeySetup::Generated(key))
    }

    /// Adds an API key (stored hashed).
    pub fn add_api_key(&self, name: &str, key: &str) -> Result<(), ServerError> {
        self.app.keys.add(&self.app.store, name, key, now_ms())?;
        Ok(())
    }

    pub fn template(&self, id: &str) -> Result<Option<TemplateRecord>, ServerError> {
        Ok(self.app.store.template(id)?)
    }

    /// Makes `spec.template_id` available: already built, adopted from a finished build in the
    /// shared cache, or built now (in the background; follow `progress`).
    pub fn ensure_template(
        &self,
        spec: BuildTemplateRequest,
    ) -> Result<EnsureTemplate, ServerError> {
        let terr = |message: String| ServerError::Template {
            template: spec.template_id.clone(),
            message,
        };
        let id = TemplateId::new(&spec.template_id).map_err(|e| terr(e.to_string()))?;
        let budget = crate::app::budget_of(&spec).map_err(|e| terr(e.message))?;
        let fingerprint = build_fingerprint(
            self.app.builder.as_ref(),
            spec.from.as_ref(),
            &spec.commands,
            budget,
        );
        if let Some(t) = self.app.store.template(id.as_str())? {
            // Kept as is (sandboxes, paused ones too, may depend on its files), but a template
            // from other guest binaries is worth a word: an upgraded agent is not in it.
            let built = t
                .descriptor
                .parent()
                .and_then(read_template_manifest)
                .and_then(|m| m.fingerprint);
            if fingerprint.is_some() && built != fingerprint {
                tracing::warn!(
                    template = %id,
                    "template was built from other guest binaries or another recipe; rebuild it \
                     with `firkin template build {id} --force` to pick them up"
                );
            }
            return Ok(EnsureTemplate::Ready);
        }
        if let Some((build_id, progress)) = self.app.building(id.as_str()) {
            return Ok(EnsureTemplate::Building { build_id, progress });
        }
        // Only the small descriptor is hashed here. In memory: the runtime's cache persists to
        // the same file, and two writers would drop each other's entries.
        let cache = firkin_artifacts::DigestCache::in_memory();
        if let Some((manifest, snapshot)) = find_cached_build(
            &self.app.config.paths.templates_dir(),
            &id,
            &cache,
            fingerprint.as_deref(),
        ) {
            let now = now_ms();
            let record = TemplateRecord {
                template_id: id.to_string(),
                build_id: manifest.build_id.clone(),
                descriptor: snapshot.descriptor.clone(),
                integrity: snapshot.integrity.clone(),
                budget: snapshot.budget,
                envd_version: manifest.envd_version.clone(),
                created_ms: manifest.created_ms,
                updated_ms: now,
            };
            let dir = snapshot
                .descriptor
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            self.app.store.insert_build(&crate::store::BuildRecord {
                build_id: manifest.build_id.clone(),
                template_id: id.to_string(),
                status: BuildStatus::Building,
                spec: "{\"adopted\":true}".into(),
                dir,
                logs: String::new(),
                reason: None,
                created_ms: manifest.created_ms,
                finished_ms: None,
            })?;
            self.app.store.finish_build(
                &manifest.build_id,
                BuildStatus::Ready,
                None,
                "adopted from the template cache",
                now,
                Some(&record),
            )?;
            self.app.apply_warm_pool(&record);
            tracing::info!(template = %id, build = %manifest.build_id, "adopted a cached template build");
            return Ok(EnsureTemplate::Adopted {
                build_id: manifest.build_id,
            });
        }
        let (build_id, progress) = self
            .app
            .start_build(spec.clone())
            .map_err(|e| terr(e.message))?;
        Ok(EnsureTemplate::Building { build_id, progress })
    }

    /// Verifies the current build of `template` (descriptor and every component) into the
    /// runtime's digest cache. A template adopted into a fresh state directory has not been
    /// hashed by this server yet; doing it here, before serving, keeps gigabytes of hashing off
    /// the first create. Returns `false` if the template does not exist.
    pub async fn verify_template(&self, template: &str) -> Result<bool, ServerError> {
        let Some(t) = self.app.store.template(template)? else {
            return Ok(false);
        };
        self.app
            .rt
            .warm_digests(t.descriptor.clone(), t.integrity.clone())
            .await
            .map_err(|e| ServerError::Template {
                template: template.to_owned(),
                message: format!("{e}; rebuild it with `firkin template build {template} --force`"),
            })?;
        Ok(true)
    }

    /// Serves the control plane and the sandbox plane on `listener` until `shutdown` resolves;
    /// then stops every VM (paused sandboxes stay paused).
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> Result<(), ServerError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let app = Arc::clone(&self.app);
        // Dropped with this future (also when it is cancelled), taking the loops with it.
        let background = AbortOnDrop(spawn_background(&app));
        let cp = crate::api::router(Arc::clone(&app));
        let dispatch_app = Arc::clone(&app);
        let svc = tower::service_fn(move |req: Request| {
            let app = Arc::clone(&dispatch_app);
            let cp = cp.clone();
            async move { Ok::<_, Infallible>(crate::proxy::dispatch(app, cp, req).await) }
        });
        let outer = Router::new().fallback_service(svc);
        // Small RPCs must not wait for Nagle's algorithm and delayed ACKs (40 ms stalls).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let serve = axum::serve(listener, outer).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stopping_tx.send(());
        });
        let result = tokio::select! {
            r = serve.into_future() => r.map_err(ServerError::Serve),
            () = async {
                // Open streams (process output, file transfers) get a short grace period.
                if stopping_rx.await.is_ok() {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => Ok(()),
        };
        tracing::info!("stopping all sandboxes");
        drop(background);
        app.shutdown().await;
        result
    }

    /// Serves without consuming `self`: for tests that keep using the server afterwards.
    #[doc(hidden)]
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn spawn_background(app: &Arc<App>) -> Vec<tokio::task::JoinHandle<()>> {
    app.rt.spawn_warm_pool();
    let ticker = {
        let app = Arc::clone(app);
        tokio::spawn(async move {
            let mut n: u64 = 0;
            let mut tick = tokio::time::interval(app.config.tick);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                app.expire_due();
                n += 1;
                if n.is_multiple_of(20) {
                    app.reconcile();
                }
            }
        })
    };
    let exits = {
        let app = Arc::clone(app);
        let mut rx = app.rt.exits();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(exit) => app.on_exit(&exit.sandbox_id, &exit.reason).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "missed sandbox exit events; reconciling");
                        app.reconcile();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    };
    vec![ticker, exits]
}

/// Restart recovery. Runs with the state-directory lock held, so no other server owns anything
/// in it and nothing of ours can be running: QEMU dies with the server that started it
/// (PDEATHSIG), and whatever survived that is killed here.
fn recover(store: &Store, config: &ServerConfig) -> Result<RecoveryReport, ServerError> {
    let paths = &config.paths;
    let mut report = RecoveryReport::default();

    for r in store.sandboxes()? {
        match r.state {
            RecordState::Starting | RecordState::Running => {
                if let (Some(pid), Some(start)) = (r.pid, r.pid_start)
                    && procfs::kill_if_same(pid, start)
                {
                    tracing::warn!(sandbox = %r.sandbox_id, pid, "killed a VMM that outlived its server");
                    report.killed_processes += 1;
                }
                forget(store, &r.sandbox_id, paths.snapshots_dir().as_path())?;
                report.removed_sandboxes.push(r.sandbox_id.to_string());
            }
            RecordState::Paused => {
                let present = r.snapshot.as_ref().is_some_and(|s| s.descriptor.is_file());
                if present {
                    report.kept_paused += 1;
                } else {
                    tracing::warn!(sandbox = %r.sandbox_id, "paused sandbox lost its snapshot; removing it");
                    forget(store, &r.sandbox_id, paths.snapshots_dir().as_path())?;
                    report.removed_paused.push(r.sandbox_id.to_string());
                }
            }
        }
    }

    // Warm-pool entries and half-started VMs have no record; anything still running from our
    // run directories belongs to a dead server.
    for pid in procfs::processes_referencing(&paths.sandboxes_dir()) {
        if procfs::kill_pid(pid) {
            tracing::warn!(pid, "killed a leftover sandbox process");
            report.killed_processes += 1;
        }
    }
    if let Ok(entries) = std::fs::read_dir(paths.sandboxes_dir()) {
        for e in entries.filter_map(Result::ok) {
            remove_dir(&e.path());
            report.removed_run_dirs += 1;
        }
    }

    // Snapshot directories the database does not know are from a pause that never finished.
    let known: std::collections::HashSet<PathBuf> = store.snapshot_dirs()?.into_iter().collect();
    if let Ok(sandboxes) = std::fs::read_dir(paths.snapshots_dir()) {
        for sb in sandboxes.filter_map(Result::ok) {
            let Ok(snaps) = std::fs::read_dir(sb.path()) else {
                continue;
            };
            for snap in snaps.filter_map(Result::ok) {
                if !known.contains(&snap.path()) {
                    remove_dir(&snap.path());
                    report.removed_snapshot_dirs += 1;
                }
            }
            let _ = std::fs::remove_dir(sb.path());
        }
    }

    for b in store.builds()? {
        if b.status == BuildStatus::Building {
            store.finish_build(
                &b.build_id,
                BuildStatus::Error,
                Some("interrupted: the server stopped during the build"),
                &b.logs,
                now_ms(),
                None,
            )?;
            remove_dir(&b.dir);
            report.interrupted_builds += 1;
        }
    }
    if report != RecoveryReport::default() {
        tracing::info!(?report, "recovered from the previous run");
    }
    Ok(report)
}

fn forget(store: &Store, id: &SandboxId, snapshots_dir: &Path) -> Result<(), ServerError> {
    for s in store.delete_sandbox(id)? {
        remove_dir(&s.dir);
    }
    remove_dir(&snapshots_dir.join(id.as_str()));
    Ok(())
}
