//! Shared agent state: the settings `/init` changes, and the tables the services keep.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use time::OffsetDateTime;

use crate::users::{AccountDb, User, UserError};

/// Which machine the agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serves the machine it runs on; for tests and development. Never touches the clock,
    /// hostname or mounts.
    Host,
    /// Runs inside a sandbox VM, possibly as PID 1.
    Guest,
}

/// What `/init` configures. Read on every request, written rarely.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// When set, every request but `/health` must prove it knows this token.
    pub access_token: Option<String>,
    /// Sandbox-wide environment for spawned processes.
    pub env_vars: BTreeMap<String, String>,
    /// The user requests run as when they name none.
    pub default_user: String,
    /// The working directory for requests that name none; `None` means the user's home.
    pub default_workdir: Option<PathBuf>,
    /// The newest `/init` timestamp applied so far; older ones must not move the clock back.
    pub last_timestamp: Option<OffsetDateTime>,
    /// The hostname the last `/init` that named one asked for: the sandbox's name.
    pub hostname: Option<String>,
}

/// The agent's shared state.
#[derive(Debug)]
pub struct Envd {
    /// Host or guest.
    pub mode: Mode,
    /// Where users and groups are looked up.
    pub accounts: AccountDb,
    settings: RwLock<Settings>,
    /// Running and recently finished processes.
    pub processes: Arc<crate::process::ProcessTable>,
    /// Polling filesystem watchers (`CreateWatcher`).
    pub watchers: crate::watch::WatcherTable,
    /// Reaps children and hands exit statuses to their owners.
    pub reaper: Arc<crate::reaper::Reaper>,
    /// Held for writing while `/init`'s machine set-up (RNG reseed, rename) finishes in the
    /// background; process starts take it for reading first, so no process ever runs with
    /// the snapshot's RNG state or a hostname that does not resolve.
    pub machine_setup: Arc<tokio::sync::RwLock<()>>,
    /// Runs that set-up. A long-lived thread started with the agent, so that it already exists
    /// in a template snapshot: a thread created after a restore costs tens of ms under TCG.
    setup_worker: Option<std::sync::mpsc::Sender<SetupJob>>,
    /// A file holding the secret the host gave this VM (QEMU's fw_cfg in a sandbox). Until
    /// `/init` sets an access token, every request must carry this secret instead.
    host_secret: Option<PathBuf>,
    /// The secret as first read. A read of fw_cfg costs ~5 ms of guest time under TCG, too much
    /// for every request of a warm-pool checkout. A template build empties this just before
    /// its snapshot (`forget_host_secret`), so every clone reads its own VM's secret, once.
    host_secret_cache: RwLock<Option<String>>,
    /// Where services inside the sandbox learn which sandbox they serve (`None`: nowhere).
    pub sandbox_state: Option<crate::sandbox_state::StatePublisher>,
    /// The pids a template build marked as its own (see [`crate::baseline`]); in the snapshot.
    template_processes: RwLock<Option<BTreeSet<i32>>>,
    /// Pids already found to be kernel threads by that check, so it reads each only once.
    pub kernel_threads: std::sync::Mutex<BTreeSet<i32>>,
}

/// What a request must carry to be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Nothing: a host-mode agent without a token or a secret.
    Open,
    /// This token, in `X-Access-Token` (or a `/files` signature made with it).
    Token(String),
    /// Nothing is served: the secret that would open it cannot be read.
    Closed(String),
}

type SetupJob = Box<dyn FnOnce() + Send>;

fn start_setup_worker() -> Option<std::sync::mpsc::Sender<SetupJob>> {
    let (tx, rx) = std::sync::mpsc::channel::<SetupJob>();
    std::thread::Builder::new()
        .name("machine-setup".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                job();
            }
        })
        .map_err(
            |e| tracing::warn!(error = %e, "no machine set-up thread; using the blocking pool"),
        )
        .ok()?;
    Some(tx)
}

impl Envd {
    /// Creates the state with the given defaults.
    pub fn new(
        mode: Mode,
        accounts: AccountDb,
        default_user: String,
        default_workdir: Option<PathBuf>,
        reaper: Arc<crate::reaper::Reaper>,
    ) -> Self {
        Self {
            mode,
            accounts,
            settings: RwLock::new(Settings {
                default_user,
                default_workdir,
                ..Settings::default()
            }),
            processes: Arc::default(),
            watchers: crate::watch::WatcherTable::default(),
            reaper,
            machine_setup: Arc::default(),
            setup_worker: start_setup_worker(),
            host_secret: None,
            sandbox_state: None,
            host_secret_cache: RwLock::new(None),
            template_processes: RwLock::new(None),
            kernel_threads: std::sync::Mutex::default(),
        }
    }

    /// Gates every request on the secret in `path` until `/init` sets a token.
    pub fn with_host_secret(mut self, path: Option<PathBuf>) -> Self {
        self.host_secret = path;
        self
    }

    /// Publishes the sandbox's state to `file` (its lock next to it, `.lock`) after `/init`s.
    pub fn with_sandbox_state(mut self, file: Option<PathBuf>) -> Self {
        self.sandbox_state = file.map(|f| {
            let lock = f.with_extension("lock");
            crate::sandbox_state::StatePublisher::new(f, lock)
        });
        self
    }

    /// What the next request must carry: the token `/init` set, else the host's secret.
    pub fn gate(&self) -> Gate {
        if let Some(token) = self.access_token() {
            return Gate::Token(token);
        }
        let Some(path) = &self.host_secret else {
            return Gate::Open;
        };
        if let Some(secret) = read_lock(&self.host_secret_cache).clone() {
            return Gate::Token(secret);
        }
        match std::fs::read(path) {
            Ok(bytes) => {
                let secret = String::from_utf8_lossy(&bytes).trim().to_owned();
                if secret.is_empty() {
                    Gate::Closed(format!("the host secret in {} is empty", path.display()))
                } else {
                    *write_lock(&self.host_secret_cache) = Some(secret.clone());
                    Gate::Token(secret)
                }
            }
            Err(e) => Gate::Closed(format!(
                "cannot read the host secret {}: {e}",
                path.display()
            )),
        }
    }

    /// Forgets the cached host secret, overwriting it: called just before a template's
    /// snapshot, so that no clone starts with the builder's VM secret in memory as a token.
    pub fn forget_host_secret(&self) {
        if let Some(secret) = write_lock(&self.host_secret_cache).take() {
            let mut bytes = secret.into_bytes();
            bytes.fill(0);
            // Keep the zeroing from being optimised away as a dead store.
            std::hint::black_box(&bytes);
        }
    }

    /// Marks the processes running now as the template's own.
    pub fn mark_template_processes(&self, pids: BTreeSet<i32>) {
        match self.template_processes.write() {
            Ok(mut g) => *g = Some(pids),
            Err(poisoned) => *poisoned.into_inner() = Some(pids),
        }
    }

    /// The pids marked as the template's own; empty if none were marked.
    pub fn template_processes(&self) -> BTreeSet<i32> {
        let g = match self.template_processes.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        g.clone().unwrap_or_default()
    }

    /// Runs `job` on the machine set-up thread (or the blocking pool if that thread is gone).
    pub fn run_setup(&self, job: impl FnOnce() + Send + 'static) {
        let job: SetupJob = Box::new(job);
        let job = match &self.setup_worker {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        tokio::task::spawn_blocking(job);
    }

    /// A snapshot of the current settings.
    pub fn settings(&self) -> Settings {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Changes the settings under the write lock.
    pub fn update_settings<R>(&self, f: impl FnOnce(&mut Settings) -> R) -> R {
        match self.settings.write() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// The current access token, if any.
    pub fn access_token(&self) -> Option<String> {
        match self.settings.read() {
            Ok(s) => s.access_token.clone(),
            Err(poisoned) => poisoned.into_inner().access_token.clone(),
        }
    }

    /// Resolves the user a request acts as: the named one, or the default.
    pub fn resolve_user(&self, name: Option<&str>) -> Result<User, UserError> {
        match name.filter(|n| !n.is_empty()) {
            Some(n) => self.accounts.by_name(n),
            None => {
                let default = self.settings().default_user;
                self.accounts.by_name(&default)
            }
        }
    }

    /// The directory relative paths and spawned processes start from for `user`.
    pub fn workdir_for(&self, user: &User) -> PathBuf {
        match self.settings().default_workdir {
            Some(dir) if dir.is_dir() => dir,
            _ => user.home.clone(),
        }
    }

    /// Resolves a request path: `~` and `~/x` against the user's home, relative paths against
    /// the default workdir (else the home), then lexically normalized.
    pub fn resolve_path(&self, raw: &str, user: &User) -> PathBuf {
        let joined = if raw == "~" {
            user.home.clone()
        } else if let Some(rest) = raw.strip_prefix("~/") {
            user.home.join(rest)
        } else if Path::new(raw).is_absolute() {
            PathBuf::from(raw)
        } else {
            self.workdir_for(user).join(raw)
        };
        normalize(&joined)
    }
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lexical normalization (`.` and `..` folded), without touching the filesystem so that paths
/// that do not exist yet still resolve.
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(p) => out.push(p),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_lexically() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("/../..")), PathBuf::from("/"));
        assert_eq!(normalize(Path::new("/x//y/")), PathBuf::from("/x/y"));
    }
}
