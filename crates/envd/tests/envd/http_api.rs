//! /health, /init, /envs, /metrics and /files.

use std::os::unix::fs::MetadataExt;

use firkin_envd::client::{Client, full};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::*;

#[tokio::test]
async fn health_is_open_even_with_a_token() {
    let a = Agent::with_token().await;
    let (status, headers, body) = a
        .anon
        .fetch(Method::GET, "/health", &[], full(""))
        .await
        .unwrap();
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
            let (status, headers, body) = client
                .fetch(
                    method.clone(),
                    path,
                    &[("content-type", "application/json")],
                    full("{}"),
                )
                .await
                .unwrap();
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(headers["content-type"], "application/json");
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["code"], 401, "{v}");
            assert!(v["message"].as_str().unwrap().contains("token"));
        }
    }
    let (status, _, body) = a
        .client
        .fetch(Method::GET, "/envs", &[], full(""))
        .await
        .unwrap();
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
    let (status, _, _) = a
        .client
        .fetch(Method::GET, "/envs", &[], full(""))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    // With it, the token can be rotated.
    a.client
        .init(&json!({"accessToken": "rotated"}))
        .await
        .unwrap();
    let (status, _, _) = a
        .client
        .fetch(Method::GET, "/envs", &[], full(""))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let rotated = a.anon.clone().with_token("rotated");
    let (status, _, _) = rotated
        .fetch(Method::GET, "/envs", &[], full(""))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn init_answers_204_with_version_and_rejects_bad_input_without_changes() {
    let a = Agent::start();
    let (status, headers, _) = a
        .anon
        .fetch(Method::POST, "/init", &[], full(""))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["x-envd-version"], "0.6.4");

    for bad in [
        "{not json".to_owned(),
        json!({"timestamp": "yesterday", "accessToken": "t"}).to_string(),
        json!({"entropy": "***", "accessToken": "t"}).to_string(),
        json!({"defaultUser": "no-such-user-firkin", "accessToken": "t"}).to_string(),
        json!({"envVars": ["not", "an", "object"]}).to_string(),
    ] {
        let (status, _, body) = a
            .anon
            .fetch(Method::POST, "/init", &[], full(bad.clone()))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], 400);
    }
    // None of the rejected requests set the token.
    let (status, _, _) = a
        .anon
        .fetch(Method::GET, "/envs", &[], full(""))
        .await
        .unwrap();
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

#[tokio::test]
async fn metrics_report_cpu_memory_and_disk() {
    let a = Agent::start();
    let (status, _, body) = a
        .anon
        .fetch(Method::GET, "/metrics", &[], full(""))
        .await
        .unwrap();
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

fn multipart(parts: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
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
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn files_multipart_uses_the_raw_filename_as_full_path() {
    let a = Agent::with_token().await;
    let dir = scratch();
    let p1 = dir.path().join("a/b/one.txt");
    let p2 = dir.path().join("two \"quoted\".txt");
    let escaped = p2.to_str().unwrap().replace('"', "%22");
    let (ct, body) = multipart(&[
        ("file", p1.to_str().unwrap(), b"first"),
        ("other", "/tmp/ignored", b"skip me"),
        ("file", &escaped, b"second"),
    ]);
    let (status, _, resp) = a
        .client
        .fetch(Method::POST, "/files", &[("content-type", &ct)], full(body))
        .await
        .unwrap();
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
    let (ct, body) = multipart(&[
        ("file", p1.to_str().unwrap(), b"x"),
        ("file", p1.to_str().unwrap(), b"y"),
    ]);
    let (status, _, _) = a
        .client
        .fetch(Method::POST, "/files", &[("content-type", &ct)], full(body))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn files_raw_gzip_download_and_errors() {
    let a = Agent::with_token().await;
    let dir = scratch();
    let path = dir.path().join("raw.bin");
    let q = format!("/files?path={}", path.display());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (status, _, resp) = a
        .client
        .fetch(
            Method::POST,
            &q,
            &[
                ("content-type", "application/octet-stream"),
                ("x-metadata-Owner-Team", "infra"),
            ],
            full(data.clone()),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    let v: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(v[0]["path"], path.to_str().unwrap());
    let (status, headers, body) = a
        .client
        .fetch(Method::GET, &q, &[], full(""))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], data.len().to_string().as_str());
    assert_eq!(body.as_ref(), data.as_slice());

    // gzip-encoded body.
    let gz_path = dir.path().join("gz.txt");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, b"unzipped text").unwrap();
    let gz = enc.finish().unwrap();
    let (status, _, _) = a
        .client
        .fetch(
            Method::POST,
            &format!("/files?path={}", gz_path.display()),
            &[
                ("content-type", "application/octet-stream"),
                ("content-encoding", "gzip"),
            ],
            full(gz),
        )
        .await
        .unwrap();
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
        let (status, _, resp) = a
            .client
            .fetch(method.clone(), &path, &headers, full(body))
            .await
            .unwrap();
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
    let sig = firkin_envd::http::files::sign(
        p,
        firkin_envd::http::files::SigningOp::Read,
        "",
        TOKEN,
        None,
    );
    let url = format!("/files?path={p}&signature={}", urlencode(&sig));
    let (status, _, body) = a
        .anon
        .fetch(Method::GET, &url, &[], full(""))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_ref(), b"signed");
    // Signed for reading, so not for writing.
    let (status, _, _) = a
        .anon
        .fetch(
            Method::POST,
            &url,
            &[("content-type", "application/octet-stream")],
            full("x"),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Another path, or an expired signature.
    let other = format!("/files?path={p}x&signature={}", urlencode(&sig));
    let (status, _, _) = a
        .anon
        .fetch(Method::GET, &other, &[], full(""))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let past = (time::OffsetDateTime::now_utc().unix_timestamp() - 5).to_string();
    let sig = firkin_envd::http::files::sign(
        p,
        firkin_envd::http::files::SigningOp::Read,
        "",
        TOKEN,
        Some(&past),
    );
    let url = format!(
        "/files?path={p}&signature={}&signature_expiration={past}",
        urlencode(&sig)
    );
    let (status, _, _) = a
        .anon
        .fetch(Method::GET, &url, &[], full(""))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let future = (time::OffsetDateTime::now_utc().unix_timestamp() + 60).to_string();
    let sig = firkin_envd::http::files::sign(
        p,
        firkin_envd::http::files::SigningOp::Write,
        "",
        TOKEN,
        Some(&future),
    );
    let url = format!(
        "/files?path={p}&signature={}&signature_expiration={future}",
        urlencode(&sig)
    );
    let (status, _, _) = a
        .anon
        .fetch(
            Method::POST,
            &url,
            &[("content-type", "application/octet-stream")],
            full("rewritten"),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(std::fs::read(&path).unwrap(), b"rewritten");
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

#[tokio::test]
async fn files_as_user_get_its_ownership_and_its_permissions() {
    if !is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    ensure_user();
    let a = Agent::with_token().await;
    let dir = format!("/home/user/firkin-envd-test-{}", std::process::id());
    let path = format!("{dir}/sub/owned.txt");
    let (status, _, _) = a
        .client
        .fetch(
            Method::POST,
            &format!("/files?path={path}&username=user"),
            &[("content-type", "application/octet-stream")],
            full("mine"),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let user = firkin_envd::users::AccountDb::default()
        .by_name("user")
        .unwrap();
    for p in [path.as_str(), &format!("{dir}/sub"), dir.as_str()] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!((m.uid(), m.gid()), (user.uid, user.gid), "{p}");
    }
    // `user` may neither write into /root nor read root-only files.
    let (status, _, body) = a
        .client
        .fetch(
            Method::POST,
            "/files?path=/root/firkin-denied.txt&username=user",
            &[("content-type", "application/octet-stream")],
            full("no"),
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(!std::path::Path::new("/root/firkin-denied.txt").exists());
    let (status, _, _) = a
        .client
        .fetch(
            Method::GET,
            "/files?path=/etc/shadow&username=user",
            &[],
            full(""),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Relative paths resolve against the user's home.
    let (status, _, body) = a
        .client
        .fetch(
            Method::GET,
            &format!(
                "/files?path=firkin-envd-test-{}/sub/owned.txt&username=user",
                std::process::id()
            ),
            &[],
            full(""),
        )
        .await
        .unwrap();
    assert_eq!((status, body.as_ref()), (StatusCode::OK, b"mine".as_ref()));
    std::fs::remove_dir_all(&dir).unwrap();
    a.client.health().await.unwrap();
}
