//! Any port of a sandbox through the sandbox plane, and `allowPublicTraffic: false`, on the
//! process backend (whose sandbox ports are host ports): a web app started in the sandbox is
//! reached by header and by `{port}-{id}` host, while a host service that no process of the
//! sandbox owns is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Options, TestServer, envelope, eventually};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A host service outside every sandbox, answering `hello`.
async fn host_service() -> u16 {
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

/// Runs `body` with a web app (`python3 -m http.server`) listening on a free port inside the
/// sandbox `sb`, started through its agent; the app lives as long as its start request.
async fn with_web_app(s: &TestServer, sb: &Value, body: impl AsyncFnOnce(u16)) {
    let port = closed_port();
    let cmd = format!("exec timeout 120 python3 -m http.server {port} --bind 127.0.0.1");
    let start = s.envd(
        sb,
        Method::POST,
        "/process.Process/Start",
        &[
            ("content-type", "application/connect+json"),
            ("connect-protocol-version", "1"),
        ],
        envelope(
            0,
            &json!({"process":{"cmd":"/bin/bash","args":["-c",cmd]},"stdin":false}),
        ),
    );
    let run = async {
        eventually("the web app listens", Duration::from_secs(30), async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        body(port).await;
    };
    tokio::select! {
        r = start => panic!("the web app ended early: {}", r.text()),
        () = run => {}
    }
}

fn assert_port_closed(r: &common::Reply, port: u16) {
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
    assert_eq!(body["port"], port);
}

fn listing(r: &common::Reply) -> bool {
    r.status == StatusCode::OK && r.text().contains("Directory listing")
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
    with_web_app(&s, &sb, async |port| {
        let r = get(&s, &sb, port, &[]).await;
        assert!(listing(&r), "{}: {}", r.status, r.text());
        let host = format!("{port}-{}.sb.test", sb["sandboxID"].as_str().unwrap());
        let r = s.call(Method::GET, "/", &[("host", &host)], "").await;
        assert!(listing(&r), "{}: {}", r.status, r.text());
        // Another sandbox does not reach this one's app through its own id.
        let other = s.create(r#"{"templateID":"base"}"#).await;
        assert_port_closed(&get(&s, &other, port, &[]).await, port);
    })
    .await;

    let closed = closed_port();
    assert_port_closed(&get(&s, &sb, closed, &[]).await, closed);
    // A host service is not the sandbox's: the sandbox plane does not reach it.
    let host = host_service().await;
    assert_port_closed(&get(&s, &sb, host, &[]).await, host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_sandboxes_need_their_traffic_token_on_every_port_but_envds() {
    let s = TestServer::start(Options::default()).await;
    let sb = s
        .create(r#"{"templateID":"base","network":{"allowPublicTraffic":false}}"#)
        .await;
    let token = sb["trafficAccessToken"].as_str().expect("a traffic token");
    assert!(token.len() >= 32, "{token}");
    with_web_app(&s, &sb, async |port| {
        let r = get(&s, &sb, port, &[]).await;
        r.assert_error(StatusCode::FORBIDDEN);
        let wrong = format!("{token}x");
        let r = get(&s, &sb, port, &[("e2b-traffic-access-token", &wrong)]).await;
        r.assert_error(StatusCode::FORBIDDEN);
        let host = format!("{port}-{}.sb.test", sb["sandboxID"].as_str().unwrap());
        let r = s.call(Method::GET, "/", &[("host", &host)], "").await;
        r.assert_error(StatusCode::FORBIDDEN);
        let r = get(&s, &sb, port, &[("e2b-traffic-access-token", token)]).await;
        assert!(listing(&r), "{}: {}", r.status, r.text());
    })
    .await;

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
}
