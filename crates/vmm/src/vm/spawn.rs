//! Starting one QEMU: its per-VM secret, loopback forwards for the caller's guest ports, the
//! inherited QMP socketpair and device-state fd, and errors that show why QEMU died.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{QEMU_LOG, RestoreTimings, SECRET_FILE, Vm, log_tail};
use crate::cmdline::{self, GUEST_SECRET_LEN, Launch, MachineConfig, NetAttach, QMP_FD, STATE_FD};
use crate::error::{Result, VmmError};
use crate::process::{self, ChildHandle, ExitInfo};
use crate::qmp::Qmp;

pub(super) fn free_port() -> Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(VmmError::NoPort)
}

/// A fresh secret for one QEMU, written (mode 0600) to `run_dir/secret` for its `-fw_cfg`.
/// `None` when the machine gives its guest none.
pub(super) fn guest_secret(
    machine: &MachineConfig,
    run_dir: &Path,
) -> Result<Option<(String, PathBuf)>> {
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

/// Starts QEMU and connects QMP. A QEMU that dies during start-up is reported with its stderr.
pub(super) async fn launch_qemu(
    machine: &MachineConfig,
    launch: &Launch,
    run_dir: &Path,
    state_fd: Option<OwnedFd>,
    netns: Option<&Path>,
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
    let netns = match netns {
        Some(path) => Some(OwnedFd::from(std::fs::File::open(path).map_err(
            |source| VmmError::Netns {
                path: path.to_path_buf(),
                source,
            },
        )?)),
        None => None,
    };
    let child = process::spawn_in(cmd, inherit, netns).await?;
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

pub(super) fn exited_error(
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

/// A QEMU started by [`spawn_with_ports`].
pub(super) struct Spawned {
    pub launch: Launch,
    pub child: ChildHandle,
    pub qmp: Qmp,
    /// Guest port → host loopback address, in the caller's order (user-mode network).
    pub forwards: Vec<(u16, SocketAddr)>,
    pub net: NetAttach,
}

impl Spawned {
    /// The VM this QEMU runs, owning `run_dir`.
    pub fn into_vm(self, machine: MachineConfig, run_dir: PathBuf, secret: Option<String>) -> Vm {
        Vm {
            machine,
            launch: self.launch,
            run_dir,
            child: self.child,
            qmp: self.qmp,
            forwards: self.forwards,
            net: self.net,
            timings: RestoreTimings::default(),
            secret,
            owns_run_dir: true,
        }
    }
}

/// Spawns `base` attached to `net`: on a TAP, inside its namespace; on a user-mode network, with
/// a fresh loopback port forwarded to each of `guest_ports`, retrying when another process took
/// a port between our probe and QEMU's bind.
pub(super) async fn spawn_with_ports(
    machine: &MachineConfig,
    run_dir: &Path,
    base: &Launch,
    net: &NetAttach,
    guest_ports: &[u16],
    state_fd: impl Fn() -> Result<Option<OwnedFd>>,
) -> Result<Spawned> {
    if net.kind() != machine.net {
        return Err(VmmError::NetMismatch {
            machine: machine.net,
            launch: net.kind(),
        });
    }
    if let NetAttach::Tap { netns, ifname, .. } = net {
        let launch = Launch {
            forwards: Vec::new(),
            tap: Some(ifname.clone()),
            ..base.clone()
        };
        let (child, qmp) = launch_qemu(
            machine,
            &launch,
            run_dir,
            state_fd()?,
            Some(netns.as_path()),
        )
        .await?;
        return Ok(Spawned {
            launch,
            child,
            qmp,
            forwards: Vec::new(),
            net: net.clone(),
        });
    }
    let mut last = None;
    for _ in 0..3 {
        let hosts = guest_ports
            .iter()
            .map(|_| free_port())
            .collect::<Result<Vec<u16>>>()?;
        // Each probe's listener is closed before the next, so the kernel may hand out the same
        // port twice.
        if hosts
            .iter()
            .enumerate()
            .any(|(i, p)| hosts[..i].contains(p))
        {
            continue;
        }
        let launch = Launch {
            forwards: hosts
                .iter()
                .copied()
                .zip(guest_ports.iter().copied())
                .collect(),
            ..base.clone()
        };
        match launch_qemu(machine, &launch, run_dir, state_fd()?, None).await {
            Ok((child, qmp)) => {
                let forwards = guest_ports
                    .iter()
                    .zip(&hosts)
                    .map(|(&guest, &host)| (guest, SocketAddr::from((Ipv4Addr::LOCALHOST, host))))
                    .collect();
                return Ok(Spawned {
                    launch,
                    child,
                    qmp,
                    forwards,
                    net: NetAttach::User,
                });
            }
            Err(VmmError::QemuExited { stderr, .. }) if stderr.contains("host forwarding") => {
                tracing::warn!(?hosts, "port taken before QEMU bound it; retrying");
                last = Some(stderr);
            }
            Err(e) => return Err(e),
        }
    }
    Err(VmmError::NoPort(std::io::Error::other(
        last.unwrap_or_else(|| "ports kept colliding".into()),
    )))
}
