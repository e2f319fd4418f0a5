//! The control plane end to end: a real server, real SQLite, real HTTP, with real `firkin-envd`
//! agents (the process backend). The `vm_*` variants run the same scenarios on real QEMU
//! microVMs restored from the `base` template.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Backend, KEY, Options, TestServer, envelope, eventually, take_envelopes};
use http::{Method, StatusCode};
use serde_json::{Value, json};

const MIN: &str = r#"{"templateID":"base","metadata":{},"envVars":{}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_required_and_answered_in_json() {
    let s = TestServer::start(Options::default()).await;
    let r = s.call(Method::GET, "/v2/sandboxes", &[], "").await;
    assert!(
        r.assert_error(StatusCode::UNAUTHORIZED)
            .contains("X-API-KEY")
    );
    let r = s
        .call(
            Method::GET,
            "/v2/sandboxes",
            &[("x-api-key", "e2b_wrong")],
            "",
        )
        .await;
    assert!(r.assert_error(StatusCode::UNAUTHORIZED).contains("invalid"));
    let r = s
        .call(Method::POST, "/v2/sandboxes", &[("x-api-key", "")], MIN)
        .await;
    r.assert_error(StatusCode::UNAUTHORIZED);
    // A key for one server is not a key for the control plane's unauthenticated health.
    let r = s.call(Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = s.api(Method::GET, "/v2/sandboxes", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_4xx_json_and_the_server_stays_up() {
    let s = TestServer::start(Options::default()).await;
    let cases: Vec<(Method, &str, String, StatusCode)> = vec![
        (
            Method::POST,
            "/v2/sandboxes",
            "{not json".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            "[1,2]".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"nope"}"#.into(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"../../etc"}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","timeout":-5}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","timeout":"soon"}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","timeout":99999999}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","envVars":{"A=B":"x"}}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","allow_internet_access":false}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            "x".repeat(2 * 1024 * 1024),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Method::GET,
            "/sandboxes/..%2F..%2Fetc%2Fpasswd",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/sandboxes/%00",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            "/sandboxes/doesnotexist",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/sandboxes/doesnotexist/timeout",
            r#"{"timeout":10}"#.into(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/no/such/route",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::PUT,
            "/v2/sandboxes",
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::GET,
            "/v2/sandboxes?limit=1000",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v2/sandboxes?nextToken=garbage",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::DELETE,
            "/firkin/v1/templates/..",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (method, path, body, want) in cases {
        let r = s.api(method.clone(), path, &body).await;
        let msg = r.assert_error(want);
        assert!(!msg.is_empty(), "{method} {path}");
    }
    // The raw `..` form: hyper passes the path through unnormalised.
    let r = s.api(Method::GET, "/sandboxes/../../etc/passwd", "").await;
    assert!(r.status.is_client_error(), "{}", r.status);

    // A chunked body without Content-Length is cut off at the limit too.
    let chunked = hyper_chunked_post(&s, 3 * 1024 * 1024).await;
    assert_eq!(chunked, StatusCode::PAYLOAD_TOO_LARGE);

    // A bad Idempotency-Key.
    let r = s
        .call(
            Method::POST,
            "/v2/sandboxes",
            &[("x-api-key", KEY), ("idempotency-key", "Not Valid!")],
            MIN,
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);

    // Still serving.
    let sb = s.create(MIN).await;
    assert_eq!(sb["templateID"], "base");
    // Nothing was left behind by the failures.
    let list = s.api(Method::GET, "/v2/sandboxes", "").await.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

async fn hyper_chunked_post(s: &TestServer, bytes: usize) -> StatusCode {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
    let n = bytes / chunk.len();
    let stream = futures::stream::iter(
        (0..n).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let req = http::Request::post(s.url("/v2/sandboxes"))
        .header("x-api-key", KEY)
        .body(StreamBody::new(stream))
        .unwrap();
    match client.request(req).await {
        Ok(r) => r.status(),
        // The server may close the connection while the client is still sending.
        Err(_) => StatusCode::PAYLOAD_TOO_LARGE,
    }
}

/// Runs `cmd` through `process.Process/Start` via the proxy; returns (stdout, exit code).
async fn run(s: &TestServer, sb: &Value, cmd: &str) -> (String, i64) {
    let body = envelope(
        0,
        &json!({"process":{"cmd":"/bin/bash","args":["-l","-c",cmd]},"stdin":false}),
    );
    let r = s
        .envd(
            sb,
            Method::POST,
            "/process.Process/Start",
            &[
                ("content-type", "application/connect+json"),
                ("connect-protocol-version", "1"),
            ],
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.headers["content-type"], "application/connect+json",
        "the proxy must not touch the content type"
    );
    let mut buf = r.body.to_vec();
    let mut out = String::new();
    let mut code = None;
    for (flags, v) in take_envelopes(&mut buf) {
        if flags & 2 != 0 {
            assert_eq!(v, json!({}), "stream ended with an error");
            continue;
        }
        let ev = &v["event"];
        if let Some(d) = ev["data"]["stdout"].as_str() {
            use base64::Engine;
            out.push_str(&String::from_utf8_lossy(
                &base64::engine::general_purpose::STANDARD.decode(d).unwrap(),
            ));
        }
        if ev.get("end").is_some() {
            code = Some(ev["end"]["exitCode"].as_i64().unwrap_or(0));
        }
    }
    (out, code.expect("no end event"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_list_kill_round_trip() {
    create_get_list_kill_round_trip_on(Backend::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_create_get_list_kill_round_trip() {
    create_get_list_kill_round_trip_on(Backend::Qemu).await;
}

async fn create_get_list_kill_round_trip_on(backend: Backend) {
    let s = TestServer::start(Options::on(backend)).await;
    let sb = s
        .create(r#"{"templateID":"base","timeout":120,"metadata":{"owner":"t1"},"envVars":{"GREETING":"hello from env"}}"#)
        .await;
    let id = sb["sandboxID"].as_str().unwrap().to_owned();
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    );
    assert_eq!(sb["envdVersion"], firkin_server::ENVD_VERSION);
    assert_eq!(sb["clientID"], "firkin");
    let token = sb["envdAccessToken"].as_str().unwrap();
    assert_eq!(token.len(), 64);

    // The agent answers through the proxy, with the version the API reports.
    let r = s.envd(&sb, Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.headers["x-envd-version"], firkin_server::ENVD_VERSION);
    // The per-sandbox token is enforced by the agent.
    let r = s
        .call(
            Method::GET,
            "/envs",
            &[("e2b-sandbox-id", &id), ("x-access-token", "wrong")],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Env vars reached the agent through /init.
    let (out, code) = run(&s, &sb, "echo \"$GREETING\"").await;
    assert_eq!((out.as_str(), code), ("hello from env\n", 0));
    // It is one sandbox process of the backend's kind (no warm pool here)...
    assert_eq!(common::sandbox_processes(&s, backend).len(), 1);
    if backend == Backend::Qemu {
        // ...and a VM really runs the command: the guest kernel, named by /init.
        let (out, _) = run(&s, &sb, "hostname; uname -r").await;
        let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert!(out.starts_with(&format!("{id}\n")), "{out}");
        assert!(out.contains("cloud-amd64"), "guest kernel: {out}");
        assert_ne!(out.lines().nth(1), Some(host_kernel.trim()), "{out}");
    }

    let d = s.api(Method::GET, &format!("/sandboxes/{id}"), "").await;
    assert_eq!(d.status, StatusCode::OK);
    let d = d.json();
    assert_eq!(d["state"], "running");
    assert_eq!(d["metadata"], json!({"owner":"t1"}));
    assert_eq!(d["envdAccessToken"], token);
    assert_eq!(d["cpuCount"], 2);
    assert_eq!(
        d["lifecycle"],
        json!({"autoResume": false, "onTimeout": "kill"})
    );
    let started = time::OffsetDateTime::parse(
        d["startedAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let end = time::OffsetDateTime::parse(
        d["endAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((end - started).whole_seconds(), 120);

    let list = s.api(Method::GET, "/v2/sandboxes", "").await.json();
    assert_eq!(list[0]["sandboxID"], id.as_str());
    assert_eq!(list[0]["state"], "running");

    let r = s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;
    r.assert_error(StatusCode::NOT_FOUND);
    let r = s.api(Method::GET, &format!("/sandboxes/{id}"), "").await;
    r.assert_error(StatusCode::NOT_FOUND);
    let r = s.envd(&sb, Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let v = r.json();
    assert_eq!(v["code"], 502);
    assert_eq!(v["sandboxId"], id.as_str());
    assert!(v["message"].as_str().unwrap().contains("was not found"));
    // No sandbox process is left.
    eventually(
        "sandbox process exit",
        Duration::from_secs(30),
        async || common::processes_under(&s.state.join("sandboxes")).is_empty(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sandboxes_and_closed_ports_get_the_sdk_shapes() {
    let s = TestServer::start(Options::default()).await;
    for id in ["doesnotexist", "../../etc", "UPPER"] {
        let r = s
            .call(
                Method::POST,
                "/files?path=/etc/passwd",
                &[("e2b-sandbox-id", id), ("e2b-sandbox-port", "49983")],
                "x",
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{id}");
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("was not found")
        );
    }
    let sb = s.create(MIN).await;
    let id = sb["sandboxID"].as_str().unwrap();
    let r = s
        .call(
            Method::POST,
            "/execute",
            &[("e2b-sandbox-id", id), ("e2b-sandbox-port", "49999")],
            "{}",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let v = r.json();
    assert!(
        v["message"].as_str().unwrap().contains("port is not open"),
        "{v}"
    );
    // Host routing works too: {port}-{id}.{domain}.
    let host = format!("49983-{id}.sandbox.localhost");
    let r = s
        .call(
            Method::GET,
            "/health",
            &[
                ("host", &host),
                ("x-access-token", sb["envdAccessToken"].as_str().unwrap()),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_metadata_and_paginates() {
    let s = TestServer::start(Options::default()).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = json!({"templateID":"base","metadata":{"app":"a b&c=d","n":i.to_string()}});
        ids.push(
            s.create(&body.to_string()).await["sandboxID"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    s.create(r#"{"templateID":"base","metadata":{"app":"other"}}"#)
        .await;

    // Exactly what the SDK sends for metadata={"app": "a b&c=d"}.
    let sdk = "metadata=app%3Da%252520b%252526c%25253Dd";
    let all = s
        .api(Method::GET, &format!("/v2/sandboxes?{sdk}"), "")
        .await;
    let all = all.json();
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");

    let p1 = s
        .api(Method::GET, &format!("/v2/sandboxes?{sdk}&limit=2"), "")
        .await;
    let token = p1.headers["x-next-token"].to_str().unwrap().to_owned();
    let p1 = p1.json();
    assert_eq!(p1.as_array().unwrap().len(), 2);
    let p2 = s
        .api(
            Method::GET,
            &format!("/v2/sandboxes?{sdk}&limit=2&nextToken={token}"),
            "",
        )
        .await;
    assert!(p2.headers.get("x-next-token").is_none());
    let p2 = p2.json();
    assert_eq!(p2.as_array().unwrap().len(), 1);
    let mut seen: Vec<String> = p1
        .as_array()
        .unwrap()
        .iter()
        .chain(p2.as_array().unwrap())
        .map(|v| v["sandboxID"].as_str().unwrap().to_owned())
        .collect();
    // Default order is newest first.
    assert_eq!(seen[0], ids[2]);
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);

    let asc = s
        .api(Method::GET, &format!("/v2/sandboxes?{sdk}&order=asc"), "")
        .await
        .json();
    assert_eq!(asc[0]["sandboxID"], ids[0].as_str());
    let paused = s
        .api(Method::GET, "/v2/sandboxes?state=paused", "")
        .await
        .json();
    assert_eq!(paused, json!([]));
    let both = s
        .api(
            Method::GET,
            "/v2/sandboxes?state=running%2Cpaused&limit=100",
            "",
        )
        .await
        .json();
    assert_eq!(both.as_array().unwrap().len(), 4);
    let none = s
        .api(Method::GET, "/v2/sandboxes?metadata=app%3Dzzz", "")
        .await
        .json();
    assert_eq!(none, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_then_connect_resumes_with_files_intact() {
    pause_then_connect_resumes_with_files_intact_on(Backend::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_pause_then_connect_resumes_with_files_intact() {
    pause_then_connect_resumes_with_files_intact_on(Backend::Qemu).await;
}

async fn pause_then_connect_resumes_with_files_intact_on(backend: Backend) {
    let s = TestServer::start(Options::on(backend)).await;
    let sb = s.create(MIN).await;
    let id = sb["sandboxID"].as_str().unwrap().to_owned();
    let r = s
        .envd(
            &sb,
            Method::POST,
            "/files?path=note.txt",
            &[("content-type", "application/octet-stream")],
            "kept across pause",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // A VM's pause keeps its memory: a tmpfs file and the running kernel (its boot id) survive,
    // which a cold boot or a disk-only snapshot would lose.
    let vm_memory = "cat /proc/sys/kernel/random/boot_id; cat /dev/shm/marker";
    let before = if backend == Backend::Qemu {
        let (out, code) = run(&s, &sb, "echo in-ram > /dev/shm/marker").await;
        assert_eq!((out.as_str(), code), ("", 0));
        let (out, _) = run(&s, &sb, vm_memory).await;
        assert!(out.ends_with("in-ram\n"), "{out}");
        Some(out)
    } else {
        None
    };

    let r = s
        .api(Method::POST, &format!("/sandboxes/{id}/pause"), "{}")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let r = s
        .api(Method::POST, &format!("/sandboxes/{id}/pause"), "{}")
        .await;
    r.assert_error(StatusCode::CONFLICT);
    // Paused is not running: no sandbox process is left.
    eventually(
        "the paused sandbox's process to exit",
        Duration::from_secs(30),
        async || common::sandbox_processes(&s, backend).is_empty(),
    )
    .await;
    let list = s
        .api(Method::GET, "/v2/sandboxes?state=paused", "")
        .await
        .json();
    assert_eq!(list[0]["sandboxID"], id.as_str());
    assert_eq!(list[0]["state"], "paused");
    // Paused without auto-resume: the sandbox plane says "not found".
    let r = s.envd(&sb, Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("was not found")
    );
    // Metrics of a paused sandbox: none.
    let m = s
        .api(Method::GET, &format!("/sandboxes/{id}/metrics"), "")
        .await;
    assert_eq!(m.json(), json!([]));

    let c = s
        .api(
            Method::POST,
            &format!("/v2/sandboxes/{id}/connect"),
            r#"{"timeout":60}"#,
        )
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.text());
    let c = c.json();
    assert_eq!(c["envdAccessToken"], sb["envdAccessToken"]);
    let r = s
        .envd(&sb, Method::GET, "/files?path=note.txt", &[], "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "kept across pause");
    if let Some(before) = before {
        assert_eq!(run(&s, &sb, vm_memory).await.0, before);
    }
    assert_eq!(common::sandbox_processes(&s, backend).len(), 1);
    let c = s
        .api(Method::POST, &format!("/v2/sandboxes/{id}/connect"), "{}")
        .await;
    assert_eq!(c.status, StatusCode::OK);
    let d = s
        .api(Method::GET, &format!("/sandboxes/{id}"), "")
        .await
        .json();
    assert_eq!(d["state"], "running");

    // Pause again: the new continuation replaces the first (its disk no longer needs it), and
    // resumes on its own, files intact; every later pause does the same.
    let first = continuations(&s, &id);
    assert_eq!(first.len(), 1, "{first:?}");
    for round in 2..=3 {
        let r = s
            .api(Method::POST, &format!("/sandboxes/{id}/pause"), "")
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let now = continuations(&s, &id);
        assert_eq!(
            now.len(),
            1,
            "pause {round} kept earlier continuations: {now:?}"
        );
        assert!(!first.contains(&now[0]));
        if round == 3 {
            break;
        }
        let c = s
            .api(Method::POST, &format!("/v2/sandboxes/{id}/connect"), "{}")
            .await;
        assert_eq!(c.status, StatusCode::CREATED, "{}", c.text());
        let r = s
            .envd(&sb, Method::GET, "/files?path=note.txt", &[], "")
            .await;
        assert_eq!(r.text(), "kept across pause");
    }
    // Kill while paused: everything goes.
    let r = s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(!s.state.join("snapshots").join(&id).exists());
    let r = s
        .api(Method::POST, &format!("/v2/sandboxes/{id}/connect"), "{}")
        .await;
    r.assert_error(StatusCode::NOT_FOUND);
}

/// The continuation directories a sandbox has on disk.
fn continuations(s: &TestServer, id: &str) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(s.state.join("snapshots").join(id))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_resumes_an_auto_resume_sandbox() {
    traffic_resumes_an_auto_resume_sandbox_on(Backend::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_traffic_resumes_an_auto_resume_sandbox() {
    traffic_resumes_an_auto_resume_sandbox_on(Backend::Qemu).await;
}

async fn traffic_resumes_an_auto_resume_sandbox_on(backend: Backend) {
    let s = TestServer::start(Options::on(backend)).await;
    let sb = s
        .create(r#"{"templateID":"base","autoPause":true,"autoResume":{"enabled":true}}"#)
        .await;
    let id = sb["sandboxID"].as_str().unwrap().to_owned();
    let r = s
        .api(Method::POST, &format!("/sandboxes/{id}/pause"), "")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    eventually(
        "the pause to stop the sandbox",
        Duration::from_secs(30),
        async || common::sandbox_processes(&s, backend).is_empty(),
    )
    .await;
    let r = s.envd(&sb, Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(common::sandbox_processes(&s, backend).len(), 1);
    let d = s
        .api(Method::GET, &format!("/sandboxes/{id}"), "")
        .await
        .json();
    assert_eq!(d["state"], "running");
    assert_eq!(
        d["lifecycle"],
        json!({"autoResume": true, "onTimeout": "pause"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_kill_pause_and_can_be_moved() {
    timeouts_kill_pause_and_can_be_moved_on(Backend::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_timeouts_kill_pause_and_can_be_moved() {
    timeouts_kill_pause_and_can_be_moved_on(Backend::Qemu).await;
}

async fn timeouts_kill_pause_and_can_be_moved_on(backend: Backend) {
    let s = TestServer::start(Options::on(backend)).await;
    let doomed = s.create(r#"{"templateID":"base","timeout":1}"#).await;
    let paused = s
        .create(r#"{"templateID":"base","timeout":1,"autoPause":true}"#)
        .await;
    let kept = s.create(r#"{"templateID":"base","timeout":3}"#).await;
    let kept_id = kept["sandboxID"].as_str().unwrap();
    let r = s
        .api(
            Method::POST,
            &format!("/sandboxes/{kept_id}/timeout"),
            r#"{"timeout":60}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = s
        .api(
            Method::POST,
            &format!("/sandboxes/{kept_id}/timeout"),
            r#"{"timeout":-1}"#,
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
    let r = s
        .api(Method::POST, &format!("/sandboxes/{kept_id}/timeout"), "")
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
    let r = s
        .api(
            Method::POST,
            &format!("/sandboxes/{kept_id}/refreshes"),
            r#"{"duration":30}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    let doomed_id = doomed["sandboxID"].as_str().unwrap().to_owned();
    s.await_sandbox(&doomed_id, None, Duration::from_secs(30))
        .await;
    let paused_id = paused["sandboxID"].as_str().unwrap().to_owned();
    s.await_sandbox(&paused_id, Some("paused"), Duration::from_secs(30))
        .await;
    let d = s
        .api(Method::GET, &format!("/sandboxes/{kept_id}"), "")
        .await
        .json();
    assert_eq!(d["state"], "running");
    let r = s.envd(&doomed, Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    // Only `kept` still has a process: the killed and the paused ones are really stopped.
    eventually("one sandbox process", Duration::from_secs(30), async || {
        common::sandbox_processes(&s, backend).len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_come_from_the_agent() {
    metrics_come_from_the_agent_on(Backend::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_metrics_come_from_the_agent() {
    metrics_come_from_the_agent_on(Backend::Qemu).await;
}

async fn metrics_come_from_the_agent_on(backend: Backend) {
    let s = TestServer::start(Options::on(backend)).await;
    let sb = s.create(MIN).await;
    let id = sb["sandboxID"].as_str().unwrap();
    let m = s
        .api(Method::GET, &format!("/sandboxes/{id}/metrics"), "")
        .await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text());
    let m = m.json();
    let m = &m[0];
    for k in [
        "timestamp",
        "timestampUnix",
        "cpuCount",
        "cpuUsedPct",
        "memUsed",
        "memTotal",
        "memCache",
        "diskUsed",
        "diskTotal",
    ] {
        assert!(!m[k].is_null(), "{k} missing in {m}");
    }
    assert!(m["memTotal"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_make_one_sandbox() {
    let s = TestServer::start(Options::default()).await;
    let mut handles = Vec::new();
    for _ in 0..3 {
        let url = s.url("/v2/sandboxes");
        handles.push(tokio::spawn(async move {
            let c = common::client();
            let req = http::Request::post(url)
                .header("x-api-key", KEY)
                .header("idempotency-key", "retry-1")
                .body(http_body_util::Full::new(bytes::Bytes::from(MIN)))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::CREATED);
            use http_body_util::BodyExt;
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<Value>(&b).unwrap()["sandboxID"].clone()
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    let list = s.api(Method::GET, "/v2/sandboxes", "").await.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_host_refuses_fast_with_429() {
    let s = TestServer::start(Options {
        slots: 1,
        max_pending: 0,
        ..Options::default()
    })
    .await;
    s.create(MIN).await;
    let begun = std::time::Instant::now();
    let r = s.api(Method::POST, "/v2/sandboxes", MIN).await;
    r.assert_error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers["should-retry"], "true");
    assert!(r.headers.contains_key("retry-after"));
    // "Fast": no waiting for capacity (a generous bound, not a benchmark).
    assert!(begun.elapsed() < Duration::from_secs(5));
    let list = s.api(Method::GET, "/v2/sandboxes", "").await.json();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "the refused create left nothing"
    );
}

/// `GET /firkin/v1/status` reports each warm pool: filled when its refills work, failing with
/// the launcher's error (and backing off) when they do not, while the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_whether_warm_pools_fill_or_fail() {
    async fn pool_where(s: &TestServer, done: impl Fn(&Value) -> bool) -> Value {
        let mut status = Value::Null;
        eventually(
            "the warm pool's state",
            Duration::from_secs(30),
            async || {
                let r = s.api(Method::GET, "/firkin/v1/status", "").await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                status = r.json();
                done(&status["warmPool"][0])
            },
        )
        .await;
        assert_eq!(status["warmPool"].as_array().unwrap().len(), 1, "{status}");
        assert!(
            status["capacity"]["cpuCount"].as_u64().unwrap() > 0,
            "{status}"
        );
        status["warmPool"][0].clone()
    }

    let healthy = TestServer::start(Options {
        warm: 1,
        ..Options::default()
    })
    .await;
    let pool = pool_where(&healthy, |p| p["ready"] == 1).await;
    assert_eq!(pool["templateID"], "base");
    assert_eq!(pool["target"], 1);
    assert_eq!(pool["state"], "ok", "{pool}");
    assert!(pool.get("error").is_none(), "{pool}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-envd");
    let broken = TestServer::start(Options {
        warm: 1,
        envd_bin: Some(missing),
        ..Options::default()
    })
    .await;
    let pool = pool_where(&broken, |p| p["state"] == "failing").await;
    assert_eq!(pool["templateID"], "base");
    assert_eq!((&pool["target"], &pool["ready"]), (&json!(1), &json!(0)));
    let error = pool["error"].as_str().unwrap();
    assert!(error.contains("no-such-envd"), "{pool}");
    assert!(pool["consecutiveFailures"].as_u64().unwrap() >= 1, "{pool}");
    assert!(pool["nextRetryInMs"].as_u64().unwrap() <= 300_000, "{pool}");
    let since = pool["failingSince"].as_str().unwrap();
    time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("failingSince {since:?}: {e}"));
    // A backing-off pool does not get in the way of an explicit create's own error.
    let r = broken.api(Method::POST, "/v2/sandboxes", MIN).await;
    assert!(r.status.is_server_error(), "{}", r.text());
    let status = broken
        .api(Method::GET, "/firkin/v1/status", "")
        .await
        .json();
    assert_eq!(status["running"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_dies_disappears() {
    a_vm_that_dies_disappears_on(Backend::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_a_vm_that_dies_disappears() {
    a_vm_that_dies_disappears_on(Backend::Qemu).await;
}

async fn a_vm_that_dies_disappears_on(backend: Backend) {
    let s = TestServer::start(Options::on(backend)).await;
    let sb = s.create(MIN).await;
    let id = sb["sandboxID"].as_str().unwrap().to_owned();
    let pids = common::sandbox_processes(&s, backend);
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert!(firkin_server::procfs::kill_pid(pids[0]));
    eventually(
        "the dead sandbox to be forgotten",
        Duration::from_secs(30),
        async || {
            s.api(Method::GET, &format!("/sandboxes/{id}"), "")
                .await
                .status
                == StatusCode::NOT_FOUND
        },
    )
    .await;
    let list = s.api(Method::GET, "/v2/sandboxes", "").await.json();
    assert_eq!(list, json!([]));
    let r = s.envd(&sb, Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    // Its capacity came back: a new sandbox starts and answers.
    let fresh = s.create(MIN).await;
    let (out, code) = run(&s, &fresh, "echo again").await;
    assert_eq!((out.as_str(), code), ("again\n", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_build_list_and_delete() {
    let s = TestServer::start(Options::default()).await;
    let t = s.api(Method::GET, "/templates", "").await.json();
    assert_eq!(t[0]["templateID"], "base");
    assert_eq!(t[0]["buildStatus"], "ready");
    let r = s
        .api(
            Method::POST,
            "/firkin/v1/templates",
            r#"{"templateID":"tools","cpuCount":1,"memoryMB":256,"commands":["true"]}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let build = r.json()["buildID"].as_str().unwrap().to_owned();
    eventually("the build", Duration::from_secs(10), async || {
        s.api(
            Method::GET,
            &format!("/firkin/v1/templates/tools/builds/{build}?logsOffset=0"),
            "",
        )
        .await
        .json()["status"]
            == "ready"
    })
    .await;
    let r = s
        .api(
            Method::POST,
            "/firkin/v1/templates",
            r#"{"templateID":"tools"}"#,
        )
        .await;
    r.assert_error(StatusCode::CONFLICT);
    let r = s
        .api(
            Method::POST,
            "/firkin/v1/templates",
            r#"{"templateID":"tools","cpuCount":0}"#,
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
    let sb = s.create(r#"{"templateID":"tools"}"#).await;
    assert_eq!(sb["templateID"], "tools");
    let r = s
        .api(Method::DELETE, "/firkin/v1/templates/tools", "")
        .await;
    r.assert_error(StatusCode::CONFLICT);
    let id = sb["sandboxID"].as_str().unwrap();
    s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;
    let r = s
        .api(Method::DELETE, "/firkin/v1/templates/tools", "")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert!(!s.cache.join("templates").join("tools").exists());
    let r = s
        .api(Method::POST, "/v2/sandboxes", r#"{"templateID":"tools"}"#)
        .await;
    r.assert_error(StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_is_not_replayed_for_its_idempotency_key() {
    let s = TestServer::start(Options {
        slots: 1,
        max_pending: 0,
        ..Options::default()
    })
    .await;
    let first = s.create(MIN).await;
    async fn keyed(s: &TestServer) -> common::Reply {
        s.call(
            Method::POST,
            "/v2/sandboxes",
            &[("x-api-key", KEY), ("idempotency-key", "after-429")],
            MIN,
        )
        .await
    }
    keyed(&s).await.assert_error(StatusCode::TOO_MANY_REQUESTS);
    let id = first["sandboxID"].as_str().unwrap();
    s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;
    let r = keyed(&s).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let again = keyed(&s).await;
    assert_eq!(again.json()["sandboxID"], r.json()["sandboxID"]);
}
