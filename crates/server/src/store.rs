//! The server's durable state: one SQLite file (`<state>/firkin.db`) in WAL mode.
//!
//! WAL with `synchronous=NORMAL` keeps every committed transaction across a process crash
//! (`kill -9`); only an OS crash or power loss can drop the last few commits, and never
//! corrupts the file. That is the failure model the server's restart recovery is built for.
//!
//! Every state change the API makes is one transaction, so the database always describes a state
//! the server really was in. Calls are short and synchronous: one connection behind a mutex,
//! held only for the duration of a statement or transaction, never across an `.await`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use firkin_admission::ResourceBudget;
use firkin_artifacts::SnapshotArtifactIntegrity;
use firkin_types::{SandboxId, Size};
use rusqlite::{Connection, OptionalExtension, Row, params};

/// Schema migrations, in order. Entry `i` moves the schema from version `i` to `i + 1`
/// (`PRAGMA user_version`). Never edit a released entry; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE api_keys (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL,
        key_hash    TEXT NOT NULL UNIQUE,
        hint        TEXT NOT NULL,
        created_ms  INTEGER NOT NULL
    );
    CREATE TABLE templates (
        template_id   TEXT PRIMARY KEY,
        build_id      TEXT NOT NULL,
        descriptor    TEXT NOT NULL,
        size_bytes    INTEGER NOT NULL,
        sha256        TEXT NOT NULL,
        cpus          INTEGER NOT NULL,
        memory_mb     INTEGER NOT NULL,
        disk_mb       INTEGER NOT NULL,
        envd_version  TEXT NOT NULL,
        created_ms    INTEGER NOT NULL,
        updated_ms    INTEGER NOT NULL
    );
    CREATE TABLE builds (
        build_id     TEXT PRIMARY KEY,
        template_id  TEXT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('building', 'ready', 'error')),
        spec         TEXT NOT NULL,
        dir          TEXT NOT NULL,
        logs         TEXT NOT NULL DEFAULT '',
        reason       TEXT,
        created_ms   INTEGER NOT NULL,
        finished_ms  INTEGER
    );
    CREATE INDEX builds_template ON builds (template_id, created_ms);
    CREATE TABLE sandboxes (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        sandbox_id    TEXT NOT NULL UNIQUE,
        template_id   TEXT NOT NULL,
        build_id      TEXT NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('starting', 'running', 'paused')),
        metadata      TEXT NOT NULL,
        env_vars      TEXT NOT NULL,
        access_token  TEXT NOT NULL,
        timeout_secs  INTEGER NOT NULL,
        auto_pause    INTEGER NOT NULL,
        auto_resume   INTEGER NOT NULL,
        cpus          INTEGER NOT NULL,
        memory_mb     INTEGER NOT NULL,
        disk_mb       INTEGER NOT NULL,
        started_ms    INTEGER NOT NULL,
        end_ms        INTEGER NOT NULL,
        pid           INTEGER,
        pid_start     INTEGER,
        snapshot_id   TEXT,
        created_ms    INTEGER NOT NULL
    );
    CREATE INDEX sandboxes_state_end ON sandboxes (state, end_ms);
    CREATE TABLE snapshots (
        snapshot_id  TEXT PRIMARY KEY,
        sandbox_id   TEXT NOT NULL REFERENCES sandboxes (sandbox_id) ON DELETE CASCADE,
        kind         TEXT NOT NULL,
        dir          TEXT NOT NULL,
        descriptor   TEXT NOT NULL,
        size_bytes   INTEGER NOT NULL,
        sha256       TEXT NOT NULL,
        created_ms   INTEGER NOT NULL
    );
    CREATE INDEX snapshots_sandbox ON snapshots (sandbox_id);
    "#,
];

/// The schema version this build of firkin writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create the state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this firkin knows ({known}); \
         use a newer firkin or another state directory"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("database migration to version {version} failed: {source}")]
    Migration {
        version: u32,
        source: rusqlite::Error,
    },
    #[error("database error while {op}: {source}")]
    Sql {
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("database row of {what} is malformed: {detail}")]
    Malformed { what: String, detail: String },
}

trait SqlContext<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T> SqlContext<T> for Result<T, rusqlite::Error> {
    fn op(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sql { op, source })
    }
}

/// Life-cycle state of a sandbox record. Only `Running` and `Paused` are ever shown to SDKs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// The create was accepted and the VM is being restored. At restart, such a record is
    /// stale (its VM died with the previous server) and is removed.
    Starting,
    Running,
    Paused,
}

impl RecordState {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Starting => "starting",
            RecordState::Running => "running",
            RecordState::Paused => "paused",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "starting" => Some(RecordState::Starting),
            "running" => Some(RecordState::Running),
            "paused" => Some(RecordState::Paused),
            _ => None,
        }
    }
}

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

/// One sandbox as the server knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxRecord {
    /// Insertion order; the list order and the pagination cursor.
    pub seq: i64,
    pub sandbox_id: SandboxId,
    pub template_id: String,
    pub build_id: String,
    pub state: RecordState,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    pub access_token: String,
    /// The lifetime asked for at create (or the last `set_timeout`), reused at resume.
    pub timeout_secs: i64,
    pub auto_pause: bool,
    pub auto_resume: bool,
    pub budget: ResourceBudget,
    pub started_ms: i64,
    pub end_ms: i64,
    /// VMM process and its start time (clock ticks since boot), to tell it apart from a later
    /// process that reuses the pid.
    pub pid: Option<u32>,
    pub pid_start: Option<u64>,
    /// The continuation the sandbox is paused in (or was last resumed from).
    pub snapshot: Option<SnapshotRecord>,
    pub created_ms: i64,
}

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

/// The SQLite state store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn mib(size: Size) -> i64 {
    i64::try_from(size.as_mib()).unwrap_or(i64::MAX)
}

fn size_mb(v: i64) -> Size {
    Size::mib(u64::try_from(v).unwrap_or(0))
}

impl Store {
    /// Opens (creating if needed) and migrates the database.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        restrict_permissions(path);
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        // journal_mode answers with a row, so it is read rather than executed.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, db = %path.display(), "SQLite refused WAL mode");
        }
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(open_err)?;
        let mut store = Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        };
        store.migrate()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied transaction behind:
        // rusqlite rolls back an unfinished transaction when it is dropped.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        let found: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .op("reading the schema version")?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = i as u32 + 1;
            let tx = conn
                .transaction()
                .map_err(|source| StoreError::Migration { version, source })?;
            tx.execute_batch(sql)
                .and_then(|()| tx.pragma_update(None, "user_version", version))
                .and_then(|()| tx.commit())
                .map_err(|source| StoreError::Migration { version, source })?;
            tracing::info!(version, db = %self.path.display(), "database migrated");
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .op("reading the schema version")
    }

    // ---------------------------------------------------------------- keys

    pub fn add_api_key(
        &self,
        name: &str,
        key_hash: &str,
        hint: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute(
                "INSERT OR IGNORE INTO api_keys (name, key_hash, hint, created_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![name, key_hash, hint, now_ms],
            )
            .op("adding an API key")?;
        Ok(n == 1)
    }

    pub fn api_key_hashes(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT key_hash FROM api_keys")
            .op("listing API keys")?;
        let rows = stmt
            .query_map([], |r| r.get(0))
            .op("listing API keys")?
            .collect::<Result<Vec<String>, _>>()
            .op("listing API keys")?;
        Ok(rows)
    }

    // ---------------------------------------------------------------- templates

    pub fn upsert_template(&self, t: &TemplateRecord) -> Result<(), StoreError> {
        self.lock()
            .execute(
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
                    i64::try_from(t.integrity.size_bytes()).unwrap_or(i64::MAX),
                    t.integrity.sha256_hex(),
                    t.budget.cpus,
                    mib(t.budget.memory),
                    mib(t.budget.disk),
                    t.envd_version,
                    t.created_ms,
                    t.updated_ms,
                ],
            )
            .op("saving a template")?;
        Ok(())
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
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!("{TEMPLATE_SELECT} ORDER BY template_id"))
            .op("listing templates")?;
        stmt.query_map([], template_row)
            .op("listing templates")?
            .collect::<Result<Vec<_>, _>>()
            .op("listing templates")
    }

    /// Removes a template and its build records; returns the build directories to delete.
    pub fn delete_template(&self, id: &str) -> Result<Vec<PathBuf>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().op("deleting a template")?;
        let dirs = {
            let mut stmt = tx
                .prepare("SELECT dir FROM builds WHERE template_id = ?1")
                .op("deleting a template")?;
            stmt.query_map([id], |r| r.get::<_, String>(0))
                .op("deleting a template")?
                .collect::<Result<Vec<_>, _>>()
                .op("deleting a template")?
        };
        tx.execute("DELETE FROM builds WHERE template_id = ?1", [id])
            .op("deleting a template")?;
        tx.execute("DELETE FROM templates WHERE template_id = ?1", [id])
            .op("deleting a template")?;
        tx.commit().op("deleting a template")?;
        Ok(dirs.into_iter().map(PathBuf::from).collect())
    }

    // ---------------------------------------------------------------- builds

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
            tx.execute(
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
                    i64::try_from(t.integrity.size_bytes()).unwrap_or(i64::MAX),
                    t.integrity.sha256_hex(),
                    t.budget.cpus,
                    mib(t.budget.memory),
                    mib(t.budget.disk),
                    t.envd_version,
                    t.created_ms,
                    t.updated_ms,
                ],
            )
            .op("finishing a build")?;
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
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!("{BUILD_SELECT} ORDER BY created_ms"))
            .op("listing builds")?;
        stmt.query_map([], build_row)
            .op("listing builds")?
            .collect::<Result<Vec<_>, _>>()
            .op("listing builds")
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
        let dirs = {
            let mut stmt = tx
                .prepare(
                    "SELECT dir FROM builds WHERE template_id = ?1 AND build_id != ?2
                     AND status != 'building'
                     AND build_id NOT IN (SELECT build_id FROM sandboxes)",
                )
                .op("pruning builds")?;
            stmt.query_map(params![template_id, keep], |r| r.get::<_, String>(0))
                .op("pruning builds")?
                .collect::<Result<Vec<_>, _>>()
                .op("pruning builds")?
        };
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

    // ---------------------------------------------------------------- sandboxes

    /// Records a sandbox; returns its list position.
    pub fn insert_sandbox(&self, s: &SandboxRecord) -> Result<i64, StoreError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO sandboxes (sandbox_id, template_id, build_id, state, metadata, env_vars,
                 access_token, timeout_secs, auto_pause, auto_resume, cpus, memory_mb, disk_mb,
                 started_ms, end_ms, pid, pid_start, snapshot_id, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                 NULL, ?18)",
            params![
                s.sandbox_id.as_str(),
                s.template_id,
                s.build_id,
                s.state.as_str(),
                json_map(&s.metadata),
                json_map(&s.env_vars),
                s.access_token,
                s.timeout_secs,
                s.auto_pause,
                s.auto_resume,
                s.budget.cpus,
                mib(s.budget.memory),
                mib(s.budget.disk),
                s.started_ms,
                s.end_ms,
                s.pid,
                s.pid_start.map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
                s.created_ms,
            ],
        )
        .op("recording a sandbox")?;
        Ok(conn.last_insert_rowid())
    }

    /// The sandbox's VM answered: it is running until `end_ms`.
    pub fn mark_running(
        &self,
        id: &SandboxId,
        pid: Option<u32>,
        pid_start: Option<u64>,
        started_ms: i64,
        end_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute(
                "UPDATE sandboxes SET state = 'running', pid = ?2, pid_start = ?3,
                     started_ms = ?4, end_ms = ?5
                 WHERE sandbox_id = ?1",
                params![
                    id.as_str(),
                    pid,
                    pid_start.map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
                    started_ms,
                    end_ms
                ],
            )
            .op("marking a sandbox running")?;
        Ok(n == 1)
    }

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
                i64::try_from(snap.integrity.size_bytes()).unwrap_or(i64::MAX),
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
        let old: Vec<(String, PathBuf)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT snapshot_id, dir FROM snapshots
                     WHERE sandbox_id = ?1
                       AND snapshot_id IS NOT (SELECT snapshot_id FROM sandboxes
                                               WHERE sandbox_id = ?1)",
                )
                .op("dropping superseded snapshots")?;
            stmt.query_map([id.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    PathBuf::from(r.get::<_, String>(1)?),
                ))
            })
            .op("dropping superseded snapshots")?
            .collect::<Result<Vec<_>, _>>()
            .op("dropping superseded snapshots")?
        };
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

    pub fn set_end(&self, id: &SandboxId, end_ms: i64) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute(
                "UPDATE sandboxes SET end_ms = ?2 WHERE sandbox_id = ?1",
                params![id.as_str(), end_ms],
            )
            .op("changing a sandbox timeout")?;
        Ok(n == 1)
    }

    pub fn set_timeout(
        &self,
        id: &SandboxId,
        timeout_secs: i64,
        end_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute(
                "UPDATE sandboxes SET timeout_secs = ?2, end_ms = ?3 WHERE sandbox_id = ?1",
                params![id.as_str(), timeout_secs, end_ms],
            )
            .op("changing a sandbox timeout")?;
        Ok(n == 1)
    }

    /// Forgets a sandbox; returns its snapshots, whose directories the caller deletes.
    pub fn delete_sandbox(&self, id: &SandboxId) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().op("deleting a sandbox")?;
        let snaps = {
            let mut stmt = tx
                .prepare(&format!("{SNAPSHOT_SELECT} WHERE sandbox_id = ?1"))
                .op("deleting a sandbox")?;
            stmt.query_map([id.as_str()], snapshot_row)
                .op("deleting a sandbox")?
                .collect::<Result<Vec<_>, _>>()
                .op("deleting a sandbox")?
        };
        tx.execute("DELETE FROM snapshots WHERE sandbox_id = ?1", [id.as_str()])
            .op("deleting a sandbox")?;
        tx.execute("DELETE FROM sandboxes WHERE sandbox_id = ?1", [id.as_str()])
            .op("deleting a sandbox")?;
        tx.commit().op("deleting a sandbox")?;
        snaps.into_iter().collect()
    }

    pub fn sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
        let raw = self
            .lock()
            .query_row(
                &format!("{SANDBOX_SELECT} WHERE s.sandbox_id = ?1"),
                [id.as_str()],
                sandbox_raw,
            )
            .optional()
            .op("reading a sandbox")?;
        raw.map(RawSandbox::into_record).transpose()
    }

    /// Every sandbox record, in list order.
    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let raws = {
            let conn = self.lock();
            let mut stmt = conn
                .prepare(&format!("{SANDBOX_SELECT} ORDER BY s.seq"))
                .op("listing sandboxes")?;
            stmt.query_map([], sandbox_raw)
                .op("listing sandboxes")?
                .collect::<Result<Vec<_>, _>>()
                .op("listing sandboxes")?
        };
        raws.into_iter().map(RawSandbox::into_record).collect()
    }

    /// Running sandboxes whose end has passed: `(id, auto_pause)`.
    pub fn expired(&self, now_ms: i64) -> Result<Vec<(String, bool)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT sandbox_id, auto_pause FROM sandboxes
                 WHERE state = 'running' AND end_ms <= ?1 ORDER BY end_ms",
            )
            .op("finding expired sandboxes")?;
        stmt.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?)))
            .op("finding expired sandboxes")?
            .collect::<Result<Vec<_>, _>>()
            .op("finding expired sandboxes")
    }

    /// How many sandboxes (in any state) were created from `template_id`.
    pub fn sandboxes_of_template(&self, template_id: &str) -> Result<u64, StoreError> {
        self.lock()
            .query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE template_id = ?1",
                [template_id],
                |r| r.get(0),
            )
            .op("counting sandboxes of a template")
    }

    /// Every snapshot directory the database knows.
    pub fn snapshot_dirs(&self) -> Result<Vec<PathBuf>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT dir FROM snapshots")
            .op("listing snapshots")?;
        let dirs = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .op("listing snapshots")?
            .collect::<Result<Vec<_>, _>>()
            .op("listing snapshots")?;
        Ok(dirs.into_iter().map(PathBuf::from).collect())
    }
}

fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The database holds envd tokens and sandbox env vars: owner only.
    if let Err(err) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(%err, db = %path.display(), "cannot restrict database permissions");
    }
}

fn json_map(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".to_owned())
}

const TEMPLATE_SELECT: &str = "SELECT template_id, build_id, descriptor, size_bytes, sha256, cpus,
    memory_mb, disk_mb, envd_version, created_ms, updated_ms FROM templates";

fn template_row(r: &Row<'_>) -> rusqlite::Result<TemplateRecord> {
    Ok(TemplateRecord {
        template_id: r.get(0)?,
        build_id: r.get(1)?,
        descriptor: PathBuf::from(r.get::<_, String>(2)?),
        integrity: SnapshotArtifactIntegrity::new(
            u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
            r.get::<_, String>(4)?,
        ),
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

const SNAPSHOT_SELECT: &str = "SELECT snapshot_id, sandbox_id, dir, descriptor, size_bytes,
    sha256, created_ms FROM snapshots";

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<Result<SnapshotRecord, StoreError>> {
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
        integrity: SnapshotArtifactIntegrity::new(
            u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
            r.get::<_, String>(5)?,
        ),
        created_ms: r.get(6)?,
    }))
}

const SANDBOX_SELECT: &str = "SELECT s.seq, s.sandbox_id, s.template_id, s.build_id, s.state,
    s.metadata, s.env_vars, s.access_token, s.timeout_secs, s.auto_pause, s.auto_resume, s.cpus,
    s.memory_mb, s.disk_mb, s.started_ms, s.end_ms, s.pid, s.pid_start, s.created_ms,
    p.snapshot_id, p.dir, p.descriptor, p.size_bytes, p.sha256, p.created_ms
    FROM sandboxes s LEFT JOIN snapshots p ON p.snapshot_id = s.snapshot_id";

/// A row before validation: SQLite types only, so that malformed rows become a [`StoreError`]
/// naming the sandbox rather than a generic conversion failure.
struct RawSandbox {
    seq: i64,
    sandbox_id: String,
    template_id: String,
    build_id: String,
    state: String,
    metadata: String,
    env_vars: String,
    access_token: String,
    timeout_secs: i64,
    auto_pause: bool,
    auto_resume: bool,
    cpus: u32,
    memory_mb: i64,
    disk_mb: i64,
    started_ms: i64,
    end_ms: i64,
    pid: Option<u32>,
    pid_start: Option<i64>,
    created_ms: i64,
    snap_id: Option<String>,
    snap_dir: Option<String>,
    snap_descriptor: Option<String>,
    snap_size: Option<i64>,
    snap_sha: Option<String>,
    snap_created: Option<i64>,
}

fn sandbox_raw(r: &Row<'_>) -> rusqlite::Result<RawSandbox> {
    Ok(RawSandbox {
        seq: r.get(0)?,
        sandbox_id: r.get(1)?,
        template_id: r.get(2)?,
        build_id: r.get(3)?,
        state: r.get(4)?,
        metadata: r.get(5)?,
        env_vars: r.get(6)?,
        access_token: r.get(7)?,
        timeout_secs: r.get(8)?,
        auto_pause: r.get(9)?,
        auto_resume: r.get(10)?,
        cpus: r.get(11)?,
        memory_mb: r.get(12)?,
        disk_mb: r.get(13)?,
        started_ms: r.get(14)?,
        end_ms: r.get(15)?,
        pid: r.get(16)?,
        pid_start: r.get(17)?,
        created_ms: r.get(18)?,
        snap_id: r.get(19)?,
        snap_dir: r.get(20)?,
        snap_descriptor: r.get(21)?,
        snap_size: r.get(22)?,
        snap_sha: r.get(23)?,
        snap_created: r.get(24)?,
    })
}

impl RawSandbox {
    fn into_record(self) -> Result<SandboxRecord, StoreError> {
        let malformed = |detail: String| StoreError::Malformed {
            what: format!("sandbox {:?}", self.sandbox_id),
            detail,
        };
        let sandbox_id =
            SandboxId::new(&self.sandbox_id).map_err(|e| malformed(format!("id: {e}")))?;
        let state = RecordState::parse(&self.state)
            .ok_or_else(|| malformed(format!("state {:?}", self.state)))?;
        let metadata = serde_json::from_str(&self.metadata)
            .map_err(|e| malformed(format!("metadata: {e}")))?;
        let env_vars = serde_json::from_str(&self.env_vars)
            .map_err(|e| malformed(format!("env_vars: {e}")))?;
        let snapshot = match (
            self.snap_id,
            self.snap_dir,
            self.snap_descriptor,
            self.snap_size,
            self.snap_sha,
            self.snap_created,
        ) {
            (Some(snapshot_id), Some(dir), Some(descriptor), Some(size), Some(sha), Some(at)) => {
                Some(SnapshotRecord {
                    snapshot_id,
                    sandbox_id: sandbox_id.clone(),
                    dir: PathBuf::from(dir),
                    descriptor: PathBuf::from(descriptor),
                    integrity: SnapshotArtifactIntegrity::new(
                        u64::try_from(size).unwrap_or(0),
                        sha,
                    ),
                    created_ms: at,
                })
            }
            _ => None,
        };
        Ok(SandboxRecord {
            seq: self.seq,
            sandbox_id,
            template_id: self.template_id,
            build_id: self.build_id,
            state,
            metadata,
            env_vars,
            access_token: self.access_token,
            timeout_secs: self.timeout_secs,
            auto_pause: self.auto_pause,
            auto_resume: self.auto_resume,
            budget: ResourceBudget::new(self.cpus, size_mb(self.memory_mb), size_mb(self.disk_mb)),
            started_ms: self.started_ms,
            end_ms: self.end_ms,
            pid: self.pid,
            pid_start: self.pid_start.and_then(|v| u64::try_from(v).ok()),
            snapshot,
            created_ms: self.created_ms,
        })
    }
}
