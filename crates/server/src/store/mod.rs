//! The server's durable state: one SQLite file (`<state>/firkin.db`) in WAL mode.
//!
//! WAL with `synchronous=NORMAL` keeps every committed transaction across a process crash
//! (`kill -9`); only an OS crash or power loss can drop the last few commits, and never
//! corrupts the file. That is the failure model the server's restart recovery is built for.
//!
//! Every state change the API makes is one transaction, so the database always describes a state
//! the server really was in. Calls are short and synchronous: one connection behind a mutex,
//! held only for the duration of a statement or transaction, never across an `.await`.

mod api_keys;
mod sandboxes;
mod snapshots;
mod templates;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use firkin_artifacts::SnapshotArtifactIntegrity;
use firkin_types::Size;
use rusqlite::{Connection, Params, Row};

pub use sandboxes::{RecordState, SandboxRecord};
pub use snapshots::SnapshotRecord;
pub use templates::{BuildRecord, BuildStatus, TemplateRecord};

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
    // 2: `allowPublicTraffic: false` sandboxes keep the token their ports ask for.
    r#"
    ALTER TABLE sandboxes ADD COLUMN traffic_access_token TEXT;
    "#,
    // 3: the egress policy a sandbox was given (create or `PUT …/network`), as the JSON of its
    // E2B request, so that it is applied again at every resume. NULL: unrestricted.
    r#"
    ALTER TABLE sandboxes ADD COLUMN egress_policy TEXT;
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

/// The SQLite state store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
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
}

fn mib(size: Size) -> i64 {
    i64::try_from(size.as_mib()).unwrap_or(i64::MAX)
}

fn size_mb(v: i64) -> Size {
    Size::mib(u64::try_from(v).unwrap_or(0))
}

/// Sizes and digests are stored as SQLite integers (signed): these convert both ways, saturating
/// rather than failing, since a 2^63-byte snapshot cannot exist.
fn size_bytes(integrity: &SnapshotArtifactIntegrity) -> i64 {
    i64::try_from(integrity.size_bytes()).unwrap_or(i64::MAX)
}

fn integrity(size_bytes: i64, sha256: String) -> SnapshotArtifactIntegrity {
    SnapshotArtifactIntegrity::new(u64::try_from(size_bytes).unwrap_or(0), sha256)
}

/// Runs a query and collects every row; `op` names the work in any error.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    op: &'static str,
    row: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(sql).op(op)?;
    stmt.query_map(params, row)
        .op(op)?
        .collect::<Result<Vec<_>, _>>()
        .op(op)
}

fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The database holds envd tokens and sandbox env vars: owner only.
    if let Err(err) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(%err, db = %path.display(), "cannot restrict database permissions");
    }
}
