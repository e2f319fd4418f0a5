//! E2B behaviours the SDK relies on in the details (issue 18), one test each. The process
//! backend runs real agents; tests/sdk/test_serve.py drives the same through the SDK on real VMs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Options, TestServer, eventually};
use firkin_e2b_wire::file_signature::{SigningOp, sign};
use http::{Method, StatusCode};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_timeout_expires_the_sandbox_now() {
    let s = TestServer::start(Options::default()).await;
    let killed = s.create(r#"{"templateID":"base","timeout":300}"#).await;
    let paused = s
        .create(r#"{"templateID":"base","timeout":300,"autoPause":true}"#)
        .await;
    for sb in [&killed, &paused] {
        let id = sb["sandboxID"].as_str().unwrap();
        let r = s
            .api(
                Method::POST,
                &format!("/sandboxes/{id}/timeout"),
                r#"{"timeout":0}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    }
    let killed_id = killed["sandboxID"].as_str().unwrap();
    s.await_sandbox(killed_id, None, Duration::from_secs(20))
        .await;
    let paused_id = paused["sandboxID"].as_str().unwrap();
    s.await_sandbox(paused_id, Some("paused"), Duration::from_secs(30))
        .await;
    // A resume gets the lifetime the sandbox had, not the zero that expired it.
    let c = s
        .api(
            Method::POST,
            &format!("/v2/sandboxes/{paused_id}/connect"),
            "{}",
        )
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.text());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = s
        .api(Method::GET, &format!("/sandboxes/{paused_id}"), "")
        .await
        .json();
    assert_eq!(d["state"], "running", "{d}");
    let r = s
        .api(
            Method::POST,
            &format!("/sandboxes/{paused_id}/timeout"),
            r#"{"timeout":-1}"#,
        )
        .await;
    assert!(
        r.assert_error(StatusCode::BAD_REQUEST)
            .contains("between 0 and")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_keep_a_history_that_start_and_end_select() {
    let s = TestServer::start(Options::default()).await;
    let sb = s.create(r#"{"templateID":"base"}"#).await;
    let id = sb["sandboxID"].as_str().unwrap();
    // A second sandbox nobody asks about until the end: the sweep leaves it alone.
    let unasked = s.create(r#"{"templateID":"base"}"#).await;
    let unasked = unasked["sandboxID"].as_str().unwrap();
    let metrics = async |query: &str| {
        s.api(Method::GET, &format!("/sandboxes/{id}/metrics{query}"), "")
            .await
    };
    // Right after create: one sample, taken on request.
    let first = metrics("").await.json();
    assert_eq!(first.as_array().unwrap().len(), 1, "{first}");
    let t0 = first[0]["timestampUnix"].as_i64().unwrap();
    // The sweep adds one every 5 s.
    eventually("a second sample", Duration::from_secs(20), async || {
        metrics("").await.json().as_array().unwrap().len() >= 2
    })
    .await;
    let all = metrics("").await.json();
    let stamps: Vec<i64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["timestampUnix"].as_i64().unwrap())
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    assert_eq!(
        metrics(&format!("?start={t0}&end={t0}")).await.json(),
        json!([first[0]])
    );
    let later = metrics(&format!("?start={}", t0 + 1)).await.json();
    assert!(!later.as_array().unwrap().is_empty());
    assert!(!later.as_array().unwrap().contains(&first[0]));
    // Before the sandbox existed: nothing.
    let before = format!("?start={}&end={}", t0 - 7200, t0 - 3600);
    assert_eq!(metrics(&before).await.json(), json!([]));
    metrics(&format!("?start={t0}&end={}", t0 - 1))
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    metrics("?start=yesterday")
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    // Sweeps have run meanwhile, but woke only the sandbox whose metrics were asked for.
    let only = s
        .api(Method::GET, &format!("/sandboxes/{unasked}/metrics"), "")
        .await
        .json();
    assert_eq!(only.as_array().unwrap().len(), 1, "{only}");
}

fn signed(path: &str, op: SigningOp, token: &str) -> String {
    let sig = sign(path, op, "", token, None);
    format!(
        "/files?path={}&signature={}",
        utf8_percent_encode(path, NON_ALPHANUMERIC),
        utf8_percent_encode(&sig, NON_ALPHANUMERIC)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_file_urls_find_their_sandbox_without_headers() {
    let s = TestServer::start(Options::default()).await;
    // Two sandboxes: the signature, not the order, picks the right one.
    let other = s.create(r#"{"templateID":"base"}"#).await;
    let sb = s.create(r#"{"templateID":"base"}"#).await;
    let token = |v: &Value| v["envdAccessToken"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signed.txt");
    let path = path.to_str().unwrap();

    let up = signed(path, SigningOp::Write, &token(&sb));
    let ct = [("content-type", "application/octet-stream")];
    let r = s.call(Method::POST, &up, &ct, "signed upload").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let down = signed(path, SigningOp::Read, &token(&sb));
    let r = s.call(Method::GET, &down, &[], "").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "signed upload")
    );

    // The other sandbox's token signs for the other sandbox only.
    let r = s
        .call(
            Method::GET,
            &signed("/nope", SigningOp::Read, &token(&other)),
            &[],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    // A read URL does not upload; a signature nobody made is E2B's JSON 401.
    s.call(Method::POST, &down, &ct, "x")
        .await
        .assert_error(StatusCode::UNAUTHORIZED);
    s.call(
        Method::GET,
        &down.replace("signature=v1", "signature=v2"),
        &[],
        "",
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED);
    // Unsigned and without a sandbox: still the control plane's 404.
    s.call(Method::GET, "/files?path=/etc/hostname", &[], "")
        .await
        .assert_error(StatusCode::NOT_FOUND);
}
