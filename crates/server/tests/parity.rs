//! E2B behaviours the SDK relies on in the details (issue 18), one test each. The process
//! backend runs real agents; tests/sdk/test_serve.py drives the same through the SDK on real VMs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Options, TestServer, eventually};
use http::{Method, StatusCode};

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
    eventually(
        "the sandbox to be killed",
        Duration::from_secs(20),
        async || {
            s.api(Method::GET, &format!("/sandboxes/{killed_id}"), "")
                .await
                .status
                == StatusCode::NOT_FOUND
        },
    )
    .await;
    let paused_id = paused["sandboxID"].as_str().unwrap();
    eventually(
        "the sandbox to be paused",
        Duration::from_secs(30),
        async || {
            s.api(Method::GET, &format!("/sandboxes/{paused_id}"), "")
                .await
                .json()["state"]
                == "paused"
        },
    )
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
