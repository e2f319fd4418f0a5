//! Bad input gets an error and never takes the agent down.

use firkin_envd::client::{envelope, full};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

#[tokio::test]
async fn malformed_requests_get_errors_and_the_agent_survives() {
    let a = Agent::with_token().await;
    let stream_ct = [("content-type", "application/connect+json")];
    let json_ct = [("content-type", "application/json")];
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Vec<u8>);
    let cases: Vec<Case> = vec![
        // Garbage JSON, wrong types, unknown enum.
        ("/process.Process/List", &json_ct, b"{".to_vec()),
        (
            "/process.Process/SendSignal",
            &json_ct,
            br#"{"process":{"pid":"x"}}"#.to_vec(),
        ),
        (
            "/process.Process/SendSignal",
            &json_ct,
            br#"{"process":{"pid":1},"signal":"SIGNAL_NOPE"}"#.to_vec(),
        ),
        ("/filesystem.Filesystem/Stat", &json_ct, b"[]".to_vec()),
        // An envelope announcing more bytes than follow, a truncated header, a compressed flag.
        (
            "/process.Process/Start",
            &stream_ct,
            [&[0u8, 0, 0, 1, 0][..], b"{}"].concat(),
        ),
        ("/process.Process/Start", &stream_ct, vec![0u8, 0]),
        (
            "/process.Process/Start",
            &stream_ct,
            envelope(1, b"{}").to_vec(),
        ),
        (
            "/process.Process/Start",
            &stream_ct,
            envelope(0, b"not json").to_vec(),
        ),
        (
            "/process.Process/StreamInput",
            &stream_ct,
            envelope(0, br#"{"data":{"input":{"stdin":"eA=="}}}"#).to_vec(),
        ),
        // Invalid protobuf.
        (
            "/process.Process/List",
            &[("content-type", "application/proto")],
            vec![0xff, 0xff, 0xff],
        ),
    ];
    for (path, headers, body) in cases {
        let (status, _, resp) = send(&a.client, Method::POST, path, headers, body.clone()).await;
        let text = String::from_utf8_lossy(&resp);
        if status == StatusCode::OK {
            // Streaming errors may come after a 200 in the end-of-stream envelope.
            assert!(text.contains("\"error\""), "{path} {body:?}: {text}");
        } else {
            assert!(status.is_client_error(), "{path} {body:?}: {status} {text}");
        }
        a.client.health().await.unwrap();
    }
    // Starting something that cannot run is invalid_argument, not a crash.
    for process in [
        json!({"cmd": "/no/such/binary"}),
        json!({"cmd": "/bin/true", "cwd": "/no/such/dir"}),
    ] {
        let msg = json!({ "process": process }).to_string();
        let (status, _, body) = send(
            &a.client,
            Method::POST,
            "/process.Process/Start",
            &stream_ct,
            envelope(0, msg.as_bytes()),
        )
        .await;
        let v = String::from_utf8_lossy(&body);
        assert!(v.contains("invalid_argument"), "{status} {v}");
    }
    // Unknown methods.
    let (status, v) = rpc(&a.client, "process.Process/Nope", &json!({}), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    a.client.health().await.unwrap();
    let out = a.client.run("echo still alive").await.unwrap();
    assert_eq!(out.stdout, b"still alive\n");
}

#[tokio::test]
async fn huge_headers_and_garbage_connections_are_refused() {
    let a = Agent::with_token().await;
    let huge = "x".repeat(1 << 20);
    let result = a
        .client
        .fetch(
            Method::GET,
            "/health",
            &[("x-huge", huge.as_str())],
            full(""),
        )
        .await;
    match result {
        Ok((status, _, _)) => assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => eprintln!("connection closed on huge header: {e}"),
    }
    // Not HTTP at all.
    let addr = a.url.trim_start_matches("http://").to_owned();
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(b"\x16\x03\x01garbage that is not http\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![];
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), raw.read_to_end(&mut buf)).await;
    // Half a request, then hang up.
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(b"POST /files?path=/tmp/x HTTP/1.1\r\nContent-Length: 100\r\n")
        .await
        .unwrap();
    drop(raw);
    a.client.health().await.unwrap();
    let (status, _, body) = get(&a.client, "/envs").await;
    assert_eq!(status, StatusCode::OK);
    let _: Value = serde_json::from_slice(&body).unwrap();
}

#[tokio::test]
async fn sigterm_stops_the_agent_and_its_processes() {
    let a = Agent::with_token().await;
    let mut s = open_stream(
        &a.client,
        "process.Process/Start",
        &json!({"process": {"cmd": "/bin/sleep", "args": ["300"]}, "stdin": false}),
        &[],
    )
    .await;
    let v = s.next_json().await.unwrap().unwrap();
    let child = v["event"]["start"]["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut gone = false;
    for _ in 0..100 {
        // Gone, or a zombie waiting for whoever inherited it after envd exited.
        match std::fs::read_to_string(format!("/proc/{child}/stat")) {
            Err(_) => gone = true,
            Ok(stat) => {
                gone = stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            }
        }
        if gone {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(gone, "child {child} survived envd's shutdown");
}
