//! The SQLite store on a real file: migrations, round trips, and a crash in the middle of a
//! transaction (a child process that aborts).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use firkin_admission::ResourceBudget;
use firkin_artifacts::SnapshotArtifactIntegrity;
use firkin_server::store::{
    BuildRecord, BuildStatus, RecordState, SCHEMA_VERSION, SandboxRecord, SnapshotRecord, Store,
    StoreError, TemplateRecord,
};
use firkin_types::{SandboxId, Size};

fn sandbox(id: &str, state: RecordState) -> SandboxRecord {
    SandboxRecord {
        seq: 0,
        sandbox_id: SandboxId::new(id).unwrap(),
        template_id: "base".into(),
        build_id: "b1".into(),
        state,
        metadata: BTreeMap::from([("k".to_owned(), "v w".to_owned())]),
        env_vars: BTreeMap::from([("A".to_owned(), "1".to_owned())]),
        access_token: "tok".into(),
        traffic_access_token: None,
        egress: None,
        timeout_secs: 300,
        auto_pause: true,
        auto_resume: false,
        budget: ResourceBudget::new(2, Size::mib(512), Size::gib(2)),
        started_ms: 1_000,
        end_ms: 301_000,
        pid: Some(42),
        pid_start: Some(7),
        snapshot: None,
        created_ms: 1_000,
    }
}

fn integrity() -> SnapshotArtifactIntegrity {
    SnapshotArtifactIntegrity::new(10, "ab".repeat(32))
}

#[test]
fn fresh_database_is_migrated_and_round_trips_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state").join("firkin.db");
    let store = Store::open(&db).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o600,
        "the database holds tokens"
    );

    assert!(store.add_api_key("k", "hash1", "e2b_…", 1).unwrap());
    assert!(
        !store.add_api_key("k2", "hash1", "e2b_…", 2).unwrap(),
        "duplicate digest"
    );
    assert_eq!(store.api_key_hashes().unwrap(), vec!["hash1".to_owned()]);

    let t = TemplateRecord {
        template_id: "base".into(),
        build_id: "b1".into(),
        descriptor: PathBuf::from("/c/templates/base/b1/snapshot.json"),
        integrity: integrity(),
        budget: ResourceBudget::new(2, Size::mib(512), Size::gib(2)),
        envd_version: "0.6.4".into(),
        created_ms: 5,
        updated_ms: 6,
    };
    let b = BuildRecord {
        build_id: "b1".into(),
        template_id: "base".into(),
        status: BuildStatus::Building,
        spec: "{}".into(),
        dir: PathBuf::from("/c/templates/base/b1"),
        logs: String::new(),
        reason: None,
        created_ms: 5,
        finished_ms: None,
    };
    store.insert_build(&b).unwrap();
    store
        .finish_build("b1", BuildStatus::Ready, None, "line1\nline2", 9, Some(&t))
        .unwrap();
    assert_eq!(store.template("base").unwrap(), Some(t.clone()));
    let got = store.build("b1").unwrap().unwrap();
    assert_eq!(got.status, BuildStatus::Ready);
    assert_eq!(got.logs, "line1\nline2");
    assert_eq!(got.finished_ms, Some(9));

    let mut s = sandbox("aaa", RecordState::Starting);
    s.seq = store.insert_sandbox(&s).unwrap();
    let id = s.sandbox_id.clone();
    assert_eq!(store.sandbox(&id).unwrap(), Some(s.clone()));
    assert!(
        store
            .mark_running(&id, Some(43), Some(8), 2_000, 9_000)
            .unwrap()
    );
    assert_eq!(store.expired(8_999).unwrap(), vec![]);
    assert_eq!(
        store.expired(9_000).unwrap(),
        vec![("aaa".to_owned(), true)]
    );
    let snap = SnapshotRecord {
        snapshot_id: "s1".into(),
        sandbox_id: id.clone(),
        dir: PathBuf::from("/s/snapshots/aaa/s1"),
        descriptor: PathBuf::from("/s/snapshots/aaa/s1/snapshot.json"),
        integrity: integrity(),
        created_ms: 10,
    };
    store.mark_paused(&id, &snap).unwrap();
    let paused = store.sandbox(&id).unwrap().unwrap();
    assert_eq!(paused.state, RecordState::Paused);
    assert_eq!(paused.snapshot, Some(snap.clone()));
    assert_eq!(paused.pid, None);
    assert_eq!(
        store.expired(i64::MAX).unwrap(),
        vec![],
        "paused sandboxes never expire"
    );
    assert_eq!(store.sandboxes_of_template("base").unwrap(), 1);
    assert_eq!(store.snapshot_dirs().unwrap(), vec![snap.dir.clone()]);

    let removed = store.delete_sandbox(&id).unwrap();
    assert_eq!(removed, vec![snap]);
    assert_eq!(store.sandbox(&id).unwrap(), None);
    assert!(store.snapshot_dirs().unwrap().is_empty());
    assert_eq!(store.delete_template("base").unwrap(), vec![b.dir]);
    assert_eq!(store.template("base").unwrap(), None);
}

#[test]
fn a_database_from_a_newer_firkin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("firkin.db");
    drop(Store::open(&db).unwrap());
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    match Store::open(&db) {
        Err(StoreError::TooNew { found, known, .. }) => {
            assert_eq!((found, known), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected TooNew, got {other:?}"),
    }
}

#[test]
fn reopening_is_idempotent_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("firkin.db");
    {
        let store = Store::open(&db).unwrap();
        store
            .insert_sandbox(&sandbox("keep", RecordState::Running))
            .unwrap();
    }
    let store = Store::open(&db).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(store.sandboxes().unwrap().len(), 1);
}

#[test]
fn a_traffic_token_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("firkin.db");
    let private = SandboxRecord {
        traffic_access_token: Some("traffic".into()),
        ..sandbox("private", RecordState::Running)
    };
    Store::open(&db).unwrap().insert_sandbox(&private).unwrap();
    let store = Store::open(&db).unwrap();
    let got = store.sandbox(&private.sandbox_id).unwrap().unwrap();
    assert_eq!(got.traffic_access_token.as_deref(), Some("traffic"));
}

fn egress(body: serde_json::Value) -> firkin_server::egress::Egress {
    firkin_server::egress::parse(&serde_json::from_value(body).unwrap())
        .unwrap()
        .expect("a restricting policy")
}

/// The policy is stored with the sandbox, kept through a pause and a reopening (what a resume
/// reads), replaced and cleared.
#[test]
fn an_egress_policy_survives_pause_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("firkin.db");
    let given = egress(serde_json::json!({
        "allowOut": ["Example.com", "10.0.0.0/8"],
        "denyOut": ["0.0.0.0/0"],
        "dnsServers": ["9.9.9.9"],
    }));
    let s = SandboxRecord {
        egress: Some(given.clone()),
        ..sandbox("walled", RecordState::Running)
    };
    let id = s.sandbox_id.clone();
    {
        let store = Store::open(&db).unwrap();
        store.insert_sandbox(&s).unwrap();
        let snap = SnapshotRecord {
            snapshot_id: "s1".into(),
            sandbox_id: id.clone(),
            dir: dir.path().join("s1"),
            descriptor: dir.path().join("s1/snapshot.json"),
            integrity: integrity(),
            created_ms: 10,
        };
        store.mark_paused(&id, &snap).unwrap();
    }
    let store = Store::open(&db).unwrap();
    let got = store.sandbox(&id).unwrap().unwrap();
    assert_eq!(got.state, RecordState::Paused);
    assert_eq!(got.egress.as_ref(), Some(&given));
    let policy = got.egress.unwrap().policy().clone();
    assert_eq!(policy.allow_domains, vec!["example.com"]);
    assert_eq!(policy.allow.len(), 2, "10/8 and the resolver: {policy:?}");

    let replaced = egress(serde_json::json!({"allow_internet_access": false}));
    assert!(store.set_egress(&id, Some(&replaced)).unwrap());
    assert_eq!(store.sandbox(&id).unwrap().unwrap().egress, Some(replaced));
    assert!(store.set_egress(&id, None).unwrap());
    assert_eq!(store.sandbox(&id).unwrap().unwrap().egress, None);
    let unknown = SandboxId::new("nobody").unwrap();
    assert!(!store.set_egress(&unknown, None).unwrap());
}

/// A database written before egress policies existed (schema 2) gains the column, and its
/// sandboxes stay unrestricted.
#[test]
fn a_schema_2_database_migrates_with_no_policies() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("firkin.db");
    Store::open(&db)
        .unwrap()
        .insert_sandbox(&sandbox("old", RecordState::Running))
        .unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("ALTER TABLE sandboxes DROP COLUMN egress_policy")
        .unwrap();
    conn.pragma_update(None, "user_version", 2).unwrap();
    drop(conn);
    let store = Store::open(&db).unwrap();
    assert_eq!(store.schema_version().unwrap(), 3);
    let got = store.sandboxes().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].egress, None);
}

#[test]
fn a_malformed_stored_policy_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("firkin.db");
    let store = Store::open(&db).unwrap();
    store
        .insert_sandbox(&sandbox("bad", RecordState::Paused))
        .unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE sandboxes SET egress_policy = '{\"denyOut\":[\"nope\"]}'",
        [],
    )
    .unwrap();
    match store.sandboxes() {
        Err(StoreError::Malformed { what, detail }) => {
            assert!(
                what.contains("bad") && detail.contains("egress_policy"),
                "{detail}"
            );
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
}

const CRASH_DB: &str = "FIRKIN_TEST_CRASH_DB";

/// Not a test on its own: run by `a_crash_mid_transaction_loses_only_that_transaction` in a
/// child process, which commits some rows, starts a transaction and then aborts.
#[test]
fn crash_child() {
    let Some(db) = std::env::var_os(CRASH_DB) else {
        return;
    };
    let db = Path::new(&db);
    let store = Store::open(db).unwrap();
    store
        .insert_sandbox(&sandbox("committed", RecordState::Running))
        .unwrap();
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    conn.execute(
        "UPDATE sandboxes SET state = 'paused' WHERE sandbox_id = 'committed'",
        [],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO api_keys (name, key_hash, hint, created_ms) VALUES ('x', 'y', 'z', 1)",
        [],
    )
    .unwrap();
    // Like kill -9: no destructors, no rollback, no checkpoint.
    std::process::abort();
}

#[test]
fn a_crash_mid_transaction_loses_only_that_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("firkin.db");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_DB, &db)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must have aborted");
    assert!(
        dir.path().join("firkin.db-wal").exists(),
        "the crash left the write-ahead log behind"
    );
    let store = Store::open(&db).unwrap();
    let all = store.sandboxes().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].sandbox_id.as_str(), "committed");
    assert_eq!(
        all[0].state,
        RecordState::Running,
        "uncommitted update rolled back"
    );
    assert!(store.api_key_hashes().unwrap().is_empty());
    // And the file takes writes again.
    store.add_api_key("after", "h", "e2b_…", 1).unwrap();
}

#[test]
fn malformed_rows_are_reported_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("firkin.db");
    let store = Store::open(&db).unwrap();
    store
        .insert_sandbox(&sandbox("ok", RecordState::Running))
        .unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE sandboxes SET metadata = 'not json'", [])
        .unwrap();
    match store.sandboxes() {
        Err(StoreError::Malformed { what, .. }) => assert!(what.contains("ok")),
        other => panic!("expected Malformed, got {other:?}"),
    }
}
