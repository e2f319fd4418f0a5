//! The `snapshots` table: sealed continuations of paused sandboxes.

use std::path::PathBuf;

use firkin_artifacts::SnapshotArtifactIntegrity;
use firkin_types::SandboxId;
use rusqlite::{Row, params};

use super::{SqlContext, Store, StoreError, integrity, query_all, size_bytes};

/// A sealed continuation snapshot of a paused sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub snapshot_id: String,
    pub sandbox_id: SandboxId,
    /// The directory the snapshot was written to (removed with the sandbox).
    pub dir: PathBuf,
    pub descriptor: PathBuf,
    pub integrity: SnapshotArtifactIntegrity,
    pub created_ms: i64,
}

impl Store {
    /// The sandbox was sealed into `snap` and its VM stopped.
    pub fn mark_paused(&self, id: &SandboxId, snap: &SnapshotRecord) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().op("marking a sandbox paused")?;
        tx.execute(
            "INSERT INTO snapshots (snapshot_id, sandbox_id, kind, dir, descriptor, size_bytes,
                 sha256, created_ms)
             VALUES (?1, ?2, 'continuation', ?3, ?4, ?5, ?6, ?7)",
            params![
                snap.snapshot_id,
                id.as_str(),
                snap.dir.to_string_lossy(),
                snap.descriptor.to_string_lossy(),
                size_bytes(&snap.integrity),
                snap.integrity.sha256_hex(),
                snap.created_ms,
            ],
        )
        .op("marking a sandbox paused")?;
        tx.execute(
            "UPDATE sandboxes SET state = 'paused', snapshot_id = ?2, pid = NULL,
                 pid_start = NULL
             WHERE sandbox_id = ?1",
            params![id.as_str(), snap.snapshot_id],
        )
        .op("marking a sandbox paused")?;
        tx.commit().op("marking a sandbox paused")
    }

    /// Forgets the continuations of `id` other than its current one and those in `keep`, and
    /// returns their directories for the caller to delete (after the commit: a crash in between
    /// leaves directories the start-up clean-up removes, never a record without its files).
    pub fn drop_superseded_snapshots(
        &self,
        id: &SandboxId,
        keep: &[PathBuf],
    ) -> Result<Vec<PathBuf>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().op("dropping superseded snapshots")?;
        let old: Vec<(String, PathBuf)> = query_all(
            &tx,
            "SELECT snapshot_id, dir FROM snapshots
             WHERE sandbox_id = ?1
               AND snapshot_id IS NOT (SELECT snapshot_id FROM sandboxes
                                       WHERE sandbox_id = ?1)",
            [id.as_str()],
            "dropping superseded snapshots",
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    PathBuf::from(r.get::<_, String>(1)?),
                ))
            },
        )?;
        let mut dirs = Vec::new();
        for (snapshot_id, dir) in old {
            if keep.contains(&dir) {
                continue;
            }
            tx.execute(
                "DELETE FROM snapshots WHERE snapshot_id = ?1",
                [&snapshot_id],
            )
            .op("dropping superseded snapshots")?;
            dirs.push(dir);
        }
        tx.commit().op("dropping superseded snapshots")?;
        Ok(dirs)
    }

    /// Every snapshot directory the database knows.
    pub fn snapshot_dirs(&self) -> Result<Vec<PathBuf>, StoreError> {
        let dirs = query_all(
            &self.lock(),
            "SELECT dir FROM snapshots",
            [],
            "listing snapshots",
            |r| r.get::<_, String>(0),
        )?;
        Ok(dirs.into_iter().map(PathBuf::from).collect())
    }
}

pub(super) const SNAPSHOT_SELECT: &str =
    "SELECT snapshot_id, sandbox_id, dir, descriptor, size_bytes,
    sha256, created_ms FROM snapshots";

pub(super) fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<Result<SnapshotRecord, StoreError>> {
    let sandbox: String = r.get(1)?;
    let Ok(sandbox_id) = SandboxId::new(&sandbox) else {
        return Ok(Err(StoreError::Malformed {
            what: format!("snapshot of sandbox {sandbox:?}"),
            detail: "invalid sandbox id".into(),
        }));
    };
    Ok(Ok(SnapshotRecord {
        snapshot_id: r.get(0)?,
        sandbox_id,
        dir: PathBuf::from(r.get::<_, String>(2)?),
        descriptor: PathBuf::from(r.get::<_, String>(3)?),
        integrity: integrity(r.get(4)?, r.get(5)?),
        created_ms: r.get(6)?,
    }))
}
