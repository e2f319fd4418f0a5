//! The `templates` and `builds` tables: the build each template points at, and every build
//! with its status and logs.

use std::path::PathBuf;

use firkin_admission::ResourceBudget;
use firkin_artifacts::SnapshotArtifactIntegrity;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{SqlContext, Store, StoreError, integrity, mib, query_all, size_bytes, size_mb};

/// The build of a template that sandboxes are created from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateRecord {
    pub template_id: String,
    pub build_id: String,
    pub descriptor: PathBuf,
    pub integrity: SnapshotArtifactIntegrity,
    pub budget: ResourceBudget,
    pub envd_version: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildStatus {
    Building,
    Ready,
    Error,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Building => "building",
            BuildStatus::Ready => "ready",
            BuildStatus::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "building" => Some(BuildStatus::Building),
            "ready" => Some(BuildStatus::Ready),
            "error" => Some(BuildStatus::Error),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRecord {
    pub build_id: String,
    pub template_id: String,
    pub status: BuildStatus,
    /// The build request as JSON (what was asked for).
    pub spec: String,
    /// Output directory of the build.
    pub dir: PathBuf,
    pub logs: String,
    pub reason: Option<String>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

impl Store {
    pub fn upsert_template(&self, t: &TemplateRecord) -> Result<(), StoreError> {
        upsert_template(&self.lock(), t).op("saving a template")
    }

    pub fn template(&self, id: &str) -> Result<Option<TemplateRecord>, StoreError> {
        self.lock()
            .query_row(
                &format!("{TEMPLATE_SELECT} WHERE template_id = ?1"),
                [id],
                template_row,
            )
            .optional()
            .op("reading a template")
    }

    pub fn templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        query_all(
            &self.lock(),
            &format!("{TEMPLATE_SELECT} ORDER BY template_id"),
            [],
            "listing templates",
            template_row,
        )
    }

    /// Removes a template and its build records; returns the build directories to delete.
    pub fn delete_template(&self, id: &str) -> Result<Vec<PathBuf>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().op("deleting a template")?;
        let dirs = query_all(
            &tx,
            "SELECT dir FROM builds WHERE template_id = ?1",
            [id],
            "deleting a template",
            |r| r.get::<_, String>(0),
        )?;
        tx.execute("DELETE FROM builds WHERE template_id = ?1", [id])
            .op("deleting a template")?;
        tx.execute("DELETE FROM templates WHERE template_id = ?1", [id])
            .op("deleting a template")?;
        tx.commit().op("deleting a template")?;
        Ok(dirs.into_iter().map(PathBuf::from).collect())
    }

    pub fn insert_build(&self, b: &BuildRecord) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO builds (build_id, template_id, status, spec, dir, logs, reason,
                     created_ms, finished_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    b.build_id,
                    b.template_id,
                    b.status.as_str(),
                    b.spec,
                    b.dir.to_string_lossy(),
                    b.logs,
                    b.reason,
                    b.created_ms,
                    b.finished_ms,
                ],
            )
            .op("recording a build")?;
        Ok(())
    }

    /// Finishes a build; on success, the template points at it in the same transaction.
    pub fn finish_build(
        &self,
        build_id: &str,
        status: BuildStatus,
        reason: Option<&str>,
        logs: &str,
        now_ms: i64,
        template: Option<&TemplateRecord>,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().op("finishing a build")?;
        tx.execute(
            "UPDATE builds SET status = ?2, reason = ?3, logs = ?4, finished_ms = ?5
             WHERE build_id = ?1",
            params![build_id, status.as_str(), reason, logs, now_ms],
        )
        .op("finishing a build")?;
        if let Some(t) = template {
            upsert_template(&tx, t).op("finishing a build")?;
        }
        tx.commit().op("finishing a build")
    }

    pub fn build(&self, build_id: &str) -> Result<Option<BuildRecord>, StoreError> {
        self.lock()
            .query_row(
                &format!("{BUILD_SELECT} WHERE build_id = ?1"),
                [build_id],
                build_row,
            )
            .optional()
            .op("reading a build")
    }

    pub fn builds(&self) -> Result<Vec<BuildRecord>, StoreError> {
        query_all(
            &self.lock(),
            &format!("{BUILD_SELECT} ORDER BY created_ms"),
            [],
            "listing builds",
            build_row,
        )
    }

    /// Deletes build records that are neither running nor the template's current build; returns
    /// their directories.
    pub fn prune_builds(&self, template_id: &str) -> Result<Vec<PathBuf>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().op("pruning builds")?;
        let keep: Option<String> = tx
            .query_row(
                "SELECT build_id FROM templates WHERE template_id = ?1",
                [template_id],
                |r| r.get(0),
            )
            .optional()
            .op("pruning builds")?;
        let keep = keep.unwrap_or_default();
        let dirs = query_all(
            &tx,
            "SELECT dir FROM builds WHERE template_id = ?1 AND build_id != ?2
             AND status != 'building'
             AND build_id NOT IN (SELECT build_id FROM sandboxes)",
            params![template_id, keep],
            "pruning builds",
            |r| r.get::<_, String>(0),
        )?;
        tx.execute(
            "DELETE FROM builds WHERE template_id = ?1 AND build_id != ?2
             AND status != 'building' AND status != 'error'
             AND build_id NOT IN (SELECT build_id FROM sandboxes)",
            params![template_id, keep],
        )
        .op("pruning builds")?;
        tx.commit().op("pruning builds")?;
        Ok(dirs.into_iter().map(PathBuf::from).collect())
    }
}

/// The one statement that points a template at a build: used on its own (adopting a build at
/// start-up) and inside the transaction that finishes a build.
fn upsert_template(conn: &Connection, t: &TemplateRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO templates (template_id, build_id, descriptor, size_bytes, sha256,
             cpus, memory_mb, disk_mb, envd_version, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (template_id) DO UPDATE SET
             build_id = excluded.build_id, descriptor = excluded.descriptor,
             size_bytes = excluded.size_bytes, sha256 = excluded.sha256,
             cpus = excluded.cpus, memory_mb = excluded.memory_mb,
             disk_mb = excluded.disk_mb, envd_version = excluded.envd_version,
             updated_ms = excluded.updated_ms",
        params![
            t.template_id,
            t.build_id,
            t.descriptor.to_string_lossy(),
            size_bytes(&t.integrity),
            t.integrity.sha256_hex(),
            t.budget.cpus,
            mib(t.budget.memory),
            mib(t.budget.disk),
            t.envd_version,
            t.created_ms,
            t.updated_ms,
        ],
    )?;
    Ok(())
}

const TEMPLATE_SELECT: &str = "SELECT template_id, build_id, descriptor, size_bytes, sha256, cpus,
    memory_mb, disk_mb, envd_version, created_ms, updated_ms FROM templates";

fn template_row(r: &Row<'_>) -> rusqlite::Result<TemplateRecord> {
    Ok(TemplateRecord {
        template_id: r.get(0)?,
        build_id: r.get(1)?,
        descriptor: PathBuf::from(r.get::<_, String>(2)?),
        integrity: integrity(r.get(3)?, r.get(4)?),
        budget: ResourceBudget::new(r.get(5)?, size_mb(r.get(6)?), size_mb(r.get(7)?)),
        envd_version: r.get(8)?,
        created_ms: r.get(9)?,
        updated_ms: r.get(10)?,
    })
}

const BUILD_SELECT: &str = "SELECT build_id, template_id, status, spec, dir, logs, reason,
    created_ms, finished_ms FROM builds";

fn build_row(r: &Row<'_>) -> rusqlite::Result<BuildRecord> {
    let status: String = r.get(2)?;
    Ok(BuildRecord {
        build_id: r.get(0)?,
        template_id: r.get(1)?,
        // The CHECK constraint admits only the three known values.
        status: BuildStatus::parse(&status).unwrap_or(BuildStatus::Error),
        spec: r.get(3)?,
        dir: PathBuf::from(r.get::<_, String>(4)?),
        logs: r.get(5)?,
        reason: r.get(6)?,
        created_ms: r.get(7)?,
        finished_ms: r.get(8)?,
    })
}
