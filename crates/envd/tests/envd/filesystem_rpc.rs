//! filesystem.Filesystem.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

async fn call(a: &Agent, method: &str, body: Value) -> (StatusCode, Value) {
    rpc(
        &a.client,
        &format!("filesystem.Filesystem/{method}"),
        &body,
        &[],
    )
    .await
}

#[tokio::test]
async fn stat_make_dir_move_list_remove() {
    let a = Agent::with_token().await;
    let dir = scratch();
    let d = dir.path().display().to_string();

    let (status, v) = call(&a, "Stat", json!({"path": format!("{d}/missing")})).await;
    assert_rpc_error(status, &v, StatusCode::NOT_FOUND, "not_found");

    let (status, v) = call(&a, "MakeDir", json!({"path": format!("{d}/a/b/c")})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(v["entry"]["name"], "c");
    assert_eq!(v["entry"]["path"], format!("{d}/a/b/c"));
    let (status, v) = call(&a, "MakeDir", json!({"path": format!("{d}/a/b/c")})).await;
    assert_rpc_error(status, &v, StatusCode::CONFLICT, "already_exists");

    std::fs::write(dir.path().join("a/f.txt"), "12345").unwrap();
    std::fs::set_permissions(
        dir.path().join("a/f.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let (status, v) = call(&a, "Stat", json!({"path": format!("{d}/a/f.txt")})).await;
    assert_eq!(status, StatusCode::OK);
    let e = &v["entry"];
    assert_eq!(e["type"], "FILE_TYPE_FILE");
    assert_eq!(e["size"], "5"); // int64 as a string, proto3-canonical
    assert_eq!(e["mode"], 0o640);
    assert_eq!(e["permissions"], "-rw-r-----");
    assert!(e["modifiedTime"].as_str().unwrap().ends_with('Z'), "{e}");
    assert!(e["owner"].is_string() && e["group"].is_string());

    std::os::unix::fs::symlink(dir.path().join("a/f.txt"), dir.path().join("link")).unwrap();
    let (_, v) = call(&a, "Stat", json!({"path": format!("{d}/link")})).await;
    assert_eq!(v["entry"]["isSymlink"], true);
    assert_eq!(v["entry"]["type"], "FILE_TYPE_FILE");
    assert_eq!(v["entry"]["symlinkTarget"], format!("{d}/a/f.txt"));

    let (status, v) = call(&a, "ListDir", json!({"path": d, "depth": 1})).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec![format!("{d}/a"), format!("{d}/link")]);
    let (_, v) = call(&a, "ListDir", json!({"path": d, "depth": 3})).await;
    let mut names: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            format!("{d}/a"),
            format!("{d}/a/b"),
            format!("{d}/a/b/c"),
            format!("{d}/a/f.txt"),
            format!("{d}/link")
        ]
    );
    let (status, v) = call(&a, "ListDir", json!({"path": format!("{d}/a/f.txt")})).await;
    assert_rpc_error(status, &v, StatusCode::BAD_REQUEST, "invalid_argument");
    let (status, v) = call(&a, "ListDir", json!({"path": format!("{d}/nope")})).await;
    assert_rpc_error(status, &v, StatusCode::NOT_FOUND, "not_found");

    let (status, v) = call(
        &a,
        "Move",
        json!({"source": format!("{d}/a"), "destination": format!("{d}/new/place")}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["entry"]["path"], format!("{d}/new/place"));
    assert_eq!(
        std::fs::read(dir.path().join("new/place/f.txt")).unwrap(),
        b"12345"
    );
    let (status, v) = call(
        &a,
        "Move",
        json!({"source": format!("{d}/a"), "destination": format!("{d}/x")}),
    )
    .await;
    assert_rpc_error(status, &v, StatusCode::NOT_FOUND, "not_found");

    let (status, _) = call(&a, "Remove", json!({"path": format!("{d}/new")})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!dir.path().join("new").exists());
    let (status, _) = call(&a, "Remove", json!({"path": format!("{d}/new")})).await;
    assert_eq!(status, StatusCode::OK, "removing a missing path succeeds");

    let (status, v) = call(&a, "Stat", json!({"path": ""})).await;
    assert_rpc_error(status, &v, StatusCode::BAD_REQUEST, "invalid_argument");
}

#[tokio::test]
async fn paths_resolve_against_the_users_home() {
    let a = Agent::with_token().await;
    let me = firkin_envd::users::AccountDb::default()
        .by_uid(nix::unistd::geteuid().as_raw())
        .unwrap();
    let (_, v) = call(&a, "Stat", json!({"path": "~"})).await;
    assert_eq!(v["entry"]["path"], me.home.display().to_string());
    let (_, v) = call(&a, "Stat", json!({"path": "."})).await;
    assert_eq!(v["entry"]["path"], me.home.display().to_string());
}

#[tokio::test]
async fn filesystem_as_another_user_is_checked_by_the_kernel() {
    let Some(a) = root_agent().await else {
        return;
    };
    let auth = basic("user");
    let h: [(&str, &str); 1] = [("authorization", &auth)];
    for (method, path) in [("MakeDir", "/root/firkin-denied"), ("ListDir", "/root")] {
        let method = format!("filesystem.Filesystem/{method}");
        let (status, v) = rpc(&a.client, &method, &json!({ "path": path }), &h).await;
        assert_rpc_error(status, &v, StatusCode::FORBIDDEN, "permission_denied");
    }
    let (status, v) = rpc(
        &a.client,
        "filesystem.Filesystem/MakeDir",
        &json!({"path": "~/firkin-mkdir-test"}),
        &h,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["entry"]["owner"], "user");
    assert_eq!(v["entry"]["path"], "/home/user/firkin-mkdir-test");
    std::fs::remove_dir("/home/user/firkin-mkdir-test").unwrap();
    let (status, v) = rpc(
        &a.client,
        "filesystem.Filesystem/Stat",
        &json!({"path": "/tmp"}),
        &[("authorization", &basic("nobody-firkin"))],
    )
    .await;
    assert_rpc_error(status, &v, StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn watch_dir_streams_start_then_events() {
    let a = Agent::with_token().await;
    let dir = scratch();
    let d = dir.path().display().to_string();
    let mut s = open_stream(
        &a.client,
        "filesystem.Filesystem/WatchDir",
        &json!({"path": d, "recursive": true, "includeEntry": true}),
        &[("keepalive-ping-interval", "1")],
    )
    .await;
    let first = tokio::time::timeout(Duration::from_secs(5), s.next_json())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, json!({"start": {}}));
    std::fs::write(dir.path().join("new.txt"), "x").unwrap();
    let mut seen = vec![];
    let mut keepalive = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline
        && !(keepalive
            && seen
                .iter()
                .any(|(n, t): &(String, String)| n == "new.txt" && t == "EVENT_TYPE_WRITE"))
    {
        let v = tokio::time::timeout(Duration::from_secs(5), s.next_json())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if v.get("keepalive").is_some() {
            keepalive = true;
            continue;
        }
        let ev = &v["filesystem"];
        if ev["name"] == "new.txt" && ev["type"] == "EVENT_TYPE_CREATE" {
            assert_eq!(ev["entry"]["path"], format!("{d}/new.txt"));
        }
        seen.push((
            ev["name"].as_str().unwrap().to_owned(),
            ev["type"].as_str().unwrap().to_owned(),
        ));
    }
    assert!(
        seen.contains(&("new.txt".into(), "EVENT_TYPE_CREATE".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("new.txt".into(), "EVENT_TYPE_WRITE".into())),
        "{seen:?}"
    );
    assert!(keepalive, "no keepalive within the interval");

    let err = a
        .client
        .server_stream(
            "filesystem.Filesystem/WatchDir",
            &json!({"path": format!("{d}/missing")}),
            &[],
        )
        .await;
    let msg = match err {
        Err(e) => e.to_string(),
        Ok(mut s) => s.next_json().await.unwrap_err().to_string(),
    };
    assert!(msg.contains("not_found"), "{msg}");
}

#[tokio::test]
async fn polled_watchers_collect_events_until_removed() {
    let a = Agent::with_token().await;
    let dir = scratch();
    let d = dir.path().display().to_string();
    let (status, v) = call(&a, "CreateWatcher", json!({"path": d, "recursive": false})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let id = v["watcherId"].as_str().unwrap().to_owned();
    std::fs::write(dir.path().join("p.txt"), "x").unwrap();
    std::fs::rename(dir.path().join("p.txt"), dir.path().join("q.txt")).unwrap();
    std::fs::set_permissions(
        dir.path().join("q.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("q.txt")).unwrap();
    let mut events = vec![];
    for _ in 0..50 {
        let (status, v) = call(&a, "GetWatcherEvents", json!({"watcherId": id})).await;
        assert_eq!(status, StatusCode::OK);
        for e in v["events"].as_array().cloned().unwrap_or_default() {
            events.push(format!(
                "{} {}",
                e["name"].as_str().unwrap(),
                e["type"].as_str().unwrap()
            ));
        }
        if events.iter().any(|e| e == "q.txt EVENT_TYPE_REMOVE") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for want in [
        "p.txt EVENT_TYPE_CREATE",
        "p.txt EVENT_TYPE_WRITE",
        "p.txt EVENT_TYPE_RENAME",
        "q.txt EVENT_TYPE_CREATE",
        "q.txt EVENT_TYPE_CHMOD",
        "q.txt EVENT_TYPE_REMOVE",
    ] {
        assert!(
            events.iter().any(|e| e == want),
            "missing {want} in {events:?}"
        );
    }
    // Drained: a second poll has nothing new.
    let (_, v) = call(&a, "GetWatcherEvents", json!({"watcherId": id})).await;
    assert!(
        v.get("events")
            .is_none_or(|e| e.as_array().unwrap().is_empty()),
        "{v}"
    );
    let (status, _) = call(&a, "RemoveWatcher", json!({"watcherId": id})).await;
    assert_eq!(status, StatusCode::OK);
    for method in ["GetWatcherEvents", "RemoveWatcher"] {
        let (status, v) = call(&a, method, json!({"watcherId": id})).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{method}"
        );
    }
    let (status, v) = call(&a, "CreateWatcher", json!({"path": format!("{d}/missing")})).await;
    assert_rpc_error(status, &v, StatusCode::NOT_FOUND, "not_found");
}
