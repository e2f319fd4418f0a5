//! The high-level VM API the runtime calls: cold boot, template snapshot, copy-on-write restore,
//! continuation (pause) and stop.
//!
//! Snapshot layout (a directory; [`Snapshot::files`] lists what to seal):
//!
//! * `ram.img`: guest RAM. Written by a QEMU whose RAM was `memory-backend-file,share=on`
//!   over it; restored clones map it `share=off`, i.e. copy-on-write.
//! * `state.bin`: the device-state migration stream, made with `x-ignore-shared` so that it
//!   holds no RAM pages.
//! * `disk.img` (template, raw) or `disk.qcow2` (continuation, an overlay on the template's
//!   disk): the root disk as it was when the guest stopped. Read-only from then on.
//! * `snapshot.json`: [`Snapshot`], including the exact [`MachineConfig`].
//!
//! QEMU 7.2 has no `file:` migration URI and `exec:` is refused by `-sandbox spawn=deny`, so
//! outgoing streams go to a unix socket this process reads from, and incoming streams come from
//! a file descriptor QEMU inherits (`migrate-incoming fd:4`).

use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::cmdline::{
    self, CODE_PORT, DiskFormat, DiskLayer, ENVD_PORT, GUEST_SECRET_LEN, Launch, MachineConfig,
    QMP_FD, STATE_FD,
};
use crate::error::{Result, VmmError};
use crate::process::{self, ChildHandle, ExitInfo};
use crate::qmp::Qmp;

/// File names inside a snapshot directory.
pub const SNAPSHOT_JSON: &str = "snapshot.json";
pub const RAM_FILE: &str = "ram.img";
pub const STATE_FILE: &str = "state.bin";
pub const TEMPLATE_DISK_FILE: &str = "disk.img";
pub const CONTINUATION_DISK_FILE: &str = "disk.qcow2";

/// File names inside a VM's run directory.
pub const CONSOLE_LOG: &str = "console.log";
pub const QEMU_LOG: &str = "qemu.log";
pub const OVERLAY_FILE: &str = "overlay.qcow2";
pub const SECRET_FILE: &str = "secret";

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a snapshot was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// A freshly booted (and prepared) template.
    Template,
    /// A paused sandbox (E2B "pause").
    Continuation,
}

/// Everything needed to restore, stored as `snapshot.json`. Relative paths are relative to
/// the snapshot directory; absolute ones (the lower disk layers of a continuation) point into
/// the template it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub kind: SnapshotKind,
    pub machine: MachineConfig,
    pub ram: PathBuf,
    pub state: PathBuf,
    /// Disk backing chain, top first.
    pub disk: Vec<DiskLayer>,
    /// Where the snapshot lives; set by [`Snapshot::load`], not stored.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Snapshot {
    /// Reads `dir/snapshot.json`.
    pub fn load(dir: &Path) -> Result<Snapshot> {
        let path = dir.join(SNAPSHOT_JSON);
        let text = std::fs::read_to_string(&path).map_err(VmmError::io("reading", &path))?;
        let mut snap: Snapshot =
            serde_json::from_str(&text).map_err(|e| VmmError::BadSnapshot {
                path: path.clone(),
                why: e.to_string(),
            })?;
        if snap.version != 1 {
            return Err(VmmError::BadSnapshot {
                path,
                why: format!("unsupported version {}", snap.version),
            });
        }
        if snap.disk.is_empty() {
            return Err(VmmError::BadSnapshot {
                path,
                why: "no disk".into(),
            });
        }
        snap.dir = dir.to_path_buf();
        Ok(snap)
    }

    fn save(&self) -> Result<()> {
        let path = self.dir.join(SNAPSHOT_JSON);
        let text = serde_json::to_string_pretty(self).map_err(|e| VmmError::BadSnapshot {
            path: path.clone(),
            why: e.to_string(),
        })?;
        write_durable(&path, text.as_bytes())
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    pub fn ram_path(&self) -> PathBuf {
        self.resolve(&self.ram)
    }

    pub fn state_path(&self) -> PathBuf {
        self.resolve(&self.state)
    }

    /// The disk chain with absolute paths, top first.
    pub fn disk_chain(&self) -> Vec<DiskLayer> {
        self.disk
            .iter()
            .map(|l| DiskLayer {
                path: self.resolve(&l.path),
                format: l.format,
            })
            .collect()
    }

    /// The files this snapshot owns (inside its directory), for sealing. Lower disk layers
    /// that live in another snapshot are that snapshot's to seal.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.dir.join(SNAPSHOT_JSON),
            self.ram_path(),
            self.state_path(),
        ];
        files.extend(
            self.disk
                .iter()
                .filter(|l| l.path.is_relative())
                .map(|l| self.dir.join(&l.path)),
        );
        files
    }
}

/// A cold boot of a template.
#[derive(Debug, Clone)]
pub struct BootRequest {
    pub machine: MachineConfig,
    /// Per-VM directory (created if missing): console log, QEMU log, sockets.
    pub run_dir: PathBuf,
    /// Guest RAM file, mapped `share=on` so that it becomes the snapshot's RAM image.
    pub ram_path: PathBuf,
    /// The template's root disk, raw, written in place.
    pub disk: PathBuf,
    /// How long envd may take to answer `/health`.
    pub health_timeout: Duration,
}

/// A restore of a snapshot into a new VM.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// Per-VM directory (created if missing); holds the clone's qcow2 overlay.
    pub run_dir: PathBuf,
    /// How long envd may take to answer `/health` after `cont`.
    pub health_timeout: Duration,
}

/// How long each phase of a restore took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreTimings {
    pub overlay_ms: f64,
    pub spawn_to_qmp_ms: f64,
    pub load_state_ms: f64,
    pub cont_to_health_ms: f64,
    pub total_ms: f64,
}

/// Memory of one QEMU process, from `/proc/PID/smaps_rollup` (KiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryUsage {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub pss_anon_kib: u64,
    pub pss_file_kib: u64,
    pub private_dirty_kib: u64,
    pub shared_clean_kib: u64,
}

/// A running QEMU microvm owned by this process.
#[derive(Debug)]
pub struct Vm {
    machine: MachineConfig,
    launch: Launch,
    run_dir: PathBuf,
    child: ChildHandle,
    qmp: Qmp,
    envd: SocketAddr,
    code: SocketAddr,
    timings: RestoreTimings,
    /// The secret this QEMU gives its guest (see [`MachineConfig::guest_secret`]).
    secret: Option<String>,
    /// Cleared once the run directory has been removed or handed over.
    owns_run_dir: bool,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The child handle kills QEMU when dropped; the run dir (overlay included) goes too,
        // so an abandoned VM leaves nothing behind.
        self.child.signal(Signal::SIGKILL);
        if self.owns_run_dir {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}

fn free_port() -> Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(VmmError::NoPort)
}

fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(VmmError::io("creating", &tmp))?;
    f.write_all(bytes).map_err(VmmError::io("writing", &tmp))?;
    f.sync_all().map_err(VmmError::io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(VmmError::io("renaming", &tmp))
}

/// A fresh secret for one QEMU, written (mode 0600) to `run_dir/secret` for its `-fw_cfg`.
/// `None` when the machine gives its guest none.
fn guest_secret(machine: &MachineConfig, run_dir: &Path) -> Result<Option<(String, PathBuf)>> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    if !machine.guest_secret {
        return Ok(None);
    }
    let mut raw = [0u8; GUEST_SECRET_LEN / 2];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(VmmError::io("reading", "/dev/urandom"))?;
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let path = run_dir.join(SECRET_FILE);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(VmmError::io("creating", &path))?;
    f.write_all(secret.as_bytes())
        .map_err(VmmError::io("writing", &path))?;
    Ok(Some((secret, path)))
}

/// Last `max_lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, max_lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

/// Moves `from` to `to`, copying when they are on different filesystems.
fn move_file(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(from, to).map_err(VmmError::io("copying", from))?;
            std::fs::remove_file(from).map_err(VmmError::io("removing", from))
        }
        Err(e) => Err(VmmError::io("moving", from)(e)),
    }
}

fn fsync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(VmmError::io("syncing", path))
}

fn make_read_only(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(VmmError::io("making read-only", path))
}

/// `qemu-img create -f qcow2 -b BACKING -F FMT OVERLAY`. The backing path recorded in the
/// header is informational: QEMU is always given the whole chain explicitly.
pub async fn create_overlay(qemu_img: &Path, backing: &DiskLayer, overlay: &Path) -> Result<()> {
    run_qemu_img(qemu_img, qcow2_on("create", backing, overlay)).await
}

/// `qemu-img rebase -f qcow2 -b BASE -F FMT OVERLAY` (safe mode): copies into `overlay` every
/// cluster the layers between it and `base` hold, then records `base` as its backing file. With
/// `base` in the old chain, only clusters allocated above it are compared (milliseconds for a
/// sandbox's few MiB). A failure part-way leaves `overlay` valid on its old chain: the copied
/// clusters hold what the old chain already read there.
pub async fn flatten_onto(qemu_img: &Path, overlay: &Path, base: &DiskLayer) -> Result<()> {
    run_qemu_img(qemu_img, qcow2_on("rebase", base, overlay)).await
}

/// `qemu-img SUBCOMMAND -q -f qcow2 -F FMT -b BACKING OVERLAY`: the shape `create` and `rebase`
/// share.
fn qcow2_on(subcommand: &str, backing: &DiskLayer, overlay: &Path) -> Vec<std::ffi::OsString> {
    vec![
        subcommand.into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        backing.format.as_str().into(),
        "-b".into(),
        backing.path.clone().into(),
        overlay.into(),
    ]
}

async fn run_qemu_img(qemu_img: &Path, args: Vec<std::ffi::OsString>) -> Result<()> {
    let out = tokio::process::Command::new(qemu_img)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| VmmError::Spawn {
            program: qemu_img.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmmError::Tool {
            tool: "qemu-img",
            args: cmdline::render(qemu_img, &args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The `qemu-img` next to the configured QEMU binary, else the one on `PATH`.
fn qemu_img_for(machine: &MachineConfig) -> PathBuf {
    machine
        .qemu
        .parent()
        .map(|d| d.join("qemu-img"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Starts QEMU and connects QMP. A QEMU that dies during start-up is reported with its stderr.
async fn launch_qemu(
    machine: &MachineConfig,
    launch: &Launch,
    run_dir: &Path,
    state_fd: Option<OwnedFd>,
) -> Result<(ChildHandle, Qmp)> {
    let args = cmdline::qemu_args(machine, launch)?;
    tracing::debug!(cmdline = %cmdline::render(&machine.qemu, &args), "starting QEMU");
    let log_path = run_dir.join(QEMU_LOG);
    let log = std::fs::File::create(&log_path).map_err(VmmError::io("creating", &log_path))?;
    let log2 = log
        .try_clone()
        .map_err(VmmError::io("duplicating", &log_path))?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(VmmError::io("creating QMP socketpair for", run_dir))?;
    let mut cmd = std::process::Command::new(&machine.qemu);
    cmd.args(&args)
        .stdout(log)
        .stderr(log2)
        .current_dir(run_dir);
    let mut inherit = vec![(OwnedFd::from(theirs), QMP_FD)];
    if let Some(fd) = state_fd {
        inherit.push((fd, STATE_FD));
    }
    let child = process::spawn(cmd, inherit).await?;
    match Qmp::connect(child.pid(), ours).await {
        Ok(qmp) => Ok((child, qmp)),
        Err(e) => {
            // The usual cause is QEMU refusing its command line; say why.
            let exit = child.wait_timeout(Duration::from_secs(2)).await;
            match exit {
                Some(info) => Err(exited_error(
                    &child,
                    info,
                    "during start-up",
                    launch,
                    run_dir,
                )),
                None => Err(e),
            }
        }
    }
}

fn exited_error(
    child: &ChildHandle,
    info: ExitInfo,
    during: &'static str,
    launch: &Launch,
    run_dir: &Path,
) -> VmmError {
    VmmError::QemuExited {
        pid: child.pid(),
        status: info.to_string(),
        during,
        stderr: log_tail(&run_dir.join(QEMU_LOG), 20),
        console: launch.console_log.clone(),
        console_tail: log_tail(&launch.console_log, 30),
    }
}

impl Vm {
    /// Boots a template from kernel + initramfs + raw root disk, RAM `share=on` at
    /// `req.ram_path`, and waits until envd answers `/health`.
    pub async fn cold_boot(req: BootRequest) -> Result<Vm> {
        let start = Instant::now();
        std::fs::create_dir_all(&req.run_dir).map_err(VmmError::io("creating", &req.run_dir))?;
        let (secret, secret_file) = guest_secret(&req.machine, &req.run_dir)?.unzip();
        let launch_for = |envd: u16, code: u16| Launch {
            ram_path: req.ram_path.clone(),
            ram_shared: true,
            disk: vec![DiskLayer {
                path: req.disk.clone(),
                format: DiskFormat::Raw,
            }],
            forwards: vec![(envd, ENVD_PORT), (code, CODE_PORT)],
            console_log: req.run_dir.join(CONSOLE_LOG),
            incoming: false,
            paused: false,
            secret_file: secret_file.clone(),
        };
        let (launch, child, qmp, envd, code) =
            Self::spawn_with_ports(&req.machine, &req.run_dir, launch_for, || Ok(None)).await?;
        let mut vm = Vm {
            machine: req.machine,
            launch,
            run_dir: req.run_dir,
            child,
            qmp,
            envd,
            code,
            timings: RestoreTimings::default(),
            secret,
            owns_run_dir: true,
        };
        vm.wait_healthy(req.health_timeout, "booting").await?;
        vm.timings.total_ms = ms(start.elapsed());
        tracing::info!(pid = vm.pid(), envd = %vm.envd, ms = vm.timings.total_ms, "cold boot ready");
        Ok(vm)
    }

    /// Spawns with fresh loopback ports, retrying when another process took a port between
    /// our probe and QEMU's bind.
    async fn spawn_with_ports(
        machine: &MachineConfig,
        run_dir: &Path,
        launch_for: impl Fn(u16, u16) -> Launch,
        state_fd: impl Fn() -> Result<Option<OwnedFd>>,
    ) -> Result<(Launch, ChildHandle, Qmp, SocketAddr, SocketAddr)> {
        let mut last = None;
        for _ in 0..3 {
            let (envd, code) = (free_port()?, free_port()?);
            if envd == code {
                continue;
            }
            let launch = launch_for(envd, code);
            match launch_qemu(machine, &launch, run_dir, state_fd()?).await {
                Ok((child, qmp)) => {
                    let addr = |p| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
                    return Ok((launch, child, qmp, addr(envd), addr(code)));
                }
                Err(VmmError::QemuExited { stderr, .. }) if stderr.contains("host forwarding") => {
                    tracing::warn!(envd, code, "port taken before QEMU bound it; retrying");
                    last = Some(stderr);
                }
                Err(e) => return Err(e),
            }
        }
        Err(VmmError::NoPort(std::io::Error::other(
            last.unwrap_or_else(|| "ports kept colliding".into()),
        )))
    }

    /// Polls `/health` until it answers, QEMU dies, or the timeout passes.
    async fn wait_healthy(&self, timeout: Duration, during: &'static str) -> Result<()> {
        let start = Instant::now();
        let mut exit = self.child.subscribe();
        loop {
            if health_probe(self.envd).await {
                return Ok(());
            }
            if let Some(info) = exit.borrow_and_update().clone() {
                return Err(exited_error(
                    &self.child,
                    info,
                    during,
                    &self.launch,
                    &self.run_dir,
                ));
            }
            if start.elapsed() > timeout {
                return Err(VmmError::HealthTimeout {
                    addr: self.envd,
                    secs: timeout.as_secs(),
                    console: self.launch.console_log.clone(),
                    console_tail: log_tail(&self.launch.console_log, 30),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(3)) => {}
                _ = exit.changed() => {}
            }
        }
    }

    /// Restores a snapshot: private (copy-on-write) RAM over its RAM image, a fresh qcow2
    /// overlay on its disk, fresh loopback ports; loads the device state and resumes.
    pub async fn restore(snapshot: &Snapshot, req: RestoreRequest) -> Result<Vm> {
        let start = Instant::now();
        let mut timings = RestoreTimings::default();
        std::fs::create_dir_all(&req.run_dir).map_err(VmmError::io("creating", &req.run_dir))?;
        let chain = snapshot.disk_chain();
        let overlay = req.run_dir.join(OVERLAY_FILE);
        let top = chain.first().ok_or_else(|| VmmError::BadSnapshot {
            path: snapshot.dir.clone(),
            why: "no disk".into(),
        })?;
        create_overlay(&qemu_img_for(&snapshot.machine), top, &overlay).await?;
        timings.overlay_ms = ms(start.elapsed());

        let mut disk = vec![DiskLayer {
            path: overlay,
            format: DiskFormat::Qcow2,
        }];
        disk.extend(chain);
        let ram_path = snapshot.ram_path();
        let state_path = snapshot.state_path();
        let (secret, secret_file) = guest_secret(&snapshot.machine, &req.run_dir)?.unzip();
        let launch_for = |envd: u16, code: u16| Launch {
            ram_path: ram_path.clone(),
            ram_shared: false,
            disk: disk.clone(),
            forwards: vec![(envd, ENVD_PORT), (code, CODE_PORT)],
            console_log: req.run_dir.join(CONSOLE_LOG),
            incoming: true,
            paused: false,
            secret_file: secret_file.clone(),
        };
        let open_state = || {
            std::fs::File::open(&state_path)
                .map(|f| Some(OwnedFd::from(f)))
                .map_err(VmmError::io("opening", &state_path))
        };
        let t = Instant::now();
        let (launch, child, qmp, envd, code) =
            Self::spawn_with_ports(&snapshot.machine, &req.run_dir, launch_for, open_state).await?;
        timings.spawn_to_qmp_ms = ms(t.elapsed());
        let mut vm = Vm {
            machine: snapshot.machine.clone(),
            launch,
            run_dir: req.run_dir,
            child,
            qmp,
            envd,
            code,
            timings: RestoreTimings::default(),
            secret,
            owns_run_dir: true,
        };
        let t = Instant::now();
        vm.qmp.set_ignore_shared(true).await?;
        vm.qmp.migrate_incoming(format!("fd:{STATE_FD}")).await?;
        vm.qmp.wait_migration("in", MIGRATION_TIMEOUT).await?;
        timings.load_state_ms = ms(t.elapsed());
        let t = Instant::now();
        vm.qmp.cont().await?;
        vm.wait_healthy(req.health_timeout, "restoring").await?;
        timings.cont_to_health_ms = ms(t.elapsed());
        timings.total_ms = ms(start.elapsed());
        vm.timings = timings;
        tracing::info!(pid = vm.pid(), envd = %vm.envd, timings = ?vm.timings, "restore ready");
        Ok(vm)
    }

    /// Streams this VM's migration (RAM skipped per `x-ignore-shared`) into `out`.
    async fn migrate_to_file(&self, out: &Path) -> Result<()> {
        let sock = self.run_dir.join("migrate.sock");
        let _ = std::fs::remove_file(&sock);
        let listener =
            tokio::net::UnixListener::bind(&sock).map_err(VmmError::io("listening on", &sock))?;
        let out_path = out.to_path_buf();
        let reader = tokio::spawn(async move {
            let (mut stream, _) = listener
                .accept()
                .await
                .map_err(VmmError::io("accepting migration on", &sock))?;
            let mut file = tokio::fs::File::create(&out_path)
                .await
                .map_err(VmmError::io("creating", &out_path))?;
            tokio::io::copy(&mut stream, &mut file)
                .await
                .map_err(VmmError::io("writing", &out_path))?;
            file.sync_all()
                .await
                .map_err(VmmError::io("syncing", &out_path))?;
            let _ = std::fs::remove_file(&sock);
            Ok::<_, VmmError>(())
        });
        let sock_path = self.run_dir.join("migrate.sock");
        let uri = format!(
            "unix:{}",
            sock_path
                .to_str()
                .ok_or_else(|| VmmError::NonUtf8Path(sock_path.clone()))?
        );
        if let Err(e) = self.qmp.migrate(uri).await {
            reader.abort();
            return Err(e);
        }
        let outcome = self.qmp.wait_migration("out", MIGRATION_TIMEOUT).await;
        if let Err(e) = outcome {
            reader.abort();
            return Err(e);
        }
        match tokio::time::timeout(MIGRATION_TIMEOUT, reader).await {
            Ok(Ok(res)) => res,
            Ok(Err(join)) => Err(VmmError::Migration {
                pid: self.pid(),
                direction: "out",
                message: format!("stream reader failed: {join}"),
            }),
            Err(_) => Err(VmmError::Timeout {
                what: format!("writing {}", out.display()),
                ms: MIGRATION_TIMEOUT.as_millis(),
            }),
        }
    }

    /// Asks QEMU to quit, then kills it if it has not exited within `timeout`.
    async fn quit_or_kill(&self, timeout: Duration) -> ExitInfo {
        if self.child.is_alive() {
            let _ = tokio::time::timeout(timeout, self.qmp.quit()).await;
        }
        match self.child.wait_timeout(timeout).await {
            Some(info) => info,
            None => {
                tracing::warn!(pid = self.pid(), "QEMU did not quit in time; killing it");
                self.child.signal(Signal::SIGKILL);
                self.child.wait().await
            }
        }
    }

    /// Snapshots a booted template: pauses it, writes the device state, quits QEMU and moves
    /// the RAM file and disk into `out_dir` (renamed when on the same filesystem). The disk is
    /// read-only afterwards: every clone's overlay depends on it staying as it is.
    pub async fn snapshot_template(mut self, out_dir: &Path) -> Result<Snapshot> {
        std::fs::create_dir_all(out_dir).map_err(VmmError::io("creating", out_dir))?;
        self.qmp.stop().await?;
        self.qmp.set_ignore_shared(true).await?;
        self.migrate_to_file(&out_dir.join(STATE_FILE)).await?;
        let exit = self.quit_or_kill(QUIT_TIMEOUT).await;
        tracing::debug!(pid = self.pid(), %exit, "template QEMU exited after snapshot");

        let ram = out_dir.join(RAM_FILE);
        if self.launch.ram_path != ram {
            move_file(&self.launch.ram_path, &ram)?;
        }
        fsync_path(&ram)?;
        let disk = out_dir.join(TEMPLATE_DISK_FILE);
        let src_disk = self
            .launch
            .disk
            .first()
            .map(|l| l.path.clone())
            .ok_or_else(|| VmmError::BadSnapshot {
                path: out_dir.to_path_buf(),
                why: "template VM had no disk".into(),
            })?;
        if src_disk != disk {
            move_file(&src_disk, &disk)?;
        }
        fsync_path(&disk)?;
        make_read_only(&disk)?;

        let snap = Snapshot {
            version: 1,
            kind: SnapshotKind::Template,
            machine: self.machine.clone(),
            ram: RAM_FILE.into(),
            state: STATE_FILE.into(),
            disk: vec![DiskLayer {
                path: TEMPLATE_DISK_FILE.into(),
                format: DiskFormat::Raw,
            }],
            dir: out_dir.to_path_buf(),
        };
        snap.save()?;
        let _ = std::fs::remove_dir_all(&self.run_dir);
        self.owns_run_dir = false;
        Ok(snap)
    }

    /// Saves this running VM as a continuation in `out_dir` and stops it (E2B "pause").
    ///
    /// A clone's RAM is a private copy-on-write mapping, which `x-ignore-shared` does not skip,
    /// and there is no QEMU 7.2 way to write just the dirty pages. So the clone is migrated
    /// (RAM included) into a paused helper QEMU whose RAM is `share=on` over the new
    /// `out_dir/ram.img`, which thereby becomes a full RAM image; the helper then writes the
    /// device state with `x-ignore-shared`, exactly like a template snapshot. The clone's
    /// overlay becomes `out_dir/disk.qcow2`, flattened onto the template's disk: the result
    /// needs no earlier continuation (unless flattening failed; its chain says which it needs).
    pub async fn save_continuation(mut self, out_dir: &Path) -> Result<Snapshot> {
        std::fs::create_dir_all(out_dir).map_err(VmmError::io("creating", out_dir))?;
        self.qmp.stop().await?;
        let helper_dir = self.run_dir.join("saver");
        std::fs::create_dir_all(&helper_dir).map_err(VmmError::io("creating", &helper_dir))?;

        // The helper needs the same devices, so the same disk chain shape; it gets a scratch
        // overlay of its own so the clone's overlay has exactly one writer.
        let lower: Vec<DiskLayer> = self.launch.disk.iter().skip(1).cloned().collect();
        let below = lower.first().ok_or_else(|| VmmError::BadSnapshot {
            path: self.run_dir.clone(),
            why: "continuation needs a VM restored onto an overlay".into(),
        })?;
        let scratch = helper_dir.join("scratch.qcow2");
        create_overlay(&qemu_img_for(&self.machine), below, &scratch).await?;
        let mut helper_disk = vec![DiskLayer {
            path: scratch.clone(),
            format: DiskFormat::Qcow2,
        }];
        helper_disk.extend(lower.iter().cloned());
        let ram = out_dir.join(RAM_FILE);
        let _ = std::fs::remove_file(&ram);
        // The helper runs no guest code (it is migrated into, paused, and saved), but its
        // devices must match, fw_cfg file included.
        let (_, helper_secret) = guest_secret(&self.machine, &helper_dir)?.unzip();
        let helper_launch = Launch {
            ram_path: ram.clone(),
            ram_shared: true,
            disk: helper_disk,
            forwards: vec![],
            console_log: helper_dir.join(CONSOLE_LOG),
            incoming: true,
            paused: true,
            secret_file: helper_secret,
        };
        let (helper_child, helper_qmp) =
            launch_qemu(&self.machine, &helper_launch, &helper_dir, None).await?;
        let helper = Vm {
            machine: self.machine.clone(),
            launch: helper_launch,
            run_dir: helper_dir.clone(),
            child: helper_child,
            qmp: helper_qmp,
            envd: self.envd,
            code: self.code,
            timings: RestoreTimings::default(),
            secret: None,
            owns_run_dir: false,
        };

        // Clone → helper, RAM included.
        let in_sock = helper_dir.join("in.sock");
        let in_uri = format!(
            "unix:{}",
            in_sock
                .to_str()
                .ok_or_else(|| VmmError::NonUtf8Path(in_sock.clone()))?
        );
        helper.qmp.set_ignore_shared(false).await?;
        helper.qmp.migrate_incoming(in_uri.clone()).await?;
        self.qmp.set_ignore_shared(false).await?;
        self.qmp.migrate(in_uri).await?;
        let (out, inc) = tokio::join!(
            self.qmp
                .wait_migration("out (to continuation helper)", MIGRATION_TIMEOUT),
            helper
                .qmp
                .wait_migration("in (continuation helper)", MIGRATION_TIMEOUT)
        );
        let out = out?;
        inc?;
        tracing::debug!(pid = self.pid(), ram_bytes = ?out.ram_transferred, "clone RAM captured");

        // The clone is done: its overlay was flushed when the migration completed.
        let exit = self.quit_or_kill(QUIT_TIMEOUT).await;
        tracing::debug!(pid = self.pid(), %exit, "paused clone exited");
        let disk = out_dir.join(CONTINUATION_DISK_FILE);
        let overlay = self.run_dir.join(OVERLAY_FILE);
        move_file(&overlay, &disk)?;
        // A resumed sandbox's overlay sits on its previous pause's layers. Folding those in keeps
        // every continuation one layer over its template, so earlier pauses can be deleted and
        // the chain never deepens however often a sandbox is paused.
        let mut lower = lower;
        if lower.len() > 1
            && let Some(base) = lower.last().cloned()
        {
            let started = Instant::now();
            match flatten_onto(&qemu_img_for(&self.machine), &disk, &base).await {
                Ok(()) => {
                    tracing::debug!(
                        layers_folded = lower.len() - 1,
                        ms = ms(started.elapsed()),
                        "continuation disk flattened onto its template"
                    );
                    lower = vec![base];
                }
                Err(err) => tracing::warn!(%err, "keeping the continuation's full disk chain"),
            }
        }
        fsync_path(&disk)?;
        make_read_only(&disk)?;

        // Helper → device state, RAM skipped (it is in ram.img now).
        helper.qmp.set_ignore_shared(true).await?;
        helper.migrate_to_file(&out_dir.join(STATE_FILE)).await?;
        helper.quit_or_kill(QUIT_TIMEOUT).await;
        fsync_path(&ram)?;
        drop(helper);

        let mut chain = vec![DiskLayer {
            path: CONTINUATION_DISK_FILE.into(),
            format: DiskFormat::Qcow2,
        }];
        chain.extend(lower);
        let snap = Snapshot {
            version: 1,
            kind: SnapshotKind::Continuation,
            machine: self.machine.clone(),
            ram: RAM_FILE.into(),
            state: STATE_FILE.into(),
            disk: chain,
            dir: out_dir.to_path_buf(),
        };
        snap.save()?;
        let _ = std::fs::remove_dir_all(&self.run_dir);
        self.owns_run_dir = false;
        Ok(snap)
    }

    /// Stops the VM (QMP `quit`, then SIGKILL after `timeout`) and removes its run directory,
    /// overlay included.
    pub async fn stop(mut self, timeout: Duration) -> Result<ExitInfo> {
        let exit = self.quit_or_kill(timeout).await;
        std::fs::remove_dir_all(&self.run_dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(VmmError::io("removing", &self.run_dir))?;
        self.owns_run_dir = false;
        Ok(exit)
    }

    /// Asks the guest to power off (ACPI power button) and waits up to `timeout` for QEMU to
    /// exit; then stops it like [`Vm::stop`]. Only guests that act on the power button stop
    /// gracefully this way.
    pub async fn powerdown(self, timeout: Duration) -> Result<ExitInfo> {
        if self.qmp.system_powerdown().await.is_ok()
            && let Some(info) = self.child.wait_timeout(timeout).await
        {
            return self.stop(Duration::ZERO).await.map(|_| info);
        }
        self.stop(timeout).await
    }

    /// Sends SIGKILL to QEMU (the run directory stays until [`Vm::stop`] or drop).
    pub fn kill(&self) {
        self.child.signal(Signal::SIGKILL);
    }

    pub fn is_alive(&self) -> bool {
        self.child.is_alive()
    }

    /// Resolves when QEMU has exited, for whatever reason.
    pub async fn exited(&self) -> ExitInfo {
        self.child.wait().await
    }

    /// A receiver that turns `Some` when QEMU exits, so a caller can wait for the exit
    /// without holding on to the `Vm` (which `stop` and `save_continuation` consume).
    pub fn exit_watch(&self) -> tokio::sync::watch::Receiver<Option<ExitInfo>> {
        self.child.subscribe()
    }

    /// `Some` if QEMU has exited.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.child.exit_info()
    }

    /// The secret this VM's guest was given, if its machine gives one: the guest's agent
    /// accepts it as its access token until it is told another.
    pub fn guest_secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Loopback address forwarded to envd (guest port 49983).
    pub fn envd_addr(&self) -> SocketAddr {
        self.envd
    }

    /// Loopback address forwarded to guest port 49999.
    pub fn code_addr(&self) -> SocketAddr {
        self.code
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn console_log(&self) -> &Path {
        &self.launch.console_log
    }

    pub fn machine(&self) -> &MachineConfig {
        &self.machine
    }

    /// The QEMU command line this VM runs with.
    pub fn command_line(&self) -> Result<String> {
        let args = cmdline::qemu_args(&self.machine, &self.launch)?;
        Ok(cmdline::render(&self.machine.qemu, &args))
    }

    /// Phase timings of the restore (or the total of a cold boot).
    pub fn timings(&self) -> &RestoreTimings {
        &self.timings
    }

    /// QEMU's memory right now.
    pub fn memory(&self) -> Result<MemoryUsage> {
        memory_of(self.pid())
    }
}

async fn health_probe(addr: SocketAddr) -> bool {
    crate::health::probe(addr, Duration::from_millis(1000)).await
}

/// Reads `/proc/PID/smaps_rollup`.
pub fn memory_of(pid: u32) -> Result<MemoryUsage> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).map_err(|e| VmmError::Memory {
        pid,
        why: format!("{path}: {e}"),
    })?;
    Ok(parse_smaps_rollup(&text))
}

/// Parses the `Key:   N kB` lines of `smaps_rollup`.
pub fn parse_smaps_rollup(text: &str) -> MemoryUsage {
    let mut m = MemoryUsage::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(v) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Rss:" => m.rss_kib = v,
            "Pss:" => m.pss_kib = v,
            "Pss_Anon:" => m.pss_anon_kib = v,
            "Pss_File:" => m.pss_file_kib = v,
            "Private_Dirty:" => m.private_dirty_kib = v,
            "Shared_Clean:" => m.shared_clean_kib = v,
            _ => {}
        }
    }
    m
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_is_parsed() {
        let text = "55d0c0a00000-7ffd5b1fe000 ---p 00000000 00:00 0    [rollup]\n\
            Rss:               82648 kB\nPss:               80095 kB\nPss_Dirty:         40896 kB\n\
            Pss_Anon:          40896 kB\nPss_File:          39199 kB\nShared_Clean:       2000 kB\n\
            Private_Dirty:     40896 kB\n";
        let m = parse_smaps_rollup(text);
        assert_eq!(m.rss_kib, 82648);
        assert_eq!(m.pss_kib, 80095);
        assert_eq!(m.pss_file_kib, 39199);
        assert_eq!(m.private_dirty_kib, 40896);
        assert_eq!(m.shared_clean_kib, 2000);
    }

    #[test]
    fn snapshot_round_trips_and_resolves_paths() {
        let dir = std::env::temp_dir().join(format!("firkin-vmm-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let snap = Snapshot {
            version: 1,
            kind: SnapshotKind::Continuation,
            machine: MachineConfig::new(crate::Accel::Tcg, "/k".into(), "/i".into()),
            ram: RAM_FILE.into(),
            state: STATE_FILE.into(),
            disk: vec![
                DiskLayer {
                    path: CONTINUATION_DISK_FILE.into(),
                    format: DiskFormat::Qcow2,
                },
                DiskLayer {
                    path: "/templates/base/disk.img".into(),
                    format: DiskFormat::Raw,
                },
            ],
            dir: dir.clone(),
        };
        snap.save().unwrap();
        let loaded = Snapshot::load(&dir).unwrap();
        assert_eq!(loaded, snap);
        assert_eq!(loaded.ram_path(), dir.join(RAM_FILE));
        let chain = loaded.disk_chain();
        assert_eq!(chain[0].path, dir.join(CONTINUATION_DISK_FILE));
        assert_eq!(chain[1].path, PathBuf::from("/templates/base/disk.img"));
        // The template's disk is not this snapshot's to seal.
        assert_eq!(loaded.files().len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_without_disk_is_refused() {
        let dir = std::env::temp_dir().join(format!("firkin-vmm-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(SNAPSHOT_JSON), "{\"version\":1}").unwrap();
        let err = Snapshot::load(&dir).unwrap_err();
        assert!(err.to_string().contains("snapshot.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
