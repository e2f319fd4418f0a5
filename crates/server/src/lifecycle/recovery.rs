//! Restart recovery: what a server finds in its state directory after the previous one stopped,
//! crashed or was killed, and how it gets back to a state it can stand behind.

use std::path::PathBuf;

use firkin_runtime::pids;

use crate::app::{ServerConfig, delete_sandbox, now_ms, remove_dir};
use crate::store::{BuildStatus, RecordState, Store, StoreError};

/// What restart recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Sandboxes that were running or starting when the previous server stopped: their VMs
    /// died with it (PDEATHSIG), so they are gone.
    pub removed_sandboxes: Vec<String>,
    /// Paused sandboxes whose snapshot is missing.
    pub removed_paused: Vec<String>,
    /// Paused sandboxes kept (resumable).
    pub kept_paused: usize,
    /// Leftover VMM processes that referenced this state directory and were killed.
    pub killed_processes: usize,
    pub removed_run_dirs: usize,
    pub removed_snapshot_dirs: usize,
    /// Builds that were running and are now marked failed.
    pub interrupted_builds: usize,
}

/// Restart recovery. Runs with the state-directory lock held, so no other server owns anything
/// in it and nothing of ours can be running: QEMU dies with the server that started it
/// (PDEATHSIG), and whatever survived that is killed here.
pub(crate) fn recover(store: &Store, config: &ServerConfig) -> Result<RecoveryReport, StoreError> {
    let paths = &config.paths;
    let mut report = RecoveryReport::default();

    for r in store.sandboxes()? {
        match r.state {
            RecordState::Starting | RecordState::Running => {
                if let (Some(pid), Some(start)) = (r.pid, r.pid_start)
                    && pids::kill_if_same(pid, start)
                {
                    tracing::warn!(sandbox = %r.sandbox_id, pid, "killed a VMM that outlived its server");
                    report.killed_processes += 1;
                }
                delete_sandbox(store, &r.sandbox_id, &paths.snapshots_dir())?;
                report.removed_sandboxes.push(r.sandbox_id.to_string());
            }
            RecordState::Paused => {
                let present = r.snapshot.as_ref().is_some_and(|s| s.descriptor.is_file());
                if present {
                    report.kept_paused += 1;
                } else {
                    tracing::warn!(sandbox = %r.sandbox_id, "paused sandbox lost its snapshot; removing it");
                    delete_sandbox(store, &r.sandbox_id, &paths.snapshots_dir())?;
                    report.removed_paused.push(r.sandbox_id.to_string());
                }
            }
        }
    }

    // Warm-pool entries and half-started VMs have no record; anything still running from our
    // run directories belongs to a dead server.
    let sweep = pids::sweep_run_dirs(&paths.sandboxes_dir());
    report.killed_processes += sweep.killed_processes;
    report.removed_run_dirs += sweep.removed_run_dirs;

    // Snapshot directories the database does not know are from a pause that never finished.
    let known: std::collections::HashSet<PathBuf> = store.snapshot_dirs()?.into_iter().collect();
    if let Ok(sandboxes) = std::fs::read_dir(paths.snapshots_dir()) {
        for sb in sandboxes.filter_map(Result::ok) {
            let Ok(snaps) = std::fs::read_dir(sb.path()) else {
                continue;
            };
            for snap in snaps.filter_map(Result::ok) {
                if !known.contains(&snap.path()) {
                    remove_dir(&snap.path());
                    report.removed_snapshot_dirs += 1;
                }
            }
            let _ = std::fs::remove_dir(sb.path());
        }
    }

    for b in store.builds()? {
        if b.status == BuildStatus::Building {
            store.finish_build(
                &b.build_id,
                BuildStatus::Error,
                Some("interrupted: the server stopped during the build"),
                &b.logs,
                now_ms(),
                None,
            )?;
            remove_dir(&b.dir);
            report.interrupted_builds += 1;
        }
    }
    if report != RecoveryReport::default() {
        tracing::info!(?report, "recovered from the previous run");
    }
    Ok(report)
}
