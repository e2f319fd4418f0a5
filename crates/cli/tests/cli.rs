//! The `firkin` binary end to end: `serve` (process backend), the client commands against it,
//! and `kill -9` of the server followed by a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "e2b_cli_test_key_0123456789abcdef01234567";

fn firkin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_firkin"))
}

fn envd() -> PathBuf {
    if let Some(p) = std::env::var_os("FIRKIN_ENVD_BIN") {
        return PathBuf::from(p);
    }
    let p = firkin().parent().unwrap().join("firkin-envd");
    assert!(
        p.is_file(),
        "{} is missing: `cargo build -p firkin-envd` (or set FIRKIN_ENVD_BIN)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Serve {
    child: Child,
    url: String,
    state: PathBuf,
}

fn serve(state: &Path, cache: &Path, port: u16) -> Serve {
    let mut child = Command::new(firkin())
        .args(["serve", "--backend", "process", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--envd-bin")
        .arg(envd())
        .env("FIRKIN_STATE_DIR", state)
        .env("FIRKIN_CACHE_DIR", cache)
        .env("FIRKIN_API_KEY", KEY)
        .env("FIRKIN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = String::new();
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "serve exited: {banner}"
        );
        banner.push_str(&line);
        if line.contains("firkin is ready") {
            break;
        }
        assert!(Instant::now() < deadline, "serve not ready: {banner}");
    }
    // Keep reading so the banner's remaining lines never block the server.
    std::thread::spawn(move || for _ in out.lines() {});
    Serve {
        child,
        url: format!("http://127.0.0.1:{port}"),
        state: state.to_path_buf(),
    }
}

impl Serve {
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(firkin())
            .args(args)
            .env("E2B_API_URL", &self.url)
            .env_remove("E2B_SANDBOX_URL")
            .env_remove("E2B_API_KEY")
            // The key comes from the file `serve` would have written, or from --api-key.
            .env("FIRKIN_STATE_DIR", &self.state)
            .env("FIRKIN_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "firkin {args:?}: {err}");
        out
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn processes_mentioning(dir: &Path) -> Vec<u32> {
    firkin_server::procfs::processes_referencing(dir)
}

#[test]
fn serve_and_the_client_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (state, cache) = (dir.path().join("state"), dir.path().join("cache"));
    let s = serve(&state, &cache, free_port());
    let key = format!("--api-key={KEY}");

    let id = s.ok(&[
        "sandbox",
        "create",
        &key,
        "--metadata",
        "team=cli",
        "--env",
        "N=3",
    ]);
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 20, "{id}");
    let (code, out, _) = s.cli(&[
        "sandbox",
        "exec",
        &key,
        &id,
        "--",
        "for i in $(seq $N); do echo $i; done; exit 4",
    ]);
    assert_eq!((code, out.as_str()), (4, "1\n2\n3\n"));

    let listed: serde_json::Value =
        serde_json::from_str(&s.ok(&["sandbox", "ls", &key, "--metadata", "team=cli", "--json"]))
            .unwrap();
    assert_eq!(listed[0]["sandboxID"], id.as_str());
    let none: serde_json::Value =
        serde_json::from_str(&s.ok(&["sandbox", "ls", &key, "--metadata", "team=other", "--json"]))
            .unwrap();
    assert_eq!(none, serde_json::json!([]));

    let built: serde_json::Value = serde_json::from_str(&s.ok(&[
        "template", "build", &key, "tools", "--cpus", "1", "--run", "true", "--json",
    ]))
    .unwrap();
    assert_eq!(built["status"], "ready");
    let ls = s.ok(&["template", "ls", &key]);
    assert!(ls.contains("tools") && ls.contains("base"), "{ls}");
    s.ok(&["template", "rm", &key, "tools"]);
    let (code, _, err) = s.cli(&["template", "rm", &key, "tools"]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");

    s.ok(&["sandbox", "kill", &key, &id]);
    let (code, _, err) = s.cli(&["sandbox", "kill", &key, &id]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = s.cli(&["sandbox", "ls", "--api-key=wrong"]);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
}

#[test]
fn kill_9_then_restart_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (state, cache) = (dir.path().join("state"), dir.path().join("cache"));
    let port = free_port();
    let mut s = serve(&state, &cache, port);
    let key = format!("--api-key={KEY}");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(s.ok(&["sandbox", "create", &key]).trim().to_owned());
    }
    let paused = s.ok(&["sandbox", "create", &key]).trim().to_owned();
    s.ok(&[
        "sandbox",
        "exec",
        &key,
        &paused,
        "--",
        "echo kept > note.txt",
    ]);
    s.ok(&["sandbox", "pause", &key, &paused]);
    assert!(processes_mentioning(&state.join("sandboxes")).len() >= 3);

    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&state.join("sandboxes")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sandbox processes outlived the killed server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(s);

    let s = serve(&state, &cache, port);
    let listed: serde_json::Value =
        serde_json::from_str(&s.ok(&["sandbox", "ls", &key, "--json"])).unwrap();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["sandboxID"].as_str().unwrap())
        .collect();
    // The running ones died with the server and are not listed; the paused one is.
    assert_eq!(listed, vec![paused.as_str()]);
    for id in &ids {
        let (code, _, _) = s.cli(&["sandbox", "kill", &key, id]);
        assert_eq!(code, 1, "{id} should be gone");
    }
    s.ok(&["sandbox", "resume", &key, &paused]);
    let (code, out, _) = s.cli(&["sandbox", "exec", &key, &paused, "--", "cat note.txt"]);
    assert_eq!((code, out.as_str()), (0, "kept\n"));
}
