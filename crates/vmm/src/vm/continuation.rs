//! Saving a running clone as a continuation (a pause) that restores like a template.

use std::path::Path;
use std::time::Instant;

use super::disk::{
    create_overlay, flatten_onto, fsync_path, make_read_only, move_file, qemu_img_for,
};
use super::restore::RestoreTimings;
use super::snapshot::{Snapshot, SnapshotKind};
use super::spawn::{guest_secret, launch_qemu};
use super::{
    CONSOLE_LOG, CONTINUATION_DISK_FILE, MIGRATION_TIMEOUT, OVERLAY_FILE, QUIT_TIMEOUT, RAM_FILE,
    STATE_FILE, Vm, ms,
};
use crate::cmdline::{DiskFormat, DiskLayer, Launch, NetAttach};

/// The transient TAP a continuation helper opens in the sandbox's namespace.
const SAVER_TAP: &str = "tapsave";
use crate::error::{Result, VmmError};

impl Vm {
    /// Saves this running VM as a continuation in `out_dir` and stops it (a sandbox's pause).
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
        // On a TAP network the helper gets a TAP of its own in the sandbox's namespace (the
        // clone still holds `tap0`), which QEMU creates and removes itself: it never runs, but
        // the guest negotiated the TAP's offloads, and a NIC without them refuses the state.
        let (helper_tap, helper_netns) = match &self.net {
            NetAttach::Tap { netns, .. } => (Some(SAVER_TAP.to_owned()), Some(netns.clone())),
            NetAttach::User => (None, None),
        };
        let helper_launch = Launch {
            ram_path: ram.clone(),
            ram_shared: true,
            disk: helper_disk,
            forwards: vec![],
            tap: helper_tap,
            console_log: helper_dir.join(CONSOLE_LOG),
            incoming: true,
            paused: true,
            secret_file: helper_secret,
        };
        let (helper_child, helper_qmp) = launch_qemu(
            &self.machine,
            &helper_launch,
            &helper_dir,
            None,
            helper_netns.as_deref(),
        )
        .await?;
        let helper = Vm {
            machine: self.machine.clone(),
            launch: helper_launch,
            run_dir: helper_dir.clone(),
            child: helper_child,
            qmp: helper_qmp,
            forwards: Vec::new(),
            net: NetAttach::User,
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
}
