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
use firkin_runtime::{RuntimeLauncher, SandboxRuntime};
use nix::fcntl::{Flock, FlockArg};
use tokio::net::TcpListener;

use crate::app::{App, ServerConfig, now_ms};
use crate::auth::{self, KeyRing};
use crate::lifecycle::expiry::spawn_background;
use crate::lifecycle::recovery::recover;
use crate::orchestrator::Orchestrator;
use crate::store::{Store, StoreError, TemplateRecord};
use crate::templates::{BuildProgress, TemplateBuilder};
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

pub use crate::lifecycle::recovery::RecoveryReport;

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

/// Ensures templates of a server (see [`Server::templates`]).
#[derive(Clone, Debug)]
pub struct Templates {
    app: Arc<App>,
}

impl Templates {
    /// See [`Server::ensure_template`].
    pub fn ensure(&self, spec: BuildTemplateRequest) -> Result<EnsureTemplate, ServerError> {
        let template = spec.template_id.clone();
        self.app
            .ensure_template(spec)
            .map_err(|e| ServerError::Template {
                template,
                message: e.message,
            })
    }
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
        L: RuntimeLauncher,
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
        self.templates().ensure(spec)
    }

    /// A handle that keeps ensuring templates after [`Self::serve`] took the server.
    pub fn templates(&self) -> Templates {
        Templates {
            app: Arc::clone(&self.app),
        }
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
