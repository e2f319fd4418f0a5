//! /health, /init, /envs, /metrics and /files.

use std::os::unix::fs::MetadataExt;

use bytes::Bytes;
use firkin_e2b_wire::file_signature::{self, SigningOp};
use firkin_envd::client::Client;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::*;

#[tokio::test]
async fn health_is_open_even_with_a_token() {
    let a = Agent::with_token().await;
    let (status, headers, body) = get(&a.anon, "/health").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["x-envd-version"], "0.6.4");
    assert!(body.is_empty());
}

#[tokio::test]
async fn token_is_enforced_everywhere_but_health() {
    let a = Agent::with_token().await;
    let wrong = Client::new(&a.url).unwrap().with_token("wrong");
    for client in [&a.anon, &wrong] {
        for (method, path) in [
            (Method::GET, "/envs"),
            (Method::GET, "/metrics"),
            (Method::GET, "/files?path=/etc/hostname"),
            (Method::POST, "/process.Process/List"),
            (Method::POST, "/filesystem.Filesystem/Stat"),
        ] {
            let (status, headers, body) = send(
                client,
                method.clone(),
                path,
                &[("content-type", "application/json")],
                "{}",
            )
            .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(headers["content-type"], "application/json");
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["code"], 401, "{v}");
            assert!(v["message"].as_str().unwrap().contains("token"));
        }
    }
    let (status, _, body) = get(&a.client, "/envs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"SANDBOX_VAR": "from-init"})
    );
}

#[tokio::test]
async fn init_with_a_token_set_needs_that_token_and_can_rotate_it() {
    let a = Agent::with_token().await;
    // Without the current token nobody may take the agent over.
    let err = a
        .anon
        .init(&json!({"accessToken": "mine"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    a.client.health().await.unwrap();
    let (status, _, _) = get(&a.client, "/envs").await;
    assert_eq!(status, StatusCode::OK);
    // With it, the token can be rotated.
    a.client
        .init(&json!({"accessToken": "rotated"}))
        .await
        .unwrap();
    let (status, _, _) = get(&a.client, "/envs").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let rotated = a.anon.clone().with_token("rotated");
    let (status, _, _) = get(&rotated, "/envs").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn init_answers_204_with_version_and_rejects_bad_input_without_changes() {
    let a = Agent::start();
    let (status, headers, _) = send(&a.anon, Method::POST, "/init", &[], "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["x-envd-version"], "0.6.4");

    for bad in [
        "{not json".to_owned(),
        json!({"timestamp": "yesterday", "accessToken": "t"}).to_string(),
        json!({"entropy": "***", "accessToken": "t"}).to_string(),
        json!({"defaultUser": "no-such-user-firkin", "accessToken": "t"}).to_string(),
        json!({"envVars": ["not", "an", "object"]}).to_string(),
    ] {
        let (status, _, body) = send(&a.anon, Method::POST, "/init", &[], bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], 400);
    }
    // None of the rejected requests set the token.
    let (status, _, _) = get(&a.anon, "/envs").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn init_sets_env_defaults_timestamp_and_entropy() {
    let a = Agent::start();
    let dir = scratch();
    a.anon
        .init(&json!({
            "envVars": {"A": "1", "B": "2"},
            "timestamp": "2030-01-02T03:04:05.123Z",
            "defaultWorkdir": dir.path(),
            "entropy": b64(&[7u8; 64]),
            "hostname": "ignored-in-host-mode",
        }))
        .await
        .unwrap();
    a.anon.init(&json!({"envVars": {"B": "3"}})).await.unwrap();
    let out = a.anon.run("echo $A$B; pwd; hostname").await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("13"));
    assert_eq!(lines.next(), Some(dir.path().to_str().unwrap()));
    // Host mode never changes the machine's hostname or clock.
    assert_ne!(lines.next(), Some("ignored-in-host-mode"));
    let year = a.anon.run("date -u +%Y").await.unwrap();
    assert_ne!(String::from_utf8(year.stdout).unwrap().trim(), "2030");
}

/// What the code interpreter reads before each run: the sandbox's name and env vars, written
/// before `/init` answers, its lock free once the set-up (reseed, rename) is done, and not
/// rewritten by an `/init` that changes neither (a resume).
#[tokio::test]
async fn init_publishes_the_sandbox_state_for_services_inside() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = scratch();
    let file = dir.path().join("run/sandbox.json");
    let a = Agent::start_with(&["--sandbox-state", file.to_str().unwrap()]);
    a.anon.init(&json!({"accessToken": ""})).await.unwrap();
    assert!(!file.exists(), "nothing to publish yet, nothing written");

    let first = json!({"envVars": {"A": "1"}, "hostname": "sbx-1", "entropy": b64(&[1u8; 32])});
    a.anon.init(&first).await.unwrap();
    let read = || serde_json::from_slice::<Value>(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(read(), json!({"sandbox": "sbx-1", "envVars": {"A": "1"}}));
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let lock = std::fs::File::open(dir.path().join("run/sandbox.lock")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut lock = Some(lock);
    loop {
        let f = lock.take().unwrap();
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock) {
            Ok(_) => break,
            Err((f, _)) if std::time::Instant::now() < deadline => {
                lock = Some(f);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err((_, e)) => panic!("the set-up lock stayed held: {e}"),
        }
    }

    // A resume's /init: the same name and env, fresh entropy. Nothing to tell.
    let resume = json!({"envVars": {"A": "1"}, "hostname": "sbx-1", "entropy": b64(&[2u8; 32])});
    a.anon.init(&resume).await.unwrap();
    assert_eq!(
        std::fs::metadata(&file).unwrap().ino(),
        meta.ino(),
        "rewritten"
    );

    a.anon.init(&json!({"envVars": {"B": "2"}})).await.unwrap();
    assert_eq!(
        read(),
        json!({"sandbox": "sbx-1", "envVars": {"A": "1", "B": "2"}})
    );
}

#[tokio::test]
async fn metrics_report_cpu_memory_and_disk() {
    let a = Agent::start();
    let (status, _, body) = get(&a.anon, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    for key in [
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total",
        "mem_used",
        "mem_cache",
        "mem_total_mib",
        "mem_used_mib",
        "disk_used",
        "disk_total",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert!(v["mem_total"].as_u64().unwrap() > v["mem_used"].as_u64().unwrap());
    assert!(v["disk_total"].as_u64().unwrap() > 0);
    assert!(v["cpu_count"].as_u64().unwrap() >= 1);
}

/// `POST /files` of a multipart form, as the SDK uploads several files.
async fn upload_multipart(c: &Client, parts: &[(&str, &str, &[u8])]) -> (StatusCode, Bytes) {
    let boundary = "firkin-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: text/plain\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let (status, _, resp) = send(c, Method::POST, "/files", &[("content-type", &ct)], body).await;
    (status, resp)
}

#[tokio::test]
async fn files_multipart_uses_the_raw_filename_as_full_path() {
    let a = Agent::with_token().await;
    let dir = scratch();
    let p1 = dir.path().join("a/b/one.txt");
    let p2 = dir.path().join("two \"quoted\".txt");
    let escaped = p2.to_str().unwrap().replace('"', "%22");
    let (status, resp) = upload_multipart(
        &a.client,
        &[
            ("file", p1.to_str().unwrap(), b"first"),
            ("other", "/tmp/ignored", b"skip me"),
            ("file", &escaped, b"second"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    let v: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(
        v,
        json!([
            {"name": "one.txt", "type": "file", "path": p1},
            {"name": "two \"quoted\".txt", "type": "file", "path": p2},
        ])
    );
    assert_eq!(std::fs::read(&p1).unwrap(), b"first");
    assert_eq!(std::fs::read(&p2).unwrap(), b"second");
    assert!(
        !std::path::Path::new("/tmp/ignored").exists()
            || std::fs::read("/tmp/ignored").unwrap() != b"skip me"
    );

    // Two parts for one path is a client error.
    let (status, _) = upload_multipart(
        &a.client,
        &[
            ("file", p1.to_str().unwrap(), b"x"),
            ("file", p1.to_str().unwrap(), b"y"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn files_raw_gzip_download_and_errors() {
    let a = Agent::with_token().await;
    let dir = scratch();
    let path = dir.path().join("raw.bin");
    let q = format!("/files?path={}", path.display());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (status, _, resp) = send(
        &a.client,
        Method::POST,
        &q,
        &[
            ("content-type", "application/octet-stream"),
            ("x-metadata-Owner-Team", "infra"),
        ],
        data.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    let v: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(v[0]["path"], path.to_str().unwrap());
    let (status, headers, body) = get(&a.client, &q).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], data.len().to_string().as_str());
    assert_eq!(body.as_ref(), data.as_slice());

    // gzip-encoded body.
    let gz_path = dir.path().join("gz.txt");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, b"unzipped text").unwrap();
    let gz = enc.finish().unwrap();
    let (status, _, _) = send(
        &a.client,
        Method::POST,
        &format!("/files?path={}", gz_path.display()),
        &[
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
        ],
        gz,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(std::fs::read(&gz_path).unwrap(), b"unzipped text");

    // Corrupt gzip, missing path, directory, missing file, unknown user.
    for (method, path, ct, body, want) in [
        (
            Method::POST,
            format!("/files?path={}", gz_path.display()),
            "application/octet-stream",
            b"not gzip".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/files".to_owned(),
            "application/octet-stream",
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            format!("/files?path={}", dir.path().display()),
            "application/octet-stream",
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            format!("/files?path={}", path.display()),
            "text/plain",
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            format!("/files?path={}", dir.path().display()),
            "",
            vec![],
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            format!("/files?path={}/missing", dir.path().display()),
            "",
            vec![],
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            format!(
                "/files?path={}&username=no-such-user-firkin",
                path.display()
            ),
            "",
            vec![],
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        let mut headers = vec![];
        if !ct.is_empty() {
            headers.push(("content-type", ct));
        }
        if path.contains("gz.txt") {
            headers.push(("content-encoding", "gzip"));
        }
        let (status, _, resp) = send(&a.client, method.clone(), &path, &headers, body).await;
        assert_eq!(
            status,
            want,
            "{method} {path}: {}",
            String::from_utf8_lossy(&resp)
        );
        let v: Value = serde_json::from_slice(&resp).unwrap();
        assert_eq!(v["code"], want.as_u16());
    }
}

#[tokio::test]
async fn files_signed_urls_are_verified() {
    let a = Agent::with_token().await;
    let dir = scratch();
    let path = dir.path().join("s.txt");
    std::fs::write(&path, "signed").unwrap();
    let p = path.to_str().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (past, future) = ((now - 5).to_string(), (now + 60).to_string());
    let read = signed_url(p, p, SigningOp::Read, None);
    let (status, _, body) = get(&a.anon, &read).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_ref(), b"signed");
    for (what, method, url, want) in [
        (
            "read-signed write",
            Method::POST,
            read.clone(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "another path",
            Method::GET,
            signed_url(&format!("{p}x"), p, SigningOp::Read, None),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "expired",
            Method::GET,
            signed_url(p, p, SigningOp::Read, Some(&past)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "write-signed write",
            Method::POST,
            signed_url(p, p, SigningOp::Write, Some(&future)),
            StatusCode::OK,
        ),
    ] {
        let headers = [("content-type", "application/octet-stream")];
        let (status, _, _) = send(&a.anon, method, &url, &headers, "rewritten").await;
        assert_eq!(status, want, "{what}");
        let now = std::fs::read(&path).unwrap();
        let changed = want == StatusCode::OK;
        assert_eq!(now == b"rewritten", changed, "{what}");
    }
}

/// A `/files` URL for `path`, carrying a signature made for `signed_path`.
fn signed_url(path: &str, signed_path: &str, op: SigningOp, expires: Option<&str>) -> String {
    let sig = urlencode(&file_signature::sign(signed_path, op, "", TOKEN, expires));
    match expires {
        None => format!("/files?path={path}&signature={sig}"),
        Some(e) => format!("/files?path={path}&signature={sig}&signature_expiration={e}"),
    }
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

#[tokio::test]
async fn files_as_user_get_its_ownership_and_its_permissions() {
    let Some(a) = root_agent().await else {
        return;
    };
    let dir = format!("/home/user/firkin-envd-test-{}", std::process::id());
    let path = format!("{dir}/sub/owned.txt");
    let (status, _, _) = upload(
        &a.client,
        &format!("/files?path={path}&username=user"),
        "mine",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let user = firkin_envd::users::AccountDb::default()
        .by_name("user")
        .unwrap();
    for p in [path.as_str(), &format!("{dir}/sub"), dir.as_str()] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!((m.uid(), m.gid()), (user.uid, user.gid), "{p}");
    }
    // `user` may neither write into /root nor read root-only files.
    let (status, _, body) = upload(
        &a.client,
        "/files?path=/root/firkin-denied.txt&username=user",
        "no",
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(!std::path::Path::new("/root/firkin-denied.txt").exists());
    let (status, _, _) = get(&a.client, "/files?path=/etc/shadow&username=user").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Relative paths resolve against the user's home.
    let (status, _, body) = get(
        &a.client,
        &format!(
            "/files?path=firkin-envd-test-{}/sub/owned.txt&username=user",
            std::process::id()
        ),
    )
    .await;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, b"mine".as_ref()));
    std::fs::remove_dir_all(&dir).unwrap();
    a.client.health().await.unwrap();
}
