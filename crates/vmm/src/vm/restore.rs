//! Copy-on-write restore of a snapshot into a new VM.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::disk::{create_overlay, qemu_img_for};
use super::ready::{ReadyCheck, check_forwards};
use super::snapshot::Snapshot;
use super::spawn::{guest_secret, spawn_with_ports};
use super::{CONSOLE_LOG, MIGRATION_TIMEOUT, OVERLAY_FILE, Vm, ms};
use crate::cmdline::{DiskFormat, DiskLayer, Launch, NetAttach, STATE_FD};
use crate::error::{Result, VmmError};

/// A restore of a snapshot into a new VM.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// Per-VM directory (created if missing); holds the clone's qcow2 overlay.
    pub run_dir: PathBuf,
    /// Guest TCP ports each given a fresh host loopback port ([`Vm::forward`]) on a
    /// user-mode network; on a TAP every port is reachable and this is not used.
    pub guest_ports: Vec<u16>,
    /// What the NIC is attached to; must be the machine's kind of network.
    pub net: NetAttach,
    /// What "resumed" means to the caller, checked after `cont`; `None` returns right after
    /// `cont`.
    pub ready: Option<ReadyCheck>,
}

/// How long each phase of a restore took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreTimings {
    pub overlay_ms: f64,
    pub spawn_to_qmp_ms: f64,
    pub load_state_ms: f64,
    /// From `cont` until the request's readiness check passed (without one: until `cont`
    /// returned).
    pub cont_to_ready_ms: f64,
    pub total_ms: f64,
}

impl Vm {
    /// Restores a snapshot: private (copy-on-write) RAM over its RAM image, a fresh qcow2
    /// overlay on its disk, fresh loopback ports; loads the device state, resumes, and waits
    /// until `req.ready` passes.
    pub async fn restore(snapshot: &Snapshot, req: RestoreRequest) -> Result<Vm> {
        let start = Instant::now();
        let mut timings = RestoreTimings::default();
        check_forwards(&req.guest_ports, req.ready.as_ref())?;
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
        let state_path = snapshot.state_path();
        let (secret, secret_file) = guest_secret(&snapshot.machine, &req.run_dir)?.unzip();
        let base = Launch {
            ram_path: snapshot.ram_path(),
            ram_shared: false,
            disk,
            forwards: Vec::new(),
            tap: None,
            console_log: req.run_dir.join(CONSOLE_LOG),
            incoming: true,
            paused: false,
            secret_file,
        };
        let open_state = || {
            std::fs::File::open(&state_path)
                .map(|f| Some(OwnedFd::from(f)))
                .map_err(VmmError::io("opening", &state_path))
        };
        let t = Instant::now();
        let spawned = spawn_with_ports(
            &snapshot.machine,
            &req.run_dir,
            &base,
            &req.net,
            &req.guest_ports,
            open_state,
        )
        .await?;
        timings.spawn_to_qmp_ms = ms(t.elapsed());
        let mut vm = spawned.into_vm(snapshot.machine.clone(), req.run_dir, secret);
        let t = Instant::now();
        vm.qmp.set_ignore_shared(true).await?;
        vm.qmp.migrate_incoming(format!("fd:{STATE_FD}")).await?;
        vm.qmp.wait_migration("in", MIGRATION_TIMEOUT).await?;
        timings.load_state_ms = ms(t.elapsed());
        let t = Instant::now();
        vm.qmp.cont().await?;
        if let Some(ready) = &req.ready {
            vm.wait_ready(ready, "restoring").await?;
        }
        timings.cont_to_ready_ms = ms(t.elapsed());
        timings.total_ms = ms(start.elapsed());
        vm.timings = timings;
        tracing::info!(pid = vm.pid(), forwards = ?vm.forwards, timings = ?vm.timings, "restore ready");
        Ok(vm)
    }
}
