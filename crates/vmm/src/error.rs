//! The one error type of this crate.

use std::path::PathBuf;

/// What went wrong, with the input it went wrong on.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("the QEMU spawner thread is gone")]
    SpawnerGone,
    #[error("QMP connection to QEMU pid {pid}: {source}")]
    QmpIo { pid: u32, source: std::io::Error },
    #[error("QMP command {command} on QEMU pid {pid} failed: {message}")]
    QmpCommand {
        pid: u32,
        command: &'static str,
        message: String,
    },
    #[error("migration of QEMU pid {pid} {direction} failed: {message}")]
    Migration {
        pid: u32,
        direction: &'static str,
        message: String,
    },
    #[error(
        "QEMU pid {pid} exited ({status}) {during}; its stderr:\n{stderr}\nconsole tail ({console}):\n{console_tail}"
    )]
    QemuExited {
        pid: u32,
        status: String,
        during: &'static str,
        stderr: String,
        console: PathBuf,
        console_tail: String,
    },
    #[error(
        "the guest was not ready on port {guest_port} (forwarded at {addr}) within {secs} s; \
         console tail ({console}):\n{console_tail}"
    )]
    ReadyTimeout {
        guest_port: u16,
        addr: std::net::SocketAddr,
        secs: u64,
        console: PathBuf,
        console_tail: String,
    },
    #[error("{tool} {args} failed ({status}): {stderr}")]
    Tool {
        tool: &'static str,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("guest port {guest_port} is asked to be forwarded twice")]
    DuplicateForward { guest_port: u16 },
    #[error("guest port {guest_port} is not forwarded, so it cannot be probed")]
    NotForwarded { guest_port: u16 },
    #[error("forwarding host {host} to guest port {guest_port} on QEMU pid {pid}: {message}")]
    Forward {
        pid: u32,
        guest_port: u16,
        host: std::net::SocketAddr,
        message: String,
    },
    #[error("no free loopback TCP port: {0}")]
    NoPort(std::io::Error),
    #[error("invalid snapshot {path}: {why}")]
    BadSnapshot { path: PathBuf, why: String },
    #[error("{what} timed out after {ms} ms")]
    Timeout { what: String, ms: u128 },
    #[error(
        "the machine's network is {machine} but the launch attaches {launch}: a snapshot \
         restores only onto the kind of network it was taken with"
    )]
    NetMismatch {
        machine: crate::cmdline::NetKind,
        launch: crate::cmdline::NetKind,
    },
    #[error("opening network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("path {0} is not UTF-8 (QEMU option strings need text)")]
    NonUtf8Path(PathBuf),
    #[error("the machine gives its guest a secret, but the launch names no secret file")]
    NoGuestSecret,
    #[error("reading memory usage of pid {pid}: {why}")]
    Memory { pid: u32, why: String },
}

impl VmmError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| VmmError::Io { op, path, source }
    }
}

pub type Result<T, E = VmmError> = std::result::Result<T, E>;
