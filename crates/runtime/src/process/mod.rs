//! The *process* backend: every sandbox is a host-mode `firkin-envd` process. There is **no
//! isolation** (commands run on the host as the server's user); it exists to develop and test
//! the control plane, the proxy and the SDK paths on machines without a usable hypervisor, and
//! as a second real launcher for the server's integration tests. `firkin serve` only uses it
//! when asked to with `--backend process`.
//!
//! Pause writes the sandbox's home directory and a small state file into the continuation
//! directory; resume starts a new agent there. Process state (running commands) does not
//! survive a pause, unlike with VM snapshots.
//!
//! Agents are started like QEMU, by [`firkin_vmm::process::spawn`]: they die with the server
//! and are reaped when they exit.

mod session;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use firkin_admission::ResourceBudget;
use firkin_artifacts::DigestCache;
use firkin_types::TemplateId;
use firkin_vmm::VmmError;

pub use session::ProcessSession;

use crate::paths::unique_run_dir;
use crate::restore::{SnapshotRestoreRequest, SnapshotSessionLauncher};
use crate::service::{TemplateSealError, TemplateSnapshot};

/// The state file a process template or continuation carries (its only sealed component).
pub const STATE_FILE: &str = "process.json";

/// How long a new agent may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed agent may take to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start the agent: {0}")]
    Spawn(#[source] Box<VmmError>),
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
    #[error(transparent)]
    Seal(#[from] TemplateSealError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ProcessError {
    let path = path.to_path_buf();
    move |source| ProcessError::Io { what, path, source }
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
        let run_dir = unique_run_dir(&self.run_root, "envd");
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
        let child = firkin_vmm::process::spawn(cmd, Vec::new())
            .await
            .map_err(|e| ProcessError::Spawn(Box::new(e)))?;

        let deadline = Instant::now() + START_TIMEOUT;
        let addr = loop {
            if let Some(addr) = read_address(&out_path) {
                break addr;
            }
            if Instant::now() > deadline || !child.is_alive() {
                child.kill(KILL_TIMEOUT).await;
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(ProcessError::NoAddress {
                    binary: self.envd.clone(),
                    waited: START_TIMEOUT,
                    log: err_path,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Ok(ProcessSession::new(addr, run_dir, home, child))
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

/// Seals a process-backend template in `dir`: a marker with nothing to restore but the
/// backend's name (there is no image; agents start with an empty home).
pub async fn build_template(
    dir: &Path,
    template_id: &TemplateId,
    build_id: &str,
    budget: ResourceBudget,
) -> Result<TemplateSnapshot, ProcessError> {
    let marker = dir.join(STATE_FILE);
    std::fs::write(&marker, br#"{"backend":"process"}"#).map_err(io_err("writing", &marker))?;
    Ok(TemplateSnapshot::seal(
        dir.to_path_buf(),
        template_id.clone(),
        build_id.to_owned(),
        budget,
        &[("process", STATE_FILE)],
        serde_json::json!({"backend": "process"}),
        Arc::new(DigestCache::in_memory()),
    )
    .await?)
}
