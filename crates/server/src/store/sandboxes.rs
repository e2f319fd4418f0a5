//! The `sandboxes` table: one row per sandbox, with the continuation it is paused in joined
//! from `snapshots`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use firkin_admission::ResourceBudget;
use firkin_types::SandboxId;
use rusqlite::{OptionalExtension, Row, params};

use super::snapshots::{SNAPSHOT_SELECT, snapshot_row};
use super::{SnapshotRecord, SqlContext, Store, StoreError, integrity, mib, query_all, size_mb};
use crate::egress::Egress;

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
    /// Set for a sandbox created with `allowPublicTraffic: false`: requests to its ports other
    /// than envd's must carry it as `e2b-traffic-access-token`.
    pub traffic_access_token: Option<String>,
    /// The egress policy asked for at create or by the last `PUT …/network`; `None`:
    /// unrestricted. Applied again at every resume.
    pub egress: Option<Egress>,
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

impl Store {
    /// Records a sandbox; returns its list position.
    pub fn insert_sandbox(&self, s: &SandboxRecord) -> Result<i64, StoreError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO sandboxes (sandbox_id, template_id, build_id, state, metadata, env_vars,
                 access_token, timeout_secs, auto_pause, auto_resume, cpus, memory_mb, disk_mb,
                 started_ms, end_ms, pid, pid_start, snapshot_id, created_ms, traffic_access_token,
                 egress_policy)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                 NULL, ?18, ?19, ?20)",
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
                s.pid_start.map(pid_start_column),
                s.created_ms,
                s.traffic_access_token,
                s.egress.as_ref().map(Egress::to_json),
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
                    pid_start.map(pid_start_column),
                    started_ms,
                    end_ms
                ],
            )
            .op("marking a sandbox running")?;
        Ok(n == 1)
    }

    /// Replaces a sandbox's egress policy (`None`: unrestricted).
    pub fn set_egress(&self, id: &SandboxId, egress: Option<&Egress>) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute(
                "UPDATE sandboxes SET egress_policy = ?2 WHERE sandbox_id = ?1",
                params![id.as_str(), egress.map(Egress::to_json)],
            )
            .op("changing a sandbox's egress policy")?;
        Ok(n == 1)
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
        let snaps = query_all(
            &tx,
            &format!("{SNAPSHOT_SELECT} WHERE sandbox_id = ?1"),
            [id.as_str()],
            "deleting a sandbox",
            snapshot_row,
        )?;
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
        let raws = query_all(
            &self.lock(),
            &format!("{SANDBOX_SELECT} ORDER BY s.seq"),
            [],
            "listing sandboxes",
            sandbox_raw,
        )?;
        raws.into_iter().map(RawSandbox::into_record).collect()
    }

    /// Running sandboxes whose end has passed: `(id, auto_pause)`.
    pub fn expired(&self, now_ms: i64) -> Result<Vec<(String, bool)>, StoreError> {
        query_all(
            &self.lock(),
            "SELECT sandbox_id, auto_pause FROM sandboxes
             WHERE state = 'running' AND end_ms <= ?1 ORDER BY end_ms",
            [now_ms],
            "finding expired sandboxes",
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
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
}

/// Clock ticks since boot fit an `i64` for billions of years; saturate rather than fail.
fn pid_start_column(ticks: u64) -> i64 {
    i64::try_from(ticks).unwrap_or(i64::MAX)
}

fn json_map(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".to_owned())
}

const SANDBOX_SELECT: &str = "SELECT s.seq, s.sandbox_id, s.template_id, s.build_id, s.state,
    s.metadata, s.env_vars, s.access_token, s.timeout_secs, s.auto_pause, s.auto_resume, s.cpus,
    s.memory_mb, s.disk_mb, s.started_ms, s.end_ms, s.pid, s.pid_start, s.created_ms,
    p.snapshot_id, p.dir, p.descriptor, p.size_bytes, p.sha256, p.created_ms,
    s.traffic_access_token, s.egress_policy
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
    traffic_access_token: Option<String>,
    egress_policy: Option<String>,
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
        traffic_access_token: r.get(25)?,
        egress_policy: r.get(26)?,
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
        // Parsed again rather than trusted: a row that no longer validates must not resume
        // with a policy other than the one it was given.
        let egress = match &self.egress_policy {
            None => None,
            Some(json) => {
                Egress::from_json(json).map_err(|e| malformed(format!("egress_policy: {e}")))?
            }
        };
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
                    integrity: integrity(size, sha),
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
            traffic_access_token: self.traffic_access_token,
            egress,
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
