//! The *process* backend: every sandbox is a host-mode `firkin-envd` process. There is **no
//! isolation** (commands run on the host as the server's user); it exists to develop and test
//! the control plane, the proxy and the SDK paths on machines without a usable hypervisor, and
//! as a second real launcher for the server's integration tests. `firkin serve` only uses it
//! when asked to with `--backend process`.
//!
//! Pause writes the sandbox's home directory and a small state file into the continuation
//! directory; resume starts a new agent there. Process state (running commands) does not
//! survive a pause, unlike with VM snapshots.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use firkin_artifacts::{
    DigestCache, SealedSnapshot, SnapshotArtifactIntegrity, SnapshotArtifactKind,
};
use firkin_e2b_contract::ENVD_PORT;
use firkin_runtime::{
    ContinuationSaved, EnvdInit, SNAPSHOT_DESCRIPTOR, SandboxSession, SnapshotRestoreRequest,
    SnapshotSessionLauncher, TemplateSnapshot,
};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::watch;

use crate::auth::random_alnum;
use crate::templates::{BuildProgress, TemplateBuildError, TemplateBuildRequest, TemplateBuilder};

const STATE_FILE: &str = "process.json";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{binary} did not report its address within {waited:?} (log: {log})")]
    NoAddress {
        binary: PathBuf,
        waited: Duration,
        log: PathBuf,
    },
    #[error("agent /init failed: {0}")]
    Init(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ProcessError {
    let path = path.to_path_buf();
    move |source| ProcessError::Io { what, path, source }
}

type SpawnJob = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// Children are spawned from one thread that lives as long as the process: PDEATHSIG fires
/// when the spawning *thread* exits (DEVELOPERS.md), not only the process.
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let spawned = std::thread::Builder::new()
            .name("firkin-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start the spawner thread");
        }
        Mutex::new(tx)
    })
}

async fn spawn_child(mut cmd: Command) -> std::io::Result<Child> {
    crate::sys::die_with_parent(&mut cmd);
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send((cmd, tx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    tokio::task::spawn_blocking(move || rx.recv())
        .await
        .map_err(std::io::Error::other)?
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?
}

/// Starts `firkin-envd` processes as sandboxes.
#[derive(Clone, Debug)]
pub struct ProcessLauncher {
    envd: PathBuf,
    run_root: PathBuf,
}

impl ProcessLauncher {
    /// `run_root` is the state directory's `sandboxes/`: every agent's command line mentions
    /// it, which is how restart recovery recognises leftovers.
    pub fn new(envd: impl Into<PathBuf>, run_root: impl Into<PathBuf>) -> Self {
        let envd = envd.into();
        // Agents start in their own directory, so a relative path (other than a bare name
        // looked up on PATH) must be made absolute now.
        let envd = if envd.is_relative() && envd.components().count() > 1 {
            std::env::current_dir().map_or(envd.clone(), |d| d.join(&envd))
        } else {
            envd
        };
        Self {
            envd,
            run_root: run_root.into(),
        }
    }

    async fn start(&self, from: Option<PathBuf>) -> Result<ProcessSession, ProcessError> {
        let run_dir = self.run_root.join(random_alnum(16));
        let home = run_dir.join("home");
        std::fs::create_dir_all(&run_dir).map_err(io_err("creating", &run_dir))?;
        // A copy, not a move: if this resume fails, the continuation is still whole.
        let prepared = match &from {
            Some(src) => copy_tree(src, &home).map_err(io_err("copying", src)),
            None => std::fs::create_dir_all(&home).map_err(io_err("creating", &home)),
        };
        if let Err(e) = prepared {
            let _ = std::fs::remove_dir_all(&run_dir);
            return Err(e);
        }
        let out_path = run_dir.join("stdout.log");
        let err_path = run_dir.join("envd.log");
        let stdout = std::fs::File::create(&out_path).map_err(io_err("creating", &out_path))?;
        let stderr = std::fs::File::create(&err_path).map_err(io_err("creating", &err_path))?;
        let mut cmd = Command::new(&self.envd);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            // The run directory on the command line is how restart recovery finds leftovers.
            .arg("--workdir")
            .arg(&home)
            .arg("--log")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .current_dir(&home);
        let child = spawn_child(cmd)
            .await
            .map_err(|source| ProcessError::Spawn {
                binary: self.envd.clone(),
                source,
            })?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(Some(child)));
        let (alive_tx, alive_rx) = watch::channel(true);
        tokio::spawn(watch_child(Arc::clone(&child), alive_tx));

        let waited = Duration::from_secs(10);
        let deadline = Instant::now() + waited;
        let addr = loop {
            if let Some(addr) = read_address(&out_path) {
                break addr;
            }
            if Instant::now() > deadline || !*alive_rx.borrow() {
                kill_child(&child).await;
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(ProcessError::NoAddress {
                    binary: self.envd.clone(),
                    waited,
                    log: err_path,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Ok(ProcessSession {
            addr,
            pid,
            run_dir,
            home,
            child,
            alive: alive_rx,
            client: crate::app::http_client(),
        })
    }
}

fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &to)?;
        } else {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

fn read_address(path: &Path) -> Option<SocketAddr> {
    let f = std::fs::File::open(path).ok()?;
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("listening on http://")?.trim().parse().ok())
}

async fn watch_child(child: Arc<Mutex<Option<Child>>>, alive: watch::Sender<bool>) {
    loop {
        let exited = {
            let mut guard = child.lock().unwrap_or_else(PoisonError::into_inner);
            match guard.as_mut().map(Child::try_wait) {
                None | Some(Ok(Some(_))) | Some(Err(_)) => {
                    *guard = None;
                    true
                }
                Some(Ok(None)) => false,
            }
        };
        if exited {
            let _ = alive.send(false);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills and reaps the child. Holding the lock across kill and reap means the pid cannot be
/// reused by another process between the two.
async fn kill_child(child: &Arc<Mutex<Option<Child>>>) {
    for _ in 0..200 {
        {
            let mut guard = child.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(c) = guard.as_mut() else { return };
            let _ = c.kill();
            if let Ok(Some(_)) = c.try_wait() {
                *guard = None;
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::warn!("agent process did not exit after SIGKILL");
}

/// One host-mode agent.
#[derive(Debug)]
pub struct ProcessSession {
    addr: SocketAddr,
    pid: u32,
    run_dir: PathBuf,
    home: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
    alive: watch::Receiver<bool>,
    client: Client<HttpConnector, Body>,
}

#[async_trait]
impl SandboxSession for ProcessSession {
    type Error = ProcessError;

    fn envd_addr(&self) -> SocketAddr {
        self.addr
    }

    fn port_addr(&self, guest_port: u16) -> Option<SocketAddr> {
        (guest_port == ENVD_PORT).then_some(self.addr)
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }

    async fn init(&self, init: &EnvdInit) -> Result<(), ProcessError> {
        let body = serde_json::to_vec(init).map_err(|e| ProcessError::Init(e.to_string()))?;
        let req = http::Request::post(format!("http://{}/init", self.addr))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .map_err(|e| ProcessError::Init(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| ProcessError::Init("timed out".into()))?
            .map_err(|e| ProcessError::Init(e.to_string()))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(ProcessError::Init(format!("status {}", resp.status())))
        }
    }

    async fn save_continuation(&self, dir: &Path) -> Result<ContinuationSaved, ProcessError> {
        kill_child(&self.child).await;
        let target = dir.join("home");
        std::fs::rename(&self.home, &target).map_err(io_err("moving", &self.home))?;
        let state = dir.join(STATE_FILE);
        std::fs::write(&state, br#"{"backend":"process","home":"home"}"#)
            .map_err(io_err("writing", &state))?;
        Ok(ContinuationSaved {
            components: vec![("process".into(), STATE_FILE.into())],
            machine: serde_json::json!({"backend": "process", "home": "home"}),
            // The home directory moved here: nothing earlier is read again.
            depends_on: Vec::new(),
        })
    }

    async fn stop(&self) -> Result<(), ProcessError> {
        kill_child(&self.child).await;
        match std::fs::remove_dir_all(&self.run_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &self.run_dir)(e)),
        }
    }

    async fn exited(&self) {
        let mut rx = self.alive.clone();
        let _ = rx.wait_for(|alive| !alive).await;
    }
}

#[async_trait]
impl SnapshotSessionLauncher for ProcessLauncher {
    type Error = ProcessError;
    type Session = ProcessSession;

    async fn restore_from_snapshot(
        &mut self,
        request: &SnapshotRestoreRequest<'_>,
    ) -> Result<ProcessSession, ProcessError> {
        // A continuation carries the sandbox's home; a template starts with an empty one.
        let home = request
            .sealed()
            .and_then(|s| s.machine.get("home")?.as_str().map(str::to_owned))
            .filter(|h| !h.contains('/') && !h.is_empty())
            .map(|h| request.manifest().parent_dir().join(h))
            .filter(|h| h.is_dir());
        self.start(home).await
    }
}

/// Builds process-backend templates: a sealed descriptor with nothing to restore but a
/// marker. Build commands are not run (there is no image to prepare).
#[derive(Clone, Debug, Default)]
pub struct ProcessTemplateBuilder;

#[async_trait]
impl TemplateBuilder for ProcessTemplateBuilder {
    async fn build(
        &self,
        request: &TemplateBuildRequest,
        progress: &BuildProgress,
    ) -> Result<TemplateSnapshot, TemplateBuildError> {
        progress.phase("writing the template", 0.2);
        if !request.commands.is_empty() {
            progress.log(format!(
                "process backend: {} build command(s) not run (sandboxes share the host)",
                request.commands.len()
            ));
        }
        let marker = request.dir.join(STATE_FILE);
        std::fs::write(&marker, br#"{"backend":"process"}"#).map_err(|e| {
            TemplateBuildError::with_source(format!("writing {}", marker.display()), e)
        })?;
        progress.phase("sealing", 0.8);
        let dir = request.dir.clone();
        let id = request.template_id.to_string();
        let sealed = tokio::task::spawn_blocking(move || {
            let cache = DigestCache::in_memory();
            SealedSnapshot::seal(
                &dir,
                SNAPSHOT_DESCRIPTOR,
                SnapshotArtifactKind::BaseTemplate,
                &id,
                &[("process", STATE_FILE)],
                serde_json::json!({"backend": "process"}),
                &cache,
            )
        })
        .await
        .map_err(|e| TemplateBuildError::new(format!("sealing task failed: {e}")))?
        .map_err(|e| TemplateBuildError::with_source("sealing the template", e))?;
        let descriptor = sealed.1.path().to_path_buf();
        let integrity = SnapshotArtifactIntegrity::from_path(&descriptor)
            .map_err(|e| TemplateBuildError::with_source("hashing the descriptor", e))?;
        progress.log(format!("sealed {}", descriptor.display()));
        Ok(TemplateSnapshot {
            template_id: request.template_id.clone(),
            build_id: request.build_id.clone(),
            descriptor,
            integrity,
            budget: request.budget,
        })
    }
}
