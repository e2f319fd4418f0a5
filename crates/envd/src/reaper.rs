//! The one place that waits for child processes.
//!
//! As PID 1 envd inherits every orphan of the guest and must reap them, but a `waitpid(-1)`
//! loop would race any per-child wait (tokio's, or std's own wait after a failed `exec`) and
//! steal exit statuses. So envd never waits anywhere else: spawns go through [`Reaper::spawn`],
//! which registers the pid under the same lock the reaper holds while it calls `waitpid`. A
//! reaped pid that is registered gets its status delivered; any other pid was an orphan.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The exit code in the convention of Go's `ProcessState.ExitCode` (what E2B reports):
    /// the code, or -1 when a signal ended the process.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(_) => -1,
        }
    }

    /// Whether the process exited on its own.
    pub fn exited(self) -> bool {
        matches!(self, Exit::Code(_))
    }

    /// A human-readable status in the style of Go's `ProcessState.String`.
    pub fn describe(self) -> String {
        match self {
            Exit::Code(c) => format!("exit status {c}"),
            Exit::Signal(s) => {
                let name = match nix::sys::signal::Signal::try_from(s) {
                    Ok(nix::sys::signal::Signal::SIGKILL) => "killed".to_owned(),
                    Ok(nix::sys::signal::Signal::SIGTERM) => "terminated".to_owned(),
                    Ok(nix::sys::signal::Signal::SIGINT) => "interrupt".to_owned(),
                    Ok(nix::sys::signal::Signal::SIGHUP) => "hangup".to_owned(),
                    Ok(other) => other.as_str().to_owned(),
                    Err(_) => format!("signal {s}"),
                };
                format!("signal: {name}")
            }
        }
    }
}

/// Registry of children whose exit status someone is waiting for.
#[derive(Debug, Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<Exit>>>,
}

impl Reaper {
    /// Creates the reaper and starts its task. Must run inside the tokio runtime, before the
    /// first spawn, so that no SIGCHLD goes unnoticed.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let reaper = Arc::new(Self::default());
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            // The tick is a safety net: SIGCHLDs coalesce, and one arriving between the last
            // waitpid and re-arming would otherwise leave a zombie until the next child exits.
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {}
                }
                r.reap_ready();
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<Exit>>> {
        match self.waiting.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Runs `spawn` (which forks a child and returns its pid) with registration held, and
    /// returns the receiver of the child's exit.
    pub fn spawn<T>(
        &self,
        spawn: impl FnOnce() -> std::io::Result<(T, u32)>,
    ) -> std::io::Result<(T, u32, oneshot::Receiver<Exit>)> {
        let mut waiting = self.lock();
        let (value, pid) = spawn()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(pid as i32, tx);
        Ok((value, pid, rx))
    }

    /// Collects every child that has exited.
    pub fn reap_ready(&self) {
        let mut waiting = self.lock();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => deliver(&mut waiting, pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    deliver(&mut waiting, pid, Exit::Signal(sig as i32))
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break, // ECHILD: no children at all.
            }
        }
    }
}

fn deliver(waiting: &mut HashMap<i32, oneshot::Sender<Exit>>, pid: Pid, exit: Exit) {
    match waiting.remove(&pid.as_raw()) {
        Some(tx) => {
            let _ = tx.send(exit);
        }
        None => tracing::debug!(pid = pid.as_raw(), ?exit, "reaped orphan"),
    }
}
