//! `GET /templates/{t}/files/{hash}` and the upload url it answers, as E2B's SDKs use them for
//! a template's COPY steps (issue 14): absent, uploaded (gzip, no Content-Encoding) with exactly
//! the answered headers, then present; bad uploads are 4xx and leave it absent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write as _;

use common::{KEY, Options, TestServer};
use http::{Method, StatusCode};
use serde_json::Value;

fn tar_gz(path: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Regular);
    let name = h.as_old_mut().name.as_mut();
    name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_cksum();
    b.append(&h, data).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

async fn lookup(s: &TestServer, hash: &str) -> Value {
    let r = s
        .api(Method::GET, &format!("/templates/web/files/{hash}"), "")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    r.json()
}

/// PUTs `body` to the answered url with exactly the answered headers, as the SDK does.
async fn upload(s: &TestServer, answer: &Value, body: Vec<u8>) -> common::Reply {
    let url = answer["url"].as_str().unwrap();
    let path = url
        .strip_prefix(&format!("http://{}", s.addr))
        .unwrap_or_else(|| panic!("upload url {url} is not this server's"));
    let headers: Vec<(String, String)> = answer["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    s.call(Method::PUT, path, &refs, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_files_are_looked_up_uploaded_and_then_present() {
    let s = TestServer::start(Options::default()).await;
    let hash = "ab".repeat(32);
    let first = lookup(&s, &hash).await;
    assert_eq!(first["present"], false, "{first}");
    assert_eq!(first["headers"]["X-API-KEY"], KEY);

    let r = upload(&s, &first, tar_gz("app/run.sh", b"#!/bin/sh\necho hi\n")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(lookup(&s, &hash).await["present"], true);

    // Without the key the upload url is closed like the rest of the API.
    let bare = s
        .call(
            Method::PUT,
            &format!("/firkin/v1/build-files/{}", "cd".repeat(32)),
            &[],
            vec![],
        )
        .await;
    assert_eq!(bare.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_tars_and_bad_hashes_are_refused_and_stay_absent() {
    let s = TestServer::start(Options::default()).await;
    let hash = "ef".repeat(32);
    let answer = lookup(&s, &hash).await;
    let r = upload(
        &s,
        &answer,
        tar_gz("../../etc/cron.d/x", b"* * * * * root id\n"),
    )
    .await;
    let message = r.assert_error(StatusCode::BAD_REQUEST);
    assert!(message.contains("outside the build context"), "{message}");
    assert_eq!(lookup(&s, &hash).await["present"], false);

    let r = s
        .api(Method::GET, "/templates/web/files/not-a-hash", "")
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
}
