//! The `firkin` binary end to end: `serve`, the client commands against it, and `kill -9` of
//! the server followed by a restart; on the process backend and (the `vm_*` tests) on real
//! QEMU microVMs. The VM tests use the shared cache (`$FIRKIN_CACHE_DIR`, else
//! `~/.firkin/cache`): they adopt a finished `base` build there, or build it (minutes under
//! TCG). They need `scripts/setup-guest.sh` to have run; a missing asset fails them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::free_port;

mod support;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Process,
    Qemu,
}

/// The cache VM servers share with every other firkin on this machine.
fn shared_cache_dir() -> PathBuf {
    std::env::var_os("FIRKIN_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".firkin/cache")
        })
}

struct Serve {
    child: Child,
    url: String,
    state: PathBuf,
    backend: Backend,
}

/// Starts `firkin serve`. A VM server uses the shared cache (`cache` is ignored) and may build
/// `base` first; VM servers start one at a time so that a clean machine builds it once.
fn serve(state: &Path, cache: &Path, port: u16, backend: Backend) -> Serve {
    static VM_STARTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one =
        (backend == Backend::Qemu).then(|| VM_STARTS.lock().unwrap_or_else(|e| e.into_inner()));
    let mut cmd = Command::new(firkin());
    cmd.args(["serve", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .env("FIRKIN_STATE_DIR", state)
        .env("FIRKIN_API_KEY", KEY)
        .env("FIRKIN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let ready_within = match backend {
        Backend::Process => {
            cmd.args(["--backend", "process", "--envd-bin"])
                .arg(envd())
                .env("FIRKIN_CACHE_DIR", cache);
            Duration::from_secs(60)
        }
        Backend::Qemu => {
            // VM servers of this binary run side by side: each its own network slot names and
            // addresses (kept across a restart of the same state directory, whose leftovers
            // the restarted server removes).
            static BY_STATE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
            let n = {
                let mut seen = BY_STATE.lock().unwrap_or_else(|e| e.into_inner());
                seen.iter().position(|p| p == state).unwrap_or_else(|| {
                    seen.push(state.to_path_buf());
                    seen.len() - 1
                })
            };
            // Names and addresses are the same from run to run, so a run removes what a killed
            // earlier one left (a server sweeps its own prefix's leftovers at start).
            cmd.env("FIRKIN_NET_PREFIX", format!("cli{n}"))
                .env("FIRKIN_NET_RANGE", format!("198.19.{}.0/24", 128 + n % 64));
            // No warm pool: the tests count VMs, and a refill would race with the counts.
            cmd.args(["--backend", "qemu", "--warm-pool", "base=0"])
                .env("FIRKIN_CACHE_DIR", shared_cache_dir());
            // A first build of `base` on a busy machine.
            Duration::from_secs(1800)
        }
    };
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + ready_within;
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
        backend,
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
    /// SIGTERM first, so that a VM server removes its network slots; SIGKILL after 60 s.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn processes_mentioning(dir: &Path) -> Vec<u32> {
    firkin_server::procfs::processes_referencing(dir)
}

impl Serve {
    /// Sandboxes kept warm: `serve`'s default pool for the process backend, none for VMs.
    fn warm_depth(&self) -> usize {
        match self.backend {
            Backend::Process => 1,
            Backend::Qemu => 0,
        }
    }

    /// Waits until exactly `n` sandbox processes run (a warm pool refills in the background).
    fn await_sandbox_processes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pids = self.sandbox_processes();
            if pids.len() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} sandbox processes, found {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its sandbox processes, each checked to be what the backend runs.
    /// The server's short-lived `qemu-img create` on a run directory is not a sandbox.
    fn sandbox_processes(&self) -> Vec<u32> {
        let mut pids = processes_mentioning(&self.state.join("sandboxes"));
        pids.retain(|&pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false; // exited meanwhile
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("qemu-img create ") {
                return false;
            }
            let kind = match self.backend {
                Backend::Process => "firkin-envd",
                Backend::Qemu => "qemu-system",
            };
            assert!(cmd.contains(kind), "{pid} is not a {kind}: {cmd}");
            true
        });
        pids
    }
}

#[test]
fn serve_and_the_client_commands() {
    serve_and_the_client_commands_on(Backend::Process);
}

#[test]
fn vm_serve_and_the_client_commands() {
    serve_and_the_client_commands_on(Backend::Qemu);
}

fn serve_and_the_client_commands_on(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (state, cache) = (dir.path().join("state"), dir.path().join("cache"));
    let s = serve(&state, &cache, free_port(), backend);
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
    assert_eq!(s.sandbox_processes().len(), 1 + s.warm_depth());

    let listed: serde_json::Value =
        serde_json::from_str(&s.ok(&["sandbox", "ls", &key, "--metadata", "team=cli", "--json"]))
            .unwrap();
    assert_eq!(listed[0]["sandboxID"], id.as_str());
    let none: serde_json::Value =
        serde_json::from_str(&s.ok(&["sandbox", "ls", &key, "--metadata", "team=other", "--json"]))
            .unwrap();
    assert_eq!(none, serde_json::json!([]));

    if backend == Backend::Process {
        // A VM template build is `vm_template_build_create_and_rm`.
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
    }

    s.ok(&["sandbox", "kill", &key, &id]);
    let (code, _, err) = s.cli(&["sandbox", "kill", &key, &id]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = s.cli(&["sandbox", "ls", "--api-key=wrong"]);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    s.await_sandbox_processes(s.warm_depth());
}

/// A real template build on VMs: `--run` commands are baked into the snapshot that sandboxes
/// of the template start from. Builds a root filesystem and boots it: minutes under TCG.
#[test]
fn vm_template_build_create_and_rm() {
    let dir = tempfile::tempdir().unwrap();
    let (state, cache) = (dir.path().join("state"), dir.path().join("cache"));
    let s = serve(&state, &cache, free_port(), Backend::Qemu);
    let key = format!("--api-key={KEY}");
    let name = format!("clitest-{}", std::process::id());
    let built: serde_json::Value = serde_json::from_str(&s.ok(&[
        "template",
        "build",
        &key,
        &name,
        "--cpus",
        "1",
        "--memory-mb",
        "384",
        "--run",
        "echo baked > /etc/firkin-cli-test",
        "--json",
    ]))
    .unwrap();
    assert_eq!(built["status"], "ready", "{built}");
    let build_dir = shared_cache_dir()
        .join("templates")
        .join(&name)
        .join(built["buildID"].as_str().unwrap());
    assert!(build_dir.join("firkin-template.json").is_file());
    let ls = s.ok(&["template", "ls", &key]);
    assert!(ls.contains(&name) && ls.contains("base"), "{ls}");

    let id = s
        .ok(&["sandbox", "create", &key, "--template", &name])
        .trim()
        .to_owned();
    let (code, out, err) = s.cli(&[
        "sandbox",
        "exec",
        &key,
        &id,
        "--",
        "cat /etc/firkin-cli-test; nproc; free -m | awk '/Mem:/{print ($2 < 384)}'",
    ]);
    assert_eq!((code, out.as_str()), (0, "baked\n1\n1\n"), "{err}");
    let (code, _, err) = s.cli(&["template", "rm", &key, &name]);
    assert_eq!(code, 1, "a template in use must not be deleted");
    assert!(err.contains("409"), "{err}");
    s.ok(&["sandbox", "kill", &key, &id]);
    s.ok(&["template", "rm", &key, &name]);
    assert!(
        !build_dir.exists(),
        "the build left {}",
        build_dir.display()
    );
    let (code, _, err) = s.cli(&["template", "rm", &key, &name]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
}

#[test]
fn kill_9_then_restart_leaves_nothing_behind() {
    kill_9_then_restart_leaves_nothing_behind_on(Backend::Process);
}

/// The real thing: QEMUs die with a SIGKILLed server (PDEATHSIG); the restarted server lists
/// only what exists and resumes the paused VM from its snapshot.
#[test]
fn vm_kill_9_then_restart_leaves_nothing_behind() {
    kill_9_then_restart_leaves_nothing_behind_on(Backend::Qemu);
}

fn kill_9_then_restart_leaves_nothing_behind_on(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (state, cache) = (dir.path().join("state"), dir.path().join("cache"));
    let port = free_port();
    let mut s = serve(&state, &cache, port, backend);
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
    // The three running sandboxes (and the warm pool) are live processes; the paused one is not.
    s.await_sandbox_processes(3 + s.warm_depth());

    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_mentioning(&state.join("sandboxes")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sandbox processes outlived the killed server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(s);

    let s = serve(&state, &cache, port, backend);
    // Nothing runs that the new server did not start (only its warm pool, if any).
    s.await_sandbox_processes(s.warm_depth());
    let listed: serde_json::Value =
        serde_json::from_str(&s.ok(&["sandbox", "ls", &key, "--json"])).unwrap();
    let listed: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["sandboxID"].as_str().unwrap(),
                v["state"].as_str().unwrap(),
            )
        })
        .collect();
    // The running ones died with the server and are not listed; the paused one is.
    assert_eq!(listed, vec![(paused.as_str(), "paused")]);
    for id in &ids {
        let (code, _, _) = s.cli(&["sandbox", "kill", &key, id]);
        assert_eq!(code, 1, "{id} should be gone");
    }
    s.ok(&["sandbox", "resume", &key, &paused]);
    let (code, out, _) = s.cli(&["sandbox", "exec", &key, &paused, "--", "cat note.txt"]);
    assert_eq!((code, out.as_str()), (0, "kept\n"));
    s.await_sandbox_processes(1 + s.warm_depth());
}

/// `firkin doctor` checks the guest assets where `firkin serve` loads them: it fails, naming
/// the set-up script, on an empty cache, and passes on the cache the VM tests use.
#[test]
fn doctor_finds_the_guest_assets_serve_uses() {
    let dir = tempfile::tempdir().unwrap();
    let doctor = |cache: &Path| {
        let out = Command::new(firkin())
            .args(["doctor", "--json", "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .env("FIRKIN_STATE_DIR", dir.path().join("state"))
            .env("FIRKIN_CACHE_DIR", cache)
            .env_remove("FIRKIN_GUEST_BIN_DIR")
            .output()
            .unwrap();
        let checks: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        let status = |name: &str| {
            let c = checks
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["check"] == name)
                .unwrap_or_else(|| panic!("no {name} check in {checks}"));
            (
                c["status"].as_str().unwrap().to_owned(),
                c["detail"].as_str().unwrap().to_owned(),
            )
        };
        (
            out.status.success(),
            status("guest kernel"),
            status("guest binaries"),
        )
    };

    let (ok, (kernel, detail), _) = doctor(&dir.path().join("empty-cache"));
    assert!(!ok, "doctor passed without a guest kernel");
    assert_eq!(kernel, "fail");
    assert!(detail.contains("scripts/setup.sh"), "{detail}");

    let (_, kernel, binaries) = doctor(&shared_cache_dir());
    assert_eq!(kernel.0, "ok", "{}", kernel.1);
    assert_eq!(binaries.0, "ok", "{}", binaries.1);
}

/// One `firkin serve` on the process backend whose agent binary does not exist: it builds its
/// default template (the progress bar's code path) and its warm pool's refills fail (a warning,
/// then retries with backoff). Stdout and stderr are pipes. Returns both once a retry was
/// logged, the server killed.
fn serve_with_a_failing_warm_pool(log_format: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(firkin());
    cmd.arg("serve")
        .arg(format!("--listen=127.0.0.1:{}", free_port()))
        .args(["--backend", "process", "--envd-bin"])
        .arg(dir.path().join("no-such-envd"))
        .env("FIRKIN_STATE_DIR", dir.path().join("state"))
        .env("FIRKIN_CACHE_DIR", dir.path().join("cache"))
        .env("FIRKIN_API_KEY", KEY)
        .env("FIRKIN_LOG", "info,firkin_runtime=debug")
        // What would make colour and progress bars appear if only the environment counted.
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .env_remove("FIRKIN_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(f) = log_format {
        cmd.args(["--log-format", f]);
    }
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut err_pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut err_pipe, &mut buf) {
                Ok(0) | Err(_) => return all,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    let _ = tx.send(String::from_utf8_lossy(&all).into_owned());
                }
            }
        }
    });
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut stdout = String::new();
    while !stdout.contains("firkin is ready") {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve exited: {stdout}\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        stdout.push_str(&line);
    }
    // The first refill fails at once; a repeat comes after the first backoff (1 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    while !seen.contains("warm pool refill failed again") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(s) => seen = s,
            Err(_) => break,
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut out, &mut rest).unwrap();
    let mut stdout = stdout.into_bytes();
    stdout.extend(rest);
    (stdout, stderr.join().unwrap())
}

fn assert_no_escapes(what: &str, bytes: &[u8]) {
    assert!(
        !bytes.contains(&0x1b),
        "{what} through a pipe holds ESC bytes:\n{}",
        String::from_utf8_lossy(bytes)
    );
}

/// Logs through a pipe carry no colour or progress-bar codes, and `--log-format json` makes
/// stderr one JSON object per line. The repeated refill failure is warned about once.
#[test]
fn piped_logs_are_plain_text_or_json_lines() {
    let (stdout, stderr) = serve_with_a_failing_warm_pool(None);
    assert_no_escapes("stdout", &stdout);
    assert_no_escapes("stderr", &stderr);
    let text = String::from_utf8(stderr).unwrap();
    let count = |level: &str, what: &str| {
        text.lines()
            .filter(|l| l.contains(level) && l.contains(what))
            .count()
    };
    assert_eq!(count(" WARN ", "warm pool refill failed"), 1, "{text}");
    assert!(
        count(" DEBUG ", "warm pool refill failed again") >= 1,
        "{text}"
    );
    assert!(count(" INFO ", "template build") >= 1, "{text}");
    assert!(count(" INFO ", "listening") == 1, "{text}");

    let (stdout, stderr) = serve_with_a_failing_warm_pool(Some("json"));
    assert_no_escapes("stdout", &stdout);
    assert_no_escapes("stderr", &stderr);
    let text = String::from_utf8(stderr).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\nin:\n{text}"));
            assert!(v.is_object(), "not an object: {l}");
            assert!(v["timestamp"].is_string() && v["level"].is_string(), "{l}");
            v
        })
        .collect();
    let count = |level: &str, what: &str| {
        events
            .iter()
            .filter(|e| {
                e["level"] == level
                    && e["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with(what))
            })
            .count()
    };
    assert_eq!(count("WARN", "warm pool refill failed"), 1, "{text}");
    assert!(
        count("DEBUG", "warm pool refill failed again") >= 1,
        "{text}"
    );
    assert!(count("INFO", "template build") >= 1, "{text}");
    assert_eq!(count("INFO", "listening"), 1, "{text}");
}
