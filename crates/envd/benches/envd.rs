//! envd benchmark (not a test): idle RSS, RSS while serving a 1 GiB download and upload, and the
//! `commands.run("true")` round trip through a raw Rust client and through the e2b SDK.
//!
//! Run: `cargo bench -p firkin-envd --bench envd`. The SDK part needs the venv that
//! `tests/sdk/run-envd.sh` creates (or `FIRKIN_BENCH_PYTHON` pointing at a python with e2b).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use firkin_envd::client::{Client, ReqBody, full};
use http::Method;
use http_body_util::{BodyExt, StreamBody};

const TOKEN: &str = "bench-token";
const GIB: u64 = 1 << 30;

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Samples VmRSS of `pid` until `done` flips, returning the largest value (KiB).
fn sample_rss(
    pid: u32,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(status_kib(pid, "VmRSS:"));
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    })
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let bin = env!("CARGO_BIN_EXE_firkin-envd");
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--log", "warn"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().trim_start_matches("listening on ").to_owned();
    let anon = Client::new(&url).unwrap();
    anon.init(&serde_json::json!({"accessToken": TOKEN}))
        .await
        .unwrap();
    let client = anon.clone().with_token(TOKEN);

    println!("firkin-envd benchmark ({bin})");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = status_kib(pid, "VmRSS:");
    println!(
        "idle RSS:                          {:7.1} MiB   (target <= 10 MiB)",
        mib(idle)
    );

    // 1 GiB download of a sparse file: the page cache serves it, so the numbers show envd's own
    // buffering, not the disk.
    let dir = tempfile::Builder::new()
        .prefix("firkin-envd-bench-")
        .tempdir_in("/tmp")
        .unwrap();
    let big = dir.path().join("big.bin");
    std::fs::File::create(&big).unwrap().set_len(GIB).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_rss(pid, done.clone());
    let t = Instant::now();
    let resp = client
        .request(
            Method::GET,
            &format!("/files?path={}", big.display()),
            &[],
            full(Bytes::new()),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len() as u64;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert_eq!(total, GIB);
    println!(
        "peak RSS serving a 1 GiB download: {:7.1} MiB   (target <= 64 MiB; {:.0} MiB/s)",
        mib(peak),
        1024.0 / secs
    );

    // 1 GiB streamed upload.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_rss(pid, done.clone());
    let chunk = Bytes::from(vec![0x5au8; 256 * 1024]);
    let stream = futures::stream::iter(
        (0..(GIB / chunk.len() as u64))
            .map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
    );
    let body: ReqBody = StreamBody::new(stream).boxed();
    let up = dir.path().join("up.bin");
    let t = Instant::now();
    let (status, _, _) = client
        .fetch(
            Method::POST,
            &format!("/files?path={}", up.display()),
            &[("content-type", "application/octet-stream")],
            body,
        )
        .await
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak_up = sampler.join().unwrap();
    assert!(status.is_success(), "{status}");
    assert_eq!(std::fs::metadata(&up).unwrap().len(), GIB);
    println!(
        "peak RSS receiving a 1 GiB upload: {:7.1} MiB   ({:.0} MiB/s)",
        mib(peak_up),
        1024.0 / secs
    );
    drop(dir);

    // commands.run("true") is `/bin/bash -l -c true`: a login shell, whose profile costs what
    // the machine's profile costs (root's, on a developer box, can be 100 ms of pyenv and cargo
    // set-up). So it is timed as the default user and as the fresh `user` (when it exists), and
    // envd's own share is shown by exec'ing /bin/true without a shell.
    let n = 200;
    let has_user = firkin_envd::users::AccountDb::default()
        .by_name("user")
        .is_ok();
    type Case<'a> = (&'a str, &'a str, Vec<&'a str>, Option<&'a str>);
    let mut cases: Vec<Case> = vec![(
        "run(\"true\"), default user",
        "/bin/bash",
        vec!["-l", "-c", "true"],
        None,
    )];
    if has_user {
        cases.push((
            "run(\"true\", user=\"user\")",
            "/bin/bash",
            vec!["-l", "-c", "true"],
            Some("user"),
        ));
    }
    cases.push(("exec /bin/true (no shell)", "/bin/true", vec![], None));
    for (label, cmd, args, user) in &cases {
        for _ in 0..10 {
            client.exec(cmd, args, *user).await.unwrap();
        }
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let out = client.exec(cmd, args, *user).await.unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(out.exit_code, 0);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        println!(
            "raw Rust client, {label:<30} p50 {:7.2} ms   p99 {:7.2} ms   (n={n})",
            percentile(&samples, 0.5),
            percentile(&samples, 0.99)
        );
    }

    let python = std::env::var_os("FIRKIN_BENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    if python.exists() {
        let mut users = vec![""];
        if has_user {
            users.push("user");
        }
        for user in users {
            let out = Command::new(&python)
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/sdk_run_true.py"))
                .args([&url, TOKEN, &n.to_string(), user])
                .output()
                .unwrap();
            if !out.status.success() {
                println!("SDK run failed: {}", String::from_utf8_lossy(&out.stderr));
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let mut s: Vec<f64> = v["samples_ms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            s.sort_by(|a, b| a.total_cmp(b));
            let label = if user.is_empty() {
                "run(\"true\"), default user".to_owned()
            } else {
                format!("run(\"true\", user=\"{user}\")")
            };
            println!(
                "e2b Python SDK,  {label:<30} p50 {:7.2} ms   p99 {:7.2} ms   (n={n})",
                percentile(&s, 0.5),
                percentile(&s, 0.99)
            );
        }
    } else {
        println!(
            "SDK timing skipped: no {} (run tests/sdk/run-envd.sh once)",
            python.display()
        );
    }
    let after = status_kib(pid, "VmRSS:");
    println!("RSS after the benchmark:           {:7.1} MiB", mib(after));
    let _ = child.kill();
    let _ = child.wait();
}
