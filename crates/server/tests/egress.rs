//! Egress policies through the control plane (create's `allow_internet_access`/`network` and
//! `PUT /sandboxes/{id}/network`) on the process backend, which has no network per sandbox.
//!
//! With `egress_control` off (how a process or user-networking server runs) every policy is
//! refused with 400 before anything is reserved. With it on, the server's checks pass and the
//! policy reaches the runtime, whose process backend refuses it: that makes visible, without
//! a test double, that create and resume hand the policy to the runtime and that a running
//! sandbox's PUT is applied before it is recorded. Real enforcement is the VM tests' business.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Options, TestServer, eventually};
use http::{Method, StatusCode};
use serde_json::{Value, json};

const NO_NETWORKS: &str = "without a network of its own per sandbox";

async fn status(s: &TestServer) -> Value {
    let r = s.api(Method::GET, "/firkin/v1/status", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

/// Nothing recorded, nothing running, no capacity held.
async fn assert_nothing_left(s: &TestServer) {
    let list = s.api(Method::GET, "/v2/sandboxes", "").await.json();
    assert_eq!(list, json!([]), "no sandbox record");
    let st = status(s).await;
    assert_eq!(st["running"], 0, "{st}");
    assert_eq!(st["active"]["cpuCount"], 0, "capacity given back: {st}");
    assert_eq!(st["active"]["memoryMB"], 0, "capacity given back: {st}");
}

async fn detail(s: &TestServer, id: &str) -> Value {
    let r = s.api(Method::GET, &format!("/sandboxes/{id}"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

async fn put_network(s: &TestServer, id: &str, body: &str) -> common::Reply {
    s.api(Method::PUT, &format!("/sandboxes/{id}/network"), body)
        .await
}

fn create_body(extra: Value) -> String {
    let mut body = json!({"templateID": "base", "metadata": {}, "envVars": {}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_egress_control_policies_are_refused_and_leave_nothing() {
    let s = TestServer::start(Options::default()).await;
    for extra in [
        json!({"allow_internet_access": false}),
        json!({"network": {"denyOut": ["0.0.0.0/0"]}}),
        json!({"network": {"allowOut": ["example.com"], "denyOut": ["0.0.0.0/0"]}}),
    ] {
        let r = s
            .api(Method::POST, "/v2/sandboxes", &create_body(extra.clone()))
            .await;
        let msg = r.assert_error(StatusCode::BAD_REQUEST);
        assert!(msg.contains(NO_NETWORKS), "{extra}: {msg}");
    }
    // Bad entries are named whatever the server can enforce.
    for (extra, want) in [
        (
            json!({"network": {"denyOut": ["2001:db8::/32"]}}),
            "IPv6 egress rules are not supported",
        ),
        (
            json!({"network": {"denyOut": ["example.com"]}}),
            "denyOut[0] \"example.com\"",
        ),
        (
            json!({"network": {"allowOut": ["*"]}}),
            "allowOut[0] \"*\" is not a valid domain",
        ),
        (
            json!({"network": {"egressProxy": {"address": "proxy:1080"}}}),
            "egressProxy",
        ),
        (
            json!({"network": {"rules": {"a.example": [{"transform": {"headers": {}}}]}}}),
            "rules",
        ),
    ] {
        let r = s
            .api(Method::POST, "/v2/sandboxes", &create_body(extra.clone()))
            .await;
        let msg = r.assert_error(StatusCode::BAD_REQUEST);
        assert!(msg.contains(want), "{extra}: {msg}");
    }
    assert_nothing_left(&s).await;

    // A request that restricts nothing needs no enforcement and is served.
    let sb = s
        .create(&create_body(json!({
            "allow_internet_access": true,
            "network": {"allowOut": ["1.2.3.4"], "egressProxy": null, "rules": {}},
        })))
        .await;
    let id = sb["sandboxID"].as_str().unwrap();
    let d = detail(&s, id).await;
    assert_eq!(d["allowInternetAccess"], true, "{d}");
    assert!(d.get("network").is_none(), "{d}");
    let r = s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_network_without_egress_control() {
    let s = TestServer::start(Options::default()).await;
    let r = put_network(&s, "nosuchsandbox", r#"{"denyOut":["0.0.0.0/0"]}"#).await;
    let msg = r.assert_error(StatusCode::NOT_FOUND);
    assert!(msg.contains("nosuchsandbox"), "{msg}");

    let sb = s.create(&create_body(json!({}))).await;
    let id = sb["sandboxID"].as_str().unwrap();
    for body in [
        r#"{"denyOut":["0.0.0.0/0"]}"#,
        r#"{"allow_internet_access":false}"#,
    ] {
        let msg = put_network(&s, id, body)
            .await
            .assert_error(StatusCode::BAD_REQUEST);
        assert!(msg.contains(NO_NETWORKS), "{body}: {msg}");
    }
    let msg = put_network(&s, id, r#"{"denyOut":["10.0.0.0/33"]}"#)
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    assert!(msg.starts_with("denyOut[0] \"10.0.0.0/33\""), "{msg}");
    let msg = put_network(&s, id, r#"{"allowOut":"x"}"#)
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    assert!(msg.contains("invalid JSON body"), "{msg}");
    // Clearing (an empty body, or only defaults) restricts nothing and is answered.
    for body in ["", "{}", r#"{"allow_internet_access":true,"allowOut":[]}"#] {
        let r = put_network(&s, id, body).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{body:?}: {}", r.text());
    }
    let d = detail(&s, id).await;
    assert_eq!(d["allowInternetAccess"], true);
    assert!(d.get("network").is_none(), "{d}");
    // The sandbox was never disturbed.
    let r = s.envd(&sb, Method::GET, "/health", &[], "").await;
    assert!(r.status.is_success(), "{}", r.status);
}

/// On a server configured for per-sandbox networks whose runtime cannot enforce them, a
/// policy fails where it is applied: at create, at a running sandbox's PUT, at resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_egress_control_the_policy_reaches_the_runtime() {
    let s = TestServer::start(Options {
        egress_control: true,
        ..Options::default()
    })
    .await;

    // Create: the runtime is handed the policy and refuses it; nothing stays behind.
    let r = s
        .api(
            Method::POST,
            "/v2/sandboxes",
            &create_body(json!({"allow_internet_access": false})),
        )
        .await;
    let msg = r.assert_error(StatusCode::INTERNAL_SERVER_ERROR);
    assert!(msg.contains("egress policy"), "{msg}");
    assert_nothing_left(&s).await;

    let sb = s.create(&create_body(json!({"autoPause": true}))).await;
    let id = sb["sandboxID"].as_str().unwrap().to_owned();

    // Running: applied first, recorded only once applied.
    let msg = put_network(&s, &id, r#"{"denyOut":["0.0.0.0/0"]}"#)
        .await
        .assert_error(StatusCode::INTERNAL_SERVER_ERROR);
    assert!(msg.contains("egress policy"), "{msg}");
    let d = detail(&s, &id).await;
    assert!(d.get("network").is_none(), "not recorded: {d}");
    // Clearing a policy that was never set changes nothing and asks the runtime for nothing.
    let r = put_network(&s, &id, "{}").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());

    // Paused: recorded, to be applied at resume.
    let r = s
        .api(Method::POST, &format!("/sandboxes/{id}/pause"), "")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let body = r#"{"allowOut":["API.Example.com","*.pypi.org"],"denyOut":["0.0.0.0/0"],
        "dnsServers":["9.9.9.9"]}"#;
    let r = put_network(&s, &id, body).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let d = detail(&s, &id).await;
    assert_eq!(d["state"], "paused");
    assert_eq!(d["allowInternetAccess"], true);
    assert_eq!(
        d["network"],
        json!({"allowOut": ["api.example.com", "*.pypi.org"], "denyOut": ["0.0.0.0/0"],
            "dnsServers": ["9.9.9.9"]})
    );
    // A replacement drops what it omits.
    let r = put_network(&s, &id, r#"{"allow_internet_access":false}"#).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let d = detail(&s, &id).await;
    assert_eq!(d["allowInternetAccess"], false);
    assert!(
        d.get("network").is_none(),
        "only the top-level flag says it: {d}"
    );

    // Resume hands the stored policy over: this runtime refuses it, and the sandbox stays
    // paused and resumable.
    let r = s
        .api(Method::POST, &format!("/v2/sandboxes/{id}/connect"), "{}")
        .await;
    let msg = r.assert_error(StatusCode::INTERNAL_SERVER_ERROR);
    assert!(msg.contains("egress policy"), "{msg}");
    assert_eq!(detail(&s, &id).await["state"], "paused");

    // Cleared, it resumes.
    let r = put_network(&s, &id, "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let r = s
        .api(Method::POST, &format!("/v2/sandboxes/{id}/connect"), "{}")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let d = detail(&s, &id).await;
    assert_eq!(d["state"], "running");
    assert!(d.get("network").is_none(), "{d}");
    let resumed = r.json();
    eventually("the resumed agent", Duration::from_secs(10), async || {
        s.envd(&resumed, Method::GET, "/health", &[], "")
            .await
            .status
            .is_success()
    })
    .await;
    let r = s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_nothing_left(&s).await;
}
