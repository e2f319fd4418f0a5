//! The snapshot a template or pause leaves on disk ([`Snapshot`], `snapshot.json`), and taking
//! a template's.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::disk::{fsync_path, make_read_only, move_file};
use super::{
    MIGRATION_TIMEOUT, QUIT_TIMEOUT, RAM_FILE, SNAPSHOT_JSON, STATE_FILE, TEMPLATE_DISK_FILE, Vm,
};
use crate::cmdline::{DiskFormat, DiskLayer, MachineConfig};
use crate::error::{Result, VmmError};

/// What a snapshot was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// A freshly booted (and prepared) template.
    Template,
    /// A paused sandbox.
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

    pub(super) fn save(&self) -> Result<()> {
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

fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    firkin_artifacts::write_bytes_atomic(path, bytes).map_err(VmmError::io("writing", path))
}

impl Vm {
    /// Streams this VM's migration (RAM skipped per `x-ignore-shared`) into `out`.
    pub(super) async fn migrate_to_file(&self, out: &Path) -> Result<()> {
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::CONTINUATION_DISK_FILE;
    use super::*;

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
