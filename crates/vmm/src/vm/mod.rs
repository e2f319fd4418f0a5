//! The high-level VM API the runtime calls: cold boot, template snapshot, copy-on-write restore,
//! continuation (pause) and stop. What runs in the guest is the caller's business: it names the
//! guest ports to forward and, if it wants to wait for the guest, how to tell it is ready
//! ([`ReadyCheck`]).
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

mod boot;
mod continuation;
mod disk;
mod forward;
mod memory;
mod ready;
mod restore;
mod snapshot;
mod spawn;

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

pub use boot::BootRequest;
pub use disk::create_overlay;
pub use memory::{MemoryUsage, memory_of, parse_smaps_rollup};
pub use ready::{ProbeFuture, ReadyCheck};
pub use restore::{RestoreRequest, RestoreTimings};
pub use snapshot::{Snapshot, SnapshotKind};

use crate::cmdline::{self, Launch, MachineConfig};
use crate::error::{Result, VmmError};
use crate::process::{ChildHandle, ExitInfo};
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

/// A running QEMU microvm owned by this process.
#[derive(Debug)]
pub struct Vm {
    machine: MachineConfig,
    launch: Launch,
    run_dir: PathBuf,
    child: ChildHandle,
    qmp: Qmp,
    /// Guest port → host loopback address forwarded to it: the launch's, in the order the
    /// caller gave, then those added at run time ([`Vm::add_forward`]).
    forwards: Vec<(u16, SocketAddr)>,
    /// What the NIC is attached to (on a TAP: the namespace QEMU runs in and the address at
    /// which the host reaches every guest port).
    net: cmdline::NetAttach,
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Vm {
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

    /// The host address that reaches `guest_port`: on a TAP network every port's, on a
    /// user-mode network the loopback forward if the request asked for it or it was added
    /// since.
    pub fn forward(&self, guest_port: u16) -> Option<SocketAddr> {
        if let Some(ip) = self.reach() {
            return Some(SocketAddr::from((ip, guest_port)));
        }
        self.forwards
            .iter()
            .find(|(guest, _)| *guest == guest_port)
            .map(|&(_, host)| host)
    }

    /// On a TAP network, the address at which the host reaches every guest port.
    pub fn reach(&self) -> Option<std::net::Ipv4Addr> {
        match &self.net {
            cmdline::NetAttach::Tap { reach, .. } => Some(*reach),
            cmdline::NetAttach::User => None,
        }
    }

    /// Every loopback forward as (guest port, host address), in the request's order; empty on
    /// a TAP network.
    pub fn forwards(&self) -> &[(u16, SocketAddr)] {
        &self.forwards
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
