//! Any port of a sandbox through the sandbox plane, and `allowPublicTraffic: false`, on the
//! process backend (whose sandbox ports are host ports): a stand-in web app listens on a host
//! port and is reached by header and by `{port}-{id}` host.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Options, TestServer};
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A web app that answers every request with `hello` (one request per connection).
async fn web_app() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
                    )
                    .await;
            });
        }
    });
    port
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(s: &TestServer, sb: &Value, port: u16, extra: &[(&str, &str)]) -> common::Reply {
    let port = port.to_string();
    let mut headers = vec![
        ("e2b-sandbox-id", sb["sandboxID"].as_str().unwrap()),
        ("e2b-sandbox-port", port.as_str()),
    ];
    headers.extend_from_slice(extra);
    s.call(Method::GET, "/", &headers, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_port_is_reached_and_a_closed_one_is_e2bs_502() {
    let s = TestServer::start(Options::default()).await;
    let sb = s.create(r#"{"templateID":"base"}"#).await;
    assert!(sb["trafficAccessToken"].is_null(), "{sb}");
    let port = web_app().await;

    let r = get(&s, &sb, port, &[]).await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "hello"));
    let host = format!("{port}-{}.sb.test", sb["sandboxID"].as_str().unwrap());
    let r = s.call(Method::GET, "/", &[("host", &host)], "").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "hello"));

    let closed = closed_port();
    let r = get(&s, &sb, closed, &[]).await;
    let body = r.json();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["code"], 502);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("port is not open"),
        "{body}"
    );
    assert_eq!(body["port"], closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_sandboxes_need_their_traffic_token_on_every_port_but_envds() {
    let s = TestServer::start(Options::default()).await;
    let sb = s
        .create(r#"{"templateID":"base","network":{"allowPublicTraffic":false}}"#)
        .await;
    let token = sb["trafficAccessToken"].as_str().expect("a traffic token");
    assert!(token.len() >= 32, "{token}");
    let port = web_app().await;

    let r = get(&s, &sb, port, &[]).await;
    r.assert_error(StatusCode::FORBIDDEN);
    let wrong = format!("{token}x");
    let r = get(&s, &sb, port, &[("e2b-traffic-access-token", &wrong)]).await;
    r.assert_error(StatusCode::FORBIDDEN);
    let host = format!("{port}-{}.sb.test", sb["sandboxID"].as_str().unwrap());
    let r = s.call(Method::GET, "/", &[("host", &host)], "").await;
    r.assert_error(StatusCode::FORBIDDEN);
    let r = get(&s, &sb, port, &[("e2b-traffic-access-token", token)]).await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "hello"));

    // envd keeps its own rule: its token, no traffic token.
    let r = s.envd(&sb, Method::GET, "/envs", &[], "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Connect hands the same token back.
    let id = sb["sandboxID"].as_str().unwrap();
    let r = s
        .api(
            Method::POST,
            &format!("/sandboxes/{id}/connect"),
            r#"{"timeout":60}"#,
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    assert_eq!(r.json()["trafficAccessToken"], token);

    // A public sandbox's ports answer without one.
    let public = s.create(r#"{"templateID":"base"}"#).await;
    let r = get(&s, &public, port, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}
