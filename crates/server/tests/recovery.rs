//! Restart after a crash: nothing listed that does not exist, nothing left running without a
//! record, paused sandboxes resumable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Backend, Options, TestServer, eventually, open_server, processes_under};
use firkin_admission::ResourceBudget;
use firkin_server::ServerError;
use firkin_server::store::{BuildRecord, BuildStatus, RecordState, SandboxRecord, Store};
use firkin_types::{SandboxId, Size};
use http::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_comes_back_knowing_its_sandboxes() {
    let s = TestServer::start(Options::default()).await;
    let a = s
        .create(r#"{"templateID":"base","metadata":{"n":"a"}}"#)
        .await;
    let b = s
        .create(r#"{"templateID":"base","metadata":{"n":"b"}}"#)
        .await;
    let p = s
        .create(r#"{"templateID":"base","metadata":{"n":"p"}}"#)
        .await;
    let pid = p["sandboxID"].as_str().unwrap().to_owned();
    let r = s
        .envd(
            &p,
            Method::POST,
            "/files?path=state.txt",
            &[("content-type", "application/octet-stream")],
            "paused state",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = s
        .api(Method::POST, &format!("/sandboxes/{pid}/pause"), "")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let run_dir = s.state.join("sandboxes");
    assert_eq!(processes_under(&run_dir).len(), 2);

    let dirs = s.crash().await;
    // The agents outlived the "crashed" server, as if PDEATHSIG had not fired.
    assert_eq!(processes_under(&run_dir).len(), 2);

    let server = open_server(dirs.0.path(), dirs.1.path(), &Options::default());
    let report = server.recovery().clone();
    let mut removed = report.removed_sandboxes.clone();
    removed.sort();
    let mut want = vec![
        a["sandboxID"].as_str().unwrap().to_owned(),
        b["sandboxID"].as_str().unwrap().to_owned(),
    ];
    want.sort();
    assert_eq!(removed, want);
    assert_eq!(report.kept_paused, 1);
    assert!(report.killed_processes >= 2, "{report:?}");
    eventually(
        "leftover agents to die",
        Duration::from_secs(5),
        async || processes_under(&run_dir).is_empty(),
    )
    .await;
    assert_eq!(
        std::fs::read_dir(&run_dir).unwrap().count(),
        0,
        "run dirs removed"
    );

    let s = TestServer::serve(server, dirs, Options::default()).await;
    let list = s.api(Method::GET, "/v2/sandboxes", "").await.json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["sandboxID"], pid.as_str());
    assert_eq!(list[0]["state"], "paused");
    for gone in [&a, &b] {
        let id = gone["sandboxID"].as_str().unwrap();
        let r = s.api(Method::GET, &format!("/sandboxes/{id}"), "").await;
        r.assert_error(StatusCode::NOT_FOUND);
        let r = s.envd(gone, Method::GET, "/health", &[], "").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }
    let c = s
        .api(Method::POST, &format!("/v2/sandboxes/{pid}/connect"), "{}")
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.text());
    let r = s
        .envd(&p, Method::GET, "/files?path=state.txt", &[], "")
        .await;
    assert_eq!(r.text(), "paused state");
    let fresh = s.create(r#"{"templateID":"base"}"#).await;
    assert!(fresh["sandboxID"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_interrupted_work_are_cleaned_up() {
    let state = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    {
        // A first server builds the template, then goes away cleanly.
        let s = TestServer::start_in((state, cache), Options::default()).await;
        let dirs = s.crash().await;
        let (state, cache) = dirs;
        // Leave the kind of debris a crash would: a create that never finished, a paused
        // sandbox whose snapshot vanished, a half-written pause, an interrupted build.
        let db = Store::open(&state.path().join("firkin.db")).unwrap();
        let rec = |id: &str, st: RecordState| SandboxRecord {
            seq: 0,
            sandbox_id: SandboxId::new(id).unwrap(),
            template_id: "base".into(),
            build_id: "x".into(),
            state: st,
            metadata: BTreeMap::new(),
            env_vars: BTreeMap::new(),
            access_token: "t".into(),
            traffic_access_token: None,
            egress: None,
            timeout_secs: 60,
            auto_pause: false,
            auto_resume: false,
            budget: ResourceBudget::new(1, Size::mib(128), Size::mib(256)),
            started_ms: 1,
            end_ms: 2,
            pid: None,
            pid_start: None,
            snapshot: None,
            created_ms: 1,
        };
        db.insert_sandbox(&rec("halfcreated", RecordState::Starting))
            .unwrap();
        db.insert_sandbox(&rec("lostsnapshot", RecordState::Paused))
            .unwrap();
        let junk = state.path().join("snapshots/nosuchsandbox/partial");
        std::fs::create_dir_all(&junk).unwrap();
        std::fs::write(junk.join("ram.bin"), b"half").unwrap();
        let build_dir = cache.path().join("templates/other/b9");
        std::fs::create_dir_all(&build_dir).unwrap();
        // As root, the way a killed mmdebstrap leaves its tree: a file system still mounted
        // inside it, which the clean-up must detach rather than empty or trip over.
        let shm = build_dir.join("scratch/tree/dev/shm");
        let mounted = nix::unistd::geteuid().is_root() && {
            std::fs::create_dir_all(&shm).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "tmpfs"])
                .arg(&shm)
                .status()
                .unwrap()
                .success();
            std::fs::write(shm.join("held"), b"x").unwrap();
            ok
        };
        db.insert_build(&BuildRecord {
            build_id: "b9".into(),
            template_id: "other".into(),
            status: BuildStatus::Building,
            spec: "{}".into(),
            dir: build_dir.clone(),
            logs: "started".into(),
            reason: None,
            created_ms: 1,
            finished_ms: None,
        })
        .unwrap();
        drop(db);

        let server = open_server(state.path(), cache.path(), &Options::default());
        let r = server.recovery().clone();
        assert_eq!(r.removed_sandboxes, vec!["halfcreated".to_owned()]);
        assert_eq!(r.removed_paused, vec!["lostsnapshot".to_owned()]);
        assert_eq!(r.removed_snapshot_dirs, 1);
        assert_eq!(r.interrupted_builds, 1);
        assert!(!junk.exists());
        assert!(!build_dir.exists());
        if mounted {
            let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert!(!table.contains(shm.to_str().unwrap()), "mount left behind");
        }
        let b = server.store().build("b9").unwrap().unwrap();
        assert_eq!(b.status, BuildStatus::Error);
        assert!(b.reason.unwrap().contains("interrupted"));

        // While it runs, nobody else may open the state directory.
        match firkin_server::Server::open(
            firkin_server::ServerConfig::new(common::paths_in(state.path(), cache.path())),
            firkin_runtime::SandboxRuntime::new(
                firkin_server::process::ProcessLauncher::new(common::envd_bin(), "/nonexistent"),
                firkin_runtime::RuntimeConfig::new(ResourceBudget::ZERO),
                std::sync::Arc::new(firkin_artifacts::DigestCache::in_memory()),
            ),
            std::sync::Arc::new(firkin_server::process::ProcessTemplateBuilder),
        ) {
            Err(ServerError::Busy(p)) => assert_eq!(p, state.path()),
            other => panic!("expected Busy, got {other:?}"),
        }
        let s = TestServer::serve(server, (state, cache), Options::default()).await;
        let list = s.api(Method::GET, "/v2/sandboxes", "").await.json();
        assert_eq!(list, json!([]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_adopts_the_cached_template() {
    let cache = tempfile::tempdir().unwrap();
    let state1 = tempfile::tempdir().unwrap();
    let s1 = TestServer::start_in((state1, cache), Options::default()).await;
    let (_state1, cache) = s1.crash().await;
    // Another state directory sharing the cache: no rebuild, the finished build is adopted.
    let state2 = tempfile::tempdir().unwrap();
    let server = open_server(state2.path(), cache.path(), &Options::default());
    let r = server
        .ensure_template(firkin_server::types::BuildTemplateRequest {
            template_id: "base".into(),
            ..Default::default()
        })
        .unwrap();
    assert!(
        matches!(r, firkin_server::EnsureTemplate::Adopted { .. }),
        "{r:?}"
    );
    let s2 = TestServer::serve(
        server,
        (state2, cache),
        Options {
            build_base: false,
            ..Options::default()
        },
    )
    .await;
    let sb = s2.create(r#"{"templateID":"base"}"#).await;
    let r = s2.envd(&sb, Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

/// A build in the shared cache made from other guest binaries (an older `firkin-envd`, say)
/// is not adopted: the server builds afresh, and the new build is what a third server adopts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_template_from_other_guest_binaries_is_not_adopted() {
    let with = |f: &str| Options {
        guest_fingerprint: Some(f.to_owned()),
        build_base: false,
        ..Options::default()
    };
    let ensure = |server: &firkin_server::Server| {
        server
            .ensure_template(firkin_server::types::BuildTemplateRequest {
                template_id: "base".into(),
                ..Default::default()
            })
            .unwrap()
    };
    let cache = tempfile::tempdir().unwrap();
    let state1 = tempfile::tempdir().unwrap();
    let s1 = open_server(state1.path(), cache.path(), &with("envd-1"));
    let first = match ensure(&s1) {
        firkin_server::EnsureTemplate::Building { build_id, progress } => {
            progress.wait().await.unwrap();
            build_id
        }
        other => panic!("an empty cache must build, got {other:?}"),
    };
    drop(s1);

    let state2 = tempfile::tempdir().unwrap();
    let s2 = open_server(state2.path(), cache.path(), &with("envd-1"));
    match ensure(&s2) {
        firkin_server::EnsureTemplate::Adopted { build_id } => assert_eq!(build_id, first),
        other => panic!("same guest binaries must adopt, got {other:?}"),
    }
    drop(s2);

    let state3 = tempfile::tempdir().unwrap();
    let s3 = open_server(state3.path(), cache.path(), &with("envd-2"));
    let second = match ensure(&s3) {
        firkin_server::EnsureTemplate::Building { build_id, progress } => {
            progress.wait().await.unwrap();
            build_id
        }
        other => panic!("other guest binaries must rebuild, got {other:?}"),
    };
    assert_ne!(second, first);
    drop(s3);

    let state4 = tempfile::tempdir().unwrap();
    let s4 = open_server(state4.path(), cache.path(), &with("envd-2"));
    match ensure(&s4) {
        firkin_server::EnsureTemplate::Adopted { build_id } => assert_eq!(build_id, second),
        other => panic!("the new build must be adopted, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_pauses_auto_pause_sandboxes() {
    a_clean_shutdown_pauses_auto_pause_sandboxes_on(Backend::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_a_clean_shutdown_pauses_auto_pause_sandboxes() {
    a_clean_shutdown_pauses_auto_pause_sandboxes_on(Backend::Qemu).await;
}

async fn a_clean_shutdown_pauses_auto_pause_sandboxes_on(backend: Backend) {
    let mut s = TestServer::start(Options::on(backend)).await;
    let keep = s.create(r#"{"templateID":"base","autoPause":true}"#).await;
    let drop_it = s.create(r#"{"templateID":"base"}"#).await;
    let r = s
        .envd(
            &keep,
            Method::POST,
            "/files?path=before-shutdown.txt",
            &[("content-type", "application/octet-stream")],
            "written before",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    s.stop().await;
    // The server stopped every VM: the paused one lives on as a snapshot only.
    assert_eq!(common::sandbox_processes(&s, backend), Vec::<u32>::new());
    let dirs = s.crash().await;
    let s = TestServer::start_in(dirs, Options::on(backend)).await;
    let list = s.api(Method::GET, "/v2/sandboxes", "").await.json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["sandboxID"], keep["sandboxID"]);
    assert_eq!(list[0]["state"], "paused");
    let id = drop_it["sandboxID"].as_str().unwrap();
    s.api(Method::GET, &format!("/sandboxes/{id}"), "")
        .await
        .assert_error(StatusCode::NOT_FOUND);
    // The paused one comes back, with what it had written before the shutdown.
    let kid = keep["sandboxID"].as_str().unwrap();
    let c = s
        .api(Method::POST, &format!("/v2/sandboxes/{kid}/connect"), "{}")
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.text());
    let r = s
        .envd(
            &keep,
            Method::GET,
            "/files?path=before-shutdown.txt",
            &[],
            "",
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "written before")
    );
    assert_eq!(common::sandbox_processes(&s, backend).len(), 1);
}
