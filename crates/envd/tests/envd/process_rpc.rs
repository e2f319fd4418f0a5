//! process.Process over the Connect protocol, as the SDK speaks it.

use std::time::Duration;

use bytes::Bytes;
use firkin_envd::client::{Client, EnvelopeStream, envelope, full};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::common::*;

fn start_msg(cmd: &str) -> Value {
    json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}, "stdin": false})
}

async fn next_event(s: &mut EnvelopeStream) -> Value {
    tokio::time::timeout(Duration::from_secs(20), s.next_json())
        .await
        .expect("event within 20 s")
        .unwrap()
        .expect("stream still open")
}

/// Starts a process and reads its `start` event; returns the stream and the pid.
async fn start(a: &Agent, msg: &Value, headers: &[(&str, &str)]) -> (EnvelopeStream, u64) {
    let mut s = open_stream(&a.client, "process.Process/Start", msg, headers).await;
    let pid = next_event(&mut s).await["event"]["start"]["pid"]
        .as_u64()
        .unwrap();
    (s, pid)
}

/// Reads events until `end`; returns (stdout, stderr, pty, end).
async fn collect(s: &mut EnvelopeStream) -> (Vec<u8>, Vec<u8>, Vec<u8>, Value) {
    let (mut out, mut err, mut pty) = (vec![], vec![], vec![]);
    loop {
        let v = next_event(s).await;
        let ev = &v["event"];
        out.extend(unb64(&ev["data"]["stdout"]));
        err.extend(unb64(&ev["data"]["stderr"]));
        pty.extend(unb64(&ev["data"]["pty"]));
        if ev.get("end").is_some() {
            // After `end`, the stream closes with a clean end-of-stream envelope.
            assert_eq!(s.next_json().await.unwrap(), None);
            return (out, err, pty, ev["end"].clone());
        }
    }
}

#[tokio::test]
async fn start_streams_start_data_end_with_exact_framing() {
    let a = Agent::with_token().await;
    let resp = a
        .client
        .request(
            Method::POST,
            "/process.Process/Start",
            &[
                ("content-type", "application/connect+json"),
                ("connect-protocol-version", "1"),
                ("connect-content-encoding", "identity"),
                ("connect-accept-encoding", "identity"),
                ("accept-encoding", "zstd,gzip,br"),
                ("connect-timeout-ms", "60000"),
                ("keepalive-ping-interval", "50"),
            ],
            full(envelope(
                0,
                start_msg("echo hi; echo oops >&2; exit 7")
                    .to_string()
                    .as_bytes(),
            )),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/connect+json");
    assert!(resp.headers().get("content-encoding").is_none());
    assert!(
        resp.headers()
            .get("connect-content-encoding")
            .is_none_or(|v| v == "identity")
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let mut frames = vec![];
    let mut rest: &[u8] = &body;
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        frames.push((
            rest[0],
            serde_json::from_slice::<Value>(&rest[5..5 + len]).unwrap(),
        ));
        rest = &rest[5 + len..];
    }
    let first = &frames[0].1["event"];
    assert!(first["start"]["pid"].as_u64().unwrap() > 0, "{first}");
    let (flags, eos) = frames.last().unwrap();
    assert_eq!((*flags, eos), (0x02, &json!({})));
    let end = &frames[frames.len() - 2].1["event"]["end"];
    assert_eq!(end["exitCode"], 7);
    assert_eq!(end["exited"], true);
    assert_eq!(end["status"], "exit status 7");
    let mut out = vec![];
    let mut err = vec![];
    for (f, v) in &frames[1..frames.len() - 2] {
        assert_eq!(*f, 0);
        out.extend(unb64(&v["event"]["data"]["stdout"]));
        err.extend(unb64(&v["event"]["data"]["stderr"]));
    }
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (b"hi\n".as_ref(), b"oops\n".as_ref())
    );
}

#[tokio::test]
async fn env_cwd_and_absent_stdin_field() {
    let a = Agent::with_token().await;
    let dir = scratch();
    let msg = json!({
        "process": {
            "cmd": "/bin/sh",
            "args": ["-c", "echo $SANDBOX_VAR $MINE $HOME $USER $LOGNAME; pwd; cat"],
            "envs": {"MINE": "mine", "SANDBOX_VAR": "overridden"},
            "cwd": dir.path(),
        },
    });
    // No "stdin" field: stdin stays open, so `cat` waits for input.
    let (mut s, pid) = start(&a, &msg, &[]).await;
    let (status, _) = rpc(
        &a.client,
        "process.Process/SendInput",
        &json!({"process": {"pid": pid}, "input": {"stdin": b64(b"typed\n")}}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = rpc(
        &a.client,
        "process.Process/CloseStdin",
        &json!({"process": {"pid": pid}}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (out, _, _, end) = collect(&mut s).await;
    let home = firkin_envd::users::AccountDb::default()
        .by_uid(nix::unistd::geteuid().as_raw())
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "overridden mine {} {n} {n}\n{}\ntyped\n",
            home.home.display(),
            dir.path().display(),
            n = home.name
        )
    );
    assert!(
        end.get("exitCode").is_none() || end["exitCode"] == 0,
        "{end}"
    );
}

#[tokio::test]
async fn list_connect_by_pid_and_tag_replays_output_and_stream_input() {
    let a = Agent::with_token().await;
    let msg = json!({
        "process": {"cmd": "/bin/cat", "envs": {"K": "V"}, "cwd": "/tmp"},
        "tag": "my-cat",
        "stdin": true,
    });
    let (s, pid) = start(&a, &msg, &[]).await;
    drop(s); // disconnect: the process keeps running

    // StreamInput: a client stream of envelopes ended by the end of the body.
    let mut body = Vec::new();
    body.extend_from_slice(&envelope(
        0,
        json!({"start": {"process": {"tag": "my-cat"}}})
            .to_string()
            .as_bytes(),
    ));
    body.extend_from_slice(&envelope(
        0,
        json!({"data": {"input": {"stdin": b64(b"one ")}}})
            .to_string()
            .as_bytes(),
    ));
    body.extend_from_slice(&envelope(
        0,
        json!({"keepalive": {}}).to_string().as_bytes(),
    ));
    body.extend_from_slice(&envelope(
        0,
        json!({"data": {"input": {"stdin": b64(b"two\n")}}})
            .to_string()
            .as_bytes(),
    ));
    let (status, headers, resp) = send(
        &a.client,
        Method::POST,
        "/process.Process/StreamInput",
        &[("content-type", "application/connect+json")],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/connect+json");
    // Exactly one message and then the end-of-stream envelope.
    assert_eq!(
        resp.as_ref(),
        [envelope(0, b"{}"), envelope(2, b"{}")].concat().as_slice()
    );

    let (status, list) = rpc(&a.client, "process.Process/List", &json!({}), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let entry = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid))
        .unwrap()
        .clone();
    assert_eq!(entry["tag"], "my-cat");
    assert_eq!(entry["config"]["cmd"], "/bin/cat");
    assert_eq!(entry["config"]["envs"], json!({"K": "V"}));
    assert_eq!(entry["config"]["cwd"], "/tmp");

    for selector in [json!({"pid": pid}), json!({"tag": "my-cat"})] {
        let mut c = open_stream(
            &a.client,
            "process.Process/Connect",
            &json!({"process": selector}),
            &[],
        )
        .await;
        assert_eq!(next_event(&mut c).await["event"]["start"]["pid"], pid);
        // Output produced while nobody was attached is replayed.
        let mut got = vec![];
        while got != b"one two\n" {
            got.extend(unb64(&next_event(&mut c).await["event"]["data"]["stdout"]));
            assert!(got.len() <= 8, "{got:?}");
        }
    }

    let mut c = open_stream(
        &a.client,
        "process.Process/Connect",
        &json!({"process": {"pid": pid}}),
        &[],
    )
    .await;
    let (status, _) = rpc(
        &a.client,
        "process.Process/SendSignal",
        &json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (out, _, _, end) = collect(&mut c).await;
    assert_eq!(out, b"one two\n");
    assert_eq!(end["exitCode"], -1);
    assert_eq!(end["status"], "signal: killed");
    assert!(end.get("exited").is_none() || end["exited"] == false);
}

#[tokio::test]
async fn unknown_processes_are_not_found() {
    let a = Agent::with_token().await;
    for (method, body) in [
        (
            "process.Process/SendSignal",
            json!({"process": {"pid": 4_000_000}, "signal": "SIGNAL_SIGKILL"}),
        ),
        (
            "process.Process/SendInput",
            json!({"process": {"pid": 4_000_000}, "input": {"stdin": "eA=="}}),
        ),
        (
            "process.Process/CloseStdin",
            json!({"process": {"tag": "nope"}}),
        ),
        (
            "process.Process/Update",
            json!({"process": {"pid": 4_000_000}, "pty": {"size": {"cols": 1, "rows": 1}}}),
        ),
    ] {
        let (status, v) = rpc(&a.client, method, &body, &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method}: {v}");
        assert_eq!(v["code"], "not_found", "{method}: {v}");
    }
    let err = a
        .client
        .server_stream(
            "process.Process/Connect",
            &json!({"process": {"pid": 4_000_000}}),
            &[],
        )
        .await;
    match err {
        Err(e) => assert!(e.to_string().contains("not_found"), "{e}"),
        Ok(mut s) => {
            let e = s.next_json().await.unwrap_err();
            assert!(e.to_string().contains("not_found"), "{e}");
        }
    }
    // A selector is required.
    let (status, v) = rpc(
        &a.client,
        "process.Process/SendSignal",
        &json!({"signal": "SIGNAL_SIGKILL"}),
        &[],
    )
    .await;
    assert_rpc_error(status, &v, StatusCode::BAD_REQUEST, "invalid_argument");
}

#[tokio::test]
async fn keepalives_flow_while_the_process_is_silent() {
    let a = Agent::with_token().await;
    let (mut s, _) = start(
        &a,
        &start_msg("sleep 2.5; echo done"),
        &[("keepalive-ping-interval", "1")],
    )
    .await;
    let mut keepalives = 0;
    loop {
        let v = next_event(&mut s).await;
        if v["event"].get("keepalive").is_some() {
            keepalives += 1;
        }
        if v["event"].get("end").is_some() {
            break;
        }
    }
    assert!(keepalives >= 2, "got {keepalives} keepalives");
}

#[tokio::test]
async fn connect_timeout_bounds_the_process_lifetime() {
    let a = Agent::with_token().await;
    let (mut s, pid) = start(
        &a,
        &start_msg("sleep 60"),
        &[("connect-timeout-ms", "1000")],
    )
    .await;
    let started = std::time::Instant::now();
    // The stream ends (deadline_exceeded or end event), and the process is gone.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(10), s.next_json())
        .await
        .unwrap()
    {}
    let mut gone = false;
    for _ in 0..50 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "process {pid} survived its timeout");
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn pty_input_output_and_resize() {
    let a = Agent::with_token().await;
    let msg = json!({
        "process": {"cmd": "/bin/bash", "args": ["-i", "-l"], "envs": {"TERM": "xterm-256color", "PS1": "$ "}},
        "pty": {"size": {"cols": 80, "rows": 24}},
    });
    let (mut s, pid) = start(&a, &msg, &[]).await;
    let send = |data: &'static [u8]| {
        let c = a.client.clone();
        async move {
            let (status, v) = rpc(
                &c,
                "process.Process/SendInput",
                &json!({"process": {"pid": pid}, "input": {"pty": b64(data)}}),
                &[],
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{v}");
        }
    };
    async fn wait_for(s: &mut EnvelopeStream, out: &mut Vec<u8>, needle: &[u8]) {
        while !out.windows(needle.len()).any(|w| w == needle) {
            let v = next_event(s).await;
            assert!(
                v["event"]["data"].get("stdout").is_none(),
                "PTY output must come as pty"
            );
            out.extend(unb64(&v["event"]["data"]["pty"]));
        }
    }
    let mut out = vec![];
    send(b"stty size; tty\n").await;
    wait_for(&mut s, &mut out, b"24 80").await;
    wait_for(&mut s, &mut out, b"/dev/pts/").await;
    let (status, _) = rpc(
        &a.client,
        "process.Process/Update",
        &json!({"process": {"pid": pid}, "pty": {"size": {"cols": 120, "rows": 40}}}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    send(b"stty size\n").await;
    wait_for(&mut s, &mut out, b"40 120").await;
    send(b"exit 5\n").await;
    let (_, _, _, end) = collect(&mut s).await;
    assert_eq!(end["exitCode"], 5);

    // Resizing a process without a terminal is invalid.
    let (mut s, pid) = start(&a, &start_msg("sleep 5"), &[]).await;
    let (status, v) = rpc(
        &a.client,
        "process.Process/Update",
        &json!({"process": {"pid": pid}, "pty": {"size": {"cols": 1, "rows": 1}}}),
        &[],
    )
    .await;
    assert_rpc_error(status, &v, StatusCode::BAD_REQUEST, "invalid_argument");
    let (status, _) = rpc(
        &a.client,
        "process.Process/SendSignal",
        &json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, _, end) = collect(&mut s).await;
    assert_eq!(end["status"], "signal: terminated");
}

#[tokio::test]
async fn runs_as_the_requested_user() {
    let Some(a) = root_agent().await else {
        return;
    };
    let auth = basic("user");
    let mut s = open_stream(
        &a.client,
        "process.Process/Start",
        &start_msg(
            "echo $(id -un):$(id -u):$HOME:$USER:$LOGNAME:$(pwd); touch /root/firkin-denied",
        ),
        &[("authorization", &auth)],
    )
    .await;
    let (out, err, _, end) = collect(&mut s).await;
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "user:{}:/home/user:user:user:/home/user\n",
            firkin_envd::users::AccountDb::default()
                .by_name("user")
                .unwrap()
                .uid
        )
    );
    assert!(String::from_utf8_lossy(&err).contains("Permission denied"));
    assert_eq!(end["exitCode"], 1);
    // The default user can be changed by /init.
    a.client
        .init(&json!({"defaultUser": "user"}))
        .await
        .unwrap();
    let out = a.client.run("id -un; pwd").await.unwrap();
    assert_eq!(out.stdout, b"user\n/home/user\n");
    // Unknown users are unauthenticated.
    let err = match a
        .client
        .server_stream(
            "process.Process/Start",
            &start_msg("true"),
            &[("authorization", &basic("nobody-firkin"))],
        )
        .await
    {
        Err(e) => e,
        Ok(mut s) => s.next_json().await.unwrap_err(),
    };
    assert!(err.to_string().contains("unauthenticated"), "{err}");
}

#[tokio::test]
async fn binary_codec_works_for_unary_and_streams() {
    use buffa::Message;
    use firkin_envd::process_proto::{
        ListRequest, ListResponse, ProcessConfig, StartRequest, StartResponse,
    };
    let a = Agent::with_token().await;
    let req = StartRequest {
        process: ProcessConfig {
            cmd: "/bin/echo".into(),
            args: vec!["proto".into()],
            ..Default::default()
        }
        .into(),
        stdin: Some(false),
        ..Default::default()
    };
    let resp = a
        .client
        .request(
            Method::POST,
            "/process.Process/Start",
            &[("content-type", "application/connect+proto")],
            full(envelope(0, &req.encode_to_vec())),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/connect+proto");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let mut rest: &[u8] = &body;
    let mut events = vec![];
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        if rest[0] == 0 {
            events.push(StartResponse::decode_from_slice(&rest[5..5 + len]).unwrap());
        }
        rest = &rest[5 + len..];
    }
    let dbg = format!("{events:?}");
    assert!(dbg.contains("Start("), "{dbg}");
    assert!(dbg.contains("End("), "{dbg}");
    assert!(dbg.contains(&format!("{:?}", b"proto\n".to_vec())), "{dbg}");

    let (status, _, body) = send(
        &a.client,
        Method::POST,
        "/process.Process/List",
        &[("content-type", "application/proto")],
        Bytes::from(ListRequest::default().encode_to_vec()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    ListResponse::decode_from_slice(&body).unwrap();
}

#[tokio::test]
async fn run_helper_matches_sdk_semantics() {
    let a = Agent::with_token().await;
    let out = a
        .client
        .run("printf a; printf b >&2; exit 2")
        .await
        .unwrap();
    assert_eq!(
        (out.stdout, out.stderr, out.exit_code),
        (b"a".to_vec(), b"b".to_vec(), 2)
    );
    let _ = Client::new("http://127.0.0.1:1").unwrap();
}
