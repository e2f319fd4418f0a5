//! The sandbox-plane proxy against a real upstream (`firkin-envd` in host mode): streaming in
//! both directions, large transfers in bounded memory, and no way to steer it elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use common::{Backend, Options, TestServer, envelope, take_envelopes};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::mpsc;

type ChanBody =
    StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>;

fn chan_body(rx: mpsc::Receiver<Bytes>) -> ChanBody {
    use futures::StreamExt;
    let s = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    });
    StreamBody::new(s.boxed())
}

fn streaming_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, ChanBody>
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

fn sandbox_headers(b: http::request::Builder, sb: &Value) -> http::request::Builder {
    b.header("e2b-sandbox-id", sb["sandboxID"].as_str().unwrap())
        .header("e2b-sandbox-port", "49983")
        .header("x-access-token", sb["envdAccessToken"].as_str().unwrap())
}

/// Reads the response until `want` matches an envelope; returns it.
async fn next_matching(
    body: &mut Incoming,
    buf: &mut Vec<u8>,
    pending: &mut Vec<(u8, Value)>,
    want: impl Fn(&(u8, Value)) -> bool,
) -> (u8, Value) {
    let read = async {
        loop {
            if let Some(i) = pending.iter().position(&want) {
                return pending.remove(i);
            }
            let frame = body.frame().await.expect("stream ended").unwrap();
            if let Some(d) = frame.data_ref() {
                buf.extend_from_slice(d);
                pending.extend(take_envelopes(buf));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("timed out waiting for a stream event: the proxy buffered the stream")
}

fn stdout_of(ev: &(u8, Value)) -> Option<Vec<u8>> {
    let d = ev.1["event"]["data"]["stdout"].as_str()?;
    B64.decode(d).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_streams_flow_both_ways_through_the_proxy() {
    connect_streams_flow_both_ways_through_the_proxy_on(Backend::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_connect_streams_flow_both_ways_through_the_proxy() {
    connect_streams_flow_both_ways_through_the_proxy_on(Backend::Qemu).await;
}

async fn connect_streams_flow_both_ways_through_the_proxy_on(backend: Backend) {
    let s = TestServer::start(Options::on(backend)).await;
    let sb = s.create(r#"{"templateID":"base"}"#).await;
    let client = streaming_client();

    // Server stream: `cat` with stdin kept open. Its output can only arrive while the stream is
    // still open if the proxy passes each envelope on as it comes.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tx.send(Bytes::from(envelope(
        0,
        &json!({"process":{"cmd":"/bin/cat","args":[]},"stdin":true}),
    )))
    .await
    .unwrap();
    drop(tx);
    let req = sandbox_headers(http::Request::post(s.url("/process.Process/Start")), &sb)
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(chan_body(rx))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/connect+json");
    let mut body = resp.into_body();
    let (mut buf, mut pending) = (Vec::new(), Vec::new());
    let start = next_matching(&mut body, &mut buf, &mut pending, |e| {
        e.1["event"]["start"].is_object()
    })
    .await;
    let pid = start.1["event"]["start"]["pid"].as_u64().unwrap();

    // Client stream: StreamInput, whose request body stays open while we read the echo of
    // each chunk. A proxy that buffered request bodies would deadlock here.
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(4);
    let req = sandbox_headers(
        http::Request::post(s.url("/process.Process/StreamInput")),
        &sb,
    )
    .header("content-type", "application/connect+json")
    .header("connect-protocol-version", "1")
    .body(chan_body(in_rx))
    .unwrap();
    let input_call = tokio::spawn({
        let client = client.clone();
        async move { client.request(req).await }
    });
    in_tx
        .send(Bytes::from(envelope(
            0,
            &json!({"start":{"process":{"pid":pid}}}),
        )))
        .await
        .unwrap();
    for word in ["ping\n", "pong\n", "third\n"] {
        in_tx
            .send(Bytes::from(envelope(
                0,
                &json!({"data":{"input":{"stdin": B64.encode(word)}}}),
            )))
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < word.len() {
            let ev = next_matching(&mut body, &mut buf, &mut pending, |e| {
                stdout_of(e).is_some()
            })
            .await;
            got.extend(stdout_of(&ev).unwrap());
        }
        assert_eq!(String::from_utf8(got).unwrap(), word);
    }
    drop(in_tx);
    let input_resp = input_call.await.unwrap().unwrap();
    assert_eq!(input_resp.status(), StatusCode::OK);
    let mut ib = input_resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    let frames = take_envelopes(&mut ib);
    assert_eq!(
        frames.len(),
        2,
        "one message and the end-of-stream: {frames:?}"
    );

    // End the process; the Start stream carries `end` and then the end-of-stream envelope.
    let kill = s
        .envd(
            &sb,
            Method::POST,
            "/process.Process/SendSignal",
            &[("content-type", "application/json")],
            json!({"process":{"pid":pid},"signal":"SIGNAL_SIGKILL"}).to_string(),
        )
        .await;
    assert_eq!(kill.status, StatusCode::OK, "{}", kill.text());
    next_matching(&mut body, &mut buf, &mut pending, |e| {
        e.1["event"]["end"].is_object()
    })
    .await;
    let eos = next_matching(&mut body, &mut buf, &mut pending, |e| e.0 & 2 != 0).await;
    assert_eq!(eos.1, json!({}));
}

/// A deterministic stream of `blocks` MiB: block `k` is `pattern` with `k` in its first 8
/// bytes, so that reordered, repeated or lost blocks are caught.
fn block(pattern: &[u8], k: u64) -> Bytes {
    let mut b = pattern.to_vec();
    b[..8].copy_from_slice(&k.to_le_bytes());
    Bytes::from(b)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Samples this process's RSS until stopped; returns the peak.
fn watch_rss() -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let h = std::thread::spawn(move || {
        let mut peak = 0;
        while !s2.load(Ordering::Relaxed) {
            peak = peak.max(rss_bytes());
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    (stop, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_stream_through_the_proxy_in_bounded_memory() {
    large_files_stream_through_the_proxy_in_bounded_memory_on(Backend::Process, 1024).await;
}

/// Into a VM's 2 GiB disk: smaller, because the guest writes through an emulated disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_large_files_stream_through_the_proxy_in_bounded_memory() {
    large_files_stream_through_the_proxy_in_bounded_memory_on(Backend::Qemu, 300).await;
}

async fn large_files_stream_through_the_proxy_in_bounded_memory_on(
    backend: Backend,
    default_mib: u64,
) {
    const MIB: u64 = 1024 * 1024;
    let blocks: u64 = std::env::var("FIRKIN_TEST_PROXY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_mib);
    let s = TestServer::start(Options::on(backend)).await;
    let sb = s.create(r#"{"templateID":"base"}"#).await;
    let mut pattern = vec![0u8; MIB as usize];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    let pattern = Arc::new(pattern);
    let baseline = rss_bytes();
    let (stop, peak) = watch_rss();

    // Upload: a chunked request body generated on the fly (no Content-Length).
    let p = Arc::clone(&pattern);
    let stream = futures::stream::iter(0..blocks)
        .map(move |k| Ok::<_, std::io::Error>(Frame::data(block(&p, k))));
    use futures::StreamExt;
    let body = StreamBody::new(stream.boxed());
    let client = streaming_client();
    let req = sandbox_headers(http::Request::post(s.url("/files?path=big.bin")), &sb)
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let began = std::time::Instant::now();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::OK, "{text:?}");
    let up = began.elapsed();

    // Download, checked block by block as it arrives.
    let req = sandbox_headers(http::Request::get(s.url("/files?path=big.bin")), &sb)
        .body(chan_body(mpsc::channel(1).1))
        .unwrap();
    let began = std::time::Instant::now();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let got = Arc::new(AtomicU64::new(0));
    let mut pos: u64 = 0;
    let mut current = block(&pattern, 0);
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        let Some(mut d) = frame.into_data().ok() else {
            continue;
        };
        while !d.is_empty() {
            let k = pos / MIB;
            if pos.is_multiple_of(MIB) {
                current = block(&pattern, k);
            }
            let off = (pos % MIB) as usize;
            let n = d.len().min(MIB as usize - off);
            assert!(k < blocks, "more bytes than were uploaded");
            assert_eq!(&d[..n], &current[off..off + n], "corrupt at byte {pos}");
            pos += n as u64;
            d = d.slice(n..);
        }
        got.store(pos, Ordering::Relaxed);
    }
    let down = began.elapsed();
    assert_eq!(pos, blocks * MIB, "download length");
    stop.store(true, Ordering::Relaxed);
    let peak = peak.join().unwrap();
    let grew = peak.saturating_sub(baseline);
    eprintln!(
        "proxy transfer of {blocks} MiB: upload {:.0} MiB/s, download {:.0} MiB/s, peak RSS growth {} MiB",
        blocks as f64 / up.as_secs_f64(),
        blocks as f64 / down.as_secs_f64(),
        grew / MIB
    );
    // Buffering either direction would hold the whole transfer in this process.
    let bound = (blocks * MIB / 4).clamp(64 * MIB, 256 * MIB);
    assert!(
        grew < bound,
        "RSS grew by {} MiB while moving {blocks} MiB",
        grew / MIB
    );
    let id = sb["sandboxID"].as_str().unwrap();
    s.api(Method::DELETE, &format!("/sandboxes/{id}"), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_requests_cannot_steer_the_proxy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start(Options::default()).await;
    let sb = s.create(r#"{"templateID":"base"}"#).await;
    let canary = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let canary_addr = canary.local_addr().unwrap();
    let hit = Arc::new(AtomicBool::new(false));
    let hit2 = Arc::clone(&hit);
    tokio::spawn(async move {
        if canary.accept().await.is_ok() {
            hit2.store(true, Ordering::SeqCst);
        }
    });
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET http://{canary_addr}/health HTTP/1.1\r\nHost: {canary_addr}\r\n\
         E2b-Sandbox-Id: {}\r\nE2b-Sandbox-Port: 49983\r\nConnection: close\r\n\r\n",
        sb["sandboxID"].as_str().unwrap()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    // The sandbox's agent answered /health (204, its version header); the canary saw nothing.
    assert!(out.starts_with("HTTP/1.1 204"), "{out}");
    assert!(out.to_ascii_lowercase().contains("x-envd-version"), "{out}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !hit.load(Ordering::SeqCst),
        "the proxy connected to the URI's authority"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_do_not_cross_the_proxy() {
    let s = TestServer::start(Options::default()).await;
    let sb = s.create(r#"{"templateID":"base"}"#).await;
    // `Connection: x-access-token` names the token as hop-by-hop: a correct proxy drops it,
    // and the agent then refuses the request for lack of a token.
    let r = s
        .envd(
            &sb,
            Method::GET,
            "/envs",
            &[("connection", "x-access-token")],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let r = s.envd(&sb, Method::GET, "/envs", &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
}
