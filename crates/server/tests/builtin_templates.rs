//! Built-in template recipes through the real server and the process backend (whose builds take
//! milliseconds): a create for a built-in name that was never built builds it and then starts;
//! an unknown name is still a 404.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Options, TestServer};
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_create_of_a_builtin_template_builds_it() {
    let s = TestServer::start(Options::default()).await;
    let before = s.api(Method::GET, "/templates", "").await.json();
    assert!(
        before
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["templateID"] != "code-interpreter-v1"),
        "{before}"
    );
    let sb = s
        .create(r#"{"templateID":"code-interpreter-v1","metadata":{},"envVars":{}}"#)
        .await;
    assert_eq!(sb["templateID"], "code-interpreter-v1");
    let after = s.api(Method::GET, "/templates", "").await.json();
    let t = after
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["templateID"] == "code-interpreter-v1")
        .unwrap_or_else(|| panic!("not listed: {after}"));
    // The recipe's budget, not base's.
    assert_eq!(t["memoryMB"], 1024, "{t}");
    let id = sb["sandboxID"].as_str().unwrap();
    s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;

    let r = s
        .api(
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"code-interpreter-v9"}"#,
        )
        .await;
    r.assert_error(StatusCode::NOT_FOUND);
}
