//! Processes started through the `process.Process` service.

pub mod hub;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex as AsyncMutex;

use self::hub::{End, Hub, Source};
use crate::reaper::{Exit, Reaper};
use crate::sys::{ChildSetup, Credentials};
use crate::users::User;

/// Read size for process output (upstream uses 32 KiB too).
const READ_CHUNK: usize = 32 * 1024;
/// How long a finished process that nobody watched to the end stays reachable through
/// `Connect` (for its output and end). One whose end reached a stream is forgotten at once,
/// so that many short commands do not pile up retained output.
const KEEP_FINISHED: Duration = Duration::from_secs(60);
/// After the process exits, output still buffered in the pipe is read until EOF; a pipe kept
/// open by a background grandchild ends the stream after this much silence instead.
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// And at most this long in total, in case the grandchild keeps talking.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// How long after its deadline a process is killed. The Start stream ends with
/// `deadline_exceeded` at the deadline itself; killing later keeps the killed process's end
/// event from reaching the client first (it would raise an exit error instead of a timeout).
const KILL_AFTER_DEADLINE: Duration = Duration::from_millis(100);

/// The PATH given to spawned processes; E2B images expect the usual Debian layout.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What went wrong with a process request.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// No running process matches.
    #[error("process {0} not found")]
    NotFound(String),
    /// The request does not fit the process (e.g. PTY input for a pipe process).
    #[error("{0}")]
    Invalid(String),
    /// The process could not be started.
    #[error("cannot start '{cmd}': {source}")]
    Spawn {
        /// The command.
        cmd: String,
        /// Why.
        source: io::Error,
    },
    /// Writing to the process failed.
    #[error("writing to process {pid}: {source}")]
    Write {
        /// The process.
        pid: u32,
        /// Why.
        source: io::Error,
    },
}

/// How a process was started, as `List` reports it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Executable.
    pub cmd: String,
    /// Arguments (without argv\[0\]).
    pub args: Vec<String>,
    /// Environment given in the request.
    pub envs: BTreeMap<String, String>,
    /// Working directory given in the request.
    pub cwd: Option<String>,
}

/// Everything needed to start a process.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    /// As requested.
    pub config: Config,
    /// The user to run as.
    pub user: User,
    /// Its groups (primary first).
    pub groups: Vec<u32>,
    /// Resolved working directory.
    pub cwd: PathBuf,
    /// Complete environment.
    pub env: BTreeMap<String, String>,
    /// Terminal size when the process gets a PTY.
    pub pty: Option<(u16, u16)>,
    /// Keep stdin open (pipe) rather than connecting it to /dev/null.
    pub stdin: bool,
    /// Optional tag to find the process by.
    pub tag: Option<String>,
    /// Kill the process group after this long.
    pub timeout: Option<Duration>,
}

enum Input {
    Pipe(tokio::net::unix::pipe::Sender),
    Pty(Arc<AsyncFd<OwnedFd>>),
}

/// A process envd started.
pub struct Proc {
    /// Process id (also its process group and session id).
    pub pid: u32,
    /// Tag given at start.
    pub tag: Option<String>,
    /// As requested.
    pub config: Config,
    /// Output for streams.
    pub hub: Arc<Hub>,
    input: AsyncMutex<Option<Input>>,
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("pid", &self.pid)
            .field("tag", &self.tag)
            .field("config", &self.config)
            .field("pty", &self.pty.is_some())
            .finish_non_exhaustive()
    }
}

impl Proc {
    /// Whether the process runs under a terminal.
    pub fn is_pty(&self) -> bool {
        self.pty.is_some()
    }

    /// Whether it has ended.
    pub fn finished(&self) -> bool {
        self.hub.ended()
    }

    /// Sends `signal` to the process group, falling back to the process itself.
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        let pid = self.pid as i32;
        match kill(Pid::from_raw(-pid), signal) {
            Err(nix::errno::Errno::ESRCH) => kill(Pid::from_raw(pid), signal),
            other => other,
        }
    }

    /// Writes to stdin (`pty == false`) or the terminal (`pty == true`).
    pub async fn write_input(&self, data: &[u8], pty: bool) -> Result<(), ProcessError> {
        let mut input = self.input.lock().await;
        let pid = self.pid;
        match (input.as_mut(), pty) {
            (Some(Input::Pipe(tx)), false) => tx
                .write_all(data)
                .await
                .map_err(|source| ProcessError::Write { pid, source }),
            (Some(Input::Pty(fd)), _) => write_pty(fd, data)
                .await
                .map_err(|source| ProcessError::Write { pid, source }),
            (Some(Input::Pipe(_)), true) => Err(ProcessError::Invalid(format!(
                "process {pid} has no terminal; send stdin instead"
            ))),
            (None, _) => Err(ProcessError::Invalid(format!(
                "stdin of process {pid} is not open"
            ))),
        }
    }

    /// Closes stdin, so that the process reads end-of-file.
    pub async fn close_stdin(&self) -> Result<(), ProcessError> {
        let mut input = self.input.lock().await;
        match input.as_ref() {
            Some(Input::Pty(_)) => Err(ProcessError::Invalid(format!(
                "process {} has a terminal; send ^D (0x04) to signal end of input",
                self.pid
            ))),
            _ => {
                *input = None;
                Ok(())
            }
        }
    }

    /// Changes the terminal size.
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), ProcessError> {
        let Some(pty) = &self.pty else {
            return Err(ProcessError::Invalid(format!(
                "process {} has no terminal",
                self.pid
            )));
        };
        crate::sys::set_winsize(pty.get_ref().as_fd(), cols, rows).map_err(|source| {
            ProcessError::Write {
                pid: self.pid,
                source,
            }
        })
    }
}

async fn write_pty(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Processes by pid; finished ones linger for [`KEEP_FINISHED`] so `Connect` can still read
/// their output.
#[derive(Debug, Default)]
pub struct ProcessTable {
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

/// Selects a process.
#[derive(Debug, Clone)]
pub enum Selector {
    /// By process id.
    Pid(u32),
    /// By tag.
    Tag(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Pid(p) => write!(f, "with pid {p}"),
            Selector::Tag(t) => write!(f, "with tag '{t}'"),
        }
    }
}

impl ProcessTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        match self.procs.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Running processes.
    pub fn running(&self) -> Vec<Arc<Proc>> {
        let mut v: Vec<_> = self
            .lock()
            .values()
            .filter(|p| !p.finished())
            .cloned()
            .collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    /// Finds a process; `include_finished` also matches ones that ended recently.
    pub fn find(&self, sel: &Selector, include_finished: bool) -> Result<Arc<Proc>, ProcessError> {
        let procs = self.lock();
        let found = match sel {
            Selector::Pid(pid) => procs.get(pid).cloned(),
            Selector::Tag(tag) => {
                // Prefer a running process over a finished one with the same tag.
                let mut matching: Vec<_> = procs
                    .values()
                    .filter(|p| p.tag.as_deref() == Some(tag))
                    .cloned()
                    .collect();
                matching.sort_by_key(|p| (!p.finished(), p.pid));
                matching.pop()
            }
        };
        found
            .filter(|p| include_finished || !p.finished())
            .ok_or_else(|| ProcessError::NotFound(sel.to_string()))
    }

    /// SIGKILLs every running process group (shutdown).
    pub fn kill_all(&self) {
        for p in self.running() {
            let _ = p.signal(Signal::SIGKILL);
        }
    }

    /// Starts a process. Its output is collected from the start, so the returned
    /// subscription sees all of it.
    pub fn spawn(
        self: &Arc<Self>,
        reaper: &Arc<Reaper>,
        req: SpawnRequest,
    ) -> Result<(Arc<Proc>, hub::Subscription), ProcessError> {
        let spawn_err = |source: io::Error| ProcessError::Spawn {
            cmd: req.config.cmd.clone(),
            source,
        };
        let mut cmd = Command::new(&req.config.cmd);
        cmd.args(&req.config.args).env_clear().envs(&req.env);

        let euid = nix::unistd::geteuid().as_raw();
        let creds = (euid != req.user.uid).then(|| Credentials {
            uid: req.user.uid,
            gid: req.user.gid,
            groups: req.groups.clone(),
        });
        let cwd = CString::new(req.cwd.as_os_str().as_bytes())
            .map_err(|_| spawn_err(io::Error::new(io::ErrorKind::InvalidInput, "NUL in cwd")))?;

        let mut pty_master = None;
        if let Some((cols, rows)) = req.pty {
            let (master, slave) = open_pty(cols, rows, &req.user).map_err(spawn_err)?;
            cmd.stdin(Stdio::from(slave.try_clone().map_err(spawn_err)?))
                .stdout(Stdio::from(slave.try_clone().map_err(spawn_err)?))
                .stderr(Stdio::from(slave));
            pty_master = Some(master);
        } else {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        }
        crate::sys::configure_child(
            &mut cmd,
            ChildSetup {
                creds,
                cwd,
                controlling_tty: req.pty.is_some(),
            },
        );

        let (mut child, pid, exit_rx) = reaper
            .spawn(|| {
                let child = cmd.spawn()?;
                let pid = child.id();
                Ok((child, pid))
            })
            .map_err(spawn_err)?;
        // `cmd` holds the parent's copies of the slave fds; the master sees EOF only once
        // every slave copy is closed.
        drop(cmd);

        let hub = Arc::new(Hub::default());
        let sub = hub.subscribe();
        let pty = match pty_master {
            Some(m) => Some(Arc::new(crate::sys::async_fd(m).map_err(spawn_err)?)),
            None => None,
        };
        let input = match (&pty, child.stdin.take()) {
            (Some(fd), _) => Some(Input::Pty(fd.clone())),
            (None, Some(stdin)) => tokio::net::unix::pipe::Sender::from_owned_fd(stdin.into())
                .ok()
                .map(Input::Pipe),
            (None, None) => None,
        };
        let proc = Arc::new(Proc {
            pid,
            tag: req.tag.clone(),
            config: req.config.clone(),
            hub: hub.clone(),
            input: AsyncMutex::new(input),
            pty: pty.clone(),
        });
        self.lock().insert(pid, proc.clone());

        let (exited_tx, exited_rx) = tokio::sync::watch::channel(false);
        let mut readers = Vec::new();
        if let Some(fd) = pty {
            readers.push(tokio::spawn(read_output(
                Output::Pty(fd),
                Source::Pty,
                hub.clone(),
                exited_rx.clone(),
            )));
        } else {
            for (fd, source) in [
                (child.stdout.take().map(OwnedFd::from), Source::Stdout),
                (child.stderr.take().map(OwnedFd::from), Source::Stderr),
            ] {
                let Some(fd) = fd else { continue };
                match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
                    Ok(rx) => readers.push(tokio::spawn(read_output(
                        Output::Pipe(rx),
                        source,
                        hub.clone(),
                        exited_rx.clone(),
                    ))),
                    Err(e) => tracing::warn!(pid, error = %e, "cannot read process output"),
                }
            }
        }
        drop(child);

        if let Some(timeout) = req.timeout {
            let p = proc.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout + KILL_AFTER_DEADLINE).await;
                if !p.finished() {
                    tracing::info!(pid = p.pid, ?timeout, "process timed out; killing it");
                    let _ = p.signal(Signal::SIGKILL);
                }
            });
        }

        let table = self.clone();
        let p = proc.clone();
        tokio::spawn(async move {
            let exit = exit_rx.await;
            let _ = exited_tx.send(true);
            for r in readers {
                let _ = r.await;
            }
            // Dropping input now lets a PTY master close once the readers are done.
            *p.input.lock().await = None;
            let end = match exit {
                Ok(exit) => end_of(exit),
                Err(_) => End {
                    exit_code: -1,
                    exited: false,
                    status: "unknown".into(),
                    error: Some("exit status lost".into()),
                },
            };
            tracing::debug!(pid = p.pid, status = %end.status, "process ended");
            p.hub.finish(end);
            p.hub.wait_end_delivered(KEEP_FINISHED).await;
            let mut procs = table.lock();
            // The pid may have been reused by a newer process meanwhile.
            if procs.get(&p.pid).is_some_and(|cur| Arc::ptr_eq(cur, &p)) {
                procs.remove(&p.pid);
            }
        });
        Ok((proc, sub))
    }
}

fn end_of(exit: Exit) -> End {
    End {
        exit_code: exit.code(),
        exited: exit.exited(),
        status: exit.describe(),
        error: None,
    }
}

/// Where a process's output is read from.
enum Output {
    Pipe(tokio::net::unix::pipe::Receiver),
    /// A PTY master, where EIO (all slave ends closed) means EOF.
    Pty(Arc<AsyncFd<OwnedFd>>),
}

impl Output {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Output::Pipe(rx) => rx.read(buf).await,
            Output::Pty(fd) => loop {
                let mut guard = fd.readable().await?;
                match guard.try_io(|inner| {
                    nix::unistd::read(inner.get_ref().as_fd(), buf).map_err(io::Error::from)
                }) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            },
        }
    }
}

/// Reads until EOF, or, once the process has exited, until the output goes quiet: a
/// background child that inherited the pipe must not hold the stream open forever.
async fn read_output(
    mut output: Output,
    source: Source,
    hub: Arc<Hub>,
    mut exited: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        hub.wait_for_room().await;
        let read_once = output.read(&mut buf);
        let result = match drain_deadline {
            None => tokio::select! {
                r = read_once => Some(r),
                _ = exited.wait_for(|e| *e) => None,
            },
            Some(deadline) => {
                let limit = tokio::time::Instant::now() + DRAIN_IDLE;
                match tokio::time::timeout_at(limit.min(deadline), read_once).await {
                    Ok(r) => Some(r),
                    Err(_) => Some(Ok(0)),
                }
            }
        };
        match result {
            None => drain_deadline = Some(tokio::time::Instant::now() + DRAIN_MAX),
            Some(Ok(0)) => break,
            Some(Ok(n)) => hub.push(source, Bytes::copy_from_slice(&buf[..n])),
            Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            // EIO: the last slave fd is closed, the terminal is gone.
            Some(Err(e)) if source == Source::Pty => {
                tracing::trace!(error = %e, "pty read ended");
                break;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "output pipe read failed");
                break;
            }
        }
    }
}

/// Opens a PTY pair sized `cols`x`rows`, with the slave owned by `user` the way a login
/// would leave it. The master is non-blocking for the reactor.
fn open_pty(cols: u16, rows: u16, user: &User) -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::pty::{posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let master: OwnedFd = master.into();
    crate::sys::set_winsize(slave.as_fd(), cols, rows)?;
    if nix::unistd::geteuid().is_root() {
        let _ = nix::unistd::fchown(&slave, Some(nix::unistd::Uid::from_raw(user.uid)), None);
    }
    let flags = OFlag::from_bits_truncate(fcntl(&master, FcntlArg::F_GETFL)?);
    fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok((master, slave))
}
