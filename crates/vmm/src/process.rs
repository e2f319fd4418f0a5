//! Child-process lifetime: every QEMU dies with its owner and is reaped.
//!
//! * QEMU is forked from one long-lived dedicated thread with `PR_SET_PDEATHSIG=SIGKILL`:
//!   Linux sends the signal when the forking *thread* exits, so forking from a tokio
//!   blocking-pool thread (which idles out) would kill QEMU at random. The spawner thread never
//!   exits, so the signal fires exactly when the owning process dies, SIGKILL included.
//! * Each child has a small waiter thread that blocks in `waitid(WNOWAIT)`, then reaps it under
//!   a lock. [`ChildHandle::signal`] takes the same lock and only signals an unreaped pid, so a
//!   recycled pid is never hit. The exit is published on a `watch` channel, which is how an
//!   unexpected death (kill -9) is noticed.
//! * Dropping a [`ChildHandle`] kills the child: no error path can leak a QEMU.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};

use crate::error::{Result, VmmError};

/// How a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => {
                let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "killed by signal {s} ({name})")
            }
            (None, None) => f.write_str("unknown status"),
        }
    }
}

struct SpawnJob {
    cmd: Command,
    inherit: Vec<(OwnedFd, RawFd)>,
    netns: Option<OwnedFd>,
    reply: oneshot::Sender<io::Result<Child>>,
}

fn spawner() -> Result<&'static mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<std::result::Result<mpsc::Sender<SpawnJob>, String>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnJob>();
            std::thread::Builder::new()
                .name("firkin-qemu-spawner".into())
                .spawn(move || {
                    // Lives as long as the process: the static sender is never dropped.
                    for mut job in rx {
                        let res = crate::sys::configure_child(&mut job.cmd, job.inherit, job.netns)
                            .and_then(|()| job.cmd.spawn());
                        let _ = job.reply.send(res);
                    }
                })
                .map(|_| tx)
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|_| VmmError::SpawnerGone)
}

struct ChildState {
    pid: Pid,
    /// `Some` once reaped; held while signalling so a reaped pid is never signalled.
    exit: Mutex<Option<ExitInfo>>,
    tx: watch::Sender<Option<ExitInfo>>,
}

/// A spawned child process that dies with this process and is reaped when it exits.
#[derive(Clone)]
pub struct ChildHandle {
    state: Arc<ChildState>,
    _kill_on_drop: Arc<KillOnDrop>,
}

impl std::fmt::Debug for ChildHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildHandle")
            .field("pid", &self.pid())
            .field("exit", &self.exit_info())
            .finish()
    }
}

struct KillOnDrop(Arc<ChildState>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        signal_state(&self.0, Signal::SIGKILL);
    }
}

fn signal_state(state: &ChildState, sig: Signal) -> bool {
    let guard = match state.exit.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if guard.is_some() {
        return false;
    }
    nix::sys::signal::kill(state.pid, sig).is_ok()
}

fn exit_info(status: WaitStatus) -> ExitInfo {
    match status {
        WaitStatus::Exited(_, code) => ExitInfo {
            code: Some(code),
            signal: None,
        },
        WaitStatus::Signaled(_, sig, _) => ExitInfo {
            code: None,
            signal: Some(sig as i32),
        },
        _ => ExitInfo {
            code: None,
            signal: None,
        },
    }
}

/// Spawns `cmd` from the dedicated spawner thread, passing `inherit` fds at the given numbers.
pub async fn spawn(cmd: Command, inherit: Vec<(OwnedFd, RawFd)>) -> Result<ChildHandle> {
    spawn_in(cmd, inherit, None).await
}

/// [`spawn`], with the child entering the network namespace `netns` (an open
/// `/run/netns/<name>` or `/proc/<pid>/ns/net`) before it execs; this process and its
/// threads stay where they are.
pub async fn spawn_in(
    mut cmd: Command,
    inherit: Vec<(OwnedFd, RawFd)>,
    netns: Option<OwnedFd>,
) -> Result<ChildHandle> {
    let program = std::path::PathBuf::from(cmd.get_program());
    cmd.stdin(std::process::Stdio::null());
    let (reply, rx) = oneshot::channel();
    spawner()?
        .send(SpawnJob {
            cmd,
            inherit,
            netns,
            reply,
        })
        .map_err(|_| VmmError::SpawnerGone)?;
    let child = rx
        .await
        .map_err(|_| VmmError::SpawnerGone)?
        .map_err(|source| VmmError::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid = Pid::from_raw(child.id() as i32);
    // The std handle is not used to wait: the waiter thread below reaps by pid.
    drop(child);
    let (tx, _) = watch::channel(None);
    let state = Arc::new(ChildState {
        pid,
        exit: Mutex::new(None),
        tx,
    });
    let waiter_state = state.clone();
    std::thread::Builder::new()
        .name(format!("firkin-wait-{pid}"))
        .stack_size(64 * 1024)
        .spawn(move || wait_and_reap(&waiter_state))
        .map_err(|source| {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            VmmError::Spawn { program, source }
        })?;
    tracing::debug!(pid = pid.as_raw(), "spawned child");
    Ok(ChildHandle {
        _kill_on_drop: Arc::new(KillOnDrop(state.clone())),
        state,
    })
}

fn wait_and_reap(state: &ChildState) {
    // Wait without reaping, so the pid stays ours while `signal_state` might still use it.
    loop {
        match waitid(
            Id::Pid(state.pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Ok(_) => break,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!(pid = state.pid.as_raw(), "waitid: {e}");
                break;
            }
        }
    }
    let mut guard = match state.exit.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let info = loop {
        match waitpid(state.pid, None) {
            Ok(status) => break exit_info(status),
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!(pid = state.pid.as_raw(), "waitpid: {e}");
                break ExitInfo {
                    code: None,
                    signal: None,
                };
            }
        }
    };
    tracing::debug!(pid = state.pid.as_raw(), %info, "child exited");
    *guard = Some(info.clone());
    drop(guard);
    state.tx.send_replace(Some(info));
}

impl ChildHandle {
    pub fn pid(&self) -> u32 {
        self.state.pid.as_raw() as u32
    }

    /// `Some` once the child has exited and been reaped.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.state.tx.borrow().clone()
    }

    pub fn is_alive(&self) -> bool {
        self.exit_info().is_none()
    }

    /// Sends `sig` unless the child is already gone; returns whether it was sent.
    pub fn signal(&self, sig: Signal) -> bool {
        signal_state(&self.state, sig)
    }

    /// Resolves when the child has exited and been reaped.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.state.tx.subscribe();
        loop {
            if let Some(info) = rx.borrow_and_update().clone() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `state`, which we hold; unreachable in practice.
                return ExitInfo {
                    code: None,
                    signal: None,
                };
            }
        }
    }

    /// Waits up to `timeout` for the exit.
    pub async fn wait_timeout(&self, timeout: std::time::Duration) -> Option<ExitInfo> {
        tokio::time::timeout(timeout, self.wait()).await.ok()
    }

    /// SIGKILLs the child and waits up to `timeout` for it to be reaped; `None` if it was not
    /// (a process stuck in the kernel). Returns at once for a child already gone.
    pub async fn kill(&self, timeout: std::time::Duration) -> Option<ExitInfo> {
        self.signal(Signal::SIGKILL);
        self.wait_timeout(timeout).await
    }

    /// A receiver that sees the exit, for callers that select on it.
    pub fn subscribe(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.state.tx.subscribe()
    }
}
