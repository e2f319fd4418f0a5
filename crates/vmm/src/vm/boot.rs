//! Cold boot of a template from kernel, initramfs and a raw root disk.

use std::path::PathBuf;
use std::time::Instant;

use super::ready::{ReadyCheck, check_forwards};
use super::spawn::{guest_secret, spawn_with_ports};
use super::{CONSOLE_LOG, Vm, ms};
use crate::cmdline::{DiskFormat, DiskLayer, Launch, MachineConfig, NetAttach};
use crate::error::{Result, VmmError};

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
    /// Guest TCP ports each given a fresh host loopback port ([`Vm::forward`]) on a
    /// user-mode network; on a TAP every port is reachable and this is not used.
    pub guest_ports: Vec<u16>,
    /// What the NIC is attached to; must be the machine's kind of network.
    pub net: NetAttach,
    /// What "booted" means to the caller; `None` returns as soon as QEMU runs.
    pub ready: Option<ReadyCheck>,
}

impl Vm {
    /// Boots a template from kernel + initramfs + raw root disk, RAM `share=on` at
    /// `req.ram_path`, and waits until `req.ready` passes.
    pub async fn cold_boot(req: BootRequest) -> Result<Vm> {
        let start = Instant::now();
        check_forwards(&req.guest_ports, req.ready.as_ref())?;
        std::fs::create_dir_all(&req.run_dir).map_err(VmmError::io("creating", &req.run_dir))?;
        let (secret, secret_file) = guest_secret(&req.machine, &req.run_dir)?.unzip();
        let base = Launch {
            ram_path: req.ram_path.clone(),
            ram_shared: true,
            disk: vec![DiskLayer {
                path: req.disk.clone(),
                format: DiskFormat::Raw,
            }],
            forwards: Vec::new(),
            tap: None,
            console_log: req.run_dir.join(CONSOLE_LOG),
            incoming: false,
            paused: false,
            secret_file,
        };
        let mut vm = spawn_with_ports(
            &req.machine,
            &req.run_dir,
            &base,
            &req.net,
            &req.guest_ports,
            || Ok(None),
        )
        .await?
        .into_vm(req.machine, req.run_dir, secret);
        if let Some(ready) = &req.ready {
            vm.wait_ready(ready, "booting").await?;
        }
        vm.timings.total_ms = ms(start.elapsed());
        tracing::info!(pid = vm.pid(), forwards = ?vm.forwards, ms = vm.timings.total_ms, "cold boot ready");
        Ok(vm)
    }
}
