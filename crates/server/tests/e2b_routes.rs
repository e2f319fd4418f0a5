//! E2B routes firkin lacks answer 501 with a JSON message naming the feature; paths that are no
//! E2B route keep 404; the routes firkin implements on the same paths keep working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Options, TestServer};
use firkin_server::api::unsupported::ROUTES;
use http::{Method, StatusCode};
use serde_json::Value;

/// A request path for a route pattern: each `{param}` becomes `p-param`.
fn concrete(pattern: &str) -> String {
    pattern
        .split('/')
        .map(
            |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => format!("p-{name}"),
                None => seg.to_owned(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unsupported_e2b_route_answers_501_naming_the_feature() {
    let s = TestServer::start(Options::default()).await;
    assert!(ROUTES.len() > 40, "the table lost its rows");
    for route in ROUTES {
        let path = concrete(route.path);
        let r = s.api(route.method.clone(), &path, "{}").await;
        let message = r.assert_error(StatusCode::NOT_IMPLEMENTED);
        assert!(
            message.contains(route.feature) && message.ends_with(" is not supported by firkin yet"),
            "{} {path}: {message}",
            route.method
        );
        // Like every E2B route, it wants the API key first.
        let r = s.call(route.method.clone(), &path, &[], "").await;
        r.assert_error(StatusCode::UNAUTHORIZED);
    }
    // What is in no E2B spec stays a 404, and a method E2B does not list on a path stays a 405.
    for path in [
        "/no/such/route",
        "/sandboxes/x/no-such-action",
        "/v9/sandboxes",
    ] {
        let r = s.api(Method::GET, path, "").await;
        assert!(
            r.assert_error(StatusCode::NOT_FOUND)
                .contains("no such endpoint")
        );
    }
    let r = s.api(Method::PATCH, "/sandboxes/x/fork", "").await;
    r.assert_error(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implemented_routes_beside_unsupported_ones_still_work() {
    let s = TestServer::start(Options::default()).await;
    // v1 create (same path as the v1 list) and the sandbox's own routes, which share their
    // prefix with fork, snapshots, network and logs.
    let r = s
        .api(
            Method::POST,
            "/sandboxes",
            r#"{"templateID":"base","metadata":{"via":"v1"},"envVars":{}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let id = r.json()["sandboxID"].as_str().unwrap().to_owned();
    let r = s.api(Method::GET, &format!("/sandboxes/{id}"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["metadata"]["via"], "v1");
    let r = s.api(Method::GET, "/sandboxes", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["sandboxID"] == id.as_str())
    );
    let r = s
        .api(Method::GET, &format!("/sandboxes/{id}/metrics"), "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Template listing, v1 and v2, beside the 501 template routes.
    for path in ["/templates", "/v2/templates"] {
        let r = s.api(Method::GET, path, "").await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        let list: Value = r.json();
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|t| t["templateID"] == "base"),
            "{path}: {list}"
        );
        assert!(r.headers.get("x-next-token").is_none());
    }
    let r = s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
}
