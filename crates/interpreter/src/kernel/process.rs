//! The kernel process: its connection file, its spawn (cwd, env, uid/gid, own process group),
//! its log lines and its end.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jupyter_protocol::{ConnectionInfo, Transport};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::watch;

use super::router::Router;
use crate::error::KernelError;
use crate::language::{KernelSpec, SupportFile};

/// Where and as whom kernels run.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Holds the connection files (they carry the HMAC key: mode 0600).
    pub runtime_dir: PathBuf,
    /// Run kernels as this uid and gid; `None` keeps the service's own.
    pub run_as: Option<(u32, u32)>,
    /// `HOME` for kernels; `None` keeps the service's.
    pub home: Option<PathBuf>,
    /// `USER` and `LOGNAME` for kernels; `None` keeps the service's. With `run_as`, the
    /// service's would name root to a kernel that is not (`getpass.getuser()` reads them first).
    pub user: Option<String>,
}

/// A running kernel process. Dropping it kills the kernel's whole process group, so that
/// whatever the user's code started goes with it.
#[derive(Debug)]
pub struct KernelProcess {
    pub pid: Pid,
    /// `Some(status)` once the process has exited.
    pub exited: watch::Receiver<Option<String>>,
    conn_file: PathBuf,
}

impl KernelProcess {
    pub fn has_exited(&self) -> bool {
        self.exited.borrow().is_some()
    }

    pub fn signal(&self, signal: Signal) {
        if self.has_exited() {
            return;
        }
        if let Err(e) = kill(self.pid, signal) {
            tracing::warn!(pid = %self.pid, ?signal, error = %e, "signalling the kernel");
        }
    }
}

impl Drop for KernelProcess {
    fn drop(&mut self) {
        if !self.has_exited() {
            // The group's leader is the kernel (process_group(0)), so its pid is the group id.
            let _ = killpg(self.pid, Signal::SIGKILL);
        }
        let _ = std::fs::remove_file(&self.conn_file);
    }
}

/// Picks ports, writes the connection file and starts the kernel. `router` is closed when
/// the process exits, which ends every run still waiting on it.
pub async fn spawn(
    language: &str,
    spec: &KernelSpec,
    cwd: &Path,
    opts: &KernelOptions,
    router: Router,
) -> Result<(KernelProcess, ConnectionInfo), KernelError> {
    let (ports, listeners) = free_ports(language).await?;
    let info = ConnectionInfo {
        ip: "127.0.0.1".to_owned(),
        transport: Transport::TCP,
        shell_port: ports[0],
        iopub_port: ports[1],
        stdin_port: ports[2],
        control_port: ports[3],
        hb_port: ports[4],
        key: uuid::Uuid::new_v4().simple().to_string(),
        signature_scheme: "hmac-sha256".to_owned(),
        kernel_name: Some(language.to_owned()),
    };
    let conn_file = opts
        .runtime_dir
        .join(format!("kernel-{}.json", uuid::Uuid::new_v4()));
    write_connection_file(&conn_file, &info, opts.run_as)?;

    let Some((program, args)) = spec.argv.split_first() else {
        return Err(KernelError::EmptyArgv {
            language: language.to_owned(),
        });
    };
    let support_dir = opts.runtime_dir.join("support");
    if !spec.support_files.is_empty()
        && let Err(e) = write_support_files(&support_dir, spec.support_files)
    {
        let _ = std::fs::remove_file(&conn_file);
        return Err(e);
    }
    let file = conn_file.to_string_lossy();
    let support = support_dir.to_string_lossy();
    let mut cmd = Command::new(program);
    cmd.args(args.iter().map(|a| {
        a.replace("{connection_file}", &file)
            .replace("{support_dir}", &support)
    }))
    .envs(&spec.env)
    .current_dir(cwd)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // Its own group: SIGINT from a terminal never reaches it, and the group dies with it.
    .process_group(0)
    .kill_on_drop(true);
    // ipykernel exits when this pid goes away, so kernels never outlive a killed service.
    cmd.env("JPY_PARENT_PID", std::process::id().to_string());
    if let Some(home) = &opts.home {
        cmd.env("HOME", home);
    }
    if let Some(user) = &opts.user {
        cmd.env("USER", user).env("LOGNAME", user);
    }
    if let Some((uid, gid)) = opts.run_as {
        cmd.uid(uid).gid(gid);
    }
    let spawned = cmd.spawn();
    // The kernel binds these ports itself; holding them until now kept other binds off them.
    drop(listeners);
    let mut child = spawned.map_err(|source| {
        let _ = std::fs::remove_file(&conn_file);
        KernelError::Spawn {
            language: language.to_owned(),
            program: program.clone(),
            cwd: cwd.to_owned(),
            source,
        }
    })?;
    // Never 0 (that would signal our own group): no id means it has already been reaped.
    let Some(raw_pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        let _ = std::fs::remove_file(&conn_file);
        return Err(KernelError::ExitedEarly {
            language: language.to_owned(),
            status: "gone before it had a pid".to_owned(),
        });
    };
    let pid = Pid::from_raw(raw_pid);
    tracing::info!(%language, %pid, cwd = %cwd.display(), "kernel started");

    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_lines(out, language.to_owned(), "stdout"));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_lines(err, language.to_owned(), "stderr"));
    }
    let (tx, exited) = watch::channel(None);
    let lang = language.to_owned();
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        tracing::info!(language = %lang, %pid, %status, "kernel exited");
        let _ = tx.send(Some(status));
        router.close();
    });
    Ok((
        KernelProcess {
            pid,
            exited,
            conn_file,
        },
        info,
    ))
}

/// Ports handed to kernels lately: a kernel binds its ports a while after we release them, and
/// a second kernel starting meanwhile must not be given the same ones.
static RECENT_PORTS: Mutex<BTreeMap<u16, Instant>> = Mutex::new(BTreeMap::new());
/// Long enough for any kernel to have bound its ports (or to have failed).
const PORT_QUARANTINE: Duration = Duration::from_secs(120);

/// Five free loopback ports, none handed out by this process lately; the listeners hold them
/// until the kernel is spawned.
async fn free_ports(language: &str) -> Result<(Vec<u16>, Vec<TcpListener>), KernelError> {
    let mut ports = Vec::with_capacity(5);
    let mut listeners = Vec::with_capacity(5);
    let mut skipped = Vec::new();
    while ports.len() < 5 {
        let (mut got, mut held) =
            jupyter_zmq_client::peek_ports_with_listeners(IpAddr::V4(Ipv4Addr::LOCALHOST), 1)
                .await
                .map_err(|source| KernelError::Ports {
                    language: language.to_owned(),
                    source,
                })?;
        let (Some(port), Some(listener)) = (got.pop(), held.pop()) else {
            continue;
        };
        let mut recent = RECENT_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        recent.retain(|_, at| now.duration_since(*at) < PORT_QUARANTINE);
        if recent.contains_key(&port) {
            // Kept bound so the next peek cannot return it again.
            skipped.push(listener);
            continue;
        }
        recent.insert(port, now);
        ports.push(port);
        listeners.push(listener);
    }
    Ok((ports, listeners))
}

/// Writes each file unless it already holds these contents: a new file goes in by rename, so a
/// kernel starting at the same time never reads half of one. Readable by all: kernels run as
/// the sandbox's user.
fn write_support_files(dir: &Path, files: &[SupportFile]) -> Result<(), KernelError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| KernelError::SupportFile { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io_err(dir))?;
    for file in files {
        let path = dir.join(file.name);
        if std::fs::read(&path).is_ok_and(|held| held == file.contents.as_bytes()) {
            continue;
        }
        let partial = dir.join(format!(".{}.{}", file.name, std::process::id()));
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&partial)
            .and_then(|mut f| f.write_all(file.contents.as_bytes()))
            .and_then(|()| std::fs::rename(&partial, &path));
        if let Err(source) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(KernelError::SupportFile { path, source });
        }
    }
    Ok(())
}

fn write_connection_file(
    path: &Path,
    info: &ConnectionInfo,
    run_as: Option<(u32, u32)>,
) -> Result<(), KernelError> {
    let io_err = |source| KernelError::ConnectionFile {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let json = serde_json::to_vec(info).map_err(|e| io_err(e.into()))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err)?;
    f.write_all(&json).map_err(io_err)?;
    if let Some((uid, gid)) = run_as {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|source| KernelError::Chown {
            path: path.to_owned(),
            uid,
            source,
        })?;
    }
    Ok(())
}

async fn log_lines(stream: impl AsyncRead + Unpin, language: String, which: &'static str) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(%language, stream = which, "{line}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FILE: SupportFile = SupportFile {
        name: "helper.py",
        contents: "X = 1\n",
    };

    #[test]
    fn support_files_are_written_readable_and_rewritten_only_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let support = dir.path().join("support");
        write_support_files(&support, &[FILE]).unwrap();
        let path = support.join("helper.py");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "X = 1\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o644);
        assert_eq!(mode(&support), 0o755);

        // Unchanged contents: the file is left alone (same inode).
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&path).unwrap().ino();
        write_support_files(&support, &[FILE]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);

        // A stale copy (an older service's) is replaced whole, with nothing left beside it.
        std::fs::write(&path, "X = 0\n").unwrap();
        write_support_files(&support, &[FILE]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "X = 1\n");
        assert_eq!(std::fs::read_dir(&support).unwrap().count(), 1);
    }

    #[test]
    fn python_kernels_load_the_chart_formatter() {
        let python = &crate::language::default_kernels()["python"];
        assert_eq!(python.support_files, &[crate::language::PYTHON_CHARTS]);
        assert!(
            python
                .argv
                .iter()
                .any(|a| a.contains("firkin_charts") && a.contains("{support_dir}"))
        );
    }
}
